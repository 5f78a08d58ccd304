//! The one accept loop every TCP listener of edge and agent runs: a cap on
//! open connections in total and per client address (IPv6 counted per
//! /64), a pause instead of a spin when the process runs out of file
//! descriptors, and every refusal counted and logged at a bounded rate.
//!
//! A connection over a cap is accepted and closed at once rather than left
//! in the kernel's backlog: the backlog keeps draining, the refusal is
//! counted, and the client learns at once instead of timing out.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long accepting pauses after an error that is not about one
/// connection (out of file descriptors, out of memory). Accepting at once
/// again would fail again at once: a core at 100% and a log flood.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per listener and kind of refusal in this time;
/// the line says how many were refused since the last one.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Caps on one listener's open connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most, all clients together.
    pub total: usize,
    /// Open connections at most from one client address (IPv6: one /64).
    pub per_ip: usize,
}

/// The unit a client is counted in: an IPv4 address, or the /64 an IPv6
/// address is in (one home or phone gets a whole /64, so counting single
/// IPv6 addresses would cap nobody). IPv4-mapped IPv6 counts as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(Ipv4Addr),
    V6Prefix(u64),
}

impl ClientKey {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => Self::V4(v4),
            IpAddr::V6(v6) => Self::V6Prefix((v6.to_bits() >> 64) as u64),
        }
    }
}

impl std::fmt::Display for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(v4) => write!(f, "{v4}"),
            Self::V6Prefix(p) => {
                let net = std::net::Ipv6Addr::from_bits(u128::from(*p) << 64);
                write!(f, "{net}/64")
            }
        }
    }
}

/// Counters of one listener, for `/metrics`.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    /// Closed at once: the client address had `per_ip` open already.
    pub refused_per_ip: AtomicU64,
    /// Closed at once: the listener had `total` open already.
    pub refused_total: AtomicU64,
    /// Failed accepts (each one also pauses accepting when it is not about
    /// one connection).
    pub accept_errors: AtomicU64,
    /// Connections closed for sitting idle (no request in flight).
    pub closed_idle: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    conns: usize,
    streams: usize,
}

/// What each client address has open on one listener: connections, and
/// streams (requests in flight) that the server counts through
/// [`Clients::try_stream`]. Entries go when both reach zero, so the table
/// holds no more entries than there are open connections.
#[derive(Debug, Default)]
pub struct Clients {
    table: Mutex<HashMap<ClientKey, Counts>>,
}

impl Clients {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Counts>> {
        // A panic while holding this lock cannot leave counts half-written.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn try_add(
        self: &Arc<Self>,
        key: ClientKey,
        cap: usize,
        field: fn(&mut Counts) -> &mut usize,
    ) -> bool {
        let mut table = self.lock();
        let counts = table.entry(key).or_default();
        if *field(counts) >= cap {
            if counts.conns == 0 && counts.streams == 0 {
                table.remove(&key);
            }
            return false;
        }
        *field(counts) += 1;
        true
    }

    fn release(&self, key: ClientKey, field: fn(&mut Counts) -> &mut usize) {
        let mut table = self.lock();
        if let Some(counts) = table.get_mut(&key) {
            let n = field(counts);
            *n = n.saturating_sub(1);
            if counts.conns == 0 && counts.streams == 0 {
                table.remove(&key);
            }
        }
    }

    /// Counts one more stream for `key` unless it has `cap` open; the
    /// permit uncounts it when dropped.
    pub fn try_stream(self: &Arc<Self>, key: ClientKey, cap: usize) -> Option<StreamPermit> {
        self.try_add(key, cap, |c| &mut c.streams)
            .then(|| StreamPermit {
                clients: self.clone(),
                key,
            })
    }

    /// Open connections from `key` now.
    #[cfg(test)]
    fn connections(&self, key: ClientKey) -> usize {
        self.lock().get(&key).map_or(0, |c| c.conns)
    }

    /// Client addresses with anything open.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One counted stream of a client; uncounts it when dropped.
#[derive(Debug)]
pub struct StreamPermit {
    clients: Arc<Clients>,
    key: ClientKey,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.clients.release(self.key, |c| &mut c.streams);
    }
}

/// One accepted connection's place under the caps; dropping it frees the
/// place. Handlers keep it for the connection's whole life.
#[derive(Debug)]
pub struct ConnPermit {
    clients: Arc<Clients>,
    stats: Arc<ListenerStats>,
    pub key: ClientKey,
}

impl Drop for ConnPermit {
    fn drop(&mut self) {
        self.clients.release(self.key, |c| &mut c.conns);
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A log line that is written at most once per [`REFUSAL_LOG_INTERVAL`],
/// saying how many events it stands for.
#[derive(Debug, Default)]
struct Throttled {
    last: Mutex<Option<Instant>>,
    pending: AtomicU64,
}

impl Throttled {
    /// Counts one event; returns how many to report when a line is due.
    fn due(&self) -> Option<u64> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < REFUSAL_LOG_INTERVAL) {
            return None;
        }
        *last = Some(now);
        Some(self.pending.swap(0, Ordering::Relaxed))
    }
}

/// One listener's accept loop with its caps.
#[derive(Debug)]
pub struct Front {
    name: String,
    limits: Limits,
    stats: Arc<ListenerStats>,
    clients: Arc<Clients>,
    per_ip_log: Throttled,
    total_log: Throttled,
    error_log: Throttled,
}

/// Whether an accept error is about one connection (the next accept may
/// well succeed) rather than about the process or the system.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

