//! Wake-aware routing end to end, against the "sleeping PC" stand-in
//! (tests/common/standin.rs): it starts its Ollama-shaped HTTP server only
//! after a valid magic packet for its MAC and a simulated boot; until then
//! connects to it are refused, as with a PC that is off.
//!
//! Timings are printed (first request to forwarded answer, minus the
//! simulated boot) for the issue's closing note; assertions are about the
//! order of events, never about wall-clock speed.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::standin::*;
use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, COOKIE, RETRY_AFTER, SET_COOKIE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UdpSocket};

use burrow_agent::monitor::WakeOutcome;
use burrow_edge::tunnel::ServiceReport;
use burrow_proto::{Name, ServiceState};

/// A MAC the stand-in does not answer to.
const OTHER_MAC_TEXT: &str = "52:54:00:aa:bb:cc";
/// The stand-in's simulated boot: from the first valid magic packet to
/// its HTTP port accepting connections.
const BOOT: Duration = Duration::from_millis(600);
const HOST: &str = "ollama.test";
const PASSWORD: &str = "wonderland";

// ---------------------------------------------------------------------------
// The edge, the agent and the client side.

struct Bed {
    site: Site,
    agent: AgentExtras,
    stand_in: StandIn,
}

/// An edge with one basic-auth route to "ollama", an agent whose ollama
/// service is the stand-in (waking it with `mac`), and a `[[lan]]` proxy.
async fn bed(stand_in: StandIn, hold: &str, mac: &str, probe_interval: &str) -> Bed {
    bed_with_limits(stand_in, hold, mac, probe_interval, "").await
}

/// Like [`bed`], with `limits` as the edge's `[limits]` table.
async fn bed_with_limits(
    stand_in: StandIn,
    hold: &str,
    mac: &str,
    probe_interval: &str,
    limits: &str,
) -> Bed {
    bed_with_wake(stand_in, (hold, mac, probe_interval), limits, "").await
}

/// Like [`bed_with_limits`], with `wake_extra` added to `[service.wake]`.
async fn bed_with_wake(
    stand_in: StandIn,
    (hold, mac, probe_interval): (&str, &str, &str),
    limits: &str,
    wake_extra: &str,
) -> Bed {
    let routes = format!(
        r#"
[limits]
{limits}

[[user]]
name = "alice"
password = "{hash}"

[[route]]
host = "{HOST}"
agent = "home"
service = "ollama"
auth = "basic"
users = ["alice"]
public_paths = ["/manifest.json"]
[route.wake]
hold = "{hold}"
"#,
        hash = cheap_hash(PASSWORD),
    );
    let agent_tail = format!(
        r#"
[[service]]
name = "ollama"
url = "http://{http}"
health = "/api/version"
probe_interval = "{probe_interval}"
[service.wake]
mac = "{mac}"
broadcast = "{udp}"
{wake_extra}

[[lan]]
listen = "127.0.0.1:0"
service = "ollama"
"#,
        http = stand_in.http,
        udp = stand_in.udp,
    );
    let (site, agent) = site_toml("", &routes, &agent_tail).await;
    let bed = Bed {
        site,
        agent,
        stand_in,
    };
    // The edge has the agent's first probe result before any request.
    bed.wait_edge("a probed state", |r| r.state != ServiceState::Unknown)
        .await;
    bed
}

fn ollama_name() -> Name {
    Name::new("ollama").unwrap()
}

impl Bed {
    fn report(&self) -> Option<ServiceReport> {
        self.site
            .edge
            .registry
            .service_report(&Name::new("home").unwrap(), &ollama_name())
    }

    /// Waits for the edge's view of the service to satisfy `pred`.
    async fn wait_edge(&self, what: &str, pred: impl Fn(&ServiceReport) -> bool) -> ServiceReport {
        let mut changes = self.site.edge.registry.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                changes.borrow_and_update();
                if let Some(r) = self.report().filter(|r| pred(r)) {
                    return r;
                }
                changes.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("the edge never saw {what}; last {:?}", self.report()))
    }

    /// Wake episodes the agent started for the service.
    fn agent_wakes(&self) -> u64 {
        self.agent
            .services
            .borrow()
            .iter()
            .find(|v| v.name == ollama_name())
            .unwrap()
            .wakes
    }
}

