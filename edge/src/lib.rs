//! burrow's edge: the public server on the VPS.
//!
//! [`Edge::bind`] loads keys and certificates and binds every socket before
//! anything is served (a bad config or a taken port fails early and whole);
//! [`Edge::bind_with`] does the same with some sockets handed over already
//! bound ([`Prebound`]); [`Edge::run`] serves until the shutdown token is
//! cancelled.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod cluster;
pub mod config;
pub mod http;
pub mod metrics;
pub mod ports;
pub mod refusal;
pub mod tls;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_proto::identity::{Created, Fingerprint, Identity, IdentityError};
use burrow_proto::listener::{Front, Limits};
use burrow_proto::quic;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use access::IpRules;
use access::auth::Verifier;
use access::gate::Gate;
use access::session::SessionKeys;
use cluster::Cluster;
pub use config::EdgeConfig;
use config::{PortConfig, TlsConfig};
use metrics::Metrics;
use tls::acme::AcmeManager;
use tls::{CertStore, TlsError};
use tunnel::{Registry, Tunnel};

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{what} in state_dir: {source}")]
    State {
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cluster(#[from] cluster::SetupError),
}

/// An edge with all its sockets bound, ready to run.
pub struct Edge {
    config: Arc<EdgeConfig>,
    identity: Identity,
    endpoint: quinn::Endpoint,
    ports: Vec<(PortConfig, TcpListener)>,
    https: Option<TcpListener>,
    http: Option<TcpListener>,
    admin: Option<TcpListener>,
    gate: Option<Arc<Gate>>,
    acme: Option<Arc<AcmeManager>>,
    tunnel: Arc<Tunnel>,
    certs: Arc<CertStore>,
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("fingerprint", &self.identity.fingerprint())
            .finish_non_exhaustive()
    }
}

/// Sockets handed to [`Edge::bind_with`] already bound, each used instead
/// of binding the config's address for it. For whoever must know a port
/// before the edge runs (a test configuring an ACME server that validates
/// against the edge, a supervisor passing sockets down): bind, read the
/// port, hand the socket over, and nothing can take the port in between.
/// The config must still enable each listener given one (`https`, `http`
/// with `https`, `admin`); its address there is then only informational.
#[derive(Debug, Default)]
pub struct Prebound {
    pub https: Option<std::net::TcpListener>,
    pub http: Option<std::net::TcpListener>,
    pub tunnel: Option<std::net::UdpSocket>,
    pub admin: Option<std::net::TcpListener>,
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, EdgeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind { what, addr, source })
}

/// The listener for `what`: `prebound` if given, else one bound on `addr`;
/// `None` if the config leaves `what` off (and then nothing may be handed
/// over for it).
async fn listen(
    what: &'static str,
    addr: Option<SocketAddr>,
    prebound: Option<std::net::TcpListener>,
) -> Result<Option<TcpListener>, EdgeError> {
    match (addr, prebound) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(EdgeError::Unsupported(format!(
            "a pre-bound {what} was given but the config does not enable one"
        ))),
        (Some(addr), None) => bind_tcp(what, addr).await.map(Some),
        (Some(configured), Some(listener)) => {
            let addr = listener.local_addr().unwrap_or(configured);
            listener
                .set_nonblocking(true)
                .and_then(|()| TcpListener::from_std(listener))
                .map(Some)
                .map_err(|source| EdgeError::Bind { what, addr, source })
        }
    }
}

impl Edge {
    /// Binds every socket the config names.
    pub async fn bind(config: EdgeConfig) -> Result<Self, EdgeError> {
        Self::bind_with(config, Prebound::default()).await
    }

