//! Forwarding one HTTP request through the tunnel: choose the route by Host,
//! check the client address, rewrite the headers a proxy owns, send the
//! request over its own QUIC stream, and stream the response back chunk by
//! chunk (or splice an upgraded connection). A request for a sleeping
//! service is held or answered with the waiting page ([`super::wake`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;

use burrow_proto::{StreamKind, StreamOpen, StreamStatus};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::io::{ClientBody, IdleIo, Paced, QuicIo};
use super::wake::{self, WAKE_STATUS_PATH, WakeRight};
use super::{Body, HttpState, InFlight, error_response};
use crate::access::gate::Admission;
use crate::access::{Decision, client_ip};
use crate::config::{AuthMode, RouteConfig};
use crate::metrics::Refusal;
use crate::tunnel::registry::HoldRefused;
use crate::tunnel::{
    AgentLink, OpenError, Pool, PoolKey, ServiceConn, UpstreamBody, open_stream_on,
};
use burrow_proto::listener::ClientKey;

/// Headers that describe one hop and never cross a proxy (RFC 9110 7.6.1),
/// plus the proxy credentials meant for us.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Buffer per direction for an upgraded connection (WebSocket). tokio's
/// default is 8 KiB each way, allocated and zeroed up front: 16 KiB of
/// resident memory per idle WebSocket. Chat messages are far smaller, and a
/// big message just takes a few more reads.
const UPGRADED_COPY_BUFFER: usize = 2 * 1024;

/// Client-supplied forwarding headers: only the edge sets these.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// Answers one request; `in_flight` stays counted until the response body
/// ends or is dropped.
pub async fn handle(
    req: Request<Incoming>,
    state: Arc<HttpState>,
    peer: SocketAddr,
    in_flight: InFlight,
) -> Response<Body> {
    let started = Instant::now();
    let mut entry = AccessEntry {
        client: peer.ip().to_canonical(),
        user: None,
        method: req.method().clone(),
        host: String::new(),
        path: req.uri().path().to_owned(),
        status: 0,
        started,
    };
    let resp = route_request(req, &state, peer, &mut entry).await;
    state.metrics.response(resp.status().as_u16());
    entry.status = resp.status().as_u16();
    resp.map(|body| {
        LoggedBody {
            inner: body,
            bytes: 0,
            entry: Some(entry),
            _in_flight: in_flight,
        }
        .boxed()
    })
}

async fn route_request(
    req: Request<Incoming>,
    state: &HttpState,
    peer: SocketAddr,
    entry: &mut AccessEntry,
) -> Response<Body> {
    // ACME validations bypass IP rules and auth; nothing else does.
    if let Some(answer) = super::acme_answer(&state.certs, req.uri().path()) {
        return answer;
    }
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(why) => {
            debug!(%peer, why, "bad request");
            return error_response(StatusCode::BAD_REQUEST, why);
        }
    };
    entry.host.clone_from(&host.name);
    let Some(route) = state.route(&host.name) else {
        debug!(%peer, host = %host.name, "no route for host");
        return error_response(StatusCode::NOT_FOUND, "no such site here");
    };
    let ip = client_ip(peer, req.headers(), &state.trusted_proxies);
    entry.client = ip;
    if let Decision::Deny(reason) = state.access.check(ip).and(route.rules.check(ip)) {
        info!(%peer, client = %ip, host = %route.host, ?reason, "denied by ip rules");
        return error_response(StatusCode::FORBIDDEN, "forbidden");
    }
    let client = SocketAddr::new(ip, peer.port());
    let (req, set_cookie, right, paced) = match (route.auth, &state.gate) {
        (AuthMode::None, _) => (req, None, WakeRight::May, Paced::Yes),
        (AuthMode::Basic, Some(gate)) => match gate.admit(req, route, ip).await {
            Admission::Forward {
                req,
                set_cookie,
                user,
            } => {
                // Public paths pass without a user: they must not wake
                // anything, and their bodies must keep arriving.
                let (right, paced) = if user.is_some() {
                    (WakeRight::May, Paced::No)
                } else {
                    (WakeRight::MayNot, Paced::Yes)
                };
                entry.user = user;
                (req, set_cookie, right, paced)
            }
            Admission::Respond(r) => {
                if matches!(
                    r.status(),
                    StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
                ) {
                    state.metrics.auth_failure();
                }
                return r;
            }
        },
        // Config validation guarantees users for basic routes; fail closed.
        (AuthMode::Basic, None) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "authentication unavailable",
            );
        }
    };
    let mut resp = if req.uri().path() == WAKE_STATUS_PATH {
        wake::status_response(&state.registry, route, right)
    } else {
        let req = req.map(|body| ClientBody::new(body, paced, &state.metrics));
        dispatch(req, state, route, &host, client, right).await
    };
    if let Some(cookie) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        state.metrics.time_to_first_byte(entry.started.elapsed());
    }
    resp
}

