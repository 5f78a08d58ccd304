//! Certificates from a real ACME server: Pebble and pebble-challtestsrv
//! (Debian's `pebble` package) on loopback. challtestsrv is the DNS server
//! that points every name at this test's own loopback address (see
//! [`test_ip`]); Pebble validates against the edge's own HTTP and HTTPS
//! listeners, which the test binds first ([`EdgeSockets`]) so that it can
//! tell Pebble their ports and then hand them to the edge.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use burrow_edge::Prebound;
use burrow_edge::tls::acme::{AcmeManager, CertStatus};
use common::pebble::*;
use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

const NAME: &str = "chat.example.com";

/// The edge's HTTP and HTTPS listeners, bound by the test on [`test_ip`]
/// before Pebble starts (Pebble validates against their ports) and handed
/// to each edge it runs.
struct EdgeSockets {
    http: std::net::TcpListener,
    https: std::net::TcpListener,
}

impl EdgeSockets {
    fn bind() -> Self {
        let listen = || std::net::TcpListener::bind((test_ip(), 0)).unwrap();
        Self {
            http: listen(),
            https: listen(),
        }
    }

    /// The `(http, https)` ports.
    fn ports(&self) -> (u16, u16) {
        let port = |l: &std::net::TcpListener| l.local_addr().unwrap().port();
        (port(&self.http), port(&self.https))
    }

    /// Copies of the listeners for one edge, the HTTP one only if `config`
    /// has `http`. The originals stay bound after that edge stops, for the
    /// next.
    fn hand_over(&self, config: &burrow_edge::EdgeConfig) -> Prebound {
        Prebound {
            https: Some(self.https.try_clone().unwrap()),
            http: config.http.map(|_| self.http.try_clone().unwrap()),
            ..Prebound::default()
        }
    }
}

struct AcmeEdge {
    edge: EdgeHandle,
    acme: Arc<AcmeManager>,
    https: u16,
    started: Instant,
}

fn edge_toml(
    world: &World,
    pebble: &Pebble,
    http: Option<u16>,
    https: u16,
    agent_fp: &str,
) -> String {
    let ip = test_ip();
    let http = http.map_or(String::new(), |p| format!("http = \"{ip}:{p}\"\n"));
    format!(
        "[edge]\nstate_dir = {:?}\nhttps = \"{ip}:{https}\"\n{http}tunnel = \"127.0.0.1:0\"\n\n\
         [tls]\nmode = \"acme\"\nemail = \"ops@example.com\"\ndirectory = \"{}\"\ndirectory_ca = {:?}\nretry_min = \"1s\"\n\n\
         [[agent]]\nname = \"home\"\nkey = \"{agent_fp}\"\n\n\
         [[route]]\nhost = \"{NAME}\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n",
        world.path("state"),
        pebble.directory,
        pebble.directory_ca,
    )
}

async fn start_acme_edge(toml: &str, sockets: &EdgeSockets) -> AcmeEdge {
    let config = edge_config(toml);
    let https = config.https.unwrap().port();
    let started = Instant::now();
    let prebound = sockets.hand_over(&config);
    let edge = burrow_edge::Edge::bind_with(config, prebound)
        .await
        .unwrap();
    let acme = edge.acme().expect("acme mode");
    let (handle, _) = run_edge(edge);
    AcmeEdge {
        edge: handle,
        acme,
        https,
        started,
    }
}

/// Waits until `pred` holds for the status of `NAME`.
async fn wait_status(
    acme: &AcmeManager,
    what: &str,
    pred: impl Fn(&CertStatus) -> bool,
) -> CertStatus {
    let mut changes = acme.subscribe();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(st) = acme.status().get(NAME).filter(|s| pred(s)) {
                return st.clone();
            }
            changes.changed().await.unwrap();
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("certificate never {what}: {:?}", acme.status()))
}

async fn connect_agent(world: &World, edge: &EdgeHandle, key: &std::path::Path) -> AgentHandle {
    let app = demo_app().await;
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n\n[[service]]\nname = \"app\"\nurl = \"http://{app}\"\n",
        edge.tunnel, edge.fingerprint, key
    )));
    let _ = world;
    agent.connected().await;
    agent
}