    /// Like [`Edge::bind`], but uses the sockets in `prebound` instead of
    /// binding the config's addresses for them.
    pub async fn bind_with(config: EdgeConfig, prebound: Prebound) -> Result<Self, EdgeError> {
        let (identity, created) = Identity::load_or_create(&config.key_path)?;
        if created == Created::Yes {
            info!(path = %config.key_path.display(), "created edge identity key");
        }
        let certs = Arc::new(CertStore::new(
            identity.certified_key().map_err(TlsError::from)?,
        ));
        let cluster = match &config.cluster {
            Some(c) => {
                let cluster = Cluster::new(c)?;
                certs.set_cluster(cluster.clone());
                info!(secret_file = %c.secret_file.display(), "cluster: sharing certificates, sessions and counters through Redis");
                Some(cluster)
            }
            None => None,
        };
        let hosts = cert_names(&config);
        let mut acme = None;
        match &config.tls {
            TlsConfig::SelfSigned => {
                if !hosts.is_empty() {
                    certs.install(&hosts, tls::self_signed(&config.state_dir, &hosts)?);
                }
            }
            TlsConfig::Files { cert, key } => certs.install(&hosts, tls::load_files(cert, key)?),
            TlsConfig::Acme(a) => {
                acme = Some(Arc::new(
                    AcmeManager::load(
                        a.clone(),
                        &config.state_dir,
                        hosts.clone(),
                        certs.clone(),
                        config.http.is_some() && config.https.is_some(),
                    )?
                    .with_cluster(cluster.clone()),
                ));
            }
        }

        let tunnel_addr = match &prebound.tunnel {
            Some(socket) => socket.local_addr().unwrap_or(config.tunnel),
            None => config.tunnel,
        };
        let (socket, _buffers) = match prebound.tunnel {
            Some(socket) => quic::with_buffers(socket),
            None => quic::bind_udp(config.tunnel),
        }
        .map_err(|source| EdgeError::Bind {
            what: "QUIC tunnel endpoint",
            addr: tunnel_addr,
            source,
        })?;
        let http3 = match config.http3 {
            true => Some(tunnel::Http3 {
                tls: http::h3::tls_config(certs.https_resolver()).map_err(TlsError::from)?,
                streams: config.limits.streams_per_connection,
            }),
            false => None,
        };
        let server = tunnel::server_config(certs.quic_resolver(), http3).map_err(TlsError::from)?;
        let endpoint =
            quic::endpoint(socket, Some(server), identity.endpoint_keys()).map_err(|source| {
                EdgeError::Bind {
                    what: "QUIC tunnel endpoint",
                    addr: tunnel_addr,
                    source,
                }
            })?;

        let mut ports = Vec::new();
        for p in &config.ports {
            ports.push((p.clone(), bind_tcp("forwarded port", p.listen).await?));
        }
        let https = listen("HTTPS listener", config.https, prebound.https).await?;
        // Plain HTTP only redirects to (and answers ACME for) HTTPS.
        let http = listen(
            "HTTP listener",
            config.http.filter(|_| config.https.is_some()),
            prebound.http,
        )
        .await?;
        let gate = build_gate(&config, cluster.as_ref())?;
        let admin = listen("admin listener", config.admin, prebound.admin).await?;
        Ok(Self {
            admin,
            https,
            http,
            gate,
            acme,
            tunnel: {
                let tunnel = Tunnel::new(config.agents.clone());
                tunnel.registry.set_agent_wait(config.agent_wait);
                Arc::new(tunnel)
            },
            config: Arc::new(config),
            identity,
            endpoint,
            ports,
            certs,
            cluster,
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("a bound UDP socket has a local address")
    }

    /// The bound address of each `[[port]]`, in config order.
    pub fn port_addrs(&self) -> Vec<SocketAddr> {
        self.ports
            .iter()
            .map(|(_, l)| {
                l.local_addr()
                    .expect("a bound listener has a local address")
            })
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(http::local_addr)
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().map(http::local_addr)
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(http::local_addr)
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.tunnel.registry.clone()
    }

    /// Authentication state (argon2 counters, throttle), when users exist.
    pub fn gate(&self) -> Option<Arc<Gate>> {
        self.gate.clone()
    }

    /// The ACME manager, in `[tls] mode = "acme"`.
    pub fn acme(&self) -> Option<Arc<AcmeManager>> {
        self.acme.clone()
    }

    pub fn certs(&self) -> Arc<CertStore> {
        self.certs.clone()
    }

    /// Serves until `shutdown` is cancelled; see [`Edge::run_with_reloads`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EdgeError> {
        let (_keep, reloads) = mpsc::channel(1);
        self.run_with_reloads(shutdown, reloads).await
    }

    /// Serves until `shutdown`, applying each config received on `reloads`
    /// (routes, users, rules, agents, port rules) without dropping tunnels
    /// or open streams. On shutdown: stop accepting, tell agents to go
    /// away, let open streams finish for up to `[edge] grace`, then return.
    pub async fn run_with_reloads(
        self,
        shutdown: CancellationToken,
        mut reloads: mpsc::Receiver<EdgeConfig>,
    ) -> Result<(), EdgeError> {
        info!(
            tunnel = %self.tunnel_addr(),
            fingerprint = %self.identity.fingerprint(),
            "edge listening"
        );
        let tracker = TaskTracker::new();
        let drained = CancellationToken::new();
        let metrics = Arc::new(Metrics::default());
        let mut tasks = tokio::task::JoinSet::new();

        let limits = self.config.limits;
        let tunnel_addr = self.tunnel_addr();
        let mut port_rules = Vec::new();
        for (port, listener) in self.ports {
            let addr = http::local_addr(&listener);
            info!(listen = %addr, agent = %port.agent, service = %port.service, "forwarding port");
            let (tx, rx) = watch::channel((self.config.access.rules.clone(), port.rules.clone()));
            port_rules.push((port.clone(), tx));
            let ctx = ports::PortContext {
                rules: rx,
                registry: self.tunnel.registry.clone(),
                metrics: metrics.clone(),
                tracker: tracker.clone(),
            };
            let front = front(format!("port {addr}"), limits.connections(), &metrics);
            tasks.spawn(ports::serve_port(
                listener,
                port,
                ctx,
                front,
                shutdown.clone(),
            ));
        }

        let http_state = http::HttpState::new(
            &self.config,
            self.tunnel.registry.clone(),
            self.gate.clone(),
            self.certs.clone(),
            metrics.clone(),
            (tracker.clone(), shutdown.clone()),
        )
        .with_cluster(self.cluster.clone());
        let (http_tx, http_rx) = watch::channel(Arc::new(http_state));
        if let Some(listener) = self.https {
            let addr = http::local_addr(&listener);
            let tls = http::tls_config(self.certs.https_resolver(), self.acme.is_some())
                .map_err(TlsError::from)?;
            // Agents whose network blocks UDP come here over TCP.
            let agents = tunnel::agent_tls(self.certs.quic_resolver()).map_err(TlsError::from)?;
            info!(%addr, routes = self.config.routes.len(), agents = "also over TCP (ALPN burrow/1)", "serving https");
            let timeouts = (self.config.header_timeout, limits);
            let alt_svc = if self.config.http3 {
                let port = tunnel_addr.port();
                info!(udp = %tunnel_addr, "serving http/3 beside agents (ALPN h3)");
                tasks.spawn(http::h3::serve(
                    self.tunnel.h3_intake(),
                    http_rx.clone(),
                    timeouts,
                    front("h3", limits.connections(), &metrics),
                    shutdown.clone(),
                    tracker.clone(),
                ));
                Some(http::h3::alt_svc(port))
            } else {
                None
            };
            tasks.spawn(http::serve_https(
                listener,
                (tls, Some((agents, self.tunnel.tcp_intake()))),
                http_rx.clone(),
                timeouts,
                alt_svc,
                front("https", limits.connections(), &metrics),
                shutdown.clone(),
                tracker.clone(),
            ));
            if let Some(plain) = self.http {
                info!(addr = %http::local_addr(&plain), "redirecting http to https");
                tasks.spawn(http::serve_http_redirect(
                    plain,
                    self.certs.clone(),
                    addr.port(),
                    timeouts,
                    front("http", limits.connections(), &metrics),
                    shutdown.clone(),
                ));
            }
        }
        if let Some(listener) = self.admin {
            info!(addr = %http::local_addr(&listener), "serving metrics and status");
            admin::mark_start();
            let state = admin::AdminState {
                metrics: metrics.clone(),
                registry: self.tunnel.registry.clone(),
                certs: self.certs.clone(),
                acme: self.acme.clone(),
                http: Some(http_rx.clone()),
                cluster: self.cluster.clone(),
            };
            let front = front("admin", admin::LIMITS, &metrics);
            tasks.spawn(admin::serve(listener, state, front, drained.clone()));
        }
        if let Some(cluster) = self.cluster.clone() {
            // The session secret this edge offers when Redis has none yet.
            let secret = access::session::load_or_create_secret(&self.config.state_dir).map_err(
                |source| EdgeError::State {
                    what: "session key",
                    source,
                },
            )?;
            cluster.set_local_generation(access::session::local_generation(&self.config.state_dir));
            tasks.spawn(cluster.run(Some(secret), drained.clone()));
        }
        if let Some(acme) = self.acme.clone() {
            tasks.spawn(acme.run(shutdown.clone()));
        }
        tasks.spawn(
            self.tunnel
                .clone()
                .serve(self.endpoint, shutdown.clone(), drained.clone()),
        );

        let mut current = (*self.config).clone();
        let reloader = Reloader {
            tunnel: self.tunnel.clone(),
            certs: self.certs.clone(),
            acme: self.acme.clone(),
            cluster: self.cluster.clone(),
            metrics,
            tracker: tracker.clone(),
            going_away: shutdown.clone(),
        };
        loop {
            tokio::select! {
                Some(new) = reloads.recv() => {
                    reloader.apply(&mut current, new, &http_tx, &port_rules);
                }
                () = shutdown.cancelled() => break,
            }
        }

        tracker.close();
        info!(open = tracker.len(), grace = ?current.grace, "draining");
        if tokio::time::timeout(current.grace, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                open = tracker.len(),
                "grace period over; closing what is still open"
            );
        }
        drained.cancel();
        while tasks.join_next().await.is_some() {}
        info!("edge stopped");
        Ok(())
    }
}

