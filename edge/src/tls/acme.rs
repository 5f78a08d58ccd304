//! Certificates from an ACME CA (Let's Encrypt, or Pebble in tests).
//!
//! At start every name gets what is on disk if it is still valid, else a
//! temporary self-signed certificate, so listeners never wait on the CA. A
//! background task then orders what is missing and renews at two thirds of
//! the lifetime, answering HTTP-01 on the plain-HTTP listener or
//! TLS-ALPN-01 on the HTTPS listener (trying the other type when one
//! fails), backing off on failure. A valid certificate on disk is never
//! re-ordered; a renewed one replaces the old in the store, so open
//! connections keep theirs and new ones get the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use burrow_proto::fsutil;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rcgen::{CertificateParams, CustomExtension, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::{CertStore, certified};
use crate::cluster::{Cluster, ClusterError};
use crate::config::AcmeConfig;

/// The longest sleep between two checks of the schedule.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(3600);
/// Failed attempts back off from `retry_min`, doubling up to this.
pub const RETRY_MAX: Duration = Duration::from_secs(24 * 3600);
/// How often the CA's renewal window (ARI, RFC 9773) is asked for at most,
/// and at least when the CA gives no hint.
pub const ARI_MIN_INTERVAL: Duration = Duration::from_secs(3600);
pub const ARI_MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// How long one order may take from creation to certificate.
pub const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("ACME account: {0}")]
    Account(String),
    #[error("{0}")]
    Order(String),
    #[error("writing {path}: {source}")]
    Store {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Certificate(String),
    /// Not an error: the cluster cannot let this edge order now (another
    /// edge holds the lock, or Redis is away); try again shortly.
    #[error("{0}")]
    Wait(String),
}

/// How soon a name waiting on the cluster is looked at again.
pub const CLUSTER_WAIT: Duration = Duration::from_secs(2);

/// Describes an ACME library error so an operator can act on it: the
/// problem type (rate limit, CAA, DNS, connection...) and its detail.
fn describe(e: &instant_acme::Error) -> String {
    match e {
        instant_acme::Error::Api(p) => {
            let kind = p
                .r#type
                .as_deref()
                .and_then(|t| t.rsplit(':').next())
                .unwrap_or("error");
            let mut s = format!("{kind}: {}", p.detail.as_deref().unwrap_or("no detail"));
            for sub in &p.subproblems {
                if let Some(d) = &sub.detail {
                    s.push_str("; ");
                    s.push_str(d);
                }
            }
            s
        }
        instant_acme::Error::Hyper(e) => {
            format!("cannot reach the CA: {e} (DNS, firewall, or the CA is down)")
        }
        other => other.to_string(),
    }
}

/// What the edge knows about one name's certificate, for status output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertStatus {
    /// Expiry of the certificate being served (none while temporary).
    pub not_after: Option<SystemTime>,
    pub renew_at: Option<SystemTime>,
    pub last_error: Option<String>,
    pub next_attempt: Option<SystemTime>,
    pub failures: u32,
}

