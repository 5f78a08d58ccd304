//! The tunnel core end to end: raw TCP forwarding through real QUIC, pinned
//! keys, refusals, bad peers, session replacement and edge restarts.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use burrow_agent::AgentStatus;
use burrow_proto::frame::{AgentToEdge, EdgeToAgent, Hello, PROTOCOL_VERSION};
use burrow_proto::identity::Identity;
use burrow_proto::quic::{self, IDENTITY_SNI, code};
use burrow_proto::{Frame, Name};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A service for bulk tests. The client sends `seed: u64, len: u64`, then
/// any payload, then half-closes. The service answers only after that EOF:
/// the SHA-256 of the payload, then `len` pseudo-random bytes from `seed`,
/// then closes. An answer at all proves the half-close crossed the tunnel
/// while the other direction stayed open.
async fn hash_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let seed = s.read_u64().await.expect("seed");
                let len = s.read_u64().await.expect("len");
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = s.read(&mut buf).await.expect("read payload");
                    if n == 0 {
                        break;
                    }
                    ctx.update(&buf[..n]);
                }
                s.write_all(ctx.finish().as_ref())
                    .await
                    .expect("write hash");
                let mut back = vec![0u8; usize::try_from(len).expect("len fits")];
                fill_pseudo_random(seed, &mut back);
                s.write_all(&back).await.expect("write data");
                s.shutdown().await.expect("close");
            });
        }
    });
    addr
}

async fn bulk_exchange(port: SocketAddr, seed: u64, up: usize, down: usize) {
    let mut payload = vec![0u8; up];
    fill_pseudo_random(seed, &mut payload);
    let mut s = TcpStream::connect(port).await.expect("connect");
    s.write_u64(seed ^ 0xdead_beef).await.expect("seed");
    s.write_u64(down as u64).await.expect("len");
    s.write_all(&payload).await.expect("payload");
    s.shutdown().await.expect("half-close");
    let mut answer = Vec::with_capacity(32 + down);
    s.read_to_end(&mut answer).await.expect("read answer");
    assert_eq!(answer.len(), 32 + down, "connection {seed}: answer length");
    assert_eq!(
        answer[..32],
        sha256(&payload),
        "connection {seed}: upload hash"
    );
    let mut expected = vec![0u8; down];
    fill_pseudo_random(seed ^ 0xdead_beef, &mut expected);
    assert_eq!(
        sha256(&answer[32..]),
        sha256(&expected),
        "connection {seed}: download hash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_connections_move_64_mib_each_way_intact() {
    const CONNS: usize = 50;
    const TOTAL: usize = 64 * 1024 * 1024;
    let svc = hash_service().await;
    let p = pair(&[("bulk", svc)]).await;
    let port = p.edge.ports[0];

    let per = TOTAL / CONNS;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CONNS {
        // The first connection takes the remainder so the totals are exact.
        let size = if i == 0 { per + TOTAL % CONNS } else { per };
        tasks.spawn(bulk_exchange(port, i as u64 + 1, size, size));
    }
    let done = tokio::time::timeout(Duration::from_secs(120), async {
        let mut n = 0;
        while let Some(r) = tasks.join_next().await {
            r.expect("connection task");
            n += 1;
        }
        n
    })
    .await
    .expect("bulk transfer finished in time");
    assert_eq!(done, CONNS);
}

/// The agent first allows the edge 1,024 streams and raises the allowance
/// as they fill: more connections than that are open end to end at once.
/// The service answers none of them until it holds all of them, so a stream
/// the allowance kept waiting would stall the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_the_first_stream_allowance_are_open_at_once() {
    const CONNS: usize = quic::INITIAL_STREAMS_PER_AGENT as usize + 300;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let svc = listener.local_addr().expect("addr");
    // A connection counts once its first byte arrives (the agent's health
    // probes connect and close without one).
    let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.expect("accept");
            let arrived = arrived.clone();
            tokio::spawn(async move {
                if s.read_u8().await.is_ok() {
                    let _ = arrived.send(s);
                }
            });
        }
    });
    let service = tokio::spawn(async move {
        let mut held = Vec::with_capacity(CONNS);
        while held.len() < CONNS {
            held.push(arrivals.recv().await.expect("service accepts"));
        }
        for s in &mut held {
            s.write_all(b"!").await.expect("answer");
        }
        held
    });
    let p = pair(&[("held", svc)]).await;
    let port = p.edge.ports[0];

    let mut clients = Vec::with_capacity(CONNS);
    for i in 0..CONNS {
        // Many clients, as the edge caps connections per client address.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        let host = u8::try_from(2 + i % 200).unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, host], 0)))
            .unwrap();
        let mut c = socket.connect(port).await.expect("connect");
        c.write_all(b"?").await.expect("first byte");
        clients.push(c);
    }
    let answered = tokio::time::timeout(Duration::from_secs(60), async {
        for c in &mut clients {
            assert_eq!(c.read_u8().await.expect("answer"), b'!');
        }
    })
    .await;
    assert!(
        answered.is_ok(),
        "the service never held all {CONNS} connections at once"
    );
    assert_eq!(service.await.expect("service").len(), CONNS);
}

