//! `scale`: one release `burrow edge` with 1,000 agents connected and
//! 100,000 streams open across them. Measures the edge's memory per agent
//! and per stream, how fast it accepts agents, and how long all agents
//! take to come back after the edge is restarted (SIGTERM) and killed
//! (SIGKILL). The agents are simulated in this process ([`agents`]); the
//! streams are held HTTP/2 requests from this process ([`clients`]).
//!
//! Run with `cargo run --release -p burrow-bench --bin scale`; it uses
//! target/release/burrow and builds nothing itself.

#![forbid(unsafe_code)]

mod agents;
#[path = "../../binary.rs"]
mod binary;
mod clients;
mod edge;
#[path = "../../procfs.rs"]
mod procfs;
mod report;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burrow_proto::identity::{Fingerprint, Identity};
use clap::Parser;
use rustix::process::Signal;

use agents::{Census, Fleet};
use edge::{EdgeFiles, EdgeProc, Limits, Notable};
use report::{Arrivals, Opening, Report, Restart, Sample, per_item, secs};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The edge's maximum for `[limits] streams_per_connection` (edge/src/config.rs).
const MAX_STREAMS_PER_CONNECTION: usize = 10_000;
/// How long all agents may take to connect, at the start or after a restart.
const CONNECT_ALL_TIMEOUT: Duration = Duration::from_secs(90);
/// How long opening every stream may take.
const OPEN_ALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the agents may take to see every stream end once closed.
const CLOSE_ALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause before a memory sample, so that what just finished (handshakes,
/// request heads) has been freed or kept for good.
const SETTLE: Duration = Duration::from_secs(1);
/// How long the edge's memory may take to come back after the streams
/// closed (jemalloc purges freed pages after 10 s), and how often it is sampled.
pub const MEMORY_BACK_WAIT: Duration = Duration::from_secs(30);
const MEMORY_POLL: Duration = Duration::from_millis(250);
/// Open files wanted: a UDP socket per agent and a few per client
/// connection here, and as many again in the edge.
const NOFILE: u64 = 65_536;

#[derive(Debug, Parser)]
#[command(
    name = "scale",
    about = "One release burrow edge with many agents and streams, on loopback"
)]
struct Args {
    /// The burrow binary (default: `burrow` beside this executable, i.e. target/release/burrow).
    #[arg(long)]
    burrow: Option<PathBuf>,
    /// Simulated agents.
    #[arg(long, default_value_t = 1000)]
    agents: usize,
    /// Streams to hold open, spread evenly over the agents.
    #[arg(long, default_value_t = 100_000)]
    streams: usize,
    /// HTTP/2 connections carrying them (each from its own 127.0.0.x).
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// The edge's worker threads (`[edge] threads`; default: the edge's own, one).
    #[arg(long)]
    threads: Option<usize>,
    /// Edge restarts to time, comma-separated: term (SIGTERM, agents are
    /// told to go away), kill (SIGKILL, a crash).
    #[arg(long, value_delimiter = ',', default_value = "term,kill")]
    restarts: Vec<Stop>,
    /// Where to write the JSON report (default: target/scale.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How the edge is stopped before it is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Stop {
    Term,
    Kill,
}

