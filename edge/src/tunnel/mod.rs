//! Where agents dial in: the QUIC endpoint, and TLS over TCP on the HTTPS
//! listener (ALPN `burrow/1`) for agents whose network blocks UDP. Both
//! authenticate agents by pinned key and carry the same session
//! ([`burrow_proto::link`]): one control stream per agent session, and the
//! forwarded streams the edge opens.

pub mod alpn;
pub mod registry;
pub mod wake_line;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use burrow_proto::frame::RefuseReason;
use burrow_proto::framed::{FramedError, FramedRecv, write_frames};
use burrow_proto::identity::{AnyKeyClientVerifier, Fingerprint};
use burrow_proto::link::{self, Connection, LinkError, TcpLink};
use burrow_proto::listener::ConnPermit;
use burrow_proto::quic::{self, ALPN, Role, code};
use burrow_proto::{
    AgentToEdge, EdgeEvent, EdgeSession, Frame, Name, StreamOpen, StreamReply, StreamStatus,
};
use bytes::Bytes;
use rustls::server::ResolvesServerCert;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::AgentConfig;
pub use registry::{AgentLink, Control, Registry, ServiceReport, WakeRecord, WakeSent};

/// How long a QUIC handshake may take before the attempt is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an agent has, after the handshake, to open its control stream
/// and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agent has to answer a stream header (it connects to the
/// service in that time; the agent's own connect timeout is shorter).
pub const STREAM_REPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long opening a stream to an agent may wait for the agent's stream
/// limit to make room; then the request gets 503 with Retry-After.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// What the edge tells agents when it shuts down: reconnect at once, the
/// agent's backoff spaces the attempts while the edge is away.
pub const RECONNECT_HINT: Duration = Duration::ZERO;

/// How many TCP agents may wait, handed over by the HTTPS listener, for
/// the tunnel to take them.
const TCP_INTAKE: usize = 64;

/// The TLS config agents meet, over QUIC and over TCP alike: TLS 1.3, ALPN
/// `burrow/1`, a client certificate required (checked against the agent
/// list after the handshake).
pub fn agent_tls(
    certs: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(quic::crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(AnyKeyClientVerifier::default()))
        .with_cert_resolver(certs);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    // Both ends are burrow: our order (AES-128-GCM first) decides.
    tls.ignore_client_order = true;
    Ok(tls)
}

/// Whether a QUIC connection negotiated HTTP/3 (a browser, not an agent).
fn is_h3(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == alpn::H3_ALPN)
}

/// An agent that reached the HTTPS listener over TCP and finished its TLS
/// handshake (ALPN `burrow/1`), on its way to the tunnel.
#[derive(Debug)]
pub struct TcpAgent {
    pub tls: tokio_rustls::server::TlsStream<TcpStream>,
    pub remote: SocketAddr,
    /// Its place under the HTTPS listener's connection caps.
    pub permit: ConnPermit,
}

/// What the QUIC endpoint needs to serve HTTP/3 beside agents.
#[derive(Debug)]
pub struct Http3 {
    /// The browsers' TLS config ([`crate::http::h3::tls_config`]).
    pub tls: rustls::ServerConfig,
    /// Requests a browser may have open at once on one connection.
    pub streams: u32,
}

/// Builds the QUIC server config from [`agent_tls`]; with `http3`, the
/// endpoint also takes browsers, told apart by ALPN ([`alpn::AlpnSplit`]).
pub fn server_config(
    certs: Arc<dyn ResolvesServerCert>,
    http3: Option<Http3>,
) -> Result<quinn::ServerConfig, rustls::Error> {
    let quic_config = |tls: rustls::ServerConfig| {
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| rustls::Error::General(e.to_string()))
    };
    let agents = quic_config(agent_tls(certs)?)?;
    let mut transport = quic::transport_config(Role::Edge);
    let mut config = match http3 {
        None => quinn::ServerConfig::with_crypto(Arc::new(agents)),
        Some(h3) => {
            // The limits are the browsers' (what one connection may make
            // the edge buffer about as over HTTP/2); an agent gets the
            // tunnel's windows once it is known to be one
            // (`handle_incoming`). Stream counts cannot be taken back, but
            // an agent opens its control stream only.
            transport
                .max_concurrent_bidi_streams(quinn::VarInt::from_u32(h3.streams.max(1)))
                .max_concurrent_uni_streams(quinn::VarInt::from_u32(crate::http::h3::UNI_STREAMS))
                .receive_window(quinn::VarInt::from_u32(crate::http::h3::RECEIVE_WINDOW))
                .send_window(crate::http::h3::SEND_WINDOW);
            let browsers = quic_config(h3.tls)?;
            quinn::ServerConfig::with_crypto(Arc::new(alpn::AlpnSplit::new(agents, browsers)))
        }
    };
    config.transport_config(Arc::new(transport));
    // Agents dial from home connections whose address changes on redial;
    // phones move between networks.
    config.migration(true);
    Ok(config)
}