#[tokio::test]
async fn empty_and_one_sided_transfers_keep_half_close() {
    let svc = hash_service().await;
    let p = pair(&[("bulk", svc)]).await;
    let port = p.edge.ports[0];
    bulk_exchange(port, 7, 0, 0).await;
    bulk_exchange(port, 8, 0, 100_000).await;
    bulk_exchange(port, 9, 100_000, 0).await;
}

#[tokio::test]
async fn agent_with_an_unlisted_key_is_refused_and_others_keep_working() {
    let echo = echo_service().await;
    let p = pair(&[("echo", echo)]).await;
    let before = p
        .edge
        .registry
        .get(&Name::new("home").unwrap())
        .expect("home connected")
        .session;

    let (rogue_key, _) = p.world.agent_key("rogue");
    let rogue = agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n",
        p.edge.tunnel, p.edge.fingerprint, rogue_key
    ));
    let mut rogue = start_agent(rogue);
    let status = rogue
        .wait("refused", |s| matches!(s, AgentStatus::Refused(_)))
        .await;
    let AgentStatus::Refused(why) = status else {
        unreachable!()
    };
    assert!(why.contains("not listed"), "refusal reason: {why}");

    // The listed agent was not disturbed.
    let now = p
        .edge
        .registry
        .get(&Name::new("home").unwrap())
        .expect("home connected");
    assert_eq!(now.session, before);
    assert_eq!(
        echo_once(p.edge.ports[0], b"still here").await,
        b"still here"
    );
}

#[tokio::test]
async fn agent_refuses_an_edge_with_another_key() {
    let echo = echo_service().await;
    let p = pair(&[("echo", echo)]).await;
    let (key, _) = p.world.agent_key("pinned-wrong");
    let wrong_pin = Identity::generate().unwrap().fingerprint();
    let mut a = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{wrong_pin}\"\nkey = {:?}\n",
        p.edge.tunnel, key
    )));
    let status = a
        .wait("disconnected", |s| {
            matches!(s, AgentStatus::Disconnected(_))
        })
        .await;
    let AgentStatus::Disconnected(why) = status else {
        unreachable!()
    };
    assert!(why.contains("handshake"), "{why}");
}

/// A raw QUIC client holding a listed agent key, to misbehave on purpose.
async fn raw_agent(p: &Pair, name: &str, key_name: &str) -> quinn::Connection {
    let key = p.world.path(&format!("{key_name}.key"));
    let config = agent_config(&format!(
        "[agent]\nname = \"{name}\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n",
        p.edge.tunnel, p.edge.fingerprint, key
    ));
    let id = Identity::load(&key).unwrap();
    let client = burrow_agent::tunnel::client_config(&config, &id).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client);
    ep.connect(p.edge.tunnel, IDENTITY_SNI)
        .unwrap()
        .await
        .expect("handshake")
}

