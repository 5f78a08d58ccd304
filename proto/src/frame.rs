//! The frames of the agent↔edge protocol, named by direction.
//!
//! Control frames travel on the one bidirectional stream the agent opens after
//! the QUIC handshake. Every other stream is opened by the edge and starts
//! with a [`StreamOpen`]; the agent answers with a [`StreamReply`], then both
//! directions carry the forwarded bytes unchanged.
//!
//! Wire format of every frame: `type: u8`, `length: u16` big endian, payload.
//! Integers are big endian; names are `u8`-length-prefixed; messages are
//! `u16`-length-prefixed UTF-8; socket addresses are `family (4|6)`, the
//! address bytes, then the port.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, BytesMut};

use crate::wire::{
    DecodeError, RawFrame, Reader, put_frame, put_message, put_name, put_socket_addr, split_frame,
};

/// The protocol version this build speaks. The ALPN (`burrow/1`) carries the
/// major version; this number lets a minor revision be refused with a clear
/// message instead of a confusing decode error.
///
/// Version 2 added the wake method to each service's status and the
/// edge's [`EdgeToAgent::Wake`] request; version 3 the protocol the edge
/// speaks to each service ([`Upstream`]); version 4 the agent's instance
/// in [`Hello`] (a session that moves from TCP to QUIC is not a second
/// agent) and [`AgentToEdge::Link`].
pub const PROTOCOL_VERSION: u16 = 4;

/// The most services one agent may announce.
pub const MAX_SERVICES: usize = 128;

/// Something that goes on the wire as one frame.
pub trait Frame: Sized {
    /// Appends the encoded frame to `out`.
    fn encode(&self, out: &mut BytesMut);

    /// Decodes one frame from the start of `buf`.
    ///
    /// `Ok(None)`: `buf` is a valid prefix, more bytes are needed.
    /// `Ok(Some((frame, used)))`: a frame and how many bytes it took.
    /// `Err(_)`: the bytes can never become a valid frame.
    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError>;

    /// Convenience: the frame's encoding as a fresh buffer.
    fn to_bytes(&self) -> BytesMut {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out
    }
}

/// A validated name of an agent or service (see [`crate::wire::is_valid_name`]).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(String);

impl Name {
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidName> {
        let name = name.into();
        if crate::wire::is_valid_name(name.as_bytes()) {
            Ok(Self(name))
        } else {
            Err(InvalidName(name))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl std::str::FromStr for Name {
    type Err = InvalidName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {0:?}: use 1 to 64 letters, digits, '.', '_' or '-'")]
pub struct InvalidName(pub String);

/// Whether a service can take traffic, as the agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceState {
    /// No probe result yet: traffic is attempted.
    Unknown,
    /// The last readiness probe passed.
    Up,
    /// The last probe failed, or a connect to the service did.
    Down,
    /// The agent is sending magic packets and waits for a probe to pass.
    Waking,
}

impl ServiceState {
    fn to_u8(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Up => 1,
            Self::Down => 2,
            Self::Waking => 3,
        }
    }

    fn from_u8(b: u8) -> Result<Self, DecodeError> {
        Ok(match b {
            0 => Self::Unknown,
            1 => Self::Up,
            2 => Self::Down,
            3 => Self::Waking,
            _ => {
                return Err(DecodeError::Invalid {
                    field: "service state",
                });
            }
        })
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
            Self::Waking => "waking",
        })
    }
}

/// Whether the agent can switch a service's machine on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WakeMethod {
    /// Nothing to wake: a down service stays down until someone fixes it.
    NotConfigured,
    /// The agent sends Wake-on-LAN magic packets on its network.
    MagicPacket,
}

impl WakeMethod {
    fn to_u8(self) -> u8 {
        match self {
            Self::NotConfigured => 0,
            Self::MagicPacket => 1,
        }
    }

    fn from_u8(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(Self::NotConfigured),
            1 => Ok(Self::MagicPacket),
            _ => Err(DecodeError::Invalid {
                field: "wake method",
            }),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceStatus {
    pub name: Name,
    pub state: ServiceState,
    pub wake: WakeMethod,
    pub upstream: Upstream,
}

/// What the edge speaks over a service's streams (the agent only moves
/// bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Upstream {
    /// HTTP/1.1 (`http://`), or raw bytes (`tcp://`).
    #[default]
    Http1,
    /// HTTP/2 without TLS, prior knowledge (`h2c://`): gRPC.
    H2c,
}

impl Upstream {
    fn to_u8(self) -> u8 {
        match self {
            Self::Http1 => 0,
            Self::H2c => 1,
        }
    }