/// A certificate chain and key as stored on disk.
struct Issued {
    /// The PEM it was read from (chain, then key).
    pem: Vec<u8>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Issued {
    fn parse(pem: &[u8]) -> Result<Self, String> {
        let chain = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let key = PrivateKeyDer::from_pem_slice(pem).map_err(|e| e.to_string())?;
        let leaf = chain.first().ok_or("no certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
        let at = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
        Ok(Self {
            pem: pem.to_vec(),
            not_before: at(cert.validity().not_before.timestamp()),
            not_after: at(cert.validity().not_after.timestamp()),
            chain,
            key,
        })
    }

    /// Two thirds into the lifetime: 60 days of 90, and still sane when
    /// lifetimes shrink (a 6-day certificate renews after 4).
    fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }
}

/// The ACME side of the edge.
pub struct AcmeManager {
    config: AcmeConfig,
    dir: PathBuf,
    names: Mutex<Vec<String>>,
    /// Wakes the schedule early (names added by a reload).
    wake: tokio::sync::Notify,
    certs: Arc<CertStore>,
    /// Whether HTTP-01 can be answered (a plain-HTTP listener exists).
    http01: bool,
    account: tokio::sync::Mutex<Option<Account>>,
    status: Mutex<BTreeMap<String, CertStatus>>,
    orders: AtomicU64,
    changed: watch::Sender<u64>,
    passes: watch::Sender<u64>,
    /// When to ask the CA for each name's renewal window next; cleared for
    /// good when the directory offers no renewalInfo.
    ari_next: Mutex<BTreeMap<String, SystemTime>>,
    ari_supported: std::sync::atomic::AtomicBool,
    /// With `[cluster]`: the account, certificates, challenges and a lock
    /// per name live in Redis, shared by every edge.
    cluster: Option<Arc<Cluster>>,
}

impl std::fmt::Debug for AcmeManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeManager")
            .field("directory", &self.config.directory)
            .field(
                "names",
                &self.names.lock().expect("names lock not poisoned"),
            )
            .finish_non_exhaustive()
    }
}

fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

fn jitter(d: Duration) -> Duration {
    // Up to 10% later, so many edges do not renew in lockstep.
    d + d.mul_f64(rand::random::<f64>() * 0.1)
}

impl AcmeManager {
    /// Loads stored certificates into `certs` (temporary ones where none is
    /// valid) and returns the manager; nothing is ordered until `run`.
    pub fn load(
        config: AcmeConfig,
        state_dir: &Path,
        names: Vec<String>,
        certs: Arc<CertStore>,
        http01: bool,
    ) -> Result<Self, super::TlsError> {
        let dir = state_dir.join("acme");
        let mut status = BTreeMap::new();
        for name in &names {
            let mut st = CertStatus::default();
            match std::fs::read(cert_path(&dir, name)).map(|pem| Issued::parse(&pem)) {
                Ok(Ok(issued)) if issued.not_after > SystemTime::now() => {
                    st.not_after = Some(issued.not_after);
                    st.renew_at = Some(issued.renew_at());
                    info!(name, not_after = ?issued.not_after, renew_at = ?issued.renew_at(), "loaded certificate from disk");
                    certs.install(
                        std::slice::from_ref(name),
                        certified(issued.chain, issued.key)?,
                    );
                }
                Ok(Ok(_)) => {
                    warn!(name, "stored certificate has expired; ordering a new one");
                    certs.install(
                        std::slice::from_ref(name),
                        super::temporary(std::slice::from_ref(name))?,
                    );
                }
                Ok(Err(e)) => {
                    warn!(name, error = %e, "stored certificate is unreadable; ordering a new one");
                    certs.install(
                        std::slice::from_ref(name),
                        super::temporary(std::slice::from_ref(name))?,
                    );
                }
                Err(_) => {
                    certs.install(
                        std::slice::from_ref(name),
                        super::temporary(std::slice::from_ref(name))?,
                    );
                }
            }
            status.insert(name.clone(), st);
        }
        Ok(Self {
            config,
            dir,
            names: Mutex::new(names),
            wake: tokio::sync::Notify::new(),
            certs,
            http01,
            account: tokio::sync::Mutex::new(None),
            status: Mutex::new(status),
            orders: AtomicU64::new(0),
            changed: watch::channel(0).0,
            passes: watch::channel(0).0,
            ari_next: Mutex::default(),
            ari_supported: std::sync::atomic::AtomicBool::new(true),
            cluster: None,
        })
    }

