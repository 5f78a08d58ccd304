//! Each service's state (up, down, waking) and wake episodes.
//!
//! [`ServiceMonitor`] is the sans-IO core: it takes probe results, wake
//! requests, failed connects and the time, and returns actions (probe now,
//! send a magic packet now), events and its next deadline. [`MonitorTask`]
//! drives one per service with real probes, packets and timers, and
//! publishes what they know through [`Monitors`], the handle the tunnel,
//! the forwarder and the LAN proxy share.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use burrow_proto::{Name, ServiceState, ServiceStatus, WakeMethod};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::ServiceConfig;
use crate::health::{self, PROBE_TIMEOUT, Readiness};
use crate::wake;

/// How often a waking service is probed: it should be seen ready soon
/// after it is, and a probe is one connect (a machine still off makes it
/// hang up to the connect timeout, which spaces probes out by itself).
pub const PROBE_INTERVAL_WAKING: Duration = Duration::from_millis(250);
/// How often magic packets are resent while waking (one can be lost).
pub const WAKE_RESEND: Duration = Duration::from_millis(1500);
/// How long a wake may take before the agent gives up; the next request
/// starts a new one. Cold boots with a model load take a minute or two.
pub const WAKE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long after a probe starts the monitor stops waiting for its result
/// and arms the next one. A probe ends within [`PROBE_TIMEOUT`]; this is a
/// backstop, so a result that never arrives cannot stop a service's probes.
pub const PROBE_LOST_AFTER: Duration = PROBE_TIMEOUT.saturating_add(Duration::from_secs(2));
/// Commands (wake requests, failed connects) queued for the monitor task
/// at most; beyond it they are dropped, as they repeat anyway.
pub const COMMAND_QUEUE: usize = 256;

/// Names one probe of one [`ServiceMonitor`], so that a result is taken
/// only by the probe it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeId(u64);

/// What the monitor wants done now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run one readiness probe and report it with `handle_probe` and this id.
    Probe(ProbeId),
    /// Send one magic packet.
    SendMagicPacket,
}

/// What happened, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    State(ServiceState),
    WakeStarted,
    Woke {
        took: Duration,
    },
    WakeTimedOut {
        after: Duration,
    },
    /// A probe's result did not come within [`PROBE_LOST_AFTER`]; the next
    /// probe is armed and a late result will be ignored.
    ProbeLost,
}

/// Whether `handle_probe` took a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeReport {
    Taken,
    /// Not the probe in flight (lost, or from before a reset): ignored.
    Stale,
}

/// Where the monitor's probing stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probing {
    /// The next probe is due at this time.
    Due(Instant),
    /// This probe runs; if no result comes by `lost_at`, the next is armed.
    InFlight { id: ProbeId, lost_at: Instant },
}

/// The answer to a wake request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeRequest {
    /// A wake episode started with this request.
    Started,
    /// One is under way; this request joins it.
    AlreadyWaking,
    /// The service was believed up: it is probed at once and woken if the
    /// probe fails.
    ProbingFirst,
    /// The service has no `[service.wake]`.
    NotConfigured,
}

#[derive(Debug, Clone, Copy)]
struct Episode {
    started: Instant,
    next_packet: Instant,
    deadline: Instant,
}

/// One service's readiness and wake state machine, without I/O.
#[derive(Debug)]
pub struct ServiceMonitor {
    wake: WakeMethod,
    interval: Duration,
    state: ServiceState,
    probing: Probing,
    /// The id the next probe gets.
    next_probe_id: u64,
    episode: Option<Episode>,
    /// A wake was asked for while the service looked up: wake if the
    /// probe that checks says otherwise.
    wake_if_down: bool,
    events: VecDeque<Event>,
}

impl ServiceMonitor {
    /// Starts with the state unknown and a probe due at once.
    pub fn new(now: Instant, interval: Duration, wake: WakeMethod) -> Self {
        Self {
            wake,
            interval,
            state: ServiceState::Unknown,
            probing: Probing::Due(now),
            next_probe_id: 0,
            episode: None,
            wake_if_down: false,
            events: VecDeque::new(),
        }
    }

