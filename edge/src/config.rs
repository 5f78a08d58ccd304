//! edge.toml: the file model (serde, unknown keys rejected) and its
//! conversion into the validated [`EdgeConfig`] the server runs on.
//!
//! Every value error points at its line and column; every cross-field error
//! names the key path (`route[2].agent`) and points at the entry.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burrow_proto::Name;
use burrow_proto::confkit::{
    Cidr, ConfigError, HumanDuration, NONZERO, Source, Spanned, duration, duration_or,
};
use burrow_proto::identity::Fingerprint;
use burrow_proto::listener::Limits;
use serde::Deserialize;

use crate::access::auth::PasswordHash;
use crate::access::pattern::PublicPath;
use crate::access::{ClientIpHeader, IpRules};

/// Where the edge listens by default.
pub const DEFAULT_HTTPS: &str = "0.0.0.0:443";
pub const DEFAULT_TUNNEL: &str = "0.0.0.0:443";
/// How long a client may take for its TLS handshake and each request head.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long open streams may finish after SIGTERM, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
/// How long held requests wait for a waking service by default.
pub const DEFAULT_WAKE_HOLD: Duration = Duration::from_secs(180);
/// Open connections per listener, all clients together, by default.
pub const DEFAULT_CONNECTIONS: usize = 10_000;
/// Open connections per client address (IPv6: per /64) and listener, by
/// default. A household behind one NAT with a few browsers and apps open
/// uses a few dozen.
pub const DEFAULT_CONNECTIONS_PER_IP: usize = 256;
/// How long a connection may sit with no request in flight (HTTP/1.1
/// keep-alive, HTTP/2 with no open stream, TLS that never says anything)
/// before the edge closes it, by default. nginx's keepalive_timeout is 75 s.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Concurrent HTTP/2 streams per client connection, by default.
pub const DEFAULT_STREAMS_PER_CONNECTION: u32 = 256;
/// Requests in flight per client address across its connections, by
/// default (WebSockets count until they close). A browser opens at most
/// six HTTP/1.1 connections per site and keeps few HTTP/2 streams busy;
/// 100 is HTTP/2's customary stream limit. Each stalled stream can hold
/// 2 MiB of an agent link's 256 MiB window: 100 cannot stall the link.
pub const DEFAULT_STREAMS_PER_IP: usize = 100;
/// Requests one client address may have held while a service wakes, by default.
pub const DEFAULT_HELD_PER_CLIENT: usize = 32;
/// Requests held per service while it wakes, all clients together, by default.
pub const DEFAULT_HELD_PER_SERVICE: usize = 512;
pub use burrow_proto::confkit::MAX_CONFIG_DURATION;
/// The longest `[edge] agent_wait`.
pub const MAX_AGENT_WAIT: Duration = Duration::from_secs(600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    edge: EdgeSection,
    tls: Option<TlsSection>,
    access: Option<AccessSection>,
    #[serde(default)]
    agent: Vec<Spanned<AgentEntry>>,
    #[serde(default)]
    user: Vec<Spanned<UserEntry>>,
    #[serde(default)]
    api_key: Vec<Spanned<ApiKeyEntry>>,
    #[serde(default)]
    route: Vec<Spanned<RouteEntry>>,
    #[serde(default)]
    port: Vec<Spanned<PortEntry>>,
    limits: Option<LimitsSection>,
    cluster: Option<ClusterSection>,
}

/// `[cluster]`: several edges sharing state through Redis.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    redis: Spanned<String>,
    redis_password_file: Option<PathBuf>,
    secret_file: Option<PathBuf>,
}

