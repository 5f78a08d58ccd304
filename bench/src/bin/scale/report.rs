//! What the scale run measured: samples of the edge process, arrival
//! times of agents, the printed table and the JSON file.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procfs;

/// The edge process at one moment.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sample {
    pub rss_kib: u64,
    pub open_fds: u64,
    /// CPU seconds (user + system) used since the process started.
    pub cpu_s: f64,
    /// Datagrams the kernel dropped on the tunnel's UDP socket (its
    /// receive buffer was full), since the socket was bound.
    pub tunnel_drops: u64,
}

impl Sample {
    /// Process `pid`, whose tunnel socket is bound to `tunnel`.
    pub fn of(pid: u32, tunnel: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            rss_kib: procfs::rss_kib(pid)?,
            open_fds: procfs::open_fds(pid)?,
            cpu_s: procfs::cpu_seconds(pid)?,
            tunnel_drops: udp_drops(tunnel)?,
        })
    }
}

/// The `drops` count of the IPv4 UDP socket bound to `addr`, from
/// /proc/net/udp (0 if there is none).
fn udp_drops(addr: SocketAddr) -> std::io::Result<u64> {
    let SocketAddr::V4(v4) = addr else {
        return Ok(0);
    };
    // The kernel prints the address as a native-endian u32, then the port.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let table = std::fs::read_to_string("/proc/net/udp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()))
                .then(|| fields.last()?.parse::<u64>().ok())
                .flatten()
        })
        .sum())
}

/// When agents arrived (were welcomed), counted from one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Arrivals {
    pub count: usize,
    pub first_s: f64,
    pub p50_s: f64,
    pub p99_s: f64,
    pub last_s: f64,
    /// The most arrivals within any one second.
    pub peak_per_second: usize,
}

impl Arrivals {
    /// `times` measured from `origin`; `None` when there are none.
    pub fn since(origin: Instant, times: &[Instant]) -> Option<Self> {
        let mut secs: Vec<f64> = times
            .iter()
            .map(|t| t.saturating_duration_since(origin).as_secs_f64())
            .collect();
        secs.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let i = ((secs.len() as f64 - 1.0) * q).round() as usize;
            secs.get(i).copied()
        };
        let peak_per_second = secs
            .iter()
            .enumerate()
            .map(|(i, t)| secs[i..].partition_point(|u| *u < t + 1.0))
            .max()
            .unwrap_or(0);
        Some(Self {
            peak_per_second,
            count: secs.len(),
            first_s: *secs.first()?,
            p50_s: at(0.5)?,
            p99_s: at(0.99)?,
            last_s: *secs.last()?,
        })
    }
}

/// One restart of the edge with every agent connected.
#[derive(Debug, Clone, Serialize)]
pub struct Restart {
    /// `SIGTERM` (a restart: agents are told to go away) or `SIGKILL` (a
    /// crash: agents learn of it from the new process's stateless reset
    /// at their next keep-alive).
    pub signal: &'static str,
    /// From the signal to the old process's exit.
    pub exit_s: f64,
    /// From the signal to the new process logging its addresses.
    pub listening_s: f64,
    /// Agents back, counted from the signal.
    pub back: Arrivals,
    /// Sessions the agents saw end, and attempts that failed, in this restart.
    pub sessions_lost: u64,
    pub attempts_failed: u64,
    /// Datagrams dropped on the new process's tunnel socket by the time
    /// all agents were back.
    pub tunnel_drops: u64,
    /// How the agents learnt their sessions had ended, with a count each.
    pub endings: std::collections::BTreeMap<String, u64>,
}

/// Opening the held streams.
#[derive(Debug, Clone, Serialize)]
pub struct Opening {
    pub streams: usize,
    pub conns: usize,
    pub seconds: f64,
    pub per_second: f64,
    pub edge_cpu_s: f64,
}

/// The JSON file and the table.
#[derive(Debug, Serialize)]
pub struct Report {
    pub command: Vec<String>,
    pub burrow: String,
    pub cores: usize,
    pub nofile: u64,
    pub agents: usize,
    /// `[edge] threads` as configured (`None`: the default, one).
    pub edge_threads: Option<usize>,
    pub idle: Sample,
    pub with_agents: Sample,
    pub per_agent_kib: f64,
    /// Agents connected, counted from when they all started dialling.
    pub accept: Arrivals,
    pub accept_per_second: f64,
    pub accept_edge_cpu_s: f64,
    pub opening: Opening,
    pub with_streams: Sample,
    pub per_stream_kib: f64,
    /// From dropping the client connections to the agents seeing every
    /// stream end.
    pub close_s: f64,
    pub after_close: Sample,
    /// Seconds from the last stream's end until the edge's RSS was back
    /// under twice its RSS with agents only (`None`: not within the wait).
    pub memory_back_s: Option<f64>,
    pub memory_back: Sample,
    pub restarts: Vec<Restart>,
    pub after_restarts: Option<Sample>,
    /// Warnings and errors the edge logged, the most frequent first.
    pub edge_warnings: Vec<(String, u64)>,
    /// Streams the simulated agents failed to answer.
    pub agent_stream_errors: u64,
    pub seconds: f64,
}