/// What the access log says about one request.
#[derive(Debug)]
struct AccessEntry {
    client: IpAddr,
    user: Option<String>,
    method: Method,
    host: String,
    path: String,
    status: u16,
    started: Instant,
}

/// A response body that counts what it sends and writes the request's
/// access-log line when it ends (completed, or cut off by the client);
/// the request counts as in flight until then.
struct LoggedBody {
    inner: Body,
    bytes: u64,
    entry: Option<AccessEntry>,
    _in_flight: InFlight,
}

impl LoggedBody {
    fn log(&mut self, outcome: &'static str) {
        if let Some(e) = self.entry.take() {
            info!(
                target: "burrow::access",
                client = %e.client,
                user = e.user.as_deref().unwrap_or("-"),
                method = %e.method,
                host = %e.host,
                path = %e.path,
                status = e.status,
                bytes = self.bytes,
                duration_ms = u64::try_from(e.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                outcome,
                "request"
            );
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => this.log("complete"),
            std::task::Poll::Ready(Some(Err(_))) => this.log("error"),
            std::task::Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.log("client gone");
    }
}

/// The host a request is for, as written by the client and lowercased.
#[derive(Debug)]
struct RequestHost {
    /// Without port, lowercase: the routing key.
    name: String,
    /// As the client wrote it (host and port), for the forwarded Host header.
    authority: String,
}

fn request_host<B>(req: &Request<B>) -> Result<RequestHost, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    // HTTP/2 (and HTTP/1.1 absolute-form) carry the authority in the URI.
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => {
            let value = header.ok_or("missing Host header")?;
            value
                .to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .ok_or("invalid Host header")?
        }
    };
    if authority.as_str().contains('@') {
        return Err("invalid Host header");
    }
    Ok(RequestHost {
        name: authority.host().trim_end_matches('.').to_ascii_lowercase(),
        authority: authority.as_str().to_owned(),
    })
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Builds the request the service sees: origin-form URI, HTTP/1.1, our
/// forwarding headers, no hop-by-hop headers (an upgrade's own are kept).
fn upstream_request(
    req: Request<ClientBody>,
    route: &RouteConfig,
    host: &RequestHost,
    client: SocketAddr,
    upgrade: bool,
) -> Result<Request<UpstreamBody>, &'static str> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = path.parse::<Uri>().map_err(|_| "invalid request target")?;
    parts.version = Version::HTTP_11;

