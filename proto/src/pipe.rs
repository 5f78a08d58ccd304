//! Moving bytes between a QUIC stream pair and a local byte stream (a TCP
//! socket, an upgraded HTTP connection), both directions at once, with
//! half-close carried across and aborts propagated as stream resets.
//!
//! Copies: QUIC to local gathers quinn's received chunks into one buffer
//! per write (one memcpy, far fewer syscalls); local to QUIC reads into a
//! buffer whose filled part is handed to quinn without another copy.

use std::io;

use bytes::{Bytes, BytesMut};
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::quic::code;

/// Read size in each direction.
pub const COPY_CHUNK: usize = 64 * 1024;

/// Bytes moved by a finished pipe.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PipeStats {
    /// From the local side into QUIC.
    pub to_quic: u64,
    /// From QUIC out to the local side.
    pub from_quic: u64,
}

/// Pipes until both directions have ended.
///
/// `initial` holds bytes already read from `recv` (past a stream header) that
/// belong to the local side. An end of file on either side is passed on as a
/// half-close; an error on either side resets both QUIC directions.
pub async fn pipe<L>(
    local: L,
    mut send: SendStream,
    mut recv: RecvStream,
    initial: Bytes,
) -> io::Result<PipeStats>
where
    L: AsyncRead + AsyncWrite,
{
    let (mut rd, mut wr) = tokio::io::split(local);
    let result = tokio::try_join!(
        local_to_quic(&mut rd, &mut send),
        quic_to_local(&mut recv, &mut wr, initial)
    );
    match result {
        Ok((to_quic, from_quic)) => Ok(PipeStats { to_quic, from_quic }),
        Err(e) => {
            let _ = send.reset(code::STREAM_ABORTED);
            let _ = recv.stop(code::STREAM_ABORTED);
            Err(e)
        }
    }
}

async fn local_to_quic<R: AsyncRead + Unpin>(rd: &mut R, send: &mut SendStream) -> io::Result<u64> {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(COPY_CHUNK);
    loop {
        if buf.capacity() < COPY_CHUNK / 4 {
            buf.reserve(COPY_CHUNK);
        }
        let n = rd.read_buf(&mut buf).await?;
        if n == 0 {
            // Half-close: the local side is done sending.
            send.finish().map_err(io::Error::other)?;
            return Ok(total);
        }
        total += n as u64;
        send.write_chunk(buf.split().freeze())
            .await
            .map_err(io::Error::other)?;
    }
}

async fn quic_to_local<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    wr: &mut W,
    initial: Bytes,
) -> io::Result<u64> {
    let mut total = initial.len() as u64;
    if !initial.is_empty() {
        wr.write_all(&initial).await?;
    }
    // quinn hands out one chunk per received STREAM frame (about a packet,
    // 1.2 KB); gathering what is ready into one buffer makes one write
    // syscall per batch instead of one per packet. Capacity is reserved,
    // not touched, so an idle stream costs no resident memory.
    let mut buf = BytesMut::with_capacity(COPY_CHUNK);
    loop {
        buf.clear();
        let n = recv.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
        wr.write_all(&buf).await?;
    }
    // Half-close: the remote side is done sending.
    wr.shutdown().await?;
    Ok(total)
}
