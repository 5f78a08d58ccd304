//! Simulated agents, all in this process: each dials the edge over QUIC
//! from its own UDP socket with its own key, logs in on the control stream
//! exactly as `burrow agent` does (burrow_proto's session and frames),
//! and answers every forwarded stream itself: it reads the stream header
//! and the HTTP/1.1 request head, replies with a response head that opens
//! an event stream, and holds the stream until the edge ends it. No
//! service behind it, so 100,000 streams cost no sockets. When its session
//! ends it reconnects as the real agent does: at once (then every
//! [`RESTART_RETRY`]) after the edge said it is going away, else with the
//! agent's own [`Backoff`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burrow_agent::backoff::Backoff;
use burrow_agent::forward::STREAM_HEADER_TIMEOUT;
use burrow_agent::tunnel::{CONNECT_TIMEOUT, RESTART_RETRY, RESTART_WINDOW, WELCOME_TIMEOUT};
use burrow_proto::framed::{FramedRecv, write_frames};
use burrow_proto::identity::{Fingerprint, Identity, PinnedServerVerifier};
use burrow_proto::link::{self, Connection, LinkError};
use burrow_proto::quic::{self, ALPN, IDENTITY_SNI, Role, code};
use burrow_proto::{
    AgentEvent, AgentSession, EdgeToAgent, Name, ServiceState, ServiceStatus, StreamOpen,
    StreamReply, StreamStatus, Upstream, WakeMethod,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Error;

/// The one service each simulated agent lists.
pub const SERVICE: &str = "app";
/// The longest request head a simulated service reads.
const MAX_REQUEST_HEAD: usize = 16 * 1024;
/// What every forwarded request gets: an event stream that never sends an
/// event, as a chat client waiting for its first token would see.
const RESPONSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n";

/// What the whole fleet is doing, shared by every agent task; waiters are
/// woken on every change.
#[derive(Debug, Default)]
pub struct Census {
    /// Agents with a welcomed session now.
    connected: AtomicUsize,
    /// Forwarded streams answered and still open.
    held: AtomicUsize,
    /// Forwarded streams that failed before they were held.
    stream_errors: AtomicU64,
    /// Sessions that ended, and attempts that failed, since the start.
    sessions_lost: AtomicU64,
    attempts_failed: AtomicU64,
    /// Bumped by [`Census::new_epoch`]; an agent's first welcome in an
    /// epoch is an arrival.
    epoch: AtomicU64,
    arrivals: Mutex<Vec<Instant>>,
    /// Why sessions ended, with a count, since [`Census::take_endings`].
    endings: Mutex<BTreeMap<String, u64>>,
    /// The first thing that makes the run pointless (an agent refused).
    fatal: Mutex<Option<String>>,
    first_stream_error: Mutex<Option<String>>,
    changed: Notify,
}

/// Counts a welcomed session as connected while it lives.
struct Connected<'a>(&'a Census);

impl Drop for Connected<'_> {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

/// Counts a stream as held while it lives.
struct Held<'a>(&'a Census);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Relaxed);
        self.0.changed.notify_waiters();
    }
}

impl Census {
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn stream_errors(&self) -> u64 {
        self.stream_errors.load(Ordering::Relaxed)
    }

    pub fn first_stream_error(&self) -> Option<String> {
        lock(&self.first_stream_error).clone()
    }

    pub fn sessions_lost(&self) -> u64 {
        self.sessions_lost.load(Ordering::Relaxed)
    }

    pub fn attempts_failed(&self) -> u64 {
        self.attempts_failed.load(Ordering::Relaxed)
    }

