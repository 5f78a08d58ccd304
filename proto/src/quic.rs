//! QUIC settings both ends share: ALPN, keep-alive and idle timers, flow
//! control windows, UDP socket buffers, and the endpoint construction.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use quinn::{EndpointConfig, TransportConfig, VarInt};
use socket2::{Domain, Protocol, Socket, Type};

use crate::identity::EndpointKeys;

/// ALPN of the tunnel; the number is the wire format's major version.
pub const ALPN: &[u8] = b"burrow/1";

/// At most this many stateless resets a second leave an endpoint: 1,000.
pub const MIN_RESET_INTERVAL: Duration = Duration::from_millis(1);

/// Well under the 30 s UDP timeouts of common NATs.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// A connection silent this long is dead (six missed keep-alives).
///
/// Sized so that a busy link survives a blackout of up to about 30 s
/// (tests/faults.rs cuts one for 20 s). While the link is down, the
/// sender's probe timeout (PTO) doubles after every unanswered probe, so
/// with base `P` (srtt + 4·rttvar + max_ack_delay, about 40 ms on a fast
/// path) the probes leave at `P·(2^k − 1)` after the cut; keep-alives do
/// not help, as the congestion window is full of unacknowledged data. The
/// first probe after a blackout of `B` therefore leaves before `2B + P`,
/// and the session lives only if that is before the idle timeout, which
/// started at the cut. quinn has no setting that caps the backoff, so the
/// idle timeout is the lever. Measured over a 20 s cut of a busy link:
/// with 30 s the session died at 30.0 s; with 60 s events resumed 19.5 s
/// after the link returned, 39.5 s after the cut, the worst case above
/// (a probe left just before the link returned). 60 s keeps any blackout
/// up to `(60 s − P) / 2`. The cost: a peer that vanished
/// without a word (no close, no stateless reset) is noticed after 60 s
/// instead of 30 s.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Bandwidth-delay product the windows are sized for: 100 Mbit/s at 100 ms
/// is 1.25 MB. Twice that per stream lets one stream fill the path while
/// the application is slow to read.
pub const STREAM_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;
/// The connection's window is far larger than a stream's so that streams
/// stay independent: a stream whose reader stopped (a phone that stopped
/// reading a download) holds at most [`STREAM_RECEIVE_WINDOW`] of it, and
/// it takes 128 such streams at once before the others, the control stream
/// included, wait for credit. The edge caps what one client address can
/// have in flight well below that (`[limits] streams_per_ip`). The window
/// is credit, not memory: bytes are buffered only while a reader lags.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 128 * STREAM_RECEIVE_WINDOW;
pub const SEND_WINDOW: u64 = 16 * 1024 * 1024;

/// Requested UDP socket buffer size, each direction.
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// How many forwarded streams the edge may have open to one agent at once.
/// Beyond it, opening a stream waits (back-pressure) instead of failing.
/// Every open WebSocket or SSE stream holds one for its whole life, so this
/// is sized for 10,000 held WebSockets plus requests; memory stays bounded
/// by the connection receive window, not by the stream count.
pub const MAX_STREAMS_PER_AGENT: u32 = 16_384;
/// What the agent allows at first; [`StreamAllowance`] raises it toward
/// [`MAX_STREAMS_PER_AGENT`] as streams fill it. quinn sets up bookkeeping
/// for every stream the peer may open, up front: allowing 16,384 from the
/// start cost each agent 1.3 MiB before its first request.
pub const INITIAL_STREAMS_PER_AGENT: u32 = 1024;

/// The first RTT guess for a new connection. quinn's default (333 ms) makes
/// the first handshake retransmit wait a second; agents reconnecting to a
/// restarting edge retry sooner with this.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);

/// The SNI an agent sends when it pins the edge's key instead of checking a
/// public certificate; the edge answers it with its identity certificate.
pub const IDENTITY_SNI: &str = "burrow-identity.invalid";

