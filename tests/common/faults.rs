//! A seeded fault-injecting UDP relay for the agent's link to the edge:
//! loss, burst loss, delay with jitter, reordering, blackouts and NAT
//! rebinding, set per direction, with counters that show each fault really
//! happened.
//!
//! The agent dials [`Relay::addr`]. For each agent source address the relay
//! keeps a mapping: an upstream socket to the edge's tunnel, as a home NAT
//! does; [`Relay::rebind`] replaces it with a fresh port, so the edge sees
//! the agent move. What happens to each packet is decided by [`Judge`],
//! which takes the direction and `now` and returns a verdict; the sockets
//! and timers around it only move bytes.
//!
//! [`Relay::start_pair`] adds a [`TcpRelay`] on the same port number, to the
//! edge's HTTPS listener: the agent's TLS-over-TCP fallback, with the
//! byte-level faults TCP can have (stall, cut). Cut the UDP relay and keep
//! the TCP one: a network that blocks UDP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Largest datagram the relay carries; quinn's are far smaller.
const MAX_DATAGRAM: usize = 65_535;
/// Packets one direction may hold in its delay line; beyond it the relay
/// drops (and counts) them, as a router with a full queue does.
pub const MAX_QUEUED: usize = 16_384;
/// Agent source addresses the relay keeps mappings for; packets from more
/// are dropped.
pub const MAX_MAPPINGS: usize = 256;
/// How long past its turn a reordered packet is held, so that the packets
/// behind it overtake it.
pub const REORDER_HOLD: Duration = Duration::from_millis(5);

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    AgentToEdge,
    EdgeToAgent,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::AgentToEdge, Direction::EdgeToAgent];

    fn index(self) -> usize {
        match self {
            Direction::AgentToEdge => 0,
            Direction::EdgeToAgent => 1,
        }
    }
}

/// Loss in bursts: at each packet a burst starts with probability `start`
/// and drops that packet and the `len - 1` after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Burst {
    pub start: f64,
    pub len: u32,
}

impl Burst {
    /// Bursts of `len` packets whose long-run share of dropped packets is
    /// `loss`. A burst takes `len` packets and any other packet one, so the
    /// share is `s·len / (s·len + 1 − s)`; solved for `s`.
    pub fn with_average_loss(loss: f64, len: u32) -> Self {
        let len_f = f64::from(len);
        Self {
            start: loss / (len_f - loss * (len_f - 1.0)),
            len,
        }
    }
}

/// What happens to one direction's packets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Probability that a packet is lost, each packet on its own.
    pub loss: f64,
    /// Loss in bursts, on top of `loss`.
    pub burst: Option<Burst>,
    /// How long every packet takes.
    pub delay: Duration,
    /// Extra delay per packet, uniform in `0..=jitter`. Packets keep their
    /// order: one is never released before the one ahead of it.
    pub jitter: Duration,
    /// Probability that a packet is held [`REORDER_HOLD`] past its turn.
    pub reorder: f64,
}

/// What the relay did with one direction's packets so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub forwarded: u64,
    /// Dropped by independent loss.
    pub lost: u64,
    /// Dropped inside a loss burst.
    pub burst_lost: u64,
    /// Dropped because the link was cut.
    pub blacked_out: u64,
    /// Dropped because the delay line was full.
    pub overflowed: u64,
    /// Edge-to-agent packets that reached a mapping [`Relay::rebind`] had
    /// retired (a NAT drops them).
    pub stale: u64,
    /// Forwarded, but held back so that later packets overtook them.
    pub reordered: u64,
}

impl Counters {
    pub fn dropped(&self) -> u64 {
        self.lost + self.burst_lost + self.blacked_out + self.overflowed + self.stale
    }

    /// Dropped by loss (independent or in bursts) per packet seen.
    pub fn loss_ratio(&self) -> f64 {
        let lost = self.lost + self.burst_lost;
        lost as f64 / (lost + self.forwarded).max(1) as f64
    }
}

/// One mapping the relay has used: its upstream port and how many packets
/// the edge sent to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortStats {
    pub agent: SocketAddr,
    pub port: u16,
    pub from_edge: u64,
}

/// SplitMix64: small, seeded, and the same on every platform.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }
}

