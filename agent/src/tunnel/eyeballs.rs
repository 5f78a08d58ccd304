//! Which edge address to try when: RFC 8305 "Happy Eyeballs" without I/O.
//!
//! [`Attempts`] orders the resolved addresses (IPv6 first, then the
//! families alternating), hands out the next one to dial at once, then one
//! every [`ATTEMPT_DELAY`] while none has finished its handshake, and at
//! once when an attempt fails. The dialler in `tunnel.rs` runs the
//! attempts on one QUIC endpoint; the first to connect wins.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

/// RFC 8305's "Connection Attempt Delay": how long an attempt has before
/// the next address is tried beside it (the RFC recommends 250 ms).
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Turns the configured `host:port` into addresses.
pub trait Resolve: Send + Sync + 'static {
    fn resolve<'a>(
        &'a self,
        host_port: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// A shared resolver, so its owner can look at it while the agent runs.
impl<R: Resolve + ?Sized> Resolve for std::sync::Arc<R> {
    fn resolve<'a>(
        &'a self,
        host_port: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        (**self).resolve(host_port)
    }
}

/// The system's resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host_port: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host(host_port).await?.collect()) })
    }
}

/// RFC 8305 section 4: IPv6 first, then the families alternate, each in
/// the resolver's order; duplicates are dropped.
pub fn interleave(addrs: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let (mut v6, mut v4): (VecDeque<SocketAddr>, VecDeque<SocketAddr>) =
        (VecDeque::new(), VecDeque::new());
    for a in addrs {
        let family = if a.is_ipv6() { &mut v6 } else { &mut v4 };
        if !family.contains(&a) {
            family.push_back(a);
        }
    }
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    while !(v6.is_empty() && v4.is_empty()) {
        out.extend(v6.pop_front());
        out.extend(v4.pop_front());
    }
    out
}

/// The schedule of connection attempts to one set of addresses.
#[derive(Debug)]
pub struct Attempts {
    addrs: Vec<SocketAddr>,
    queue: VecDeque<SocketAddr>,
    /// When the next address is started if nothing else happens.
    next_at: Instant,
    running: usize,
    /// See [`Attempts::resending`].
    resend: Option<Duration>,
    round_at: Instant,
}

impl Attempts {
    /// The first attempt is due at once.
    pub fn new(now: Instant, addrs: impl IntoIterator<Item = SocketAddr>) -> Self {
        let addrs = interleave(addrs);
        Self {
            queue: addrs.clone().into(),
            addrs,
            next_at: now,
            running: 0,
            resend: None,
            round_at: now,
        }
    }

    /// While attempts run unanswered (a network that is silent, not one
    /// that refuses), every address is tried afresh each `every`, beside
    /// the attempts still running: a new handshake's first packet leaves
    /// at once, where a running one's retransmissions back off to seconds
    /// apart. So a link that comes back is used within `every`.
    pub fn resending(mut self, now: Instant, every: Duration) -> Self {
        self.resend = Some(every);
        self.round_at = now + every;
        self
    }

    /// The next address to dial now, if one is due; call until `None`.
    pub fn poll_attempt(&mut self, now: Instant) -> Option<SocketAddr> {
        if let Some(every) = self.resend
            && self.queue.is_empty()
            && self.running > 0
            && now >= self.round_at
        {
            self.queue = self.addrs.clone().into();
            self.round_at = now + every;
            self.next_at = now;
        }
        if now < self.next_at {
            return None;
        }
        let addr = self.queue.pop_front()?;
        self.running += 1;
        self.next_at = now + ATTEMPT_DELAY;
        Some(addr)
    }

    /// An attempt failed (before or during its handshake): the next
    /// address starts at once.
    pub fn handle_failed(&mut self, now: Instant) {
        self.running = self.running.saturating_sub(1);
        self.next_at = now;
    }

