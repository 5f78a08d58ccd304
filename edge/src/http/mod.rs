//! The users' side of the edge: the HTTPS listener (TLS, HTTP/1.1 and
//! HTTP/2), the optional plain-HTTP listener that redirects to HTTPS, and
//! the short error responses every failure maps to.

mod access_log;
mod forward;
mod h2c;
pub mod h3;
pub mod h3_frames;
pub mod handshake;
pub mod io;
pub mod pool;
pub mod ratelimit;
pub mod refuse;
mod rewrite;
mod route;
mod upgrade;
pub mod wake;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::ResolvesServerCert;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use burrow_proto::confkit::Cidr;
use burrow_proto::listener::{Front, ListenerStats, StreamPermit};

use crate::access::gate::Gate;
use crate::access::{ClientIpHeader, IpRules};
use crate::config::{EdgeConfig, LimitsConfig, RouteConfig};
use crate::metrics::{Metrics, Refused};
use crate::tls::{ACME_TLS_ALPN, CertStore};
use crate::tunnel::registry::HoldCaps;
use crate::tunnel::{Registry, TcpAgent};

/// The response body type of everything the edge serves.
pub type Body =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Request head limit (HTTP/1.1 buffer, HTTP/2 header list). Larger heads
/// get 431 Request Header Fields Too Large.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// How long an idle connection asked to finish (HTTP/2 GOAWAY) may take
/// before it is dropped.
pub const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(2);
/// On shutdown, how long a connection that has not sent its first request
/// yet gets to send it: a client that connected just before the shutdown
/// is answered (with `Connection: close`), not cut off before its request.
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(1);
/// HTTP/2 keep-alive pings find dead phones behind NATs.
pub const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// What request handling needs, shared by all connections.
#[derive(Debug)]
pub struct HttpState {
    routes: HashMap<String, RouteConfig>,
    pub access: IpRules,
    pub trusted_proxies: Vec<Cidr>,
    /// The header a trusted proxy's client address is read from.
    pub client_ip_header: ClientIpHeader,
    pub registry: Arc<Registry>,
    /// Present when any user is configured.
    pub gate: Option<Arc<Gate>>,
    /// For ACME challenge answers.
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    /// Tasks that outlive their request (upgraded connections), so a
    /// graceful shutdown waits for them.
    pub tracker: TaskTracker,
    /// Cancelled when the edge starts shutting down: upgraded connections
    /// (WebSockets) then close at once with 1001 "going away", so clients
    /// reconnect (to the next edge process) instead of holding the drain.
    pub going_away: CancellationToken,
    /// `[limits] held_per_service` and `held_per_client`.
    pub hold_caps: HoldCaps,
    /// Request rate limiters of the routes that have one, by host.
    limiters: HashMap<String, ratelimit::RateLimiter>,
    /// Each route's counters, looked up once here rather than per request.
    route_stats: HashMap<String, Arc<crate::metrics::RouteStats>>,
    /// The API keys' own rate limiters, by `key:NAME`.
    key_limiters: HashMap<String, ratelimit::RateLimiter>,
    /// With `[cluster]`: rate counters every edge shares.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl HttpState {
    /// The state for `config`'s routes, access rules and limits.
    pub fn new(
        config: &EdgeConfig,
        registry: Arc<Registry>,
        gate: Option<Arc<Gate>>,
        certs: Arc<CertStore>,
        metrics: Arc<Metrics>,
        (tracker, going_away): (TaskTracker, CancellationToken),
    ) -> Self {
        let (routes, access, limits) = (&config.routes, &config.access, &config.limits);
        let route_stats = routes
            .iter()
            .map(|r| (r.host.clone(), metrics.route(&r.host)))
            .collect();
        Self {
            route_stats,
            certs,
            metrics,
            tracker,
            going_away,
            hold_caps: HoldCaps {
                per_service: limits.held_per_service,
                per_client: limits.held_per_client,
            },
            routes: routes.iter().map(|r| (r.host.clone(), r.clone())).collect(),
            limiters: routes
                .iter()
                .filter_map(|r| Some((r.host.clone(), ratelimit::RateLimiter::new(r.rate?))))
                .collect(),
            key_limiters: config
                .api_keys
                .iter()
                .filter_map(|k| {
                    Some((
                        format!("key:{}", k.name),
                        ratelimit::RateLimiter::new(k.rate?),
                    ))
                })
                .collect(),
            access: access.rules.clone(),
            trusted_proxies: access.trusted_proxies.clone(),
            client_ip_header: access.client_ip_header,
            registry,
            gate,
            cluster: None,
        }
    }

