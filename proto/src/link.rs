//! The agent link: QUIC when UDP gets through, TLS over TCP when it does
//! not. Both carry the same bidirectional streams, so everything above
//! (the control session, forwarded streams, pipes) is written once.
//!
//! Over TCP the streams are HTTP/2 streams (the `h2` crate): the edge is the
//! HTTP/2 client, as only a client opens streams and the edge opens every
//! forwarded one; the agent, which dialled TCP and TLS, serves. Each edge
//! request names what the stream is for:
//!
//! - `/link`: opened first, by the link itself. Its body carries a close
//!   (`code: u32`, then the reason) in either direction, so a TCP link
//!   closes with the same application codes as QUIC's CONNECTION_CLOSE.
//! - `/control`: the control session ([`Connection::accept_control`] on the
//!   edge, [`Connection::open_control`] on the agent). On QUIC the agent
//!   opens it, as before.
//! - `/stream`: a forwarded stream.
//!
//! Windows match QUIC's ([`crate::quic`]): 2 MiB per stream and 256 MiB per
//! connection, credit rather than memory. Each side pings every
//! [`quic::KEEP_ALIVE_INTERVAL`] and gives a link up after
//! [`quic::IDLE_TIMEOUT`] without an answer, as QUIC does.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use quinn::VarInt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};

use crate::quic;

/// Which transport a link runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Quic,
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a link ended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer closed it with an application code ([`quic::code`]).
    #[error("closed by the peer (code {code}): {reason}")]
    ClosedByPeer { code: VarInt, reason: String },
    #[error("closed")]
    ClosedLocally,
    /// The handshake or the transport failed (TLS alert, version mismatch,
    /// the peer's transport error).
    #[error("{0}")]
    Transport(String),
    /// Timed out or reset.
    #[error("{0}")]
    Lost(String),
}

impl From<quinn::ConnectionError> for LinkError {
    fn from(e: quinn::ConnectionError) -> Self {
        match e {
            quinn::ConnectionError::ApplicationClosed(c) => Self::ClosedByPeer {
                code: c.error_code,
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            quinn::ConnectionError::LocallyClosed => Self::ClosedLocally,
            quinn::ConnectionError::ConnectionClosed(_)
            | quinn::ConnectionError::TransportError(_)
            | quinn::ConnectionError::VersionMismatch => Self::Transport(e.to_string()),
            other => Self::Lost(other.to_string()),
        }
    }
}

/// One agent link, on either transport. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Connection {
    Quic(quinn::Connection),
    Tcp(TcpLink),
}

impl Connection {
    pub fn transport(&self) -> Transport {
        match self {
            Self::Quic(_) => Transport::Quic,
            Self::Tcp(_) => Transport::Tcp,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Self::Quic(c) => c.remote_address(),
            Self::Tcp(t) => t.shared.remote,
        }
    }

