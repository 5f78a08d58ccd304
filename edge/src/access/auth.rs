//! Password and API key checks: argon2id hashes from the config, verified
//! off the async threads with bounded concurrency, and a short-lived cache
//! of successes keyed by a keyed hash of the credential, so a chat session
//! pays argon2 once instead of per request. Users and API keys are apart:
//! a key never passes as a password, nor a password as a key.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use argon2::password_hash::{
    PasswordHash as Phc, PasswordHashString, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2};
use ring::rand::{SecureRandom, SystemRandom};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

/// argon2 checks running at once (each takes a core for tens of ms).
pub const HASH_CONCURRENCY: usize = 2;
/// Checks waiting or running at once; beyond it, logins get 503 at once
/// rather than an ever longer queue.
pub const HASH_QUEUE: usize = 64;
/// How long a verified credential is remembered.
pub const CACHE_TTL: Duration = Duration::from_secs(10 * 60);
/// The most remembered credentials.
pub const CACHE_MAX: usize = 4096;
/// Of the queue, what checks for names that are not configured may take,
/// so a spray of made-up names cannot crowd out the real users.
pub const UNKNOWN_QUEUE: usize = HASH_QUEUE / 4;

/// Hash outputs accepted, in bytes. `burrow hash-password` and the usual
/// tools (PHP, argon2-cffi, libsodium) write 32; any other length is most
/// likely a hash cut short when it was copied, which no password matches.
pub const HASH_OUTPUT_LENGTHS: [usize; 3] = [16, 32, 64];
/// The shortest salt argon2 accepts, in bytes.
pub const MIN_SALT: usize = argon2::MIN_SALT_LEN;
/// The most memory one check may take, in KiB (1 GiB): more would make each
/// login a way to exhaust the edge's memory.
pub const MAX_HASH_MEMORY_KIB: u32 = 1 << 20;
/// The most passes one check may take.
pub const MAX_HASH_PASSES: u32 = 64;

/// Why a configured hash is refused. Its `Display` never shows the hash:
/// the value may be a password written where a hash belongs.
#[derive(Debug, thiserror::Error)]
#[error("not a usable argon2id hash: {0}")]
pub struct BadHash(String);

/// An argon2id PHC string that a password can match: known parameters
/// within bounds, a salt and a full-length hash. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(PasswordHashString);

impl PasswordHash {
    pub fn parse(phc: &str) -> Result<Self, BadHash> {
        // The parser's own errors name fields, never the input.
        let parsed = Phc::new(phc).map_err(|e| match e {
            argon2::password_hash::Error::B64Encoding(_) => BadHash(
                "the salt or hash is not whole base64, as if the string was cut short or garbled"
                    .into(),
            ),
            e => BadHash(e.to_string()),
        })?;
        if parsed.algorithm != Algorithm::Argon2id.ident() {
            // The identifier is not secret: it is what tells the hash apart.
            return Err(BadHash(format!(
                "algorithm is {}, expected argon2id",
                parsed.algorithm
            )));
        }
        if let Some(v) = parsed.version {
            argon2::Version::try_from(v).map_err(|_| BadHash(format!("unknown version {v}")))?;
        }
        let params = argon2::Params::try_from(&parsed).map_err(|e| BadHash(e.to_string()))?;
        if params.m_cost() > MAX_HASH_MEMORY_KIB {
            return Err(BadHash(format!(
                "m = {} KiB is more than {MAX_HASH_MEMORY_KIB} KiB per check",
                params.m_cost()
            )));
        }
        if params.t_cost() > MAX_HASH_PASSES {
            return Err(BadHash(format!(
                "t = {} is more than {MAX_HASH_PASSES} passes per check",
                params.t_cost()
            )));
        }
        let Some(salt) = parsed.salt else {
            return Err(BadHash("the salt is missing".into()));
        };
        let mut buf = [0u8; argon2::password_hash::Salt::MAX_LENGTH];
        let salt_len = salt
            .decode_b64(&mut buf)
            .map_err(|e| BadHash(format!("salt: {e}")))?
            .len();
        if salt_len < MIN_SALT {
            return Err(BadHash(format!(
                "the salt is {salt_len} bytes, at least {MIN_SALT} are needed"
            )));
        }
        let Some(output) = &parsed.hash else {
            return Err(BadHash(
                "the hash part after the salt is missing, as if the string was cut short".into(),
            ));
        };
        if !HASH_OUTPUT_LENGTHS.contains(&output.len()) {
            return Err(BadHash(format!(
                "the hash part is {} bytes, not 32 (or 16 or 64), as if the string was cut short",
                output.len()
            )));
        }
        Ok(Self(parsed.serialize()))
    }

