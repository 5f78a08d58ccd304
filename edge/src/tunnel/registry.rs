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

use super::wake_line::{Event, TicketId, Verdict, WakeLine};
pub use super::wake_line::{FAILED_RETRY_PAUSE, WAKE_REQUEST_REPEAT, WakeRecord, WakeSent};

/// How long a request for an agent that is not connected waits for it,
/// from the request's arrival (`[edge] agent_wait`). Agents retry within a
/// few seconds, so an edge restart or a router redial is bridged instead of
/// failing.
pub const DEFAULT_AGENT_WAIT: Duration = Duration::from_secs(10);
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

#[derive(Debug)]
struct ServiceRecord {
    status: ServiceStatus,
    /// The sans-IO wake core: state, history and the line of held requests.
    line: WakeLine,
}

impl ServiceRecord {
    fn report(&self, agent: &Name) -> ServiceReport {
        ServiceReport {
            agent: agent.clone(),
            service: self.status.name.clone(),
            state: self.line.state(),
            wake: self.line.wake_method(),
            waking_since: self.line.waking_since(),
            last_wake: self.line.last_wake(),
            wake_requests: self.line.wake_requests(),
            held: self.line.held(),
        }
    }

    /// Sends the wake request the line decided on, if any, on `link`'s
    /// control stream; a full queue or an ending session leaves it to the
    /// next asker.
    fn send_due_wake(&mut self, agent: &Name, link: Option<&AgentLink>) -> bool {
        if !self.line.take_wake_due() {
            return false;
        }
        let sent = link.is_some_and(|l| {
            l.control
                .try_send(Control::Wake(self.status.name.clone()))
                .is_ok()
        });
        if sent {
            info!(%agent, service = %self.status.name, "asked agent to wake service");
        } else {
            self.line.wake_unsent();
        }
        sent
    }