/// curl verifying the edge against Pebble's root; returns the body.
async fn curl_verified(pebble: &Pebble, https: u16, path: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sSf",
            "--cacert",
            pebble.root.to_str().unwrap(),
            "--resolve",
            &format!("{NAME}:{https}:{}", test_ip()),
            &format!("https://{NAME}:{https}{path}"),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn obtain_with(http01: bool) {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let sockets = EdgeSockets::bind();
    let (http, https) = sockets.ports();
    let pebble = Pebble::start(http, https, None).await;
    let e = start_acme_edge(
        &edge_toml(
            &world,
            &pebble,
            http01.then_some(http),
            https,
            &fp.to_string(),
        ),
        &sockets,
    )
    .await;
    let st = wait_status(&e.acme, "issued", |s| s.not_after.is_some()).await;
    eprintln!(
        "fresh start to valid certificate ({}): {:?}",
        if http01 { "http-01" } else { "tls-alpn-01" },
        e.started.elapsed()
    );
    assert!(st.not_after.unwrap() > SystemTime::now());
    assert_eq!(st.last_error, None);
    let _agent = connect_agent(&world, &e.edge, &key).await;
    let body = curl_verified(&pebble, e.https, "/api/version").await;
    assert!(body.contains("burrow-demo"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_edge_gets_a_certificate_by_http01() {
    obtain_with(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_edge_gets_a_certificate_by_tls_alpn01() {
    obtain_with(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_places_no_new_order() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let sockets = EdgeSockets::bind();
    let (http, https) = sockets.ports();
    let pebble = Pebble::start(http, https, None).await;
    let toml = edge_toml(&world, &pebble, Some(http), https, &fp.to_string());
    let first = start_acme_edge(&toml, &sockets).await;
    let issued = wait_status(&first.acme, "issued", |s| s.not_after.is_some()).await;
    assert!(first.acme.orders() >= 1);
    first.edge.shutdown.cancel();
    let AcmeEdge { mut edge, .. } = first;
    (&mut edge.task).await.unwrap();

    let second = start_acme_edge(&toml, &sockets).await;
    // The certificate on disk is served from the start...
    assert_eq!(second.acme.status()[NAME].not_after, issued.not_after);
    // ...and a full pass of the schedule orders nothing.
    let mut passes = second.acme.passes();
    tokio::time::timeout(WAIT, passes.wait_for(|n| *n >= 1))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.acme.orders(), 0);
    let _agent = connect_agent(&world, &second.edge, &key).await;
    let body = curl_verified(&pebble, second.https, "/api/version").await;
    assert!(body.contains("burrow-demo"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_while_a_websocket_stays_open() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let sockets = EdgeSockets::bind();
    let (http, https) = sockets.ports();
    // 12 s certificates: renewal due after 8 s.
    let pebble = Pebble::start(http, https, Some(Duration::from_secs(12))).await;
    let e = start_acme_edge(
        &edge_toml(&world, &pebble, Some(http), https, &fp.to_string()),
        &sockets,
    )
    .await;
    let first = wait_status(&e.acme, "issued", |s| s.not_after.is_some()).await;
    let _agent = connect_agent(&world, &e.edge, &key).await;

    // A WebSocket opened on the first certificate.
    let tcp = tokio::net::TcpStream::connect((test_ip(), e.https))
        .await
        .unwrap();
    let stream = pebble
        .tls_client()
        .connect(NAME.try_into().unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("wss://{NAME}/ws"), stream)
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("before"));

    let renewed = wait_status(&e.acme, "renewed", |s| {
        s.not_after.is_some_and(|t| t > first.not_after.unwrap())
    })
    .await;
    assert!(e.acme.orders() >= 2);
    // The old connection lives on; new clients verify the new certificate.
    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("after"));
    curl_verified(&pebble, e.https, "/api/version").await;
    assert!(renewed.not_after > first.not_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_ca_gone_the_edge_keeps_serving_and_backs_off() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let sockets = EdgeSockets::bind();
    let (http, https) = sockets.ports();
    // 18 s certificates: renewal due after 12 s, when the CA is gone; three
    // failures (backing off 1 s, 2 s) fit before the certificate expires.
    let mut pebble = Pebble::start(http, https, Some(Duration::from_secs(18))).await;
    let e = start_acme_edge(
        &edge_toml(&world, &pebble, Some(http), https, &fp.to_string()),
        &sockets,
    )
    .await;
    let issued = wait_status(&e.acme, "issued", |s| s.not_after.is_some()).await;
    let _agent = connect_agent(&world, &e.edge, &key).await;
    pebble.pebble.kill().unwrap();
    pebble.pebble.wait().unwrap();

    let first = wait_status(&e.acme, "failed once", |s| s.failures >= 1).await;
    let second = wait_status(&e.acme, "failed twice", |s| s.failures >= 2).await;
    let third = wait_status(&e.acme, "failed three times", |s| s.failures >= 3).await;
    assert!(first.last_error.is_some(), "{first:?}");
    let gap = |a: &CertStatus, b: &CertStatus| {
        b.next_attempt
            .unwrap()
            .duration_since(a.next_attempt.unwrap())
            .unwrap_or_default()
    };
    assert!(
        gap(&second, &third) > gap(&first, &second),
        "delays grow: {first:?} {second:?} {third:?}"
    );
    // Still serving the certificate it has.
    assert_eq!(e.acme.status()[NAME].not_after, issued.not_after);
    let body = curl_verified(&pebble, e.https, "/api/version").await;
    assert!(body.contains("burrow-demo"));
    let _ = &pebble.dir;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_presents_the_acme_certificate_to_agents_that_check_by_name() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let sockets = EdgeSockets::bind();
    let (http, https) = sockets.ports();
    let pebble = Pebble::start(http, https, None).await;
    // The edge's own name gets a certificate too.
    let toml = edge_toml(&world, &pebble, Some(http), https, &fp.to_string()).replacen(
        "[edge]\n",
        "[edge]\nhostname = \"localhost\"\n",
        1,
    );
    let e = start_acme_edge(&toml, &sockets).await;
    let mut changes = e.acme.subscribe();
    tokio::time::timeout(Duration::from_secs(60), async {
        while e
            .acme
            .status()
            .get("localhost")
            .and_then(|s| s.not_after)
            .is_none()
        {
            changes.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no certificate for the edge's name: {:?}", e.acme.status()));

    // No pinned key: the agent checks the edge's certificate for its name.
    let app = demo_app().await;
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"localhost:{}\"\nedge_ca = {:?}\nkey = {:?}\n\n[[service]]\nname = \"app\"\nurl = \"http://{app}\"\n",
        e.edge.tunnel.port(),
        pebble.root,
        key
    )));
    agent.connected().await;
}
