//! Forwarding one HTTP request through the tunnel: choose the route by Host,
//! check the client address, rewrite the headers a proxy owns, send the
//! request over its own QUIC stream, and stream the response back chunk by
//! chunk (or splice an upgraded connection).

use std::net::SocketAddr;
use std::sync::Arc;

use burrow_proto::{StreamKind, StreamOpen, StreamStatus};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info, warn};

use super::io::{IdleIo, QuicIo};
use super::{Body, HttpState, error_response};
use crate::access::gate::Admission;
use crate::access::{Decision, client_ip};
use crate::config::{AuthMode, RouteConfig};
use crate::tunnel::{OpenError, open_stream};

/// Headers that describe one hop and never cross a proxy (RFC 9110 7.6.1),
/// plus the proxy credentials meant for us.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Buffer per direction for an upgraded connection (WebSocket). tokio's
/// default is 8 KiB each way, allocated and zeroed up front: 16 KiB of
/// resident memory per idle WebSocket. Chat messages are far smaller, and a
/// big message just takes a few more reads.
const UPGRADED_COPY_BUFFER: usize = 2 * 1024;

/// Client-supplied forwarding headers: only the edge sets these.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

pub async fn handle(
    req: Request<Incoming>,
    state: Arc<HttpState>,
    peer: SocketAddr,
) -> Response<Body> {
    // ACME validations bypass IP rules and auth; nothing else does.
    if let Some(answer) = super::acme_answer(&state.certs, req.uri().path()) {
        return answer;
    }
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(why) => {
            debug!(%peer, why, "bad request");
            return error_response(StatusCode::BAD_REQUEST, why);
        }
    };
    let Some(route) = state.route(&host.name) else {
        debug!(%peer, host = %host.name, "no route for host");
        return error_response(StatusCode::NOT_FOUND, "no such site here");
    };
    let ip = client_ip(peer, req.headers(), &state.trusted_proxies);
    if let Decision::Deny(reason) = state.access.check(ip).and(route.rules.check(ip)) {
        info!(%peer, client = %ip, host = %route.host, ?reason, "denied by ip rules");
        return error_response(StatusCode::FORBIDDEN, "forbidden");
    }
    let client = SocketAddr::new(ip, peer.port());
    let (req, set_cookie) = match (route.auth, &state.gate) {
        (AuthMode::None, _) => (req, None),
        (AuthMode::Basic, Some(gate)) => match gate.admit(req, route, ip).await {
            Admission::Forward {
                req, set_cookie, ..
            } => (req, set_cookie),
            Admission::Respond(r) => return r,
        },
        // Config validation guarantees users for basic routes; fail closed.
        (AuthMode::Basic, None) => {
            return error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "authentication unavailable",
            );
        }
    };
    let mut resp = forward(req, &state, route, &host, client).await;
    if let Some(cookie) = set_cookie {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    resp
}

/// The host a request is for, as written by the client and lowercased.
#[derive(Debug)]
struct RequestHost {
    /// Without port, lowercase: the routing key.
    name: String,
    /// As the client wrote it (host and port), for the forwarded Host header.
    authority: String,
}

fn request_host<B>(req: &Request<B>) -> Result<RequestHost, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    // HTTP/2 (and HTTP/1.1 absolute-form) carry the authority in the URI.
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => {
            let value = header.ok_or("missing Host header")?;
            value
                .to_str()
                .ok()
                .and_then(|s| s.parse::<Authority>().ok())
                .ok_or("invalid Host header")?
        }
    };
    if authority.as_str().contains('@') {
        return Err("invalid Host header");
    }
    Ok(RequestHost {
        name: authority.host().trim_end_matches('.').to_ascii_lowercase(),
        authority: authority.as_str().to_owned(),
    })
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("\"[{v6}]\""),
    }
}

/// Builds the request the service sees: origin-form URI, HTTP/1.1, our
/// forwarding headers, no hop-by-hop headers (an upgrade's own are kept).
fn upstream_request(
    req: Request<Incoming>,
    route: &RouteConfig,
    host: &RequestHost,
    client: SocketAddr,
    upgrade: bool,
) -> Result<Request<Incoming>, &'static str> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = path.parse::<Uri>().map_err(|_| "invalid request target")?;
    parts.version = Version::HTTP_11;

    let h = &mut parts.headers;
    let upgrade_value = upgrade.then(|| h.get(header::UPGRADE).cloned()).flatten();
    strip_hop_by_hop(h);
    for name in FORWARDING {
        h.remove(*name);
    }
    if let Some(v) = upgrade_value {
        h.insert(header::UPGRADE, v);
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let host_value = route.host_header.as_deref().unwrap_or(&host.authority);
    h.insert(
        header::HOST,
        HeaderValue::from_str(host_value).map_err(|_| "invalid Host header")?,
    );
    let ip = client.ip().to_canonical();
    let value = |s: String| HeaderValue::from_str(&s).map_err(|_| "invalid Host header");
    h.insert("x-forwarded-for", value(ip.to_string())?);
    h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    h.insert("x-forwarded-host", value(host.authority.clone())?);
    h.insert(
        "forwarded",
        value(format!(
            "for={};proto=https;host=\"{}\"",
            forwarded_for(ip),
            host.authority
        ))?,
    );
    Ok(Request::from_parts(parts, body))
}

