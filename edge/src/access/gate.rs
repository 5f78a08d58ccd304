//! The authentication decision for one request on a route with
//! `auth = "basic"`: public paths, the login and logout pages, session and
//! device cookies, API keys as `Authorization: Bearer`, basic credentials
//! (throttled, checked off the event loop). The gate returns a decision;
//! `http::refuse` renders it.
//!
//! Whatever it decides, a forwarded request carries none of the edge's
//! credentials: a Basic password and a Bearer token with the API key
//! prefix are removed here (public paths included), our cookies where the
//! upstream request is built (`http::rewrite`); the app's own
//! `Authorization: Bearer` passes untouched.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::http::io::RequestBody;
use base64::Engine;
use burrow_proto::listener::ClientKey;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use http_body_util::{BodyExt, Limited};
use tracing::{info, warn};

use super::api_key;
use super::auth::{KeyVerdict, Verdict, Verifier};
use super::login::{self, LOGIN_PATH, LOGOUT_PATH, MAX_FORM};
use super::pattern::PublicPath;
use super::session::{self, SessionKeys, password_tag};
use super::throttle::{
    Attempt, MAX_USER_NAME, SharedPending, SharedThrottle, Throttle, settle_shared,
};
use crate::cluster::counters::Outcome;
use crate::config::{RouteConfig, UserConfig};
use crate::refusal::{Challenge, Refusal};

/// What Retry-After says when every password check slot is taken.
pub const LOGIN_BUSY_RETRY: Duration = Duration::from_secs(1);

/// What to do with a request.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "Forward is the common case; boxing it would allocate on every forwarded request"
)]
pub enum Admission {
    /// Forward it (the edge's credentials removed); add `set_cookies` to
    /// the response.
    Forward {
        req: Request<RequestBody>,
        user: Option<String>,
        set_cookies: Vec<HeaderValue>,
    },
    /// Answer with one of the edge's own pages.
    Reply(Reply),
    /// Do not forward it.
    Refuse(Refusal),
}

/// The edge's own answers on its `/.burrow/` paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// 200: the login form.
    LoginForm { host: String, next: String },
    /// 200: the button that posts a logout.
    LogoutForm { host: String },
    /// 200: the session cookie cleared, and the login form.
    SignedOut { host: String },
    /// 303 to `location` with the new session (and device) cookies.
    SignedIn {
        location: String,
        set_cookies: Vec<HeaderValue>,
    },
}

/// The result of checking a password.
enum PasswordCheck {
    /// Right; these cookies start the session (and remember the device).
    Valid(Vec<HeaderValue>),
    Wrong,
    /// Not checked or not answerable now (throttled, busy).
    Refuse(Refusal),
}

/// The result of checking an API key.
enum KeyCheck {
    /// Right, and taken on this route: the key's name.
    Valid(Arc<str>),
    Wrong,
    /// Not checked or not answerable now (throttled, busy).
    Refuse(Refusal),
}

/// What the gate keeps per configured user.
#[derive(Debug)]
struct KnownUser {
    /// The throttle's key for this name.
    name: Arc<str>,
    /// Binds sessions to the current password hash.
    tag: [u8; 8],
}

/// Authentication state shared by all routes.
#[derive(Debug)]
pub struct Gate {
    pub verifier: Verifier,
    pub sessions: SessionKeys,
    pub throttle: Throttle,
    /// With `[cluster]`: the counters every edge shares, beside `throttle`.
    shared: Option<SharedThrottle>,
    users: HashMap<String, KnownUser>,
    /// Configured names by their lower case: names sign in ignoring case.
    folded: HashMap<String, String>,
}

/// A browser navigation wants a page, an API client a 401 it can act on.
fn wants_html(req: &Request<RequestBody>) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"))
}

fn is_public(path: &str, patterns: &[PublicPath]) -> bool {
    patterns.iter().any(|p| p.matches(path))
}

/// The user and password of a Basic Authorization header.
fn basic_credentials(req: &Request<RequestBody>) -> Option<(String, String)> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Removes the edge's Authorization: a Basic header or a Bearer token with
/// the API key prefix, which on a route behind the edge's auth are the
/// edge's. Other Bearer tokens (the app's own) stay. The edge's cookies
/// are removed from every forwarded request, on any route, where the
/// request the service sees is built (`http::rewrite`).
pub fn strip_credentials<B>(req: &mut Request<B>) {
    let ours = req
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|v| {
            let v = v.as_bytes();
            v.get(..6)
                .is_some_and(|s| s.eq_ignore_ascii_case(b"basic "))
                || api_key::is_bearer_key(v)
        });
    if ours {
        req.headers_mut().remove(header::AUTHORIZATION);
    }
}

