//! Access control as an attacker sees it (issue 15): paths in disguise,
//! credentials leaking to the service, guessing in parallel, a throttle
//! turned against the owner, oversized user names, revoked sessions,
//! cross-site logouts, and secrets in logs. The service behind the edge is
//! a stand-in that normalises paths the way nginx does (decodes every
//! escape, resolves dot segments, merges slashes) and echoes the headers
//! it received, so "the edge forwarded something the service read as a
//! protected path" is visible.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::web::*;
use common::{Process, WAIT, basic, cheap_hash, path_str};
use http::header::{AUTHORIZATION, COOKIE, LOCATION, SET_COOKIE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const HOST: &str = "chat.test";
const PASSWORD: &str = "wonderland-7f3a9c";

/// What the stand-in saw: the path as it understood it, and the headers.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    headers: HashMap<String, Vec<String>>,
}

#[derive(Default)]
struct NginxLike {
    seen: Mutex<Vec<Seen>>,
}

impl NginxLike {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn last(&self) -> Seen {
        self.seen()
            .last()
            .cloned()
            .expect("a request reached the service")
    }

    fn reached_api(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .map(|s| s.path)
            .filter(|p| p.starts_with("/api"))
            .collect()
    }
}

/// nginx's reading of a path: every escape decoded (`%2F` too), `\` kept,
/// slashes merged, dot segments resolved; `None` (400) above the root.
fn nginx_normalise(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(b) = raw
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            decoded.push(b);
            i += 3;
            continue;
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let mut out: Vec<&str> = Vec::new();
    for seg in text.split('/').filter(|s| !s.is_empty()) {
        // Tomcat-style path parameters on a dot segment count as one.
        let bare = seg.split(';').next().unwrap_or(seg);
        match bare {
            "." => {}
            ".." => {
                out.pop()?;
            }
            _ => out.push(seg),
        }
    }
    Some(format!("/{}", out.join("/")))
}

async fn nginx_like() -> (SocketAddr, Arc<NginxLike>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(NginxLike::default());
    let s = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let s = s.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let s = s.clone();
                    async move {
                        let Some(path) = nginx_normalise(req.uri().path()) else {
                            return Ok::<_, Infallible>(reply(StatusCode::BAD_REQUEST, "bad"));
                        };
                        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
                        for (k, v) in req.headers() {
                            headers
                                .entry(k.as_str().to_owned())
                                .or_default()
                                .push(String::from_utf8_lossy(v.as_bytes()).into_owned());
                        }
                        s.seen.lock().unwrap().push(Seen {
                            path: path.clone(),
                            headers,
                        });
                        Ok(reply(StatusCode::OK, format!("served {path}")))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<TestBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

fn routes() -> String {
    format!(
        r#"
[[user]]
name = "alice"
password = "{alice}"

[[user]]
name = "bob"
password = "{bob}"

[[route]]
host = "{HOST}"
agent = "home"
service = "app"
auth = "basic"
users = ["alice", "bob"]
public_paths = ["/manifest.json", "/static/*"]
"#,
        alice = cheap_hash(PASSWORD),
        bob = cheap_hash("builder-0b5e"),
    )
}

async fn trust_site() -> (Site, Arc<NginxLike>) {
    let (addr, app) = nginx_like().await;
    let s = site("", &routes(), &[("app", format!("http://{addr}"))]).await;
    (s, app)
}

/// Sends a request line as written, over its own TLS connection (so no
/// client library tidies the path first); returns the status.
async fn raw_status(site: &Site, target: &str, extra: &str) -> u16 {
    let mut tls = site.tls(HOST, &[b"http/1.1"]).await;
    let head = format!("GET {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}Connection: close\r\n\r\n");
    tls.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut buf))
        .await
        .expect("a response in time")
        .ok();
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {target}: {text:?}"))
}

fn cookie_pairs(resp: &Response<Incoming>) -> Vec<String> {
    resp.headers()
        .get_all(SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect()
}

fn named<'a>(pairs: &'a [String], name: &str) -> Option<&'a String> {
    pairs
        .iter()
        .find(|p| p.split_once('=').is_some_and(|(k, _)| k == name))
}

