//! The end-to-end harness: real edges and agents (in this process or as
//! `burrow` processes), real sockets on loopback with port 0, and waiting on
//! events (status changes, log lines), never on sleeps.

#![allow(dead_code, clippy::unwrap_used)]

pub mod faults;
pub mod pebble;
pub mod redis;
pub mod standin;
pub mod web;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use burrow_agent::{Agent, AgentConfig, AgentStatus};
use burrow_edge::{Edge, EdgeConfig, Prebound};
use burrow_proto::confkit::Source;
use burrow_proto::identity::{Fingerprint, Identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// A temporary directory with keys for one edge and some agents.
pub struct World {
    pub dir: tempfile::TempDir,
}

impl World {
    pub fn new() -> Self {
        init_logs();
        Self {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Makes an agent key file and returns its path and fingerprint.
    pub fn agent_key(&self, name: &str) -> (PathBuf, Fingerprint) {
        let path = self.path(&format!("{name}.key"));
        let id = Identity::create(&path).expect("create key");
        (path, id.fingerprint())
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write file");
        path
    }
}

pub fn edge_config(text: &str) -> EdgeConfig {
    EdgeConfig::from_source(&Source::new("edge.toml", text)).expect("edge config")
}

pub fn agent_config(text: &str) -> AgentConfig {
    AgentConfig::from_source(&Source::new("agent.toml", text)).expect("agent config")
}

/// An edge running in this process.
pub struct EdgeHandle {
    pub tunnel: SocketAddr,
    /// The HTTPS listener, where agents dial over TCP too.
    pub https: Option<SocketAddr>,
    pub ports: Vec<SocketAddr>,
    pub fingerprint: Fingerprint,
    pub registry: std::sync::Arc<burrow_edge::tunnel::Registry>,
    pub shutdown: CancellationToken,
    /// Keeps the edge's reload channel open for as long as it runs.
    pub reload: tokio::sync::mpsc::Sender<EdgeConfig>,
    pub task: tokio::task::JoinHandle<()>,
}

pub async fn start_edge(config: EdgeConfig) -> EdgeHandle {
    start_edge_with(config, Prebound::default()).await
}

/// Like [`start_edge`], serving on the sockets in `prebound`.
pub async fn start_edge_with(config: EdgeConfig, prebound: Prebound) -> EdgeHandle {
    let edge = Edge::bind_with(config, prebound).await.expect("edge binds");
    run_edge(edge).0
}

/// Runs a bound edge in this process: its handle, and where to send it
/// new configs (as SIGHUP would).
pub fn run_edge(edge: Edge) -> (EdgeHandle, tokio::sync::mpsc::Sender<EdgeConfig>) {
    let shutdown = CancellationToken::new();
    let (reload, reloads) = tokio::sync::mpsc::channel(2);
    let handle = EdgeHandle {
        tunnel: edge.tunnel_addr(),
        https: edge.https_addr(),
        ports: edge.port_addrs(),
        fingerprint: edge.fingerprint(),
        registry: edge.registry(),
        shutdown: shutdown.clone(),
        reload: reload.clone(),
        task: tokio::spawn(async move {
            edge.run_with_reloads(shutdown, reloads)
                .await
                .expect("edge runs");
        }),
    };
    (handle, reload)
}

impl Drop for EdgeHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An agent running in this process.
pub struct AgentHandle {
    pub status: watch::Receiver<AgentStatus>,
    pub shutdown: CancellationToken,
}

pub fn start_agent(config: AgentConfig) -> AgentHandle {
    start_agent_with(config).0
}

/// What else a started agent offers tests: its services' states and wake
/// history, and its bound `[[lan]]` addresses.
pub struct AgentExtras {
    pub services: watch::Receiver<Vec<burrow_agent::monitor::ServiceView>>,
    pub lan: Vec<SocketAddr>,
    /// Hands the running agent a new config, as SIGHUP does.
    pub reload: tokio::sync::mpsc::Sender<AgentConfig>,
    /// The session with each edge, in `[agent] edges` order.
    pub edges: Vec<watch::Receiver<AgentStatus>>,
}

pub fn start_agent_with(config: AgentConfig) -> (AgentHandle, AgentExtras) {
    let agent = Agent::new(config).expect("agent loads its key");
    let status = agent.status();
    let (reload, reloads) = tokio::sync::mpsc::channel(4);
    let extras = AgentExtras {
        services: agent.services(),
        lan: agent.lan_addrs(),
        reload,
        edges: agent.edge_statuses(),
    };
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        agent
            .run_with_reloads(s, reloads)
            .await
            .expect("agent runs")
    });
    (AgentHandle { status, shutdown }, extras)
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl AgentHandle {
    /// Waits until the status satisfies `pred`; returns it.
    pub async fn wait(&mut self, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
        let found = tokio::time::timeout(WAIT, self.status.wait_for(|s| pred(s)))
            .await
            .map(|r| r.expect("agent status channel open").clone());
        found.unwrap_or_else(|_| {
            panic!(
                "agent never became {what}; last status {:?}",
                *self.status.borrow()
            )
        })
    }

    pub async fn connected(&mut self) -> u64 {
        match self
            .wait("connected", |s| matches!(s, AgentStatus::Connected { .. }))
            .await
        {
            AgentStatus::Connected { session, .. } => session,
            other => unreachable!("{other:?}"),
        }
    }
}

/// The standard pair: an edge with one agent "home" and `[[port]]`s to the
/// agent's services, and that agent pinned to the edge.
pub struct Pair {
    pub world: World,
    pub edge: EdgeHandle,
    pub agent: AgentHandle,
}

/// The smallest edge.toml: a tunnel on loopback (port 0) and the agent
/// "home" with key `fp`; tests append tables to it.
pub fn tunnel_only_edge_toml(world: &World, fp: &Fingerprint) -> String {
    format!(
        "[edge]\nstate_dir = {:?}\ntunnel = \"127.0.0.1:0\"\n\n[[agent]]\nname = \"home\"\nkey = \"{fp}\"\n",
        world.path("state")
    )
}

/// `services`: (name, target "host:port"); one `[[port]]` per service.
pub async fn pair(services: &[(&str, SocketAddr)]) -> Pair {
    let world = World::new();
    let (key, fp) = world.agent_key("home");
    let mut edge_toml = tunnel_only_edge_toml(&world, &fp);
    for (name, _) in services {
        edge_toml += &format!(
            "\n[[port]]\nlisten = \"127.0.0.1:0\"\nagent = \"home\"\nservice = \"{name}\"\n"
        );
    }
    let edge = start_edge(edge_config(&edge_toml)).await;
    let mut agent_toml = format!(
        "[agent]\nname = \"home\"\nedge = \"{}\"\nedge_key = \"{}\"\nkey = {:?}\n",
        edge.tunnel, edge.fingerprint, key
    );
    for (name, addr) in services {
        agent_toml += &format!("\n[[service]]\nname = \"{name}\"\nurl = \"tcp://{addr}\"\n");
    }
    let mut agent = start_agent(agent_config(&agent_toml));
    agent.connected().await;
    Pair { world, edge, agent }
}

/// A TCP service that echoes every byte until the client half-closes, then
/// half-closes too.
pub async fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// One echo round trip through `addr`; returns what came back.
pub async fn echo_once(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(msg).await.expect("write");
    s.shutdown().await.expect("half-close");
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut back))
        .await
        .expect("echo in time")
        .expect("read");
    back
}

