//! burrow's agent: the home daemon. It dials the edge, keeps the session up
//! whatever happens to the network, forwards each stream the edge opens to
//! a local service, probes each service's readiness, wakes sleeping
//! machines with Wake-on-LAN, and serves `[[lan]]` wake-aware proxies.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod cache;
pub mod config;
pub mod forward;
pub mod health;
pub mod lan;
pub mod monitor;
pub mod tunnel;
pub mod wake;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use burrow_proto::identity::{Fingerprint, Identity, IdentityError};
use burrow_proto::quic;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::AgentConfig;
use config::LanConfig;
use forward::Services;
use monitor::{MonitorTask, Monitors, ServiceView};
pub use tunnel::AgentStatus;
use tunnel::eyeballs::{Resolve, SystemResolver};
use tunnel::{Dialer, TlsSetupError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}; make one with `burrow keygen --out <path>`")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("binding the agent's UDP socket: {0}")]
    Bind(std::io::Error),
    #[error("binding lan[{index}] on {addr}: {source}")]
    LanBind {
        index: usize,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A configured agent, ready to run.
pub struct Agent {
    config: Arc<AgentConfig>,
    identity: Identity,
    /// One per edge, in `config.edges` order.
    statuses: Vec<watch::Sender<AgentStatus>>,
    monitors: Monitors,
    monitor_task: MonitorTask,
    lan: Vec<(LanConfig, std::net::TcpListener)>,
    resolver: Arc<dyn Resolve>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("name", &self.config.name)
            .field("fingerprint", &self.identity.fingerprint())
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Loads the agent's key (it must exist: `burrow keygen` makes it, and
    /// its fingerprint goes into the edge's config) and binds the `[[lan]]`
    /// listeners, so a taken port fails the start, not a later connection.
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        let identity = Identity::load(&config.key_path)?;
        let mut lan = Vec::new();
        for (index, l) in config.lan.iter().enumerate() {
            let bind_error = |source| AgentError::LanBind {
                index,
                addr: l.listen,
                source,
            };
            let listener = std::net::TcpListener::bind(l.listen).map_err(bind_error)?;
            listener.set_nonblocking(true).map_err(bind_error)?;
            lan.push((l.clone(), listener));
        }
        let (monitors, monitor_task) = Monitors::new(&config.services);
        let statuses = config
            .edges
            .iter()
            .map(|_| watch::channel(AgentStatus::Connecting).0)
            .collect();
        Ok(Self {
            config: Arc::new(config),
            identity,
            statuses,
            monitors,
            monitor_task,
            lan,
            resolver: Arc::new(SystemResolver),
        })
    }

    /// Resolves `agent.edge` with `resolver` instead of the system's.
    pub fn with_resolver(mut self, resolver: impl Resolve) -> Self {
        self.resolver = Arc::new(resolver);
        self
    }

    /// The bound address of each `[[lan]]` proxy, in config order.
    pub fn lan_addrs(&self) -> Vec<SocketAddr> {
        self.lan.iter().map(|(_, l)| lan::local_addr(l)).collect()
    }

    /// Follows every service's state and wake history.
    pub fn services(&self) -> watch::Receiver<Vec<ServiceView>> {
        self.monitors.subscribe()
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Follows the state of the session with the first (or only) edge.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.statuses[0].subscribe()
    }

    /// The session with each edge, in `[agent] edges` order.
    pub fn edge_statuses(&self) -> Vec<watch::Receiver<AgentStatus>> {
        self.statuses.iter().map(watch::Sender::subscribe).collect()
    }

    /// Runs until `shutdown`, reconnecting to the edge forever.
    /// Runs until `shutdown`; see [`Agent::run_with_reloads`].
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let (_keep, reloads) = tokio::sync::mpsc::channel(1);
        self.run_with_reloads(shutdown, reloads).await
    }

    /// Runs until `shutdown`, reconnecting to the edge forever. Each config
    /// received on `reloads` replaces the services (forwarding, probes, the
    /// list the edge sees) without touching the tunnel or open streams.
    pub async fn run_with_reloads(
        self,
        shutdown: CancellationToken,
        mut reloads: tokio::sync::mpsc::Receiver<AgentConfig>,
    ) -> Result<(), AgentError> {
        let client = tunnel::client_config(&self.config, &self.identity)?;
        let tcp = tunnel::tcp_connector(&self.config, &self.identity)?;
        // Dual-stack when the host has IPv6, so either kind of edge address works.
        let socket = quic::bind_udp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
            .or_else(|_| quic::bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))
            .map_err(AgentError::Bind)?
            .0;
        let endpoint = quic::endpoint(socket, None, self.identity.endpoint_keys())
            .map_err(AgentError::Bind)?;
        info!(
            name = %self.config.name,
            edges = %self.config.edges.iter().map(|e| e.addr.as_str()).collect::<Vec<_>>().join(", "),
            fingerprint = %self.identity.fingerprint(),
            "agent starting"
        );
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(self.monitor_task.run(shutdown.clone()));
        // Cached answers for the services that have `[service.wake] cached`,
        // for the [[lan]] proxy and the edge's requests.
        let mut caches = std::collections::HashMap::new();
        for service in &self.config.services {
            if service.wake.as_ref().is_some_and(|w| !w.cached.is_empty()) {
                let cache = Arc::new(cache::ResponseCache::default());
                caches.insert(service.name.clone(), cache.clone());
                tasks.spawn(cache::refresh_while_up(
                    Arc::new(service.clone()),
                    cache,
                    self.monitors.clone(),
                    shutdown.clone(),
                ));
            }
        }
        for (index, (l, listener)) in self.lan.into_iter().enumerate() {
            let listen = lan::local_addr(&listener);
            let listener = tokio::net::TcpListener::from_std(listener).map_err(|source| {
                AgentError::LanBind {
                    index,
                    addr: listen,
                    source,
                }
            })?;
            let service = self
                .config
                .services
                .iter()
                .find(|s| s.name == l.service)
                .expect("config validation: every [[lan]] names a [[service]]");
            info!(%listen, service = %l.service, "lan wake proxy listening");
            tasks.spawn(lan::serve(
                listener,
                Arc::new(service.clone()),
                self.monitors.clone(),
                caches.get(&service.name).cloned(),
                shutdown.clone(),
            ));
        }
        let services = Arc::new(Services::new(self.config.services.clone()).with_caches(caches));
        let instance = rand::random();
        {
            let services = services.clone();
            let monitors = self.monitors.clone();
            let mut current = (*self.config).clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                loop {
                    let new = tokio::select! {
                        Some(new) = reloads.recv() => new,
                        () = shutdown.cancelled() => return,
                    };
                    apply_reload(&mut current, new, &services, &monitors);
                }
            });
        }
        // One session per edge, each with its own reconnects and transport;
        // the services, their monitors and wake single-flight are shared,
        // so a machine is woken once whichever edge asked.
        let mut dialers = tokio::task::JoinSet::new();
        for (edge, status) in self.config.edges.iter().zip(self.statuses) {
            let dialer = Arc::new(Dialer {
                services: services.clone(),
                config: self.config.clone(),
                edge: edge.clone(),
                client: client.clone(),
                tcp: tcp.clone(),
                monitors: self.monitors.clone(),
                status,
                resolver: self.resolver.clone(),
                instance,
            });
            dialers.spawn(dialer.run(endpoint.clone(), shutdown.clone()));
        }
        while let Some(ended) = dialers.join_next().await {
            if let Err(e) = ended
                && e.is_panic()
            {
                // As when the one session ran in this task: the agent
                // stops, and its supervisor starts it again.
                shutdown.cancel();
                std::panic::resume_unwind(e.into_panic());
            }
        }
        endpoint.close(burrow_proto::quic::code::OK, b"agent stopping");
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
        // The monitor and lan tasks watch the same token.
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

/// Applies a reloaded config to a running agent.
fn apply_reload(
    current: &mut AgentConfig,
    new: AgentConfig,
    services: &Services,
    monitors: &Monitors,
) {
    let restart_only = [
        ("agent.name", current.name != new.name),
        ("agent.edge", current.edges != new.edges),
        ("agent.edge_key", current.edge_key != new.edge_key),
        ("agent.edge_ca", current.edge_ca != new.edge_ca),
        ("agent.key", current.key_path != new.key_path),
        ("agent.threads", current.threads != new.threads),
        ("lan", current.lan != new.lan),
    ];
    for (key, changed) in restart_only {
        if changed {
            tracing::warn!(
                key,
                "changed in the config; it takes effect at the next restart"
            );
        }
    }
    for l in &current.lan {
        let before = current.services.iter().find(|s| s.name == l.service);
        let after = new.services.iter().find(|s| s.name == l.service);
        if before != after {
            tracing::warn!(listen = %l.listen, service = %l.service, "a [[lan]] proxy keeps its service's old settings until the next restart");
        }
    }
    services.set(new.services.clone());
    monitors.reconfigure(new.services.clone());
    info!(services = new.services.len(), "config reloaded");
    *current = new;
}
