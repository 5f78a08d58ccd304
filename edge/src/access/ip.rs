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

/// The address a request is judged by: the socket peer, unless the peer is
/// a trusted proxy; then the right-most address in X-Forwarded-For (or
/// Forwarded) that is not itself a trusted proxy. Headers from anyone else
/// are ignored, so they cannot be forged.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let peer_ip = peer.ip().to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer_ip) {
        return peer_ip;
    }
    // The standard header (RFC 7239) wins; X-Forwarded-For is read only
    // from proxies that send no Forwarded header at all.
    let mut hops: Vec<IpAddr> = Vec::new();
    if headers.contains_key("forwarded") {
        for v in headers.get_all("forwarded") {
            let Ok(v) = v.to_str() else { return peer_ip };
            for element in v.split(',') {
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
                        // An unparsable hop breaks the chain: trust
                        // nothing beyond it.
                        Err(_) => hops.clear(),
                    }
                }
            }
        }
    } else {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(v) = v.to_str() else { return peer_ip };
            for part in v.split(',') {
                match part.trim().parse::<IpAddr>() {
                    Ok(ip) => hops.push(ip.to_canonical()),
                    Err(_) => hops.clear(),
                }
            }
        }
    }
    hops.iter()
        .rev()
        .take(MAX_FORWARDED_HOPS)
        .find(|ip| !is_trusted(**ip))
        .copied()
        // Every hop trusted: the left-most one is the best we know.
        .or_else(|| hops.first().copied())
        .unwrap_or(peer_ip)
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
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = headers(&[("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.2")]);
        let untrusted_peer: SocketAddr = "198.51.100.1:5000".parse().unwrap();
        assert_eq!(
            client_ip(untrusted_peer, &xff, &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        // Right to left, skipping trusted hops: the forged 1.1.1.1 is not believed.
        assert_eq!(
            client_ip(proxy, &xff, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let fwd = headers(&[(
            "forwarded",
            "for=192.0.2.60;proto=http, for=\"[2001:db8::1]:443\"",
        )]);
        assert_eq!(
            client_ip(proxy, &fwd, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // With both, Forwarded wins: a proxy that sets it may pass a
        // client's X-Forwarded-For through untouched.
        let both = headers(&[
            ("x-forwarded-for", "1.1.1.1"),
            ("forwarded", "for=192.0.2.60"),
        ]);
        assert_eq!(
            client_ip(proxy, &both, &trusted),
            "192.0.2.60".parse::<IpAddr>().unwrap()
        );
        let junk = headers(&[("x-forwarded-for", "203.0.113.9, junk")]);
        assert_eq!(
            client_ip(proxy, &junk, &trusted),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:1".parse().unwrap();
        assert_eq!(
            client_ip(mapped, &headers(&[]), &trusted),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
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
