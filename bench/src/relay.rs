//! The latency floor: plain TCP relays, one process each, chained in front
//! of the upstream as burrow's edge and agent are. They parse nothing and
//! encrypt nothing, and run on the runtime burrow runs on (tokio, one
//! worker), so what they add to SSE and WebSocket latency is what two
//! process hops cost on this machine before any work is done.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};

use crate::Error;
use crate::stack::Proc;

/// Processes in the chain: as many as burrow puts between client and
/// service (edge and agent).
pub const HOPS: usize = 2;

/// The child's side: binds on loopback, prints `listening ADDR` on stdout,
/// and relays every connection to `to` until killed.
pub async fn serve(to: SocketAddr) -> Result<(), Error> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening {}", listener.local_addr()?);
    relay(listener, to).await
}

async fn relay(listener: TcpListener, to: SocketAddr) -> Result<(), Error> {
    loop {
        let (mut inbound, _) = listener.accept().await?;
        tokio::spawn(async move {
            let _ = inbound.set_nodelay(true);
            let Ok(mut outbound) = TcpStream::connect(to).await else {
                return;
            };
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}

/// The chain, outermost first, and the address clients connect to.
pub fn start(
    dir: &std::path::Path,
    upstream: SocketAddr,
) -> Result<(Vec<Proc>, SocketAddr), Error> {
    let exe = std::env::current_exe()?;
    let mut procs = Vec::with_capacity(HOPS);
    let mut next = upstream;
    for hop in (1..=HOPS).rev() {
        let (proc, addr) = Proc::spawn_reporting(
            &format!("relay-{hop}"),
            &exe,
            &["--serve-relay".to_owned(), next.to_string()],
            dir,
            "listening ",
        )?;
        procs.insert(0, proc);
        next = addr;
    }
    Ok((procs, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes go through two chained relays both ways, and an end of stream
    /// travels through them too.
    #[tokio::test]
    async fn two_relays_carry_bytes_both_ways_and_the_end_of_stream() {
        let service = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut to = service.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = service.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got.reverse();
            s.write_all(&got).await.unwrap();
        });
        for _ in 0..HOPS {
            let hop = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = hop.local_addr().unwrap();
            tokio::spawn(relay(hop, to));
            to = addr;
        }
        let mut client = TcpStream::connect(to).await.unwrap();
        client.write_all(b"event: hop").await.unwrap();
        client.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"poh :tneve");
    }
}
