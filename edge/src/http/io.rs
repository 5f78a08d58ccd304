//! Byte streams the HTTP forwarder runs hyper over: a QUIC stream pair as
//! one duplex stream, and an idle timer that counts bytes either way.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{Metrics, StreamGuard};
use crate::tunnel::OpenStream;

/// A forwarded stream as one duplex byte stream: reads yield the bytes that
/// came with the agent's reply first, then the QUIC receive stream. Bytes
/// each way are counted in the metrics; the stream counts as open until
/// this is dropped.
#[derive(Debug)]
pub struct QuicIo {
    prefix: Bytes,
    recv: quinn::RecvStream,
    send: quinn::SendStream,
    metrics: Arc<Metrics>,
    _open: StreamGuard,
}

impl QuicIo {
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

impl AsyncRead for QuicIo {
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

impl AsyncWrite for QuicIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.send)
            .poll_write(cx, buf)
            .map_err(io::Error::from);
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
