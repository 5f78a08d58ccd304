//! The `burrow` command: parse the arguments, load the config before binding
//! anything, run, and map failures to exit codes (0 ok, 78 bad config, 1
//! runtime failure).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use burrow_agent::{Agent, AgentConfig};
use burrow_edge::{Edge, EdgeConfig, Prebound};
use burrow_proto::confkit::{ConfigError, Source};
use burrow_proto::identity::Identity;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;
use tracing::error;

mod activation;
mod notify;

/// Exit code for a bad config (EX_CONFIG), so systemd does not restart-loop.
const EXIT_CONFIG: u8 = 78;
const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "burrow",
    version,
    about = "A self-hosted tunnel for the AI you run at home"
)]
struct Cli {
    /// Log format on stderr (RUST_LOG sets the level, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the edge (the public server on the VPS).
    Edge {
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the agent (the home daemon that dials the edge).
    Agent {
        #[arg(long)]
        config: PathBuf,
    },
    /// Edge, agent and a sample chat app on this machine, with self-signed TLS.
    Demo {
        /// HTTPS port on 127.0.0.1 (0, or a taken port, picks a free one).
        #[arg(long, default_value_t = 8443)]
        port: u16,
    },
    /// Validate an edge or agent config: exit 0, or print file:line:col and exit 78.
    Check {
        #[arg(long)]
        config: PathBuf,
    },
    /// Read a password (prompt on a terminal, else one line of stdin) and
    /// print its argon2id hash for [[user]] password.
    HashPassword,
    /// Make an API key for apps that send `Authorization: Bearer`: print
    /// the key once, and the [[api_key]] table with its argon2id hash.
    KeygenApi {
        /// The key's name, listed in a route's api_keys and logged as key:NAME.
        #[arg(long, value_parser = api_key_name_arg)]
        name: burrow_proto::Name,
    },
    /// Revoke every session cookie issued so far (a running edge refuses
    /// them from its next request on; users sign in again).
    LogoutAll {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make an identity key and print its fingerprint.
    Keygen {
        #[arg(long)]
        out: PathBuf,
        /// When the file exists, print its fingerprint instead of failing.
        #[arg(long)]
        if_missing: bool,
    },
    /// Print what the edge's admin status page shows: agents, services,
    /// certificates and counters (exit 1 when the admin listener is away).
    Status {
        /// The edge's admin listener ([edge] admin).
        #[arg(long, default_value = burrow::status::DEFAULT_ADMIN)]
        admin: String,
    },
    /// Send one Wake-on-LAN magic packet now.
    Wake {
        /// The MAC address of the machine to wake, e.g. AA:BB:CC:DD:EE:FF.
        #[arg(long, value_parser = mac_arg)]
        mac: [u8; 6],
        /// Where the packet goes: a broadcast address, port 9 unless given.
        #[arg(long, default_value = burrow_agent::config::DEFAULT_BROADCAST, value_parser = broadcast_arg)]
        broadcast: String,
        /// A SecureOn password, six hex pairs like a MAC address.
        #[arg(long, value_parser = mac_arg)]
        password: Option<[u8; 6]>,
    },
}

fn mac_arg(s: &str) -> Result<[u8; 6], String> {
    burrow_agent::config::parse_mac(s)
        .ok_or_else(|| "write six hex pairs, e.g. AA:BB:CC:DD:EE:FF".into())
}

fn api_key_name_arg(s: &str) -> Result<burrow_proto::Name, String> {
    burrow_proto::Name::new(s).map_err(|e| e.to_string())
}

fn broadcast_arg(s: &str) -> Result<String, String> {
    burrow_agent::config::parse_broadcast(s)
        .ok_or_else(|| "write an address, e.g. 192.168.1.255:9".into())
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: the journal and log files
    // get plain text (and NO_COLOR is honoured).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Cancels the token on SIGTERM or Ctrl-C.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        notify::notify("STOPPING=1");
        t.cancel();
    });
    token
}

