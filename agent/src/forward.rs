//! Serving one stream the edge opened: read its header, connect to the
//! service, answer, then pipe bytes both ways. A failed connect is reported
//! to the service's monitor, so a service believed up is marked down at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::framed::{FramedRecv, write_frames};
use burrow_proto::link::{RecvStream, SendStream};
use burrow_proto::pipe::pipe;
use burrow_proto::quic::code;
use burrow_proto::{Name, StreamKind, StreamOpen, StreamReply, StreamStatus};
use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tracing::{Instrument, debug, debug_span, warn};

use crate::cache::ResponseCache;
use crate::config::ServiceConfig;
use crate::monitor::Monitors;

/// How long the edge has to send a stream's header.
pub const STREAM_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to a local service may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting to a service that can be woken may take. A machine
/// asleep does not answer at all, so its connects hang; on a home network
/// an awake one answers in milliseconds, and the sooner the connect gives
/// up, the sooner the wake starts.
pub const WAKEABLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The connect timeout for `service`.
pub fn connect_timeout(service: &ServiceConfig) -> Duration {
    if service.wake.is_some() {
        WAKEABLE_CONNECT_TIMEOUT
    } else {
        CONNECT_TIMEOUT
    }
}

/// The services this agent forwards to, by name; a reload replaces them
/// while streams already connected carry on.
#[derive(Debug)]
pub struct Services {
    list: std::sync::RwLock<Vec<ServiceConfig>>,
    /// Cached answers of the services with `[service.wake] cached`.
    caches: HashMap<Name, Arc<ResponseCache>>,
}

impl Services {
    pub fn new(list: Vec<ServiceConfig>) -> Self {
        Self {
            list: std::sync::RwLock::new(list),
            caches: HashMap::new(),
        }
    }

    pub fn with_caches(mut self, caches: HashMap<Name, Arc<ResponseCache>>) -> Self {
        self.caches = caches;
        self
    }

    pub fn cache(&self, name: &Name) -> Option<Arc<ResponseCache>> {
        self.caches.get(name).cloned()
    }

    pub fn get(&self, name: &Name) -> Option<ServiceConfig> {
        self.list
            .read()
            .expect("services lock not poisoned")
            .iter()
            .find(|s| &s.name == name)
            .cloned()
    }

    pub fn set(&self, list: Vec<ServiceConfig>) {
        *self.list.write().expect("services lock not poisoned") = list;
    }
}

/// Handles one stream; never panics on what the edge sends.
pub async fn handle_stream(
    mut send: SendStream,
    recv: RecvStream,
    services: Arc<Services>,
    monitors: Monitors,
) {
    let mut framed = FramedRecv::new(recv);
    let open = match tokio::time::timeout(STREAM_HEADER_TIMEOUT, framed.next::<StreamOpen>()).await
    {
        Ok(Ok(Some(open))) => open,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            warn!(error = %e, "bad stream header from edge");
            send.reset(code::PROTOCOL);
            framed.stream_mut().stop(code::PROTOCOL);
            return;
        }
        Err(_) => {
            warn!("edge sent no stream header in time");
            send.reset(code::PROTOCOL);
            return;
        }
    };
    // A debug span, not info: tracing-subscriber keeps a slot for every
    // span that was ever open at once and never frees it, so an info span
    // per stream kept 3 MiB after 10,000 WebSockets had closed (the bench's
    // memory scenario). The warnings below name the stream themselves.
    let span =
        debug_span!("stream", service = %open.service, client = %open.client, kind = ?open.kind);
    serve(open, send, framed, services, monitors)
        .instrument(span)
        .await;
}

async fn serve(
    open: StreamOpen,
    mut send: SendStream,
    framed: FramedRecv,
    services: Arc<Services>,
    monitors: Monitors,
) {
    let reply = |status, message: String| StreamReply { status, message };
    if open.kind == StreamKind::Cached {
        return serve_cached(send, framed, services.cache(&open.service)).await;
    }
    let Some(service) = services.get(&open.service) else {
        warn!(service = %open.service, client = %open.client, "edge asked for an unknown service");
        let _ = write_frames(
            &mut send,
            [reply(
                StreamStatus::UnknownService,
                format!("no service {} on this agent", open.service),
            )],
        )
        .await;
        let _ = send.finish();
        return;
    };
    let tcp = match tokio::time::timeout(
        connect_timeout(&service),
        TcpStream::connect(&service.target),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            monitors.connect_failed(&service.name);
            warn!(service = %open.service, client = %open.client, target = %service.target, error = %e, "service refused the connection");
            let _ = write_frames(&mut send, [reply(StreamStatus::Refused, e.to_string())]).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            monitors.connect_failed(&service.name);
            warn!(service = %open.service, client = %open.client, target = %service.target, "service did not accept the connection in time");
            let _ = write_frames(
                &mut send,
                [reply(StreamStatus::TimedOut, "connect timed out".into())],
            )
            .await;
            let _ = send.finish();
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_frames(&mut send, [reply(StreamStatus::Connected, String::new())])
        .await
        .is_err()
    {
        return;
    }
    let (recv, initial) = framed.into_parts();
    match pipe(tcp, send, recv, initial).await {
        Ok(stats) => debug!(
            from_edge = stats.from_quic,
            to_edge = stats.to_quic,
            "stream done"
        ),
        Err(e) => debug!(error = %e, "stream aborted"),
    }
}

/// The answer to a GET whose path is not cached.
const CACHE_MISS: &[u8] =
    b"HTTP/1.1 404 Not Found\r\nX-Burrow-Cache: miss\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// A [`StreamKind::Cached`] stream: one GET answered from the service's
/// cached answers, the machine left asleep.
async fn serve_cached(mut send: SendStream, framed: FramedRecv, cache: Option<Arc<ResponseCache>>) {
    let Some(cache) = cache else {
        let refused = StreamReply {
            status: StreamStatus::Refused,
            message: "no cached answers for this service".into(),
        };
        let _ = write_frames(&mut send, [refused]).await;
        let _ = send.finish();
        return;
    };
    let connected = StreamReply {
        status: StreamStatus::Connected,
        message: String::new(),
    };
    if write_frames(&mut send, [connected]).await.is_err() {
        return;
    }
    let (mut recv, initial) = framed.into_parts();
    let mut buf = BytesMut::from(&initial[..]);
    let answer = tokio::time::timeout(
        STREAM_HEADER_TIMEOUT,
        cache.answer_request(&mut recv, &mut buf),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .flatten();
    let _ = send
        .write_chunk(answer.unwrap_or_else(|| Bytes::from_static(CACHE_MISS)))
        .await;
    let _ = send.finish();
}