    pub fn state(&self) -> ServiceState {
        self.state
    }

    pub fn wake_method(&self) -> WakeMethod {
        self.wake
    }

    fn set_state(&mut self, state: ServiceState) {
        if self.state != state {
            self.state = state;
            self.events.push_back(Event::State(state));
        }
    }

    /// Brings the next probe forward to `at` unless one is in flight.
    fn probe_by(&mut self, at: Instant) {
        if let Probing::Due(next) = &mut self.probing {
            *next = (*next).min(at);
        }
    }

    fn start_episode(&mut self, now: Instant) {
        self.episode = Some(Episode {
            started: now,
            next_packet: now,
            deadline: now + WAKE_TIMEOUT,
        });
        self.wake_if_down = false;
        self.set_state(ServiceState::Waking);
        self.events.push_back(Event::WakeStarted);
        self.probe_by(now + PROBE_INTERVAL_WAKING);
    }

    /// The result of probe `id`. A result for any other probe than the one
    /// in flight is [`ProbeReport::Stale`] and changes nothing.
    pub fn handle_probe(
        &mut self,
        now: Instant,
        id: ProbeId,
        readiness: &Readiness,
    ) -> ProbeReport {
        if !matches!(self.probing, Probing::InFlight { id: current, .. } if current == id) {
            return ProbeReport::Stale;
        }
        match readiness {
            Readiness::Ready => {
                self.wake_if_down = false;
                if let Some(e) = self.episode.take() {
                    self.events.push_back(Event::Woke {
                        took: now.saturating_duration_since(e.started),
                    });
                }
                self.set_state(ServiceState::Up);
            }
            Readiness::NotReady(_) if self.episode.is_some() => {}
            Readiness::NotReady(_) => {
                self.set_state(ServiceState::Down);
                if std::mem::take(&mut self.wake_if_down) && self.wake == WakeMethod::MagicPacket {
                    self.start_episode(now);
                }
            }
        }
        let interval = if self.episode.is_some() {
            PROBE_INTERVAL_WAKING
        } else {
            self.interval
        };
        self.probing = Probing::Due(now + interval);
        ProbeReport::Taken
    }

    /// Someone who may (an authenticated edge request, a LAN client) wants
    /// the service: wake its machine unless it is up or already waking.
    pub fn handle_wake_request(&mut self, now: Instant) -> WakeRequest {
        if self.wake == WakeMethod::NotConfigured {
            return WakeRequest::NotConfigured;
        }
        if self.episode.is_some() {
            return WakeRequest::AlreadyWaking;
        }
        match self.state {
            ServiceState::Up => {
                self.wake_if_down = true;
                self.probe_by(now);
                WakeRequest::ProbingFirst
            }
            ServiceState::Unknown | ServiceState::Down | ServiceState::Waking => {
                self.start_episode(now);
                WakeRequest::Started
            }
        }
    }

    /// Connecting to the service failed: if it was believed up (or not
    /// known yet), it is down now, and a probe checks at once.
    pub fn handle_connect_failed(&mut self, now: Instant) {
        if matches!(self.state, ServiceState::Up | ServiceState::Unknown) {
            self.set_state(ServiceState::Down);
            self.probe_by(now);
        }
    }

