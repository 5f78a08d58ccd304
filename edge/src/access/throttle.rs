//! Brute-force throttling, after OWASP's "slow down online guessing attacks
//! with device cookies".
//!
//! Failed logins are counted per client address (IPv6 per /64), per
//! configured user name, in one shared bucket for every unknown name, and
//! per device. Past a few free failures a key is locked for a time that
//! doubles with every further failure; locked attempts are answered 429
//! before any hashing, so an attack costs us almost nothing.
//!
//! A browser that signed in as a user before carries a signed device token
//! for that user. Its attempts are judged by its own failures only, so a
//! spray of wrong passwords from elsewhere, which locks the user name, does
//! not lock the owner out of their own browser.
//!
//! Checks not yet answered count against the free failures too, so twenty
//! guesses sent at once from one address get the free ones checked and 429
//! for the rest, instead of twenty answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::listener::ClientKey;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::cluster::counters::{LockTimes, Outcome, SharedKey};

/// Failures an address (or a device) may make before it is locked.
pub const ADDR_FREE_FAILURES: u32 = 5;
/// Failures a user name may collect (from all addresses) before it is locked.
/// Higher than per address, so one attacker cannot lock a user out alone.
pub const USER_FREE_FAILURES: u32 = 20;
/// The first lock; each further failure doubles it.
pub const BASE_LOCK: Duration = Duration::from_secs(1);
pub const MAX_LOCK: Duration = Duration::from_secs(15 * 60);
/// Address counters kept at most; beyond them, new addresses share one.
pub const MAX_ENTRIES: usize = 10_000;
/// A counter with no failure for this long starts over (and an address's
/// may be forgotten).
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// Longer user names are refused before anything about them is stored.
pub const MAX_USER_NAME: usize = 256;

/// Who is guessing, as far as the throttle cares.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Addr(ClientKey),
    /// A configured user name.
    User(Arc<str>),
    /// Every name that is not configured shares this one.
    UnknownUsers,
    /// A browser that signed in before, by its token's id.
    Device([u8; 16]),
    /// New addresses while the table is full of counters it must keep.
    Overflow,
}

impl Key {
    fn free_failures(&self) -> u32 {
        match self {
            Self::Addr(_) | Self::Device(_) => ADDR_FREE_FAILURES,
            Self::User(_) | Self::UnknownUsers | Self::Overflow => USER_FREE_FAILURES,
        }
    }
}

/// The identity of one login attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    keys: Vec<Key>,
}

impl Attempt {
    /// An attempt from `client` for `user`. `known` is the configured name
    /// when `user` is one (unknown names share a bucket); `device` is the id
    /// of a valid device token for that same user, which replaces the
    /// address and user keys.
    pub fn new(client: ClientKey, known: Option<Arc<str>>, device: Option<[u8; 16]>) -> Self {
        let keys = match (device, known) {
            (Some(id), Some(_)) => vec![Key::Device(id)],
            (_, Some(name)) => vec![Key::Addr(client), Key::User(name)],
            (_, None) => vec![Key::Addr(client), Key::UnknownUsers],
        };
        Self { keys }
    }

    /// An attempt that names no user (or one too long to keep).
    pub fn anonymous(client: ClientKey) -> Self {
        Self {
            keys: vec![Key::Addr(client)],
        }
    }

