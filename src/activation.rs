//! Listening sockets handed over by systemd socket activation
//! (`LISTEN_FDS`, `LISTEN_PID`; see `systemd/burrow-edge.socket`).
//!
//! systemd holds the sockets, so they stay open across `systemctl restart
//! burrow-edge`: connections that arrive while one edge process drains and
//! the next starts wait in the kernel's accept queue instead of being
//! refused. Each socket is matched to the config by what it is: a TCP
//! listener on the `https`, `http` or `admin` address, a UDP socket on the
//! `tunnel` address. Anything else is an error, not silently ignored.

use std::net::SocketAddr;

use burrow_edge::Prebound;
use burrow_edge::config::EdgeConfig;

/// The sockets systemd handed over, placed; `None` when none were.
pub fn prebound(config: &EdgeConfig) -> Result<Option<Prebound>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() == 0 {
        return Ok(None);
    }
    let mut out = Prebound::default();
    for i in 0..fds.len() {
        // systemd passes the sockets from fd 3 on.
        let fd = i + 3;
        if let Ok(Some(listener)) = fds.take_tcp_listener(i) {
            let addr = listener
                .local_addr()
                .map_err(|e| format!("socket activation: fd {fd}: {e}"))?;
            let slot = [
                ("https", config.https, &mut out.https),
                ("http", config.http, &mut out.http),
                ("admin", config.admin, &mut out.admin),
            ]
            .into_iter()
            .find(|(_, configured, _)| configured.is_some_and(|c| same_listener(c, addr)));
            let Some((name, _, slot)) = slot else {
                return Err(format!(
                    "socket activation handed over a TCP listener on {addr} (fd {fd}), which is not [edge] https, http or admin"
                ));
            };
            if slot.replace(listener).is_some() {
                return Err(format!(
                    "socket activation handed over two listeners for [edge] {name}"
                ));
            }
        } else if let Ok(Some(socket)) = fds.take_udp_socket(i) {
            let addr = socket
                .local_addr()
                .map_err(|e| format!("socket activation: fd {fd}: {e}"))?;
            if !same_listener(config.tunnel, addr) {
                return Err(format!(
                    "socket activation handed over a UDP socket on {addr} (fd {fd}), which is not [edge] tunnel ({})",
                    config.tunnel
                ));
            }
            if out.tunnel.replace(socket).is_some() {
                return Err(
                    "socket activation handed over two UDP sockets for [edge] tunnel".into(),
                );
            }
        } else {
            return Err(format!(
                "socket activation: fd {fd} is neither a TCP listener nor a UDP socket"
            ));
        }
    }
    Ok(Some(out))
}

/// Whether a socket bound on `got` serves a listener configured on
/// `configured`: the same port, and the same address unless either is the
/// unspecified one (`ListenStream=443` binds `[::]:443`).
fn same_listener(configured: SocketAddr, got: SocketAddr) -> bool {
    configured.port() == got.port()
        && (configured.ip() == got.ip()
            || configured.ip().is_unspecified()
            || got.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_match_by_port_and_address_or_wildcard() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(same_listener(a("[::]:443"), a("[::]:443")));
        assert!(same_listener(a("0.0.0.0:443"), a("[::]:443")));
        assert!(same_listener(a("127.0.0.1:8443"), a("127.0.0.1:8443")));
        assert!(same_listener(a("[::]:443"), a("192.0.2.1:443")));
        assert!(!same_listener(a("[::]:443"), a("[::]:80")));
        assert!(!same_listener(a("127.0.0.1:443"), a("127.0.0.2:443")));
    }
}
