//! A bound on the HTTP/3 frames a browser may make the edge hold.
//!
//! The `h3` crate reads a frame other than DATA whole before it decodes
//! it, however long the frame says it is, and every byte it reads gives
//! the client more QUIC flow-control credit: one HEADERS frame (or a frame
//! of an unknown type, which must be skipped) declaring a gigabyte would
//! stream into the edge's memory. [`Guarded`] wraps `h3-quinn`'s
//! connection and reads the frame headers on each request stream and on
//! the control stream as the bytes go by: a frame that is not DATA and
//! declares more than [`MAX_FRAME`] bytes fails its stream (a request) or
//! the connection (the control stream) before anything is buffered. DATA
//! frames pass; `h3` hands their bytes on as they come.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h3::quic::{self, ConnectionErrorIncoming, StreamErrorIncoming, StreamId, WriteBuf};

/// The longest frame other than DATA a client may send: a request head at
/// the edge's limit ([`super::MAX_HEADER_BYTES`]) with room for QPACK's
/// encoding of it.
pub const MAX_FRAME: u64 = 2 * super::MAX_HEADER_BYTES as u64;

/// HTTP/3 frame type DATA.
const DATA: u64 = 0x0;
/// The WebTransport stream signal, a frame type without a length; burrow
/// does not offer WebTransport.
const WEBTRANSPORT_STREAM: u64 = 0x41;
/// Unidirectional stream type of the control stream.
const CONTROL_STREAM: u64 = 0x0;

/// The bytes of a frame header (two varints) read so far; kept inline, as
/// every frame has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct HeaderBytes {
    bytes: [u8; 16],
    len: usize,
}

impl HeaderBytes {
    fn push(&mut self, b: u8) {
        self.bytes[self.len] = b;
        self.len += 1;
    }

