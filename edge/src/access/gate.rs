//! The authentication decision for one request on a route with
//! `auth = "basic"`: public paths, the login and logout pages, session
//! cookies, basic credentials (throttled, checked off the event loop), and
//! what an unauthenticated client is told.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tracing::{info, warn};

use super::auth::{Verdict, Verifier};
use super::login::{self, LOGIN_PATH, LOGOUT_PATH, MAX_FORM};
use super::pattern::PublicPath;
use super::session::{self, SessionKeys, password_tag};
use super::throttle::Throttle;
use crate::config::{RouteConfig, UserConfig};
use crate::http::{Body, error_response};

/// What to do with a request after authentication.
#[derive(Debug)]
pub enum Admission {
    /// Forward it (credentials meant for the edge removed); set the session
    /// cookie on the response when given.
    Forward {
        req: Request<Incoming>,
        user: Option<String>,
        set_cookie: Option<HeaderValue>,
    },
    Respond(Response<Body>),
}

/// The result of checking a password.
enum PasswordCheck {
    Valid,
    Wrong,
    /// Not checked or not answerable now (throttled, busy): send this.
    Refuse(Response<Body>),
}

/// Authentication state shared by all routes.
#[derive(Debug)]
pub struct Gate {
    pub verifier: Verifier,
    pub sessions: SessionKeys,
    pub throttle: Throttle,
    tags: HashMap<String, [u8; 8]>,
}

fn html(status: StatusCode, body: String) -> Response<Body> {
    crate::http::html_response(status, body)
}

fn redirect(location: &str, cookie: HeaderValue) -> Response<Body> {
    let mut r = error_response(StatusCode::SEE_OTHER, "continue");
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::SET_COOKIE, cookie);
    r
}

fn too_many(wait: std::time::Duration) -> Response<Body> {
    let mut r = error_response(
        StatusCode::TOO_MANY_REQUESTS,
        "too many failed logins; try again later",
    );
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    r.headers_mut()
        .insert(header::RETRY_AFTER, secs.max(1).into());
    r
}