    /// Opens a stream to the agent (edge side).
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Self::Quic(c) => {
                let (s, r) = c.open_bi().await?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Self::Tcp(t) => t.open(Purpose::Stream).await,
        }
    }

    /// Takes the next stream the edge opened (agent side).
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Self::Quic(c) => {
                let (s, r) = c.accept_bi().await?;
                Ok((SendStream::Quic(s), RecvStream::Quic(r)))
            }
            Self::Tcp(t) => {
                let next = t.shared.incoming.lock().await.recv().await;
                next.ok_or_else(|| t.reason())
            }
        }
    }

    /// The agent's control stream: opened by the agent on QUIC, by the edge
    /// on TCP (only an HTTP/2 client opens streams).
    pub async fn open_control(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Self::Quic(_) => self.open_bi().await,
            Self::Tcp(t) => {
                let control = t.shared.control.lock().await.take();
                match control {
                    Some(rx) => rx.await.map_err(|_| t.reason()),
                    None => Err(LinkError::Lost("control stream taken already".into())),
                }
            }
        }
    }

    /// The edge's end of the control stream (see [`Connection::open_control`]).
    pub async fn accept_control(&self) -> Result<(SendStream, RecvStream), LinkError> {
        match self {
            Self::Quic(_) => self.accept_bi().await,
            Self::Tcp(t) => t.open(Purpose::Control).await,
        }
    }

    /// Closes the link with an application code; streams on it end.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match self {
            Self::Quic(c) => c.close(code, reason),
            Self::Tcp(t) => t.close(code, reason),
        }
    }

    /// Resolves when the link has ended, with why.
    pub async fn closed(&self) -> LinkError {
        match self {
            Self::Quic(c) => c.closed().await.into(),
            Self::Tcp(t) => {
                let mut rx = t.shared.closed.subscribe();
                let ended = rx.wait_for(Option::is_some).await;
                match ended {
                    Ok(e) => e.clone().unwrap_or(LinkError::ClosedLocally),
                    Err(_) => LinkError::ClosedLocally,
                }
            }
        }
    }

    /// Why the link ended, if it has.
    pub fn close_reason(&self) -> Option<LinkError> {
        match self {
            Self::Quic(c) => c.close_reason().map(Into::into),
            Self::Tcp(t) => t.shared.closed.borrow().clone(),
        }
    }

    /// Raises how many streams the edge may open at once (QUIC; over TCP
    /// the agent allows [`quic::MAX_STREAMS_PER_AGENT`] from the start, as
    /// HTTP/2 keeps no per-stream state before a stream opens).
    pub fn set_max_concurrent_bi_streams(&self, n: u32) {
        if let Self::Quic(c) = self {
            c.set_max_concurrent_bi_streams(VarInt::from_u32(n));
        }
    }
}

/// The sending half of a link stream.
#[derive(Debug)]
pub enum SendStream {
    Quic(quinn::SendStream),
    Tcp(h2::SendStream<Bytes>),
}

impl SendStream {
    /// Sends `data`, waiting for flow-control credit; no copy over QUIC.
    pub async fn write_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.write_chunk(data).await.map_err(io::Error::from),
            Self::Tcp(s) => {
                while !data.is_empty() {
                    let n = std::future::poll_fn(|cx| poll_credit(s, cx, data.len())).await?;
                    s.send_data(data.split_to(n), false).map_err(h2_io)?;
                }
                Ok(())
            }
        }
    }

    /// Ends the stream cleanly (a half-close).
    pub fn finish(&mut self) -> io::Result<()> {
        match self {
            Self::Quic(s) => s.finish().map_err(io::Error::other),
            Self::Tcp(s) => s.send_data(Bytes::new(), true).map_err(h2_io),
        }
    }

    /// Aborts the stream with `code`.
    pub fn reset(&mut self, code: VarInt) {
        match self {
            Self::Quic(s) => {
                let _ = s.reset(code);
            }
            Self::Tcp(s) => s.send_reset(h2::Reason::from(reason_of(code))),
        }
    }

    /// Waits until the peer has taken everything sent (QUIC) or reset the
    /// stream; over TCP, bytes sent are as good as delivered unless the
    /// link breaks, so this waits for a reset only briefly.
    pub async fn stopped(&mut self) {
        match self {
            Self::Quic(s) => {
                let _ = s.stopped().await;
            }
            Self::Tcp(_) => {}
        }
    }
}

/// Waits for send credit on an HTTP/2 stream; how many of `want` bytes may go.
fn poll_credit(
    s: &mut h2::SendStream<Bytes>,
    cx: &mut Context<'_>,
    want: usize,
) -> Poll<io::Result<usize>> {
    loop {
        let credit = s.capacity();
        if credit > 0 {
            return Poll::Ready(Ok(credit.min(want)));
        }
        s.reserve_capacity(want.min(MAX_RESERVE));
        match ready!(s.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }
}

/// The most credit one write asks for at a time.
const MAX_RESERVE: usize = 64 * 1024;

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::from),
            Self::Tcp(s) => {
                if buf.is_empty() {
                    return Poll::Ready(Ok(0));
                }
                let n = ready!(poll_credit(s, cx, buf.len()))?;
                s.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                Poll::Ready(Ok(n))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_flush(cx),
            Self::Tcp(_) => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tcp(s) => Poll::Ready(s.send_data(Bytes::new(), true).map_err(h2_io)),
        }
    }
}

