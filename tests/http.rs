//! The HTTPS edge end to end: streaming without buffering, WebSockets,
//! HTTP/1.1 and HTTP/2 (hyper clients and curl), big bodies, disconnects,
//! forwarding headers, error statuses and hostile requests.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use bytes::Bytes;
use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

const ROUTES: &str = r#"
[[route]]
host = "test.test"
agent = "home"
service = "test"
auth = "none"

[[route]]
host = "app.test"
agent = "home"
service = "app"
auth = "none"

[[route]]
host = "ollama.test"
agent = "home"
service = "test"
auth = "none"
host_header = "localhost:11434"

[[route]]
host = "slow.test"
agent = "home"
service = "test"
auth = "none"
response_timeout = "300ms"

[[route]]
host = "idle.test"
agent = "home"
service = "test"
auth = "none"
idle_timeout = "300ms"

[[route]]
host = "dead.test"
agent = "home"
service = "dead"
auth = "none"

[[route]]
host = "nosuch.test"
agent = "home"
service = "nosuch"
auth = "none"

[[route]]
host = "ghost.test"
agent = "ghost"
service = "test"
auth = "none"
"#;

async fn standard_site() -> (Site, std::sync::Arc<Upstream>) {
    let (test_addr, up) = upstream().await;
    let app = demo_app().await;
    // A port with nothing listening: bind, note, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let site = site(
        "header_timeout = \"1s\"\nagent_wait = \"1s\"",
        ROUTES,
        &[
            ("test", format!("http://{test_addr}")),
            ("app", format!("http://{app}")),
            ("dead", format!("http://{dead}")),
        ],
    )
    .await;
    (site, up)
}

#[tokio::test]
async fn sse_first_event_arrives_before_the_service_sends_the_last() {
    let (site, up) = standard_site().await;
    for h2 in [false, true] {
        let gate = up.gate();
        let req = request("GET", "test.test", "/gated-sse", empty());
        let resp = if h2 {
            site.h2("test.test").await.send_request(req).await.unwrap()
        } else {
            site.h1("test.test").await.send_request(req).await.unwrap()
        };
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert!(
            resp.headers().get("content-encoding").is_none(),
            "the edge adds no compression"
        );
        let mut body = resp.into_body();
        // The service holds events 2..200 until we have seen event 1.
        let first = next_chunk(&mut body).await.unwrap();
        assert!(first.starts_with(b"id: 1\n"), "{first:?}");
        gate.send(()).unwrap();
        let mut rest = first.to_vec();
        while let Some(chunk) = next_chunk(&mut body).await {
            rest.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(rest).unwrap();
        let ids: Vec<u32> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: "))
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(
            ids,
            (1..=200).collect::<Vec<_>>(),
            "all events, in order (h2: {h2})"
        );
    }
}

#[tokio::test]
async fn ollama_ndjson_streams_line_by_line_with_the_request_body() {
    let (site, up) = standard_site().await;
    let gate = up.gate();
    let prompt = r#"{"model":"llama3","messages":[{"role":"user","content":"hi"}]}"#;
    let mut s = site.h1("ollama.test").await;
    let resp = s
        .send_request(request(
            "POST",
            "ollama.test",
            "/gated-ndjson",
            http_body_util::Full::new(Bytes::from(prompt)).boxed(),
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = next_chunk(&mut body).await.unwrap();
    assert_eq!(
        &first[..],
        format!("{{\"n\":1,\"echo\":{}}}\n", prompt.len()).as_bytes()
    );
    gate.send(()).unwrap();
    let mut lines = vec![String::from_utf8(first.to_vec()).unwrap()];
    while let Some(chunk) = next_chunk(&mut body).await {
        lines.push(String::from_utf8(chunk.to_vec()).unwrap());
    }
    let all: String = lines.concat();
    let ns: Vec<u32> = all
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["n"]
                .as_u64()
                .unwrap() as u32
        })
        .collect();
    assert_eq!(ns, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn websocket_echoes_1000_round_trips_and_closes_from_either_side() {
    let (site, _) = standard_site().await;
    let tls = site.tls("app.test", &[b"http/1.1"]).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://app.test/ws", tls)
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..1000u32 {
        let msg = if i % 2 == 0 {
            Message::text(format!("message {i}"))
        } else {
            Message::binary(i.to_be_bytes().repeat(64))
        };
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back, msg, "round trip {i}");
    }
    // Client-initiated close: the service answers the close.
    ws.close(None).await.unwrap();
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(end, Some(Ok(Message::Close(_))) | None), "{end:?}");

    // Service-initiated close.
    let tls = site.tls("app.test", &[b"http/1.1"]).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://app.test/ws", tls)
        .await
        .unwrap();
    ws.send(Message::text("close-me")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(got, Some(Ok(Message::Close(_)))), "{got:?}");
}

#[tokio::test]
async fn demo_app_closes_websockets_cleanly_without_the_tunnel() {
    let app = demo_app().await;
    let tcp = tokio::net::TcpStream::connect(app).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{app}/ws"), tcp)
        .await
        .unwrap();
    ws.send(Message::text("close-me")).await.unwrap();
    let got = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(got, Some(Ok(Message::Close(_)))), "{got:?}");
}

