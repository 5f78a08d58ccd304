//! Session and device cookies.
//!
//! After one successful login the edge sets a signed, host-only session
//! cookie, so apps that replace `Authorization` with their own Bearer token
//! (and PWAs, which send no credentials) keep working. A session slides: a
//! request on a session older than [`RENEW_AFTER`] gets a fresh cookie, so
//! a daily user stays signed in and an idle one is signed out after
//! [`SESSION_TTL`].
//!
//! Session value: `hex(user).hex(host).issued.expiry.generation.hex(tag).hex(mac)`.
//! The password tag binds a session to the user's current hash (a new
//! password ends its sessions); the generation, kept in
//! `state_dir/sessions.generation` and raised by `burrow logout-all`, ends
//! every session issued before it.
//!
//! The device cookie marks a browser that signed in as a user before
//! (OWASP's device cookies): the login throttle judges it by its own
//! failures. Value: `hex(user).hex(host).hex(id).expiry.generation.hex(tag).hex(mac)`;
//! like a session, it ends with a new password or `burrow logout-all`.
//!
//! Sessions and device tokens are signed with separate keys derived from
//! the one secret in `state_dir/session.key`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use burrow_proto::fsutil;
use http::HeaderValue;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// `__Host-` makes browsers insist on Secure, Path=/ and no Domain.
pub const COOKIE_NAME: &str = "__Host-burrow";
/// The device cookie's name.
pub const DEVICE_COOKIE_NAME: &str = "__Host-burrow-device";
/// How long a session lasts without being used.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// A session used when older than this is renewed.
pub const RENEW_AFTER: Duration = Duration::from_secs(24 * 3600);
/// How long a browser is remembered as one that signed in.
pub const DEVICE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Cookie values longer than this are not ours.
const MAX_COOKIE_LEN: usize = 1024;
/// The file that holds the session generation.
pub const GENERATION_FILE: &str = "sessions.generation";

/// The keys sessions and device tokens are signed with, kept in
/// `state_dir` so restarts keep everyone signed in, and the generation
/// below which sessions are revoked.
pub struct SessionKeys {
    keys: std::sync::RwLock<Signers>,
    generation: Generation,
    /// With `[cluster]`: the secret and the generation every edge shares.
    shared: Option<Shared>,
}

/// The two signing keys, and which version of the cluster's secret they
/// come from (0: this edge's own).
struct Signers {
    session: hmac::Key,
    device: hmac::Key,
    version: u64,
    /// The session and device keys these replaced (this edge's own, when
    /// it first took the cluster's): still accepted, never used to sign,
    /// so cookies it issued before do not end at the swap.
    previous: Option<(hmac::Key, hmac::Key)>,
}

struct Shared {
    cluster: std::sync::Arc<crate::cluster::Cluster>,
    /// Where the cluster's secret is kept, for a restart without Redis.
    key_path: PathBuf,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

/// A verified session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    pub password_tag: [u8; 8],
    /// Whether it is old enough to be renewed on this request.
    pub renew: bool,
}

/// A verified device token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub user: String,
    pub id: [u8; 16],
    /// The password hash it signed in with (see [`password_tag`]).
    pub password_tag: [u8; 8],
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A short tag of a password hash (not secret: it is inside a signed value).
pub fn password_tag(phc: &str) -> [u8; 8] {
    let d = ring::digest::digest(&ring::digest::SHA256, phc.as_bytes());
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&d.as_ref()[..8]);
    tag
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The session generation: read from its file, and read again whenever
/// the file looks changed (one `stat` per check) and at least once a
/// second, so `burrow logout-all` takes effect on the next request without
/// a restart.
struct Generation {
    path: Option<PathBuf>,
    cached: Mutex<Cached>,
}

/// What the file looked like when last read, and what it said.
struct Cached {
    stamp: Option<Stamp>,
    read_at: Option<std::time::Instant>,
    value: u64,
}

