//! Byte streams the HTTP forwarder runs hyper over: a link's stream pair
//! (QUIC or TCP) as one duplex stream, an idle timer that counts bytes either way, and the
//! client's request body with its minimum pace.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Metrics, Refused, StreamGuard};
use crate::tunnel::OpenStream;

/// A forwarded stream as one duplex byte stream: reads yield the bytes that
/// came with the agent's reply first, then the link's receive stream. Bytes
/// each way are counted in the metrics; the stream counts as open until
/// this is dropped.
#[derive(Debug)]
pub struct LinkIo {
    prefix: Bytes,
    recv: burrow_proto::link::RecvStream,
    send: burrow_proto::link::SendStream,
    metrics: Arc<Metrics>,
    _open: StreamGuard,
}

impl LinkIo {
    pub fn new(stream: OpenStream, metrics: Arc<Metrics>) -> Self {
        metrics.add_from_agents(stream.initial.len() as u64);
        Self {
            prefix: stream.initial,
            recv: stream.recv,
            send: stream.send,
            _open: stream.guard,
            metrics,
        }
    }
}

impl AsyncRead for LinkIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.recv).poll_read(cx, buf);
        this.metrics
            .add_from_agents((buf.filled().len() - before) as u64);
        r
    }
}

impl AsyncWrite for LinkIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.send).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.metrics.add_to_agents(n as u64);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}

/// Fails reads with `TimedOut` once no byte has moved in either direction
/// for the timeout. Readers are always polled while a request or an upgraded
/// connection is open, so the check in `poll_read` is enough.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    timeout: Option<Duration>,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> IdleIo<T> {
    pub fn new(inner: T, timeout: Option<Duration>) -> Self {
        Self {
            inner,
            timeout,
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        }
    }

    fn touch(&mut self) {
        if let (Some(d), Some(t)) = (self.deadline.as_mut(), self.timeout) {
            d.as_mut().reset(Instant::now() + t);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.touch();
                Poll::Ready(r)
            }
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no bytes in either direction for the route's idle_timeout",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.touch();
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// How long a request body that did not authenticate has before its pace
/// counts, and the pace it must keep after: like Apache's mod_reqtimeout
/// (`body=20,MinRate=500`), the body's deadline is 20 s after the request,
/// pushed back 1 s for every 500 bytes received (counted from when the body
/// is first read: a request held while its service wakes is not late). A client that trickles
/// uploads to tie up agent streams is cut off; a phone uploading a
/// document on a poor link (tens of KB/s) is far above it. Bodies of
/// signed-in users have no pace: they are the owner's.
pub const BODY_GRACE: Duration = Duration::from_secs(20);
/// See [`BODY_GRACE`]: bytes per second of deadline extension.
pub const BODY_MIN_RATE: u64 = 500;

/// Whether a request body must keep [`BODY_MIN_RATE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paced {
    /// The request did not authenticate (`auth = "none"`, a public path).
    Yes,
    /// A signed-in user's request.
    No,
}

#[derive(Debug)]
struct Pace {
    /// Set when the body is first read.
    started: Option<(Instant, Pin<Box<Sleep>>)>,
    received: u64,
    metrics: Arc<Metrics>,
}

impl Pace {
    /// The deadline's timer, started on the first call.
    fn timer(&mut self) -> (Instant, Pin<&mut Sleep>) {
        let (started, timer) = self.started.get_or_insert_with(|| {
            let now = Instant::now();
            (now, Box::pin(tokio::time::sleep_until(now + BODY_GRACE)))
        });
        (*started, timer.as_mut())
    }

