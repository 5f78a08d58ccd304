//! Reading frames off a QUIC receive stream, cancel-safely: the partial
//! frame lives in the struct, not in the future.

use bytes::{Bytes, BytesMut};
use quinn::{ReadError, RecvStream, SendStream, WriteError};

use crate::frame::Frame;
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
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// A receive stream that yields frames; what follows them stays available.
#[derive(Debug)]
pub struct FramedRecv {
    recv: RecvStream,
    buf: FrameBuf,
}

impl FramedRecv {
    pub fn new(recv: RecvStream) -> Self {
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
            match self.recv.read(&mut chunk[..want]).await? {
                Some(n) => self.buf.push(&chunk[..n]),
                None if self.buf.pending() == 0 => return Ok(None),
                None => return Err(FramedError::Truncated),
            }
        }
    }

    /// Gives back the stream and any bytes read past the last frame.
    pub fn into_parts(self) -> (RecvStream, Bytes) {
        (self.recv, self.buf.into_remainder().freeze())
    }

    pub fn stream_mut(&mut self) -> &mut RecvStream {
        &mut self.recv
    }
}

/// Encodes frames and writes them in one go.
pub async fn write_frames<F: Frame>(
    send: &mut SendStream,
    frames: impl IntoIterator<Item = F>,
) -> Result<(), WriteError> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    if !out.is_empty() {
        send.write_all(&out).await?;
    }
    Ok(())
}
