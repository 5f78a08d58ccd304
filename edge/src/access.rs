//! Access control by client address: allow and deny CIDR lists.

use std::net::IpAddr;

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

#[cfg(test)]
mod tests {
    use super::*;

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
