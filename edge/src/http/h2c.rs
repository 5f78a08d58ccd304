//! Services that speak HTTP/2 without TLS (`url = "h2c://…"` in the
//! agent's config), which is what gRPC servers speak: the edge runs an
//! HTTP/2 client (prior knowledge) over the service's stream, so streamed
//! messages in both directions and trailers (`grpc-status`,
//! `grpc-message`) pass through as they come. The agent only moves bytes.
//!
//! Each request gets a stream and an HTTP/2 connection of its own; the
//! agent's connect to a local service costs well under a millisecond.

use std::net::SocketAddr;

use burrow_proto::{StreamKind, StreamOpen};
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, Version};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, warn};

use super::forward::{Unreachable, Waited, await_response, failed_to_respond, too_late};
use super::io::{IdleIo, LinkIo};
use super::pool::UpstreamBody;
use super::rewrite::strip_hop_by_hop;
use super::{Body, HttpState, refuse};
use crate::config::RouteConfig;
use crate::refusal::Refusal;
use crate::tunnel::{AgentLink, open_stream_on};

/// Sends `req` (rewritten for the service by `upstream_request`) to an
/// HTTP/2 service over a new stream; a held request's `turn` is kept until
/// its stream is open, as on the HTTP/1.1 path.
pub(super) async fn forward_h2c(
    mut req: Request<UpstreamBody>,
    upgrade: bool,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    link: &AgentLink,
    turn: Option<&crate::tunnel::registry::Ticket>,
) -> Result<Response<Body>, Unreachable> {
    if upgrade {
        warn!(host = %route.host, "a WebSocket upgrade for a service that speaks HTTP/2");
        return Ok(refuse::response(Refusal::BadGateway(
            "the service speaks HTTP/2 and takes no WebSocket upgrades",
        )));
    }
    let open = StreamOpen {
        kind: StreamKind::Http,
        service: route.service.clone(),
        client,
    };
    let stream = match open_stream_on(link, open, &state.metrics).await {
        Ok(s) => s,
        Err(error) => return Err(Unreachable { req, error }),
    };
    if let Some(ticket) = turn {
        ticket.connected();
    }
    let io = IdleIo::new(
        LinkIo::new(stream, state.metrics.clone()),
        route.idle_timeout,
    );
    let (mut sender, conn) = match hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, UpstreamBody>(TokioIo::new(io))
        .await
    {
        Ok(c) => c,
        Err(e) => {
            warn!(host = %route.host, error = %e, "HTTP/2 handshake with the service failed");
            return Ok(refuse::response(Refusal::BadGateway(
                "the service connection failed",
            )));
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "HTTP/2 service connection ended with an error");
        }
    });
    if let Err(why) = as_h2(&mut req) {
        return Ok(refuse::response(Refusal::BadRequest(why)));
    }
    let mut response = match await_response(sender.send_request(req), route).await {
        Ok(r) => r,
        Err(Waited::Late(t)) => return Ok(too_late(route, t)),
        Err(Waited::Failed(e)) => return Ok(failed_to_respond(route, &e)),
    };
    strip_hop_by_hop(response.headers_mut());
    Ok(response.map(|body| body.map_err(Into::into).boxed()))
}

/// Makes an HTTP/1.1-shaped upstream request an HTTP/2 one: the Host goes
/// into `:authority`, and `te: trailers` (the only TE HTTP/2 allows, and
/// what gRPC servers require) is said.
fn as_h2<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .ok_or("missing Host header")?;
    let authority = authority.to_str().map_err(|_| "invalid Host header")?;
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|_| "invalid Host header")?;
    *req.version_mut() = Version::HTTP_2;
    req.headers_mut()
        .insert(header::TE, HeaderValue::from_static("trailers"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_becomes_the_authority() {
        let mut req = Request::builder()
            .uri("/pkg.Svc/Call?x=1")
            .header(header::HOST, "grpc.test:443")
            .body(())
            .unwrap();
        as_h2(&mut req).unwrap();
        assert_eq!(req.uri(), "http://grpc.test:443/pkg.Svc/Call?x=1");
        assert_eq!(req.version(), Version::HTTP_2);
        assert!(req.headers().get(header::HOST).is_none());
        assert_eq!(req.headers()[header::TE], "trailers");
        let mut hostless = Request::builder().uri("/").body(()).unwrap();
        assert!(as_h2(&mut hostless).is_err());
    }
}
