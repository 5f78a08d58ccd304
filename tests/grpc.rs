//! gRPC through the edge (issue 18): a real `grpcio` server (Python, from
//! PyPI; tests/grpc/server.py) behind the agent as `h2c://`, called by a
//! real `grpcio` client over TLS through the edge (tests/grpc/client.py):
//! unary, server streaming whose messages arrive one by one, client
//! streaming, bidirectional, and a call that fails with a status code and
//! a message (carried in trailers).

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::web::*;
use common::{WAIT, path_str};

const ROUTES: &str = r#"
[[route]]
host = "grpc.test"
agent = "home"
service = "grpc"
auth = "none"
"#;

fn script(name: &str) -> String {
    format!("{}/tests/grpc/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The Python gRPC server; killed when dropped.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new("python3")
            .arg(script("server.py"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 runs (CI installs grpcio)");
        let stdout = child.stdout.take().unwrap();
        // The first line says the port it listens on (it bound port 0).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).expect("the gRPC server starts");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!("the gRPC server did not start (is grpcio installed? `python3 -m pip install grpcio`): {line:?}")
            });
        Self { child, port }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_of_every_kind_go_through_with_their_status() {
    let server = Server::start();
    let site = site(
        "",
        ROUTES,
        &[("grpc", format!("h2c://127.0.0.1:{}", server.port))],
    )
    .await;
    let edge = format!("127.0.0.1:{}", site.https.port());
    let ca = path_str(&site.cert_path());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args([&script("client.py"), &edge, &ca, "grpc.test"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .expect("python3 runs")
    });
    let out = tokio::time::timeout(WAIT * 3, out)
        .await
        .expect("the client finished in time")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "client failed: {text}");
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["echo"], "echo:hello");
    assert_eq!(
        v["count"],
        serde_json::json!(["1", "2", "3", "4", "5"]),
        "server-streamed messages, each acknowledged before the next was sent"
    );
    assert_eq!(v["sum"], "10");
    assert_eq!(v["chat"], serde_json::json!(["re:a", "re:b", "re:c"]));
    assert_eq!(
        v["fail"],
        serde_json::json!({"code": "INVALID_ARGUMENT", "message": "bad request: 42"}),
        "the status and message (trailers) reach the client"
    );
}