    /// Starts counting arrivals afresh: each agent's next welcome is one.
    pub fn new_epoch(&self) {
        let mut arrivals = lock(&self.arrivals);
        arrivals.clear();
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Welcome times of the agents that arrived in this epoch, in order.
    pub fn arrivals(&self) -> Vec<Instant> {
        lock(&self.arrivals).clone()
    }

    /// Why sessions ended since the last call, with a count each.
    pub fn take_endings(&self) -> BTreeMap<String, u64> {
        std::mem::take(&mut *lock(&self.endings))
    }

    fn session_ended(&self, why: String) {
        *lock(&self.endings).entry(why).or_default() += 1;
    }

    /// Waits until `done` holds, an agent hit a fatal error, or `timeout`.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(why) = lock(&self.fatal).clone() {
                return Err(why.into());
            }
            if done(self) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(format!(
                    "{what}: not done within {timeout:?} ({} agents connected, {} streams held)",
                    self.connected(),
                    self.held()
                )
                .into());
            }
        }
    }

    fn welcomed(&self, epoch_seen: &AtomicU64) -> Connected<'_> {
        self.connected.fetch_add(1, Ordering::Relaxed);
        {
            let mut arrivals = lock(&self.arrivals);
            let epoch = self.epoch.load(Ordering::Acquire);
            if epoch_seen.swap(epoch, Ordering::AcqRel) != epoch {
                arrivals.push(Instant::now());
            }
        }
        self.changed.notify_waiters();
        Connected(self)
    }

    fn hold(&self) -> Held<'_> {
        self.held.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_waiters();
        Held(self)
    }

    fn stream_failed(&self, why: String) {
        self.stream_errors.fetch_add(1, Ordering::Relaxed);
        lock(&self.first_stream_error).get_or_insert(why);
    }

    fn fail(&self, why: String) {
        lock(&self.fatal).get_or_insert(why);
        self.changed.notify_waiters();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One simulated agent's fixed parts.
pub struct SimAgent {
    name: Name,
    client: quinn::ClientConfig,
    /// Random per agent, the same in every session (the real agent's
    /// process instance).
    instance: u64,
    /// The census epoch of this agent's last welcome.
    epoch_seen: AtomicU64,
}

impl SimAgent {
    /// An agent named `name` with `identity`, pinning the edge's key.
    pub fn new(name: &str, identity: &Identity, edge: Fingerprint) -> Result<Self, Error> {
        let mut tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(quic::crypto_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier::new(edge)))
                .with_client_auth_cert(vec![identity.cert()], identity.private_key())?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| format!("QUIC client config: {e}"))?;
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(quic::transport_config(Role::Agent)));
        Ok(Self {
            name: Name::new(name)?,
            client,
            instance: rand::random(),
            epoch_seen: AtomicU64::new(0),
        })
    }

    /// Keeps a session with the edge at `edge` until `stop`.
    pub async fn run(
        self: Arc<Self>,
        endpoint: quinn::Endpoint,
        edge: SocketAddr,
        census: Arc<Census>,
        stop: CancellationToken,
    ) {
        let mut backoff = Backoff::new();
        let mut restarting_until: Option<Instant> = None;
        loop {
            let (outcome, lasted) = self.session(&endpoint, edge, &census, &stop).await;
            if let Some(lasted) = lasted {
                backoff.session_ended(lasted);
                restarting_until = None;
                census.sessions_lost.fetch_add(1, Ordering::Relaxed);
            }
            let delay = match outcome {
                Outcome::Stopped => return,
                Outcome::Refused(why) => {
                    census.fail(format!("the edge refused agent {}: {why}", self.name));
                    return;
                }
                Outcome::GoingAway => {
                    backoff.reset();
                    restarting_until = Some(Instant::now() + RESTART_WINDOW);
                    Duration::ZERO
                }
                Outcome::Lost => backoff.next_delay(rand::random()),
                Outcome::Failed => {
                    census.attempts_failed.fetch_add(1, Ordering::Relaxed);
                    match restarting_until {
                        Some(t) if Instant::now() < t => {
                            RESTART_RETRY / 2 + (RESTART_RETRY / 2).mul_f64(rand::random())
                        }
                        _ => backoff.next_delay(rand::random()),
                    }
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stop.cancelled() => return,
            }
        }
    }

    /// One attempt and, if welcomed, the session; how long it lasted.
    async fn session(
        &self,
        endpoint: &quinn::Endpoint,
        edge: SocketAddr,
        census: &Arc<Census>,
        stop: &CancellationToken,
    ) -> (Outcome, Option<Duration>) {
        let (conn, send, recv) = tokio::select! {
            r = self.login(endpoint, edge) => match r {
                Ok(s) => s,
                Err(o) => return (o, None),
            },
            () = stop.cancelled() => return (Outcome::Stopped, None),
        };
        let started = Instant::now();
        let _connected = census.welcomed(&self.epoch_seen);
        let outcome = serve(&conn, send, recv, census, stop).await;
        (outcome, Some(started.elapsed()))
    }

    /// Dials, opens the control stream, says hello, waits for the welcome.
    async fn login(
        &self,
        endpoint: &quinn::Endpoint,
        edge: SocketAddr,
    ) -> Result<(Connection, link::SendStream, FramedRecv), Outcome> {
        let connecting = endpoint
            .connect_with(self.client.clone(), edge, IDENTITY_SNI)
            .map_err(|_| Outcome::Failed)?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => Connection::Quic(c),
            Ok(Err(e)) => return Err(classify(e.into(), Outcome::Failed)),
            Err(_) => return Err(Outcome::Failed),
        };
        let (mut send, recv) = tokio::time::timeout(WELCOME_TIMEOUT, conn.open_control())
            .await
            .map_err(|_| Outcome::Failed)?
            .map_err(|e| classify(e, Outcome::Failed))?;
        let services = vec![ServiceStatus {
            name: Name::new(SERVICE).map_err(|_| Outcome::Failed)?,
            state: ServiceState::Up,
            wake: WakeMethod::NotConfigured,
            upstream: Upstream::Http1,
        }];
        let mut session = AgentSession::new(self.name.clone(), self.instance, services);
        write_frames(&mut send, std::iter::from_fn(|| session.poll_transmit()))
            .await
            .map_err(|_| Outcome::Failed)?;
        let mut recv = FramedRecv::new(recv);
        let first = tokio::time::timeout(WELCOME_TIMEOUT, recv.next::<EdgeToAgent>())
            .await
            .map_err(|_| Outcome::Failed)?;
        let first = match first {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => {
                return Err(conn
                    .close_reason()
                    .map_or(Outcome::Failed, |e| classify(e, Outcome::Failed)));
            }
        };
        match session.handle_frame(first) {
            Ok(AgentEvent::Established(_)) => Ok((conn, send, recv)),
            Ok(AgentEvent::Refused(r)) => Err(Outcome::Refused(r.message)),
            Ok(_) | Err(_) => {
                conn.close(code::PROTOCOL, b"protocol error");
                Err(Outcome::Failed)
            }
        }
    }
}