/// One place that turns tunnel failures into statuses. Bodies stay short
/// and generic; the details go to the log.
fn open_error_status(e: &OpenError) -> (StatusCode, &'static str) {
    match e {
        OpenError::AgentOffline(_) => (StatusCode::BAD_GATEWAY, "the home server is offline"),
        OpenError::ReplyTimeout => (
            StatusCode::GATEWAY_TIMEOUT,
            "the home server did not answer",
        ),
        OpenError::Service {
            status: StreamStatus::TimedOut,
            ..
        } => (StatusCode::GATEWAY_TIMEOUT, "the service did not answer"),
        OpenError::Service { .. } => (StatusCode::BAD_GATEWAY, "the service is not reachable"),
        OpenError::Lost(_) | OpenError::BadReply(_) => {
            (StatusCode::BAD_GATEWAY, "the home server connection failed")
        }
    }
}

async fn forward(
    mut req: Request<Incoming>,
    state: &HttpState,
    route: &RouteConfig,
    host: &RequestHost,
    client: SocketAddr,
) -> Response<Body> {
    let upgrade = req.version() == Version::HTTP_11 && is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let up_req = match upstream_request(req, route, host, client, upgrade) {
        Ok(r) => r,
        Err(why) => return error_response(StatusCode::BAD_REQUEST, why),
    };

    let open = StreamOpen {
        kind: if upgrade {
            StreamKind::WebSocket
        } else {
            StreamKind::Http
        },
        service: route.service.clone(),
        client,
    };
    let stream = match open_stream(&state.registry, &route.agent, open).await {
        Ok(s) => s,
        Err(e) => {
            let (status, body) = open_error_status(&e);
            warn!(host = %route.host, agent = %route.agent, service = %route.service, error = %e, "cannot reach service");
            return error_response(status, body);
        }
    };
    let io = IdleIo::new(
        QuicIo::new(stream.send, stream.recv, stream.initial),
        route.idle_timeout,
    );
    let (mut sender, conn) = match hyper::client::conn::http1::Builder::new()
        .handshake::<_, Incoming>(TokioIo::new(io))
        .await
    {
        Ok(pair) => pair,
        Err(e) => {
            warn!(error = %e, "upstream handshake failed");
            return error_response(StatusCode::BAD_GATEWAY, "the service connection failed");
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            debug!(error = %e, "upstream connection ended with an error");
        }
    });

    let sent = sender.send_request(up_req);
    let response = match route.response_timeout {
        Some(t) => match tokio::time::timeout(t, sent).await {
            Ok(r) => r,
            Err(_) => {
                warn!(host = %route.host, timeout = ?t, "service sent no response headers in time");
                return error_response(
                    StatusCode::GATEWAY_TIMEOUT,
                    "the service did not answer in time",
                );
            }
        },
        None => sent.await,
    };
    let mut response = match response {
        Ok(r) => r,
        Err(e) => {
            warn!(host = %route.host, error = %e, "service failed before responding");
            return error_response(StatusCode::BAD_GATEWAY, "the service failed to respond");
        }
    };

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            warn!(host = %route.host, "service switched protocols without an upgrade request");
            return error_response(StatusCode::BAD_GATEWAY, "the service failed to respond");
        };
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        tokio::spawn(async move {
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
        return Response::from_parts(parts, super::empty_body());
    }

    strip_hop_by_hop(response.headers_mut());
    response.map(|body| body.map_err(Into::into).boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_comes_from_the_authority_or_the_single_host_header() {
        let h = request_host(&req("/", &["Chat.Example.com:8443"])).unwrap();
        assert_eq!(
            (h.name.as_str(), h.authority.as_str()),
            ("chat.example.com", "Chat.Example.com:8443")
        );
        let h = request_host(&req("https://chat.example.com/x", &[])).unwrap();
        assert_eq!(h.name, "chat.example.com");
        assert!(request_host(&req("/", &["a.example", "b.example"])).is_err());
        assert!(request_host(&req("/", &[])).is_err());
        assert!(request_host(&req("/", &["user@a.example"])).is_err());
        assert!(request_host(&req("/", &["a b"])).is_err());
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h[header::AUTHORIZATION], "Bearer xyz");
    }

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
    }

    #[test]
    fn forwarded_quotes_ipv6() {
        assert_eq!(forwarded_for("192.0.2.1".parse().unwrap()), "192.0.2.1");
        assert_eq!(
            forwarded_for("2001:db8::1".parse().unwrap()),
            "\"[2001:db8::1]\""
        );
    }
}