/// `[limits]`: what one client may hold open. Each refusal is counted in
/// `/metrics`.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    connections: Option<Spanned<usize>>,
    connections_per_ip: Option<Spanned<usize>>,
    idle_timeout: Option<Spanned<HumanDuration>>,
    streams_per_connection: Option<Spanned<u32>>,
    streams_per_ip: Option<Spanned<usize>>,
    held_per_client: Option<Spanned<usize>>,
    held_per_service: Option<Spanned<usize>>,
    /// The default request rate limit of routes that set none.
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<u32>>,
    rate_key: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EdgeSection {
    state_dir: PathBuf,
    key: Option<PathBuf>,
    https: Option<SocketAddr>,
    http: Option<SocketAddr>,
    tunnel: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    /// How long a client may take for its TLS handshake and request head.
    header_timeout: Option<Spanned<HumanDuration>>,
    /// The edge's own DNS name: with ACME it gets a certificate too, which
    /// the tunnel presents so agents can check the edge by name.
    hostname: Option<Spanned<String>>,
    /// How long open streams may run on after SIGTERM.
    grace: Option<Spanned<HumanDuration>>,
    /// How long a request whose agent is away waits for it.
    agent_wait: Option<Spanned<HumanDuration>>,
    /// Worker threads; more than one only pays with many busy clients.
    threads: Option<Spanned<usize>>,
    /// Serve HTTP/3 on the tunnel's UDP port (ALPN `h3`) beside agents.
    http3: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum TlsModeName {
    Acme,
    SelfSigned,
    Files,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    mode: Spanned<TlsModeName>,
    email: Option<String>,
    directory: Option<String>,
    directory_ca: Option<PathBuf>,
    /// First retry delay after a failed order; doubles up to a day.
    retry_min: Option<Spanned<HumanDuration>>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AccessSection {
    #[serde(default)]
    allow: Vec<Cidr>,
    #[serde(default)]
    deny: Vec<Cidr>,
    #[serde(default)]
    trusted_proxies: Vec<Cidr>,
    /// The one header the trusted proxies write: "x-forwarded-for" or
    /// "forwarded".
    client_ip_header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentEntry {
    name: Spanned<String>,
    key: Spanned<Fingerprint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UserEntry {
    name: Spanned<String>,
    password: Spanned<String>,
}

/// `[[api_key]]`: a key for `Authorization: Bearer`, from `burrow keygen-api`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    name: Spanned<String>,
    hash: Spanned<String>,
    /// The key's own rate limit, on every route that takes it.
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Basic,
    None,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteEntry {
    host: Spanned<String>,
    agent: Spanned<String>,
    service: Spanned<String>,
    auth: Option<AuthMode>,
    #[serde(default)]
    users: Vec<Spanned<String>>,
    /// `[[api_key]]` names taken as `Authorization: Bearer` on this route.
    #[serde(default)]
    api_keys: Vec<Spanned<String>>,
    #[serde(default)]
    allow: Vec<Cidr>,
    #[serde(default)]
    deny: Vec<Cidr>,
    #[serde(default)]
    public_paths: Vec<Spanned<String>>,
    /// Replaces the Host header sent to the service (Ollama checks it).
    host_header: Option<Spanned<String>>,
    /// Ends a request's stream when no byte moved either way for this long.
    idle_timeout: Option<Spanned<HumanDuration>>,
    /// Answers 504 when the service sends no response headers for this long.
    response_timeout: Option<Spanned<HumanDuration>>,
    /// Requests per second or minute ("10/s", "600/m"), with `burst`.
    rate: Option<Spanned<String>>,
    burst: Option<Spanned<u32>>,
    rate_key: Option<Spanned<String>>,
    /// The largest request body ("10MiB"); 413 beyond it.
    max_body: Option<Spanned<String>>,
    wake: Option<WakeEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WakeEntry {
    /// Zero is allowed: waking requests get 503 at once.
    hold: Option<Spanned<HumanDuration>>,
    page: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortEntry {
    listen: SocketAddr,
    agent: Spanned<String>,
    service: Spanned<String>,
    #[serde(default)]
    allow: Vec<Cidr>,
    #[serde(default)]
    deny: Vec<Cidr>,
}

/// The validated edge configuration.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub state_dir: PathBuf,
    pub key_path: PathBuf,
    /// The HTTPS listener; `None` when no route needs one.
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub tunnel: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub header_timeout: Duration,
    pub hostname: Option<String>,
    pub grace: Duration,
    /// How long a request whose agent is away waits for it, then 502.
    pub agent_wait: Duration,
    /// Worker threads for the runtime (read before it starts).
    pub threads: usize,
    /// Serve HTTP/3 on the tunnel's UDP port, and say so with Alt-Svc.
    pub http3: bool,
    pub tls: TlsConfig,
    pub access: AccessConfig,
    pub agents: Vec<AgentConfig>,
    pub users: Vec<UserConfig>,
    pub api_keys: Vec<ApiKeyConfig>,
    pub routes: Vec<RouteConfig>,
    pub ports: Vec<PortConfig>,
    pub limits: LimitsConfig,
    /// `[cluster]`, when several edges share state through Redis.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]` validated: the URL parses; the files are read at start.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://`, `rediss://` (TLS) or `redis+unix://`.
    pub redis: String,
    pub redis_password_file: Option<PathBuf>,
    /// Encrypts what is sealed in Redis; the same file on every edge.
    pub secret_file: PathBuf,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("ClusterConfig")
            .field("redis_password_file", &self.redis_password_file)
            .field("secret_file", &self.secret_file)
            .finish_non_exhaustive()
    }
}

/// `[limits]` with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsConfig {
    pub connections: usize,
    pub connections_per_ip: usize,
    pub idle_timeout: Duration,
    pub streams_per_connection: u32,
    pub streams_per_ip: usize,
    pub held_per_client: usize,
    pub held_per_service: usize,
    /// The rate limit of routes that set none.
    pub rate: Option<RateLimit>,
}

impl LimitsConfig {
    /// The connection caps of each public listener.
    pub fn connections(&self) -> Limits {
        Limits {
            total: self.connections,
            per_ip: self.connections_per_ip,
        }
    }

    /// These limits with the held-request caps (which a reload applies)
    /// set to their defaults: what a change of needs a restart.
    pub fn without_hold_caps(&self) -> Self {
        let d = Self::default();
        Self {
            held_per_client: d.held_per_client,
            held_per_service: d.held_per_service,
            ..*self
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections: DEFAULT_CONNECTIONS,
            connections_per_ip: DEFAULT_CONNECTIONS_PER_IP,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            streams_per_connection: DEFAULT_STREAMS_PER_CONNECTION,
            streams_per_ip: DEFAULT_STREAMS_PER_IP,
            held_per_client: DEFAULT_HELD_PER_CLIENT,
            held_per_service: DEFAULT_HELD_PER_SERVICE,
            rate: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsConfig {
    SelfSigned,
    Files { cert: PathBuf, key: PathBuf },
    Acme(AcmeConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub email: String,
    pub directory: String,
    pub directory_ca: Option<PathBuf>,
    pub retry_min: Duration,
}

/// The first retry after a failed order, by default.
pub const DEFAULT_ACME_RETRY: Duration = Duration::from_secs(60);

/// Let's Encrypt's production and staging directories.
pub const LETS_ENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    pub rules: IpRules,
    pub trusted_proxies: Vec<Cidr>,
    /// Read only from `trusted_proxies`; X-Forwarded-For by default.
    pub client_ip_header: ClientIpHeader,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub name: Name,
    pub key: Fingerprint,
}

/// A user and their argon2id hash. `Debug` leaves the hash out.
#[derive(Clone)]
pub struct UserConfig {
    pub name: String,
    pub password_hash: PasswordHash,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// An API key's name and the argon2id hash of the key (`PasswordHash`'s
/// `Debug` leaves it out).
#[derive(Debug, Clone)]
pub struct ApiKeyConfig {
    pub name: Name,
    pub hash: PasswordHash,
    /// The key's own request rate limit, across the routes that take it.
    pub rate: Option<RateLimit>,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Lowercase, without port.
    pub host: String,
    pub agent: Name,
    pub service: Name,
    pub auth: AuthMode,
    pub users: Vec<String>,
    /// The `[[api_key]]`s taken as `Authorization: Bearer` (basic routes only).
    pub api_keys: Vec<Name>,
    pub rules: IpRules,
    pub public_paths: Vec<PublicPath>,
    pub host_header: Option<HostHeader>,
    pub idle_timeout: Option<Duration>,
    pub response_timeout: Option<Duration>,
    /// The request rate limit (the route's own, or `[limits]`'s).
    pub rate: Option<RateLimit>,
    /// The largest request body, in bytes.
    pub max_body: Option<u64>,
    pub wake: WakeConfig,
}

/// A request rate limit: one request per `interval` on average, `burst`
/// more at once (nginx's `limit_req ... burst=N nodelay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub interval: Duration,
    pub burst: u32,
    pub key: RateKey,
}

/// What a rate limit counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    /// The client address (IPv6 per /64).
    Client,
    /// The signed-in user (the client address for requests without one).
    User,
    /// The API key (the client address for requests without one).
    ApiKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeConfig {
    pub hold: Duration,
    pub page: bool,
}

#[derive(Debug, Clone)]
pub struct PortConfig {
    pub listen: SocketAddr,
    pub agent: Name,
    pub service: Name,
    pub rules: IpRules,
}

impl EdgeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::from_source(&Source::read(path)?)
    }

    pub fn from_source(src: &Source) -> Result<Self, ConfigError> {
        let file: File = src.parse()?;
        convert(src, file)
    }
}

fn name_at(src: &Source, value: &Spanned<String>, key: &str) -> Result<Name, ConfigError> {
    Name::new(value.get_ref().clone())
        .map_err(|e| src.error_at(value.span(), format!("{key}: {e}")))
}

/// A host name a route (or `edge.hostname`) answers for: ASCII, lowercase,
/// without port. Internationalised names are written in punycode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Hostname(String);

impl Hostname {
    pub fn parse(s: &str) -> Result<Self, String> {
        let name = s.to_ascii_lowercase();
        if name.starts_with("*.") {
            return Err(format!(
                "{s:?}: wildcards are not supported; give each host its own route"
            ));
        }
        if !name.is_ascii() {
            return Err(format!(
                "{s:?} is not ASCII; write an internationalised name in punycode (xn--...)"
            ));
        }
        if name.contains(':') {
            return Err(format!("{s:?}: a host name without port"));
        }
        if !valid_hostname(&name) {
            return Err(format!(
                "{s:?} is not a host name (dot-separated labels of letters, digits and '-')"
            ));
        }
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// A route's `host_header`: the Host the service is sent instead of the
/// client's. `host` or `host:port` (IPv6 in brackets), no userinfo, usable
/// as a header value; checked at load so no request fails on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostHeader(String);

impl HostHeader {
    pub fn parse(s: &str) -> Result<Self, String> {
        const FORM: &str = "write host or host:port, e.g. \"localhost:11434\"";
        if s.is_empty() {
            return Err(format!("empty; {FORM}"));
        }
        if http::HeaderValue::from_str(s).is_err() || s.chars().any(char::is_whitespace) {
            return Err(format!("{s:?} has spaces or control characters; {FORM}"));
        }
        if s.contains('@') {
            return Err(format!("{s:?} has userinfo ('@'); {FORM}"));
        }
        let authority: http::uri::Authority = s
            .parse()
            .map_err(|_| format!("{s:?} is not a host[:port]; {FORM}"))?;
        let host = authority.host();
        let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => {
                host.parse::<std::net::Ipv4Addr>().is_ok()
                    || valid_hostname(&host.to_ascii_lowercase())
            }
        };
        if !host_ok {
            return Err(format!(
                "{s:?}: {host:?} is not a host name or address; {FORM}"
            ));
        }
        let port_ok = match s.strip_prefix(host) {
            Some("") => true,
            Some(p) => p
                .strip_prefix(':')
                .and_then(|p| p.parse::<u16>().ok())
                .is_some_and(|p| p != 0),
            None => false,
        };
        if !port_ok {
            return Err(format!("{s:?}: the port must be 1 to 65535; {FORM}"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Reads as the header's text (the proxy builds the Host header from it).
impl std::ops::Deref for HostHeader {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Lowercase host names of 1 to 253 bytes, dot-separated labels of
/// letters, digits and `-`; a leading `*.` is not supported.
fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn convert(src: &Source, file: File) -> Result<EdgeConfig, ConfigError> {
    let state_dir = src.resolve(&file.edge.state_dir);
    let key_path = file
        .edge
        .key
        .as_deref()
        .map_or_else(|| state_dir.join("edge.key"), |p| src.resolve(p));

    let tls = match file.tls {
        None => TlsConfig::SelfSigned,
        Some(t) => match *t.mode.get_ref() {
            TlsModeName::SelfSigned => TlsConfig::SelfSigned,
            TlsModeName::Files => match (t.cert, t.key) {
                (Some(cert), Some(key)) => TlsConfig::Files {
                    cert: src.resolve(&cert),
                    key: src.resolve(&key),
                },
                _ => {
                    return Err(src.error_at(
                        t.mode.span(),
                        "tls: mode = \"files\" needs both cert and key",
                    ));
                }
            },
            TlsModeName::Acme => {
                let Some(email) = t.email else {
                    return Err(src.error_at(t.mode.span(), "tls: mode = \"acme\" needs email"));
                };
                let directory = match t.directory.as_deref() {
                    None => LETS_ENCRYPT.to_owned(),
                    Some("staging") => LETS_ENCRYPT_STAGING.to_owned(),
                    Some(d) => d.to_owned(),
                };
                TlsConfig::Acme(AcmeConfig {
                    email,
                    directory,
                    directory_ca: t.directory_ca.map(|p| src.resolve(&p)),
                    retry_min: duration_or(
                        src,
                        t.retry_min.as_ref(),
                        "tls.retry_min",
                        NONZERO,
                        DEFAULT_ACME_RETRY,
                    )?,
                })
            }
        },
    };

    let cluster = match file.cluster {
        None => None,
        Some(c) => Some(convert_cluster(src, c)?),
    };

    let access = file.access.unwrap_or_default();
    let client_ip_header = match &access.client_ip_header {
        None => ClientIpHeader::default(),
        Some(h) => ClientIpHeader::parse(h.get_ref())
            .map_err(|e| src.error_at(h.span(), format!("access.client_ip_header: {e}")))?,
    };
    let access = AccessConfig {
        rules: IpRules {
            allow: access.allow,
            deny: access.deny,
        },
        trusted_proxies: access.trusted_proxies,
        client_ip_header,
    };

    let mut agents = Vec::new();
    let mut agent_names = HashSet::new();
    let mut agent_keys = HashMap::new();
    for (i, entry) in file.agent.iter().enumerate() {
        let a = entry.get_ref();
        let name = name_at(src, &a.name, &format!("agent[{i}].name"))?;
        if !agent_names.insert(name.clone()) {
            return Err(src.error_at(
                a.name.span(),
                format!("agent[{i}].name: agent {name} is listed twice"),
            ));
        }
        if let Some(other) = agent_keys.insert(*a.key.get_ref(), name.clone()) {
            return Err(src.error_at(
                a.key.span(),
                format!("agent[{i}].key: the same key is already listed for agent {other}"),
            ));
        }
        agents.push(AgentConfig {
            name,
            key: *a.key.get_ref(),
        });
    }

    let mut users = Vec::new();
    let mut user_names = HashSet::new();
    let mut user_names_folded = HashSet::new();
    for (i, entry) in file.user.iter().enumerate() {
        let u = entry.get_ref();
        let name = u.name.get_ref().clone();
        if name.is_empty() || name.contains(':') || name.chars().any(char::is_control) {
            return Err(src.error_at(
                u.name.span(),
                format!("user[{i}].name: must be non-empty, without ':' or control characters"),
            ));
        }
        // Names sign in ignoring case (a phone keyboard capitalises the
        // first letter), so two that differ only in case are one.
        if !user_names.insert(name.clone()) || !user_names_folded.insert(name.to_lowercase()) {
            return Err(src.error_at(
                u.name.span(),
                format!("user[{i}].name: user {name} is listed twice (names ignore case)"),
            ));
        }
        let password_hash = hash_at(
            src,
            &u.password,
            &format!("user[{i}].password"),
            "burrow hash-password",
        )?;
        users.push(UserConfig {
            name,
            password_hash,
        });
    }

    let mut api_keys = Vec::new();
    let mut api_key_names = HashSet::new();
    for (i, entry) in file.api_key.iter().enumerate() {
        let k = entry.get_ref();
        let name = name_at(src, &k.name, &format!("api_key[{i}].name"))?;
        if !api_key_names.insert(name.clone()) {
            return Err(src.error_at(
                k.name.span(),
                format!("api_key[{i}].name: api key {name} is listed twice"),
            ));
        }
        let hash = hash_at(
            src,
            &k.hash,
            &format!("api_key[{i}].hash"),
            "burrow keygen-api",
        )?;
        let rate = rate_limit(
            src,
            &format!("api_key[{i}]"),
            k.rate.as_ref(),
            k.burst.as_ref(),
            None,
        )?
        .map(|r| RateLimit {
            key: RateKey::ApiKey,
            ..r
        });
        api_keys.push(ApiKeyConfig { name, hash, rate });
    }

    let agent_exists = |value: &Spanned<String>, key: String| -> Result<Name, ConfigError> {
        let name = name_at(src, value, &key)?;
        if agent_names.contains(&name) {
            Ok(name)
        } else {
            Err(src.error_at(value.span(), format!("{key}: no [[agent]] named {name}")))
        }
    };

    let mut routes = Vec::new();
    let mut hosts = HashSet::new();
    for (i, entry) in file.route.iter().enumerate() {
        let r = entry.get_ref();
        let host = Hostname::parse(r.host.get_ref())
            .map_err(|e| src.error_at(r.host.span(), format!("route[{i}].host: {e}")))?
            .into_string();
        if !hosts.insert(host.clone()) {
            return Err(src.error_at(
                r.host.span(),
                format!("route[{i}].host: {host} has two routes"),
            ));
        }
        let agent = agent_exists(&r.agent, format!("route[{i}].agent"))?;
        let service = name_at(src, &r.service, &format!("route[{i}].service"))?;
        let Some(auth) = r.auth else {
            return Err(src.error_at(
                entry.span(),
                format!("route[{i}].auth: missing; write auth = \"basic\" or, to expose {host} to anyone, auth = \"none\""),
            ));
        };
        let mut route_users = Vec::new();
        for (j, u) in r.users.iter().enumerate() {
            if !user_names.contains(u.get_ref()) {
                return Err(src.error_at(
                    u.span(),
                    format!("route[{i}].users[{j}]: no [[user]] named {}", u.get_ref()),
                ));
            }
            route_users.push(u.get_ref().clone());
        }
        match auth {
            AuthMode::Basic if route_users.is_empty() => {
                return Err(src.error_at(
                    entry.span(),
                    format!("route[{i}].users: auth = \"basic\" needs at least one user"),
                ));
            }
            AuthMode::None if !route_users.is_empty() => {
                return Err(src.error_at(
                    r.users[0].span(),
                    format!("route[{i}].users: users given but auth = \"none\""),
                ));
            }
            _ => {}
        }
        let mut route_api_keys = Vec::new();
        for (j, k) in r.api_keys.iter().enumerate() {
            let key = format!("route[{i}].api_keys[{j}]");
            if auth != AuthMode::Basic {
                return Err(src.error_at(
                    k.span(),
                    format!("{key}: api keys are taken only on routes with auth = \"basic\""),
                ));
            }
            let name = name_at(src, k, &key)?;
            if !api_key_names.contains(&name) {
                return Err(src.error_at(k.span(), format!("{key}: no [[api_key]] named {name}")));
            }
            route_api_keys.push(name);
        }
        let mut public_paths = Vec::new();
        for (j, p) in r.public_paths.iter().enumerate() {
            public_paths.push(PublicPath::parse(p.get_ref()).map_err(|e| {
                src.error_at(p.span(), format!("route[{i}].public_paths[{j}]: {e}"))
            })?);
        }
        let host_header = match &r.host_header {
            None => None,
            Some(h) => Some(
                HostHeader::parse(h.get_ref())
                    .map_err(|e| src.error_at(h.span(), format!("route[{i}].host_header: {e}")))?,
            ),
        };
        let rate = rate_limit(
            src,
            &format!("route[{i}]"),
            r.rate.as_ref(),
            r.burst.as_ref(),
            r.rate_key.as_ref(),
        )?;
        let max_body = r
            .max_body
            .as_ref()
            .map(|v| {
                parse_size(v.get_ref())
                    .map_err(|why| src.error_at(v.span(), format!("route[{i}].max_body: {why}")))
            })
            .transpose()?;
        let wake = r.wake.as_ref();
        routes.push(RouteConfig {
            host,
            agent,
            service,
            auth,
            users: route_users,
            api_keys: route_api_keys,
            rules: IpRules {
                allow: r.allow.clone(),
                deny: r.deny.clone(),
            },
            public_paths,
            host_header,
            idle_timeout: r
                .idle_timeout
                .as_ref()
                .map(|d| duration(src, d, &format!("route[{i}].idle_timeout"), NONZERO))
                .transpose()?,
            response_timeout: r
                .response_timeout
                .as_ref()
                .map(|d| duration(src, d, &format!("route[{i}].response_timeout"), NONZERO))
                .transpose()?,
            rate,
            max_body,
            wake: WakeConfig {
                hold: duration_or(
                    src,
                    wake.and_then(|w| w.hold.as_ref()),
                    &format!("route[{i}].wake.hold"),
                    Duration::ZERO,
                    DEFAULT_WAKE_HOLD,
                )?,
                page: wake.and_then(|w| w.page).unwrap_or(true),
            },
        });
    }

    let mut ports = Vec::new();
    let mut listens = HashSet::new();
    for (i, entry) in file.port.iter().enumerate() {
        let p = entry.get_ref();
        if p.listen.port() != 0 && !listens.insert(p.listen) {
            return Err(src.error_at(
                entry.span(),
                format!("port[{i}].listen: {} is used twice", p.listen),
            ));
        }
        ports.push(PortConfig {
            listen: p.listen,
            agent: agent_exists(&p.agent, format!("port[{i}].agent"))?,
            service: name_at(src, &p.service, &format!("port[{i}].service"))?,
            rules: IpRules {
                allow: p.allow.clone(),
                deny: p.deny.clone(),
            },
        });
    }

    let hostname = match &file.edge.hostname {
        Some(h) => Some(
            Hostname::parse(h.get_ref())
                .map_err(|e| src.error_at(h.span(), format!("edge.hostname: {e}")))?
                .into_string(),
        ),
        None => None,
    };
    let header_timeout = duration_or(
        src,
        file.edge.header_timeout.as_ref(),
        "edge.header_timeout",
        NONZERO,
        DEFAULT_HEADER_TIMEOUT,
    )?;
    // Zero is allowed: streams are cut at once on SIGTERM.
    let grace = duration_or(
        src,
        file.edge.grace.as_ref(),
        "edge.grace",
        Duration::ZERO,
        DEFAULT_GRACE,
    )?;
    // Zero is allowed: 502 at once while the agent is away.
    let agent_wait = duration_or(
        src,
        file.edge.agent_wait.as_ref(),
        "edge.agent_wait",
        Duration::ZERO,
        crate::tunnel::registry::DEFAULT_AGENT_WAIT,
    )?;
    if agent_wait > MAX_AGENT_WAIT
        && let Some(v) = &file.edge.agent_wait
    {
        return Err(src.error_at(
            v.span(),
            format!(
                "edge.agent_wait: at most {} (a request holds its connection while it waits)",
                humantime::format_duration(MAX_AGENT_WAIT)
            ),
        ));
    }
    let http3 = file.edge.http3.as_ref().is_some_and(|v| *v.get_ref());
    if http3
        && routes.is_empty()
        && let Some(v) = &file.edge.http3
    {
        return Err(src.error_at(
            v.span(),
            "edge.http3: needs at least one [[route]] (HTTP/3 serves the routes)",
        ));
    }
    let limits = convert_limits(src, file.limits.unwrap_or_default())?;
    for r in &mut routes {
        if r.rate.is_none() {
            r.rate = limits.rate;
        }
    }
    let default_addr = |s: &str| s.parse::<SocketAddr>().expect("default addresses parse");
    Ok(EdgeConfig {
        state_dir,
        key_path,
        https: file
            .edge
            .https
            .or_else(|| (!routes.is_empty()).then(|| default_addr(DEFAULT_HTTPS))),
        http: file.edge.http,
        tunnel: file
            .edge
            .tunnel
            .unwrap_or_else(|| default_addr(DEFAULT_TUNNEL)),
        admin: file.edge.admin,
        header_timeout,
        hostname,
        grace,
        agent_wait,
        threads: burrow_proto::confkit::threads(src, file.edge.threads.as_ref(), "edge.threads")?,
        http3,
        tls,
        access,
        agents,
        users,
        api_keys,
        routes,
        ports,
        limits,
        cluster,
    })
}

fn convert_cluster(src: &Source, c: ClusterSection) -> Result<ClusterConfig, ConfigError> {
    use redis::IntoConnectionInfo;
    let url = c.redis.get_ref();
    if let Err(e) = url.as_str().into_connection_info() {
        // The error may quote the URL, password and all: not echoed.
        let _ = e;
        return Err(src.error_at(
            c.redis.span(),
            "cluster.redis: not a Redis URL (redis://[:PASSWORD@]HOST[:PORT][/DB], rediss:// for TLS, redis+unix:///PATH)",
        ));
    }
    let Some(secret_file) = c.secret_file else {
        return Err(src.error_at(
            c.redis.span(),
            "cluster: needs secret_file (the same 32 random bytes on every edge: head -c 32 /dev/urandom > cluster.key), which encrypts certificates and keys in Redis",
        ));
    };
    Ok(ClusterConfig {
        redis: url.clone(),
        redis_password_file: c.redis_password_file.map(|p| src.resolve(&p)),
        secret_file: src.resolve(&secret_file),
    })
}

/// An argon2id hash at `value` for `key`, made by `tool`. The value is
/// never echoed: it may be a plaintext password or key.
fn hash_at(
    src: &Source,
    value: &Spanned<String>,
    key: &str,
    tool: &str,
) -> Result<PasswordHash, ConfigError> {
    if !value.get_ref().starts_with("$argon2id$") {
        return Err(src.error_at(
            value.span(),
            format!("{key}: not an argon2id hash; make one with `{tool}`"),
        ));
    }
    PasswordHash::parse(value.get_ref())
        .map_err(|e| src.error_at(value.span(), format!("{key}: {e}; make one with `{tool}`")))
}

/// `value` if given and within 1..=`max`, else `default`; out of range is
/// an error at the value, naming `limits.{key}`.
fn bounded<T>(
    src: &Source,
    value: Option<Spanned<T>>,
    key: &str,
    default: T,
    max: T,
) -> Result<T, ConfigError>
where
    T: Copy + PartialOrd + From<u8> + std::fmt::Display,
{
    match value {
        None => Ok(default),
        Some(v) if (T::from(1)..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
        Some(v) => Err(src.error_at(v.span(), format!("limits.{key}: between 1 and {max}"))),
    }
}

fn convert_limits(src: &Source, l: LimitsSection) -> Result<LimitsConfig, ConfigError> {
    let d = LimitsConfig::default();
    let idle_timeout = duration_or(
        src,
        l.idle_timeout.as_ref(),
        "limits.idle_timeout",
        NONZERO,
        d.idle_timeout,
    )?;
    let rate = rate_limit(
        src,
        "limits",
        l.rate.as_ref(),
        l.burst.as_ref(),
        l.rate_key.as_ref(),
    )?;
    Ok(LimitsConfig {
        connections: bounded(src, l.connections, "connections", d.connections, 1_000_000)?,
        connections_per_ip: bounded(
            src,
            l.connections_per_ip,
            "connections_per_ip",
            d.connections_per_ip,
            1_000_000,
        )?,
        idle_timeout,
        streams_per_connection: bounded(
            src,
            l.streams_per_connection,
            "streams_per_connection",
            d.streams_per_connection,
            10_000,
        )?,
        streams_per_ip: bounded(
            src,
            l.streams_per_ip,
            "streams_per_ip",
            d.streams_per_ip,
            1_000_000,
        )?,
        held_per_client: bounded(
            src,
            l.held_per_client,
            "held_per_client",
            d.held_per_client,
            100_000,
        )?,
        held_per_service: bounded(
            src,
            l.held_per_service,
            "held_per_service",
            d.held_per_service,
            100_000,
        )?,
        rate,
    })
}

/// The most requests per second a rate may say.
const MAX_RATE_PER_SECOND: u64 = 1_000_000;
/// The largest `burst`.
const MAX_BURST: u32 = 1_000_000;
/// The largest `max_body`: 1 TiB.
const MAX_BODY: u64 = 1 << 40;

/// `rate`, `burst` and `rate_key` of a route (or of `[limits]`) as one
/// limit; `burst` and `rate_key` without `rate` are errors.
fn rate_limit(
    src: &Source,
    prefix: &str,
    rate: Option<&Spanned<String>>,
    burst: Option<&Spanned<u32>>,
    key: Option<&Spanned<String>>,
) -> Result<Option<RateLimit>, ConfigError> {
    let Some(rate) = rate else {
        if let Some(b) = burst {
            return Err(src.error_at(b.span(), format!("{prefix}.burst: needs a rate")));
        }
        if let Some(k) = key {
            return Err(src.error_at(k.span(), format!("{prefix}.rate_key: needs a rate")));
        }
        return Ok(None);
    };
    let interval = parse_rate(rate.get_ref())
        .map_err(|why| src.error_at(rate.span(), format!("{prefix}.rate: {why}")))?;
    let burst = match burst {
        None => 0,
        Some(b) if *b.get_ref() <= MAX_BURST => *b.get_ref(),
        Some(b) => {
            return Err(src.error_at(b.span(), format!("{prefix}.burst: at most {MAX_BURST}")));
        }
    };
    let key = match key.map(|k| (k, k.get_ref().as_str())) {
        None | Some((_, "client")) => RateKey::Client,
        Some((_, "user")) => RateKey::User,
        Some((_, "api_key")) => RateKey::ApiKey,
        Some((k, other)) => {
            return Err(src.error_at(
                k.span(),
                format!("{prefix}.rate_key: {other:?}: write \"client\", \"user\" or \"api_key\""),
            ));
        }
    };
    Ok(Some(RateLimit {
        interval,
        burst,
        key,
    }))
}

/// `"10/s"`, `"600/m"` (or nginx's `"10r/s"`): the time between requests.
pub fn parse_rate(text: &str) -> Result<Duration, String> {
    let hint = "write requests per second or minute, e.g. \"10/s\" or \"600/m\"";
    let (count, unit) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: {hint}"))?;
    let count = count.trim().trim_end_matches('r');
    let count: u64 = count
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?}: the count must be a whole number above 0; {hint}"))?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        _ => return Err(format!("{text:?}: {hint}")),
    };
    if count / per.as_secs() > MAX_RATE_PER_SECOND {
        return Err(format!("{text:?}: at most {MAX_RATE_PER_SECOND}/s"));
    }
    Ok(per / u32::try_from(count).map_err(|_| format!("{text:?}: too many"))?)
}

/// `"10MiB"`, `"512KiB"`, `"1G"`, `"1000000"`: bytes. K, M and G are
/// binary (as nginx's `client_max_body_size`), KB, MB and GB decimal.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let hint = "write a size, e.g. \"10MiB\" or \"512KiB\"";
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().map_err(|_| format!("{text:?}: {hint}"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "m" | "MiB" => 1 << 20,
        "G" | "g" | "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(format!("{text:?}: {hint}")),
    };
    match n.checked_mul(multiplier) {
        Some(b) if b > 0 && b <= MAX_BODY => Ok(b),
        Some(0) => Err(format!(
            "{text:?}: must be above 0 (omit max_body for no cap)"
        )),
        _ => Err(format!("{text:?}: at most 1 TiB")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

    fn parse(text: &str) -> Result<EdgeConfig, ConfigError> {
        EdgeConfig::from_source(&Source::new("edge.toml", text))
    }

    fn base() -> String {
        format!("[edge]\nstate_dir = \"/tmp/s\"\n\n[[agent]]\nname = \"home\"\nkey = \"{KEY}\"\n")
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.key_path, PathBuf::from("/tmp/s/edge.key"));
        assert_eq!(c.tunnel, DEFAULT_TUNNEL.parse().unwrap());
        assert_eq!(c.https, None);
        assert_eq!(c.tls, TlsConfig::SelfSigned);
        assert_eq!(c.threads, 1);
    }

    #[test]
    fn threads_are_bounded_and_errors_point_at_the_value() {
        let with = |n: &str| base().replace("[edge]\n", &format!("[edge]\nthreads = {n}\n"));
        assert_eq!(parse(&with("4")).unwrap().threads, 4);
        let err = parse(&with("0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:2:11: edge.threads: between 1 and 256"
        );
        assert!(parse(&with("\"two\"")).is_err());
    }

    #[test]
    fn route_without_auth_is_an_error_naming_the_key() {
        let text = format!(
            "{}\n[[route]]\nhost = \"chat.example.com\"\nagent = \"home\"\nservice = \"webui\"\n",
            base()
        );
        let err = parse(&text).unwrap_err();
        assert!(err.message.starts_with("route[0].auth: missing"), "{err}");
        assert_eq!(err.position.map(|p| p.0), Some(8), "{err}");
    }

    #[test]
    fn unknown_agent_in_port_points_at_the_value() {
        let text = format!(
            "{}\n[[port]]\nlisten = \"127.0.0.1:0\"\nagent = \"nas\"\nservice = \"ssh\"\n",
            base()
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:10:9: port[0].agent: no [[agent]] named nas"
        );
    }

    #[test]
    fn plaintext_password_is_refused_without_echo() {
        let text = format!(
            "{}\n[[user]]\nname = \"alice\"\npassword = \"hunter2\"\n",
            base()
        );
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("not an argon2id hash"), "{err}");
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn cut_short_hash_is_refused_at_the_value_without_echo() {
        let good = crate::access::auth::hash_password(b"pw").unwrap();
        let (head, hash) = good.rsplit_once('$').unwrap();
        for bad in [
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA".to_owned(),
            format!("{head}${}", &hash[..40]),
        ] {
            let text = format!(
                "{}\n[[user]]\nname = \"alice\"\npassword = \"{bad}\"\n",
                base()
            );
            let err = parse(&text).unwrap_err();
            assert_eq!(err.position, Some((10, 12)), "{err}");
            assert!(
                err.message
                    .starts_with("user[0].password: not a usable argon2id hash: "),
                "{err}"
            );
            assert!(!err.to_string().contains(&bad[31..]), "{err}");
        }
        let text = format!(
            "{}\n[[user]]\nname = \"alice\"\npassword = \"{good}\"\n",
            base()
        );
        assert_eq!(parse(&text).unwrap().users[0].password_hash.as_str(), good);
    }

    #[test]
    fn api_keys_are_named_hashes_that_basic_routes_list() {
        let hash = crate::access::auth::hash_password(b"burrow_x").unwrap();
        let text = |route_keys: &str, auth: &str, key_hash: &str| {
            format!(
                "{}
[[user]]
name = \"alice\"
password = \"{hash}\"

\
                 [[api_key]]
name = \"phone\"
hash = \"{key_hash}\"

\
                 [[route]]
host = \"a.example.com\"
agent = \"home\"
service = \"s\"
\
                 auth = \"{auth}\"
{}api_keys = [{route_keys}]
",
                base(),
                if auth == "basic" {
                    "users = [\"alice\"]\n"
                } else {
                    ""
                },
            )
        };
        let c = parse(&text("\"phone\"", "basic", &hash)).unwrap();
        assert_eq!(c.api_keys[0].name.as_str(), "phone");
        assert_eq!(c.api_keys[0].hash.as_str(), hash);
        assert_eq!(c.routes[0].api_keys[0].as_str(), "phone");
        assert!(!format!("{c:?}").contains(&hash), "Debug shows the hash");
        assert!(
            parse(&text("", "basic", &hash)).unwrap().routes[0]
                .api_keys
                .is_empty()
        );

        // `api_keys = [...]` is line 22 (21 without `users`); the
        // elements start at columns 13 and 22.
        let err = parse(&text("\"phone\", \"tablet\"", "basic", &hash)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:22:22: route[0].api_keys[1]: no [[api_key]] named tablet"
        );
        let err = parse(&text("\"phone\"", "none", &hash)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:21:13: route[0].api_keys[0]: api keys are taken only on routes with auth = \"basic\""
        );
        let cut = &hash[..hash.len() - 10];
        let err = parse(&text("\"phone\"", "basic", cut)).unwrap_err();
        assert_eq!(err.position, Some((14, 8)), "{err}");
        assert!(
            err.message
                .starts_with("api_key[0].hash: not a usable argon2id hash: "),
            "{err}"
        );
        assert!(
            err.message.ends_with("make one with `burrow keygen-api`"),
            "{err}"
        );
        assert!(!err.to_string().contains(&cut[40..]), "{err}");
        let err = parse(&text("\"phone\"", "basic", "burrow_plainkey")).unwrap_err();
        assert_eq!(err.position, Some((14, 8)), "{err}");
        assert!(!err.to_string().contains("plainkey"), "{err}");
        let twice = text("\"phone\"", "basic", &hash).replace(
            "[[route]]",
            &format!("[[api_key]]\nname = \"phone\"\nhash = \"{hash}\"\n\n[[route]]"),
        );
        let err = parse(&twice).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:17:8: api_key[1].name: api key phone is listed twice"
        );
        let bad_name =
            text("\"phone\"", "basic", &hash).replace("\"phone\"\nhash", "\"my phone\"\nhash");
        let err = parse(&bad_name).unwrap_err();
        assert_eq!(err.position, Some((13, 8)), "{err}");
        assert!(err.message.starts_with("api_key[0].name: "), "{err}");
    }

    #[test]
    fn misspelt_key_is_refused_with_position() {
        let err = parse("[edge]\nstate_dir = \"/s\"\ntunel = \"0.0.0.0:1\"\n").unwrap_err();
        assert_eq!(err.position, Some((3, 1)), "{err}");
        assert!(err.message.contains("unknown field `tunel`"), "{err}");
    }

    #[test]
    fn duplicate_agent_keys_are_refused() {
        let text = format!("{}\n[[agent]]\nname = \"other\"\nkey = \"{KEY}\"\n", base());
        let err = parse(&text).unwrap_err();
        assert!(
            err.message.contains("already listed for agent home"),
            "{err}"
        );
    }

    #[test]
    fn limits_have_defaults_and_bad_values_point_at_the_value() {
        assert_eq!(parse(&base()).unwrap().limits, LimitsConfig::default());
        let with = |l: &str| format!("{}\n[limits]\n{l}\n", base());
        let c = parse(&with("connections_per_ip = 8\nidle_timeout = \"5s\"")).unwrap();
        assert_eq!(c.limits.connections_per_ip, 8);
        assert_eq!(c.limits.idle_timeout, Duration::from_secs(5));
        let err = parse(&with("connections_per_ip = 0")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:9:22: limits.connections_per_ip: between 1 and 1000000"
        );
        let err = parse(&with("idle_timeout = \"0s\"")).unwrap_err();
        assert_eq!(err.position, Some((9, 16)), "{err}");
        assert!(parse(&with("per_ip = 3")).is_err());
    }

    #[test]
    fn client_ip_header_defaults_to_x_forwarded_for_and_bad_values_point_at_the_value() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.access.client_ip_header, ClientIpHeader::XForwardedFor);
        let with = |v: &str| {
            format!(
                "{}\n[access]\ntrusted_proxies = [\"10.0.0.0/8\"]\nclient_ip_header = {v}\n",
                base()
            )
        };
        let c = parse(&with("\"forwarded\"")).unwrap();
        assert_eq!(c.access.client_ip_header, ClientIpHeader::Forwarded);
        let c = parse(&with("\"x-forwarded-for\"")).unwrap();
        assert_eq!(c.access.client_ip_header, ClientIpHeader::XForwardedFor);
        let err = parse(&with("\"x-real-ip\"")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:10:20: access.client_ip_header: \"x-real-ip\": write \"x-forwarded-for\" or \"forwarded\", the header your proxy writes"
        );
        assert!(parse(&with("[\"forwarded\", \"x-forwarded-for\"]")).is_err());
    }

    /// A config with every duration key set to `value` except `key`,
    /// which gets `bad`; the error must name `key` and point at `bad`.
    fn duration_case(key: &str, bad: &str) -> String {
        let v = |k: &str| if k == key { bad } else { "30s" };
        format!(
            "[edge]\nstate_dir = \"/tmp/s\"\nheader_timeout = \"{}\"\ngrace = \"{}\"\n\n\
             [tls]\nmode = \"acme\"\nemail = \"a@example.com\"\nretry_min = \"{}\"\n\n\
             [limits]\nidle_timeout = \"{}\"\n\n\
             [[agent]]\nname = \"home\"\nkey = \"{KEY}\"\n\n\
             [[route]]\nhost = \"a.example.com\"\nagent = \"home\"\nservice = \"s\"\nauth = \"none\"\n\
             idle_timeout = \"{}\"\nresponse_timeout = \"{}\"\n[route.wake]\nhold = \"{}\"\n",
            v("edge.header_timeout"),
            v("edge.grace"),
            v("tls.retry_min"),
            v("limits.idle_timeout"),
            v("route[0].idle_timeout"),
            v("route[0].response_timeout"),
            v("route[0].wake.hold"),
        )
    }

    const DURATION_KEYS: [(&str, bool); 7] = [
        // (key, zero allowed)
        ("edge.header_timeout", false),
        ("edge.grace", true),
        ("tls.retry_min", false),
        ("limits.idle_timeout", false),
        ("route[0].idle_timeout", false),
        ("route[0].response_timeout", false),
        ("route[0].wake.hold", true),
    ];

    #[test]
    fn rates_and_sizes_parse_and_bad_ones_point_at_the_value() {
        assert_eq!(parse_rate("10/s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_rate("10r/s"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_rate("600/m"), Ok(Duration::from_millis(100)));
        for bad in ["10", "0/s", "-1/s", "10/h", "x/s", "9999999/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("1000"), Ok(1000));
        for bad in [
            "",
            "0",
            "0MiB",
            "10 parsecs",
            "2TiB",
            "99999999999999G",
            "-1",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let route = |extra: &str| {
            format!(
                "{}\n[[route]]\nhost = \"a.example.com\"\nagent = \"home\"\nservice = \"s\"\nauth = \"none\"\n{extra}\n",
                base()
            )
        };
        let c = parse(&route("rate = \"10/s\"\nburst = 20\nmax_body = \"1MiB\"")).unwrap();
        assert_eq!(
            c.routes[0].rate,
            Some(RateLimit {
                interval: Duration::from_millis(100),
                burst: 20,
                key: RateKey::Client
            })
        );
        assert_eq!(c.routes[0].max_body, Some(1 << 20));
        let err = parse(&route("burst = 20")).unwrap_err();
        assert!(
            err.message.contains("route[0].burst: needs a rate"),
            "{err}"
        );
        let err = parse(&route("rate = \"10/s\"\nrate_key = \"ip\"")).unwrap_err();
        assert!(
            err.message.starts_with("route[0].rate_key: \"ip\""),
            "{err}"
        );
        assert!(err.position.is_some());
        let err = parse(&route("max_body = \"lots\"")).unwrap_err();
        assert!(err.message.starts_with("route[0].max_body: "), "{err}");
        // A [limits] rate is the default of routes without their own.
        let text = format!(
            "{}\n[limits]\nrate = \"600/m\"\nrate_key = \"user\"\n",
            route("")
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.routes[0].rate.map(|r| r.key), Some(RateKey::User));
    }

    #[test]
    fn user_names_that_differ_only_in_case_are_one_name() {
        let hash = crate::access::auth::hash_password(b"pw").unwrap();
        let text = format!(
            "{}\n[[user]]\nname = \"alice\"\npassword = \"{hash}\"\n\n[[user]]\nname = \"Alice\"\npassword = \"{hash}\"\n",
            base()
        );
        let err = parse(&text).unwrap_err();
        assert!(
            err.message.contains("listed twice (names ignore case)"),
            "{err}"
        );
    }

    #[test]
    fn http3_is_off_by_default_and_needs_routes() {
        let with = |v: &str, routes: &str| {
            parse(&format!(
                "[edge]\nstate_dir = \"/tmp/s\"\n{v}\n\n[[agent]]\nname = \"home\"\nkey = \"{KEY}\"\n{routes}"
            ))
        };
        let route = "\n[[route]]\nhost = \"chat.example.com\"\nagent = \"home\"\nservice = \"app\"\nauth = \"none\"\n";
        assert!(!with("", route).unwrap().http3);
        assert!(with("http3 = true", route).unwrap().http3);
        assert!(!with("http3 = false", "").unwrap().http3);
        let err = with("http3 = true", "").unwrap_err();
        assert_eq!(err.position, Some((3, 9)), "{err}");
        assert!(
            err.message
                .starts_with("edge.http3: needs at least one [[route]]"),
            "{err}"
        );
        assert!(with("http3 = \"yes\"", route).is_err());
    }

    #[test]
    fn cluster_needs_a_redis_url_and_a_secret_file_and_never_echoes_the_url() {
        let with = |v: &str| {
            parse(&format!(
                "[edge]\nstate_dir = \"/tmp/s\"\n\n[cluster]\n{v}\n"
            ))
        };
        assert_eq!(
            parse("[edge]\nstate_dir = \"/tmp/s\"\n").unwrap().cluster,
            None
        );
        let c = with("redis = \"redis://:pw@10.0.0.2:6379/0\"\nsecret_file = \"cluster.key\"")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.redis, "redis://:pw@10.0.0.2:6379/0");
        assert!(!format!("{c:?}").contains("pw"), "{c:?}");
        assert!(
            with("redis = \"rediss://r.example.com\"\nsecret_file = \"k\"\nredis_password_file = \"p\"")
                .unwrap()
                .cluster
                .unwrap()
                .redis_password_file
                .is_some()
        );
        let err = with("redis = \"redis://127.0.0.1\"").unwrap_err();
        assert_eq!(err.position, Some((5, 9)), "{err}");
        assert!(err.message.contains("needs secret_file"), "{err}");
        let err = with("redis = \"http://:hunter2@x\"\nsecret_file = \"k\"").unwrap_err();
        assert_eq!(err.position, Some((5, 9)), "{err}");
        assert!(err.message.contains("not a Redis URL"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        assert!(with("redis = \"redis://x\"\nsecret_file = \"k\"\nreplicas = 2").is_err());
    }

    #[test]
    fn agent_wait_defaults_to_ten_seconds_allows_zero_and_is_capped() {
        let with = |v: &str| {
            parse(&format!(
                "[edge]\nstate_dir = \"/tmp/s\"\n{v}\n\n[[agent]]\nname = \"home\"\nkey = \"{KEY}\"\n"
            ))
        };
        assert_eq!(with("").unwrap().agent_wait, Duration::from_secs(10));
        assert_eq!(
            with("agent_wait = \"0s\"").unwrap().agent_wait,
            Duration::ZERO
        );
        assert_eq!(
            with("agent_wait = \"90s\"").unwrap().agent_wait,
            Duration::from_secs(90)
        );
        let err = with("agent_wait = \"1h\"").unwrap_err();
        assert_eq!(err.position, Some((3, 14)), "{err}");
        assert!(
            err.message.starts_with("edge.agent_wait: at most 10m"),
            "{err}"
        );
    }

    #[test]
    fn every_duration_is_bounded_and_errors_point_at_the_value() {
        let c = parse(&duration_case("", "")).unwrap();
        assert_eq!(c.routes[0].response_timeout, Some(Duration::from_secs(30)));
        for (key, zero_ok) in DURATION_KEYS {
            for bad in ["99999999999d", "8days", "0s"] {
                let text = duration_case(key, bad);
                let result = parse(&text);
                if bad == "0s" && zero_ok {
                    assert!(result.is_ok(), "{key} = 0s: {result:?}");
                    continue;
                }
                let err = result.unwrap_err();
                let offset = text.find(&format!("\"{bad}\"")).unwrap();
                let src = Source::new("edge.toml", text.as_str());
                assert_eq!(err.position, Some(src.position(offset)), "{key}: {err}");
                assert!(err.message.starts_with(&format!("{key}: ")), "{err}");
                assert!(err.message.ends_with("7 days"), "{err}");
            }
            assert!(parse(&duration_case(key, "7d")).is_ok(), "{key} = 7d");
        }
    }

    #[test]
    fn public_paths_are_parsed_and_errors_point_at_the_element() {
        let route = |paths: &str| {
            format!(
                "{}\n[[route]]\nhost = \"a.example.com\"\nagent = \"home\"\nservice = \"s\"\nauth = \"none\"\npublic_paths = [{paths}]\n",
                base()
            )
        };
        let c = parse(&route("\"/manifest.json\", \"/static/*\"")).unwrap();
        let paths = &c.routes[0].public_paths;
        assert_eq!(paths[1].as_str(), "/static/*");
        assert!(paths[1].matches("/static/js/app.js"));
        // Column 35: the opening quote of the second element.
        for (bad, why) in [
            ("/static/**", "'**' is not supported"),
            ("/*.js", "'*' may only be the last"),
            ("/caf%C3%A9", "escapes are not supported"),
            ("manifest.json", "must start with '/'"),
        ] {
            let err = parse(&route(&format!("\"/manifest.json\", \"{bad}\""))).unwrap_err();
            assert_eq!(err.position, Some((13, 35)), "{err}");
            assert!(
                err.message
                    .starts_with(&format!("route[0].public_paths[1]: {bad:?}: ")),
                "{err}"
            );
            assert!(err.message.contains(why), "{err}");
        }
    }

    #[test]
    fn hostnames_are_checked() {
        assert!(valid_hostname("chat.example.com"));
        assert!(valid_hostname("localhost"));
        assert!(!valid_hostname("chat..example.com"));
        assert!(!valid_hostname("-x.example.com"));
        assert!(!valid_hostname("chat.example.com:443"));
        assert_eq!(
            Hostname::parse("Chat.Example.COM").unwrap().as_str(),
            "chat.example.com"
        );
        for (bad, why) in [
            ("*.example.com", "wildcards"),
            ("bücher.example", "punycode"),
            ("chat.example.com:443", "without port"),
            ("chat.example.com.", "not a host name"),
            ("a b", "not a host name"),
            ("", "not a host name"),
        ] {
            let err = Hostname::parse(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn host_headers_are_authorities_checked_at_load() {
        for good in [
            "localhost:11434",
            "localhost",
            "Ollama.LAN",
            "127.0.0.1:8080",
            "[::1]:11434",
            "[::1]",
        ] {
            assert_eq!(
                HostHeader::parse(good).map(|h| h.to_string()),
                Ok(good.into())
            );
        }
        for bad in [
            "",
            "bad host\r\n",
            "a b",
            "x@y",
            "user:pw@host",
            "host:",
            "host:0",
            "host:99999",
            "host:http",
            "host/path",
            "::1",
            "[zz]",
            "a..b",
            "-a",
            "\u{e9}t\u{e9}",
        ] {
            assert!(HostHeader::parse(bad).is_err(), "{bad:?} passed");
        }
        let text = format!(
            "{}\n[[route]]\nhost = \"a.example.com\"\nagent = \"home\"\nservice = \"s\"\nauth = \"none\"\nhost_header = \"x@y\"\n",
            base()
        );
        let err = parse(&text).unwrap_err();
        assert_eq!(
            err.to_string(),
            "edge.toml:13:15: route[0].host_header: \"x@y\" has userinfo ('@'); write host or host:port, e.g. \"localhost:11434\""
        );
        let err = parse(&text.replace("host_header = \"x@y\"", "host_header = \"bad host\\r\\n\""))
            .unwrap_err();
        assert_eq!(err.position, Some((13, 15)), "{err}");
        let err = parse(&text.replace("\"a.example.com\"", "\"*.example.com\"")).unwrap_err();
        assert_eq!(err.position, Some((9, 8)), "{err}");
        assert!(err.message.starts_with("route[0].host: "), "{err}");
    }
}