/// File identity and times: `logout-all` replaces the file (a new inode),
/// so any of these changes.
type Stamp = (SystemTime, i64, i64, u64, u64);

/// Re-read at least this often, whatever the file looks like.
const GENERATION_RECHECK: Duration = Duration::from_secs(1);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.modified().ok()?,
        m.ctime(),
        m.ctime_nsec(),
        m.ino(),
        m.len(),
    ))
}

impl Generation {
    fn fixed() -> Self {
        Self {
            path: None,
            cached: Mutex::new(Cached {
                stamp: None,
                read_at: None,
                value: 0,
            }),
        }
    }

    fn current(&self) -> u64 {
        self.local()
    }

    /// The generation in this edge's file.
    fn local(&self) -> u64 {
        let mut cached = self.cached.lock().expect("generation lock not poisoned");
        let Some(path) = &self.path else {
            return cached.value;
        };
        let now = std::time::Instant::now();
        let stamp = stamp(path);
        let fresh = cached
            .read_at
            .is_some_and(|t| now.duration_since(t) < GENERATION_RECHECK);
        if fresh && cached.stamp == stamp {
            return cached.value;
        }
        match read_generation(path) {
            // Never backwards: a deleted or rewritten file does not bring
            // revoked sessions back.
            Ok(g) => {
                let value = g.max(cached.value);
                *cached = Cached {
                    stamp,
                    read_at: Some(now),
                    value,
                };
            }
            // Unreadable or garbled: keep the last one we read, which is
            // never lower than what was on disk when we started.
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the session generation");
            }
        }
        cached.value
    }
}

fn read_generation(path: &Path) -> std::io::Result<u64> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not a number")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

/// Revokes every session issued so far (`burrow logout-all`): raises the
/// generation in `state_dir`. Returns the new generation.
pub fn revoke_all(state_dir: &Path) -> std::io::Result<u64> {
    revoke_all_above(state_dir, 0)
}

/// Like [`revoke_all`], with the new generation also above `at_least`
/// (the cluster's).
pub fn revoke_all_above(state_dir: &Path, at_least: u64) -> std::io::Result<u64> {
    let path = state_dir.join(GENERATION_FILE);
    let next = read_generation(&path)?
        .max(at_least)
        .checked_add(1)
        .ok_or_else(|| std::io::Error::other("session generation exhausted"))?;
    fsutil::write_private(&path, format!("{next}\n").as_bytes())?;
    // Not a secret, and the edge must read it: run as root, the command
    // hands the file to the state directory's owner (the edge's user).
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
        let dir = std::fs::metadata(state_dir)?;
        let file = std::fs::metadata(&path)?;
        if (file.uid(), file.gid()) != (dir.uid(), dir.gid()) {
            std::os::unix::fs::chown(&path, Some(dir.uid()), Some(dir.gid()))?;
        }
    }
    Ok(next)
}

fn derive(secret: &[u8], label: &[u8]) -> hmac::Key {
    let master = hmac::Key::new(hmac::HMAC_SHA256, secret);
    hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&master, label).as_ref())
}

fn sign(key: &hmac::Key, payload: &str) -> String {
    format!(
        "{payload}.{}",
        hex(hmac::sign(key, payload.as_bytes()).as_ref())
    )
}

/// The payload of `value` if `key` signed it.
fn signed<'a>(key: &hmac::Key, value: &'a str) -> Option<&'a str> {
    if value.len() > MAX_COOKIE_LEN {
        return None;
    }
    let (payload, mac) = value.rsplit_once('.')?;
    hmac::verify(key, payload.as_bytes(), &unhex(mac)?).ok()?;
    Some(payload)
}

/// The 32-byte secret in `state_dir/session.key`, made if missing.
pub fn load_or_create_secret(state_dir: &Path) -> std::io::Result<[u8; 32]> {
    let path = state_dir.join("session.key");
    let bytes = match std::fs::read(&path) {
        Ok(b) if b.len() == 32 => b,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not a 32-byte key", path.display()),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut b = vec![0u8; 32];
            SystemRandom::new()
                .fill(&mut b)
                .map_err(|_| std::io::Error::other("no OS randomness"))?;
            fsutil::write_private(&path, &b)?;
            b
        }
        Err(e) => return Err(e),
    };
    bytes
        .try_into()
        .map_err(|_| std::io::Error::other("a 32-byte key"))
}

