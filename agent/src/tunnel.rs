//! Dialling the edge and keeping the session: TLS with the agent's key, the
//! control stream (service states out, wake requests in), accepting
//! forwarded streams, reconnecting forever.
//!
//! The link is QUIC when UDP gets through and TLS over TCP to the same port
//! when it does not ([`burrow_proto::link`]). With `transport = "auto"` the
//! agent dials like a browser: QUIC first, TCP beside it once QUIC has had
//! [`QUIC_HEAD_START`] without a handshake or failed, the first to connect
//! wins. While on TCP it probes QUIC again ([`PROBE_FIRST`] after
//! connecting, doubling to [`PROBE_CAP`]); once a probe logs in, new streams
//! go to QUIC and the TCP session stays until its streams have finished.

pub mod eyeballs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::framed::{FramedRecv, write_frames};
use burrow_proto::identity::{Identity, PinnedServerVerifier};
use burrow_proto::link::{self, Connection, LinkError, TcpLink, Transport};
use burrow_proto::quic::{self, ALPN, IDENTITY_SNI, Role, code};
use burrow_proto::{AgentEvent, AgentSession, EdgeToAgent, LinkReport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::{BACKOFF_CAP, Backoff};
use crate::config::{AgentConfig, TransportChoice};
use crate::forward::{Services, handle_stream};
use crate::monitor::{Monitors, Origin};
use eyeballs::{Attempts, Resolve};

/// How long a connection attempt (QUIC and TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the edge has to answer the hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QUIC has to finish a handshake before TCP is dialled beside it
/// (`transport = "auto"`); any QUIC failure starts TCP at once.
pub const QUIC_HEAD_START: Duration = Duration::from_secs(2);
/// While a dial's attempts go unanswered, every address is tried afresh
/// this often ([`Attempts::resending`]), so a link that returns from a
/// blackout is used within it.
pub const RESEND_EVERY: Duration = Duration::from_secs(2);
/// While on TCP, the first QUIC probe comes this long after connecting;
/// each failed probe doubles the wait, up to [`PROBE_CAP`].
pub const PROBE_FIRST: Duration = Duration::from_secs(5);
pub const PROBE_CAP: Duration = Duration::from_secs(30);
/// How long one QUIC probe may take, handshake and login.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A session left behind by a move to QUIC lives at least this long (for
/// streams the edge opened on it just before it switched), then until its
/// last stream has ended.
pub const MOVE_GRACE: Duration = Duration::from_secs(2);
/// A session that once carried this many streams at once (its allowance
/// grew past the initial one) and now carries [`RENEW_BELOW`] of that or
/// fewer is replaced by a fresh connection, the old one draining like a
/// move. What the burst left behind goes with it: quinn keeps every
/// stream's receive state for reuse and bookkeeping for the whole
/// allowance as long as the connection lives (about 1 KiB per stream of
/// the peak, on each side), and h2's stream store does not shrink either.
pub const RENEW_AFTER_PEAK: u32 = quic::INITIAL_STREAMS_PER_AGENT;
/// See [`RENEW_AFTER_PEAK`]: the share of the peak still open, at most.
pub const RENEW_BELOW: u32 = 8;
/// How often a session checks whether to renew (see [`RENEW_AFTER_PEAK`]).
pub const RENEW_CHECK: Duration = Duration::from_secs(5);
/// After the edge said it is going away (a restart), attempts that fail
/// within this window are retried every [`RESTART_RETRY`] instead of
/// backing off: the next edge process is expected any moment, and
/// WebSockets closed by the old one are reconnecting to it.
pub const RESTART_WINDOW: Duration = Duration::from_secs(30);
pub const RESTART_RETRY: Duration = Duration::from_millis(200);

/// What the agent is doing, for status output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    Connecting,
    Connected {
        session: u64,
        transport: Transport,
    },
    /// The edge refused this agent (unknown key, wrong name, version).
    Refused(String),
    Disconnected(String),
    Stopped,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("reading edge_ca {path}: {reason}")]
    EdgeCa { path: String, reason: String },
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The QUIC client config (see [`client_tls`]).
pub fn client_config(
    config: &AgentConfig,
    identity: &Identity,
) -> Result<quinn::ClientConfig, TlsSetupError> {
    let tls = client_tls(config, identity)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quic::transport_config(Role::Agent);
    if config.edges.len() > 1 {
        // An edge that died without a word (a crash, a kill) and came back
        // answers the next packet on the old connection with a stateless
        // reset (its identity key derives the reset tokens): a ping this
        // often puts the agent back on it within two seconds.
        transport.keep_alive_interval(Some(CLUSTER_KEEP_ALIVE));
    }
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Keep-alive of an agent with several edges (one ping per edge this
/// often, a few dozen bytes).
pub const CLUSTER_KEEP_ALIVE: Duration = Duration::from_millis(1500);

/// The TLS-over-TCP connector: the same TLS as QUIC's.
pub fn tcp_connector(
    config: &AgentConfig,
    identity: &Identity,
) -> Result<tokio_rustls::TlsConnector, TlsSetupError> {
    Ok(tokio_rustls::TlsConnector::from(Arc::new(client_tls(
        config, identity,
    )?)))
}

/// TLS 1.3, ALPN `burrow/1`, the agent's key as client certificate, the
/// edge checked by pinned key or by its public certificate.
fn client_tls(
    config: &AgentConfig,
    identity: &Identity,
) -> Result<rustls::ClientConfig, TlsSetupError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(quic::crypto_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match config.edge_key {
        Some(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(pin))),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            if let Some(ca) = &config.edge_ca {
                let bad = |reason: String| TlsSetupError::EdgeCa {
                    path: ca.display().to_string(),
                    reason,
                };
                for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad(e.to_string()))? {
                    roots
                        .add(cert.map_err(|e| bad(e.to_string()))?)
                        .map_err(|e| bad(e.to_string()))?;
                }
            }
            builder.with_root_certificates(roots)
        }
    };
    let mut tls = builder.with_client_auth_cert(vec![identity.cert()], identity.private_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// How one connection attempt or session ended.
enum Outcome {
    Shutdown,
    /// The edge asked us to come back after this long.
    GoingAway(Duration),
    /// The session was up, then lost.
    Lost(String),
    /// The edge closed the session because a newer one with this agent's
    /// key logged in: another agent runs with the same key.
    Replaced,
    /// The attempt failed before a session existed.
    Failed(String),
    /// Nothing answered the attempt in [`CONNECT_TIMEOUT`]: a network
    /// that is down, not an edge that refuses. The next attempt starts at
    /// once: the one that timed out already waited, sending a handshake
    /// every [`RESEND_EVERY`], which is all the load a silent link gets.
    NoAnswer(String),
    Refused(String),
    /// A QUIC probe logged in while on TCP: serve this session next; the
    /// old one drains by itself.
    Moved(Box<Established>),
}

/// A session the edge welcomed: its link, control stream and protocol state.
struct Established {
    addr: SocketAddr,
    conn: Connection,
    /// Why this session is not on QUIC (`None` when it is, or when the
    /// agent is pinned to TCP).
    fallback: Option<String>,
    send: link::SendStream,
    recv: FramedRecv,
    session: AgentSession,
    views: watch::Receiver<Vec<crate::monitor::ServiceView>>,
    welcomed: u64,
}

/// A link that finished its handshake, not yet logged in.
struct Dialled {
    addr: SocketAddr,
    conn: Connection,
    fallback: Option<String>,
}

pub(crate) struct Dialer {
    pub config: Arc<AgentConfig>,
    /// The edge this dialer keeps a session with (one of `config.edges`).
    pub edge: crate::config::EdgeAddr,
    pub client: quinn::ClientConfig,
    pub tcp: tokio_rustls::TlsConnector,
    pub services: Arc<Services>,
    pub monitors: Monitors,
    pub status: watch::Sender<AgentStatus>,
    pub resolver: Arc<dyn Resolve>,
    /// This process's random id, the same in every session (see
    /// [`burrow_proto::frame::Hello`]).
    pub instance: u64,
}

impl Dialer {
    /// Keeps a session up until `shutdown`.
    pub async fn run(self: Arc<Self>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let mut backoff = if self.config.edges.len() > 1 {
            Backoff::with_cap(crate::backoff::CLUSTER_BACKOFF_CAP)
        } else {
            Backoff::new()
        };
        let mut next: Option<Established> = None;
        let mut restarting_until: Option<tokio::time::Instant> = None;
        loop {
            let (outcome, lasted) = match next.take() {
                Some(moved) => self.serve_established(&endpoint, moved, &shutdown).await,
                None => {
                    self.status.send_replace(AgentStatus::Connecting);
                    self.connect_once(&endpoint, &shutdown).await
                }
            };
            if let Some(lasted) = lasted {
                backoff.session_ended(lasted);
                // A session came up: whatever restart there was is over.
                restarting_until = None;
            }
            let lasted_s = lasted.unwrap_or_default().as_secs();
            let delay = match outcome {
                Outcome::Shutdown => break,
                Outcome::Moved(est) => {
                    next = Some(*est);
                    continue;
                }
                Outcome::GoingAway(hint) => {
                    // The edge asked for it (a restart): not a fight, so
                    // the attempts that follow start short again.
                    info!(retry_in = ?hint, "edge is going away; reconnecting");
                    backoff.reset();
                    restarting_until = Some(tokio::time::Instant::now() + RESTART_WINDOW);
                    self.status
                        .send_replace(AgentStatus::Disconnected("edge going away".into()));
                    hint
                }
                Outcome::Lost(why) => {
                    let d = backoff.next_delay(rand::random());
                    warn!(reason = %why, lasted_s, retry_in = ?d, "lost the edge; reconnecting");
                    self.status.send_replace(AgentStatus::Disconnected(why));
                    d
                }
                Outcome::Replaced => {
                    // Two agents with one key: not an edge coming back,
                    // so the full backoff even with several edges.
                    let d = if self.config.edges.len() > 1 {
                        crate::backoff::equal_jitter(crate::backoff::BACKOFF_CAP, rand::random())
                    } else {
                        backoff.next_delay(rand::random())
                    };
                    error!(
                        lasted_s,
                        retry_in = ?d,
                        "another session with this agent's key replaced this one: two agents are running with one key; stop one, or give it its own key and [[agent]] entry"
                    );
                    self.status.send_replace(AgentStatus::Disconnected(
                        "replaced by another agent with the same key".into(),
                    ));
                    d
                }
                Outcome::Failed(why) => {
                    let d = match restarting_until {
                        // Half to all of the retry: agents do not all come at once.
                        Some(t) if tokio::time::Instant::now() < t => {
                            RESTART_RETRY / 2 + (RESTART_RETRY / 2).mul_f64(rand::random())
                        }
                        _ => backoff.next_delay(rand::random()),
                    };
                    warn!(reason = %why, retry_in = ?d, "cannot reach the edge");
                    self.status.send_replace(AgentStatus::Disconnected(why));
                    d
                }
                Outcome::NoAnswer(why) => {
                    warn!(reason = %why, "no answer from the edge; still trying");
                    self.status.send_replace(AgentStatus::Disconnected(why));
                    Duration::ZERO
                }
                Outcome::Refused(why) => {
                    error!(reason = %why, "the edge refused this agent; check [[agent]] on the edge");
                    self.status.send_replace(AgentStatus::Refused(why));
                    BACKOFF_CAP
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => break,
            }
        }
        self.status.send_replace(AgentStatus::Stopped);
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let addrs = self
            .resolver
            .resolve(&self.edge.addr)
            .await
            .map_err(|e| format!("resolving {}: {e}", self.edge.addr))?;
        if addrs.is_empty() {
            return Err(format!("{} resolves to no address", self.edge.addr));
        }
        Ok(addrs)
    }

    /// One attempt: how it ended, and how long its session lasted if it
    /// got one.
    async fn connect_once(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        shutdown: &CancellationToken,
    ) -> (Outcome, Option<Duration>) {
        let addrs = match self.resolve().await {
            Ok(a) => a,
            Err(e) => return (Outcome::Failed(e), None),
        };
        let dialled = match self
            .dial(endpoint, addrs, self.config.transport, shutdown)
            .await
        {
            Ok(d) => d,
            Err(outcome) => return (outcome, None),
        };
        let span = info_span!("edge", addr = %dialled.addr, transport = %dialled.conn.transport());
        let established = match self.login(dialled).instrument(span).await {
            Ok(e) => e,
            Err(outcome) => return (outcome, None),
        };
        self.serve_established(endpoint, established, shutdown)
            .await
    }

    /// Serves a welcomed session until it ends.
    async fn serve_established(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        est: Established,
        shutdown: &CancellationToken,
    ) -> (Outcome, Option<Duration>) {
        let span = info_span!("edge", addr = %est.addr, transport = %est.conn.transport());
        self.status.send_replace(AgentStatus::Connected {
            session: est.welcomed,
            transport: est.conn.transport(),
        });
        match &est.fallback {
            Some(why) => warn!(
                parent: &span,
                session = est.welcomed,
                reason = %why,
                "connected to edge over TCP/TLS: QUIC did not get through; probing it again in the background"
            ),
            None => info!(parent: &span, session = est.welcomed, "connected to edge"),
        }
        let started = tokio::time::Instant::now();
        let outcome = self.serve(endpoint, est, shutdown).instrument(span).await;
        (outcome, Some(started.elapsed()))
    }

    /// Dials the edge's addresses Happy-Eyeballs style ([`eyeballs`]):
    /// IPv6 first, the next address whenever the last attempt has run
    /// [`eyeballs::ATTEMPT_DELAY`] or failed. With `auto`, TCP attempts
    /// start beside QUIC's after [`QUIC_HEAD_START`], or at once when a
    /// QUIC attempt fails. The first handshake to finish wins; the other
    /// attempts are dropped, which closes them.
    async fn dial(
        &self,
        endpoint: &quinn::Endpoint,
        addrs: Vec<SocketAddr>,
        choice: TransportChoice,
        shutdown: &CancellationToken,
    ) -> Result<Dialled, Outcome> {
        let sni = if self.config.edge_key.is_some() {
            IDENTITY_SNI
        } else {
            self.edge.host.as_str()
        };
        let now = || tokio::time::Instant::now().into_std();
        let started = tokio::time::Instant::now();
        let deadline = started + CONNECT_TIMEOUT;
        let schedule =
            || Attempts::new(now(), addrs.iter().copied()).resending(now(), RESEND_EVERY);
        let mut quic_sched = (choice != TransportChoice::Tcp).then(schedule);
        let mut tcp_sched = (choice == TransportChoice::Tcp).then(schedule);
        let tcp_at = (choice == TransportChoice::Auto).then_some(started + QUIC_HEAD_START);
        // Why QUIC did not do: the reason given for a fallback.
        let mut quic_failure: Option<String> = None;
        let mut running = tokio::task::JoinSet::new();
        let mut failure = None;
        loop {
            let quic_exhausted = quic_sched.as_ref().is_none_or(Attempts::is_exhausted);
            if tcp_sched.is_none()
                && tcp_at.is_some_and(|at| {
                    quic_failure.is_some() || quic_exhausted || tokio::time::Instant::now() >= at
                })
            {
                debug!(reason = ?quic_failure, "dialling the edge over TCP beside QUIC");
                tcp_sched = Some(schedule());
            }
            if let Some(sched) = quic_sched.as_mut() {
                while let Some(addr) = sched.poll_attempt(now()) {
                    debug!(%addr, "dialling the edge over QUIC");
                    match endpoint.connect_with(self.client.clone(), addr, sni) {
                        Ok(connecting) => {
                            running.spawn(async move {
                                let r = connecting
                                    .await
                                    .map(Connection::Quic)
                                    .map_err(LinkError::from);
                                (addr, Transport::Quic, r)
                            });
                        }
                        // An IPv6 address on an IPv4-only endpoint, for one.
                        Err(e) => {
                            sched.handle_failed(now());
                            let why = format!("QUIC to {addr}: {e}");
                            quic_failure.get_or_insert_with(|| why.clone());
                            failure = Some(Outcome::Failed(why));
                        }
                    }
                }
            }
            if let Some(sched) = tcp_sched.as_mut() {
                while let Some(addr) = sched.poll_attempt(now()) {
                    debug!(%addr, "dialling the edge over TCP");
                    let (tls, sni) = (self.tcp.clone(), sni.to_owned());
                    running.spawn(
                        async move { (addr, Transport::Tcp, dial_tcp(tls, addr, sni).await) },
                    );
                }
            }
            let quic_done = quic_sched.as_ref().is_none_or(Attempts::is_exhausted);
            let tcp_done = match &tcp_sched {
                Some(s) => s.is_exhausted(),
                None => tcp_at.is_none(),
            };
            if quic_done && tcp_done {
                return Err(failure.unwrap_or_else(|| {
                    Outcome::Failed(format!("{} resolves to no address", self.edge.addr))
                }));
            }
            let next = [
                quic_sched.as_ref().and_then(Attempts::poll_timeout),
                tcp_sched.as_ref().and_then(Attempts::poll_timeout),
                tcp_at
                    .filter(|_| tcp_sched.is_none())
                    .map(tokio::time::Instant::into_std),
            ]
            .into_iter()
            .flatten()
            .min();
            let next_attempt = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(joined) = running.join_next() => match joined {
                    Ok((addr, transport, Ok(conn))) => {
                        let fallback = (transport == Transport::Tcp && choice == TransportChoice::Auto)
                            .then(|| quic_failure.clone().unwrap_or_else(|| {
                                format!("no QUIC handshake within {QUIC_HEAD_START:?} (UDP blocked?)")
                            }));
                        return Ok(Dialled { addr, conn, fallback });
                    }
                    Ok((addr, transport, Err(e))) => {
                        debug!(%addr, %transport, error = %e, "attempt to reach the edge failed");
                        let sched = match transport {
                            Transport::Quic => quic_sched.as_mut(),
                            Transport::Tcp => tcp_sched.as_mut(),
                        };
                        if let Some(s) = sched {
                            s.handle_failed(now());
                        }
                        let during = format!("{transport} handshake with the edge at {addr}");
                        if transport == Transport::Quic {
                            quic_failure.get_or_insert_with(|| format!("{during}: {e}"));
                        }
                        // Before a session exists nothing is lost: an
                        // attempt that did not connect failed.
                        failure = Some(match classify_close(e, &during) {
                            Outcome::Lost(why) => Outcome::Failed(why),
                            other => other,
                        });
                    }
                    Err(e) => {
                        failure = Some(Outcome::Failed(format!("dialling the edge: {e}")));
                    }
                },
                () = next_attempt => {}
                () = tokio::time::sleep_until(deadline) => {
                    let tried: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    return Err(Outcome::NoAnswer(format!(
                        "no answer from {} in {CONNECT_TIMEOUT:?}",
                        tried.join(", ")
                    )));
                }
                () = shutdown.cancelled() => return Err(Outcome::Shutdown),
            }
        }
    }

    /// Opens the control stream, says hello and waits for the welcome.
    async fn login(&self, dialled: Dialled) -> Result<Established, Outcome> {
        let Dialled {
            addr,
            conn,
            fallback,
        } = dialled;
        let (mut send, recv) =
            match tokio::time::timeout(WELCOME_TIMEOUT, conn.open_control()).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(classify_close(e, "opening the control stream")),
                Err(_) => {
                    return Err(Outcome::Failed(
                        "no control stream from the edge in time".into(),
                    ));
                }
            };
        let mut views = self.monitors.subscribe();
        let statuses = views
            .borrow_and_update()
            .iter()
            .map(|v| v.status())
            .collect();
        let mut session = AgentSession::new(self.config.name.clone(), self.instance, statuses);
        let mut recv = FramedRecv::new(recv);
        if let Err(e) =
            write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await
        {
            return Err(Outcome::Failed(format!("sending hello: {e}")));
        }
        let first = tokio::select! {
            f = tokio::time::timeout(WELCOME_TIMEOUT, recv.next::<EdgeToAgent>()) => f,
            e = conn.closed() => return Err(classify_close(e, "waiting for welcome")),
        };
        let first = match first {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Err(Outcome::Failed("edge ended the control stream".into())),
            Ok(Err(e)) => {
                if let Some(closed) = conn.close_reason() {
                    return Err(classify_close(closed, "waiting for welcome"));
                }
                return Err(Outcome::Failed(format!("waiting for welcome: {e}")));
            }
            Err(_) => return Err(Outcome::Failed("no welcome from the edge in time".into())),
        };
        match session.handle_frame(first) {
            Ok(AgentEvent::Established(w)) => {
                if let Some(why) = &fallback {
                    session.report_link(LinkReport {
                        fallback: why.clone(),
                        probe: String::new(),
                    });
                }
                Ok(Established {
                    addr,
                    conn,
                    fallback,
                    send,
                    recv,
                    session,
                    views,
                    welcomed: w.session,
                })
            }
            Ok(AgentEvent::Refused(r)) => Err(Outcome::Refused(r.message)),
            Ok(other) => Err(Outcome::Failed(format!("unexpected {other:?}"))),
            Err(e) => {
                conn.close(code::PROTOCOL, b"protocol error");
                Err(Outcome::Failed(e.to_string()))
            }
        }
    }

    /// A second session beside the running one: dial `transport` only,
    /// and log in. A QUIC probe from a TCP session, or a fresh connection
    /// after a burst (see [`RENEW_AFTER_PEAK`]).
    async fn probe(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        transport: TransportChoice,
        shutdown: CancellationToken,
    ) -> Result<Established, String> {
        let attempt = async {
            let addrs = self.resolve().await?;
            let dialled = self
                .dial(&endpoint, addrs, transport, &shutdown)
                .await
                .map_err(|o| describe(&o))?;
            self.login(dialled).await.map_err(|o| describe(&o))
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(format!("no {transport:?} login within {PROBE_TIMEOUT:?}")),
        }
    }

    /// Runs a session the edge welcomed: forwards the edge's streams,
    /// reports service states and takes wake requests until it ends. On
    /// TCP with `transport = "auto"`, probes QUIC in the background and
    /// moves there when a probe logs in.
    async fn serve(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        est: Established,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let Established {
            conn,
            fallback,
            mut send,
            mut recv,
            mut session,
            mut views,
            ..
        } = est;

        let probing =
            conn.transport() == Transport::Tcp && self.config.transport == TransportChoice::Auto;
        let mut probe_wait = PROBE_FIRST;
        let mut next_probe = probing.then(|| tokio::time::Instant::now() + probe_wait);
        // Aborted with the session: a probe must not log in for a session
        // that is gone.
        let mut probe: Option<AbortOnDrop<Result<Established, String>>> = None;
        // Whether the running probe is a renewal (same transport) rather
        // than a QUIC probe from TCP.
        let mut renewing = false;
        let mut renew_check = tokio::time::interval(RENEW_CHECK);
        renew_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut report = LinkReport {
            fallback: fallback.unwrap_or_default(),
            probe: String::new(),
        };

        // States that changed between the hello and the welcome.
        let mut views_open = true;
        let mut states_changed = views.has_changed().unwrap_or(false);
        let mut allowance = quic::StreamAllowance::default();
        loop {
            if std::mem::take(&mut states_changed) {
                // The full list: a reload may have added or removed services.
                let list = views
                    .borrow_and_update()
                    .iter()
                    .map(|v| v.status())
                    .collect();
                session.set_services(list);
            }
            // The link report (queued at login or after a probe) and any
            // service states go out together.
            if let Err(e) =
                write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await
            {
                return Outcome::Lost(format!("sending to the edge: {e}"));
            }
            let due = next_probe.filter(|_| probe.is_none());
            let probe_due = async {
                match due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok((s, r)) => self.spawn_stream(&conn, &mut allowance, s, r),
                    Err(e) => return classify_close(e, "session"),
                },
                changed = views.changed(), if views_open => match changed {
                    Ok(()) => states_changed = true,
                    // The monitor task stopped: the agent is shutting down.
                    Err(_) => views_open = false,
                },
                () = probe_due => {
                    debug!("probing QUIC");
                    renewing = false;
                    probe = Some(AbortOnDrop(tokio::spawn(
                        self.clone().probe(endpoint.clone(), TransportChoice::Quic, shutdown.clone()).in_current_span(),
                    )));
                }
                // Checked in the handler, not a guard: a guard is read once
                // when select! starts, and a quiet session may not loop again.
                _ = renew_check.tick() => {
                    if probe.is_none() && worth_renewing(&allowance) {
                        info!(peak = allowance.peak(), open = allowance.open(), "a burst of streams is over; renewing the connection to give back what it kept");
                        renewing = true;
                        let transport = match conn.transport() {
                            Transport::Quic => TransportChoice::Quic,
                            Transport::Tcp => TransportChoice::Tcp,
                        };
                        probe = Some(AbortOnDrop(tokio::spawn(
                            self.clone().probe(endpoint.clone(), transport, shutdown.clone()).in_current_span(),
                        )));
                    }
                }
                done = async { (&mut probe.as_mut().expect("guarded by is_some").0).await }, if probe.is_some() => {
                    probe = None;
                    match done {
                        Ok(Ok(mut quic)) => {
                            if renewing {
                                // Same transport, same reason for it.
                                if quic.fallback.is_none() && !report.fallback.is_empty() {
                                    quic.fallback = Some(report.fallback.clone());
                                }
                                info!(session = quic.welcomed, "renewed: new streams use the fresh connection; open ones finish on the old");
                            } else {
                                info!(session = quic.welcomed, "QUIC gets through again: new streams use it; streams on TCP finish there");
                            }
                            tokio::spawn(
                                drain(Left::Moved, conn, send, recv, session, allowance, self.clone())
                                    .in_current_span(),
                            );
                            return Outcome::Moved(Box::new(quic));
                        }
                        Ok(Err(why)) if renewing => {
                            // Tried once per burst: the session goes on as it is.
                            info!(reason = %why, "renewing the connection failed; keeping it");
                            allowance.forget_peak();
                        }
                        Ok(Err(why)) => {
                            probe_wait = (probe_wait * 2).min(PROBE_CAP);
                            info!(reason = %why, next_in = ?probe_wait, "QUIC probe failed; staying on TCP");
                            next_probe = Some(tokio::time::Instant::now() + probe_wait);
                            report.probe = format!("{}: {why}", humantime::format_rfc3339_seconds(std::time::SystemTime::now()));
                            session.report_link(report.clone());
                        }
                        Err(e) if renewing => {
                            warn!(error = %e, "renewal task failed");
                            allowance.forget_peak();
                        }
                        Err(e) => {
                            warn!(error = %e, "QUIC probe task failed");
                            next_probe = Some(tokio::time::Instant::now() + probe_wait);
                        }
                    }
                }
                frame = recv.next::<EdgeToAgent>() => match frame {
                    Ok(Some(f)) => match session.handle_frame(f) {
                        Ok(AgentEvent::EdgeGoingAway(g)) => {
                            // The edge may still open streams here for the
                            // requests it is draining: serve them while the
                            // next session is dialled.
                            tokio::spawn(
                                drain(Left::EdgeGoingAway, conn, send, recv, session, allowance, self.clone())
                                    .in_current_span(),
                            );
                            return Outcome::GoingAway(g.reconnect_after);
                        }
                        Ok(AgentEvent::Wake(w)) => self.monitors.wake(&w.service, Origin::Edge),
                        Ok(other) => {
                            conn.close(code::PROTOCOL, b"protocol error");
                            return Outcome::Lost(format!("unexpected {other:?}"));
                        }
                        Err(e) => {
                            conn.close(code::PROTOCOL, b"protocol error");
                            return Outcome::Lost(e.to_string());
                        }
                    },
                    Ok(None) => {
                        let e = session.handle_end();
                        conn.close(code::PROTOCOL, b"control stream ended");
                        return Outcome::Lost(e.to_string());
                    }
                    Err(e) => {
                        // A read error here is usually the connection closing.
                        let closed = conn.close_reason();
                        return match closed {
                            Some(c) => classify_close(c, "session"),
                            None => {
                                conn.close(code::PROTOCOL, b"bad control frame");
                                Outcome::Lost(e.to_string())
                            }
                        };
                    }
                },
                () = shutdown.cancelled() => {
                    session.go_away();
                    let _ = write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await;
                    let _ = send.finish();
                    conn.close(code::OK, b"agent stopping");
                    return Outcome::Shutdown;
                }
            }
        }
    }

    /// Serves one stream the edge opened, counted in `allowance`.
    fn spawn_stream(
        &self,
        conn: &Connection,
        allowance: &mut quic::StreamAllowance,
        s: link::SendStream,
        r: link::RecvStream,
    ) {
        let (slot, raise) = allowance.accepted();
        if let Some(limit) = raise {
            conn.set_max_concurrent_bi_streams(limit);
            debug!(limit, "raised the edge's stream allowance");
        }
        let (services, monitors) = (self.services.clone(), self.monitors.clone());
        // The stream's future is made inside the task: a future moved in
        // would take its size twice over (4.4 KiB more per held WebSocket).
        tokio::spawn(
            async move {
                let _slot = slot;
                handle_stream(s, r, services, monitors).await
            }
            .in_current_span(),
        );
    }
}

