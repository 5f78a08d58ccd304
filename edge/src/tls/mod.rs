//! The edge's certificates: per-name public certificates (self-signed,
//! from files, or from ACME), the identity certificate agents can pin, the
//! ACME challenge answers, and the SNI resolvers that choose between them
//! for HTTPS and for QUIC.

pub mod acme;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use burrow_proto::fsutil;
use burrow_proto::quic::{IDENTITY_SNI, crypto_provider};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::debug;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("certificate: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// ALPN of the TLS-ALPN-01 challenge (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Path prefix of HTTP-01 challenges (RFC 8555 8.3).
pub const ACME_HTTP_PREFIX: &str = "/.well-known/acme-challenge/";

/// Certificates by host name, swappable while serving, and the answers to
/// pending ACME challenges.
#[derive(Debug)]
pub struct CertStore {
    identity: Arc<CertifiedKey>,
    by_name: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// TLS-ALPN-01 challenge certificates by name.
    alpn_challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
    /// HTTP-01 key authorizations by token.
    http_challenges: RwLock<HashMap<String, String>>,
    /// TLS-ALPN-01 certificates for challenges another edge started, by
    /// name: the certificate, its digest, and when it was read.
    remote_alpn: RwLock<HashMap<String, RemoteAlpn>>,
    /// With `[cluster]`: challenges another edge started are read here.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
}

impl CertStore {
    pub fn new(identity: Arc<CertifiedKey>) -> Self {
        Self {
            identity,
            by_name: RwLock::default(),
            alpn_challenges: RwLock::default(),
            http_challenges: RwLock::default(),
            remote_alpn: RwLock::default(),
            cluster: std::sync::OnceLock::new(),
        }
    }

    /// Each named certificate's expiry, by name.
    pub fn expiries(&self) -> Vec<(String, std::time::SystemTime)> {
        let map = self.by_name.read().expect("cert store lock not poisoned");
        let mut out: Vec<_> = map
            .iter()
            .filter_map(|(name, key)| {
                let leaf = key.cert.first()?;
                let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
                let secs = u64::try_from(cert.validity().not_after.timestamp()).ok()?;
                Some((
                    name.clone(),
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                ))
            })
            .collect();
        out.sort();
        out
    }

    /// The certificate served for `name` now, if any.
    pub fn get(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.by_name(Some(name))
    }

    pub fn set_alpn_challenge(&self, name: &str, key: Option<Arc<CertifiedKey>>) {
        let mut map = self
            .alpn_challenges
            .write()
            .expect("cert store lock not poisoned");
        match key {
            Some(k) => map.insert(name.to_ascii_lowercase(), k),
            None => map.remove(&name.to_ascii_lowercase()),
        };
    }

    pub fn set_http_challenge(&self, token: &str, key_authorization: Option<String>) {
        let mut map = self
            .http_challenges
            .write()
            .expect("cert store lock not poisoned");
        match key_authorization {
            Some(k) => map.insert(token.to_owned(), k),
            None => map.remove(token),
        };
    }

    /// The answer to an HTTP-01 challenge request path, if one is pending.
    pub fn http_challenge(&self, path: &str) -> Option<String> {
        let token = path.strip_prefix(ACME_HTTP_PREFIX)?;
        self.http_challenges
            .read()
            .expect("cert store lock not poisoned")
            .get(token)
            .cloned()
    }

    /// Answers challenges other edges of `cluster` started, too.
    pub fn set_cluster(&self, cluster: Arc<crate::cluster::Cluster>) {
        let _ = self.cluster.set(cluster);
    }

    /// The HTTP-01 answer for `path`: this edge's, else (in a cluster) the
    /// one another edge put in Redis for the CA, which may reach any edge.
    pub async fn http_challenge_anywhere(&self, path: &str) -> Option<String> {
        if let Some(local) = self.http_challenge(path) {
            return Some(local);
        }
        let token = path.strip_prefix(ACME_HTTP_PREFIX)?;
        let cluster = self.cluster.get()?;
        // RFC 8555 8.1: base64url; anything else is not worth a lookup.
        let well_formed = !token.is_empty()
            && token.len() <= 256
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            return None;
        }
        let value = cluster.get(&["acme", "http01", token]).await.ok()??;
        String::from_utf8(value).ok()
    }

    /// In a cluster, fetches the TLS-ALPN-01 digest another edge put in
    /// Redis for `name` and installs its challenge certificate here for
    /// [`crate::cluster::CHALLENGE_TTL`], so the handshake that follows
    /// can answer the CA. Nothing when this edge has one already.
    pub async fn fetch_alpn_challenge(&self, name: &str) {
        let Some(cluster) = self.cluster.get() else {
            return;
        };
        // Only names served here, each read at most once a second: a
        // scanner offering acme-tls/1 costs no Redis work per handshake.
        let now = std::time::Instant::now();
        let ours = self
            .by_name
            .read()
            .expect("cert store lock not poisoned")
            .contains_key(name);
        let local = self
            .alpn_challenges
            .read()
            .expect("cert store lock not poisoned")
            .contains_key(name);
        let fresh = self
            .remote_alpn
            .read()
            .expect("cert store lock not poisoned")
            .get(name)
            .is_some_and(|r| now.duration_since(r.read_at) < REMOTE_ALPN_REREAD);
        if !ours || local || fresh {
            return;
        }
        // A miss is remembered as well: most lookups find nothing.
        let digest = match cluster.get(&["acme", "alpn", name]).await {
            Ok(Some(d)) if d.len() == 32 => Some(d),
            _ => None,
        };
        let known = self
            .remote_alpn
            .read()
            .expect("cert store lock not poisoned")
            .get(name)
            .and_then(|r| r.answer.clone());
        let answer = match digest {
            None => None,
            Some(d) => match known.filter(|(_, known)| *known == d) {
                Some(same) => Some(same),
                None => match acme::alpn_certificate(name, &d) {
                    Ok(cert) => {
                        tracing::info!(
                            name,
                            "answering a TLS-ALPN-01 challenge another edge started"
                        );
                        Some((cert, d))
                    }
                    Err(e) => {
                        tracing::warn!(name, error = %e, "cannot make the TLS-ALPN-01 certificate");
                        None
                    }
                },
            },
        };
        let mut remote = self
            .remote_alpn
            .write()
            .expect("cert store lock not poisoned");
        remote.retain(|_, r| now.duration_since(r.read_at) < crate::cluster::CHALLENGE_TTL);
        remote.insert(
            name.to_owned(),
            RemoteAlpn {
                answer,
                read_at: now,
            },
        );
    }

    /// Installs `key` for `names`; connections already open keep theirs.
    pub fn install(&self, names: &[String], key: Arc<CertifiedKey>) {
        let mut map = self.by_name.write().expect("cert store lock not poisoned");
        for n in names {
            map.insert(n.to_ascii_lowercase(), key.clone());
        }
    }

    fn by_name(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let map = self.by_name.read().expect("cert store lock not poisoned");
        sni.and_then(|s| map.get(&s.to_ascii_lowercase()).cloned())
    }

    /// The certificate of a route whose host is an IP address (the lowest
    /// such address, so the choice is stable).
    fn for_ip_literal(&self) -> Option<Arc<CertifiedKey>> {
        let map = self.by_name.read().expect("cert store lock not poisoned");
        map.iter()
            .filter_map(|(name, key)| Some((name.parse::<std::net::IpAddr>().ok()?, key)))
            .min_by_key(|(ip, _)| *ip)
            .map(|(_, key)| key.clone())
    }

    /// Whether names `a` and `b` are served with one certificate (so a
    /// connection made for one may carry requests for the other).
    pub fn same_certificate(&self, a: &str, b: &str) -> bool {
        match (self.by_name(Some(a)), self.by_name(Some(b))) {
            (Some(x), Some(y)) => Arc::ptr_eq(&x, &y),
            _ => false,
        }
    }

    /// The resolver for the HTTPS listener.
    pub fn https_resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(HttpsResolver(self.clone()))
    }

    /// The resolver for the QUIC tunnel: the public certificate for its name
    /// (agents that verify the edge by DNS name), else the identity.
    pub fn quic_resolver(self: &Arc<Self>) -> Arc<dyn ResolvesServerCert> {
        Arc::new(QuicResolver(self.clone()))
    }
}

