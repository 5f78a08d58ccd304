//! Several edges for one domain: an agent with `[agent] edges` keeps a
//! session with each (its own reconnects and transport), so a request
//! through any edge reaches the service and an edge that dies takes no
//! service down. The edge that is killed runs as a process whose sockets
//! a holder keeps, as systemd does, so it comes back on the same ports.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use burrow_agent::AgentStatus;
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
) -> String {
    format!(
        "[edge]\nstate_dir = {:?}\nkey = {:?}\n{listen}\n\n[tls]\nmode = \"self-signed\"\n\n\
         [[agent]]\nname = \"home\"\nkey = \"{fp}\"\n\n\
         [[route]]\nhost = \"chat.test\"\nagent = \"home\"\nservice = \"test\"\nauth = \"none\"\n",
        world.path(state),
        world.path("edge.key"),
    )
}

/// GET https://chat.test/headers through the edge at `https`, trusting
/// its self-signed certificate in `state`; the response body.
fn get_through(world: &World, state: &str, https: SocketAddr) -> String {
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &path_str(&world.path(&format!("{state}/self-signed.pem"))),
            "--resolve",
            &format!("chat.test:{}:127.0.0.1", https.port()),
            &format!("https://chat.test:{}/headers", https.port()),
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
    let listen_a = format!(
        "https = \"{a_https}\"\ntunnel = \"{a_tunnel}\"\nadmin = \"{}\"",
        field_addr(&sockets, "admin")
    );
    std::fs::write(&config_a, edge_toml(&world, "a", &agent_fp, &listen_a)).unwrap();
    a.0.signal("USR2");
    a.0.wait_log("serving https");
    let b = start_edge(edge_config(&edge_toml(
        &world,
        "b",
        &agent_fp,
        "https = \"127.0.0.1:0\"\ntunnel = \"127.0.0.1:0\"",
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