/// Signs in with the login form from `source`, sending `cookies`; returns
/// the response.
async fn form_login(
    site: &Site,
    source: IpAddr,
    user: &str,
    password: &str,
    cookies: &str,
) -> Response<Incoming> {
    let mut c = site.h1_from(source, HOST).await;
    let mut req = Request::builder()
        .method("POST")
        .uri("/.burrow/login")
        .header("host", HOST)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("origin", format!("https://{HOST}"));
    if !cookies.is_empty() {
        req = req.header(COOKIE, cookies);
    }
    let body = format!("user={user}&password={password}&next=%2F");
    c.send_request(req.body(Full::new(Bytes::from(body)).boxed()).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn no_dot_segment_or_encoded_form_reaches_a_protected_path_without_a_password() {
    let (site, app) = trust_site().await;
    // The public path works, and is what the service sees.
    assert_eq!(raw_status(&site, "/static/app.js", "").await, 200);
    assert_eq!(app.last().path, "/static/app.js");

    let attacks = [
        "/static/../api/chats",
        "/static/%2e%2e/api/chats",
        "/static/%2E%2E/api/chats",
        "/static/.%2e/api/chats",
        "/static/%2e./api/chats",
        "/static/./../api/chats",
        "/static/x/../../api/chats",
        "/static//../api/chats",
        "/static/..%2fapi/chats",
        "/static%2f..%2fapi/chats",
        "/static/..%2Fapi%2Fchats",
        "/static/..%5capi/chats",
        "/static/..\\api/chats",
        "/static/..;/api/chats",
        "/static/%2e%2e;x=1/api/chats",
        "/static/%252e%252e/api/chats",
        "/manifest.json/../api/chats",
        "/%2e%2e/static/../api/chats",
    ];
    for target in attacks {
        let before = app.seen().len();
        let status = raw_status(&site, target, "").await;
        // Refused, or (`/static//../x` is `/static/x` by RFC 3986) served
        // from the public path the edge judged.
        if status == 200 {
            let seen = app.seen();
            assert_eq!(seen.len(), before + 1);
            let path = &seen[before].path;
            assert!(
                path.starts_with("/static/") || path == "/manifest.json",
                "{target} reached {path} without a password"
            );
        } else {
            assert!(
                status == 400 || status == 401,
                "{target} answered {status} without a password"
            );
        }
        assert!(
            app.reached_api().is_empty(),
            "{target} reached {:?} without a password",
            app.reached_api()
        );
    }

    // With the password, the service gets the canonical path the edge
    // judged, not the raw one.
    let auth = format!("Authorization: {}\r\n", basic("alice", PASSWORD));
    assert_eq!(
        raw_status(&site, "/static/%2e%2e/api/chats", &auth).await,
        200
    );
    assert_eq!(app.last().path, "/api/chats");
    assert_eq!(
        raw_status(&site, "/static/..%2fapi/chats", &auth).await,
        400
    );
    assert_eq!(app.reached_api(), vec!["/api/chats".to_owned()]);
}

#[tokio::test]
async fn no_edge_credential_reaches_the_service_on_any_path() {
    let (site, app) = trust_site().await;
    // Sign in to get both of the edge's cookies.
    let r = form_login(&site, "127.0.0.1".parse().unwrap(), "alice", PASSWORD, "").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let ours = cookie_pairs(&r);
    let session = named(&ours, "__Host-burrow")
        .expect("a session cookie")
        .clone();
    let device = named(&ours, "__Host-burrow-device")
        .expect("a device cookie")
        .clone();
    let password_header = basic("alice", PASSWORD);

    // HTTP/1.1 on a public path: password, both cookies and an app cookie.
    let mut c = site.h1(HOST).await;
    let r = c
        .send_request(
            get_req("/static/app.js")
                .header(AUTHORIZATION, &password_header)
                .header(COOKIE, format!("theme=dark; {session}; {device}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = app.last();
    assert_eq!(seen.path, "/static/app.js");
    assert_eq!(seen.headers.get("authorization"), None, "{seen:?}");
    assert_eq!(seen.headers["cookie"], vec!["theme=dark".to_owned()]);

    // HTTP/2 cookie crumbs on a public path: joined, ours removed.
    let mut h2 = site.h2(HOST).await;
    let mut req = h2_get(HOST, "/manifest.json");
    for crumb in ["a=1", session.as_str(), "b=2", device.as_str()] {
        req.headers_mut().append(COOKIE, crumb.parse().unwrap());
    }
    req.headers_mut()
        .insert(AUTHORIZATION, password_header.parse().unwrap());
    let r = h2.send_request(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = app.last();
    assert_eq!(seen.headers.get("authorization"), None, "{seen:?}");
    assert_eq!(seen.headers["cookie"], vec!["a=1; b=2".to_owned()]);

    // Two Authorization headers, one of them Basic: neither reaches the
    // service (which one is the app's cannot be told).
    let r = c
        .send_request(
            get_req("/static/two.js")
                .header(AUTHORIZATION, "Bearer app-token-2")
                .header(AUTHORIZATION, &password_header)
                .header("proxy-authorization", &password_header)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = app.last();
    assert_eq!(seen.headers.get("authorization"), None, "{seen:?}");
    assert_eq!(seen.headers.get("proxy-authorization"), None, "{seen:?}");

    // A protected path with the session: the app's Bearer token passes,
    // our cookies do not.
    let r = c
        .send_request(
            get_req("/api/chats")
                .header(AUTHORIZATION, "Bearer app-token-1")
                .header(COOKIE, format!("{session}; theme=dark; {device}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = app.last();
    assert_eq!(
        seen.headers["authorization"],
        vec!["Bearer app-token-1".to_owned()]
    );
    assert_eq!(seen.headers["cookie"], vec!["theme=dark".to_owned()]);

    // Basic credentials on a protected path: checked, then removed.
    let r = c
        .send_request(
            get_req("/api/models")
                .header(AUTHORIZATION, &password_header)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = app.last();
    assert_eq!(seen.path, "/api/models");
    assert_eq!(seen.headers.get("authorization"), None, "{seen:?}");
    for s in app.seen() {
        let all = format!("{:?}", s.headers);
        assert!(!all.contains("__Host-burrow"), "{all}");
        assert!(!all.contains(&password_header[6..]), "{all}");
    }
}

fn get_req(path: &str) -> http::request::Builder {
    Request::builder().uri(path).header("host", HOST)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_wrong_guesses_at_once_get_only_the_free_ones_checked() {
    let (site, app) = trust_site().await;
    let gate = site.gate.clone().unwrap();
    let free = burrow_edge::access::throttle::ADDR_FREE_FAILURES as usize;
    // Twenty streams on one HTTP/2 connection, all sent before any answer.
    let h2 = site.h2(HOST).await;
    let mut guesses = Vec::new();
    for i in 0..20 {
        let mut h2 = h2.clone();
        let mut req = h2_get(HOST, "/api/chats");
        req.headers_mut().insert(
            AUTHORIZATION,
            basic("alice", &format!("guess-{i}")).parse().unwrap(),
        );
        guesses.push(tokio::spawn(async move {
            h2.send_request(req).await.unwrap().status()
        }));
    }
    let mut statuses = Vec::new();
    for g in guesses {
        statuses.push(g.await.unwrap());
    }
    let wrong = statuses
        .iter()
        .filter(|s| **s == StatusCode::UNAUTHORIZED)
        .count();
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(wrong <= free, "{wrong} guesses were checked: {statuses:?}");
    assert_eq!(wrong + throttled, 20, "{statuses:?}");
    assert!(
        gate.verifier.argon2_runs() <= free as u64,
        "{} passwords hashed",
        gate.verifier.argon2_runs()
    );
    assert!(app.seen().is_empty());
}

#[tokio::test]
async fn a_spray_against_a_user_does_not_lock_them_out_of_their_own_browser() {
    let (site, _app) = trust_site().await;
    let browser: IpAddr = "127.0.0.20".parse().unwrap();
    // The owner signed in from this browser before, then signed out.
    let r = form_login(&site, browser, "bob", "builder-0b5e", "").await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let device = named(&cookie_pairs(&r), "__Host-burrow-device")
        .expect("a device cookie")
        .clone();

    // The stranger's connection is open before the spray, so its request
    // goes out as soon as the spray ends, well inside the lock.
    let mut stranger = site.h1_from("127.0.2.1".parse().unwrap(), HOST).await;
    // 30 wrong passwords for bob from 10 addresses.
    for i in 0..10 {
        let mut c = site
            .h1_from(format!("127.0.1.{}", 10 + i).parse().unwrap(), HOST)
            .await;
        for j in 0..3 {
            let r = c
                .send_request(
                    get_req("/api/chats")
                        .header(AUTHORIZATION, basic("bob", &format!("spray-{i}-{j}")))
                        .body(empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            assert!(matches!(r.status().as_u16(), 401 | 429), "{}", r.status());
        }
    }
    // The spray locked bob's name: a stranger with the right password waits.
    let r = stranger
        .send_request(
            get_req("/api/chats")
                .header(AUTHORIZATION, basic("bob", "builder-0b5e"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // bob's own browser signs in at once, with the form and with Basic.
    let r = form_login(&site, browser, "bob", "builder-0b5e", &device).await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER, "{:?}", r.headers());
    assert_eq!(r.headers()[LOCATION], "/");
    let mut c = site.h1_from(browser, HOST).await;
    let r = c
        .send_request(
            get_req("/api/chats")
                .header(AUTHORIZATION, basic("bob", "builder-0b5e"))
                .header(COOKIE, &device)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A device token is bob's only: it does not shield guesses for alice.
    let r = form_login(&site, browser, "alice", "nope", &device).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_twenty_kib_user_name_is_refused_without_being_stored() {
    let (site, app) = trust_site().await;
    let gate = site.gate.clone().unwrap();
    let long = "u".repeat(20 * 1024);
    let mut c = site.h1(HOST).await;
    for _ in 0..3 {
        let r = c
            .send_request(
                get_req("/api/chats")
                    .header(AUTHORIZATION, basic(&long, "whatever"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(gate.verifier.argon2_runs(), 0, "never hashed");
    assert_eq!(
        gate.throttle.len(),
        1,
        "only the address's counter is kept, no name"
    );
    assert!(app.seen().is_empty());
    // The same from a second address: one more counter, still no name.
    let mut other = site.h1_from("127.0.0.9".parse().unwrap(), HOST).await;
    let r = other
        .send_request(
            get_req("/")
                .header(AUTHORIZATION, basic(&long, "x"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(gate.throttle.len(), 2);
}

/// A request with `cookie` from a fresh connection; the status.
async fn with_cookie(site: &Site, path: &str, cookie: &str) -> StatusCode {
    let mut c = site.h1(HOST).await;
    c.send_request(get_req(path).header(COOKIE, cookie).body(empty()).unwrap())
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn revoked_sessions_and_cross_site_logouts() {
    let (site, _app) = trust_site().await;
    let r = form_login(&site, "127.0.0.1".parse().unwrap(), "alice", PASSWORD, "").await;
    let session = named(&cookie_pairs(&r), "__Host-burrow").unwrap().clone();
    assert_eq!(
        with_cookie(&site, "/api/chats", &session).await,
        StatusCode::OK
    );

    // Logout is not a GET any page can trigger: the GET shows a button.
    let mut c = site.h1(HOST).await;
    let r = c
        .send_request(
            get_req("/.burrow/logout")
                .header(COOKIE, &session)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().get(SET_COOKIE).is_none());
    assert!(body_text(r).await.contains("method=\"post\""));
    // A POST from another site is refused.
    let post = |origin: Option<&str>| {
        let mut b = Request::builder()
            .method("POST")
            .uri("/.burrow/logout")
            .header("host", HOST)
            .header(COOKIE, &session);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(empty()).unwrap()
    };
    let r = c
        .send_request(post(Some("https://evil.test")))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c.send_request(post(None)).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "no origin at all");
    assert_eq!(
        with_cookie(&site, "/api/chats", &session).await,
        StatusCode::OK
    );
    // From the site itself, it clears the cookie.
    let r = c
        .send_request(post(Some(&format!("https://{HOST}"))))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cleared = r.headers()[SET_COOKIE].to_str().unwrap();
    assert!(cleared.starts_with("__Host-burrow=;") && cleared.contains("Max-Age=0"));

    // `burrow logout-all` revokes every session issued so far, at once,
    // in the running edge.
    let config = site.world.write(
        "logout.toml",
        &format!(
            "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n\n[tls]\nmode = \"self-signed\"\n",
            site.world.path("state")
        ),
    );
    let mut cmd = Process::spawn(&["logout-all", "--config", &path_str(&config)]);
    assert!(cmd.wait_exit().success());
    assert_eq!(
        with_cookie(&site, "/api/chats", &session).await,
        StatusCode::UNAUTHORIZED,
        "a revoked session is refused"
    );
    // Signing in again works, and the new session holds.
    let r = form_login(&site, "127.0.0.1".parse().unwrap(), "alice", PASSWORD, "").await;
    let fresh = named(&cookie_pairs(&r), "__Host-burrow").unwrap().clone();
    assert_eq!(
        with_cookie(&site, "/api/chats", &fresh).await,
        StatusCode::OK
    );
}

#[tokio::test]
async fn only_websocket_upgrades_are_forwarded() {
    let (site, app) = trust_site().await;
    let mut c = site.h1(HOST).await;
    let r = c
        .send_request(
            get_req("/api/chats")
                .header(AUTHORIZATION, basic("alice", PASSWORD))
                .header("connection", "upgrade")
                .header("upgrade", "h2c")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = app.last();
    assert_eq!(seen.headers.get("upgrade"), None, "{seen:?}");
    assert!(
        !seen
            .headers
            .get("connection")
            .is_some_and(|v| v.iter().any(|c| c.to_ascii_lowercase().contains("upgrade"))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn an_unknown_server_name_gets_no_certificate() {
    let (site, _app) = trust_site().await;
    let tcp = tokio::net::TcpStream::connect(site.https).await.unwrap();
    let err = site
        .tls_over(tcp, "unknown.test", &[b"http/1.1"])
        .await
        .expect_err("no certificate for a name not served here");
    let text = err.to_string();
    assert!(!text.contains(HOST), "{text}");
    // Dialling the bare address (no SNI) gets nothing either: no route
    // here has an IP address for its host.
    let tcp = tokio::net::TcpStream::connect(site.https).await.unwrap();
    assert!(
        site.tls_over(tcp, "127.0.0.1", &[b"http/1.1"])
            .await
            .is_err()
    );
    // The served name still works.
    assert_eq!(raw_status(&site, "/manifest.json", "").await, 200);

    // A route whose host is an address is served to clients without SNI.
    let (addr, _up) = upstream().await;
    let by_ip = site_with_ip_route(addr).await;
    let tcp = tokio::net::TcpStream::connect(by_ip.https).await.unwrap();
    let tls = by_ip
        .tls_over(tcp, "127.0.0.1", &[b"http/1.1"])
        .await
        .expect("the IP route's certificate");
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = s
        .send_request(request("GET", "127.0.0.1", "/headers", empty()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

async fn site_with_ip_route(service: SocketAddr) -> Site {
    site(
        "",
        "[[route]]\nhost = \"127.0.0.1\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n",
        &[("test", format!("http://{service}"))],
    )
    .await
}

#[tokio::test]
async fn no_password_cookie_or_key_in_any_log_line_at_trace() {
    let (service, _app) = nginx_like().await;
    let world = common::World::new();
    let (key, fp) = world.agent_key("home");
    let edge_toml = world.write(
        "edge.toml",
        &format!(
            "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n\n\
             [tls]\nmode = \"self-signed\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n{}",
            world.path("state"),
            routes()
        ),
    );
    let mut edge = Process::spawn_logging("trace", &["edge", "--config", &path_str(&edge_toml)]);
    let listening = edge.wait_log("edge listening");
    let tunnel = common::field_addr(&listening, "tunnel");
    let fingerprint = listening["fingerprint"].as_str().unwrap().to_owned();
    let https = common::field_addr(&edge.wait_log("serving https"), "addr");
    let mut agent = common::start_agent(common::agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{fingerprint}\"\nkey = {key:?}\n\n\
         [[service]]\nname = \"app\"\nurl = \"http://{service}\"\n"
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
    let client = Client {
        https,
        roots: Arc::new(roots),
    };

    // Every path a credential takes: a wrong and a right Basic password,
    // the form, the session and device cookies, a public path with all of
    // them, over HTTP/1.1 and HTTP/2, and a logout.
    let right = basic("alice", PASSWORD);
    let wrong = basic("alice", "not-the-password-9d2");
    for auth in [&wrong, &right] {
        client
            .h1(get_req("/api/chats").header(AUTHORIZATION, auth))
            .await;
    }
    let form = client
        .h1(Request::builder()
            .method("POST")
            .uri("/.burrow/login")
            .header("host", HOST)
            .header("origin", format!("https://{HOST}"))
            .header("content-type", "application/x-www-form-urlencoded"))
        .await;
    assert_eq!(form.status(), StatusCode::UNAUTHORIZED, "an empty form");
    let login = client
        .h1_body(
            Request::builder()
                .method("POST")
                .uri("/.burrow/login")
                .header("host", HOST)
                .header("origin", format!("https://{HOST}"))
                .header("content-type", "application/x-www-form-urlencoded"),
            format!("user=alice&password={PASSWORD}&next=%2F"),
        )
        .await;
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    let cookies = cookie_pairs(&login);
    let session = named(&cookies, "__Host-burrow").unwrap().clone();
    let device = named(&cookies, "__Host-burrow-device").unwrap().clone();
    let both = format!("{session}; {device}");
    let r = client.h1(get_req("/api/chats").header(COOKIE, &both)).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = client
        .h1(get_req("/static/app.js")
            .header(COOKIE, &both)
            .header(AUTHORIZATION, &right))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let mut req = h2_get(HOST, "/api/chats");
    req.headers_mut().insert(COOKIE, both.parse().unwrap());
    req.headers_mut()
        .insert(AUTHORIZATION, right.parse().unwrap());
    assert_eq!(client.h2(req).await, StatusCode::OK);
    let r = client
        .h1(get_req("/.burrow/logout")
            .method("POST")
            .header("origin", format!("https://{HOST}"))
            .header(COOKIE, &both))
        .await;
    assert_eq!(r.status(), StatusCode::OK);

    edge.signal("TERM");
    assert!(edge.wait_exit().success());
    let log: Vec<String> = edge.seen.iter().map(ToString::to_string).collect();
    assert!(log.len() > 100, "trace logging was on: {} lines", log.len());
    // Responses of known length that were sent whole are logged as
    // complete, not as a client that went away.
    let access: Vec<&serde_json::Value> = edge
        .seen
        .iter()
        .filter(|v| v["target"] == "burrow::access")
        .collect();
    assert!(access.len() >= 6, "{access:?}");
    for a in &access {
        if a["status"] == 200 {
            assert_eq!(a["outcome"], "complete", "{a}");
        }
    }
    // The log did see the attempts (so a leak would be in it).
    assert!(log.iter().any(|l| l.contains("failed login")));
    assert!(log.iter().any(|l| l.contains("burrow::access")));
    let key_bytes = std::fs::read(world.path("state/session.key")).unwrap();
    let hex: String = key_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let b64 = base64_encode(&key_bytes);
    let secrets = [
        ("the password", PASSWORD.to_owned()),
        ("a wrong password", "not-the-password-9d2".to_owned()),
        ("the Basic credential", right[6..].to_owned()),
        ("the wrong Basic credential", wrong[6..].to_owned()),
        // Whole values: their signatures are the secret part.
        (
            "the session cookie",
            session.split_once('=').unwrap().1.to_owned(),
        ),
        (
            "the device cookie",
            device.split_once('=').unwrap().1.to_owned(),
        ),
        (
            "the session signature",
            session.rsplit_once('.').unwrap().1.to_owned(),
        ),
        (
            "the device signature",
            device.rsplit_once('.').unwrap().1.to_owned(),
        ),
        ("the session key (hex)", hex),
        ("the session key (base64)", b64),
    ];
    for line in &log {
        for (what, secret) in &secrets {
            assert!(
                !line.contains(secret.as_str()),
                "{what} in a log line: {line}"
            );
        }
    }
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A client of an edge that runs as a process.
struct Client {
    https: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
}

impl Client {
    async fn tls(&self, alpn: &[u8]) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = tokio::net::TcpStream::connect(self.https).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(rustls::pki_types::ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .unwrap()
    }

    async fn h1(&self, req: http::request::Builder) -> Response<Incoming> {
        self.h1_body(req, String::new()).await
    }

    async fn h1_body(&self, req: http::request::Builder, body: String) -> Response<Incoming> {
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(self.tls(b"http/1.1").await))
                .await
                .unwrap();
        tokio::spawn(conn);
        s.send_request(req.body(Full::new(Bytes::from(body)).boxed()).unwrap())
            .await
            .unwrap()
    }

    async fn h2(&self, req: Request<TestBody>) -> StatusCode {
        let (mut s, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(self.tls(b"h2").await),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let r = s.send_request(req).await.unwrap();
        let status = r.status();
        body_text(r).await;
        status
    }
}