    let h = &mut parts.headers;
    let upgrade_value = upgrade.then(|| h.get(header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(h);
    for name in FORWARDING {
        h.remove(*name);
    }
    // The edge answers `Expect: 100-continue` itself (hyper sends the 100
    // when the body is read); passed on, a service that answers early
    // without reading the body would leave it on a connection the pool
    // hands to the next request.
    h.remove(header::EXPECT);
    if let Some(v) = upgrade_value {
        h.insert(header::UPGRADE, v);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let host_value = route.host_header.as_deref().unwrap_or(&host.authority);
    h.insert(
        header::HOST,
        HeaderValue::from_str(host_value).map_err(|_| "invalid Host header")?,
    );
    let ip = client.ip().to_canonical();
    let value = |s: String| HeaderValue::from_str(&s).map_err(|_| "invalid Host header");
    h.insert("x-forwarded-for", value(ip.to_string())?);
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    h.insert("x-forwarded-host", value(host.authority.clone())?);
    h.insert(
        "forwarded",
        value(format!(
            "for={};proto=https;host=\"{}\"",
            forwarded_for(ip),
            host.authority
        ))?,
    );
    Ok(Request::from_parts(parts, Either::Left(body)))
}

/// One place that turns tunnel failures into statuses. Bodies stay short
/// and generic; the details go to the log.
fn open_error_status(e: &OpenError) -> (StatusCode, &'static str) {
    match e {
        OpenError::AgentOffline(_) => (StatusCode::BAD_GATEWAY, "the home server is offline"),
        OpenError::Busy => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the home server is busy; try again shortly",
        ),
        OpenError::ReplyTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "the home server did not answer",
        ),
        OpenError::Service {
            status: StreamStatus::TimedOut,
            ..
        } => (StatusCode::GATEWAY_TIMEOUT, "the service did not answer"),
        OpenError::Service { .. } => (StatusCode::BAD_GATEWAY, "the service is not reachable"),
        OpenError::Lost(_) | OpenError::BadReply(_) => {
            (StatusCode::BAD_GATEWAY, "the home server connection failed")
        }
    }
}

/// A request that could not be forwarded because its stream could not be
/// opened; the request is untouched (its body unread), ready for a retry.
struct Unreachable {
    req: Request<UpstreamBody>,
    error: OpenError,
}

/// The answer for a stream that could not be opened.
fn open_failure(e: &OpenError, route: &RouteConfig) -> Response<Body> {
    let (status, body) = open_error_status(e);
    warn!(host = %route.host, agent = %route.agent, service = %route.service, error = %e, "cannot reach service");
    if status == StatusCode::SERVICE_UNAVAILABLE {
        return wake::unavailable(body);
    }
    error_response(status, body)
}

/// Forwards at once when the service is ready; otherwise (or when the
/// connect fails on a service that can be woken) wakes it and holds the
/// request or answers with the waiting page.
async fn dispatch(
    req: Request<ClientBody>,
    state: &HttpState,
    route: &RouteConfig,
    host: &RequestHost,
    client: SocketAddr,
    right: WakeRight,
) -> Response<Body> {
    let arrived = Instant::now();
    let upgrade = req.version() == Version::HTTP_11 && is_upgrade(req.headers());
    let navigation = !upgrade && wake::is_navigation(&req);
    let req = match upstream_request(req, route, host, client, upgrade) {
        Ok(r) => r,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
    };
    let registry = &state.registry;
    let mut after_failure = false;
    let req = if wake::is_asleep(registry.service(&route.agent, &route.service).as_ref()) {
        req
    } else {
        match forward(req, upgrade, state, route, client, None).await {
            Ok(resp) => return resp,
            Err(Unreachable { req, error })
                if wake::worth_waking(&error)
                    && registry
                        .service(&route.agent, &route.service)
                        .is_some_and(|s| s.wake == burrow_proto::WakeMethod::MagicPacket) =>
            {
                info!(host = %route.host, service = %route.service, error = %error, "service unreachable; it may be asleep");
                after_failure = true;
                req
            }
            Err(Unreachable { error, .. }) => return open_failure(&error, route),
        }
    };
    if right == WakeRight::MayNot {
        debug!(host = %route.host, "public path for a sleeping service; not waking it");
        return wake::unavailable("the service is asleep");
    }
    registry.request_wake(&route.agent, &route.service);
    if navigation && route.wake.page {
        return wake::waiting_page(route);
    }
    hold(
        req,
        upgrade,
        state,
        route,
        client,
        arrived + route.wake.hold,
        after_failure,
    )
    .await
}

/// Holds a request until the service is ready, then forwards it. Held
/// requests take turns in arrival order, each keeping its turn until the
/// agent has connected it to the service, so the service sees them in
/// that order too.
async fn hold(
    mut req: Request<UpstreamBody>,
    upgrade: bool,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    deadline: Instant,
    mut after_failure: bool,
) -> Response<Body> {
    let registry = &state.registry;
    let Some(queue) = registry.wake_queue(&route.agent, &route.service) else {
        // The agent never listed the service: forwarding says what is wrong.
        return match forward(req, upgrade, state, route, client, None).await {
            Ok(resp) => resp,
            Err(Unreachable { error, .. }) => open_failure(&error, route),
        };
    };
    debug!(host = %route.host, service = %route.service, "holding request while the service wakes");
    let too_long = || {
        info!(host = %route.host, service = %route.service, hold = ?route.wake.hold, "service not ready within hold");
        wake::unavailable("the service is waking up; try again shortly")
    };
    loop {
        let lock = queue.clone().lock_owned();
        tokio::pin!(lock);
        // The first poll takes our place in the line; only then does the
        // request count as held, so the count follows the line's order.
        // Counted (or refused) just before the first poll takes our place
        // in line, with no await between: the count follows the line's order.
        let key = ClientKey::of(client.ip());
        let held = match registry.try_hold(&route.agent, &route.service, key, state.hold_caps) {
            Ok(held) => held,
            Err(why) => return hold_refused(state, route, client, why),
        };
        let first = std::future::poll_fn(|cx| Poll::Ready(lock.as_mut().poll(cx))).await;
        let turn = match first {
            Poll::Ready(turn) => turn,
            Poll::Pending => match tokio::time::timeout_at(deadline, lock).await {
                Ok(turn) => turn,
                Err(_) => return too_long(),
            },
        };
        if wake::wait_ready(registry, route, deadline, after_failure)
            .await
            .is_err()
        {
            return too_long();
        }
        drop(held);
        match forward(req, upgrade, state, route, client, Some(turn)).await {
            Ok(resp) => return resp,
            Err(Unreachable { req: r, error })
                if wake::worth_waking(&error) && Instant::now() < deadline =>
            {
                debug!(error = %error, "service still unreachable; waking again");
                registry.request_wake(&route.agent, &route.service);
                req = r;
                after_failure = true;
            }
            Err(Unreachable { error, .. }) => return open_failure(&error, route),
        }
    }
}

/// The answer when a request cannot be held: 503 with Retry-After at once.
fn hold_refused(
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    why: HoldRefused,
) -> Response<Body> {
    let (refusal, limit) = match why {
        HoldRefused::Client => (Refusal::HeldPerClient, state.hold_caps.per_client),
        HoldRefused::Service => (Refusal::HeldPerService, state.hold_caps.per_service),
        HoldRefused::Unknown => {
            return wake::unavailable("the service is not available");
        }
    };
    state.metrics.refused(refusal);
    info!(host = %route.host, service = %route.service, client = %client.ip(), ?why, limit, "too many requests held for a waking service; refusing");
    wake::unavailable("the service is waking up; too many requests are waiting")
}

/// Sends `req` (already rewritten by [`upstream_request`]) to the service:
/// over an idle connection from the session's pool when there is one, else
/// over a new stream. `turn` is released once a connection is at hand.
async fn forward(
    req: Request<UpstreamBody>,
    upgrade: bool,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    mut turn: Option<OwnedMutexGuard<()>>,
) -> Result<Response<Body>, Unreachable> {
    let Some(link) = state.registry.wait_for(&route.agent).await else {
        let error = OpenError::AgentOffline(route.agent.clone());
        return Err(Unreachable { req, error });
    };
    if upgrade {
        return forward_upgrade(req, state, route, client, &link, turn).await;
    }
    let key = PoolKey {
        service: route.service.clone(),
        idle_timeout: route.idle_timeout,
    };
    // A machine that can be woken may go to sleep with connections open,
    // and a sleeping machine never closes them: its requests always get a
    // new connection, whose failure starts a wake.
    let poolable = !state
        .registry
        .service(&route.agent, &route.service)
        .is_some_and(|s| s.wake == burrow_proto::WakeMethod::MagicPacket);
    let mut req = req;
    let mut replayed = false;
    loop {
        // A held request (one with a turn) goes on a new connection: the
        // service then sees held requests connect in their arrival order.
        let pooled = if turn.is_some() || !poolable || replayed {
            None
        } else {
            link.pool.take(&key)
        };
        let (mut conn, reused) = match pooled {
            Some(conn) => (conn, true),
            None => match connect(&link, StreamKind::Http, state, route, client).await {
                Ok(Some(sender)) => (ServiceConn::new(sender), false),
                Ok(None) => return Ok(connection_failed()),
                Err(error) => return Err(Unreachable { req, error }),
            },
        };
        drop(turn.take());
        // A reused connection may be closing under us (the service's own
        // keep-alive timeout): a request it never sent goes on another
        // connection, and a safe one without a body that it sent goes once
        // more, on a new connection.
        let replay = if reused { replay_copy(&req) } else { None };
        let response = match await_response(conn.sender.try_send_request(req), route).await {
            Ok(r) => r,
            Err(Waited::Late(t)) => return Ok(too_late(route, t)),
            Err(Waited::Failed(mut e)) => {
                if reused && let Some(again) = e.take_message() {
                    debug!(error = %e.error(), "reused service connection was closed; sending on another");
                    req = again;
                    continue;
                }
                let closed_early = e.error().is_incomplete_message() || e.error().is_canceled();
                if let Some(again) = replay.filter(|_| closed_early) {
                    debug!(error = %e.error(), "reused service connection closed under a safe request; sending it once more");
                    req = again;
                    replayed = true;
                    continue;
                }
                return Ok(failed_to_respond(route, e.error()));
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            warn!(host = %route.host, "service switched protocols without an upgrade request");
            return Ok(error_response(
                StatusCode::BAD_GATEWAY,
                "the service failed to respond",
            ));
        }
        let mut response = response;
        strip_hop_by_hop(response.headers_mut());
        let park = poolable.then(|| (link.pool.clone(), key, conn));
        return Ok(response.map(|inner| {
            ParksConnection {
                inner,
                park,
                ended: false,
            }
            .boxed()
        }));
    }
}

/// A response body that hands its connection back to the pool once the
/// body has been read to its end, before the client has seen that end, so
/// the client's next request finds it. A body cut short leaves the
/// connection to close (HTTP/1.1 cannot abandon a response midway).
struct ParksConnection {
    inner: Incoming,
    park: Option<(Arc<Pool>, PoolKey, ServiceConn)>,
    ended: bool,
}

impl ParksConnection {
    fn park(&mut self) {
        let Some((pool, key, mut conn)) = self.park.take() else {
            return;
        };
        if conn.sender.is_ready() {
            pool.put(key, conn);
        } else if !conn.sender.is_closed() {
            // The connection is still finishing (the rest of the request
            // body, or its bookkeeping): park it once it is free.
            tokio::spawn(async move {
                if conn.sender.ready().await.is_ok() {
                    pool.put(key, conn);
                }
            });
        }
    }
}

impl hyper::body::Body for ParksConnection {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Ok(_))) => this.ended = this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                this.park = None;
            }
            Poll::Pending => {}
        }
        if this.ended {
            this.park();
        }
        r.map(|f| f.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ParksConnection {
    fn drop(&mut self) {
        // A body with no data at all (204, HEAD) is never polled.
        if self.ended || hyper::body::Body::is_end_stream(&self.inner) {
            self.park();
        }
    }
}

enum Waited<E> {
    Late(std::time::Duration),
    Failed(E),
}

/// Waits for the response head, bounded by the route's `response_timeout`.
async fn await_response<T, E>(
    sent: impl Future<Output = Result<T, E>>,
    route: &RouteConfig,
) -> Result<T, Waited<E>> {
    match route.response_timeout {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r.map_err(Waited::Failed),
            Err(_) => Err(Waited::Late(t)),
        },
        None => sent.await.map_err(Waited::Failed),
    }
}