/// A TLS-ALPN-01 challenge another edge of the cluster started.
struct RemoteAlpn {
    /// The certificate and the digest it carries; none when the last read
    /// found no challenge.
    answer: Option<(Arc<CertifiedKey>, Vec<u8>)>,
    read_at: std::time::Instant,
}

impl std::fmt::Debug for RemoteAlpn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteAlpn").finish_non_exhaustive()
    }
}

/// A name's challenge is read from Redis at most this often.
const REMOTE_ALPN_REREAD: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug)]
struct HttpsResolver(Arc<CertStore>);

impl ResolvesServerCert for HttpsResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let acme = hello
            .alpn()
            .is_some_and(|mut protos| protos.any(|p| p == ACME_TLS_ALPN));
        if acme {
            // A validation connection gets the challenge certificate or nothing.
            let name = hello.server_name()?.to_ascii_lowercase();
            let local = self
                .0
                .alpn_challenges
                .read()
                .expect("cert store lock not poisoned")
                .get(&name)
                .cloned();
            return local.or_else(|| {
                let remote = self
                    .0
                    .remote_alpn
                    .read()
                    .expect("cert store lock not poisoned");
                remote
                    .get(&name)
                    .filter(|r| r.read_at.elapsed() < crate::cluster::CHALLENGE_TTL)
                    .and_then(|r| r.answer.as_ref().map(|(cert, _)| cert.clone()))
            });
        }
        // A name we do not serve gets no certificate: answering with
        // another site's would tell a scanner which host names live here.
        // A client that sends no name dialled an address (RFC 6066 has no
        // SNI for IP literals): it gets the certificate of a route whose
        // host is an IP address, if there is one.
        let key = match hello.server_name() {
            Some(name) => self.0.by_name(Some(name)),
            None => self.0.for_ip_literal(),
        };
        if key.is_none() {
            debug!(sni = ?hello.server_name(), "TLS for a name not served here; refusing");
        }
        key
    }
}