    /// Shares account, certificates, challenges and order locks with the
    /// other edges of `cluster`.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Option<Arc<Cluster>>) -> Self {
        self.cluster = cluster;
        self
    }

    /// Adds names (a reload added routes): they get a temporary certificate
    /// now and are ordered at once.
    pub fn add_names(&self, names: &[String]) -> Result<(), super::TlsError> {
        let mut known = self.names.lock().expect("names lock not poisoned");
        let mut added = false;
        for name in names {
            if !known.contains(name) {
                self.certs.install(
                    std::slice::from_ref(name),
                    super::temporary(std::slice::from_ref(name))?,
                );
                self.status
                    .lock()
                    .expect("status lock not poisoned")
                    .insert(name.clone(), CertStatus::default());
                known.push(name.clone());
                added = true;
            }
        }
        if added {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Each name's certificate state.
    pub fn status(&self) -> BTreeMap<String, CertStatus> {
        self.status
            .lock()
            .expect("status lock not poisoned")
            .clone()
    }

    /// Orders placed since start.
    pub fn orders(&self) -> u64 {
        self.orders.load(Ordering::Relaxed)
    }

    /// Changes whenever a pass over the names ends, an order is placed or
    /// a certificate changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Counts completed passes over the schedule.
    pub fn passes(&self) -> watch::Receiver<u64> {
        self.passes.subscribe()
    }

    fn due(&self, name: &str, now: SystemTime) -> bool {
        let status = self.status.lock().expect("status lock not poisoned");
        let Some(st) = status.get(name) else {
            return false;
        };
        let renew = st.renew_at.is_none_or(|t| t <= now);
        let allowed = st.next_attempt.is_none_or(|t| t <= now);
        renew && allowed
    }

    /// When the next name becomes due.
    fn next_due(&self) -> Option<SystemTime> {
        let status = self.status.lock().expect("status lock not poisoned");
        status
            .values()
            .map(|st| match (st.renew_at, st.next_attempt) {
                (None, None) => SystemTime::now(),
                (Some(r), None) => r,
                (None, Some(n)) => n,
                (Some(r), Some(n)) => r.max(n),
            })
            .min()
    }

    /// Runs the schedule until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let now = SystemTime::now();
            let names = self.names.lock().expect("names lock not poisoned").clone();
            for name in names {
                if shutdown.is_cancelled() {
                    return;
                }
                self.check_renewal_window(&name).await;
                if self.due(&name, now) {
                    self.attempt(&name).await;
                }
            }
            self.changed.send_modify(|v| *v += 1);
            self.passes.send_modify(|v| *v += 1);
            let wait = self
                .next_due()
                .map_or(CHECK_INTERVAL, |t| {
                    t.duration_since(SystemTime::now()).unwrap_or_default()
                })
                .min(CHECK_INTERVAL);
            tokio::select! {
                () = tokio::time::sleep(jitter(wait)) => {}
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn attempt(&self, name: &str) {
        let result = match &self.cluster {
            None => self.obtain(name).await,
            Some(cluster) => self.obtain_shared(cluster, name).await,
        };
        match result {
            Ok(issued) => {
                let (not_after, renew_at) = (issued.not_after, issued.renew_at());
                match certified(issued.chain, issued.key) {
                    Ok(key) => {
                        self.certs.install(&[name.to_owned()], key);
                        info!(name, ?not_after, ?renew_at, "installed new certificate");
                        // The new certificate has a renewal window of its own.
                        self.ari_next
                            .lock()
                            .expect("ari lock not poisoned")
                            .remove(name);
                        let mut status = self.status.lock().expect("status lock not poisoned");
                        status.insert(
                            name.to_owned(),
                            CertStatus {
                                not_after: Some(not_after),
                                renew_at: Some(renew_at),
                                ..CertStatus::default()
                            },
                        );
                    }
                    Err(e) => self.failed(name, &format!("issued certificate unusable: {e}"), None),
                }
            }
            Err((AcmeError::Wait(why), _)) => self.waiting(name, &why),
            Err((e, retry_at)) => self.failed(name, &e.to_string(), retry_at),
        }
        self.changed.send_modify(|v| *v += 1);
    }

    /// The cluster cannot let this edge order `name` now: looked at again
    /// after [`CLUSTER_WAIT`], with no failure counted.
    fn waiting(&self, name: &str, why: &str) {
        let mut status = self.status.lock().expect("status lock not poisoned");
        let st = status.entry(name.to_owned()).or_default();
        st.next_attempt = Some(SystemTime::now() + CLUSTER_WAIT);
        if st.last_error.as_deref() != Some(why) {
            info!(name, reason = why, "certificate waits on the cluster");
            st.last_error = Some(why.to_owned());
        }
    }

    /// `name`'s certificate through the cluster: the one another edge
    /// stored if it is still good, else one this edge orders while it
    /// holds the name's lock (taken with SET NX, renewed while the order
    /// runs, released by compare-and-delete), after reading the store
    /// again under the lock. Without Redis nothing is ordered.
    async fn obtain_shared(
        &self,
        cluster: &Cluster,
        name: &str,
    ) -> Result<Issued, (AcmeError, Option<SystemTime>)> {
        let wait = |why: String| (AcmeError::Wait(why), None);
        let unavailable =
            || wait("Redis is unavailable; not ordering without the cluster's lock".into());
        match self.shared_certificate(cluster, name).await {
            Ok(Some(issued)) => return Ok(issued),
            Ok(None) => {}
            Err(ClusterError::Unavailable) => return Err(unavailable()),
            Err(e) => return Err((AcmeError::Order(format!("cluster store: {e}")), None)),
        }
        // The account first: creating it takes a lock of its own.
        self.account().await.map_err(|e| (e, None))?;
        let lock = match cluster.try_lock(&format!("acme:{name}")).await {
            Ok(Some(lock)) => lock,
            Ok(None) => return Err(wait("another edge is ordering it".into())),
            Err(ClusterError::Unavailable) => return Err(unavailable()),
            Err(e) => return Err((AcmeError::Order(format!("cluster lock: {e}")), None)),
        };
        // Another edge may have stored it between the read and the lock.
        let result = match self.shared_certificate(cluster, name).await {
            Ok(Some(issued)) => Ok(issued),
            Ok(None) => self.order_locked(cluster, &lock, name).await,
            Err(ClusterError::Unavailable) => Err(unavailable()),
            Err(e) => Err((AcmeError::Order(format!("cluster store: {e}")), None)),
        };
        cluster.unlock(lock).await;
        result
    }

    /// Orders `name` while renewing `lock`; stops if the lock is lost.
    /// The new certificate is stored for the other edges before the lock
    /// is released.
    async fn order_locked(
        &self,
        cluster: &Cluster,
        lock: &crate::cluster::Lock,
        name: &str,
    ) -> Result<Issued, (AcmeError, Option<SystemTime>)> {
        use crate::cluster::LOCK_TTL;
        // Renewed every 10 s; a renewal that fails is tried again, and the
        // order stops only when the lock may be about to lapse (no renewal
        // for 45 of its 60 s) or another edge holds it.
        let keep = async {
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(LOCK_TTL / 6).await;
                match cluster.renew(lock).await {
                    Ok(true) => renewed = tokio::time::Instant::now(),
                    Ok(false) => return "another edge took the lock",
                    Err(_) if renewed.elapsed() < LOCK_TTL * 3 / 4 => {}
                    Err(_) => return "Redis stopped answering",
                }
            }
        };
        let issued = tokio::select! {
            r = self.obtain(name) => r?,
            why = keep => {
                return Err((AcmeError::Order(format!("stopped ordering: {why} while the order ran")), None));
            }
        };
        // Stored before the lock is released, or the others order again.
        for attempt in 1..=5 {
            match cluster
                .put_sealed(&["acme", "cert", name], &issued.pem)
                .await
            {
                Ok(()) => break,
                Err(e) if attempt == 5 => {
                    error!(name, error = %e, "cannot store the new certificate in the cluster; other edges will order their own once the lock lapses");
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = cluster.renew(lock).await;
                }
            }
        }
        Ok(issued)
    }

    /// The certificate the cluster holds for `name`, if it is not due for
    /// renewal yet; kept on disk too, so a restart without Redis serves it.
    async fn shared_certificate(
        &self,
        cluster: &Cluster,
        name: &str,
    ) -> Result<Option<Issued>, ClusterError> {
        let Some(pem) = cluster.get_sealed_at(&["acme", "cert", name]).await? else {
            return Ok(None);
        };
        let issued = match Issued::parse(&pem) {
            Ok(i) => i,
            Err(e) => {
                warn!(name, error = %e, "the cluster's certificate is unreadable; ordering a new one");
                return Ok(None);
            }
        };
        // Due by its own schedule, or the very one this edge serves and
        // finds due (the CA's renewal window moved it earlier): ordered.
        let serving = self.certs.get(name).and_then(|k| k.cert.first().cloned());
        if issued.renew_at() <= SystemTime::now() || serving.as_ref() == issued.chain.first() {
            return Ok(None);
        }
        let path = cert_path(&self.dir, name);
        if let Err(e) = fsutil::write_private(&path, &pem) {
            warn!(path = %path.display(), error = %e, "cannot keep the cluster's certificate on disk");
        }
        info!(
            name,
            "took the certificate another edge stored in the cluster"
        );
        Ok(Some(issued))
    }
    fn failed(&self, name: &str, why: &str, retry_at: Option<SystemTime>) {
        let mut status = self.status.lock().expect("status lock not poisoned");
        let st = status.entry(name.to_owned()).or_default();
        st.failures = st.failures.saturating_add(1);
        let backoff = self
            .config
            .retry_min
            .saturating_mul(1u32 << (st.failures - 1).min(20))
            .min(RETRY_MAX);
        let next = retry_at
            .unwrap_or(SystemTime::now())
            .max(SystemTime::now() + jitter(backoff));
        st.next_attempt = Some(next);
        st.last_error = Some(why.to_owned());
        let serving = if st.not_after.is_some() {
            "the current certificate"
        } else {
            "a temporary self-signed certificate"
        };
        error!(name, error = why, retry_in = ?next.duration_since(SystemTime::now()).unwrap_or_default(), "certificate order failed; serving {serving} meanwhile");
    }

    /// Asks the CA when it wants `name`'s certificate renewed (ARI), when
    /// the directory offers it; a window earlier than two thirds of the
    /// lifetime moves the renewal to a random point inside it.
    async fn check_renewal_window(&self, name: &str) {
        if !self.ari_supported.load(Ordering::Relaxed) {
            return;
        }
        let now = SystemTime::now();
        let due = self
            .ari_next
            .lock()
            .expect("ari lock not poisoned")
            .get(name)
            .is_none_or(|t| *t <= now);
        let issued = self
            .status()
            .get(name)
            .is_some_and(|s| s.not_after.is_some());
        if !due || !issued {
            return;
        }
        let Some(leaf) = self.certs.get(name).and_then(|k| k.cert.first().cloned()) else {
            return;
        };
        let Ok(id) = instant_acme::CertificateIdentifier::try_from(&leaf) else {
            return;
        };
        let Ok(account) = self.account().await else {
            return;
        };
        let next = match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let start = SystemTime::from(info.suggested_window.start);
                let end = SystemTime::from(info.suggested_window.end);
                let span = end.duration_since(start).unwrap_or_default();
                let at = start + span.mul_f64(rand::random::<f64>());
                let mut status = self.status.lock().expect("status lock not poisoned");
                if let Some(st) = status.get_mut(name) {
                    if st.renew_at.is_none_or(|r| at < r) {
                        info!(name, renew_at = ?at, "the CA's renewal window moves the renewal earlier");
                        st.renew_at = Some(at);
                    }
                }
                now + retry_after.clamp(ARI_MIN_INTERVAL, ARI_MAX_INTERVAL)
            }
            Err(instant_acme::Error::Unsupported(_)) => {
                self.ari_supported.store(false, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                warn!(name, error = %describe(&e), "cannot fetch the renewal window; keeping the schedule");
                now + ARI_MIN_INTERVAL
            }
        };
        self.ari_next
            .lock()
            .expect("ari lock not poisoned")
            .insert(name.to_owned(), next);
    }

    async fn account(&self) -> Result<Account, AcmeError> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let builder = || match &self.config.directory_ca {
            Some(ca) => Account::builder_with_root(ca),
            None => Account::builder(),
        };
        let err = |e: instant_acme::Error| AcmeError::Account(describe(&e));
        if let Some(cluster) = &self.cluster {
            let account = self.shared_account(cluster, builder).await?;
            *slot = Some(account.clone());
            return Ok(account);
        }
        let path = self.dir.join("account.json");
        let stored: Option<StoredAccount> = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|s: &StoredAccount| s.directory == self.config.directory);
        let account = match stored {
            Some(s) => builder()
                .map_err(err)?
                .from_credentials(s.credentials)
                .await
                .map_err(err)?,
            None => {
                let (account, stored) = self.create_account(&builder).await?;
                let json = serde_json::to_vec_pretty(&stored)
                    .map_err(|e| AcmeError::Account(e.to_string()))?;
                fsutil::write_private(&path, &json).map_err(|source| AcmeError::Store {
                    path: path.display().to_string(),
                    source,
                })?;
                info!(directory = %self.config.directory, "created ACME account");
                account
            }
        };
        *slot = Some(account.clone());
        Ok(account)
    }

    /// The cluster's ACME account for this directory, created under a lock
    /// by the first edge that needs one.
    async fn shared_account(
        &self,
        cluster: &Cluster,
        builder: impl Fn() -> Result<instant_acme::AccountBuilder, instant_acme::Error>,
    ) -> Result<Account, AcmeError> {
        let err = |e: instant_acme::Error| AcmeError::Account(describe(&e));
        let store = |e: ClusterError| match e {
            ClusterError::Unavailable => {
                AcmeError::Wait("Redis is unavailable; the ACME account lives there".into())
            }
            e => AcmeError::Account(format!("cluster store: {e}")),
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, self.config.directory.as_bytes());
        let id: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let at = ["acme", "account", id.as_str()];
        let read = || async {
            let json = cluster.get_sealed_at(&at).await.map_err(store)?;
            json.map(|j| {
                serde_json::from_slice::<StoredAccount>(&j)
                    .map_err(|e| AcmeError::Account(format!("the cluster's account: {e}")))
            })
            .transpose()
        };
        let stored = match read().await? {
            Some(s) => s,
            None => {
                let lock = cluster
                    .try_lock("acme-account")
                    .await
                    .map_err(store)?
                    .ok_or_else(|| {
                        AcmeError::Wait("another edge is creating the ACME account".into())
                    })?;
                let created = match read().await {
                    Ok(Some(s)) => Ok(s),
                    Ok(None) => self.create_account(&builder).await.map(|(_, s)| {
                        info!(directory = %self.config.directory, "created ACME account for the cluster");
                        s
                    }),
                    Err(e) => Err(e),
                };
                let stored = match created {
                    Ok(s) => {
                        let json =
                            serde_json::to_vec(&s).map_err(|e| AcmeError::Account(e.to_string()));
                        match json {
                            Ok(j) => cluster.put_sealed(&at, &j).await.map_err(store).map(|()| s),
                            Err(e) => Err(e),
                        }
                    }
                    Err(e) => Err(e),
                };
                cluster.unlock(lock).await;
                stored?
            }
        };
        builder()
            .map_err(err)?
            .from_credentials(stored.credentials)
            .await
            .map_err(err)
    }

    async fn create_account(
        &self,
        builder: &impl Fn() -> Result<instant_acme::AccountBuilder, instant_acme::Error>,
    ) -> Result<(Account, StoredAccount), AcmeError> {
        let err = |e: instant_acme::Error| AcmeError::Account(describe(&e));
        let contact = format!("mailto:{}", self.config.email);
        let (account, credentials) = builder()
            .map_err(err)?
            .create(
                &NewAccount {
                    contact: &[&contact],
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.config.directory.clone(),
                None,
            )
            .await
            .map_err(err)?;
        Ok((
            account,
            StoredAccount {
                directory: self.config.directory.clone(),
                credentials,
            },
        ))
    }

    /// Orders a certificate for `name`, trying each usable challenge type.
    async fn obtain(&self, name: &str) -> Result<Issued, (AcmeError, Option<SystemTime>)> {
        let account = self.account().await.map_err(|e| (e, None))?;
        let mut types = Vec::new();
        if self.http01 {
            types.push(ChallengeType::Http01);
        }
        types.push(ChallengeType::TlsAlpn01);
        let mut errors = Vec::new();
        for ty in types {
            info!(name, challenge = ?ty, "ordering certificate");
            self.orders.fetch_add(1, Ordering::Relaxed);
            self.changed.send_modify(|v| *v += 1);
            let result =
                tokio::time::timeout(ORDER_TIMEOUT, self.order(&account, name, ty.clone())).await;
            match result {
                Ok(Ok(issued)) => return Ok(issued),
                Ok(Err(e)) => {
                    warn!(name, challenge = ?ty, error = %e, "order failed");
                    errors.push(format!("{ty:?}: {e}"));
                }
                Err(_) => errors.push(format!("{ty:?}: no result within {ORDER_TIMEOUT:?}")),
            }
        }
        Err((
            AcmeError::Order(format!("{name}: {}", errors.join("; "))),
            None,
        ))
    }

    async fn order(
        &self,
        account: &Account,
        name: &str,
        ty: ChallengeType,
    ) -> Result<Issued, AcmeError> {
        let acme = |e: instant_acme::Error| AcmeError::Order(describe(&e));
        let ids = [Identifier::Dns(name.to_owned())];
        let mut order = account
            .new_order(&NewOrder::new(&ids))
            .await
            .map_err(acme)?;
        // Withdrawn however this ends (an error, a timeout dropping the
        // order): a stale challenge left here would shadow the next one.
        let mut provisioned = Provisioned {
            certs: self.certs.clone(),
            cluster: self.cluster.clone(),
            items: Vec::new(),
        };
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(acme)?;
            if authz.status == AuthorizationStatus::Valid {
                continue;
            }
            let Some(mut challenge) = authz.challenge(ty.clone()) else {
                return Err(AcmeError::Order(format!(
                    "the CA offers no {ty:?} challenge"
                )));
            };
            let key_auth = challenge.key_authorization();
            match ty {
                ChallengeType::Http01 => {
                    self.certs
                        .set_http_challenge(&challenge.token, Some(key_auth.as_str().to_owned()));
                    provisioned
                        .items
                        .push(Challenge::Http(challenge.token.clone()));
                    self.publish(
                        &["acme", "http01", &challenge.token],
                        key_auth.as_str().as_bytes(),
                    )
                    .await?;
                }
                _ => {
                    let digest = key_auth.digest();
                    let cert = alpn_certificate(name, digest.as_ref())?;
                    self.certs.set_alpn_challenge(name, Some(cert));
                    provisioned
                        .items
                        .push(Challenge::Alpn(name.to_owned(), digest.as_ref().to_vec()));
                    self.publish(&["acme", "alpn", name], digest.as_ref())
                        .await?;
                }
            }
            challenge.set_ready().await.map_err(acme)?;
        }
        let ready = order
            .poll_ready(&RetryPolicy::default().timeout(ORDER_TIMEOUT))
            .await;
        drop(provisioned);
        let status = ready.map_err(acme)?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!(
                "validation failed ({status:?}){}",
                self.challenge_errors(&mut order).await
            )));
        }

        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| AcmeError::Certificate(e.to_string()))?;
        let csr = CertificateParams::new(vec![name.to_owned()])
            .and_then(|p| p.serialize_request(&key))
            .map_err(|e| AcmeError::Certificate(e.to_string()))?;
        order.finalize_csr(csr.der()).await.map_err(acme)?;
        let chain = order
            .poll_certificate(&RetryPolicy::default().timeout(ORDER_TIMEOUT))
            .await
            .map_err(acme)?;
        let pem = format!("{chain}{}", key.serialize_pem());
        let issued = Issued::parse(pem.as_bytes()).map_err(AcmeError::Certificate)?;
        let path = cert_path(&self.dir, name);
        fsutil::write_private(&path, pem.as_bytes()).map_err(|source| AcmeError::Store {
            path: path.display().to_string(),
            source,
        })?;
        Ok(issued)
    }

    /// Puts challenge material where every edge can answer the CA with it.
    async fn publish(&self, at: &[&str], value: &[u8]) -> Result<(), AcmeError> {
        let Some(cluster) = &self.cluster else {
            return Ok(());
        };
        cluster
            .put(at, value, Some(crate::cluster::CHALLENGE_TTL))
            .await
            .map_err(|e| {
                AcmeError::Order(format!(
                    "cannot share the challenge with the other edges: {e}"
                ))
            })
    }

    /// The CA's reasons for failed challenges, for the error message.
    async fn challenge_errors(&self, order: &mut instant_acme::Order) -> String {
        let mut out = String::new();
        let mut authorizations = order.authorizations();
        while let Some(Ok(authz)) = authorizations.next().await {
            for c in &authz.challenges {
                if let Some(e) = &c.error {
                    out.push_str(&format!(
                        ": {} {}",
                        e.r#type
                            .as_deref()
                            .and_then(|t| t.rsplit(':').next())
                            .unwrap_or(""),
                        e.detail.as_deref().unwrap_or("")
                    ));
                }
            }
        }
        out
    }
}

