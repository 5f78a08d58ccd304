//! Traffic policy (issue 18): request rate limits per client address and
//! per user, `max_body`, and X-Real-IP (in tests/http.rs), end to end with
//! real TLS clients.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use common::web::*;
use common::{basic, cheap_hash};
use http::StatusCode;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;

const ROUTES: &str = r#"
[[route]]
host = "open.test"
agent = "home"
service = "test"
auth = "none"
rate = "10/s"
burst = 20

[[route]]
host = "small.test"
agent = "home"
service = "test"
auth = "none"
max_body = "1MiB"
"#;

fn user_routes() -> String {
    format!(
        r#"
[[user]]
name = "alice"
password = "{alice}"

[[route]]
host = "chat.test"
agent = "home"
service = "test"
auth = "basic"
users = ["alice"]
rate = "1/m"
burst = 2
rate_key = "user"
"#,
        alice = cheap_hash("wonderland")
    )
}

async fn metric(site: &Site, line_start: &str) -> u64 {
    let admin = site.admin.expect("an admin listener");
    let (_, _, text) = admin_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(line_start))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in /metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_a_second_with_a_burst_of_twenty_nodelay() {
    let (addr, _up) = upstream().await;
    let site = site(
        "admin = \"127.0.0.1:0\"",
        ROUTES,
        &[("test", format!("http://{addr}"))],
    )
    .await;
    // 100 requests from one address, on one HTTP/2 connection, in two
    // waves of 50 (under the default 100 requests in flight per address).
    let h2 = site.h2("open.test").await;
    let started = Instant::now();
    let mut sent = tokio::task::JoinSet::new();
    let mut waves = Vec::new();
    for i in 0..100 {
        if i == 50 {
            waves.push(std::mem::take(&mut sent).join_all().await);
        }
        let mut h2 = h2.clone();
        sent.spawn(async move {
            let r = h2
                .send_request(h2_get("open.test", "/headers"))
                .await
                .unwrap();
            let retry = r
                .headers()
                .get(RETRY_AFTER)
                .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
            (r.status(), retry)
        });
    }
    waves.push(sent.join_all().await);
    let (mut ok, mut limited) = (0u64, 0u64);
    for r in waves.into_iter().flatten() {
        match r {
            (StatusCode::OK, _) => ok += 1,
            (StatusCode::TOO_MANY_REQUESTS, Some(secs)) => {
                assert!(secs >= 1);
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let elapsed = started.elapsed();
    eprintln!("100 requests in {elapsed:?}: {ok} served, {limited} refused");
    // One, the burst of 20, and 10 a second for the time it took.
    let allowed = 21 + (elapsed.as_secs_f64() * 10.0).ceil() as u64;
    assert!((21..=allowed.max(31)).contains(&ok), "{ok} served");
    assert_eq!(ok + limited, 100);
    assert_eq!(
        metric(&site, "burrow_requests_refused_total{reason=\"rate\"}").await,
        limited
    );

    // Another address is unaffected.
    let mut other = site
        .h1_from("127.0.0.2".parse().unwrap(), "open.test")
        .await;
    let r = other
        .send_request(request("GET", "open.test", "/headers", empty()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_users_limit_holds_across_their_addresses() {
    let (addr, _up) = upstream().await;
    let site = site("", &user_routes(), &[("test", format!("http://{addr}"))]).await;
    let mut statuses = Vec::new();
    // alice from two addresses, in turn: one and a burst of 2 in all.
    for i in 0..6 {
        let source: IpAddr = format!("127.0.0.{}", 3 + i % 2).parse().unwrap();
        let mut c = site.h1_from(source, "chat.test").await;
        let r = c
            .send_request(
                http::Request::builder()
                    .uri("/headers")
                    .header("host", "chat.test")
                    .header(AUTHORIZATION, basic("alice", "wonderland"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429], "{statuses:?}");
    // Without a user (no credentials), the client address counts, apart.
    let mut anon = site
        .h1_from("127.0.0.3".parse().unwrap(), "chat.test")
        .await;
    let r = anon
        .send_request(request("GET", "chat.test", "/headers", empty()))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "judged as usual");
}

#[tokio::test]
async fn bodies_over_max_body_never_reach_the_service_whole() {
    let (addr, up) = upstream().await;
    let site = site("", ROUTES, &[("test", format!("http://{addr}"))]).await;
    let two_mib = Bytes::from(vec![7u8; 2 << 20]);

    // Declared too large: 413 before anything is forwarded.
    let mut c = site.h1("small.test").await;
    let r = c
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri("/upload")
                .header("host", "small.test")
                .header(CONTENT_LENGTH, two_mib.len())
                .body(Full::new(two_mib.clone()).boxed())
                .unwrap(),
        )
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert_eq!(up.uploads_started.load(Ordering::Relaxed), 0);

    // Under the cap: through.
    let mut c = site.h1("small.test").await;
    let r = c
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri("/upload")
                .header("host", "small.test")
                .body(Full::new(Bytes::from(vec![7u8; 512 << 10])).boxed())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(body_text(r).await.starts_with("524288 "));

    // Chunked, no length: cut off once over the cap; the service sees an
    // aborted upload, never a complete one.
    let chunks: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = (0..32)
        .map(|_| Ok(Frame::data(Bytes::from(vec![7u8; 64 << 10]))))
        .collect();
    let body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let mut c = site.h1("small.test").await;
    let r = c
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri("/upload")
                .header("host", "small.test")
                .body(body)
                .unwrap(),
        )
        .await;
    if let Ok(r) = r {
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
    assert!(
        up.uploads_until(|u| u.uploads_aborted.load(Ordering::Relaxed) >= 1)
            .await,
        "the service never heard the upload was cut off"
    );
    // Two started (the small one and the cut one), one aborted.
    assert_eq!(up.uploads_started.load(Ordering::Relaxed), 2);
    assert_eq!(up.uploads_aborted.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn an_api_keys_own_limit_holds_across_the_routes_that_take_it() {
    let key = burrow_edge::access::api_key::generate().unwrap();
    let routes = format!(
        r#"
[[user]]
name = "alice"
password = "{alice}"

[[api_key]]
name = "phone"
hash = "{hash}"
rate = "1/m"
burst = 1

[[route]]
host = "chat.test"
agent = "home"
service = "test"
auth = "basic"
users = ["alice"]
api_keys = ["phone"]

[[route]]
host = "other.test"
agent = "home"
service = "test"
auth = "basic"
users = ["alice"]
api_keys = ["phone"]
"#,
        alice = cheap_hash("wonderland"),
        hash = cheap_hash(&key),
    );
    let (addr, _up) = upstream().await;
    let site = site("", &routes, &[("test", format!("http://{addr}"))]).await;
    let mut statuses = Vec::new();
    for host in ["chat.test", "other.test", "chat.test", "other.test"] {
        let mut c = site.h1(host).await;
        let r = c
            .send_request(
                http::Request::builder()
                    .uri("/headers")
                    .header("host", host)
                    .header(AUTHORIZATION, format!("Bearer {key}"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 429, 429],
        "one and a burst of one, in all"
    );
    // alice with her password is not the key: her requests pass.
    let mut c = site.h1("chat.test").await;
    let r = c
        .send_request(
            http::Request::builder()
                .uri("/headers")
                .header("host", "chat.test")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
