//! Wake-on-LAN: the magic packet (pure bytes) and sending one to the
//! configured broadcast address.
//!
//! A magic packet is six bytes of 0xFF, then the target's MAC address 16
//! times, then optionally a 6-byte SecureOn password. Network cards match it
//! anywhere in a frame; UDP to port 9 (discard) is the convention.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

use crate::config::SecureOn;

/// How many times the MAC address is repeated.
pub const MAC_REPEATS: usize = 16;
/// The length of a magic packet without a password.
pub const MAGIC_PACKET_LEN: usize = 6 + 6 * MAC_REPEATS;
/// The length of a magic packet with a SecureOn password.
pub const SECUREON_PACKET_LEN: usize = MAGIC_PACKET_LEN + 6;

/// The magic packet that wakes the machine with this MAC address.
pub fn magic_packet(mac: [u8; 6], password: Option<SecureOn>) -> Vec<u8> {
    let mut packet = Vec::with_capacity(SECUREON_PACKET_LEN);
    packet.extend_from_slice(&[0xff; 6]);
    for _ in 0..MAC_REPEATS {
        packet.extend_from_slice(&mac);
    }
    if let Some(SecureOn(p)) = password {
        packet.extend_from_slice(&p);
    }
    packet
}

/// Why a magic packet could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("resolving {target}: {source}")]
    Resolve {
        target: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("opening a UDP socket: {0}")]
    Socket(std::io::Error),
    #[error("sending to {addr}: {source}")]
    Send {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Sends `packet` once to `target` (`host:port`) from a fresh UDP socket
/// with SO_BROADCAST set; returns the address it went to.
pub async fn send_magic_packet(target: &str, packet: &[u8]) -> Result<SocketAddr, SendError> {
    let addr = tokio::net::lookup_host(target)
        .await
        .map_err(|source| SendError::Resolve {
            target: target.to_owned(),
            source,
        })?
        .next()
        .ok_or_else(|| SendError::NoAddress(target.to_owned()))?;
    let socket = match addr {
        SocketAddr::V4(_) => {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
                .await
                .map_err(SendError::Socket)?;
            s.set_broadcast(true).map_err(SendError::Socket)?;
            s
        }
        // IPv6 has no broadcast; a multicast or unicast address just works.
        SocketAddr::V6(_) => UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
            .await
            .map_err(SendError::Socket)?,
    };
    socket
        .send_to(packet, addr)
        .await
        .map_err(|source| SendError::Send { addr, source })?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn magic_packet_is_sync_then_sixteen_macs() {
        let mac = [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f];
        let p = magic_packet(mac, None);
        assert_eq!(p.len(), 102);
        assert_eq!(
            hex(&p),
            format!("ffffffffffff{}", "aabbccddee0f".repeat(16)),
        );
    }

    #[test]
    fn secureon_password_goes_last() {
        let p = magic_packet([1, 2, 3, 4, 5, 6], Some(SecureOn([9, 8, 7, 6, 5, 4])));
        assert_eq!(p.len(), SECUREON_PACKET_LEN);
        assert_eq!(&p[..6], &[0xff; 6]);
        assert_eq!(&p[96..102], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&p[102..], &[9, 8, 7, 6, 5, 4]);
    }

    #[tokio::test]
    async fn a_packet_reaches_a_loopback_listener() {
        let listener = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap().to_string();
        let packet = magic_packet([0x52, 0x54, 0, 0x12, 0x34, 0x56], None);
        let sent_to = send_magic_packet(&target, &packet).await.unwrap();
        assert_eq!(sent_to.to_string(), target);
        let mut buf = [0u8; 200];
        let (n, _) = listener.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &packet[..]);
    }
}
