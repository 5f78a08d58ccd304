//! API keys end to end: apps that send `Authorization: Bearer burrow_…`
//! stream through a basic-auth route without a login page; the key never
//! reaches the service nor the log; wrong keys are refused and throttled;
//! the app's own Bearer token still passes beside a session; a key removed
//! from the config is refused after SIGHUP; `burrow keygen-api` output is a
//! working key and table; bad `[[api_key]]` config fails `burrow check`.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_edge::access::api_key;
use burrow_edge::access::throttle::ADDR_FREE_FAILURES;
use bytes::Bytes;
use common::web::*;
use common::{Process, World, basic, cheap_hash, field_addr, path_str, run};
use http::StatusCode;
use http::header::{AUTHORIZATION, COOKIE, SET_COOKIE, WWW_AUTHENTICATE};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// Two routes on one service: chat.test takes the key "phone", other.test
/// the key "laptop"; alice signs in to both.
fn routes(phone: &str, laptop: &str) -> String {
    format!(
        r#"
[[user]]
name = "alice"
password = "{alice}"

[[api_key]]
name = "phone"
hash = "{phone}"

[[api_key]]
name = "laptop"
hash = "{laptop}"

[[route]]
host = "chat.test"
agent = "home"
service = "test"
auth = "basic"
users = ["alice"]
api_keys = ["phone"]

[[route]]
host = "other.test"
agent = "home"
service = "test"
auth = "basic"
users = ["alice"]
api_keys = ["laptop"]
"#,
        alice = cheap_hash("wonderland"),
        phone = cheap_hash(phone),
        laptop = cheap_hash(laptop),
    )
}

struct Keys {
    phone: String,
    laptop: String,
}

