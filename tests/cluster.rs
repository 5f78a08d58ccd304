//! Several edges for one domain, sharing state through one Redis
//! (`[cluster]`): an agent with `[agent] edges` keeps a
//! session with each (its own reconnects and transport), so a request
//! through any edge reaches the service and an edge that dies takes no
//! service down. The edge that is killed runs as a process whose sockets
//! a holder keeps, as systemd does, so it comes back on the same ports.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_agent::AgentStatus;
use burrow_edge::Prebound;
use burrow_edge::tls::acme::{AcmeManager, CertStatus};
use common::pebble::*;
use common::redis::Redis;
use common::standin::*;
use common::web::*;
use common::*;
use tokio::sync::watch;

/// An edge.toml for `state` with the shared identity key and one open
/// route to the agent's service; `listen` is the rest of `[edge]`.
fn edge_toml(
    world: &World,
    state: &str,
    fp: &burrow_proto::identity::Fingerprint,
    listen: &str,
    redis: &Redis,
) -> String {
    format!(
        "[edge]\nstate_dir = {:?}\nkey = {:?}\n{listen}\n\n[tls]\nmode = \"self-signed\"\n\n\
         [cluster]\nredis = \"{}\"\nsecret_file = {:?}\n\n\
         [[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
         [[route]]\nhost = \"chat.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n",
        world.path(state),
        world.path("edge.key"),
        redis.url(),
        world.write(
            "cluster.key",
            "0123456789abcdef0123456789abcdef-cluster-test-secret"
        ),
    )
}

/// GET https://chat.test/headers through the edge at `https`, trusting
/// its self-signed certificate in `state`; the response body.
fn get_through(world: &World, state: &str, https: SocketAddr) -> String {
    get_path(
        &world.path(&format!("{state}/self-signed.pem")),
        https,
        "/headers",
    )
}

/// GET https://chat.test`path` through the edge at `https`, trusting
/// `cacert`; the response body.
fn get_path(cacert: &std::path::Path, https: SocketAddr, path: &str) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            &path_str(cacert),
            "--resolve",
            &format!("chat.test:{}:127.0.0.1", https.port()),
            &format!("https://chat.test:{}{path}", https.port()),
        ])
        .output()
        .expect("curl runs (CI installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_status(
    status: &mut watch::Receiver<AgentStatus>,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) {
    if tokio::time::timeout(WAIT, status.wait_for(|s| pred(s)))
        .await
        .is_err()
    {
        panic!("edge session never {what}; last {:?}", *status.borrow());
    }
}

fn connected(s: &AgentStatus) -> bool {
    matches!(s, AgentStatus::Connected { .. })
}

/// The process that holds edge A's sockets for the whole test, as systemd
/// does (`tests/restart/activate.py`), so the edge can crash and start
/// again on the same ports without any other test taking them meanwhile.
struct Holder(Process);

impl Drop for Holder {
    fn drop(&mut self) {
        self.0.signal("TERM");
        let _ = self.0.wait_exit();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_two_edges_serves_through_both_and_is_back_on_a_killed_edge_within_2s() {
    let world = World::new();
    let (agent_key, agent_fp) = world.agent_key("home");
    // Both edges present one identity, which the agent pins.
    let edge_fp = burrow_proto::identity::Identity::create(&world.path("edge.key"))
        .unwrap()
        .fingerprint();
    let (service, _up) = upstream().await;
    let redis = Redis::start(&world.path("redis"));
    let config_a = world.path("a.toml");
    let mut holder = std::process::Command::new("python3");
    holder
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/restart/activate.py"
        ))
        .arg(burrow_bin())
        .arg(&config_a);
    let mut a = Holder(Process::spawn_command(holder));
    let sockets = a.0.wait_log("sockets");
    let (a_https, a_tunnel) = (
        field_addr(&sockets, "https"),
        field_addr(&sockets, "tunnel"),
    );
    let a_admin = field_addr(&sockets, "admin");
    let listen_a = format!("https = \"{a_https}\"\ntunnel = \"{a_tunnel}\"\nadmin = \"{a_admin}\"");
    std::fs::write(
        &config_a,
        edge_toml(&world, "a", &agent_fp, &listen_a, &redis),
    )
    .unwrap();
    a.0.signal("USR2");
    a.0.wait_log("serving https");
    let b = start_edge(edge_config(&edge_toml(
        &world,
        "b",
        &agent_fp,
        "https = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"",
        &redis,
    )))
    .await;
    let (b_https, b_tunnel) = (b.https.unwrap(), b.tunnel);