    fn received(&mut self, n: usize) {
        self.received += n as u64;
        let extension = Duration::from_secs(self.received / BODY_MIN_RATE);
        let (started, timer) = self.timer();
        timer.reset(started + BODY_GRACE + extension);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The receiving half of an HTTP/3 request stream.
pub type H3Recv =
    h3::server::RequestStream<super::h3_frames::GuardedRecv<h3_quinn::RecvStream>, Bytes>;

/// Where an HTTP/3 request body is in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum H3Part {
    Data,
    Trailers,
    Done,
}

/// A request body that does not match its Content-Length (RFC 9114
/// 4.1.2: a malformed request); the service sees it aborted.
#[derive(Debug, thiserror::Error)]
#[error("request body of {received}+ bytes, its Content-Length says {declared}")]
pub struct LengthMismatch {
    declared: u64,
    received: u64,
}

/// An HTTP/3 request body: DATA frames, then trailers, then the end.
pub struct H3Body {
    stream: H3Recv,
    /// What was read ahead, see [`RequestBody::peek_h3`].
    peeked: Option<Result<hyper::body::Frame<Bytes>, BoxError>>,
    part: H3Part,
    /// Content-Length, held against what comes.
    declared: Option<u64>,
    received: u64,
}

impl H3Body {
    fn mismatch(&mut self) -> BoxError {
        self.part = H3Part::Done;
        Box::new(LengthMismatch {
            declared: self.declared.unwrap_or_default(),
            received: self.received,
        })
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use hyper::body::Frame;
        loop {
            match self.part {
                H3Part::Data => match self.stream.poll_recv_data(cx) {
                    Poll::Ready(Ok(Some(mut buf))) => {
                        let data = buf.copy_to_bytes(buf.remaining());
                        if data.is_empty() {
                            continue;
                        }
                        self.received += data.len() as u64;
                        if self.declared.is_some_and(|d| self.received > d) {
                            return Poll::Ready(Some(Err(self.mismatch())));
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Poll::Ready(Ok(None)) => {
                        if self.declared.is_some_and(|d| self.received != d) {
                            return Poll::Ready(Some(Err(self.mismatch())));
                        }
                        self.part = H3Part::Trailers;
                    }
                    Poll::Ready(Err(e)) => {
                        self.part = H3Part::Done;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                H3Part::Trailers => {
                    let polled = self.stream.poll_recv_trailers(cx);
                    if polled.is_ready() {
                        self.part = H3Part::Done;
                    }
                    return match polled {
                        Poll::Ready(Ok(Some(trailers))) => {
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Poll::Ready(Ok(None)) => Poll::Ready(None),
                        Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                H3Part::Done => return Poll::Ready(None),
            }
        }
    }
}

/// A client's request body as its connection delivers it: hyper's for
/// HTTP/1.1 and HTTP/2, an HTTP/3 request stream's for HTTP/3. Everything
/// after the connection (gate, forwarding, pacing) reads it the same way.
pub enum RequestBody {
    Hyper(hyper::body::Incoming),
    H3(Box<H3Body>),
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Hyper(b) => b.fmt(f),
            Self::H3(b) => f.debug_struct("H3").field("part", &b.part).finish(),
        }
    }
}

impl RequestBody {
    /// The body of an HTTP/3 request whose head declared `content_length`.
    pub fn h3(stream: H3Recv, content_length: Option<u64>) -> Self {
        Self::H3(Box::new(H3Body {
            stream,
            peeked: None,
            part: H3Part::Data,
            declared: content_length,
            received: 0,
        }))
    }

    /// Reads ahead until the body's first frame or its end, so a request
    /// without a body says so (HTTP/3 has no end-of-stream flag on the
    /// head, and an unknown-length body would be forwarded chunked).
    /// Cancel-safe: what was read stays in the body.
    pub async fn peek_h3(&mut self) {
        if let Self::H3(b) = self
            && b.peeked.is_none()
            && b.part != H3Part::Done
        {
            b.peeked = std::future::poll_fn(|cx| b.poll_next(cx)).await;
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Self::H3(b) => match b.peeked.take() {
                Some(frame) => Poll::Ready(Some(frame)),
                None => b.poll_next(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Hyper(b) => b.is_end_stream(),
            Self::H3(b) => b.peeked.is_none() && b.part == H3Part::Done,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Self::Hyper(b) => b.size_hint(),
            _ if self.is_end_stream() => hyper::body::SizeHint::with_exact(0),
            Self::H3(b) => match b.declared {
                Some(d) if b.peeked.is_none() => {
                    hyper::body::SizeHint::with_exact(d.saturating_sub(b.received))
                }
                _ => hyper::body::SizeHint::default(),
            },
        }
    }
}

/// A client's request body on its way to the service. When paced, a body
/// that falls behind fails with an error, so the service sees an aborted
/// request, never a complete one.
#[derive(Debug)]
pub struct ClientBody {
    inner: RequestBody,
    pace: Option<Pace>,
    /// The route's `max_body`, the bytes read so far, and where a cut is
    /// counted.
    limit: Option<(u64, u64, Arc<Metrics>)>,
}

impl ClientBody {
    pub fn new(inner: RequestBody, paced: Paced, metrics: &Arc<Metrics>) -> Self {
        let pace =
            (paced == Paced::Yes && !hyper::body::Body::is_end_stream(&inner)).then(|| Pace {
                started: None,
                received: 0,
                metrics: metrics.clone(),
            });
        Self {
            inner,
            pace,
            limit: None,
        }
    }

    /// Fails the body once more than `max` bytes have come (`max_body`).
    pub fn with_limit(mut self, max: Option<u64>, metrics: &Arc<Metrics>) -> Self {
        self.limit = max.map(|m| (m, 0, metrics.clone()));
        self
    }
}

/// The error a body longer than the route's `max_body` fails with; the
/// service sees an aborted request, and the client 413.
#[derive(Debug, thiserror::Error)]
#[error("request body over max_body ({max} bytes)")]
pub struct BodyTooLarge {
    max: u64,
}

/// Whether `e` (a failed forward) came from a body over `max_body`.
pub fn is_body_too_large(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if c.is::<BodyTooLarge>() {
            return true;
        }
        cause = c.source();
    }
    false
}

/// The error a paced body fails with.
#[derive(Debug, thiserror::Error)]
#[error("request body too slow: {received} bytes in {elapsed:?}")]
pub struct SlowBody {
    received: u64,
    elapsed: Duration,
}

impl hyper::body::Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(pace), Some(data)) = (this.pace.as_mut(), frame.data_ref()) {
                    pace.received(data.len());
                }
                if let (Some((max, read, metrics)), Some(data)) =
                    (this.limit.as_mut(), frame.data_ref())
                {
                    *read += data.len() as u64;
                    if *read > *max {
                        let max = *max;
                        metrics.refused(Refused::MaxBody);
                        this.limit = None;
                        this.pace = None;
                        tracing::info!(max_body = max, "cutting off a request body over max_body");
                        return Poll::Ready(Some(Err(BodyTooLarge { max }.into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => {
                this.pace = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(pace) = this.pace.as_mut() else {
                    return Poll::Pending;
                };
                let (started, timer) = pace.timer();
                if timer.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                pace.metrics.refused(Refused::SlowBody);
                let e = SlowBody {
                    received: pace.received,
                    elapsed: started.elapsed(),
                };
                tracing::info!(error = %e, "cutting off a request body that did not authenticate");
                this.pace = None;
                Poll::Ready(Some(Err(e.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