    /// The PHC string, as the config wrote it (normalised).
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// The parsed hash, for [`Verifier`].
    pub fn phc(&self) -> &PasswordHashString {
        &self.0
    }
}

/// Reads as the PHC string, for code that takes `&str` (session tags).
impl std::ops::Deref for PasswordHash {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(..)")
    }
}

/// Parses and checks a PHC string from the config (see [`PasswordHash`]).
pub fn parse_hash(phc: &str) -> Result<PasswordHashString, BadHash> {
    PasswordHash::parse(phc).map(|h| h.0)
}

/// Hashes a password with argon2id at the default (OWASP) cost:
/// m = 19 MiB, t = 2, p = 1, a 16-byte random salt.
pub fn hash_password(password: &[u8]) -> Result<String, argon2::password_hash::Error> {
    let mut salt = [0u8; 16];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| argon2::password_hash::Error::Crypto)?;
    let salt = SaltString::encode_b64(&salt)?;
    Ok(Argon2::default()
        .hash_password(password, &salt)?
        .to_string())
}

/// The outcome of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Valid,
    Invalid,
    /// Too many checks in flight; try again shortly.
    Busy,
}

/// The outcome of an API key check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    /// The key named this (which may not be one the route takes: a
    /// remembered key is recognised wherever it is sent).
    Valid(Arc<str>),
    Invalid,
    /// Too many checks in flight; try again shortly.
    Busy,
}

/// What a check found: whose credential it is, or nothing.
type Found = KeyVerdict;

/// The namespaces of the cache: a credential is remembered for one kind
/// of holder, so an API key can never pass as a user's password or the
/// other way round.
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Namespace {
    User = 1,
    ApiKey = 2,
    /// A key check running for one set of candidate keys.
    ApiKeyCheck = 3,
}

/// A remembered success.
#[derive(Debug)]
struct Remembered {
    until: Instant,
    /// The user or key it proved.
    who: Arc<str>,
}

type Inflight = Mutex<HashMap<[u8; 32], watch::Receiver<Option<Found>>>>;

/// Verifies user credentials and API keys against the configured hashes.
pub struct Verifier {
    users: HashMap<String, PasswordHashString>,
    /// API keys by name, a namespace apart from the users.
    keys: HashMap<String, PasswordHashString>,
    /// Checked for unknown users, so their answers take as long.
    dummy: PasswordHashString,
    cache_key: ring::hmac::Key,
    cache: Mutex<HashMap<[u8; 32], Remembered>>,
    /// Checks running now by credential: the same credential sent again
    /// meanwhile waits for that answer instead of hashing again.
    inflight: Inflight,
    running: Arc<Semaphore>,
    queued: Arc<Semaphore>,
    unknown_queued: Arc<Semaphore>,
    argon2_runs: AtomicU64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("users", &self.users.len())
            .field("keys", &self.keys.len())
            .finish_non_exhaustive()
    }
}

/// A running check's place in [`Verifier::inflight`], removed when the
/// check ends or is dropped.
struct InflightEntry<'a> {
    map: &'a Inflight,
    id: [u8; 32],
    rx: watch::Receiver<Option<Found>>,
}

impl Drop for InflightEntry<'_> {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("inflight lock not poisoned");
        if map.get(&self.id).is_some_and(|r| r.same_channel(&self.rx)) {
            map.remove(&self.id);
        }
    }
}

impl Verifier {
    pub fn new(users: HashMap<String, PasswordHashString>) -> Self {
        let rng = SystemRandom::new();
        let mut random = [0u8; 32];
        rng.fill(&mut random).expect("the OS random source works");
        let dummy = hash_password(&random).expect("hashing a random password");
        Self {
            users,
            keys: HashMap::new(),
            dummy: parse_hash(&dummy).expect("our own hash parses"),
            cache_key: ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
                .expect("the OS random source works"),
            cache: Mutex::default(),
            inflight: Mutex::default(),
            running: Arc::new(Semaphore::new(HASH_CONCURRENCY)),
            queued: Arc::new(Semaphore::new(HASH_QUEUE)),
            unknown_queued: Arc::new(Semaphore::new(UNKNOWN_QUEUE)),
            argon2_runs: AtomicU64::new(0),
        }
    }