/// A chat request tagged `tag`, with a body padded to about `size` bytes;
/// returns it with the body's length and SHA-256.
fn chat(tag: &str, size: usize) -> (Request<TestBody>, usize, String) {
    let mut pad = vec![0u8; size];
    fill_pseudo_random(size as u64 + 7, &mut pad);
    let pad: String = pad.iter().map(|b| char::from(b'a' + b % 26)).collect();
    let body = format!(
        "{{\"model\":\"llama3\",\"tag\":\"{tag}\",\"messages\":[{{\"role\":\"user\",\"content\":\"{pad}\"}}]}}"
    );
    let len = body.len();
    let sha = hex(&sha256(body.as_bytes()));
    let req = Request::builder()
        .method("POST")
        .uri("/api/chat")
        .header(http::header::HOST, HOST)
        .header(AUTHORIZATION, basic("alice", PASSWORD))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap();
    (req, len, sha)
}

/// Reads an NDJSON chat answer; checks five tokens, then the last line's
/// account of the request body; returns the number of lines.
async fn check_chat(resp: Response<Incoming>, len: usize, sha: &str) -> usize {
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[CONTENT_TYPE], "application/x-ndjson");
    let text = body_text(resp).await;
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{text}");
    for (i, l) in lines[..5].iter().enumerate() {
        assert_eq!(l["message"]["content"], format!("token {i}"));
    }
    let last = &lines[5];
    assert_eq!(last["done"], true);
    assert_eq!(last["body_len"].as_u64(), Some(len as u64), "body length");
    assert_eq!(last["body_sha256"], sha, "body hash");
    lines.len()
}

fn print_timing(what: &str, first_request_to_answer: Duration) {
    eprintln!(
        "wake timing, {what}: first request to forwarded answer {first_request_to_answer:?}; \
         minus the simulated boot ({BOOT:?}): {:?}",
        first_request_to_answer.saturating_sub(BOOT)
    );
}

// ---------------------------------------------------------------------------
// The scenarios.

#[tokio::test]
async fn a_held_chat_completes_after_the_wake_with_its_body_intact() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Asleep).await;
    let mut bed = bed(stand_in, "30s", MAC_TEXT, "5s").await;
    assert_eq!(bed.report().unwrap().state, ServiceState::Down);

    let mut client = bed.site.h1(HOST).await;
    let (req, len, sha) = chat("held", 256 * 1024);
    let sent = Instant::now();
    let resp = client.send_request(req).await.unwrap();
    let answered = sent.elapsed();
    // The answer came from a machine that was asleep when it was asked.
    bed.stand_in.wait_power(Power::Awake).await;
    assert_eq!(bed.stand_in.boots(), 1);
    check_chat(resp, len, &sha).await;

    let report = bed.report().unwrap();
    assert_eq!(report.state, ServiceState::Up);
    assert_eq!(report.wake_requests, 1);
    assert_eq!(report.held, 0);
    let edge_took = report.last_wake.expect("the edge recorded the wake").took;
    assert_eq!(bed.agent_wakes(), 1);
    // The agent counts from its first magic packet to the passing probe,
    // which cannot come before the boot is over.
    let view = bed.agent.services.borrow()[0].clone();
    let Some(WakeOutcome::Woke { took }) = view.last_wake.unwrap().outcome else {
        panic!("the agent recorded no wake: {view:?}")
    };
    assert!(took >= BOOT, "the agent says the wake took {took:?}");
    eprintln!(
        "wake timing, held POST /api/chat: agent says the wake took {took:?}, edge {edge_took:?}"
    );
    print_timing("held POST /api/chat", answered);
}