/// The receiving half of a link stream.
#[derive(Debug)]
pub enum RecvStream {
    Quic(quinn::RecvStream),
    Tcp(H2Recv),
}

impl RecvStream {
    /// Tells the peer to stop sending (QUIC). Over TCP, the reset of the
    /// sending half that always comes with it covers both directions.
    pub fn stop(&mut self, code: VarInt) {
        if let Self::Quic(r) = self {
            let _ = r.stop(code);
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Quic(r) => Pin::new(r).poll_read(cx, buf),
            Self::Tcp(r) => r.poll_read(cx, buf),
        }
    }
}

/// An HTTP/2 stream's receiving half: on the edge, the response headers
/// come first (the agent answers each stream at once).
pub struct H2Recv {
    state: H2State,
    /// Received but not yet read; its credit is already returned, so the
    /// peer may have one window more in flight.
    pending: Bytes,
}

enum H2State {
    Response(h2::client::ResponseFuture),
    Body(h2::RecvStream),
    Done,
}

impl fmt::Debug for H2Recv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("H2Recv")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl H2Recv {
    fn body(body: h2::RecvStream) -> Self {
        Self {
            state: H2State::Body(body),
            pending: Bytes::new(),
        }
    }

    fn response(response: h2::client::ResponseFuture) -> Self {
        Self {
            state: H2State::Response(response),
            pending: Bytes::new(),
        }
    }

    /// The next received chunk, or `None` at the end of the stream.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        loop {
            match &mut self.state {
                H2State::Response(f) => {
                    let response = ready!(Pin::new(f).poll(cx)).map_err(h2_io)?;
                    if response.status() != http::StatusCode::OK {
                        self.state = H2State::Done;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::ConnectionRefused,
                            format!("the agent answered a stream with {}", response.status()),
                        )));
                    }
                    self.state = H2State::Body(response.into_body());
                }
                H2State::Body(body) => match ready!(body.poll_data(cx)) {
                    Some(Ok(data)) => {
                        let _ = body.flow_control().release_capacity(data.len());
                        if !data.is_empty() {
                            return Poll::Ready(Ok(Some(data)));
                        }
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => {
                        self.state = H2State::Done;
                        return Poll::Ready(Ok(None));
                    }
                },
                H2State::Done => return Poll::Ready(Ok(None)),
            }
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(mut chunk) = ready!(self.poll_chunk(cx))? {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            self.pending = chunk;
        }
        Poll::Ready(Ok(()))
    }
}

fn reason_of(code: VarInt) -> u32 {
    u32::try_from(code.into_inner()).unwrap_or(u32::MAX)
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 i/o error"));
    }
    match e.reason() {
        Some(r) if e.is_reset() => io::Error::new(
            io::ErrorKind::ConnectionReset,
            format!("stream reset by the peer (code {})", u32::from(r)),
        ),
        _ => io::Error::other(e),
    }
}

/// What an edge-opened HTTP/2 stream is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Link,
    Control,
    Stream,
}

impl Purpose {
    fn path(self) -> &'static str {
        match self {
            Self::Link => "/link",
            Self::Control => "/control",
            Self::Stream => "/stream",
        }
    }

    /// The request URI, whole: built from a static string, no parse per
    /// stream.
    fn uri(self) -> http::Uri {
        http::Uri::from_static(match self {
            Self::Link => "https://burrow/link",
            Self::Control => "https://burrow/control",
            Self::Stream => "https://burrow/stream",
        })
    }

    fn from_path(path: &str) -> Option<Self> {
        [Self::Link, Self::Control, Self::Stream]
            .into_iter()
            .find(|p| p.path() == path)
    }
}

/// The longest close reason carried over TCP.
const MAX_CLOSE_REASON: usize = 512;
/// How long a closing side waits for its close to reach the peer before it
/// drops the connection anyway.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// A link over TLS and TCP: the shared state behind [`Connection::Tcp`].
#[derive(Debug, Clone)]
pub struct TcpLink {
    shared: Arc<Shared>,
}