fn busy() -> Response<Body> {
    let mut r = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "busy checking logins; try again",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

/// A browser navigation wants a page, an API client a 401 it can act on.
fn wants_html(req: &Request<Incoming>) -> bool {
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
fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
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

impl Gate {
    pub fn new(users: &[UserConfig], sessions: SessionKeys, verifier: Verifier) -> Self {
        Self {
            verifier,
            sessions,
            throttle: Throttle::new(),
            tags: users
                .iter()
                .map(|u| (u.name.clone(), password_tag(&u.password_hash)))
                .collect(),
        }
    }

    fn session_user(&self, req: &Request<Incoming>, route: &RouteConfig) -> Option<String> {
        let s = self
            .sessions
            .verify(session::find_cookie(req.headers())?, &route.host)?;
        (route.users.contains(&s.user) && self.tags.get(&s.user) == Some(&s.password_tag))
            .then_some(s.user)
    }

    fn cookie_for(&self, user: &str, route: &RouteConfig) -> Option<HeaderValue> {
        Some(
            self.sessions
                .set_cookie(user, &route.host, *self.tags.get(user)?),
        )
    }

    /// Checks a user name and password for `route`, throttled.
    async fn check_password(
        &self,
        user: &str,
        password: &str,
        route: &RouteConfig,
        client: IpAddr,
    ) -> PasswordCheck {
        if let Err(wait) = self.throttle.check(client, Some(user)) {
            info!(%client, user, retry_after = ?wait, "login throttled");
            return PasswordCheck::Refuse(too_many(wait));
        }
        match self.verifier.verify(user, password.as_bytes()).await {
            Verdict::Valid if route.users.iter().any(|u| u == user) => {
                self.throttle.success(client, user);
                PasswordCheck::Valid
            }
            Verdict::Busy => PasswordCheck::Refuse(busy()),
            Verdict::Valid | Verdict::Invalid => {
                warn!(%client, user, host = %route.host, "failed login");
                self.throttle.failure(client, Some(user));
                // Tell the client at once if this failure locked it.
                match self.throttle.check(client, Some(user)) {
                    Err(wait) => PasswordCheck::Refuse(too_many(wait)),
                    Ok(()) => PasswordCheck::Wrong,
                }
            }
        }
    }

    pub async fn admit(
        &self,
        mut req: Request<Incoming>,
        route: &RouteConfig,
        client: IpAddr,
    ) -> Admission {
        let path = req.uri().path().to_owned();
        if path == LOGOUT_PATH {
            let mut r = html(
                StatusCode::OK,
                login::page(&route.host, "/", Some("Signed out.")),
            );
            r.headers_mut()
                .insert(header::SET_COOKIE, session::clear_cookie());
            return Admission::Respond(r);
        }
        if path == LOGIN_PATH {
            return Admission::Respond(self.login_form(req, route, client).await);
        }
        if is_public(&path, &route.public_paths) {
            return Admission::Forward {
                req,
                user: None,
                set_cookie: None,
            };
        }
        if let Some(user) = self.session_user(&req, route) {
            session::strip_cookie(req.headers_mut());
            // The app's own credentials (a Bearer token) pass untouched;
            // basic credentials are ours and are not forwarded.
            if basic_credentials(&req).is_some() {
                req.headers_mut().remove(header::AUTHORIZATION);
            }
            return Admission::Forward {
                req,
                user: Some(user),
                set_cookie: None,
            };
        }
        if let Some((user, password)) = basic_credentials(&req) {
            return match self.check_password(&user, &password, route, client).await {
                PasswordCheck::Valid => {
                    req.headers_mut().remove(header::AUTHORIZATION);
                    session::strip_cookie(req.headers_mut());
                    let set_cookie = self.cookie_for(&user, route);
                    Admission::Forward {
                        req,
                        user: Some(user),
                        set_cookie,
                    }
                }
                PasswordCheck::Wrong => Admission::Respond(self.challenge(&req, route, None)),
                PasswordCheck::Refuse(r) => Admission::Respond(r),
            };
        }
        Admission::Respond(self.challenge(&req, route, None))
    }

    /// 401: the login page for a browser navigation, a Basic challenge for
    /// everyone else.
    fn challenge(
        &self,
        req: &Request<Incoming>,
        route: &RouteConfig,
        error: Option<&str>,
    ) -> Response<Body> {
        if wants_html(req) {
            let next = req.uri().path_and_query().map_or("/", |p| p.as_str());
            return html(
                StatusCode::UNAUTHORIZED,
                login::page(&route.host, next, error),
            );
        }
        let mut r = error_response(StatusCode::UNAUTHORIZED, "authentication required");
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"burrow\", charset=\"UTF-8\""),
        );
        r
    }

    async fn login_form(
        &self,
        req: Request<Incoming>,
        route: &RouteConfig,
        client: IpAddr,
    ) -> Response<Body> {
        if req.method() == Method::GET {
            return html(StatusCode::OK, login::page(&route.host, "/", None));
        }
        if req.method() != Method::POST {
            return error_response(StatusCode::METHOD_NOT_ALLOWED, "use the login form");
        }
        let Ok(body) = Limited::new(req.into_body(), MAX_FORM).collect().await else {
            return error_response(StatusCode::PAYLOAD_TOO_LARGE, "login form too large");
        };
        let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        let user = login::form_value(&body, "user").unwrap_or_default();
        let password = login::form_value(&body, "password").unwrap_or_default();
        let next = login::form_value(&body, "next").unwrap_or_else(|| "/".into());
        match self.check_password(&user, &password, route, client).await {
            PasswordCheck::Valid => match self.cookie_for(&user, route) {
                Some(cookie) => redirect(login::safe_next(&next), cookie),
                None => error_response(StatusCode::INTERNAL_SERVER_ERROR, "session unavailable"),
            },
            PasswordCheck::Wrong => html(
                StatusCode::UNAUTHORIZED,
                login::page(&route.host, &next, Some("Wrong user or password.")),
            ),
            PasswordCheck::Refuse(r) => r,
        }
    }
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
