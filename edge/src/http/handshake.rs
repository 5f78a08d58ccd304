//! The HTTPS handshake, with the cipher suite chosen the way Go's TLS
//! server (and so Caddy) chooses it.
//!
//! A rustls server takes either the client's order of cipher suites or its
//! own. Neither is right for everyone: curl, OpenSSL and rustls clients list
//! AES-256-GCM first, which costs the edge (and the client) about a quarter
//! more CPU per byte than AES-128-GCM for no security a 128-bit key lacks;
//! a phone without AES instructions lists ChaCha20-Poly1305 first because
//! AES is slow there. So the edge reads the ClientHello first: a client
//! whose favourite suite is ChaCha20 gets its own order, every other client
//! gets the edge's (AES-128-GCM, AES-256-GCM, ChaCha20).
//!
//! The same look at the ClientHello tells agents from browsers: an agent
//! whose network blocks UDP dials this listener with ALPN `burrow/1` and
//! gets the tunnel's TLS config (TLS 1.3, its key as client certificate),
//! which browsers never see, so none is asked for a certificate.

use std::io;
use std::sync::Arc;

use rustls::CipherSuite;
use rustls::server::{Acceptor, ClientHello};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;

/// The listener's two TLS configs, identical but for whose order of cipher
/// suites counts.
#[derive(Clone)]
pub struct HttpsTls {
    ours: Arc<rustls::ServerConfig>,
    clients: Arc<rustls::ServerConfig>,
    /// For agents (ALPN `burrow/1`), when the tunnel takes them here.
    agents: Option<Arc<rustls::ServerConfig>>,
    /// For TLS-ALPN-01 challenges another edge of a cluster started.
    certs: Option<Arc<crate::tls::CertStore>>,
}

/// Who finished a handshake on the HTTPS listener.
pub enum Accepted<IO> {
    Browser(TlsStream<IO>),
    Agent(TlsStream<IO>),
}

impl HttpsTls {
    pub fn new(config: rustls::ServerConfig, agents: Option<rustls::ServerConfig>) -> Self {
        let mut ours = config.clone();
        ours.ignore_client_order = true;
        let mut clients = config;
        clients.ignore_client_order = false;
        Self {
            ours: Arc::new(ours),
            clients: Arc::new(clients),
            agents: agents.map(Arc::new),
            certs: None,
        }
    }

    /// Reads challenge certificates through `certs` (see
    /// [`crate::tls::CertStore::fetch_alpn_challenge`]).
    #[must_use]
    pub fn with_certs(mut self, certs: Arc<crate::tls::CertStore>) -> Self {
        self.certs = Some(certs);
        self
    }

    /// The config for this ClientHello.
    fn config_for(&self, hello: &ClientHello<'_>) -> Arc<rustls::ServerConfig> {
        let supported = &self.ours.crypto_provider().cipher_suites;
        let favourite = hello
            .cipher_suites()
            .iter()
            .find(|offered| supported.iter().any(|s| s.suite() == **offered));
        if favourite.is_some_and(is_chacha) {
            self.clients.clone()
        } else {
            self.ours.clone()
        }
    }

    /// Runs the server side of a TLS handshake on `io`.
    pub async fn accept<IO>(&self, io: IO) -> io::Result<Accepted<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let start = LazyConfigAcceptor::new(Acceptor::default(), io).await?;
        let hello = start.client_hello();
        if let Some(certs) = &self.certs
            && let Some(name) = hello.server_name()
            && hello
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == crate::tls::ACME_TLS_ALPN))
        {
            let name = name.to_ascii_lowercase();
            certs.fetch_alpn_challenge(&name).await;
        }
        let hello = start.client_hello();
        let agent = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == burrow_proto::quic::ALPN));
        match (&self.agents, agent) {
            (Some(agents), true) => Ok(Accepted::Agent(start.into_stream(agents.clone()).await?)),
            _ => {
                let config = self.config_for(&hello);
                Ok(Accepted::Browser(start.into_stream(config).await?))
            }
        }
    }
}

