//! The browser path in headless Chromium: log in through the edge's login
//! page, then watch tokens stream over SSE and a WebSocket echo, all through
//! the tunnel to the demo's sample app. Chromium is driven over the Chrome
//! DevTools Protocol with the same WebSocket client the other tests use.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use argon2::password_hash::{PasswordHasher, SaltString};
use base64::Engine;
use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Where Debian's package puts Chromium; `BURROW_CHROMIUM` overrides.
fn chromium_path() -> String {
    std::env::var("BURROW_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

struct Chromium {
    child: std::process::Child,
    _profile: tempfile::TempDir,
    ws_url: String,
}

impl Chromium {
    /// Starts headless Chromium trusting exactly the edge's self-signed key,
    /// over TCP only.
    fn start(spki_sha256_b64: &str) -> Self {
        Self::start_with(spki_sha256_b64, &["--disable-quic".to_owned()])
    }

    fn start_with(spki_sha256_b64: &str, extra: &[String]) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium_path())
            .args(extra)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--remote-debugging-port=0",
                &format!("--user-data-dir={}", profile.path().display()),
                &format!("--ignore-certificate-errors-spki-list={spki_sha256_b64}"),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} ({e}); CI installs Debian's chromium",
                    chromium_path()
                )
            });
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let ws_url = rx
            .recv_timeout(WAIT)
            .expect("Chromium announced its DevTools endpoint");
        Self {
            child,
            _profile: profile,
            ws_url,
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal DevTools Protocol client over one browser-level WebSocket.
struct Cdp {
    ws: WebSocketStream<TcpStream>,
    next_id: u64,
    events: Vec<Value>,
    session: Option<String>,
}

impl Cdp {
    async fn connect(url: &str) -> Self {
        let authority = url.trim_start_matches("ws://").split('/').next().unwrap();
        let tcp = TcpStream::connect(authority).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        Self {
            ws,
            next_id: 0,
            events: Vec::new(),
            session: None,
        }
    }

    /// Connects, opens a blank page and attaches to it with events on.
    async fn open_page(url: &str) -> Self {
        let mut cdp = Self::connect(url).await;
        let target = cdp
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = cdp
            .call(
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        cdp.session = Some(attached["sessionId"].as_str().unwrap().to_owned());
        cdp.call("Page.enable", json!({})).await;
        cdp
    }

    async fn read(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("DevTools message in time")
                .unwrap()
                .unwrap();
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
        loop {
            let v = self.read().await;
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
            self.events.push(v);
        }
    }

    async fn wait_event(&mut self, method: &str) -> Value {
        if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
            return self.events.remove(i);
        }
        loop {
            let v = self.read().await;
            if v["method"] == method {
                return v;
            }
            self.events.push(v);
        }
    }

    /// Evaluates `expr` in the page, awaiting it if it is a promise.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "awaitPromise": true, "returnByValue": true }),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }
}

fn spki_pin(site: &Site) -> String {
    let pem = std::fs::read(site.cert_path()).unwrap();
    let cert = rustls::pki_types::pem::PemObject::pem_slice_iter(&pem)
        .next()
        .map(|c: Result<rustls::pki_types::CertificateDer<'static>, _>| c.unwrap())
        .unwrap();
    let fp = burrow_proto::identity::Fingerprint::of_cert(&cert)
        .unwrap()
        .to_string();
    let hex = fp.strip_prefix("sha256:").unwrap();
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_logs_in_and_streams_sse_and_websocket_through_the_edge() {
    let app = demo_app().await;
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let hash = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(
            b"in the browser",
            &SaltString::encode_b64(b"chromium-salt-00").unwrap(),
        )
        .unwrap()
        .to_string();
    let routes = format!(
        "[[user]]\nname = \"alice\"\npassword = \"{hash}\"\n\n[[route]]\nhost = \"localhost\"\nagent = \"home\"\nservice = \"app\"\nauth = \"basic\"\nusers = [\"alice\"]\npublic_paths = [\"/manifest.json\"]\n"
    );
    let site = site("", &routes, &[("app", format!("http://{app}"))]).await;
    let origin = format!("https://localhost:{}", site.https.port());

    let browser = Chromium::start(&spki_pin(&site));
    let mut cdp = Cdp::open_page(&browser.ws_url).await;

    // A browser navigation without credentials gets the login page.
    cdp.events.clear();
    cdp.call("Page.navigate", json!({ "url": format!("{origin}/") }))
        .await;
    cdp.wait_event("Page.loadEventFired").await;
    assert_eq!(cdp.eval("document.title").await, "Sign in");

    // Sign in through the form; the edge redirects back to the app.
    cdp.events.clear();
    cdp.eval(
        "document.getElementById('user').value = 'alice';
         document.getElementById('password').value = 'in the browser';
         document.getElementById('sign-in').click(); true",
    )
    .await;
    cdp.wait_event("Page.loadEventFired").await;
    assert_eq!(cdp.eval("document.title").await, "burrow demo chat");
    assert_eq!(cdp.eval("location.pathname").await, "/");
    assert_eq!(
        cdp.eval("document.cookie.includes('burrow')").await,
        false,
        "the session cookie is HttpOnly"
    );

    // Tokens over SSE, in the page, through the edge.
    let tokens = cdp
        .eval(
            "new Promise((resolve, reject) => {
               const got = [];
               const es = new EventSource('/sse?n=20&delay_ms=5');
               es.onmessage = e => got.push(JSON.parse(e.data).token);
               es.addEventListener('done', () => { es.close(); resolve(got); });
               es.onerror = () => { es.close(); reject(new Error('sse failed after ' + got.length)); };
             })",
        )
        .await;
    let expected: Vec<Value> = (1..=20).map(|i| json!(format!("token{i} "))).collect();
    assert_eq!(tokens, Value::Array(expected));

    // The Ollama-style NDJSON stream through fetch.
    let text = cdp
        .eval(
            "fetch('/api/chat?n=5&delay_ms=1', { method: 'POST', body: JSON.stringify({ model: 'm' }) })
               .then(r => r.text())
               .then(t => t.trim().split('\\n').map(l => JSON.parse(l).message.content).join(''))",
        )
        .await;
    assert_eq!(text, "token1 token2 token3 token4 token5 ");

    // A WebSocket echo.
    let echo = cdp
        .eval(
            "new Promise((resolve, reject) => {
               const ws = new WebSocket('wss://' + location.host + '/ws');
               ws.onopen = () => ws.send('hello from chromium');
               ws.onmessage = e => { resolve(e.data); ws.close(); };
               ws.onerror = () => reject(new Error('websocket failed'));
             })",
        )
        .await;
    assert_eq!(echo, "hello from chromium");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_waits_on_the_waking_page_then_lands_in_the_app() {
    use common::standin::{Boot, MAC_TEXT, Power, StandIn};
    let mut stand_in = StandIn::start(Boot::WhenReleased, Power::Asleep).await;
    let routes = "[[route]]\nhost = \"localhost\"\nagent = \"home\"\nservice = \"ollama\"\nauth = \"none\"\n";
    let agent = format!(
        "\n[[service]]\nname = \"ollama\"\nurl = \"http://{}\"\nhealth = \"/api/version\"\n[service.wake]\nmac = \"{MAC_TEXT}\"\nbroadcast = \"{}\"\n",
        stand_in.http, stand_in.udp
    );
    let (site, _) = site_toml("", routes, &agent).await;
    let origin = format!("https://localhost:{}", site.https.port());

    let browser = Chromium::start(&spki_pin(&site));
    let mut cdp = Cdp::open_page(&browser.ws_url).await;

    // The PC is asleep: the navigation gets the waiting page, which counts.
    cdp.events.clear();
    cdp.call("Page.navigate", json!({ "url": format!("{origin}/") }))
        .await;
    cdp.wait_event("Page.loadEventFired").await;
    assert_eq!(cdp.eval("document.title").await, "Waking localhost");
    let elapsed = cdp
        .eval("document.getElementById('elapsed').textContent")
        .await;
    assert!(
        elapsed.as_str().unwrap().ends_with(" s"),
        "elapsed time shown: {elapsed}"
    );

    // The page's own polling, not the test, moves on once the PC is up.
    stand_in.wait_power(Power::Booting).await;
    let state = cdp
        .eval(
            "new Promise(resolve => {
               const el = document.getElementById('state');
               const done = () => el.textContent.startsWith('Waking') && (resolve(el.textContent), true);
               if (!done()) new MutationObserver(done).observe(el, { childList: true, characterData: true, subtree: true });
             })",
        )
        .await;
    assert_eq!(state, "Waking the machine…");
    stand_in.finish_boot();
    cdp.wait_event("Page.loadEventFired").await;
    assert_eq!(cdp.eval("document.title").await, "Open WebUI");
    assert_eq!(cdp.eval("location.pathname").await, "/");
    assert_eq!(stand_in.boots(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_shows_the_admin_status_page() {
    let app = demo_app().await;
    let routes =
        "[[route]]\nhost = \"localhost\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n";
    let site = site(
        "admin = \"127.0.0.1:0\"",
        routes,
        &[("app", format!("http://{app}"))],
    )
    .await;
    let admin = site.admin.unwrap();

    let browser = Chromium::start(&spki_pin(&site));
    let mut cdp = Cdp::open_page(&browser.ws_url).await;
    // The app first, through the route, so the page has a route to show.
    cdp.events.clear();
    cdp.call(
        "Page.navigate",
        json!({ "url": format!("https://localhost:{}/", site.https.port()) }),
    )
    .await;
    cdp.wait_event("Page.loadEventFired").await;
    cdp.events.clear();
    cdp.call(
        "Page.navigate",
        json!({ "url": format!("http://{admin}/") }),
    )
    .await;
    cdp.wait_event("Page.loadEventFired").await;
    assert_eq!(cdp.eval("document.title").await, "burrow status");
    let agent_row = cdp
        .eval("[...document.querySelectorAll('#agents td')].map(td => td.textContent)")
        .await;
    assert_eq!(agent_row[0], "home", "{agent_row}");
    let cells: Vec<&str> = agent_row
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(cells.contains(&"quic"), "the transport shows: {agent_row}");
    assert!(
        cells.iter().any(|c| c.starts_with("127.0.0.1:")),
        "the address shows: {agent_row}"
    );
    let route_row = cdp
        .eval("[...document.querySelectorAll('#routes td')].map(td => td.textContent)")
        .await;
    assert_eq!(route_row[0], "localhost", "{route_row}");
    assert!(
        route_row[3].as_str().unwrap().starts_with("≤ "),
        "a first-byte time shows: {route_row}"
    );
    let sections = cdp
        .eval("[...document.querySelectorAll('section h2')].map(h => h.textContent)")
        .await;
    assert_eq!(
        sections,
        json!(["Agents", "Services", "Routes", "Certificates", "Counters"])
    );
    // What the page showed, for the record (`-- --nocapture`).
    let text = cdp.eval("document.body.innerText").await;
    eprintln!(
        "the status page in Chromium:\n{}",
        text.as_str().unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_the_demo_chat_over_http3_and_the_tokens_render_one_by_one() {
    let app = demo_app().await;
    let routes =
        "[[route]]\nhost = \"localhost\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n";
    let agent_tail = format!("\n[[service]]\nname = \"app\"\nurl = \"http://{app}\"\n");
    // HTTPS (TCP) and the tunnel (UDP) on one port number, as on 443.
    let (site, _, ()) = site_on(
        "http3 = true",
        routes,
        &agent_tail,
        same_port_sockets(),
        |tunnel, _| (tunnel, ()),
    )
    .await;
    let port = site.https.port();
    assert_eq!(site.edge.tunnel.port(), port);
    let origin = format!("https://localhost:{port}");

    let browser = Chromium::start_with(
        &spki_pin(&site),
        &[
            "--enable-quic".to_owned(),
            format!("--origin-to-force-quic-on=localhost:{port}"),
            // The edge listens on IPv4 loopback; QUIC gets no fallback
            // from ::1.
            "--host-resolver-rules=MAP localhost 127.0.0.1".to_owned(),
        ],
    );
    let mut cdp = Cdp::open_page(&browser.ws_url).await;
    cdp.events.clear();
    cdp.call("Page.navigate", json!({ "url": format!("{origin}/") }))
        .await;
    cdp.wait_event("Page.loadEventFired").await;
    assert_eq!(
        cdp.eval("document.title").await,
        "burrow demo chat",
        "{}",
        cdp.eval("document.body.innerText").await
    );
    assert_eq!(
        cdp.eval("performance.getEntriesByType('navigation')[0].nextHopProtocol")
            .await,
        "h3"
    );

    // Send a prompt through the page's own form (Ollama-style NDJSON over
    // fetch) and record the reply's text at every change: a stream that
    // was buffered anywhere would show up as one change.
    let seen = cdp
        .eval(
            "new Promise(resolve => {
               const log = document.getElementById('log');
               const states = [];
               new MutationObserver(() => {
                 const bot = log.querySelector('.bot');
                 if (bot && bot.textContent && states[states.length - 1] !== bot.textContent) states.push(bot.textContent);
               }).observe(log, { childList: true, characterData: true, subtree: true });
               document.getElementById('prompt').value = 'over http/3';
               document.querySelector('#chat button').click();
               const done = () => {
                 const r = performance.getEntriesByType('resource').find(e => e.name.endsWith('/api/chat'));
                 if (r && r.responseEnd > 0) resolve({ states, protocol: r.nextHopProtocol });
                 else setTimeout(done, 20);
               };
               done();
             })",
        )
        .await;
    assert_eq!(seen["protocol"], "h3", "{seen}");
    let states: Vec<&str> = seen["states"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let last = *states.last().expect("the reply rendered");
    let words = last.split_whitespace().count();
    assert!(words >= 5, "the demo's whole reply: {last:?}");
    // The demo sends a word every 40 ms; a hop that buffered would hand
    // the page the reply in one or two pieces.
    assert!(
        states.len() * 2 >= words,
        "the reply grew word by word, not at once: {states:?}"
    );
    for pair in states.windows(2) {
        assert!(
            pair[1].starts_with(pair[0]) && pair[1].len() > pair[0].len(),
            "each state extends the one before: {states:?}"
        );
    }
}
