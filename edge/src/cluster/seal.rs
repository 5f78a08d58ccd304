//! Values encrypted at rest in Redis: AES-256-GCM under a key derived
//! (HKDF-SHA256) from `cluster.secret_file`, a random 96-bit nonce per
//! value, and the Redis key as associated data, so a value moved to
//! another key does not open.

use std::path::Path;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// The shortest secret taken: 32 bytes of randomness.
pub const MIN_SECRET: usize = 32;
/// Longer files are not a key.
const MAX_SECRET: usize = 4096;

pub struct Sealer {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    /// The sealer for the secret in `path` (at least [`MIN_SECRET`] bytes,
    /// e.g. `head -c 32 /dev/urandom`, or any text that long).
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let secret = std::fs::read(path).map_err(|e| e.to_string())?;
        if secret.len() < MIN_SECRET || secret.len() > MAX_SECRET {
            return Err(format!(
                "{} bytes; make one with `head -c 32 /dev/urandom > FILE` and copy it to every edge",
                secret.len()
            ));
        }
        Ok(Self::from_secret(&secret))
    }

    pub fn from_secret(secret: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"burrow cluster v1").extract(secret);
        let okm = prk
            .expand(&[b"seal"], &AES_256_GCM)
            .expect("AES-256 key length is a valid HKDF output");
        let key = UnboundKey::from(okm);
        Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        }
    }

    /// `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .expect("the OS random source works");
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut body,
            )
            .expect("a value under 4 GiB seals");
        out.extend_from_slice(&body);
        out
    }

    /// The plaintext of `sealed`, if it was sealed under this secret for
    /// `aad`.
    pub fn open(&self, aad: &[u8], mut sealed: Vec<u8>) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed.get(..NONCE_LEN)?.try_into().ok()?;
        let body = sealed.get_mut(NONCE_LEN..)?;
        let plain = self
            .key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), body)
            .ok()?;
        Some(plain.to_vec())
    }

    /// A random token (lock owner ids).
    pub fn token(&self) -> String {
        let mut b = [0u8; 16];
        self.rng.fill(&mut b).expect("the OS random source works");
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_secret_and_key() {
        let a = Sealer::from_secret(&[7; 32]);
        let b = Sealer::from_secret(&[8; 32]);
        let sealed = a.seal(b"burrow:acme:cert:x", b"chain and key");
        assert!(!sealed.windows(5).any(|w| w == b"chain"), "not in clear");
        assert_eq!(
            a.open(b"burrow:acme:cert:x", sealed.clone()).as_deref(),
            Some(&b"chain and key"[..])
        );
        assert_eq!(a.open(b"burrow:acme:cert:y", sealed.clone()), None);
        assert_eq!(b.open(b"burrow:acme:cert:x", sealed.clone()), None);
        let mut flipped = sealed;
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(a.open(b"burrow:acme:cert:x", flipped), None);
        for len in 0..40 {
            assert_eq!(a.open(b"k", vec![0; len]), None);
        }
    }
}