fn is_chacha(suite: &CipherSuite) -> bool {
    matches!(
        suite,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
            | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::crypto::ring::cipher_suite as suite;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::sign::CertifiedKey;
    use rustls::{HandshakeKind, SupportedCipherSuite, SupportedProtocolVersion};

    /// The listener's config (as `tls_config` builds it) with a
    /// self-signed certificate for `edge.test`, and that certificate.
    fn edge_tls() -> (HttpsTls, CertificateDer<'static>) {
        let cert = rcgen::generate_simple_self_signed(vec!["edge.test".into()]).unwrap();
        let der = CertificateDer::from(cert.cert.der().to_vec());
        let key = PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
        let key = burrow_proto::quic::crypto_provider()
            .key_provider
            .load_private_key(key)
            .unwrap();
        let mut sni = rustls::server::ResolvesServerCertUsingSni::new();
        sni.add("edge.test", CertifiedKey::new(vec![der.clone()], key))
            .unwrap();
        let config = super::super::tls_config(Arc::new(sni), false).unwrap();
        (HttpsTls::new(config, None), der)
    }

    /// A rustls client trusting `root`, offering `offered` in that order.
    fn client(
        root: &CertificateDer<'static>,
        offered: &[SupportedCipherSuite],
        versions: &[&'static SupportedProtocolVersion],
    ) -> tokio_rustls::TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root.clone()).unwrap();
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: offered.to_vec(),
            ..rustls::crypto::ring::default_provider()
        };
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// One handshake (and the session tickets after it) between `client`
    /// and the listener; returns the server side.
    async fn handshake(
        tls: &HttpsTls,
        client: &tokio_rustls::TlsConnector,
    ) -> rustls::ServerConnection {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::try_from("edge.test").unwrap();
        let (client, server) = tokio::join!(client.connect(name, a), tls.accept(b));
        let Ok(Accepted::Browser(server)) = server else {
            panic!("a browser handshake");
        };
        let (mut client, mut server) = (client.unwrap(), server);
        // A TLS 1.3 client receives its tickets after the handshake: a
        // byte each way delivers them.
        server.write_all(b"!").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(client.read_u8().await.unwrap(), b'!');
        let theirs = client.get_ref().1.negotiated_cipher_suite();
        let (_, server) = server.into_inner();
        assert_eq!(theirs, server.negotiated_cipher_suite());
        server
    }

    /// The suite a client offering `offered` agrees on with the listener.
    async fn agreed(
        offered: &[SupportedCipherSuite],
        versions: &[&'static SupportedProtocolVersion],
    ) -> CipherSuite {
        let (tls, root) = edge_tls();
        let server = handshake(&tls, &client(&root, offered, versions)).await;
        server.negotiated_cipher_suite().unwrap().suite()
    }

    #[tokio::test]
    async fn a_client_resumes_after_more_sessions_than_a_server_cache_holds() {
        let (tls, root) = edge_tls();
        let tls13 = &[&rustls::version::TLS13];
        let suites = rustls::crypto::ring::DEFAULT_CIPHER_SUITES;
        let phone = client(&root, suites, tls13);
        let first = handshake(&tls, &phone).await;
        assert_eq!(first.handshake_kind(), Some(HandshakeKind::Full));
        // More clients than rustls's default in-memory session cache (256)
        // come and go; the edge keeps no state for any of them.
        for _ in 0..300 {
            handshake(&tls, &client(&root, suites, tls13)).await;
        }
        let again = handshake(&tls, &phone).await;
        assert_eq!(again.handshake_kind(), Some(HandshakeKind::Resumed));
    }

    #[tokio::test]
    async fn an_aes_256_first_client_gets_aes_128() {
        let tls13 = &[&rustls::version::TLS13];
        let offered = [
            suite::TLS13_AES_256_GCM_SHA384,
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS13_AES_128_GCM_SHA256,
        ];
        assert_eq!(
            agreed(&offered, tls13).await,
            CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        // A client that offers only AES-256 still gets it.
        assert_eq!(
            agreed(&offered[..1], tls13).await,
            CipherSuite::TLS13_AES_256_GCM_SHA384
        );
    }

    #[tokio::test]
    async fn a_chacha_first_client_gets_chacha() {
        let offered = [
            suite::TLS13_CHACHA20_POLY1305_SHA256,
            suite::TLS13_AES_128_GCM_SHA256,
        ];
        assert_eq!(
            agreed(&offered, &[&rustls::version::TLS13]).await,
            CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
    }

    #[tokio::test]
    async fn tls12_clients_are_chosen_for_the_same_way() {
        let tls12 = &[&rustls::version::TLS12];
        let aes = [
            suite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        assert_eq!(
            agreed(&aes, tls12).await,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        );
        let chacha = [
            suite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ];
        assert_eq!(
            agreed(&chacha, tls12).await,
            CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        );
    }
}
