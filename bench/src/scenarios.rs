//! The measurements. Each runs every target in turn within a round (the
//! order rotates per round), so slow drifts of the machine hit all columns
//! alike; the report keeps every round and prints medians.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{BoxIo, Endpoint, Proto, ReqBody, empty};
use crate::report::{Better, Report};
use crate::stats::p50_p99;
use crate::upstream::{BLOCK, Repeat, now_ns};
use crate::{DIRECT, Error, Settings, Target};

const GIB: f64 = (1u64 << 30) as f64;
const MB: f64 = 1e6;
/// A chat-sized WebSocket message.
const WS_PAYLOAD: &str = "{\"type\":\"token\",\"text\":\"hello\"}";
/// Messages or requests sent before measuring, to settle buffers and caches.
const WARM_UP: usize = 100;
/// WebSocket handshakes in flight at once while filling the held set.
const HOLD_CONCURRENCY: usize = 64;
/// How long filling the held set may take before the rest are given up.
const HOLD_LIMIT: Duration = Duration::from_secs(120);
/// How long memory may settle after connections open or close.
const SETTLE: Duration = Duration::from_secs(2);
/// How long edge and agent have to give memory back after a held set
/// closes (issue 17: under twice their idle RSS within 60 s).
const RETURN_LIMIT: Duration = Duration::from_secs(60);
/// Pause between RSS samples while waiting for memory to come back.
const RETURN_SAMPLE: Duration = Duration::from_millis(250);
/// Back means under this many times the RSS before holding.
const RETURN_FACTOR: f64 = 2.0;
/// Pause between probes while waiting for a restarted edge.
const RECOVERY_PROBE: Duration = Duration::from_millis(5);
/// A probe that takes longer than this counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a restarted stack may take to serve again.
const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// Targets in round `round`'s order: rotated so none is always first.
fn rotated<'a>(targets: &'a [&'a Target], round: usize) -> Vec<&'a Target> {
    let mut v: Vec<&Target> = targets.to_vec();
    if !v.is_empty() {
        let k = round % v.len();
        v.rotate_left(k);
    }
    v
}

async fn read_body(resp: http::Response<hyper::body::Incoming>) -> Result<u64, Error> {
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("got {status}").into());
    }
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        n += frame?.data_ref().map_or(0, |d| d.len() as u64);
    }
    Ok(n)
}

struct Transfer {
    secs: f64,
    edge_cpu: f64,
    agent_cpu: f64,
}

async fn transfer(t: &Target, bytes: u64, upload: bool) -> Result<Transfer, Error> {
    let mut s = t.endpoint.h1().await?;
    let req = if upload {
        let body: ReqBody = Repeat::new(Bytes::from(vec![b'u'; BLOCK]), bytes).boxed();
        let mut r = t.endpoint.request(Proto::H1, Method::POST, "/upload", body);
        r.headers_mut()
            .insert(http::header::CONTENT_LENGTH, bytes.into());
        r
    } else {
        let path = format!("/download?bytes={bytes}");
        t.endpoint.request(Proto::H1, Method::GET, &path, empty())
    };
    let (e0, a0) = t.cpu();
    let start = Instant::now();
    let resp = s.send_request(req).await?;
    let status = resp.status();
    let got = if upload {
        let body = resp.into_body().collect().await?.to_bytes();
        std::str::from_utf8(&body)?.trim().parse::<u64>().ok()
    } else {
        Some(read_body(resp).await?)
    };
    let secs = start.elapsed().as_secs_f64();
    let (e1, a1) = t.cpu();
    if got != Some(bytes) {
        return Err(format!("{}: {status}, moved {got:?} of {bytes} bytes", t.name).into());
    }
    Ok(Transfer {
        secs,
        edge_cpu: e1 - e0,
        agent_cpu: a1 - a0,
    })
}