    /// Its counters as every edge of a cluster names them.
    fn shared_keys(&self) -> Vec<SharedKey> {
        self.keys
            .iter()
            .filter_map(|k| {
                let name = match k {
                    Key::Addr(c) => format!("addr:{c}"),
                    Key::User(u) => format!("user:{}", hex(u.as_bytes())),
                    Key::UnknownUsers => "unknown".to_owned(),
                    Key::Device(id) => format!("device:{}", hex(id)),
                    // Never in an attempt: the table's own fallback.
                    Key::Overflow => return None,
                };
                Some(SharedKey {
                    name,
                    free: k.free_failures(),
                    bucket: matches!(k, Key::UnknownUsers),
                })
            })
            .collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The lock lengths the cluster's counters use: this throttle's.
const LOCK_TIMES: LockTimes = LockTimes {
    base: BASE_LOCK,
    max: MAX_LOCK,
    forget: FORGET_AFTER,
};

/// The same throttle over the counters every edge of a cluster shares
/// (`[cluster]`), beside the local one: a guess counts on both, so the
/// local throttle still judges while Redis is away, and the shared one
/// stops guesses spread over several edges.
#[derive(Debug, Clone)]
pub struct SharedThrottle {
    cluster: Arc<Cluster>,
}

/// A shared check in progress; settled like [`Pending`]. Dropped
/// unsettled (its request went away), it is released: whether this
/// request ran the check is not known here, and the local [`Pending`]
/// counts the abandoned guess.
#[must_use]
#[derive(Debug)]
pub struct SharedPending {
    cluster: Arc<Cluster>,
    keys: Vec<SharedKey>,
}

impl SharedThrottle {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self { cluster }
    }

    /// Starts a check on the shared counters: `Err(wait)` when they lock
    /// `attempt` (or checks running on every edge would use up its free
    /// failures), `Ok(None)` while Redis is away.
    pub async fn begin(&self, attempt: &Attempt) -> Result<Option<SharedPending>, Duration> {
        let keys = attempt.shared_keys();
        match self.cluster.throttle_begin(&keys, BASE_LOCK).await {
            Ok(Ok(())) => Ok(Some(SharedPending {
                cluster: self.cluster.clone(),
                keys,
            })),
            Ok(Err(wait)) => Err(wait),
            Err(e) => {
                tracing::debug!(error = %e, "shared login throttle unavailable; the local one judges");
                Ok(None)
            }
        }
    }

    /// `Err(wait)` when the shared counters lock `attempt` now.
    pub async fn check(&self, attempt: &Attempt) -> Result<(), Duration> {
        match self.cluster.throttle_check(&attempt.shared_keys()).await {
            Ok(verdict) => verdict,
            Err(_) => Ok(()),
        }
    }

    /// Counts a failure that was no check.
    pub async fn failure(&self, attempt: &Attempt) {
        let _ = self
            .cluster
            .throttle_settle(&attempt.shared_keys(), Outcome::Counted, LOCK_TIMES)
            .await;
    }
}

impl SharedPending {
    /// Ends the check as `outcome` (failed: counted on every edge;
    /// succeeded: the shared counters cleared; released: nothing counts),
    /// on a task of its own, so a request that goes away while this runs
    /// does not leave the count pending.
    pub async fn settle(mut self, outcome: Outcome) {
        let keys = std::mem::take(&mut self.keys);
        let cluster = self.cluster.clone();
        let done = tokio::spawn(async move {
            if let Err(e) = cluster.throttle_settle(&keys, outcome, LOCK_TIMES).await {
                tracing::debug!(error = %e, "cannot settle a shared login check; its pending count lapses");
            }
        });
        let _ = done.await;
    }
}

/// Settles `shared` as `outcome`, if a shared check was started.
pub async fn settle_shared(shared: Option<SharedPending>, outcome: Outcome) {
    if let Some(s) = shared {
        s.settle(outcome).await;
    }
}

impl Drop for SharedPending {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.keys);
        let cluster = self.cluster.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = cluster
                    .throttle_settle(&keys, Outcome::Released, LOCK_TIMES)
                    .await;
            });
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    /// Checks running now, counted against the free failures.
    pending: u32,
    locked_until: Option<Instant>,
    last: Instant,
}

impl Entry {
    fn new(now: Instant) -> Self {
        Self {
            failures: 0,
            pending: 0,
            locked_until: None,
            last: now,
        }
    }

    fn locked(&self, now: Instant) -> bool {
        self.locked_until.is_some_and(|u| u > now)
    }

    /// A counter quiet for [`FORGET_AFTER`] starts over.
    fn decay(&mut self, now: Instant) {
        if self.pending == 0 && !self.locked(now) && now.duration_since(self.last) >= FORGET_AFTER {
            self.failures = 0;
        }
    }
}

/// The counters, and when the table was last swept.
#[derive(Debug, Default)]
struct Table {
    map: HashMap<Key, Entry>,
    swept: Option<Instant>,
}

