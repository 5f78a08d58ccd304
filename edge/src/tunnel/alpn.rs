//! One UDP port for agents and browsers: the QUIC crypto config that picks
//! the TLS config by the ALPN the client offers, the way the HTTPS
//! listener does over TCP ([`crate::http::handshake`]).
//!
//! quinn starts a connection's TLS session before the ClientHello has
//! arrived, so [`AlpnSplit`] starts a session that only collects the
//! ClientHello; once it is whole, the session reads its ALPN list and
//! starts the real one from the agents' config (ALPN `burrow/1`, client
//! certificate required) or the browsers' (ALPN `h3`, no client
//! certificate asked for, which would make phones show a certificate
//! picker), and hands it everything read so far. From then on it only
//! passes calls through.

use std::any::Any;
use std::sync::Arc;

use quinn::crypto::rustls::QuicServerConfig;
use quinn_proto::crypto::ServerConfig as _;
use quinn_proto::crypto::{
    self, ExportKeyingMaterialError, HeaderKey, KeyPair, Keys, PacketKey, UnsupportedVersion,
};
use quinn_proto::transport_parameters::TransportParameters;
use quinn_proto::{ConnectionId, Side, TransportError, TransportErrorCode};

/// The ALPN browsers offer for HTTP/3.
pub const H3_ALPN: &[u8] = b"h3";

/// The largest ClientHello collected; longer ones end the handshake. A
/// post-quantum key share makes one about 1.8 KB; quinn's own crypto
/// buffer allows 16 KiB.
const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// TLS handshake message type of a ClientHello.
const CLIENT_HELLO: u8 = 1;
/// TLS extension number of ALPN.
const ALPN_EXTENSION: u16 = 16;

/// The crypto config of an endpoint that serves agents and HTTP/3.
pub struct AlpnSplit {
    agents: Arc<QuicServerConfig>,
    browsers: Arc<QuicServerConfig>,
}

impl AlpnSplit {
    pub fn new(agents: QuicServerConfig, browsers: QuicServerConfig) -> Self {
        Self {
            agents: Arc::new(agents),
            browsers: Arc::new(browsers),
        }
    }
}

impl crypto::ServerConfig for AlpnSplit {
    // Initial keys and Retry tags depend on the QUIC version alone, not on
    // the TLS config: both configs give the same.
    fn initial_keys(
        &self,
        version: u32,
        dst_cid: &ConnectionId,
    ) -> Result<Keys, UnsupportedVersion> {
        self.agents.initial_keys(version, dst_cid)
    }

    fn retry_tag(&self, version: u32, orig_dst_cid: &ConnectionId, packet: &[u8]) -> [u8; 16] {
        self.agents.retry_tag(version, orig_dst_cid, packet)
    }

    fn start_session(
        self: Arc<Self>,
        version: u32,
        params: &TransportParameters,
    ) -> Box<dyn crypto::Session> {
        Box::new(SplitSession::Collecting {
            split: self,
            version,
            params: Box::new(*params),
            hello: Vec::new(),
        })
    }
}

/// Which config a ClientHello's ALPN list asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    Agent,
    Browser,
}

enum SplitSession {
    /// Before the ClientHello is whole: what has come of it so far.
    Collecting {
        split: Arc<AlpnSplit>,
        version: u32,
        params: Box<TransportParameters>,
        hello: Vec<u8>,
    },
    Started(Box<dyn crypto::Session>),
}

impl SplitSession {
    fn started(&self) -> Option<&dyn crypto::Session> {
        match self {
            Self::Started(s) => Some(s.as_ref()),
            Self::Collecting { .. } => None,
        }
    }
}

/// The length of the handshake message `buf` starts with, once `buf`
/// holds its header.
fn message_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..4)?;
    Some(4 + (usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3])))
}

/// A cursor over TLS's length-prefixed fields; every read is checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| usize::from(b[0]))
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A field with a one- or two-byte length prefix.
    fn vec8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(n)
    }

    fn vec16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The ALPN protocols a whole ClientHello message offers; `None` if it is
/// not one or is malformed.
fn offered_alpn(message: &[u8]) -> Option<Vec<&[u8]>> {
    let mut r = Reader(message);
    if r.u8()? != usize::from(CLIENT_HELLO) {
        return None;
    }
    r.take(3)?; // length, checked by the caller
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut extensions = Reader(r.vec16()?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let data = extensions.vec16()?;
        if kind == usize::from(ALPN_EXTENSION) {
            let mut list = Reader(Reader(data).vec16()?);
            let mut protocols = Vec::new();
            while !list.0.is_empty() {
                protocols.push(list.vec8()?);
            }
            return Some(protocols);
        }
    }
    Some(Vec::new())
}

/// Whom a ClientHello is from: a browser when it offers `h3` and not
/// burrow's own ALPN; an agent otherwise (whose config then refuses what
/// is neither).
pub fn wants(client_hello: &[u8]) -> Wants {
    match offered_alpn(client_hello) {
        Some(protocols)
            if protocols.contains(&H3_ALPN) && !protocols.contains(&burrow_proto::quic::ALPN) =>
        {
            Wants::Browser
        }
        _ => Wants::Agent,
    }
}

impl crypto::Session for SplitSession {
    fn initial_keys(&self, dst_cid: &ConnectionId, side: Side) -> Keys {
        match self {
            Self::Started(s) => s.initial_keys(dst_cid, side),
            Self::Collecting { split, version, .. } => split
                .agents
                .initial_keys(*version, dst_cid)
                .expect("quinn starts a session only for a version whose initial keys it got"),
        }
    }

