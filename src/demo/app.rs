//! The sample chat app `burrow demo` serves through the tunnel: a chat page,
//! tokens over SSE, an endpoint shaped like Ollama's streaming `/api/chat`
//! (NDJSON), and a WebSocket echo. Plain HTTP on loopback, like the
//! services burrow fronts at home.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

/// The largest chat request the app reads.
const MAX_CHAT_BODY: usize = 1024 * 1024;
/// Pause between generated tokens unless `delay_ms` says otherwise.
const TOKEN_DELAY: Duration = Duration::from_millis(40);
const MAX_TOKEN_DELAY_MS: u64 = 2_000;
const MAX_TOKENS: usize = 10_000;
const MAX_DOWNLOAD: u64 = 16 << 30;

const REPLY: &str = "Hello from your home server! Every word of this answer travels \
through the burrow tunnel as soon as it is generated, so you see it appear token by token, \
just like a real model streaming from Ollama on your GPU PC.";

type AppBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A response body fed by a channel: each message is one chunk on the wire.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<AppBody> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn streaming(content_type: &'static str, rx: mpsc::Receiver<Bytes>) -> Response<AppBody> {
    let mut r = Response::new(ChannelBody(rx).boxed());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}

fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn token_delay(req: &Request<Incoming>) -> Duration {
    query_param(req, "delay_ms")
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(TOKEN_DELAY, |ms| {
            Duration::from_millis(ms.min(MAX_TOKEN_DELAY_MS))
        })
}

/// The reply's words, or `n` numbered tokens.
fn tokens(n: Option<usize>) -> Vec<String> {
    match n {
        Some(n) => (1..=n.min(MAX_TOKENS))
            .map(|i| format!("token{i} "))
            .collect(),
        None => REPLY.split_inclusive(' ').map(str::to_owned).collect(),
    }
}

/// Sends `chunks` one by one with `delay` between them, stopping when the
/// client goes away.
fn spawn_feed(chunks: Vec<Bytes>, delay: Duration) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        for (i, c) in chunks.into_iter().enumerate() {
            if i > 0 && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if tx.send(c).await.is_err() {
                return;
            }
        }
    });
    rx
}

fn sse(req: &Request<Incoming>) -> Response<AppBody> {
    let n = query_param(req, "n").and_then(|v| v.parse().ok());
    let mut chunks: Vec<Bytes> = tokens(n)
        .into_iter()
        .map(|t| Bytes::from(format!("data: {}\n\n", serde_json::json!({ "token": t }))))
        .collect();
    chunks.push(Bytes::from_static(b"event: done\ndata: {}\n\n"));
    streaming("text/event-stream", spawn_feed(chunks, token_delay(req)))
}

async fn chat(req: Request<Incoming>) -> Response<AppBody> {
    let delay = token_delay(&req);
    let n = query_param(&req, "n").and_then(|v| v.parse().ok());
    let body = match Limited::new(req.into_body(), MAX_CHAT_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return full(
                StatusCode::PAYLOAD_TOO_LARGE,
                "text/plain",
                "request too large\n",
            );
        }
    };
    let parsed: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                "text/plain",
                format!("invalid JSON: {e}\n"),
            );
        }
    };
    let model = parsed["model"].as_str().unwrap_or("demo").to_owned();
    let mut chunks: Vec<Bytes> = tokens(n)
        .into_iter()
        .map(|t| {
            let line = serde_json::json!({
                "model": model,
                "message": { "role": "assistant", "content": t },
                "done": false,
            });
            Bytes::from(format!("{line}\n"))
        })
        .collect();
    let last = serde_json::json!({ "model": model, "message": { "role": "assistant", "content": "" }, "done": true, "done_reason": "stop" });
    chunks.push(Bytes::from(format!("{last}\n")));
    streaming("application/x-ndjson", spawn_feed(chunks, delay))
}

/// `bytes` of filler, for measuring throughput with curl.
fn download(req: &Request<Incoming>) -> Response<AppBody> {
    const BLOCK: usize = 256 * 1024;
    let total = query_param(req, "bytes")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .min(MAX_DOWNLOAD);
    let block = Bytes::from(vec![b'x'; BLOCK]);
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let mut left = total;
        while left > 0 {
            let n = left.min(BLOCK as u64) as usize;
            if tx.send(block.slice(..n)).await.is_err() {
                return;
            }
            left -= n as u64;
        }
    });
    let mut r = streaming("application/octet-stream", rx);
    r.headers_mut().insert(header::CONTENT_LENGTH, total.into());
    r
}

