//! Answers a sleeping machine's service can give without waking it.
//!
//! Opening Open WebUI lists models (`GET /api/tags`, `/api/ps`,
//! `/api/version` to Ollama) a few seconds after the page loads; with the
//! GPU PC asleep, each listing would wake it, and a PC that boots slower
//! than Open WebUI's model-list timeout empties the model picker anyway.
//! For each path in `[service.wake] cached`, the agent keeps the last good
//! answer (status 200, fetched by the agent itself while the service is up,
//! at once when it comes up and then every [`REFRESH_EVERY`]); while the
//! machine sleeps, a GET for one of those paths is answered from here and
//! wakes nothing. Every other request wakes the machine as before.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use burrow_proto::ServiceState;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use crate::config::ServiceConfig;
use crate::monitor::Monitors;

/// Paths one service may have answered from the cache.
pub const MAX_CACHED_PATHS: usize = 16;
/// The largest answer kept (a long model list is a few tens of KiB).
pub const MAX_CACHED_BODY: usize = 1024 * 1024;
/// How often the answers are fetched again while the service is up.
pub const REFRESH_EVERY: Duration = Duration::from_secs(30);
/// How long one fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request or response head read.
pub const MAX_HEAD: usize = 16 * 1024;

/// A path as `cached` accepts it: absolute, printable ASCII, no query.
pub fn is_cacheable_path(path: &str) -> bool {
    path.starts_with('/')
        && path.len() <= 256
        && path.bytes().all(|b| b.is_ascii_graphic())
        && !path.contains(['?', '#'])
}

#[derive(Debug, Clone)]
struct Entry {
    content_type: Option<String>,
    body: Bytes,
    fetched: SystemTime,
}

/// The last good answers of one service, by path.
#[derive(Debug, Default)]
pub struct ResponseCache {
    entries: Mutex<HashMap<String, Entry>>,
}

impl ResponseCache {
    /// The cached answer to `GET path` as a whole HTTP/1.1 response
    /// (`Connection: close`), if there is one.
    pub fn answer(&self, path: &str) -> Option<Bytes> {
        let entry = self
            .entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(path)
            .cloned()?;
        let age = SystemTime::now()
            .duration_since(entry.fetched)
            .unwrap_or_default()
            .as_secs();
        let mut out = BytesMut::with_capacity(256 + entry.body.len());
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        if let Some(ct) = &entry.content_type {
            out.extend_from_slice(format!("Content-Type: {ct}\r\n").as_bytes());
        }
        out.extend_from_slice(
            format!(
                "Content-Length: {}\r\nAge: {age}\r\nX-Burrow-Cache: asleep\r\nConnection: close\r\n\r\n",
                entry.body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(&entry.body);
        Some(out.freeze())
    }

    fn store(&self, path: &str, entry: Entry) {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), entry);
    }

    /// Reads a request head from `client` into `buf` (kept for the
    /// service if the cache does not answer) and gives the cached answer
    /// to it: `Some` only for a GET without a body for a cached path.
    pub async fn answer_request<R: AsyncRead + Unpin>(
        &self,
        client: &mut R,
        buf: &mut BytesMut,
    ) -> io::Result<Option<Bytes>> {
        let Some((method, path)) = read_request_head(client, buf).await? else {
            return Ok(None);
        };
        if method != "GET" || !is_bodyless_get(buf) {
            return Ok(None);
        }
        let answer = self.answer(&path);
        info!(%path, hit = answer.is_some(), "a request for a sleeping machine, for the cache");
        Ok(answer)
    }
}

