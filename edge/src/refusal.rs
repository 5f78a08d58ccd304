//! Every way the edge can decline a request, as data. The parts that decide
//! (access, limits, the tunnel, wake) return a [`Refusal`]; one map in
//! `http::refuse` turns each into its status, headers and body, so the
//! answers stay consistent and the deciding parts know nothing of HTTP
//! bodies.

use std::time::Duration;

/// Why a request is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: the request itself is wrong (a malformed Host or path).
    BadRequest(&'static str),
    /// 401: credentials needed. A browser navigation gets the login page
    /// (going back to `next` afterwards, with `error` shown when a login
    /// just failed); anything else a Basic challenge.
    Unauthorized(Challenge),
    /// 403: IP rules, or a form posted from another site.
    Forbidden(&'static str),
    /// 404: no route for this host.
    NotFound,
    /// 405: a method the edge's own page does not take.
    MethodNotAllowed(&'static str),
    /// 413: a form larger than the edge reads.
    PayloadTooLarge(&'static str),
    /// 421: the request names a host this connection was not made for.
    Misdirected,
    /// 429: too many failed logins from this client, for this user or
    /// from this device.
    TooManyLogins { retry_after: Duration },
    /// 429: too many requests in flight from one client address.
    TooManyStreams,
    /// 429: over the route's request rate limit.
    RateLimited { retry_after: Duration },
    /// 500: the edge cannot decide (a broken configuration, fail closed).
    Internal(&'static str),
    /// 502: the home server or the service is not reachable.
    BadGateway(&'static str),
    /// 503 with Retry-After: the waiting page for a browser navigation to
    /// a service that is waking.
    Waking { host: String },
    /// 503 with Retry-After: busy or waking; try again shortly.
    Unavailable {
        message: &'static str,
        retry_after: Duration,
    },
    /// 504: no answer in time.
    GatewayTimeout(&'static str),
}

/// How to ask for credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The login page (for a browser navigation) rather than a Basic
    /// challenge.
    pub page: bool,
    /// Beside the Basic challenge, a Bearer one: the route takes API keys.
    pub bearer: bool,
    /// The site's host, shown on the page.
    pub host: String,
    /// Where to go after signing in (a local path).
    pub next: String,
    /// Shown on the page: why the last attempt failed.
    pub error: Option<&'static str>,
}
