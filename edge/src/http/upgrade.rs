//! Upgraded connections (WebSocket): the upgrade request goes over a stream
//! of its own, and once the service switches protocols the client's and the
//! service's connections are spliced.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use burrow_proto::StreamKind;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::forward::{
    Unreachable, Waited, await_response, connect, connection_failed, failed_to_respond, too_late,
};
use super::pool::UpstreamBody;
use super::rewrite::strip_hop_by_hop;
use super::{Body, HttpState};
use crate::config::RouteConfig;
use crate::tunnel::AgentLink;

/// Buffer per direction for an upgraded connection (WebSocket). tokio's
/// default is 8 KiB each way, allocated and zeroed up front: 16 KiB of
/// resident memory per idle WebSocket. Chat messages are far smaller, and a
/// big message just takes a few more reads.
const UPGRADED_COPY_BUFFER: usize = 2 * 1024;

/// Forwards an upgrade request (WebSocket) over a stream of its own and,
/// once the service switches protocols, splices the two connections.
pub(super) async fn forward_upgrade(
    mut req: Request<UpstreamBody>,
    state: &HttpState,
    route: &RouteConfig,
    client: SocketAddr,
    link: &AgentLink,
    turn: Option<&crate::tunnel::registry::Ticket>,
) -> Result<Response<Body>, Unreachable> {
    let connected = connect(link, StreamKind::WebSocket, state, route, client).await;
    let mut sender = match connected {
        Ok(Some(sender)) => sender,
        Ok(None) => return Ok(connection_failed()),
        // A held request keeps its place in line for the next try.
        Err(error) => return Err(Unreachable { req, error }),
    };
    if let Some(ticket) = turn {
        ticket.connected();
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let ticket = req.extensions().get::<super::StreamTicket>().cloned();
    let mut response = match await_response(sender.send_request(req), route).await {
        Ok(r) => r,
        Err(Waited::Late(t)) => return Ok(too_late(route, t)),
        Err(Waited::Failed(e)) => return Ok(failed_to_respond(route, &e)),
    };
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused upgrade: an ordinary response; the stream is not reused.
        strip_hop_by_hop(response.headers_mut());
        return Ok(response.map(|body| body.map_err(Into::into).boxed()));
    }
    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let going_away = state.going_away.clone();
    state.tracker.spawn(async move {
        let _ticket = ticket;
        match tokio::try_join!(client_upgrade, upstream_upgrade) {
            Ok((c, u)) => match splice(TokioIo::new(c), TokioIo::new(u), going_away).await {
                Ok(Spliced::Closed { up, down }) => {
                    debug!(up, down, "upgraded connection closed");
                }
                Ok(Spliced::GoingAway { up, down }) => {
                    debug!(
                        up,
                        down, "closed a WebSocket with 1001: the edge is shutting down"
                    );
                }
                Err(e) => debug!(error = %e, "upgraded connection aborted"),
            },
            Err(e) => debug!(error = %e, "upgrade failed"),
        }
    });
    let (parts, _) = response.into_parts();
    Ok(Response::from_parts(parts, super::empty_body()))
}

/// How a spliced WebSocket ended.
#[derive(Debug, PartialEq, Eq)]
enum Spliced {
    /// Either side closed it.
    Closed { up: u64, down: u64 },
    /// The edge is shutting down: the client got a close frame (1001).
    GoingAway { up: u64, down: u64 },
}

/// How long a frame the service is in the middle of sending may take to
/// finish once the edge shuts down; then the client gets the close frame
/// anyway (a cut frame is what a plain close would have left).
const GOING_AWAY_FRAME_WAIT: Duration = Duration::from_secs(1);

/// A close frame from the server: status 1001, "going away" (RFC 6455
/// section 7.4.1), unmasked, with no reason text.
const CLOSE_GOING_AWAY: [u8; 4] = [0x88, 0x02, 0x03, 0xe9];

/// Copies both ways, each direction on its own (a client that is slow to
/// read never stops the other direction), with half-closes carried
/// across. When `going_away` fires, the service's frame in flight is
/// finished, the client gets a close frame (1001) and both connections end.
async fn splice<C, U>(client: C, upstream: U, going_away: CancellationToken) -> io::Result<Spliced>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut up_rd, mut up_wr) = tokio::io::split(upstream);
    let to_client = async {
        let mut frames = FrameBoundary::default();
        let mut buf = [0u8; UPGRADED_COPY_BUFFER];
        let mut down = 0u64;
        loop {
            tokio::select! {
                n = up_rd.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        client_wr.shutdown().await?;
                        return Ok((down, false));
                    }
                    frames.advance(&buf[..n]);
                    client_wr.write_all(&buf[..n]).await?;
                    down += n as u64;
                }
                () = going_away.cancelled() => break,
            }
        }
        // The rest of the frame the service is sending, if it comes soon,
        // then the close frame at a frame boundary.
        let finish = async {
            while !frames.at_boundary() {
                let n = up_rd.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                let take = frames.until_boundary(&buf[..n]);
                client_wr.write_all(&buf[..take]).await?;
                down += take as u64;
            }
            io::Result::Ok(())
        };
        let _ = tokio::time::timeout(GOING_AWAY_FRAME_WAIT, finish).await;
        client_wr.write_all(&CLOSE_GOING_AWAY).await?;
        client_wr.shutdown().await?;
        io::Result::Ok((down, true))
    };
    let to_service = async {
        let mut buf = [0u8; UPGRADED_COPY_BUFFER];
        let mut up = 0u64;
        loop {
            tokio::select! {
                n = client_rd.read(&mut buf) => {
                    let n = n?;
                    if n == 0 {
                        up_wr.shutdown().await?;
                        return Ok(up);
                    }
                    up_wr.write_all(&buf[..n]).await?;
                    up += n as u64;
                }
                () = going_away.cancelled() => return io::Result::Ok(up),
            }
        }
    };
    let ((down, went_away), up) = tokio::try_join!(to_client, to_service)?;
    Ok(if went_away {
        Spliced::GoingAway { up, down }
    } else {
        Spliced::Closed { up, down }
    })
}

