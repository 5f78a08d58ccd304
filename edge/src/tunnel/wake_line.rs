//! The edge's wake core, without I/O: one [`WakeLine`] per service of an
//! agent.
//!
//! It keeps what the agent last said of the service (state, wake method),
//! the service's wake history, and the line of requests held while its
//! machine wakes: arrival order, one request at a time connecting (so the
//! service sees them in that order too), wake requests to the agent sent
//! once per [`WAKE_REQUEST_REPEAT`] however many requests wait
//! (single-flight), each request's deadline, and the pause after a failed
//! connect. It takes `now` and returns verdicts, actions and events.
//!
//! The registry is its shell: it keeps the lines under its lock, sends the
//! wake requests on the agent's control stream, logs the events, and wakes
//! the waiting requests when anything changes. Like the agent's
//! `ServiceMonitor`, everything here is tested with made-up times.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use burrow_proto::{ServiceState, WakeMethod};
use tokio::time::Instant;

/// After a wake request is sent for a service, more requests within this
/// time send nothing (the agent deduplicates too; this spares the wire),
/// and a request still waiting for a service that stays down asks again
/// after it.
pub const WAKE_REQUEST_REPEAT: Duration = Duration::from_secs(2);
/// After a connect to a service believed up failed, how long the line
/// waits for the agent's news before the next try anyway.
pub const FAILED_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// A finished wake, as the edge saw it: from the agent reporting
/// "waking" to it reporting "up".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeRecord {
    pub started: SystemTime,
    pub took: Duration,
}

/// Names one held request in its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TicketId(u64);

/// What a held request is to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It has the turn: connect it to the service, then say how that went
    /// ([`WakeLine::connected`] or [`WakeLine::connect_failed`]).
    Go,
    /// Not yet: look again at this time, or sooner when anything changes.
    Wait(Instant),
    /// Its deadline passed; it has left the line.
    TimedOut,
    /// It is not in the line (it left, or the line was never joined).
    Gone,
}

/// Why a request could not join the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineFull;

/// The answer to a wake request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeSent {
    /// Send one to the agent now.
    Sent,
    /// The service is waking already.
    AlreadyWaking,
    /// One went out less than [`WAKE_REQUEST_REPEAT`] ago.
    Recent,
    /// The service cannot be woken.
    NotWakeable,
    /// The agent is not connected, or does not have the service (decided
    /// by the shell, which knows the sessions).
    Unavailable,
}

/// What happened, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The agent reported a new state.
    State(ServiceState),
    /// The service was reported up after waking.
    Woke(WakeRecord),
    /// The service was reported down (or unknown) while waking.
    DidNotWake,
}

#[derive(Debug, Clone, Copy)]
struct Ticket {
    id: TicketId,
    deadline: Instant,
}

/// One service's wake state and line of held requests, without I/O.
#[derive(Debug)]
pub struct WakeLine {
    state: ServiceState,
    wake: WakeMethod,
    /// The agent is connected (what it says is current).
    online: bool,
    waking_since: Option<(Instant, SystemTime)>,
    last_wake: Option<WakeRecord>,
    wake_requests: u64,
    last_request: Option<Instant>,
    /// A wake request the shell is to send.
    wake_due: bool,
    /// Held requests in arrival order; the one with the turn stays at the
    /// front until it is connected.
    line: VecDeque<Ticket>,
    turn: Option<TicketId>,
    /// Until then a service reported up is not tried: a connect just
    /// contradicted that report. News from the agent ends it early.
    pause_until: Option<Instant>,
    next_id: u64,
    events: VecDeque<Event>,
}

impl WakeLine {
    /// A service as its agent first lists it, the agent connected.
    pub fn new(state: ServiceState, wake: WakeMethod) -> Self {
        Self {
            state,
            wake,
            online: true,
            waking_since: None,
            last_wake: None,
            wake_requests: 0,
            last_request: None,
            wake_due: false,
            line: VecDeque::new(),
            turn: None,
            pause_until: None,
            next_id: 0,
            events: VecDeque::new(),
        }
    }