struct Shared {
    remote: SocketAddr,
    /// Opens streams (edge side).
    opener: Option<h2::client::SendRequest<Bytes>>,
    /// Streams the edge opened (agent side).
    incoming: tokio::sync::Mutex<mpsc::UnboundedReceiver<(SendStream, RecvStream)>>,
    /// The control stream, once the edge opened it (agent side).
    control: tokio::sync::Mutex<Option<oneshot::Receiver<(SendStream, RecvStream)>>>,
    closed: watch::Sender<Option<LinkError>>,
    /// Asks the driver to send a close and end the connection.
    close: Mutex<Option<oneshot::Sender<(VarInt, Bytes)>>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpLink")
            .field("remote", &self.remote)
            .field("closed", &*self.closed.borrow())
            .finish_non_exhaustive()
    }
}

/// HTTP/2 settings for the link, sized like QUIC's.
fn stream_window() -> u32 {
    quic::STREAM_RECEIVE_WINDOW
}

fn connection_window() -> u32 {
    // HTTP/2 windows stop at 2^31 - 1.
    quic::CONNECTION_RECEIVE_WINDOW.min(i32::MAX as u32)
}

impl TcpLink {
    /// The edge's side: `io` is the agent's authenticated TLS stream.
    pub async fn edge<T>(io: T, remote: SocketAddr) -> Result<Connection, LinkError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (opener, mut conn) = h2::client::Builder::new()
            .initial_window_size(stream_window())
            .initial_connection_window_size(connection_window())
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| LinkError::Transport(format!("HTTP/2 handshake: {e}")))?;
        let pings = conn.ping_pong();
        let (_, incoming) = mpsc::unbounded_channel();
        let (link, close_rx) = Self::with(remote, Some(opener), incoming, None);
        // The connection must be driven for the link stream to open. The
        // driver holds the link weakly: when the last handle goes, so does
        // the connection, as with QUIC.
        let driver = Driver::new(Arc::downgrade(&link.shared), close_rx, pings);
        let opener = link.clone();
        let (link_tx, link_rx) = oneshot::channel();
        tokio::spawn(async move {
            let opening = async move {
                let opened = opener.open(Purpose::Link).await;
                let _ = link_tx.send(opened.is_ok());
                opened
            };
            let mut stream = tokio::select! {
                opened = opening => match opened {
                    Ok(s) => Some(s),
                    Err(e) => { driver.end(e); return; }
                },
                r = &mut conn => {
                    driver.end(ended(r.err()));
                    return;
                }
            };
            driver.run_client(conn, &mut stream).await;
        });
        if !link_rx.await.unwrap_or(false) {
            return Err(link.reason());
        }
        Ok(Connection::Tcp(link))
    }

    /// The agent's side: `io` is the TLS stream it dialled.
    pub async fn agent<T>(io: T, remote: SocketAddr) -> Result<Connection, LinkError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = h2::server::Builder::new()
            .initial_window_size(stream_window())
            .initial_connection_window_size(connection_window())
            .max_concurrent_streams(quic::MAX_STREAMS_PER_AGENT)
            .handshake::<_, Bytes>(io)
            .await
            .map_err(|e| LinkError::Transport(format!("HTTP/2 handshake: {e}")))?;
        let pings = conn.ping_pong();
        let (incoming_tx, incoming) = mpsc::unbounded_channel();
        let (control_tx, control_rx) = oneshot::channel();
        let (link, close_rx) = Self::with(remote, None, incoming, Some(control_rx));
        let driver = Driver::new(Arc::downgrade(&link.shared), close_rx, pings);
        tokio::spawn(async move {
            driver.run_server(&mut conn, incoming_tx, control_tx).await;
        });
        Ok(Connection::Tcp(link))
    }

    /// The shared state of a new link, and the receiving end of its close.
    fn with(
        remote: SocketAddr,
        opener: Option<h2::client::SendRequest<Bytes>>,
        incoming: mpsc::UnboundedReceiver<Stream>,
        control: Option<oneshot::Receiver<Stream>>,
    ) -> (Self, oneshot::Receiver<(VarInt, Bytes)>) {
        let (close_tx, close_rx) = oneshot::channel();
        let link = TcpLink {
            shared: Arc::new(Shared {
                remote,
                opener,
                incoming: tokio::sync::Mutex::new(incoming),
                control: tokio::sync::Mutex::new(control),
                closed: watch::channel(None).0,
                close: Mutex::new(Some(close_tx)),
            }),
        };
        (link, close_rx)
    }

    async fn open(&self, purpose: Purpose) -> Result<(SendStream, RecvStream), LinkError> {
        if let Some(e) = self.shared.closed.borrow().clone() {
            return Err(e);
        }
        let Some(opener) = self.shared.opener.clone() else {
            return Err(LinkError::Lost("only the edge opens streams".into()));
        };
        let mut opener = opener.ready().await.map_err(|_| self.reason())?;
        let mut request = http::Request::new(());
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = purpose.uri();
        let (response, send) = opener
            .send_request(request, false)
            .map_err(|_| self.reason())?;
        Ok((
            SendStream::Tcp(send),
            RecvStream::Tcp(H2Recv::response(response)),
        ))
    }

    fn close(&self, code: VarInt, reason: &[u8]) {
        let tx = self.shared.close.lock().expect("close lock").take();
        if let Some(tx) = tx {
            self.shared.closed.send_if_modified(|c| {
                c.get_or_insert(LinkError::ClosedLocally);
                true
            });
            let reason = &reason[..reason.len().min(MAX_CLOSE_REASON)];
            let _ = tx.send((code, Bytes::copy_from_slice(reason)));
        }
    }

    /// Why the link ended (or that it is ending).
    fn reason(&self) -> LinkError {
        self.shared
            .closed
            .borrow()
            .clone()
            .unwrap_or_else(|| LinkError::Lost("the link ended".into()))
    }
}

