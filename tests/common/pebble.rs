//! Pebble and pebble-challtestsrv (Debian's `pebble` package) on
//! loopback: a real ACME server for the tests that obtain certificates.
//! challtestsrv is the DNS server that points every name at this test's
//! own loopback address (see [`test_ip`]); Pebble validates against the
//! edge's own HTTP and HTTPS listeners, which a test binds first so that
//! it can tell Pebble their ports and then hand them to the edge.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use super::WAIT;

/// The loopback address this test's Pebble, challenge server and edge
/// listen on: one of its own (127.77.0.N, one per test thread), so no
/// other test's sockets, listening or connecting from 127.0.0.1, can take
/// a port chosen for Pebble (see [`pebble_port`]).
pub fn test_ip() -> &'static str {
    use std::sync::atomic::{AtomicU8, Ordering};
    static NEXT: AtomicU8 = AtomicU8::new(1);
    thread_local! {
        static IP: &'static str = Box::leak(
            format!("127.77.0.{}", NEXT.fetch_add(1, Ordering::Relaxed)).into_boxed_str(),
        );
    }
    IP.with(|ip| *ip)
}

/// A port for Pebble or challtestsrv to bind, and only for them: they are
/// other processes, which take their ports from flags and a config file,
/// so there is no bound socket to hand them, and a port must be picked here
/// (free a moment ago) and bound by them a moment later. Anything the edge
/// binds is bound by the test and handed over instead ([`EdgeSockets`]).
/// Two things keep the gap safe: the ports are on [`test_ip`], an address
/// no other test uses; and should one be taken anyway (a wildcard socket
/// elsewhere on the host), the server exits before it is ready and
/// [`spawn_until`] starts it again on fresh ports.
pub fn pebble_port() -> u16 {
    std::net::TcpListener::bind((test_ip(), 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How often [`spawn_until`] starts a server, on fresh ports each time,
/// when it exits before it is ready (a port taken since [`pebble_port`]).
const PEBBLE_ATTEMPTS: usize = 3;

/// Spawns the command `make` builds (picking its ports) and waits for a
/// stdout line containing `ready`; when the process exits first, tries
/// again with a freshly made command, up to [`PEBBLE_ATTEMPTS`] times.
pub fn spawn_until(mut make: impl FnMut() -> Command, ready: &str) -> (Child, Log) {
    for _ in 0..PEBBLE_ATTEMPTS {
        if let Some(started) = try_spawn_until(make(), ready) {
            return started;
        }
    }
    panic!("no server announced {ready:?} in {PEBBLE_ATTEMPTS} attempts");
}

/// Spawns `cmd` and waits for a stdout line containing `ready`; `None` if
/// it exits first.
fn try_spawn_until(mut cmd: Command, ready: &str) -> Option<(Child, Log)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?} ({e}); CI installs Debian's pebble"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let wanted = ready.to_owned();
    let log = Log::default();
    let lines = log.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            lines.lock().unwrap().push(line.clone());
            if !sent && line.contains(&wanted) {
                let _ = tx.send(());
                sent = true;
            }
        }
    });
    match rx.recv_timeout(WAIT) {
        Ok(()) => Some((child, log)),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().unwrap();
            eprintln!("{cmd:?} exited before it was ready ({status}); trying fresh ports");
            None
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            panic!("{cmd:?} never announced {ready:?}");
        }
    }
}

/// The lines a server printed so far.
pub type Log = Arc<Mutex<Vec<String>>>;

pub struct Pebble {
    pub pebble: Child,
    /// Every line Pebble printed so far.
    pub log: Log,
    pub challtestsrv: Child,
    pub dir: tempfile::TempDir,
    pub directory: String,
    /// The CA of Pebble's own HTTPS (for the edge's ACME client).
    pub directory_ca: PathBuf,
    /// The root Pebble issues under (for clients of the edge).
    pub root: PathBuf,
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in [&mut self.pebble, &mut self.challtestsrv] {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pebble {
    /// Pebble validating against the edge's `http_port` and `tls_port`;
    /// `validity` shortens the certificates it issues.
    pub async fn start(http_port: u16, tls_port: u16, validity: Option<Duration>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut dns = 0;
        let (challtestsrv, _) = spawn_until(
            || {
                dns = pebble_port();
                let mut cts = Command::new("pebble-challtestsrv");
                cts.args([
                    "-dns01",
                    &format!("{}:{dns}", test_ip()),
                    "-management",
                    &format!("{}:{}", test_ip(), pebble_port()),
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-defaultIPv4",
                    test_ip(),
                    "-defaultIPv6",
                    "",
                ]);
                cts
            },
            "Starting challenge servers",
        );

        // Pebble's own HTTPS certificate, from a CA made here.
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "burrow test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec![test_ip().to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&server_key, &issuer)
            .unwrap();
        let path = |n: &str| dir.path().join(n);
        std::fs::write(path("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(path("cert.pem"), server.pem()).unwrap();
        std::fs::write(path("key.pem"), server_key.serialize_pem()).unwrap();

        let (mut acme_port, mut mgmt_port) = (0, 0);
        let (pebble, log) = spawn_until(
            || {
                (acme_port, mgmt_port) = (pebble_port(), pebble_port());
                let mut config = serde_json::json!({ "pebble": {
                    "listenAddress": format!("{}:{acme_port}", test_ip()),
                    "managementListenAddress": format!("{}:{mgmt_port}", test_ip()),
                    "certificate": path("cert.pem"),
                    "privateKey": path("key.pem"),
                    "httpPort": http_port,
                    "tlsPort": tls_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": false,
                }});
                if let Some(v) = validity {
                    config["pebble"]["certificateValidityPeriod"] = v.as_secs().into();
                }
                std::fs::write(path("pebble.json"), config.to_string()).unwrap();
                let mut cmd = Command::new("pebble");
                cmd.args([
                    "-config",
                    path("pebble.json").to_str().unwrap(),
                    "-dnsserver",
                    &format!("{}:{dns}", test_ip()),
                ])
                .env("PEBBLE_VA_NOSLEEP", "1")
                .env("PEBBLE_WFE_NONCEREJECT", "0");
                cmd
            },
            "ACME directory available",
        );

        // The issuing root, from Pebble's management interface.
        let out = tokio::process::Command::new("curl")
            .args([
                "-sSf",
                "--cacert",
                path("ca.pem").to_str().unwrap(),
                &format!("https://{}:{mgmt_port}/roots/0", test_ip()),
            ])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(path("root.pem"), &out.stdout).unwrap();
        Self {
            pebble,
            log,
            challtestsrv,
            directory: format!("https://{}:{acme_port}/dir", test_ip()),
            directory_ca: path("ca.pem"),
            root: path("root.pem"),
            dir,
        }
    }
}

impl Pebble {
    /// Orders Pebble has taken so far (its "Added order" log lines).
    pub fn orders(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("Added order"))
            .count()
    }
}

impl Pebble {
    /// A TLS client that trusts what Pebble issues (and nothing else).
    pub fn tls_client(&self) -> tokio_rustls::TlsConnector {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(&self.root).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }
}