#[tokio::test]
async fn a_browser_gets_the_waiting_page_first_then_the_app() {
    // The test ends the boot once the page has seen the wake under way.
    let stand_in = StandIn::start(Boot::WhenReleased, Power::Asleep).await;
    let mut bed = bed(stand_in, "30s", MAC_TEXT, "5s").await;
    let nav = |cookie: Option<&str>| {
        let b = Request::builder()
            .uri("/")
            .header(http::header::HOST, HOST)
            .header(ACCEPT, "text/html,application/xhtml+xml,*/*;q=0.8");
        let b = match cookie {
            Some(c) => b.header(COOKIE, c),
            None => b.header(AUTHORIZATION, basic("alice", PASSWORD)),
        };
        b.body(empty()).unwrap()
    };

    let resp = bed
        .site
        .h1(HOST)
        .await
        .send_request(nav(None))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(RETRY_AFTER));
    assert!(
        resp.headers()[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let cookie = resp.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let page = body_text(resp).await;
    assert!(page.contains("ollama.test is waking up"), "{page}");
    assert!(page.contains("/.burrow/wake-status"), "{page}");

    // What the page's script does: poll the status with the session
    // cookie until ready. Between polls, wait for the edge's news.
    let mut changes = bed.site.edge.registry.subscribe();
    let mut states = Vec::new();
    let mut client = bed.site.h1(HOST).await;
    let mut released = None;
    loop {
        changes.borrow_and_update();
        let status = Request::builder()
            .uri("/.burrow/wake-status")
            .header(http::header::HOST, HOST)
            .header(COOKIE, &cookie)
            .body(empty())
            .unwrap();
        let resp = client.send_request(status).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let s: serde_json::Value = serde_json::from_str(&body_text(resp).await).unwrap();
        states.push(s["state"].as_str().unwrap().to_owned());
        if s["ready"] == true {
            break;
        }
        if s["state"] == "waking" {
            assert!(s["waking_ms"].is_u64(), "{s}");
            if released.is_none() {
                bed.stand_in.wait_power(Power::Booting).await;
                bed.stand_in.finish_boot();
                released = Some(Instant::now());
            }
        }
        tokio::time::timeout(WAIT, changes.changed())
            .await
            .expect("news from the edge in time")
            .unwrap();
    }
    // Down until the agent's news arrives, waking, then up.
    let waking = states.iter().position(|s| s == "waking").unwrap();
    assert!(states[..waking].iter().all(|s| s == "down"), "{states:?}");
    assert_eq!(states.last().map(String::as_str), Some("up"), "{states:?}");

    // The reload that follows gets the app.
    let resp = client.send_request(nav(Some(&cookie))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_text(resp).await.contains("<title>Open WebUI</title>"));
    let released = released.expect("the page saw the wake under way");
    eprintln!(
        "wake timing, browser navigation: machine up to app page {:?}",
        released.elapsed()
    );
    assert_eq!(bed.stand_in.boots(), 1);
    assert_eq!(bed.report().unwrap().wake_requests, 1);
}

#[tokio::test]
async fn twenty_requests_during_a_wake_cause_one_wake_and_proceed_in_arrival_order() {
    let stand_in = StandIn::start(Boot::WhenReleased, Power::Asleep).await;
    let mut bed = bed(stand_in, "60s", MAC_TEXT, "5s").await;
    // One HTTP/2 connection carries all twenty, as a browser tab would.
    let client = bed.site.h2(HOST).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (req, len, sha) = chat(&format!("req-{i:02}"), 2048 + i * 100);
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let resp = c.send_request(req).await.unwrap();
            let at = Instant::now();
            check_chat(resp, len, &sha).await;
            at
        }));
        // The next request goes only once this one is held, so the order
        // they arrived in is known.
        bed.wait_edge(&format!("{} held", i + 1), |r| r.held == i + 1)
            .await;
    }
    bed.stand_in.wait_power(Power::Booting).await;
    assert_eq!(bed.stand_in.boots(), 1);
    bed.stand_in.finish_boot();
    let released = Instant::now();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }

    let report = bed.report().unwrap();
    assert_eq!(report.wake_requests, 1, "the edge asked once");
    assert_eq!(report.held, 0);
    assert_eq!(bed.agent_wakes(), 1, "the agent woke once");
    assert_eq!(bed.stand_in.boots(), 1, "the PC booted once");
    let mut chats = bed.stand_in.shared.chats.lock().unwrap().clone();
    chats.sort();
    let tags: Vec<String> = chats.into_iter().map(|(_, t)| t).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("req-{i:02}")).collect();
    assert_eq!(
        tags, expected,
        "the service saw the connections in arrival order"
    );
    eprintln!(
        "wake timing, 20 held requests: queued over {:?}; machine up to first answer {:?}, to last {:?}",
        released - started,
        answers
            .iter()
            .min()
            .unwrap()
            .saturating_duration_since(released),
        answers
            .iter()
            .max()
            .unwrap()
            .saturating_duration_since(released),
    );
}

