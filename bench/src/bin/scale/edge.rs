//! The edge under test: its config (one `[[agent]]` and one route per
//! simulated agent), and the release `burrow edge` process, whose JSON log
//! the bench reads as it is written: the addresses it bound, and every
//! warning or error it logged.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_proto::identity::Fingerprint;
use rustix::process::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

use crate::Error;

/// How long the edge may take to log its addresses after it starts.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the edge may take to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long streams may run on after SIGTERM (`[edge] grace`): the bench
/// closes its streams before it restarts the edge, so this only bounds a
/// stuck drain.
const GRACE: &str = "5s";
/// Warnings and errors the report lists, the most frequent first.
pub const NOTABLE_SHOWN: usize = 12;

/// Domain of the routes: agent `aN` serves `aN.scale.test`.
pub const DOMAIN: &str = "scale.test";

/// The name of simulated agent `i`, and its route's host.
pub fn agent_name(i: usize) -> String {
    format!("a{i}")
}

pub fn host(i: usize) -> String {
    format!("{}.{DOMAIN}", agent_name(i))
}

/// What goes into `[limits]`: enough for the run's client connections,
/// each carrying `streams_per_connection` held requests from its own
/// loopback address.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub streams_per_connection: usize,
    pub streams_per_ip: usize,
}

/// Everything the edge's config names.
pub struct EdgeFiles<'a> {
    pub dir: &'a Path,
    pub edge_key: &'a Path,
    pub cert: &'a Path,
    pub cert_key: &'a Path,
    pub agents: &'a [Fingerprint],
    pub limits: Limits,
    /// `[edge] threads`; `None` leaves the edge's default (one).
    pub threads: Option<usize>,
}

impl EdgeFiles<'_> {
    /// edge.toml binding `https` and `tunnel` (port 0 the first time, the
    /// ports it got for a restart).
    pub fn toml(&self, https: SocketAddr, tunnel: SocketAddr) -> String {
        let mut s = format!(
            "[edge]\nstate_dir = {state:?}\nkey = {key:?}\nhttps = \"{https}\"\ntunnel = \"{tunnel}\"\ngrace = \"{GRACE}\"\n\n\
             [tls]\nmode = \"files\"\ncert = {cert:?}\nkey = {cert_key:?}\n\n\
             [limits]\nstreams_per_connection = {spc}\nstreams_per_ip = {spi}\n",
            state = self.dir.join("state"),
            key = self.edge_key,
            cert = self.cert,
            cert_key = self.cert_key,
            spc = self.limits.streams_per_connection,
            spi = self.limits.streams_per_ip,
        );
        if let Some(n) = self.threads {
            s = s.replacen("[edge]\n", &format!("[edge]\nthreads = {n}\n"), 1);
        }
        for (i, fp) in self.agents.iter().enumerate() {
            let name = agent_name(i);
            let _ = write!(
                s,
                "\n[[agent]]\nname = \"{name}\"\nkey = \"{fp}\"\n\n\
                 [[route]]\nhost = \"{host}\"\nagent = \"{name}\"\nservice = \"app\"\nauth = \"none\"\n",
                host = host(i),
            );
        }
        s
    }
}

/// Addresses the edge logs once bound.
#[derive(Debug, Clone, Copy, Default)]
struct Bound {
    tunnel: Option<SocketAddr>,
    https: Option<SocketAddr>,
}

/// Warnings and errors logged by any edge process of the run, by level
/// and message, with a count.
#[derive(Debug, Default, Clone)]
pub struct Notable(Arc<Mutex<BTreeMap<String, u64>>>);

impl Notable {
    fn record(&self, line: &serde_json::Value) {
        let level = line["level"].as_str().unwrap_or("");
        if level != "WARN" && level != "ERROR" {
            return;
        }
        let message = line["message"].as_str().unwrap_or("?");
        // The error field says which of several failures it was.
        let detail = ["error", "reason"]
            .iter()
            .find_map(|f| line[*f].as_str())
            .map(|d| format!(": {}", d.chars().take(120).collect::<String>()))
            .unwrap_or_default();
        let key = format!("{level} {message}{detail}");
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }

    /// The most frequent first.
    pub fn summary(&self) -> Vec<(String, u64)> {
        let map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, u64)> = map.iter().map(|(k, n)| (k.clone(), *n)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    }
}

/// A running `burrow edge`; killed when dropped.
pub struct EdgeProc {
    pid: u32,
    bound: watch::Receiver<Bound>,
    /// `Some` once the process has exited, with how.
    exit: watch::Receiver<Option<String>>,
    log: PathBuf,
}