/// The agent side of the tunnel as the rest of the edge sees it.
#[derive(Debug)]
pub struct Tunnel {
    pub registry: Arc<Registry>,
    agents: std::sync::RwLock<Vec<AgentConfig>>,
    next_session: AtomicU64,
    tcp_tx: mpsc::Sender<TcpAgent>,
    tcp_rx: std::sync::Mutex<Option<mpsc::Receiver<TcpAgent>>>,
    /// Where browser connections (ALPN `h3`) go once their handshake is
    /// done; nowhere unless HTTP/3 is on.
    h3_tx: std::sync::OnceLock<mpsc::Sender<quinn::Connection>>,
}

impl Tunnel {
    pub fn new(agents: Vec<AgentConfig>) -> Self {
        let (tcp_tx, tcp_rx) = mpsc::channel(TCP_INTAKE);
        Self {
            registry: Arc::new(Registry::new(agents.iter().map(|a| a.name.clone()))),
            agents: std::sync::RwLock::new(agents),
            next_session: AtomicU64::new(1),
            tcp_tx,
            tcp_rx: std::sync::Mutex::new(Some(tcp_rx)),
            h3_tx: std::sync::OnceLock::new(),
        }
    }

    /// Starts handing browser connections (ALPN `h3`) to the HTTP/3
    /// server; returns where they arrive.
    pub fn h3_intake(&self) -> mpsc::Receiver<quinn::Connection> {
        let (tx, rx) = mpsc::channel(crate::http::h3::INTAKE);
        if self.h3_tx.set(tx).is_err() {
            warn!("http/3 intake taken twice; the first keeps the connections");
        }
        rx
    }

    /// Where the HTTPS listener hands agents that came over TCP.
    pub fn tcp_intake(&self) -> mpsc::Sender<TcpAgent> {
        self.tcp_tx.clone()
    }

    fn agent_for(&self, key: Fingerprint) -> Option<AgentConfig> {
        self.agents
            .read()
            .expect("agents lock not poisoned")
            .iter()
            .find(|a| a.key == key)
            .cloned()
    }

    /// Replaces the list of allowed agents (config reload). Sessions of
    /// agents that were removed, or whose key changed, are closed.
    pub fn set_agents(&self, agents: Vec<AgentConfig>) {
        self.registry.expect(agents.iter().map(|a| a.name.clone()));
        for link in self.registry.connected() {
            if !agents
                .iter()
                .any(|a| a.name == link.name && a.key == link.key)
            {
                info!(agent = %link.name, "agent removed from the config; closing its session");
                link.conn
                    .close(code::REFUSED, b"agent removed from the edge config");
            }
        }
        *self.agents.write().expect("agents lock not poisoned") = agents;
    }