    /// These API keys (name to hash) beside the users.
    pub fn with_api_keys(mut self, keys: HashMap<String, PasswordHashString>) -> Self {
        self.keys = keys;
        self
    }

    /// How many argon2 verifications ran since start.
    pub fn argon2_runs(&self) -> u64 {
        self.argon2_runs.load(Ordering::Relaxed)
    }

    fn cache_id(&self, namespace: Namespace, names: &[&str], secret: &[u8]) -> [u8; 32] {
        let mut ctx = ring::hmac::Context::with_key(&self.cache_key);
        ctx.update(&[namespace as u8]);
        ctx.update(&(names.len() as u64).to_be_bytes());
        for name in names {
            ctx.update(&(name.len() as u64).to_be_bytes());
            ctx.update(name.as_bytes());
        }
        ctx.update(secret);
        let mut id = [0u8; 32];
        id.copy_from_slice(ctx.sign().as_ref());
        id
    }

    /// Whether `user` signed in with `password` recently (and passes
    /// again without a check).
    pub fn remembers_password(&self, user: &str, password: &[u8]) -> bool {
        self.remembers(self.cache_id(Namespace::User, &[user], password))
    }

    /// Whether `key` is an API key that passed recently (and passes again
    /// without a check).
    pub fn remembers_key(&self, key: &[u8]) -> bool {
        self.remembers(self.cache_id(Namespace::ApiKey, &[], key))
    }

    fn remembers(&self, id: [u8; 32]) -> bool {
        let now = Instant::now();
        self.cache
            .lock()
            .expect("cache lock not poisoned")
            .get(&id)
            .is_some_and(|r| r.until > now)
    }

    /// Whether `user` is configured.
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub async fn verify(&self, user: &str, password: &[u8]) -> Verdict {
        match self.verify_with(user, password, || Ok::<(), ()>(())).await {
            Ok((v, _)) => v,
            Err(()) => Verdict::Busy,
        }
    }

    /// Checks a credential. A remembered success answers at once; a check
    /// of the same credential already running is waited for (and shares
    /// its verdict; if that check is abandoned, the waiter starts over);
    /// otherwise `admit` decides whether this check may run (the
    /// throttle), and what it returns comes back beside the verdict. `Err`
    /// is `admit`'s refusal.
    pub async fn verify_with<P, E>(
        &self,
        user: &str,
        password: &[u8],
        admit: impl FnOnce() -> Result<P, E>,
    ) -> Result<(Verdict, Option<P>), E> {
        let id = self.cache_id(Namespace::User, &[user], password);
        let (found, admitted) = self
            .single_flight(id, id, admit, || self.run_user(user, password))
            .await?;
        let verdict = match found {
            Found::Valid(_) => Verdict::Valid,
            Found::Invalid => Verdict::Invalid,
            Found::Busy => Verdict::Busy,
        };
        Ok((verdict, admitted))
    }

    /// Checks an API key, like [`Self::verify_with`]. A remembered key
    /// answers with its name at once, whichever `names` are given (the
    /// caller decides whether that key may pass); otherwise the key is
    /// checked against the hashes of `names` only, one after the other.
    pub async fn verify_key_with<P, E>(
        &self,
        names: &[&str],
        key: &[u8],
        admit: impl FnOnce() -> Result<P, E>,
    ) -> Result<(KeyVerdict, Option<P>), E> {
        let remembered = self.cache_id(Namespace::ApiKey, &[], key);
        let checking = self.cache_id(Namespace::ApiKeyCheck, names, key);
        self.single_flight(remembered, checking, admit, || self.run_key(names, key))
            .await
    }

