//! Counters the edge keeps for `/metrics` (Prometheus text format) and
//! `/status`. Hot paths only touch atomics; gauges that other parts own
//! (agents connected, throttled addresses, certificates) are read when the
//! page is rendered.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use burrow_proto::listener::{Front, ListenerStats};

/// Upper bounds (seconds) of the time-to-first-byte histogram buckets.
pub const TTFB_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
];

/// Why the edge refused a request before forwarding it, beyond the
/// connection caps each listener counts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `[limits] streams_per_ip` requests in flight from the client already.
    StreamsPerIp,
    /// `[limits] held_per_client` requests held for waking services already.
    HeldPerClient,
    /// `[limits] held_per_service` requests held for the service already.
    HeldPerService,
    /// No stream to the agent could be opened in time (the agent is at its
    /// stream limit).
    OpenTimeout,
    /// A request body that did not authenticate arrived too slowly.
    SlowBody,
    /// Over the route's request rate limit.
    Rate,
    /// A request body larger than the route's `max_body`.
    MaxBody,
}

impl Refused {
    const ALL: [Refused; 7] = [
        Refused::StreamsPerIp,
        Refused::HeldPerClient,
        Refused::HeldPerService,
        Refused::OpenTimeout,
        Refused::SlowBody,
        Refused::Rate,
        Refused::MaxBody,
    ];

    fn label(self) -> &'static str {
        match self {
            Refused::StreamsPerIp => "streams_per_ip",
            Refused::HeldPerClient => "held_per_client",
            Refused::HeldPerService => "held_per_service",
            Refused::OpenTimeout => "open_timeout",
            Refused::SlowBody => "slow_body",
            Refused::Rate => "rate",
            Refused::MaxBody => "max_body",
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    refusals: [AtomicU64; Refused::ALL.len()],
    listeners: Mutex<Vec<(String, Arc<ListenerStats>)>>,
    streams_open: AtomicI64,
    streams_total: AtomicU64,
    bytes_to_agents: AtomicU64,
    bytes_from_agents: AtomicU64,
    /// Responses by status code, index = code - 100.
    responses: Vec<AtomicU64>,
    auth_failures: AtomicU64,
    /// Requests that came over HTTP/3.
    http3_requests: AtomicU64,
    ttfb: Histogram,
    /// By route host; only configured routes are counted, so bounded.
    routes: Mutex<BTreeMap<String, Arc<RouteStats>>>,
}

/// A time-to-first-byte histogram over [`TTFB_BUCKETS`], cumulative.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; TTFB_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (i, bound) in TTFB_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The upper bound (seconds) of the bucket the `q` quantile falls in;
    /// `None` with no observation, or beyond the last bucket.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let count = self.count();
        if count == 0 {
            return None;
        }
        let rank = ((q * count as f64).ceil() as u64).max(1);
        TTFB_BUCKETS
            .iter()
            .zip(&self.buckets)
            .find(|(_, b)| b.load(Ordering::Relaxed) >= rank)
            .map(|(bound, _)| *bound)
    }

    /// Writes the histogram as `name` with `labels` (`k="v",` each, or empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (i, bound) in TTFB_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}le=\"{bound}\"}} {}",
                load(&self.buckets[i])
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {count}");
        let plain = labels.trim_end_matches(',');
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(
            out,
            "{name}_sum{} {}",
            braces(plain),
            load(&self.sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{} {count}", braces(plain));
    }
}

/// What one route served: requests that reached its service (or its wake
/// path), bytes sent to clients, and time to first byte.
#[derive(Debug, Default)]
pub struct RouteStats {
    pub requests: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub ttfb: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            refusals: std::array::from_fn(|_| AtomicU64::new(0)),
            listeners: Mutex::default(),
            streams_open: AtomicI64::new(0),
            streams_total: AtomicU64::new(0),
            bytes_to_agents: AtomicU64::new(0),
            bytes_from_agents: AtomicU64::new(0),
            responses: (100..600).map(|_| AtomicU64::new(0)).collect(),
            auth_failures: AtomicU64::new(0),
            http3_requests: AtomicU64::new(0),
            ttfb: Histogram::default(),
            routes: Mutex::default(),
        }
    }
}