#[tokio::test]
async fn held_requests_beyond_the_caps_get_503_at_once_and_the_held_go_on_in_order() {
    let stand_in = StandIn::start(Boot::WhenReleased, Power::Asleep).await;
    let limits = "held_per_client = 3\nheld_per_service = 5";
    let mut bed = bed_with_limits(stand_in, "60s", MAC_TEXT, "5s", limits).await;
    let mut held = Vec::new();
    /// Sends a chat from `source`; the answer comes through the handle.
    async fn send(
        site: &Site,
        source: &str,
        tag: &str,
    ) -> tokio::task::JoinHandle<(Response<Incoming>, usize, String)> {
        let mut client = site.h1_from(source.parse().unwrap(), HOST).await;
        let (req, len, sha) = chat(tag, 512);
        tokio::spawn(async move { (client.send_request(req).await.unwrap(), len, sha) })
    }
    // Three from one client are held, one after the other.
    for i in 0..3 {
        held.push(send(&bed.site, "127.0.0.2", &format!("held-{i}")).await);
        bed.wait_edge(&format!("{} held", i + 1), |r| r.held == i + 1)
            .await;
    }
    // A fourth from the same client is refused at once.
    let answer = tokio::time::timeout(WAIT, send(&bed.site, "127.0.0.2", "over-client").await);
    let (resp, _, _) = answer.await.expect("refused at once").unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(RETRY_AFTER));
    // Two more from another client fill the service's cap...
    for i in 3..5 {
        held.push(send(&bed.site, "127.0.0.3", &format!("held-{i}")).await);
        bed.wait_edge(&format!("{} held", i + 1), |r| r.held == i + 1)
            .await;
    }
    // ...so a third client is refused at once too.
    let answer = tokio::time::timeout(WAIT, send(&bed.site, "127.0.0.4", "over-service").await);
    let (resp, _, _) = answer.await.expect("refused at once").unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key(RETRY_AFTER));
    assert_eq!(bed.report().unwrap().held, 5, "the refused were never held");

    // The PC boots: the held ones go on, in the order they came.
    bed.stand_in.wait_power(Power::Booting).await;
    bed.stand_in.finish_boot();
    for h in held {
        let (resp, len, sha) = h.await.unwrap();
        check_chat(resp, len, &sha).await;
    }
    let mut chats = bed.stand_in.shared.chats.lock().unwrap().clone();
    chats.sort();
    let tags: Vec<String> = chats.into_iter().map(|(_, t)| t).collect();
    let expected: Vec<String> = (0..5).map(|i| format!("held-{i}")).collect();
    assert_eq!(
        tags, expected,
        "released in arrival order, refused never sent"
    );
    assert_eq!(bed.report().unwrap().held, 0);
}