    /// A remembered success under `cache_id`, else the answer of the check
    /// running under `flight_id`, else `run` (when `admit` lets it).
    async fn single_flight<P, E, F>(
        &self,
        cache_id: [u8; 32],
        flight_id: [u8; 32],
        admit: impl FnOnce() -> Result<P, E>,
        run: impl Fn() -> F,
    ) -> Result<(Found, Option<P>), E>
    where
        F: Future<Output = Found>,
    {
        let mut admit = Some(admit);
        loop {
            let now = Instant::now();
            {
                let cache = self.cache.lock().expect("cache lock not poisoned");
                if let Some(r) = cache.get(&cache_id).filter(|r| r.until > now) {
                    return Ok((Found::Valid(r.who.clone()), None));
                }
            }
            let running = {
                let mut inflight = self.inflight.lock().expect("inflight lock not poisoned");
                match inflight.get(&flight_id) {
                    Some(rx) => Err(rx.clone()),
                    None => {
                        let admit = admit.take().expect("admitted once: a leader returns");
                        let admitted = admit()?;
                        let (tx, rx) = watch::channel(None);
                        inflight.insert(flight_id, rx.clone());
                        Ok((tx, rx, admitted))
                    }
                }
            };
            match running {
                Ok((tx, rx, admitted)) => {
                    // Removes the entry however this ends, a dropped
                    // request included, so a credential is never stuck.
                    let _entry = InflightEntry {
                        map: &self.inflight,
                        id: flight_id,
                        rx,
                    };
                    let found = run().await;
                    if let Found::Valid(who) = &found {
                        self.remember(cache_id, who.clone());
                    }
                    tx.send_replace(Some(found.clone()));
                    return Ok((found, Some(admitted)));
                }
                Err(mut rx) => {
                    if let Ok(v) = rx.wait_for(Option::is_some).await {
                        return Ok((v.clone().unwrap_or(Found::Busy), None));
                    }
                    // The check was abandoned: start over, as a leader if
                    // no one else is checking, so it is admitted (and
                    // counted) like any other.
                }
            }
        }
    }