async fn key_site() -> (Site, Arc<Upstream>, Keys) {
    let keys = Keys {
        phone: api_key::generate().unwrap(),
        laptop: api_key::generate().unwrap(),
    };
    let (addr, up) = upstream().await;
    let s = site(
        "",
        &routes(&keys.phone, &keys.laptop),
        &[("test", format!("http://{addr}"))],
    )
    .await;
    (s, up, keys)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn req(method: &str, host: &str, path: &str, auth: Option<&str>) -> http::request::Builder {
    let b = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    match auth {
        Some(a) => b.header(AUTHORIZATION, a),
        None => b,
    }
}

/// One bodyless request on a fresh connection from `127.0.0.1`.
async fn send(site: &Site, host: &str, path: &str, auth: Option<&str>) -> http::Response<Incoming> {
    let mut c = site.h1(host).await;
    c.send_request(req("GET", host, path, auth).body(empty()).unwrap())
        .await
        .unwrap()
}

fn challenges(r: &http::Response<Incoming>) -> Vec<String> {
    r.headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect()
}

fn argon2_runs(site: &Site) -> u64 {
    site.gate.as_ref().unwrap().verifier.argon2_runs()
}

#[tokio::test]
async fn a_key_streams_ndjson_and_never_reaches_the_service() {
    let (site, up, keys) = key_site().await;

    // Ollama-style NDJSON streams line by line with the key, the request
    // body included.
    let gate = up.gate();
    let prompt = r#"{"model":"llama3","messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = site.h1("chat.test").await;
    let resp = c
        .send_request(
            req(
                "POST",
                "chat.test",
                "/gated-ndjson",
                Some(&bearer(&keys.phone)),
            )
            .body(Full::new(Bytes::from(prompt)).boxed())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        resp.headers().get(SET_COOKIE).is_none(),
        "no session for a key"
    );
    let mut body = resp.into_body();
    let first = next_chunk(&mut body).await.unwrap();
    assert_eq!(
        &first[..],
        format!("{{\"n\":1,\"echo\":{}}}\n", prompt.len()).as_bytes(),
        "the first line arrives before the service sends the rest"
    );
    gate.send(()).unwrap();
    let mut all = String::from_utf8(first.to_vec()).unwrap();
    while let Some(chunk) = next_chunk(&mut body).await {
        all += std::str::from_utf8(&chunk).unwrap();
    }
    assert_eq!(all.lines().count(), 200);
    let runs = argon2_runs(&site);
    assert!(runs >= 1, "the new key was hashed");

    // The service never sees the key; a known key costs no more hashing.
    for _ in 0..3 {
        let r = send(&site, "chat.test", "/headers", Some(&bearer(&keys.phone))).await;
        assert_eq!(r.status(), StatusCode::OK);
        let seen = up.last_headers.lock().unwrap().clone();
        assert!(!seen.contains_key("authorization"), "{seen:?}");
    }
    assert_eq!(
        argon2_runs(&site),
        runs,
        "known keys are found without argon2"
    );

    // No key: 401 with a Basic and a Bearer challenge.
    let r = send(&site, "chat.test", "/api/tags", None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let offered = challenges(&r);
    assert!(
        offered[0].starts_with("Basic realm=\"burrow\""),
        "{offered:?}"
    );
    assert_eq!(offered[1], "Bearer realm=\"burrow\"", "{offered:?}");

    // A wrong key, a cut one, and a right one for another route: 401, and
    // nothing reaches the service.
    up.last_headers.lock().unwrap().clear();
    let wrong = api_key::generate().unwrap();
    let cut = &keys.phone[..keys.phone.len() - 1];
    for token in [wrong.as_str(), cut, keys.laptop.as_str()] {
        let r = send(&site, "chat.test", "/headers", Some(&bearer(token))).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{token}");
        assert_eq!(challenges(&r).len(), 2);
    }
    assert!(up.last_headers.lock().unwrap().is_empty());
    // The laptop key is the laptop's route's; the phone key is not taken there.
    let r = send(&site, "other.test", "/headers", Some(&bearer(&keys.laptop))).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = send(&site, "other.test", "/headers", Some(&bearer(&keys.phone))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A key is not a password.
    let r = send(
        &site,
        "chat.test",
        "/headers",
        Some(&basic("phone", &keys.phone)),
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_apps_own_bearer_token_passes_beside_a_session() {
    let (site, up, keys) = key_site().await;
    let mut c = site.h1("chat.test").await;

    // Without a session, an app token is challenged as before.
    let r = c
        .send_request(
            req(
                "GET",
                "chat.test",
                "/headers",
                Some("Bearer sk-openwebui-1"),
            )
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    body_text(r).await;

    let r = c
        .send_request(
            req(
                "GET",
                "chat.test",
                "/headers",
                Some(&basic("alice", "wonderland")),
            )
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = r.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    body_text(r).await;

    // With the session, the app's own token reaches the app untouched.
    let r = c
        .send_request(
            req(
                "GET",
                "chat.test",
                "/headers",
                Some("Bearer sk-openwebui-1"),
            )
            .header(COOKIE, &cookie)
            .body(empty())
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    body_text(r).await;
    let seen = up.last_headers.lock().unwrap().clone();
    assert_eq!(seen["authorization"], vec!["Bearer sk-openwebui-1"]);

    // A burrow key beside a session is still ours: it is removed.
    let r = c
        .send_request(
            req("GET", "chat.test", "/headers", Some(&bearer(&keys.phone)))
                .header(COOKIE, &cookie)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    body_text(r).await;
    let seen = up.last_headers.lock().unwrap().clone();
    assert!(!seen.contains_key("authorization"), "{seen:?}");
}

#[tokio::test]
async fn wrong_keys_are_throttled_per_address_and_a_known_key_still_passes() {
    let (site, _up, keys) = key_site().await;
    let here = "127.0.0.1".parse().unwrap();
    let elsewhere = "127.0.0.2".parse().unwrap();
    let r = send(&site, "chat.test", "/headers", Some(&bearer(&keys.phone))).await;
    assert_eq!(r.status(), StatusCode::OK);

    let mut statuses = Vec::new();
    for _ in 0..=ADDR_FREE_FAILURES {
        let mut c = site.h1_from(here, "chat.test").await;
        let wrong = bearer(&api_key::generate().unwrap());
        let r = c
            .send_request(
                req("GET", "chat.test", "/headers", Some(&wrong))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(r.status());
    }
    assert_eq!(
        statuses.last(),
        Some(&StatusCode::TOO_MANY_REQUESTS),
        "the failure past the free ones locks the address: {statuses:?}"
    );
    assert!(
        statuses[..statuses.len() - 1]
            .iter()
            .all(|s| *s == StatusCode::UNAUTHORIZED)
    );
    // Locked: even a malformed key is answered 429 without a look.
    let mut c = site.h1_from(here, "chat.test").await;
    let r = c
        .send_request(
            req("GET", "chat.test", "/headers", Some("Bearer burrow_x"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key(http::header::RETRY_AFTER));

    // The known key still passes from the locked address; another address
    // is not locked.
    let mut c = site.h1_from(here, "chat.test").await;
    let r = c
        .send_request(
            req("GET", "chat.test", "/headers", Some(&bearer(&keys.phone)))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut c = site.h1_from(elsewhere, "chat.test").await;
    let wrong = bearer(&api_key::generate().unwrap());
    let r = c
        .send_request(
            req("GET", "chat.test", "/headers", Some(&wrong))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}

/// `burrow keygen-api --name NAME`: the key, and the table that takes it.
fn keygen_api(name: &str) -> (String, String) {
    let (code, out, err) = run(&["keygen-api", "--name", name]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("shown only now"), "{out}");
    let keys: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with(api_key::PREFIX))
        .collect();
    assert_eq!(keys.len(), 1, "the key once: {out}");
    assert!(api_key::well_formed(keys[0]), "{out}");
    let table = &out[out.find("[[api_key]]").expect("the table")..];
    assert!(!table.contains(keys[0]), "the key is not in the table");
    (keys[0].to_owned(), table.to_owned())
}

/// An edge process with the agent in this process, and a client for it.
struct EdgeProcess {
    world: World,
    process: Process,
    https: SocketAddr,
    config: std::path::PathBuf,
    roots: Arc<rustls::RootCertStore>,
    _agent: common::AgentHandle,
}

impl EdgeProcess {
    async fn start(filter: &str, base: impl Fn(&World) -> String, tail: &str) -> (Self, String) {
        let world = World::new();
        let (key, fp) = world.agent_key("home");
        let head = format!(
            "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n\n\
             [[agent]]\nname = \"home\"\nkey = \"{fp}\"\n{}",
            world.path("state"),
            base(&world),
        );
        let config = world.write("edge.toml", &format!("{head}{tail}"));
        let mut process = Process::spawn_logging(filter, &["edge", "--config", &path_str(&config)]);
        let listening = process.wait_log("edge listening");
        let tunnel = field_addr(&listening, "tunnel");
        let fingerprint = listening["fingerprint"].as_str().unwrap().to_owned();
        let https = field_addr(&process.wait_log("serving https"), "addr");
        let (addr, _up) = upstream().await;
        let mut agent = common::start_agent(common::agent_config(&format!(
            "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{fingerprint}\"\nkey = {key:?}\n\n\
             [[service]]\nname = \"test\"\nurl = \"http://{addr}\"\n"
        )));
        agent.connected().await;
        let mut roots = rustls::RootCertStore::empty();
        for cert in
            rustls::pki_types::pem::PemObject::pem_file_iter(world.path("state/self-signed.pem"))
                .unwrap()
        {
            roots.add(cert.unwrap()).unwrap();
        }
        let e = Self {
            world,
            process,
            https,
            config,
            roots: Arc::new(roots),
            _agent: agent,
        };
        (e, head)
    }

    /// The next access log line.
    fn access_log(&mut self) -> serde_json::Value {
        loop {
            let line = self.process.wait_log("request");
            if line["target"] == "burrow::access" {
                return line;
            }
        }
    }

    async fn get(&self, auth: Option<&str>) -> StatusCode {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.https).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("chat.test").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .unwrap();
        tokio::spawn(conn);
        let r = s
            .send_request(
                req("GET", "chat.test", "/headers", auth)
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = r.status();
        body_text(r).await;
        status
    }
}

fn chat_route(api_keys: &str) -> String {
    format!(
        "\n[[route]]\nhost = \"chat.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"basic\"\n\
         users = [\"alice\"]\napi_keys = [{api_keys}]\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keygen_api_key_works_is_never_logged_and_is_refused_once_removed_or_replaced() {
    let (key, table) = keygen_api("phone");
    let (other_key, other_table) = keygen_api("laptop");
    let users = format!(
        "\n[tls]\nmode = \"self-signed\"\n\n[[user]]\nname = \"alice\"\npassword = \"{}\"\n\n{table}\n{other_table}",
        cheap_hash("wonderland")
    );
    let (mut e, head) = EdgeProcess::start(
        "trace",
        |_| users.clone(),
        &chat_route("\"phone\", \"laptop\""),
    )
    .await;

    assert_eq!(e.get(Some(&bearer(&key))).await, StatusCode::OK);
    let logged = e.access_log();
    assert_eq!(logged["user"], "key:phone", "{logged}");
    assert_eq!(e.get(Some(&bearer(&other_key))).await, StatusCode::OK);
    assert_eq!(e.access_log()["user"], "key:laptop");
    let wrong = api_key::generate().unwrap();
    assert_eq!(e.get(Some(&bearer(&wrong))).await, StatusCode::UNAUTHORIZED);
    e.process.wait_log("failed api key");

    // The phone is lost: its key leaves the config (the laptop's stays),
    // and after the reload it is refused, though it was remembered.
    let without_phone = users.replace(&table, "");
    assert_ne!(without_phone, users);
    let head = head.replace(&users, &without_phone);
    std::fs::write(&e.config, format!("{head}{}", chat_route("\"laptop\""))).unwrap();
    e.process.signal("HUP");
    e.process.wait_log("config reloaded");
    assert_eq!(e.get(Some(&bearer(&key))).await, StatusCode::UNAUTHORIZED);
    assert_eq!(e.get(Some(&bearer(&other_key))).await, StatusCode::OK);

    // A new phone gets a new key under the same name: the old one, which
    // the edge remembered as "phone", is refused; the new one passes.
    let (new_key, new_table) = keygen_api("phone");
    let head = head.replace(&without_phone, &format!("{without_phone}\n{new_table}"));
    std::fs::write(
        &e.config,
        format!("{head}{}", chat_route("\"phone\", \"laptop\"")),
    )
    .unwrap();
    e.process.signal("HUP");
    e.process.wait_log("config reloaded");
    assert_eq!(e.get(Some(&bearer(&key))).await, StatusCode::UNAUTHORIZED);
    assert_eq!(e.get(Some(&bearer(&new_key))).await, StatusCode::OK);

    e.process.signal("TERM");
    assert!(e.process.wait_exit().success());
    let log: Vec<String> = e.process.seen.iter().map(ToString::to_string).collect();
    assert!(log.len() > 50, "trace logging was on: {} lines", log.len());
    assert!(log.iter().any(|l| l.contains("failed api key")));
    for line in &log {
        for (what, secret) in [
            ("the key", &key),
            ("the new key", &new_key),
            ("the other key", &other_key),
            ("a wrong key", &wrong),
        ] {
            // The random part: the prefix alone is no secret.
            let random = &secret[api_key::PREFIX.len()..];
            assert!(!line.contains(random), "{what} in a log line: {line}");
        }
    }
    drop(e.world);
}

#[test]
fn bad_api_key_config_fails_check_at_its_position() {
    let w = World::new();
    let (_, table) = keygen_api("phone");
    let hash_line = table.lines().find(|l| l.starts_with("hash = ")).unwrap();
    let hash = hash_line
        .trim_start_matches("hash = ")
        .trim_matches('"')
        .to_owned();
    let head = format!(
        "[edge]\nstate_dir = \"/tmp/s\"\n\n[[user]]\nname = \"alice\"\npassword = \"{}\"\n\n{table}",
        cheap_hash("x")
    );
    let route = |auth: &str, keys: &str| {
        let users = if auth == "basic" {
            "users = [\"alice\"]\n"
        } else {
            ""
        };
        format!(
            "\n[[route]]\nhost = \"a.test\"\nagent = \"home\"\nservice = \"s\"\nauth = \"{auth}\"\n{users}api_keys = [{keys}]\n\n\
             [[agent]]\nname = \"home\"\nkey = \"sha256:{}\"\n",
            "0".repeat(63) + "1"
        )
    };
    let ok = w.write("ok.toml", &format!("{head}{}", route("basic", "\"phone\"")));
    let (code, out, err) = run(&["check", "--config", &path_str(&ok)]);
    assert_eq!(code, 0, "{out}{err}");

    let cut = format!("hash = \"{}\"", &hash[..hash.len() - 6]);
    let cases = [
        (
            "unknown",
            format!("{head}{}", route("basic", "\"phone\", \"tablet\"")),
            "api_keys = [\"phone\", \"tablet\"]",
            "\"phone\", ".len() + "api_keys = [".len(),
            "route[0].api_keys[1]: no [[api_key]] named tablet",
        ),
        (
            "open",
            format!("{head}{}", route("none", "\"phone\"")),
            "api_keys = [\"phone\"]",
            "api_keys = [".len(),
            "route[0].api_keys[0]: api keys are taken only on routes with auth = \"basic\"",
        ),
        (
            "cut",
            format!(
                "{}{}",
                head.replace(hash_line, &cut),
                route("basic", "\"phone\"")
            ),
            cut.as_str(),
            "hash = ".len(),
            "api_key[0].hash: not a usable argon2id hash: ",
        ),
    ];
    for (name, text, line_text, col, expected) in cases {
        let line = text.lines().position(|l| l == line_text).unwrap() + 1;
        let path = w.write(&format!("{name}.toml"), &text);
        let (code, _, err) = run(&["check", "--config", &path_str(&path)]);
        assert_eq!(code, 78, "{name}: {err}");
        let expected = format!("{}:{line}:{}: {expected}", path.display(), col + 1);
        assert!(
            err.starts_with(&expected),
            "expected {expected:?}, got {err:?}"
        );
    }

    let (code, out, err) = run(&["keygen-api", "--name", "my phone"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "no key for a bad name: {out}");
    assert!(err.contains("invalid name"), "{err}");
}
