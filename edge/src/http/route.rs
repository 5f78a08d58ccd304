//! Where each request comes in: choose the route by Host, check the client
//! address against the IP rules, admit it through the gate (its Set-Cookie
//! goes on the answer), answer the wake-status path, and pass the rest to
//! [`super::forward`].
//!
//! The path is put in its canonical form ([`crate::access::path`]) here,
//! once: the gate judges that form and the service receives it.
//!
//! Forwarding one HTTP request through the tunnel: choose the route by Host,
//! check the client address, rewrite the headers a proxy owns
//! ([`super::rewrite`]), send the request over its own QUIC stream
//! ([`super::forward`]), and stream the response back chunk by chunk (or
//! splice an upgraded connection, [`super::upgrade`]). A request for a
//! sleeping service is held or answered with the waiting page
//! ([`super::wake`]). The request's access-log line comes from
//! [`super::access_log`].

use std::net::SocketAddr;
use std::sync::Arc;

use http::header;
use http::uri::{Authority, Uri};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::time::Instant;
use tracing::{debug, info};

use super::access_log::{AccessEntry, LoggedBody};
use super::forward::dispatch;
use super::io::{ClientBody, Paced, RequestBody};
use super::ratelimit::Who;
use super::refuse;
use super::wake::{self, WAKE_STATUS_PATH, WakeRight};
use super::{Body, HttpState, InFlight};
use crate::access::gate::Admission;
use crate::access::path::{PathError, Strictness, canonical};
use crate::access::{Decision, client_ip};
use crate::config::{AuthMode, RateKey};
use crate::metrics::Refused;
use crate::refusal::Refusal;
use burrow_proto::listener::ClientKey;

/// Answers one request; `in_flight` stays counted until the response body
/// ends or is dropped.
pub(super) async fn handle(
    req: Request<RequestBody>,
    state: Arc<HttpState>,
    peer: SocketAddr,
    sni: Option<Arc<str>>,
    in_flight: InFlight,
) -> Response<Body> {
    let started = Instant::now();
    let mut entry = AccessEntry {
        client: peer.ip().to_canonical(),
        user: None,
        method: req.method().clone(),
        host: String::new(),
        path: req.uri().path().to_owned(),
        status: 0,
        started,
        route: None,
    };
    let resp = route_request(req, &state, peer, sni.as_deref(), &mut entry).await;
    state.metrics.response(resp.status().as_u16());
    entry.status = resp.status().as_u16();
    resp.map(|body| LoggedBody::new(body, entry, in_flight).boxed())
}

