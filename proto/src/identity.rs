//! Identity keys and pinned-key TLS: what `burrow keygen` writes, the
//! fingerprints configs pin, and the rustls verifiers that check them.
//!
//! A key is an Ed25519 PKCS#8 PEM file. Its fingerprint is the SHA-256 of the
//! SubjectPublicKeyInfo, written `sha256:` and 64 lowercase hex digits. The
//! self-signed certificate presented in TLS is derived from the key at start
//! and is not itself pinned, so it can be regenerated freely.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ED25519, PublicKeyData};
use ring::digest::{SHA256, digest};
use ring::hkdf;
use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;

use crate::fsutil;

/// The SHA-256 of a public key (SubjectPublicKeyInfo DER).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint([u8; 32]);

const FINGERPRINT_PREFIX: &str = "sha256:";

impl Fingerprint {
    pub fn of_spki(spki_der: &[u8]) -> Self {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, spki_der).as_ref());
        Self(out)
    }

    /// The fingerprint of the key in an X.509 certificate.
    pub fn of_cert(cert: &CertificateDer<'_>) -> Result<Self, rustls::Error> {
        let ee = webpki::EndEntityCert::try_from(cert)
            .map_err(|e| rustls::Error::General(format!("unreadable peer certificate: {e}")))?;
        Ok(Self::of_spki(ee.subject_public_key_info().as_ref()))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FINGERPRINT_PREFIX)?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected \"sha256:\" followed by 64 hex digits (as printed by `burrow keygen`)")]
pub struct InvalidFingerprint;

impl FromStr for Fingerprint {
    type Err = InvalidFingerprint;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix(FINGERPRINT_PREFIX)
            .ok_or(InvalidFingerprint)?;
        if hex.len() != 64 {
            return Err(InvalidFingerprint);
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or(InvalidFingerprint)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| InvalidFingerprint)?;
        }
        Ok(Self(out))
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} is not a PKCS#8 PEM key: {reason}")]
    Parse { path: String, reason: String },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: String },
    #[error("making a certificate for the key: {0}")]
    Cert(String),
}

/// A loaded identity: the private key, a certificate for it, its fingerprint.
pub struct Identity {
    key: PrivatePkcs8KeyDer<'static>,
    pem: String,
    cert: CertificateDer<'static>,
    fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// A fresh Ed25519 identity.
    pub fn generate() -> Result<Self, IdentityError> {
        let key =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| IdentityError::Cert(e.to_string()))?;
        Self::from_key_pair(key)
    }

    pub fn from_pem(pem: &str, path: &Path) -> Result<Self, IdentityError> {
        let key = KeyPair::from_pem(pem).map_err(|e| IdentityError::Parse {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_key_pair(key)
    }

    fn from_key_pair(key: KeyPair) -> Result<Self, IdentityError> {
        let mut params = CertificateParams::new(vec!["burrow".to_owned()])
            .map_err(|e| IdentityError::Cert(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "burrow identity");
        params.distinguished_name = dn;
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(4000, 1, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| IdentityError::Cert(e.to_string()))?;
        Ok(Self {
            fingerprint: Fingerprint::of_spki(&key.subject_public_key_info()),
            pem: key.serialize_pem(),
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            cert: cert.der().clone(),
        })
    }

    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let pem = std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_pem(&pem, path)
    }

    /// Writes a new key to `path` (mode 0600) and returns it; refuses to
    /// replace an existing file.
    pub fn create(path: &Path) -> Result<Self, IdentityError> {
        if path.exists() {
            return Err(IdentityError::Exists {
                path: path.display().to_string(),
            });
        }
        let id = Self::generate()?;
        fsutil::write_private(path, id.pem.as_bytes()).map_err(|source| IdentityError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok(id)
    }

    /// Loads the key at `path`, creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<(Self, Created), IdentityError> {
        match std::fs::metadata(path) {
            Ok(_) => Ok((Self::load(path)?, Created::No)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Self::create(path)?, Created::Yes))
            }
            Err(source) => Err(IdentityError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    pub fn cert(&self) -> CertificateDer<'static> {
        self.cert.clone()
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The certificate and signing key, for a rustls resolver.
    pub fn certified_key(&self) -> Result<Arc<CertifiedKey>, rustls::Error> {
        let provider = crate::quic::crypto_provider();
        let signer = provider.key_provider.load_private_key(self.private_key())?;
        Ok(Arc::new(CertifiedKey::new(vec![self.cert()], signer)))
    }

    /// Keys for QUIC stateless resets and connection IDs, derived from the
    /// identity so that a restarted edge recognises the connection IDs of
    /// its previous run and resets them: agents then learn at their next
    /// packet that the old session is gone, instead of at the idle timeout.
    pub fn endpoint_keys(&self) -> EndpointKeys {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"burrow endpoint keys v1");
        let prk = salt.extract(self.key.secret_pkcs8_der());
        let reset = prk
            .expand(&[b"stateless reset"], ring::hmac::HMAC_SHA256)
            .expect("HMAC_SHA256 key length is a valid HKDF output length");
        let mut cid = [0u8; 8];
        prk.expand(&[b"connection id"], CidKeyLen)
            .and_then(|okm| okm.fill(&mut cid))
            .expect("8 bytes is a valid HKDF output length");
        EndpointKeys {
            reset: ring::hmac::Key::from(reset),
            cid: u64::from_le_bytes(cid),
        }
    }
}

/// See [`Identity::endpoint_keys`].
pub struct EndpointKeys {
    pub reset: ring::hmac::Key,
    pub cid: u64,
}

impl fmt::Debug for EndpointKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EndpointKeys(..)")
    }
}