/// The authority the client addressed (HTTP/2 `:authority`, else Host).
fn request_authority<B>(req: &Request<B>) -> Option<String> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str().to_owned()),
        None => req
            .headers()
            .get(header::HOST)?
            .to_str()
            .ok()
            .map(str::to_owned),
    }
}

/// Where a state-changing POST came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Same,
    Other,
    /// No Origin header and no Sec-Fetch-Site (not a browser, or a very
    /// old one).
    Unknown,
}

fn origin<B>(req: &Request<B>) -> Origin {
    let without_default_port = |a: &str| a.strip_suffix(":443").unwrap_or(a).to_ascii_lowercase();
    if let Some(o) = req.headers().get(header::ORIGIN) {
        let ours = request_authority(req).map(|a| without_default_port(&a));
        let theirs = o
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("https://"))
            .map(without_default_port);
        return match (ours, theirs) {
            (Some(a), Some(b)) if a == b => Origin::Same,
            _ => Origin::Other,
        };
    }
    match req
        .headers()
        .get("sec-fetch-site")
        .map(HeaderValue::as_bytes)
    {
        Some(b"same-origin") => Origin::Same,
        Some(_) => Origin::Other,
        None => Origin::Unknown,
    }
}

impl Gate {
    pub fn new(users: &[UserConfig], sessions: SessionKeys, verifier: Verifier) -> Self {
        Self {
            verifier,
            sessions,
            throttle: Throttle::new(),
            shared: None,
            users: users
                .iter()
                .map(|u| {
                    let known = KnownUser {
                        name: Arc::from(u.name.as_str()),
                        tag: password_tag(&u.password_hash),
                    };
                    (u.name.clone(), known)
                })
                .collect(),
            folded: users
                .iter()
                .map(|u| (u.name.to_lowercase(), u.name.clone()))
                .collect(),
        }
    }

    /// Counts logins against the counters every edge of `cluster` shares.
    #[must_use]
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> Self {
        self.shared = cluster.map(SharedThrottle::new);
        self
    }

    /// Starts the shared side of a check; `Ok(None)` without a cluster,
    /// and for credentials that passed recently (`remembered`): they pass
    /// again unchecked, as they do without a cluster, so an app sending
    /// them on every request is not counted as guessing.
    async fn shared_begin(
        &self,
        attempt: &Attempt,
        remembered: bool,
    ) -> Result<Option<SharedPending>, Duration> {
        match &self.shared {
            Some(s) if !remembered => s.begin(attempt).await,
            _ => Ok(None),
        }
    }

    /// Counts a failure that was no check on the shared counters too.
    async fn shared_failure(&self, attempt: &Attempt) {
        if let Some(s) = &self.shared {
            s.failure(attempt).await;
        }
    }

    /// `Err(wait)` when the local or the shared counters lock `attempt`.
    async fn check_all(&self, attempt: &Attempt) -> Result<(), Duration> {
        self.throttle.check(attempt)?;
        match &self.shared {
            Some(s) => s.check(attempt).await,
            None => Ok(()),
        }
    }

    /// The configured spelling of a user name typed in any case (a phone
    /// keyboard capitalises the first letter); other names as they are.
    fn canonical_user(&self, typed: String) -> String {
        if typed.len() > MAX_USER_NAME {
            return typed;
        }
        match self.folded.get(&typed.to_lowercase()) {
            Some(name) => name.clone(),
            None => typed,
        }
    }

    /// The signed-in user, and whether the session is due for renewal.
    fn session_user(
        &self,
        req: &Request<RequestBody>,
        route: &RouteConfig,
    ) -> Option<(String, bool)> {
        let s = self
            .sessions
            .verify(session::find_cookie(req.headers())?, &route.host)?;
        let current = self.users.get(&s.user).map(|u| u.tag);
        (route.users.contains(&s.user) && current == Some(s.password_tag))
            .then_some((s.user, s.renew))
    }

    fn session_cookie(&self, user: &str, route: &RouteConfig) -> Option<HeaderValue> {
        let tag = self.users.get(user)?.tag;
        Some(self.sessions.set_cookie(user, &route.host, tag))
    }