/// A listener's accept loop with these caps, listed in `/metrics` as `name`.
fn front(name: impl Into<String>, limits: Limits, metrics: &Metrics) -> Arc<Front> {
    let front = Arc::new(Front::new(name, limits));
    metrics.add_listener(&front);
    front
}

/// Applies a new config to a running edge.
struct Reloader {
    tunnel: Arc<Tunnel>,
    certs: Arc<CertStore>,
    acme: Option<Arc<AcmeManager>>,
    cluster: Option<Arc<Cluster>>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    going_away: CancellationToken,
}

impl Reloader {
    fn apply(
        &self,
        current: &mut EdgeConfig,
        new: EdgeConfig,
        http_tx: &watch::Sender<Arc<http::HttpState>>,
        port_rules: &[(PortConfig, watch::Sender<(IpRules, IpRules)>)],
    ) {
        let restart_only = [
            ("edge.state_dir", current.state_dir != new.state_dir),
            ("edge.key", current.key_path != new.key_path),
            ("edge.https", current.https != new.https),
            ("edge.http", current.http != new.http),
            ("edge.tunnel", current.tunnel != new.tunnel),
            ("edge.http3", current.http3 != new.http3),
            ("edge.admin", current.admin != new.admin),
            ("edge.threads", current.threads != new.threads),
            ("cluster", current.cluster != new.cluster),
            (
                "edge.header_timeout",
                current.header_timeout != new.header_timeout,
            ),
            (
                "limits (all but held_per_client and held_per_service)",
                current.limits.without_hold_caps() != new.limits.without_hold_caps(),
            ),
            (
                "tls.mode",
                std::mem::discriminant(&current.tls) != std::mem::discriminant(&new.tls),
            ),
        ];
        for (key, changed) in restart_only {
            if changed {
                warn!(
                    key,
                    "changed in the config; it takes effect at the next restart"
                );
            }
        }

        let hosts = cert_names(&new);
        let cert_result = match &current.tls {
            TlsConfig::SelfSigned if cert_names(current) != hosts && !hosts.is_empty() => {
                tls::self_signed(&new.state_dir, &hosts).map(|k| self.certs.install(&hosts, k))
            }
            TlsConfig::Files { cert, key } => {
                tls::load_files(cert, key).map(|k| self.certs.install(&hosts, k))
            }
            TlsConfig::Acme(_) => match &self.acme {
                Some(a) => a.add_names(&hosts),
                None => Ok(()),
            },
            TlsConfig::SelfSigned => Ok(()),
        };
        if let Err(e) = cert_result {
            error!(error = %e, "reload: certificates not updated");
        }

        let gate = match build_gate(&new, self.cluster.as_ref()) {
            Ok(g) => g,
            Err(e) => {
                error!(error = %e, "reload refused: keeping the running config");
                return;
            }
        };
        self.tunnel.set_agents(new.agents.clone());
        self.tunnel.registry.set_agent_wait(new.agent_wait);
        http_tx.send_replace(Arc::new(
            http::HttpState::new(
                &new,
                self.tunnel.registry.clone(),
                gate,
                self.certs.clone(),
                self.metrics.clone(),
                (self.tracker.clone(), self.going_away.clone()),
            )
            .with_cluster(self.cluster.clone()),
        ));

        for (running, tx) in port_rules {
            match new.ports.iter().find(|p| p.listen == running.listen) {
                Some(p) if p.agent == running.agent && p.service == running.service => {
                    tx.send_replace((new.access.rules.clone(), p.rules.clone()));
                }
                Some(_) => {
                    warn!(listen = %running.listen, "port target changed; it takes effect at the next restart")
                }
                None => {
                    warn!(listen = %running.listen, "port removed from the config; it closes at the next restart")
                }
            }
        }
        for p in &new.ports {
            if !port_rules.iter().any(|(r, _)| r.listen == p.listen) {
                warn!(listen = %p.listen, "new port; it opens at the next restart");
            }
        }
        info!(
            routes = new.routes.len(),
            agents = new.agents.len(),
            users = new.users.len(),
            "config reloaded"
        );
        *current = new;
    }
}