    fn from_u8(b: u8) -> Result<Self, DecodeError> {
        match b {
            0 => Ok(Self::Http1),
            1 => Ok(Self::H2c),
            _ => Err(DecodeError::Invalid {
                field: "service upstream",
            }),
        }
    }
}

/// The first control frame, agent to edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub agent: Name,
    /// Random per agent process. A new session with the instance of one
    /// already connected is that agent moving to another transport (its
    /// old session drains); another instance with the same key is a
    /// second agent, and replaces the first.
    pub instance: u64,
}

/// How the agent's link came to be on its transport, for the edge's status
/// page: sent after the welcome, and again after each QUIC probe.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LinkReport {
    /// Why the agent is not on QUIC (empty when it is).
    pub fallback: String,
    /// The last QUIC probe made while on TCP: when and how it ended.
    pub probe: String,
}

/// Either side is shutting down; the peer should reconnect after the hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoingAway {
    pub reconnect_after: Duration,
}

/// Why the edge refused an agent's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    UnsupportedVersion,
    /// The agent's key is known but the name it gave is not the one configured for it.
    NameMismatch,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: RefuseReason,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    pub version: u16,
    /// Distinguishes this session from earlier ones of the same agent in logs.
    pub session: u64,
}

/// Control frames sent by the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentToEdge {
    Hello(Hello),
    /// The complete, current list of services and their states.
    Services(Vec<ServiceStatus>),
    GoingAway(GoingAway),
    Link(LinkReport),
}

/// The edge asks the agent to wake a service's machine: a request that
/// passed access control found it down or asleep.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    pub service: Name,
}

/// Control frames sent by the edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EdgeToAgent {
    Welcome(Welcome),
    Refused(Refused),
    GoingAway(GoingAway),
    Wake(Wake),
}

/// What a forwarded stream carries. The agent pipes bytes the same way for
/// all kinds; the kind is for its logs and for service-specific policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Tcp,
    Http,
    WebSocket,
    /// An HTTP/1.1 GET for a sleeping service's machine, answered by the
    /// agent from its cache of the service's last good answers without
    /// reaching (or waking) the machine; a path not cached gets a 404 with
    /// `X-Burrow-Cache: miss`. Refused when the agent keeps no cache for
    /// the service.
    Cached,
}

/// The header at the start of every stream the edge opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOpen {
    pub kind: StreamKind,
    pub service: Name,
    /// The user's address as the edge judged it.
    pub client: SocketAddr,
}

/// How the agent's attempt to reach a service went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStatus {
    /// Connected: forwarded bytes follow.
    Connected,
    UnknownService,
    /// The service refused or reset the connection.
    Refused,
    /// The service did not answer the connect in time.
    TimedOut,
}

/// The agent's answer to a [`StreamOpen`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReply {
    pub status: StreamStatus,
    pub message: String,
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const SERVICES: u8 = 0x02;
    pub const AGENT_GOING_AWAY: u8 = 0x03;
    pub const LINK_REPORT: u8 = 0x04;
    pub const STREAM_REPLY: u8 = 0x10;
    pub const WELCOME: u8 = 0x81;
    pub const REFUSED: u8 = 0x82;
    pub const EDGE_GOING_AWAY: u8 = 0x83;
    pub const WAKE: u8 = 0x84;
    pub const STREAM_OPEN: u8 = 0x90;
}