impl EdgeProc {
    /// Starts `burrow --log-format json edge --config CONFIG`, its log
    /// appended to `log`.
    pub fn spawn(
        burrow: &Path,
        config: &Path,
        log: &Path,
        notable: &Notable,
    ) -> Result<Self, Error> {
        let mut child = Command::new(burrow)
            .args(["--log-format", "json", "edge", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", burrow.display()))?;
        let pid = child.id().ok_or("the edge exited at once")?;
        let stderr = child.stderr.take().ok_or("the edge has no stderr")?;
        let (bound_tx, bound) = watch::channel(Bound::default());
        let (exit_tx, exit) = watch::channel(None);
        tokio::spawn(tap_log(stderr, log.to_owned(), bound_tx, notable.clone()));
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            exit_tx.send_replace(Some(how));
            // Keeps the receivers' view valid until they look.
            exit_tx.closed().await;
        });
        Ok(Self {
            pid,
            bound,
            exit,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits for the edge to log both listening addresses: `(https, tunnel)`.
    pub async fn listening(&self) -> Result<(SocketAddr, SocketAddr), Error> {
        let (mut exit, mut bound) = (self.exit.clone(), self.bound.clone());
        let wait = bound.wait_for(|b| b.tunnel.is_some() && b.https.is_some());
        let bound = tokio::select! {
            r = tokio::time::timeout(LISTEN_TIMEOUT, wait) => match r {
                Ok(Ok(b)) => *b,
                Ok(Err(_)) => return Err(self.died("before it listened")),
                Err(_) => return Err(format!("the edge did not listen within {LISTEN_TIMEOUT:?}").into()),
            },
            _ = exit.wait_for(Option::is_some) => return Err(self.died("before it listened")),
        };
        match (bound.https, bound.tunnel) {
            (Some(h), Some(t)) => Ok((h, t)),
            _ => Err("the edge logged no addresses".into()),
        }
    }

    /// Fails once the edge has exited; pends while it runs.
    pub async fn failed(&self) -> Error {
        let mut exit = self.exit.clone();
        let _ = exit.wait_for(Option::is_some).await;
        self.died("during the run")
    }

    fn died(&self, when: &str) -> Error {
        let how = self.exit.borrow().clone().unwrap_or_else(|| "?".into());
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "the edge exited {when} ({how}); last log lines:\n{}",
            tail.join("\n")
        )
        .into()
    }

    /// Sends `signal` and waits for the exit; returns how long it took.
    pub async fn stop(&mut self, signal: Signal) -> Result<Duration, Error> {
        let start = Instant::now();
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(self.pid)?).ok_or("edge has no pid")?;
        rustix::process::kill_process(pid, signal)?;
        tokio::time::timeout(EXIT_TIMEOUT, self.exit.wait_for(Option::is_some))
            .await
            .map_err(|_| {
                format!("the edge did not exit within {EXIT_TIMEOUT:?} of {signal:?}")
            })??;
        Ok(start.elapsed())
    }
}

impl Drop for EdgeProc {
    fn drop(&mut self) {
        // The waiting task owns the child (killed on drop with the
        // runtime); a kill here ends it now, whatever the runtime does.
        if self.exit.borrow().is_none()
            && let Some(pid) = i32::try_from(self.pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, Signal::KILL);
        }
    }
}

/// Copies the edge's log to `log` line by line, noting the addresses it
/// bound and every warning or error.
async fn tap_log(
    stderr: tokio::process::ChildStderr,
    log: PathBuf,
    bound: watch::Sender<Bound>,
    notable: Notable,
) {
    let mut out = match tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .await
    {
        Ok(f) => Some(tokio::io::BufWriter::new(f)),
        Err(e) => {
            eprintln!("scale: cannot write {}: {e}", log.display());
            None
        }
    };
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(out) = out.as_mut() {
            let _ = out.write_all(line.as_bytes()).await;
            let _ = out.write_all(b"\n").await;
            // Whole lines on disk: a failure quotes the log's tail.
            let _ = out.flush().await;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        notable.record(&v);
        let addr = |field: &str| v[field].as_str().and_then(|a| a.parse().ok());
        match v["message"].as_str() {
            Some("edge listening") => bound.send_modify(|b| b.tunnel = addr("tunnel")),
            Some("serving https") => bound.send_modify(|b| b.https = addr("addr")),
            _ => {}
        }
    }
    if let Some(mut out) = out {
        let _ = out.flush().await;
    }
}
