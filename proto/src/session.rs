//! The control session's state machines, one per side, without I/O.
//!
//! The async drivers in `edge` and `agent` feed received frames to
//! `handle_*`, send whatever `poll_transmit` yields, and act on the returned
//! events. Every rule about which frame may come when lives here.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Buf, BytesMut};

use crate::frame::{
    AgentToEdge, EdgeToAgent, Frame, GoingAway, Hello, LinkReport, Name, PROTOCOL_VERSION,
    RefuseReason, Refused, ServiceStatus, Wake, Welcome,
};
use crate::wire::{DecodeError, HEADER_LEN, MAX_PAYLOAD};

/// A frame that is well formed but not allowed at this point of the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("unexpected {frame} {state}")]
    Unexpected {
        frame: &'static str,
        state: &'static str,
    },
    #[error("control stream ended {0}")]
    Ended(&'static str),
}

/// A receive buffer for one stream that yields whole frames.
///
/// It lives in the driver's struct, not in a future, so reading stays
/// cancel-safe; it never grows past one maximal frame.
#[derive(Debug, Default)]
pub struct FrameBuf {
    buf: BytesMut,
}

impl FrameBuf {
    /// The most bytes [`FrameBuf::space`] will ever ask for at once.
    pub const CAPACITY: usize = HEADER_LEN + MAX_PAYLOAD;

    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes may be pushed before a frame must be taken out.
    pub fn space(&self) -> usize {
        Self::CAPACITY.saturating_sub(self.buf.len())
    }

    /// Appends received bytes; the caller reads at most [`FrameBuf::space`].
    pub fn push(&mut self, data: &[u8]) {
        debug_assert!(data.len() <= self.space(), "caller respects space()");
        self.buf.extend_from_slice(data);
    }

