//! burrow's edge: the public server on the VPS.
//!
//! [`Edge::bind`] loads keys and certificates and binds every socket before
//! anything is served (a bad config or a taken port fails early and whole);
//! [`Edge::run`] serves until the shutdown token is cancelled.

#![forbid(unsafe_code)]

pub mod access;
pub mod config;
pub mod http;
pub mod ports;
pub mod tls;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_proto::identity::{Created, Fingerprint, Identity, IdentityError};
use burrow_proto::quic;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use access::auth::{self, Verifier};
use access::gate::Gate;
use access::session::SessionKeys;
pub use config::EdgeConfig;
use config::{PortConfig, TlsConfig};
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
}

/// An edge with all its sockets bound, ready to run.
pub struct Edge {
    config: Arc<EdgeConfig>,
    identity: Identity,
    endpoint: quinn::Endpoint,
    ports: Vec<(PortConfig, TcpListener)>,
    https: Option<TcpListener>,
    http: Option<TcpListener>,
    gate: Option<Arc<Gate>>,
    acme: Option<Arc<AcmeManager>>,
    tunnel: Arc<Tunnel>,
    certs: Arc<CertStore>,
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge")
            .field("fingerprint", &self.identity.fingerprint())
            .finish_non_exhaustive()
    }
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, EdgeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EdgeError::Bind { what, addr, source })
}

impl Edge {
    pub async fn bind(config: EdgeConfig) -> Result<Self, EdgeError> {
        let (identity, created) = Identity::load_or_create(&config.key_path)?;
        if created == Created::Yes {
            info!(path = %config.key_path.display(), "created edge identity key");
        }
        let certs = Arc::new(CertStore::new(
            identity.certified_key().map_err(TlsError::from)?,
        ));
        let mut hosts: Vec<String> = config.routes.iter().map(|r| r.host.clone()).collect();
        if let Some(h) = &config.hostname {
            if !hosts.contains(h) {
                hosts.push(h.clone());
            }
        }
        let mut acme = None;
        match &config.tls {
            TlsConfig::SelfSigned => {
                if !hosts.is_empty() {
                    certs.install(&hosts, tls::self_signed(&config.state_dir, &hosts)?);
                }
            }
            TlsConfig::Files { cert, key } => certs.install(&hosts, tls::load_files(cert, key)?),
            TlsConfig::Acme(a) => {
                acme = Some(Arc::new(AcmeManager::load(
                    a.clone(),
                    &config.state_dir,
                    hosts.clone(),
                    certs.clone(),
                    config.http.is_some() && config.https.is_some(),
                )?));
            }
        }

        let (socket, _buffers) =
            quic::bind_udp(config.tunnel).map_err(|source| EdgeError::Bind {
                what: "QUIC tunnel endpoint",
                addr: config.tunnel,
                source,
            })?;
        let server = tunnel::server_config(certs.quic_resolver()).map_err(TlsError::from)?;
        let endpoint =
            quic::endpoint(socket, Some(server), identity.endpoint_keys()).map_err(|source| {
                EdgeError::Bind {
                    what: "QUIC tunnel endpoint",
                    addr: config.tunnel,
                    source,
                }
            })?;

        let mut ports = Vec::new();
        for p in &config.ports {
            ports.push((p.clone(), bind_tcp("forwarded port", p.listen).await?));
        }
        let https = match config.https {
            Some(addr) => Some(bind_tcp("HTTPS listener", addr).await?),
            None => None,
        };
        let http = match (config.http, config.https) {
            (Some(addr), Some(_)) => Some(bind_tcp("HTTP listener", addr).await?),
            _ => None,
        };
        let gate = if config.users.is_empty() {
            None
        } else {
            let sessions = SessionKeys::load_or_create(&config.state_dir).map_err(|source| {
                EdgeError::State {
                    what: "session key",
                    source,
                }
            })?;
            let hashes = config
                .users
                .iter()
                .filter_map(|u| Some((u.name.clone(), auth::parse_hash(&u.password_hash).ok()?)))
                .collect();
            Some(Arc::new(Gate::new(
                &config.users,
                sessions,
                Verifier::new(hashes),
            )))
        };
        Ok(Self {
            https,
            http,
            gate,
            acme,
            tunnel: Arc::new(Tunnel::new(config.agents.clone())),
            config: Arc::new(config),
            identity,
            endpoint,
            ports,
            certs,
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

    /// Serves until `shutdown` is cancelled; agents are told to reconnect.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), EdgeError> {
        info!(
            tunnel = %self.tunnel_addr(),
            fingerprint = %self.identity.fingerprint(),
            "edge listening"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for (port, listener) in self.ports {
            info!(listen = %listener.local_addr().map_err(|source| EdgeError::Bind { what: "forwarded port", addr: port.listen, source })?, agent = %port.agent, service = %port.service, "forwarding port");
            tasks.spawn(ports::serve_port(
                listener,
                port,
                self.config.access.rules.clone(),
                self.tunnel.registry.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(listener) = self.https {
            let addr = http::local_addr(&listener);
            let tls = http::tls_config(self.certs.https_resolver(), self.acme.is_some())
                .map_err(TlsError::from)?;
            let state = Arc::new(http::HttpState::new(
                &self.config.routes,
                &self.config.access,
                self.tunnel.registry.clone(),
                self.gate.clone(),
                self.certs.clone(),
            ));
            info!(%addr, routes = self.config.routes.len(), "serving https");
            tasks.spawn(http::serve_https(
                listener,
                Arc::new(tls),
                state,
                self.config.header_timeout,
                shutdown.clone(),
            ));
            if let Some(plain) = self.http {
                info!(addr = %http::local_addr(&plain), "redirecting http to https");
                tasks.spawn(http::serve_http_redirect(
                    plain,
                    self.certs.clone(),
                    addr.port(),
                    self.config.header_timeout,
                    shutdown.clone(),
                ));
            }
        }
        if let Some(acme) = self.acme {
            tasks.spawn(acme.run(shutdown.clone()));
        }
        tasks.spawn(self.tunnel.clone().serve(self.endpoint, shutdown.clone()));
        while tasks.join_next().await.is_some() {}
        info!("edge stopped");
        Ok(())
    }
}
