//! Which agents are connected now, and waiting briefly for one that is
//! expected back (just after an edge restart or an agent's reconnect).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::identity::Fingerprint;
use burrow_proto::{Name, ServiceStatus};
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a request for an agent that is not connected waits for it,
/// counted from the edge's start or the agent's last disconnect. Agents
/// retry within a few seconds, so a restart is bridged instead of failing.
pub const AGENT_GRACE: Duration = Duration::from_secs(5);

/// One live agent session.
#[derive(Debug, Clone)]
pub struct AgentLink {
    pub name: Name,
    /// The key the agent authenticated with.
    pub key: Fingerprint,
    pub session: u64,
    pub conn: quinn::Connection,
    services: Arc<Mutex<Vec<ServiceStatus>>>,
}

impl AgentLink {
    pub fn new(name: Name, key: Fingerprint, session: u64, conn: quinn::Connection) -> Self {
        Self {
            name,
            key,
            session,
            conn,
            services: Arc::default(),
        }
    }

    pub fn set_services(&self, list: Vec<ServiceStatus>) {
        *self.services.lock().expect("services lock not poisoned") = list;
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        self.services
            .lock()
            .expect("services lock not poisoned")
            .clone()
    }
}

#[derive(Debug)]
struct Inner {
    links: HashMap<Name, AgentLink>,
    /// When each known agent was last seen going offline (or the edge started).
    offline_since: HashMap<Name, Instant>,
}

/// The connected agents, by name.
#[derive(Debug)]
pub struct Registry {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
}

impl Registry {
    pub fn new(expected: impl IntoIterator<Item = Name>) -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                links: HashMap::new(),
                offline_since: expected.into_iter().map(|n| (n, now)).collect(),
            }),
            changed: watch::channel(0).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("registry lock not poisoned")
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Sets the agents expected to connect (config reload): new names get a
    /// fresh grace period, removed ones are forgotten.
    pub fn expect(&self, names: impl IntoIterator<Item = Name>) {
        let now = Instant::now();
        let mut inner = self.lock();
        let names: Vec<Name> = names.into_iter().collect();
        inner.offline_since.retain(|n, _| names.contains(n));
        for n in names {
            if !inner.links.contains_key(&n) {
                inner.offline_since.entry(n).or_insert(now);
            }
        }
    }

    /// Registers a session; returns the one it replaces, if any.
    pub fn insert(&self, link: AgentLink) -> Option<AgentLink> {
        let old = {
            let mut inner = self.lock();
            inner.offline_since.remove(&link.name);
            inner.links.insert(link.name.clone(), link)
        };
        self.bump();
        old
    }

    /// Removes the agent's session if it is still `session` (a replaced
    /// session must not remove its successor).
    pub fn remove(&self, name: &Name, session: u64) {
        let removed = {
            let mut inner = self.lock();
            if inner.links.get(name).is_some_and(|l| l.session == session) {
                inner.links.remove(name);
                inner.offline_since.insert(name.clone(), Instant::now());
                true
            } else {
                false
            }
        };
        if removed {
            self.bump();
        }
    }

    pub fn get(&self, name: &Name) -> Option<AgentLink> {
        self.lock().links.get(name).cloned()
    }

    pub fn connected(&self) -> Vec<AgentLink> {
        self.lock().links.values().cloned().collect()
    }

    /// The agent's session, waiting up to [`AGENT_GRACE`] after its last
    /// disconnect for it to come back.
    pub async fn wait_for(&self, name: &Name) -> Option<AgentLink> {
        let mut changes = self.changed.subscribe();
        let deadline = {
            let inner = self.lock();
            if let Some(link) = inner.links.get(name) {
                return Some(link.clone());
            }
            inner.offline_since.get(name)?.checked_add(AGENT_GRACE)?
        };
        loop {
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {
                    if let Some(link) = self.get(name) {
                        return Some(link);
                    }
                }
                // Deadline passed, or the registry is gone.
                _ => return None,
            }
        }
    }

    /// A receiver that changes whenever an agent connects or leaves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
