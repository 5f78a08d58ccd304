//! The one map from a decision to a response: every [`Refusal`] and every
//! page of the edge's own ([`Reply`]) gets its status, headers and body
//! here. Bodies stay short and generic; the details go to the log where
//! the decision was made.

use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use super::{Body, error_response, html_response};
use crate::access::gate::Reply;
use crate::access::login;
use crate::access::session;
use crate::refusal::{Challenge, Refusal};

/// Retry-After in whole seconds, at least one.
fn retry_after(mut r: Response<Body>, wait: Duration) -> Response<Body> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    r.headers_mut()
        .insert(header::RETRY_AFTER, secs.max(1).into());
    r
}

/// The status a refusal is answered with.
pub fn status(refusal: &Refusal) -> StatusCode {
    match refusal {
        Refusal::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refusal::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Refusal::Forbidden(_) => StatusCode::FORBIDDEN,
        Refusal::NotFound => StatusCode::NOT_FOUND,
        Refusal::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        Refusal::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Refusal::Misdirected => StatusCode::MISDIRECTED_REQUEST,
        Refusal::TooManyLogins { .. } | Refusal::TooManyStreams | Refusal::RateLimited { .. } => {
            StatusCode::TOO_MANY_REQUESTS
        }
        Refusal::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        Refusal::BadGateway(_) => StatusCode::BAD_GATEWAY,
        Refusal::Unavailable { .. } | Refusal::Waking { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Refusal::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// The response for `refusal`.
pub fn response(refusal: Refusal) -> Response<Body> {
    let status = status(&refusal);
    match refusal {
        Refusal::Unauthorized(challenge) => unauthorized(challenge),
        Refusal::TooManyLogins { retry_after: wait } => retry_after(
            error_response(status, "too many failed logins; try again later"),
            wait,
        ),
        Refusal::RateLimited { retry_after: wait } => {
            retry_after(error_response(status, "too many requests; slow down"), wait)
        }
        Refusal::TooManyStreams => retry_after(
            error_response(status, "too many requests in flight from this address"),
            Duration::from_secs(1),
        ),
        Refusal::Unavailable {
            message,
            retry_after: wait,
        } => retry_after(error_response(status, message), wait),
        Refusal::Waking { host } => {
            retry_after(super::wake::waiting_page(&host), super::wake::RETRY_AFTER)
        }
        Refusal::NotFound => error_response(status, "no such site here"),
        Refusal::Misdirected => error_response(status, "this connection is for another site"),
        Refusal::BadRequest(m)
        | Refusal::Forbidden(m)
        | Refusal::MethodNotAllowed(m)
        | Refusal::PayloadTooLarge(m)
        | Refusal::Internal(m)
        | Refusal::BadGateway(m)
        | Refusal::GatewayTimeout(m) => error_response(status, m),
    }
}

/// 401: the login page for a browser navigation, a Basic challenge (and a
/// Bearer one where API keys are taken) for everyone else.
fn unauthorized(c: Challenge) -> Response<Body> {
    if c.page {
        return html_response(
            StatusCode::UNAUTHORIZED,
            login::page(&c.host, &c.next, c.error),
        );
    }
    let mut r = error_response(StatusCode::UNAUTHORIZED, "authentication required");
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"burrow\", charset=\"UTF-8\""),
    );
    if c.bearer {
        r.headers_mut().append(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"burrow\""),
        );
    }
    r
}

/// The response for one of the edge's own pages.
pub fn reply(reply: Reply) -> Response<Body> {
    match reply {
        Reply::LoginForm { host, next } => {
            html_response(StatusCode::OK, login::page(&host, &next, None))
        }
        Reply::LogoutForm { host } => html_response(StatusCode::OK, login::logout_page(&host)),
        Reply::SignedOut { host } => {
            let mut r = html_response(StatusCode::OK, login::page(&host, "/", Some("Signed out.")));
            r.headers_mut()
                .insert(header::SET_COOKIE, session::clear_cookie());
            r
        }
        Reply::SignedIn {
            location,
            set_cookies,
        } => {
            let mut r = error_response(StatusCode::SEE_OTHER, "continue");
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            for c in set_cookies {
                r.headers_mut().append(header::SET_COOKIE, c);
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_status_and_the_waits_are_said() {
        let login = Refusal::TooManyLogins {
            retry_after: Duration::from_millis(1500),
        };
        let r = response(login);
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let challenge = |page| {
            response(Refusal::Unauthorized(Challenge {
                page,
                bearer: false,
                host: "h".into(),
                next: "/".into(),
                error: None,
            }))
        };
        assert!(
            challenge(false)
                .headers()
                .contains_key(header::WWW_AUTHENTICATE)
        );
        let page = challenge(true);
        assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
        assert!(!page.headers().contains_key(header::WWW_AUTHENTICATE));
        assert_eq!(
            response(Refusal::Misdirected).status(),
            StatusCode::MISDIRECTED_REQUEST
        );
        let busy = response(Refusal::Unavailable {
            message: "busy",
            retry_after: Duration::from_secs(10),
        });
        assert_eq!(busy.headers()[header::RETRY_AFTER], "10");
    }
}
