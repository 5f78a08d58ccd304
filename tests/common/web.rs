//! HTTP pieces of the harness: an edge with HTTPS routes in front of an
//! agent, a TLS client trusting the edge's self-signed certificate, and a
//! test upstream whose handlers report what they saw and when.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use super::*;

pub type TestBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A body fed by a channel, one chunk per message; reports through `closed`
/// when the receiver is dropped mid-stream (the client went away).
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// Events the test upstream reports to the test.
#[derive(Default)]
pub struct Upstream {
    /// Opened by the test when it has seen the first streamed event.
    pub gates: Mutex<Vec<oneshot::Sender<()>>>,
    gate_rx: Mutex<Vec<oneshot::Receiver<()>>>,
    /// Sent when a streaming response could not be written any more.
    pub client_gone: Mutex<Option<mpsc::Sender<()>>>,
    /// The headers of the last /headers request.
    pub last_headers: Mutex<HashMap<String, Vec<String>>>,
    pub block: Bytes,
    /// Bytes every /download has handed to its connection so far.
    pub downloaded: AtomicU64,
    /// /upload requests whose head arrived, and those whose body was cut
    /// off before its end.
    pub uploads_started: AtomicU64,
    pub uploads_aborted: AtomicU64,
    /// Woken whenever an upload counter changes.
    pub uploads_changed: tokio::sync::Notify,
}

impl Upstream {
    /// Waits (up to [`WAIT`]) until `done` holds, woken by each change of
    /// an upload counter; whether it came to hold.
    pub async fn uploads_until(&self, done: impl Fn(&Self) -> bool) -> bool {
        tokio::time::timeout(WAIT, async {
            loop {
                let changed = self.uploads_changed.notified();
                tokio::pin!(changed);
                // Registered before looking, so no change slips between.
                changed.as_mut().enable();
                if done(self) {
                    return;
                }
                changed.await;
            }
        })
        .await
        .is_ok()
    }