    let agent_toml = format!(
        "[agent]\nname = \"home\"\nedges = [\"{a_tunnel}\", \"{b_tunnel}\"]\nedge_key = \"{edge_fp}\"\nkey = {agent_key:?}\n\n\
         [[service]]\nname = \"test\"\nurl = \"http://{service}\"\n"
    );
    let (_agent, extras) = start_agent_with(agent_config(&agent_toml));
    let (mut to_a, mut to_b) = (extras.edges[0].clone(), extras.edges[1].clone());
    wait_status(&mut to_a, "connected to A", connected).await;
    wait_status(&mut to_b, "connected to B", connected).await;

    // Any edge serves any request.
    assert_eq!(get_through(&world, "a", a_https), "seen");
    let (_, _, metrics) = admin_get(a_admin, "/metrics").await;
    assert!(metrics.contains("burrow_cluster_redis_up 1"), "{metrics}");
    let (_, _, status) = admin_get(a_admin, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["cluster"]["redis"], "up", "{status}");
    assert_eq!(get_through(&world, "b", b_https), "seen");

    // A dies without a word: B keeps serving, and the agent's session
    // with B never noticed.
    let session_b = to_b.borrow().clone();
    a.0.signal("HUP");
    a.0.wait_log("killed");
    for _ in 0..5 {
        assert_eq!(get_through(&world, "b", b_https), "seen");
    }
    assert_eq!(*to_b.borrow(), session_b);

    // A comes back on its sockets: the agent is on it within 2 s of its
    // start. (Until then nothing answers the agent's pings on its session
    // with A; the new process answers them with a stateless reset.)
    tokio::time::sleep(Duration::from_secs(3)).await; // an outage, not a readiness wait
    a.0.signal("USR2");
    a.0.wait_log("edge listening");
    let restarted = Instant::now();
    // The new process says so when the agent's session is up.
    a.0.wait_log("agent connected");
    let back = restarted.elapsed();
    wait_status(&mut to_a, "back on A", connected).await;
    eprintln!("agent back on the restarted edge after {back:?}");
    assert!(back < Duration::from_secs(2), "{back:?}");
    assert_eq!(get_through(&world, "a", a_https), "seen");
}

// ---------------------------------------------------------------------
// Two edges sharing state through Redis (`[cluster]`), with Pebble.

const NAME: &str = "chat.example.com";
const NEW_NAME: &str = "new.example.com";

/// An edge of the cluster running in this process, with its ACME manager
/// and a way to reload its config.
struct ClusterEdge {
    handle: EdgeHandle,
    acme: Arc<AcmeManager>,
    https: SocketAddr,
    reload: tokio::sync::mpsc::Sender<burrow_edge::EdgeConfig>,
    toml: std::path::PathBuf,
}

/// What an edge of the test cluster needs.
struct Cluster<'a> {
    world: &'a World,
    pebble: &'a Pebble,
    redis: &'a Redis,
    agent_fp: String,
}