    /// Ends a wake episode whose time is up, and stops waiting for a probe
    /// result that is overdue.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.probing, Probing::InFlight { lost_at, .. } if now >= lost_at) {
            self.probing = Probing::Due(now);
            self.events.push_back(Event::ProbeLost);
        }
        let Some(e) = self.episode else { return };
        if now >= e.deadline {
            self.episode = None;
            self.events.push_back(Event::WakeTimedOut {
                after: now.saturating_duration_since(e.started),
            });
            self.set_state(ServiceState::Down);
            if let Probing::Due(next) = &mut self.probing {
                *next = now + self.interval;
            }
        }
    }

    /// The next thing to do now, if any; call until `None`.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(e) = self.episode.as_mut().filter(|e| now >= e.next_packet) {
            e.next_packet = now + WAKE_RESEND;
            return Some(Action::SendMagicPacket);
        }
        if matches!(self.probing, Probing::Due(at) if now >= at) {
            let id = ProbeId(self.next_probe_id);
            self.next_probe_id += 1;
            self.probing = Probing::InFlight {
                id,
                lost_at: now + PROBE_LOST_AFTER,
            };
            return Some(Action::Probe(id));
        }
        None
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `poll_action` or `handle_timeout` next has something to do.
    /// There always is something: a probe is due, or one in flight can be
    /// given up.
    pub fn poll_timeout(&self) -> Instant {
        let probe = match self.probing {
            Probing::Due(at) => at,
            Probing::InFlight { lost_at, .. } => lost_at,
        };
        let episode = self.episode.map(|e| e.next_packet.min(e.deadline));
        episode.map_or(probe, |e| e.min(probe))
    }
}

/// Who asked for a wake, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A request at the edge that passed access control.
    Edge,
    /// A client of a `[[lan]]` proxy.
    Lan,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Edge => "edge",
            Self::Lan => "lan",
        })
    }
}

/// How a wake episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeOutcome {
    /// The probe passed this long after the first magic packet.
    Woke { took: Duration },
    /// The agent gave up after [`WAKE_TIMEOUT`].
    TimedOut,
}

/// The last wake episode of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastWake {
    pub started: SystemTime,
    /// `None` while it is still under way.
    pub outcome: Option<WakeOutcome>,
}

/// What the agent knows about one service, for the edge and for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceView {
    pub name: Name,
    pub state: ServiceState,
    pub wake: WakeMethod,
    /// What the edge speaks to it.
    pub upstream: burrow_proto::Upstream,
    /// Wake episodes started since the agent started.
    pub wakes: u64,
    pub last_wake: Option<LastWake>,
}

impl ServiceView {
    /// The part the edge is told.
    pub fn status(&self) -> ServiceStatus {
        ServiceStatus {
            name: self.name.clone(),
            state: self.state,
            wake: self.wake,
            upstream: self.upstream,
        }
    }
}

/// What the edge speaks to a service, from its URL's scheme.
pub fn upstream_of(service: &ServiceConfig) -> burrow_proto::Upstream {
    match service.scheme {
        crate::config::Scheme::H2c => burrow_proto::Upstream::H2c,
        crate::config::Scheme::Http | crate::config::Scheme::Tcp => burrow_proto::Upstream::Http1,
    }
}

/// The wake method a service's config gives it.
pub fn wake_method(service: &ServiceConfig) -> WakeMethod {
    if service.wake.is_some() {
        WakeMethod::MagicPacket
    } else {
        WakeMethod::NotConfigured
    }
}

#[derive(Debug)]
enum Command {
    Wake {
        service: Name,
        origin: Origin,
    },
    ConnectFailed {
        service: Name,
    },
    /// A reload changed the services: unchanged ones keep their state.
    Reconfigure(Vec<ServiceConfig>),
}

/// The shared handle: ask for wakes, report failed connects, follow states.
#[derive(Debug, Clone)]
pub struct Monitors {
    commands: mpsc::Sender<Command>,
    views: watch::Receiver<Vec<ServiceView>>,
}

impl Monitors {
    /// The handle and the task that must run for it to do anything.
    pub fn new(services: &[ServiceConfig]) -> (Self, MonitorTask) {
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let views = services
            .iter()
            .map(|s| ServiceView {
                name: s.name.clone(),
                state: ServiceState::Unknown,
                wake: wake_method(s),
                upstream: upstream_of(s),
                wakes: 0,
                last_wake: None,
            })
            .collect();
        let (tx, views) = watch::channel(views);
        (
            Self { commands, views },
            MonitorTask {
                services: services.iter().cloned().map(Arc::new).collect(),
                commands: rx,
                views: tx,
                reasons: vec![None; services.len()],
                keys: (0..services.len() as u64).collect(),
                next_key: services.len() as u64,
            },
        )
    }