#[tokio::test]
async fn curl_works_over_http1_and_http2() {
    let (site, _) = standard_site().await;
    let port = site.https.port();
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = tokio::process::Command::new("curl")
            .args([
                "-sS",
                flag,
                "--cacert",
                site.cert_path().to_str().unwrap(),
                "--resolve",
                &format!("app.test:{port}:127.0.0.1"),
                "-w",
                "\n%{http_version} %{http_code}",
                &format!("https://app.test:{port}/sse?n=5&delay_ms=1"),
            ])
            .output()
            .await
            .expect("curl runs (CI installs it)");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "curl {flag}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.ends_with(&format!("\n{version} 200")),
            "curl {flag}: {stdout}"
        );
        assert_eq!(
            stdout.matches("data: {\"token\":\"token").count(),
            5,
            "{stdout}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_down_and_256_mib_up_keep_their_hashes() {
    const DOWN: u64 = 1 << 30;
    const UP: usize = 256 << 20;
    let (site, up) = standard_site().await;

    let mut s = site.h2("test.test").await;
    let resp = s
        .send_request(request(
            "GET",
            "test.test",
            &format!("/download?bytes={DOWN}"),
            empty(),
        ))
        .await
        .unwrap();
    up.check_download(resp, DOWN).await;

    // Upload in 1 MiB chunks of pseudo-random data, streamed (no length).
    let mut data = vec![0u8; UP];
    fill_pseudo_random(7, &mut data);
    let hex: String = sha256(&data).iter().map(|b| format!("{b:02x}")).collect();
    let data = Bytes::from(data);
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..UP)
        .step_by(1 << 20)
        .map(|o| Ok(Frame::data(data.slice(o..o + (1 << 20)))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let mut s = site.h1("test.test").await;
    let resp = s
        .send_request(request("POST", "test.test", "/upload", body))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, format!("{UP} {hex}"));
}