async fn closed_with(conn: &quinn::Connection) -> quinn::VarInt {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("closed in time")
    {
        quinn::ConnectionError::ApplicationClosed(c) => c.error_code,
        other => panic!("expected an application close, got {other}"),
    }
}

#[tokio::test]
async fn garbage_and_truncated_frames_close_only_that_peer() {
    let echo = echo_service().await;
    let world = World::new();
    let (home_key, home_fp) = world.agent_key("home");
    let (_, other_fp) = world.agent_key("other");
    let edge = start_edge(edge_config(&format!(
        "[edge]\nstate_dir = {:?}\ntunnel = \"127.0.0.1:0\"\n\n[[agent]]\nname = \"home\"\nkey = \"{home_fp}\"\n\n[[agent]]\nname = \"other\"\nkey = \"{other_fp}\"\n\n[[port]]\nlisten = \"127.0.0.1:0\"\nagent = \"home\"\nservice = \"echo\"\n",
        world.path("state")
    )))
    .await;
    let mut home = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n\n[[service]]\nname = \"echo\"\nurl = \"tcp://{echo}\"\n",
        edge.tunnel, edge.fingerprint, home_key
    )));
    let session = home.connected().await;
    let p = Pair {
        world,
        edge,
        agent: home,
    };

    let hello = AgentToEdge::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent: Name::new("other").unwrap(),
        instance: 1,
    })
    .to_bytes();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("unknown frame type", vec![0x7f, 0, 0], false),
        ("length over the limit", vec![0x01, 0xff, 0xff], false),
        ("bad name bytes", vec![0x01, 0, 5, 0, 1, 2, b'a', 0], false),
        ("truncated hello", hello[..hello.len() - 1].to_vec(), true),
        (
            "service list before hello",
            AgentToEdge::Services(vec![]).to_bytes().to_vec(),
            false,
        ),
    ];
    for (what, bytes, finish) in cases {
        let conn = raw_agent(&p, "other", "other").await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        if finish {
            send.finish().unwrap();
        }
        assert_eq!(closed_with(&conn).await, code::PROTOCOL, "{what}");
    }

    // The well-behaved agent kept its session and forwards as before.
    let link = p
        .edge
        .registry
        .get(&Name::new("home").unwrap())
        .expect("home still connected");
    assert_eq!(link.session, session);
    assert_eq!(
        echo_once(p.edge.ports[0], b"unaffected").await,
        b"unaffected"
    );
}

#[tokio::test]
async fn a_new_login_replaces_the_old_session_at_once() {
    let echo = echo_service().await;
    let mut p = pair(&[("echo", echo)]).await;
    let first = p
        .edge
        .registry
        .get(&Name::new("home").unwrap())
        .unwrap()
        .session;

    // Log in again with the same key, by hand.
    let conn = raw_agent(&p, "home", "home").await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = AgentToEdge::Hello(Hello {
        version: PROTOCOL_VERSION,
        agent: Name::new("home").unwrap(),
        // Not the running agent's instance: a second agent.
        instance: 1,
    });
    send.write_all(&hello.to_bytes()).await.unwrap();
    let mut framed = burrow_proto::framed::FramedRecv::new(recv);
    let welcome = framed.next::<EdgeToAgent>().await.unwrap().unwrap();
    let EdgeToAgent::Welcome(w) = welcome else {
        panic!("expected welcome, got {welcome:?}")
    };
    assert_ne!(w.session, first);

    // The old session was closed at once; the real agent notices and comes
    // back, replacing the hand-made session in turn.
    p.agent
        .wait("disconnected", |s| {
            matches!(s, AgentStatus::Disconnected(_))
        })
        .await;
    let again = p.agent.connected().await;
    assert!(again > w.session);
    assert_eq!(closed_with(&conn).await, code::REPLACED);
    assert_eq!(echo_once(p.edge.ports[0], b"back").await, b"back");
}

