//! Session cookies: after one successful login the edge sets a signed,
//! host-only cookie, so apps that replace `Authorization` with their own
//! Bearer token (and PWAs, which send no credentials) keep working.
//!
//! Value: `hex(user).hex(host).expiry.hex(password tag).hex(hmac)`. The
//! password tag binds a session to the user's current hash: changing the
//! password in the config ends existing sessions.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use burrow_proto::fsutil;
use http::HeaderValue;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// `__Host-` makes browsers insist on Secure, Path=/ and no Domain.
pub const COOKIE_NAME: &str = "__Host-burrow";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Cookie values longer than this are not ours.
const MAX_COOKIE_LEN: usize = 1024;

/// The key sessions are signed with, kept in `state_dir` so restarts keep
/// everyone logged in.
pub struct SessionKeys {
    key: hmac::Key,
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

impl SessionKeys {
    pub fn load_or_create(state_dir: &Path) -> std::io::Result<Self> {
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
        Ok(Self::from_bytes(&bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    fn payload(user: &str, host: &str, expiry: u64, tag: &[u8; 8]) -> String {
        format!(
            "{}.{}.{expiry}.{}",
            hex(user.as_bytes()),
            hex(host.as_bytes()),
            hex(tag)
        )
    }

    /// A cookie value for `user` on `host`.
    pub fn issue(&self, user: &str, host: &str, tag: [u8; 8]) -> String {
        let payload = Self::payload(user, host, unix_now() + SESSION_TTL.as_secs(), &tag);
        let mac = hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", hex(mac.as_ref()))
    }

    /// The session in `value` if it is ours, unexpired and for `host`.
    pub fn verify(&self, value: &str, host: &str) -> Option<Session> {
        if value.len() > MAX_COOKIE_LEN {
            return None;
        }
        let (payload, mac) = value.rsplit_once('.')?;
        hmac::verify(&self.key, payload.as_bytes(), &unhex(mac)?).ok()?;
        let mut parts = payload.split('.');
        let user = String::from_utf8(unhex(parts.next()?)?).ok()?;
        let cookie_host = unhex(parts.next()?)?;
        let expiry: u64 = parts.next()?.parse().ok()?;
        let tag: [u8; 8] = unhex(parts.next()?)?.try_into().ok()?;
        if parts.next().is_some() || cookie_host != host.as_bytes() || expiry <= unix_now() {
            return None;
        }
        Some(Session {
            user,
            password_tag: tag,
        })
    }

    /// The Set-Cookie header that starts a session.
    pub fn set_cookie(&self, user: &str, host: &str, tag: [u8; 8]) -> HeaderValue {
        let v = format!(
            "{COOKIE_NAME}={}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Lax",
            self.issue(user, host, tag),
            SESSION_TTL.as_secs()
        );
        HeaderValue::from_str(&v).expect("hex and ASCII attributes are a valid header value")
    }
}

/// The Set-Cookie header that ends a session.
pub fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("__Host-burrow=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Lax")
}

/// Our cookie's value among a request's Cookie headers.
pub fn find_cookie(headers: &http::HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE_NAME)
        .map(|(_, v)| v)
}

/// Removes our cookie from the Cookie headers; the app's cookies stay.
pub fn strip_cookie(headers: &mut http::HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && c.split_once('=').is_none_or(|(k, _)| k != COOKIE_NAME))
        .map(str::to_owned)
        .collect();
    headers.remove(http::header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(http::header::COOKIE, v);
        }
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
                password_tag: tag
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
    }

    #[test]
    fn expired_sessions_are_refused() {
        let keys = SessionKeys::from_bytes(&[7; 32]);
        let payload = SessionKeys::payload("alice", "h", unix_now() - 1, &[0; 8]);
        let mac = hmac::sign(&keys.key, payload.as_bytes());
        assert_eq!(
            keys.verify(&format!("{payload}.{}", hex(mac.as_ref())), "h"),
            None
        );
    }

    #[test]
    fn cookie_header_handling_keeps_the_apps_cookies() {
        let mut h = http::HeaderMap::new();
        h.append(
            http::header::COOKIE,
            HeaderValue::from_static("a=1; __Host-burrow=xyz"),
        );
        h.append(http::header::COOKIE, HeaderValue::from_static("b=2"));
        assert_eq!(find_cookie(&h), Some("xyz"));
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
        let set = SessionKeys::from_bytes(&[1; 32]).set_cookie("u", "h", [0; 8]);
        let set = set.to_str().unwrap();
        for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age="] {
            assert!(set.contains(attr), "{set}");
        }
        assert!(!set.contains("Domain"), "host-only: {set}");
    }
}