    /// Takes the next whole frame, if one is buffered.
    pub fn next_frame<F: Frame>(&mut self) -> Result<Option<F>, DecodeError> {
        match F::decode(&self.buf)? {
            Some((frame, used)) => {
                self.buf.advance(used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Bytes buffered but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Hands back buffered bytes that follow the frames taken so far, for
    /// streams where frames are followed by raw data.
    pub fn into_remainder(self) -> BytesMut {
        self.buf
    }
}

/// What the agent's control session reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    Established(Welcome),
    Refused(Refused),
    /// The edge is going away: reconnect after the hint.
    EdgeGoingAway(GoingAway),
    /// The edge asks for a service's machine to be woken.
    Wake(Wake),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentPhase {
    AwaitWelcome,
    Established,
    Closed,
}

/// The agent's side of the control stream.
#[derive(Debug)]
pub struct AgentSession {
    phase: AgentPhase,
    outbox: VecDeque<AgentToEdge>,
    services: Vec<ServiceStatus>,
}

impl AgentSession {
    /// Starts a session: the hello and the service list are queued at once,
    /// so they travel in the same flight as the handshake's end.
    /// `instance` is the agent process's random id (see [`Hello`]).
    pub fn new(agent: Name, instance: u64, services: Vec<ServiceStatus>) -> Self {
        let mut outbox = VecDeque::new();
        outbox.push_back(AgentToEdge::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent,
            instance,
        }));
        outbox.push_back(AgentToEdge::Services(services.clone()));
        Self {
            phase: AgentPhase::AwaitWelcome,
            outbox,
            services,
        }
    }

    pub fn handle_frame(&mut self, frame: EdgeToAgent) -> Result<AgentEvent, ProtocolError> {
        match (self.phase, frame) {
            (AgentPhase::AwaitWelcome, EdgeToAgent::Welcome(w)) => {
                self.phase = AgentPhase::Established;
                Ok(AgentEvent::Established(w))
            }
            (AgentPhase::AwaitWelcome, EdgeToAgent::Refused(r)) => {
                self.phase = AgentPhase::Closed;
                Ok(AgentEvent::Refused(r))
            }
            (AgentPhase::Established, EdgeToAgent::GoingAway(g)) => {
                self.phase = AgentPhase::Closed;
                Ok(AgentEvent::EdgeGoingAway(g))
            }
            // The driver decides what a wake request for a service it does
            // not have (or cannot wake) means; the session only orders frames.
            (AgentPhase::Established, EdgeToAgent::Wake(w)) => Ok(AgentEvent::Wake(w)),
            (phase, frame) => Err(ProtocolError::Unexpected {
                frame: match frame {
                    EdgeToAgent::Welcome(_) => "welcome",
                    EdgeToAgent::Refused(_) => "refusal",
                    EdgeToAgent::GoingAway(_) => "going-away",
                    EdgeToAgent::Wake(_) => "wake request",
                },
                state: match phase {
                    AgentPhase::AwaitWelcome => "before welcome",
                    AgentPhase::Established => "after welcome",
                    AgentPhase::Closed => "after close",
                },
            }),
        }
    }

    /// The control stream ended (the edge finished or reset it).
    pub fn handle_end(&mut self) -> ProtocolError {
        let phase = std::mem::replace(&mut self.phase, AgentPhase::Closed);
        ProtocolError::Ended(match phase {
            AgentPhase::AwaitWelcome => "before welcome",
            AgentPhase::Established => "without going-away",
            AgentPhase::Closed => "after close",
        })
    }

    /// Records a service's new status; queues an update only on change.
    pub fn set_service_state(&mut self, status: ServiceStatus) {
        match self.services.iter_mut().find(|s| s.name == status.name) {
            Some(s) if *s == status => return,
            Some(s) => *s = status,
            None => self.services.push(status),
        }
        // A newer full list supersedes any queued one.
        self.outbox
            .retain(|f| !matches!(f, AgentToEdge::Services(_)));
        self.outbox
            .push_back(AgentToEdge::Services(self.services.clone()));
    }

    /// Replaces the whole service list (services added or removed by a
    /// reload); queues an update only on change.
    pub fn set_services(&mut self, list: Vec<ServiceStatus>) {
        if self.services == list {
            return;
        }
        self.services = list;
        self.outbox
            .retain(|f| !matches!(f, AgentToEdge::Services(_)));
        self.outbox
            .push_back(AgentToEdge::Services(self.services.clone()));
    }

    /// Tells the edge how the link came to be on its transport. Only
    /// after the welcome; a newer report supersedes a queued one.
    pub fn report_link(&mut self, report: LinkReport) {
        if self.phase == AgentPhase::Established {
            self.outbox.retain(|f| !matches!(f, AgentToEdge::Link(_)));
            self.outbox.push_back(AgentToEdge::Link(report));
        }
    }

    /// Tells the edge this agent is shutting down.
    pub fn go_away(&mut self) {
        if self.phase != AgentPhase::Closed {
            self.phase = AgentPhase::Closed;
            self.outbox.push_back(AgentToEdge::GoingAway(GoingAway {
                reconnect_after: Duration::ZERO,
            }));
        }
    }

    pub fn is_established(&self) -> bool {
        self.phase == AgentPhase::Established
    }

    pub fn poll_transmit(&mut self) -> Option<AgentToEdge> {
        self.outbox.pop_front()
    }
}

/// What the edge's control session reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeEvent {
    /// The agent said hello with an acceptable version; the driver checks the
    /// name against the authenticated key and calls `accept` or `refuse`.
    Hello(Hello),
    Services(Vec<ServiceStatus>),
    Link(LinkReport),
    AgentGoingAway,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EdgePhase {
    AwaitHello,
    AwaitDecision,
    Established,
    Closed,
}

/// The edge's side of the control stream.
#[derive(Debug)]
pub struct EdgeSession {
    phase: EdgePhase,
    outbox: VecDeque<EdgeToAgent>,
}

impl Default for EdgeSession {
    fn default() -> Self {
        Self::new()
    }
}

impl EdgeSession {
    pub fn new() -> Self {
        Self {
            phase: EdgePhase::AwaitHello,
            outbox: VecDeque::new(),
        }
    }

    /// Handles one frame. A hello with another version is answered with a
    /// refusal (queued) and reported as an error so the driver closes.
    pub fn handle_frame(&mut self, frame: AgentToEdge) -> Result<EdgeEvent, ProtocolError> {
        match (self.phase, frame) {
            (EdgePhase::AwaitHello, AgentToEdge::Hello(hello)) => {
                if hello.version != PROTOCOL_VERSION {
                    self.refuse(
                        RefuseReason::UnsupportedVersion,
                        format!(
                            "protocol version {} is not supported; this edge speaks {}",
                            hello.version, PROTOCOL_VERSION
                        ),
                    );
                    return Err(ProtocolError::Unexpected {
                        frame: "hello with unsupported version",
                        state: "at start",
                    });
                }
                self.phase = EdgePhase::AwaitDecision;
                Ok(EdgeEvent::Hello(hello))
            }
            // The agent sends its service list right behind the hello,
            // before it has seen the welcome.
            (EdgePhase::AwaitDecision | EdgePhase::Established, AgentToEdge::Services(list)) => {
                Ok(EdgeEvent::Services(list))
            }
            (EdgePhase::Established, AgentToEdge::Link(report)) => Ok(EdgeEvent::Link(report)),
            (EdgePhase::Established, AgentToEdge::GoingAway(_)) => {
                self.phase = EdgePhase::Closed;
                Ok(EdgeEvent::AgentGoingAway)
            }
            (phase, frame) => Err(ProtocolError::Unexpected {
                frame: match frame {
                    AgentToEdge::Hello(_) => "hello",
                    AgentToEdge::Services(_) => "service list",
                    AgentToEdge::GoingAway(_) => "going-away",
                    AgentToEdge::Link(_) => "link report",
                },
                state: match phase {
                    EdgePhase::AwaitHello => "before hello",
                    EdgePhase::AwaitDecision => "before welcome",
                    EdgePhase::Established => "after welcome",
                    EdgePhase::Closed => "after close",
                },
            }),
        }
    }

    pub fn accept(&mut self, session: u64) {
        if self.phase == EdgePhase::AwaitDecision {
            self.phase = EdgePhase::Established;
            self.outbox.push_back(EdgeToAgent::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                session,
            }));
        }
    }