/// The answer when the service sent no response head within the route's
/// `response_timeout`.
fn too_late(route: &RouteConfig, t: std::time::Duration) -> Response<Body> {
    warn!(host = %route.host, timeout = ?t, "service sent no response headers in time");
    error_response(
        StatusCode::GATEWAY_TIMEOUT,
        "the service did not answer in time",
    )
}

/// The answer when the service connection failed before a response head.
fn failed_to_respond(route: &RouteConfig, e: &hyper::Error) -> Response<Body> {
    warn!(host = %route.host, error = %e, "service failed before responding");
    error_response(StatusCode::BAD_GATEWAY, "the service failed to respond")
}

/// A copy of a safe, bodyless request (RFC 9110 9.2.2), to send again if
/// the reused connection it goes out on turns out to be closing.
fn replay_copy(req: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    let safe = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    );
    if !safe || !hyper::body::Body::is_end_stream(req.body()) {
        return None;
    }
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

fn connection_failed() -> Response<Body> {
    error_response(StatusCode::BAD_GATEWAY, "the service connection failed")
}

/// Opens a stream the agent connects to the service and starts an HTTP/1.1
/// client connection over it. `Ok(None)`: the handshake failed (logged).
async fn connect(
    link: &AgentLink,
    kind: StreamKind,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
) -> Result<Option<SendRequest<UpstreamBody>>, OpenError> {
    let open = StreamOpen {
        kind,
        service: route.service.clone(),
        client,
    };
    let stream = open_stream_on(link, open, &state.metrics).await?;
    let io = IdleIo::new(
        QuicIo::new(stream, state.metrics.clone()),
        route.idle_timeout,
    );
    match hyper::client::conn::http1::Builder::new()
        .handshake::<_, UpstreamBody>(TokioIo::new(io))
        .await
    {
        Ok((sender, conn)) => {
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    debug!(error = %e, "upstream connection ended with an error");
                }
            });
            Ok(Some(sender))
        }
        Err(e) => {
            warn!(error = %e, "upstream handshake failed");
            Ok(None)
        }
    }
}