    fn send(&self, command: Command) {
        if let Err(e) = self.commands.try_send(command) {
            debug!(error = %e, "monitor command dropped");
        }
    }

    /// Asks for `service`'s machine to be woken (deduplicated by the monitor).
    pub fn wake(&self, service: &Name, origin: Origin) {
        self.send(Command::Wake {
            service: service.clone(),
            origin,
        });
    }

    /// Reports that connecting to `service` failed.
    pub fn connect_failed(&self, service: &Name) {
        self.send(Command::ConnectFailed {
            service: service.clone(),
        });
    }

    /// Replaces the monitored services (config reload). Services whose
    /// config did not change keep their state and schedule.
    pub fn reconfigure(&self, services: Vec<ServiceConfig>) {
        self.send(Command::Reconfigure(services));
    }

    /// Follows every service's view; changes whenever one changes.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ServiceView>> {
        self.views.clone()
    }

    /// The current view of one service.
    pub fn view(&self, service: &Name) -> Option<ServiceView> {
        self.views
            .borrow()
            .iter()
            .find(|v| &v.name == service)
            .cloned()
    }
}

/// One probe's result, on its way from the probe's task to the monitor task.
#[derive(Debug)]
struct ProbeResult {
    /// The key of the monitor that asked for the probe.
    key: u64,
    id: ProbeId,
    readiness: Readiness,
}

/// Drives every service's [`ServiceMonitor`] until shutdown.
#[derive(Debug)]
pub struct MonitorTask {
    services: Vec<Arc<ServiceConfig>>,
    commands: mpsc::Receiver<Command>,
    views: watch::Sender<Vec<ServiceView>>,
    /// Why each service's last probe failed, for the log line saying it is down.
    reasons: Vec<Option<String>>,
    /// Each service's monitor's key: probe results carry it, so a result
    /// finds its monitor wherever a reload moved it, and is dropped if the
    /// monitor is gone (the service was removed or its config changed).
    keys: Vec<u64>,
    /// The key the next new monitor gets.
    next_key: u64,
}