    /// The id of this browser's device token when it signed in as `user`
    /// before.
    fn device(&self, headers: &HeaderMap, user: &str, route: &RouteConfig) -> Option<[u8; 16]> {
        let d = self
            .sessions
            .verify_device(session::find_device_cookie(headers)?, &route.host)?;
        // Bound to the password it signed in with: a new password (or
        // `logout-all`) ends the exemption too.
        let current = self.users.get(user)?.tag;
        (d.user == user && d.password_tag == current).then_some(d.id)
    }

    /// Checks a user name and password for `route`, throttled.
    async fn check_password(
        &self,
        headers: &HeaderMap,
        user: &str,
        password: &str,
        route: &RouteConfig,
        client: IpAddr,
    ) -> PasswordCheck {
        let key = ClientKey::of(client);
        if user.len() > MAX_USER_NAME {
            // Refused unseen: nothing about the name is kept or logged.
            let attempt = Attempt::anonymous(key);
            if let Err(wait) = self.throttle.check(&attempt) {
                return PasswordCheck::Refuse(Refusal::TooManyLogins { retry_after: wait });
            }
            warn!(%client, user_len = user.len(), host = %route.host, "failed login: user name too long");
            self.throttle.failure(&attempt);
            self.shared_failure(&attempt).await;
            return match self.check_all(&attempt).await {
                Err(wait) => PasswordCheck::Refuse(Refusal::TooManyLogins { retry_after: wait }),
                Ok(()) => PasswordCheck::Wrong,
            };
        }
        let known = self.users.get(user).map(|u| u.name.clone());
        // A name that is not configured is logged as such: it is often a
        // password typed into the wrong field.
        let shown = known.as_deref().unwrap_or("<unknown>");
        let device = self.device(headers, user, route);
        let attempt = Attempt::new(key, known.clone(), device);
        if let Err(wait) = self.throttle.check(&attempt) {
            info!(%client, user = shown, retry_after = ?wait, "login throttled");
            return PasswordCheck::Refuse(Refusal::TooManyLogins { retry_after: wait });
        }
        let remembered = self.verifier.remembers_password(user, password.as_bytes());
        let shared = match self.shared_begin(&attempt, remembered).await {
            Ok(s) => s,
            Err(wait) => {
                info!(%client, user = shown, retry_after = ?wait, "login throttled by the cluster's counters");
                return PasswordCheck::Refuse(Refusal::TooManyLogins { retry_after: wait });
            }
        };
        let checked = self
            .verifier
            .verify_with(user, password.as_bytes(), || self.throttle.begin(&attempt))
            .await;
        let (verdict, pending) = match checked {
            Ok(c) => c,
            Err(wait) => {
                settle_shared(shared, Outcome::Released).await;
                info!(%client, user = shown, "login throttled: checks already running");
                return PasswordCheck::Refuse(Refusal::TooManyLogins { retry_after: wait });
            }
        };
        match verdict {
            Verdict::Valid if route.users.iter().any(|u| u == user) => {
                match pending {
                    Some(p) => p.succeeded(),
                    None => self.throttle.success(&attempt),
                }
                settle_shared(shared, Outcome::Succeeded).await;
                let mut cookies: Vec<HeaderValue> =
                    self.session_cookie(user, route).into_iter().collect();
                if device.is_none()
                    && let Some(tag) = self.users.get(user).map(|u| u.tag)
                {
                    cookies.extend(self.sessions.device_cookie(user, &route.host, tag));
                }
                PasswordCheck::Valid(cookies)
            }
            Verdict::Busy => {
                if let Some(p) = pending {
                    p.released();
                }
                settle_shared(shared, Outcome::Released).await;
                PasswordCheck::Refuse(Refusal::Unavailable {
                    message: "busy checking logins; try again",
                    retry_after: LOGIN_BUSY_RETRY,
                })
            }
            Verdict::Valid | Verdict::Invalid => {
                warn!(%client, user = shown, host = %route.host, known_device = device.is_some(), "failed login");
                // The same credential sent while its check ran shares that
                // check's verdict and its one failure.
                let checked_here = pending.is_some();
                if let Some(p) = pending {
                    p.failed();
                }
                let outcome = match checked_here {
                    true => Outcome::Failed,
                    false => Outcome::Released,
                };
                settle_shared(shared, outcome).await;
                // Tell the client at once if this failure locked it.
                match self.check_all(&attempt).await {
                    Err(wait) => {
                        PasswordCheck::Refuse(Refusal::TooManyLogins { retry_after: wait })
                    }
                    Ok(()) => PasswordCheck::Wrong,
                }
            }
        }
    }