async fn route_request(
    req: Request<RequestBody>,
    state: &HttpState,
    peer: SocketAddr,
    sni: Option<&str>,
    entry: &mut AccessEntry,
) -> Response<Body> {
    // ACME validations bypass IP rules and auth; nothing else does.
    if let Some(answer) = super::acme_answer(&state.certs, req.uri().path()).await {
        return answer;
    }
    let host = match request_host(&req) {
        Ok(h) => h,
        Err(why) => {
            debug!(%peer, why, "bad request");
            return refuse::response(Refusal::BadRequest(why));
        }
    };
    entry.host.clone_from(&host.name);
    let Some(route) = state.route(&host.name) else {
        debug!(%peer, host = %host.name, "no route for host");
        return refuse::response(Refusal::NotFound);
    };
    entry.route = state.route_stats(&route.host);
    if let Some(stats) = &entry.route {
        stats
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // HTTP/2 lets a browser reuse a connection for another name the
    // certificate covers; a name it does not cover was misdirected here.
    if let Some(sni) = sni
        && !sni.eq_ignore_ascii_case(&host.name)
        && !state.certs.same_certificate(sni, &host.name)
    {
        debug!(%peer, sni, host = %host.name, "request for a host this connection's certificate does not cover");
        return refuse::response(Refusal::Misdirected);
    }
    let ip = client_ip(
        peer,
        req.headers(),
        &state.trusted_proxies,
        state.client_ip_header,
    );
    entry.client = ip;
    if let Decision::Deny(reason) = state.access.check(ip).and(route.rules.check(ip)) {
        info!(%peer, client = %ip, host = %route.host, ?reason, "denied by ip rules");
        return refuse::response(Refusal::Forbidden("forbidden"));
    }
    let client = SocketAddr::new(ip, peer.port());
    let strictness = match route.auth {
        AuthMode::Basic => Strictness::Protected,
        AuthMode::None => Strictness::Open,
    };
    let (req, path) = match canonical_request(req, strictness) {
        Ok(r) => r,
        Err(why) => {
            info!(%peer, client = %ip, host = %route.host, path = %entry.path, %why, "request path refused");
            return refuse::response(Refusal::BadRequest(why.message()));
        }
    };
    entry.path.clone_from(&path);
    let (req, set_cookies, right, paced) = match (route.auth, &state.gate) {
        (AuthMode::None, _) => (req, Vec::new(), WakeRight::May, Paced::Yes),
        (AuthMode::Basic, Some(gate)) => match gate.admit(req, &path, route, ip).await {
            Admission::Forward {
                req,
                set_cookies,
                user,
            } => {
                // Public paths pass without a user: they must not wake
                // anything, and their bodies must keep arriving.
                let (right, paced) = if user.is_some() {
                    (WakeRight::May, Paced::No)
                } else {
                    (WakeRight::MayNot, Paced::Yes)
                };
                entry.user = user;
                (req, set_cookies, right, paced)
            }
            Admission::Reply(r) => return refuse::reply(r),
            Admission::Refuse(r) => {
                if matches!(r, Refusal::Unauthorized(_) | Refusal::TooManyLogins { .. }) {
                    state.metrics.auth_failure();
                }
                return refuse::response(r);
            }
        },
        // Config validation guarantees users for basic routes; fail closed.
        (AuthMode::Basic, None) => {
            return refuse::response(Refusal::Internal("authentication unavailable"));
        }
    };
    // The API key's own limit, then the route's.
    let key_limiter = entry
        .user
        .as_deref()
        .and_then(|u| Some((u, state.key_limiter(u)?)));
    let route_limiter = state.limiter(&route.host).map(|l| (route.host.as_str(), l));
    for (scope, limiter) in [key_limiter, route_limiter].into_iter().flatten() {
        let who = rate_key(limiter.limit().key, ip, entry.user.as_deref());
        if let Err(wait) = limiter
            .check_shared(scope, &who, state.cluster.as_deref())
            .await
        {
            state.metrics.refused(Refused::Rate);
            if let Some(count) = limiter.log_now() {
                info!(host = %route.host, client = %ip, user = entry.user.as_deref().unwrap_or("-"), refused_since_last_line = count, "over a rate limit; refusing");
            }
            return refuse::response(Refusal::RateLimited { retry_after: wait });
        }
    }
    if let Some(max) = route.max_body
        && declared_length(&req).is_some_and(|n| n > max)
    {
        state.metrics.refused(Refused::MaxBody);
        info!(host = %route.host, client = %ip, max_body = max, "request body larger than max_body; refusing");
        return refuse::response(Refusal::PayloadTooLarge("request body too large"));
    }
    let mut resp = if path == WAKE_STATUS_PATH {
        wake::status_response(&state.registry, route, right)
    } else {
        let req = req.map(|body| {
            ClientBody::new(body, paced, &state.metrics).with_limit(route.max_body, &state.metrics)
        });
        dispatch(req, state, route, &host, client, right).await
    };
    for cookie in set_cookies {
        resp.headers_mut().append(header::SET_COOKIE, cookie);
    }
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let ttfb = entry.started.elapsed();
        state.metrics.time_to_first_byte(ttfb);
        if let Some(route) = &entry.route {
            route.ttfb.observe(ttfb);
        }
    }
    resp
}

/// Whom a rate limit counts for this request: the signed-in user or the
/// API key (`key:NAME`) when the limit says so and the request has one,
/// else the client address.
fn rate_key(key: RateKey, ip: std::net::IpAddr, user: Option<&str>) -> Who {
    let named = match (key, user) {
        (RateKey::User, Some(u)) if !u.starts_with("key:") => Some(u),
        (RateKey::ApiKey, Some(u)) if u.starts_with("key:") => Some(u),
        _ => None,
    };
    match named {
        Some(n) => Who::Named(n.to_owned()),
        None => Who::Client(ClientKey::of(ip)),
    }
}

/// The body length a request declares (Content-Length), if any.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// `req` with its path in canonical form (the query untouched), and that
/// path.
fn canonical_request<B>(
    mut req: Request<B>,
    strictness: Strictness,
) -> Result<(Request<B>, String), PathError> {
    let raw = req.uri().path();
    let path = canonical(raw, strictness)?;
    if path != raw {
        let mut parts = req.uri().clone().into_parts();
        let target = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        parts.path_and_query = Some(target.parse().map_err(|_| PathError::Malformed)?);
        *req.uri_mut() = Uri::from_parts(parts).map_err(|_| PathError::Malformed)?;
    }
    Ok((req, path))
}

/// The host a request is for, as written by the client and lowercased.
#[derive(Debug)]
pub(super) struct RequestHost {
    /// Without port, lowercase: the routing key.
    pub(super) name: String,
    /// As the client wrote it (host and port), for the forwarded Host header.
    pub(super) authority: String,
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
    fn the_forwarded_target_is_the_canonical_path_with_the_query_kept() {
        let (r, path) = canonical_request(
            req("/static/%2e%2e/api?q=%2e%2e", &[]),
            Strictness::Protected,
        )
        .unwrap();
        assert_eq!(path, "/api");
        assert_eq!(r.uri(), "/api?q=%2e%2e");
        let (r, _) =
            canonical_request(req("https://h.example/a/./b", &[]), Strictness::Open).unwrap();
        assert_eq!(r.uri(), "https://h.example/a/b");
        assert!(canonical_request(req("/a%2fb", &[]), Strictness::Protected).is_err());
    }
}
