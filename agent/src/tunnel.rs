//! Dialling the edge and keeping the session: TLS with the agent's key, the
//! control stream (service states out, wake requests in), accepting
//! forwarded streams, reconnecting forever.

pub mod eyeballs;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::framed::{FramedRecv, write_frames};
use burrow_proto::identity::{Identity, PinnedServerVerifier};
use burrow_proto::quic::{self, ALPN, IDENTITY_SNI, Role, code};
use burrow_proto::{AgentEvent, AgentSession, EdgeToAgent};
use quinn::VarInt;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::backoff::{BACKOFF_CAP, Backoff};
use crate::config::AgentConfig;
use crate::forward::{Services, handle_stream};
use crate::monitor::{Monitors, Origin};
use eyeballs::{Attempts, Resolve};

/// How long a connection attempt (QUIC and TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the edge has to answer the hello.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent is doing, for status output and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentStatus {
    Connecting,
    Connected {
        session: u64,
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

/// The QUIC client config: TLS 1.3, the agent's key as client certificate,
/// the edge checked by pinned key or by its public certificate.
pub fn client_config(
    config: &AgentConfig,
    identity: &Identity,
) -> Result<quinn::ClientConfig, TlsSetupError> {
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
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(quic::transport_config(Role::Agent)));
    Ok(client)
}

/// How one connection attempt or session ended.
#[derive(Debug)]
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
    Refused(String),
}

/// A session the edge welcomed: its control stream and protocol state.
struct LoggedIn {
    send: quinn::SendStream,
    recv: FramedRecv,
    session: AgentSession,
    views: watch::Receiver<Vec<crate::monitor::ServiceView>>,
}

pub(crate) struct Dialer {
    pub config: Arc<AgentConfig>,
    pub client: quinn::ClientConfig,
    pub services: Arc<Services>,
    pub monitors: Monitors,
    pub status: watch::Sender<AgentStatus>,
    pub resolver: Arc<dyn Resolve>,
}