/// How an attempt or a session ended, as the real agent tells them apart.
#[derive(Debug)]
enum Outcome {
    Stopped,
    /// The edge said it is going away (a restart): come back at once.
    GoingAway,
    /// The session was up, then lost.
    Lost,
    /// The attempt failed before a session existed.
    Failed,
    Refused(String),
}

/// The edge's close code says what to do next; otherwise `otherwise`.
fn classify(e: LinkError, otherwise: Outcome) -> Outcome {
    match e {
        LinkError::ClosedByPeer { code: c, .. } if c == code::GOING_AWAY => Outcome::GoingAway,
        LinkError::ClosedByPeer { code: c, reason } if c == code::REFUSED => {
            Outcome::Refused(reason)
        }
        _ => otherwise,
    }
}

/// A session's end in a few words, for the census.
fn ending(e: &LinkError) -> String {
    match e {
        LinkError::ClosedByPeer { code, .. } => format!("closed by the edge (code {code})"),
        other => other.to_string(),
    }
}

/// Serves a welcomed session: answers the edge's streams until the
/// session ends or the edge says it is going away. Streams already open
/// keep running in their own tasks.
async fn serve(
    conn: &Connection,
    mut send: link::SendStream,
    mut recv: FramedRecv,
    census: &Arc<Census>,
    stop: &CancellationToken,
) -> Outcome {
    let mut allowance = quic::StreamAllowance::default();
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((s, r)) => spawn_stream(conn, &mut allowance, s, r, census),
                Err(e) => {
                    census.session_ended(ending(&e));
                    return classify(e, Outcome::Lost);
                }
            },
            frame = recv.next::<EdgeToAgent>() => match frame {
                Ok(Some(EdgeToAgent::GoingAway(_))) => {
                    census.session_ended("the edge said it is going away".into());
                    // Streams the edge still opens while it drains are
                    // answered by a session left to run out on its own.
                    tokio::spawn(drain(conn.clone(), census.clone()));
                    return Outcome::GoingAway;
                }
                // Wake requests: nothing to wake here.
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    let Some(e) = conn.close_reason() else {
                        census.session_ended("the control stream ended".into());
                        return Outcome::Lost;
                    };
                    census.session_ended(ending(&e));
                    return classify(e, Outcome::Lost);
                }
            },
            () = stop.cancelled() => {
                let _ = send.finish();
                conn.close(code::OK, b"agent stopping");
                return Outcome::Stopped;
            }
        }
    }
}