    /// Arms one gate; the next gated stream waits for it after its first event.
    pub fn gate(&self) -> oneshot::Sender<()> {
        let (tx, rx) = oneshot::channel();
        self.gate_rx.lock().unwrap().push(rx);
        tx
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

fn stream_response(content_type: &'static str, rx: mpsc::Receiver<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(ChannelBody(rx).boxed());
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Streams `items` where the sender waits for the test's gate after the
/// first one: if anything between buffered, the test would wait forever.
fn gated(up: &Arc<Upstream>, content_type: &'static str, items: Vec<Bytes>) -> Response<TestBody> {
    let gate = up.gate_rx.lock().unwrap().pop().expect("test armed a gate");
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        let mut items = items.into_iter();
        let first = items.next().expect("at least one item");
        if tx.send(first).await.is_err() {
            return;
        }
        if gate.await.is_err() {
            return;
        }
        for item in items {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    stream_response(content_type, rx)
}

fn query(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

async fn handle(req: Request<Incoming>, up: Arc<Upstream>) -> Response<TestBody> {
    match req.uri().path() {
        "/gated-sse" => {
            let items = (1..=200)
                .map(|i| Bytes::from(format!("id: {i}\ndata: event {i}\n\n")))
                .collect();
            gated(&up, "text/event-stream", items)
        }
        "/gated-ndjson" => {
            let body = req
                .into_body()
                .collect()
                .await
                .expect("request body")
                .to_bytes();
            let items = (1..=200)
                .map(|i| Bytes::from(format!("{{\"n\":{i},\"echo\":{}}}\n", body.len())))
                .collect();
            gated(&up, "application/x-ndjson", items)
        }
        "/download" => {
            let total = query(&req, "bytes").unwrap_or(0);
            let block = up.block.clone();
            let (tx, rx) = mpsc::channel(8);
            let counter = up.clone();
            tokio::spawn(async move {
                let mut left = total as usize;
                while left > 0 {
                    let n = left.min(block.len());
                    if tx.send(block.slice(..n)).await.is_err() {
                        return;
                    }
                    counter.downloaded.fetch_add(n as u64, Ordering::Relaxed);
                    left -= n;
                }
            });
            let mut r = stream_response("application/octet-stream", rx);
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, total.into());
            r
        }
        "/upload" => {
            up.uploads_started.fetch_add(1, Ordering::Relaxed);
            up.uploads_changed.notify_waiters();
            let mut body = req.into_body();
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    up.uploads_aborted.fetch_add(1, Ordering::Relaxed);
                    up.uploads_changed.notify_waiters();
                    return text(StatusCode::BAD_REQUEST, "upload cut off");
                };
                if let Ok(data) = frame.into_data() {
                    len += data.len() as u64;
                    ctx.update(&data);
                }
            }
            let hex: String = ctx
                .finish()
                .as_ref()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            text(StatusCode::OK, format!("{len} {hex}"))
        }
        "/headers" => {
            let mut map: HashMap<String, Vec<String>> = HashMap::new();
            for (k, v) in req.headers() {
                map.entry(k.as_str().to_owned())
                    .or_default()
                    .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
            }
            *up.last_headers.lock().unwrap() = map;
            text(StatusCode::OK, "seen")
        }
        "/stall" => {
            // One chunk, then silence with the connection open.
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: first\n\n")).await;
                tx.closed().await;
            });
            stream_response("text/event-stream", rx)
        }
        "/cut" => {
            // Promises a megabyte, sends a line and stops: a response cut
            // off midway, as when the service crashes.
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let _ = tx.send(Bytes::from_static(b"data: partial\n\n")).await;
            });
            let mut r = stream_response("text/event-stream", rx);
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, (1u64 << 20).into());
            r
        }
        "/hang" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/forever" => {
            let gone = up.client_gone.lock().unwrap().clone();
            let (tx, rx) = mpsc::channel(1);
            tokio::spawn(async move {
                let mut i = 0u64;
                loop {
                    i += 1;
                    if tx
                        .send(Bytes::from(format!("data: {i}\n\n")))
                        .await
                        .is_err()
                    {
                        if let Some(g) = gone {
                            let _ = g.send(()).await;
                        }
                        return;
                    }
                    // A steady trickle, like a long generation.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            });
            stream_response("text/event-stream", rx)
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

impl Upstream {
    /// Reads a `/download?bytes={len}` response to its end and checks it
    /// is `len` bytes of the upstream's block over and over (SHA-256).
    pub async fn check_download(&self, resp: Response<Incoming>, len: u64) {
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut got = 0u64;
        while let Some(frame) = tokio::time::timeout(super::WAIT, body.frame())
            .await
            .unwrap()
        {
            if let Ok(data) = frame.unwrap().into_data() {
                got += data.len() as u64;
                ctx.update(&data);
            }
        }
        assert_eq!(got, len, "download length");
        let mut expected = ring::digest::Context::new(&ring::digest::SHA256);
        for _ in 0..len / self.block.len() as u64 {
            expected.update(&self.block);
        }
        assert_eq!(
            ctx.finish().as_ref(),
            expected.finish().as_ref(),
            "download hash"
        );
    }
}

/// Starts the test upstream on loopback.
pub async fn upstream() -> (SocketAddr, Arc<Upstream>) {
    let mut block = vec![0u8; 1024 * 1024];
    fill_pseudo_random(42, &mut block);
    let up = Arc::new(Upstream {
        block: Bytes::from(block),
        ..Upstream::default()
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = up.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(req, state).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    (addr, up)
}

/// The demo's sample app (WebSocket echo, SSE, NDJSON) as a second upstream.
pub async fn demo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(burrow::demo::app::serve(listener, CancellationToken::new()));
    addr
}

/// An HTTPS edge with one agent "home" and these routes; `extra_edge`
/// goes into `[edge]`, `routes` is raw `[[route]]` TOML, `services` are the
/// agent's (name, url).
pub struct Site {
    pub world: World,
    pub edge: EdgeHandle,
    pub https: SocketAddr,
    pub agent: AgentHandle,
    pub roots: Arc<rustls::RootCertStore>,
    pub gate: Option<Arc<burrow_edge::access::gate::Gate>>,
    pub admin: Option<SocketAddr>,
}

pub async fn site(extra_edge: &str, routes: &str, services: &[(&str, String)]) -> Site {
    let mut agent_tail = String::new();
    for (name, url) in services {
        agent_tail += &format!("\n[[service]]\nname = \"{name}\"\nurl = \"{url}\"\n");
    }
    site_toml(extra_edge, routes, &agent_tail).await.0
}

/// Like [`site`], with the agent's `[[service]]` and `[[lan]]` tables
/// written out in `agent_tail`; also gives the agent's extras.
pub async fn site_toml(extra_edge: &str, routes: &str, agent_tail: &str) -> (Site, AgentExtras) {
    let (site, extras, ()) =
        site_via(extra_edge, routes, agent_tail, |tunnel, _| (tunnel, ())).await;
    (site, extras)
}

/// Like [`site_toml`], with something between the agent and the edge:
/// `link` gets the edge's bound tunnel (UDP) and HTTPS (TCP) addresses and
/// returns the address the agent dials (a [`super::faults::Relay`]'s) and
/// whatever the test keeps of it.
pub async fn site_via<L>(
    extra_edge: &str,
    routes: &str,
    agent_tail: &str,
    link: impl FnOnce(SocketAddr, SocketAddr) -> (SocketAddr, L),
) -> (Site, AgentExtras, L) {
    site_on(extra_edge, routes, agent_tail, Prebound::default(), link).await
}

/// TCP and UDP sockets bound on the same loopback port, as an edge on
/// port 443 has them: HTTPS and the tunnel (and HTTP/3) share the number.
pub fn same_port_sockets() -> Prebound {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = tcp.local_addr().unwrap().port();
        // Both stay bound from here on; a taken UDP port means another try.
        if let Ok(udp) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            return Prebound {
                https: Some(tcp),
                tunnel: Some(udp),
                ..Prebound::default()
            };
        }
    }
    panic!("no loopback port free for both TCP and UDP in 50 tries");
}

/// Like [`site_via`], serving on the sockets in `prebound`.
pub async fn site_on<L>(
    extra_edge: &str,
    routes: &str,
    agent_tail: &str,
    prebound: Prebound,
    link: impl FnOnce(SocketAddr, SocketAddr) -> (SocketAddr, L),
) -> (Site, AgentExtras, L) {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let (_, ghost_fp) = world.agent_key("ghost");
    let edge_toml = format!(
        "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n{extra_edge}\n\n[tls]\nmode = \"self-signed\"\n\n\
         [[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n[[agent]]\nname = \"ghost\"\nkey = \"{ghost_fp}\"\n\n{routes}",
        world.path("state")
    );
    let config = edge_config(&edge_toml);
    let edge_bound = burrow_edge::Edge::bind_with(config, prebound)
        .await
        .unwrap();
    let https = edge_bound.https_addr().unwrap();
    let gate = edge_bound.gate();
    let admin = edge_bound.admin_addr();
    let (edge, _) = run_edge(edge_bound);
    let (dial, kept) = link(edge.tunnel, https);
    let agent_toml = format!(
        "[agent]\nname = \"home\"\nedge = \"{dial}\"\nedge_key = \"{}\"\nkey = {:?}\n{agent_tail}",
        edge.fingerprint, key
    );
    let (mut agent, extras) = start_agent_with(agent_config(&agent_toml));
    agent.connected().await;
    let roots = self_signed_roots(&world);
    let site = Site {
        world,
        edge,
        https,
        agent,
        roots,
        gate,
        admin,
    };
    (site, extras, kept)
}

impl Site {
    pub fn cert_path(&self) -> PathBuf {
        self.world.path("state/self-signed.pem")
    }

    /// A TLS connection to the edge for `host`, offering `alpn`.
    pub async fn tls(&self, host: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        self.tls_from("127.0.0.1".parse().unwrap(), host, alpn)
            .await
    }

    /// Like `tls`, from another loopback source address (another "client").
    pub async fn tls_from(
        &self,
        source: std::net::IpAddr,
        host: &str,
        alpn: &[&[u8]],
    ) -> TlsStream<TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(source, 0)).unwrap();
        let tcp = socket.connect(self.https).await.unwrap();
        self.tls_over(tcp, host, alpn)
            .await
            .expect("tls handshake with the edge")
    }

    /// A TLS handshake with the edge over a connection the caller opened.
    pub async fn tls_over(
        &self,
        tcp: TcpStream,
        host: &str,
        alpn: &[&[u8]],
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
            .await
    }

    /// An HTTP/1.1 client connection to the edge for `host`.
    pub async fn h1(&self, host: &str) -> hyper::client::conn::http1::SendRequest<TestBody> {
        self.h1_from("127.0.0.1".parse().unwrap(), host).await
    }

    /// An HTTP/1.1 client connection from another loopback address.
    pub async fn h1_from(
        &self,
        source: std::net::IpAddr,
        host: &str,
    ) -> hyper::client::conn::http1::SendRequest<TestBody> {
        h1_over(self.tls_from(source, host, &[b"http/1.1"]).await).await
    }

    /// An HTTP/2 client connection to the edge for `host`.
    pub async fn h2(&self, host: &str) -> hyper::client::conn::http2::SendRequest<TestBody> {
        let tls = self.tls(host, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    }

    /// A request for `host` and `path` through the edge (HTTP/1.1).
    pub async fn get(&self, host: &str, path: &str) -> Response<Incoming> {
        self.get_via(host, host, path).await
    }

    /// Like `get`, with TLS for `sni` and the Host header `host`.
    pub async fn get_via(&self, sni: &str, host: &str, path: &str) -> Response<Incoming> {
        let mut s = self.h1(sni).await;
        s.send_request(request("GET", host, path, empty()))
            .await
            .unwrap()
    }
}

/// An HTTP/1.1 client over `io` (plain TCP, or TLS), its connection
/// driven by a task of its own (upgrades included).
pub async fn h1_over<T>(io: T) -> hyper::client::conn::http1::SendRequest<TestBody>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// Roots that trust the self-signed certificate an edge with `world`'s
/// state directory made.
pub fn self_signed_roots(world: &World) -> Arc<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(world.path("state/self-signed.pem")).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// GETs `path` from the admin listener; returns the status, content type and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (StatusCode, String, String) {
    let mut s = h1_over(tokio::net::TcpStream::connect(admin).await.unwrap()).await;
    let r = s
        .send_request(request("GET", "localhost", path, empty()))
        .await
        .unwrap();
    let status = r.status();
    let content_type = r.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    (status, content_type, body_text(r).await)
}

pub fn empty() -> TestBody {
    Full::new(Bytes::new()).boxed()
}

pub fn request(method: &str, host: &str, path: &str, body: TestBody) -> Request<TestBody> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(body)
        .unwrap()
}

/// A bodyless GET for an HTTP/2 connection: the host travels in the
/// URI's authority (`:authority`), not in a Host header.
pub fn h2_get(host: &str, path: &str) -> Request<TestBody> {
    Request::builder()
        .uri(format!("https://{host}{path}"))
        .body(empty())
        .unwrap()
}

/// Reads a whole body as text.
pub async fn body_text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads the next data chunk of a streaming body.
pub async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("a chunk in time")?;
        if let Ok(data) = frame.unwrap().into_data() {
            return Some(data);
        }
    }
}
