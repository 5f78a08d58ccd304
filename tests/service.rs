//! Running burrow like a service: reload on SIGHUP without dropping
//! connections, graceful SIGTERM, the admin listener's metrics and status,
//! and the systemd units.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::Message;

fn route(host: &str) -> String {
    format!(
        "\n[[route]]\nhost = \"{host}\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n"
    )
}

/// An edge process (self-signed TLS, one route to the demo app) and an
/// in-process agent. Returns the process, its HTTPS address and a Site-like
/// client setup.
struct EdgeProcess {
    world: World,
    process: Process,
    https: std::net::SocketAddr,
    config: std::path::PathBuf,
    base: String,
    roots: Arc<rustls::RootCertStore>,
    _agent: AgentHandle,
    agent_extras: AgentExtras,
    agent_base: String,
}

async fn edge_process(routes: &str) -> EdgeProcess {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let base = format!(
        "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\ngrace = \"10s\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n",
        world.path("state")
    );
    let config = world.write("edge.toml", &format!("{base}{routes}"));
    let mut process = Process::spawn(&["edge", "--config", config.to_str().unwrap()]);
    let listening = process.wait_log("edge listening");
    let tunnel = field_addr(&listening, "tunnel");
    let fingerprint = listening["fingerprint"].as_str().unwrap().to_owned();
    let https = field_addr(&process.wait_log("serving https"), "addr");
    let app = demo_app().await;
    let agent_base = format!(
        "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{fingerprint}\"\nkey = {key:?}\n\n[[service]]\nname = \"app\"\nurl = \"http://{app}\"\n"
    );
    let (mut agent, agent_extras) = start_agent_with(agent_config(&agent_base));
    agent.connected().await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        rustls::pki_types::pem::PemObject::pem_file_iter(world.path("state/self-signed.pem"))
            .unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    EdgeProcess {
        world,
        process,
        https,
        config,
        base,
        roots: Arc::new(roots),
        _agent: agent,
        agent_extras,
        agent_base,
    }
}

