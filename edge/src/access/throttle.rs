//! Brute-force throttling: failed logins are counted per client address and
//! per user name; past a few free failures each key is locked for a time
//! that doubles with every further failure. Locked attempts are answered
//! 429 before any hashing, so an attack costs us almost nothing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Failures an address may make before it is locked.
pub const ADDR_FREE_FAILURES: u32 = 5;
/// Failures a user name may collect (from all addresses) before it is locked.
/// Higher than per address, so one attacker cannot lock a user out alone.
pub const USER_FREE_FAILURES: u32 = 20;
/// The first lock; each further failure doubles it.
pub const BASE_LOCK: Duration = Duration::from_secs(1);
pub const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// Counters kept at most; idle ones are forgotten first.
pub const MAX_ENTRIES: usize = 10_000;
/// A counter with no failure for this long is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(IpAddr),
    User(String),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

#[derive(Debug, Default)]
pub struct Throttle {
    entries: Mutex<HashMap<Key, Entry>>,
}

fn lock_for(failures: u32, free: u32) -> Option<Duration> {
    let over = failures.checked_sub(free)?;
    if over == 0 {
        return None;
    }
    Some(
        BASE_LOCK
            .saturating_mul(1u32 << (over - 1).min(20))
            .min(MAX_LOCK),
    )
}

impl Throttle {
    pub fn new() -> Self {
        Self::default()
    }

    fn keys(ip: IpAddr, user: Option<&str>) -> impl Iterator<Item = (Key, u32)> {
        std::iter::once((Key::Addr(ip), ADDR_FREE_FAILURES))
            .chain(user.map(|u| (Key::User(u.to_owned()), USER_FREE_FAILURES)))
    }

    /// `Err(wait)` when the address or the user is locked now.
    pub fn check(&self, ip: IpAddr, user: Option<&str>) -> Result<(), Duration> {
        let now = Instant::now();
        let entries = self.entries.lock().expect("throttle lock not poisoned");
        let wait = Self::keys(ip, user)
            .filter_map(|(k, _)| entries.get(&k)?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        wait.map_or(Ok(()), Err)
    }

    pub fn failure(&self, ip: IpAddr, user: Option<&str>) {
        let now = Instant::now();
        let mut entries = self.entries.lock().expect("throttle lock not poisoned");
        for (key, free) in Self::keys(ip, user) {
            if !entries.contains_key(&key) && entries.len() >= MAX_ENTRIES {
                Self::evict(&mut entries, now);
            }
            let e = entries.entry(key).or_insert(Entry {
                failures: 0,
                locked_until: None,
                last: now,
            });
            e.failures = e.failures.saturating_add(1);
            e.last = now;
            if let Some(d) = lock_for(e.failures, free) {
                e.locked_until = Some(now + d);
            }
        }
    }

    /// A success clears the address's and the user's counters.
    pub fn success(&self, ip: IpAddr, user: &str) {
        let mut entries = self.entries.lock().expect("throttle lock not poisoned");
        entries.remove(&Key::Addr(ip));
        entries.remove(&Key::User(user.to_owned()));
    }

    /// Addresses locked right now (for metrics).
    pub fn locked_addresses(&self) -> usize {
        let now = Instant::now();
        self.entries
            .lock()
            .expect("throttle lock not poisoned")
            .iter()
            .filter(|(k, e)| matches!(k, Key::Addr(_)) && e.locked_until.is_some_and(|u| u > now))
            .count()
    }

    fn evict(entries: &mut HashMap<Key, Entry>, now: Instant) {
        entries.retain(|_, e| {
            now.duration_since(e.last) < FORGET_AFTER || e.locked_until.is_some_and(|u| u > now)
        });
        if entries.len() >= MAX_ENTRIES {
            if let Some(oldest) = entries
                .iter()
                .min_by_key(|(_, e)| e.last)
                .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .expect("throttle lock not poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn locks_grow_and_success_resets() {
        let t = Throttle::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..ADDR_FREE_FAILURES {
            assert!(t.check(ip, Some("alice")).is_ok());
            t.failure(ip, Some("alice"));
        }
        assert!(
            t.check(ip, Some("alice")).is_ok(),
            "free failures do not lock"
        );
        t.failure(ip, Some("alice"));
        assert_eq!(t.check(ip, None), Err(BASE_LOCK));
        tokio::time::advance(BASE_LOCK).await;
        assert!(t.check(ip, None).is_ok());
        t.failure(ip, None);
        assert_eq!(t.check(ip, None), Err(BASE_LOCK * 2));
        // Another address is not affected; the user is not locked yet.
        assert!(t.check("192.0.2.2".parse().unwrap(), Some("alice")).is_ok());
        t.success(ip, "alice");
        assert!(t.check(ip, Some("alice")).is_ok());
        assert_eq!(lock_for(1000, 5), Some(MAX_LOCK));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let t = Throttle::new();
        for i in 0..(MAX_ENTRIES as u32 + 500) {
            let ip = IpAddr::from(i.to_be_bytes());
            t.failure(ip, None);
        }
        assert!(t.len() <= MAX_ENTRIES);
    }
}