/// The verdict on one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send it at `at`.
    Forward {
        at: Instant,
        turn: Turn,
    },
    Drop,
}

/// Whether a forwarded packet keeps its place in the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    InOrder,
    /// Held back; packets behind it may leave first.
    HeldBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Up,
    Cut,
}

/// One direction's state: its faults, its own random stream (so traffic
/// one way does not change the other way's verdicts) and its counters.
#[derive(Debug)]
struct Lane {
    faults: Faults,
    rng: Rng,
    burst_left: u32,
    /// When the last in-order packet leaves; none leaves before it.
    last_release: Option<Instant>,
    counters: Counters,
}

/// The relay's decisions, free of sockets and timers.
#[derive(Debug)]
pub struct Judge {
    lanes: [Lane; 2],
    link: Link,
}

impl Judge {
    pub fn new(seed: u64) -> Self {
        let lane = |salt: u64| Lane {
            faults: Faults::default(),
            rng: Rng(seed ^ salt),
            burst_left: 0,
            last_release: None,
            counters: Counters::default(),
        };
        Self {
            lanes: [lane(0x6167_656e_7432_6564), lane(0x6564_6765_3261_6774)],
            link: Link::Up,
        }
    }

    /// A packet arrived at `now`: drop it, or send it when?
    pub fn handle_packet(&mut self, dir: Direction, now: Instant) -> Verdict {
        let link = self.link;
        let lane = &mut self.lanes[dir.index()];
        if link == Link::Cut {
            lane.counters.blacked_out += 1;
            return Verdict::Drop;
        }
        if lane.burst_left > 0 {
            lane.burst_left -= 1;
            lane.counters.burst_lost += 1;
            return Verdict::Drop;
        }
        if let Some(burst) = lane.faults.burst
            && lane.rng.chance(burst.start)
        {
            lane.burst_left = burst.len.saturating_sub(1);
            lane.counters.burst_lost += 1;
            return Verdict::Drop;
        }
        if lane.rng.chance(lane.faults.loss) {
            lane.counters.lost += 1;
            return Verdict::Drop;
        }
        let jitter = lane.faults.jitter.mul_f64(lane.rng.unit());
        let at = now + lane.faults.delay + jitter;
        if lane.rng.chance(lane.faults.reorder) {
            lane.counters.reordered += 1;
            return Verdict::Forward {
                at: at + REORDER_HOLD,
                turn: Turn::HeldBack,
            };
        }
        let at = lane.last_release.map_or(at, |last| at.max(last));
        lane.last_release = Some(at);
        Verdict::Forward {
            at,
            turn: Turn::InOrder,
        }
    }

    /// A packet's time came: sent if the link is up (it may have been cut
    /// while the packet waited).
    pub fn handle_release(&mut self, dir: Direction) -> Link {
        let counters = &mut self.lanes[dir.index()].counters;
        match self.link {
            Link::Up => counters.forwarded += 1,
            Link::Cut => counters.blacked_out += 1,
        }
        self.link
    }

    pub fn set_faults(&mut self, dir: Direction, faults: Faults) {
        let lane = &mut self.lanes[dir.index()];
        lane.faults = faults;
        lane.burst_left = 0;
    }

    pub fn set_link(&mut self, link: Link) {
        self.link = link;
    }

    pub fn counters(&self, dir: Direction) -> Counters {
        self.lanes[dir.index()].counters
    }

    fn count_stale(&mut self) {
        self.lanes[Direction::EdgeToAgent.index()].counters.stale += 1;
    }

    fn count_overflow(&mut self, dir: Direction) {
        self.lanes[dir.index()].counters.overflowed += 1;
    }
}

/// One upstream socket standing for an agent address, as a NAT mapping.
struct Mapping {
    socket: Arc<UdpSocket>,
    port: u16,
    from_edge: AtomicU64,
    retired: AtomicBool,
}

/// One agent source address and its mappings, the current one last.
struct Flow {
    agent: SocketAddr,
    mappings: Mutex<Vec<Arc<Mapping>>>,
}

impl Flow {
    fn current(&self) -> Arc<Mapping> {
        self.mappings
            .lock()
            .unwrap()
            .last()
            .expect("a flow is made with a mapping")
            .clone()
    }
}

