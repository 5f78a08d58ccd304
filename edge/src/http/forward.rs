//! Sending a request to its service: at once when the service is ready,
//! else wake it and hold the request (or answer with the waiting page);
//! over an idle pooled connection or a new stream; and the one map from
//! tunnel failures to statuses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;

use burrow_proto::listener::ClientKey;
use burrow_proto::{StreamKind, StreamOpen, StreamStatus};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::io::{ClientBody, IdleIo, LinkIo};
use super::pool::{Pool, PoolKey, ServiceConn, UpstreamBody};
use super::rewrite::{is_upgrade, strip_hop_by_hop, upstream_request};
use super::route::RequestHost;
use super::upgrade::forward_upgrade;
use super::wake::{self, WakeRight};
use super::{Body, HttpState, refuse};
use crate::config::RouteConfig;
use crate::metrics::Refused;
use crate::refusal::Refusal;
use crate::tunnel::registry::{HoldRefused, Ticket};
use crate::tunnel::{AgentLink, OpenError, open_stream_on};

/// What a tunnel failure is refused as. Bodies stay short and generic; the
/// details go to the log.
fn open_refusal(e: &OpenError) -> Refusal {
    match e {
        OpenError::AgentOffline(_) => Refusal::BadGateway("the home server is offline"),
        OpenError::Busy => Refusal::Unavailable {
            message: "the home server is busy; try again shortly",
            retry_after: wake::RETRY_AFTER,
        },
        OpenError::ReplyTimeout => Refusal::GatewayTimeout("the home server did not answer"),
        OpenError::Service {
            status: StreamStatus::TimedOut,
            ..
        } => Refusal::GatewayTimeout("the service did not answer"),
        OpenError::Service { .. } => Refusal::BadGateway("the service is not reachable"),
        OpenError::Lost(_) | OpenError::BadReply(_) => {
            Refusal::BadGateway("the home server connection failed")
        }
    }
}

/// A request that could not be forwarded because its stream could not be
/// opened; the request is untouched (its body unread), ready for a retry.
pub(super) struct Unreachable {
    pub(super) req: Request<UpstreamBody>,
    pub(super) error: OpenError,
}

/// The answer for a stream that could not be opened.
fn open_failure(e: &OpenError, route: &RouteConfig) -> Response<Body> {
    warn!(host = %route.host, agent = %route.agent, service = %route.service, error = %e, "cannot reach service");
    refuse::response(open_refusal(e))
}