fn ended(e: Option<h2::Error>) -> LinkError {
    match e {
        Some(e) if e.is_io() => LinkError::Lost(format!("connection lost: {e}")),
        Some(e) => LinkError::Transport(format!("HTTP/2: {e}")),
        None => LinkError::Lost("the peer closed the connection".into()),
    }
}

/// Runs one TCP link's HTTP/2 connection: keep-alive pings, the close
/// exchanged on the link stream, and (on the agent) routing the streams the
/// edge opens.
struct Driver {
    /// Weak: the link's handles own it, and when the last is dropped its
    /// close sender goes with it, which ends the driver.
    shared: std::sync::Weak<Shared>,
    close_rx: oneshot::Receiver<(VarInt, Bytes)>,
    pings: Option<h2::PingPong>,
    /// The close the peer sent on the link stream, as far as received.
    peer_close: BytesMut,
}

type Stream = (SendStream, RecvStream);

impl Driver {
    fn new(
        shared: std::sync::Weak<Shared>,
        close_rx: oneshot::Receiver<(VarInt, Bytes)>,
        pings: Option<h2::PingPong>,
    ) -> Self {
        Self {
            shared,
            close_rx,
            pings,
            peer_close: BytesMut::new(),
        }
    }

    /// Records how the link ended; the first reason stays.
    fn end(&self, e: LinkError) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        shared.closed.send_if_modified(|c| {
            if c.is_none() {
                *c = Some(e);
                true
            } else {
                false
            }
        });
    }

    async fn run_client<T>(
        mut self,
        mut conn: h2::client::Connection<T, Bytes>,
        link: &mut Option<Stream>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut pings = self.pings.take();
        let why = {
            let keepalive = keep_alive(pings.as_mut());
            tokio::pin!(keepalive);
            tokio::select! {
                r = &mut conn => ended(r.err()),
                e = &mut keepalive => e,
                e = read_close(link, &mut self.peer_close) => e,
                cmd = &mut self.close_rx => {
                    if let (Ok((code, reason)), Some((send, _))) = (cmd, link.as_mut()) {
                        // The close goes out while the connection is driven
                        // (it may wait for credit), then the connection runs
                        // on until the agent, having read it, drops it.
                        let _ = tokio::time::timeout(CLOSE_LINGER, async {
                            tokio::select! {
                                _ = send_close(send, code, &reason) => {}
                                _ = &mut conn => return,
                            }
                            let _ = (&mut conn).await;
                        })
                        .await;
                    }
                    LinkError::ClosedLocally
                }
            }
        };
        self.end(why);
    }

    async fn run_server<T>(
        mut self,
        conn: &mut h2::server::Connection<T, Bytes>,
        incoming: mpsc::UnboundedSender<Stream>,
        control: oneshot::Sender<Stream>,
    ) where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let mut pings = self.pings.take();
        let mut link: Option<Stream> = None;
        let mut control = Some(control);
        let keepalive = keep_alive(pings.as_mut());
        tokio::pin!(keepalive);
        let why = loop {
            tokio::select! {
                accepted = conn.accept() => {
                    let (request, mut respond) = match accepted {
                        Some(Ok(a)) => a,
                        Some(Err(e)) => break ended(Some(e)),
                        None => break ended(None),
                    };
                    let purpose = Purpose::from_path(request.uri().path());
                    let Some(purpose) = purpose else {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    };
                    let response = http::Response::new(());
                    let Ok(send) = respond.send_response(response, false) else {
                        continue;
                    };
                    let stream = (SendStream::Tcp(send), RecvStream::Tcp(H2Recv::body(request.into_body())));
                    match purpose {
                        Purpose::Link if link.is_none() => link = Some(stream),
                        Purpose::Control if control.is_some() => {
                            if let Some(tx) = control.take() {
                                let _ = tx.send(stream);
                            }
                        }
                        Purpose::Stream => {
                            let _ = incoming.send(stream);
                        }
                        // A second link or control stream.
                        _ => break LinkError::Transport("the edge opened a second link or control stream".into()),
                    }
                }
                e = &mut keepalive => break e,
                e = read_close(&mut link, &mut self.peer_close) => break e,
                cmd = &mut self.close_rx => {
                    if let (Ok((code, reason)), Some((send, _))) = (cmd, link.as_mut()) {
                        // The close goes out while the connection is driven
                        // (refusing new streams), then the connection runs on
                        // until the edge, having read it, drops it.
                        let _ = tokio::time::timeout(CLOSE_LINGER, async {
                            let refuse_new = async {
                                while let Some(Ok((_, mut respond))) = conn.accept().await {
                                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                                }
                            };
                            tokio::pin!(refuse_new);
                            tokio::select! {
                                _ = send_close(send, code, &reason) => {}
                                () = &mut refuse_new => return,
                            }
                            refuse_new.await;
                        }).await;
                    }
                    break LinkError::ClosedLocally;
                }
            }
        };
        self.end(why);
    }
}