impl Stop {
    fn signal(self) -> (Signal, &'static str) {
        match self {
            Self::Term => (Signal::TERM, "SIGTERM"),
            Self::Kill => (Signal::KILL, "SIGKILL"),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let nofile = procfs::raise_nofile(NOFILE);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("scale: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        tokio::select! {
            r = run(args, nofile) => r,
            _ = tokio::signal::ctrl_c() => Err("interrupted".into()),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The burrow binary to run, which must already be built.
fn burrow_binary(args: &Args) -> Result<PathBuf, Error> {
    binary::burrow_binary(args.burrow.as_deref())
}

/// target/ of the workspace this bench was built in (it lives in target/release/).
fn target_dir() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    Ok(exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot tell the target directory from the executable's path")?
        .to_owned())
}

/// Keys and certificates of one run, written to its folder.
struct Setup {
    dir: PathBuf,
    edge_key: PathBuf,
    edge_fp: Fingerprint,
    cert: PathBuf,
    cert_key: PathBuf,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    names: Vec<String>,
    identities: Vec<Identity>,
}

impl Setup {
    /// The edge's identity (as `burrow keygen` writes it), one identity per
    /// agent (kept in memory: the simulated agents use them from here),
    /// and a certificate for every route's host.
    fn generate(dir: &Path, agents: usize) -> Result<Self, Error> {
        std::fs::create_dir_all(dir.join("state"))?;
        let edge_key = dir.join("edge.key");
        let edge_fp = Identity::create(&edge_key)?.fingerprint();
        let names: Vec<String> = (0..agents).map(edge::agent_name).collect();
        let identities = (0..agents)
            .map(|_| Identity::generate())
            .collect::<Result<Vec<_>, _>>()?;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let wildcard = format!("*.{}", edge::DOMAIN);
        let cert = rcgen::CertificateParams::new(vec![wildcard])?.self_signed(&key)?;
        let (cert_path, cert_key) = (dir.join("cert.pem"), dir.join("cert.key"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&cert_key, key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_owned(),
            edge_key,
            edge_fp,
            cert: cert_path,
            cert_key,
            cert_der: cert.der().clone(),
            names,
            identities,
        })
    }

    fn fingerprints(&self) -> Vec<Fingerprint> {
        self.identities.iter().map(Identity::fingerprint).collect()
    }
}

/// The edge of the run: its config file and the process, restartable on
/// the same ports.
struct Edge {
    burrow: PathBuf,
    config: PathBuf,
    log: PathBuf,
    notable: Notable,
    proc: EdgeProc,
    /// The tunnel's address, once known.
    tunnel: std::net::SocketAddr,
}

impl Edge {
    fn spawn(burrow: &Path, config: &Path, log: &Path, notable: &Notable) -> Result<Self, Error> {
        Ok(Self {
            burrow: burrow.to_owned(),
            config: config.to_owned(),
            log: log.to_owned(),
            notable: notable.clone(),
            proc: EdgeProc::spawn(burrow, config, log, notable)?,
            tunnel: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        })
    }

    fn sample(&self) -> Result<Sample, Error> {
        Ok(Sample::of(self.proc.pid(), self.tunnel)?)
    }

    /// Samples the edge until its RSS is at most `kib`, for up to
    /// [`MEMORY_BACK_WAIT`] from `since`: when it got there, and the last sample.
    async fn memory_back(&self, since: Instant, kib: u64) -> Result<(Option<f64>, Sample), Error> {
        loop {
            let s = self.sample()?;
            if s.rss_kib <= kib {
                return Ok((Some(secs(since.elapsed())), s));
            }
            if since.elapsed() >= MEMORY_BACK_WAIT {
                return Ok((None, s));
            }
            tokio::time::sleep(MEMORY_POLL).await;
        }
    }

    /// Samples the edge after [`SETTLE`].
    async fn settled_sample(&self) -> Result<Sample, Error> {
        tokio::time::sleep(SETTLE).await;
        self.sample()
    }

    /// Stops the edge with `signal`, starts it again on the same ports
    /// (the config names them by now), and waits until every agent has
    /// been welcomed by the new process.
    async fn restart(
        &mut self,
        signal: Signal,
        name: &'static str,
        census: &Census,
        agents: usize,
    ) -> Result<Restart, Error> {
        let (lost, failed) = (census.sessions_lost(), census.attempts_failed());
        census.take_endings();
        census.new_epoch();
        let origin = Instant::now();
        let exit = self.proc.stop(signal).await?;
        self.proc = EdgeProc::spawn(&self.burrow, &self.config, &self.log, &self.notable)?;
        self.proc.listening().await?;
        let listening = origin.elapsed();
        let what = format!("agents back after {name}");
        let all = census.wait_until(&what, CONNECT_ALL_TIMEOUT, |c| c.arrivals().len() >= agents);
        tokio::select! {
            r = all => r?,
            e = self.proc.failed() => return Err(e),
        }
        Ok(Restart {
            signal: name,
            exit_s: secs(exit),
            listening_s: secs(listening),
            back: Arrivals::since(origin, &census.arrivals()).ok_or("no agent came back")?,
            sessions_lost: census.sessions_lost() - lost,
            attempts_failed: census.attempts_failed() - failed,
            endings: census.take_endings(),
            tunnel_drops: self.sample()?.tunnel_drops,
        })
    }
}

/// Streams per client connection and the `[limits]` that allow them.
fn limits_for(args: &Args) -> Result<(usize, Limits), Error> {
    if args.conns == 0 || args.streams % args.conns != 0 {
        return Err(format!(
            "--streams ({}) must be a multiple of --conns ({})",
            args.streams, args.conns
        )
        .into());
    }
    let per_conn = args.streams / args.conns;
    if per_conn > MAX_STREAMS_PER_CONNECTION {
        return Err(format!(
            "{per_conn} streams per connection is above the edge's limit of {MAX_STREAMS_PER_CONNECTION}; use more --conns"
        )
        .into());
    }
    Ok((
        per_conn,
        Limits {
            streams_per_connection: per_conn,
            // One connection per source address, unless they wrap.
            streams_per_ip: per_conn * args.conns.div_ceil(clients::SOURCES),
        },
    ))
}

async fn run(args: Args, nofile: u64) -> Result<(), Error> {
    let started = Instant::now();
    let burrow = burrow_binary(&args)?;
    let (per_conn, limits) = limits_for(&args)?;
    let target = target_dir()?;
    let dir = target.join("scale-run");
    let _ = std::fs::remove_dir_all(&dir);
    let setup = Setup::generate(&dir, args.agents)?;
    eprintln!(
        "scale: {} agents, {} streams over {} connections; burrow from {}",
        args.agents,
        args.streams,
        args.conns,
        burrow.display()
    );

    // Port 0 first; the ports it got are written back for restarts.
    let any = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let fingerprints = setup.fingerprints();
    let files = EdgeFiles {
        dir: &setup.dir,
        edge_key: &setup.edge_key,
        cert: &setup.cert,
        cert_key: &setup.cert_key,
        agents: &fingerprints,
        limits,
        threads: args.threads,
    };
    let config = dir.join("edge.toml");
    std::fs::write(&config, files.toml(any, any))?;
    let notable = Notable::default();
    let mut edge = Edge::spawn(&burrow, &config, &dir.join("edge.log"), &notable)?;
    let (https, tunnel) = edge.proc.listening().await?;
    edge.tunnel = tunnel;
    std::fs::write(&config, files.toml(https, tunnel))?;
    eprintln!("scale: edge on https {https}, tunnel {tunnel}");
    let idle = edge.settled_sample().await?;

    let (fleet, accept, accept_cpu) = connect_fleet(&edge, &setup, &idle).await?;
    let (census, agents) = (fleet.census.clone(), fleet.len());
    let with_agents = edge.settled_sample().await?;

    let (load, opening) = open_streams(&edge, &census, https, &setup, &args, per_conn).await?;
    let with_streams = edge.settled_sample().await?;

    let closing = close_streams(&edge, &census, load, &with_agents).await?;

    let mut restarts = Vec::new();
    for (signal, name) in args.restarts.iter().map(|s| s.signal()) {
        eprintln!("scale: restarting the edge with {name}");
        let r = edge.restart(signal, name, &census, agents).await?;
        eprintln!("scale: all agents back {:.2} s after {name}", r.back.last_s);
        restarts.push(r);
    }
    let after_restarts = edge.settled_sample().await.ok();

    let report = Report {
        command: std::env::args().collect(),
        burrow: burrow.display().to_string(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        nofile,
        agents,
        edge_threads: args.threads,
        per_agent_kib: per_item(&idle, &with_agents, agents),
        idle,
        with_agents,
        accept_per_second: agents as f64 / accept.last_s.max(f64::EPSILON),
        accept,
        accept_edge_cpu_s: accept_cpu,
        per_stream_kib: per_item(&with_agents, &with_streams, opening.streams),
        opening,
        with_streams,
        close_s: closing.seconds,
        after_close: closing.after,
        memory_back_s: closing.memory_back_s,
        memory_back: closing.memory_back,
        restarts,
        after_restarts,
        edge_warnings: notable.summary(),
        agent_stream_errors: census.stream_errors(),
        seconds: secs(started.elapsed()),
    };
    drop(fleet);
    print!("{}", report.table());
    if let Some(first) = census.first_stream_error() {
        println!("first agent-side stream error: {first}");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("scale.json"));
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", out.display());
    Ok(())
}

/// Starts every agent dialling at once, as after a power cut at a
/// thousand homes, and waits until all are welcomed: the fleet, when they
/// arrived, and the edge CPU seconds that took.
async fn connect_fleet(
    edge: &Edge,
    setup: &Setup,
    idle: &Sample,
) -> Result<(Fleet, Arrivals, f64), Error> {
    let fleet = Fleet::new(&setup.names, &setup.identities, setup.edge_fp)?;
    let (census, agents) = (fleet.census.clone(), fleet.len());
    let origin = Instant::now();
    fleet.start(edge.tunnel);
    tokio::select! {
        r = census.wait_until("agents connecting", CONNECT_ALL_TIMEOUT, |c| c.connected() >= agents) => r?,
        e = edge.proc.failed() => return Err(e),
    }
    let accept = Arrivals::since(origin, &census.arrivals()).ok_or("no agent connected")?;
    let cpu = edge.sample()?.cpu_s - idle.cpu_s;
    eprintln!("scale: {agents} agents connected in {:.2} s", accept.last_s);
    Ok((fleet, accept, cpu))
}

/// How closing every stream went.
struct Closing {
    /// From dropping the clients' connections to the last stream's end at the agents.
    seconds: f64,
    /// The edge [`SETTLE`] after that.
    after: Sample,
    memory_back_s: Option<f64>,
    memory_back: Sample,
}

/// Closes every held stream at once and watches the edge's memory come
/// back (under twice what it was with agents only).
async fn close_streams(
    edge: &Edge,
    census: &Census,
    load: clients::Load,
    with_agents: &Sample,
) -> Result<Closing, Error> {
    let start = Instant::now();
    drop(load);
    census
        .wait_until("streams closing", CLOSE_ALL_TIMEOUT, |c| c.held() == 0)
        .await?;
    let seconds = secs(start.elapsed());
    let closed = Instant::now();
    let after = edge.settled_sample().await?;
    let (memory_back_s, memory_back) = edge.memory_back(closed, 2 * with_agents.rss_kib).await?;
    Ok(Closing {
        seconds,
        after,
        memory_back_s,
        memory_back,
    })
}

/// Opens and holds every stream; returns them and how the opening went.
async fn open_streams(
    edge: &Edge,
    census: &Census,
    https: std::net::SocketAddr,
    setup: &Setup,
    args: &Args,
    per_conn: usize,
) -> Result<(clients::Load, Opening), Error> {
    let tls = clients::connector(setup.cert_der.clone())?;
    let shape = clients::Shape {
        conns: args.conns,
        per_conn,
        agents: args.agents,
    };
    let progress = Arc::new(clients::Progress::default());
    let before = edge.sample()?;
    let t = Instant::now();
    let opening = tokio::time::timeout(
        OPEN_ALL_TIMEOUT,
        clients::open(https, &tls, shape, &progress),
    );
    let load = tokio::select! {
        r = opening => r.map_err(|_| format!(
            "streams not all open within {OPEN_ALL_TIMEOUT:?}: {} opened",
            progress.opened.load(std::sync::atomic::Ordering::Relaxed)
        ))??,
        e = edge.proc.failed() => return Err(e),
    };
    let streams = load.streams();
    // Every response head the clients got was written by an agent that
    // counts the stream as held; this confirms none ended since.
    census
        .wait_until("streams held", Duration::from_secs(10), |c| {
            c.held() >= streams
        })
        .await?;
    let seconds = secs(t.elapsed());
    eprintln!("scale: {streams} streams open in {seconds:.2} s");
    Ok((
        load,
        Opening {
            streams,
            conns: args.conns,
            seconds,
            per_second: streams as f64 / seconds.max(f64::EPSILON),
            edge_cpu_s: edge.sample()?.cpu_s - before.cpu_s,
        },
    ))
}
