//! The access log: one line per request (client, user, method, host, path,
//! status, bytes sent, duration, outcome), written when its response body
//! ends or the client goes away.

use std::net::IpAddr;

use bytes::Bytes;
use http::Method;
use tokio::time::Instant;
use tracing::info;

use super::{Body, InFlight};

/// What the access log says about one request.
#[derive(Debug)]
pub(super) struct AccessEntry {
    pub(super) client: IpAddr,
    pub(super) user: Option<String>,
    pub(super) method: Method,
    pub(super) host: String,
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) started: Instant,
    /// The route's counters, once the host matched one.
    pub(super) route: Option<std::sync::Arc<crate::metrics::RouteStats>>,
}

/// A response body that counts what it sends and writes the request's
/// access-log line when it ends (completed, or cut off by the client);
/// the request counts as in flight until then.
pub(super) struct LoggedBody {
    inner: Body,
    bytes: u64,
    /// The body's length when it was known up front.
    expected: Option<u64>,
    entry: Option<AccessEntry>,
    _in_flight: InFlight,
}

impl LoggedBody {
    pub(super) fn new(inner: Body, entry: AccessEntry, in_flight: InFlight) -> Self {
        let expected = hyper::body::Body::size_hint(&inner).exact();
        Self {
            inner,
            bytes: 0,
            expected,
            entry: Some(entry),
            _in_flight: in_flight,
        }
    }

    /// How a body that is dropped ended: hyper stops polling a body of
    /// known length once all of it is written, so "all of it sent" is
    /// complete too, not a client that went away.
    fn outcome_on_drop(&self) -> &'static str {
        let all_sent = self.expected.is_some_and(|n| self.bytes >= n);
        if all_sent || hyper::body::Body::is_end_stream(&self.inner) {
            "complete"
        } else {
            "client gone"
        }
    }

    fn log(&mut self, outcome: &'static str) {
        if let Some(e) = self.entry.take() {
            if let Some(route) = &e.route {
                route
                    .bytes_sent
                    .fetch_add(self.bytes, std::sync::atomic::Ordering::Relaxed);
            }
            info!(
                target: "burrow::access",
                client = %e.client,
                user = e.user.as_deref().unwrap_or("-"),
                method = %e.method,
                host = %e.host,
                path = %e.path,
                status = e.status,
                bytes = self.bytes,
                duration_ms = u64::try_from(e.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                outcome,
                "request"
            );
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            std::task::Poll::Ready(None) => this.log("complete"),
            std::task::Poll::Ready(Some(Err(_))) => this.log("error"),
            std::task::Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let outcome = self.outcome_on_drop();
        self.log(outcome);
    }
}