impl Dialer {
    /// Keeps a session up until `shutdown`.
    pub async fn run(self, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        loop {
            self.status.send_replace(AgentStatus::Connecting);
            let (outcome, lasted) = self.connect_once(&endpoint, &shutdown).await;
            if let Some(lasted) = lasted {
                backoff.session_ended(lasted);
            }
            let lasted_s = lasted.unwrap_or_default().as_secs();
            let delay = match outcome {
                Outcome::Shutdown => break,
                Outcome::GoingAway(hint) => {
                    // The edge asked for it (a restart): not a fight, so
                    // the attempts that follow start short again.
                    info!(retry_in = ?hint, "edge is going away; reconnecting");
                    backoff.reset();
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
                    let d = backoff.next_delay(rand::random());
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
                    let d = backoff.next_delay(rand::random());
                    warn!(reason = %why, retry_in = ?d, "cannot reach the edge");
                    self.status.send_replace(AgentStatus::Disconnected(why));
                    d
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
        endpoint.close(code::OK, b"agent stopping");
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    }

    async fn resolve(&self) -> Result<Vec<SocketAddr>, String> {
        let addrs = self
            .resolver
            .resolve(&self.config.edge)
            .await
            .map_err(|e| format!("resolving {}: {e}", self.config.edge))?;
        if addrs.is_empty() {
            return Err(format!("{} resolves to no address", self.config.edge));
        }
        Ok(addrs)
    }

    /// One attempt: how it ended, and how long its session lasted if it
    /// got one.
    async fn connect_once(
        &self,
        endpoint: &quinn::Endpoint,
        shutdown: &CancellationToken,
    ) -> (Outcome, Option<Duration>) {
        let addrs = match self.resolve().await {
            Ok(a) => a,
            Err(e) => return (Outcome::Failed(e), None),
        };
        let (addr, conn) = match self.dial(endpoint, addrs, shutdown).await {
            Ok(c) => c,
            Err(outcome) => return (outcome, None),
        };
        let span = info_span!("edge", %addr);
        async {
            let login = match self.login(&conn).await {
                Ok(l) => l,
                Err(outcome) => return (outcome, None),
            };
            let established = tokio::time::Instant::now();
            let outcome = self.serve(&conn, login, shutdown).await;
            (outcome, Some(established.elapsed()))
        }
        .instrument(span)
        .await
    }

    /// Dials the edge's addresses Happy-Eyeballs style ([`eyeballs`]):
    /// IPv6 first, the next address whenever the last attempt has run
    /// [`eyeballs::ATTEMPT_DELAY`] or failed. The first handshake to finish
    /// wins; the other attempts are dropped, which closes them.
    async fn dial(
        &self,
        endpoint: &quinn::Endpoint,
        addrs: Vec<SocketAddr>,
        shutdown: &CancellationToken,
    ) -> Result<(SocketAddr, quinn::Connection), Outcome> {
        let sni = if self.config.edge_key.is_some() {
            IDENTITY_SNI
        } else {
            self.config.edge_host.as_str()
        };
        let now = || tokio::time::Instant::now().into_std();
        let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        let mut schedule = Attempts::new(now(), addrs.iter().copied());
        let mut running = tokio::task::JoinSet::new();
        let mut failure = None;
        loop {
            while let Some(addr) = schedule.poll_attempt(now()) {
                debug!(%addr, "dialling the edge");
                match endpoint.connect_with(self.client.clone(), addr, sni) {
                    Ok(connecting) => {
                        running.spawn(async move { (addr, connecting.await) });
                    }
                    // An IPv6 address on an IPv4-only endpoint, for one.
                    Err(e) => {
                        schedule.handle_failed(now());
                        failure = Some(Outcome::Failed(format!("connecting to {addr}: {e}")));
                    }
                }
            }
            if schedule.is_exhausted() {
                return Err(failure.unwrap_or_else(|| {
                    Outcome::Failed(format!("{} resolves to no address", self.config.edge))
                }));
            }
            let next = schedule.poll_timeout();
            let next_attempt = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(joined) = running.join_next() => match joined {
                    Ok((addr, Ok(conn))) => return Ok((addr, conn)),
                    Ok((addr, Err(e))) => {
                        debug!(%addr, error = %e, "attempt to reach the edge failed");
                        schedule.handle_failed(now());
                        failure = Some(classify_close(e, &format!("handshake with the edge at {addr}")));
                    }
                    Err(e) => {
                        schedule.handle_failed(now());
                        failure = Some(Outcome::Failed(format!("dialling the edge: {e}")));
                    }
                },
                () = next_attempt => {}
                () = tokio::time::sleep_until(deadline) => {
                    let tried: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                    return Err(Outcome::Failed(format!(
                        "no answer from {} in {CONNECT_TIMEOUT:?}",
                        tried.join(", ")
                    )));
                }
                () = shutdown.cancelled() => return Err(Outcome::Shutdown),
            }
        }
    }

    /// Opens the control stream, says hello and waits for the welcome.
    async fn login(&self, conn: &quinn::Connection) -> Result<LoggedIn, Outcome> {
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return Err(classify_close(e, "opening the control stream")),
        };
        let mut views = self.monitors.subscribe();
        let statuses = views
            .borrow_and_update()
            .iter()
            .map(|v| v.status())
            .collect();
        let mut session = AgentSession::new(self.config.name.clone(), statuses);
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
            Ok(Err(e)) => return Err(Outcome::Failed(format!("waiting for welcome: {e}"))),
            Err(_) => return Err(Outcome::Failed("no welcome from the edge in time".into())),
        };
        match session.handle_frame(first) {
            Ok(AgentEvent::Established(w)) => {
                info!(session = w.session, "connected to edge");
                self.status
                    .send_replace(AgentStatus::Connected { session: w.session });
                Ok(LoggedIn {
                    send,
                    recv,
                    session,
                    views,
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

    /// Runs a session the edge welcomed: forwards the edge's streams,
    /// reports service states and takes wake requests until it ends.
    async fn serve(
        &self,
        conn: &quinn::Connection,
        login: LoggedIn,
        shutdown: &CancellationToken,
    ) -> Outcome {
        let LoggedIn {
            mut send,
            mut recv,
            mut session,
            mut views,
        } = login;

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
                if let Err(e) =
                    write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit())).await
                {
                    return Outcome::Lost(format!("sending service states: {e}"));
                }
            }
            tokio::select! {
                stream = conn.accept_bi() => match stream {
                    Ok((s, r)) => {
                        let (slot, raise) = allowance.accepted();
                        if let Some(limit) = raise {
                            conn.set_max_concurrent_bi_streams(VarInt::from_u32(limit));
                            debug!(limit, "raised the edge's stream allowance");
                        }
                        let (services, monitors) = (self.services.clone(), self.monitors.clone());
                        // The stream's future is made inside the task: a
                        // future moved in would take its size twice over
                        // (4.4 KiB more per held WebSocket).
                        tokio::spawn(
                            async move {
                                let _slot = slot;
                                handle_stream(s, r, services, monitors).await
                            }
                            .in_current_span(),
                        );
                    }
                    Err(e) => return classify_close(e, "session"),
                },
                changed = views.changed(), if views_open => match changed {
                    Ok(()) => states_changed = true,
                    // The monitor task stopped: the agent is shutting down.
                    Err(_) => views_open = false,
                },
                frame = recv.next::<EdgeToAgent>() => match frame {
                    Ok(Some(f)) => match session.handle_frame(f) {
                        Ok(AgentEvent::EdgeGoingAway(g)) => return Outcome::GoingAway(g.reconnect_after),
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
}

/// Turns a connection error into an outcome: the edge's close code says
/// whether to come back at once, back off, or stop hammering.
fn classify_close(e: quinn::ConnectionError, during: &str) -> Outcome {
    match &e {
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code::GOING_AWAY => {
            Outcome::GoingAway(Duration::ZERO)
        }
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code::REPLACED => {
            Outcome::Replaced
        }
        quinn::ConnectionError::ApplicationClosed(c) if c.error_code == code::REFUSED => {
            Outcome::Refused(String::from_utf8_lossy(&c.reason).into_owned())
        }
        quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::TransportError(_)
        | quinn::ConnectionError::VersionMismatch => Outcome::Failed(format!("{during}: {e}")),
        _ => Outcome::Lost(format!("{during}: {e}")),
    }
}