    fn get(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a stream has been read up to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scan {
    /// A unidirectional stream's type, being read.
    StreamType(HeaderBytes),
    /// A frame header (type and length), being read.
    Header(HeaderBytes),
    /// Inside a frame: this many payload bytes to go.
    Payload(u64),
    /// Not framed as HTTP/3 (QPACK's streams, unknown types): `h3` does
    /// not read those into memory.
    Through,
}

/// The error a stream fails with when it ends inside a frame.
#[derive(Debug, thiserror::Error)]
#[error("HTTP/3 stream ended inside a frame")]
pub struct CutFrame;

/// The error a stream fails with when a frame is over [`MAX_FRAME`].
#[derive(Debug, thiserror::Error)]
#[error("HTTP/3 frame of type {kind:#x} declares {len} bytes, over the {MAX_FRAME}-byte limit")]
pub struct FrameTooLarge {
    kind: u64,
    len: u64,
}

/// The length of the QUIC variable-length integer starting with `first`.
fn varint_len(first: u8) -> usize {
    1 << (first >> 6)
}

/// The value of a whole varint.
fn varint(bytes: &[u8]) -> u64 {
    let mut v = u64::from(bytes[0] & 0x3f);
    for b in &bytes[1..] {
        v = v << 8 | u64::from(*b);
    }
    v
}

/// Reads frame headers off a stream's bytes.
#[derive(Debug, Clone)]
pub struct FrameGuard {
    scan: Scan,
}

impl FrameGuard {
    /// For a request stream: frames from its first byte.
    pub fn request() -> Self {
        Self {
            scan: Scan::Header(HeaderBytes::default()),
        }
    }

    /// For a unidirectional stream: its type first.
    pub fn unidirectional() -> Self {
        Self {
            scan: Scan::StreamType(HeaderBytes::default()),
        }
    }

    /// Whether the stream could end here: not inside a frame. (`h3`
    /// asserts that a stream which ends mid-frame never happens.)
    fn at_boundary(&self) -> bool {
        match &self.scan {
            Scan::StreamType(buf) | Scan::Header(buf) => buf.is_empty(),
            Scan::Payload(_) => false,
            Scan::Through => true,
        }
    }

    /// Takes the next bytes of the stream; an error once a frame is over
    /// the limit.
    pub fn scan(&mut self, mut data: &[u8]) -> Result<(), FrameTooLarge> {
        while !data.is_empty() {
            match &mut self.scan {
                Scan::Through => return Ok(()),
                Scan::Payload(left) => {
                    let n = (*left).min(data.len() as u64);
                    data = &data[usize::try_from(n).unwrap_or(data.len())..];
                    *left -= n;
                    if *left == 0 {
                        self.scan = Scan::Header(HeaderBytes::default());
                    }
                }
                Scan::StreamType(read) => {
                    read.push(data[0]);
                    data = &data[1..];
                    let buf = read.get();
                    if buf.len() == varint_len(buf[0]) {
                        self.scan = if varint(buf) == CONTROL_STREAM {
                            Scan::Header(HeaderBytes::default())
                        } else {
                            Scan::Through
                        };
                    }
                }
                Scan::Header(read) => {
                    // A type and a length: at most 8 + 8 bytes, which the
                    // checks below never let it pass.
                    read.push(data[0]);
                    data = &data[1..];
                    let buf = read.get();
                    let kind_len = varint_len(buf[0]);
                    if buf.len() < kind_len {
                        continue;
                    }
                    if buf.len() == kind_len {
                        // A frame type without a length follows no rules
                        // this guard could hold it to.
                        let kind = varint(buf);
                        if kind == WEBTRANSPORT_STREAM {
                            return Err(FrameTooLarge {
                                kind,
                                len: u64::MAX,
                            });
                        }
                        continue;
                    }
                    if buf.len() < kind_len + varint_len(buf[kind_len]) {
                        continue;
                    }
                    let kind = varint(&buf[..kind_len]);
                    let len = varint(&buf[kind_len..]);
                    if kind != DATA && len > MAX_FRAME {
                        return Err(FrameTooLarge { kind, len });
                    }
                    self.scan = if len == 0 {
                        Scan::Header(HeaderBytes::default())
                    } else {
                        Scan::Payload(len)
                    };
                }
            }
        }
        Ok(())
    }
}

/// `h3-quinn`'s connection with every stream a client opens guarded.
pub struct Guarded {
    inner: h3_quinn::Connection,
    goaway: Arc<GoawayState>,
}

/// What the connection and its GOAWAY share: the last request stream
/// accepted, and from which stream id on requests are refused.
#[derive(Debug)]
pub struct GoawayState {
    /// The last accepted request stream's id + 1 (0: none yet).
    accepted: AtomicU64,
    /// Request streams with an id at or above this are refused.
    reject_from: AtomicU64,
}

/// H3_REQUEST_REJECTED: a request the edge did not process (a client may
/// send it again elsewhere).
const REQUEST_REJECTED: u64 = 0x10b;
/// Distance between two client-initiated bidirectional stream ids.
const NEXT_BIDI: u64 = 4;

impl GoawayState {
    /// The id GOAWAY names when no request after the ones accepted will
    /// be served (what `h3`'s `shutdown(1)` sends), and from now on
    /// streams at or above it are refused: `h3` itself would still serve
    /// the stream with exactly that id, which the client takes for
    /// unprocessed and may send again.
    pub fn close_after_accepted(&self) {
        let next = match self.accepted.load(Ordering::Acquire) {
            0 => 0,
            last_plus_one => last_plus_one - 1 + NEXT_BIDI,
        };
        self.reject_from.store(next, Ordering::Release);
    }
}

impl Guarded {
    pub fn new(inner: h3_quinn::Connection) -> (Self, Arc<GoawayState>) {
        let goaway = Arc::new(GoawayState {
            accepted: AtomicU64::new(0),
            reject_from: AtomicU64::new(u64::MAX),
        });
        (
            Self {
                inner,
                goaway: goaway.clone(),
            },
            goaway,
        )
    }
}

/// A receiving stream whose frames are checked as they are read.
pub struct GuardedRecv<S> {
    inner: S,
    guard: FrameGuard,
}

/// A request stream: sent as is, received through a [`FrameGuard`].
pub struct GuardedBidi<B: Buf> {
    inner: h3_quinn::BidiStream<B>,
    guard: FrameGuard,
}

impl<B: Buf> GuardedBidi<B> {
    fn new(inner: h3_quinn::BidiStream<B>) -> Self {
        Self {
            inner,
            guard: FrameGuard::request(),
        }
    }
}

/// Opens streams for the server (its control and QPACK streams); what it
/// opens needs no guard, the edge writes it.
pub struct GuardedOpen(h3_quinn::OpenStreams);

/// H3_EXCESSIVE_LOAD: what a stream with a frame over the limit is
/// stopped (and reset) with.
const EXCESSIVE_LOAD: u64 = 0x107;

/// Passes `polled` through `guard`; on a frame over the limit, `refuse`
/// stops the stream and the read fails.
fn checked(
    guard: &mut FrameGuard,
    polled: Poll<Result<Option<Bytes>, StreamErrorIncoming>>,
    refuse: impl FnOnce(),
) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
    match polled {
        Poll::Ready(Ok(Some(data))) => match guard.scan(data.chunk()) {
            Ok(()) => Poll::Ready(Ok(Some(data))),
            Err(e) => {
                tracing::debug!(error = %e, "refusing an http/3 frame");
                refuse();
                Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(e))))
            }
        },
        Poll::Ready(Ok(None)) if !guard.at_boundary() => {
            tracing::debug!("an http/3 stream ended inside a frame");
            Poll::Ready(Err(StreamErrorIncoming::Unknown(Box::new(CutFrame))))
        }
        other => other,
    }
}