    /// Counts rates on the counters every edge of `cluster` shares.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    pub fn route(&self, host: &str) -> Option<&RouteConfig> {
        self.routes.get(host)
    }

    /// The counters of the route for `host`.
    pub fn route_stats(&self, host: &str) -> Option<Arc<crate::metrics::RouteStats>> {
        self.route_stats.get(host).cloned()
    }

    /// The rate limiter of the route for `host`, if it has a limit.
    pub fn limiter(&self, host: &str) -> Option<&ratelimit::RateLimiter> {
        self.limiters.get(host)
    }

    /// The own rate limiter of an API key (`user` is `key:NAME`), if any.
    pub fn key_limiter(&self, user: &str) -> Option<&ratelimit::RateLimiter> {
        self.key_limiters.get(user)
    }
}

pub fn empty_body() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A complete response the edge itself writes, never cached.
fn own_response(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    // The edge's pages (login, sign-out, waiting) are never framed: a
    // framed sign-out button could be clicked for the user.
    h.insert(
        header::X_FRAME_OPTIONS,
        header::HeaderValue::from_static("DENY"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("frame-ancestors 'none'"),
    );
    r
}

/// An HTML page the edge itself serves (login, waiting page).
pub fn html_response(status: StatusCode, html: String) -> Response<Body> {
    own_response(status, "text/html; charset=utf-8", html)
}

/// A short plain-text error that says what failed, not how.
pub fn error_response(status: StatusCode, message: &str) -> Response<Body> {
    let text = format!(
        "{} {}: {message}\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("Error")
    );
    own_response(status, "text/plain; charset=utf-8", text)
}

/// The rustls config of the HTTPS listener: certificates by SNI, ALPN h2
/// and http/1.1 (whose cipher suite order counts is decided per client,
/// see [`handshake`]).
pub fn tls_config(
    certs: Arc<dyn ResolvesServerCert>,
    acme: bool,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        burrow_proto::quic::crypto_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless session tickets: a phone that comes back resumes (no
    // certificate signature, no chain sent) however many other clients came
    // between, and the edge keeps nothing per client. Keys rotate every six
    // hours. Without this, resumption rests on a 256-entry server cache.
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    if acme {
        config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    Ok(config)
}

fn http_builder(header_timeout: Duration, limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).expect("header limit fits u32"))
        .max_concurrent_streams(limits.streams_per_connection)
        .keep_alive_interval(H2_KEEP_ALIVE);
    b
}

/// What a connection is doing, for closing it once it has had no request
/// in flight for `[limits] idle_timeout`. HTTP/2 pings and TCP keep-alives
/// do not count as activity; requests do, from their head to the end of
/// their response body.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    idle_since: std::sync::Mutex<Instant>,
    /// Requests started on the connection so far.
    started: AtomicUsize,
    first: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            in_flight: AtomicUsize::new(0),
            idle_since: std::sync::Mutex::new(Instant::now()),
            started: AtomicUsize::new(0),
            first: tokio::sync::Notify::new(),
        })
    }

    /// Resolves once the connection's first request has started.
    async fn first_request(&self) {
        let notified = self.first.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.started.load(Ordering::Acquire) == 0 {
            notified.await;
        }
    }

    fn idle_since(&self) -> Instant {
        *self.idle_since.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        if self.started.fetch_add(1, Ordering::AcqRel) == 0 {
            self.first.notify_waiters();
        }
        Busy(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let wake_at = if self.in_flight.load(Ordering::Relaxed) > 0 {
                Instant::now() + timeout
            } else {
                let deadline = self.idle_since() + timeout;
                if Instant::now() >= deadline {
                    return;
                }
                deadline
            };
            tokio::time::sleep_until(wake_at).await;
        }
    }
}

/// One request in flight on a connection, until its response body ends.
#[derive(Debug)]
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut since = self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if self.0.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            *since = Instant::now();
        }
    }
}