    fn handshake_data(&self) -> Option<Box<dyn Any>> {
        self.started()?.handshake_data()
    }

    fn peer_identity(&self) -> Option<Box<dyn Any>> {
        self.started()?.peer_identity()
    }

    fn early_crypto(&self) -> Option<(Box<dyn HeaderKey>, Box<dyn PacketKey>)> {
        self.started()?.early_crypto()
    }

    fn early_data_accepted(&self) -> Option<bool> {
        self.started()?.early_data_accepted()
    }

    fn is_handshaking(&self) -> bool {
        self.started().is_none_or(|s| s.is_handshaking())
    }

    fn read_handshake(&mut self, buf: &[u8]) -> Result<bool, TransportError> {
        let (split, version, params, hello) = match self {
            Self::Started(s) => return s.read_handshake(buf),
            Self::Collecting {
                split,
                version,
                params,
                hello,
            } => (split, *version, **params, hello),
        };
        hello.extend_from_slice(buf);
        let Some(len) = message_len(hello) else {
            return Ok(false);
        };
        if len > MAX_CLIENT_HELLO {
            return Err(TransportError {
                code: TransportErrorCode::CRYPTO_BUFFER_EXCEEDED,
                frame: None,
                reason: "ClientHello too long".into(),
            });
        }
        if hello.len() < len {
            return Ok(false);
        }
        let config = match wants(&hello[..len]) {
            Wants::Agent => split.agents.clone(),
            Wants::Browser => split.browsers.clone(),
        };
        let hello = std::mem::take(hello);
        let mut session = config.start_session(version, &params);
        let ready = session.read_handshake(&hello);
        *self = Self::Started(session);
        ready
    }

    fn transport_parameters(&self) -> Result<Option<TransportParameters>, TransportError> {
        match self.started() {
            Some(s) => s.transport_parameters(),
            None => Ok(None),
        }
    }

    fn write_handshake(&mut self, buf: &mut Vec<u8>) -> Option<Keys> {
        match self {
            Self::Started(s) => s.write_handshake(buf),
            Self::Collecting { .. } => None,
        }
    }

    fn next_1rtt_keys(&mut self) -> Option<KeyPair<Box<dyn PacketKey>>> {
        match self {
            Self::Started(s) => s.next_1rtt_keys(),
            Self::Collecting { .. } => None,
        }
    }

    fn is_valid_retry(&self, orig_dst_cid: &ConnectionId, header: &[u8], payload: &[u8]) -> bool {
        // A server never receives Retry packets.
        self.started()
            .is_some_and(|s| s.is_valid_retry(orig_dst_cid, header, payload))
    }

    fn export_keying_material(
        &self,
        output: &mut [u8],
        label: &[u8],
        context: &[u8],
    ) -> Result<(), ExportKeyingMaterialError> {
        match self.started() {
            Some(s) => s.export_keying_material(output, label, context),
            None => Err(ExportKeyingMaterialError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls writes it, offering `alpn`.
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let mut ext = Vec::new();
        // A server_name extension first, so the ALPN one is not the only one.
        let name = b"chat.example.com";
        let mut sni = vec![0, 0];
        sni.extend_from_slice(&u16::try_from(name.len() + 3).unwrap().to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        sni.extend_from_slice(name);
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&u16::try_from(sni.len()).unwrap().to_be_bytes());
        ext.extend_from_slice(&sni);
        if !alpn.is_empty() {
            let mut list = Vec::new();
            for p in alpn {
                list.push(u8::try_from(p.len()).unwrap());
                list.extend_from_slice(p);
            }
            ext.extend_from_slice(&ALPN_EXTENSION.to_be_bytes());
            ext.extend_from_slice(&u16::try_from(list.len() + 2).unwrap().to_be_bytes());
            ext.extend_from_slice(&u16::try_from(list.len()).unwrap().to_be_bytes());
            ext.extend_from_slice(&list);
        }
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&u16::try_from(ext.len()).unwrap().to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![CLIENT_HELLO];
        msg.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
        msg.extend_from_slice(&body);
        msg
    }

    #[test]
    fn browsers_offer_h3_and_agents_offer_burrow() {
        assert_eq!(wants(&client_hello(&[b"h3"])), Wants::Browser);
        assert_eq!(wants(&client_hello(&[b"h3-29", b"h3"])), Wants::Browser);
        assert_eq!(
            wants(&client_hello(&[burrow_proto::quic::ALPN])),
            Wants::Agent
        );
        // Offering both, or neither, is not a browser: the agents' config
        // (client certificate required) decides.
        assert_eq!(
            wants(&client_hello(&[b"h3", burrow_proto::quic::ALPN])),
            Wants::Agent
        );
        assert_eq!(wants(&client_hello(&[])), Wants::Agent);
        assert_eq!(wants(&client_hello(&[b"h2"])), Wants::Agent);
    }

    #[test]
    fn malformed_client_hellos_never_panic_and_go_to_the_agents_config() {
        let good = client_hello(&[b"h3"]);
        assert_eq!(message_len(&good), Some(good.len()));
        for cut in 0..good.len() {
            assert_eq!(wants(&good[..cut]), Wants::Agent, "cut at {cut}");
        }
        // Lengths that point past the end, at every byte.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] = 0xff;
            let _ = wants(&bad);
        }
        assert_eq!(wants(&[2, 0, 0, 0]), Wants::Agent);
    }
}