/// Runs `body` over a complete frame and checks it was consumed exactly.
fn decode_with<T>(
    buf: &[u8],
    body: impl FnOnce(&mut Reader<'_>, RawFrame<'_>) -> Result<T, DecodeError>,
) -> Result<Option<(T, usize)>, DecodeError> {
    let Some(raw) = split_frame(buf)? else {
        return Ok(None);
    };
    let mut r = Reader::new(raw);
    let value = body(&mut r, raw)?;
    r.finish()?;
    Ok(Some((value, raw.len())))
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

impl Frame for AgentToEdge {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            Self::Hello(h) => put_frame(out, ty::HELLO, |o| {
                o.put_u16(h.version);
                put_name(o, h.agent.as_str());
                o.put_u64(h.instance);
            }),
            Self::Services(list) => put_frame(out, ty::SERVICES, |o| {
                let list = &list[..list.len().min(MAX_SERVICES)];
                o.put_u16(u16::try_from(list.len()).expect("MAX_SERVICES fits in u16"));
                for s in list {
                    put_name(o, s.name.as_str());
                    o.put_u8(s.state.to_u8());
                    o.put_u8(s.wake.to_u8());
                    o.put_u8(s.upstream.to_u8());
                }
            }),
            Self::GoingAway(g) => put_frame(out, ty::AGENT_GOING_AWAY, |o| {
                o.put_u32(millis(g.reconnect_after));
            }),
            Self::Link(l) => put_frame(out, ty::LINK_REPORT, |o| {
                put_message(o, &l.fallback);
                put_message(o, &l.probe);
            }),
        }
    }

    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        decode_with(buf, |r, raw| {
            Ok(match raw.ty {
                ty::HELLO => {
                    let version = r.u16()?;
                    let agent = Name(r.name("agent name")?);
                    // Agents before version 4 send no instance; the
                    // session refuses their version with a clear message.
                    let instance = if r.is_empty() { 0 } else { r.u64()? };
                    Self::Hello(Hello {
                        version,
                        agent,
                        instance,
                    })
                }
                ty::LINK_REPORT => Self::Link(LinkReport {
                    fallback: r.message("fallback reason")?,
                    probe: r.message("probe result")?,
                }),
                ty::SERVICES => {
                    let n = usize::from(r.u16()?);
                    if n > MAX_SERVICES {
                        return Err(DecodeError::Invalid {
                            field: "service count",
                        });
                    }
                    let mut list = Vec::with_capacity(n);
                    for _ in 0..n {
                        list.push(ServiceStatus {
                            name: Name(r.name("service name")?),
                            state: ServiceState::from_u8(r.u8()?)?,
                            wake: WakeMethod::from_u8(r.u8()?)?,
                            upstream: Upstream::from_u8(r.u8()?)?,
                        });
                    }
                    Self::Services(list)
                }
                ty::AGENT_GOING_AWAY => Self::GoingAway(GoingAway {
                    reconnect_after: Duration::from_millis(r.u32()?.into()),
                }),
                other => return Err(DecodeError::UnknownType(other)),
            })
        })
    }
}

impl Frame for EdgeToAgent {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            Self::Welcome(w) => put_frame(out, ty::WELCOME, |o| {
                o.put_u16(w.version);
                o.put_u64(w.session);
            }),
            Self::Refused(r) => put_frame(out, ty::REFUSED, |o| {
                o.put_u8(match r.reason {
                    RefuseReason::UnsupportedVersion => 1,
                    RefuseReason::NameMismatch => 2,
                    RefuseReason::Other => 0,
                });
                put_message(o, &r.message);
            }),
            Self::GoingAway(g) => put_frame(out, ty::EDGE_GOING_AWAY, |o| {
                o.put_u32(millis(g.reconnect_after));
            }),
            Self::Wake(w) => put_frame(out, ty::WAKE, |o| {
                put_name(o, w.service.as_str());
            }),
        }
    }

    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        decode_with(buf, |r, raw| {
            Ok(match raw.ty {
                ty::WELCOME => Self::Welcome(Welcome {
                    version: r.u16()?,
                    session: r.u64()?,
                }),
                ty::REFUSED => Self::Refused(Refused {
                    reason: match r.u8()? {
                        1 => RefuseReason::UnsupportedVersion,
                        2 => RefuseReason::NameMismatch,
                        // Unknown reasons from a newer edge still refuse.
                        _ => RefuseReason::Other,
                    },
                    message: r.message("refusal message")?,
                }),
                ty::EDGE_GOING_AWAY => Self::GoingAway(GoingAway {
                    reconnect_after: Duration::from_millis(r.u32()?.into()),
                }),
                ty::WAKE => Self::Wake(Wake {
                    service: Name(r.name("service name")?),
                }),
                other => return Err(DecodeError::UnknownType(other)),
            })
        })
    }
}

impl Frame for StreamOpen {
    fn encode(&self, out: &mut BytesMut) {
        put_frame(out, ty::STREAM_OPEN, |o| {
            o.put_u8(match self.kind {
                StreamKind::Tcp => 1,
                StreamKind::Http => 2,
                StreamKind::WebSocket => 3,
                StreamKind::Cached => 4,
            });
            put_name(o, self.service.as_str());
            put_socket_addr(o, self.client);
        })
    }

    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        decode_with(buf, |r, raw| {
            if raw.ty != ty::STREAM_OPEN {
                return Err(DecodeError::UnknownType(raw.ty));
            }
            Ok(Self {
                kind: match r.u8()? {
                    1 => StreamKind::Tcp,
                    2 => StreamKind::Http,
                    3 => StreamKind::WebSocket,
                    4 => StreamKind::Cached,
                    _ => {
                        return Err(DecodeError::Invalid {
                            field: "stream kind",
                        });
                    }
                },
                service: Name(r.name("service name")?),
                client: r.socket_addr()?,
            })
        })
    }
}

