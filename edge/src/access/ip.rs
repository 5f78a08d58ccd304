//! Access control by client address: allow and deny CIDR lists, and which
//! address a request is judged by when trusted proxies stand in front.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

use burrow_proto::confkit::Cidr;

/// Allow and deny lists over client addresses. Deny wins; an empty allow
/// list allows everyone not denied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
}

/// The outcome of [`IpRules::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny(DenyReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyReason {
    /// The address is in this deny rule.
    Denied(Cidr),
    /// The allow list is not empty and the address is in none of it.
    NotAllowed,
}

impl Decision {
    /// Both decisions must allow; the first denial is kept.
    pub fn and(self, other: Decision) -> Decision {
        match self {
            Decision::Allow => other,
            deny => deny,
        }
    }
}

impl IpRules {
    pub fn check(&self, ip: IpAddr) -> Decision {
        if let Some(rule) = self.deny.iter().find(|c| c.contains(ip)) {
            return Decision::Deny(DenyReason::Denied(*rule));
        }
        if self.allow.is_empty() || self.allow.iter().any(|c| c.contains(ip)) {
            Decision::Allow
        } else {
            Decision::Deny(DenyReason::NotAllowed)
        }
    }
}

/// How many forwarding hops are looked at, at most.
pub const MAX_FORWARDED_HOPS: usize = 32;

/// The one header a trusted proxy's client address is read from
/// (`[access] client_ip_header`). Exactly one is read: a proxy appends to
/// the header it writes and passes every other header through as the
/// client sent it, so a second header would be the client's to choose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientIpHeader {
    /// `X-Forwarded-For`: nginx (`$proxy_add_x_forwarded_for`), HAProxy
    /// (`option forwardfor`), Caddy, Traefik, Cloudflare.
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239), for proxies that write only that.
    Forwarded,
}

impl ClientIpHeader {
    /// The header name as the config writes it (ASCII case ignored).
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.eq_ignore_ascii_case("x-forwarded-for") {
            Ok(Self::XForwardedFor)
        } else if s.eq_ignore_ascii_case("forwarded") {
            Ok(Self::Forwarded)
        } else {
            Err(format!(
                "{s:?}: write \"x-forwarded-for\" or \"forwarded\", the header your proxy writes"
            ))
        }
    }
}

/// The address a request is judged by: the socket peer, unless the peer is
/// a trusted proxy; then the right-most address in `header` that is not
/// itself a trusted proxy. The other forwarding header is never read, and
/// headers from untrusted peers are ignored, so neither can be forged.
/// When `header` is absent or names no usable hop, the proxy's own address.
pub fn client_ip(
    peer: SocketAddr,
    headers: &HeaderMap,
    trusted: &[Cidr],
    header: ClientIpHeader,
) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer_ip) {
        return peer_ip;
    }
    let hops = match header {
        ClientIpHeader::XForwardedFor => x_forwarded_for_hops(headers),
        ClientIpHeader::Forwarded => forwarded_hops(headers),
    };
    let Some(hops) = hops else { return peer_ip };
    hops.iter()
        .rev()
        .take(MAX_FORWARDED_HOPS)
        .find(|ip| !is_trusted(**ip))
        .copied()
        // Every hop trusted: the left-most one is the best we know.
        .or_else(|| hops.first().copied())
        .unwrap_or(peer_ip)
}

/// The `for=` addresses of every `Forwarded` element, left to right; only
/// those after the last unparsable one. `None` if a value is not text.
fn forwarded_hops(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut hops = Vec::new();
    for v in headers.get_all(http::header::FORWARDED) {
        for element in v.to_str().ok()?.split(',') {
            for pair in element.split(';') {
                let Some((k, val)) = pair.trim().split_once('=') else {
                    continue;
                };
                if !k.trim().eq_ignore_ascii_case("for") {
                    continue;
                }
                let val = val.trim().trim_matches('"');
                let val = val
                    .strip_prefix('[')
                    .map_or(val, |v| v.split(']').next().unwrap_or(v));
                let host = if val.matches(':').count() == 1 {
                    val.split(':').next().unwrap_or(val)
                } else {
                    val
                };
                match host.parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip.to_canonical()),
                    // An unparsable hop breaks the chain: trust nothing
                    // beyond it.
                    Err(_) => hops.clear(),
                }
            }
        }
    }
    Some(hops)
}