#[tokio::test]
async fn a_websocket_opened_during_a_wake_is_held_then_echoes() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Asleep).await;
    let bed = bed(stand_in, "30s", MAC_TEXT, "5s").await;
    let tls = bed.site.tls(HOST, &[b"http/1.1"]).await;
    let mut req = format!("wss://{HOST}/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert(AUTHORIZATION, basic("alice", PASSWORD).parse().unwrap());
    let sent = Instant::now();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let answered = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..10 {
        let msg = Message::text(format!("token {i}"));
        ws.send(msg.clone()).await.unwrap();
        let back = tokio::time::timeout(WAIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    ws.close(None).await.unwrap();
    assert_eq!(bed.stand_in.boots(), 1);
    assert_eq!(bed.report().unwrap().wake_requests, 1);
    print_timing("held WebSocket upgrade", answered);
}

#[tokio::test]
async fn requests_without_valid_credentials_wake_nothing() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Asleep).await;
    let mut bed = bed(stand_in, "30s", MAC_TEXT, "5s").await;
    let mut client = bed.site.h1(HOST).await;
    let plain = |method: &str, path: &str, auth: Option<String>, accept: &str| {
        let b = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, HOST)
            .header(ACCEPT, accept);
        let b = match auth {
            Some(a) => b.header(AUTHORIZATION, a),
            None => b,
        };
        b.body(empty()).unwrap()
    };
    let cases = [
        (
            plain("POST", "/api/chat", None, "*/*"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            plain("POST", "/api/chat", Some(basic("alice", "wrong")), "*/*"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            plain(
                "GET",
                "/api/version",
                Some(basic("mallory", PASSWORD)),
                "*/*",
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            plain("GET", "/", None, "text/html"),
            StatusCode::UNAUTHORIZED,
        ),
        (
            plain("GET", "/.burrow/wake-status", None, "*/*"),
            StatusCode::UNAUTHORIZED,
        ),
        // A public path passes without credentials, so it may not wake.
        (
            plain("GET", "/manifest.json", None, "*/*"),
            StatusCode::SERVICE_UNAVAILABLE,
        ),
    ];
    for (req, want) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let resp = client.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "{what}");
        body_text(resp).await;
    }
    let report = bed.report().unwrap();
    assert_eq!(report.wake_requests, 0, "no wake request left the edge");
    assert_eq!(report.state, ServiceState::Down);
    assert_eq!(bed.agent_wakes(), 0);
    assert_eq!(
        bed.stand_in.valid_packets() + bed.stand_in.ignored_packets(),
        0
    );

    // The same request with credentials wakes it.
    let resp = client
        .send_request(plain(
            "GET",
            "/api/version",
            Some(basic("alice", PASSWORD)),
            "application/json",
        ))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_text(resp).await.contains("standin"));
    bed.stand_in.wait_power(Power::Awake).await;
    assert_eq!(bed.report().unwrap().wake_requests, 1);
    assert_eq!(bed.stand_in.boots(), 1);
}

#[tokio::test]
async fn probe_up_but_connection_refused_wakes_instead_of_502() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Awake).await;
    // Probes an hour apart: the agent believes "up" when the PC sleeps.
    let mut bed = bed(stand_in, "30s", MAC_TEXT, "1h").await;
    assert_eq!(bed.report().unwrap().state, ServiceState::Up);
    bed.stand_in.sleep().await;

    let mut client = bed.site.h1(HOST).await;
    let (req, len, sha) = chat("after-sleep", 64 * 1024);
    let sent = Instant::now();
    let resp = client.send_request(req).await.unwrap();
    let answered = sent.elapsed();
    check_chat(resp, len, &sha).await;
    assert_eq!(bed.stand_in.boots(), 1, "woken from its sleep");
    let report = bed.report().unwrap();
    assert_eq!(report.wake_requests, 1);
    assert!(report.last_wake.is_some());
    print_timing("connection refused on a service probed up", answered);
}

#[tokio::test]
async fn a_suspended_pc_whose_connects_hang_is_woken_instead_of_a_gateway_error() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Awake).await;
    let mut bed = bed(stand_in, "30s", MAC_TEXT, "1h").await;
    assert_eq!(bed.report().unwrap().state, ServiceState::Up);
    bed.stand_in.freeze().await;
    // The stand-in really hangs connects now (no refusal, no answer).
    let hung = tokio::time::timeout(
        Duration::from_millis(200),
        TcpStream::connect(bed.stand_in.http),
    )
    .await;
    assert!(
        hung.is_err(),
        "a connect to the frozen PC returned {hung:?}"
    );

    let mut client = bed.site.h1(HOST).await;
    let (req, len, sha) = chat("after-suspend", 16 * 1024);
    let sent = Instant::now();
    let resp = client.send_request(req).await.unwrap();
    let answered = sent.elapsed();
    check_chat(resp, len, &sha).await;
    assert_eq!(bed.stand_in.boots(), 1);
    assert_eq!(bed.report().unwrap().wake_requests, 1);
    eprintln!(
        "wake timing, suspended PC (connects hang; the agent gives up after {:?}): \
         first request to forwarded answer {answered:?}; minus the boot and the connect \
         timeout: {:?}",
        burrow_agent::forward::WAKEABLE_CONNECT_TIMEOUT,
        answered.saturating_sub(BOOT + burrow_agent::forward::WAKEABLE_CONNECT_TIMEOUT)
    );
}