impl Cluster<'_> {
    /// edge.toml for edge `id`: ACME from Pebble, `[cluster]` on Redis,
    /// one user and a basic-auth route for each of `hosts`.
    fn toml(&self, id: &str, listen: &str, hosts: &[&str]) -> String {
        let routes: String = hosts
            .iter()
            .map(|h| {
                format!(
                    "[[route]]\nhost = \"{h}\"\nagent = \"home\"\nservice = \"test\"\nauth = \"basic\"\nusers = [\"alice\"]\n\n"
                )
            })
            .collect();
        format!(
            "[edge]\nstate_dir = {:?}\nkey = {:?}\n{listen}\ntunnel = \"127.0.0.1:0\"\n\n\
             [tls]\nmode = \"acme\"\nemail = \"ops@example.com\"\ndirectory = \"{}\"\ndirectory_ca = {:?}\nretry_min = \"1s\"\n\n\
             [cluster]\nredis = \"{}\"\nsecret_file = {:?}\n\n\
             [[agent]]\nname = \"home\"\nkey = \"{}\"\n\n\
             [[user]]\nname = \"alice\"\npassword = \"{}\"\n\n{routes}",
            self.world.path(id),
            self.world.path("edge.key"),
            self.pebble.directory,
            self.pebble.directory_ca,
            self.redis.url(),
            self.world.path("cluster.key"),
            self.agent_fp,
            cheap_hash("wonderland"),
        )
    }

    async fn start(&self, id: &str, listen: &str, prebound: Prebound) -> ClusterEdge {
        let text = self.toml(id, listen, &[NAME]);
        let toml = self.world.write(&format!("{id}.toml"), &text);
        let config = burrow_edge::EdgeConfig::load(&toml).unwrap();
        let edge = burrow_edge::Edge::bind_with(config, prebound)
            .await
            .unwrap();
        let acme = edge.acme().expect("acme mode");
        let (handle, reload) = run_edge(edge);
        ClusterEdge {
            https: handle.https.unwrap(),
            handle,
            acme,
            reload,
            toml,
        }
    }
}

impl ClusterEdge {
    /// Waits until `name`'s status passes `pred`.
    async fn wait_cert(&self, name: &str, what: &str, pred: impl Fn(&CertStatus) -> bool) {
        let mut changes = self.acme.subscribe();
        let found = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if self.acme.status().get(name).is_some_and(&pred) {
                    return;
                }
                changes.changed().await.unwrap();
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("{name} never {what}: {:?}", self.acme.status()));
    }

    fn issued(&self, name: &str) -> bool {
        self.acme
            .status()
            .get(name)
            .is_some_and(|s| s.not_after.is_some())
    }
}

/// The leaf certificate the edge at `addr` serves for `name`, verified
/// against Pebble's root.
async fn served_leaf(pebble: &Pebble, addr: SocketAddr, name: &str) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = pebble
        .tls_client()
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_owned()).unwrap(),
            tcp,
        )
        .await
        .expect("the certificate verifies against Pebble's root");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One request with curl through the edge at `addr` as `name`, verifying
/// it against `cacert` (Pebble's root, or an edge's self-signed
/// certificate): the status code and the response headers.
async fn curl(cacert: &Path, addr: SocketAddr, name: &str, args: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "/dev/null", "-D", "-"])
        .args(["-w", "%{http_code}", "--cacert"])
        .arg(cacert)
        .args([
            "--resolve",
            &format!("{name}:{}:{}", addr.port(), addr.ip()),
        ])
        .args(args)
        .arg(format!("https://{name}:{}/headers", addr.port()))
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text[text.len() - 3..].parse().unwrap();
    (code, text)
}

/// The session cookie (`name=value`) in response headers.
fn session_cookie(headers: &str) -> String {
    headers
        .lines()
        .filter_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .map(|c| c.split(';').next().unwrap().to_owned())
        .find(|c| c.starts_with("__Host-burrow="))
        .unwrap_or_else(|| panic!("no session cookie in {headers}"))
}