/// Why a session is being drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Left {
    /// The agent moved (to QUIC, or to a fresh connection after a burst):
    /// the edge sends nothing new here, and the agent closes the session
    /// once its last stream has ended.
    Moved,
    /// The edge is going away (a restart): it may still open streams for
    /// the requests it is draining, and closes the session when done.
    EdgeGoingAway,
}

/// A session left behind, by a move to QUIC or by an edge that is going
/// away: serves the streams still on it and any the edge opens while it
/// winds down, until it ends.
async fn drain(
    left: Left,
    conn: Connection,
    mut send: link::SendStream,
    mut recv: FramedRecv,
    mut session: AgentSession,
    mut allowance: quic::StreamAllowance,
    dialer: Arc<Dialer>,
) {
    let grace = tokio::time::Instant::now() + MOVE_GRACE;
    let mut check = tokio::time::interval(Duration::from_millis(250));
    let mut control_open = true;
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => dialer.spawn_stream(&conn, &mut allowance, s, r),
                Err(_) => return,
            },
            // Nothing more is expected on the control stream; reading it
            // notices the session ending.
            frame = recv.next::<EdgeToAgent>(), if control_open => match frame {
                Ok(Some(_)) => {}
                Ok(None) => control_open = false,
                Err(_) => return,
            },
            _ = check.tick(), if left == Left::Moved => {
                if tokio::time::Instant::now() >= grace && allowance.open() == 0 {
                    debug!("the old session's last stream ended; closing it");
                    session.go_away();
                    let _ = write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await;
                    let _ = send.finish();
                    // The edge closes when it reads the goodbye; close here
                    // too if it does not.
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.closed()).await;
                    conn.close(code::OK, b"moved");
                    return;
                }
            }
        }
    }
}