/// `burrow logout-all`: raises the session generation in `state_dir` and,
/// with `[cluster]`, in Redis, so every edge refuses older sessions.
fn logout_all(c: &EdgeConfig) -> ExitCode {
    use burrow_edge::access::session;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("burrow logout-all: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let _in_runtime = runtime.enter();
    let shared = match &c.cluster {
        None => None,
        Some(cluster) => match burrow_edge::cluster::Cluster::new(cluster) {
            Ok(cluster) => Some(cluster),
            Err(e) => {
                eprintln!("burrow logout-all: {e}");
                return ExitCode::from(EXIT_FAILURE);
            }
        },
    };
    // The cluster's generation first, so the new one is above every edge's.
    let cluster_generation = shared
        .as_ref()
        .map(|cluster| runtime.block_on(cluster.read_generation()));
    let at_least = match &cluster_generation {
        Some(Ok(g)) => *g,
        _ => 0,
    };
    let generation = match session::revoke_all_above(&c.state_dir, at_least) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("burrow logout-all: {}: {e}", c.state_dir.display());
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    println!(
        "every session issued so far is revoked (generation {generation} in {})",
        c.state_dir.display()
    );
    let (Some(cluster), Some(read)) = (shared, cluster_generation) else {
        return ExitCode::SUCCESS;
    };
    let raised = match read {
        Ok(_) => runtime.block_on(cluster.raise_generation(generation)),
        Err(e) => Err(e),
    };
    match raised {
        Ok(g) => {
            println!("and on every edge of the cluster (generation {g} in Redis)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "burrow logout-all: cannot reach Redis ({e}): revoked on this edge now; it raises the cluster's generation when Redis is back"
            );
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn config_failure(e: &ConfigError) -> ExitCode {
    eprintln!("{e}");
    ExitCode::from(EXIT_CONFIG)
}

/// Which daemon a config file is for, by its first table.
enum ConfigKind {
    Edge(Box<EdgeConfig>),
    Agent(Box<AgentConfig>),
}

fn check(path: &std::path::Path) -> Result<ConfigKind, ConfigError> {
    let src = Source::read(path)?;
    let table: toml::Table = src.parse()?;
    // `[[agent]]` entries in an edge config are an array; an agent config
    // has a single `[agent]` table.
    let agent_section = table.get("agent").is_some_and(toml::Value::is_table);
    match (table.contains_key("edge"), agent_section) {
        (true, false) => Ok(ConfigKind::Edge(Box::new(EdgeConfig::from_source(&src)?))),
        (false, true) => Ok(ConfigKind::Agent(Box::new(AgentConfig::from_source(&src)?))),
        _ => Err(src.error("expected exactly one of an [edge] or an [agent] section")),
    }
}

/// Reloads the config file on each SIGHUP and hands valid ones to `tx`; a
/// file that does not load is logged and the running config stays.
fn reload_on_sighup<C: Send + 'static>(
    path: PathBuf,
    tx: tokio::sync::mpsc::Sender<C>,
    load: fn(&std::path::Path) -> Result<C, ConfigError>,
) {
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "cannot listen for SIGHUP; reload disabled");
                return;
            }
        };
        while hup.recv().await.is_some() {
            notify::notify("RELOADING=1");
            match load(&path) {
                Ok(config) => {
                    tracing::info!(path = %path.display(), "reloading config");
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(e) => error!(error = %e, "reload refused; the running config stays"),
            }
            notify::notify("READY=1");
        }
    });
}