    fn remember(&self, id: [u8; 32], who: Arc<str>) {
        let mut cache = self.cache.lock().expect("cache lock not poisoned");
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, r| r.until > now);
            if cache.len() >= CACHE_MAX {
                // Still full of live entries: forget the one expiring first.
                if let Some(oldest) = cache.iter().min_by_key(|(_, r)| r.until).map(|(k, _)| *k) {
                    cache.remove(&oldest);
                }
            }
        }
        let until = Instant::now() + CACHE_TTL;
        cache.insert(id, Remembered { until, who });
    }

    async fn run_user(&self, user: &str, password: &[u8]) -> Found {
        let known = self.users.get(user);
        let Ok(queued) = self.queued.clone().try_acquire_owned() else {
            return Found::Busy;
        };
        let unknown = match known {
            Some(_) => None,
            None => match self.unknown_queued.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => return Found::Busy,
            },
        };
        let Ok(running) = self.running.clone().acquire_owned().await else {
            return Found::Busy;
        };
        let hash = known.unwrap_or(&self.dummy).clone();
        let password = password.to_vec();
        self.argon2_runs.fetch_add(1, Ordering::Relaxed);
        let ok = tokio::task::spawn_blocking(move || {
            // The slots are held until the hash is done, even when the
            // request that asked is gone: abandoned checks still use a
            // core, so they still count.
            let _slots = (queued, unknown, running);
            Argon2::default()
                .verify_password(&password, &hash.password_hash())
                .is_ok()
        })
        .await
        .unwrap_or(false);
        if ok && known.is_some() {
            Found::Valid(Arc::from(user))
        } else {
            Found::Invalid
        }
    }

    /// Checks `key` against each of `names`' hashes in turn, on one slot.
    async fn run_key(&self, names: &[&str], key: &[u8]) -> Found {
        let mut candidates: Vec<(Arc<str>, PasswordHashString)> = names
            .iter()
            .filter_map(|n| Some((Arc::from(*n), self.keys.get(*n)?.clone())))
            .collect();
        let none = candidates.is_empty();
        if none {
            // No key to match (the config rules this out): take as long
            // as if there were one.
            candidates.push((Arc::from(""), self.dummy.clone()));
        }
        let Ok(queued) = self.queued.clone().try_acquire_owned() else {
            return Found::Busy;
        };
        let Ok(running) = self.running.clone().acquire_owned().await else {
            return Found::Busy;
        };
        let key = key.to_vec();
        self.argon2_runs
            .fetch_add(candidates.len() as u64, Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let _slots = (queued, running);
            candidates
                .into_iter()
                .find(|(_, hash)| {
                    Argon2::default()
                        .verify_password(&key, &hash.password_hash())
                        .is_ok()
                })
                .filter(|_| !none)
                .map_or(Found::Invalid, |(name, _)| Found::Valid(name))
        })
        .await
        .unwrap_or(Found::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cheap hash for tests (the edge honours the parameters in the string).
    fn cheap(password: &str) -> String {
        let params = argon2::Params::new(1024, 1, 1, None).unwrap();
        let a = Argon2::new(Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        a.hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn only_argon2id_hashes_are_accepted() {
        assert!(parse_hash(&cheap("pw")).is_ok());
        assert!(parse_hash("hunter2").is_err());
        let argon2i = cheap("pw").replace("$argon2id$", "$argon2i$");
        assert!(parse_hash(&argon2i).is_err());
        assert!(parse_hash(&hash_password(b"x").unwrap()).is_ok());
    }

    #[test]
    fn cut_short_or_garbled_hashes_are_refused_without_echo() {
        let good = hash_password(b"x").unwrap();
        let (head, hash) = good.rsplit_once('$').unwrap();
        assert_eq!(hash.len(), 43, "32 bytes in unpadded base64");
        let cases = [
            ("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA".to_owned(), "salt"),
            (head.to_owned(), "hash part"),
            (format!("{head}$"), ""),
            (format!("{head}${}", &hash[..40]), "30 bytes"),
            (good.replace("$v=19$", "$v=7$"), "version"),
            (good.replace("m=19456", "m=4"), ""),
            (good.replace("m=19456", "m=99999999"), "KiB"),
            (good.replace("t=2", "t=1000"), "passes"),
            (good.replace("p=1", "p=1,x=2"), ""),
            (good.replace("$argon2id$", "$argon2id$$"), ""),
            // 43 base64 characters cut to 41 (1 mod 4) never decode, whatever
            // the random salt and hash; cut to 39 they may (29 bytes).
            (good[..good.len() - 2].to_owned(), "not whole base64"),
        ];
        for (phc, why) in cases {
            let err = PasswordHash::parse(&phc)
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{phc}: {err}");
            // The salt and the hash are what must not be shown.
            for part in phc.split('$').skip(4).filter(|p| p.len() > 4) {
                assert!(!err.contains(part), "{phc}: the error echoes it: {err}");
            }
        }
        let h = PasswordHash::parse(&good).unwrap();
        assert_eq!(h.as_str(), good);
        assert_eq!(format!("{h:?}"), "PasswordHash(..)");
    }

    #[tokio::test]
    async fn success_is_cached_and_failures_are_not() {
        let users = HashMap::from([("alice".to_owned(), parse_hash(&cheap("right")).unwrap())]);
        let v = Verifier::new(users);
        assert_eq!(v.verify("alice", b"right").await, Verdict::Valid);
        assert_eq!(v.argon2_runs(), 1);
        assert_eq!(v.verify("alice", b"right").await, Verdict::Valid);
        assert_eq!(v.argon2_runs(), 1, "second check served from the cache");
        assert_eq!(v.verify("alice", b"wrong").await, Verdict::Invalid);
        assert_eq!(v.verify("alice", b"wrong").await, Verdict::Invalid);
        assert_eq!(v.argon2_runs(), 3);
        // Unknown users cost a check too, and never pass.
        assert_eq!(v.verify("mallory", b"right").await, Verdict::Invalid);
        assert_eq!(v.argon2_runs(), 4);
    }

    #[tokio::test]
    async fn api_keys_are_found_once_then_remembered_and_apart_from_passwords() {
        let users = HashMap::from([("phone".to_owned(), parse_hash(&cheap("secret")).unwrap())]);
        let keys = HashMap::from([
            ("phone".to_owned(), parse_hash(&cheap("key-1")).unwrap()),
            ("laptop".to_owned(), parse_hash(&cheap("key-2")).unwrap()),
        ]);
        let v = Verifier::new(users).with_api_keys(keys);
        let check = |names: &'static [&'static str], key: &'static str| {
            let v = &v;
            async move {
                v.verify_key_with(names, key.as_bytes(), || Ok::<(), ()>(()))
                    .await
                    .unwrap()
                    .0
            }
        };
        let phone = KeyVerdict::Valid("phone".into());
        let laptop = KeyVerdict::Valid("laptop".into());
        // A new key is checked against each candidate: at most two hashes.
        assert_eq!(check(&["phone", "laptop"], "key-2").await, laptop);
        assert_eq!(v.argon2_runs(), 2);
        // Then it is known at once, by name, whichever route asks.
        assert_eq!(check(&["phone", "laptop"], "key-2").await, laptop);
        assert_eq!(check(&["phone"], "key-2").await, laptop);
        assert_eq!(v.argon2_runs(), 2);
        // Only the candidates are tried.
        assert_eq!(check(&["laptop"], "key-1").await, KeyVerdict::Invalid);
        assert_eq!(v.argon2_runs(), 3);
        assert_eq!(check(&["phone"], "key-1").await, phone);
        // A user's password is no key, and a key no password, even under
        // the same name.
        assert_eq!(check(&["phone"], "secret").await, KeyVerdict::Invalid);
        assert_eq!(v.verify("phone", b"key-1").await, Verdict::Invalid);
        assert_eq!(v.verify("phone", b"secret").await, Verdict::Valid);
        assert_eq!(check(&["phone"], "secret").await, KeyVerdict::Invalid);
        // Unknown names match nothing.
        assert_eq!(check(&["tablet"], "key-1").await, phone, "remembered");
        assert_eq!(check(&["tablet"], "key-3").await, KeyVerdict::Invalid);
        assert!(v.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_same_credential_sent_at_once_is_checked_once() {
        let users = HashMap::from([("alice".to_owned(), parse_hash(&cheap("right")).unwrap())]);
        let v = Verifier::new(users);
        let admitted = std::sync::atomic::AtomicU32::new(0);
        let admit = || {
            admitted.fetch_add(1, Ordering::Relaxed);
            Ok::<(), ()>(())
        };
        // The hashing slots are taken until all three have asked, so the
        // first check cannot finish before the others join it (a hash can
        // be done before its task is first polled again).
        let hold = v
            .running
            .clone()
            .acquire_many_owned(HASH_CONCURRENCY as u32)
            .await
            .unwrap();
        let checks = async {
            tokio::join!(
                v.verify_with("alice", b"wrong", admit),
                v.verify_with("alice", b"wrong", admit),
                v.verify_with("alice", b"wrong", admit),
            )
        };
        let release = async {
            tokio::task::yield_now().await;
            drop(hold);
        };
        let ((a, b, c), ()) = tokio::join!(checks, release);
        for r in [a, b, c] {
            assert_eq!(r.unwrap().0, Verdict::Invalid);
        }
        assert_eq!(v.argon2_runs(), 1);
        assert_eq!(
            admitted.load(Ordering::Relaxed),
            1,
            "one check, one admission"
        );
        assert!(v.inflight.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_waiter_on_an_abandoned_check_starts_over_and_is_admitted() {
        use std::future::Future;
        use std::task::Poll;
        let users = HashMap::from([("alice".to_owned(), parse_hash(&cheap("right")).unwrap())]);
        let v = Verifier::new(users);
        let admitted = std::sync::atomic::AtomicU32::new(0);
        let admit = || {
            admitted.fetch_add(1, Ordering::Relaxed);
            Ok::<(), ()>(())
        };
        // The hashing slots are taken, so the leader waits for one (as it
        // would behind other logins) instead of finishing at once.
        let hold = v
            .running
            .clone()
            .acquire_many_owned(HASH_CONCURRENCY as u32)
            .await
            .unwrap();
        let mut leader = Box::pin(v.verify_with("alice", b"wrong", admit));
        let mut waiter = Box::pin(v.verify_with("alice", b"wrong", admit));
        // One poll each: the leader is checking, the waiter waits on it.
        let leader_pending =
            std::future::poll_fn(|cx| Poll::Ready(leader.as_mut().poll(cx).is_pending())).await;
        let waiter_pending =
            std::future::poll_fn(|cx| Poll::Ready(waiter.as_mut().poll(cx).is_pending())).await;
        assert!(leader_pending && waiter_pending);
        assert_eq!(admitted.load(Ordering::Relaxed), 1);
        // The client of the running check goes away.
        drop(leader);
        drop(hold);
        let (verdict, admission) = waiter.await.unwrap();
        assert_eq!(verdict, Verdict::Invalid);
        assert!(
            admission.is_some(),
            "the waiter ran the check itself, admitted"
        );
        assert_eq!(admitted.load(Ordering::Relaxed), 2);
        assert!(v.inflight.lock().unwrap().is_empty());
    }
}
