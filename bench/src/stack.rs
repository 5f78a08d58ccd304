//! The processes under test: burrow's release edge and agent, and the peer
//! stack users build today (Caddy in front of rathole with its noise
//! transport). Each runs as its own process with its log in the run folder.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::Error;
use crate::client::{Endpoint, HOST};

/// How long a stack may take to answer its first request.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between readiness probes.
const PROBE_INTERVAL: Duration = Duration::from_millis(10);

/// A child process, killed when dropped.
pub struct Proc {
    name: String,
    cmd_line: Vec<String>,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Result<Self, Error> {
        let log = dir.join(format!("{name}.log"));
        let out = File::options().create(true).append(true).open(&log)?;
        let child = Command::new(program)
            .args(args)
            .env("HOME", dir)
            .env("XDG_DATA_HOME", dir.join("xdg-data"))
            .env("XDG_CONFIG_HOME", dir.join("xdg-config"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("starting {name} ({}): {e}", program.display()))?;
        let mut cmd_line = vec![program.display().to_string()];
        cmd_line.extend(args.iter().cloned());
        Ok(Self {
            name: name.to_owned(),
            cmd_line,
            child,
            log,
        })
    }

    /// Spawns a process that prints `{prefix}ADDR` on stdout once it listens.
    pub fn spawn_reporting(
        name: &str,
        program: &Path,
        args: &[String],
        dir: &Path,
        prefix: &str,
    ) -> Result<(Self, SocketAddr), Error> {
        let log = dir.join(format!("{name}.log"));
        let err = File::options().create(true).append(true).open(&log)?;
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name} ({}): {e}", program.display()))?;
        let stdout = child.stdout.take().ok_or("child has no stdout")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let addr = line
            .trim()
            .strip_prefix(prefix)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("{name} did not report its address: {line:?}"))?;
        let mut cmd_line = vec![program.display().to_string()];
        cmd_line.extend(args.iter().cloned());
        Ok((
            Self {
                name: name.to_owned(),
                cmd_line,
                child,
                log,
            },
            addr,
        ))
    }

    /// Waits for the JSON log line whose message is `message` and returns
    /// its address field `field`: how a process that bound port 0 says
    /// what it got.
    pub fn wait_log_addr(&mut self, message: &str, field: &str) -> Result<SocketAddr, Error> {
        let start = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let found = log
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["message"] == message);
            if let Some(v) = found {
                return v[field]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or_else(|| {
                        format!("{}: {message:?} has no address {field}", self.name).into()
                    });
            }
            self.check_alive()?;
            if start.elapsed() > READY_TIMEOUT {
                return Err(format!("{} never logged {message:?}", self.name).into());
            }
            std::thread::sleep(PROBE_INTERVAL);
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails, quoting the end of the log, when the process has exited.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                Err(format!(
                    "{} exited ({status}); last log lines:\n{}",
                    self.name,
                    tail.join("\n")
                )
                .into())
            }
        }
    }

    /// SIGTERM, then wait for the exit; returns how long the exit took.
    pub async fn terminate(&mut self) -> Result<Duration, Error> {
        let start = Instant::now();
        let pid =
            rustix::process::Pid::from_raw(i32::try_from(self.pid())?).ok_or("child has no pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > STOP_TIMEOUT {
                self.child.kill()?;
                self.child.wait()?;
                return Err(format!("{} ignored SIGTERM for {STOP_TIMEOUT:?}", self.name).into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(start.elapsed())
    }

    /// Starts the same command again (same ports, same files).
    fn respawn(&mut self, dir: &Path) -> Result<(), Error> {
        let program = PathBuf::from(&self.cmd_line[0]);
        let args = self.cmd_line[1..].to_vec();
        *self = Self::spawn(&self.name, &program, &args, dir)?;
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago, only for Caddy and rathole: other
/// programs, which take their ports from a config file and cannot be
/// handed a bound socket or asked which port they got. Something else may
/// take the port before they bind it; they then exit and the run fails,
/// saying so ([`Proc::check_alive`]). burrow binds port 0 and reports.
pub fn free_tcp_port() -> Result<u16, Error> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The certificate every TLS target presents (one key type for all).
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: rustls::pki_types::CertificateDer<'static>,
}

impl CertFiles {
    pub fn generate(dir: &Path) -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = rcgen::CertificateParams::new(vec![HOST.to_owned()])?.self_signed(&key)?;
        let files = Self {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            der: cert.der().clone(),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}

/// Polls `endpoint` until a request succeeds, a process dies, or the timeout.
pub async fn wait_ready(endpoint: &Endpoint, procs: &mut [&mut Proc]) -> Result<(), Error> {
    let start = Instant::now();
    loop {
        let last = match endpoint.probe().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if start.elapsed() > READY_TIMEOUT {
            return Err(format!("not ready after {READY_TIMEOUT:?}: {last}").into());
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

fn keygen(burrow: &Path, out: &Path) -> Result<String, Error> {
    let o = Command::new(burrow)
        .args(["keygen", "--out"])
        .arg(out)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("running {} keygen: {e}", burrow.display()))?;
    if !o.status.success() {
        return Err(format!("burrow keygen failed: {}", o.status).into());
    }
    String::from_utf8(o.stdout)?
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .map(str::to_owned)
        .ok_or_else(|| "burrow keygen printed no fingerprint".into())
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn path_arg(p: &Path) -> String {
    p.display().to_string()
}

/// burrow: the release edge and agent, self-contained in `dir`.
pub struct Burrow {
    pub edge: Proc,
    pub agent: Proc,
    pub https: SocketAddr,
    /// The tunnel's UDP port, where browsers get HTTP/3 too.
    pub tunnel: SocketAddr,
    dir: PathBuf,
}

impl Burrow {
    pub fn start(
        burrow: &Path,
        dir: &Path,
        upstream: SocketAddr,
        certs: &CertFiles,
        rate: Option<&str>,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir.join("state"))?;
        // A limit that is checked on every request but never reached.
        let rate = rate.map_or(String::new(), |r| {
            format!("rate = {r:?}\nburst = 1000000\n")
        });
        let agent_fp = keygen(burrow, &dir.join("agent.key"))?;
        let edge_fp = keygen(burrow, &dir.join("edge.key"))?;
        let edge_toml = |https: SocketAddr, tunnel: SocketAddr| {
            format!(
                "[edge]\nstate_dir = {state:?}\nkey = {key:?}\nhttps = \"{https}\"\ntunnel = \"{tunnel}\"\nhttp3 = true\n\n\
                 [tls]\nmode = \"files\"\ncert = {cert:?}\nkey = {tls_key:?}\n\n\
                 [[agent]]\nname = \"home\"\nkey = \"{agent_fp}\"\n\n\
                 [[route]]\nhost = \"{HOST}\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n{rate}",
                state = dir.join("state"),
                key = dir.join("edge.key"),
                cert = certs.cert,
                tls_key = certs.key,
            )
        };
        let edge_cfg = dir.join("edge.toml");
        let agent_cfg = dir.join("agent.toml");
        // The edge binds port 0 and logs what it got; the agent and the
        // clients are told after. No port is picked here and bound later.
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        std::fs::write(&edge_cfg, edge_toml(any, any))?;
        let mut edge = Proc::spawn(
            "burrow-edge",
            burrow,
            &args(&[
                "--log-format",
                "json",
                "edge",
                "--config",
                &path_arg(&edge_cfg),
            ]),
            dir,
        )?;
        let tunnel = edge.wait_log_addr("edge listening", "tunnel")?;
        let https = edge.wait_log_addr("serving https", "addr")?;
        // A restart comes back on the same ports (clients and the agent
        // know them): the edge's own, freed as it exits and bound again
        // at once by its successor.
        std::fs::write(&edge_cfg, edge_toml(https, tunnel))?;
        let agent_toml = format!(
            "[agent]\nname = \"home\"\nedge = \"{tunnel}\"\nedge_key = \"{edge_fp}\"\nkey = {key:?}\n\n\
             [[service]]\nname = \"app\"\nurl = \"http://{upstream}\"\n",
            key = dir.join("agent.key"),
        );
        std::fs::write(&agent_cfg, agent_toml)?;
        let agent = Proc::spawn(
            "burrow-agent",
            burrow,
            &args(&[
                "--log-format",
                "json",
                "agent",
                "--config",
                &path_arg(&agent_cfg),
            ]),
            dir,
        )?;
        Ok(Self {
            edge,
            agent,
            https,
            tunnel,
            dir: dir.to_owned(),
        })
    }

    pub async fn wait_ready(&mut self, endpoint: &Endpoint) -> Result<(), Error> {
        wait_ready(endpoint, &mut [&mut self.edge, &mut self.agent]).await
    }

    /// SIGTERM the edge, wait for it to exit, start it again on the same
    /// ports. Returns when the new process has been spawned.
    pub async fn restart_edge(&mut self) -> Result<Duration, Error> {
        let stopped = self.edge.terminate().await?;
        self.edge.respawn(&self.dir)?;
        Ok(stopped)
    }
}

/// Where the peer binaries live and whether they are there.
pub struct PeerBins {
    pub caddy: PathBuf,
    pub rathole: PathBuf,
}

impl PeerBins {
    pub fn find(dir: &Path) -> Result<Self, String> {
        let bins = Self {
            caddy: dir.join("caddy"),
            rathole: dir.join("rathole"),
        };
        let missing: Vec<String> = [&bins.caddy, &bins.rathole]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| p.display().to_string())
            .collect();
        if missing.is_empty() {
            Ok(bins)
        } else {
            Err(format!("missing {}", missing.join(", ")))
        }
    }
}

fn caddyfile(dir: &Path, port: u16, certs: &CertFiles, backend: SocketAddr) -> String {
    format!(
        "{{\n\tadmin off\n\tauto_https off\n\tpersist_config off\n\tstorage file_system {storage:?}\n\
         \tservers {{\n\t\tprotocols h1 h2\n\t}}\n\tlog {{\n\t\toutput discard\n\t}}\n}}\n\n\
         https://{HOST}:{port} {{\n\tbind 127.0.0.1\n\ttls {cert:?} {key:?}\n\
         \treverse_proxy {backend} {{\n\t\tflush_interval -1\n\t}}\n}}\n",
        storage = dir.join("caddy-data"),
        cert = certs.cert,
        key = certs.key,
    )
}

fn start_caddy(
    bins: &PeerBins,
    name: &str,
    dir: &Path,
    certs: &CertFiles,
    backend: SocketAddr,
) -> Result<(Proc, SocketAddr), Error> {
    let port = free_tcp_port()?;
    let file = dir.join(format!("{name}.Caddyfile"));
    std::fs::write(&file, caddyfile(dir, port, certs, backend))?;
    let caddy = Proc::spawn(
        name,
        &bins.caddy,
        &args(&[
            "run",
            "--adapter",
            "caddyfile",
            "--config",
            &path_arg(&file),
        ]),
        dir,
    )?;
    Ok((caddy, SocketAddr::from(([127, 0, 0, 1], port))))
}

/// Caddy's TLS and reverse proxy straight to the upstream: what TLS alone costs.
pub struct CaddyAlone {
    pub caddy: Proc,
    pub https: SocketAddr,
}

impl CaddyAlone {
    pub fn start(
        bins: &PeerBins,
        dir: &Path,
        upstream: SocketAddr,
        certs: &CertFiles,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let (caddy, https) = start_caddy(bins, "caddy", dir, certs, upstream)?;
        Ok(Self { caddy, https })
    }
}

/// Caddy (TLS, HTTP) on the "VPS" in front of a rathole server, and a
/// rathole client at "home", joined by rathole's noise transport.
pub struct RatholeStack {
    pub caddy: Proc,
    pub server: Proc,
    pub client: Proc,
    pub https: SocketAddr,
    dir: PathBuf,
}

/// rathole's `--genkey` output: a base64 private and public key.
fn rathole_keys(rathole: &Path) -> Result<(String, String), Error> {
    let o = Command::new(rathole).arg("--genkey").output()?;
    if !o.status.success() {
        return Err(format!("rathole --genkey failed: {}", o.status).into());
    }
    let text = String::from_utf8(o.stdout)?;
    let mut lines = text.lines().map(str::trim);
    let mut after = |label: &str| -> Option<String> {
        lines.find(|l| l.starts_with(label))?;
        lines.find(|l| !l.is_empty()).map(str::to_owned)
    };
    let private = after("Private Key").ok_or("rathole --genkey: no private key")?;
    let public = after("Public Key").ok_or("rathole --genkey: no public key")?;
    Ok((private, public))
}

impl RatholeStack {
    pub fn start(
        bins: &PeerBins,
        dir: &Path,
        upstream: SocketAddr,
        certs: &CertFiles,
    ) -> Result<Self, Error> {
        std::fs::create_dir_all(dir)?;
        let (private, public) = rathole_keys(&bins.rathole)?;
        let control = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let visitor = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let server_toml = format!(
            "[server]\nbind_addr = \"{control}\"\n\n[server.transport]\ntype = \"noise\"\n\n\
             [server.transport.noise]\nlocal_private_key = \"{private}\"\n\n\
             [server.services.app]\ntoken = \"bench-token\"\nbind_addr = \"{visitor}\"\n"
        );
        let client_toml = format!(
            "[client]\nremote_addr = \"{control}\"\n\n[client.transport]\ntype = \"noise\"\n\n\
             [client.transport.noise]\nremote_public_key = \"{public}\"\n\n\
             [client.services.app]\ntoken = \"bench-token\"\nlocal_addr = \"{upstream}\"\n"
        );
        let server_cfg = dir.join("rathole-server.toml");
        let client_cfg = dir.join("rathole-client.toml");
        std::fs::write(&server_cfg, server_toml)?;
        std::fs::write(&client_cfg, client_toml)?;
        let server = Proc::spawn(
            "rathole-server",
            &bins.rathole,
            &args(&["--server", &path_arg(&server_cfg)]),
            dir,
        )?;
        let client = Proc::spawn(
            "rathole-client",
            &bins.rathole,
            &args(&["--client", &path_arg(&client_cfg)]),
            dir,
        )?;
        let (caddy, https) = start_caddy(bins, "caddy-rathole", dir, certs, visitor)?;
        Ok(Self {
            caddy,
            server,
            client,
            https,
            dir: dir.to_owned(),
        })
    }

    pub async fn wait_ready(&mut self, endpoint: &Endpoint) -> Result<(), Error> {
        wait_ready(
            endpoint,
            &mut [&mut self.caddy, &mut self.server, &mut self.client],
        )
        .await
    }

    /// The VPS side restarts: rathole server and Caddy, on the same ports.
    pub async fn restart_edge(&mut self) -> Result<Duration, Error> {
        let (a, b) = tokio::join!(self.server.terminate(), self.caddy.terminate());
        let stopped = a?.max(b?);
        self.server.respawn(&self.dir)?;
        self.caddy.respawn(&self.dir)?;
        Ok(stopped)
    }
}