#[tokio::test]
async fn port_deny_rules_close_the_connection() {
    let echo = echo_service().await;
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let edge = start_edge(edge_config(&format!(
        "[edge]\nstate_dir = {:?}\ntunnel = \"127.0.0.1:0\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
         [[port]]\nlisten = \"127.0.0.1:0\"\nagent = \"home\"\nservice = \"echo\"\ndeny = [\"127.0.0.0/8\"]\n\n\
         [[port]]\nlisten = \"127.0.0.1:0\"\nagent = \"home\"\nservice = \"echo\"\nallow = [\"192.0.2.0/24\"]\n\n\
         [[port]]\nlisten = \"127.0.0.1:0\"\nagent = \"home\"\nservice = \"echo\"\nallow = [\"127.0.0.1\"]\n",
        world.path("state")
    )))
    .await;
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n\n[[service]]\nname = \"echo\"\nurl = \"tcp://{echo}\"\n",
        edge.tunnel, edge.fingerprint, key
    )));
    agent.connected().await;
    for denied in &edge.ports[..2] {
        let mut s = TcpStream::connect(denied).await.unwrap();
        let _ = s.write_all(b"hello").await;
        let mut back = Vec::new();
        // Closed by the edge: EOF or a reset, and nothing echoed.
        let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut back))
            .await
            .expect("closed in time");
        assert!(back.is_empty(), "denied port echoed {back:?}");
    }
    assert_eq!(echo_once(edge.ports[2], b"allowed").await, b"allowed");
}

/// Starts `burrow edge` and returns it with its tunnel address, port
/// address and fingerprint as logged.
fn spawn_edge(config: &std::path::Path) -> (Process, SocketAddr, SocketAddr, String) {
    let mut edge = Process::spawn(&["edge", "--config", &path_str(config)]);
    let listening = edge.wait_log("edge listening");
    let tunnel = field_addr(&listening, "tunnel");
    let fingerprint = listening["fingerprint"].as_str().unwrap().to_owned();
    let port = field_addr(&edge.wait_log("forwarding port"), "listen");
    (edge, tunnel, port, fingerprint)
}

fn restart_world() -> (World, String, impl Fn(&str, &str) -> String) {
    let world = World::new();
    let (_, fp) = world.agent_key("home");
    let state = world.path("state");
    let edge_toml = move |tunnel: &str, port: &str| {
        format!(
            "[edge]\nstate_dir = {state:?}\ntunnel = \"{tunnel}\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n[[port]]\nlisten = \"{port}\"\nagent = \"home\"\nservice = \"echo\"\n"
        )
    };
    let key = path_str(&world.path("home.key"));
    (world, key, edge_toml)
}

/// Restarts the edge process (by `signal`) under a connected agent process
/// and returns the time from the new edge's start to the first echoed byte.
async fn restart_under_agent(signal: &str) -> Duration {
    let echo = echo_service().await;
    let (world, key, edge_toml) = restart_world();
    let config = world.write("edge.toml", &edge_toml("127.0.0.1:0", "127.0.0.1:0"));
    let (mut edge, tunnel, port, fp) = spawn_edge(&config);
    let agent_toml = world.write(
        "agent.toml",
        &format!(
            "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{fp}\"\nkey = {key:?}\n\n[[service]]\nname = \"echo\"\nurl = \"tcp://{echo}\"\n"
        ),
    );
    let mut agent = Process::spawn(&["agent", "--config", &path_str(&agent_toml)]);
    agent.wait_log("connected to edge");
    assert_eq!(echo_once(port, b"before").await, b"before");

    // Same ports for the next run, so the agent and clients find it again.
    world.write(
        "edge.toml",
        &edge_toml(&tunnel.to_string(), &port.to_string()),
    );
    edge.signal(signal);
    let status = edge.wait_exit();
    if signal == "TERM" {
        assert!(status.success(), "edge exit after SIGTERM: {status}");
    }

    let restarted = Instant::now();
    let (_edge2, tunnel2, port2, fp2) = spawn_edge(&config);
    assert_eq!(
        (tunnel2, port2, fp2),
        (tunnel, port, fp),
        "same addresses and identity"
    );
    if signal == "KILL" {
        // Nothing told the agent; it finds out at its next keep-alive.
        agent.wait_log("connected to edge");
    }
    // The new edge holds this connection until the agent is back.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(b"after").await.unwrap();
    let mut first = [0u8; 1];
    tokio::time::timeout(WAIT, s.read_exact(&mut first))
        .await
        .expect("first byte in time")
        .unwrap();
    let elapsed = restarted.elapsed();
    assert_eq!(&first, b"a");
    eprintln!("edge restart ({signal}) to first forwarded byte: {elapsed:?}");
    elapsed
}

