//! `burrow status`: fetch the edge's admin `/status` over plain HTTP/1.1
//! and print it as aligned text (the same view as the admin page at `/`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use burrow_edge::admin::view::Status;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The admin address `burrow status` asks unless told (the example config's).
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9180";
/// How long connecting, asking and reading the answer may take in all.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest `/status` body read.
pub const MAX_STATUS_BYTES: usize = 4 << 20;

/// The status text for the edge whose admin listener is at `admin`.
pub async fn text(admin: &str) -> Result<String, String> {
    let status = tokio::time::timeout(FETCH_TIMEOUT, fetch(admin))
        .await
        .map_err(|_| format!("{admin} did not answer within {FETCH_TIMEOUT:?}"))??;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(status.text(now))
}

async fn fetch(admin: &str) -> Result<Status, String> {
    let tcp = TcpStream::connect(admin).await.map_err(|e| {
        format!(
            "cannot reach the admin listener at {admin}: {e} \
             (is the edge running with [edge] admin = \"{admin}\"?)"
        )
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{admin}: {e}"))?;
    tokio::spawn(conn);
    let request = Request::get("/status")
        .header(header::HOST, admin)
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{admin}: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("asking {admin} for /status: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!(
            "{admin}/status answered {} (is it a burrow edge's admin listener?)",
            response.status()
        ));
    }
    let body = Limited::new(response.into_body(), MAX_STATUS_BYTES)
        .collect()
        .await
        .map_err(|e| format!("reading {admin}/status: {e}"))?
        .to_bytes();
    let value: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| format!("{admin}/status is not JSON: {e}"))?;
    Status::from_json(value).map_err(|e| format!("{admin}/status has an unexpected shape: {e}"))
}