impl Frame for StreamReply {
    fn encode(&self, out: &mut BytesMut) {
        put_frame(out, ty::STREAM_REPLY, |o| {
            o.put_u8(match self.status {
                StreamStatus::Connected => 0,
                StreamStatus::UnknownService => 1,
                StreamStatus::Refused => 2,
                StreamStatus::TimedOut => 3,
            });
            put_message(o, &self.message);
        })
    }

    fn decode(buf: &[u8]) -> Result<Option<(Self, usize)>, DecodeError> {
        decode_with(buf, |r, raw| {
            if raw.ty != ty::STREAM_REPLY {
                return Err(DecodeError::UnknownType(raw.ty));
            }
            Ok(Self {
                status: match r.u8()? {
                    0 => StreamStatus::Connected,
                    1 => StreamStatus::UnknownService,
                    2 => StreamStatus::Refused,
                    3 => StreamStatus::TimedOut,
                    _ => {
                        return Err(DecodeError::Invalid {
                            field: "stream status",
                        });
                    }
                },
                message: r.message("stream message")?,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    fn name(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Every sample frame with its exact encoding. A change here is a wire
    /// format change: bump the ALPN or PROTOCOL_VERSION with it.
    fn agent_samples() -> Vec<(AgentToEdge, &'static str)> {
        vec![
            (
                AgentToEdge::Hello(Hello {
                    version: 1,
                    agent: name("home"),
                    instance: 0x0102030405060708,
                }),
                "01000f000104686f6d650102030405060708",
            ),
            (
                AgentToEdge::Link(LinkReport {
                    fallback: "udp".into(),
                    probe: String::new(),
                }),
                "04000700037564700000",
            ),
            (
                AgentToEdge::Services(vec![
                    ServiceStatus {
                        name: name("webui"),
                        state: ServiceState::Up,
                        wake: WakeMethod::NotConfigured,
                        upstream: Upstream::Http1,
                    },
                    ServiceStatus {
                        name: name("ollama"),
                        state: ServiceState::Waking,
                        wake: WakeMethod::MagicPacket,
                        upstream: Upstream::H2c,
                    },
                ]),
                "0200150002057765627569010000066f6c6c616d61030101",
            ),
            (AgentToEdge::Services(vec![]), "0200020000"),
            (
                AgentToEdge::GoingAway(GoingAway {
                    reconnect_after: Duration::from_millis(250),
                }),
                "030004000000fa",
            ),
        ]
    }

    fn edge_samples() -> Vec<(EdgeToAgent, &'static str)> {
        vec![
            (
                EdgeToAgent::Welcome(Welcome {
                    version: 1,
                    session: 0x0102030405060708,
                }),
                "81000a00010102030405060708",
            ),
            (
                EdgeToAgent::Refused(Refused {
                    reason: RefuseReason::NameMismatch,
                    message: "no".into(),
                }),
                "8200050200026e6f",
            ),
            (
                EdgeToAgent::GoingAway(GoingAway {
                    reconnect_after: Duration::ZERO,
                }),
                "83000400000000",
            ),
            (
                EdgeToAgent::Wake(Wake {
                    service: name("ollama"),
                }),
                "840007066f6c6c616d61",
            ),
        ]
    }

    fn open_samples() -> Vec<(StreamOpen, &'static str)> {
        vec![
            (
                StreamOpen {
                    kind: StreamKind::Tcp,
                    service: name("ssh"),
                    client: SocketAddr::new(Ipv4Addr::new(198, 51, 100, 7).into(), 50000),
                },
                "90000c010373736804c6336407c350",
            ),
            (
                StreamOpen {
                    kind: StreamKind::WebSocket,
                    service: name("w"),
                    client: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 443),
                },
                "900016030177060000000000000000000000000000000101bb",
            ),
            (
                StreamOpen {
                    kind: StreamKind::Cached,
                    service: name("o"),
                    client: SocketAddr::new(Ipv4Addr::new(192, 0, 2, 1).into(), 1),
                },
                "90000a04016f04c00002010001",
            ),
        ]
    }

    fn reply_samples() -> Vec<(StreamReply, &'static str)> {
        vec![
            (
                StreamReply {
                    status: StreamStatus::Connected,
                    message: String::new(),
                },
                "100003000000",
            ),
            (
                StreamReply {
                    status: StreamStatus::Refused,
                    message: "ECONNREFUSED".into(),
                },
                "10000f02000c45434f4e4e52454655534544",
            ),
        ]
    }

    /// Round trip, exact bytes, and every split point: each strict prefix
    /// asks for more bytes, the whole decodes to the same frame.
    fn check<F: Frame + PartialEq + fmt::Debug>(samples: Vec<(F, &'static str)>) {
        for (frame, expected_hex) in samples {
            let bytes = frame.to_bytes();
            assert_eq!(hex(&bytes), expected_hex, "encoding of {frame:?}");
            for cut in 0..bytes.len() {
                assert_eq!(
                    F::decode(&bytes[..cut]).unwrap(),
                    None,
                    "prefix {cut} of {frame:?}"
                );
            }
            let (decoded, used) = F::decode(&bytes).unwrap().unwrap();
            assert_eq!(decoded, frame);
            assert_eq!(used, bytes.len());
            // A following frame's bytes are left alone.
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes);
            let (_, used) = F::decode(&two).unwrap().unwrap();
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn agent_to_edge_snapshots() {
        check(agent_samples());
    }

    #[test]
    fn edge_to_agent_snapshots() {
        check(edge_samples());
    }

    #[test]
    fn stream_open_snapshots() {
        check(open_samples());
    }

    #[test]
    fn stream_reply_snapshots() {
        check(reply_samples());
    }

    #[test]
    fn bad_bytes_are_errors_not_panics() {
        // Unknown type.
        assert_eq!(
            AgentToEdge::decode(&[0x7f, 0, 0]),
            Err(DecodeError::UnknownType(0x7f))
        );
        // Edge frames are not agent frames.
        assert!(AgentToEdge::decode(&edge_samples()[0].0.to_bytes()).is_err());
        // A name with a space.
        assert_eq!(
            AgentToEdge::decode(&[0x01, 0, 5, 0, 1, 2, b'a', b' ']),
            Err(DecodeError::Invalid {
                field: "agent name"
            })
        );
        // A name length that runs past the payload.
        assert_eq!(
            AgentToEdge::decode(&[0x01, 0, 4, 0, 1, 9, b'a']),
            Err(DecodeError::Truncated { ty: 0x01 })
        );
        // Trailing bytes inside the payload.
        assert_eq!(
            EdgeToAgent::decode(&[0x83, 0, 5, 0, 0, 0, 0, 9]),
            Err(DecodeError::Trailing { ty: 0x83, extra: 1 })
        );
        // Too many services.
        let n = u16::try_from(MAX_SERVICES + 1).unwrap().to_be_bytes();
        assert_eq!(
            AgentToEdge::decode(&[0x02, 0, 2, n[0], n[1]]),
            Err(DecodeError::Invalid {
                field: "service count"
            })
        );
        // A wake method from the future.
        assert_eq!(
            AgentToEdge::decode(&[0x02, 0, 6, 0, 1, 1, b'a', 1, 9]),
            Err(DecodeError::Invalid {
                field: "wake method"
            })
        );
        // A wake request for a name that is not one.
        assert_eq!(
            EdgeToAgent::decode(&[0x84, 0, 2, 1, b'/']),
            Err(DecodeError::Invalid {
                field: "service name"
            })
        );
        // Bad address family and bad kind.
        assert_eq!(
            StreamOpen::decode(&[0x90, 0, 5, 1, 1, b'a', 5, 0]),
            Err(DecodeError::Invalid {
                field: "address family"
            })
        );
        assert_eq!(
            StreamOpen::decode(&[0x90, 0, 1, 9]),
            Err(DecodeError::Invalid {
                field: "stream kind"
            })
        );
        // Invalid UTF-8 in a message.
        assert_eq!(
            StreamReply::decode(&[0x10, 0, 4, 0, 0, 1, 0xff]),
            Err(DecodeError::Invalid {
                field: "stream message"
            })
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic sweep; the fuzz targets go much further.
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 40) as usize;
            let mut buf = Vec::with_capacity(len);
            let mut s = state;
            for _ in 0..len {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                buf.push((s >> 56) as u8);
            }
            // Steer the type byte towards real types half of the time.
            if let Some(first) = buf.first_mut() {
                if state & 1 == 0 {
                    *first = [0x01, 0x02, 0x03, 0x10, 0x81, 0x82, 0x83, 0x84, 0x90]
                        [(state >> 8) as usize % 9];
                }
            }
            let _ = AgentToEdge::decode(&buf);
            let _ = EdgeToAgent::decode(&buf);
            let _ = StreamOpen::decode(&buf);
            let _ = StreamReply::decode(&buf);
        }
    }
}