/// Application error codes used when closing connections and streams.
pub mod code {
    use quinn::VarInt;
    /// Normal close.
    pub const OK: VarInt = VarInt::from_u32(0);
    /// The peer broke the protocol (bad or unexpected frame).
    pub const PROTOCOL: VarInt = VarInt::from_u32(1);
    /// The agent's key or name is not allowed.
    pub const REFUSED: VarInt = VarInt::from_u32(2);
    /// A newer session of the same agent replaced this one.
    pub const REPLACED: VarInt = VarInt::from_u32(3);
    /// The sender is shutting down; reconnect.
    pub const GOING_AWAY: VarInt = VarInt::from_u32(4);
    /// A forwarded stream was aborted (its client or service went away).
    pub const STREAM_ABORTED: VarInt = VarInt::from_u32(5);
}

/// The one rustls crypto provider in the tree, with the cipher suites in
/// burrow's order of preference.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::CryptoProvider {
        cipher_suites: PREFERRED_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    }
}

/// *ring*'s cipher suites, AES-128-GCM first: 128-bit keys are the level
/// TLS 1.3 and QUIC are built around (the one suite every implementation
/// must have), and AES-128 runs four fewer rounds per block than AES-256,
/// about a quarter less CPU per byte on the AES part. Go (Caddy) and
/// browsers order them the same way.
static PREFERRED_SUITES: &[rustls::SupportedCipherSuite] = {
    use rustls::crypto::ring::cipher_suite as s;
    &[
        s::TLS13_AES_128_GCM_SHA256,
        s::TLS13_AES_256_GCM_SHA384,
        s::TLS13_CHACHA20_POLY1305_SHA256,
        s::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        s::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        s::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        s::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        s::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        s::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

/// Which end a transport configuration is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Edge,
    Agent,
}

pub fn transport_config(role: Role) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(
            IDLE_TIMEOUT
                .try_into()
                .expect("IDLE_TIMEOUT fits a QUIC varint"),
        ))
        .stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW))
        .send_window(SEND_WINDOW)
        .initial_rtt(INITIAL_RTT)
        .datagram_receive_buffer_size(None)
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    match role {
        // The agent opens only its control stream.
        Role::Edge => t.max_concurrent_bidi_streams(VarInt::from_u32(1)),
        Role::Agent => t.max_concurrent_bidi_streams(VarInt::from_u32(INITIAL_STREAMS_PER_AGENT)),
    };
    t
}

/// How many streams the edge may have open to the agent at once, raised
/// ahead of need: once half of it is in use, it doubles, up to
/// [`MAX_STREAMS_PER_AGENT`]. It never shrinks; a burst that was served
/// once will likely come again.
#[derive(Debug)]
pub struct StreamAllowance {
    limit: u32,
    open: Arc<AtomicU32>,
    /// The most streams open at once so far.
    peak: u32,
}

/// Held by each accepted stream's task; counts the stream as open.
#[derive(Debug)]
pub struct StreamSlot(Arc<AtomicU32>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for StreamAllowance {
    fn default() -> Self {
        Self {
            limit: INITIAL_STREAMS_PER_AGENT,
            open: Arc::default(),
            peak: 0,
        }
    }
}

impl StreamAllowance {
    /// Streams accepted and not yet ended.
    pub fn open(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    /// The most streams open at once so far.
    pub fn peak(&self) -> u32 {
        self.peak
    }

    /// Starts counting the peak afresh from what is open now.
    pub fn forget_peak(&mut self) {
        self.peak = self.open();
    }

    /// Counts a newly accepted stream; returns the guard that uncounts it
    /// and, when the allowance should grow, the new limit to give quinn.
    pub fn accepted(&mut self) -> (StreamSlot, Option<u32>) {
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak = self.peak.max(open);
        let raise = (open > self.limit / 2 && self.limit < MAX_STREAMS_PER_AGENT).then(|| {
            self.limit = (self.limit * 2).min(MAX_STREAMS_PER_AGENT);
            self.limit
        });
        (StreamSlot(self.open.clone()), raise)
    }
}

/// What the kernel granted for the UDP socket buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    pub recv: usize,
    pub send: usize,
}

/// Binds a UDP socket with enlarged buffers (see [`with_buffers`]).
pub fn bind_udp(addr: SocketAddr) -> io::Result<(UdpSocket, SocketBuffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Accept IPv4 too on an unspecified IPv6 address, like most servers.
        let _ = socket.set_only_v6(false);
    }
    socket.bind(&addr.into())?;
    with_buffers(socket.into())
}