#[tokio::test]
async fn a_machine_that_never_wakes_gets_503_with_retry_after_after_hold() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Asleep).await;
    // The agent wakes another MAC: the stand-in ignores its packets.
    let mut bed = bed(stand_in, "1s", OTHER_MAC_TEXT, "5s").await;
    let mut client = bed.site.h1(HOST).await;
    let (req, _, _) = chat("never", 1024);
    let sent = Instant::now();
    let resp = client.send_request(req).await.unwrap();
    let waited = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[RETRY_AFTER], "10");
    assert!(
        waited >= Duration::from_secs(1),
        "held for the whole hold, answered after {waited:?}"
    );
    // The agent did try: its packets reached the stand-in, which ignored them.
    bed.stand_in.wait_packets(1).await;
    assert!(bed.stand_in.ignored_packets() >= 1);
    assert_eq!(bed.stand_in.valid_packets(), 0);
    assert_eq!(*bed.stand_in.power.borrow(), Power::Asleep);
    // The agent keeps trying (until its own wake timeout), the edge knows.
    bed.wait_edge("waking", |r| r.state == ServiceState::Waking)
        .await;
}

#[tokio::test]
async fn a_plain_client_on_the_lan_proxy_wakes_the_stand_in() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Asleep).await;
    let mut bed = bed(stand_in, "30s", MAC_TEXT, "5s").await;
    let lan = bed.agent.lan[0];
    let tcp = TcpStream::connect(lan).await.unwrap();
    let (mut client, conn) =
        hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let sent = Instant::now();
    let resp = client
        .send_request(
            Request::builder()
                .uri("/api/version")
                .header(http::header::HOST, "localhost:11434")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let answered = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(body_text(resp).await.contains("0.9.0-standin"));
    bed.stand_in.wait_power(Power::Awake).await;
    assert_eq!(bed.stand_in.boots(), 1);
    assert_eq!(bed.agent_wakes(), 1);
    // Nothing went through the edge.
    assert_eq!(bed.report().unwrap().wake_requests, 0);
    // The same connection streams a chat.
    let (mut req, len, sha) = chat("lan", 8 * 1024);
    req.headers_mut().remove(AUTHORIZATION);
    check_chat(client.send_request(req).await.unwrap(), len, &sha).await;
    print_timing("[[lan]] proxy GET /api/version", answered);
}