/// Keeps `service`'s cached answers fresh: each time the service is up,
/// at once and then every [`REFRESH_EVERY`], until `shutdown`.
pub async fn refresh_while_up(
    service: Arc<ServiceConfig>,
    cache: Arc<ResponseCache>,
    monitors: Monitors,
    shutdown: CancellationToken,
) {
    let paths = service
        .wake
        .as_ref()
        .map(|w| w.cached.clone())
        .unwrap_or_default();
    if paths.is_empty() {
        return;
    }
    let mut views = monitors.subscribe();
    loop {
        let up = views
            .borrow_and_update()
            .iter()
            .any(|v| v.name == service.name && v.state == ServiceState::Up);
        if up {
            for path in &paths {
                match tokio::time::timeout(FETCH_TIMEOUT, fetch(&service.target, path)).await {
                    Ok(Ok(entry)) => {
                        debug!(service = %service.name, %path, bytes = entry.body.len(), "cached an answer");
                        cache.store(path, entry);
                    }
                    Ok(Err(e)) => {
                        info!(service = %service.name, %path, error = %e, "cannot cache an answer")
                    }
                    Err(_) => {
                        info!(service = %service.name, %path, "cannot cache an answer: timed out")
                    }
                }
            }
        }
        // Refresh on schedule while up; otherwise wait for the next change.
        let next = async {
            if up {
                tokio::time::sleep(REFRESH_EVERY).await;
            } else {
                let _ = views.changed().await;
            }
        };
        tokio::select! {
            () = next => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// `GET path` from the service, with `Connection: close`; a 200 answer.
async fn fetch(target: &str, path: &str) -> Result<Entry, String> {
    let mut tcp = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nAccept: */*\r\nUser-Agent: burrow-agent\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    (&mut tcp)
        .take((MAX_HEAD + MAX_CACHED_BODY + 1) as u64)
        .read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let (status, content_type, body) = parse_response(&raw)?;
    if status != 200 {
        return Err(format!("status {status}"));
    }
    Ok(Entry {
        content_type,
        body,
        fetched: SystemTime::now(),
    })
}

/// Status, content type and body of a whole HTTP/1.1 response (length
/// given, chunked, or up to the close).
fn parse_response(raw: &[u8]) -> Result<(u16, Option<String>, Bytes), String> {
    let end = find_head_end(raw).ok_or("no complete response head")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "a response head that is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let (mut content_type, mut length, mut chunked) = (None, None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.to_owned()),
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(n) = length {
        if n > MAX_CACHED_BODY || rest.len() < n {
            return Err("body cut short or too large".into());
        }
        Bytes::copy_from_slice(&rest[..n])
    } else {
        Bytes::copy_from_slice(rest)
    };
    if body.len() > MAX_CACHED_BODY {
        return Err("body too large to cache".into());
    }
    Ok((status, content_type, body))
}

fn decode_chunked(mut rest: &[u8]) -> Result<Bytes, String> {
    let mut body = BytesMut::new();
    loop {
        let line_end = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line cut short")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body.freeze());
        }
        if size > MAX_CACHED_BODY || body.len() + size > MAX_CACHED_BODY || rest.len() < size + 2 {
            return Err("chunk cut short or too large".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

/// Reads an HTTP/1 request head from `client` into `buf` (and whatever
/// follows it in the same reads); returns its method and path (without the
/// query), or `None` when the bytes are not a request head within
/// [`MAX_HEAD`] or the client closed first.
async fn read_request_head<R: AsyncRead + Unpin>(
    client: &mut R,
    buf: &mut BytesMut,
) -> io::Result<Option<(String, String)>> {
    loop {
        if let Some(end) = find_head_end(buf) {
            let head = String::from_utf8_lossy(&buf[..end]);
            let mut parts = head.split("\r\n").next().unwrap_or_default().split(' ');
            let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
                return Ok(None);
            };
            let path = target.split(['?', '#']).next().unwrap_or_default();
            return Ok(Some((method.to_owned(), path.to_owned())));
        }
        if buf.len() >= MAX_HEAD {
            return Ok(None);
        }
        if client.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Whether `buf` holds a whole request without a body: a GET with neither
/// `Content-Length` nor `Transfer-Encoding` (what a model listing is).
fn is_bodyless_get(buf: &[u8]) -> bool {
    let Some(end) = find_head_end(buf) else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    head.starts_with("get ")
        && !head.contains("\r\ncontent-length:")
        && !head.contains("\r\ntransfer-encoding:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_parse_with_a_length_chunked_or_to_the_close() {
        let r = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}extra";
        let (s, ct, body) = parse_response(r).unwrap();
        assert_eq!(
            (s, ct.as_deref(), &body[..]),
            (200, Some("application/json"), &b"{}"[..])
        );
        let r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        assert_eq!(&parse_response(r).unwrap().2[..], b"abcde");
        let r = b"HTTP/1.0 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(r).unwrap().0, 404);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn paths_are_plain_absolute_and_without_query() {
        assert!(is_cacheable_path("/api/tags"));
        for bad in ["api/tags", "/api/tags?x=1", "/a b", "/é", ""] {
            assert!(!is_cacheable_path(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_request_head_gives_method_and_path_and_keeps_the_bytes() {
        let raw = b"GET /api/tags?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\nrest";
        let mut reader = &raw[..];
        let mut buf = BytesMut::new();
        let got = read_request_head(&mut reader, &mut buf).await.unwrap();
        assert_eq!(got, Some(("GET".into(), "/api/tags".into())));
        assert_eq!(&buf[..], &raw[..]);
        assert!(is_bodyless_get(&buf));
        assert!(!is_bodyless_get(
            b"POST /api/chat HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
        ));
        let mut reader = &b"GET / HTTP/1.1\r\n"[..];
        let mut buf = BytesMut::new();
        assert_eq!(
            read_request_head(&mut reader, &mut buf).await.unwrap(),
            None
        );
    }

    #[test]
    fn an_answer_is_a_whole_response_that_closes() {
        let cache = ResponseCache::default();
        assert!(cache.answer("/api/tags").is_none());
        cache.store(
            "/api/tags",
            Entry {
                content_type: Some("application/json".into()),
                body: Bytes::from_static(b"{\"models\":[]}"),
                fetched: SystemTime::now(),
            },
        );
        let a = cache.answer("/api/tags").unwrap();
        let text = std::str::from_utf8(&a).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 13\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"models\":[]}"), "{text}");
    }
}