    /// Accepts agents until `shutdown`; then tells every agent to go away
    /// and refuses new sessions, but keeps the existing connections (and
    /// the streams in flight on them) until `drained`.
    pub async fn serve(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        shutdown: CancellationToken,
        drained: CancellationToken,
    ) {
        let sessions = shutdown.child_token();
        let mut tcp = self
            .tcp_rx
            .lock()
            .expect("intake lock not poisoned")
            .take()
            .expect("the tunnel is served once");
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                Some(agent) = tcp.recv() => {
                    if shutdown.is_cancelled() {
                        continue;
                    }
                    let remote = agent.remote;
                    let this = self.clone();
                    let stop = sessions.child_token();
                    let drained = drained.clone();
                    tokio::spawn(
                        async move { this.handle_tcp(agent, stop, drained).await }
                            .instrument(info_span!("agent", peer = %remote, transport = "tcp")),
                    );
                    continue;
                }
                () = drained.cancelled() => break,
            };
            let Some(incoming) = incoming else { break };
            if shutdown.is_cancelled() {
                incoming.refuse();
                continue;
            }
            let remote = incoming.remote_address();
            let this = self.clone();
            let stop = sessions.child_token();
            let drained = drained.clone();
            tokio::spawn(
                async move { this.handle_incoming(incoming, stop, drained).await }
                    .instrument(info_span!("agent", peer = %remote)),
            );
        }
        endpoint.close(code::GOING_AWAY, b"edge shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    async fn handle_incoming(
        self: Arc<Self>,
        incoming: quinn::Incoming,
        stop: CancellationToken,
        drained: CancellationToken,
    ) {
        let remote = incoming.remote_address();
        let peers = match self.h3_tx.get() {
            Some(_) => Peers::AgentsAndBrowsers,
            None => Peers::Agents,
        };
        let Some(conn) = within_handshake_time(incoming.into_future(), peers).await else {
            return;
        };
        if let Some(h3) = self.h3_tx.get() {
            if is_h3(&conn) {
                if let Err(e) = h3.try_send(conn) {
                    debug!("http/3 intake full; closing a browser connection");
                    let conn = e.into_inner();
                    conn.close(crate::http::h3::EXCESSIVE_LOAD, b"busy");
                }
                return;
            }
            // The endpoint's limits are the browsers'; an agent gets the
            // tunnel's.
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(1));
            conn.set_max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
            conn.set_receive_window(quinn::VarInt::from_u32(quic::CONNECTION_RECEIVE_WINDOW));
            conn.set_send_window(quic::SEND_WINDOW);
        }
        let key = peer_fingerprint(&conn);
        self.admit(Connection::Quic(conn), key, remote, stop, drained)
            .await;
    }

    /// An agent over TCP: its TLS handshake is done (on the HTTPS
    /// listener); HTTP/2 starts here.
    async fn handle_tcp(
        self: Arc<Self>,
        agent: TcpAgent,
        stop: CancellationToken,
        drained: CancellationToken,
    ) {
        let TcpAgent {
            tls,
            remote,
            permit,
        } = agent;
        let _permit = permit;
        let key = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|c| Fingerprint::of_cert(c).ok());
        let Some(conn) = within_handshake_time(TcpLink::edge(tls, remote), Peers::Agents).await
        else {
            return;
        };
        self.admit(conn, key, remote, stop, drained).await;
    }

    /// Checks an authenticated agent's key against the config and runs its
    /// session, on either transport.
    async fn admit(
        &self,
        conn: Connection,
        key: Option<Fingerprint>,
        remote: SocketAddr,
        stop: CancellationToken,
        drained: CancellationToken,
    ) {
        let Some(key) = key else {
            warn!("agent presented no readable certificate");
            conn.close(code::REFUSED, b"no client certificate");
            return;
        };
        let Some(agent) = self.agent_for(key) else {
            warn!(%key, "refused agent: key not listed in any [[agent]]");
            conn.close(code::REFUSED, b"agent key not listed on this edge");
            return;
        };
        let name = agent.name.clone();
        let span = info_span!("session", agent = %name);
        match self
            .run_session(conn.clone(), name, key, remote, (stop, drained))
            .instrument(span)
            .await
        {
            Ok(()) => {}
            Err(SessionEnd::Protocol(e)) => {
                warn!(agent = %agent.name, %key, error = %e, "closing agent: protocol error");
                conn.close(code::PROTOCOL, b"protocol error");
            }
            Err(SessionEnd::Refused(why)) => {
                warn!(agent = %agent.name, %key, reason = why, "refused agent");
                conn.close(code::REFUSED, why.as_bytes());
            }
            Err(SessionEnd::Lost(e)) => {
                info!(agent = %agent.name, error = %e, "agent disconnected");
            }
        }
    }

    async fn run_session(
        &self,
        conn: Connection,
        name: Name,
        key: Fingerprint,
        remote: SocketAddr,
        (stop, drained): (CancellationToken, CancellationToken),
    ) -> Result<(), SessionEnd> {
        let (mut send, recv) = tokio::time::timeout(HELLO_TIMEOUT, conn.accept_control())
            .await
            .map_err(|_| SessionEnd::Protocol("no control stream in time".into()))?
            .map_err(|e| SessionEnd::Lost(e.to_string()))?;
        let mut recv = FramedRecv::new(recv);
        let mut session = EdgeSession::new();

        let hello = tokio::time::timeout(HELLO_TIMEOUT, recv.next::<AgentToEdge>())
            .await
            .map_err(|_| SessionEnd::Protocol("no hello in time".into()))?
            .map_err(SessionEnd::from_framed)?
            .ok_or_else(|| SessionEnd::Protocol("control stream ended before hello".into()))?;
        let hello = match session.handle_frame(hello) {
            Ok(EdgeEvent::Hello(h)) => h,
            Ok(other) => {
                return Err(SessionEnd::Protocol(format!(
                    "expected hello, got {other:?}"
                )));
            }
            Err(e) => {
                // A hello the session refuses (another version) queued a
                // refusal for the agent; anything else is a protocol error.
                let refusal: Vec<_> = std::iter::from_fn(|| session.poll_transmit()).collect();
                if refusal.is_empty() {
                    return Err(SessionEnd::Protocol(e.to_string()));
                }
                let _ = write_frames(&mut send, refusal).await;
                let _ = send.finish();
                return Err(SessionEnd::Refused(e.to_string()));
            }
        };
        if hello.agent != name {
            let why = format!("this key belongs to agent {name}, not {}", hello.agent);
            session.refuse(RefuseReason::NameMismatch, why.clone());
            let _ = write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await;
            let _ = send.finish();
            // Let the refusal reach the agent before the close overtakes it.
            let _ = tokio::time::timeout(Duration::from_secs(1), send.stopped()).await;
            return Err(SessionEnd::Refused(why));
        }

        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        session.accept(id);
        // Registered before the welcome leaves: once an agent moving to
        // QUIC is welcomed there, no new stream goes to its old session.
        let (link, mut control) =
            AgentLink::new(name.clone(), key, (id, hello.instance), conn.clone());
        let transport = conn.transport();
        let old = self.registry.insert(link.clone());
        if let Err(e) =
            write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await
        {
            // Not welcomed: the session it would have taken over, if still
            // alive, keeps serving.
            self.registry.remove(&name, id);
            if let Some(old) = old.filter(|o| o.conn.close_reason().is_none()) {
                self.registry.insert(old);
            }
            return Err(SessionEnd::Lost(e.to_string()));
        }
        if let Some(old) = old {
            if old.instance == hello.instance && hello.instance != 0 {
                // The same agent process on another transport (back on
                // QUIC after a TCP fallback): the old session's streams
                // finish where they are, and the agent closes it.
                info!(
                    old_session = old.session,
                    from = %old.transport(),
                    to = %transport,
                    "agent moved its session; the old one drains"
                );
                old.pool.retire();
            } else {
                info!(
                    old_session = old.session,
                    "agent logged in again; replacing its old session"
                );
                old.conn
                    .close(code::REPLACED, b"replaced by a newer session");
            }
        }
        info!(session = id, %remote, %transport, "agent connected");

        let result = loop {
            tokio::select! {
                frame = recv.next::<AgentToEdge>() => {
                    let frame = match frame {
                        Ok(Some(f)) => f,
                        Ok(None) => break Err(SessionEnd::Protocol("control stream ended".into())),
                        Err(e) => break Err(SessionEnd::from_framed(e)),
                    };
                    match session.handle_frame(frame) {
                        Ok(EdgeEvent::Services(list)) => {
                            debug!(?list, "services");
                            self.registry.set_services(&link, list);
                        }
                        Ok(EdgeEvent::Link(report)) => {
                            info!(%transport, fallback = %report.fallback, probe = %report.probe, "agent link report");
                            link.set_report(report);
                        }
                        Ok(EdgeEvent::AgentGoingAway) => {
                            info!("agent going away");
                            conn.close(code::OK, b"bye");
                            break Ok(());
                        }
                        Ok(EdgeEvent::Hello(_)) => break Err(SessionEnd::Protocol("second hello".into())),
                        Err(e) => break Err(SessionEnd::Protocol(e.to_string())),
                    }
                }
                // The link in the registry holds the sender, so this stays open.
                Some(command) = control.recv() => {
                    match command {
                        Control::Wake(service) => session.wake(service),
                    }
                    if let Err(e) = write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await {
                        break Err(SessionEnd::Lost(e.to_string()));
                    }
                }
                () = stop.cancelled() => {
                    // Tell the agent to go (it redials, and a restarted edge
                    // takes it), but keep this connection for the streams
                    // still in flight until the edge has drained.
                    session.go_away(RECONNECT_HINT);
                    let _ = write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await;
                    let _ = send.finish();
                    tokio::select! {
                        () = drained.cancelled() => {}
                        _ = conn.closed() => {}
                    }
                    conn.close(code::GOING_AWAY, b"edge shutting down");
                    break Ok(());
                }
                e = conn.closed() => break Err(SessionEnd::Lost(e.to_string())),
            }
        };
        self.registry.remove(&name, id);
        result
    }
}