/// Enlarges the buffers of a bound UDP socket (one of [`bind_udp`]'s, or
/// one handed over already bound) and makes it non-blocking. Linux
/// silently caps the request at `net.core.rmem_max` / `wmem_max`; when it
/// bites, say so once, with the sysctl that lifts it.
pub fn with_buffers(socket: UdpSocket) -> io::Result<(UdpSocket, SocketBuffers)> {
    let socket = Socket::from(socket);
    socket.set_nonblocking(true)?;
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    let buffers = SocketBuffers {
        recv: socket.recv_buffer_size()?,
        send: socket.send_buffer_size()?,
    };
    // Linux reports twice the usable size; below the request means a cap.
    if buffers.recv < UDP_SOCKET_BUFFER || buffers.send < UDP_SOCKET_BUFFER {
        tracing::warn!(
            requested = UDP_SOCKET_BUFFER,
            recv = buffers.recv,
            send = buffers.send,
            "kernel capped UDP socket buffers; raise net.core.rmem_max and net.core.wmem_max for full throughput"
        );
    }
    Ok((socket.into(), buffers))
}

/// A quinn endpoint on `socket`; a server when `server` is given.
pub fn endpoint(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    keys: EndpointKeys,
) -> io::Result<quinn::Endpoint> {
    let mut config = EndpointConfig::new(Arc::new(keys.reset));
    let cid_key = keys.cid;
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            as Box<dyn quinn::ConnectionIdGenerator>
    });
    // After a crash, every agent learns its connection is gone from the
    // stateless reset the new process sends to its next packet. quinn's
    // default of one reset per 20 ms kept 1,000 agents away for up to 70 s
    // (the scale bench). Our connection IDs carry a keyed hash, so random
    // garbage gets no reset; a reset is smaller than the packet that asked
    // for it, so the worst (a forged ID from an observed one) is 1:1
    // reflection of at most 1,000 small packets a second.
    config.min_reset_interval(MIN_RESET_INTERVAL);
    quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_allowance_doubles_at_half_use_up_to_the_cap() {
        let mut a = StreamAllowance::default();
        let mut open = Vec::new();
        let mut raises = Vec::new();
        for n in 1..=MAX_STREAMS_PER_AGENT {
            let (guard, raise) = a.accepted();
            open.push(guard);
            if let Some(limit) = raise {
                raises.push((n, limit));
            }
        }
        assert_eq!(
            raises,
            [(513, 2048), (1025, 4096), (2049, 8192), (4097, 16_384)]
        );
        // Closed streams stop counting; the allowance never shrinks.
        open.clear();
        let (_g, raise) = a.accepted();
        assert_eq!((raise, a.limit), (None, MAX_STREAMS_PER_AGENT));
    }

    #[test]
    fn closed_streams_make_room_before_the_allowance_grows() {
        let mut a = StreamAllowance::default();
        for _ in 0..10 * INITIAL_STREAMS_PER_AGENT {
            // One at a time: never more than one open.
            let (guard, raise) = a.accepted();
            assert_eq!(raise, None);
            drop(guard);
        }
        assert_eq!(a.limit, INITIAL_STREAMS_PER_AGENT);
    }
}