/// Counts one forwarded stream as open until dropped.
#[derive(Debug)]
pub struct StreamGuard(Arc<Metrics>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams_open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn stream_opened(self: &Arc<Self>) -> StreamGuard {
        self.streams_open.fetch_add(1, Ordering::Relaxed);
        self.streams_total.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }

    pub fn streams_open(&self) -> i64 {
        self.streams_open.load(Ordering::Relaxed)
    }

    pub fn add_to_agents(&self, n: u64) {
        self.bytes_to_agents.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_from_agents(&self, n: u64) {
        self.bytes_from_agents.fetch_add(n, Ordering::Relaxed);
    }

    pub fn response(&self, status: u16) {
        if let Some(c) = status
            .checked_sub(100)
            .and_then(|i| self.responses.get(usize::from(i)))
        {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn refused(&self, why: Refused) {
        self.refusals[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn refusals(&self, why: Refused) -> u64 {
        self.refusals[why as usize].load(Ordering::Relaxed)
    }

    /// Lists a listener's counters on `/metrics` under its name.
    pub fn add_listener(&self, front: &Front) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((front.name().to_owned(), front.stats()));
    }

    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// A request came over HTTP/3.
    pub fn http3_request(&self) {
        self.http3_requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn time_to_first_byte(&self, d: Duration) {
        self.ttfb.observe(d);
    }

    /// The counters of the route for `host` (a configured route's host).
    pub fn route(&self, host: &str) -> Arc<RouteStats> {
        let mut routes = self.routes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = routes.get(host) {
            return r.clone();
        }
        routes.entry(host.to_owned()).or_default().clone()
    }

    /// Every route's counters, by host.
    pub fn routes(&self) -> Vec<(String, Arc<RouteStats>)> {
        self.routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(h, r)| (h.clone(), r.clone()))
            .collect()
    }

    /// Renders the counters this struct owns.
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        family(
            out,
            "burrow_streams_open",
            "gauge",
            "Forwarded streams open now, idle pooled service connections included.",
        );
        let _ = writeln!(out, "burrow_streams_open {}", self.streams_open());
        family(
            out,
            "burrow_streams_total",
            "counter",
            "Forwarded streams opened (a pooled one serves many requests).",
        );
        let _ = writeln!(out, "burrow_streams_total {}", load(&self.streams_total));
        family(
            out,
            "burrow_bytes_total",
            "counter",
            "Bytes forwarded, by direction.",
        );
        let _ = writeln!(
            out,
            "burrow_bytes_total{{direction=\"to_agents\"}} {}",
            load(&self.bytes_to_agents)
        );
        let _ = writeln!(
            out,
            "burrow_bytes_total{{direction=\"from_agents\"}} {}",
            load(&self.bytes_from_agents)
        );
        family(
            out,
            "burrow_http_responses_total",
            "counter",
            "HTTP responses sent, by status code.",
        );
        for (i, c) in self.responses.iter().enumerate() {
            let n = load(c);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "burrow_http_responses_total{{code=\"{}\"}} {n}",
                    i + 100
                );
            }
        }
        family(
            out,
            "burrow_auth_failures_total",
            "counter",
            "Failed logins.",
        );
        let _ = writeln!(
            out,
            "burrow_auth_failures_total {}",
            load(&self.auth_failures)
        );
        family(
            out,
            "burrow_http3_requests_total",
            "counter",
            "Requests that came over HTTP/3 (`[edge] http3`); they are in the other counters too.",
        );
        let _ = writeln!(
            out,
            "burrow_http3_requests_total {}",
            load(&self.http3_requests)
        );
        family(
            out,
            "burrow_time_to_first_byte_seconds",
            "histogram",
            "Time from a request's arrival to the service's response headers.",
        );
        self.ttfb
            .render(out, "burrow_time_to_first_byte_seconds", "");
        let routes = self.routes();
        family(
            out,
            "burrow_route_requests_total",
            "counter",
            "Requests that reached a route's service (or its wake handling), by route host.",
        );
        for (host, r) in &routes {
            let _ = writeln!(
                out,
                "burrow_route_requests_total{{route=\"{}\"}} {}",
                label(host),
                load(&r.requests)
            );
        }
        family(
            out,
            "burrow_route_sent_bytes_total",
            "counter",
            "Response body bytes sent to clients, by route host.",
        );
        for (host, r) in &routes {
            let _ = writeln!(
                out,
                "burrow_route_sent_bytes_total{{route=\"{}\"}} {}",
                label(host),
                load(&r.bytes_sent)
            );
        }
        family(
            out,
            "burrow_route_time_to_first_byte_seconds",
            "histogram",
            "Time from a request's arrival to its response headers, by route host.",
        );
        for (host, r) in &routes {
            r.ttfb.render(
                out,
                "burrow_route_time_to_first_byte_seconds",
                &format!("route=\"{}\",", label(host)),
            );
        }
        family(
            out,
            "burrow_requests_refused_total",
            "counter",
            "Requests refused by a limit before they were forwarded, by reason.",
        );
        for why in Refused::ALL {
            let _ = writeln!(
                out,
                "burrow_requests_refused_total{{reason=\"{}\"}} {}",
                why.label(),
                self.refusals(why)
            );
        }
        self.render_listeners(out);
    }

    fn render_listeners(&self, out: &mut String) {
        let listeners = self.listeners.lock().unwrap_or_else(|e| e.into_inner());
        let families: [ListenerFamily; 5] = [
            (
                "burrow_connections_accepted_total",
                "counter",
                "Client connections accepted, by listener.",
                &[("", |s| &s.accepted)],
            ),
            (
                "burrow_connections_open",
                "gauge",
                "Client connections open now, by listener.",
                &[("", |s| &s.open)],
            ),
            (
                "burrow_connections_refused_total",
                "counter",
                "Client connections closed at once by a connection cap, by listener and reason.",
                &[
                    (",reason=\"connections_per_ip\"", |s| &s.refused_per_ip),
                    (",reason=\"connections\"", |s| &s.refused_total),
                ],
            ),
            (
                "burrow_connections_closed_idle_total",
                "counter",
                "Client connections closed after [limits] idle_timeout with no request in flight.",
                &[("", |s| &s.closed_idle)],
            ),
            (
                "burrow_accept_errors_total",
                "counter",
                "Failed accepts (out of file descriptors and the like), by listener; each pauses accepting briefly.",
                &[("", |s| &s.accept_errors)],
            ),
        ];
        for (name, kind, help, series) in families {
            family(out, name, kind, help);
            for (listener, stats) in listeners.iter() {
                for (labels, counter) in series {
                    let _ = writeln!(
                        out,
                        "{name}{{listener=\"{}\"{labels}}} {}",
                        label(listener),
                        counter(stats).load(Ordering::Relaxed)
                    );
                }
            }
        }
    }
}

/// A per-listener metric family: name, type, help, and its series (extra
/// labels and the counter each reads).
type ListenerFamily = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, fn(&ListenerStats) -> &AtomicU64)],
);