/// Who may be on the other end of a handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peers {
    Agents,
    /// The UDP port with HTTP/3 on: browsers too, whose failed handshakes
    /// (scanners, old clients, certificates a browser refuses) are no
    /// news for the operator.
    AgentsAndBrowsers,
}

/// Runs an agent's handshake (QUIC, or HTTP/2 after TLS) within
/// [`HANDSHAKE_TIMEOUT`]; logs why it did not finish.
async fn within_handshake_time<T, E: std::fmt::Display>(
    handshake: impl std::future::Future<Output = Result<T, E>>,
    peers: Peers,
) -> Option<T> {
    let failed = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => return Some(conn),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_owned(),
    };
    match peers {
        Peers::Agents => info!(error = %failed, "agent handshake failed"),
        Peers::AgentsAndBrowsers => {
            debug!(error = %failed, "quic handshake failed (an agent or a browser)");
        }
    }
    None
}

/// Why an agent session ended, for the log line and the close code.
#[derive(Debug)]
enum SessionEnd {
    Protocol(String),
    Refused(String),
    Lost(String),
}

impl SessionEnd {
    fn from_framed(e: FramedError) -> Self {
        match e {
            FramedError::Read(e) => Self::Lost(e.to_string()),
            other => Self::Protocol(other.to_string()),
        }
    }
}