    pub fn refuse(&mut self, reason: RefuseReason, message: String) {
        self.phase = EdgePhase::Closed;
        self.outbox
            .push_back(EdgeToAgent::Refused(Refused { reason, message }));
    }

    /// Asks the agent to wake `service`'s machine. Only once the session is
    /// established: before the welcome there is nobody to ask.
    pub fn wake(&mut self, service: Name) {
        if self.phase == EdgePhase::Established {
            self.outbox.push_back(EdgeToAgent::Wake(Wake { service }));
        }
    }

    /// Tells the agent to reconnect after `reconnect_after` (the edge is restarting).
    pub fn go_away(&mut self, reconnect_after: Duration) {
        if self.phase == EdgePhase::Established {
            self.phase = EdgePhase::Closed;
            self.outbox
                .push_back(EdgeToAgent::GoingAway(GoingAway { reconnect_after }));
        }
    }

    pub fn is_established(&self) -> bool {
        self.phase == EdgePhase::Established
    }

    pub fn poll_transmit(&mut self) -> Option<EdgeToAgent> {
        self.outbox.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{ServiceState, WakeMethod};

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    /// Moves every queued frame from one side to the other through real
    /// encoding, one byte at a time, so both drivers' buffering is covered.
    fn agent_to_edge(agent: &mut AgentSession, edge: &mut EdgeSession) -> Vec<EdgeEvent> {
        let mut wire = BytesMut::new();
        while let Some(f) = agent.poll_transmit() {
            f.encode(&mut wire);
        }
        let mut buf = FrameBuf::new();
        let mut events = Vec::new();
        for b in wire.iter() {
            buf.push(&[*b]);
            while let Some(f) = buf.next_frame::<AgentToEdge>().unwrap() {
                events.push(edge.handle_frame(f).unwrap());
            }
        }
        assert_eq!(buf.pending(), 0);
        events
    }

    fn edge_to_agent(edge: &mut EdgeSession, agent: &mut AgentSession) -> Vec<AgentEvent> {
        let mut wire = BytesMut::new();
        while let Some(f) = edge.poll_transmit() {
            f.encode(&mut wire);
        }
        let mut buf = FrameBuf::new();
        buf.push(&wire);
        let mut events = Vec::new();
        while let Some(f) = buf.next_frame::<EdgeToAgent>().unwrap() {
            events.push(agent.handle_frame(f).unwrap());
        }
        events
    }

    #[test]
    fn handshake_services_and_going_away() {
        let webui = ServiceStatus {
            name: name("webui"),
            state: ServiceState::Unknown,
            wake: WakeMethod::NotConfigured,
            upstream: Default::default(),
        };
        let mut agent = AgentSession::new(name("home"), 9, vec![webui.clone()]);
        let mut edge = EdgeSession::new();

        let events = agent_to_edge(&mut agent, &mut edge);
        assert_eq!(
            events,
            vec![
                EdgeEvent::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    agent: name("home"),
                    instance: 9,
                }),
                EdgeEvent::Services(vec![webui.clone()]),
            ]
        );
        edge.accept(7);
        assert!(edge.is_established());
        let events = edge_to_agent(&mut edge, &mut agent);
        assert_eq!(
            events,
            vec![AgentEvent::Established(Welcome {
                version: PROTOCOL_VERSION,
                session: 7
            })]
        );
        assert!(agent.is_established());

        // Same state again: nothing to send. A change: one full list.
        agent.set_service_state(webui.clone());
        assert_eq!(agent.poll_transmit(), None);
        let up = ServiceStatus {
            state: ServiceState::Up,
            ..webui
        };
        agent.set_service_state(ServiceStatus {
            state: ServiceState::Down,
            ..up.clone()
        });
        agent.set_service_state(up.clone());
        assert_eq!(
            agent_to_edge(&mut agent, &mut edge),
            vec![EdgeEvent::Services(vec![up])]
        );