/// A cheap argon2id hash (the edge honours the cost in the string), so
/// tests that only need a right password stay fast.
pub fn cheap_hash(password: &str) -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(1024, 1, 1, None).unwrap();
    let a = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"burrow-test-salt").unwrap();
    a.hash_password(password.as_bytes(), &salt)
        .unwrap()
        .to_string()
}

/// An `Authorization: Basic` value.
pub fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// Deterministic pseudo-random bytes (xorshift64*), cheap in debug builds.
pub fn fill_pseudo_random(seed: u64, buf: &mut [u8]) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// A `burrow` process whose JSON log lines are readable as events.
pub struct Process {
    pub child: Child,
    lines: mpsc::Receiver<serde_json::Value>,
    pub seen: Vec<serde_json::Value>,
    cursor: usize,
}

/// Runs `burrow` with `args` to its end: exit code, stdout, stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(burrow_bin())
        .args(args)
        .output()
        .expect("run burrow");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn burrow_bin() -> &'static str {
    env!("CARGO_BIN_EXE_burrow")
}

impl Process {
    pub fn spawn(args: &[&str]) -> Self {
        Self::spawn_logging("info", args)
    }

    /// Like `spawn`, with `RUST_LOG` set to `filter`.
    pub fn spawn_logging(filter: &str, args: &[&str]) -> Self {
        let mut command = Command::new(burrow_bin());
        command
            .args(["--log-format", "json"])
            .args(args)
            .env("RUST_LOG", filter);
        Self::spawn_command(command)
    }

    /// Like `spawn`, with the open-file limit (soft and hard) set to `nofile`.
    pub fn spawn_with_nofile(nofile: u64, args: &[&str]) -> Self {
        let mut command = Command::new("bash");
        command
            .args(["-c", "ulimit -n \"$0\" && exec \"$@\""])
            .arg(nofile.to_string())
            .arg(burrow_bin())
            .args(["--log-format", "json"])
            .args(args);
        Self::spawn_command(command)
    }

    pub fn spawn_command(mut command: Command) -> Self {
        if !command.get_envs().any(|(k, _)| k == "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn burrow");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line }));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
            cursor: 0,
        }
    }

    /// Waits for the next log line (after the last one this returned) whose
    /// message is `message`; returns it.
    pub fn wait_log(&mut self, message: &str) -> serde_json::Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            while self.cursor < self.seen.len() {
                let v = &self.seen[self.cursor];
                self.cursor += 1;
                if v["message"] == message {
                    return v.clone();
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!("no log line {message:?}; saw {:#?}", self.seen),
            }
        }
    }

    /// The warning and error lines written so far.
    pub fn warnings(&mut self) -> Vec<serde_json::Value> {
        while let Ok(v) = self.lines.try_recv() {
            self.seen.push(v);
        }
        self.seen
            .iter()
            .filter(|v| {
                v["level"] == "WARN"
                    || v["level"] == "ERROR"
                    || v["message"].as_str().is_some_and(|m| {
                        m.contains("client connection") || m.contains("tls handshake")
                    })
            })
            .cloned()
            .collect()
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit; a watchdog kills it after [`WAIT`]
    /// so a hang fails the test instead of blocking it.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let (done, watchdog) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            if watchdog.recv_timeout(WAIT).is_err() {
                let _ = Command::new("kill").args(["-KILL", &pid]).status();
            }
        });
        let status = self.child.wait().expect("wait for child");
        let _ = done.send(());
        // Keep every line the process wrote before it exited.
        while let Ok(v) = self.lines.recv_timeout(WAIT) {
            self.seen.push(v);
        }
        status
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn field_addr(v: &serde_json::Value, field: &str) -> SocketAddr {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("log line has no {field}: {v}"))
        .parse()
        .expect("an address")
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}
