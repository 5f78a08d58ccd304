//! The users' side: HTTP/2 connections over TLS to the edge's HTTPS
//! listener, each from its own loopback address and each carrying many
//! held requests (event streams that never send an event), spread evenly
//! over every agent's host. Multiplexing keeps 100,000 streams within a
//! few hundred file descriptors.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{Request, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpSocket;
use tokio_rustls::TlsConnector;

use crate::Error;
use crate::edge::host;

/// How long one connection's TCP and TLS handshakes may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request may wait for its response head.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests one connection has waiting for their response head at once:
/// the edge opens streams as fast as it can, without a queue of 100,000
/// that would outlast its timeouts.
const OPENING_WINDOW: usize = 64;
/// Client connections take source addresses 127.0.0.2 and up, wrapping
/// after this many.
pub const SOURCES: usize = 250;

/// TLS that trusts the bench's certificate, ALPN `h2`.
pub fn connector(cert: CertificateDer<'static>) -> Result<TlsConnector, Error> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector::from(Arc::new(tls)))
}

/// How the load is laid out.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub conns: usize,
    pub per_conn: usize,
    pub agents: usize,
}

/// Progress the opener reports as it goes.
#[derive(Debug, Default)]
pub struct Progress {
    pub opened: AtomicUsize,
    pub failed: AtomicU64,
}

/// The held streams: dropping this closes every one of them (each body
/// dropped resets its stream; each connection closes with its last handle).
pub struct Load {
    conns: Vec<HeldConn>,
}

struct HeldConn {
    _sender: http2::SendRequest<Empty<Bytes>>,
    bodies: Vec<Incoming>,
}

impl Load {
    pub fn streams(&self) -> usize {
        self.conns.iter().map(|c| c.bodies.len()).sum()
    }
}

/// Opens `shape.conns` connections to `https` and `shape.per_conn` held
/// requests on each; fails with the first connection that fails.
pub async fn open(
    https: SocketAddr,
    tls: &TlsConnector,
    shape: Shape,
    progress: &Arc<Progress>,
) -> Result<Load, Error> {
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..shape.conns {
        let (tls, progress) = (tls.clone(), progress.clone());
        tasks.spawn(async move { open_conn(https, &tls, c, shape, &progress).await });
    }
    let mut conns = Vec::with_capacity(shape.conns);
    while let Some(joined) = tasks.join_next().await {
        conns.push(joined??);
    }
    Ok(Load { conns })
}

/// Connection `c`: from its own loopback address, SNI the first host it
/// asks for (the one certificate covers them all, so HTTP/2 may carry
/// every other host's requests too).
async fn open_conn(
    https: SocketAddr,
    tls: &TlsConnector,
    c: usize,
    shape: Shape,
    progress: &Progress,
) -> Result<HeldConn, Error> {
    let first = c * shape.per_conn;
    let mut sender = tokio::time::timeout(
        CONNECT_TIMEOUT,
        handshake(https, tls, c, &host(first % shape.agents)),
    )
    .await
    .map_err(|_| format!("connection {c}: no handshake within {CONNECT_TIMEOUT:?}"))??;
    let mut bodies = Vec::with_capacity(shape.per_conn);
    let mut pending = FuturesUnordered::new();
    let mut next = 0;
    while bodies.len() < shape.per_conn {
        while next < shape.per_conn && pending.len() < OPENING_WINDOW {
            sender
                .ready()
                .await
                .map_err(|e| format!("connection {c}: {e}"))?;
            let agent = (first + next) % shape.agents;
            let req = Request::get(format!("https://{}/events", host(agent)))
                .body(Empty::<Bytes>::new())?;
            let response = sender.send_request(req);
            pending.push(async move {
                tokio::time::timeout(RESPONSE_TIMEOUT, response)
                    .await
                    .map_err(|_| format!("no response head within {RESPONSE_TIMEOUT:?}"))?
                    .map_err(|e| e.to_string())
            });
            next += 1;
        }
        let Some(done) = pending.next().await else {
            break;
        };
        let response = done.map_err(|e| {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            format!("connection {c}: {e}")
        })?;
        if response.status() != StatusCode::OK {
            progress.failed.fetch_add(1, Ordering::Relaxed);
            return Err(format!("connection {c}: the edge answered {}", response.status()).into());
        }
        bodies.push(response.into_body());
        progress.opened.fetch_add(1, Ordering::Relaxed);
    }
    Ok(HeldConn {
        _sender: sender,
        bodies,
    })
}

/// TCP from source address `c`, TLS with SNI `sni`, HTTP/2.
async fn handshake(
    https: SocketAddr,
    tls: &TlsConnector,
    c: usize,
    sni: &str,
) -> Result<http2::SendRequest<Empty<Bytes>>, Error> {
    let last = u8::try_from(2 + c % SOURCES).map_err(|_| "source address out of range")?;
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, 0, 0, last], 0)))?;
    let tcp = socket.connect(https).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(sni.to_owned())?;
    let stream = tls.connect(name, tcp).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}