/// This edge's session generation (its `logout-all` file), for the
/// cluster: read, and raised to the cluster's.
pub fn local_generation(state_dir: &Path) -> crate::cluster::LocalGeneration {
    let generation = Generation {
        path: Some(state_dir.join(GENERATION_FILE)),
        cached: Mutex::new(Cached {
            stamp: None,
            read_at: None,
            value: 0,
        }),
    };
    let dir = state_dir.to_owned();
    crate::cluster::LocalGeneration {
        read: Box::new(move || generation.local()),
        raise: Box::new(move |to| {
            let path = dir.join(GENERATION_FILE);
            // A garbled file is replaced: the cluster's value is known.
            if read_generation(&path).unwrap_or(0) < to {
                fsutil::write_private(&path, format!("{to}\n").as_bytes())?;
            }
            Ok(())
        }),
    }
}

impl SessionKeys {
    /// Keys from `state_dir`, shared with the other edges when `cluster`
    /// is given: its secret replaces this edge's once Redis has shown it,
    /// and its generation raises this edge's.
    pub fn load_shared(
        state_dir: &Path,
        cluster: Option<std::sync::Arc<crate::cluster::Cluster>>,
    ) -> std::io::Result<Self> {
        let mut keys = Self::load_or_create(state_dir)?;
        keys.shared = cluster.map(|cluster| Shared {
            cluster,
            key_path: state_dir.join("session.key"),
        });
        keys.refresh();
        Ok(keys)
    }

    /// Takes the cluster's secret when it changed since last looked at
    /// (one atomic load when it did not).
    fn refresh(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let current = self.keys.read().expect("keys lock not poisoned").version;
        if shared.cluster.session_version() == current {
            return;
        }
        let (secret, version) = shared.cluster.session_secret();
        let mut keys = self.keys.write().expect("keys lock not poisoned");
        // Another request may have taken it meanwhile.
        let Some(secret) = secret.filter(|_| version != keys.version) else {
            return;
        };
        let previous = Some((keys.session.clone(), keys.device.clone()));
        *keys = Signers {
            version,
            previous,
            ..Self::signers(&secret)
        };
        if std::fs::read(&shared.key_path).ok().as_deref() != Some(&secret[..])
            && let Err(e) = fsutil::write_private(&shared.key_path, &secret)
        {
            tracing::warn!(path = %shared.key_path.display(), error = %e, "cannot keep the cluster's session key on disk");
        }
    }

    fn session_key(&self) -> hmac::Key {
        self.refresh();
        self.keys
            .read()
            .expect("keys lock not poisoned")
            .session
            .clone()
    }