/// The names that need a certificate: every route host and the edge's own.
fn cert_names(config: &EdgeConfig) -> Vec<String> {
    let mut hosts: Vec<String> = config.routes.iter().map(|r| r.host.clone()).collect();
    if let Some(h) = &config.hostname {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    hosts
}

/// The authentication gate for `config`'s users and API keys, if there are
/// users (routes take API keys only beside them).
fn build_gate(
    config: &EdgeConfig,
    cluster: Option<&Arc<Cluster>>,
) -> Result<Option<Arc<Gate>>, EdgeError> {
    if config.users.is_empty() {
        return Ok(None);
    }
    let sessions =
        SessionKeys::load_shared(&config.state_dir, cluster.cloned()).map_err(|source| {
            EdgeError::State {
                what: "session key",
                source,
            }
        })?;
    let hashes = config
        .users
        .iter()
        .map(|u| (u.name.clone(), u.password_hash.phc().clone()))
        .collect();
    let keys = config
        .api_keys
        .iter()
        .map(|k| (k.name.to_string(), k.hash.phc().clone()))
        .collect();
    // A new verifier per config: a key removed from it is forgotten with
    // the old one, successes remembered for it included.
    Ok(Some(Arc::new(
        Gate::new(
            &config.users,
            sessions,
            Verifier::new(hashes).with_api_keys(keys),
        )
        .with_cluster(cluster.cloned()),
    )))
}