    pub fn state(&self) -> ServiceState {
        self.state
    }

    pub fn wake_method(&self) -> WakeMethod {
        self.wake
    }

    pub fn waking_since(&self) -> Option<SystemTime> {
        self.waking_since.map(|(_, t)| t)
    }

    pub fn last_wake(&self) -> Option<WakeRecord> {
        self.last_wake
    }

    /// Wake requests sent to the agent for this service.
    pub fn wake_requests(&self) -> u64 {
        self.wake_requests
    }

    /// Requests waiting in line (not counting one being connected).
    pub fn held(&self) -> usize {
        self.line.len() - usize::from(self.turn.is_some())
    }

    /// The agent reported the service (`now`: monotonic, `wall`: for the
    /// history).
    pub fn update(
        &mut self,
        now: Instant,
        wall: SystemTime,
        state: ServiceState,
        wake: WakeMethod,
    ) {
        self.online = true;
        self.wake = wake;
        match state {
            ServiceState::Waking => {
                if self.waking_since.is_none() {
                    self.waking_since = Some((now, wall));
                }
            }
            ServiceState::Up => {
                if let Some((at, started)) = self.waking_since.take() {
                    let record = WakeRecord {
                        started,
                        took: now.saturating_duration_since(at),
                    };
                    self.last_wake = Some(record);
                    self.events.push_back(Event::Woke(record));
                }
            }
            ServiceState::Down | ServiceState::Unknown => {
                if self.waking_since.take().is_some() {
                    self.events.push_back(Event::DidNotWake);
                }
            }
        }
        // News other than "up" is news: the pause waited for it.
        if matches!(state, ServiceState::Down | ServiceState::Waking) {
            self.pause_until = None;
        }
        if self.state != state {
            self.state = state;
            self.events.push_back(Event::State(state));
        }
    }

    /// The agent connected or went away. While it is away, a held request
    /// goes on to forwarding, which waits for the agent (`agent_wait`) and
    /// says it is offline.
    pub fn set_online(&mut self, online: bool) {
        self.online = online;
    }

    /// A service the agent can wake that is down or waking: requests
    /// for it wake it (or are answered from the agent's cache) first.
    pub fn is_asleep(&self) -> bool {
        self.online
            && self.wake == WakeMethod::MagicPacket
            && matches!(self.state, ServiceState::Down | ServiceState::Waking)
    }

    /// Someone who may wants the service awake: a wake request goes out
    /// unless it is waking already or one went out lately.
    pub fn request_wake(&mut self, now: Instant) -> WakeSent {
        if self.wake == WakeMethod::NotConfigured {
            return WakeSent::NotWakeable;
        }
        if self.state == ServiceState::Waking {
            return WakeSent::AlreadyWaking;
        }
        if self
            .last_request
            .is_some_and(|at| now.saturating_duration_since(at) < WAKE_REQUEST_REPEAT)
        {
            return WakeSent::Recent;
        }
        self.last_request = Some(now);
        self.wake_requests += 1;
        self.wake_due = true;
        WakeSent::Sent
    }

    /// Whether a wake request is to be sent now (once per request the
    /// line decided on).
    pub fn take_wake_due(&mut self) -> bool {
        std::mem::take(&mut self.wake_due)
    }

    /// The shell could not send the wake request (the agent's control
    /// queue is full or its session ends): the next asker tries again.
    pub fn wake_unsent(&mut self) {
        self.last_request = None;
        self.wake_requests = self.wake_requests.saturating_sub(1);
    }

