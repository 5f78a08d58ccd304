//! The front door under attack (issue 14): one client that stops reading,
//! opens thousands of connections, goes silent, trickles uploads or runs
//! the edge out of file descriptors must not take the edge away from
//! everyone else. Real TLS clients on loopback; "other clients" are other
//! loopback source addresses (127.0.0.2, 127.0.0.3).

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::web::*;
use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const HOST: &str = "open.test";

/// Everything the edge logs in this test binary, for tests that check a
/// line was written. Installed before the harness's own subscriber.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_ansi(false)
        .with_writer(|| Capture)
        .try_init();
}

fn logged(needle: &str) -> bool {
    String::from_utf8_lossy(&LOGS.lock().unwrap()).contains(needle)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An HTTPS edge with one `auth = "none"` route to the test upstream,
/// `limits` as the `[limits]` table, an admin listener, and `extra_edge`
/// in `[edge]`.
async fn open_site(extra_edge: &str, limits: &str) -> (Site, Arc<Upstream>) {
    capture_logs();
    let (addr, up) = upstream().await;
    let routes = format!(
        "[limits]\n{limits}\n\n[[route]]\nhost = \"{HOST}\"\nagent = \"home\"\nservice = \"web\"\nauth = \"none\"\n"
    );
    let extra = format!("admin = \"127.0.0.1:0\"\n{extra_edge}");
    let site = site(&extra, &routes, &[("web", format!("http://{addr}"))]).await;
    (site, up)
}

/// `GET /metrics` from the admin listener.
async fn metrics(site: &Site) -> String {
    let tcp = TcpStream::connect(site.admin.unwrap()).await.unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = s
        .send_request(request("GET", "admin", "/metrics", empty()))
        .await
        .unwrap();
    body_text(resp).await
}

/// The value of one sample line of `/metrics`, 0 when absent.
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0)
}

/// A GET from `source` through the edge; its status.
async fn get_from(site: &Site, source: &str, path: &str) -> StatusCode {
    let mut s = site.h1_from(ip(source), HOST).await;
    let resp = tokio::time::timeout(WAIT, s.send_request(request("GET", HOST, path, empty())))
        .await
        .expect("an answer in time")
        .unwrap();
    let status = resp.status();
    body_text(resp).await;
    status
}

