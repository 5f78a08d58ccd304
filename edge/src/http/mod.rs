//! The users' side of the edge: the HTTPS listener (TLS, HTTP/1.1 and
//! HTTP/2), the optional plain-HTTP listener that redirects to HTTPS, and
//! the short error responses every failure maps to.

pub mod handshake;
pub mod io;
pub mod proxy;
pub mod wake;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
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
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use burrow_proto::confkit::Cidr;

use crate::access::IpRules;
use crate::access::gate::Gate;
use crate::config::{AccessConfig, RouteConfig};
use crate::metrics::Metrics;
use crate::tls::{ACME_TLS_ALPN, CertStore};
use crate::tunnel::Registry;

/// The response body type of everything the edge serves.
pub type Body =
    http_body_util::combinators::BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Request head limit (HTTP/1.1 buffer, HTTP/2 header list). Larger heads
/// get 431 Request Header Fields Too Large.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// Open client connections at most; beyond it, accepting pauses.
pub const MAX_CONNECTIONS: usize = 10_000;
/// Concurrent HTTP/2 streams per client connection.
pub const MAX_H2_STREAMS: u32 = 256;
/// HTTP/2 keep-alive pings find dead phones behind NATs.
pub const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// What request handling needs, shared by all connections.
#[derive(Debug)]
pub struct HttpState {
    routes: HashMap<String, RouteConfig>,
    pub access: IpRules,
    pub trusted_proxies: Vec<Cidr>,
    pub registry: Arc<Registry>,
    /// Present when any user is configured.
    pub gate: Option<Arc<Gate>>,
    /// For ACME challenge answers.
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    /// Tasks that outlive their request (upgraded connections), so a
    /// graceful shutdown waits for them.
    pub tracker: TaskTracker,
}

impl HttpState {
    pub fn new(
        routes: &[RouteConfig],
        access: &AccessConfig,
        registry: Arc<Registry>,
        gate: Option<Arc<Gate>>,
        certs: Arc<CertStore>,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            certs,
            metrics,
            tracker,
            routes: routes.iter().map(|r| (r.host.clone(), r.clone())).collect(),
            access: access.rules.clone(),
            trusted_proxies: access.trusted_proxies.clone(),
            registry,
            gate,
        }
    }

    pub fn route(&self, host: &str) -> Option<&RouteConfig> {
        self.routes.get(host)
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

fn http_builder(header_timeout: Duration) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(MAX_HEADER_BYTES).expect("header limit fits u32"))
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(H2_KEEP_ALIVE);
    b
}

/// Serves HTTPS on `listener` until `shutdown`. Each request uses the
/// state current at its arrival (a reload swaps it). On shutdown, accepting
/// stops and every connection is asked to finish gracefully (HTTP/1.1
/// closes after the response in flight, HTTP/2 sends GOAWAY); connection
/// tasks are tracked by `tracker` so the edge can wait for them.
pub async fn serve_https(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    state: watch::Receiver<Arc<HttpState>>,
    header_timeout: Duration,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let acceptor = handshake::HttpsTls::new(tls);
    let builder = Arc::new(http_builder(header_timeout));
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            () = shutdown.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = builder.clone();
        let state = state.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            // The TLS handshake gets the same budget as a request head.
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "tls handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "tls handshake timed out");
                    return;
                }
            };
            if tls.get_ref().1.alpn_protocol() == Some(ACME_TLS_ALPN) {
                // A TLS-ALPN-01 validation: the handshake was the answer.
                debug!(%peer, "answered a tls-alpn-01 validation");
                return;
            }
            let service = service_fn(move |req: Request<Incoming>| {
                let state = state.borrow().clone();
                async move { Ok::<_, Infallible>(proxy::handle(req, state, peer).await) }
            });
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "client connection ended with an error");
            }
        });
    }
}

/// Plain HTTP: every request is redirected to the same URL over HTTPS.
pub async fn serve_http_redirect(
    listener: TcpListener,
    certs: Arc<CertStore>,
    https_port: u16,
    header_timeout: Duration,
    shutdown: CancellationToken,
) {
    let builder = Arc::new(http_builder(header_timeout));
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        let builder = builder.clone();
        let certs = certs.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let certs = certs.clone();
                async move {
                    // ACME challenges bypass everything; the rest goes to https.
                    let resp = match acme_answer(&certs, req.uri().path()) {
                        Some(r) => r,
                        None => redirect(&req, https_port),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), service).await {
                debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
}

/// The answer to an HTTP-01 validation request for a pending challenge.
pub fn acme_answer(certs: &CertStore, path: &str) -> Option<Response<Body>> {
    let key_auth = certs.http_challenge(path)?;
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
        return error_response(StatusCode::BAD_REQUEST, "missing Host header");
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
        Err(_) => error_response(StatusCode::BAD_REQUEST, "invalid request"),
    }
}

/// The bound address of a listener, for logs and tests.
pub fn local_addr(l: &TcpListener) -> SocketAddr {
    l.local_addr()
        .expect("a bound listener has a local address")
}