/// Streams of a session the edge is leaving: answered until it closes.
async fn drain(conn: Connection, census: Arc<Census>) {
    let mut allowance = quic::StreamAllowance::default();
    while let Ok((s, r)) = conn.accept_bi().await {
        spawn_stream(&conn, &mut allowance, s, r, &census);
    }
}

/// Serves one forwarded stream in its own task, counted in `allowance`.
fn spawn_stream(
    conn: &Connection,
    allowance: &mut quic::StreamAllowance,
    send: link::SendStream,
    recv: link::RecvStream,
    census: &Arc<Census>,
) {
    let (slot, raise) = allowance.accepted();
    if let Some(limit) = raise {
        conn.set_max_concurrent_bi_streams(limit);
    }
    let census = census.clone();
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(why) = answer(send, recv, &census).await {
            census.stream_failed(why);
        }
    });
}

/// Reads the stream header and request head, answers with an event
/// stream's head, and holds the stream until the edge ends it.
async fn answer(
    mut send: link::SendStream,
    recv: link::RecvStream,
    census: &Census,
) -> Result<(), String> {
    let mut framed = FramedRecv::new(recv);
    let open = tokio::time::timeout(STREAM_HEADER_TIMEOUT, framed.next::<StreamOpen>())
        .await
        .map_err(|_| "no stream header in time".to_owned())?
        .map_err(|e| format!("stream header: {e}"))?
        .ok_or("stream ended before its header")?;
    let reply = StreamReply {
        status: if open.service.as_str() == SERVICE {
            StreamStatus::Connected
        } else {
            StreamStatus::UnknownService
        },
        message: String::new(),
    };
    write_frames(&mut send, [reply])
        .await
        .map_err(|e| format!("stream reply: {e}"))?;
    let (mut recv, initial) = framed.into_parts();
    read_request_head(&mut recv, &initial).await?;
    send.write_all(RESPONSE_HEAD)
        .await
        .map_err(|e| format!("response head: {e}"))?;
    let _held = census.hold();
    // The request has no body: whatever comes next is the end.
    let mut rest = [0u8; 256];
    while let Ok(n) = recv.read(&mut rest).await {
        if n == 0 {
            break;
        }
    }
    Ok(())
}

/// Reads until the end of an HTTP/1.1 request head (`\r\n\r\n`).
async fn read_request_head(recv: &mut link::RecvStream, initial: &[u8]) -> Result<(), String> {
    let mut head = initial.to_vec();
    let mut chunk = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return Err("request head too long".into());
        }
        match recv.read(&mut chunk).await {
            Ok(0) => return Err("stream ended inside the request head".into()),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("request head: {e}")),
        }
    }
    Ok(())
}

/// A fleet of simulated agents, each with its own key and UDP socket.
pub struct Fleet {
    agents: Vec<(Arc<SimAgent>, quinn::Endpoint)>,
    pub census: Arc<Census>,
    stop: CancellationToken,
}

impl Fleet {
    /// `identities[i]` is agent `names[i]`'s key; all pin `edge`'s key.
    pub fn new(
        names: &[String],
        identities: &[Identity],
        edge: Fingerprint,
    ) -> Result<Self, Error> {
        let census = Arc::new(Census::default());
        census.new_epoch();
        let mut agents = Vec::with_capacity(names.len());
        for (name, identity) in names.iter().zip(identities) {
            let agent = Arc::new(SimAgent::new(name, identity, edge)?);
            let (socket, _) = quic::bind_udp(SocketAddr::from(([127, 0, 0, 1], 0)))?;
            let endpoint = quic::endpoint(socket, None, identity.endpoint_keys())?;
            agents.push((agent, endpoint));
        }
        Ok(Self {
            agents,
            census,
            stop: CancellationToken::new(),
        })
    }

    /// Starts every agent dialling `edge` at once.
    pub fn start(&self, edge: SocketAddr) {
        for (agent, endpoint) in &self.agents {
            tokio::spawn(agent.clone().run(
                endpoint.clone(),
                edge,
                self.census.clone(),
                self.stop.clone(),
            ));
        }
    }

    pub fn len(&self) -> usize {
        self.agents.len()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