    /// The payload of `value` if the current key `pick` chooses signed it,
    /// or the one it replaced.
    fn signed_by_us<'v>(
        &self,
        value: &'v str,
        pick: impl Fn(&Signers) -> (&hmac::Key, Option<&hmac::Key>),
    ) -> Option<&'v str> {
        self.refresh();
        let keys = self.keys.read().expect("keys lock not poisoned");
        let (current, previous) = pick(&keys);
        signed(current, value).or_else(|| signed(previous?, value))
    }

    fn device_key(&self) -> hmac::Key {
        self.refresh();
        self.keys
            .read()
            .expect("keys lock not poisoned")
            .device
            .clone()
    }

    /// The generation sessions must carry: this edge's, raised to the
    /// cluster's.
    fn generation(&self) -> u64 {
        let local = self.generation.current();
        match &self.shared {
            Some(s) => local.max(s.cluster.generation()),
            None => local,
        }
    }

    fn signers(secret: &[u8]) -> Signers {
        Signers {
            session: derive(secret, b"burrow session v2"),
            device: derive(secret, b"burrow device v1"),
            version: 0,
            previous: None,
        }
    }

    pub fn load_or_create(state_dir: &Path) -> std::io::Result<Self> {
        let bytes = load_or_create_secret(state_dir)?;
        let generation_path = state_dir.join(GENERATION_FILE);
        let start = read_generation(&generation_path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("{}: {e}", generation_path.display()))
        })?;
        let mut keys = Self::from_bytes(&bytes);
        keys.generation = Generation {
            path: Some(generation_path),
            cached: Mutex::new(Cached {
                stamp: None,
                read_at: None,
                value: start,
            }),
        };
        Ok(keys)
    }

    /// Keys from a secret, with a generation that never changes (tests).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            keys: std::sync::RwLock::new(Self::signers(bytes)),
            generation: Generation::fixed(),
            shared: None,
        }
    }

    fn payload(user: &str, host: &str, issued: u64, generation: u64, tag: &[u8; 8]) -> String {
        format!(
            "{}.{}.{issued}.{}.{generation}.{}",
            hex(user.as_bytes()),
            hex(host.as_bytes()),
            issued.saturating_add(SESSION_TTL.as_secs()),
            hex(tag)
        )
    }

    /// A session cookie value for `user` on `host`.
    pub fn issue(&self, user: &str, host: &str, tag: [u8; 8]) -> String {
        let payload = Self::payload(user, host, unix_now(), self.generation(), &tag);
        sign(&self.session_key(), &payload)
    }

    /// The session in `value` if it is ours, for `host`, unexpired and not
    /// revoked.
    pub fn verify(&self, value: &str, host: &str) -> Option<Session> {
        let payload =
            self.signed_by_us(value, |k| (&k.session, k.previous.as_ref().map(|p| &p.0)))?;
        let mut parts = payload.split('.');
        let user = String::from_utf8(unhex(parts.next()?)?).ok()?;
        let cookie_host = unhex(parts.next()?)?;
        let issued: u64 = parts.next()?.parse().ok()?;
        let expiry: u64 = parts.next()?.parse().ok()?;
        let generation: u64 = parts.next()?.parse().ok()?;
        let tag: [u8; 8] = unhex(parts.next()?)?.try_into().ok()?;
        let now = unix_now();
        if parts.next().is_some()
            || cookie_host != host.as_bytes()
            || expiry <= now
            || generation != self.generation()
        {
            return None;
        }
        Some(Session {
            user,
            password_tag: tag,
            renew: now.saturating_sub(issued) >= RENEW_AFTER.as_secs(),
        })
    }

    /// The Set-Cookie header that starts (or renews) a session.
    pub fn set_cookie(&self, user: &str, host: &str, tag: [u8; 8]) -> HeaderValue {
        let v = format!(
            "{COOKIE_NAME}={}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            self.issue(user, host, tag),
            SESSION_TTL.as_secs()
        );
        HeaderValue::from_str(&v).expect("hex and ASCII attributes are a valid header value")
    }

    /// The Set-Cookie header that marks this browser as one `user` signed
    /// in from.
    pub fn device_cookie(&self, user: &str, host: &str, tag: [u8; 8]) -> Option<HeaderValue> {
        let mut id = [0u8; 16];
        SystemRandom::new().fill(&mut id).ok()?;
        let payload = format!(
            "{}.{}.{}.{}.{}.{}",
            hex(user.as_bytes()),
            hex(host.as_bytes()),
            hex(&id),
            unix_now().saturating_add(DEVICE_TTL.as_secs()),
            self.generation(),
            hex(&tag),
        );
        let v = format!(
            "{DEVICE_COOKIE_NAME}={}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
            sign(&self.device_key(), &payload),
            DEVICE_TTL.as_secs()
        );
        HeaderValue::from_str(&v).ok()
    }

    /// The device token in `value` if it is ours, for `host`, unexpired
    /// and not revoked.
    pub fn verify_device(&self, value: &str, host: &str) -> Option<Device> {
        let payload =
            self.signed_by_us(value, |k| (&k.device, k.previous.as_ref().map(|p| &p.1)))?;
        let mut parts = payload.split('.');
        let user = String::from_utf8(unhex(parts.next()?)?).ok()?;
        let cookie_host = unhex(parts.next()?)?;
        let id: [u8; 16] = unhex(parts.next()?)?.try_into().ok()?;
        let expiry: u64 = parts.next()?.parse().ok()?;
        let generation: u64 = parts.next()?.parse().ok()?;
        let password_tag: [u8; 8] = unhex(parts.next()?)?.try_into().ok()?;
        if parts.next().is_some()
            || cookie_host != host.as_bytes()
            || expiry <= unix_now()
            || generation != self.generation()
        {
            return None;
        }
        Some(Device {
            user,
            id,
            password_tag,
        })
    }
}