/// A request's place under `[limits] streams_per_ip`. An upgrade request
/// carries a copy in its extensions, so the upgraded connection
/// (WebSocket) keeps the place for its whole life.
#[derive(Debug, Clone)]
pub struct StreamTicket(#[allow(dead_code)] Arc<StreamPermit>);

/// What keeps a request counted until its response body ends or is
/// dropped: on its connection (for the idle timeout) and against its
/// client address. The access-log body ([`route::handle`]) holds it.
#[derive(Debug)]
pub struct InFlight {
    _busy: Busy,
    _ticket: StreamTicket,
}

/// Runs one accepted client connection until it ends, shutdown asks it to
/// finish, or it sits idle for `idle_timeout` (then it is asked to finish
/// and, if it does not within [`IDLE_CLOSE_GRACE`], dropped).
async fn serve_connection<C, E>(
    conn: C,
    graceful: impl Fn(std::pin::Pin<&mut C>),
    activity: &Activity,
    idle_timeout: Duration,
    shutdown: &CancellationToken,
    stats: &ListenerStats,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            // A connection made just before the shutdown has its first
            // request on the way: answer it rather than cut it off.
            let first = async {
                let _ = tokio::time::timeout(FIRST_REQUEST_GRACE, activity.first_request()).await;
            };
            tokio::select! {
                r = conn.as_mut() => r,
                () = first => {
                    graceful(conn.as_mut());
                    conn.await
                }
            }
        }
        () = activity.idle_for(idle_timeout) => {
            stats.closed_idle.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, ?idle_timeout, "closing idle client connection");
            graceful(conn.as_mut());
            match tokio::time::timeout(IDLE_CLOSE_GRACE, conn).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "client connection ended with an error");
    }
}

/// The TLS config agents get on the HTTPS listener (ALPN `burrow/1`), and
/// where the ones that finish their handshake go.
pub type AgentIntake = (rustls::ServerConfig, mpsc::Sender<TcpAgent>);

/// Serves HTTPS on `listener` until `shutdown`. Each request uses the
/// state current at its arrival (a reload swaps it). On shutdown, accepting
/// stops and every connection is asked to finish gracefully (HTTP/1.1
/// closes after the response in flight, HTTP/2 sends GOAWAY); connection
/// tasks are tracked by `tracker` so the edge can wait for them.
///
/// `front` caps connections in total and per client address; each
/// connection is closed after `[limits] idle_timeout` without a request in
/// flight, and a client address gets 429 beyond `streams_per_ip` requests
/// in flight.
#[allow(clippy::too_many_arguments)]
pub async fn serve_https(
    listener: TcpListener,
    (tls, agents): (rustls::ServerConfig, Option<AgentIntake>),
    state: watch::Receiver<Arc<HttpState>>,
    timeouts: (Duration, LimitsConfig),
    alt_svc: Option<header::HeaderValue>,
    front: Arc<Front>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (header_timeout, limits) = timeouts;
    let (agent_tls, agent_intake) = agents.unzip();
    let certs = state.borrow().certs.clone();
    let acceptor = handshake::HttpsTls::new(tls, agent_tls).with_certs(certs);
    let builder = Arc::new(http_builder(header_timeout, &limits));
    let clients = front.clients();
    let stats = front.stats();
    front
        .serve(listener, shutdown.clone(), |tcp, peer, permit| {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let builder = builder.clone();
            let state = state.clone();
            let shutdown = shutdown.clone();
            let clients = clients.clone();
            let stats = stats.clone();
            let agent_intake = agent_intake.clone();
            let alt_svc = alt_svc.clone();
            tracker.spawn(async move {
                let key = permit.key;
                // The TLS handshake gets the same budget as a request head.
                let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(handshake::Accepted::Browser(tls))) => tls,
                    Ok(Ok(handshake::Accepted::Agent(tls))) => {
                        // The tunnel serves it from here, outside the
                        // HTTP drain.
                        if let Some(intake) = agent_intake {
                            let agent = TcpAgent { tls, remote: peer, permit };
                            if intake.try_send(agent).is_err() {
                                debug!(%peer, "agent intake full; dropped a TCP agent");
                            }
                        }
                        return;
                    }
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "tls handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "tls handshake timed out");
                        return;
                    }
                };
                let _permit = permit;
                if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                    // A TLS-ALPN-01 validation: the handshake was the answer.
                    debug!(%peer, "answered a tls-alpn-01 validation");
                    return;
                }
                // The name the client asked TLS for: a request for a host
                // whose certificate this connection does not carry is
                // misdirected (421).
                let sni: Option<Arc<str>> = tls.get_ref().1.server_name().map(Arc::from);
                let activity = Activity::new();
                let per_request = activity.clone();
                let streams_per_ip = limits.streams_per_ip;
                let alt_svc = alt_svc.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let mut req = req.map(io::RequestBody::Hyper);
                    let state = state.borrow().clone();
                    let alt_svc = alt_svc.clone();
                    let sni = sni.clone();
                    let busy = per_request.busy();
                    let in_flight = clients.try_stream(key, streams_per_ip).map(|p| {
                        let ticket = StreamTicket(Arc::new(p));
                        if req.headers().contains_key(header::UPGRADE) {
                            req.extensions_mut().insert(ticket.clone());
                        }
                        InFlight {
                            _busy: busy,
                            _ticket: ticket,
                        }
                    });
                    async move {
                        let Some(in_flight) = in_flight else {
                            state.metrics.refused(Refused::StreamsPerIp);
                            debug!(%peer, limit = streams_per_ip, "too many requests in flight from one client");
                            return Ok::<_, Infallible>(refuse::response(
                                crate::refusal::Refusal::TooManyStreams,
                            ));
                        };
                        let mut resp = route::handle(req, state, peer, sni, in_flight).await;
                        if let Some(v) = alt_svc
                            && resp.status() != StatusCode::SWITCHING_PROTOCOLS
                        {
                            resp.headers_mut().insert(header::ALT_SVC, v);
                        }
                        Ok(resp)
                    }
                });
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                serve_connection(
                    conn,
                    |c| c.graceful_shutdown(),
                    &activity,
                    limits.idle_timeout,
                    &shutdown,
                    &stats,
                    peer,
                )
                .await;
            });
        })
        .await;
}

