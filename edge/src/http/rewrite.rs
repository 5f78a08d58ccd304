//! The headers a proxy owns: the request the service sees (origin-form URI,
//! HTTP/1.1, the edge's own forwarding headers) and the hop-by-hop headers
//! that cross in neither direction.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Uri;
use http::{Request, Version};
use http_body_util::Either;

use super::io::ClientBody;
use super::pool::UpstreamBody;
use super::route::RequestHost;
use crate::config::RouteConfig;

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

/// Client-supplied forwarding headers: only the edge sets these.
const FORWARDING: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
];

/// A WebSocket upgrade (RFC 6455): the only upgrade the edge forwards.
/// Any other `Upgrade` (h2c, TLS) is a hop-by-hop header like the rest and
/// is dropped, so the request goes on as a plain one.
pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let websocket = upgrades
        .next()
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"));
    websocket
        && upgrades.next().is_none()
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers, including those the Connection header names.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
pub(super) fn upstream_request(
    req: Request<ClientBody>,
    route: &RouteConfig,
    host: &RequestHost,
    client: SocketAddr,
    upgrade: bool,
) -> Result<Request<UpstreamBody>, &'static str> {
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
    // The edge answers `Expect: 100-continue` itself (hyper sends the 100
    // when the body is read); passed on, a service that answers early
    // without reading the body would leave it on a connection the pool
    // hands to the next request.
    h.remove(header::EXPECT);
    // The edge's own cookies never reach a service, on any route; what is
    // left goes as one line (HTTP/2 may send cookie crumbs, an HTTP/1.1
    // service expects one line, RFC 9113 8.2.3).
    crate::access::session::strip_cookie(h);
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
    // nginx's `proxy_set_header X-Real-IP $remote_addr`: the client as the
    // edge determined it (behind trusted proxies too); inbound copies were
    // dropped above with the other forwarding headers.
    h.insert("x-real-ip", value(ip.to_string())?);
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
    Ok(Request::from_parts(parts, Either::Left(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Only WebSocket: h2c and TLS upgrades are not forwarded.
        for other in ["h2c", "TLS/1.2", "websocket, h2c"] {
            h.insert(header::UPGRADE, HeaderValue::from_static(other));
            assert!(!is_upgrade(&h), "{other}");
        }
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
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