impl From<LinkError> for SessionEnd {
    fn from(e: LinkError) -> Self {
        Self::Lost(e.to_string())
    }
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_cert(certs.first()?).ok()
}

/// Why a forwarded stream could not be opened. One place maps these to
/// HTTP statuses ([`crate::http`]) and log lines.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("agent {0} is not connected")]
    AgentOffline(Name),
    #[error("agent connection lost: {0}")]
    Lost(String),
    #[error("agent did not answer the stream header in time")]
    ReplyTimeout,
    #[error("no stream to the agent could be opened within {OPEN_TIMEOUT:?} (at its stream limit)")]
    Busy,
    #[error("agent sent a bad stream reply: {0}")]
    BadReply(String),
    #[error("service {service}: {status:?} {message}")]
    Service {
        service: Name,
        status: StreamStatus,
        message: String,
    },
}

/// A forwarded stream the agent has connected to its service.
#[derive(Debug)]
pub struct OpenStream {
    pub send: link::SendStream,
    pub recv: link::RecvStream,
    /// Bytes from the service that arrived with the reply.
    pub initial: Bytes,
    /// Counts the stream as open in the metrics while held.
    pub guard: crate::metrics::StreamGuard,
}

/// Opens a stream to `agent` for `open.service` and waits for the agent's
/// reply. Waits for a free stream slot when the agent is at its limit.
pub async fn open_stream(
    registry: &Registry,
    agent: &Name,
    open: StreamOpen,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<OpenStream, OpenError> {
    let link = registry
        .wait_for(agent)
        .await
        .ok_or_else(|| OpenError::AgentOffline(agent.clone()))?;
    open_stream_on(&link, open, metrics).await
}

/// Opens a stream on an agent session already at hand, as [`open_stream`].
pub async fn open_stream_on(
    link: &AgentLink,
    open: StreamOpen,
    metrics: &Arc<crate::metrics::Metrics>,
) -> Result<OpenStream, OpenError> {
    let (mut send, recv) = tokio::time::timeout(OPEN_TIMEOUT, link.conn.open_bi())
        .await
        .map_err(|_| {
            metrics.refused(crate::metrics::Refused::OpenTimeout);
            OpenError::Busy
        })?
        .map_err(|e| OpenError::Lost(e.to_string()))?;
    send.write_chunk(open.to_bytes().freeze())
        .await
        .map_err(|e| OpenError::Lost(e.to_string()))?;
    let mut recv = FramedRecv::new(recv);
    let reply = tokio::time::timeout(STREAM_REPLY_TIMEOUT, recv.next::<StreamReply>())
        .await
        .map_err(|_| OpenError::ReplyTimeout)?;
    let reply = match reply {
        Ok(Some(r)) => r,
        Ok(None) => return Err(OpenError::BadReply("stream ended before the reply".into())),
        Err(FramedError::Read(e)) => return Err(OpenError::Lost(e.to_string())),
        Err(e) => {
            send.reset(code::PROTOCOL);
            return Err(OpenError::BadReply(e.to_string()));
        }
    };
    if reply.status != StreamStatus::Connected {
        send.reset(code::STREAM_ABORTED);
        return Err(OpenError::Service {
            service: open.service,
            status: reply.status,
            message: reply.message,
        });
    }
    let (recv, initial) = recv.into_parts();
    Ok(OpenStream {
        send,
        recv,
        initial,
        guard: metrics.stream_opened(),
    })
}