#[tokio::test]
async fn edge_restart_by_sigterm_recovers_within_two_seconds() {
    let elapsed = restart_under_agent("TERM").await;
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
}

#[tokio::test]
async fn edge_crash_recovers_at_the_next_keep_alive() {
    // After SIGKILL the agent hears nothing; its next keep-alive meets the
    // new edge, which resets the stale connection (same reset key), and the
    // agent redials at once instead of waiting out the idle timeout.
    let elapsed = restart_under_agent("KILL").await;
    let bound = burrow_proto::quic::KEEP_ALIVE_INTERVAL + Duration::from_secs(3);
    assert!(
        elapsed < bound,
        "took {elapsed:?}, more than keep-alive + 3 s"
    );
}

/// What `localhost:PORT` resolves to on a dual-stack host: `::1` first.
/// (This machine's /etc/hosts may list only 127.0.0.1, so the test says it.)
struct DualStackLocalhost {
    port: u16,
    asked: std::sync::Mutex<Vec<String>>,
}

impl burrow_agent::tunnel::eyeballs::Resolve for DualStackLocalhost {
    fn resolve<'a>(
        &'a self,
        host_port: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>,
    > {
        self.asked.lock().unwrap().push(host_port.to_owned());
        let port = self.port;
        Box::pin(async move {
            Ok(vec![
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)),
                SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
            ])
        })
    }
}

/// Issue 16: the agent dialled only the first address, so an edge on IPv4
/// only behind a name with an IPv6 address first was never reached.
#[tokio::test]
async fn an_ipv4_only_edge_is_reached_when_ipv6_resolves_first() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let edge = start_edge(edge_config(&tunnel_only_edge_toml(&world, &fp))).await;
    let port = edge.tunnel.port();
    let resolver = std::sync::Arc::new(DualStackLocalhost {
        port,
        asked: Default::default(),
    });
    let agent = burrow_agent::Agent::new(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"localhost:{port}\"\nedge_key = \"{}\"\nkey = {:?}\n",
        edge.fingerprint, key
    )))
    .unwrap()
    .with_resolver(resolver.clone());
    let mut handle = AgentHandle {
        status: agent.status(),
        shutdown: tokio_util::sync::CancellationToken::new(),
    };
    let started = Instant::now();
    tokio::spawn(agent.run(handle.shutdown.clone()));
    handle.connected().await;
    let took = started.elapsed();
    assert_eq!(
        *resolver.asked.lock().unwrap(),
        [format!("localhost:{port}")]
    );
    assert!(took < Duration::from_secs(1), "connected after {took:?}");
    println!("connected over 127.0.0.1 with ::1 listed first in {took:?}");
}

/// A subscriber that keeps the message of every error-level event (spans
/// get ids and nothing else).
struct ErrorLog {
    errors: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    next_span: std::sync::atomic::AtomicU64,
}

