//! Which agents are connected now, and waiting briefly for one that is
//! expected back (just after an edge restart or an agent's reconnect); what
//! each agent says about its services, and the wake history of each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use burrow_proto::identity::Fingerprint;
use burrow_proto::link::{Connection, Transport};
use burrow_proto::listener::ClientKey;
use burrow_proto::{LinkReport, Name, ServiceState, ServiceStatus, WakeMethod};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info};

/// How long a request for an agent that is not connected waits for it,
/// from the request's arrival (`[edge] agent_wait`). Agents retry within a
/// few seconds, so an edge restart or a router redial is bridged instead of
/// failing.
pub const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(10);
/// After a wake request is sent for a service, more requests within this
/// time send nothing (the agent deduplicates too; this spares the wire).
pub const WAKE_REQUEST_REPEAT: Duration = Duration::from_secs(2);
/// Control frames queued for one agent session at most.
pub const CONTROL_QUEUE: usize = 64;

/// What the edge asks of an agent on its control stream after the welcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Wake(Name),
}

/// One live agent session.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub name: Name,
    /// The key the agent authenticated with.
    pub key: Fingerprint,
    pub session: u64,
    /// The agent process's random id (see [`burrow_proto::frame::Hello`]).
    pub instance: u64,
    pub conn: Connection,
    /// When the session was welcomed.
    pub since: SystemTime,
    /// Why the agent is on this transport, its last QUIC probe, and when
    /// a probe was last reported.
    report: Arc<Mutex<(LinkReport, Option<SystemTime>)>>,
    /// Idle HTTP connections to this session's services.
    pub pool: Arc<crate::http::pool::Pool>,
    services: Arc<Mutex<Vec<ServiceStatus>>>,
    control: mpsc::Sender<Control>,
}

impl AgentLink {
    /// A link and the receiving end of its control queue, which the
    /// session's driver drains onto the control stream.
    pub fn new(
        name: Name,
        key: Fingerprint,
        (session, instance): (u64, u64),
        conn: Connection,
    ) -> (Self, mpsc::Receiver<Control>) {
        let (control, rx) = mpsc::channel(CONTROL_QUEUE);
        (
            Self {
                name,
                key,
                session,
                instance,
                conn,
                since: SystemTime::now(),
                report: Arc::default(),
                pool: Arc::default(),
                services: Arc::default(),
                control,
            },
            rx,
        )
    }

    pub fn set_services(&self, list: Vec<ServiceStatus>) {
        // A service that went down or to sleep (or away) leaves its idle
        // connections behind: a sleeping machine would never answer them.
        self.pool.retain_services(|name| {
            list.iter().any(|s| {
                &s.name == name && matches!(s.state, ServiceState::Up | ServiceState::Unknown)
            })
        });
        *self.services.lock().expect("services lock not poisoned") = list;
    }

    pub fn transport(&self) -> Transport {
        self.conn.transport()
    }

    pub fn set_report(&self, report: LinkReport) {
        let mut r = self.report.lock().expect("report lock not poisoned");
        if !report.probe.is_empty() && report.probe != r.0.probe {
            r.1 = Some(SystemTime::now());
        }
        r.0 = report;
    }

    /// What the agent last said about its transport.
    pub fn report(&self) -> LinkReport {
        self.report
            .lock()
            .expect("report lock not poisoned")
            .0
            .clone()
    }

    /// When the agent last reported a QUIC probe (it sends the report
    /// right after the probe).
    pub fn last_probe_at(&self) -> Option<SystemTime> {
        self.report.lock().expect("report lock not poisoned").1
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        self.services
            .lock()
            .expect("services lock not poisoned")
            .clone()
    }
}

/// A finished wake, as the edge saw it: from the agent reporting
/// "waking" to it reporting "up".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeRecord {
    pub started: SystemTime,
    pub took: Duration,
}