/// Waits until `value` stops changing for a second (polled every 100 ms):
/// the point where every buffer between a stalled reader and its producer
/// is full.
async fn settled(value: impl Fn() -> u64) -> u64 {
    let deadline = Instant::now() + WAIT;
    let mut last = value();
    let mut same = 0;
    while same < 10 {
        assert!(Instant::now() < deadline, "never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = value();
        if now == last {
            same += 1;
        } else {
            same = 0;
            last = now;
        }
    }
    last
}

#[tokio::test]
async fn stalled_readers_do_not_stall_other_streams_on_the_agent_link() {
    let (site, up) = open_site("", "").await;
    // Twelve clients ask for 64 MiB each and never read a byte: far more
    // than kernel socket buffers, TLS and hyper can absorb, so each stream
    // backs up to its QUIC receive window at the edge.
    const SIZE: u64 = 64 * 1024 * 1024;
    let mut stalled = Vec::new();
    for _ in 0..12 {
        let mut tls = site.tls(HOST, &[b"http/1.1"]).await;
        tls.write_all(
            format!("GET /download?bytes={SIZE} HTTP/1.1\r\nhost: {HOST}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        stalled.push(tls);
    }
    let held = settled(|| up.downloaded.load(Ordering::Relaxed)).await;
    assert!(
        held < 12 * SIZE / 2,
        "the downloads are stalled, not finished ({held} bytes sent)"
    );
    eprintln!(
        "12 stalled downloads hold {} MiB between upstream and clients",
        held >> 20
    );

    // An SSE stream through the same agent delivers every event in order.
    let gate = up.gate();
    let mut s = site.h1(HOST).await;
    let resp = tokio::time::timeout(
        WAIT,
        s.send_request(request("GET", HOST, "/gated-sse", empty())),
    )
    .await
    .expect("SSE response head while 12 downloads are stalled")
    .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut text = String::from_utf8(next_chunk(&mut body).await.unwrap().to_vec()).unwrap();
    assert!(text.starts_with("id: 1\n"), "{text}");
    gate.send(()).unwrap();
    while let Some(chunk) = next_chunk(&mut body).await {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let ids: Vec<u32> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
        .collect();
    assert_eq!(ids, (1..=200).collect::<Vec<_>>(), "every event, in order");

    // And a new request still succeeds.
    assert_eq!(
        get_from(&site, "127.0.0.3", "/headers").await,
        StatusCode::OK
    );
    drop(stalled);
}

/// Opens `n` connections to `to` from `source`, one after the other.
async fn open_many(to: SocketAddr, source: &str, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip(source), 0)).unwrap();
        let c = tokio::time::timeout(WAIT, socket.connect(to)).await;
        conns.push(c.expect("connected in time").unwrap());
    }
    conns
}

/// Opens up to `n` connections to `to` from `source`, all at once; those
/// that did not connect within a few seconds (a full backlog) are left out.
async fn flood(to: SocketAddr, source: &str, n: usize) -> Vec<TcpStream> {
    let source = SocketAddr::new(ip(source), 0);
    let mut connecting = tokio::task::JoinSet::new();
    for _ in 0..n {
        connecting.spawn(async move {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(source).unwrap();
            tokio::time::timeout(Duration::from_secs(3), socket.connect(to)).await
        });
    }
    let mut conns = Vec::new();
    let mut errors = Vec::new();
    while let Some(r) = connecting.join_next().await {
        match r.unwrap() {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => errors.push(e.to_string()),
            Err(_) => errors.push("timed out".into()),
        }
    }
    if !errors.is_empty() {
        errors.truncate(5);
        eprintln!("{source}: {} of {n} connected; {errors:?}", conns.len());
    }
    conns
}

/// Waits until the edge closes `conn` (EOF or reset); returns when.
async fn closed_by_edge(mut conn: impl tokio::io::AsyncRead + Unpin) -> Instant {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(WAIT, conn.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Instant::now(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("the edge never closed a silent connection"),
        }
    }
}

#[tokio::test]
async fn silent_connections_from_one_address_are_capped_and_closed() {
    const IDLE: Duration = Duration::from_secs(2);
    let (site, _up) = open_site("header_timeout = \"2s\"", "idle_timeout = \"2s\"").await;
    let started = Instant::now();
    // 2,000 TLS connections that go silent after the handshake...
    let mut silent = Vec::new();
    let mut refused = 0;
    for _ in 0..2000 {
        let tcp = {
            let socket = TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(ip("127.0.0.2"), 0)).unwrap();
            socket.connect(site.https).await.unwrap()
        };
        match site.tls_over(tcp, HOST, &[b"h2"]).await {
            Ok(tls) => silent.push(tls),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(
        get_from(&site, "127.0.0.3", "/headers").await,
        StatusCode::OK
    );
    // ...and 2,000 TCP connections that never start TLS.
    let idle = open_many(site.https, "127.0.0.2", 2000).await;
    let opened = Instant::now();
    // Another client is served throughout.
    assert_eq!(
        get_from(&site, "127.0.0.3", "/headers").await,
        StatusCode::OK
    );
    let m = metrics(&site).await;
    let refusals = sample(
        &m,
        "burrow_connections_refused_total{listener=\"https\",reason=\"connections_per_ip\"}",
    );
    eprintln!(
        "from one address: {} TCP and {} TLS connections open, {refused} TLS handshakes refused; the edge counted {refusals} refusals in {:?}",
        idle.len(),
        silent.len(),
        opened - started
    );
    assert_eq!(
        idle.len(),
        2000,
        "the edge drains its backlog (accepting and closing) instead of pausing"
    );
    assert!(refused > 0, "over connections_per_ip, handshakes fail");
    assert!(refusals >= refused, "every refusal is counted: {m}");
    assert!(logged("too many connections from one client; refusing"));

    // Every connection the edge kept is closed within its timeout (the
    // handshake budget for TCP, idle_timeout for TLS), plus the grace an
    // idle connection gets to finish.
    let limit = IDLE + burrow_edge::http::IDLE_CLOSE_GRACE + Duration::from_secs(2);
    let mut closes = tokio::task::JoinSet::new();
    for c in idle {
        closes.spawn(closed_by_edge(c));
    }
    for c in silent {
        closes.spawn(closed_by_edge(c));
    }
    while let Some(at) = closes.join_next().await {
        let late = at.unwrap().saturating_duration_since(opened);
        assert!(
            late <= limit,
            "a silent connection lived {late:?} past the flood"
        );
    }
    let m = metrics(&site).await;
    assert!(
        sample(
            &m,
            "burrow_connections_closed_idle_total{listener=\"https\"}"
        ) > 0,
        "{m}"
    );
    assert_eq!(
        get_from(&site, "127.0.0.3", "/headers").await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn an_idle_http2_connection_that_answers_pings_is_closed_after_idle_timeout() {
    const IDLE: Duration = Duration::from_secs(1);
    let (site, _up) = open_site("", "idle_timeout = \"1s\"").await;
    let tls = site.tls(HOST, &[b"h2"]).await;
    // The client pings often: pings are not requests.
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    // The edge's idle clock starts when its response ends, which is after
    // this and before the client has read the body: measured from here,
    // the connection cannot close before the timeout.
    let idle_from = Instant::now();
    let resp = sender.send_request(h2_get(HOST, "/headers")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    body_text(resp).await;
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("the edge closes the idle HTTP/2 connection")
        .unwrap()
        .ok();
    let lived = idle_from.elapsed();
    assert!(lived >= IDLE, "closed after {lived:?}, before idle_timeout");
    assert!(
        lived <= IDLE + burrow_edge::http::IDLE_CLOSE_GRACE + Duration::from_secs(1),
        "closed after {lived:?}"
    );
}

#[tokio::test]
async fn slow_uploads_from_one_client_are_capped_and_cut_off() {
    let (site, up) = open_site("", "").await;
    // 500 uploads from one address over two HTTP/2 connections, each
    // sending a few bytes and then nothing.
    let mut senders = Vec::new();
    for _ in 0..2 {
        let tls = site.tls_from(ip("127.0.0.6"), HOST, &[b"h2"]).await;
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .max_concurrent_reset_streams(1000)
            .handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(sender);
    }
    let mut uploads = tokio::task::JoinSet::new();
    let mut feeds = Vec::new();
    for i in 0..500 {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tx.send(Bytes::from_static(b"slow")).await.unwrap();
        feeds.push(tx);
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://{HOST}/upload"))
            .body(ChannelBody(rx).boxed())
            .unwrap();
        let mut s = senders[i % 2].clone();
        uploads.spawn(async move {
            let started = Instant::now();
            let status = match s.send_request(req).await {
                Ok(resp) => Some(resp.status()),
                Err(_) => None,
            };
            (status, started.elapsed())
        });
    }
    // The per-address cap refuses what is over it at once.
    let mut too_many = 0;
    while too_many < 500 - burrow_edge::config::DEFAULT_STREAMS_PER_IP {
        let (status, _) = tokio::time::timeout(WAIT, uploads.join_next())
            .await
            .expect("refusals come at once")
            .unwrap()
            .unwrap();
        assert_eq!(status, Some(StatusCode::TOO_MANY_REQUESTS));
        too_many += 1;
    }
    // The rest reach the service, and another client is served meanwhile.
    let started = burrow_edge::config::DEFAULT_STREAMS_PER_IP as u64;
    assert!(
        up.uploads_until(|u| u.uploads_started.load(Ordering::Relaxed) >= started)
            .await,
        "the uploads under the cap never arrived"
    );
    assert_eq!(
        get_from(&site, "127.0.0.7", "/headers").await,
        StatusCode::OK
    );
    // Bodies that did not authenticate must keep a pace: these are cut off
    // and the service sees aborted requests, never complete ones.
    let cut_off_by = Instant::now() + burrow_edge::http::io::BODY_GRACE + WAIT;
    while let Some(r) = tokio::time::timeout_at(cut_off_by.into(), uploads.join_next())
        .await
        .expect("the slow uploads are cut off")
    {
        let (_status, took) = r.unwrap();
        assert!(
            took >= burrow_edge::http::io::BODY_GRACE,
            "cut off after {took:?}"
        );
    }
    // The client hears first; the abort reaches the service through the
    // agent a moment later.
    up.uploads_until(|u| u.uploads_aborted.load(Ordering::Relaxed) >= started)
        .await;
    assert_eq!(up.uploads_aborted.load(Ordering::Relaxed), started);
    let m = metrics(&site).await;
    assert_eq!(
        sample(&m, "burrow_requests_refused_total{reason=\"slow_body\"}"),
        started,
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "burrow_requests_refused_total{reason=\"streams_per_ip\"}"
        ),
        400,
        "{m}"
    );
    drop(feeds);
}

/// CPU seconds (user + system) `pid` has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz: f64 = String::from_utf8(
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap();
    ticks as f64 / hz
}

/// One GET through `https` from `source`, with TLS trusting `roots`.
async fn try_get(
    https: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    source: &str,
) -> Result<StatusCode, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(ip(source), 0))
        .map_err(|e| e.to_string())?;
    let tcp = socket.connect(https).await.map_err(|e| e.to_string())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(rustls::pki_types::ServerName::try_from(HOST).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = s
        .send_request(request("GET", HOST, "/headers", empty()))
        .await
        .map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[tokio::test]
async fn out_of_file_descriptors_the_edge_pauses_instead_of_spinning_and_recovers() {
    capture_logs();
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let (service, _up) = upstream().await;
    // No per-address cap in the way: the flood is to reach the process's
    // file limit.
    let edge_toml = world.write(
        "edge.toml",
        &format!(
            "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\nheader_timeout = \"2s\"\n\n\
             [tls]\nmode = \"self-signed\"\n\n[limits]\nconnections_per_ip = 100000\nidle_timeout = \"2s\"\n\n\
             [[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
             [[route]]\nhost = \"{HOST}\"\nagent = \"home\"\nservice = \"web\"\nauth = \"none\"\n",
            world.path("state")
        ),
    );
    let mut edge = Process::spawn_with_nofile(256, &["edge", "--config", &path_str(&edge_toml)]);
    let listening = edge.wait_log("edge listening");
    let tunnel = field_addr(&listening, "tunnel");
    let fingerprint = listening["fingerprint"].as_str().unwrap().to_owned();
    let https = field_addr(&edge.wait_log("serving https"), "addr");
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{fingerprint}\"\nkey = {key:?}\n\n\
         [[service]]\nname = \"web\"\nurl = \"http://{service}\"\n"
    )));
    agent.connected().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        <rustls::pki_types::CertificateDer as rustls::pki_types::pem::PemObject>::pem_file_iter(
            world.path("state/self-signed.pem"),
        )
        .unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let roots = Arc::new(roots);
    assert_eq!(
        try_get(https, roots.clone(), "127.0.0.5").await,
        Ok(StatusCode::OK)
    );

    // The flood: more connections than the edge has file descriptors.
    let flooding = flood(https, "127.0.0.4", 1500).await;
    assert!(flooding.len() > 256, "only {} connected", flooding.len());
    edge.wait_log("accept failed; pausing accepts");
    let pid = edge.child.id();
    let (cpu_before, wall_before) = (cpu_seconds(pid), Instant::now());
    // Held for a while, with the edge refusing all along.
    let _more = flood(https, "127.0.0.4", 200).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_seconds(pid) - cpu_before;
    let wall = wall_before.elapsed().as_secs_f64();
    eprintln!(
        "flood of {} connections at 256 open files: edge used {used:.3} s CPU in {wall:.2} s",
        flooding.len()
    );
    assert!(
        used / wall < 0.10,
        "the edge used {:.0}% of a core while out of file descriptors",
        100.0 * used / wall
    );

    // The flood stops; the edge serves again.
    drop(flooding);
    drop(_more);
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout(
            Duration::from_secs(5),
            try_get(https, roots.clone(), "127.0.0.5"),
        )
        .await
        {
            Ok(Ok(status)) => {
                assert_eq!(status, StatusCode::OK);
                break;
            }
            other => assert!(
                Instant::now() < deadline,
                "never served again after the flood: {other:?}"
            ),
        }
    }
    edge.signal("TERM");
    assert!(edge.wait_exit().success());
}