/// Writes the HELP and TYPE lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value (backslash, quote, newline).
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_counters_render_and_give_bucket_quantiles() {
        let m = Metrics::default();
        let r = m.route("chat.test");
        assert!(Arc::ptr_eq(&r, &m.route("chat.test")));
        assert_eq!(r.ttfb.quantile(0.5), None);
        for ms in [3, 3, 3, 40, 2_000] {
            r.ttfb.observe(Duration::from_millis(ms));
        }
        r.requests.fetch_add(5, Ordering::Relaxed);
        assert_eq!(r.ttfb.quantile(0.5), Some(0.005));
        assert_eq!(r.ttfb.quantile(0.8), Some(0.05));
        assert_eq!(r.ttfb.quantile(0.99), Some(5.0));
        r.ttfb.observe(Duration::from_secs(60));
        assert_eq!(r.ttfb.quantile(1.0), None, "past the last bucket");
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("burrow_route_requests_total{route=\"chat.test\"} 5\n"),
            "{out}"
        );
        assert!(
            out.contains("burrow_route_time_to_first_byte_seconds_bucket{route=\"chat.test\",le=\"0.005\"} 3\n"),
            "{out}"
        );
        assert!(
            out.contains("burrow_route_time_to_first_byte_seconds_count{route=\"chat.test\"} 6\n"),
            "{out}"
        );
        assert!(
            out.contains("burrow_time_to_first_byte_seconds_count 0\n"),
            "{out}"
        );
    }

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Arc::new(Metrics::default());
        let g = m.stream_opened();
        m.response(200);
        m.response(200);
        m.response(503);
        m.response(42);
        m.time_to_first_byte(Duration::from_millis(3));
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("burrow_streams_open 1\n"), "{out}");
        assert!(
            out.contains("burrow_http_responses_total{code=\"200\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("burrow_http_responses_total{code=\"503\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("le=\"0.0025\"} 0\n") && out.contains("le=\"0.005\"} 1\n"),
            "{out}"
        );
        drop(g);
        assert_eq!(m.streams_open(), 0);
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
