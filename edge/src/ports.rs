//! `[[port]]`: raw TCP forwarding, frp-style. One QUIC stream per accepted
//! connection; the global and the port's allow/deny rules (reloadable) are
//! checked on the peer address before anything else happens.

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_proto::listener::{ConnPermit, Front};
use burrow_proto::pipe::pipe;
use burrow_proto::{StreamKind, StreamOpen};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::access::{Decision, IpRules};
use crate::config::PortConfig;
use crate::metrics::Metrics;
use crate::tunnel::{Registry, open_stream};

/// What a forwarded port needs besides its listener.
#[derive(Debug, Clone)]
pub struct PortContext {
    /// `[access]` rules, then the port's own.
    pub rules: watch::Receiver<(IpRules, IpRules)>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub tracker: TaskTracker,
}

/// Accepts connections on one forwarded port until `shutdown`; connections
/// already forwarded run on (tracked) until they end.
pub async fn serve_port(
    listener: TcpListener,
    port: PortConfig,
    ctx: PortContext,
    front: Arc<Front>,
    shutdown: CancellationToken,
) {
    let port = Arc::new(port);
    front
        .serve(listener, shutdown, |tcp, peer, permit| {
            let decision = {
                let rules = ctx.rules.borrow();
                rules.0.check(peer.ip()).and(rules.1.check(peer.ip()))
            };
            if let Decision::Deny(reason) = decision {
                info!(%peer, listen = %port.listen, ?reason, "denied connection to forwarded port");
                return;
            }
            let span = info_span!("port", listen = %port.listen, %peer);
            ctx.tracker
                .spawn(forward(tcp, peer, port.clone(), ctx.clone(), permit).instrument(span));
        })
        .await;
}

async fn forward(
    tcp: TcpStream,
    peer: SocketAddr,
    port: Arc<PortConfig>,
    ctx: PortContext,
    _permit: ConnPermit,
) {
    let _ = tcp.set_nodelay(true);
    let open = StreamOpen {
        kind: StreamKind::Tcp,
        service: port.service.clone(),
        client: peer,
    };
    let stream = match open_stream(&ctx.registry, &port.agent, open, &ctx.metrics).await {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot forward connection");
            return;
        }
    };
    let _open = stream.guard;
    match pipe(tcp, stream.send, stream.recv, stream.initial).await {
        Ok(stats) => {
            ctx.metrics.add_to_agents(stats.to_quic);
            ctx.metrics.add_from_agents(stats.from_quic);
            debug!(
                up = stats.to_quic,
                down = stats.from_quic,
                "connection closed"
            );
        }
        Err(e) => debug!(error = %e, "connection aborted"),
    }
}