/// Follows the frames of one direction of a WebSocket (RFC 6455 section
/// 5.2) by their headers alone, to tell where one ends.
#[derive(Debug, Default)]
struct FrameBoundary {
    /// Header bytes of the frame that starts, while incomplete.
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
}

impl FrameBoundary {
    fn at_boundary(&self) -> bool {
        self.header.is_empty() && self.payload_left == 0
    }

    /// Follows `data` to its end.
    fn advance(&mut self, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            rest = self.step(rest);
        }
    }

    /// How many bytes of `data` reach the next frame boundary (all of it
    /// when none comes); follows them.
    fn until_boundary(&mut self, data: &[u8]) -> usize {
        let mut rest = data;
        while !rest.is_empty() {
            rest = self.step(rest);
            if self.at_boundary() {
                break;
            }
        }
        data.len() - rest.len()
    }

    /// Takes what belongs to the current frame's header or payload.
    fn step<'a>(&mut self, data: &'a [u8]) -> &'a [u8] {
        if self.payload_left > 0 {
            let n = usize::try_from(self.payload_left)
                .unwrap_or(usize::MAX)
                .min(data.len());
            self.payload_left -= n as u64;
            return &data[n..];
        }
        let (&first, rest) = data.split_first().expect("step is given bytes");
        self.header.push(first);
        if let Some(payload) = Self::payload_len(&self.header) {
            self.header.clear();
            self.payload_left = payload;
        }
        rest
    }

    /// The payload length once `header` is complete.
    fn payload_len(header: &[u8]) -> Option<u64> {
        let second = *header.get(1)?;
        let masked = second & 0x80 != 0;
        let (extended, len) = match second & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(u64::from(n))),
        };
        let full = 2 + extended + if masked { 4 } else { 0 };
        if header.len() < full {
            return None;
        }
        Some(len.unwrap_or_else(|| {
            header[2..2 + extended]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unmasked server frame with `payload`.
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n @ 0..=125 => f.push(n as u8),
            n @ 126..=65_535 => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn boundaries_are_found_across_any_split_of_frames_of_every_length_form() {
        let mut stream = frame(1, b"hi");
        stream.extend(frame(2, &vec![7; 300]));
        stream.extend(frame(2, &vec![8; 70_000]));
        stream.extend(frame(9, b""));
        let ends = [4, 4 + 304, 4 + 304 + 70_010, 4 + 304 + 70_010 + 2];
        for split in [1, 2, 3, 5, 100, 4096] {
            let mut f = FrameBoundary::default();
            let mut at = 0;
            let mut found = Vec::new();
            for chunk in stream.chunks(split) {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let n = f.until_boundary(rest);
                    at += n;
                    rest = &rest[n..];
                    if f.at_boundary() {
                        found.push(at);
                    }
                }
            }
            assert_eq!(found, ends, "split {split}");
        }
        // A masked frame (client to server): the key is part of the header.
        let mut f = FrameBoundary::default();
        f.advance(&[0x81, 0x82, 1, 2, 3, 4, b'a']);
        assert!(!f.at_boundary());
        f.advance(b"b");
        assert!(f.at_boundary());
    }

    #[tokio::test]
    async fn going_away_waits_for_the_frame_in_flight_then_sends_1001() {
        let (client, mut browser) = tokio::io::duplex(1 << 16);
        let (upstream, mut service) = tokio::io::duplex(1 << 16);
        let going_away = CancellationToken::new();
        let splice = tokio::spawn(splice(client, upstream, going_away.clone()));
        let whole = frame(1, b"first");
        service.write_all(&whole).await.unwrap();
        let mut got = vec![0u8; whole.len()];
        browser.read_exact(&mut got).await.unwrap();
        assert_eq!(got, whole);
        // Half a frame, then the shutdown, then the rest.
        let second = frame(2, &[5; 40]);
        service.write_all(&second[..10]).await.unwrap();
        let mut head = vec![0u8; 10];
        browser.read_exact(&mut head).await.unwrap();
        going_away.cancel();
        tokio::task::yield_now().await;
        service.write_all(&second[10..]).await.unwrap();
        let mut rest = Vec::new();
        browser.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest[..second.len() - 10], second[10..]);
        assert_eq!(rest[second.len() - 10..], CLOSE_GOING_AWAY);
        assert!(matches!(
            splice.await.unwrap().unwrap(),
            Spliced::GoingAway { .. }
        ));
    }

    #[tokio::test]
    async fn a_closing_side_ends_the_splice_as_before() {
        let (client, mut browser) = tokio::io::duplex(1 << 16);
        let (upstream, mut service) = tokio::io::duplex(1 << 16);
        let splice = tokio::spawn(splice(client, upstream, CancellationToken::new()));
        browser.write_all(b"up").await.unwrap();
        let mut got = [0u8; 2];
        service.read_exact(&mut got).await.unwrap();
        drop(service);
        let mut rest = Vec::new();
        browser.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(browser);
        assert_eq!(
            splice.await.unwrap().unwrap(),
            Spliced::Closed { up: 2, down: 0 }
        );
    }
}