async fn run_edge(config: EdgeConfig, path: PathBuf) -> ExitCode {
    // Sockets from systemd socket activation, if it started us.
    let prebound = match activation::prebound(&config) {
        Ok(Some(p)) => {
            tracing::info!("using the listening sockets systemd handed over");
            p
        }
        Ok(None) => Prebound::default(),
        Err(e) => {
            error!(error = %e, "edge cannot start");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let edge = match Edge::bind_with(config, prebound).await {
        Ok(e) => e,
        Err(e) => {
            error!(error = %e, "edge cannot start");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    reload_on_sighup(path, tx, EdgeConfig::load);
    let shutdown = shutdown_on_signals();
    notify::notify("READY=1");
    notify::spawn_watchdog();
    match edge.run_with_reloads(shutdown, rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "edge failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

async fn run_agent(config: AgentConfig, path: PathBuf) -> ExitCode {
    let agent = match Agent::new(config) {
        Ok(a) => a,
        Err(e) => {
            error!(error = %e, "agent cannot start");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    reload_on_sighup(path, tx, AgentConfig::load);
    notify::notify("READY=1");
    notify::spawn_watchdog();
    match agent.run_with_reloads(shutdown_on_signals(), rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "agent failed");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// jemalloc with its background thread: pages freed after a spike (10,000
/// WebSockets closing) go back to the kernel within seconds (dirty pages
/// purged after 10 s). glibc's malloc kept them, at random: after 10,000
/// closed, edge and agent stayed at 152 and 129 MiB in one run, fell to
/// 26 and 25 MiB in another; `malloc_trim` every 10 s left them at 60 MiB
/// (the free tops of its per-thread arenas are never trimmed). mimalloc
/// doubled idle RSS and returned nothing. Measured with the bench's memory
/// scenario (`burrow-bench --only memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print for a person stay quiet unless asked.
    init_logs(cli.log_format);

    // Load and validate configs before a runtime or socket exists.
    match cli.command {
        Command::Check { config } => match check(&config) {
            Ok(ConfigKind::Edge(c)) => {
                println!(
                    "{}: ok (edge: {} agents, {} routes, {} ports)",
                    config.display(),
                    c.agents.len(),
                    c.routes.len(),
                    c.ports.len()
                );
                ExitCode::SUCCESS
            }
            Ok(ConfigKind::Agent(c)) => {
                println!(
                    "{}: ok (agent {}: {} services)",
                    config.display(),
                    c.name,
                    c.services.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_failure(&e),
        },
        Command::Keygen { out, if_missing } => match if if_missing && out.exists() {
            Identity::load(&out)
        } else {
            Identity::create(&out)
        } {
            Ok(id) => {
                println!("{}", id.fingerprint());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("burrow keygen: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::HashPassword => match read_password().and_then(|p| {
            burrow_edge::access::auth::hash_password(p.as_bytes()).map_err(|e| e.to_string())
        }) {
            Ok(hash) => {
                println!("{hash}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("burrow hash-password: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::KeygenApi { name } => match new_api_key(&name) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("burrow keygen-api: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::LogoutAll { config } => match EdgeConfig::load(&config) {
            Ok(c) => logout_all(&c),
            Err(e) => config_failure(&e),
        },
        Command::Edge { config } => match EdgeConfig::load(&config) {
            Ok(c) => runtime_with(c.threads).block_on(run_edge(c, config)),
            Err(e) => config_failure(&e),
        },
        Command::Agent { config } => match AgentConfig::load(&config) {
            Ok(c) => runtime_with(c.threads).block_on(run_agent(c, config)),
            Err(e) => config_failure(&e),
        },
        Command::Wake {
            mac,
            broadcast,
            password,
        } => {
            let packet =
                burrow_agent::wake::magic_packet(mac, password.map(burrow_agent::config::SecureOn));
            match runtime().block_on(burrow_agent::wake::send_magic_packet(&broadcast, &packet)) {
                Ok(to) => {
                    let mac: Vec<String> = mac.iter().map(|b| format!("{b:02X}")).collect();
                    println!("sent a magic packet for {} to {to}", mac.join(":"));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("burrow wake: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Command::Status { admin } => match runtime().block_on(burrow::status::text(&admin)) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("burrow status: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Command::Demo { port } => {
            runtime().block_on(async move { burrow::demo::run(port, shutdown_on_signals()).await })
        }
    }
}

/// A new API key named `name`, and the [[api_key]] table that takes it.
fn new_api_key(name: &burrow_proto::Name) -> Result<String, String> {
    use burrow_edge::access::{api_key, auth};
    let key = api_key::generate().map_err(|_| "the OS random source failed")?;
    let hash = auth::hash_password(key.as_bytes()).map_err(|e| e.to_string())?;
    Ok(format!(
        "API key {name} (shown only now; the edge keeps only its hash):\n\
         {key}\n\n\
         # Add this to edge.toml, list \"{name}\" in a route's api_keys, and reload:\n\
         [[api_key]]\n\
         name = \"{name}\"\n\
         hash = \"{hash}\"\n"
    ))
}

/// The most password bytes read from stdin.
const MAX_PASSWORD: u64 = 4096;

/// A password from a prompt (asked twice) or from one line of stdin.
fn read_password() -> Result<String, String> {
    use std::io::{BufRead, IsTerminal, Read};
    let password = if std::io::stdin().is_terminal() {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the passwords differ".into());
        }
        first
    } else {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .take(MAX_PASSWORD)
            .read_line(&mut line)
            .map_err(|e| format!("reading stdin: {e}"))?;
        let line = line.strip_suffix('\n').unwrap_or(&line);
        line.strip_suffix('\r').unwrap_or(line).to_owned()
    };
    if password.is_empty() {
        return Err("empty password".into());
    }
    Ok(password)
}

/// The runtime for short commands and the demo: one worker per core.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime (out of threads or memory?)")
}

/// The runtime for the edge and the agent, with the config's `threads`.
/// Blocking work (password hashing, file writes) has its own pool.
fn runtime_with(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("building the tokio runtime (out of threads or memory?)")
}
