//! Reading frames off a link's receive stream, cancel-safely: the partial
//! frame lives in the struct, not in the future.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::frame::Frame;
use crate::link::RecvStream;
use crate::session::FrameBuf;
use crate::wire::DecodeError;

/// How much one read takes from quinn at most.
const READ_CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum FramedError {
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    #[error("stream ended inside a frame")]
    Truncated,
    #[error(transparent)]
    Read(io::Error),
}

/// A receive stream that yields frames; what follows them stays available.
#[derive(Debug)]
pub struct FramedRecv<R = RecvStream> {
    recv: R,
    buf: FrameBuf,
}

impl<R: AsyncRead + Unpin> FramedRecv<R> {
    pub fn new(recv: R) -> Self {
        Self {
            recv,
            buf: FrameBuf::new(),
        }
    }

    /// The next frame; `Ok(None)` when the stream ended cleanly between frames.
    pub async fn next<F: Frame>(&mut self) -> Result<Option<F>, FramedError> {
        let mut chunk = [0u8; READ_CHUNK];
        loop {
            if let Some(frame) = self.buf.next_frame()? {
                return Ok(Some(frame));
            }
            let want = self.buf.space().min(READ_CHUNK);
            match self
                .recv
                .read(&mut chunk[..want])
                .await
                .map_err(FramedError::Read)?
            {
                0 if self.buf.pending() == 0 => return Ok(None),
                0 => return Err(FramedError::Truncated),
                n => self.buf.push(&chunk[..n]),
            }
        }
    }

    /// Gives back the stream and any bytes read past the last frame.
    pub fn into_parts(self) -> (R, Bytes) {
        (self.recv, self.buf.into_remainder().freeze())
    }

    pub fn stream_mut(&mut self) -> &mut R {
        &mut self.recv
    }
}

/// Encodes frames and writes them in one go.
pub async fn write_frames<F: Frame, W: AsyncWrite + Unpin>(
    send: &mut W,
    frames: impl IntoIterator<Item = F>,
) -> io::Result<()> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    if !out.is_empty() {
        send.write_all(&out).await?;
    }
    Ok(())
}