impl Front {
    /// `name` labels the listener in logs and metrics ("https", "lan").
    pub fn new(name: impl Into<String>, limits: Limits) -> Self {
        Self {
            name: name.into(),
            limits,
            stats: Arc::default(),
            clients: Arc::default(),
            per_ip_log: Throttled::default(),
            total_log: Throttled::default(),
            error_log: Throttled::default(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn stats(&self) -> Arc<ListenerStats> {
        self.stats.clone()
    }

    /// The per-address table, for servers that also count streams.
    pub fn clients(&self) -> Arc<Clients> {
        self.clients.clone()
    }

    /// Decides on a connection just accepted from `peer` (by [`Front::serve`],
    /// or by a server that accepts its own connections, as HTTP/3 does).
    pub fn admit(&self, peer: SocketAddr) -> Option<ConnPermit> {
        let key = ClientKey::of(peer.ip());
        let open = self.stats.open.load(Ordering::Relaxed);
        if usize::try_from(open).unwrap_or(usize::MAX) >= self.limits.total {
            self.stats.refused_total.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = self.total_log.due() {
                warn!(
                    listener = %self.name,
                    limit = self.limits.total,
                    refused = n,
                    "connection limit reached; refusing connections"
                );
            }
            return None;
        }
        if !self
            .clients
            .try_add(key, self.limits.per_ip, |c| &mut c.conns)
        {
            self.stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            if let Some(n) = self.per_ip_log.due() {
                warn!(listener = %self.name, client = %key, limit = self.limits.per_ip, refused = n, "too many connections from one client; refusing");
            }
            return None;
        }
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        Some(ConnPermit {
            clients: self.clients.clone(),
            stats: self.stats.clone(),
            key,
        })
    }

    /// Accepts on `listener` until `shutdown`, handing each admitted
    /// connection to `handle` (which spawns what serves it).
    pub async fn serve<F>(&self, listener: TcpListener, shutdown: CancellationToken, mut handle: F)
    where
        F: FnMut(TcpStream, SocketAddr, ConnPermit),
    {
        loop {
            let accepted = tokio::select! {
                // Not one accept after the shutdown: on a restart, what is
                // still queued is the next process's to take.
                biased;
                () = shutdown.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => match self.admit(peer) {
                    Some(permit) => handle(tcp, peer, permit),
                    None => drop(tcp),
                },
                Err(e) if is_per_connection(&e) => {
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    debug!(listener = %self.name, error = %e, "accept failed for one connection");
                }
                Err(e) => {
                    self.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                    if let Some(n) = self.error_log.due() {
                        warn!(listener = %self.name, error = %e, failures = n, pause = ?ACCEPT_BACKOFF, "accept failed; pausing accepts");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        let a = ClientKey::of("2001:db8:1:2::1".parse().unwrap());
        let b = ClientKey::of("2001:db8:1:2:ffff::9".parse().unwrap());
        let c = ClientKey::of("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let mapped = ClientKey::of("::ffff:192.0.2.7".parse().unwrap());
        assert_eq!(mapped, ClientKey::of("192.0.2.7".parse().unwrap()));
    }

    #[test]
    fn caps_per_address_and_in_total_and_entries_go_with_their_connections() {
        let front = Front::new(
            "test",
            Limits {
                total: 3,
                per_ip: 2,
            },
        );
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let c: SocketAddr = "192.0.2.3:1000".parse().unwrap();
        let a1 = front.admit(a).unwrap();
        let a2 = front.admit(a).unwrap();
        assert!(front.admit(a).is_none(), "third from one address");
        let b1 = front.admit(b).unwrap();
        assert!(front.admit(c).is_none(), "fourth in total");
        let stats = front.stats();
        assert_eq!(stats.refused_per_ip.load(Ordering::Relaxed), 1);
        assert_eq!(stats.refused_total.load(Ordering::Relaxed), 1);
        assert_eq!(front.clients.connections(ClientKey::of(a.ip())), 2);
        drop((a1, b1));
        let _c1 = front.admit(c).unwrap();
        drop(a2);
        assert_eq!(front.clients.connections(ClientKey::of(a.ip())), 0);
        // Only c is left in the table.
        assert_eq!(front.clients.len(), 1);
        assert_eq!(stats.open.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn streams_are_capped_per_address() {
        let clients = Arc::new(Clients::default());
        let key = ClientKey::of("192.0.2.1".parse().unwrap());
        let s1 = clients.try_stream(key, 2).unwrap();
        let _s2 = clients.try_stream(key, 2).unwrap();
        assert!(clients.try_stream(key, 2).is_none());
        drop(s1);
        assert!(clients.try_stream(key, 2).is_some());
    }

    #[test]
    fn refusal_lines_are_throttled_and_say_how_many() {
        let t = Throttled::default();
        assert_eq!(t.due(), Some(1));
        for _ in 0..1000 {
            assert_eq!(t.due(), None);
        }
        *t.last.lock().unwrap() = Some(Instant::now() - REFUSAL_LOG_INTERVAL);
        assert_eq!(t.due(), Some(1001));
    }

    #[tokio::test]
    async fn the_loop_hands_over_admitted_connections_and_closes_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let front = Arc::new(Front::new(
            "test",
            Limits {
                total: 100,
                per_ip: 1,
            },
        ));
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let f = front.clone();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            f.serve(listener, stop, move |tcp, _, permit| {
                let _ = tx.send((tcp, permit));
            })
            .await;
        });
        let _first = TcpStream::connect(addr).await.unwrap();
        let kept = rx.recv().await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        // The second from the same address is closed by the edge: EOF.
        let mut buf = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut second, &mut buf)
            .await
            .unwrap_or(0);
        assert_eq!(n, 0);
        assert_eq!(front.stats().refused_per_ip.load(Ordering::Relaxed), 1);
        drop(kept);
        shutdown.cancel();
        task.await.unwrap();
    }
}
