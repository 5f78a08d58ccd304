//! HTTP/3 for browsers, on the tunnel's UDP port (`[edge] http3 = true`).
//!
//! The tunnel's endpoint tells browsers from agents by ALPN
//! ([`crate::tunnel::alpn`]) and hands each browser connection here once
//! its handshake is done. From there a request takes the same path as over
//! HTTP/1.1 and HTTP/2 ([`super::route::handle`]: access, routing, wake,
//! forwarding, the error map); only the two ends differ: the request body
//! is the stream's ([`RequestBody::H3`]) and the response is written frame
//! by frame as it comes, ending with FIN, or with a reset when the service's
//! body broke off (so a cut response never looks complete).
//!
//! 0-RTT is refused (a replayed request could change state before the
//! handshake proves anything), connection migration is allowed (phones
//! change networks), and WebSockets stay on HTTP/1.1 and HTTP/2: no
//! browser speaks RFC 9220 (WebSockets over HTTP/3).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h3::error::Code;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use rustls::server::ResolvesServerCert;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use burrow_proto::listener::{ClientKey, Clients, Front, ListenerStats};

use super::h3_frames::Guarded;
use super::io::RequestBody;
use super::{
    Activity, Body, HttpState, IDLE_CLOSE_GRACE, InFlight, MAX_HEADER_BYTES, StreamTicket,
    error_response, refuse, route,
};
use crate::config::LimitsConfig;
use crate::metrics::Refused;
use crate::refusal::Refusal;
use crate::tunnel::alpn::H3_ALPN;

/// Unidirectional streams a browser may open: HTTP/3's control stream and
/// QPACK's encoder and decoder streams, and one spare (RFC 9114 6.2 asks
/// for at least three).
pub const UNI_STREAMS: u32 = 4;

/// What one browser connection may send before the edge has read it (all
/// streams together; each stream 2 MiB, as on the tunnel): about what
/// hyper allows an HTTP/2 connection.
pub const RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;
/// What the edge buffers for one browser connection that has not
/// acknowledged it yet.
pub const SEND_WINDOW: u64 = 4 * 1024 * 1024;

/// Browser connections the tunnel may have handed over and not yet been
/// taken here.
pub const INTAKE: usize = 256;

/// H3_EXCESSIVE_LOAD, as a QUIC application close code.
pub const EXCESSIVE_LOAD: quinn::VarInt = quinn::VarInt::from_u32(0x107);

/// The sending half of a request stream.
type H3Send = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;
/// A request stream whose head has not been read yet.
type Resolver = h3::server::RequestResolver<Guarded, Bytes>;

/// The TLS config browsers meet on the UDP port: TLS 1.3, ALPN `h3`, the
/// HTTPS listener's certificates, no early data (0-RTT refused: a replayed
/// request would be served before the handshake proves anything), and
/// stateless session tickets so a phone that comes back resumes.
pub fn tls_config(
    certs: Arc<dyn ResolvesServerCert>,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        burrow_proto::quic::crypto_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_cert_resolver(certs);
    config.alpn_protocols = vec![H3_ALPN.to_vec()];
    config.max_early_data_size = 0;
    config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    Ok(config)
}

/// The `Alt-Svc` value the HTTPS listener sends when HTTP/3 is on: the
/// same host, this UDP port, remembered for a day.
pub fn alt_svc(port: u16) -> header::HeaderValue {
    header::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .expect("an Alt-Svc value with a port is a valid header value")
}

/// Serves the browser connections the tunnel hands over on `intake`
/// until `shutdown`; then each connection gets GOAWAY, finishes what it
/// has in flight and closes. Connection tasks are tracked by `tracker`.
pub async fn serve(
    mut intake: mpsc::Receiver<quinn::Connection>,
    state: watch::Receiver<Arc<HttpState>>,
    (header_timeout, limits): (Duration, LimitsConfig),
    front: Arc<Front>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (clients, stats) = (front.clients(), front.stats());
    loop {
        let conn = tokio::select! {
            c = intake.recv() => match c {
                Some(c) => c,
                None => return,
            },
            () = shutdown.cancelled() => return,
        };
        let peer = conn.remote_address();
        let Some(permit) = front.admit(peer) else {
            conn.close(EXCESSIVE_LOAD, b"too many connections");
            continue;
        };
        let conn_state = Connection {
            state: state.clone(),
            header_timeout,
            limits,
            clients: clients.clone(),
            stats: stats.clone(),
            shutdown: shutdown.clone(),
            tracker: tracker.clone(),
            key: permit.key,
        };
        tracker.spawn(async move {
            let _permit = permit;
            conn_state.serve(conn).await;
        });
    }
}

