//! Upgraded connections (WebSocket): the upgrade request goes over a stream
//! of its own, and once the service switches protocols the client's and the
//! service's connections are spliced.

use std::net::SocketAddr;

use burrow_proto::StreamKind;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedMutexGuard;
use tracing::debug;

use super::forward::{
    Unreachable, Waited, await_response, connect, connection_failed, failed_to_respond, too_late,
};
use super::pool::UpstreamBody;
use super::rewrite::strip_hop_by_hop;
use super::{Body, HttpState};
use crate::config::RouteConfig;
use crate::tunnel::AgentLink;

/// Buffer per direction for an upgraded connection (WebSocket). tokio's
/// default is 8 KiB each way, allocated and zeroed up front: 16 KiB of
/// resident memory per idle WebSocket. Chat messages are far smaller, and a
/// big message just takes a few more reads.
const UPGRADED_COPY_BUFFER: usize = 2 * 1024;

/// Forwards an upgrade request (WebSocket) over a stream of its own and,
/// once the service switches protocols, splices the two connections.
pub(super) async fn forward_upgrade(
    mut req: Request<UpstreamBody>,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    link: &AgentLink,
    turn: Option<OwnedMutexGuard<()>>,
) -> Result<Response<Body>, Unreachable> {
    let connected = connect(link, StreamKind::WebSocket, state, route, client).await;
    drop(turn);
    let mut sender = match connected {
        Ok(Some(sender)) => sender,
        Ok(None) => return Ok(connection_failed()),
        Err(error) => return Err(Unreachable { req, error }),
    };
    let client_upgrade = hyper::upgrade::on(&mut req);
    let ticket = req.extensions().get::<super::StreamTicket>().cloned();
    let mut response = match await_response(sender.send_request(req), route).await {
        Ok(r) => r,
        Err(Waited::Late(t)) => return Ok(too_late(route, t)),
        Err(Waited::Failed(e)) => return Ok(failed_to_respond(route, &e)),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused upgrade: an ordinary response; the stream is not reused.
        strip_hop_by_hop(response.headers_mut());
        return Ok(response.map(|body| body.map_err(Into::into).boxed()));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    state.tracker.spawn(async move {
        let _ticket = ticket;
        match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok((c, u)) => {
                let mut c = TokioIo::new(c);
                let mut u = TokioIo::new(u);
                match tokio::io::copy_bidirectional_with_sizes(
                    &mut c,
                    &mut u,
                    UPGRADED_COPY_BUFFER,
                    UPGRADED_COPY_BUFFER,
                )
                .await
                {
                    Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                    Err(e) => debug!(error = %e, "upgraded connection aborted"),
                }
            }
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, super::empty_body()))
}
