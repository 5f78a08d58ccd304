//! The admin listener: `/metrics` in Prometheus text format, `/status`
//! as JSON and `/` as an HTML page of the same status ([`view`]). It binds
//! to loopback by default and has no authentication, so it must not be
//! exposed.

pub mod view;

use std::convert::Infallible;
use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use burrow_proto::listener::{Front, Limits};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::http::{Body, HttpState, error_response};
use crate::metrics::{Metrics, family, label};
use crate::tls::CertStore;
use crate::tls::acme::AcmeManager;
use crate::tunnel::{Registry, ServiceReport};

/// What the admin pages read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub registry: Arc<Registry>,
    pub certs: Arc<CertStore>,
    pub acme: Option<Arc<AcmeManager>>,
    /// The current HTTP state (for the gate's throttle); absent without HTTPS.
    pub http: Option<watch::Receiver<Arc<HttpState>>>,
    /// With `[cluster]`: whether Redis answers.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

static STARTED: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();

/// Notes when the edge started serving (its counters start there).
pub fn mark_start() {
    STARTED.get_or_init(SystemTime::now);
}

/// When this process's counters started (they do not survive a restart).
fn started() -> SystemTime {
    *STARTED.get_or_init(SystemTime::now)
}

/// A free-text field of an agent's link report: `null` when empty.
fn report_field(s: &str) -> serde_json::Value {
    if s.is_empty() {
        serde_json::Value::Null
    } else {
        s.into()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl AdminState {
    fn throttled(&self) -> usize {
        self.http
            .as_ref()
            .and_then(|h| h.borrow().gate.clone())
            .map_or(0, |g| g.throttle.locked_addresses())
    }

    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(&mut out);
        let links = self.registry.connected();
        family(
            &mut out,
            "burrow_agents_connected",
            "gauge",
            "Agents with a live session.",
        );
        let _ = writeln!(out, "burrow_agents_connected {}", links.len());
        family(
            &mut out,
            "burrow_agent_transport",
            "gauge",
            "1 for each connected agent's transport (quic, or tcp when UDP is blocked); fallback says why it is not on quic.",
        );
        for link in &links {
            let report = link.report();
            let _ = writeln!(
                out,
                "burrow_agent_transport{{agent=\"{}\",transport=\"{}\",fallback=\"{}\"}} 1",
                label(link.name.as_str()),
                link.transport(),
                label(&report.fallback),
            );
        }
        family(
            &mut out,
            "burrow_agent_last_quic_probe_timestamp_seconds",
            "gauge",
            "When an agent on TCP last reported a failed QUIC probe (Unix time); see /status for why.",
        );
        for link in &links {
            if let Some(at) = link.last_probe_at() {
                let _ = writeln!(
                    out,
                    "burrow_agent_last_quic_probe_timestamp_seconds{{agent=\"{}\"}} {}",
                    label(link.name.as_str()),
                    unix(at)
                );
            }
        }
        family(
            &mut out,
            "burrow_requests_waiting_for_agent",
            "gauge",
            "Requests waiting now for an agent that is away ([edge] agent_wait).",
        );
        let _ = writeln!(
            out,
            "burrow_requests_waiting_for_agent {}",
            self.registry.waiting()
        );
        family(
            &mut out,
            "burrow_service_state",
            "gauge",
            "1 for each service's current state as its agent reports it.",
        );
        for link in &links {
            for s in link.services() {
                let _ = writeln!(
                    out,
                    "burrow_service_state{{agent=\"{}\",service=\"{}\",state=\"{}\"}} 1",
                    label(link.name.as_str()),
                    label(s.name.as_str()),
                    s.state
                );
            }
        }
        let reports = self.registry.service_reports();
        per_service(
            &mut out,
            &reports,
            ("burrow_wake_requests_total", "counter"),
            "Wake requests the edge sent, by service.",
            |r| Some(r.wake_requests as f64),
        );
        per_service(
            &mut out,
            &reports,
            ("burrow_requests_held", "gauge"),
            "Requests held now, waiting for their service to wake.",
            |r| Some(r.held as f64),
        );
        per_service(
            &mut out,
            &reports,
            ("burrow_last_wake_duration_seconds", "gauge"),
            "How long the last wake took, from request to ready.",
            |r| r.last_wake.as_ref().map(|w| w.took.as_secs_f64()),
        );
        family(
            &mut out,
            "burrow_throttled_addresses",
            "gauge",
            "Client addresses locked out after failed logins.",
        );
        let _ = writeln!(out, "burrow_throttled_addresses {}", self.throttled());
        family(
            &mut out,
            "burrow_certificate_expiry_timestamp_seconds",
            "gauge",
            "When each served certificate expires (Unix time).",
        );
        for (name, not_after) in self.certs.expiries() {
            let _ = writeln!(
                out,
                "burrow_certificate_expiry_timestamp_seconds{{name=\"{}\"}} {}",
                label(&name),
                unix(not_after)
            );
        }
        if let Some(cluster) = &self.cluster {
            family(
                &mut out,
                "burrow_cluster_redis_up",
                "gauge",
                "Whether the cluster's Redis answered last time it was asked (1) or is away (0).",
            );
            let _ = writeln!(
                out,
                "burrow_cluster_redis_up {}",
                u8::from(cluster.is_healthy())
            );
        }
        out
    }

    pub fn render_status(&self) -> serde_json::Value {
        let agents: Vec<_> = self
            .registry
            .connected()
            .into_iter()
            .map(|l| {
                let report = l.report();
                serde_json::json!({
                    "name": l.name.as_str(),
                    "session": l.session,
                    "remote": l.conn.remote_address().to_string(),
                    "transport": l.transport().as_str(),
                    "connected_since": unix(l.since),
                    "fallback": report_field(&report.fallback),
                    "last_probe": report_field(&report.probe),
                    "services": l.services().iter().map(|s| serde_json::json!({
                        "name": s.name.as_str(),
                        "state": s.state.to_string(),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let acme = self.acme.as_ref().map(|a| a.status()).unwrap_or_default();
        let certificates: Vec<_> = self
            .certs
            .expiries()
            .into_iter()
            .map(|(name, not_after)| {
                let st = acme.get(&name);
                serde_json::json!({
                    "name": name,
                    "not_after": unix(not_after),
                    "renew_at": st.and_then(|s| s.renew_at).map(unix),
                    "last_error": st.and_then(|s| s.last_error.clone()),
                    "next_attempt": st.and_then(|s| s.next_attempt).map(unix),
                })
            })
            .collect();
        let services: Vec<_> = self
            .registry
            .service_reports()
            .into_iter()
            .map(|r| {
                serde_json::json!({
                    "agent": r.agent.as_str(),
                    "service": r.service.as_str(),
                    "state": r.state.to_string(),
                    "waking_since": r.waking_since.map(unix),
                    "last_wake": r.last_wake.map(|w| serde_json::json!({
                        "at": unix(w.started),
                        "took_ms": u64::try_from(w.took.as_millis()).unwrap_or(u64::MAX),
                    })),
                    "wake_requests": r.wake_requests,
                    "held": r.held,
                })
            })
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            // Counters, session numbers and histories are this process's:
            // they start again with it.
            "started": unix(started()),
            "counters_since": "start",
            "agents": agents,
            "services": services,
            "certificates": certificates,
            "cluster": self.cluster.as_ref().map(|c| serde_json::json!({
                "redis": if c.is_healthy() { "up" } else { "away" },
            })),
            "routes": self.route_status(),
            "streams_open": self.metrics.streams_open(),
            "throttled_addresses": self.throttled(),
        })
    }
}

impl AdminState {
    /// Each route's requests, bytes sent and time-to-first-byte
    /// percentiles (the upper bound of the histogram bucket each falls
    /// in, in ms; `null` before the first request or past 30 s).
    fn route_status(&self) -> Vec<serde_json::Value> {
        let ms = |s: Option<f64>| s.map(|s| (s * 1000.0).round() as u64);
        self.metrics
            .routes()
            .into_iter()
            .map(|(host, r)| {
                serde_json::json!({
                    "host": host,
                    "requests": r.requests.load(std::sync::atomic::Ordering::Relaxed),
                    "bytes_sent": r.bytes_sent.load(std::sync::atomic::Ordering::Relaxed),
                    "ttfb_p50_ms": ms(r.ttfb.quantile(0.5)),
                    "ttfb_p90_ms": ms(r.ttfb.quantile(0.9)),
                    "ttfb_p99_ms": ms(r.ttfb.quantile(0.99)),
                })
            })
            .collect()
    }
}

/// Writes one family with a sample per service that has a value.
fn per_service(
    out: &mut String,
    reports: &[ServiceReport],
    (name, kind): (&str, &str),
    help: &str,
    value: impl Fn(&ServiceReport) -> Option<f64>,
) {
    family(out, name, kind, help);
    for r in reports {
        if let Some(v) = value(r) {
            let _ = writeln!(
                out,
                "{name}{{agent=\"{}\",service=\"{}\"}} {v}",
                label(r.agent.as_str()),
                label(r.service.as_str()),
            );
        }
    }
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let (content_type, body) = match req.uri().path() {
        "/metrics" => (
            "text/plain; version=0.0.4; charset=utf-8",
            state.render_metrics(),
        ),
        "/status" => ("application/json", format!("{:#}\n", state.render_status())),
        "/" => match view::Status::from_json(state.render_status()) {
            Ok(status) => (
                "text/html; charset=utf-8",
                status.html(unix(SystemTime::now())),
            ),
            Err(e) => {
                tracing::error!(error = %e, "the status does not fit the page (a bug)");
                return error_response(StatusCode::INTERNAL_SERVER_ERROR, "status page failed");
            }
        },
        _ => return error_response(StatusCode::NOT_FOUND, "try /, /metrics or /status"),
    };
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// The admin listener's caps: it is for the operator's scraper and
/// browser, on loopback.
pub const LIMITS: Limits = Limits {
    total: 256,
    per_ip: 64,
};
/// How long an admin connection may take for a request head.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin pages until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    front: Arc<Front>,
    shutdown: CancellationToken,
) {
    let state = Arc::new(state);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let builder = Arc::new(builder);
    front
        .serve(listener, shutdown, |tcp, peer, permit| {
            let state = state.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let service = service_fn(move |req: Request<Incoming>| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(respond(&state, &req)) }
                });
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                // A connection that never sends a request is closed too.
                match tokio::time::timeout(ADMIN_CONNECTION_LIFETIME, conn).await {
                    Ok(Err(e)) => debug!(%peer, error = %e, "admin connection error"),
                    Ok(Ok(())) => {}
                    Err(_) => debug!(%peer, "admin connection open too long; closed"),
                }
            });
        })
        .await;
}

/// An admin connection is closed after this long, whatever it does:
/// scrapers and the status page open a new one for each look.
pub const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(300);