/// Two edges, one Redis, one agent dialling both; edge B is where Pebble
/// validates, edge A places the order (B is started once A is ordering),
/// so the certificate is issued only if B answers A's challenge from
/// Redis. `http01` picks the challenge (else TLS-ALPN-01).
async fn two_edges(
    world: &World,
    redis: &Redis,
    http01: bool,
) -> (Pebble, ClusterEdge, ClusterEdge) {
    let (_, agent_fp) = world.agent_key("home");
    burrow_proto::identity::Identity::create(&world.path("edge.key")).unwrap();
    world.write(
        "cluster.key",
        "0123456789abcdef0123456789abcdef-cluster-test-secret",
    );
    let ip = test_ip();
    let b_http = std::net::TcpListener::bind((ip, 0)).unwrap();
    let b_https = std::net::TcpListener::bind((ip, 0)).unwrap();
    let pebble = Pebble::start(
        b_http.local_addr().unwrap().port(),
        b_https.local_addr().unwrap().port(),
        None,
    )
    .await;
    let cluster = Cluster {
        world,
        pebble: &pebble,
        redis,
        agent_fp: agent_fp.to_string(),
    };
    let http = |addr: String| match http01 {
        true => format!("http = \"{addr}\"\n"),
        false => String::new(),
    };
    let a = cluster
        .start(
            "a",
            &format!("https = \"{ip}:0\"\n{}", http(format!("{ip}:0"))),
            Prebound::default(),
        )
        .await;
    // A holds the name's lock and has placed the order before B runs.
    let mut changes = a.acme.subscribe();
    tokio::time::timeout(WAIT, async {
        while a.acme.orders() == 0 {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("edge A orders");
    let b = cluster
        .start(
            "b",
            &format!(
                "https = \"{}\"\n{}",
                b_https.local_addr().unwrap(),
                http(b_http.local_addr().unwrap().to_string())
            ),
            Prebound {
                https: Some(b_https),
                http: http01.then_some(b_http),
                ..Prebound::default()
            },
        )
        .await;
    a.wait_cert(NAME, "issued on A", |s| s.not_after.is_some())
        .await;
    b.wait_cert(NAME, "taken by B", |s| s.not_after.is_some())
        .await;
    assert_eq!(pebble.orders(), 1, "Pebble took exactly one order");
    assert_eq!((a.acme.orders(), b.acme.orders()), (1, 0));
    assert_eq!(
        served_leaf(&pebble, a.https, NAME).await,
        served_leaf(&pebble, b.https, NAME).await,
        "both edges serve the same certificate"
    );
    (pebble, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_answer_each_others_tls_alpn_challenges_and_order_once() {
    let world = World::new();
    let redis = Redis::start(&world.path("redis"));
    let _ = two_edges(&world, &redis, false).await;
    // Sealed at rest: the key is in Redis, the PEM is not readable there.
    let stored = redis.cli(&["--no-raw", "GET", &format!("burrow:acme:cert:{NAME}")]);
    assert!(stored.len() > 200, "{stored}");
    assert!(
        !stored.contains("BEGIN"),
        "certificate stored in clear: {stored}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_edges_share_certificates_sessions_and_login_counters_through_redis() {
    let world = World::new();
    let mut redis = Redis::start(&world.path("redis"));
    let (pebble, a, b) = two_edges(&world, &redis, true).await;

    // One agent dialling both: a request through each edge reaches it.
    let agent_key = world.path("home.key");
    let (service, _up) = upstream().await;
    let agent_toml = format!(
        "[agent]\nname = \"home\"\nedges = [\"{}\", \"{}\"]\nedge_key = \"{}\"\nkey = {agent_key:?}\n\n\
         [[service]]\nname = \"test\"\nurl = \"http://{service}\"\n",
        a.handle.tunnel, b.handle.tunnel, a.handle.fingerprint
    );
    let (_agent, extras) = start_agent_with(agent_config(&agent_toml));
    let (mut to_a, mut to_b) = (extras.edges[0].clone(), extras.edges[1].clone());
    wait_status(&mut to_a, "connected to A", connected).await;
    wait_status(&mut to_b, "connected to B", connected).await;

    // A session cookie issued by A is taken by B.
    let (code, headers) = curl(&pebble.root, a.https, NAME, &["-u", "alice:wonderland"]).await;
    assert_eq!(code, 200, "{headers}");
    let cookie = session_cookie(&headers);
    let with_cookie = ["-H", &format!("Cookie: {cookie}")];
    for edge in [&a, &b] {
        let (code, headers) = curl(&pebble.root, edge.https, NAME, &with_cookie).await;
        assert_eq!(code, 200, "{headers}");
    }

    // Redis stopped for 30 s: both edges keep serving the name and the
    // session; a name added meanwhile waits for Redis, on both edges.
    redis.stop();
    for edge in [&a, &b] {
        let text = std::fs::read_to_string(&edge.toml).unwrap().replace(
            "[[route]]",
            &format!("[[route]]\nhost = \"{NEW_NAME}\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n\n[[route]]"),
        );
        std::fs::write(&edge.toml, text).unwrap();
        let config = burrow_edge::EdgeConfig::load(&edge.toml).unwrap();
        edge.reload.send(config).await.unwrap();
    }
    for edge in [&a, &b] {
        edge.wait_cert(NEW_NAME, "waiting on Redis", |s| {
            s.last_error.as_deref().is_some_and(|e| e.contains("Redis"))
        })
        .await;
    }
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(30) {
        for edge in [&a, &b] {
            let (code, headers) = curl(&pebble.root, edge.https, NAME, &with_cookie).await;
            assert_eq!(code, 200, "while Redis is down: {headers}");
            assert!(!edge.issued(NEW_NAME));
        }
        assert_eq!(pebble.orders(), 1, "no order while Redis is down");
        // The outage's length, not a readiness wait.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    redis.resume();
    a.wait_cert(NEW_NAME, "issued after Redis came back", |s| {
        s.not_after.is_some()
    })
    .await;
    b.wait_cert(NEW_NAME, "issued after Redis came back", |s| {
        s.not_after.is_some()
    })
    .await;
    assert_eq!(pebble.orders(), 2, "one order for the new name, not two");
    assert_eq!(a.acme.orders() + b.acme.orders(), 2);
    assert_eq!(
        served_leaf(&pebble, a.https, NEW_NAME).await,
        served_leaf(&pebble, b.https, NEW_NAME).await
    );

    // `burrow logout-all` on A: B refuses the session too (it reads the
    // generation from Redis once a second).
    let (code, out, err) = run(&["logout-all", "--config", &path_str(&a.toml)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("every edge of the cluster"), "{out}");
    let revoked = Instant::now();
    loop {
        let (code, _) = curl(&pebble.root, b.https, NAME, &with_cookie).await;
        if code == 401 {
            break;
        }
        assert_eq!(code, 200);
        assert!(
            revoked.elapsed() < WAIT,
            "B still takes the revoked session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await; // polling B, bounded above
    }
    eprintln!("revocation reached edge B after {:?}", revoked.elapsed());
    assert_eq!(curl(&pebble.root, a.https, NAME, &with_cookie).await.0, 401);

    // 20 wrong logins at once, split over both edges, from one address:
    // the address's 5 free failures are counted once for the cluster.
    let mut guesses = tokio::task::JoinSet::new();
    for i in 0..20 {
        let https = if i % 2 == 0 { a.https } else { b.https };
        let root = pebble.root.clone();
        guesses.spawn(async move {
            let guess = format!("alice:guess{i}");
            curl(&root, https, NAME, &["-u", &guess]).await.0
        });
    }
    let mut codes = Vec::new();
    while let Some(code) = guesses.join_next().await {
        codes.push(code.unwrap());
    }
    let checked = codes.iter().filter(|c| **c == 401).count();
    let throttled = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(checked + throttled, 20, "{codes:?}");
    // Counted per edge, each would check 5 or 6 of its 10: 10 at least.
    assert!(
        checked <= burrow_edge::access::throttle::ADDR_FREE_FAILURES as usize + 1,
        "{checked} guesses were checked: {codes:?}"
    );
    // One more wrong guess on A locks the address; B refuses even the
    // right password (its own counters saw too few failures to lock).
    curl(&pebble.root, a.https, NAME, &["-u", "alice:one-more"]).await;
    let (code, headers) = curl(&pebble.root, b.https, NAME, &["-u", "alice:wonderland"]).await;
    assert_eq!(code, 429, "{headers}");
}

/// The route of [`wake_edge_toml`]'s edges: a chat held while its PC wakes.
fn wake_edge_toml(world: &World, state: &str, fp: &burrow_proto::identity::Fingerprint) -> String {
    format!(
        "[edge]\nstate_dir = {:?}\nkey = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n\n\
         [tls]\nmode = \"self-signed\"\n\n\
         [[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
         [[route]]\nhost = \"chat.test\"\nagent = \"home\"\nservice = \"ollama\"\nauth = \"none\"\n\
         [route.wake]\nhold = \"60s\"\n",
        world.path(state),
        world.path("edge.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_pc_is_woken_once_when_requests_come_in_on_both_edges() {
    let world = World::new();
    let (agent_key, agent_fp) = world.agent_key("home");
    let edge_fp = burrow_proto::identity::Identity::create(&world.path("edge.key"))
        .unwrap()
        .fingerprint();
    let mut pc = StandIn::start(Boot::WhenReleased, Power::Asleep).await;
    let a = start_edge(edge_config(&wake_edge_toml(&world, "a", &agent_fp))).await;
    let b = start_edge(edge_config(&wake_edge_toml(&world, "b", &agent_fp))).await;
    let agent_toml = format!(
        "[agent]\nname = \"home\"\nedges = [\"{}\", \"{}\"]\nedge_key = \"{edge_fp}\"\nkey = {agent_key:?}\n\n\
         [[service]]\nname = \"ollama\"\nurl = \"http://{}\"\nhealth = \"/api/version\"\nprobe_interval = \"5s\"\n\
         [service.wake]\nmac = \"{MAC_TEXT}\"\nbroadcast = \"{}\"\n",
        a.tunnel, b.tunnel, pc.http, pc.udp
    );
    let (_agent, extras) = start_agent_with(agent_config(&agent_toml));
    let (mut to_a, mut to_b) = (extras.edges[0].clone(), extras.edges[1].clone());
    wait_status(&mut to_a, "connected to A", connected).await;
    wait_status(&mut to_b, "connected to B", connected).await;
    let (home, ollama) = (
        burrow_proto::Name::new("home").unwrap(),
        burrow_proto::Name::new("ollama").unwrap(),
    );
    let wait_edge = |edge: &EdgeHandle,
                     what: &'static str,
                     pred: fn(&burrow_edge::tunnel::ServiceReport) -> bool| {
        let registry = edge.registry.clone();
        let (home, ollama) = (home.clone(), ollama.clone());
        async move {
            let mut changes = registry.subscribe();
            let seen = tokio::time::timeout(WAIT, async {
                loop {
                    changes.borrow_and_update();
                    if registry
                        .service_report(&home, &ollama)
                        .is_some_and(|r| pred(&r))
                    {
                        return;
                    }
                    changes.changed().await.unwrap();
                }
            })
            .await;
            seen.unwrap_or_else(|_| panic!("an edge never saw {what}"));
        }
    };
    for edge in [&a, &b] {
        wait_edge(edge, "the PC asleep", |r| {
            r.state == burrow_proto::ServiceState::Down
        })
        .await;
    }

    // A chat through each edge while the PC sleeps: both are held.
    let mut chats = Vec::new();
    for (state, edge) in [("a", &a), ("b", &b)] {
        let (cacert, https) = (
            world.path(&format!("{state}/self-signed.pem")),
            edge.https.unwrap(),
        );
        chats.push(tokio::task::spawn_blocking(move || {
            get_path(&cacert, https, "/api/tags")
        }));
        wait_edge(edge, "the chat held", |r| r.held == 1).await;
    }
    pc.wait_power(Power::Booting).await;
    pc.finish_boot();
    for chat in chats {
        assert_eq!(chat.await.unwrap(), TAGS);
    }
    assert_eq!(pc.boots(), 1, "the PC booted once");
    let wakes = extras
        .services
        .borrow()
        .iter()
        .find(|s| s.name == ollama)
        .unwrap()
        .wakes;
    assert_eq!(wakes, 1, "the agent woke it once for both edges");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_reaches_redis_over_tls_with_a_password_file_and_never_logs_it() {
    let world = World::new();
    // Redis's certificate, from a CA the edge is told to trust the way
    // OpenSSL-minded tools are (SSL_CERT_FILE, read by rustls-native-certs).
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec![test_ip().to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let ca = world.write("redis-ca.pem", &ca_cert.pem());
    let cert = world.write("redis-cert.pem", &cert.pem());
    let key = world.write("redis-key.pem", &key.serialize_pem());
    const PASSWORD: &str = "hunter2-redis-password";
    let mut port = 0;
    let (_redis, _) = spawn_until(
        || {
            port = pebble_port();
            let mut cmd = std::process::Command::new("redis-server");
            cmd.args(["--port", "0", "--bind", test_ip(), "--tls-port"])
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .args(["--tls-auth-clients", "no", "--requirepass", PASSWORD])
                .args(["--save", "", "--logfile", ""]);
            cmd
        },
        "Ready to accept connections",
    );
    let mut redis_guard = KillOnDrop(_redis);
    let password_file = world.write("redis.password", &format!("{PASSWORD}\n"));
    let (_, agent_fp) = world.agent_key("home");
    let config = world.write(
        "edge.toml",
        &format!(
            "[edge]\nstate_dir = {:?}\ntunnel = \"127.0.0.1:0\"\n\n\
             [cluster]\nredis = \"rediss://{}:{port}/0\"\nredis_password_file = {:?}\nsecret_file = {:?}\n\n\
             [[agent]]\nname = \"home\"\nkey = \"{agent_fp}\"\n",
            world.path("state"),
            test_ip(),
            password_file,
            world.write("cluster.key", "0123456789abcdef0123456789abcdef-cluster-test-secret"),
        ),
    );
    // Without the CA, Redis's certificate is refused.
    let mut untrusting = Process::spawn(&["edge", "--config", &path_str(&config)]);
    untrusting
        .wait_log("cluster: Redis is unreachable; serving with what this edge holds, retrying");
    drop(untrusting);
    let mut command = std::process::Command::new(burrow_bin());
    command
        .args(["--log-format", "json", "edge", "--config"])
        .arg(&config)
        .env("SSL_CERT_FILE", &ca);
    let mut edge = Process::spawn_command(command);
    edge.wait_log("cluster: Redis is reachable");
    // The edge offered its session key: it is in Redis, sealed.
    let out = std::process::Command::new("redis-cli")
        // The probe only: the edge is the one whose verification counts.
        .args(["--tls", "--insecure"])
        .args(["-h", test_ip(), "-p", &port.to_string(), "-a", PASSWORD])
        .args(["--no-auth-warning", "STRLEN", "burrow:sessions:key"])
        .output()
        .unwrap();
    let len: usize = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("redis-cli: {out:?}"));
    assert_eq!(len, 12 + 32 + 16, "nonce, key, tag");
    edge.signal("TERM");
    edge.wait_exit();
    let logged = serde_json::to_string(&edge.seen).unwrap();
    assert!(!logged.contains(PASSWORD), "{logged}");
    redis_guard.0.kill().unwrap();
}

/// Kills a child process when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_counts_requests_on_both_edges_against_one_budget() {
    let world = World::new();
    let redis = Redis::start(&world.path("redis"));
    let (_, agent_fp) = world.agent_key("home");
    burrow_proto::identity::Identity::create(&world.path("edge.key")).unwrap();
    // No agent: a request the limit lets through gets 502 at once.
    let toml = |state: &str| {
        edge_toml(
            &world,
            state,
            &agent_fp,
            "https = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\nagent_wait = \"0s\"",
            &redis,
        )
        .replace(
            "auth = \"none\"\n",
            "auth = \"none\"\nrate = \"1/m\"\nburst = 2\n",
        )
    };
    let a = start_edge(edge_config(&toml("a"))).await;
    let b = start_edge(edge_config(&toml("b"))).await;
    let code = |state: &str, https: Option<SocketAddr>| {
        let cacert = world.path(&format!("{state}/self-signed.pem"));
        async move { curl(&cacert, https.unwrap(), "chat.test", &[]).await.0 }
    };
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(code("a", a.https).await);
        codes.push(code("b", b.https).await);
    }
    // One a minute and 2 more at once: 3 of the 6 for the cluster (each
    // edge alone would have let 3 of its own through).
    let limited = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(limited, 3, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 429 || *c == 502), "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_started_while_redis_is_away_joins_when_it_comes_back() {
    let world = World::new();
    let mut redis = Redis::start(&world.path("redis"));
    redis.stop();
    let (_, agent_fp) = world.agent_key("home");
    burrow_proto::identity::Identity::create(&world.path("edge.key")).unwrap();
    let config = world.write(
        "a.toml",
        &edge_toml(
            &world,
            "a",
            &agent_fp,
            "https = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"",
            &redis,
        ),
    );
    let mut edge = Process::spawn(&["edge", "--config", &path_str(&config)]);
    edge.wait_log("cluster: Redis is unreachable; serving with what this edge holds, retrying");
    redis.resume();
    edge.wait_log("cluster: Redis is reachable");
    assert_eq!(redis.cli(&["EXISTS", "burrow:sessions:key"]).trim(), "1");
}