/// A challenge answered while an order runs.
enum Challenge {
    Http(String),
    /// The name, and the digest this order put in Redis for it.
    Alpn(String, Vec<u8>),
}

/// The challenges an order put up, taken down when it is dropped.
struct Provisioned {
    certs: Arc<CertStore>,
    cluster: Option<Arc<Cluster>>,
    items: Vec<Challenge>,
}

impl Drop for Provisioned {
    fn drop(&mut self) {
        let mut shared = Vec::new();
        for c in self.items.drain(..) {
            match c {
                Challenge::Http(token) => {
                    self.certs.set_http_challenge(&token, None);
                    shared.push(("http01", token, None));
                }
                Challenge::Alpn(name, digest) => {
                    self.certs.set_alpn_challenge(&name, None);
                    shared.push(("alpn", name, Some(digest)));
                }
            }
        }
        // In Redis too, best effort: it expires on its own. A name's
        // TLS-ALPN digest only if it is still this order's (another edge
        // may be ordering the name now).
        if let Some(cluster) = self.cluster.clone()
            && !shared.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                for (kind, id, ours) in shared {
                    let at = ["acme", kind, id.as_str()];
                    let _ = match ours {
                        Some(value) => cluster.delete_if(&at, &value).await,
                        None => cluster.delete(&at).await,
                    };
                }
            });
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge: the
/// name, and the acmeIdentifier extension carrying the key authorization's
/// digest (RFC 8737 3).
pub(crate) fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, AcmeError> {
    let fail = |e: rcgen::Error| AcmeError::Certificate(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(fail)?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(fail)?;
    certified(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .map_err(|e| AcmeError::Certificate(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_two_thirds_of_the_lifetime() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let issued = |days: u64| Issued {
            pem: vec![],
            chain: vec![],
            key: PrivateKeyDer::Pkcs8(vec![].into()),
            not_before: start,
            not_after: start + Duration::from_secs(days * 86400),
        };
        assert_eq!(
            issued(90).renew_at(),
            start + Duration::from_secs(60 * 86400)
        );
        assert_eq!(issued(6).renew_at(), start + Duration::from_secs(4 * 86400));
    }

    #[test]
    fn stored_pem_round_trips() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = CertificateParams::new(vec!["a.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pem = format!("{}{}", cert.pem(), key.serialize_pem());
        let issued = Issued::parse(pem.as_bytes()).unwrap();
        assert_eq!(issued.chain.len(), 1);
        assert!(issued.not_after > issued.not_before);
        assert!(Issued::parse(b"garbage").is_err());
    }
}