/// KiB per item between two samples.
pub fn per_item(before: &Sample, after: &Sample, items: usize) -> f64 {
    (after.rss_kib as f64 - before.rss_kib as f64) / items.max(1) as f64
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// One line of the table: what, then its value.
fn row(t: &mut String, what: &str, value: String) {
    let _ = writeln!(t, "  {what:<52} {value}");
}

impl Report {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let sample = |s: &Sample| {
            format!(
                "{:8.1} MiB RSS  {:6} fds  {:6.2} s CPU  {:6} UDP drops",
                mib(s.rss_kib),
                s.open_fds,
                s.cpu_s,
                s.tunnel_drops
            )
        };
        let threads = self.edge_threads.unwrap_or(1);
        row(
            &mut t,
            &format!("edge idle ({threads} thread(s), all agents configured)"),
            sample(&self.idle),
        );
        row(
            &mut t,
            &format!("edge with {} agents", self.agents),
            sample(&self.with_agents),
        );
        row(
            &mut t,
            "  per agent",
            format!("{:8.1} KiB", self.per_agent_kib),
        );
        row(
            &mut t,
            "agents connected (all dialling at once)",
            format!(
                "{:8.2} s for all, p50 {:.2} s, p99 {:.2} s",
                self.accept.last_s, self.accept.p50_s, self.accept.p99_s
            ),
        );
        row(
            &mut t,
            "  accept rate",
            format!(
                "{:8.0} agents/s  ({:.2} s edge CPU)",
                self.accept_per_second, self.accept_edge_cpu_s
            ),
        );
        let o = &self.opening;
        row(
            &mut t,
            &format!(
                "streams opened ({} over {} HTTP/2 conns)",
                o.streams, o.conns
            ),
            format!(
                "{:8.2} s, {:.0} streams/s  ({:.2} s edge CPU)",
                o.seconds, o.per_second, o.edge_cpu_s
            ),
        );
        row(
            &mut t,
            &format!("edge with {} streams held", o.streams),
            sample(&self.with_streams),
        );
        row(
            &mut t,
            "  per stream",
            format!("{:8.2} KiB", self.per_stream_kib),
        );
        row(
            &mut t,
            "streams closed (all ended at the agents)",
            format!("{:8.2} s", self.close_s),
        );
        row(
            &mut t,
            "edge after streams closed (+1 s)",
            sample(&self.after_close),
        );
        let back = match self.memory_back_s {
            Some(s) => format!("back under 2x the with-agents RSS after {s:.1} s"),
            None => format!(
                "not back under 2x the with-agents RSS within {:.0} s",
                crate::MEMORY_BACK_WAIT.as_secs_f64()
            ),
        };
        row(&mut t, &format!("  {back}"), sample(&self.memory_back));
        for r in &self.restarts {
            let b = &r.back;
            row(
                &mut t,
                &format!("edge {} -> all {} agents back", r.signal, b.count),
                format!(
                    "{:8.2} s (p50 {:.2} s, p99 {:.2} s, first {:.2} s)",
                    b.last_s, b.p50_s, b.p99_s, b.first_s
                ),
            );
            row(
                &mut t,
                "  old edge exited, new edge listening",
                format!(
                    "{:8.2} s, {:.2} s after the signal",
                    r.exit_s, r.listening_s
                ),
            );
            row(
                &mut t,
                "  most agents back within one second",
                format!(
                    "{:8}   ({} UDP drops on the new edge)",
                    b.peak_per_second, r.tunnel_drops
                ),
            );
            for (why, n) in &r.endings {
                let _ = writeln!(t, "    {n:>7}  sessions ended: {why}");
            }
        }
        if let Some(s) = &self.after_restarts {
            row(&mut t, "restarted edge with all agents back", sample(s));
        }
        row(
            &mut t,
            "agent-side stream errors",
            format!("{:8}", self.agent_stream_errors),
        );
        if self.edge_warnings.is_empty() {
            row(&mut t, "edge warnings and errors", "       0".into());
        } else {
            row(
                &mut t,
                "edge warnings and errors (count, level, message)",
                String::new(),
            );
            for (what, n) in self.edge_warnings.iter().take(crate::edge::NOTABLE_SHOWN) {
                let _ = writeln!(t, "    {n:>7}  {what}");
            }
        }
        let _ = writeln!(t, "\n{:.0} s in all", self.seconds);
        t
    }
}