/// How often a full table is swept for forgettable counters.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Table {
    /// The key that counts for `key`: itself, unless it is a new address
    /// and the table is full of counters that must be kept, when all such
    /// addresses share [`Key::Overflow`]. Only addresses are ever left out:
    /// user names are as many as the config has, and device ids as many
    /// as logins that succeeded.
    fn resolve(&self, key: &Key) -> Key {
        if matches!(key, Key::Addr(_))
            && self.map.len() >= MAX_ENTRIES
            && !self.map.contains_key(key)
        {
            Key::Overflow
        } else {
            key.clone()
        }
    }

    /// Room for a new address when the table is full: forgets idle
    /// address counters (never a locked one, one with a check running, or
    /// a user's or device's), at most once a second.
    fn make_room(&mut self, key: &Key, now: Instant) {
        if !matches!(key, Key::Addr(_))
            || self.map.len() < MAX_ENTRIES
            || self.map.contains_key(key)
            || self
                .swept
                .is_some_and(|t| now.duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.map.retain(|k, e| {
            !matches!(k, Key::Addr(_))
                || e.pending > 0
                || e.locked(now)
                || now.duration_since(e.last) < FORGET_AFTER
        });
    }

    fn entry(&mut self, key: &Key, now: Instant) -> (Key, &mut Entry) {
        self.make_room(key, now);
        let key = self.resolve(key);
        let e = self
            .map
            .entry(key.clone())
            .or_insert_with(|| Entry::new(now));
        e.decay(now);
        (key, e)
    }
}

#[derive(Debug, Default)]
pub struct Throttle {
    table: Mutex<Table>,
}

/// A check in progress: it counts against the free failures until it is
/// settled. Dropped unsettled (its request went away mid-check), it counts
/// as a failure: a guess abandoned once the hashing started cost us the
/// hash all the same.
#[must_use]
#[derive(Debug)]
pub struct Pending<'a> {
    throttle: &'a Throttle,
    keys: Vec<Key>,
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

fn fail(key: &Key, e: &mut Entry, now: Instant) {
    e.failures = e.failures.saturating_add(1);
    e.last = now;
    if let Some(d) = lock_for(e.failures, key.free_failures()) {
        e.locked_until = Some(now + d);
    }
}

