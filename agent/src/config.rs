//! agent.toml: the file model and the validated [`AgentConfig`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_proto::Name;
use burrow_proto::confkit::{ConfigError, HumanDuration, Source, Spanned, duration_or};
use burrow_proto::frame::MAX_SERVICES;
use burrow_proto::identity::Fingerprint;
use serde::Deserialize;

/// The UDP port magic packets go to when `broadcast` names none.
pub const DEFAULT_WAKE_PORT: u16 = 9;
/// Where magic packets go when `broadcast` is not set.
pub const DEFAULT_BROADCAST: &str = "255.255.255.255:9";
/// How often a service's readiness is probed when `probe_interval` is not set.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// The shortest `probe_interval` accepted: probes are cheap, not free.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    agent: AgentSection,
    #[serde(default)]
    service: Vec<Spanned<ServiceEntry>>,
    #[serde(default)]
    lan: Vec<Spanned<LanEntry>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    name: Spanned<String>,
    edge: Option<Spanned<String>>,
    /// Several edges (a cluster): one session to each.
    edges: Option<Spanned<Vec<Spanned<String>>>>,
    edge_key: Option<Fingerprint>,
    /// A CA certificate (PEM) to trust for the edge's public certificate,
    /// besides the usual web roots (a private CA, or Pebble in tests).
    edge_ca: Option<PathBuf>,
    key: PathBuf,
    /// Worker threads; the agent's one QUIC connection needs one.
    threads: Option<Spanned<usize>>,
    #[serde(default)]
    transport: TransportChoice,
}

/// Which transports the agent dials the edge with (`[agent] transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP to the same port when QUIC has no
    /// handshake within [`crate::tunnel::QUIC_HEAD_START`] or fails, and
    /// back to QUIC once a probe gets through.
    #[default]
    Auto,
    /// QUIC only (UDP).
    Quic,
    /// TLS over TCP only.
    Tcp,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEntry {
    name: Spanned<String>,
    url: Spanned<String>,
    health: Option<Spanned<String>>,
    probe_interval: Option<Spanned<HumanDuration>>,
    wake: Option<WakeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WakeEntry {
    mac: Spanned<String>,
    broadcast: Option<Spanned<String>>,
    /// SecureOn password: six hex pairs, written like a MAC.
    password: Option<Spanned<String>>,
    /// GET paths answered from the last good response while the machine
    /// sleeps, instead of waking it.
    cached: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LanEntry {
    listen: SocketAddr,
    service: Spanned<String>,
}

/// The most edges one agent keeps sessions with (`[agent] edges`).
pub const MAX_EDGES: usize = 16;

/// One edge the agent dials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdgeAddr {
    /// `host:port`: the edge's QUIC endpoint on UDP, its HTTPS listener on
    /// TCP (the fallback).
    pub addr: String,
    /// The host part, for TLS.
    pub host: String,
}

/// The validated agent configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub name: Name,
    /// Every edge the agent keeps a session with: `[agent] edge` alone, or
    /// `[agent] edges` in order.
    pub edges: Vec<EdgeAddr>,
    pub edge_key: Option<Fingerprint>,
    pub edge_ca: Option<PathBuf>,
    pub key_path: PathBuf,
    /// Worker threads for the runtime (read before it starts).
    pub threads: usize,
    pub transport: TransportChoice,
    pub services: Vec<ServiceConfig>,
    pub lan: Vec<LanConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// HTTP/2 without TLS (gRPC): the edge speaks it, the agent moves bytes.
    H2c,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: Name,
    pub scheme: Scheme,
    /// `host:port` to connect to.
    pub target: String,
    pub health: Option<String>,
    /// How often readiness is probed while the service is not waking.
    pub probe_interval: Duration,
    pub wake: Option<WakeConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeConfig {
    pub mac: [u8; 6],
    /// `host:port` magic packets are sent to.
    pub broadcast: String,
    pub password: Option<SecureOn>,
    /// GET paths answered from a cache of the last good response while
    /// the machine sleeps (see [`crate::cache`]); every other request wakes it.
    pub cached: Vec<String>,
}

/// A Wake-on-LAN SecureOn password. `Debug` does not show it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecureOn(pub [u8; 6]);

impl std::fmt::Debug for SecureOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecureOn(..)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LanConfig {
    pub listen: SocketAddr,
    pub service: Name,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let file: File = src.parse()?;
        convert(src, file)
    }
}