/// One service of one agent, for status pages and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceReport {
    pub agent: Name,
    pub service: Name,
    /// The last state the agent reported (it may be offline now).
    pub state: ServiceState,
    pub wake: WakeMethod,
    /// Set while the service is waking.
    pub waking_since: Option<SystemTime>,
    pub last_wake: Option<WakeRecord>,
    /// Wake requests this edge sent to the agent for the service.
    pub wake_requests: u64,
    /// Requests held now, waiting for the service to be ready.
    pub held: usize,
}

/// Whether a wake request went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeSent {
    Sent,
    /// The service is waking already.
    AlreadyWaking,
    /// One went out less than [`WAKE_REQUEST_REPEAT`] ago.
    Recent,
    /// The service cannot be woken.
    NotWakeable,
    /// The agent is not connected, or does not have the service.
    Unavailable,
}

#[derive(Debug)]
struct ServiceRecord {
    status: ServiceStatus,
    waking_since: Option<(Instant, SystemTime)>,
    last_wake: Option<WakeRecord>,
    wake_requests: u64,
    last_request: Option<Instant>,
    /// Held requests take turns in arrival order (tokio's mutex is fair).
    queue: Arc<tokio::sync::Mutex<()>>,
    held: usize,
}

impl ServiceRecord {
    fn report(&self, agent: &Name) -> ServiceReport {
        ServiceReport {
            agent: agent.clone(),
            service: self.status.name.clone(),
            state: self.status.state,
            wake: self.status.wake,
            waking_since: self.waking_since.map(|(_, t)| t),
            last_wake: self.last_wake,
            wake_requests: self.wake_requests,
            held: self.held,
        }
    }
}

#[derive(Debug)]
struct Inner {
    links: HashMap<Name, AgentLink>,
    /// When each known agent was last seen going offline (or the edge started).
    offline_since: HashMap<Name, Instant>,
    /// By agent, then service; kept across sessions for the history.
    services: HashMap<Name, HashMap<Name, ServiceRecord>>,
    /// Requests held now, by client address (IPv6 per /64), all services
    /// together; entries go at zero.
    held_by_client: HashMap<ClientKey, usize>,
}

/// Counts one request in [`Registry::waiting`] while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The connected agents, by name.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    /// `[edge] agent_wait`, in milliseconds (set again on reload).
    agent_wait_ms: std::sync::atomic::AtomicU64,
    /// Requests waiting now for an agent that is away.
    waiting: std::sync::atomic::AtomicUsize,
}

