//! Readiness probes: is a service answering, not merely is a port open?
//!
//! An `http://` service with `health` is ready when `GET health` answers
//! 2xx (Ollama can keep its port open with a broken GPU after a suspend; its
//! API then fails). Other services are ready when a TCP connect succeeds.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{Scheme, ServiceConfig};

/// How long a probe's TCP connect may take. A sleeping machine does not
/// answer ARP, so its connects hang rather than fail.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a whole probe may take, connect and health answer together.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The most bytes read looking for the end of the status line.
pub const MAX_STATUS_LINE: usize = 1024;

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Not ready, and why (for the log).
    NotReady(String),
}

/// Probes `service` once, within [`PROBE_TIMEOUT`].
pub async fn probe(service: &ServiceConfig) -> Readiness {
    match tokio::time::timeout(PROBE_TIMEOUT, probe_inner(service)).await {
        Ok(r) => r,
        Err(_) => Readiness::NotReady(format!("no answer in {PROBE_TIMEOUT:?}")),
    }
}

async fn probe_inner(service: &ServiceConfig) -> Readiness {
    let mut tcp = match tokio::time::timeout(
        PROBE_CONNECT_TIMEOUT,
        TcpStream::connect(&service.target),
    )
    .await
    {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Readiness::NotReady(format!("connect: {e}")),
        Err(_) => return Readiness::NotReady("connect timed out".into()),
    };
    let path = match (&service.health, service.scheme) {
        (Some(path), Scheme::Http) => path,
        _ => return Readiness::Ready,
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: burrow-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        service.target
    );
    if let Err(e) = tcp.write_all(request.as_bytes()).await {
        return Readiness::NotReady(format!("sending the health request: {e}"));
    }
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = head.windows(2).position(|w| w == b"\r\n") {
            head.truncate(end);
            break;
        }
        if head.len() >= MAX_STATUS_LINE {
            return Readiness::NotReady("health answer has no status line".into());
        }
        match tcp.read(&mut chunk).await {
            Ok(0) => return Readiness::NotReady("health answer ended early".into()),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) => return Readiness::NotReady(format!("reading the health answer: {e}")),
        }
    }
    match status_code(&head) {
        Some(code) if (200..300).contains(&code) => Readiness::Ready,
        Some(code) => Readiness::NotReady(format!("GET {path} answered {code}")),
        None => Readiness::NotReady("health answer is not HTTP".into()),
    }
}

/// The status code of an HTTP/1.x status line (without its CRLF).
pub fn status_code(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (_minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|b| *b != b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use burrow_proto::Name;
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::DEFAULT_PROBE_INTERVAL;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 204"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 503 Service Unavailable"), Some(503));
        assert_eq!(status_code(b"HTTP/2 200"), None);
        assert_eq!(status_code(b"HTTP/1.1 20"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000"), None);
        assert_eq!(status_code(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code(b""), None);
    }

    fn service(target: String, health: Option<&str>) -> ServiceConfig {
        ServiceConfig {
            name: Name::new("s").unwrap(),
            scheme: Scheme::Http,
            target,
            health: health.map(str::to_owned),
            probe_interval: DEFAULT_PROBE_INTERVAL,
            wake: None,
        }
    }

    /// A server that answers every connection with `answer` and closes.
    async fn answering(answer: &'static [u8]) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn health_must_answer_2xx() {
        let ok = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(
            probe(&service(ok, Some("/api/version"))).await,
            Readiness::Ready
        );
        let broken = answering(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert!(matches!(
            probe(&service(broken.clone(), Some("/api/version"))).await,
            Readiness::NotReady(why) if why.contains("500")
        ));
        // Without a health path, an open port is enough.
        assert_eq!(probe(&service(broken, None)).await, Readiness::Ready);
        let garbage = answering(b"SSH-2.0-x\r\n").await;
        assert!(matches!(
            probe(&service(garbage, Some("/"))).await,
            Readiness::NotReady(_)
        ));
    }

    #[tokio::test]
    async fn a_closed_port_is_not_ready() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string();
        assert!(matches!(
            probe(&service(closed, None)).await,
            Readiness::NotReady(why) if why.starts_with("connect")
        ));
    }
}
