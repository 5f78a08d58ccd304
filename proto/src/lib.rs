//! burrow's agent↔edge protocol.
//!
//! The core ([`frame`], [`session`], [`wire`]) is sans-IO: it turns bytes into
//! frames and frames into events and replies, with no sockets, clocks or
//! async runtime, so it can be tested byte by byte and fuzzed. The `runtime`
//! feature adds what both daemons share around it: identity keys and
//! pinned-key TLS ([`identity`]), QUIC settings ([`quic`]), stream pipes
//! ([`pipe`]) and config loading ([`confkit`]).

#![forbid(unsafe_code)]

pub mod frame;
pub mod session;
pub mod wire;

#[cfg(feature = "runtime")]
pub mod confkit;
#[cfg(feature = "runtime")]
pub mod framed;
#[cfg(feature = "runtime")]
pub mod fsutil;
#[cfg(feature = "runtime")]
pub mod identity;
#[cfg(feature = "runtime")]
pub mod link;
#[cfg(feature = "runtime")]
pub mod listener;
#[cfg(feature = "runtime")]
pub mod pipe;
#[cfg(feature = "runtime")]
pub mod quic;

pub use frame::{
    AgentToEdge, EdgeToAgent, Frame, LinkReport, Name, ServiceState, ServiceStatus, StreamKind,
    StreamOpen, StreamReply, StreamStatus, Upstream, Wake, WakeMethod,
};
pub use session::{AgentEvent, AgentSession, EdgeEvent, EdgeSession, FrameBuf, ProtocolError};
pub use wire::DecodeError;