/// Splits `host:port` (IPv6 in brackets); the port is required unless a
/// default is given.
fn split_host_port(s: &str, default_port: Option<u16>) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return None,
            None => (s, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) => p.parse().ok()?,
        None => default_port?,
    };
    Some((host.to_owned(), port))
}

/// A magic packet destination, `host[:port]` with port 9 by default, as
/// `host:port` (IPv6 in brackets).
pub fn parse_broadcast(s: &str) -> Option<String> {
    let (host, port) = split_host_port(s, Some(DEFAULT_WAKE_PORT))?;
    Some(join_host_port(&host, port))
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

fn convert(src: &Source, file: File) -> Result<AgentConfig, ConfigError> {
    let a = &file.agent;
    let name = Name::new(a.name.get_ref().clone())
        .map_err(|e| src.error_at(a.name.span(), format!("agent.name: {e}")))?;
    let parse_edge = |v: &Spanned<String>, key: &str| {
        let (host, port) = split_host_port(v.get_ref(), None).ok_or_else(|| {
            src.error_at(
                v.span(),
                format!("{key}: write host:port, e.g. \"edge.example.com:443\""),
            )
        })?;
        Ok::<_, ConfigError>(EdgeAddr {
            addr: join_host_port(&host, port),
            host,
        })
    };
    let edges = match (&a.edge, &a.edges) {
        (Some(edge), None) => vec![parse_edge(edge, "agent.edge")?],
        (None, Some(list)) => {
            if list.get_ref().is_empty() {
                return Err(src.error_at(list.span(), "agent.edges: name at least one edge"));
            }
            if let Some(extra) = list.get_ref().get(MAX_EDGES) {
                return Err(src.error_at(
                    extra.span(),
                    format!("agent.edges: at most {MAX_EDGES} edges"),
                ));
            }
            let mut edges: Vec<EdgeAddr> = Vec::new();
            for (i, v) in list.get_ref().iter().enumerate() {
                let edge = parse_edge(v, &format!("agent.edges[{i}]"))?;
                if edges
                    .iter()
                    .any(|e| e.addr.eq_ignore_ascii_case(&edge.addr))
                {
                    return Err(src.error_at(
                        v.span(),
                        format!("agent.edges[{i}]: {} is listed twice", edge.addr),
                    ));
                }
                edges.push(edge);
            }
            edges
        }
        (Some(edge), Some(_)) => {
            return Err(src.error_at(edge.span(), "agent: write `edge` or `edges`, not both"));
        }
        (None, None) => {
            return Err(src.error("agent: `edge = \"host:port\"` (or `edges = [...]`) is missing"));
        }
    };
    let mut services = Vec::new();
    let mut names = HashSet::new();
    if let Some(extra) = file.service.get(MAX_SERVICES) {
        // The service list the agent announces holds at most this many.
        return Err(src.error_at(
            extra.span(),
            format!("service[{MAX_SERVICES}]: an agent has at most {MAX_SERVICES} services"),
        ));
    }
    for (i, entry) in file.service.iter().enumerate() {
        let s = entry.get_ref();
        let name = Name::new(s.name.get_ref().clone())
            .map_err(|e| src.error_at(s.name.span(), format!("service[{i}].name: {e}")))?;
        if !names.insert(name.clone()) {
            return Err(src.error_at(
                s.name.span(),
                format!("service[{i}].name: service {name} is listed twice"),
            ));
        }
        let url = s.url.get_ref();
        let bad_url = || {
            src.error_at(
                s.url.span(),
                format!("service[{i}].url: write http://host:port, h2c://host:port (gRPC) or tcp://host:port, got {url:?}"),
            )
        };
        let (scheme, rest, default_port) = if let Some(r) = url.strip_prefix("http://") {
            (Scheme::Http, r, Some(80))
        } else if let Some(r) = url.strip_prefix("h2c://") {
            (Scheme::H2c, r, None)
        } else if let Some(r) = url.strip_prefix("tcp://") {
            (Scheme::Tcp, r, None)
        } else {
            return Err(bad_url());
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') {
            return Err(src.error_at(
                s.url.span(),
                format!("service[{i}].url: a service URL has no path"),
            ));
        }
        let (host, port) = split_host_port(rest, default_port).ok_or_else(bad_url)?;
        let health = match &s.health {
            Some(h) if scheme != Scheme::Http => {
                return Err(src.error_at(
                    h.span(),
                    format!(
                        "service[{i}].health: tcp and h2c services are probed by connecting; remove health"
                    ),
                ));
            }
            Some(h) if !h.get_ref().starts_with('/') => {
                return Err(src.error_at(
                    h.span(),
                    format!("service[{i}].health: a path starting with '/'"),
                ));
            }
            h => h.as_ref().map(|h| h.get_ref().clone()),
        };
        let wake = match &s.wake {
            None => None,
            Some(w) => {
                let mac = parse_mac(w.mac.get_ref()).ok_or_else(|| {
                    src.error_at(
                        w.mac.span(),
                        format!(
                            "service[{i}].wake.mac: write six hex pairs, e.g. \"AA:BB:CC:DD:EE:FF\""
                        ),
                    )
                })?;
                let broadcast = match &w.broadcast {
                    None => DEFAULT_BROADCAST.to_owned(),
                    Some(b) => parse_broadcast(b.get_ref()).ok_or_else(|| {
                        src.error_at(b.span(), format!("service[{i}].wake.broadcast: write an address, e.g. \"192.168.1.255:9\""))
                    })?,
                };
                let password = match &w.password {
                    None => None,
                    Some(p) => Some(SecureOn(parse_mac(p.get_ref()).ok_or_else(|| {
                        src.error_at(
                            p.span(),
                            format!("service[{i}].wake.password: write six hex pairs, e.g. \"01:02:03:04:05:06\""),
                        )
                    })?)),
                };
                let mut cached = Vec::new();
                for (k, p) in w.cached.iter().flatten().enumerate() {
                    let path = p.get_ref();
                    if k >= crate::cache::MAX_CACHED_PATHS {
                        return Err(src.error_at(
                            p.span(),
                            format!(
                                "service[{i}].wake.cached: at most {} paths",
                                crate::cache::MAX_CACHED_PATHS
                            ),
                        ));
                    }
                    if !crate::cache::is_cacheable_path(path) {
                        return Err(src.error_at(
                            p.span(),
                            format!("service[{i}].wake.cached: {path:?} is not a path like \"/api/tags\" (no query, no spaces)"),
                        ));
                    }
                    if scheme != Scheme::Http {
                        return Err(src.error_at(
                            p.span(),
                            format!("service[{i}].wake.cached: only http:// services have cacheable answers"),
                        ));
                    }
                    cached.push(path.clone());
                }
                Some(WakeConfig {
                    mac,
                    broadcast,
                    password,
                    cached,
                })
            }
        };
        let probe_interval = duration_or(
            src,
            s.probe_interval.as_ref(),
            &format!("service[{i}].probe_interval"),
            MIN_PROBE_INTERVAL,
            DEFAULT_PROBE_INTERVAL,
        )?;
        services.push(ServiceConfig {
            name,
            scheme,
            target: join_host_port(&host, port),
            health,
            probe_interval,
            wake,
        });
    }

    let mut lan = Vec::new();
    for (i, entry) in file.lan.iter().enumerate() {
        let l = entry.get_ref();
        let service = Name::new(l.service.get_ref().clone())
            .map_err(|e| src.error_at(l.service.span(), format!("lan[{i}].service: {e}")))?;
        if !names.contains(&service) {
            return Err(src.error_at(
                l.service.span(),
                format!("lan[{i}].service: no [[service]] named {service}"),
            ));
        }
        lan.push(LanConfig {
            listen: l.listen,
            service,
        });
    }

    Ok(AgentConfig {
        name,
        edges,
        edge_key: a.edge_key,
        edge_ca: a.edge_ca.as_deref().map(|p| src.resolve(p)),
        key_path: src.resolve(&a.key),
        threads: burrow_proto::confkit::threads(src, a.threads.as_ref(), "agent.threads")?,
        transport: a.transport,
        services,
        lan,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::from_source(&Source::new("/etc/burrow/agent.toml", text))
    }

    const BASE: &str =
        "[agent]\nname = \"home\"\nedge = \"edge.example.com:443\"\nkey = \"agent.key\"\n";

    #[test]
    fn h2c_services_are_http2_and_probed_by_connecting() {
        let c = parse(&format!(
            "{BASE}\n[[service]]\nname = \"grpc\"\nurl = \"h2c://127.0.0.1:9000\"\n"
        ))
        .unwrap();
        assert_eq!(c.services[0].scheme, Scheme::H2c);
        let err = parse(&format!(
            "{BASE}\n[[service]]\nname = \"grpc\"\nurl = \"h2c://127.0.0.1:9000\"\nhealth = \"/x\"\n"
        ))
        .unwrap_err();
        assert!(err.message.contains("probed by connecting"), "{err}");
        let err = parse(&format!(
            "{BASE}\n[[service]]\nname = \"grpc\"\nurl = \"h2c://127.0.0.1\"\n"
        ))
        .unwrap_err();
        assert!(err.message.contains("h2c://host:port"), "{err}");
    }

    #[test]
    fn services_parse_with_defaults() {
        let c = parse(&format!(
            "{BASE}\n[[service]]\nname = \"webui\"\nurl = \"http://127.0.0.1\"\n\n[[service]]\nname = \"ssh\"\nurl = \"tcp://[::1]:22\"\n[service.wake]\nmac = \"aa-bb-cc-dd-ee-ff\"\n"
        ))
        .unwrap();
        assert_eq!(c.key_path, PathBuf::from("/etc/burrow/agent.key"));
        assert_eq!(c.edges[0].host, "edge.example.com");
        assert_eq!(c.services[0].target, "127.0.0.1:80");
        assert_eq!(c.services[1].target, "[::1]:22");
        assert_eq!(
            c.services[1].wake,
            Some(WakeConfig {
                mac: [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
                broadcast: "255.255.255.255:9".into(),
                password: None,
                cached: Vec::new(),
            })
        );
        assert_eq!(c.services[0].probe_interval, DEFAULT_PROBE_INTERVAL);
        assert_eq!(c.threads, 1);
        let err = parse(&format!("{BASE}threads = 1000\n")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/burrow/agent.toml:5:11: agent.threads: between 1 and 256"
        );
    }

    #[test]
    fn wake_keys_and_probe_interval() {
        let c = parse(&format!(
            "{BASE}\n[[service]]\nname = \"ollama\"\nurl = \"http://192.168.1.20:11434\"\nhealth = \"/api/version\"\nprobe_interval = \"30s\"\n[service.wake]\nmac = \"AA:BB:CC:DD:EE:FF\"\nbroadcast = \"192.168.1.255\"\npassword = \"01:02:03:04:05:06\"\n"
        ))
        .unwrap();
        let s = &c.services[0];
        assert_eq!(s.probe_interval, Duration::from_secs(30));
        let w = s.wake.as_ref().unwrap();
        assert_eq!(w.broadcast, "192.168.1.255:9");
        assert_eq!(w.password, Some(SecureOn([1, 2, 3, 4, 5, 6])));
        assert!(
            !format!("{w:?}").contains("01"),
            "the password stays out of Debug: {w:?}"
        );

        let err = parse(&format!(
            "{BASE}\n[[service]]\nname = \"x\"\nurl = \"tcp://a:1\"\n[service.wake]\nmac = \"AA:BB:CC:DD:EE:FF\"\npassword = \"secret\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.position, Some((11, 12)), "{err}");
        assert!(err.message.starts_with("service[0].wake.password"), "{err}");
        let err = parse(&format!(
            "{BASE}\n[[service]]\nname = \"x\"\nurl = \"tcp://a:1\"\nprobe_interval = \"1ms\"\n"
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/burrow/agent.toml:9:18: service[0].probe_interval: between 100ms and 7 days"
        );
        for huge in ["99999999999d", "8d"] {
            let err = parse(&format!(
                "{BASE}\n[[service]]\nname = \"x\"\nurl = \"tcp://a:1\"\nprobe_interval = \"{huge}\"\n"
            ))
            .unwrap_err();
            assert_eq!(err.position, Some((9, 18)), "{err}");
            assert!(err.message.ends_with("between 100ms and 7 days"), "{err}");
        }
        assert_eq!(parse_broadcast("[fe80::1]"), Some("[fe80::1]:9".into()));
        assert_eq!(parse_broadcast("10.0.0.255:7"), Some("10.0.0.255:7".into()));
        assert_eq!(parse_broadcast("nope:port"), None);
    }

    #[test]
    fn bad_values_point_at_them() {
        let err = parse(&format!(
            "{BASE}\n[[service]]\nname = \"x\"\nurl = \"https://a:1\"\n"
        ))
        .unwrap_err();
        assert_eq!(err.position, Some((8, 7)), "{err}");
        let err = parse("[agent]\nname = \"home\"\nedge = \"edge.example.com\"\nkey = \"k\"\n")
            .unwrap_err();
        assert!(err.to_string().contains(":3:8: agent.edge"), "{err}");
        let err = parse(&format!(
            "{BASE}\n[[lan]]\nlisten = \"127.0.0.1:0\"\nservice = \"nope\"\n"
        ))
        .unwrap_err();
        assert!(err.message.contains("no [[service]] named nope"), "{err}");
    }

    #[test]
    fn more_services_than_the_protocol_carries_is_an_error_at_the_first_extra() {
        let services = |n: usize| {
            (0..n)
                .map(|i| {
                    format!(
                        "[[service]]\nname = \"s{i}\"\nurl = \"tcp://a:{}\"\n",
                        i + 1
                    )
                })
                .collect::<String>()
        };
        let c = parse(&format!("{BASE}{}", services(MAX_SERVICES))).unwrap();
        assert_eq!(c.services.len(), MAX_SERVICES);
        let err = parse(&format!("{BASE}{}", services(MAX_SERVICES + 1))).unwrap_err();
        // BASE is 4 lines; each service 3; the first extra is entry 128.
        assert_eq!(err.position, Some((5 + 3 * MAX_SERVICES, 1)), "{err}");
        assert_eq!(
            err.message,
            format!("service[{MAX_SERVICES}]: an agent has at most {MAX_SERVICES} services")
        );
    }

    #[test]
    fn macs_and_host_ports() {
        assert_eq!(
            parse_mac("AA:BB:CC:DD:EE:0F"),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f])
        );
        assert_eq!(parse_mac("AA:BB:CC:DD:EE"), None);
        assert_eq!(parse_mac("AA:BB:CC:DD:EE:GG"), None);
        assert_eq!(split_host_port("a:1", None), Some(("a".into(), 1)));
        assert_eq!(split_host_port("[::1]", Some(9)), Some(("::1".into(), 9)));
        assert_eq!(split_host_port("::1:5", None), None);
        assert_eq!(split_host_port(":5", None), None);
    }

    #[test]
    fn edges_lists_several_edges_and_edge_stays_one() {
        let one =
            parse("[agent]\nname = \"home\"\nedge = \"a.example.com:443\"\nkey = \"k\"\n").unwrap();
        assert_eq!(one.edges.len(), 1);
        assert_eq!(one.edges[0].host, "a.example.com");
        let two = parse(
            "[agent]\nname = \"home\"\nedges = [\"a.example.com:443\", \"[2001:db8::1]:8443\"]\nkey = \"k\"\n",
        )
        .unwrap();
        assert_eq!(
            two.edges
                .iter()
                .map(|e| e.addr.as_str())
                .collect::<Vec<_>>(),
            ["a.example.com:443", "[2001:db8::1]:8443"]
        );
        for (text, message, at) in [
            (
                "edge = \"a.example.com:443\"\nedges = [\"b.example.com:443\"]",
                "agent: write `edge` or `edges`, not both",
                Some((3, 8)),
            ),
            (
                "edges = []",
                "agent.edges: name at least one edge",
                Some((3, 9)),
            ),
            (
                "edges = [\"a.example.com:443\", \"A.example.com:443\"]",
                "agent.edges[1]: A.example.com:443 is listed twice",
                Some((3, 31)),
            ),
            (
                "edges = [\"a.example.com\"]",
                "agent.edges[0]: write host:port",
                Some((3, 10)),
            ),
            (
                "",
                "agent: `edge = \"host:port\"` (or `edges = [...]`) is missing",
                None,
            ),
        ] {
            let err =
                parse(&format!("[agent]\nname = \"home\"\n{text}\nkey = \"k\"\n")).unwrap_err();
            assert!(err.message.starts_with(message), "{text}: {err}");
            assert_eq!(err.position, at, "{text}: {err}");
        }
    }
}
