//! Several edges sharing state through Redis (`[cluster]`).
//!
//! The edges keep no protocol of their own between them: Redis holds what
//! they share, and each edge reads and writes it with plain commands and a
//! few Lua scripts (each atomic on the server):
//!
//! | key | what |
//! | --- | --- |
//! | `burrow:acme:account:<dir>` | the ACME account (sealed) |
//! | `burrow:acme:cert:<name>` | a name's certificate chain and key (sealed) |
//! | `burrow:lock:<what>` | who orders a name (or creates the account) now |
//! | `burrow:acme:http01:<token>` | an HTTP-01 key authorization, for 10 minutes |
//! | `burrow:acme:alpn:<name>` | a TLS-ALPN-01 digest, for 10 minutes |
//! | `burrow:sessions:key` | the session-cookie signing secret (sealed) |
//! | `burrow:sessions:generation` | the revocation generation (`logout-all`) |
//! | `burrow:throttle:<key>` | failed logins of an address, user or device |
//! | `burrow:rate:<route>:<who>` | a rate limit's next arrival time (GCRA) |
//!
//! "Sealed" values are encrypted with AES-256-GCM under a key derived from
//! `secret_file`, the key's name bound in as associated data, so a value
//! read from Redis was written by an edge holding the same secret, for
//! that key.
//!
//! Redis may be away. Every call then fails fast with
//! [`ClusterError::Unavailable`] (a health flag, probed in the background
//! with backoff), and each caller falls back to what the edge holds:
//! certificates in memory and on disk, the session key it has, local
//! throttle and rate counters. Orders are never placed without the lock.

pub mod counters;
mod seal;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::ClusterConfig;
pub use seal::Sealer;

/// How long one command may take before Redis counts as away.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often a healthy cluster is polled (session generation, health).
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// Probes of an away Redis back off from the first to the second.
pub const PROBE_MIN: Duration = Duration::from_millis(250);
pub const PROBE_MAX: Duration = Duration::from_secs(5);
/// A lock is held this long unless renewed.
pub const LOCK_TTL: Duration = Duration::from_secs(60);
/// Challenge material lives this long in Redis.
pub const CHALLENGE_TTL: Duration = Duration::from_secs(600);
/// The longest value the edge reads from Redis (a certificate chain is a
/// few KiB): anything larger is not ours.
pub const MAX_VALUE: usize = 256 * 1024;
const PREFIX: &str = "burrow:";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("Redis is unavailable")]
    Unavailable,
    #[error("Redis: {0}")]
    Redis(String),
    #[error("{key}: {why}")]
    Corrupt { key: String, why: String },
}

/// Reading `[cluster]`'s files failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cluster.secret_file {path}: {why}")]
    Secret { path: String, why: String },
    #[error("cluster.redis_password_file {path}: {why}")]
    Password { path: String, why: String },
    #[error("cluster.redis: {0}")]
    Url(String),
}

/// A held lock: released by [`Cluster::unlock`], or lapsing after
/// [`LOCK_TTL`] unless renewed.
#[derive(Debug)]
pub struct Lock {
    key: String,
    token: String,
}

/// The edge's side of the cluster.
pub struct Cluster {
    redis: ConnectionManager,
    sealer: Sealer,
    healthy: AtomicBool,
    /// Wakes the prober when a command found Redis away.
    lost: tokio::sync::Notify,
    /// The highest session generation seen in Redis.
    generation: AtomicU64,
    /// The shared session secret once read, and how often it changed
    /// (read together); the count again, for a check without the lock.
    session_secret: Mutex<(Option<[u8; 32]>, u64)>,
    session_version: AtomicU64,
    /// This edge's own generation (its `logout-all` file): read to push
    /// it up to Redis (a revocation made while Redis was away reaches the
    /// others), written when the cluster's is higher (so a restart
    /// without Redis keeps refusing what the cluster revoked).
    local_generation: Mutex<Option<LocalGeneration>>,
    /// Whether keeping the generation on disk failed (said once).
    generation_warned: AtomicBool,
}

/// Reads and raises this edge's own session generation.
pub struct LocalGeneration {
    pub read: Box<dyn Fn() -> u64 + Send + Sync>,
    pub raise: Box<dyn Fn(u64) -> std::io::Result<()> + Send + Sync>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("healthy", &self.healthy.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

fn key(parts: &[&str]) -> String {
    let mut k = String::from(PREFIX);
    k.push_str(&parts.join(":"));
    k
}

/// Compare-and-delete: releases a lock only if it is still ours.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Compare-and-extend: renews a lock only if it is still ours.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0";

/// Raises the generation to at least ARGV[1]; returns it.
const RAISE_GENERATION: &str = r"
local g = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
local want = tonumber(ARGV[1])
if want > g then
  redis.call('SET', KEYS[1], ARGV[1])
  return want
end
return g";

static UNLOCK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(UNLOCK));
static RENEW_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RENEW));
static RAISE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(RAISE_GENERATION));