/// A packet in a delay line.
struct Delayed {
    at: Instant,
    dir: Direction,
    bytes: Vec<u8>,
    flow: Arc<Flow>,
}

struct Shared {
    upstream: SocketAddr,
    front: Arc<UdpSocket>,
    judge: Mutex<Judge>,
    flows: Mutex<HashMap<SocketAddr, Arc<Flow>>>,
    lines: [mpsc::Sender<Delayed>; 2],
    /// Held-back packets waiting in timers of their own.
    held: AtomicUsize,
    stop: CancellationToken,
}

/// The relay; stops when dropped.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// A UDP socket on loopback, port 0, with large buffers so that the
/// kernel drops nothing the judge did not decide to drop.
fn bind_loopback() -> UdpSocket {
    bind_loopback_on(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Like [`bind_loopback`], on another loopback address (127.0.0.0/8).
fn bind_loopback_on(ip: std::net::IpAddr) -> UdpSocket {
    let (socket, _) = burrow_proto::quic::bind_udp(SocketAddr::new(ip, 0))
        .expect("relay binds a loopback UDP socket");
    socket.set_nonblocking(true).unwrap();
    UdpSocket::from_std(socket).expect("relay socket joins the runtime")
}

impl Relay {
    /// Starts a relay to `upstream` (the edge's tunnel) with no faults;
    /// `seed` fixes every random verdict.
    pub fn start(upstream: SocketAddr, seed: u64) -> Relay {
        Self::start_on(bind_loopback(), upstream, seed)
    }

    /// A UDP relay to `udp_upstream` and a TCP relay to `tcp_upstream` on
    /// one loopback port, as an edge's `host:443` is UDP and TCP 443.
    pub fn start_pair(
        udp_upstream: SocketAddr,
        tcp_upstream: SocketAddr,
        seed: u64,
    ) -> (Relay, TcpRelay) {
        // The UDP port's number may be taken for TCP: try another.
        for _ in 0..100 {
            let front = bind_loopback();
            let port = front.local_addr().unwrap().port();
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                let udp = Self::start_on(front, udp_upstream, seed);
                return (udp, TcpRelay::start(listener, tcp_upstream));
            }
        }
        panic!("no loopback port free for both UDP and TCP in 100 tries");
    }

    fn start_on(front: UdpSocket, upstream: SocketAddr, seed: u64) -> Relay {
        let front = Arc::new(front);
        let addr = front.local_addr().unwrap();
        let (to_edge, to_edge_rx) = mpsc::channel(MAX_QUEUED);
        let (to_agent, to_agent_rx) = mpsc::channel(MAX_QUEUED);
        let shared = Arc::new(Shared {
            upstream,
            front,
            judge: Mutex::new(Judge::new(seed)),
            flows: Mutex::new(HashMap::new()),
            lines: [to_edge, to_agent],
            held: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(shared.clone().run_line(to_edge_rx));
        tokio::spawn(shared.clone().run_line(to_agent_rx));
        tokio::spawn(shared.clone().run_front());
        Relay { addr, shared }
    }

    /// Where the agent should dial.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the same faults both ways.
    pub fn set(&self, faults: Faults) {
        for dir in Direction::BOTH {
            self.set_direction(dir, faults.clone());
        }
    }

    pub fn set_direction(&self, dir: Direction, faults: Faults) {
        self.shared.judge.lock().unwrap().set_faults(dir, faults);
    }

    /// Cuts the link: every packet, either way, is dropped, also those
    /// already in a delay line.
    pub fn cut(&self) {
        self.shared.judge.lock().unwrap().set_link(Link::Cut);
    }

    pub fn restore(&self) {
        self.shared.judge.lock().unwrap().set_link(Link::Up);
    }

    /// Gives every agent address a fresh upstream port, as a NAT that lost
    /// its mappings does; the old ports stop forwarding. Returns how many
    /// mappings moved.
    pub fn rebind(&self) -> usize {
        self.rebind_to(std::net::Ipv4Addr::LOCALHOST.into())
    }

    /// Like [`Relay::rebind`], with the new mappings on `ip` (another
    /// loopback address): the agent's address changes, not only its port,
    /// as when a phone's hotspot or a redialled router hands out another.
    pub fn rebind_to(&self, ip: std::net::IpAddr) -> usize {
        let flows: Vec<Arc<Flow>> = self
            .shared
            .flows
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        for flow in &flows {
            let old = flow.current();
            let new = self.shared.clone().map_on(flow.clone(), ip);
            old.retired.store(true, Ordering::Relaxed);
            tracing::debug!(agent = %flow.agent, from = old.port, to = new.port, "relay rebinds");
        }
        flows.len()
    }

    pub fn counters(&self, dir: Direction) -> Counters {
        self.shared.judge.lock().unwrap().counters(dir)
    }

    /// Every mapping so far, oldest first per agent address.
    pub fn ports(&self) -> Vec<PortStats> {
        let flows = self.shared.flows.lock().unwrap();
        let mut out = Vec::new();
        for flow in flows.values() {
            for m in flow.mappings.lock().unwrap().iter() {
                out.push(PortStats {
                    agent: flow.agent,
                    port: m.port,
                    from_edge: m.from_edge.load(Ordering::Relaxed),
                });
            }
        }
        out
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Shared {
    /// Agent to edge: reads the front socket, finds or makes the agent
    /// address's mapping, and hands the packet to the judge.
    async fn run_front(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from) = tokio::select! {
                r = self.front.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "relay front socket");
                        continue;
                    }
                },
                () = self.stop.cancelled() => return,
            };
            let Some(flow) = self.clone().flow(from) else {
                continue;
            };
            self.admit(Direction::AgentToEdge, buf[..n].to_vec(), flow);
        }
    }

    fn flow(self: Arc<Self>, agent: SocketAddr) -> Option<Arc<Flow>> {
        let mut flows = self.flows.lock().unwrap();
        if let Some(f) = flows.get(&agent) {
            return Some(f.clone());
        }
        if flows.len() >= MAX_MAPPINGS {
            return None;
        }
        let flow = Arc::new(Flow {
            agent,
            mappings: Mutex::new(Vec::new()),
        });
        flows.insert(agent, flow.clone());
        drop(flows);
        self.map(flow.clone());
        Some(flow)
    }

    /// Binds a fresh upstream socket for `flow`, makes it the current
    /// mapping and starts reading what the edge sends to it.
    fn map(self: Arc<Self>, flow: Arc<Flow>) -> Arc<Mapping> {
        self.map_on(flow, std::net::Ipv4Addr::LOCALHOST.into())
    }

    fn map_on(self: Arc<Self>, flow: Arc<Flow>, ip: std::net::IpAddr) -> Arc<Mapping> {
        let socket = Arc::new(bind_loopback_on(ip));
        let port = socket.local_addr().unwrap().port();
        let mapping = Arc::new(Mapping {
            socket,
            port,
            from_edge: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        });
        flow.mappings.lock().unwrap().push(mapping.clone());
        tokio::spawn(self.run_upstream(flow, mapping.clone()));
        mapping
    }

    /// Edge to agent, for one mapping.
    async fn run_upstream(self: Arc<Self>, flow: Arc<Flow>, mapping: Arc<Mapping>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        loop {
            let (n, from) = tokio::select! {
                r = mapping.socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::debug!(error = %e, "relay upstream socket");
                        continue;
                    }
                },
                () = self.stop.cancelled() => return,
            };
            if from != self.upstream {
                continue;
            }
            mapping.from_edge.fetch_add(1, Ordering::Relaxed);
            if mapping.retired.load(Ordering::Relaxed) {
                self.judge.lock().unwrap().count_stale();
                continue;
            }
            self.admit(Direction::EdgeToAgent, buf[..n].to_vec(), flow.clone());
        }
    }

    fn admit(self: &Arc<Self>, dir: Direction, bytes: Vec<u8>, flow: Arc<Flow>) {
        let verdict = self
            .judge
            .lock()
            .unwrap()
            .handle_packet(dir, Instant::now());
        let Verdict::Forward { at, turn } = verdict else {
            return;
        };
        let packet = Delayed {
            at,
            dir,
            bytes,
            flow,
        };
        let queued = match turn {
            Turn::InOrder => self.lines[dir.index()].try_send(packet).is_ok(),
            Turn::HeldBack => self.hold(packet),
        };
        if !queued {
            self.judge.lock().unwrap().count_overflow(dir);
        }
    }

    /// Sends `packet` at its time from a timer of its own, so the packets
    /// behind it in the line overtake it. False when too many are held.
    fn hold(self: &Arc<Self>, packet: Delayed) -> bool {
        if self.held.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.held.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(packet.at) => shared.deliver(packet).await,
                () = shared.stop.cancelled() => {}
            }
            shared.held.fetch_sub(1, Ordering::Relaxed);
        });
        true
    }

    /// One direction's delay line. Release times of in-order packets never
    /// decrease ([`Judge`] sees to it), so a queue with one timer keeps
    /// them in order and never blocks the sockets' loops.
    async fn run_line(self: Arc<Self>, mut rx: mpsc::Receiver<Delayed>) {
        loop {
            let packet = tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
                () = self.stop.cancelled() => return,
            };
            tokio::select! {
                () = tokio::time::sleep_until(packet.at) => {}
                () = self.stop.cancelled() => return,
            }
            self.deliver(packet).await;
        }
    }

    async fn deliver(&self, packet: Delayed) {
        if self.judge.lock().unwrap().handle_release(packet.dir) == Link::Cut {
            return;
        }
        let _ = match packet.dir {
            Direction::AgentToEdge => {
                let mapping = packet.flow.current();
                mapping.socket.send_to(&packet.bytes, self.upstream).await
            }
            Direction::EdgeToAgent => self.front.send_to(&packet.bytes, packet.flow.agent).await,
        };
    }
}