#[tokio::test]
async fn a_client_that_vanishes_closes_the_service_connection() {
    let (site, up) = standard_site().await;
    let (gone_tx, mut gone_rx) = tokio::sync::mpsc::channel(1);
    *up.client_gone.lock().unwrap() = Some(gone_tx);
    let mut s = site.h1("test.test").await;
    let resp = s
        .send_request(request("GET", "test.test", "/forever", empty()))
        .await
        .unwrap();
    let mut body = resp.into_body();
    assert!(next_chunk(&mut body).await.unwrap().starts_with(b"data: 1"));
    // Vanish: drop the body and the connection.
    drop(body);
    drop(s);
    tokio::time::timeout(WAIT, gone_rx.recv())
        .await
        .expect("the service saw the client go away")
        .unwrap();
    // Everyone else is unaffected.
    assert_eq!(
        site.get("test.test", "/headers").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn forwarding_headers_are_the_edges_own() {
    let (site, up) = standard_site().await;
    let mut s = site.h1("test.test").await;
    let req = http::Request::builder()
        .uri("/headers?x=1")
        .header("host", "test.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=6.6.6.6")
        .header("x-real-ip", "6.6.6.6")
        .header("connection", "x-private")
        .header("x-private", "hop")
        .header("authorization", "Bearer xyz")
        .body(empty())
        .unwrap();
    assert_eq!(s.send_request(req).await.unwrap().status(), StatusCode::OK);
    let seen = up.last_headers.lock().unwrap().clone();
    assert_eq!(seen["x-forwarded-for"], vec!["127.0.0.1"]);
    assert_eq!(seen["x-forwarded-proto"], vec!["https"]);
    assert_eq!(seen["x-forwarded-host"], vec!["test.test"]);
    assert_eq!(
        seen["forwarded"],
        vec!["for=127.0.0.1;proto=https;host=\"test.test\""]
    );
    assert_eq!(seen["host"], vec!["test.test"]);
    assert_eq!(
        seen["authorization"],
        vec!["Bearer xyz"],
        "credentials for the app pass untouched"
    );
    assert_eq!(
        seen["x-real-ip"],
        vec!["127.0.0.1"],
        "the client as the edge saw it, not the one it claimed"
    );
    assert!(
        !seen.contains_key("x-private"),
        "a header named in Connection is hop-by-hop"
    );

    // HTTP/2 requests reach the service as HTTP/1.1 with a Host header; the
    // route's host_header rewrite applies.
    let mut s = site.h2("ollama.test").await;
    let resp = s
        .send_request(h2_get("ollama.test", "/headers"))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = up.last_headers.lock().unwrap().clone();
    assert_eq!(seen["host"], vec!["localhost:11434"]);
    assert_eq!(seen["x-forwarded-host"], vec!["ollama.test"]);
}

#[tokio::test]
async fn failures_get_clear_statuses_and_never_hang() {
    let (site, _) = standard_site().await;
    let cases = [
        ("unknown.test", "/", StatusCode::NOT_FOUND),
        ("dead.test", "/", StatusCode::BAD_GATEWAY),
        ("nosuch.test", "/", StatusCode::BAD_GATEWAY),
        ("slow.test", "/hang", StatusCode::GATEWAY_TIMEOUT),
        // The ghost agent never connects: after agent_wait (1 s here), 502.
        ("ghost.test", "/", StatusCode::BAD_GATEWAY),
    ];
    for (host, path, status) in cases {
        // TLS for a name the edge has; the Host header decides the route.
        let resp = tokio::time::timeout(WAIT, site.get_via("test.test", host, path))
            .await
            .expect("an answer in time");
        assert_eq!(resp.status(), status, "{host}{path}");
        let text = body_text(resp).await;
        assert!(text.starts_with(status.as_str()), "{host}: {text}");
        assert!(
            !text.contains("127.0.0.1"),
            "no internal detail leaks: {text}"
        );
    }
}

/// Writes a raw request on a fresh TLS connection and returns the status
/// line, or `None` when the edge closed the connection without one.
async fn raw(site: &Site, request: &[u8]) -> Option<String> {
    let mut tls = site.tls("test.test", &[b"http/1.1"]).await;
    tls.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut buf))
        .await
        .expect("edge answers or closes");
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.lines()
        .next()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
}

