//! The "sleeping PC" stand-in for wake tests: a task that listens on a
//! loopback UDP port and starts an Ollama-shaped HTTP server (GET
//! /api/version, streaming POST /api/chat that reports the length and
//! SHA-256 of the body it got, GET / as an app page, a WebSocket echo on
//! /ws) only after a valid magic packet for its MAC and a simulated boot.
//! Until then its HTTP port is bound but not listening, so connects are
//! refused, as with a PC that is off; malformed packets and other MACs are
//! counted and ignored.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpSocket, UdpSocket};
use tokio::sync::{mpsc, watch};

use super::WAIT;
use super::web::{ChannelBody, TestBody};

/// The stand-in's MAC address, as bytes and as written in agent.toml.
pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const MAC_TEXT: &str = "52:54:00:12:34:56";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Asleep,
    Booting,
    Awake,
}

/// When a boot finishes.
#[derive(Debug, Clone, Copy)]
pub enum Boot {
    After(Duration),
    /// When the test calls [`StandIn::finish_boot`].
    WhenReleased,
}

enum Cmd {
    Sleep,
    Freeze,
    FinishBoot,
}

#[derive(Default)]
pub struct Shared {
    pub valid_packets: AtomicU64,
    pub ignored_packets: AtomicU64,
    /// Asleep-to-booting transitions: wake episodes as the PC saw them.
    pub boots: AtomicU64,
    /// (connection accept order, request tag) of every /api/chat.
    pub chats: Mutex<Vec<(u64, String)>>,
    /// GET /api/tags requests answered (model listings).
    pub listings: AtomicU64,
}

/// The model list the stand-in serves at /api/tags.
pub const TAGS: &str = "{\"models\":[{\"name\":\"llama3:8b\",\"size\":4661224676}]}";

pub struct StandIn {
    pub udp: SocketAddr,
    pub http: SocketAddr,
    pub shared: Arc<Shared>,
    cmds: mpsc::UnboundedSender<Cmd>,
    pub power: watch::Receiver<Power>,
    /// Bumped on every packet, valid or not, so tests can wait for one.
    packets: watch::Receiver<u64>,
}

/// A socket that holds the HTTP port without listening: connects to it
/// are refused, and nobody else can take the port meanwhile.
fn reserve(addr: SocketAddr) -> TcpSocket {
    let s = TcpSocket::new_v4().unwrap();
    s.set_reuseaddr(true).unwrap();
    s.bind(addr).unwrap();
    s
}

pub fn is_magic_packet_for(p: &[u8], mac: [u8; 6]) -> bool {
    (p.len() == 102 || p.len() == 108)
        && p[..6] == [0xff; 6]
        && p[6..102].chunks(6).all(|c| c == mac)
}

impl StandIn {
    pub async fn start(boot: Boot, power: Power) -> Self {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_addr = udp.local_addr().unwrap();
        let reserved = reserve("127.0.0.1:0".parse().unwrap());
        let http = reserved.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let (power_tx, power_rx) = watch::channel(power);
        let (packets_tx, packets) = watch::channel(0);
        let (listener, reserved) = match power {
            Power::Awake => (Some(reserved.listen(128).unwrap()), None),
            _ => (None, Some(reserved)),
        };
        tokio::spawn(run_stand_in(
            udp,
            http,
            reserved,
            listener,
            boot,
            shared.clone(),
            power_tx,
            packets_tx,
            cmd_rx,
        ));
        Self {
            udp: udp_addr,
            http,
            shared,
            cmds,
            power: power_rx,
            packets,
        }
    }

    pub fn boots(&self) -> u64 {
        self.shared.boots.load(Ordering::SeqCst)
    }

    pub fn valid_packets(&self) -> u64 {
        self.shared.valid_packets.load(Ordering::SeqCst)
    }

    pub fn ignored_packets(&self) -> u64 {
        self.shared.ignored_packets.load(Ordering::SeqCst)
    }

    /// Goes to sleep: the HTTP port stops listening (connects are refused).
    pub async fn sleep(&mut self) {
        self.cmds.send(Cmd::Sleep).unwrap();
        self.wait_power(Power::Asleep).await;
    }

    /// Goes to sleep the way a suspended machine does: connects to the
    /// HTTP port hang instead of being refused.
    pub async fn freeze(&mut self) {
        self.cmds.send(Cmd::Freeze).unwrap();
        self.wait_power(Power::Asleep).await;
    }

    pub fn finish_boot(&self) {
        self.cmds.send(Cmd::FinishBoot).unwrap();
    }

    pub async fn wait_power(&mut self, want: Power) {
        tokio::time::timeout(WAIT, self.power.wait_for(|p| *p == want))
            .await
            .unwrap_or_else(|_| panic!("stand-in never became {want:?}"))
            .unwrap();
    }