impl<S: quic::RecvStream<Buf = Bytes>> quic::RecvStream for GuardedRecv<S> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let polled = self.inner.poll_data(cx);
        let inner = &mut self.inner;
        checked(&mut self.guard, polled, || {
            inner.stop_sending(EXCESSIVE_LOAD)
        })
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<B: Buf> quic::RecvStream for GuardedBidi<B> {
    type Buf = Bytes;

    fn poll_data(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, StreamErrorIncoming>> {
        let polled = self.inner.poll_data(cx);
        let inner = &mut self.inner;
        checked(&mut self.guard, polled, || {
            // No response will come on this request stream either.
            quic::RecvStream::stop_sending(inner, EXCESSIVE_LOAD);
            quic::SendStream::<B>::reset(inner, EXCESSIVE_LOAD);
        })
    }

    fn stop_sending(&mut self, error_code: u64) {
        self.inner.stop_sending(error_code);
    }

    fn recv_id(&self) -> StreamId {
        self.inner.recv_id()
    }
}

impl<B: Buf> quic::SendStream<B> for GuardedBidi<B> {
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_ready(cx)
    }

    fn send_data<T: Into<WriteBuf<B>>>(&mut self, data: T) -> Result<(), StreamErrorIncoming> {
        self.inner.send_data(data)
    }

    fn poll_finish(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StreamErrorIncoming>> {
        self.inner.poll_finish(cx)
    }

    fn reset(&mut self, reset_code: u64) {
        self.inner.reset(reset_code);
    }

    fn send_id(&self) -> StreamId {
        self.inner.send_id()
    }
}

impl<B: Buf> quic::BidiStream<B> for GuardedBidi<B> {
    type SendStream = h3_quinn::SendStream<B>;
    type RecvStream = GuardedRecv<h3_quinn::RecvStream>;

    fn split(self) -> (Self::SendStream, Self::RecvStream) {
        let (send, recv) = self.inner.split();
        (
            send,
            GuardedRecv {
                inner: recv,
                guard: self.guard,
            },
        )
    }
}

impl<B: Buf> quic::OpenStreams<B> for GuardedOpen {
    type BidiStream = GuardedBidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        self.0.poll_open_bidi(cx).map_ok(GuardedBidi::new)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        self.0.poll_open_send(cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.0, code, reason);
    }
}

impl<B: Buf> quic::OpenStreams<B> for Guarded {
    type BidiStream = GuardedBidi<B>;
    type SendStream = h3_quinn::SendStream<B>;

    fn poll_open_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_bidi(&mut self.inner, cx).map_ok(GuardedBidi::new)
    }

    fn poll_open_send(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::SendStream, StreamErrorIncoming>> {
        quic::OpenStreams::<B>::poll_open_send(&mut self.inner, cx)
    }

    fn close(&mut self, code: h3::error::Code, reason: &[u8]) {
        quic::OpenStreams::<B>::close(&mut self.inner, code, reason);
    }
}

impl<B: Buf> quic::Connection<B> for Guarded {
    type RecvStream = GuardedRecv<h3_quinn::RecvStream>;
    type OpenStreams = GuardedOpen;

    fn poll_accept_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::RecvStream, ConnectionErrorIncoming>> {
        quic::Connection::<B>::poll_accept_recv(&mut self.inner, cx).map_ok(|inner| GuardedRecv {
            inner,
            guard: FrameGuard::unidirectional(),
        })
    }