        // The edge asks for a wake; the agent's driver hears about it.
        edge.wake(name("webui"));
        assert_eq!(
            edge_to_agent(&mut edge, &mut agent),
            vec![AgentEvent::Wake(Wake {
                service: name("webui")
            })]
        );

        edge.go_away(Duration::from_millis(100));
        assert_eq!(
            edge_to_agent(&mut edge, &mut agent),
            vec![AgentEvent::EdgeGoingAway(GoingAway {
                reconnect_after: Duration::from_millis(100)
            })]
        );
        assert!(!agent.is_established());
    }

    #[test]
    fn a_new_service_list_replaces_the_old_one() {
        let status = |n: &str| ServiceStatus {
            name: name(n),
            state: ServiceState::Up,
            wake: crate::frame::WakeMethod::NotConfigured,
            upstream: Default::default(),
        };
        let mut agent = AgentSession::new(name("home"), 9, vec![status("a"), status("b")]);
        while agent.poll_transmit().is_some() {}
        agent.set_services(vec![status("a"), status("b")]);
        assert_eq!(agent.poll_transmit(), None, "same list: nothing to send");
        agent.set_services(vec![status("b"), status("c")]);
        assert_eq!(
            agent.poll_transmit(),
            Some(AgentToEdge::Services(vec![status("b"), status("c")]))
        );
    }

    #[test]
    fn wrong_version_is_refused_with_a_reason() {
        let mut edge = EdgeSession::new();
        let err = edge
            .handle_frame(AgentToEdge::Hello(Hello {
                version: PROTOCOL_VERSION + 1,
                agent: name("home"),
                instance: 9,
            }))
            .unwrap_err();
        assert!(matches!(err, ProtocolError::Unexpected { .. }));
        match edge.poll_transmit() {
            Some(EdgeToAgent::Refused(r)) => {
                assert_eq!(r.reason, RefuseReason::UnsupportedVersion);
                let expected = format!("version {}", PROTOCOL_VERSION + 1);
                assert!(r.message.contains(&expected), "{}", r.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn out_of_order_frames_are_protocol_errors() {
        let mut edge = EdgeSession::new();
        assert!(edge.handle_frame(AgentToEdge::Services(vec![])).is_err());

        let mut edge = EdgeSession::new();
        let hello = AgentToEdge::Hello(Hello {
            version: PROTOCOL_VERSION,
            agent: name("a"),
            instance: 9,
        });
        edge.handle_frame(hello.clone()).unwrap();
        edge.accept(1);
        assert!(edge.handle_frame(hello).is_err(), "a second hello");

        let mut agent = AgentSession::new(name("a"), 9, vec![]);
        let going = EdgeToAgent::GoingAway(GoingAway {
            reconnect_after: Duration::ZERO,
        });
        assert!(
            agent.handle_frame(going).is_err(),
            "going-away before welcome"
        );
        let mut agent = AgentSession::new(name("a"), 9, vec![]);
        let wake = EdgeToAgent::Wake(Wake {
            service: name("gpu"),
        });
        assert!(agent.handle_frame(wake).is_err(), "wake before welcome");
        // Nor does the edge ask before it has welcomed the agent.
        let mut edge = EdgeSession::new();
        edge.wake(name("gpu"));
        assert_eq!(edge.poll_transmit(), None);

        let mut agent = AgentSession::new(name("a"), 9, vec![]);
        assert!(matches!(
            agent.handle_end(),
            ProtocolError::Ended("before welcome")
        ));
    }

    #[test]
    fn refusal_reaches_the_agent() {
        let mut agent = AgentSession::new(name("a"), 9, vec![]);
        let mut edge = EdgeSession::new();
        agent_to_edge(&mut agent, &mut edge);
        edge.refuse(RefuseReason::NameMismatch, "key belongs to agent b".into());
        let events = edge_to_agent(&mut edge, &mut agent);
        assert!(
            matches!(&events[..], [AgentEvent::Refused(r)] if r.reason == RefuseReason::NameMismatch)
        );
    }

    #[test]
    fn frame_buf_is_bounded_and_keeps_the_remainder() {
        let mut buf = FrameBuf::new();
        assert_eq!(buf.space(), FrameBuf::CAPACITY);
        let mut wire = AgentToEdge::GoingAway(GoingAway {
            reconnect_after: Duration::ZERO,
        })
        .to_bytes();
        wire.extend_from_slice(b"raw");
        buf.push(&wire);
        assert!(buf.next_frame::<AgentToEdge>().unwrap().is_some());
        assert_eq!(&buf.into_remainder()[..], b"raw");
    }
}