/// The addresses in every `X-Forwarded-For` line, left to right; only
/// those after the last unparsable one. `None` if a value is not text.
fn x_forwarded_for_hops(headers: &HeaderMap) -> Option<Vec<IpAddr>> {
    let mut hops = Vec::new();
    for v in headers.get_all("x-forwarded-for") {
        for part in v.to_str().ok()?.split(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip.to_canonical()),
                Err(_) => hops.clear(),
            }
        }
    }
    Some(hops)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        use ClientIpHeader::{Forwarded, XForwardedFor};
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.2")]);
        let untrusted_peer: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        for header in [XForwardedFor, Forwarded] {
            assert_eq!(
                client_ip(untrusted_peer, &xff, &trusted, header),
                ip("198.51.100.1")
            );
        }
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        // Right to left, skipping trusted hops: the forged 1.1.1.1 is not believed.
        assert_eq!(
            client_ip(proxy, &xff, &trusted, XForwardedFor),
            ip("203.0.113.9")
        );
        let fwd = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:443\"",
        )]);
        assert_eq!(
            client_ip(proxy, &fwd, &trusted, Forwarded),
            ip("2001:db8::1")
        );
        // A proxy that appends to X-Forwarded-For passes the client's own
        // Forwarded through untouched: by default it is never read...
        let both = headers(&[
            ("forwarded", "for=192.168.1.5"),
            ("x-forwarded-for", "203.0.113.9"),
        ]);
        assert_eq!(
            client_ip(proxy, &both, &trusted, XForwardedFor),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(proxy, &fwd, &trusted, XForwardedFor),
            ip("10.0.0.1"),
            "only a Forwarded header: the proxy's own address"
        );
        // ...and with "forwarded", a client's X-Forwarded-For is never read.
        let both = headers(&[
            ("x-forwarded-for", "192.168.1.5"),
            ("forwarded", "for=192.0.2.60"),
        ]);
        assert_eq!(
            client_ip(proxy, &both, &trusted, Forwarded),
            ip("192.0.2.60")
        );
        assert_eq!(
            client_ip(proxy, &xff, &trusted, Forwarded),
            ip("10.0.0.1"),
            "only X-Forwarded-For: the proxy's own address"
        );
        // An unparsable hop breaks the chain, in either header.
        let junk = headers(&[("x-forwarded-for", "203.0.113.9, junk")]);
        assert_eq!(
            client_ip(proxy, &junk, &trusted, XForwardedFor),
            ip("10.0.0.1")
        );
        let junk = headers(&[("forwarded", "for=203.0.113.9, for=_hidden")]);
        assert_eq!(client_ip(proxy, &junk, &trusted, Forwarded), ip("10.0.0.1"));
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(
            client_ip(mapped, &headers(&[]), &trusted, XForwardedFor),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn client_ip_header_names_parse() {
        assert_eq!(ClientIpHeader::default(), ClientIpHeader::XForwardedFor);
        for (text, header) in [
            ("x-forwarded-for", ClientIpHeader::XForwardedFor),
            ("X-Forwarded-For", ClientIpHeader::XForwardedFor),
            ("forwarded", ClientIpHeader::Forwarded),
            ("Forwarded", ClientIpHeader::Forwarded),
        ] {
            assert_eq!(ClientIpHeader::parse(text), Ok(header));
        }
        for bad in [
            "",
            "x-real-ip",
            "both",
            "x-forwarded-for,forwarded",
            " forwarded",
        ] {
            assert!(ClientIpHeader::parse(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn ip_rules_deny_wins_and_mapped_v4_matches() {
        let rules = IpRules {
            allow: vec![
                "10.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            deny: vec!["10.1.0.0/16".parse().unwrap()],
        };
        assert_eq!(rules.check("10.2.3.4".parse().unwrap()), Decision::Allow);
        assert_eq!(
            rules.check("::ffff:10.2.3.4".parse().unwrap()),
            Decision::Allow
        );
        assert_eq!(rules.check("2001:db8::1".parse().unwrap()), Decision::Allow);
        assert!(matches!(
            rules.check("10.1.2.3".parse().unwrap()),
            Decision::Deny(DenyReason::Denied(_))
        ));
        assert_eq!(
            rules.check("192.0.2.1".parse().unwrap()),
            Decision::Deny(DenyReason::NotAllowed)
        );
        assert_eq!(
            IpRules::default().check("192.0.2.1".parse().unwrap()),
            Decision::Allow
        );
        assert_eq!(
            "192.0.2.1".parse::<Cidr>().unwrap().to_string(),
            "192.0.2.1/32"
        );
    }
}