pub async fn bulk(targets: &[&Target], s: &Settings, report: &mut Report) -> Result<(), Error> {
    let gib = s.bulk_bytes as f64 / GIB;
    for round in 0..s.rounds {
        for t in rotated(targets, round) {
            for (upload, dir) in [(false, "download"), (true, "upload")] {
                let r = transfer(t, s.bulk_bytes, upload).await?;
                let rate = s.bulk_bytes as f64 / r.secs / MB;
                eprintln!(
                    "bulk {}/{}: {} {dir} {rate:.0} MB/s",
                    round + 1,
                    s.rounds,
                    t.name
                );
                report.push("bulk", dir, "MB/s", Better::Higher, t.name, rate);
                if !t.edge_pids.is_empty() {
                    let metric = format!("{dir} edge CPU");
                    report.push(
                        "bulk",
                        &metric,
                        "s/GiB",
                        Better::Lower,
                        t.name,
                        r.edge_cpu / gib,
                    );
                }
                if !t.agent_pids.is_empty() {
                    let metric = format!("{dir} agent CPU");
                    report.push(
                        "bulk",
                        &metric,
                        "s/GiB",
                        Better::Lower,
                        t.name,
                        r.agent_cpu / gib,
                    );
                }
            }
        }
    }
    Ok(())
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
    H3(crate::client::H3Sender),
}

impl Sender {
    async fn get(&mut self, endpoint: &Endpoint, path: &str) -> Result<u64, Error> {
        let resp = match self {
            Self::H1(s) => {
                s.ready().await?;
                s.send_request(endpoint.request(Proto::H1, Method::GET, path, empty()))
                    .await?
            }
            Self::H2(s) => {
                s.ready().await?;
                s.send_request(endpoint.request(Proto::H2, Method::GET, path, empty()))
                    .await?
            }
            Self::H3(s) => {
                let (status, mut stream) = s.get(path).await?;
                if !status.is_success() {
                    return Err(format!("got {status}").into());
                }
                let mut n = 0u64;
                while let Some(chunk) = stream.recv_data().await? {
                    n += bytes::Buf::remaining(&chunk) as u64;
                }
                return Ok(n);
            }
        };
        read_body(resp).await
    }
}

async fn sender(endpoint: &Endpoint, proto: Proto) -> Result<Sender, Error> {
    Ok(match proto {
        Proto::H1 => Sender::H1(endpoint.h1().await?),
        Proto::H2 => Sender::H2(endpoint.h2().await?),
        Proto::H3 => Sender::H3(
            endpoint
                .h3
                .as_ref()
                .ok_or("no HTTP/3 on this target")?
                .connect()
                .await?,
        ),
    })
}

struct Load {
    per_sec: f64,
    latencies_ms: Vec<f64>,
    errors: u64,
}

