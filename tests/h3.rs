//! HTTP/3 end to end with a real client: Python's `aioquic` (PyPI; CI
//! installs it), driven through `tests/h3/client.py`, against an edge with
//! `[edge] http3 = true` whose agent dials the same UDP port. The client
//! reports each response event as it happens, so the tests can order what
//! the service sends against what the client has received.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use base64::Engine;
use common::web::*;
use common::*;
use serde_json::{Value, json};

/// A running `tests/h3/client.py` and the events it printed.
struct H3Client {
    child: Child,
    events: tokio::sync::mpsc::UnboundedReceiver<Value>,
}

impl H3Client {
    /// Starts the client on `input` (see the script's header), connecting
    /// to `site`'s UDP port for `host`, verifying the edge's certificate.
    fn start(site: &Site, host: &str, mut input: Value) -> Self {
        input["connect"] = json!(site.edge.tunnel.to_string());
        input["server_name"] = json!(host);
        input["cafile"] = json!(site.cert_path());
        if input.get("timeout").is_none() {
            input["timeout"] = json!(WAIT.as_secs());
        }
        let mut child = Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/h3/client.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs (CI installs aioquic)");
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{input}").unwrap();
        drop(stdin);
        let stdout = child.stdout.take().unwrap();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| json!({ "event": "unparsed", "line": line }));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self { child, events }
    }

    /// The next event; fails on the client's own errors.
    async fn next(&mut self) -> Value {
        let v = tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event from the HTTP/3 client in time")
            .expect("the HTTP/3 client printed more (is aioquic installed? `python3 -m pip install aioquic`)");
        assert_ne!(v["event"], "error", "the HTTP/3 client failed: {v}");
        assert_ne!(v["event"], "unparsed", "{v}");
        v
    }

    /// Events up to and including the first `event`.
    async fn until(&mut self, event: &str) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.next().await;
            let done = v["event"] == event;
            seen.push(v);
            if done {
                return seen;
            }
        }
    }

    /// Every event up to "done", then the client's exit.
    async fn finish(mut self) -> Vec<Value> {
        let events = self.until("done").await;
        let status = self.child.wait().unwrap();
        assert!(status.success(), "client exit: {status}");
        events
    }
}

impl Drop for H3Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find<'a>(events: &'a [Value], event: &str, index: u64) -> &'a Value {
    events
        .iter()
        .find(|e| e["event"] == event && e["index"] == index)
        .unwrap_or_else(|| panic!("no {event} for request {index} in {events:?}"))
}

fn header<'a>(event: &'a Value, name: &str) -> Option<&'a str> {
    event["headers"]
        .as_array()?
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

fn get(path: &str) -> Value {
    json!({ "method": "GET", "path": path, "headers": [] })
}

/// A site with HTTP/3 on and one basic-auth route to the test upstream.
async fn h3_site() -> (Site, Arc<Upstream>) {
    let (addr, up) = upstream().await;
    let routes = format!(
        "[[user]]\nname = \"alice\"\npassword = \"{}\"\n\n\
         [[route]]\nhost = \"chat.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"basic\"\nusers = [\"alice\"]\n\n\
         [[route]]\nhost = \"open.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n",
        cheap_hash("wonderland")
    );
    let s = site(
        "http3 = true\nadmin = \"127.0.0.1:0\"",
        &routes,
        &[("test", format!("http://{addr}"))],
    )
    .await;
    (s, up)
}

