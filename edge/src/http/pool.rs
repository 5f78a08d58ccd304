//! Idle HTTP/1.1 connections to services, kept per agent session for reuse.
//!
//! A forwarded request needs a stream whose far end the agent has connected
//! to the service. Opening one costs a round trip to the agent and a TCP
//! connect and close at home; reusing a finished request's stream and the
//! service connection behind it costs neither. This is the keep-alive pool
//! every reverse proxy keeps to its upstreams (nginx `keepalive`, Caddy's
//! transport), only the upstream sits at the other end of the tunnel.
//!
//! The pool lives in the agent's link, so a new session starts empty and the
//! old session's connections go with it. Connections wait at most
//! [`IDLE_EXPIRY`], at most [`MAX_IDLE_PER_SERVICE`] per service; the most
//! recently used is taken first, so a quiet period lets the rest expire.
//! None is reused past [`MAX_AGE`], so a service moved to another address
//! by an agent reload is reached there within that time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use burrow_proto::Name;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

/// The request body the edge forwards: the client's own, or none (a safe
/// request replayed after a reused connection failed).
pub type UpstreamBody =
    http_body_util::Either<super::io::ClientBody, http_body_util::Empty<bytes::Bytes>>;

/// How long an idle connection is kept. Services close idle keep-alive
/// connections on their own schedule (uvicorn and Node.js after 5 s); the
/// agent passes that close on, which removes the connection here, and a
/// request that meets a connection closing under it is retried when that
/// is safe ([`crate::http`]).
pub const IDLE_EXPIRY: Duration = Duration::from_secs(30);
/// How long a connection may serve requests, counted from its connect.
pub const MAX_AGE: Duration = Duration::from_secs(60);
/// Idle connections kept per service and route idle timeout.
pub const MAX_IDLE_PER_SERVICE: usize = 64;
/// How often expired connections are swept when no request comes by.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Which connections may serve a request: the same service, and the same
/// idle timeout (it is part of the connection's transport).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub service: Name,
    pub idle_timeout: Option<Duration>,
}

/// An HTTP/1.1 connection to a service, with its age.
pub struct ServiceConn {
    pub sender: SendRequest<UpstreamBody>,
    born: Instant,
}

impl ServiceConn {
    /// A connection made just now.
    pub fn new(sender: SendRequest<UpstreamBody>) -> Self {
        Self {
            sender,
            born: Instant::now(),
        }
    }

    fn usable(&self, now: Instant) -> bool {
        self.sender.is_ready() && now.duration_since(self.born) < MAX_AGE
    }
}

struct Idle {
    conn: ServiceConn,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        self.conn.usable(now) && now.duration_since(self.since) < IDLE_EXPIRY
    }
}

/// One agent session's idle service connections.
#[derive(Default)]
pub struct Pool {
    idle: Mutex<HashMap<PoolKey, Vec<Idle>>>,
    sweeping: AtomicBool,
    /// Set when the session moved to another link: nothing is parked any
    /// more, so the old link's streams can end.
    retired: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl Pool {
    /// The most recently parked connection for `key` that is still open.
    pub fn take(&self, key: &PoolKey) -> Option<ServiceConn> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        let now = Instant::now();
        let found = loop {
            let Some(entry) = list.pop() else { break None };
            if entry.usable(now) {
                break Some(entry.conn);
            }
        };
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Parks a connection whose last response has completed.
    pub fn put(self: &Arc<Self>, key: PoolKey, conn: ServiceConn) {
        if !conn.usable(Instant::now()) {
            return;
        }
        {
            let mut idle = self.lock();
            // Checked under the lock `retire` clears the pool under: a
            // connection parked now cannot slip in after the clear.
            if self.retired.load(Ordering::Acquire) {
                return;
            }
            let list = idle.entry(key).or_default();
            if list.len() >= MAX_IDLE_PER_SERVICE {
                // The oldest goes; dropping its sender closes the stream.
                list.remove(0);
            }
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
        if !self.sweeping.swap(true, Ordering::AcqRel) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Drops every idle connection and parks none from now on (the agent's
    /// session moved to another link; this one drains).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.lock().clear();
    }

    /// Drops the idle connections of every service `keep` says no to.
    pub fn retain_services(&self, keep: impl Fn(&Name) -> bool) {
        self.lock().retain(|key, _| keep(&key.service));
    }

    /// Connections parked now (for tests and the debug view).
    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// Drops expired and closed connections; true when none is left.
    fn prune(&self) -> bool {
        let mut idle = self.lock();
        let now = Instant::now();
        idle.retain(|_, list| {
            list.retain(|e| e.usable(now));
            !list.is_empty()
        });
        idle.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Vec<Idle>>> {
        // A panic elsewhere cannot leave the map inconsistent: take it as is.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Expires idle connections while any are parked; ends when the pool is
/// empty (the next `put` starts another) or gone with its session.
async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.prune() {
            pool.sweeping.store(false, Ordering::Release);
            // A put may have parked one between the prune and the store.
            if pool.idle_count() == 0 || pool.sweeping.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;

    async fn sender() -> ServiceConn {
        let (near, _far) = tokio::io::duplex(64);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(near))
            .await
            .expect("handshake over a duplex pipe");
        tokio::spawn(async move {
            let _far = _far;
            let _ = conn.await;
        });
        let mut sender = sender;
        sender
            .ready()
            .await
            .expect("a fresh connection turns ready");
        ServiceConn::new(sender)
    }

    fn key(service: &str) -> PoolKey {
        PoolKey {
            service: Name::new(service).expect("valid name"),
            idle_timeout: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_a_bounded_number_and_lets_them_expire() {
        let pool = Arc::new(Pool::default());
        for _ in 0..MAX_IDLE_PER_SERVICE + 3 {
            pool.put(key("chat"), sender().await);
        }
        pool.put(key("other"), sender().await);
        assert_eq!(pool.idle_count(), MAX_IDLE_PER_SERVICE + 1);
        assert!(pool.take(&key("chat")).is_some());
        assert!(pool.take(&key("nosuch")).is_none());

        pool.retain_services(|name| name.as_str() != "other");
        assert!(pool.take(&key("other")).is_none());

        // Busy connections still retire at their maximum age.
        tokio::time::advance(IDLE_EXPIRY - SWEEP_EVERY).await;
        let busy = pool.take(&key("chat")).expect("not expired yet");
        tokio::time::advance(MAX_AGE - IDLE_EXPIRY + SWEEP_EVERY).await;
        pool.put(key("chat"), busy);
        assert!(pool.take(&key("chat")).is_none(), "too old to reuse");

        tokio::time::advance(IDLE_EXPIRY + SWEEP_EVERY).await;
        tokio::task::yield_now().await;
        assert!(pool.take(&key("chat")).is_none(), "expired");
        assert_eq!(pool.idle_count(), 0, "swept without a request coming by");
    }

    #[tokio::test]
    async fn a_closed_connection_is_never_handed_out() {
        let pool = Arc::new(Pool::default());
        let (near, far) = tokio::io::duplex(64);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, UpstreamBody>(TokioIo::new(near))
                .await
                .expect("handshake");
        let driver = tokio::spawn(conn);
        sender.ready().await.expect("ready");
        pool.put(key("chat"), ServiceConn::new(sender));
        assert_eq!(pool.idle_count(), 1);
        // The service's end goes away while the connection sits idle.
        drop(far);
        let _ = driver.await;
        assert!(pool.take(&key("chat")).is_none());
    }
}
