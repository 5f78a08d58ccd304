//! Request rate limits per route, as nginx's `limit_req ... burst=N
//! nodelay`: a steady rate, `burst` more requests served at once, and 429
//! with Retry-After beyond that.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): per key, one
//! instant, the theoretical arrival time of the next request. A request is
//! served when that instant is at most `burst` intervals ahead of now, and
//! pushes it one interval further. One map lookup per request, under a
//! lock held for no await; the table holds at most [`MAX_KEYS`] keys, the
//! oldest forgotten first (a forgotten key only gets a fresh burst).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use burrow_proto::listener::ClientKey;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::config::RateLimit;

/// Keys one route's table holds at most.
pub const MAX_KEYS: usize = 10_000;
/// A refusal is logged at most this often per route.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Whom a limit counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Who {
    Client(ClientKey),
    /// A signed-in user, or an API key (`key:NAME`).
    Named(String),
}

#[derive(Debug, Default)]
struct Table {
    next: HashMap<Who, Instant>,
    /// Keys in the order they were added, for eviction.
    order: VecDeque<Who>,
}

/// One route's limiter.
#[derive(Debug)]
pub struct RateLimiter {
    limit: RateLimit,
    table: Mutex<Table>,
    /// Refusals since the last log line, and when that was.
    unlogged: AtomicU64,
    logged_at: AtomicU64,
    epoch: Instant,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            table: Mutex::default(),
            unlogged: AtomicU64::new(0),
            logged_at: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn limit(&self) -> &RateLimit {
        &self.limit
    }

    /// Counts a request by `who` on the counters every edge of `cluster`
    /// shares (named `scope`, this limit's route or key), or on this
    /// edge's own without a cluster or while Redis is away.
    pub async fn check_shared(
        &self,
        scope: &str,
        who: &Who,
        cluster: Option<&Cluster>,
    ) -> Result<(), Duration> {
        if let Some(cluster) = cluster.filter(|c| c.is_healthy()) {
            let name = match who {
                Who::Client(c) => format!("{scope}:ip:{c}"),
                Who::Named(n) => format!("{scope}:name:{n}"),
            };
            if let Ok(verdict) = cluster
                .rate(&name, self.limit.interval, self.limit.burst)
                .await
            {
                return verdict;
            }
        }
        self.check(who)
    }

    /// Counts a request by `who`: `Err(wait)` when it is over the limit
    /// (`wait` is when one would be served again).
    pub fn check(&self, who: &Who) -> Result<(), Duration> {
        let now = Instant::now();
        let interval = self.limit.interval;
        let tolerance = interval.saturating_mul(self.limit.burst);
        let mut table = self.table.lock().expect("rate table lock not poisoned");
        // The theoretical arrival time, pushed one interval when served.
        let admit = |next: Instant| {
            let next = next.max(now);
            let ahead = next - now;
            if ahead > tolerance {
                Err(ahead - tolerance)
            } else {
                Ok(next + interval)
            }
        };
        if let Some(next) = table.next.get_mut(who) {
            *next = admit(*next)?;
            return Ok(());
        }
        let pushed = admit(now)?;
        if table.next.len() >= MAX_KEYS
            && let Some(oldest) = table.order.pop_front()
        {
            table.next.remove(&oldest);
        }
        table.order.push_back(who.clone());
        table.next.insert(who.clone(), pushed);
        Ok(())
    }

    /// Whether to log a refusal now; if so, how many went unlogged since
    /// the last line (this one included).
    pub fn log_now(&self) -> Option<u64> {
        self.unlogged.fetch_add(1, Ordering::Relaxed);
        // `logged_at` is 0 for never, else milliseconds since `epoch` + 1.
        let stamp = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1;
        let last = self.logged_at.load(Ordering::Relaxed);
        let every = u64::try_from(LOG_EVERY.as_millis()).unwrap_or(u64::MAX);
        if (last == 0 || stamp.saturating_sub(last) >= every)
            && self
                .logged_at
                .compare_exchange(last, stamp, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.unlogged.swap(0, Ordering::Relaxed));
        }
        None
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.table
            .lock()
            .expect("rate table lock not poisoned")
            .next
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateKey;

    fn limiter(per_second: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimit {
            interval: Duration::from_secs(1) / per_second,
            burst,
            key: RateKey::Client,
        })
    }

    fn client(ip: &str) -> Who {
        Who::Client(ClientKey::of(ip.parse().unwrap()))
    }

    #[tokio::test(start_paused = true)]
    async fn the_burst_is_served_at_once_then_the_rate() {
        let l = limiter(10, 20);
        let a = client("192.0.2.1");
        let served = (0..100).filter(|_| l.check(&a).is_ok()).count();
        assert_eq!(served, 21, "one, and a burst of 20");
        let wait = l.check(&a).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        // Another client is not affected.
        assert!(l.check(&client("192.0.2.2")).is_ok());
        // A tenth of a second later, one more.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(l.check(&a).is_ok());
        assert!(l.check(&a).is_err());
        // Idle for the burst's length: the whole burst again.
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!((0..100).filter(|_| l.check(&a).is_ok()).count(), 21);
    }

    #[tokio::test(start_paused = true)]
    async fn the_table_is_bounded() {
        let l = limiter(1, 0);
        for i in 0..(MAX_KEYS as u32 + 100) {
            let ip = std::net::IpAddr::from(i.to_be_bytes());
            let _ = l.check(&Who::Client(ClientKey::of(ip)));
        }
        assert_eq!(l.len(), MAX_KEYS);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_at_most_every_ten_seconds_with_a_count() {
        let l = limiter(1, 0);
        assert_eq!(l.log_now(), Some(1));
        assert_eq!(l.log_now(), None);
        assert_eq!(l.log_now(), None);
        tokio::time::advance(LOG_EVERY).await;
        assert_eq!(l.log_now(), Some(3));
    }
}