struct CidKeyLen;

impl hkdf::KeyType for CidKeyLen {
    fn len(&self) -> usize {
        8
    }
}

/// Whether `load_or_create` made a new key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    Yes,
    No,
}

fn supported_algorithms() -> WebPkiSupportedAlgorithms {
    crate::quic::crypto_provider().signature_verification_algorithms
}

/// Accepts exactly the server whose key has the pinned fingerprint, whatever
/// name or issuer its certificate carries.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: Fingerprint,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedServerVerifier {
    pub fn new(pin: Fingerprint) -> Self {
        Self {
            pin,
            algs: supported_algorithms(),
        }
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of_cert(end_entity)?;
        if got == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "edge key {got} does not match the pinned edge_key {}",
                self.pin
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // QUIC is TLS 1.3 only.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Requires a client certificate and proof of its key, whatever the key.
/// Which keys may log in is decided after the handshake, by fingerprint,
/// so a refusal can be logged with the peer's address and told to the agent.
#[derive(Debug)]
pub struct AnyKeyClientVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl Default for AnyKeyClientVerifier {
    fn default() -> Self {
        Self {
            algs: supported_algorithms(),
        }
    }
}

impl ClientCertVerifier for AnyKeyClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Parse now so an unreadable certificate fails the handshake.
        Fingerprint::of_cert(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_and_rejects_junk() {
        let id = Identity::generate().unwrap();
        let fp = id.fingerprint();
        let text = fp.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        for bad in [
            "",
            "sha256:",
            "md5:00",
            &text[..text.len() - 1],
            &text.replace("sha256", "SHA256"),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad}");
        }
        assert!(
            format!("sha256:{}", "zz".repeat(32))
                .parse::<Fingerprint>()
                .is_err()
        );
    }

    #[test]
    fn certificate_carries_the_key_fingerprint_and_pem_reloads() {
        let id = Identity::generate().unwrap();
        assert_eq!(Fingerprint::of_cert(&id.cert()).unwrap(), id.fingerprint());
        let again = Identity::from_pem(&id.pem, Path::new("mem")).unwrap();
        assert_eq!(again.fingerprint(), id.fingerprint());
        assert!(Identity::from_pem("not a key", Path::new("mem")).is_err());
        // Debug never shows key material.
        assert!(!format!("{id:?}").contains("PRIVATE"));
    }

    #[test]
    fn create_refuses_to_overwrite_and_writes_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("burrow-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.key");
        let _ = std::fs::remove_file(&path);
        let id = Identity::create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            Identity::create(&path),
            Err(IdentityError::Exists { .. })
        ));
        let (loaded, created) = Identity::load_or_create(&path).unwrap();
        assert_eq!(
            (loaded.fingerprint(), created),
            (id.fingerprint(), Created::No)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reset_keys_are_stable_per_identity() {
        let a = Identity::generate().unwrap();
        let b = Identity::from_pem(&a.pem, Path::new("mem")).unwrap();
        let tag = |id: &Identity| {
            let k = id.endpoint_keys();
            (ring::hmac::sign(&k.reset, b"cid").as_ref().to_vec(), k.cid)
        };
        assert_eq!(tag(&a), tag(&b));
        let c = tag(&Identity::generate().unwrap());
        assert_ne!(tag(&a).0, c.0);
        assert_ne!(tag(&a).1, c.1);
    }
}