/// Pings every keep-alive interval; resolves when one goes unanswered for
/// the idle timeout. Never resolves without a ping handle.
async fn keep_alive(pings: Option<&mut h2::PingPong>) -> LinkError {
    let Some(pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(quic::KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(quic::IDLE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection ended; its own branch says why.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => {
                return LinkError::Lost(format!(
                    "timed out: no answer to keep-alive pings for {:?}",
                    quic::IDLE_TIMEOUT
                ));
            }
        }
    }
}

/// Reads the peer's close off the link stream: `code: u32`, then the
/// reason, then the end of the stream. Cancel-safe: what was read stays in
/// `buf`. Pends while there is no link stream yet.
async fn read_close(link: &mut Option<Stream>, buf: &mut BytesMut) -> LinkError {
    let Some((_, RecvStream::Tcp(recv))) = link.as_mut() else {
        return std::future::pending().await;
    };
    loop {
        match std::future::poll_fn(|cx| recv.poll_chunk(cx)).await {
            Ok(Some(chunk)) => {
                if buf.len() + chunk.len() > 4 + MAX_CLOSE_REASON {
                    return LinkError::Transport("oversized close on the link stream".into());
                }
                buf.extend_from_slice(&chunk);
            }
            Ok(None) if buf.len() >= 4 => {
                let code = buf.get_u32();
                return LinkError::ClosedByPeer {
                    code: VarInt::from_u32(code),
                    reason: String::from_utf8_lossy(buf).into_owned(),
                };
            }
            Ok(None) => return LinkError::Lost("the peer ended the link stream".into()),
            // The connection broke; its own branch says why, unless the
            // peer reset just this stream.
            Err(_) => return std::future::pending().await,
        }
    }
}

async fn send_close(send: &mut SendStream, code: VarInt, reason: &[u8]) -> io::Result<()> {
    let mut out = BytesMut::with_capacity(4 + reason.len());
    out.put_u32(reason_of(code));
    out.put_slice(reason);
    send.write_chunk(out.freeze()).await?;
    send.finish()?;
    send.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An edge and an agent link over an in-memory duplex pipe.
    async fn pair() -> (Connection, Connection) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let (edge, agent) = tokio::join!(TcpLink::edge(a, addr), TcpLink::agent(b, addr));
        (edge.unwrap(), agent.unwrap())
    }

    #[tokio::test]
    async fn control_and_streams_carry_bytes_both_ways_with_half_close() {
        let (edge, agent) = pair().await;
        assert_eq!(edge.transport(), Transport::Tcp);
        let (mut es, mut er) = edge.accept_control().await.unwrap();
        let (mut as_, mut ar) = agent.open_control().await.unwrap();
        as_.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        er.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        es.write_all(b"welcome").await.unwrap();
        let mut got = [0u8; 7];
        ar.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"welcome");

        // A stream bigger than both windows, then a half-close each way.
        let (mut s, mut r) = edge.open_bi().await.unwrap();
        let (mut s2, mut r2) = agent.accept_bi().await.unwrap();
        let big = vec![7u8; 5 * 1024 * 1024];
        let sent = big.clone();
        let writer = tokio::spawn(async move {
            s.write_chunk(Bytes::from(sent)).await.unwrap();
            s.finish().unwrap();
            s
        });
        let mut got = Vec::new();
        r2.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), big.len());
        assert!(got == big);
        writer.await.unwrap();
        s2.write_all(b"reply").await.unwrap();
        s2.finish().unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"reply");
    }

    #[tokio::test]
    async fn a_reset_reaches_the_peer_as_an_error() {
        let (edge, agent) = pair().await;
        let (mut s, _r) = edge.open_bi().await.unwrap();
        s.write_all(b"x").await.unwrap();
        let (_s2, mut r2) = agent.accept_bi().await.unwrap();
        let mut one = [0u8; 1];
        r2.read_exact(&mut one).await.unwrap();
        s.reset(quic::code::STREAM_ABORTED);
        let e = r2.read(&mut one).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    #[tokio::test]
    async fn a_close_carries_its_code_and_reason_either_way() {
        let (edge, agent) = pair().await;
        edge.close(quic::code::REPLACED, b"replaced by a newer session");
        assert_eq!(
            agent.closed().await,
            LinkError::ClosedByPeer {
                code: quic::code::REPLACED,
                reason: "replaced by a newer session".into()
            }
        );
        assert_eq!(edge.closed().await, LinkError::ClosedLocally);
        assert!(agent.accept_bi().await.is_err());

        let (edge, agent) = pair().await;
        agent.close(quic::code::OK, b"agent stopping");
        assert_eq!(
            edge.closed().await,
            LinkError::ClosedByPeer {
                code: quic::code::OK,
                reason: "agent stopping".into()
            }
        );
        assert!(edge.open_bi().await.is_err());
    }

    #[test]
    fn each_purpose_has_a_uri_whose_path_names_it() {
        for p in [Purpose::Link, Purpose::Control, Purpose::Stream] {
            assert_eq!(Purpose::from_path(p.uri().path()), Some(p));
        }
    }

    #[tokio::test]
    async fn dropping_every_handle_ends_the_connection_as_with_quic() {
        let (edge, agent) = pair().await;
        drop(edge);
        let why = tokio::time::timeout(Duration::from_secs(5), agent.closed())
            .await
            .expect("the agent sees the link end");
        assert!(matches!(why, LinkError::Lost(_)), "{why:?}");
        let (edge, agent) = pair().await;
        drop(agent);
        let why = tokio::time::timeout(Duration::from_secs(5), edge.closed())
            .await
            .expect("the edge sees the link end");
        assert!(
            matches!(why, LinkError::Lost(_) | LinkError::Transport(_)),
            "{why:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_connection_ends_the_link_and_its_streams() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let edge = tokio::spawn(TcpLink::edge(a, addr));
        // The agent side is raw bytes: a peer that vanishes mid-handshake.
        drop(b);
        assert!(edge.await.unwrap().is_err());
    }
}