/// `conns` connections, each with one request in flight, for `secs`.
async fn load(endpoint: &Endpoint, proto: Proto, conns: usize, secs: f64) -> Result<Load, Error> {
    let mut connecting = JoinSet::new();
    for _ in 0..conns {
        let e = endpoint.clone();
        connecting.spawn(async move { sender(&e, proto).await });
    }
    let mut senders = Vec::with_capacity(conns);
    while let Some(r) = connecting.join_next().await {
        senders.push(r??);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = JoinSet::new();
    for mut s in senders {
        let e = endpoint.clone();
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match s.get(&e, "/small").await {
                    Ok(_) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(_) => {
                        errors += 1;
                        // A broken connection stays broken: reconnect.
                        match sender(&e, proto).await {
                            Ok(fresh) => s = fresh,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut latencies_ms = Vec::new();
    let mut errors = 0;
    while let Some(r) = tasks.join_next().await {
        let (lat, err) = r?;
        latencies_ms.extend(lat);
        errors += err;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(Load {
        per_sec: latencies_ms.len() as f64 / elapsed,
        latencies_ms,
        errors,
    })
}

pub async fn small(targets: &[&Target], s: &Settings, report: &mut Report) -> Result<(), Error> {
    for round in 0..s.rounds {
        for t in rotated(targets, round) {
            let h3 = t.endpoint.h3.is_some().then_some((Proto::H3, "HTTP/3"));
            for (proto, label) in [(Proto::H1, "HTTP/1.1"), (Proto::H2, "HTTP/2")]
                .into_iter()
                .chain(h3)
            {
                let (e0, a0) = t.cpu();
                let mut l = load(&t.endpoint, proto, s.conns, s.small_secs).await?;
                let (e1, a1) = t.cpu();
                let done = l.latencies_ms.len().max(1) as f64;
                if !t.edge_pids.is_empty() {
                    let us = (e1 - e0) * 1e6 / done;
                    report.push(
                        "small",
                        &format!("{label} edge CPU"),
                        "µs/req",
                        Better::Lower,
                        t.name,
                        us,
                    );
                }
                if !t.agent_pids.is_empty() {
                    let us = (a1 - a0) * 1e6 / done;
                    report.push(
                        "small",
                        &format!("{label} agent CPU"),
                        "µs/req",
                        Better::Lower,
                        t.name,
                        us,
                    );
                }
                let (p50, p99) = p50_p99(&mut l.latencies_ms);
                eprintln!(
                    "small {}/{}: {} {label} {:.0} req/s p50 {p50:.2} ms p99 {p99:.2} ms ({} errors)",
                    round + 1,
                    s.rounds,
                    t.name,
                    l.per_sec,
                    l.errors
                );
                report.push(
                    "small",
                    &format!("{label} rate"),
                    "req/s",
                    Better::Higher,
                    t.name,
                    l.per_sec,
                );
                report.push(
                    "small",
                    &format!("{label} p50"),
                    "ms",
                    Better::Lower,
                    t.name,
                    p50,
                );
                report.push(
                    "small",
                    &format!("{label} p99"),
                    "ms",
                    Better::Lower,
                    t.name,
                    p99,
                );
                if l.errors > 0 {
                    report.note(format!(
                        "small {label} round {}: {} had {} failed requests",
                        round + 1,
                        t.name,
                        l.errors
                    ));
                }
            }
        }
    }
    Ok(())
}

struct SseRun {
    first_ms: f64,
    latencies_us: Vec<f64>,
}

async fn sse_run(t: &Target, events: u64, interval_us: u64) -> Result<SseRun, Error> {
    let mut s = t.endpoint.h1().await?;
    // Warm the connection: time to first event is for a request on an open
    // connection, what a chat app sends for each message.
    for _ in 0..3 {
        s.ready().await?;
        let resp = s
            .send_request(
                t.endpoint
                    .request(Proto::H1, Method::GET, "/small", empty()),
            )
            .await?;
        read_body(resp).await?;
    }
    s.ready().await?;
    let path = format!("/sse?n={events}&interval_us={interval_us}");
    let sent = now_ns();
    let resp = s
        .send_request(t.endpoint.request(Proto::H1, Method::GET, &path, empty()))
        .await?;
    if !resp.status().is_success() {
        return Err(format!("{}: sse got {}", t.name, resp.status()).into());
    }
    let mut body = resp.into_body();
    let mut events_seen = SseTimes::new(events, sent);
    while let Some(frame) = body.frame().await {
        let arrived = now_ns();
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        events_seen.push(&data, arrived)?;
    }
    events_seen.finish(t.name)
}

/// Per-event latencies of an SSE stream whose events carry their send
/// time (`data: <ns>`), as chunks arrive.
struct SseTimes {
    expected: u64,
    sent: u64,
    buf: Vec<u8>,
    first: Option<u64>,
    latencies_us: Vec<f64>,
}

impl SseTimes {
    fn new(expected: u64, sent: u64) -> Self {
        Self {
            expected,
            sent,
            buf: Vec::new(),
            first: None,
            latencies_us: Vec::with_capacity(usize::try_from(expected).unwrap_or(0)),
        }
    }

    /// A chunk that arrived at `arrived` (ns).
    fn push(&mut self, data: &[u8], arrived: u64) -> Result<(), Error> {
        self.buf.extend_from_slice(data);
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let stamp = std::str::from_utf8(&event)?
                .trim()
                .strip_prefix("data: ")
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or("malformed sse event")?;
            self.first.get_or_insert(arrived);
            self.latencies_us
                .push(arrived.saturating_sub(stamp) as f64 / 1e3);
        }
        Ok(())
    }

    fn finish(self, name: &str) -> Result<SseRun, Error> {
        if self.latencies_us.len() as u64 != self.expected {
            return Err(format!(
                "{name}: got {} of {} events",
                self.latencies_us.len(),
                self.expected
            )
            .into());
        }
        Ok(SseRun {
            first_ms: self
                .first
                .map_or(f64::NAN, |f| f.saturating_sub(self.sent) as f64 / 1e6),
            latencies_us: self.latencies_us,
        })
    }
}

/// [`sse_run`] over HTTP/3, on a warm connection too.
async fn sse_run_h3(t: &Target, events: u64, interval_us: u64) -> Result<Option<SseRun>, Error> {
    let Some(h3) = &t.endpoint.h3 else {
        return Ok(None);
    };
    let mut s = h3.connect().await?;
    for _ in 0..3 {
        let (_, mut stream) = s.get("/small").await?;
        while stream.recv_data().await?.is_some() {}
    }
    let path = format!("/sse?n={events}&interval_us={interval_us}");
    let sent = now_ns();
    let (status, mut stream) = s.get(&path).await?;
    if !status.is_success() {
        return Err(format!("{}: sse over h3 got {status}", t.name).into());
    }
    let mut events_seen = SseTimes::new(events, sent);
    while let Some(mut chunk) = stream.recv_data().await? {
        let arrived = now_ns();
        let n = bytes::Buf::remaining(&chunk);
        events_seen.push(&bytes::Buf::copy_to_bytes(&mut chunk, n), arrived)?;
    }
    events_seen.finish(t.name).map(Some)
}

/// Records `value` and, for non-direct targets, its excess over direct in
/// the same round.
fn push_with_added(
    report: &mut Report,
    scenario: &'static str,
    metric: &str,
    unit: &'static str,
    round: &[(&'static str, f64)],
) {
    let direct = round.iter().find(|(n, _)| *n == DIRECT).map(|(_, v)| *v);
    for (name, v) in round {
        report.push(scenario, metric, unit, Better::Lower, name, *v);
        if let (Some(d), true) = (direct, *name != DIRECT) {
            report.push(
                scenario,
                &format!("{metric} added"),
                unit,
                Better::Lower,
                name,
                v - d,
            );
        }
    }
}

pub async fn sse(targets: &[&Target], s: &Settings, report: &mut Report) -> Result<(), Error> {
    for round in 0..s.rounds {
        let mut first = Vec::new();
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        for t in rotated(targets, round) {
            let mut r = sse_run(t, s.sse_events, s.sse_interval_us).await?;
            let (p50, p99) = p50_p99(&mut r.latencies_us);
            eprintln!(
                "sse {}/{}: {} first event {:.2} ms, per event p50 {p50:.0} µs p99 {p99:.0} µs",
                round + 1,
                s.rounds,
                t.name,
                r.first_ms
            );
            first.push((t.name, r.first_ms));
            p50s.push((t.name, p50));
            p99s.push((t.name, p99));
        }
        push_with_added(report, "sse", "first event", "ms", &first);
        push_with_added(report, "sse", "per-event p50", "µs", &p50s);
        push_with_added(report, "sse", "per-event p99", "µs", &p99s);
        // The same stream over HTTP/3 where a target serves it, beside
        // the direct figures of this round.
        let direct = |v: &[(&'static str, f64)]| v.iter().find(|(n, _)| *n == DIRECT).copied();
        for t in targets {
            let Some(mut r) = sse_run_h3(t, s.sse_events, s.sse_interval_us).await? else {
                continue;
            };
            let (p50, p99) = p50_p99(&mut r.latencies_us);
            eprintln!(
                "sse {}/{}: {} over HTTP/3 first event {:.2} ms, per event p50 {p50:.0} µs p99 {p99:.0} µs",
                round + 1,
                s.rounds,
                t.name,
                r.first_ms
            );
            for (metric, unit, all, v) in [
                ("HTTP/3 first event", "ms", &first, r.first_ms),
                ("HTTP/3 per-event p50", "µs", &p50s, p50),
                ("HTTP/3 per-event p99", "µs", &p99s, p99),
            ] {
                let round: Vec<_> = direct(all).into_iter().chain([(t.name, v)]).collect();
                push_with_added(report, "sse", metric, unit, &round);
            }
        }
    }
    Ok(())
}

async fn echo(ws: &mut WebSocketStream<BoxIo>) -> Result<(), Error> {
    ws.send(Message::text(WS_PAYLOAD)).await?;
    loop {
        match ws.next().await {
            Some(Ok(m)) if m.is_text() || m.is_binary() => return Ok(()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err("websocket closed".into()),
        }
    }
}

async fn ws_round_trips(t: &Target, messages: usize) -> Result<Vec<f64>, Error> {
    let mut ws = t.endpoint.websocket().await?;
    for _ in 0..WARM_UP {
        echo(&mut ws).await?;
    }
    let mut lat = Vec::with_capacity(messages);
    for _ in 0..messages {
        let start = Instant::now();
        echo(&mut ws).await?;
        lat.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let _ = ws.close(None).await;
    Ok(lat)
}

async fn ws_rate(t: &Target, conns: usize, secs: f64) -> Result<f64, Error> {
    let mut opening = JoinSet::new();
    for _ in 0..conns {
        let e = t.endpoint.clone();
        opening.spawn(async move { e.websocket().await });
    }
    let mut sockets = Vec::with_capacity(conns);
    while let Some(r) = opening.join_next().await {
        sockets.push(r??);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = JoinSet::new();
    for mut ws in sockets {
        tasks.spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                if echo(&mut ws).await.is_err() {
                    break;
                }
                n += 1;
            }
            let _ = ws.close(None).await;
            n
        });
    }
    let mut total = 0u64;
    while let Some(n) = tasks.join_next().await {
        total += n?;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

pub async fn websocket(
    targets: &[&Target],
    s: &Settings,
    report: &mut Report,
) -> Result<(), Error> {
    for round in 0..s.rounds {
        let mut p50s = Vec::new();
        let mut p99s = Vec::new();
        for t in rotated(targets, round) {
            let mut lat = ws_round_trips(t, s.ws_messages).await?;
            let (p50, p99) = p50_p99(&mut lat);
            let rate = ws_rate(t, s.ws_conns, s.ws_secs).await?;
            eprintln!(
                "websocket {}/{}: {} echo p50 {p50:.0} µs p99 {p99:.0} µs, {rate:.0} msg/s over {} connections",
                round + 1,
                s.rounds,
                t.name,
                s.ws_conns
            );
            p50s.push((t.name, p50));
            p99s.push((t.name, p99));
            let metric = format!("echo rate, {} conns", s.ws_conns);
            report.push("websocket", &metric, "msg/s", Better::Higher, t.name, rate);
        }
        push_with_added(report, "websocket", "echo p50", "µs", &p50s);
        push_with_added(report, "websocket", "echo p99", "µs", &p99s);
    }
    Ok(())
}

/// Opens `n` WebSockets and keeps them; returns them and the failures.
async fn hold(endpoint: &Endpoint, n: usize) -> (Vec<WebSocketStream<BoxIo>>, Vec<String>) {
    let slots = std::sync::Arc::new(Semaphore::new(HOLD_CONCURRENCY));
    let mut opening = JoinSet::new();
    for _ in 0..n {
        let e = endpoint.clone();
        let slots = slots.clone();
        opening.spawn(async move {
            let _slot = slots.acquire_owned().await;
            e.websocket().await
        });
    }
    let mut held = Vec::with_capacity(n);
    let mut failures = Vec::new();
    let deadline = tokio::time::Instant::now() + HOLD_LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, opening.join_next()).await {
            Ok(Some(Ok(Ok(ws)))) => held.push(ws),
            Ok(Some(Ok(Err(e)))) => failures.push(e.to_string()),
            Ok(Some(Err(e))) => failures.push(e.to_string()),
            Ok(None) => break,
            Err(_) => {
                failures.push(format!(
                    "{} still opening after {HOLD_LIMIT:?}",
                    opening.len()
                ));
                opening.abort_all();
                break;
            }
        }
    }
    (held, failures)
}

pub fn rss_mib(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| crate::procfs::rss_kib(*p).ok())
        .sum::<u64>() as f64
        / 1024.0
}

/// Idle memory of every stack, as it is now.
pub fn idle_memory(targets: &[&Target], label: &str, report: &mut Report) {
    for t in targets {
        let e = rss_mib(&t.edge_pids);
        let a = rss_mib(&t.agent_pids);
        report.push(
            "memory",
            &format!("{label} edge"),
            "MiB",
            Better::Lower,
            t.name,
            e,
        );
        report.push(
            "memory",
            &format!("{label} agent"),
            "MiB",
            Better::Lower,
            t.name,
            a,
        );
        report.push(
            "memory",
            &format!("{label} total"),
            "MiB",
            Better::Lower,
            t.name,
            e + a,
        );
    }
}

fn fds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| crate::procfs::open_fds(*p).ok())
        .sum::<u64>() as f64
}

/// Open descriptors of edge and agent: after the held sockets close they
/// must return to where they were, whatever the allocator keeps.
fn push_fds(t: &Target, label: &str, report: &mut Report) {
    let metric = |side: &str| format!("{label} {side} open fds");
    report.push(
        "memory",
        &metric("edge"),
        "fds",
        Better::Lower,
        t.name,
        fds(&t.edge_pids),
    );
    report.push(
        "memory",
        &metric("agent"),
        "fds",
        Better::Lower,
        t.name,
        fds(&t.agent_pids),
    );
}

pub async fn memory(targets: &[&Target], s: &Settings, report: &mut Report) -> Result<(), Error> {
    // Connections the scenarios before closed (100 WebSockets just now)
    // finish closing first, so they are not counted in the baseline.
    tokio::time::sleep(SETTLE).await;
    for t in targets {
        idle_memory(&[*t], "before holding", report);
        push_fds(t, "before holding", report);
        // Idle is the RSS before any scenario ran, when there is one.
        let idle = |side: &str, pids: &[u32]| {
            report
                .get("memory", &format!("idle at start {side}"), t.name)
                .unwrap_or_else(|| rss_mib(pids))
        };
        let (edge_idle, agent_idle) = (idle("edge", &t.edge_pids), idle("agent", &t.agent_pids));
        // The largest count runs twice: RSS that stays put after the
        // second cycle is the allocator keeping pages, growth is a leak.
        let mut counts = s.held.clone();
        if let Some(&max) = s.held.iter().max() {
            counts.push(max);
        }
        let cycles = counts.len();
        for (i, &n) in counts.iter().enumerate() {
            let again = i == cycles - 1 && cycles > 1;
            if again {
                idle_memory(&[*t], "after close", report);
                push_fds(t, "after close", report);
            }
            let label = if again {
                format!("{n} held again")
            } else {
                format!("{n} held")
            };
            let e0 = rss_mib(&t.edge_pids);
            let a0 = rss_mib(&t.agent_pids);
            let start = Instant::now();
            let (held, failures) = hold(&t.endpoint, n).await;
            let opened = start.elapsed();
            tokio::time::sleep(SETTLE).await;
            let e1 = rss_mib(&t.edge_pids);
            let a1 = rss_mib(&t.agent_pids);
            // Every held socket must still answer: an idle WebSocket that
            // was dropped somewhere would flatter the numbers.
            let mut held = held;
            let mut alive = 0usize;
            let step = held.len().div_ceil(50).max(1);
            for ws in held.iter_mut().step_by(step) {
                if echo(ws).await.is_ok() {
                    alive += 1;
                }
            }
            let count = held.len();
            report.push(
                "memory",
                &format!("{label}: open"),
                "conns",
                Better::Higher,
                t.name,
                count as f64,
            );
            let per = |before: f64, after: f64| (after - before) * 1024.0 / count.max(1) as f64;
            eprintln!(
                "memory: {} holding {count} websockets (opened in {:.1} s): edge {e1:.1} MiB (+{:.1} KiB each), agent {a1:.1} MiB (+{:.1} KiB each)",
                t.name,
                opened.as_secs_f64(),
                per(e0, e1),
                per(a0, a1)
            );
            if !failures.is_empty() {
                report.note(format!(
                    "{}: {} of {n} websockets failed to open (first: {})",
                    t.name,
                    failures.len(),
                    failures[0]
                ));
            }
            if alive == 0 && count > 0 {
                report.note(format!("{}: sampled held websockets did not echo", t.name));
            }
            report.push(
                "memory",
                &format!("{label}: edge per conn"),
                "KiB",
                Better::Lower,
                t.name,
                per(e0, e1),
            );
            report.push(
                "memory",
                &format!("{label}: agent per conn"),
                "KiB",
                Better::Lower,
                t.name,
                per(a0, a1),
            );
            report.push(
                "memory",
                &format!("{label}: edge+agent per conn"),
                "KiB",
                Better::Lower,
                t.name,
                per(e0 + a0, e1 + a1),
            );
            drop(held);
            given_back(t, &label, (edge_idle, agent_idle), report).await;
        }
        idle_memory(&[*t], "after a second cycle", report);
        push_fds(t, "after a second cycle", report);
    }
    Ok(())
}

/// After a held set closes: how long until edge and agent are both back
/// under `RETURN_FACTOR` times their RSS before holding, sampled every
/// `RETURN_SAMPLE` for at most `RETURN_LIMIT`; and the RSS at that moment
/// (or at the limit). Memory that never comes back reports the limit's
/// RSS and an infinite time, which fails the check.
async fn given_back(
    t: &Target,
    label: &str,
    (edge_idle, agent_idle): (f64, f64),
    report: &mut Report,
) {
    let start = Instant::now();
    let (back, edge, agent) = loop {
        let (e, a) = (rss_mib(&t.edge_pids), rss_mib(&t.agent_pids));
        if e < RETURN_FACTOR * edge_idle && a < RETURN_FACTOR * agent_idle {
            break (start.elapsed().as_secs_f64(), e, a);
        }
        if start.elapsed() >= RETURN_LIMIT {
            break (f64::INFINITY, e, a);
        }
        tokio::time::sleep(RETURN_SAMPLE).await;
    };
    eprintln!(
        "memory: {} after {label} closed: edge {edge:.1} MiB (idle {edge_idle:.1}), agent {agent:.1} MiB (idle {agent_idle:.1}), back under {RETURN_FACTOR}x idle after {back:.2} s",
        t.name
    );
    let metric = |what: &str| format!("{label} closed: {what}");
    report.push(
        "memory",
        &metric("edge RSS"),
        "MiB",
        Better::Lower,
        t.name,
        edge,
    );
    report.push(
        "memory",
        &metric("agent RSS"),
        "MiB",
        Better::Lower,
        t.name,
        agent,
    );
    report.push(
        "memory",
        &metric("back under 2x idle after"),
        "s",
        Better::Lower,
        t.name,
        back,
    );
    // The rest of the close (descriptors, tasks) settles as before.
    tokio::time::sleep(SETTLE).await;
}

/// Probes until a request succeeds; returns how long that took.
pub async fn recovery(endpoint: &Endpoint) -> Result<Duration, Error> {
    let start = Instant::now();
    loop {
        if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, endpoint.probe()).await {
            return Ok(start.elapsed());
        }
        if start.elapsed() > RECOVERY_LIMIT {
            return Err(
                format!("no successful request {RECOVERY_LIMIT:?} after the restart").into(),
            );
        }
        tokio::time::sleep(RECOVERY_PROBE).await;
    }
}

pub fn push_reconnect(report: &mut Report, name: &str, stopped: Duration, recovered: Duration) {
    eprintln!(
        "reconnect: {name} stopped in {:.0} ms, served again {:.0} ms after the new start",
        stopped.as_secs_f64() * 1e3,
        recovered.as_secs_f64() * 1e3
    );
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    report.push(
        "reconnect",
        "SIGTERM to exit",
        "ms",
        Better::Lower,
        name,
        ms(stopped),
    );
    report.push(
        "reconnect",
        "start to first OK",
        "ms",
        Better::Lower,
        name,
        ms(recovered),
    );
    report.push(
        "reconnect",
        "SIGTERM to first OK",
        "ms",
        Better::Lower,
        name,
        ms(stopped + recovered),
    );
}
