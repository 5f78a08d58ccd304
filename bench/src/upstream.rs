//! The upstream every target forwards to: one hyper server in a child
//! process of the bench (`burrow-bench --serve-upstream`), so direct and
//! tunnelled runs hit the very same server, and its sockets do not count
//! against the bench's open-file limit. SSE events carry CLOCK_MONOTONIC
//! send stamps, which the bench compares with the same clock on arrival.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// Size of each chunk a download sends (a shared buffer, never copied).
pub const BLOCK: usize = 256 * 1024;
/// The body of a small request's response.
pub const SMALL_BODY: &[u8] = b"{\"ok\":true,\"model\":\"bench\",\"tokens\":42}\n";
/// Longest SSE run and largest pause between events the upstream accepts.
const MAX_EVENTS: u64 = 1_000_000;
const MAX_INTERVAL_US: u64 = 1_000_000;
/// tungstenite's default read buffer is 128 KiB per socket; 10,000 held
/// sockets on both sides of the bench would spend gigabytes on it.
pub const WS_READ_BUFFER: usize = 4 * 1024;

pub type UpBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Nanoseconds of CLOCK_MONOTONIC: one clock for every process on the
/// machine, so the upstream's stamps and the bench's arrivals compare.
pub fn now_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(t.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(t.tv_nsec).unwrap_or(0);
    secs * 1_000_000_000 + nanos
}

pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
}

/// A body of `left` bytes made of clones of one block.
pub struct Repeat {
    block: Bytes,
    left: u64,
}

impl Repeat {
    pub fn new(block: Bytes, total: u64) -> Self {
        Self { block, left: total }
    }
}

impl Body for Repeat {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = usize::try_from(self.left).map_or(self.block.len(), |l| l.min(self.block.len()));
        self.left -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.block.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// SSE events stamped with the send time, `interval` apart.
struct Events {
    left: u64,
    interval: Duration,
    next: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Body for Events {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        if let Some(sleep) = self.next.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
        self.left -= 1;
        let interval = self.interval;
        self.next = Some(Box::pin(tokio::time::sleep(interval)));
        let event = format!("data: {}\n\n", now_ns());
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(event)))))
    }
}

fn query(req: &Request<Incoming>, name: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
}

fn status(code: StatusCode) -> Response<UpBody> {
    let mut r = Response::new(Full::new(Bytes::new()).boxed());
    *r.status_mut() = code;
    r
}

fn websocket(req: Request<Incoming>) -> Response<UpBody> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return status(StatusCode::BAD_REQUEST);
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(ws_config()),
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                break;
            }
        }
    });
    let mut r = status(StatusCode::SWITCHING_PROTOCOLS);
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

async fn route(req: Request<Incoming>, block: Bytes) -> Response<UpBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/small") => {
            let mut r = Response::new(Full::new(Bytes::from_static(SMALL_BODY)).boxed());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        (&Method::GET, "/download") => {
            let total = query(&req, "bytes").unwrap_or(0);
            Response::new(Repeat::new(block, total).boxed())
        }
        (&Method::POST, "/upload") => {
            let mut body = req.into_body();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => len += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return status(StatusCode::BAD_REQUEST),
                }
            }
            Response::new(Full::new(Bytes::from(len.to_string())).boxed())
        }
        (&Method::GET, "/sse") => {
            let events = Events {
                left: query(&req, "n").unwrap_or(1).min(MAX_EVENTS),
                interval: Duration::from_micros(
                    query(&req, "interval_us").unwrap_or(0).min(MAX_INTERVAL_US),
                ),
                next: None,
            };
            let mut r = Response::new(events.boxed());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-cache"),
            );
            r
        }
        (&Method::GET, "/ws") => websocket(req),
        _ => status(StatusCode::NOT_FOUND),
    }
}

/// The child's side: binds on loopback, prints `listening ADDR` on stdout,
/// serves until the parent goes away.
pub async fn serve() -> std::io::Result<()> {
    // The bench may die without dropping its children; follow it.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    println!("listening {addr}");
    let block = Bytes::from(vec![b'x'; BLOCK]);
    let builder = std::sync::Arc::new(auto::Builder::new(TokioExecutor::new()));
    {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                // Out of descriptors or similar: back off instead of spinning.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let builder = builder.clone();
            let block = block.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let block = block.clone();
                    async move { Ok::<_, Infallible>(route(req, block).await) }
                });
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                    .await;
            });
        }
    }
}

/// Starts the upstream child and returns it with its address.
pub fn start(dir: &std::path::Path) -> Result<(crate::stack::Proc, SocketAddr), crate::Error> {
    let exe = std::env::current_exe()?;
    crate::stack::Proc::spawn_reporting(
        "upstream",
        &exe,
        &["--serve-upstream".to_owned()],
        dir,
        "listening ",
    )
}