impl Throttle {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().expect("throttle lock not poisoned")
    }

    fn wait(table: &Table, attempt: &Attempt, now: Instant) -> Result<(), Duration> {
        let wait = attempt
            .keys
            .iter()
            .filter_map(|k| table.map.get(&table.resolve(k))?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        wait.map_or(Ok(()), Err)
    }

    /// `Err(wait)` when any key of `attempt` is locked now.
    pub fn check(&self, attempt: &Attempt) -> Result<(), Duration> {
        Self::wait(&self.lock(), attempt, Instant::now())
    }

    /// Starts a password check for `attempt`: `Err(wait)` when a key is
    /// locked, or when the checks already running would use up its free
    /// failures if they failed (then `wait` is [`BASE_LOCK`]).
    pub fn begin(&self, attempt: &Attempt) -> Result<Pending<'_>, Duration> {
        let now = Instant::now();
        let mut table = self.lock();
        Self::wait(&table, attempt, now)?;
        // Below the free failures, no more checks run at once than there
        // are failures left; past them (the lock just ran out), one.
        for key in &attempt.keys {
            let key = table.resolve(key);
            if let Some(e) = table.map.get(&key)
                && e.pending > 0
                && e.failures.saturating_add(e.pending) >= key.free_failures()
            {
                return Err(BASE_LOCK);
            }
        }
        let mut keys = Vec::with_capacity(attempt.keys.len());
        for key in &attempt.keys {
            let (key, e) = table.entry(key, now);
            e.pending += 1;
            e.last = now;
            keys.push(key);
        }
        Ok(Pending {
            throttle: self,
            keys,
        })
    }

    /// Counts a failure that was not a password check (a user name too
    /// long to look at).
    pub fn failure(&self, attempt: &Attempt) {
        let now = Instant::now();
        let mut table = self.lock();
        for key in &attempt.keys {
            let (key, e) = table.entry(key, now);
            fail(&key, e, now);
        }
    }

    /// A success clears the counters of the attempt's keys, except the
    /// shared buckets.
    pub fn success(&self, attempt: &Attempt) {
        Self::clear(&mut self.lock(), &attempt.keys);
    }

    fn clear(table: &mut Table, keys: &[Key]) {
        for key in keys {
            if matches!(key, Key::UnknownUsers | Key::Overflow) {
                continue;
            }
            if let Some(e) = table.map.get_mut(key) {
                if e.pending == 0 {
                    table.map.remove(key);
                } else {
                    e.failures = 0;
                    e.locked_until = None;
                }
            }
        }
    }

    /// Addresses locked right now (for metrics).
    pub fn locked_addresses(&self) -> usize {
        let now = Instant::now();
        self.lock()
            .map
            .iter()
            .filter(|(k, e)| matches!(k, Key::Addr(_)) && e.locked(now))
            .count()
    }

    /// Counters stored now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Pending<'_> {
    /// Takes the keys, so Drop sees a settled check; releases their
    /// pending counts and, if `failed`, counts the failure.
    fn settle(&mut self, failed: bool) -> (std::sync::MutexGuard<'_, Table>, Vec<Key>) {
        let keys = std::mem::take(&mut self.keys);
        let now = Instant::now();
        let mut table = self.throttle.lock();
        for key in &keys {
            if let Some(e) = table.map.get_mut(key) {
                e.pending = e.pending.saturating_sub(1);
                if failed {
                    fail(key, e, now);
                }
            }
        }
        (table, keys)
    }

    /// The check failed: count it.
    pub fn failed(mut self) {
        drop(self.settle(true));
    }

    /// The check passed: clear the counters.
    pub fn succeeded(mut self) {
        let (mut table, keys) = self.settle(false);
        Throttle::clear(&mut table, &keys);
    }

    /// The check was not made (the hashing queue was full): it counts as
    /// nothing.
    pub fn released(mut self) {
        drop(self.settle(false));
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.keys.is_empty() {
            drop(self.settle(true));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(ip: &str) -> ClientKey {
        ClientKey::of(ip.parse().unwrap())
    }

    fn attempt(ip: &str, user: &str) -> Attempt {
        Attempt::new(client(ip), Some(user.into()), None)
    }

    fn fail(t: &Throttle, a: &Attempt) {
        t.begin(a).expect("not locked").failed();
    }

    #[tokio::test(start_paused = true)]
    async fn locks_grow_and_success_resets() {
        let t = Throttle::new();
        let a = attempt("192.0.2.1", "alice");
        for _ in 0..ADDR_FREE_FAILURES {
            fail(&t, &a);
        }
        assert!(t.check(&a).is_ok(), "free failures do not lock");
        fail(&t, &a);
        let addr_only = Attempt::anonymous(client("192.0.2.1"));
        assert_eq!(t.check(&addr_only), Err(BASE_LOCK));
        tokio::time::advance(BASE_LOCK).await;
        assert!(t.check(&addr_only).is_ok());
        t.begin(&addr_only).unwrap().failed();
        assert_eq!(t.check(&addr_only), Err(BASE_LOCK * 2));
        // Another address is not affected; the user is not locked yet.
        assert!(t.check(&attempt("192.0.2.2", "alice")).is_ok());
        tokio::time::advance(BASE_LOCK * 2).await;
        t.begin(&a).unwrap().succeeded();
        assert!(t.check(&a).is_ok());
        assert_eq!(t.len(), 0, "a success forgets the address and the user");
        assert_eq!(lock_for(1000, 5), Some(MAX_LOCK));
    }

    #[tokio::test(start_paused = true)]
    async fn checks_in_flight_count_against_the_free_failures() {
        let t = Throttle::new();
        let a = attempt("192.0.2.1", "alice");
        let running: Vec<_> = (0..ADDR_FREE_FAILURES)
            .map(|_| t.begin(&a).expect("free"))
            .collect();
        assert_eq!(t.begin(&a).err(), Some(BASE_LOCK));
        // One was never checked (the hashing queue was full): a slot frees.
        let mut running = running.into_iter();
        running.next().unwrap().released();
        let again = t.begin(&a).expect("a slot freed up");
        for p in running {
            p.failed();
        }
        again.failed();
        assert!(t.check(&a).is_ok(), "five failures are free");
        // A check whose client went away mid-hash counts as a failure.
        drop(t.begin(&a).unwrap());
        assert!(t.check(&a).is_err(), "six failures lock the address");
    }

    #[tokio::test(start_paused = true)]
    async fn ipv6_clients_count_per_64_and_unknown_names_share_a_bucket() {
        let t = Throttle::new();
        for i in 0..=ADDR_FREE_FAILURES {
            let ip = format!("2001:db8:1:2::{i:x}");
            fail(&t, &Attempt::anonymous(client(&ip)));
        }
        assert!(
            t.check(&Attempt::anonymous(client("2001:db8:1:2:ffff::1")))
                .is_err()
        );
        assert!(
            t.check(&Attempt::anonymous(client("2001:db8:1:3::1")))
                .is_ok()
        );
        // Unknown names from many addresses fill one bucket, not a table.
        for i in 0..=USER_FREE_FAILURES {
            fail(
                &t,
                &Attempt::new(client(&format!("198.51.100.{i}")), None, None),
            );
        }
        let fresh = Attempt::new(client("203.0.113.9"), None, None);
        assert!(t.check(&fresh).is_err(), "the shared bucket is locked");
        // The /64, one counter per IPv4 address, and the shared bucket.
        assert_eq!(t.len(), 1 + (USER_FREE_FAILURES as usize + 1) + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_known_device_is_judged_by_its_own_failures() {
        let t = Throttle::new();
        for i in 0..10 {
            for _ in 0..3 {
                let a = attempt(&format!("198.51.100.{i}"), "bob");
                if let Ok(p) = t.begin(&a) {
                    p.failed();
                }
            }
        }
        let stranger = attempt("203.0.113.1", "bob");
        assert!(t.check(&stranger).is_err(), "the spray locked bob");
        let device = Attempt::new(client("203.0.113.1"), Some("bob".into()), Some([7; 16]));
        t.begin(&device)
            .expect("bob's own browser is not locked")
            .released();
        for _ in 0..=ADDR_FREE_FAILURES {
            fail(&t, &device);
        }
        assert!(t.check(&device).is_err(), "but its own failures count");
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded_and_a_flood_of_addresses_does_not_evict_locks() {
        let t = Throttle::new();
        // bob is locked, and one address too.
        let bob = attempt("203.0.113.7", "bob");
        for i in 0..USER_FREE_FAILURES + 10 {
            t.failure(&attempt(&format!("198.51.100.{i}"), "bob"));
        }
        // Ten failures past the free ones: locked for 2^9 s.
        for _ in 0..ADDR_FREE_FAILURES + 10 {
            t.failure(&Attempt::anonymous(client("203.0.113.1")));
        }
        assert!(t.check(&bob).is_err());
        // A flood of fresh addresses, each failing once, well past the cap.
        for i in 0..(MAX_ENTRIES as u32 + 500) {
            let ip = std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            t.failure(&Attempt::anonymous(ClientKey::of(ip)));
            if i % 4096 == 0 {
                tokio::time::advance(SWEEP_EVERY).await;
            }
        }
        assert!(t.len() <= MAX_ENTRIES + 2, "{}", t.len());
        assert!(t.check(&bob).is_err(), "bob's lock survived the flood");
        assert!(
            t.check(&Attempt::anonymous(client("203.0.113.1"))).is_err(),
            "the locked address survived the flood"
        );
        // Idle, the counters start over and make room again.
        tokio::time::advance(FORGET_AFTER + MAX_LOCK).await;
        assert!(t.check(&bob).is_ok());
        fail(&t, &Attempt::anonymous(client("192.0.2.99")));
        assert!(t.len() < 100, "swept: {}", t.len());
    }
}