    /// Checks an API key sent as a Bearer token on `route`, throttled per
    /// client address. A key seen before is known at once; a new one is
    /// checked against the hashes of the keys the route takes.
    async fn check_api_key(&self, token: &str, route: &RouteConfig, client: IpAddr) -> KeyCheck {
        let attempt = Attempt::anonymous(ClientKey::of(client));
        let refused = |wait| KeyCheck::Refuse(Refusal::TooManyLogins { retry_after: wait });
        if !api_key::well_formed(token) {
            // Not a key `keygen-api` makes: refused unhashed, and counted.
            if let Err(wait) = self.throttle.check(&attempt) {
                return refused(wait);
            }
            warn!(%client, host = %route.host, token_len = token.len(), "failed api key: not a burrow key");
            self.throttle.failure(&attempt);
            self.shared_failure(&attempt).await;
            return match self.check_all(&attempt).await {
                Err(wait) => refused(wait),
                Ok(()) => KeyCheck::Wrong,
            };
        }
        let names: Vec<&str> = route.api_keys.iter().map(|n| n.as_str()).collect();
        // A remembered key passes without the throttle: it is proven, and
        // guesses from the same address must not lock it out.
        let remembered = self.verifier.remembers_key(token.as_bytes());
        let shared = match self.shared_begin(&attempt, remembered).await {
            Ok(s) => s,
            Err(wait) => {
                info!(%client, host = %route.host, retry_after = ?wait, "api key throttled by the cluster's counters");
                return refused(wait);
            }
        };
        let checked = self
            .verifier
            .verify_key_with(&names, token.as_bytes(), || self.throttle.begin(&attempt))
            .await;
        let (verdict, pending) = match checked {
            Ok(c) => c,
            Err(wait) => {
                settle_shared(shared, Outcome::Released).await;
                info!(%client, host = %route.host, retry_after = ?wait, "api key throttled");
                return refused(wait);
            }
        };
        let checked_here = pending.is_some();
        match verdict {
            KeyVerdict::Valid(name) if names.contains(&&*name) => {
                match pending {
                    Some(p) => p.succeeded(),
                    None => self.throttle.success(&attempt),
                }
                settle_shared(shared, Outcome::Succeeded).await;
                KeyCheck::Valid(name)
            }
            KeyVerdict::Valid(name) => {
                // A real key, for other routes: no guess, not counted.
                if let Some(p) = pending {
                    p.released();
                }
                settle_shared(shared, Outcome::Released).await;
                info!(%client, host = %route.host, key = %name, "api key not taken on this route");
                KeyCheck::Wrong
            }
            KeyVerdict::Busy => {
                if let Some(p) = pending {
                    p.released();
                }
                settle_shared(shared, Outcome::Released).await;
                KeyCheck::Refuse(Refusal::Unavailable {
                    message: "busy checking logins; try again",
                    retry_after: LOGIN_BUSY_RETRY,
                })
            }
            KeyVerdict::Invalid => {
                warn!(%client, host = %route.host, "failed api key");
                if let Some(p) = pending {
                    p.failed();
                }
                let outcome = match checked_here {
                    true => Outcome::Failed,
                    false => Outcome::Released,
                };
                settle_shared(shared, outcome).await;
                match self.check_all(&attempt).await {
                    Err(wait) => refused(wait),
                    Ok(()) => KeyCheck::Wrong,
                }
            }
        }
    }

    /// Decides on `req` for `route`; `path` is its canonical path.
    pub async fn admit(
        &self,
        mut req: Request<RequestBody>,
        path: &str,
        route: &RouteConfig,
        client: IpAddr,
    ) -> Admission {
        if path == LOGOUT_PATH {
            return self.logout(&req, route);
        }
        if path == LOGIN_PATH {
            return self.login_form(req, route, client).await;
        }
        if is_public(path, &route.public_paths) {
            strip_credentials(&mut req);
            return Admission::Forward {
                req,
                user: None,
                set_cookies: Vec::new(),
            };
        }
        if let Some((user, renew)) = self.session_user(&req, route) {
            strip_credentials(&mut req);
            let set_cookies = if renew {
                self.session_cookie(&user, route).into_iter().collect()
            } else {
                Vec::new()
            };
            return Admission::Forward {
                req,
                user: Some(user),
                set_cookies,
            };
        }
        if !route.api_keys.is_empty()
            && let Some(token) = api_key::bearer(req.headers())
        {
            return match self.check_api_key(token, route, client).await {
                KeyCheck::Valid(name) => {
                    strip_credentials(&mut req);
                    Admission::Forward {
                        req,
                        user: Some(format!("key:{name}")),
                        set_cookies: Vec::new(),
                    }
                }
                KeyCheck::Wrong => Admission::Refuse(challenge(&req, route, None)),
                KeyCheck::Refuse(r) => Admission::Refuse(r),
            };
        }
        if let Some((user, password)) = basic_credentials(&req) {
            let user = self.canonical_user(user);
            return match self
                .check_password(req.headers(), &user, &password, route, client)
                .await
            {
                PasswordCheck::Valid(set_cookies) => {
                    strip_credentials(&mut req);
                    Admission::Forward {
                        req,
                        user: Some(user),
                        set_cookies,
                    }
                }
                PasswordCheck::Wrong => Admission::Refuse(challenge(&req, route, None)),
                PasswordCheck::Refuse(r) => Admission::Refuse(r),
            };
        }
        Admission::Refuse(challenge(&req, route, None))
    }