#[derive(Debug)]
struct QuicResolver(Arc<CertStore>);

impl ResolvesServerCert for QuicResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(IDENTITY_SNI) | None => Some(self.0.identity.clone()),
            name => self
                .0
                .by_name(name)
                .or_else(|| Some(self.0.identity.clone())),
        }
    }
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let signer = crypto_provider().key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

/// Loads a PEM certificate chain and private key (`[tls] mode = "files"`).
pub fn load_files(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.display().to_string(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|e| TlsError::Pem {
        path: key.display().to_string(),
        reason: e.to_string(),
    })?;
    certified(chain, key_der)
}

fn generate(names: &[String]) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    generate_with(names, None)
}

fn generate_with(
    names: &[String],
    key: Option<KeyPair>,
) -> Result<(rcgen::Certificate, KeyPair), TlsError> {
    let key = match key {
        Some(k) => k,
        None => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?,
    };
    let mut params = CertificateParams::new(names.to_vec())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "burrow self-signed");
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

/// A throwaway self-signed certificate for `names`, served while the real
/// one is on its way.
pub fn temporary(names: &[String]) -> Result<Arc<CertifiedKey>, TlsError> {
    let (cert, key) = generate(names)?;
    certified(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// A self-signed certificate for `names`, kept in `state_dir` so browsers'
/// exceptions survive restarts; remade when the names change.
pub fn self_signed(state_dir: &Path, names: &[String]) -> Result<Arc<CertifiedKey>, TlsError> {
    let path = state_dir.join("self-signed.pem");
    let mut names = names.to_vec();
    names.sort();
    let tag = format!("# names: {}\n", names.join(","));
    let existing = std::fs::read_to_string(&path).ok();
    if let Some(text) = &existing {
        if text.starts_with(&tag) {
            if let Ok(k) = load_files(&path, &path) {
                return Ok(k);
            }
        }
    }
    // New names: keep the key (and subject), so a client that trusts the
    // old certificate as an anchor still verifies the new one.
    let old_key = existing.and_then(|t| {
        let block = &t[t.find("-----BEGIN PRIVATE KEY-----")?..];
        KeyPair::from_pem(block).ok()
    });
    let (cert, key) = generate_with(&names, old_key)?;
    let pem = format!("{tag}{}{}", cert.pem(), key.serialize_pem());
    fsutil::write_private(&path, pem.as_bytes()).map_err(|source| TlsError::Write {
        path: path.display().to_string(),
        source,
    })?;
    certified(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_share_a_certificate_only_when_one_was_installed_for_both() {
        let identity = temporary(&["identity.burrow".to_owned()]).unwrap();
        let store = CertStore::new(identity);
        let both = ["a.example".to_owned(), "b.example".to_owned()];
        store.install(&both, temporary(&both).unwrap());
        store.install(
            &["c.example".to_owned()],
            temporary(&["c.example".to_owned()]).unwrap(),
        );
        assert!(store.same_certificate("a.example", "B.example"));
        assert!(!store.same_certificate("a.example", "c.example"));
        assert!(!store.same_certificate("a.example", "unknown.example"));
        assert!(store.get("unknown.example").is_none());
        assert!(
            store.for_ip_literal().is_none(),
            "no IP route, no certificate"
        );
        let ip = ["127.0.0.1".to_owned()];
        store.install(&ip, temporary(&ip).unwrap());
        assert!(Arc::ptr_eq(
            &store.for_ip_literal().unwrap(),
            &store.get("127.0.0.1").unwrap()
        ));
    }
}
