//! burrow's agent: the home daemon. It dials the edge, keeps the session up
//! whatever happens to the network, and forwards each stream the edge opens
//! to a local service.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod config;
pub mod forward;
pub mod tunnel;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use burrow_proto::identity::{Fingerprint, Identity, IdentityError};
use burrow_proto::quic;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use config::AgentConfig;
use forward::Services;
pub use tunnel::AgentStatus;
use tunnel::{Dialer, TlsSetupError};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}; make one with `burrow keygen --out <path>`")]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("binding the agent's UDP socket: {0}")]
    Bind(std::io::Error),
}

/// A configured agent, ready to run.
pub struct Agent {
    config: Arc<AgentConfig>,
    identity: Identity,
    status: watch::Sender<AgentStatus>,
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
    /// its fingerprint goes into the edge's config).
    pub fn new(config: AgentConfig) -> Result<Self, AgentError> {
        let identity = Identity::load(&config.key_path)?;
        Ok(Self {
            config: Arc::new(config),
            identity,
            status: watch::channel(AgentStatus::Connecting).0,
        })
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    /// Follows the agent's connection state.
    pub fn status(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    /// Runs until `shutdown`, reconnecting to the edge forever.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let client = tunnel::client_config(&self.config, &self.identity)?;
        // Dual-stack when the host has IPv6, so either kind of edge address works.
        let socket = quic::bind_udp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)))
            .or_else(|_| quic::bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))))
            .map_err(AgentError::Bind)?
            .0;
        let endpoint = quic::endpoint(socket, None, self.identity.endpoint_keys())
            .map_err(AgentError::Bind)?;
        info!(
            name = %self.config.name,
            edge = %self.config.edge,
            fingerprint = %self.identity.fingerprint(),
            "agent starting"
        );
        // Wake-on-LAN and the LAN proxy arrive with their own issue; say so
        // rather than pretend.
        if !self.config.lan.is_empty() || self.config.services.iter().any(|s| s.wake.is_some()) {
            tracing::warn!(
                "[[lan]] and [service.wake] are not active in this build yet; they are ignored"
            );
        }
        let dialer = Dialer {
            services: Arc::new(Services::new(self.config.services.clone())),
            config: self.config,
            client,
            status: self.status,
        };
        dialer.run(endpoint, shutdown).await;
        Ok(())
    }
}
