//! `[[lan]]`: a wake-aware TCP proxy on the home network. Point a local
//! client (Open WebUI's Ollama URL) at it: each connection goes straight to
//! the service when it is up; otherwise the service's machine is woken and
//! the connection waits, its bytes unread, until the service is ready. A
//! GET for one of the service's `[service.wake] cached` paths is answered
//! from [`crate::cache`] instead while the machine sleeps, and wakes nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use burrow_proto::listener::{Front, Limits};
use burrow_proto::{ServiceState, WakeMethod};
use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span};

use crate::cache::ResponseCache;
use crate::config::ServiceConfig;
use crate::forward::connect_timeout;
use crate::monitor::{Monitors, Origin};

/// How long a LAN connection waits for its service to wake before it is
/// closed. Matches the edge's default `[route.wake] hold`.
pub const LAN_WAKE_WAIT: Duration = Duration::from_secs(180);
/// How long a client of a sleeping service with cached answers has to send
/// its request head; a slower one wakes the machine.
pub const LAN_HEAD_WAIT: Duration = Duration::from_secs(10);

/// Caps on a `[[lan]]` listener's connections. A home network's clients
/// (Open WebUI, scripts) open a few each; the caps keep a runaway client
/// from taking every file descriptor of the agent.
pub const LAN_LIMITS: Limits = Limits {
    total: 4096,
    per_ip: 512,
};

/// Accepts connections on `listener` for `service` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    service: Arc<ServiceConfig>,
    monitors: Monitors,
    cache: Option<Arc<ResponseCache>>,
    shutdown: CancellationToken,
) {
    let front = Front::new("lan", LAN_LIMITS);
    front
        .serve(listener, shutdown.clone(), |tcp, peer, permit| {
            let span = info_span!("lan", service = %service.name, %peer);
            let service = service.clone();
            let monitors = monitors.clone();
            let cache = cache.clone();
            let stop = shutdown.clone();
            tokio::spawn(
                async move {
                    let _permit = permit;
                    tokio::select! {
                        () = proxy(tcp, &service, &monitors, cache.as_deref()) => {}
                        () = stop.cancelled() => {}
                    }
                }
                .instrument(span),
            );
        })
        .await;
}

async fn connect(service: &ServiceConfig) -> Result<TcpStream, String> {
    match tokio::time::timeout(
        connect_timeout(service),
        TcpStream::connect(&service.target),
    )
    .await
    {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("connect timed out".into()),
    }
}

/// One client connection: connect (waking first when needed), then pipe.
async fn proxy(
    mut client: TcpStream,
    service: &ServiceConfig,
    monitors: &Monitors,
    cache: Option<&ResponseCache>,
) {
    let _ = client.set_nodelay(true);
    let deadline = tokio::time::Instant::now() + LAN_WAKE_WAIT;
    let mut views = monitors.subscribe();
    // What the client sent before the service was reached (its request
    // head, read to decide whether the cache answers it).
    let mut early = BytesMut::new();
    let mut looked = false;
    let upstream = loop {
        let (state, wake) = views
            .borrow_and_update()
            .iter()
            .find(|v| v.name == service.name)
            .map_or((ServiceState::Unknown, WakeMethod::NotConfigured), |v| {
                (v.state, v.wake)
            });
        let sleeping = wake == WakeMethod::MagicPacket
            && matches!(state, ServiceState::Down | ServiceState::Waking);
        if sleeping && let Some(cache) = cache.filter(|_| !looked) {
            looked = true;
            let answer =
                tokio::time::timeout(LAN_HEAD_WAIT, cache.answer_request(&mut client, &mut early))
                    .await;
            match answer {
                Ok(Ok(Some(answer))) => {
                    let _ = client.write_all(&answer).await;
                    let _ = client.shutdown().await;
                    return;
                }
                Ok(Ok(None)) => {}
                // The client is gone.
                Ok(Err(_)) => return,
                // A slow client: its request wakes the machine.
                Err(_) => {}
            }
        }
        if !sleeping {
            match connect(service).await {
                Ok(s) => break s,
                Err(e) if wake == WakeMethod::NotConfigured => {
                    info!(target = %service.target, error = %e, "cannot reach service");
                    return;
                }
                Err(e) => {
                    debug!(error = %e, "connect failed; waking");
                    monitors.connect_failed(&service.name);
                    // Let the monitor take in the failure, so a stale "up"
                    // does not send us straight back to a failing connect.
                    if !wait_until(&mut views, deadline, service, |s| {
                        !matches!(s, ServiceState::Up | ServiceState::Unknown)
                    })
                    .await
                    {
                        return;
                    }
                }
            }
        }
        monitors.wake(&service.name, Origin::Lan);
        if !wait_until(&mut views, deadline, service, |s| s == ServiceState::Up).await {
            info!(waited = ?LAN_WAKE_WAIT, "service did not wake in time; closing");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let mut upstream = upstream;
    if !early.is_empty() && upstream.write_all(&early).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => debug!(up, down, "lan connection closed"),
        Err(e) => debug!(error = %e, "lan connection aborted"),
    }
}

/// Waits until `service`'s state satisfies `pred`; `false` when the
/// deadline passed first or the monitor is gone.
async fn wait_until(
    views: &mut tokio::sync::watch::Receiver<Vec<crate::monitor::ServiceView>>,
    deadline: tokio::time::Instant,
    service: &ServiceConfig,
    pred: impl Fn(ServiceState) -> bool,
) -> bool {
    let found = views.wait_for(|vs| vs.iter().any(|v| v.name == service.name && pred(v.state)));
    matches!(tokio::time::timeout_at(deadline, found).await, Ok(Ok(_)))
}

/// The bound address of a listener, for logs and tests.
pub fn local_addr(l: &std::net::TcpListener) -> SocketAddr {
    l.local_addr()
        .expect("a bound listener has a local address")
}