/// A TCP relay: each accepted connection is piped to `upstream`, until
/// [`TcpRelay::cut`] resets the ones open and refuses new ones (until
/// [`TcpRelay::restore`]), or while [`TcpRelay::stall`] holds every byte.
pub struct TcpRelay {
    shared: Arc<TcpShared>,
}

struct TcpShared {
    upstream: SocketAddr,
    /// Replaced at each cut; connections end when theirs is cancelled.
    generation: Mutex<CancellationToken>,
    refusing: AtomicBool,
    stalled: tokio::sync::watch::Sender<bool>,
    accepted: AtomicU64,
    open: AtomicUsize,
    stop: CancellationToken,
}

impl TcpRelay {
    fn start(listener: std::net::TcpListener, upstream: SocketAddr) -> TcpRelay {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let shared = Arc::new(TcpShared {
            upstream,
            generation: Mutex::new(CancellationToken::new()),
            refusing: AtomicBool::new(false),
            stalled: tokio::sync::watch::channel(false).0,
            accepted: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        });
        tokio::spawn(shared.clone().run(listener));
        TcpRelay { shared }
    }

    /// Connections accepted (and piped) so far.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.shared.refusing.store(true, Ordering::Relaxed);
        let old = std::mem::take(&mut *self.shared.generation.lock().unwrap());
        old.cancel();
    }

    pub fn restore(&self) {
        self.shared.refusing.store(false, Ordering::Relaxed);
    }

    /// Holds every byte either way while `on`.
    pub fn stall(&self, on: bool) {
        self.shared.stalled.send_replace(on);
    }
}

impl Drop for TcpRelay {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        self.shared.generation.lock().unwrap().cancel();
    }
}

impl TcpShared {
    async fn run(self: Arc<Self>, listener: tokio::net::TcpListener) {
        loop {
            let (agent, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                () = self.stop.cancelled() => return,
            };
            if self.refusing.load(Ordering::Relaxed) {
                continue;
            }
            self.accepted.fetch_add(1, Ordering::Relaxed);
            self.open.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            let generation = self.generation.lock().unwrap().clone();
            tokio::spawn(async move {
                struct Open<'a>(&'a AtomicUsize);
                impl Drop for Open<'_> {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                let _open = Open(&this.open);
                let Ok(edge) = tokio::net::TcpStream::connect(this.upstream).await else {
                    return;
                };
                let (ar, aw) = agent.into_split();
                let (er, ew) = edge.into_split();
                tokio::select! {
                    _ = async {
                        tokio::join!(this.copy(ar, ew), this.copy(er, aw))
                    } => {}
                    () = generation.cancelled() => {}
                }
            });
        }
    }

    /// One direction, a read at a time, waiting out stalls.
    async fn copy(
        &self,
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stalled = self.stalled.subscribe();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    }
}