impl MonitorTask {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let start = tokio::time::Instant::now().into_std();
        let mut monitors: Vec<ServiceMonitor> = self
            .services
            .iter()
            .map(|s| ServiceMonitor::new(start, s.probe_interval, wake_method(s)))
            .collect();
        // About one probe per service is in flight, so this stays small.
        let (results_tx, mut results) = mpsc::unbounded_channel::<ProbeResult>();
        loop {
            let now = tokio::time::Instant::now().into_std();
            for (i, m) in monitors.iter_mut().enumerate() {
                m.handle_timeout(now);
                while let Some(action) = m.poll_action(now) {
                    self.act(i, action, &results_tx);
                }
                while let Some(event) = m.poll_event() {
                    self.record(i, &event);
                }
            }
            let next = monitors.iter().map(ServiceMonitor::poll_timeout).min();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = self.commands.recv() => {
                    // The handle lives in the agent as long as this task.
                    let Some(command) = command else { return };
                    let now = tokio::time::Instant::now().into_std();
                    self.command(&mut monitors, now, command);
                }
                Some(ProbeResult { key, id, readiness }) = results.recv() => {
                    let now = tokio::time::Instant::now().into_std();
                    // No monitor with the key: its service was removed or
                    // changed by a reload, and the new one probes afresh.
                    let Some(i) = self.keys.iter().position(|k| *k == key) else {
                        continue;
                    };
                    if monitors[i].handle_probe(now, id, &readiness) == ProbeReport::Taken {
                        self.reasons[i] = match readiness {
                            Readiness::Ready => None,
                            Readiness::NotReady(why) => Some(why),
                        };
                    }
                }
                () = sleep => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    fn index(&self, name: &Name) -> Option<usize> {
        self.services.iter().position(|s| &s.name == name)
    }

    fn command(&mut self, monitors: &mut Vec<ServiceMonitor>, now: Instant, command: Command) {
        match command {
            Command::Reconfigure(services) => {
                let old_views = self.views.borrow().clone();
                let mut kept = 0;
                let mut old: Vec<Option<ServiceMonitor>> =
                    std::mem::take(monitors).into_iter().map(Some).collect();
                let mut new_monitors = Vec::with_capacity(services.len());
                let mut reasons = Vec::with_capacity(services.len());
                let mut keys = Vec::with_capacity(services.len());
                let mut views = Vec::with_capacity(services.len());
                for s in &services {
                    let same = self.services.iter().position(|o| **o == *s);
                    match same.and_then(|i| Some((i, old.get_mut(i)?.take()?))) {
                        Some((i, monitor)) => {
                            kept += 1;
                            new_monitors.push(monitor);
                            reasons.push(self.reasons[i].clone());
                            keys.push(self.keys[i]);
                            views.push(old_views[i].clone());
                        }
                        None => {
                            new_monitors.push(ServiceMonitor::new(
                                now,
                                s.probe_interval,
                                wake_method(s),
                            ));
                            reasons.push(None);
                            keys.push(self.next_key);
                            self.next_key += 1;
                            views.push(ServiceView {
                                name: s.name.clone(),
                                state: ServiceState::Unknown,
                                wake: wake_method(s),
                                upstream: upstream_of(s),
                                wakes: 0,
                                last_wake: None,
                            });
                        }
                    }
                }
                info!(
                    services = services.len(),
                    unchanged = kept,
                    "services reconfigured"
                );
                self.services = services.into_iter().map(Arc::new).collect();
                self.reasons = reasons;
                self.keys = keys;
                *monitors = new_monitors;
                self.views.send_replace(views);
            }
            Command::Wake { service, origin } => {
                let Some(i) = self.index(&service) else {
                    debug!(%service, %origin, "wake requested for an unknown service");
                    return;
                };
                match monitors[i].handle_wake_request(now) {
                    WakeRequest::Started => info!(%service, %origin, "waking service"),
                    WakeRequest::ProbingFirst => {
                        debug!(%service, %origin, "wake requested; probing first");
                    }
                    WakeRequest::AlreadyWaking => debug!(%service, %origin, "already waking"),
                    WakeRequest::NotConfigured => {
                        debug!(%service, %origin, "wake requested but not configured");
                    }
                }
            }
            Command::ConnectFailed { service } => {
                if let Some(i) = self.index(&service) {
                    monitors[i].handle_connect_failed(now);
                }
            }
        }
    }

    fn act(&self, i: usize, action: Action, results: &mpsc::UnboundedSender<ProbeResult>) {
        let service = self.services[i].clone();
        match action {
            Action::Probe(id) => {
                let (results, key) = (results.clone(), self.keys[i]);
                tokio::spawn(async move {
                    let readiness = health::probe(&service).await;
                    let _ = results.send(ProbeResult { key, id, readiness });
                });
            }
            Action::SendMagicPacket => {
                let Some(w) = service.wake.clone() else {
                    return;
                };
                tokio::spawn(async move {
                    let packet = wake::magic_packet(w.mac, w.password);
                    match wake::send_magic_packet(&w.broadcast, &packet).await {
                        Ok(to) => debug!(service = %service.name, %to, "sent magic packet"),
                        Err(e) => {
                            warn!(service = %service.name, error = %e, "cannot send magic packet");
                        }
                    }
                });
            }
        }
    }

    fn record(&self, i: usize, event: &Event) {
        let name = &self.services[i].name;
        match event {
            Event::State(ServiceState::Down) => {
                let reason = self.reasons[i].as_deref().unwrap_or("connect failed");
                info!(service = %name, state = "down", reason, "service state changed");
            }
            Event::State(state) => info!(service = %name, %state, "service state changed"),
            Event::Woke { took } => {
                info!(service = %name, took_ms = took.as_millis() as u64, "service woke");
            }
            Event::WakeTimedOut { after } => {
                warn!(service = %name, after_s = after.as_secs(), "service did not wake; giving up");
            }
            Event::WakeStarted => {}
            Event::ProbeLost => {
                warn!(service = %name, after_s = PROBE_LOST_AFTER.as_secs(), "a probe's result never came; probing again");
                // Nothing others see changed.
                return;
            }
        }
        self.views.send_modify(|views| {
            let Some(v) = views.get_mut(i) else { return };
            match *event {
                Event::State(state) => v.state = state,
                Event::WakeStarted => {
                    v.wakes += 1;
                    v.last_wake = Some(LastWake {
                        started: SystemTime::now(),
                        outcome: None,
                    });
                }
                Event::Woke { took } => {
                    if let Some(w) = &mut v.last_wake {
                        w.outcome = Some(WakeOutcome::Woke { took });
                    }
                }
                Event::WakeTimedOut { .. } => {
                    if let Some(w) = &mut v.last_wake {
                        w.outcome = Some(WakeOutcome::TimedOut);
                    }
                }
                Event::ProbeLost => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(5);

    fn events(m: &mut ServiceMonitor) -> Vec<Event> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    fn actions(m: &mut ServiceMonitor, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| m.poll_action(now)).collect()
    }

    /// The one action due at `now`, which must be a probe; its id.
    fn probe(m: &mut ServiceMonitor, now: Instant) -> ProbeId {
        match actions(m, now)[..] {
            [Action::Probe(id)] => id,
            ref other => panic!("expected one probe, got {other:?}"),
        }
    }

    fn not_ready() -> Readiness {
        Readiness::NotReady("connect: refused".into())
    }

    #[test]
    fn probes_run_at_start_then_every_interval() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::NotConfigured);
        assert_eq!(m.state(), ServiceState::Unknown);
        let p = probe(&mut m, t0);
        // In flight: nothing to do until its result, or until it is overdue.
        assert_eq!(actions(&mut m, t0), vec![]);
        assert_eq!(m.poll_timeout(), t0 + PROBE_LOST_AFTER);
        m.handle_probe(t0, p, &Readiness::Ready);
        assert_eq!(events(&mut m), vec![Event::State(ServiceState::Up)]);
        assert_eq!(m.poll_timeout(), t0 + INTERVAL);
        assert_eq!(actions(&mut m, t0 + INTERVAL / 2), vec![]);
        let p = probe(&mut m, t0 + INTERVAL);
        m.handle_probe(t0 + INTERVAL, p, &not_ready());
        assert_eq!(events(&mut m), vec![Event::State(ServiceState::Down)]);
    }

    /// Issue 16: a probe whose result never comes (a reload lost track of
    /// it) must not stop the probes, and its late result must not count.
    #[test]
    fn a_lost_probe_is_given_up_and_its_late_result_ignored() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::NotConfigured);
        let lost = probe(&mut m, t0);
        let t1 = m.poll_timeout();
        assert_eq!(t1, t0 + PROBE_LOST_AFTER);
        m.handle_timeout(t1);
        assert_eq!(events(&mut m), vec![Event::ProbeLost]);
        let next = probe(&mut m, t1);
        assert_ne!(next, lost);
        // The lost probe answers late: ignored, the one in flight stays.
        assert_eq!(
            m.handle_probe(t1, lost, &Readiness::Ready),
            ProbeReport::Stale
        );
        assert_eq!(m.state(), ServiceState::Unknown);
        assert!(events(&mut m).is_empty());
        assert_eq!(m.poll_timeout(), t1 + PROBE_LOST_AFTER);
        assert_eq!(m.handle_probe(t1, next, &not_ready()), ProbeReport::Taken);
        assert_eq!(events(&mut m), vec![Event::State(ServiceState::Down)]);
        assert_eq!(m.poll_timeout(), t1 + INTERVAL);
        // A second result for the same probe is stale too.
        assert_eq!(
            m.handle_probe(t1, next, &Readiness::Ready),
            ProbeReport::Stale
        );
        assert_eq!(m.state(), ServiceState::Down);
    }

