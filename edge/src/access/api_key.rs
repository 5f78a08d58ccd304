//! API keys: what one looks like (`burrow_` and 32 random bytes in
//! base64url), how `burrow keygen-api` makes one, and finding one in an
//! `Authorization: Bearer` header. The config keeps only an argon2id hash
//! of each key; checking one is [`super::auth::Verifier::verify_key_with`].

use base64::Engine;
use http::header::{self, HeaderMap};
use ring::rand::{SecureRandom, SystemRandom};

/// What every API key starts with: a Bearer token without it is the app's
/// own and passes untouched.
pub const PREFIX: &str = "burrow_";
/// Random bytes in a key.
pub const KEY_BYTES: usize = 32;
/// A whole key's length: the prefix and the bytes in unpadded base64url.
pub const KEY_LEN: usize = PREFIX.len() + (KEY_BYTES * 4).div_ceil(3);

/// A new random API key. Shown once; only its hash is kept.
pub fn generate() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; KEY_BYTES];
    SystemRandom::new().fill(&mut bytes)?;
    Ok(format!(
        "{PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The token of an `Authorization: Bearer` header that carries our prefix
/// (the edge's credential, not the app's), in whatever shape it came.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && token.starts_with(PREFIX)).then_some(token)
}

/// Whether a header value is an `Authorization: Bearer` with our prefix.
pub fn is_bearer_key(value: &[u8]) -> bool {
    value
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"bearer "))
        && value[7..].trim_ascii_start().starts_with(PREFIX.as_bytes())
}

/// Whether `token` has the shape [`generate`] gives: anything else is
/// refused without hashing it.
pub fn well_formed(token: &str) -> bool {
    token.len() == KEY_LEN
        && token.strip_prefix(PREFIX).is_some_and(|rest| {
            rest.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_well_formed() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), KEY_LEN);
        assert_eq!(KEY_LEN, 50);
        assert!(well_formed(&a) && well_formed(&b), "{a} {b}");
        assert!(!well_formed(&a[..KEY_LEN - 1]));
        assert!(!well_formed(&format!("{a}x")));
        assert!(!well_formed(&a.replace(PREFIX, "burrow-")));
        let mut odd = a.clone();
        odd.replace_range(KEY_LEN - 1.., "=");
        assert!(!well_formed(&odd));
    }

    #[test]
    fn only_bearer_tokens_with_the_prefix_are_ours() {
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, http::HeaderValue::from_static(v));
            h
        };
        assert_eq!(bearer(&with("Bearer burrow_abc")), Some("burrow_abc"));
        assert_eq!(bearer(&with("bearer  burrow_abc ")), Some("burrow_abc"));
        assert_eq!(bearer(&with("Bearer sk-abc")), None);
        assert_eq!(bearer(&with("Basic burrow_abc")), None);
        assert_eq!(bearer(&with("Bearer")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
        assert!(is_bearer_key(b"BEARER burrow_x"));
        assert!(!is_bearer_key(b"Bearer sk-burrow_x"));
        assert!(!is_bearer_key(b"Bearer"));
        assert!(!is_bearer_key(b"Basic YWxpY2U6eA=="));
    }
}