#[tokio::test]
async fn the_stand_in_ignores_malformed_packets_and_other_macs() {
    let mut stand_in = StandIn::start(Boot::WhenReleased, Power::Asleep).await;
    let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let valid = burrow_agent::wake::magic_packet(MAC, None);
    let mut bad_sync = valid.clone();
    bad_sync[0] = 0xfe;
    let other = burrow_agent::wake::magic_packet([1, 2, 3, 4, 5, 6], None);
    for p in [&valid[..101], &bad_sync[..], &other[..], b"hello"] {
        tx.send_to(p, stand_in.udp).await.unwrap();
    }
    stand_in.wait_packets(4).await;
    assert_eq!(stand_in.ignored_packets(), 4);
    assert_eq!(*stand_in.power.borrow(), Power::Asleep);
    assert!(
        TcpStream::connect(stand_in.http).await.is_err(),
        "refused while asleep"
    );

    tx.send_to(&valid, stand_in.udp).await.unwrap();
    stand_in.wait_power(Power::Booting).await;
    stand_in.finish_boot();
    stand_in.wait_power(Power::Awake).await;
    let tcp = TcpStream::connect(stand_in.http).await.unwrap();
    let (mut c, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = c
        .send_request(request("GET", "pc", "/api/version", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(stand_in.boots(), 1);
}

#[test]
fn burrow_wake_sends_one_magic_packet() {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let to = rx.local_addr().unwrap().to_string();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(burrow_bin())
            .args(["wake", "--mac", "52-54-00-12-34-56", "--broadcast", &to])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let said = run(&[]);
    assert!(said.contains("52:54:00:12:34:56"), "{said}");
    let mut buf = [0u8; 200];
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(n, 102);
    assert!(is_magic_packet_for(&buf[..n], MAC));
    assert_eq!(&buf[..n], &burrow_agent::wake::magic_packet(MAC, None)[..]);

    run(&["--password", "01:02:03:04:05:06"]);
    let n = rx.recv(&mut buf).unwrap();
    assert_eq!(n, 108);
    assert_eq!(&buf[102..n], &[1, 2, 3, 4, 5, 6]);

    let out = std::process::Command::new(burrow_bin())
        .args(["wake", "--mac", "not-a-mac"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("six hex pairs"));
}

/// A GET on the `[[lan]]` proxy on a new connection, as Open WebUI's
/// client makes them: status, the cache header, body.
async fn lan_get(lan: std::net::SocketAddr, path: &str) -> (StatusCode, Option<String>, String) {
    let mut client = h1_over(TcpStream::connect(lan).await.unwrap()).await;
    let resp = tokio::time::timeout(
        WAIT,
        client.send_request(
            Request::builder()
                .uri(path)
                .header(http::header::HOST, "localhost:11434")
                .body(empty())
                .unwrap(),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    let cache = resp
        .headers()
        .get("x-burrow-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    (resp.status(), cache, body_text(resp).await)
}

/// Open WebUI lists models (`GET /api/tags`, `/api/ps`, `/api/version`
/// to Ollama through the `[[lan]]` proxy, or a route) a few seconds after
/// its page loads. With `cached`, that listing is answered from the last
/// good answers while the PC sleeps and sends no magic packet; a chat wakes
/// it.
#[tokio::test]
async fn model_listing_on_the_lan_proxy_and_a_route_is_answered_from_cache_and_only_a_chat_wakes() {
    let stand_in = StandIn::start(Boot::After(BOOT), Power::Awake).await;
    // /api/tags last: once the stand-in has served it, the agent has
    // fetched all three.
    let mut bed = bed_with_wake(
        stand_in,
        ("30s", MAC_TEXT, "200ms"),
        "",
        r#"cached = ["/api/version", "/api/ps", "/api/tags"]"#,
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while bed
        .stand_in
        .shared
        .listings
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the agent never fetched /api/tags"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    bed.stand_in.sleep().await;
    bed.wait_edge("down", |r| r.state == ServiceState::Down)
        .await;
    let lan = bed.agent.lan[0];
    for path in ["/api/tags", "/api/ps", "/api/version"] {
        let (status, cache, body) = lan_get(lan, path).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(cache.as_deref(), Some("asleep"), "{path}");
        if path == "/api/tags" {
            assert_eq!(body, TAGS);
        }
    }
    // The same listing through the edge's route (Open WebUI's own
    // backend, or an app on the phone): the agent answers it too.
    for path in ["/api/tags", "/api/ps"] {
        let mut client = bed.site.h1(HOST).await;
        let resp = client
            .send_request(
                Request::builder()
                    .uri(path)
                    .header(http::header::HOST, HOST)
                    .header(AUTHORIZATION, basic("alice", PASSWORD))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
        assert_eq!(resp.headers()["x-burrow-cache"], "asleep", "{path}");
        let body = body_text(resp).await;
        if path == "/api/tags" {
            assert_eq!(body, TAGS);
        }
    }
    assert_eq!(
        bed.report().unwrap().wake_requests,
        0,
        "the edge asked for no wake"
    );
    assert_eq!(
        bed.stand_in.valid_packets(),
        0,
        "no magic packet for a listing"
    );
    assert_eq!(bed.agent_wakes(), 0);
    assert_eq!(*bed.stand_in.power.borrow(), Power::Asleep);

    // A chat is not in the cache: it wakes the PC and is answered by it.
    let mut client = h1_over(TcpStream::connect(lan).await.unwrap()).await;
    let (mut req, len, sha) = chat("lan-cache", 4 * 1024);
    req.headers_mut().remove(AUTHORIZATION);
    check_chat(client.send_request(req).await.unwrap(), len, &sha).await;
    assert!(bed.stand_in.valid_packets() >= 1);
    assert_eq!(bed.agent_wakes(), 1);
    bed.stand_in.wait_power(Power::Awake).await;
}