    #[test]
    fn a_wake_sends_packets_until_the_probe_passes() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::MagicPacket);
        let p = probe(&mut m, t0);
        m.handle_probe(t0, p, &not_ready());
        assert_eq!(events(&mut m), vec![Event::State(ServiceState::Down)]);

        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(m.handle_wake_request(t1), WakeRequest::Started);
        assert_eq!(
            events(&mut m),
            vec![Event::State(ServiceState::Waking), Event::WakeStarted]
        );
        // The first packet goes at once; more requests join the episode.
        assert_eq!(actions(&mut m, t1), vec![Action::SendMagicPacket]);
        for _ in 0..20 {
            assert_eq!(m.handle_wake_request(t1), WakeRequest::AlreadyWaking);
        }
        assert_eq!(actions(&mut m, t1), vec![]);
        assert!(events(&mut m).is_empty());

        // Probes speed up while waking; packets repeat every WAKE_RESEND.
        assert_eq!(m.poll_timeout(), t1 + PROBE_INTERVAL_WAKING);
        let t2 = t1 + PROBE_INTERVAL_WAKING;
        let p = probe(&mut m, t2);
        m.handle_probe(t2, p, &not_ready());
        assert_eq!(m.state(), ServiceState::Waking, "still waking, not down");
        assert_eq!(m.poll_timeout(), t2 + PROBE_INTERVAL_WAKING);
        let t3 = t1 + WAKE_RESEND;
        let [Action::SendMagicPacket, Action::Probe(p)] = actions(&mut m, t3)[..] else {
            panic!("a packet and a probe are due");
        };
        m.handle_probe(t3, p, &Readiness::Ready);
        assert_eq!(
            events(&mut m),
            vec![
                Event::Woke { took: WAKE_RESEND },
                Event::State(ServiceState::Up)
            ]
        );
        // Back to the normal schedule, no more packets.
        assert_eq!(m.poll_timeout(), t3 + INTERVAL);
        assert_eq!(actions(&mut m, t3 + WAKE_RESEND), vec![]);
    }

    #[test]
    fn a_wake_gives_up_after_the_timeout() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::MagicPacket);
        assert_eq!(m.handle_wake_request(t0), WakeRequest::Started);
        let mut now;
        let mut packets = 0;
        // Walk the deadlines the way the driver does.
        loop {
            now = m.poll_timeout();
            m.handle_timeout(now);
            if m.state() == ServiceState::Down {
                break;
            }
            for a in actions(&mut m, now) {
                match a {
                    Action::SendMagicPacket => packets += 1,
                    Action::Probe(p) => {
                        m.handle_probe(now, p, &not_ready());
                    }
                }
            }
        }
        assert_eq!(now, t0 + WAKE_TIMEOUT);
        let expected = WAKE_TIMEOUT.as_millis().div_ceil(WAKE_RESEND.as_millis());
        assert_eq!(packets, expected, "a packet every WAKE_RESEND");
        let ev = events(&mut m);
        assert!(
            ev.ends_with(&[
                Event::WakeTimedOut {
                    after: WAKE_TIMEOUT
                },
                Event::State(ServiceState::Down)
            ]),
            "{ev:?}"
        );
        // The next request starts a new episode.
        assert_eq!(m.handle_wake_request(now), WakeRequest::Started);
    }

    #[test]
    fn a_failed_connect_marks_an_up_service_down_and_probes_at_once() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::MagicPacket);
        let p = probe(&mut m, t0);
        m.handle_probe(t0, p, &Readiness::Ready);
        events(&mut m);
        let t1 = t0 + Duration::from_secs(1);
        m.handle_connect_failed(t1);
        assert_eq!(events(&mut m), vec![Event::State(ServiceState::Down)]);
        assert_eq!(m.poll_timeout(), t1, "probe at once, not in 5 s");
        // A connect failing while waking changes nothing.
        assert_eq!(m.handle_wake_request(t1), WakeRequest::Started);
        events(&mut m);
        m.handle_connect_failed(t1);
        assert_eq!(m.state(), ServiceState::Waking);
        assert!(events(&mut m).is_empty());
    }

    #[test]
    fn a_wake_request_for_an_up_service_probes_first() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::MagicPacket);
        let p = probe(&mut m, t0);
        m.handle_probe(t0, p, &Readiness::Ready);
        events(&mut m);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(m.handle_wake_request(t1), WakeRequest::ProbingFirst);
        let p = probe(&mut m, t1);
        // It really is up: no wake.
        m.handle_probe(t1, p, &Readiness::Ready);
        assert!(events(&mut m).is_empty());
        // It went to sleep: the probe's failure starts the wake.
        assert_eq!(m.handle_wake_request(t1), WakeRequest::ProbingFirst);
        let p = probe(&mut m, t1);
        m.handle_probe(t1, p, &not_ready());
        assert_eq!(
            events(&mut m),
            vec![
                Event::State(ServiceState::Down),
                Event::State(ServiceState::Waking),
                Event::WakeStarted
            ]
        );
        assert_eq!(actions(&mut m, t1), vec![Action::SendMagicPacket]);
    }

    #[test]
    fn services_without_wake_are_never_woken() {
        let t0 = Instant::now();
        let mut m = ServiceMonitor::new(t0, INTERVAL, WakeMethod::NotConfigured);
        let p = probe(&mut m, t0);
        m.handle_probe(t0, p, &not_ready());
        assert_eq!(m.handle_wake_request(t0), WakeRequest::NotConfigured);
        assert_eq!(m.state(), ServiceState::Down);
        assert_eq!(actions(&mut m, t0), vec![]);
    }

    /// The driver with tokio's paused clock: a wake of a service whose
    /// broadcast address is a loopback socket sends a packet every
    /// WAKE_RESEND, and the view counts one wake episode for many requests.
    #[tokio::test(start_paused = true)]
    async fn the_task_resends_on_the_clock_and_counts_one_episode() {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let service = ServiceConfig {
            name: Name::new("gpu").unwrap(),
            scheme: crate::config::Scheme::Tcp,
            target: dead.to_string(),
            health: None,
            probe_interval: INTERVAL,
            wake: Some(crate::config::WakeConfig {
                cached: Vec::new(),
                mac: [1, 2, 3, 4, 5, 6],
                broadcast: udp.local_addr().unwrap().to_string(),
                password: None,
            }),
        };
        let (monitors, task) = Monitors::new(std::slice::from_ref(&service));
        let shutdown = CancellationToken::new();
        tokio::spawn(task.run(shutdown.clone()));
        let mut views = monitors.subscribe();
        views
            .wait_for(|v| v[0].state == ServiceState::Down)
            .await
            .unwrap();
        for _ in 0..20 {
            monitors.wake(&service.name, Origin::Edge);
        }
        let mut buf = [0u8; 128];
        let mut arrivals = Vec::new();
        for _ in 0..3 {
            let (n, _) = udp.recv_from(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], &wake::magic_packet([1, 2, 3, 4, 5, 6], None)[..]);
            arrivals.push(tokio::time::Instant::now());
        }
        let gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(
            gaps.iter().all(|g| *g >= WAKE_RESEND),
            "packets {gaps:?} apart"
        );
        let v = monitors.view(&service.name).unwrap();
        assert_eq!((v.state, v.wakes), (ServiceState::Waking, 1));
        assert_eq!(v.last_wake.unwrap().outcome, None);
        shutdown.cancel();
    }
}