    fn poll_accept_bidi(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::BidiStream, ConnectionErrorIncoming>> {
        loop {
            let mut inner = match std::task::ready!(quic::Connection::<B>::poll_accept_bidi(
                &mut self.inner,
                cx
            )) {
                Ok(s) => s,
                Err(e) => return Poll::Ready(Err(e)),
            };
            let id = quic::SendStream::<B>::send_id(&inner).into_inner();
            if id >= self.goaway.reject_from.load(Ordering::Acquire) {
                quic::RecvStream::stop_sending(&mut inner, REQUEST_REJECTED);
                quic::SendStream::<B>::reset(&mut inner, REQUEST_REJECTED);
                continue;
            }
            self.goaway.accepted.fetch_max(id + 1, Ordering::AcqRel);
            return Poll::Ready(Ok(GuardedBidi::new(inner)));
        }
    }

    fn opener(&self) -> Self::OpenStreams {
        GuardedOpen(quic::Connection::<B>::opener(&self.inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A varint in its shortest form.
    fn var(v: u64) -> Vec<u8> {
        match v {
            0..=63 => vec![v as u8],
            64..=16383 => (0x4000 | v as u16).to_be_bytes().to_vec(),
            16384..=1_073_741_823 => (0x8000_0000 | v as u32).to_be_bytes().to_vec(),
            _ => (0xc000_0000_0000_0000 | v).to_be_bytes().to_vec(),
        }
    }

    fn frame(kind: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = var(kind);
        f.extend(var(payload.len() as u64));
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` to `guard` in pieces of `step`.
    fn feed(guard: &mut FrameGuard, bytes: &[u8], step: usize) -> Result<(), FrameTooLarge> {
        bytes.chunks(step).try_for_each(|c| guard.scan(c))
    }

    #[test]
    fn a_request_with_big_data_and_headers_at_the_limit_passes_in_any_pieces() {
        let mut stream = frame(0x1, &vec![7; MAX_FRAME as usize]);
        stream.extend(frame(DATA, &vec![1; 3 << 20]));
        stream.extend(frame(0x21, b"grease"));
        stream.extend(frame(0x1, b"trailers"));
        for step in [1, 2, 3, 1000, 1 << 20, stream.len()] {
            feed(&mut FrameGuard::request(), &stream, step).unwrap();
        }
    }

    #[test]
    fn a_frame_that_is_not_data_and_declares_too_much_fails_at_its_header() {
        for kind in [0x1, 0x4, 0x21, 0x1f * 7 + 0x21] {
            let mut header = var(kind);
            header.extend(var(MAX_FRAME + 1));
            let mut g = FrameGuard::request();
            let e = feed(&mut g, &header, 1).unwrap_err();
            assert_eq!((e.kind, e.len), (kind, MAX_FRAME + 1));
        }
        // Even after a DATA frame of any size.
        let mut stream = frame(DATA, &[0; 100]);
        stream.extend(var(0x1));
        stream.extend(var(1 << 40));
        assert!(feed(&mut FrameGuard::request(), &stream, 7).is_err());
        // WebTransport's length-less frame is refused outright.
        assert!(
            FrameGuard::request()
                .scan(&var(WEBTRANSPORT_STREAM))
                .is_err()
        );
    }

    #[test]
    fn a_stream_may_end_only_between_frames() {
        let mut g = FrameGuard::request();
        assert!(g.at_boundary());
        let data = frame(DATA, &[1; 10]);
        g.scan(&data[..5]).unwrap();
        assert!(!g.at_boundary(), "inside a DATA frame");
        g.scan(&data[5..]).unwrap();
        assert!(g.at_boundary());
        g.scan(&var(0x1)).unwrap();
        assert!(!g.at_boundary(), "inside a frame header");
    }

    #[test]
    fn goaway_refuses_the_stream_it_names_and_later_ones() {
        let state = GoawayState {
            accepted: AtomicU64::new(0),
            reject_from: AtomicU64::new(u64::MAX),
        };
        state.close_after_accepted();
        assert_eq!(state.reject_from.load(Ordering::Relaxed), 0);
        state.accepted.store(8 + 1, Ordering::Relaxed);
        state.close_after_accepted();
        assert_eq!(state.reject_from.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn the_control_stream_is_guarded_and_qpack_streams_pass() {
        let mut control = var(CONTROL_STREAM);
        control.extend(frame(0x4, b"settings"));
        control.extend(var(0x21));
        control.extend(var(1 << 30));
        assert!(feed(&mut FrameGuard::unidirectional(), &control, 1).is_err());
        let mut encoder = var(0x2);
        encoder.extend(vec![0xff; 100_000]);
        feed(&mut FrameGuard::unidirectional(), &encoder, 999).unwrap();
    }
}