    /// Waits until at least `n` packets (valid or not) have arrived.
    pub async fn wait_packets(&mut self, n: u64) {
        tokio::time::timeout(WAIT, self.packets.wait_for(|c| *c >= n))
            .await
            .unwrap_or_else(|_| panic!("stand-in never got {n} packets"))
            .unwrap();
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_stand_in(
    udp: UdpSocket,
    http: SocketAddr,
    mut reserved: Option<TcpSocket>,
    mut listener: Option<TcpListener>,
    boot: Boot,
    shared: Arc<Shared>,
    power: watch::Sender<Power>,
    packets: watch::Sender<u64>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
) {
    let mut booting: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut accepted = 0u64;
    let mut buf = [0u8; 2048];
    // While frozen: a listener with no room in its accept queue (backlog 0,
    // one connection queued and never accepted). Linux drops further SYNs,
    // so connects hang as they do to a machine that is suspended.
    let mut frozen: Option<(TcpListener, tokio::net::TcpStream)> = None;
    let wake_up = |reserved: &mut Option<TcpSocket>,
                   frozen: &mut Option<(TcpListener, tokio::net::TcpStream)>| {
        if frozen.take().is_some() {
            *reserved = Some(reserve(http));
        }
        reserved
            .take()
            .expect("a sleeping stand-in holds its port")
            .listen(128)
            .unwrap()
    };
    loop {
        tokio::select! {
            r = udp.recv_from(&mut buf) => {
                let Ok((n, _)) = r else { return };
                if is_magic_packet_for(&buf[..n], MAC) {
                    shared.valid_packets.fetch_add(1, Ordering::SeqCst);
                    if *power.borrow() == Power::Asleep {
                        shared.boots.fetch_add(1, Ordering::SeqCst);
                        power.send_replace(Power::Booting);
                        if let Boot::After(d) = boot {
                            // The simulated boot time, not a wait for readiness.
                            booting = Some(Box::pin(tokio::time::sleep(d)));
                        }
                    }
                } else {
                    shared.ignored_packets.fetch_add(1, Ordering::SeqCst);
                }
                packets.send_modify(|c| *c += 1);
            }
            () = async { booting.as_mut().expect("guarded").await }, if booting.is_some() => {
                booting = None;
                listener = Some(wake_up(&mut reserved, &mut frozen));
                power.send_replace(Power::Awake);
            }
            r = async { listener.as_ref().expect("guarded").accept().await }, if listener.is_some() => {
                let Ok((tcp, _)) = r else { continue };
                let index = accepted;
                accepted += 1;
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(ollama(req, index, shared).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .with_upgrades()
                        .await;
                });
            }
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Sleep) => {
                    booting = None;
                    if listener.take().is_some() {
                        reserved = Some(reserve(http));
                    }
                    power.send_replace(Power::Asleep);
                }
                Some(Cmd::Freeze) => {
                    booting = None;
                    drop(listener.take());
                    drop(reserved.take());
                    let full = reserve(http).listen(0).unwrap();
                    let filler = tokio::net::TcpStream::connect(http).await.unwrap();
                    frozen = Some((full, filler));
                    power.send_replace(Power::Asleep);
                }
                Some(Cmd::FinishBoot) => {
                    if *power.borrow() == Power::Booting {
                        booting = None;
                        listener = Some(wake_up(&mut reserved, &mut frozen));
                        power.send_replace(Power::Awake);
                    }
                }
                None => return,
            },
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn text_response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<TestBody> {
    let mut r = Response::new(Full::new(Bytes::from(body)).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    r
}

/// Ollama's shape: /api/version answers at once; /api/chat reads the whole
/// request, then streams NDJSON tokens and a last line with the length and
/// SHA-256 of the body it received.
async fn ollama(req: Request<Incoming>, index: u64, shared: Arc<Shared>) -> Response<TestBody> {
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/api/version") => text_response(
            StatusCode::OK,
            "application/json",
            "{\"version\":\"0.9.0-standin\"}".into(),
        ),
        ("GET", "/api/tags") => {
            shared.listings.fetch_add(1, Ordering::Relaxed);
            text_response(StatusCode::OK, "application/json", TAGS.into())
        }
        ("GET", "/api/ps") => {
            text_response(StatusCode::OK, "application/json", "{\"models\":[]}".into())
        }
        ("GET", "/ws") => websocket_echo(req),
        ("GET", "/") => text_response(
            StatusCode::OK,
            "text/html",
            "<!doctype html><title>Open WebUI</title><p id=\"app\">the app</p>".into(),
        ),
        ("POST", "/api/chat") => {
            let mut body = req.into_body();
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut len = 0usize;
            let mut head = Vec::new();
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return text_response(StatusCode::BAD_REQUEST, "text/plain", "cut".into());
                };
                if let Ok(data) = frame.into_data() {
                    len += data.len();
                    ctx.update(&data);
                    if head.len() < 256 {
                        head.extend_from_slice(&data[..data.len().min(256)]);
                    }
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let tag = head
                .split("\"tag\":\"")
                .nth(1)
                .and_then(|t| t.split('"').next())
                .unwrap_or("")
                .to_owned();
            shared.chats.lock().unwrap().push((index, tag));
            let sha = hex(ctx.finish().as_ref());
            let (tx, rx) = mpsc::channel(2);
            tokio::spawn(async move {
                for i in 0..5 {
                    let line = format!(
                        "{{\"model\":\"llama3\",\"message\":{{\"role\":\"assistant\",\"content\":\"token {i}\"}},\"done\":false}}\n"
                    );
                    if tx.send(Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
                let last = format!(
                    "{{\"model\":\"llama3\",\"done\":true,\"body_len\":{len},\"body_sha256\":\"{sha}\"}}\n"
                );
                let _ = tx.send(Bytes::from(last)).await;
            });
            let mut r = Response::new(ChannelBody(rx).boxed());
            r.headers_mut().insert(
                CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-ndjson"),
            );
            r
        }
        _ => text_response(StatusCode::NOT_FOUND, "text/plain", "not found".into()),
    }
}

/// A WebSocket that echoes every text or binary message.
fn websocket_echo(req: Request<Incoming>) -> Response<TestBody> {
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req.headers().get(http::header::SEC_WEBSOCKET_KEY) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "not a websocket".into(),
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(http_body_util::Empty::new().boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        http::header::SEC_WEBSOCKET_ACCEPT,
        http::HeaderValue::from_str(&accept).unwrap(),
    );
    r
}
