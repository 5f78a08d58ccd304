//! Moving bytes between a link's stream pair (QUIC or TCP, see
//! [`crate::link`]) and a local byte stream (a TCP socket, an upgraded HTTP
//! connection), both directions at once, with half-close carried across and
//! aborts propagated as stream resets.
//!
//! Copies: QUIC to local gathers quinn's received chunks into one buffer
//! per write (one memcpy, far fewer syscalls); local to QUIC reads into a
//! buffer whose filled part is handed to quinn without another copy.

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::link::{RecvStream, SendStream};
use crate::quic::code;

/// Largest read in each direction.
pub const COPY_CHUNK: usize = 64 * 1024;
/// First read size: a page. Reads double up to [`COPY_CHUNK`] while they
/// come back full, so a bulk transfer reaches full size in a few reads and
/// an idle WebSocket never holds more than a page or two each way.
/// (Reserving 64 KiB per direction up front scattered each connection's
/// touched pages over a heap of 128 KiB per connection; after 10,000
/// WebSockets came and went, the agent's RSS crept up each cycle.)
pub const FIRST_CHUNK: usize = 4 * 1024;

/// The next read size after a read of `n` bytes into room for `room`.
fn next_chunk(chunk: usize, n: usize, room: usize) -> usize {
    if n >= room {
        (chunk * 2).min(COPY_CHUNK)
    } else {
        chunk
    }
}

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
            send.reset(code::STREAM_ABORTED);
            recv.stop(code::STREAM_ABORTED);
            Err(e)
        }
    }
}

async fn local_to_quic<R: AsyncRead + Unpin>(rd: &mut R, send: &mut SendStream) -> io::Result<u64> {
    let mut total = 0u64;
    let mut chunk = FIRST_CHUNK;
    let mut buf = BytesMut::with_capacity(chunk);
    loop {
        if buf.capacity() < chunk / 4 {
            buf.reserve(chunk);
        }
        let room = buf.capacity();
        let n = rd.read_buf(&mut buf).await?;
        chunk = next_chunk(chunk, n, room);
        if n == 0 {
            // Half-close: the local side is done sending.
            send.finish()?;
            return Ok(total);
        }
        total += n as u64;
        send.write_chunk(buf.split().freeze()).await?;
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
    // syscall per batch instead of one per packet. The buffer starts at a
    // page and grows while batches fill it.
    let mut chunk = FIRST_CHUNK;
    let mut buf = BytesMut::with_capacity(chunk);
    loop {
        buf.clear();
        if buf.capacity() < chunk {
            buf.reserve(chunk);
        }
        let room = buf.capacity();
        let n = recv.read_buf(&mut buf).await?;
        if n == 0 {
            break;
        }
        chunk = next_chunk(chunk, n, room);
        total += n as u64;
        wr.write_all(&buf).await?;
    }
    // Half-close: the remote side is done sending.
    wr.shutdown().await?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_grow_while_they_come_back_full_and_stop_at_the_cap() {
        let mut chunk = FIRST_CHUNK;
        chunk = next_chunk(chunk, 100, chunk);
        assert_eq!(chunk, FIRST_CHUNK, "a short read keeps the size");
        let mut steps = 0;
        while chunk < COPY_CHUNK {
            chunk = next_chunk(chunk, chunk, chunk);
            steps += 1;
        }
        assert_eq!((chunk, steps), (COPY_CHUNK, 4));
        assert_eq!(next_chunk(chunk, chunk, chunk), COPY_CHUNK);
    }
}