/// The Set-Cookie header that ends a session (the device cookie stays: the
/// browser did sign in before).
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("__Host-burrow=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax")
}

/// The cookies of every Cookie header, as bytes (a cookie the app set may
/// not be UTF-8; it must neither hide ours nor be lost). `;` separates
/// cookies; `,` too, as a front proxy that joins headers the HTTP way
/// would write it.
fn cookie_items(headers: &http::HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';' || *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|c| !c.is_empty())
}

fn split_pair(item: &[u8]) -> (&[u8], &[u8]) {
    match item.iter().position(|b| *b == b'=') {
        Some(i) => (item[..i].trim_ascii(), &item[i + 1..]),
        None => (item, &[]),
    }
}

fn find_named<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    cookie_items(headers)
        .map(split_pair)
        .find(|(k, _)| *k == name.as_bytes())
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// The session cookie's value among a request's Cookie headers.
pub fn find_cookie(headers: &http::HeaderMap) -> Option<&str> {
    find_named(headers, COOKIE_NAME)
}

/// The device cookie's value among a request's Cookie headers.
pub fn find_device_cookie(headers: &http::HeaderMap) -> Option<&str> {
    find_named(headers, DEVICE_COOKIE_NAME)
}

/// Whether a cookie is one of ours, in any letter case.
fn ours(item: &[u8]) -> bool {
    let (name, _) = split_pair(item.trim_ascii());
    name.eq_ignore_ascii_case(COOKIE_NAME.as_bytes())
        || name.eq_ignore_ascii_case(DEVICE_COOKIE_NAME.as_bytes())
}