/// What one browser connection's requests share.
struct Connection {
    state: watch::Receiver<Arc<HttpState>>,
    header_timeout: Duration,
    limits: LimitsConfig,
    /// The "h3" listener's per-address table and counters.
    clients: Arc<Clients>,
    stats: Arc<ListenerStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    key: ClientKey,
}

impl Connection {
    async fn serve(self, conn: quinn::Connection) {
        let peer = conn.remote_address();
        let sni: Option<Arc<str>> = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.server_name)
            .map(Arc::from);
        let quic = conn.clone();
        // The client must open its control and QPACK streams; one that
        // does not gets the same time as a request head.
        let mut builder = h3::server::builder();
        builder.max_field_section_size(MAX_HEADER_BYTES as u64);
        let (guarded, goaway_state) = Guarded::new(h3_quinn::Connection::new(conn));
        let build = builder.build::<_, Bytes>(guarded);
        let mut h3 = tokio::select! {
            built = tokio::time::timeout(self.header_timeout, build) => match built {
                Ok(Ok(h3)) => h3,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "http/3 connection failed to start");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "http/3 connection did not start in time");
                    quic.close(EXCESSIVE_LOAD, b"too slow");
                    return;
                }
            },
            () = self.shutdown.cancelled() => return,
        };
        let activity = Activity::new();
        let mut closing = false;
        // Whether what was sent may still be on its way: then the client,
        // told GOAWAY, gets time to read it and close the connection itself.
        let mut linger = true;
        let mut accepted = 0usize;
        loop {
            tokio::select! {
                accepted_stream = h3.accept() => match accepted_stream {
                    Ok(Some(resolver)) => {
                        let request = self.request(&quic, &activity, sni.clone());
                        let header_timeout = self.header_timeout;
                        self.tracker.spawn(async move {
                            match request {
                                Some(request) => request.run(resolver).await,
                                None => refuse_stream(resolver, header_timeout).await,
                            }
                        });
                        accepted += 1;
                        // h3 remembers a stream whose head never came for
                        // the connection's life: a connection serves this
                        // many requests, then the client opens another
                        // (nginx's keepalive_requests).
                        if accepted >= MAX_REQUESTS && !closing {
                            debug!(%peer, "http/3 connection served its requests; GOAWAY");
                            closing = true;
                            goaway(&mut h3, &goaway_state).await;
                        }
                    }
                    // The client said GOAWAY and its requests are done.
                    Ok(None) => break,
                    Err(e) => {
                        debug!(%peer, error = %e, "http/3 connection ended");
                        linger = false;
                        break;
                    }
                },
                () = self.shutdown.cancelled(), if !closing => {
                    closing = true;
                    goaway(&mut h3, &goaway_state).await;
                }
                // After GOAWAY, what was in flight has ended.
                () = activity.idle_for(IDLE_CLOSE_GRACE), if closing => break,
                () = activity.idle_for(self.limits.idle_timeout), if !closing => {
                    self.stats.closed_idle.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    debug!(%peer, idle_timeout = ?self.limits.idle_timeout, "closing idle http/3 connection");
                    goaway(&mut h3, &goaway_state).await;
                    // Nothing was sent for a whole idle timeout.
                    linger = false;
                    break;
                }
            }
        }
        if linger {
            // Closing drops what the client has not acknowledged yet; a
            // client that has read everything closes first.
            let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, quic.closed()).await;
        }
        // Dropping `h3` closes the connection (H3_NO_ERROR).
    }

    /// A request's share of the connection: its place under
    /// `streams_per_ip` and its count on the connection's activity; `None`
    /// when the client has `streams_per_ip` requests in flight already.
    fn request(
        &self,
        quic: &quinn::Connection,
        activity: &Arc<Activity>,
        sni: Option<Arc<str>>,
    ) -> Option<H3Request> {
        let busy = activity.busy();
        let ticket = self
            .clients
            .try_stream(self.key, self.limits.streams_per_ip);
        let state = self.state.borrow().clone();
        let Some(ticket) = ticket else {
            state.metrics.refused(Refused::StreamsPerIp);
            debug!(peer = %quic.remote_address(), limit = self.limits.streams_per_ip, "too many requests in flight from one client");
            return None;
        };
        Some(H3Request {
            state,
            // Where the client is now: a phone that moved networks
            // mid-connection is judged by its current address.
            peer: quic.remote_address(),
            sni,
            header_timeout: self.header_timeout,
            in_flight: InFlight {
                _busy: busy,
                _ticket: StreamTicket(Arc::new(ticket)),
            },
        })
    }
}

/// Requests one connection serves before it is asked to make way for a
/// new one.
pub const MAX_REQUESTS: usize = 10_000;