#[tokio::test]
async fn hostile_requests_get_4xx_and_the_edge_keeps_serving() {
    let (site, _) = standard_site().await;
    let dup = b"GET / HTTP/1.1\r\nHost: test.test\r\nHost: app.test\r\nConnection: close\r\n\r\n";
    assert_eq!(
        raw(&site, dup).await.as_deref(),
        Some("HTTP/1.1 400 Bad Request")
    );

    let bad_bytes =
        b"GET / HTTP/1.1\r\nHost: test.test\r\nX-Bad: a\x01b\r\nConnection: close\r\n\r\n";
    let status = raw(&site, bad_bytes).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");

    let mut huge = b"GET / HTTP/1.1\r\nHost: test.test\r\nX-Big: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
    huge.extend_from_slice(b"\r\nConnection: close\r\n\r\n");
    let status = raw(&site, &huge).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");

    let no_host = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n";
    let status = raw(&site, no_host).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 400"), "{status}");

    // Slowloris: half a request head, then silence. The edge closes it after
    // header_timeout (1 s here) while serving others normally meanwhile.
    let mut slow = site.tls("test.test", &[b"http/1.1"]).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: test.test\r\n")
        .await
        .unwrap();
    assert_eq!(
        site.get("test.test", "/headers").await.status(),
        StatusCode::OK
    );
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(WAIT, slow.read_to_end(&mut buf))
        .await
        .expect("slow client is cut off");
    let text = String::from_utf8_lossy(&buf);
    assert!(
        closed.is_err() || text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(
        site.get("test.test", "/headers").await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn plain_http_redirects_to_https() {
    let world = World::new();
    let (_, fp) = world.agent_key("home");
    let edge = burrow_edge::Edge::bind(edge_config(&format!(
        "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n[[route]]\nhost = \"test.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n",
        world.path("state")
    )))
    .await
    .unwrap();
    let http_addr = edge.http_addr().unwrap();
    let https_port = edge.https_addr().unwrap().port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(edge.run(shutdown.clone()));
    let mut tcp = tokio::net::TcpStream::connect(http_addr).await.unwrap();
    tcp.write_all(b"GET /chat?x=1 HTTP/1.1\r\nHost: test.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = String::new();
    tcp.read_to_string(&mut buf).await.unwrap();
    assert!(buf.starts_with("HTTP/1.1 308"), "{buf}");
    assert!(
        buf.to_ascii_lowercase().contains(&format!(
            "location: https://test.test:{https_port}/chat?x=1"
        )),
        "{buf}"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_route_idle_timeout_cuts_a_silent_stream_and_only_that() {
    let (site, _) = standard_site().await;
    let resp = site.get("idle.test", "/stall").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    assert_eq!(
        &next_chunk(&mut body).await.unwrap()[..],
        b"data: first\n\n"
    );
    // Nothing moves for 300 ms: the edge ends the stream.
    let end = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the stream was cut");
    assert!(!matches!(end, Some(Ok(_))), "{end:?}");
    // Without an idle timeout the same silence is fine: the stream stays.
    let resp = site.get("test.test", "/stall").await;
    let mut body = resp.into_body();
    next_chunk(&mut body).await.unwrap();
    let waited = tokio::time::timeout(std::time::Duration::from_millis(600), body.frame()).await;
    assert!(
        waited.is_err(),
        "a route without idle_timeout kept the silent stream open"
    );
}

/// What the hand-written keep-alive service below has seen.
#[derive(Default)]
struct KeepAliveLog {
    /// Connections that carried a request.
    connections: std::sync::atomic::AtomicUsize,
    /// (connection number, method, path) of every request read in full.
    requests: std::sync::Mutex<Vec<(usize, String, String)>>,
}

/// An HTTP/1.1 service that keeps connections open between requests, and
/// closes the connection without an answer the first time it reads a path
/// starting with `/close` (the first two times for `/close-twice`): its
/// keep-alive timeout firing just as a request arrives. Later requests for
/// that path are answered.
async fn keep_alive_service() -> (std::net::SocketAddr, std::sync::Arc<KeepAliveLog>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = std::sync::Arc::new(KeepAliveLog::default());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let state = log.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let (log, seen) = (state.clone(), seen.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Numbered at the first request: the agent's readiness
                // probes connect too, and carry none.
                let mut number = None;
                loop {
                    // One request head, then its Content-Length body.
                    let head_end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + length {
                        let mut chunk = [0u8; 4096];
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    }
                    let mut words = head.split_whitespace();
                    let method = words.next().unwrap().to_uppercase();
                    let path = words.next().unwrap().to_owned();
                    buf.drain(..head_end + length);
                    let n = *number.get_or_insert_with(|| {
                        1 + log
                            .connections
                            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                    });
                    log.requests.lock().unwrap().push((n, method, path.clone()));
                    let closes = match path.as_str() {
                        p if p.starts_with("/close-twice") => 2,
                        p if p.starts_with("/close") => 1,
                        _ => 0,
                    };
                    let times = {
                        let mut seen = seen.lock().unwrap();
                        let n = seen.entry(path).or_insert(0);
                        *n += 1;
                        *n
                    };
                    if times <= closes {
                        return; // closes the connection, no answer
                    }
                    let body = format!("conn {n}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if tcp.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn service_connections_are_reused_and_a_closing_one_loses_no_safe_request() {
    let (addr, log) = keep_alive_service().await;
    let site = site(
        "",
        "[[route]]\nhost = \"ka.test\"\nagent = \"home\"\nservice = \"ka\"\nauth = \"none\"\n",
        &[("ka", format!("http://{addr}"))],
    )
    .await;
    let get = |path: &'static str| request("GET", "ka.test", path, empty());
    let connections = || log.connections.load(std::sync::atomic::Ordering::SeqCst);

    // Sequential requests, from two client connections, share one service
    // connection: no stream open or TCP connect per request.
    let mut a = site.h1("ka.test").await;
    for _ in 0..4 {
        let resp = a.send_request(get("/a")).await.unwrap();
        assert_eq!(body_text(resp).await, "conn 1");
    }
    let mut b = site.h2("ka.test").await;
    let resp = b.send_request(h2_get("ka.test", "/b")).await.unwrap();
    assert_eq!(body_text(resp).await, "conn 1", "another client reuses it");
    assert_eq!(connections(), 1);

    // The service closes the reused connection as a GET arrives: the GET
    // is sent again on a new connection and the client never notices.
    let resp = a.send_request(get("/close-get")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(body_text(resp).await, "conn 2");

    // A POST is not safe to send twice: the client gets a 502, and the
    // service saw it once.
    let post = request(
        "POST",
        "ka.test",
        "/close-post",
        http_body_util::Full::new(Bytes::from_static(b"order #1")).boxed(),
    );
    let resp = a.send_request(post).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let resp = a.send_request(get("/after")).await.unwrap();
    assert_eq!(body_text(resp).await, "conn 3");

    // A safe request is sent again once, not round the whole pool.
    let resp = a.send_request(get("/close-twice")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);

    let requests = log.requests.lock().unwrap().clone();
    let count = |p: &str| requests.iter().filter(|(_, _, path)| path == p).count();
    assert_eq!(count("/close-get"), 2, "{requests:?}");
    assert_eq!(count("/close-post"), 1, "{requests:?}");
    assert_eq!(count("/close-twice"), 2, "{requests:?}");
    assert_eq!(connections(), 4, "{requests:?}");
}

/// Requests that arrive while their agent is away (edge restarted, agent
/// redialling) wait for it up to `[edge] agent_wait`, then go through;
/// with `agent_wait = "0s"` they get 502 at once.
#[tokio::test]
async fn a_request_waits_for_its_agent_while_it_is_away() {
    let (test_addr, _up) = upstream().await;
    let site = site(
        "agent_wait = \"2s\"",
        ROUTES,
        &[("test", format!("http://{test_addr}"))],
    )
    .await;
    let registry = site.edge.registry.clone();
    let home = burrow_proto::Name::new("home").unwrap();
    // The agent goes away.
    site.agent.shutdown.cancel();
    let mut changes = registry.subscribe();
    tokio::time::timeout(WAIT, changes.wait_for(|_| registry.get(&home).is_none()))
        .await
        .expect("the edge sees the agent leave")
        .unwrap();

    // The agent has been away longer than agent_wait (an edge counting
    // the wait from the disconnect would answer 502 now)...
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    // ...and a request arrives and waits (order of events: it is counted
    // as waiting before the agent comes back).
    let mut client = site.h1("test.test").await;
    let request = tokio::spawn(async move {
        client
            .send_request(request("GET", "test.test", "/headers", empty()))
            .await
            .unwrap()
            .status()
    });
    tokio::time::timeout(WAIT, async {
        while registry.waiting() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the request waits for the agent");
    assert!(!request.is_finished());

    // The agent comes back: the request goes through.
    let key = site.world.path("home.key");
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {key:?}\n\n\
         [[service]]\nname = \"test\"\nurl = \"http://{test_addr}\"\n",
        site.edge.tunnel, site.edge.fingerprint
    )));
    agent.connected().await;
    let status = tokio::time::timeout(WAIT, request)
        .await
        .expect("an answer once the agent is back")
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(registry.waiting(), 0);

    // With agent_wait = 0, an away agent is 502 at once.
    let quick = site_no_wait(test_addr).await;
    quick.agent.shutdown.cancel();
    let registry = quick.edge.registry.clone();
    let mut changes = registry.subscribe();
    tokio::time::timeout(WAIT, changes.wait_for(|_| registry.get(&home).is_none()))
        .await
        .unwrap()
        .unwrap();
    let resp = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        quick.get("test.test", "/headers"),
    )
    .await
    .expect("no wait with agent_wait = 0");
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
}

async fn site_no_wait(test_addr: std::net::SocketAddr) -> Site {
    site(
        "agent_wait = \"0s\"",
        ROUTES,
        &[("test", format!("http://{test_addr}"))],
    )
    .await
}