/// Plain HTTP: every request is redirected to the same URL over HTTPS.
pub async fn serve_http_redirect(
    listener: TcpListener,
    certs: Arc<CertStore>,
    https_port: u16,
    timeouts: (Duration, LimitsConfig),
    front: Arc<Front>,
    shutdown: CancellationToken,
) {
    let (header_timeout, limits) = timeouts;
    let builder = Arc::new(http_builder(header_timeout, &limits));
    let stats = front.stats();
    front
        .serve(listener, shutdown.clone(), |tcp, peer, permit| {
            let builder = builder.clone();
            let certs = certs.clone();
            let shutdown = shutdown.clone();
            let stats = stats.clone();
            let idle_timeout = limits.idle_timeout;
            tokio::spawn(async move {
                let _permit = permit;
                let activity = Activity::new();
                let per_request = activity.clone();
                let service = service_fn(move |req: Request<Incoming>| {
                    let certs = certs.clone();
                    let busy = per_request.busy();
                    async move {
                        // ACME challenges bypass everything; the rest goes to https.
                        let resp = match acme_answer(&certs, req.uri().path()).await {
                            Some(r) => r,
                            None => redirect(&req, https_port),
                        };
                        drop(busy);
                        Ok::<_, Infallible>(resp)
                    }
                });
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                serve_connection(
                    conn,
                    |c| c.graceful_shutdown(),
                    &activity,
                    idle_timeout,
                    &shutdown,
                    &stats,
                    peer,
                )
                .await;
            });
        })
        .await;
}

/// The answer to an HTTP-01 validation request for a pending challenge.
pub async fn acme_answer(certs: &CertStore, path: &str) -> Option<Response<Body>> {
    if !path.starts_with(crate::tls::ACME_HTTP_PREFIX) {
        return None;
    }
    let key_auth = certs.http_challenge_anywhere(path).await?;
    let mut r = Response::new(
        Full::new(Bytes::from(key_auth))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    Some(r)
}

fn redirect<B>(req: &Request<B>, https_port: u16) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.parse::<http::uri::Authority>().ok());
    let Some(host) = host else {
        return refuse::response(crate::refusal::Refusal::BadRequest("missing Host header"));
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = if https_port == 443 {
        format!("https://{}{path}", host.host())
    } else {
        format!("https://{}:{https_port}{path}", host.host())
    };
    let mut resp = error_response(StatusCode::PERMANENT_REDIRECT, "use https");
    match header::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => refuse::response(crate::refusal::Refusal::BadRequest("invalid request")),
    }
}

/// The bound address of a listener, for logs and tests.
pub fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .expect("a bound listener has a local address")
}