/// The SHA-256 (hex) of `len` bytes of the upstream's block over and over,
/// as `/download?bytes={len}` sends them.
fn download_sha256(up: &Upstream, len: usize) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = len;
    while left > 0 {
        let n = left.min(up.block.len());
        ctx.update(&up.block[..n]);
        left -= n;
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_and_session_cookie_over_http3_and_alt_svc_over_tcp() {
    let (site, _up) = h3_site().await;

    // HTTP/1.1 and HTTP/2 answers point browsers at the UDP port.
    let r = site.get("open.test", "/headers").await;
    let alt_svc = format!("h3=\":{}\"; ma=86400", site.edge.tunnel.port());
    assert_eq!(r.headers()["alt-svc"], alt_svc.as_str());

    let form = "user=alice&password=wonderland&next=%2Fheaders";
    let client = H3Client::start(
        &site,
        "chat.test",
        json!({ "requests": [
            { "method": "GET", "path": "/", "headers": [["accept", "text/html"]] },
            { "method": "GET", "path": "/headers", "headers": [["accept", "application/json"]] },
            { "method": "POST", "path": "/.burrow/login",
              "headers": [["content-type", "application/x-www-form-urlencoded"]],
              "body_b64": base64::engine::general_purpose::STANDARD.encode(form) },
        ]}),
    );
    let events = client.finish().await;
    assert_eq!(events[0]["event"], "connected");
    assert_eq!(events[0]["alpn"], "h3");
    // No credentials: the browser gets the login page, an API client a
    // challenge; the same gate as over TCP.
    let page = find(&events, "headers", 0);
    assert_eq!(page["status"], 401, "{page}");
    assert!(
        header(page, "content-type")
            .unwrap()
            .starts_with("text/html")
    );
    let api = find(&events, "headers", 1);
    assert_eq!(api["status"], 401);
    assert!(
        header(api, "www-authenticate")
            .unwrap()
            .starts_with("Basic")
    );
    let login = find(&events, "headers", 2);
    assert_eq!(login["status"], 303, "{login}");
    assert_eq!(header(login, "location"), Some("/headers"));
    let cookie = header(login, "set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("Secure"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().unwrap().to_owned();
    for i in 0..3 {
        assert_eq!(find(&events, "end", i)["how"], "fin");
    }

    // The cookie lets the next connection through to the service, which
    // sees the client's address and never the edge's cookie.
    let client = H3Client::start(
        &site,
        "chat.test",
        json!({ "requests": [
            { "method": "GET", "path": "/headers", "headers": [["cookie", cookie]] },
        ]}),
    );
    let events = client.finish().await;
    assert_eq!(find(&events, "headers", 0)["status"], 200);
    assert_eq!(find(&events, "end", 0)["how"], "fin");
    let seen = _up.last_headers.lock().unwrap().clone();
    assert_eq!(seen["x-forwarded-for"], vec!["127.0.0.1".to_owned()]);
    assert_eq!(seen["x-forwarded-proto"], vec!["https".to_owned()]);
    assert!(!seen.contains_key("cookie"), "{seen:?}");
    // The four requests over HTTP/3 are counted as such.
    let (_, _, metrics) = admin_get(site.admin.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("burrow_http3_requests_total 4\n"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_event_reaches_the_http3_client_before_the_service_sends_the_next() {
    let (site, up) = h3_site().await;
    let gate = up.gate();
    let mut client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [{ "method": "GET", "path": "/gated-sse", "headers": [], "stream": true }] }),
    );
    let head = client.until("headers").await;
    let head = head.last().unwrap();
    assert_eq!(head["status"], 200);
    assert_eq!(header(head, "content-type"), Some("text/event-stream"));
    // The service holds every later event until the test opens the gate:
    // the first one can only be here if nothing on the way buffered it.
    let first = client.until("data").await;
    let first = first.last().unwrap();
    assert!(
        first["text"]
            .as_str()
            .unwrap()
            .starts_with("id: 1\ndata: event 1\n\n"),
        "{first}"
    );
    gate.send(()).unwrap();
    let rest = client.finish().await;
    let end = find(&rest, "end", 0);
    assert_eq!(end["how"], "fin", "{end}");
    let all: String = (1..=200)
        .map(|i| format!("id: {i}\ndata: event {i}\n\n"))
        .collect();
    assert_eq!(end["len"], all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_download_and_an_upload_over_http3_arrive_whole_and_end_with_fin() {
    let (site, up) = h3_site().await;
    let len = 64 * 1024 * 1024;
    let mut upload = vec![0u8; 3 * 1024 * 1024 + 17];
    fill_pseudo_random(7, &mut upload);
    let upload_sha: String = sha256(&upload).iter().map(|b| format!("{b:02x}")).collect();
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [
            get(&format!("/download?bytes={len}")),
            { "method": "POST", "path": "/upload", "headers": [], "stream": true,
              "body_b64": base64::engine::general_purpose::STANDARD.encode(&upload) },
        ], "timeout": 120 }),
    );
    let events = client.finish().await;
    let head = find(&events, "headers", 0);
    assert_eq!(head["status"], 200);
    assert_eq!(
        header(head, "content-length"),
        Some(len.to_string().as_str())
    );
    let end = find(&events, "end", 0);
    assert_eq!(end["how"], "fin", "{end}");
    assert_eq!(end["len"], len);
    assert_eq!(end["sha256"], download_sha256(&up, len));
    // The upload went through to the service whole, which hashed it.
    assert_eq!(find(&events, "headers", 1)["status"], 200);
    let said: String = events
        .iter()
        .filter(|e| e["event"] == "data" && e["index"] == 1)
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, format!("{} {upload_sha}", upload.len()));
    assert_eq!(find(&events, "end", 1)["how"], "fin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_refuses_0rtt_early_data_and_serves_the_request_after_the_handshake() {
    let (site, _up) = h3_site().await;
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [get("/headers")], "zero_rtt": true }),
    );
    let events = client.finish().await;
    let resumption = events
        .iter()
        .find(|e| e["event"] == "resumption")
        .unwrap_or_else(|| panic!("{events:?}"));
    // The client came back with the edge's session ticket and offered its
    // request as early data; the edge resumed the session but took none of it.
    assert_eq!(resumption["session_resumed"], true, "{resumption}");
    assert_eq!(resumption["early_data_offered"], true, "{resumption}");
    assert_eq!(resumption["early_data_accepted"], false, "{resumption}");
    // The request was answered once the handshake was done.
    let resumed: Vec<&Value> = events.iter().filter(|e| e["conn"] == 1).collect();
    let head = resumed
        .iter()
        .find(|e| e["event"] == "headers")
        .unwrap_or_else(|| panic!("{resumed:?}"));
    assert_eq!(head["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_carries_on_when_the_clients_udp_port_changes_mid_stream() {
    let (site, up) = h3_site().await;
    let len = 16 * 1024 * 1024;
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [{
            "method": "GET", "path": format!("/download?bytes={len}"), "headers": [],
            "migrate_after_bytes": 1024 * 1024,
        }], "timeout": 60 }),
    );
    let events = client.finish().await;
    let moved = find(&events, "migrated", 0);
    assert_ne!(moved["old_port"], moved["new_port"], "{moved}");
    let end = find(&events, "end", 0);
    assert_eq!(end["how"], "fin", "{end}");
    assert_eq!(end["len"], len);
    assert_eq!(end["sha256"], download_sha256(&up, len));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_the_service_cuts_off_is_reset_not_finished() {
    let (site, _up) = h3_site().await;
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [
            { "method": "GET", "path": "/cut", "headers": [], "stream": true },
            get("/headers"),
        ]}),
    );
    let events = client.finish().await;
    let cut = find(&events, "end", 0);
    // A FIN here would pass a truncated body off as the whole response.
    // (A reset may overtake the head and the first bytes, which QUIC lets
    // the receiver drop.)
    assert_eq!(cut["how"], "reset", "{cut}");
    assert_eq!(cut["code"], 0x102, "H3_INTERNAL_ERROR: {cut}");
    assert!(cut["len"].as_u64().unwrap() < 1 << 20, "{cut}");
    // The connection carries on.
    assert_eq!(find(&events, "end", 1)["how"], "fin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_declaring_a_gigabyte_is_refused_before_it_is_buffered() {
    let (site, _up) = h3_site().await;
    // HEADERS (type 0x01) declaring 2^30 - 1 bytes, then 8 MiB of it: the
    // h3 crate alone would read and keep it all, granting credit as it goes.
    let head = [0x01, 0xbf, 0xff, 0xff, 0xff];
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [
            { "raw_b64": base64::engine::general_purpose::STANDARD.encode(head),
              "raw_flood_bytes": 8 << 20 },
            get("/headers"),
        ]}),
    );
    let events = client.finish().await;
    let refused = find(&events, "end", 0);
    // Stopped at the frame's header with H3_EXCESSIVE_LOAD, not after a
    // head timeout (which stops with code 0).
    assert!(
        refused["how"] == "stop_sending" || refused["how"] == "reset",
        "{refused}"
    );
    assert_eq!(refused["code"], 0x107, "{refused}");
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "headers" && e["index"] == 0),
        "{events:?}"
    );
    // The connection itself carries on.
    assert_eq!(find(&events, "headers", 1)["status"], 200);
    assert_eq!(find(&events, "end", 1)["how"], "fin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_its_content_length_never_reaches_the_service_whole() {
    let (site, up) = h3_site().await;
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [
            { "method": "POST", "path": "/upload", "headers": [["content-length", "5"]],
              "body_b64": base64::engine::general_purpose::STANDARD.encode("0123456789") },
            get("/headers"),
        ]}),
    );
    let events = client.finish().await;
    // RFC 9114 4.1.2: a malformed request. The service must not take the
    // first five bytes for the whole body.
    let status = find(&events, "headers", 0)["status"].as_u64().unwrap();
    assert!(status >= 400, "{status}");
    let started = up
        .uploads_started
        .load(std::sync::atomic::Ordering::Relaxed);
    let aborted = up
        .uploads_aborted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(started, aborted, "every upload that started was cut off");
    assert_eq!(find(&events, "headers", 1)["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stream_that_ends_inside_a_data_frame_gets_an_answer() {
    let (site, _up) = h3_site().await;
    // DATA (type 0x00) declaring 100 bytes, none of them, then FIN: the
    // h3 crate asserts this never happens (in the task that reads ahead
    // to learn whether a GET has a body); the edge must fail the body,
    // not the task that answers the request.
    let cut = vec![0x00, 100];
    let client = H3Client::start(
        &site,
        "open.test",
        json!({ "requests": [
            { "method": "GET", "path": "/headers", "headers": [],
              "raw_after_head_b64": base64::engine::general_purpose::STANDARD.encode(&cut) },
            get("/headers"),
        ]}),
    );
    let events = client.finish().await;
    let end = find(&events, "end", 0);
    let answered = events
        .iter()
        .any(|e| e["event"] == "headers" && e["index"] == 0);
    // An answer (an error status) or a reset; never a stream that just
    // ends without one, which is what a panicked request task leaves.
    assert!(answered || end["how"] == "reset", "{events:?}");
    assert_eq!(find(&events, "headers", 1)["status"], 200);
}
