//! Restarting the edge the way systemd does with `burrow-edge.socket`: a
//! holder process (`tests/restart/activate.py`, standing in for systemd)
//! keeps the listening sockets and runs `burrow edge` on them through
//! socket activation; a restart is SIGTERM, wait for the exit, start again
//! on the same sockets. With 100 WebSockets open and a request loop
//! running, nothing may be refused, and every WebSocket must get a close
//! frame (1001) and be back within 2 s.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SOCKETS: usize = 100;
/// How soon a closed WebSocket must be open again.
const BACK_WITHIN: Duration = Duration::from_secs(2);

/// The holder process; stops the edge and itself when dropped.
struct Holder(Process);

impl Drop for Holder {
    fn drop(&mut self) {
        self.0.signal("TERM");
        let _ = self.0.wait_exit();
    }
}

/// A TLS connection to the edge for `host`.
async fn tls(
    https: SocketAddr,
    roots: &Arc<rustls::RootCertStore>,
    host: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(https).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap(),
            tcp,
        )
        .await
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn open_ws(https: SocketAddr, roots: &Arc<rustls::RootCertStore>, n: usize) -> Ws {
    let tls = tls(https, roots, "app.test").await.unwrap();
    let local = tls.get_ref().0.local_addr().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://app.test/ws", tls)
        .await
        .unwrap_or_else(|e| panic!("socket {n} from {local}: {e}"));
    let text = format!("hello {n}");
    ws.send(Message::text(text.clone())).await.unwrap();
    let echo = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert_eq!(echo.unwrap().unwrap(), Message::text(text));
    ws
}

/// Waits until the request loop has served `n` requests (at most [`WAIT`]).
async fn wait_served(served: &AtomicU64, n: u64, loop_task: &tokio::task::JoinHandle<Vec<String>>) {
    let deadline = Instant::now() + WAIT;
    while served.load(Ordering::Relaxed) < n {
        assert!(!loop_task.is_finished(), "the request loop ended");
        assert!(
            Instant::now() < deadline,
            "the request loop served {} of {n} in {WAIT:?}",
            served.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What one WebSocket saw of the restart.
#[derive(Debug)]
struct Seen {
    closed_at: Instant,
    back_at: Instant,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_activated_restart_refuses_nothing_and_websockets_are_back_within_2_s() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let config = world.path("edge.toml");
    let mut command = std::process::Command::new("python3");
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/restart/activate.py"
        ))
        .arg(burrow_bin())
        .arg(&config)
        .env("RUST_LOG", "info,burrow_edge::http=debug");
    let mut holder = Holder(Process::spawn_command(command));
    let sockets = holder.0.wait_log("sockets");
    let https = field_addr(&sockets, "https");
    let tunnel = field_addr(&sockets, "tunnel");
    let admin = field_addr(&sockets, "admin");
    let app = demo_app().await;
    let (test_addr, _up) = upstream().await;
    std::fs::write(
        &config,
        format!(
            "[edge]\nstate_dir = {:?}\nhttps = \"{https}\"\ntunnel = \"{tunnel}\"\nadmin = \"{admin}\"\n\n\
             [limits]\n# Every client here is 127.0.0.1: room for 100 WebSockets and the loop.\nstreams_per_ip = 1000\n\n\
             [tls]\nmode = \"self-signed\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
             [[route]]\nhost = \"app.test\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n\n\
             [[route]]\nhost = \"test.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n",
            world.path("state")
        ),
    )
    .unwrap();
    holder.0.signal("USR2");
    holder
        .0
        .wait_log("using the listening sockets systemd handed over");
    let fingerprint = holder.0.wait_log("edge listening")["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    holder.0.wait_log("serving https");
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{fingerprint}\"\nkey = {key:?}\n\n\
         [[service]]\nname = \"app\"\nurl = \"http://{app}\"\n\n\
         [[service]]\nname = \"test\"\nurl = \"http://{test_addr}\"\n"
    )));
    agent.connected().await;
    let roots = self_signed_roots(&world);

    // 100 WebSockets; each waits for its close, then opens again.
    let mut sockets = Vec::new();
    for n in 0..SOCKETS {
        sockets.push(open_ws(https, &roots, n).await);
    }
    let mut watchers = Vec::new();
    for (n, mut ws) in sockets.into_iter().enumerate() {
        let roots = roots.clone();
        watchers.push(tokio::spawn(async move {
            let close = match ws.next().await {
                Some(Ok(Message::Close(frame))) => frame,
                Some(Ok(other)) => panic!("socket {n}: unexpected {other:?}"),
                Some(Err(e)) => panic!("socket {n}: ended without a close frame: {e}"),
                None => panic!("socket {n}: ended without a close frame"),
            };
            let closed_at = Instant::now();
            let code = close.map(|f| f.code);
            assert_eq!(code, Some(CloseCode::Away), "socket {n}: close code");
            let _ = open_ws(https, &roots, n).await;
            Seen {
                closed_at,
                back_at: Instant::now(),
            }
        }));
    }

    // Requests, each on a new connection, all through the restart.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let requests = {
        let (stop, served, roots) = (stop.clone(), served.clone(), roots.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let conn = match tls(https, &roots, "test.test").await {
                    Ok(c) => c,
                    Err(e) => {
                        failures.push(format!("connect: {e}"));
                        continue;
                    }
                };
                let mut s = h1_over(conn).await;
                match s
                    .send_request(request("GET", "test.test", "/headers", empty()))
                    .await
                {
                    Ok(r) if r.status() == StatusCode::OK => {
                        body_text(r).await;
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("request: {e:?}")),
                }
            }
            failures
        })
    };
    wait_served(&served, 5, &requests).await;

    agent.status.borrow_and_update();
    let restart = Instant::now();
    holder.0.signal("USR1");
    let stopped = holder.0.wait_log("stopped");
    holder.0.wait_log("started");
    let mut seen = Vec::new();
    for w in watchers {
        match tokio::time::timeout(WAIT, w).await {
            Ok(Ok(s)) => seen.push(s),
            other => panic!(
                "a WebSocket did not come back: {other:?}; the edge's warnings: {:#?}",
                holder.0.warnings()
            ),
        }
    }
    assert!(
        agent.status.has_changed().unwrap(),
        "the agent left the old edge"
    );
    agent.connected().await;
    let after = served.load(Ordering::Relaxed);
    wait_served(&served, after + 5, &requests).await;
    stop.store(true, Ordering::Relaxed);
    let failures = requests.await.unwrap();
    assert!(
        failures.is_empty(),
        "refused or failed: {failures:?}; the edge's warnings: {:#?}",
        holder.0.warnings()
    );

    let closed: Vec<Duration> = seen.iter().map(|s| s.closed_at - restart).collect();
    let back: Vec<Duration> = seen.iter().map(|s| s.back_at - s.closed_at).collect();
    let worst_back = *back.iter().max().unwrap();
    assert!(
        worst_back <= BACK_WITHIN,
        "a WebSocket took {worst_back:?} to come back"
    );
    eprintln!(
        "restart with {SOCKETS} WebSockets and a request loop: old edge exited after {} ms; \
         every WebSocket got 1001 within {:?} of SIGTERM and was back within {:?} \
         (median {:?}); {} requests, none refused or failed",
        stopped["took_ms"],
        closed.iter().max().unwrap(),
        worst_back,
        {
            let mut b = back.clone();
            b.sort();
            b[b.len() / 2]
        },
        served.load(Ordering::Relaxed),
    );
}