/// A burst of streams is over: the session once carried
/// [`RENEW_AFTER_PEAK`] streams at once and carries [`RENEW_BELOW`] of that
/// or fewer now.
fn worth_renewing(allowance: &quic::StreamAllowance) -> bool {
    allowance.peak() >= RENEW_AFTER_PEAK && allowance.open() <= allowance.peak() / RENEW_BELOW
}

/// A task that is aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TCP attempt: connect, TLS (ALPN `burrow/1`), then HTTP/2.
async fn dial_tcp(
    tls: tokio_rustls::TlsConnector,
    addr: SocketAddr,
    sni: String,
) -> Result<Connection, LinkError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| LinkError::Lost(format!("TCP connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let name =
        ServerName::try_from(sni).map_err(|e| LinkError::Transport(format!("server name: {e}")))?;
    let stream = tls
        .connect(name, tcp)
        .await
        .map_err(|e| LinkError::Transport(format!("TLS: {e}")))?;
    TcpLink::agent(stream, addr).await
}

/// A one-line description of why an attempt did not end in a session.
fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Lost(w) | Outcome::Failed(w) | Outcome::NoAnswer(w) => w.clone(),
        Outcome::Refused(w) => format!("refused: {w}"),
        Outcome::Replaced => "replaced".into(),
        Outcome::GoingAway(_) => "the edge is going away".into(),
        Outcome::Shutdown => "shutting down".into(),
        Outcome::Moved(_) => "moved".into(),
    }
}

/// Turns a link error into an outcome: the edge's close code says
/// whether to come back at once, back off, or stop hammering.
fn classify_close(e: LinkError, during: &str) -> Outcome {
    match &e {
        LinkError::ClosedByPeer { code: c, .. } if *c == code::GOING_AWAY => {
            Outcome::GoingAway(Duration::ZERO)
        }
        LinkError::ClosedByPeer { code: c, .. } if *c == code::REPLACED => Outcome::Replaced,
        LinkError::ClosedByPeer { code: c, reason } if *c == code::REFUSED => {
            Outcome::Refused(reason.clone())
        }
        LinkError::Transport(_) => Outcome::Failed(format!("{during}: {e}")),
        _ => Outcome::Lost(format!("{during}: {e}")),
    }
}
