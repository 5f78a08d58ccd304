//! The bench's client side: one way to reach a target (plain TCP for the
//! direct column, TLS for the edges), HTTP/1.1 and HTTP/2 connections over
//! it, and WebSocket handshakes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::Error;

/// The host name every target serves; the certificate is made for it.
pub const HOST: &str = "bench.test";
/// How long one connection attempt may take before the bench calls it failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub type ReqBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type BoxIo = Box<dyn Io>;

pub fn empty() -> ReqBody {
    Empty::new().boxed()
}

/// Which protocol a connection is for (TLS ALPN, and h2c for direct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
    /// HTTP/3 over QUIC, to an endpoint's `h3` address.
    H3,
}

/// TLS client settings that trust the bench's certificate.
#[derive(Clone)]
pub struct Tls {
    h1: TlsConnector,
    h2: TlsConnector,
}

impl Tls {
    pub fn new(cert: CertificateDer<'static>) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        let roots = Arc::new(roots);
        let make = |alpn: &[u8]| -> Result<TlsConnector, Error> {
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsConnector::from(Arc::new(c)))
        };
        Ok(Self {
            h1: make(b"http/1.1")?,
            h2: make(b"h2")?,
        })
    }
}

/// Where a target listens and how to speak to it.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// None: plain HTTP (the direct column).
    pub tls: Option<Tls>,
    /// Where it serves HTTP/3, if it does.
    pub h3: Option<Arc<H3Endpoint>>,
}

/// An HTTP/3 server address and the QUIC client config that trusts the
/// bench's certificate.
pub struct H3Endpoint {
    pub addr: SocketAddr,
    config: quinn::ClientConfig,
}

/// One HTTP/3 connection, ready for requests.
pub struct H3Sender {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    /// The UDP socket's endpoint; the connection lives while it does.
    _endpoint: quinn::Endpoint,
}

/// A response on its way over HTTP/3.
pub type H3Stream = h3::client::RequestStream<h3_quinn::BidiStream<Bytes>, Bytes>;

impl H3Endpoint {
    pub fn new(addr: SocketAddr, cert: CertificateDer<'static>) -> Result<Self, Error> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert)?;
        // AES-128-GCM first, as browsers (and the TCP columns' server
        // choice) have it; ring's default list starts with AES-256.
        let mut provider = rustls::crypto::ring::default_provider();
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"h3".to_vec()];
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
        Ok(Self {
            addr,
            config: quinn::ClientConfig::new(Arc::new(quic)),
        })
    }

    /// A fresh connection from its own UDP socket (as each phone has),
    /// from the next of the bench's source addresses as over TCP.
    pub async fn connect(&self) -> Result<H3Sender, Error> {
        let from = source_for(self.addr).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut endpoint = quinn::Endpoint::client(from)?;
        endpoint.set_default_client_config(self.config.clone());
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect(self.addr, HOST)?)
            .await
            .map_err(|_| "quic handshake timed out")??;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Sender {
            send,
            _endpoint: endpoint,
        })
    }
}

impl H3Sender {
    /// Sends a bodiless GET for `path`; the response head is in.
    pub async fn get(&mut self, path: &str) -> Result<(http::StatusCode, H3Stream), Error> {
        let uri: Uri = format!("https://{HOST}{path}").parse()?;
        let req = Request::builder().uri(uri).body(())?;
        let mut stream = self.send.send_request(req).await?;
        stream.finish().await?;
        let resp = stream.recv_response().await?;
        Ok((resp.status(), stream))
    }
}

/// Loopback source addresses the bench's clients take turns at, as many
/// clients behind many addresses would: the edge caps connections per
/// client address (`[limits] connections_per_ip`, 256 by default), and the
/// memory scenario holds 10,000.
const SOURCES: u32 = 200;
static NEXT_SOURCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The next source address for a connection to `to`: 127.0.0.2 to
/// 127.0.0.201 in turn for an IPv4 loopback target, else the default.
fn source_for(to: SocketAddr) -> Option<SocketAddr> {
    let std::net::IpAddr::V4(v4) = to.ip() else {
        return None;
    };
    if !v4.is_loopback() {
        return None;
    }
    let n = NEXT_SOURCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SOURCES;
    let host = u8::try_from(2 + n).expect("SOURCES fits the last octet");
    Some(SocketAddr::from(([127, 0, 0, host], 0)))
}

async fn connect_tcp(to: SocketAddr) -> std::io::Result<TcpStream> {
    match source_for(to) {
        Some(from) => {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(from)?;
            socket.connect(to).await
        }
        None => TcpStream::connect(to).await,
    }
}

impl Endpoint {
    pub async fn connect(&self, proto: Proto) -> Result<BoxIo, Error> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect_tcp(self.addr))
            .await
            .map_err(|_| "connect timed out")??;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let connector = match proto {
            Proto::H1 => &tls.h1,
            Proto::H2 => &tls.h2,
            Proto::H3 => return Err("HTTP/3 does not run over TCP".into()),
        };
        let name = ServerName::try_from(HOST)?;
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| "tls handshake timed out")??;
        Ok(Box::new(stream))
    }

    pub async fn h1(&self) -> Result<http1::SendRequest<ReqBody>, Error> {
        let io = self.connect(Proto::H1).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    pub async fn h2(&self) -> Result<http2::SendRequest<ReqBody>, Error> {
        let io = self.connect(Proto::H2).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(io))
            .await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// A request for `path`: origin form plus Host for HTTP/1.1, absolute
    /// form for HTTP/2.
    pub fn request(
        &self,
        proto: Proto,
        method: http::Method,
        path: &str,
        body: ReqBody,
    ) -> Request<ReqBody> {
        let builder = match proto {
            Proto::H1 => Request::builder().uri(path).header(header::HOST, HOST),
            Proto::H2 | Proto::H3 => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                let uri: Uri = format!("{scheme}://{HOST}{path}")
                    .parse()
                    .expect("bench paths form valid URIs");
                Request::builder().uri(uri)
            }
        };
        builder
            .method(method)
            .body(body)
            .expect("bench requests are well formed")
    }

    pub async fn websocket(&self) -> Result<WebSocketStream<BoxIo>, Error> {
        let io = self.connect(Proto::H1).await?;
        let req = format!("ws://{HOST}/ws").into_client_request()?;
        let (ws, resp) = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_tungstenite::client_async_with_config(
                req,
                io,
                Some(crate::upstream::ws_config()),
            ),
        )
        .await
        .map_err(|_| "websocket handshake timed out")??;
        if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
            return Err(format!("websocket handshake got {}", resp.status()).into());
        }
        Ok(ws)
    }

    /// One GET /small on a fresh connection: the readiness probe.
    pub async fn probe(&self) -> Result<(), Error> {
        let mut s = self.h1().await?;
        let resp = s
            .send_request(self.request(Proto::H1, http::Method::GET, "/small", empty()))
            .await?;
        let status = resp.status();
        resp.into_body().collect().await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("probe got {status}").into())
        }
    }
}