/// Sends GOAWAY naming the first request not served, refusing that one
/// and later ones from now on. Bounded: the client controls how fast the
/// edge's control stream may send.
async fn goaway(
    h3: &mut h3::server::Connection<Guarded, Bytes>,
    state: &crate::http::h3_frames::GoawayState,
) {
    state.close_after_accepted();
    let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, h3.shutdown(1)).await;
}

/// Answers a request stream with 429 when the client has too many in
/// flight.
async fn refuse_stream(resolver: Resolver, header_timeout: Duration) {
    if let Ok(Ok((head, stream))) =
        tokio::time::timeout(header_timeout, resolver.resolve_request()).await
    {
        let (mut send, _recv) = stream.split();
        let resp = refuse::response(Refusal::TooManyStreams);
        respond(&mut send, head.method(), resp).await;
    }
}

/// One request on its way.
struct H3Request {
    state: Arc<HttpState>,
    peer: SocketAddr,
    sni: Option<Arc<str>>,
    header_timeout: Duration,
    in_flight: InFlight,
}

impl H3Request {
    async fn run(self, resolver: Resolver) {
        let peer = self.peer;
        // The request head gets the same time as over TCP.
        let (head, stream) =
            match tokio::time::timeout(self.header_timeout, resolver.resolve_request()).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    debug!(%peer, error = %e, "http/3 request head refused");
                    return;
                }
                Err(_) => {
                    debug!(%peer, "http/3 request head timed out");
                    return;
                }
            };
        self.state.metrics.http3_request();
        let (mut send, recv) = stream.split();
        if head.method() == Method::CONNECT {
            // Extended CONNECT (WebSockets over HTTP/3) is not offered in
            // SETTINGS; plain CONNECT is a proxy's job.
            let resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not served over HTTP/3",
            );
            respond(&mut send, head.method(), resp).await;
            return;
        }
        let declared = head
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if head.headers().contains_key(header::CONTENT_LENGTH) && declared.is_none() {
            let resp = refuse::response(Refusal::BadRequest("invalid Content-Length"));
            respond(&mut send, head.method(), resp).await;
            return;
        }
        let mut body = RequestBody::h3(recv, declared);
        if !head.headers().contains_key(header::CONTENT_LENGTH) && bodiless(head.method()) {
            // Cancel-safe; a body still unknown after the head's time is
            // forwarded as streamed.
            let _ = tokio::time::timeout(self.header_timeout, body.peek_h3()).await;
        }
        let method = head.method().clone();
        let req: Request<RequestBody> = head.map(|()| body);
        let resp = route::handle(req, self.state, peer, self.sni, self.in_flight).await;
        respond(&mut send, &method, resp).await;
    }
}

/// Methods whose requests normally carry no body.
fn bodiless(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// Writes `resp` to the stream as it comes: the head, each data frame as
/// the service sends it, trailers, then FIN. A body that fails midway
/// resets the stream instead, so the client sees a cut response as cut.
async fn respond(send: &mut H3Send, method: &Method, resp: Response<Body>) {
    let (mut parts, mut body) = resp.into_parts();
    // HTTP/3 forbids what HTTP/1.1 uses to manage its connection (RFC
    // 9114 4.2); a forwarded response had them taken out already.
    super::rewrite::strip_hop_by_hop(&mut parts.headers);
    // What HTTP/1.1 and HTTP/2 leave out too: no content for HEAD, 204
    // and 304 (the head says what a GET would get).
    let bodiless = *method == Method::HEAD
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if let Err(e) = send.send_response(Response::from_parts(parts, ())).await {
        debug!(error = %e, "http/3 response head not sent");
        send.stop_stream(Code::H3_INTERNAL_ERROR);
        return;
    }
    while let Some(frame) = if bodiless { None } else { body.frame().await } {
        let sent = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) if data.is_empty() => Ok(()),
                Ok(data) => send.send_data(data).await,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => send.send_trailers(trailers).await,
                    Err(_) => Ok(()),
                },
            },
            Err(e) => {
                debug!(error = %e, "response body failed; resetting the http/3 stream");
                send.stop_stream(Code::H3_INTERNAL_ERROR);
                return;
            }
        };
        if let Err(e) = sent {
            // The client went away or reset the stream, or trailers went
            // over its limit: dropping the body cancels the request
            // upstream, and the stream is reset (a dropped stream would
            // end with FIN, a cut response looking whole).
            debug!(error = %e, "http/3 response not sent whole; resetting the stream");
            send.stop_stream(Code::H3_INTERNAL_ERROR);
            return;
        }
    }
    // The body is over (and its access-log line written) before FIN.
    drop(body);
    if let Err(e) = send.finish().await {
        debug!(error = %e, "http/3 response not finished");
        send.stop_stream(Code::H3_INTERNAL_ERROR);
    }
}