    /// When `poll_attempt` next has an address; `None` when none is left.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if !self.queue.is_empty() {
            Some(self.next_at)
        } else if self.resend.is_some() && self.running > 0 {
            Some(self.round_at)
        } else {
            None
        }
    }

    /// Every address was tried and every attempt failed.
    pub fn is_exhausted(&self) -> bool {
        self.queue.is_empty() && self.running == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    fn due(at: &mut Attempts, now: Instant) -> Vec<SocketAddr> {
        std::iter::from_fn(|| at.poll_attempt(now)).collect()
    }

    #[test]
    fn ipv6_comes_first_and_the_families_alternate() {
        let got = interleave([
            a("192.0.2.1:443"),
            a("192.0.2.2:443"),
            a("192.0.2.3:443"),
            a("[2001:db8::1]:443"),
            a("192.0.2.1:443"),
            a("[2001:db8::2]:443"),
        ]);
        assert_eq!(
            got,
            [
                a("[2001:db8::1]:443"),
                a("192.0.2.1:443"),
                a("[2001:db8::2]:443"),
                a("192.0.2.2:443"),
                a("192.0.2.3:443"),
            ]
        );
    }

    /// `localhost` on a dual-stack host: ::1 is tried first, 127.0.0.1
    /// 250 ms later if ::1 has not answered.
    #[test]
    fn the_next_address_starts_after_the_delay_or_at_a_failure() {
        let t0 = Instant::now();
        let mut at = Attempts::new(t0, [a("127.0.0.1:443"), a("[::1]:443"), a("10.0.0.1:443")]);
        assert_eq!(due(&mut at, t0), [a("[::1]:443")]);
        assert_eq!(at.poll_timeout(), Some(t0 + ATTEMPT_DELAY));
        assert_eq!(due(&mut at, t0 + ATTEMPT_DELAY / 2), []);
        let t1 = t0 + ATTEMPT_DELAY;
        assert_eq!(due(&mut at, t1), [a("127.0.0.1:443")]);
        // 127.0.0.1 fails at once: the last address does not wait.
        let t2 = t1 + Duration::from_millis(1);
        at.handle_failed(t2);
        assert_eq!(at.poll_timeout(), Some(t2));
        assert_eq!(due(&mut at, t2), [a("10.0.0.1:443")]);
        assert_eq!(at.poll_timeout(), None);
        assert!(!at.is_exhausted(), "two attempts still run");
        at.handle_failed(t2);
        assert!(!at.is_exhausted());
        at.handle_failed(t2);
        assert!(at.is_exhausted());
    }

    #[test]
    fn a_silent_network_gets_fresh_attempts_and_a_refusing_one_does_not() {
        let t0 = Instant::now();
        let every = Duration::from_secs(2);
        let addrs = [a("127.0.0.1:443"), a("[::1]:443")];
        let mut at = Attempts::new(t0, addrs).resending(t0, every);
        assert_eq!(due(&mut at, t0), [a("[::1]:443")]);
        let t1 = t0 + ATTEMPT_DELAY;
        assert_eq!(due(&mut at, t1), [a("127.0.0.1:443")]);
        // Both hang: a new round at t0 + every, then every `every`.
        assert_eq!(at.poll_timeout(), Some(t0 + every));
        assert_eq!(due(&mut at, t0 + every / 2), []);
        let t2 = t0 + every;
        assert_eq!(due(&mut at, t2), [a("[::1]:443")]);
        assert_eq!(due(&mut at, t2 + ATTEMPT_DELAY), [a("127.0.0.1:443")]);
        assert_eq!(at.poll_timeout(), Some(t2 + every));
        // Every attempt fails (refused): no new round, the dial is over.
        for _ in 0..4 {
            at.handle_failed(t2 + ATTEMPT_DELAY);
        }
        assert!(at.is_exhausted());
        assert_eq!(at.poll_timeout(), None);
        assert_eq!(due(&mut at, t2 + 10 * every), []);
    }

    #[test]
    fn no_address_is_exhausted_at_once() {
        let t0 = Instant::now();
        let mut at = Attempts::new(t0, []);
        assert_eq!(due(&mut at, t0), []);
        assert!(at.is_exhausted());
        assert_eq!(at.poll_timeout(), None);
    }
}
