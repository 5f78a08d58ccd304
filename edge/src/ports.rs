//! `[[port]]`: raw TCP forwarding, frp-style. One QUIC stream per accepted
//! connection; the port's allow/deny rules are checked on the peer address
//! before anything else happens.

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_proto::pipe::pipe;
use burrow_proto::{StreamKind, StreamOpen};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::{Decision, IpRules};
use crate::config::PortConfig;
use crate::tunnel::{Registry, open_stream};

/// Accepts connections on one forwarded port until `shutdown`.
pub async fn serve_port(
    listener: TcpListener,
    port: PortConfig,
    global: IpRules,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let port = Arc::new(port);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: keep serving.
                    warn!(listen = %port.listen, error = %e, "accept failed");
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        if let Decision::Deny(reason) = global.check(peer.ip()).and(port.rules.check(peer.ip())) {
            info!(%peer, listen = %port.listen, ?reason, "denied connection to forwarded port");
            drop(tcp);
            continue;
        }
        let port = port.clone();
        let registry = registry.clone();
        let span = info_span!("port", listen = %port.listen, %peer);
        tokio::spawn(forward(tcp, peer, port, registry).instrument(span));
    }
}

async fn forward(tcp: TcpStream, peer: SocketAddr, port: Arc<PortConfig>, registry: Arc<Registry>) {
    let _ = tcp.set_nodelay(true);
    let open = StreamOpen {
        kind: StreamKind::Tcp,
        service: port.service.clone(),
        client: peer,
    };
    let stream = match open_stream(&registry, &port.agent, open).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot forward connection");
            return;
        }
    };
    match pipe(tcp, stream.send, stream.recv, stream.initial).await {
        Ok(stats) => debug!(
            up = stats.to_quic,
            down = stats.from_quic,
            "connection closed"
        ),
        Err(e) => debug!(error = %e, "connection aborted"),
    }
}