/// Forwards at once when the service is ready; otherwise (or when the
/// connect fails on a service that can be woken) wakes it and holds the
/// request or answers with the waiting page.
pub(super) async fn dispatch(
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
        Err(why) => return refuse::response(Refusal::BadRequest(why)),
    };
    let registry = &state.registry;
    let mut after_failure = false;
    let req = if registry.is_asleep(&route.agent, &route.service) {
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
    // What the agent may answer for the sleeping machine (model listings
    // from its cache, `[service.wake] cached`) wakes nothing.
    if let Some(copy) = replay_copy(&req).filter(|r| !upgrade && r.method() == Method::GET)
        && let Some(resp) = cached_answer(copy, state, route, client).await
    {
        return resp;
    }
    if right == WakeRight::MayNot {
        debug!(host = %route.host, "public path for a sleeping service; not waking it");
        return wake::unavailable("the service is asleep");
    }
    registry.request_wake(&route.agent, &route.service);
    if navigation && route.wake.page {
        return refuse::response(Refusal::Waking {
            host: route.host.clone(),
        });
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
/// requests take turns in arrival order (the service's [`WakeLine`]), each
/// keeping its turn until the agent has connected it to the service, so
/// the service sees them in that order too; one that cannot connect keeps
/// its place while the service is woken again.
///
/// [`WakeLine`]: crate::tunnel::wake_line::WakeLine
async fn hold(
    mut req: Request<UpstreamBody>,
    upgrade: bool,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    deadline: Instant,
    after_failure: bool,
) -> Response<Body> {
    let registry = &state.registry;
    let key = ClientKey::of(client.ip());
    let service = (&route.agent, &route.service);
    let ticket = match registry.join(service, key, state.hold_caps, deadline, after_failure) {
        Ok(ticket) => ticket,
        // The agent never listed the service: forwarding says what is wrong.
        Err(HoldRefused::Unknown) => {
            return match forward(req, upgrade, state, route, client, None).await {
                Ok(resp) => resp,
                Err(Unreachable { error, .. }) => open_failure(&error, route),
            };
        }
        Err(why) => return hold_refused(state, route, client, why),
    };
    debug!(host = %route.host, service = %route.service, "holding request while the service wakes");
    loop {
        if ticket.turn().await.is_err() {
            info!(host = %route.host, service = %route.service, hold = ?route.wake.hold, "service not ready within hold");
            return wake::unavailable("the service is waking up; try again shortly");
        }
        match forward(req, upgrade, state, route, client, Some(&ticket)).await {
            Ok(resp) => return resp,
            Err(Unreachable { req: r, error })
                if wake::worth_waking(&error) && Instant::now() < deadline =>
            {
                debug!(error = %error, "service still unreachable; waking again");
                ticket.connect_failed();
                req = r;
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
        HoldRefused::Client => (Refused::HeldPerClient, state.hold_caps.per_client),
        HoldRefused::Service => (Refused::HeldPerService, state.hold_caps.per_service),
        HoldRefused::Unknown => return wake::unavailable("the service is not available"),
    };
    state.metrics.refused(refusal);
    info!(host = %route.host, service = %route.service, client = %client.ip(), ?why, limit, "too many requests held for a waking service; refusing");
    wake::unavailable("the service is waking up; too many requests are waiting")
}

/// Asks the agent for its cached answer to `req` (a GET without a body)
/// for a service whose machine sleeps; `None` when it has none (no cache
/// for the service, a path not cached, the agent away), and the request
/// goes on to wake the machine.
async fn cached_answer(
    req: Request<UpstreamBody>,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
) -> Option<Response<Body>> {
    let link = state.registry.get(&route.agent)?;
    let mut sender = connect(&link, StreamKind::Cached, state, route, client)
        .await
        .ok()
        .flatten()?;
    let resp = tokio::time::timeout(CACHED_ANSWER_WAIT, sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let hit = resp
        .headers()
        .get("x-burrow-cache")
        .is_some_and(|v| v == "asleep");
    if !hit {
        return None;
    }
    debug!(host = %route.host, service = %route.service, "answered from the agent's cache; the machine sleeps on");
    Some(resp.map(|body| body.map_err(Into::into).boxed()))
}

/// How long the agent's cached answer may take (a round trip home).
const CACHED_ANSWER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Sends `req` (already rewritten by [`upstream_request`]) to the service:
/// over an idle connection from the session's pool when there is one, else
/// over a new stream. A held request's `turn` is given up once a connection
/// is at hand.
async fn forward(
    req: Request<UpstreamBody>,
    upgrade: bool,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    turn: Option<&Ticket>,
) -> Result<Response<Body>, Unreachable> {
    let Some(link) = state.registry.wait_for(&route.agent).await else {
        let error = OpenError::AgentOffline(route.agent.clone());
        return Err(Unreachable { req, error });
    };
    match forward_on(&link, req, upgrade, state, route, client, turn).await {
        // The agent's session died under the open: after a blackout the
        // edge may learn it only at its idle timeout, while the agent is
        // already dialling. Nothing reached the service (the request is
        // untouched), so it goes once more, on the agent's next session,
        // waiting for it as any request does (`[edge] agent_wait`).
        Err(Unreachable {
            req,
            error: OpenError::Lost(why),
        }) if link.conn.close_reason().is_some() => {
            info!(agent = %link.name, session = link.session, error = %why, "agent session lost under a request; sending it on the next session");
            state.registry.remove(&link.name, link.session);
            let Some(next) = state.registry.wait_for(&route.agent).await else {
                let error = OpenError::AgentOffline(route.agent.clone());
                return Err(Unreachable { req, error });
            };
            forward_on(&next, req, upgrade, state, route, client, turn).await
        }
        other => other,
    }
}

/// [`forward`] on one agent session.
async fn forward_on(
    link: &AgentLink,
    req: Request<UpstreamBody>,
    upgrade: bool,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    turn: Option<&Ticket>,
) -> Result<Response<Body>, Unreachable> {
    // One look at what the agent said of the service: its protocol, and
    // whether it can be woken.
    let status = state.registry.service(&route.agent, &route.service);
    let h2c = status
        .as_ref()
        .is_some_and(|s| s.upstream == burrow_proto::Upstream::H2c);
    if h2c {
        return super::h2c::forward_h2c(req, upgrade, state, route, client, link, turn).await;
    }
    if upgrade {
        return forward_upgrade(req, state, route, client, link, turn).await;
    }
    let key = PoolKey {
        service: route.service.clone(),
        idle_timeout: route.idle_timeout,
    };
    // A machine that can be woken may go to sleep with connections open,
    // and a sleeping machine never closes them: its requests always get a
    // new connection, whose failure starts a wake.
    let poolable = !status.is_some_and(|s| s.wake == burrow_proto::WakeMethod::MagicPacket);
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
            None => match connect(link, StreamKind::Http, state, route, client).await {
                Ok(Some(sender)) => (ServiceConn::new(sender), false),
                Ok(None) => return Ok(connection_failed()),
                Err(error) => return Err(Unreachable { req, error }),
            },
        };
        if let Some(ticket) = turn {
            ticket.connected();
        }
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
            return Ok(refuse::response(Refusal::BadGateway(
                "the service failed to respond",
            )));
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

pub(super) enum Waited<E> {
    Late(std::time::Duration),
    Failed(E),
}

/// Waits for the response head, bounded by the route's `response_timeout`.
pub(super) async fn await_response<T, E>(
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
pub(super) fn too_late(route: &RouteConfig, t: std::time::Duration) -> Response<Body> {
    warn!(host = %route.host, timeout = ?t, "service sent no response headers in time");
    refuse::response(Refusal::GatewayTimeout(
        "the service did not answer in time",
    ))
}

/// The answer when the service connection failed before a response head.
pub(super) fn failed_to_respond(route: &RouteConfig, e: &hyper::Error) -> Response<Body> {
    if super::io::is_body_too_large(e) {
        return refuse::response(Refusal::PayloadTooLarge("request body too large"));
    }
    warn!(host = %route.host, error = %e, "service failed before responding");
    refuse::response(Refusal::BadGateway("the service failed to respond"))
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

pub(super) fn connection_failed() -> Response<Body> {
    refuse::response(Refusal::BadGateway("the service connection failed"))
}

/// Opens a stream the agent connects to the service and starts an HTTP/1.1
/// client connection over it. `Ok(None)`: the handshake failed (logged).
pub(super) async fn connect(
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
        LinkIo::new(stream, state.metrics.clone()),
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