fn websocket(req: Request<Incoming>) -> Response<AppBody> {
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY) else {
        return full(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "websocket upgrade required\n",
        );
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            let reply = match msg {
                Message::Text(t) if t.as_str() == "close-me" => {
                    let _ = ws.close(None).await;
                    continue;
                }
                Message::Text(_) | Message::Binary(_) => msg,
                // tungstenite queues the close reply; reading on flushes it
                // and then ends the stream.
                Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                    continue;
                }
            };
            if ws.send(reply).await.is_err() {
                break;
            }
        }
    });
    let mut r = Response::new(http_body_util::Empty::new().boxed());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    if let Ok(v) = header::HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    r
}

async fn route(req: Request<Incoming>) -> Response<AppBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => full(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        (&Method::GET, "/health") => full(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/api/version") => full(
            StatusCode::OK,
            "application/json",
            "{\"version\":\"burrow-demo\"}\n",
        ),
        (&Method::GET, "/manifest.json") => {
            full(StatusCode::OK, "application/manifest+json", MANIFEST)
        }
        (&Method::GET, "/sse") => sse(&req),
        (&Method::POST, "/api/chat") => chat(req).await,
        (&Method::GET, "/download") => download(&req),
        (&Method::GET, "/ws") => websocket(req),
        _ => full(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Serves the app on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, shutdown: CancellationToken) {
    let builder = std::sync::Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(_) => continue,
            },
            () = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(|req| async { Ok::<_, Infallible>(route(req).await) });
            let _ = builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), service)
                .await;
        });
    }
}

const MANIFEST: &str = r##"{"name":"burrow demo chat","short_name":"burrow","start_url":"/","display":"standalone","background_color":"#101418","theme_color":"#101418"}
"##;

const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="manifest" href="/manifest.json">
<title>burrow demo chat</title>
<style>
  body { font: 16px/1.5 system-ui, sans-serif; margin: 0; background: #101418; color: #e8ecef; }
  main { max-width: 42rem; margin: 0 auto; padding: 1rem; }
  h1 { font-size: 1.3rem; } .muted { color: #8a96a0; font-size: .9rem; }
  #log { min-height: 12rem; border: 1px solid #2a333b; border-radius: .5rem; padding: .75rem; white-space: pre-wrap; }
  .me { color: #7cc4ff; } .bot { color: #e8ecef; }
  form { display: flex; gap: .5rem; margin-top: .75rem; }
  input { flex: 1; padding: .5rem; border-radius: .4rem; border: 1px solid #2a333b; background: #182028; color: inherit; }
  button { padding: .5rem .9rem; border-radius: .4rem; border: 0; background: #2f7de1; color: white; }
</style>
</head>
<body>
<main>
  <h1>burrow demo chat</h1>
  <p class="muted">This page, its token stream and its WebSocket all come through the burrow tunnel.</p>
  <div id="log"></div>
  <form id="chat"><input id="prompt" placeholder="Say something" autocomplete="off"><button>Send</button></form>
  <p class="muted">Transport: <label><input type="radio" name="t" value="ndjson" checked> Ollama-style NDJSON</label>
  <label><input type="radio" name="t" value="sse"> SSE</label></p>
  <p class="muted">WebSocket echo: <span id="ws">connecting…</span></p>
</main>
<script>
const log = document.getElementById('log');
function line(cls, text) { const d = document.createElement('div'); d.className = cls; d.textContent = text; log.appendChild(d); return d; }
async function viaNdjson(prompt, out) {
  const r = await fetch('/api/chat', { method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'demo', messages: [{ role: 'user', content: prompt }] }) });
  const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
  for (;;) {
    const { value, done } = await reader.read(); if (done) break;
    buf += dec.decode(value, { stream: true }); let i;
    while ((i = buf.indexOf('\n')) >= 0) { const l = buf.slice(0, i); buf = buf.slice(i + 1);
      if (l) { const m = JSON.parse(l); out.textContent += m.message.content; } }
  }
}
function viaSse(out) {
  return new Promise(resolve => { const es = new EventSource('/sse');
    es.onmessage = e => { out.textContent += JSON.parse(e.data).token; };
    es.addEventListener('done', () => { es.close(); resolve(); });
    es.onerror = () => { es.close(); resolve(); }; });
}
document.getElementById('chat').addEventListener('submit', async e => {
  e.preventDefault(); const p = document.getElementById('prompt'); const prompt = p.value || 'hello'; p.value = '';
  line('me', 'you: ' + prompt); const out = line('bot', '');
  const t = document.querySelector('input[name=t]:checked').value;
  if (t === 'sse') await viaSse(out); else await viaNdjson(prompt, out);
});
const ws = new WebSocket((location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host + '/ws');
const wsEl = document.getElementById('ws'); let sent = 0;
ws.onopen = () => { sent = performance.now(); ws.send('ping'); };
ws.onmessage = e => { wsEl.textContent = 'echoed "' + e.data + '" in ' + (performance.now() - sent).toFixed(1) + ' ms'; };
ws.onerror = () => { wsEl.textContent = 'failed'; };
</script>
</body>
</html>
"##;