impl EdgeProcess {
    async fn tls(&self, host: &str) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.https).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap(),
                tcp,
            )
            .await
            .unwrap()
    }

    /// GET through a fresh connection with TLS for `sni` and Host `host`.
    async fn get(&self, sni: &str, host: &str, path: &str) -> (StatusCode, String) {
        let tls = self.tls(sni).await;
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let r = s
            .send_request(request("GET", host, path, empty()))
            .await
            .unwrap();
        let status = r.status();
        (status, body_text(r).await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_route_without_dropping_a_websocket() {
    let mut e = edge_process(&route("old.test")).await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://old.test/ws", e.tls("old.test").await)
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    assert_eq!(
        e.get("old.test", "new.test", "/api/version").await.0,
        StatusCode::NOT_FOUND
    );

    std::fs::write(
        &e.config,
        format!("{}{}{}", e.base, route("old.test"), route("new.test")),
    )
    .unwrap();
    e.process.signal("HUP");
    e.process.wait_log("config reloaded");

    // The self-signed certificate now covers the new name too.
    let (status, body) = e.get("new.test", "new.test", "/api/version").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("after"),
        "the WebSocket survived the reload"
    );

    // A broken file is refused and nothing changes.
    std::fs::write(
        &e.config,
        format!(
            "{}{}\n[[route]]\nhots = \"typo\"\n",
            e.base,
            route("old.test")
        ),
    )
    .unwrap();
    e.process.signal("HUP");
    let refused = e
        .process
        .wait_log("reload refused; the running config stays");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `hots`"),
        "{refused}"
    );
    assert_eq!(
        e.get("new.test", "new.test", "/api/version").await.0,
        StatusCode::OK
    );
    ws.send(Message::text("still")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("still"));
    let _ = &e.world;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_sse_stream_finish_then_exits_zero() {
    let mut e = edge_process(&route("app.test")).await;
    let tls = e.tls("app.test").await;
    let (mut s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = s
        .send_request(request("GET", "app.test", "/sse?n=40&delay_ms=25", empty()))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = next_chunk(&mut body).await.unwrap();
    assert!(
        first.starts_with(b"data: {\"token\":\"token1 \"}"),
        "{first:?}"
    );

    e.process.signal("TERM");
    e.process.wait_log("draining");
    // The stream runs to its end while the edge drains...
    let mut text = String::from_utf8(first.to_vec()).unwrap();
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
        if let Ok(d) = frame.unwrap().into_data() {
            text.push_str(std::str::from_utf8(&d).unwrap());
        }
    }
    assert_eq!(text.matches("data: {\"token\"").count(), 40, "{text}");
    assert!(text.ends_with("event: done\ndata: {}\n\n"), "{text}");
    // ...and only then does the process exit, cleanly.
    let status = e.process.wait_exit();
    assert!(status.success(), "exit: {status}");
    assert!(
        e.process
            .seen
            .iter()
            .any(|l| l["message"] == "edge stopped")
    );
}

/// Parses Prometheus text exposition format strictly enough to catch
/// mistakes: every sample belongs to a family declared by HELP and TYPE,
/// label syntax is well formed, values are numbers.
fn parse_prometheus(text: &str) -> BTreeMap<String, Vec<(String, f64)>> {
    let mut declared: BTreeMap<String, String> = BTreeMap::new();
    let mut samples: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            assert!(rest.split_once(' ').is_some(), "HELP without text: {line}");
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            declared.insert(name.to_owned(), kind.to_owned());
            samples.entry(name.to_owned()).or_default();
        } else {
            assert!(!line.starts_with('#'), "unknown comment: {line}");
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample: {line}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => {
                    let l = l
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("unclosed labels: {line}"));
                    for pair in l.split("\",").filter(|p| !p.is_empty()) {
                        let (k, v) = pair
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label: {line}"));
                        assert!(
                            k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                            "{line}"
                        );
                        let _ = v;
                    }
                    (n, l.to_owned())
                }
                None => (series, String::new()),
            };
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| declared.get(*f).is_some_and(|k| k == "histogram"))
                })
                .unwrap_or(name);
            assert!(
                declared.contains_key(family),
                "sample of an undeclared family: {line}"
            );
            samples
                .entry(family.to_owned())
                .or_default()
                .push((labels, value));
        }
    }
    samples
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_carry_the_series() {
    let (addr, _) = upstream().await;
    let hash = {
        use argon2::password_hash::{PasswordHasher, SaltString};
        let params = argon2::Params::new(1024, 1, 1, None).unwrap();
        argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
            .hash_password(
                b"pw",
                &SaltString::encode_b64(b"metrics-test-salt").unwrap(),
            )
            .unwrap()
            .to_string()
    };
    let routes = format!(
        "[[user]]\nname = \"u\"\npassword = \"{hash}\"\n\n[[route]]\nhost = \"m.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"basic\"\nusers = [\"u\"]\npublic_paths = [\"/headers\"]\n"
    );
    let site = site(
        "admin = \"127.0.0.1:0\"",
        &routes,
        &[("test", format!("http://{addr}"))],
    )
    .await;
    let admin = site.admin.unwrap();
    assert_eq!(
        site.get("m.test", "/headers").await.status(),
        StatusCode::OK
    );
    assert_eq!(
        site.get("m.test", "/private").await.status(),
        StatusCode::UNAUTHORIZED
    );

    let fetch = |path: &'static str| async move {
        let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn);
        let r = s
            .send_request(request("GET", "localhost", path, empty()))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        body_text(r).await
    };
    let text = fetch("/metrics").await;
    let m = parse_prometheus(&text);
    for family in [
        "burrow_agents_connected",
        "burrow_streams_open",
        "burrow_bytes_total",
        "burrow_http_responses_total",
        "burrow_auth_failures_total",
        "burrow_throttled_addresses",
        "burrow_certificate_expiry_timestamp_seconds",
        "burrow_service_state",
        "burrow_time_to_first_byte_seconds",
        "burrow_wake_requests_total",
        "burrow_requests_held",
        "burrow_last_wake_duration_seconds",
    ] {
        assert!(m.contains_key(family), "missing {family} in\n{text}");
    }
    assert_eq!(m["burrow_agents_connected"], vec![(String::new(), 1.0)]);
    assert!(
        m["burrow_http_responses_total"].contains(&("code=\"200\"".to_owned(), 1.0)),
        "{text}"
    );
    assert!(
        m["burrow_http_responses_total"].contains(&("code=\"401\"".to_owned(), 1.0)),
        "{text}"
    );
    assert_eq!(m["burrow_auth_failures_total"], vec![(String::new(), 1.0)]);
    assert!(
        m["burrow_bytes_total"].iter().all(|(_, v)| *v > 0.0),
        "{text}"
    );
    assert!(
        m["burrow_certificate_expiry_timestamp_seconds"]
            .iter()
            .any(|(l, v)| l == "name=\"m.test\"" && *v > 1.7e9),
        "{text}"
    );
    assert!(
        m["burrow_service_state"]
            .iter()
            .any(|(l, _)| l.contains("service=\"test\"")),
        "{text}"
    );

    let status: serde_json::Value = serde_json::from_str(&fetch("/status").await).unwrap();
    assert_eq!(status["agents"][0]["name"], "home");
    assert_eq!(status["certificates"][0]["name"], "m.test");
    assert_eq!(status["services"][0]["service"], "test");
}

fn unit_for_test(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("burrow-units-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/").to_owned() + name)
            .unwrap();
    // The units name the installed path; point them at the built binary.
    let path = dir.join(name);
    std::fs::write(&path, text.replace("/usr/local/bin/burrow", burrow_bin())).unwrap();
    path
}