impl tracing::Subscriber for ErrorLog {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let n = self
            .next_span
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::span::Id::from_u64(n + 1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if *event.metadata().level() == tracing::Level::ERROR {
            let mut m = Message(String::new());
            event.record(&mut m);
            self.errors.lock().unwrap().push(m.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Issue 16: two agents running with one key replaced each other as fast
/// as they could reconnect. Each replaced agent must back off: the k-th
/// replacement comes no sooner than the shortest backoff delays of the
/// agents before it allow, and each says why at error level.
#[tokio::test]
async fn two_agents_with_one_key_back_off_instead_of_fighting() {
    /// Replacements watched; the last ones are seconds apart.
    const REPLACEMENTS: u64 = 10;

    let world = World::new();
    // The agents run on this thread (current-thread runtime): a default
    // subscriber for it sees their logs.
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let _logs = tracing::subscriber::set_default(ErrorLog {
        errors: errors.clone(),
        next_span: Default::default(),
    });
    let (key, fp) = world.agent_key("home");
    let edge = start_edge(edge_config(&tunnel_only_edge_toml(&world, &fp))).await;
    let toml = format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n",
        edge.tunnel, edge.fingerprint, key
    );
    let mut first = start_agent(agent_config(&toml));
    let first_session = first.connected().await;

    // The shortest time before the k-th replacement: the replaced agents
    // take turns to wait their shortest backoff delay (no jitter).
    let mut floors = vec![Duration::ZERO];
    let mut backoffs = [
        burrow_agent::backoff::Backoff::new(),
        burrow_agent::backoff::Backoff::new(),
    ];
    for k in 1..REPLACEMENTS as usize {
        let wait = backoffs[(k - 1) % 2].next_delay(0.0);
        floors.push(floors[k - 1] + wait);
    }

    let home = Name::new("home").unwrap();
    let mut changes = edge.registry.subscribe();
    let started = Instant::now();
    let _second = start_agent(agent_config(&toml));
    let mut seen = 0;
    while seen < REPLACEMENTS {
        tokio::time::timeout(WAIT, changes.changed())
            .await
            .expect("the agents keep replacing each other")
            .unwrap();
        let at = started.elapsed();
        let Some(link) = edge.registry.get(&home) else {
            continue;
        };
        // Session ids count logins; each login replaced the one before.
        let replacements = link.session - first_session;
        for k in seen + 1..=replacements.min(REPLACEMENTS) {
            assert!(
                at >= floors[k as usize - 1],
                "replacement {k} after {at:?}, before the backoff allows ({:?})",
                floors[k as usize - 1]
            );
        }
        seen = seen.max(replacements);
    }
    println!(
        "{REPLACEMENTS} replacements took {:?} (floor {:?})",
        started.elapsed(),
        floors[REPLACEMENTS as usize - 1]
    );
    let errors = errors.lock().unwrap();
    assert!(
        errors.iter().any(|m| m.contains("two agents")),
        "an error names the cause; errors: {errors:?}"
    );
}

/// A socket handed to the edge already bound is the one it serves on, so a
/// test (or a supervisor) that needs the port first never binds it twice;
/// one for a listener the config leaves off is refused, not ignored.
#[tokio::test]
async fn the_edge_serves_on_a_socket_handed_to_it() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let bound = socket.local_addr().unwrap();
    let toml = tunnel_only_edge_toml(&world, &fp);
    let edge = start_edge_with(
        edge_config(&toml),
        burrow_edge::Prebound {
            tunnel: Some(socket),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(edge.tunnel, bound);
    let mut agent = start_agent(agent_config(&format!(
        "[agent]\nname = \"home\"\nedge = \"{bound}\"\nedge_key = \"{}\"\nkey = {:?}\n",
        edge.fingerprint, key
    )));
    agent.connected().await;

    let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let refused = burrow_edge::Edge::bind_with(
        edge_config(&toml),
        burrow_edge::Prebound {
            admin: Some(admin),
            ..Default::default()
        },
    )
    .await;
    assert!(
        matches!(refused, Err(burrow_edge::EdgeError::Unsupported(_))),
        "{refused:?}"
    );
}

/// An edge serving HTTPS (where agents over TCP come) and the tunnel, with
/// one listed agent "home".
async fn https_edge(world: &World, fp: &burrow_proto::identity::Fingerprint) -> EdgeHandle {
    start_edge(edge_config(&format!(
        "[edge]\nstate_dir = {:?}\nhttps = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"\n\n\
         [tls]\nmode = \"self-signed\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
         [[route]]\nhost = \"app.test\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n",
        world.path("state")
    )))
    .await
}

#[tokio::test]
async fn over_tcp_the_same_keys_are_checked_both_ways() {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let edge = https_edge(&world, &fp).await;
    let https = edge.https.unwrap();
    let agent_toml = |key: &std::path::Path, pin: &str| {
        agent_config(&format!(
            "[agent]\nname = \"home\"\nedge = \"{https}\"\nedge_key = \"{pin}\"\nkey = {key:?}\ntransport = \"tcp\"\n"
        ))
    };
    // The listed key with the edge's own pin: a session over TCP.
    let mut home = start_agent(agent_toml(&key, &edge.fingerprint.to_string()));
    home.connected().await;
    let link = edge.registry.get(&Name::new("home").unwrap()).unwrap();
    assert_eq!(link.transport(), burrow_proto::link::Transport::Tcp);

    // A key the edge does not list: refused, as over QUIC.
    let (rogue_key, _) = world.agent_key("rogue");
    let mut rogue = start_agent(agent_toml(&rogue_key, &edge.fingerprint.to_string()));
    let AgentStatus::Refused(why) = rogue
        .wait("refused", |s| matches!(s, AgentStatus::Refused(_)))
        .await
    else {
        unreachable!()
    };
    assert!(why.contains("not listed"), "{why}");

    // An edge with another key than the pinned one: no session.
    let wrong_pin = Identity::generate().unwrap().fingerprint();
    let mut pinned = start_agent(agent_toml(&key, &wrong_pin.to_string()));
    let AgentStatus::Disconnected(why) = pinned
        .wait("disconnected", |s| {
            matches!(s, AgentStatus::Disconnected(_))
        })
        .await
    else {
        unreachable!()
    };
    assert!(why.contains("TLS"), "{why}");
    // The listed agent kept its session through both.
    let now = edge.registry.get(&Name::new("home").unwrap()).unwrap();
    assert_eq!(now.session, link.session);
}

#[tokio::test]
async fn the_https_listener_wants_a_client_certificate_only_from_agents() {
    let world = World::new();
    let (_, fp) = world.agent_key("home");
    let edge = https_edge(&world, &fp).await;
    let https = edge.https.unwrap();
    // Each client checks the edge as its kind does: a browser against the
    // self-signed CA, an agent against the edge's pinned identity.
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let browser = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(common::web::self_signed_roots(&world))
        .with_no_client_auth();
    let agent = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(
            burrow_proto::identity::PinnedServerVerifier::new(edge.fingerprint),
        ))
        .with_no_client_auth();
    let handshake = |mut config: rustls::ClientConfig, alpn: &'static [u8], sni: &'static str| async move {
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = TcpStream::connect(https).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(rustls::pki_types::ServerName::try_from(sni).unwrap(), tcp)
            .await?;
        // TLS 1.3: the edge's verdict on the client comes after the
        // client's Finished. An HTTP/2 client's preface gets the server's
        // SETTINGS; a refused client reads the alert instead.
        let _ = tls
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await;
        let mut b = [0u8; 64];
        match tokio::time::timeout(WAIT, tls.read(&mut b)).await {
            Ok(Ok(n)) if n > 0 => Ok(tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)),
            other => Err(std::io::Error::other(format!("{other:?}"))),
        }
    };
    // A browser (h2) is served without a certificate.
    assert_eq!(
        handshake(browser, b"h2", "app.test").await.unwrap(),
        Some(b"h2".to_vec())
    );
    // burrow/1 without a client certificate is refused.
    let refused = handshake(agent, quic::ALPN, IDENTITY_SNI).await;
    assert!(refused.is_err(), "{refused:?}");
}
