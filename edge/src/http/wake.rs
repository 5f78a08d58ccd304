//! Requests for a service that is asleep or waking. Only requests that
//! passed access control ask the agent to wake it. Browser navigations get
//! a waiting page that follows progress through a small status endpoint and
//! reloads into the app when it is ready; other requests (API calls, SSE,
//! WebSockets) are held, bodies unread, and go on in arrival order once the
//! service is ready, or get 503 with Retry-After after `[route.wake] hold`.

use std::convert::Infallible;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

use burrow_proto::{ServiceState, StreamStatus, WakeMethod};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use super::Body;
use crate::access::login::escape;
use crate::config::RouteConfig;
use crate::refusal::Refusal;
use crate::tunnel::{OpenError, Registry};

/// The waiting page's status endpoint, on every route (behind its access
/// control like any other path).
pub const WAKE_STATUS_PATH: &str = "/.burrow/wake-status";
/// What Retry-After says when a service is still not ready.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);
/// How often the waiting page asks for the status.
pub const PAGE_POLL: Duration = Duration::from_secs(1);
/// Whether a request may switch a machine on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WakeRight {
    /// It passed access control (a signed-in user, or a route with `auth = "none"`).
    May,
    /// A public path on a route with auth: anyone could send it.
    MayNot,
}

/// The agent could not connect to the service: it may have gone to sleep
/// since the last probe.
pub fn worth_waking(e: &OpenError) -> bool {
    matches!(
        e,
        OpenError::Service {
            status: StreamStatus::Refused | StreamStatus::TimedOut,
            ..
        }
    )
}

/// A browser loading a page (not a script's fetch, not an upgrade).
pub fn is_navigation<B>(req: &Request<B>) -> bool {
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req
            .headers()
            .get_all(header::ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("text/html"))
}

/// 503 with Retry-After: the service is not ready.
pub fn unavailable(message: &'static str) -> Response<Body> {
    super::refuse::response(Refusal::Unavailable {
        message,
        retry_after: RETRY_AFTER,
    })
}

/// The page a browser gets while the service wakes (503, so nothing caches
/// or indexes it as the app); rendered for [`Refusal::Waking`].
pub(super) fn waiting_page(host: &str) -> Response<Body> {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
    );
    let host = escape(host);
    let _ = write!(
        html,
        "<title>Waking {host}</title>\
<style>body{{font:16px/1.5 system-ui,sans-serif;background:#101418;color:#e8ecef;display:grid;place-items:center;min-height:100vh;margin:0}}\
main{{background:#182028;padding:2rem;border-radius:.75rem;min-width:16rem;text-align:center}}\
#elapsed{{font-size:2rem;font-variant-numeric:tabular-nums}}.hint{{color:#9aa5ae}}</style></head><body>\
<main><h1 style=\"font-size:1.2rem;margin:0\">{host} is waking up</h1>\
<p id=\"elapsed\">0 s</p><p id=\"state\">Asking the machine to wake…</p><p class=\"hint\" id=\"hint\"></p></main>\
<script>\
const started=Date.now();let since=started;\
const $=id=>document.getElementById(id);\
const words={{waking:'Waking the machine…',down:'The machine is asleep; asking it to wake…',up:'Ready, loading…',unknown:'Checking…',offline:'The home server is offline; waiting for it…'}};\
setInterval(()=>{{$('elapsed').textContent=Math.floor((Date.now()-since)/1000)+' s'}},250);\
async function poll(){{try{{const r=await fetch('{WAKE_STATUS_PATH}',{{cache:'no-store',credentials:'same-origin'}});\
if(r.ok){{const s=await r.json();\
if(s.ready){{$('state').textContent=words.up;location.reload();return}}\
$('state').textContent=words[s.state]||s.state;\
if(s.waking_ms!=null)since=Math.min(since,Date.now()-s.waking_ms);\
if(s.last_wake_ms!=null)$('hint').textContent='The last wake took '+Math.round(s.last_wake_ms/1000)+' s.'}}}}catch(e){{}}\
setTimeout(poll,{poll})}}\
poll();</script></body></html>",
        poll = PAGE_POLL.as_millis(),
    );
    super::html_response(StatusCode::SERVICE_UNAVAILABLE, html)
}

/// The waiting page's view of the route's service, as JSON:
/// `{"state":"waking","ready":false,"waking_ms":1234,"last_wake_ms":null}`.
/// A poll that may wake finds a service that fell asleep again and asks.
pub fn status_response(
    registry: &Registry,
    route: &RouteConfig,
    right: WakeRight,
) -> Response<Body> {
    let status = registry.service(&route.agent, &route.service);
    if right == WakeRight::May
        && status
            .as_ref()
            .is_some_and(|s| s.state == ServiceState::Down && s.wake == WakeMethod::MagicPacket)
    {
        registry.request_wake(&route.agent, &route.service);
    }
    let (state, ready) = match &status {
        None => ("offline".to_owned(), false),
        Some(s) => (
            s.state.to_string(),
            matches!(s.state, ServiceState::Up | ServiceState::Unknown),
        ),
    };
    let report = registry.service_report(&route.agent, &route.service);
    let ms = |d: Duration| d.as_millis().to_string();
    let waking_ms = report
        .as_ref()
        .and_then(|r| r.waking_since)
        .map(|t| ms(SystemTime::now().duration_since(t).unwrap_or_default()))
        .unwrap_or_else(|| "null".into());
    let last_wake_ms = report
        .as_ref()
        .and_then(|r| r.last_wake)
        .map(|w| ms(w.took))
        .unwrap_or_else(|| "null".into());
    let body = format!(
        "{{\"state\":\"{state}\",\"ready\":{ready},\"waking_ms\":{waking_ms},\"last_wake_ms\":{last_wake_ms}}}\n"
    );
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use burrow_proto::Name;

    use super::*;

    #[test]
    fn navigations_are_page_loads() {
        let req = |method: &str, accept: &str| {
            Request::builder()
                .method(method)
                .header(header::ACCEPT, accept)
                .body(())
                .unwrap()
        };
        assert!(is_navigation(&req(
            "GET",
            "text/html,application/xhtml+xml"
        )));
        assert!(!is_navigation(&req("GET", "application/json")));
        assert!(!is_navigation(&req("POST", "text/html")));
        assert!(!is_navigation(&req("GET", "text/event-stream")));
    }

    #[test]
    fn connect_failures_are_worth_a_wake_other_failures_are_not() {
        let service = |status| OpenError::Service {
            service: Name::new("s").unwrap(),
            status,
            message: String::new(),
        };
        assert!(worth_waking(&service(StreamStatus::Refused)));
        assert!(worth_waking(&service(StreamStatus::TimedOut)));
        assert!(!worth_waking(&service(StreamStatus::UnknownService)));
        assert!(!worth_waking(&OpenError::ReplyTimeout));
    }

    #[tokio::test]
    async fn the_waiting_page_escapes_the_host_and_polls_the_status_path() {
        let r = super::super::refuse::response(Refusal::Waking {
            host: "a<b>.example".into(),
        });
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "10");
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        let html = String::from_utf8(body.to_vec()).unwrap();
        assert!(html.contains("a&lt;b&gt;.example is waking up"), "{html}");
        assert!(!html.contains("a<b>"));
        assert!(html.contains(&format!("fetch('{WAKE_STATUS_PATH}'")));
        assert!(html.contains("location.reload()"));
    }
}