    /// A request joins the end of the line, until `deadline`. `after_failure`:
    /// a connect just failed, so a service still reported up is retried
    /// only after [`FAILED_RETRY_PAUSE`] or the agent's next news.
    pub fn join(
        &mut self,
        now: Instant,
        deadline: Instant,
        cap: usize,
        after_failure: bool,
    ) -> Result<TicketId, LineFull> {
        if self.held() >= cap {
            return Err(LineFull);
        }
        let id = TicketId(self.next_id);
        self.next_id += 1;
        self.line.push_back(Ticket { id, deadline });
        if after_failure {
            self.pause(now);
        }
        Ok(id)
    }

    fn pause(&mut self, now: Instant) {
        let until = now + FAILED_RETRY_PAUSE;
        self.pause_until = Some(self.pause_until.map_or(until, |p| p.max(until)));
    }

    /// What request `id` is to do now. Only the front of the line gets the
    /// turn, and only when the service is worth trying: up (or not known),
    /// not wakeable, or its agent away. While it stays down the front asks
    /// for a wake every [`WAKE_REQUEST_REPEAT`].
    pub fn poll(&mut self, now: Instant, id: TicketId) -> Verdict {
        if self.turn == Some(id) {
            return Verdict::Go;
        }
        let Some(pos) = self.line.iter().position(|t| t.id == id) else {
            return Verdict::Gone;
        };
        let deadline = self.line[pos].deadline;
        if now >= deadline {
            self.line.remove(pos);
            return Verdict::TimedOut;
        }
        if pos != 0 || self.turn.is_some() {
            return Verdict::Wait(deadline);
        }
        match self.ready_at(now) {
            None => {
                self.turn = Some(id);
                Verdict::Go
            }
            Some(at) => Verdict::Wait(at.min(deadline)),
        }
    }

    /// `None` when the service is worth trying now, else when to look again
    /// (if nothing changes before).
    fn ready_at(&mut self, now: Instant) -> Option<Instant> {
        if !self.online {
            return None;
        }
        match self.state {
            ServiceState::Up | ServiceState::Unknown => match self.pause_until {
                Some(p) if now < p => Some(p),
                _ => {
                    self.pause_until = None;
                    None
                }
            },
            ServiceState::Down if self.wake == WakeMethod::NotConfigured => None,
            ServiceState::Down => {
                self.request_wake(now);
                let next = self.last_request.unwrap_or(now) + WAKE_REQUEST_REPEAT;
                Some(next.max(now + Duration::from_millis(1)))
            }
            // Only its deadline (or the agent's news) ends the wait.
            ServiceState::Waking => Some(now + WAKE_REQUEST_REPEAT),
        }
    }

    /// Request `id` has a connection to the service (or gave up): it leaves
    /// the line and the next one may go.
    pub fn leave(&mut self, id: TicketId) {
        self.line.retain(|t| t.id != id);
        if self.turn == Some(id) {
            self.turn = None;
        }
    }