impl Cluster {
    /// Reads `[cluster]`'s files and prepares the connection; nothing is
    /// sent until [`Cluster::run`] (or a command) connects.
    pub fn new(config: &ClusterConfig) -> Result<Arc<Self>, SetupError> {
        let sealer = Sealer::from_file(&config.secret_file).map_err(|why| SetupError::Secret {
            path: config.secret_file.display().to_string(),
            why,
        })?;
        let client = client(config)?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let redis = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| SetupError::Url(e.to_string()))?;
        Ok(Arc::new(Self {
            redis,
            sealer,
            // Optimistic: the first command finds out (within
            // COMMAND_TIMEOUT), rather than every caller waiting for the
            // first probe.
            healthy: AtomicBool::new(true),
            lost: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
            session_secret: Mutex::new((None, 0)),
            session_version: AtomicU64::new(0),
            local_generation: Mutex::new(None),
            generation_warned: AtomicBool::new(false),
        }))
    }

    /// Whether Redis answered last time it was asked.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// The highest session generation Redis has shown.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// The shared session secret, once read, and a number that changes
    /// whenever it does.
    pub fn session_secret(&self) -> (Option<[u8; 32]>, u64) {
        *self
            .session_secret
            .lock()
            .expect("secret lock not poisoned")
    }

    /// How often the shared session secret changed: one atomic load, for
    /// callers that look on every request.
    pub fn session_version(&self) -> u64 {
        self.session_version.load(Ordering::Acquire)
    }

    /// Where this edge's own generation is kept (the `logout-all` file).
    pub fn set_local_generation(&self, local: LocalGeneration) {
        *self
            .local_generation
            .lock()
            .expect("generation lock not poisoned") = Some(local);
    }

    /// Keeps the health flag, the generation and the session secret
    /// current until `shutdown`: polls every [`POLL_EVERY`] while Redis
    /// answers, probes with backoff while it does not.
    pub async fn run(self: Arc<Self>, local_secret: Option<[u8; 32]>, shutdown: CancellationToken) {
        let mut backoff = PROBE_MIN;
        // What the log said last: up or away; and the last refusal logged.
        let mut logged_up = None;
        let mut last_refusal: Option<String> = None;
        loop {
            match self.poll(local_secret).await {
                Ok(()) => {
                    if logged_up != Some(true) {
                        info!("cluster: Redis is reachable");
                        logged_up = Some(true);
                    }
                    backoff = PROBE_MIN;
                    tokio::select! {
                        () = tokio::time::sleep(POLL_EVERY) => {}
                        () = self.lost.notified() => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                // Redis answers but refused something (out of memory, a
                // replica, a key sealed under another secret): it is not
                // away, and reads go on.
                Err(e @ (ClusterError::Redis(_) | ClusterError::Corrupt { .. })) => {
                    let text = e.to_string();
                    if last_refusal.as_deref() != Some(text.as_str()) {
                        warn!(error = %text, "cluster: Redis refused the edge's poll");
                        last_refusal = Some(text);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(POLL_EVERY) => {}
                        () = shutdown.cancelled() => return,
                    }
                }
                Err(e) => {
                    // A command that found Redis away has said so already.
                    let was_healthy = self.healthy.swap(false, Ordering::Relaxed);
                    if logged_up != Some(false) {
                        if was_healthy {
                            warn!(error = %e, "cluster: Redis is unreachable; serving with what this edge holds, retrying");
                        }
                        logged_up = Some(false);
                    }
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(PROBE_MAX);
                }
            }
        }
    }

    /// One poll: the generation (the highest this edge knows pushed up,
    /// the cluster's read) and the session secret (the one in use offered,
    /// the cluster's taken). Offering every time puts both back should
    /// Redis lose its data.
    async fn poll(&self, local_secret: Option<[u8; 32]>) -> Result<(), ClusterError> {
        let mut con = self.redis.clone();
        let local = self
            .local_generation
            .lock()
            .expect("generation lock not poisoned")
            .as_ref()
            .map_or(0, |l| (l.read)());
        let g: u64 = Self::timed(
            RAISE_SCRIPT
                .key(key(&["sessions", "generation"]))
                .arg(local.max(self.generation()))
                .invoke_async(&mut con),
        )
        .await?;
        self.generation.fetch_max(g, Ordering::Relaxed);
        if g > local
            && let Some(l) = self
                .local_generation
                .lock()
                .expect("generation lock not poisoned")
                .as_ref()
            && let Err(e) = (l.raise)(g)
            && !self.generation_warned.swap(true, Ordering::Relaxed)
        {
            warn!(error = %e, "cannot keep the cluster's session generation on disk");
        }
        // Redis answers: commands may go through again.
        self.healthy.store(true, Ordering::Relaxed);
        let (in_use, _) = self.session_secret();
        if let Some(offer) = in_use.or(local_secret) {
            let shared = self.share_session_secret(offer).await?;
            if in_use != Some(shared) {
                self.adopt_session_secret(shared);
                if local_secret != Some(shared) {
                    info!("cluster: using the cluster's session key");
                }
            }
        }
        Ok(())
    }

    /// Signs sessions with `secret` from now on (the cluster's).
    pub(crate) fn adopt_session_secret(&self, secret: [u8; 32]) {
        let mut slot = self
            .session_secret
            .lock()
            .expect("secret lock not poisoned");
        *slot = (Some(secret), slot.1 + 1);
        self.session_version.store(slot.1, Ordering::Release);
    }

    /// The cluster's session secret: ours if Redis had none.
    async fn share_session_secret(&self, ours: [u8; 32]) -> Result<[u8; 32], ClusterError> {
        let k = key(&["sessions", "key"]);
        self.put_sealed_nx(&k, &ours).await?;
        let stored = self
            .get_sealed(&k)
            .await?
            .ok_or_else(|| ClusterError::Redis("the session key vanished".into()))?;
        stored.try_into().map_err(|_| ClusterError::Corrupt {
            key: k,
            why: "not a 32-byte key".into(),
        })
    }

    /// Runs a command with the health flag: refused at once while Redis
    /// is away, and marking it away when it fails to answer.
    async fn call<T>(
        &self,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        if !self.is_healthy() {
            return Err(ClusterError::Unavailable);
        }
        match Self::timed(f).await {
            Err(ClusterError::Unavailable) => {
                if self.healthy.swap(false, Ordering::Relaxed) {
                    warn!("cluster: Redis stopped answering; serving with what this edge holds");
                    self.lost.notify_one();
                }
                Err(ClusterError::Unavailable)
            }
            other => other,
        }
    }

    async fn timed<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, ClusterError> {
        match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Err(_) => Err(ClusterError::Unavailable),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e))
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error() =>
            {
                Err(ClusterError::Unavailable)
            }
            Ok(Err(e)) => Err(ClusterError::Redis(e.to_string())),
        }
    }

    /// A value at `parts`, bounded in size.
    pub async fn get(&self, parts: &[&str]) -> Result<Option<Vec<u8>>, ClusterError> {
        let k = key(parts);
        self.get_raw(&k).await
    }

    async fn get_raw(&self, k: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        let mut con = self.redis.clone();
        let v: Option<Vec<u8>> = self.call(con.get(k)).await?;
        match v {
            Some(v) if v.len() > MAX_VALUE => Err(ClusterError::Corrupt {
                key: k.to_owned(),
                why: format!("{} bytes, more than {MAX_VALUE}", v.len()),
            }),
            v => Ok(v),
        }
    }

    /// Sets `parts` to `value`, expiring after `ttl` if given.
    pub async fn put(
        &self,
        parts: &[&str],
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), ClusterError> {
        let k = key(parts);
        let mut con = self.redis.clone();
        match ttl {
            Some(ttl) => {
                let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
                self.call(con.pset_ex::<_, _, ()>(&k, value, ms)).await
            }
            None => self.call(con.set::<_, _, ()>(&k, value)).await,
        }
    }

    /// Deletes `parts`.
    pub async fn delete(&self, parts: &[&str]) -> Result<(), ClusterError> {
        let mut con = self.redis.clone();
        self.call(con.del::<_, ()>(key(parts))).await
    }

    /// Deletes `parts` if it still holds `value` (another edge may have
    /// put its own there since).
    pub async fn delete_if(&self, parts: &[&str], value: &[u8]) -> Result<(), ClusterError> {
        let mut con = self.redis.clone();
        self.call(
            UNLOCK_SCRIPT
                .key(key(parts))
                .arg(value)
                .invoke_async::<i64>(&mut con),
        )
        .await
        .map(drop)
    }

    /// The decrypted value at `parts`.
    pub async fn get_sealed_at(&self, parts: &[&str]) -> Result<Option<Vec<u8>>, ClusterError> {
        self.get_sealed(&key(parts)).await
    }

    async fn get_sealed(&self, k: &str) -> Result<Option<Vec<u8>>, ClusterError> {
        let Some(sealed) = self.get_raw(k).await? else {
            return Ok(None);
        };
        self.sealer
            .open(k.as_bytes(), sealed)
            .map(Some)
            .ok_or_else(|| ClusterError::Corrupt {
                key: k.to_owned(),
                why: "cannot decrypt it: is cluster.secret_file the same on every edge?".into(),
            })
    }

    /// Stores `value` encrypted at `parts`. Not through the health flag:
    /// the few writes that store what the cluster must keep (an account, a
    /// certificate) are tried even if another command just found Redis
    /// slow.
    pub async fn put_sealed(&self, parts: &[&str], value: &[u8]) -> Result<(), ClusterError> {
        let k = key(parts);
        let sealed = self.sealer.seal(k.as_bytes(), value);
        let mut con = self.redis.clone();
        Self::timed(con.set::<_, _, ()>(&k, sealed)).await
    }

    async fn put_sealed_nx(&self, k: &str, value: &[u8]) -> Result<bool, ClusterError> {
        let sealed = self.sealer.seal(k.as_bytes(), value);
        let mut con = self.redis.clone();
        Self::timed(con.set_nx(k, sealed)).await
    }

    /// Takes the lock `burrow:lock:<what>` if no edge holds it (SET NX
    /// with [`LOCK_TTL`]); `None` when another edge does.
    pub async fn try_lock(&self, what: &str) -> Result<Option<Lock>, ClusterError> {
        let k = key(&["lock", what]);
        let token = self.sealer.token();
        let mut con = self.redis.clone();
        let ttl = u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX);
        let opts = redis::SetOptions::default()
            .conditional_set(redis::ExistenceCheck::NX)
            .with_expiration(redis::SetExpiry::PX(ttl));
        let set: Option<String> = self.call(con.set_options(&k, &token, opts)).await?;
        Ok(set.map(|_| Lock { key: k, token }))
    }

    /// Extends `lock` by [`LOCK_TTL`]; `false` if it is no longer ours.
    pub async fn renew(&self, lock: &Lock) -> Result<bool, ClusterError> {
        let mut con = self.redis.clone();
        let ttl = u64::try_from(LOCK_TTL.as_millis()).unwrap_or(u64::MAX);
        // Not through the health flag: a lock is given up only when Redis
        // itself does not answer, not when another command found it slow.
        let renewed: i64 = Self::timed(
            RENEW_SCRIPT
                .key(&lock.key)
                .arg(&lock.token)
                .arg(ttl)
                .invoke_async(&mut con),
        )
        .await?;
        Ok(renewed == 1)
    }

    /// Releases `lock` if it is still ours (compare-and-delete).
    pub async fn unlock(&self, lock: Lock) {
        let mut con = self.redis.clone();
        let released: Result<i64, _> = self
            .call(
                UNLOCK_SCRIPT
                    .key(&lock.key)
                    .arg(&lock.token)
                    .invoke_async(&mut con),
            )
            .await;
        if let Err(e) = released {
            warn!(lock = %lock.key, error = %e, "cluster: cannot release a lock; it lapses on its own");
        }
    }

    /// Raises the shared session generation to at least `at_least` and
    /// returns it (`burrow logout-all`).
    pub async fn raise_generation(&self, at_least: u64) -> Result<u64, ClusterError> {
        let mut con = self.redis.clone();
        let g: u64 = Self::timed(
            RAISE_SCRIPT
                .key(key(&["sessions", "generation"]))
                .arg(at_least)
                .invoke_async(&mut con),
        )
        .await?;
        self.generation.fetch_max(g, Ordering::Relaxed);
        Ok(g)
    }

    /// The current shared session generation, read now.
    pub async fn read_generation(&self) -> Result<u64, ClusterError> {
        let mut con = self.redis.clone();
        let g: Option<u64> = Self::timed(con.get(key(&["sessions", "generation"]))).await?;
        Ok(g.unwrap_or(0))
    }

    /// The connection, for the scripts of [`throttle`] and rate limits.
    fn connection(&self) -> ConnectionManager {
        self.redis.clone()
    }
}

fn client(config: &ClusterConfig) -> Result<redis::Client, SetupError> {
    let mut info = config
        .redis
        .as_str()
        .into_connection_info()
        .map_err(|e| SetupError::Url(e.to_string()))?;
    if let Some(path) = &config.redis_password_file {
        let password = read_password(path).map_err(|why| SetupError::Password {
            path: path.display().to_string(),
            why,
        })?;
        let settings = info.redis_settings().clone().set_password(password);
        info = info.set_redis_settings(settings);
    }
    redis::Client::open(info).map_err(|e| SetupError::Url(e.to_string()))
}

fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let password = text.trim_end_matches(['\r', '\n']);
    if password.is_empty() {
        return Err("empty".into());
    }
    Ok(password.to_owned())
}