impl Registry {
    pub fn new(expected: impl IntoIterator<Item = Name>) -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                links: HashMap::new(),
                offline_since: expected.into_iter().map(|n| (n, now)).collect(),
                services: HashMap::new(),
                held_by_client: HashMap::new(),
            }),
            changed: watch::channel(0).0,
            agent_wait_ms: std::sync::atomic::AtomicU64::new(
                u64::try_from(DEFAULT_AGENT_WAIT.as_millis()).unwrap_or(u64::MAX),
            ),
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How long a request waits for its agent when the agent is away.
    pub fn set_agent_wait(&self, wait: Duration) {
        let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.agent_wait_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn agent_wait(&self) -> Duration {
        Duration::from_millis(
            self.agent_wait_ms
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry lock not poisoned")
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Sets the agents expected to connect (config reload): new names get a
    /// fresh grace period, removed ones are forgotten.
    pub fn expect(&self, names: impl IntoIterator<Item = Name>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let names: Vec<Name> = names.into_iter().collect();
        inner.offline_since.retain(|n, _| names.contains(n));
        for n in names {
            if !inner.links.contains_key(&n) {
                inner.offline_since.entry(n).or_insert(now);
            }
        }
    }

    /// Registers a session; returns the one it replaces, if any.
    pub fn insert(&self, link: AgentLink) -> Option<AgentLink> {
        let old = {
            let mut inner = self.lock();
            inner.offline_since.remove(&link.name);
            inner.links.insert(link.name.clone(), link)
        };
        self.bump();
        old
    }

    /// Removes the agent's session if it is still `session` (a replaced
    /// session must not remove its successor).
    pub fn remove(&self, name: &Name, session: u64) {
        let removed = {
            let mut inner = self.lock();
            if inner.links.get(name).is_some_and(|l| l.session == session) {
                inner.links.remove(name);
                inner.offline_since.insert(name.clone(), Instant::now());
                true
            } else {
                false
            }
        };
        if removed {
            self.bump();
        }
    }

    pub fn get(&self, name: &Name) -> Option<AgentLink> {
        self.lock().links.get(name).cloned()
    }

    pub fn connected(&self) -> Vec<AgentLink> {
        self.lock().links.values().cloned().collect()
    }

    /// The agent's session; when the agent is away, waits up to
    /// `agent_wait` from now for it to come back. `None` for an agent the
    /// config does not list, or one still away at the deadline.
    pub async fn wait_for(&self, name: &Name) -> Option<AgentLink> {
        let mut changes = self.changed.subscribe();
        let deadline = {
            let inner = self.lock();
            if let Some(link) = inner.links.get(name) {
                return Some(link.clone());
            }
            inner.offline_since.contains_key(name).then_some(())?;
            Instant::now() + self.agent_wait()
        };
        self.waiting
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _waiting = Waiting(&self.waiting);
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    if let Some(link) = self.get(name) {
                        return Some(link);
                    }
                }
                // Deadline passed, or the registry is gone.
                _ => return None,
            }
        }
    }

    /// Requests waiting now for an agent that is away (for `/metrics`).
    pub fn waiting(&self) -> usize {
        self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver that changes whenever an agent connects or leaves, or a
    /// service's state changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Takes in the service list an agent's session reported.
    pub fn set_services(&self, link: &AgentLink, list: Vec<ServiceStatus>) {
        link.set_services(list.clone());
        {
            let mut inner = self.lock();
            if inner
                .links
                .get(&link.name)
                .is_none_or(|l| l.session != link.session)
            {
                // A replaced session's last words.
                return;
            }
            let records = inner.services.entry(link.name.clone()).or_default();
            let now = Instant::now();
            for status in list {
                let record = records
                    .entry(status.name.clone())
                    .or_insert_with(|| ServiceRecord {
                        status: status.clone(),
                        waking_since: None,
                        last_wake: None,
                        wake_requests: 0,
                        last_request: None,
                        queue: Arc::default(),
                        held: 0,
                    });
                let before = record.status.state;
                match (before, status.state) {
                    (_, ServiceState::Waking) => {
                        if record.waking_since.is_none() {
                            record.waking_since = Some((now, SystemTime::now()));
                        }
                    }
                    (_, ServiceState::Up) => {
                        if let Some((at, started)) = record.waking_since.take() {
                            let took = now.saturating_duration_since(at);
                            info!(agent = %link.name, service = %status.name, took_ms = took.as_millis() as u64, "service woke");
                            record.last_wake = Some(WakeRecord { started, took });
                        }
                    }
                    (_, ServiceState::Down | ServiceState::Unknown) => {
                        if record.waking_since.take().is_some() {
                            info!(agent = %link.name, service = %status.name, "service did not wake");
                        }
                    }
                }
                if before != status.state {
                    debug!(agent = %link.name, service = %status.name, state = %status.state, "service state");
                }
                record.status = status;
            }
        }
        self.bump();
    }

    /// What the connected agent last said about `service`; `None` when the
    /// agent is offline or does not list it.
    pub fn service(&self, agent: &Name, service: &Name) -> Option<ServiceStatus> {
        let inner = self.lock();
        inner.links.get(agent)?;
        Some(inner.services.get(agent)?.get(service)?.status.clone())
    }

    /// Every service of every agent seen since the edge started.
    pub fn service_reports(&self) -> Vec<ServiceReport> {
        let inner = self.lock();
        let mut out: Vec<ServiceReport> = inner
            .services
            .iter()
            .flat_map(|(agent, records)| records.values().map(|r| r.report(agent)))
            .collect();
        out.sort_by(|a, b| (&a.agent, &a.service).cmp(&(&b.agent, &b.service)));
        out
    }

    /// One service's report, if its agent ever listed it.
    pub fn service_report(&self, agent: &Name, service: &Name) -> Option<ServiceReport> {
        let inner = self.lock();
        Some(inner.services.get(agent)?.get(service)?.report(agent))
    }

    /// Asks the agent to wake `service`, unless it is waking already or was
    /// asked less than [`WAKE_REQUEST_REPEAT`] ago.
    pub fn request_wake(&self, agent: &Name, service: &Name) -> WakeSent {
        let mut inner = self.lock();
        let Some(link) = inner.links.get(agent).cloned() else {
            return WakeSent::Unavailable;
        };
        let Some(record) = inner
            .services
            .get_mut(agent)
            .and_then(|r| r.get_mut(service))
        else {
            return WakeSent::Unavailable;
        };
        if record.status.wake == WakeMethod::NotConfigured {
            return WakeSent::NotWakeable;
        }
        if record.status.state == ServiceState::Waking {
            return WakeSent::AlreadyWaking;
        }
        let now = Instant::now();
        if record
            .last_request
            .is_some_and(|at| now.saturating_duration_since(at) < WAKE_REQUEST_REPEAT)
        {
            return WakeSent::Recent;
        }
        if link
            .control
            .try_send(Control::Wake(service.clone()))
            .is_err()
        {
            // The queue is full or the session is ending; a later request retries.
            return WakeSent::Unavailable;
        }
        record.last_request = Some(now);
        record.wake_requests += 1;
        info!(%agent, %service, "asked agent to wake service");
        WakeSent::Sent
    }

    /// The queue held requests for `service` take turns in.
    pub fn wake_queue(&self, agent: &Name, service: &Name) -> Option<Arc<tokio::sync::Mutex<()>>> {
        let inner = self.lock();
        Some(inner.services.get(agent)?.get(service)?.queue.clone())
    }

    /// Counts a request from `client` as held until the guard is dropped,
    /// unless the service or the client has as many held as `caps` allow.
    pub fn try_hold(
        self: &Arc<Self>,
        agent: &Name,
        service: &Name,
        client: ClientKey,
        caps: HoldCaps,
    ) -> Result<HeldGuard, HoldRefused> {
        {
            let mut inner = self.lock();
            let by_client = inner.held_by_client.get(&client).copied().unwrap_or(0);
            let Some(r) = inner
                .services
                .get_mut(agent)
                .and_then(|r| r.get_mut(service))
            else {
                return Err(HoldRefused::Unknown);
            };
            if r.held >= caps.per_service {
                return Err(HoldRefused::Service);
            }
            if by_client >= caps.per_client {
                return Err(HoldRefused::Client);
            }
            r.held += 1;
            *inner.held_by_client.entry(client).or_default() += 1;
        }
        self.bump();
        Ok(HeldGuard {
            registry: self.clone(),
            agent: agent.clone(),
            service: service.clone(),
            client,
        })
    }

    fn release_held(&self, agent: &Name, service: &Name, client: ClientKey) {
        {
            let mut inner = self.lock();
            if let Some(r) = inner
                .services
                .get_mut(agent)
                .and_then(|r| r.get_mut(service))
            {
                r.held = r.held.saturating_sub(1);
            }
            if let Some(n) = inner.held_by_client.get_mut(&client) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    inner.held_by_client.remove(&client);
                }
            }
        }
        self.bump();
    }
}

/// How many requests may be held while a service wakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldCaps {
    /// All clients together, per service.
    pub per_service: usize,
    /// Per client address (IPv6 per /64), all services together.
    pub per_client: usize,
}

/// Why a request could not be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldRefused {
    /// The service has `per_service` held already.
    Service,
    /// The client has `per_client` held already.
    Client,
    /// The agent does not list the service (any more).
    Unknown,
}

/// A request counted in [`ServiceReport::held`].
#[derive(Debug)]
pub struct HeldGuard {
    registry: Arc<Registry>,
    agent: Name,
    service: Name,
    client: ClientKey,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.registry
            .release_held(&self.agent, &self.service, self.client);
    }
}