#[test]
fn systemd_units_verify_and_are_hardened() {
    // The socket unit sits beside the service it names.
    let socket = unit_for_test("burrow-edge.socket");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&socket)
        .arg(unit_for_test("burrow-edge.service"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "burrow-edge.socket: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for name in ["burrow-edge.service", "burrow-agent.service"] {
        let unit = unit_for_test(name);
        let out = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit)
            .output()
            .expect("systemd-analyze runs (CI installs systemd)");
        let text = String::from_utf8_lossy(&out.stdout);
        let level: f64 = text
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level in:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        assert!(level <= 2.0, "{name}: exposure {level}");
        let out = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&unit)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reload_adds_a_service_without_dropping_a_websocket() {
    let e = edge_process(&format!(
        "{}{}",
        route("a.test"),
        route("b.test").replace("\"app\"", "\"app2\"")
    ))
    .await;
    let (mut ws, _) = tokio_tungstenite::client_async("wss://a.test/ws", e.tls("a.test").await)
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));
    // The agent does not know app2 yet.
    assert_eq!(
        e.get("a.test", "b.test", "/api/version").await.0,
        StatusCode::BAD_GATEWAY
    );

    let app2 = demo_app().await;
    let mut views = e.agent_extras.services.clone();
    e.agent_extras
        .reload
        .send(agent_config(&format!(
            "{}\n[[service]]\nname = \"app2\"\nurl = \"http://{app2}\"\n",
            e.agent_base
        )))
        .await
        .unwrap();
    tokio::time::timeout(
        WAIT,
        views.wait_for(|v| v.iter().any(|s| s.name.as_str() == "app2")),
    )
    .await
    .unwrap()
    .unwrap();

    let (status, body) = e.get("a.test", "b.test", "/api/version").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::text("after"),
        "the tunnel and the WebSocket stayed"
    );
}

/// What the test's health endpoint does with the next probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    Ok,
    Failing,
    /// Read the request, answer nothing while the mode stays `Hang`, then
    /// close: a probe that hangs until the test lets it go.
    Hang,
}

/// A health endpoint the test steers; each probe that starts hanging is
/// announced on the returned receiver.
async fn steered_health(
    mode: tokio::sync::watch::Receiver<Health>,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (hung, hangs) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut mode = mode.clone();
            let hung = hung.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let now = *mode.borrow_and_update();
                let status = match now {
                    Health::Ok => "200 OK",
                    Health::Failing => "503 Service Unavailable",
                    Health::Hang => {
                        let _ = hung.send(());
                        let _ = mode.wait_for(|m| *m != Health::Hang).await;
                        return;
                    }
                };
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    (addr, hangs)
}

/// Issue 16: a reload while a probe was in flight used to drop that
/// probe's result and never arm the next one, so the service's state froze.
#[tokio::test]
async fn an_agent_reload_during_a_hung_probe_keeps_the_service_probed() {
    use burrow_proto::{Name, ServiceState};
    let (steer, mode) = tokio::sync::watch::channel(Health::Ok);
    let (health, mut hangs) = steered_health(mode).await;
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let edge = start_edge(edge_config(&tunnel_only_edge_toml(&world, &fp))).await;
    let agent_toml = format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n\n\
         [[service]]\nname = \"gpu\"\nurl = \"http://{health}\"\nhealth = \"/health\"\nprobe_interval = \"100ms\"\n",
        edge.tunnel, edge.fingerprint, key
    );
    let (mut agent, extras) = start_agent_with(agent_config(&agent_toml));
    agent.connected().await;
    let (home, gpu) = (Name::new("home").unwrap(), Name::new("gpu").unwrap());
    let mut changes = edge.registry.subscribe();
    let edge_state = |want: ServiceState| {
        let registry = edge.registry.clone();
        let (home, gpu) = (home.clone(), gpu.clone());
        move |_: &u64| {
            registry
                .service(&home, &gpu)
                .is_some_and(|s| s.state == want)
        }
    };
    tokio::time::timeout(WAIT, changes.wait_for(edge_state(ServiceState::Up)))
        .await
        .expect("the edge sees gpu up")
        .unwrap();

    // A probe hangs; the agent reloads (same services) meanwhile.
    steer.send_replace(Health::Hang);
    tokio::time::timeout(WAIT, hangs.recv())
        .await
        .expect("a probe hangs")
        .unwrap();
    let mut views = extras.services.clone();
    views.borrow_and_update();
    extras.reload.send(agent_config(&agent_toml)).await.unwrap();
    tokio::time::timeout(WAIT, views.changed())
        .await
        .expect("the reload is applied")
        .unwrap();

    // The hung probe ends, the PC goes down, then answers again: the
    // agent must see both, and tell the edge.
    steer.send_replace(Health::Failing);
    tokio::time::timeout(WAIT, views.wait_for(|v| v[0].state == ServiceState::Down))
        .await
        .expect("probes go on after the reload: gpu is seen down")
        .unwrap();
    steer.send_replace(Health::Ok);
    tokio::time::timeout(WAIT, changes.wait_for(edge_state(ServiceState::Up)))
        .await
        .expect("the edge sees gpu up again")
        .unwrap();
}