/// Forwards an upgrade request (WebSocket) over a stream of its own and,
/// once the service switches protocols, splices the two connections.
async fn forward_upgrade(
    mut req: Request<UpstreamBody>,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    link: &AgentLink,
    turn: Option<OwnedMutexGuard<()>>,
) -> Result<Response<Body>, Unreachable> {
    let connected = connect(link, StreamKind::WebSocket, state, route, client).await;
    drop(turn);
    let mut sender = match connected {
        Ok(Some(sender)) => sender,
        Ok(None) => return Ok(connection_failed()),
        Err(error) => return Err(Unreachable { req, error }),
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let ticket = req.extensions().get::<super::StreamTicket>().cloned();
    let mut response = match await_response(sender.send_request(req), route).await {
        Ok(r) => r,
        Err(Waited::Late(t)) => return Ok(too_late(route, t)),
        Err(Waited::Failed(e)) => return Ok(failed_to_respond(route, &e)),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused upgrade: an ordinary response; the stream is not reused.
        strip_hop_by_hop(response.headers_mut());
        return Ok(response.map(|body| body.map_err(Into::into).boxed()));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    state.tracker.spawn(async move {
        let _ticket = ticket;
        match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                match tokio::io::copy_bidirectional_with_sizes(
                    &mut c,
                    &mut u,
                    UPGRADED_COPY_BUFFER,
                    UPGRADED_COPY_BUFFER,
                )
                .await
                {
                    Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                    Err(e) => debug!(error = %e, "upgraded connection aborted"),
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, super::empty_body()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_comes_from_the_authority_or_the_single_host_header() {
        let h = request_host(&req("/", &["Chat.Example.com:8443"])).unwrap();
        assert_eq!(
            (h.name.as_str(), h.authority.as_str()),
            ("chat.example.com", "Chat.Example.com:8443")
        );
        let h = request_host(&req("https://chat.example.com/x", &[])).unwrap();
        assert_eq!(h.name, "chat.example.com");
        assert!(request_host(&req("/", &["a.example", "b.example"])).is_err());
        assert!(request_host(&req("/", &[])).is_err());
        assert!(request_host(&req("/", &["user@a.example"])).is_err());
        assert!(request_host(&req("/", &["a b"])).is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::AUTHORIZATION], "Bearer xyz");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
    }

    #[test]
    fn forwarded_quotes_ipv6() {
        assert_eq!(forwarded_for("192.0.2.1".parse().unwrap()), "192.0.2.1");
        assert_eq!(
            forwarded_for("2001:db8::1".parse().unwrap()),
            "\"[2001:db8::1]\""
        );
    }
}