/// Removes our cookies from the Cookie headers and joins what is left into
/// one header (HTTP/2 sends cookies as separate crumbs; an HTTP/1.1
/// service expects one line, RFC 9113 8.2.3). The app's cookies stay, byte
/// for byte.
pub fn strip_cookie(headers: &mut http::HeaderMap) {
    let mut all = headers.get_all(http::header::COOKIE).iter();
    let Some(_) = all.next() else {
        return;
    };
    let single = all.next().is_none();
    if single && !cookie_items(headers).any(ours) {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(http::header::COOKIE) {
        for item in value.as_bytes().split(|b| *b == b';') {
            let item = item.trim_ascii();
            // A `,`-joined item keeps its other parts (an app's value may
            // hold a comma); only ours go. Most items have no comma.
            let kept: std::borrow::Cow<'_, [u8]> = if item.contains(&b',') {
                let parts: Vec<&[u8]> = item
                    .split(|b| *b == b',')
                    .filter(|part| !ours(part))
                    .collect();
                parts.join(&b","[..]).into()
            } else if ours(item) {
                continue;
            } else {
                item.into()
            };
            if kept.trim_ascii().is_empty() {
                continue;
            }
            if !joined.is_empty() {
                joined.extend_from_slice(b"; ");
            }
            joined.extend_from_slice(kept.trim_ascii());
        }
    }
    let value = (!joined.is_empty())
        .then(|| HeaderValue::from_bytes(&joined).ok())
        .flatten();
    headers.remove(http::header::COOKIE);
    if let Some(v) = value {
        headers.insert(http::header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_verify_only_for_their_host_and_key() {
        let keys = SessionKeys::from_bytes(&[7; 32]);
        let tag = password_tag("$argon2id$...");
        let v = keys.issue("alice", "chat.example.com", tag);
        assert_eq!(
            keys.verify(&v, "chat.example.com"),
            Some(Session {
                user: "alice".into(),
                password_tag: tag,
                renew: false,
            })
        );
        assert_eq!(keys.verify(&v, "other.example.com"), None);
        assert_eq!(
            SessionKeys::from_bytes(&[8; 32]).verify(&v, "chat.example.com"),
            None
        );
        // Any change to the payload breaks the signature.
        let forged = v.replacen(&hex(b"alice"), &hex(b"admin"), 1);
        assert_eq!(keys.verify(&forged, "chat.example.com"), None);
        for junk in ["", ".", "zz.zz", "a.b.c.d.e.f", &"a".repeat(5000)] {
            assert_eq!(keys.verify(junk, "chat.example.com"), None);
        }
        // A session is not a device token and the other way round.
        assert_eq!(keys.verify_device(&v, "chat.example.com"), None);
    }

    #[test]
    fn old_sessions_renew_and_expired_ones_are_refused() {
        let keys = SessionKeys::from_bytes(&[7; 32]);
        let now = unix_now();
        let at = |issued: u64| {
            let payload = SessionKeys::payload("alice", "h", issued, 0, &[0; 8]);
            keys.verify(&sign(&keys.session_key(), &payload), "h")
        };
        assert!(!at(now).unwrap().renew);
        assert!(at(now - RENEW_AFTER.as_secs()).unwrap().renew);
        assert_eq!(at(now - SESSION_TTL.as_secs()), None);
    }

    #[tokio::test]
    async fn cookies_signed_before_the_cluster_key_arrived_still_verify() {
        let dir = std::env::temp_dir().join(format!(
            "burrow-swap-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let secret_file = dir.join("cluster.key");
        std::fs::write(&secret_file, [7u8; 32]).unwrap();
        // Never reached: the cluster's key is handed over below.
        let cluster = crate::cluster::Cluster::new(&crate::config::ClusterConfig {
            redis: "redis://127.0.0.1:1/0".into(),
            redis_password_file: None,
            secret_file,
        })
        .unwrap();
        let keys = SessionKeys::load_shared(&dir, Some(cluster.clone())).unwrap();
        let before = keys.issue("alice", "h", [0; 8]);
        let device_before = keys.device_cookie("alice", "h", [0; 8]);
        cluster.adopt_session_secret([9; 32]);
        let after = keys.issue("alice", "h", [0; 8]);
        assert!(keys.verify(&after, "h").is_some());
        assert!(
            keys.verify(&before, "h").is_some(),
            "signed before the swap"
        );
        let device_before = device_before.unwrap();
        let device_value = device_before
            .to_str()
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .split_once('=')
            .unwrap()
            .1;
        assert!(keys.verify_device(device_value, "h").is_some());
        // Another edge, holding only the cluster's key.
        let other = SessionKeys::from_bytes(&[9; 32]);
        assert!(other.verify(&after, "h").is_some());
        assert!(other.verify(&before, "h").is_none());
        // Kept on disk for a restart without Redis.
        assert_eq!(std::fs::read(dir.join("session.key")).unwrap(), [9; 32]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn raising_the_generation_revokes_every_session() {
        let dir = std::env::temp_dir().join(format!(
            "burrow-generation-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = SessionKeys::load_or_create(&dir).unwrap();
        let v = keys.issue("alice", "h", [0; 8]);
        assert!(keys.verify(&v, "h").is_some());
        let device = keys.device_cookie("alice", "h", [0; 8]).unwrap();
        let device = device.to_str().unwrap().split(';').next().unwrap();
        let device = device.split_once('=').unwrap().1.to_owned();
        assert!(keys.verify_device(&device, "h").is_some());
        assert_eq!(revoke_all(&dir).unwrap(), 1);
        assert_eq!(keys.verify(&v, "h"), None, "revoked without a restart");
        assert_eq!(keys.verify_device(&device, "h"), None, "devices too");
        // Deleting the file does not bring revoked sessions back.
        std::fs::remove_file(dir.join(GENERATION_FILE)).unwrap();
        assert_eq!(keys.verify(&v, "h"), None);
        revoke_all(&dir).unwrap();
        let fresh = keys.issue("alice", "h", [0; 8]);
        assert!(keys.verify(&fresh, "h").is_some());
        // A restart reads the generation back.
        let fresh = keys.issue("alice", "h", [0; 8]);
        let again = SessionKeys::load_or_create(&dir).unwrap();
        assert!(again.verify(&fresh, "h").is_some());
        assert_eq!(again.verify(&v, "h"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_tokens_verify_for_their_user_and_host() {
        let keys = SessionKeys::from_bytes(&[7; 32]);
        let set = keys
            .device_cookie("bob", "chat.example.com", [3; 8])
            .unwrap();
        let set = set.to_str().unwrap();
        for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
            assert!(set.contains(attr), "{set}");
        }
        let value = set
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("__Host-burrow-device=")
            .unwrap();
        let d = keys.verify_device(value, "chat.example.com").unwrap();
        assert_eq!((d.user.as_str(), d.password_tag), ("bob", [3; 8]));
        assert_eq!(keys.verify_device(value, "other.example.com"), None);
        assert_eq!(keys.verify(value, "chat.example.com"), None);
    }

    #[test]
    fn cookie_header_handling_keeps_the_apps_cookies() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; __Host-burrow=xyz"),
        );
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("b=2; __Host-burrow-device=d"),
        );
        assert_eq!(find_cookie(&h), Some("xyz"));
        assert_eq!(find_device_cookie(&h), Some("d"));
        strip_cookie(&mut h);
        assert_eq!(h.get_all(http::header::COOKIE).iter().count(), 1);
        assert_eq!(h[http::header::COOKIE], "a=1; b=2");
        let mut only = http::HeaderMap::new();
        only.insert(
            http::header::COOKIE,
            HeaderValue::from_static("__Host-burrow=xyz"),
        );
        strip_cookie(&mut only);
        assert!(only.get(http::header::COOKIE).is_none());
        // HTTP/2 crumbs without our cookies are joined too.
        let mut crumbs = http::HeaderMap::new();
        crumbs.append(http::header::COOKIE, HeaderValue::from_static("a=1"));
        crumbs.append(http::header::COOKIE, HeaderValue::from_static("b=2"));
        strip_cookie(&mut crumbs);
        assert_eq!(crumbs.get_all(http::header::COOKIE).iter().count(), 1);
        assert_eq!(crumbs[http::header::COOKIE], "a=1; b=2");
        // Bytes that are not UTF-8 neither hide our cookie nor get lost;
        // other letter cases and ','-joined headers are ours too.
        let mut odd = http::HeaderMap::new();
        odd.append(
            http::header::COOKIE,
            HeaderValue::from_bytes(b"name=caf\xe9; __Host-burrow=s1").unwrap(),
        );
        odd.append(
            http::header::COOKIE,
            HeaderValue::from_static("list=a,b, __HOST-BURROW-DEVICE=d; x=1"),
        );
        assert_eq!(find_cookie(&odd), Some("s1"));
        strip_cookie(&mut odd);
        assert_eq!(
            odd[http::header::COOKIE].as_bytes(),
            b"name=caf\xe9; list=a,b; x=1"
        );
        let set = SessionKeys::from_bytes(&[1; 32]).set_cookie("u", "h", [0; 8]);
        let set = set.to_str().unwrap();
        for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age="] {
            assert!(set.contains(attr), "{set}");
        }
        assert!(!set.contains("Domain"), "host-only: {set}");
    }
}