    /// Request `id`, which had the turn, could not connect: the service may
    /// have gone to sleep since it was last reported up. It keeps its place
    /// at the front; a wake is asked for, and the next try waits for the
    /// agent's news or [`FAILED_RETRY_PAUSE`].
    pub fn connect_failed(&mut self, now: Instant, id: TicketId) {
        if self.turn == Some(id) {
            self.turn = None;
        }
        self.pause(now);
        if self.wake == WakeMethod::MagicPacket {
            self.request_wake(now);
        }
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(30);

    fn asleep() -> (WakeLine, Instant) {
        (
            WakeLine::new(ServiceState::Down, WakeMethod::MagicPacket),
            Instant::now(),
        )
    }

    #[test]
    fn one_wake_request_for_many_held_requests_then_one_per_repeat() {
        let (mut line, t0) = asleep();
        let ids: Vec<_> = (0..10)
            .map(|_| line.join(t0, t0 + HOLD, 64, false).unwrap())
            .collect();
        let mut sent = 0;
        for id in &ids {
            assert!(matches!(line.poll(t0, *id), Verdict::Wait(_)));
            sent += usize::from(line.take_wake_due());
        }
        assert_eq!(sent, 1, "single flight");
        assert_eq!(line.wake_requests(), 1);
        // The front looks again after the repeat and asks again: still down.
        let Verdict::Wait(at) = line.poll(t0, ids[0]) else {
            panic!("front must wait")
        };
        assert_eq!(at, t0 + WAKE_REQUEST_REPEAT);
        assert!(!line.take_wake_due());
        assert!(matches!(line.poll(at, ids[0]), Verdict::Wait(_)));
        assert!(line.take_wake_due());
        assert_eq!(line.wake_requests(), 2);
    }

    #[test]
    fn waking_sends_nothing_more_and_up_lets_the_line_go_in_order() {
        let (mut line, t0) = asleep();
        let a = line.join(t0, t0 + HOLD, 64, false).unwrap();
        let b = line.join(t0, t0 + HOLD, 64, false).unwrap();
        assert!(matches!(line.poll(t0, a), Verdict::Wait(_)));
        assert!(line.take_wake_due());
        let t1 = t0 + Duration::from_millis(100);
        line.update(
            t1,
            SystemTime::UNIX_EPOCH,
            ServiceState::Waking,
            WakeMethod::MagicPacket,
        );
        assert_eq!(
            line.request_wake(t1 + WAKE_REQUEST_REPEAT),
            WakeSent::AlreadyWaking
        );
        assert!(matches!(line.poll(t1 + HOLD / 2, a), Verdict::Wait(_)));
        assert!(!line.take_wake_due());
        let t2 = t0 + Duration::from_secs(8);
        line.update(
            t2,
            SystemTime::UNIX_EPOCH,
            ServiceState::Up,
            WakeMethod::MagicPacket,
        );
        // b is behind a: it waits until a is connected.
        assert!(matches!(line.poll(t2, b), Verdict::Wait(_)));
        assert_eq!(line.poll(t2, a), Verdict::Go);
        assert_eq!(
            line.poll(t2, a),
            Verdict::Go,
            "asking again changes nothing"
        );
        assert!(matches!(line.poll(t2, b), Verdict::Wait(_)));
        assert_eq!(line.held(), 1);
        line.leave(a);
        assert_eq!(line.poll(t2, b), Verdict::Go);
        line.leave(b);
        assert_eq!(line.held(), 0);
        let mut events = Vec::new();
        while let Some(e) = line.poll_event() {
            events.push(e);
        }
        assert_eq!(
            events,
            [
                Event::State(ServiceState::Waking),
                Event::Woke(WakeRecord {
                    started: SystemTime::UNIX_EPOCH,
                    took: t2 - t1
                }),
                Event::State(ServiceState::Up),
            ]
        );
        assert_eq!(line.last_wake().map(|w| w.took), Some(t2 - t1));
    }

    #[test]
    fn a_request_past_its_deadline_leaves_and_the_next_moves_up() {
        let (mut line, t0) = asleep();
        let a = line
            .join(t0, t0 + Duration::from_secs(5), 64, false)
            .unwrap();
        let b = line.join(t0, t0 + HOLD, 64, false).unwrap();
        assert_eq!(line.poll(t0, a), Verdict::Wait(t0 + WAKE_REQUEST_REPEAT));
        assert_eq!(line.poll(t0, b), Verdict::Wait(t0 + HOLD));
        assert_eq!(line.poll(t0 + Duration::from_secs(5), a), Verdict::TimedOut);
        assert_eq!(line.poll(t0 + Duration::from_secs(5), a), Verdict::Gone);
        line.update(
            t0 + Duration::from_secs(6),
            SystemTime::now(),
            ServiceState::Up,
            WakeMethod::MagicPacket,
        );
        assert_eq!(line.poll(t0 + Duration::from_secs(6), b), Verdict::Go);
    }

    #[test]
    fn a_failed_connect_keeps_its_place_and_waits_for_news_or_the_pause() {
        let mut line = WakeLine::new(ServiceState::Up, WakeMethod::MagicPacket);
        let t0 = Instant::now();
        let a = line.join(t0, t0 + HOLD, 64, false).unwrap();
        let b = line.join(t0, t0 + HOLD, 64, false).unwrap();
        assert_eq!(line.poll(t0, a), Verdict::Go);
        line.connect_failed(t0, a);
        assert!(line.take_wake_due(), "a failed connect asks for a wake");
        // Still reported up: a waits for the pause, b stays behind it.
        assert_eq!(line.poll(t0, a), Verdict::Wait(t0 + FAILED_RETRY_PAUSE));
        assert_eq!(line.poll(t0, b), Verdict::Wait(t0 + HOLD));
        assert_eq!(line.poll(t0 + FAILED_RETRY_PAUSE, a), Verdict::Go);
        line.connect_failed(t0 + FAILED_RETRY_PAUSE, a);
        // The agent's news ends the pause early.
        let t1 = t0 + FAILED_RETRY_PAUSE + Duration::from_millis(10);
        line.update(
            t1,
            SystemTime::now(),
            ServiceState::Waking,
            WakeMethod::MagicPacket,
        );
        line.update(
            t1,
            SystemTime::now(),
            ServiceState::Up,
            WakeMethod::MagicPacket,
        );
        assert_eq!(line.poll(t1, a), Verdict::Go);
    }

    #[test]
    fn joining_after_a_failure_pauses_a_service_reported_up() {
        let mut line = WakeLine::new(ServiceState::Up, WakeMethod::MagicPacket);
        let t0 = Instant::now();
        let a = line.join(t0, t0 + HOLD, 64, true).unwrap();
        assert_eq!(line.poll(t0, a), Verdict::Wait(t0 + FAILED_RETRY_PAUSE));
        line.update(
            t0,
            SystemTime::now(),
            ServiceState::Down,
            WakeMethod::MagicPacket,
        );
        assert!(matches!(line.poll(t0, a), Verdict::Wait(_)));
        assert!(line.take_wake_due());
    }

    #[test]
    fn only_wakeable_services_that_are_down_or_waking_are_asleep() {
        use ServiceState::*;
        use WakeMethod::*;
        let asleep = |state, wake| WakeLine::new(state, wake).is_asleep();
        assert!(asleep(Down, MagicPacket));
        assert!(asleep(Waking, MagicPacket));
        assert!(!asleep(Up, MagicPacket));
        assert!(!asleep(Unknown, MagicPacket));
        assert!(!asleep(Down, NotConfigured));
    }

    #[test]
    fn services_that_cannot_wake_or_agents_away_let_requests_through() {
        let mut line = WakeLine::new(ServiceState::Down, WakeMethod::NotConfigured);
        let t0 = Instant::now();
        let a = line.join(t0, t0 + HOLD, 64, false).unwrap();
        assert_eq!(line.poll(t0, a), Verdict::Go);
        assert_eq!(line.request_wake(t0), WakeSent::NotWakeable);
        let (mut line, t0) = asleep();
        line.set_online(false);
        assert!(!line.is_asleep());
        let a = line.join(t0, t0 + HOLD, 64, false).unwrap();
        assert_eq!(line.poll(t0, a), Verdict::Go);
    }

    #[test]
    fn the_line_is_bounded_and_an_unsent_request_is_retried_at_once() {
        let (mut line, t0) = asleep();
        let first = line.join(t0, t0 + HOLD, 2, false).unwrap();
        line.join(t0, t0 + HOLD, 2, false).unwrap();
        assert_eq!(line.join(t0, t0 + HOLD, 2, false), Err(LineFull));
        assert_eq!(line.held(), 2);
        line.leave(first);
        assert!(line.join(t0, t0 + HOLD, 2, false).is_ok());
        assert_eq!(line.request_wake(t0), WakeSent::Sent);
        assert!(line.take_wake_due());
        line.wake_unsent();
        assert_eq!(line.wake_requests(), 0);
        assert_eq!(line.request_wake(t0), WakeSent::Sent);
    }
}