    /// Logs what the line saw happen.
    fn log_events(&mut self, agent: &Name) {
        let service = &self.status.name;
        while let Some(event) = self.line.poll_event() {
            match event {
                Event::State(state) => debug!(%agent, %service, %state, "service state"),
                Event::Woke(w) => {
                    info!(%agent, %service, took_ms = w.took.as_millis() as u64, "service woke");
                }
                Event::DidNotWake => info!(%agent, %service, "service did not wake"),
            }
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
            inner.set_online(&link.name, true);
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
                inner.set_online(name, false);
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
            let (now, wall) = (Instant::now(), SystemTime::now());
            for status in list {
                let record = records
                    .entry(status.name.clone())
                    .or_insert_with(|| ServiceRecord {
                        status: status.clone(),
                        line: WakeLine::new(status.state, status.wake),
                    });
                record.line.update(now, wall, status.state, status.wake);
                record.log_events(&link.name);
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

    /// A service the agent can wake that is down or waking, its agent
    /// connected (the line knows: `insert` and `remove` tell it).
    pub fn is_asleep(&self, agent: &Name, service: &Name) -> bool {
        self.lock()
            .services
            .get(agent)
            .and_then(|r| r.get(service))
            .is_some_and(|r| r.line.is_asleep())
    }

    /// Asks the agent to wake `service`, unless it is waking already or was
    /// asked less than [`WAKE_REQUEST_REPEAT`] ago.
    pub fn request_wake(&self, agent: &Name, service: &Name) -> WakeSent {
        let mut inner = self.lock();
        let Inner {
            links, services, ..
        } = &mut *inner;
        let Some(link) = links.get(agent) else {
            return WakeSent::Unavailable;
        };
        let Some(record) = services.get_mut(agent).and_then(|r| r.get_mut(service)) else {
            return WakeSent::Unavailable;
        };
        match record.line.request_wake(Instant::now()) {
            WakeSent::Sent if !record.send_due_wake(agent, Some(link)) => WakeSent::Unavailable,
            other => other,
        }
    }

    /// A request from `client` joins the line of requests held until
    /// `service` is ready (or `deadline`), unless the service or the client
    /// has as many held as `caps` allow. `after_failure`: a connect just
    /// failed on a service reported up.
    pub fn join(
        self: &Arc<Self>,
        (agent, service): (&Name, &Name),
        client: ClientKey,
        caps: HoldCaps,
        deadline: Instant,
        after_failure: bool,
    ) -> Result<Ticket, HoldRefused> {
        let id = {
            let mut inner = self.lock();
            let by_client = inner.held_by_client.get(&client).copied().unwrap_or(0);
            let Some(r) = inner
                .services
                .get_mut(agent)
                .and_then(|r| r.get_mut(service))
            else {
                return Err(HoldRefused::Unknown);
            };
            if by_client >= caps.per_client {
                return Err(HoldRefused::Client);
            }
            let id = r
                .line
                .join(Instant::now(), deadline, caps.per_service, after_failure)
                .map_err(|_| HoldRefused::Service)?;
            *inner.held_by_client.entry(client).or_default() += 1;
            id
        };
        self.bump();
        Ok(Ticket {
            registry: self.clone(),
            agent: agent.clone(),
            service: service.clone(),
            client,
            id,
            in_line: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// One look at where held request `id` stands; sends the wake request
    /// the line decides on.
    fn poll_line(&self, agent: &Name, service: &Name, id: TicketId) -> Verdict {
        let mut inner = self.lock();
        let Inner {
            links, services, ..
        } = &mut *inner;
        let Some(record) = services.get_mut(agent).and_then(|r| r.get_mut(service)) else {
            return Verdict::Gone;
        };
        let verdict = record.line.poll(Instant::now(), id);
        record.send_due_wake(agent, links.get(agent));
        verdict
    }

    /// Held request `id` leaves its line (connected, given up or gone).
    fn leave_line(&self, agent: &Name, service: &Name, id: TicketId, client: ClientKey) {
        {
            let mut inner = self.lock();
            if let Some(r) = inner
                .services
                .get_mut(agent)
                .and_then(|r| r.get_mut(service))
            {
                r.line.leave(id);
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

    /// Held request `id` had the turn and could not connect.
    fn line_connect_failed(&self, agent: &Name, service: &Name, id: TicketId) {
        {
            let mut inner = self.lock();
            let Inner {
                links, services, ..
            } = &mut *inner;
            if let Some(record) = services.get_mut(agent).and_then(|r| r.get_mut(service)) {
                record.line.connect_failed(Instant::now(), id);
                record.send_due_wake(agent, links.get(agent));
            }
        }
        self.bump();
    }
}

impl Inner {
    fn set_online(&mut self, agent: &Name, online: bool) {
        if let Some(records) = self.services.get_mut(agent) {
            for r in records.values_mut() {
                r.line.set_online(online);
            }
        }
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

/// The hold ran out before the service was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotReady;

/// A request held in its service's line (counted in
/// [`ServiceReport::held`]) until it is connected or dropped.
#[derive(Debug)]
pub struct Ticket {
    registry: Arc<Registry>,
    agent: Name,
    service: Name,
    client: ClientKey,
    id: TicketId,
    in_line: std::sync::atomic::AtomicBool,
}

impl Ticket {
    /// Waits for this request's turn: the requests before it connected and
    /// the service is worth trying. `Err` when its deadline passes first
    /// (or the edge is stopping).
    pub async fn turn(&self) -> Result<(), NotReady> {
        let mut changes = self.registry.subscribe();
        loop {
            changes.borrow_and_update();
            match self.registry.poll_line(&self.agent, &self.service, self.id) {
                Verdict::Go => return Ok(()),
                Verdict::Wait(until) => {
                    if let Ok(Err(_)) = tokio::time::timeout_at(until, changes.changed()).await {
                        // The registry is gone: the edge is stopping.
                        return Err(NotReady);
                    }
                }
                Verdict::TimedOut | Verdict::Gone => {
                    self.leave();
                    return Err(NotReady);
                }
            }
        }
    }

    /// The request has its connection to the service: the next may go.
    pub fn connected(&self) {
        self.leave();
    }

    /// The request had its turn and could not connect: it keeps its place
    /// and a wake is asked for.
    pub fn connect_failed(&self) {
        if self.in_line.load(std::sync::atomic::Ordering::Relaxed) {
            self.registry
                .line_connect_failed(&self.agent, &self.service, self.id);
        }
    }

    fn leave(&self) {
        if self
            .in_line
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.registry
                .leave_line(&self.agent, &self.service, self.id, self.client);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.leave();
    }
}
