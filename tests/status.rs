//! The admin status page at `/` and `burrow status`, against an in-process
//! edge and agent.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::web::*;
use common::*;
use http::StatusCode;

/// Waits until the edge lists the agent's service (the agent reports its
/// services just after the session opens).
async fn wait_for_service(admin: SocketAddr, service: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, _, json) = admin_get(admin, "/status").await;
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        if v["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["service"] == service)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {service} in {json}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn burrow_status(admin: &str) -> std::process::Output {
    tokio::process::Command::new(burrow_bin())
        .args(["status", "--admin", admin])
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn the_page_and_the_command_show_the_agent_and_its_service() {
    let (addr, _) = upstream().await;
    let site = site(
        "admin = \"127.0.0.1:0\"",
        "[[route]]\nhost = \"chat.test\"\nagent = \"home\"\nservice = \"chat\"\nauth = \"none\"\n",
        &[("chat", format!("http://{addr}"))],
    )
    .await;
    let admin = site.admin.unwrap();
    wait_for_service(admin, "chat").await;
    // One request through the route, for its row.
    let resp = site.get("chat.test", "/headers").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let sent = body_text(resp).await.len() as u64;
    let (_, _, json) = admin_get(admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let route = &v["routes"][0];
    assert_eq!(route["host"], "chat.test", "{v}");
    assert_eq!(route["requests"], 1, "{v}");
    assert_eq!(route["bytes_sent"].as_u64(), Some(sent), "{v}");
    assert!(route["ttfb_p50_ms"].as_u64().is_some(), "{v}");
    let (_, _, metrics) = admin_get(admin, "/metrics").await;
    assert!(
        metrics.contains("burrow_route_requests_total{route=\"chat.test\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("burrow_route_time_to_first_byte_seconds_count{route=\"chat.test\"} 1\n"),
        "{metrics}"
    );

    let (status, content_type, page) = admin_get(admin, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "text/html; charset=utf-8");
    assert!(page.starts_with("<!doctype html>"), "{page}");
    assert!(page.contains("<td>home</td>"), "{page}");
    assert!(page.contains("<td>home/chat</td>"), "{page}");
    for id in ["agents", "services", "routes", "certificates", "counters"] {
        assert!(page.contains(&format!("<section id=\"{id}\">")), "{page}");
    }
    assert!(page.contains("<td>chat.test</td><td>1</td>"), "{page}");
    // The self-signed certificate is listed with its expiry.
    assert!(page.contains("<td>in "), "{page}");

    let out = burrow_status(&admin.to_string()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for word in ["AGENTS", "SERVICES", "ROUTES", "CERTIFICATES", "COUNTERS"] {
        assert!(stdout.contains(word), "{word} in\n{stdout}");
    }
    let agent_row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("home "))
        .unwrap_or_else(|| panic!("no agent row in\n{stdout}"));
    assert!(agent_row.contains("127.0.0.1:"), "{agent_row}");
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("home/chat ")),
        "no service row in\n{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("chat.test ")),
        "no route row in\n{stdout}"
    );
    assert!(stdout.contains("streams open"), "{stdout}");
}

#[tokio::test]
async fn the_command_fails_when_nothing_listens() {
    // A port held bound but not listening: connects are refused, and no
    // other test can take it meanwhile.
    let held = tokio::net::TcpSocket::new_v4().unwrap();
    held.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = held.local_addr().unwrap();
    let out = burrow_status(&addr.to_string()).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot reach the admin listener"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}