    /// GET shows the button; a POST from the site itself signs out.
    fn logout(&self, req: &Request<RequestBody>, route: &RouteConfig) -> Admission {
        let host = route.host.clone();
        match *req.method() {
            Method::GET | Method::HEAD => Admission::Reply(Reply::LogoutForm { host }),
            Method::POST if origin(req) == Origin::Same => {
                Admission::Reply(Reply::SignedOut { host })
            }
            Method::POST => {
                info!(host = %route.host, "logout posted from another site; refused");
                Admission::Refuse(Refusal::Forbidden("sign out from the site itself"))
            }
            _ => Admission::Refuse(Refusal::MethodNotAllowed("use the sign-out button")),
        }
    }

    async fn login_form(
        &self,
        req: Request<RequestBody>,
        route: &RouteConfig,
        client: IpAddr,
    ) -> Admission {
        let host = route.host.clone();
        if req.method() == Method::GET || req.method() == Method::HEAD {
            let next = "/".to_owned();
            return Admission::Reply(Reply::LoginForm { host, next });
        }
        if req.method() != Method::POST {
            return Admission::Refuse(Refusal::MethodNotAllowed("use the login form"));
        }
        // A form posted from another site would sign the browser in to an
        // account of the attacker's choosing (login CSRF).
        if origin(&req) == Origin::Other {
            info!(host = %route.host, "login posted from another site; refused");
            return Admission::Refuse(Refusal::Forbidden("sign in from the site itself"));
        }
        let (parts, body) = req.into_parts();
        let Ok(body) = Limited::new(body, MAX_FORM).collect().await else {
            return Admission::Refuse(Refusal::PayloadTooLarge("login form too large"));
        };
        let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        let user = self.canonical_user(login::form_value(&body, "user").unwrap_or_default());
        let password = login::form_value(&body, "password").unwrap_or_default();
        let next = login::form_value(&body, "next").unwrap_or_else(|| "/".into());
        match self
            .check_password(&parts.headers, &user, &password, route, client)
            .await
        {
            PasswordCheck::Valid(set_cookies) => Admission::Reply(Reply::SignedIn {
                location: login::safe_next(&next).to_owned(),
                set_cookies,
            }),
            PasswordCheck::Wrong => Admission::Refuse(Refusal::Unauthorized(Challenge {
                page: true,
                bearer: false,
                host,
                next: login::safe_next(&next).to_owned(),
                error: Some("Wrong user or password."),
            })),
            PasswordCheck::Refuse(r) => Admission::Refuse(r),
        }
    }
}

/// 401: the login page for a browser navigation, a Basic challenge (and a
/// Bearer one where the route takes API keys) for everyone else.
fn challenge(
    req: &Request<RequestBody>,
    route: &RouteConfig,
    error: Option<&'static str>,
) -> Refusal {
    let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Refusal::Unauthorized(Challenge {
        page: wants_html(req),
        bearer: !route.api_keys.is_empty(),
        host: route.host.clone(),
        next: login::safe_next(next).to_owned(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_paths_are_exact_or_prefix_patterns() {
        let p = ["/manifest.json", "/static/*"].map(|s| PublicPath::parse(s).unwrap());
        assert!(is_public("/manifest.json", &p));
        assert!(!is_public("/manifest.json.bak", &p));
        assert!(!is_public("/manifest", &p));
        assert!(is_public("/static/app.js", &p));
        assert!(!is_public("/staticx", &p));
        assert!(!is_public("/", &p));
    }
}
