//! Access control end to end: basic auth and session cookies with apps that
//! bring their own Bearer tokens, public paths, throttling, the argon2 cost
//! kept off the event loop, and IP rules with trusted proxies.

#![allow(clippy::unwrap_used)] // Test helpers fail loudly by design.

mod common;

use std::net::IpAddr;
use std::sync::Arc;

use common::web::*;
use common::{basic, cheap_hash};
use http::StatusCode;
use http::header::{AUTHORIZATION, COOKIE, RETRY_AFTER, SET_COOKIE, WWW_AUTHENTICATE};

fn routes(extra: &str) -> String {
    format!(
        r#"
[[user]]
name = "alice"
password = "{alice}"

[[user]]
name = "bob"
password = "{bob}"

[[route]]
host = "chat.test"
agent = "home"
service = "test"
auth = "basic"
users = ["alice"]
public_paths = ["/manifest.json", "/static/*"]
{extra}
"#,
        alice = cheap_hash("wonderland"),
        bob = cheap_hash("builder"),
    )
}

async fn auth_site(edge_extra: &str, route_extra: &str) -> (Site, Arc<Upstream>) {
    let (addr, up) = upstream().await;
    let s = site(
        edge_extra,
        &routes(route_extra),
        &[("test", format!("http://{addr}"))],
    )
    .await;
    (s, up)
}

fn cookie_pair(resp: &http::Response<hyper::body::Incoming>) -> String {
    let set = resp
        .headers()
        .get(SET_COOKIE)
        .expect("a session cookie")
        .to_str()
        .unwrap();
    for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/", "Max-Age="] {
        assert!(set.contains(attr), "cookie lacks {attr}: {set}");
    }
    assert!(!set.contains("Domain="), "host-only cookie: {set}");
    set.split(';').next().unwrap().to_owned()
}

fn get(host: &str, path: &str) -> http::request::Builder {
    http::Request::builder().uri(path).header("host", host)
}

#[tokio::test]
async fn login_then_the_cookie_lets_the_apps_bearer_token_through() {
    let (site, up) = auth_site("", "").await;
    let mut c = site.h1("chat.test").await;

    // No credentials: an API client gets a challenge, a browser the login page.
    let r = c
        .send_request(get("chat.test", "/api/chats").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers()[WWW_AUTHENTICATE]
            .to_str()
            .unwrap()
            .starts_with("Basic")
    );
    let r = c
        .send_request(
            get("chat.test", "/")
                .header("accept", "text/html,application/xhtml+xml")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(
        r.headers().get(WWW_AUTHENTICATE).is_none(),
        "no browser prompt over the page"
    );
    let page = body_text(r).await;
    assert!(
        page.contains("<form") && page.contains("/.burrow/login"),
        "{page}"
    );

    // Right password: 200, a cookie, and the service never sees our credentials.
    let r = c
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let cookie = cookie_pair(&r);
    assert!(
        !up.last_headers
            .lock()
            .unwrap()
            .contains_key("authorization")
    );

    // The app replaces Authorization with its own token: the cookie carries us.
    let r = c
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, "Bearer xyz")
                .header(COOKIE, format!("theme=dark; {cookie}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let seen = up.last_headers.lock().unwrap().clone();
    assert_eq!(seen["authorization"], vec!["Bearer xyz"]);
    assert_eq!(
        seen["cookie"],
        vec!["theme=dark"],
        "the edge's cookie stays at the edge"
    );

    // Wrong password, wrong user for the route, forged cookie: 401.
    for auth in [basic("alice", "nope"), basic("bob", "builder")] {
        let r = c
            .send_request(
                get("chat.test", "/x")
                    .header(AUTHORIZATION, auth)
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }
    let forged = format!("{}0", cookie.trim_end_matches(char::is_alphanumeric));
    let r = c
        .send_request(
            get("chat.test", "/x")
                .header(COOKIE, forged)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Logout (a POST from the site itself) clears the cookie.
    let r = c
        .send_request(
            get("chat.test", "/.burrow/logout")
                .method("POST")
                .header("origin", "https://chat.test")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert!(
        r.headers()[SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn the_login_form_sets_the_session_and_goes_back() {
    let (site, _) = auth_site("", "").await;
    let mut c = site.h1("chat.test").await;
    let form = "user=alice&password=wonderland&next=%2Fheaders%3Fa%3D1";
    let r = c
        .send_request(
            http::Request::builder()
                .method("POST")
                .uri("/.burrow/login")
                .header("host", "chat.test")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(http_body_util::BodyExt::boxed(http_body_util::Full::new(
                    bytes::Bytes::from(form),
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/headers?a=1");
    let cookie = cookie_pair(&r);
    let r = c
        .send_request(
            get("chat.test", "/headers")
                .header(COOKIE, cookie)
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn public_paths_are_served_without_credentials_and_only_them() {
    let (site, _) = auth_site("", "").await;
    for (path, status) in [
        ("/manifest.json", StatusCode::NOT_FOUND), // reached the service (which has no such file)
        ("/static/app.js", StatusCode::NOT_FOUND),
        ("/manifest.json.bak", StatusCode::UNAUTHORIZED),
        ("/manifest", StatusCode::UNAUTHORIZED),
        ("/staticx", StatusCode::UNAUTHORIZED),
    ] {
        let r = site.get("chat.test", path).await;
        assert_eq!(r.status(), status, "{path}");
    }
}

#[tokio::test]
async fn warm_sessions_and_repeated_logins_run_no_argon2() {
    let (site, _) = auth_site("", "").await;
    let gate = site.gate.clone().unwrap();
    let mut c = site.h1("chat.test").await;
    let r = c
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let cookie = cookie_pair(&r);
    let after_login = gate.verifier.argon2_runs();
    assert_eq!(after_login, 1);
    for _ in 0..20 {
        let r = c
            .send_request(
                get("chat.test", "/headers")
                    .header(COOKIE, cookie.clone())
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        // A client that keeps sending basic credentials hits the cache.
        let r = c
            .send_request(
                get("chat.test", "/headers")
                    .header(AUTHORIZATION, basic("alice", "wonderland"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(
        gate.verifier.argon2_runs(),
        after_login,
        "no argon2 on warm requests"
    );
}

#[tokio::test]
async fn twenty_wrong_passwords_throttle_that_address_only() {
    let (site, _) = auth_site("", "").await;
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    let mut c = site.h1_from(attacker, "chat.test").await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..20 {
        let r = c
            .send_request(
                get("chat.test", "/")
                    .header(AUTHORIZATION, basic("alice", "guess"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = Some(
                r.headers()[RETRY_AFTER]
                    .to_str()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap(),
            );
        }
        statuses.push(r.status());
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(statuses[19], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    assert!(retry_after.unwrap() >= 1);
    // Even the right password waits while the address is locked.
    let r = c
        .send_request(
            get("chat.test", "/")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);

    // Another address logs in as the same user at once.
    let mut other = site
        .h1_from("127.0.0.2".parse().unwrap(), "chat.test")
        .await;
    let r = other
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_made_up_user_names_is_cut_short_and_the_real_user_gets_through() {
    // The burst comes through a trusted proxy from 200 different addresses
    // with 200 different user names, so no address is throttled; made-up
    // names share one bucket, so after its free failures the rest are
    // answered 429 without hashing, and the argon2 queue stays free for
    // the real users.
    let (site, _) = auth_site("[access]\ntrusted_proxies = [\"127.0.0.1/32\"]", "").await;
    let gate = site.gate.clone().unwrap();
    let mut user = site
        .h1_from("127.0.0.1".parse().unwrap(), "chat.test")
        .await;
    let r = user
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let cookie = cookie_pair(&r);
    body_text(r).await;
    let before = gate.verifier.argon2_runs();

    const BURST: usize = 200;
    let mut burst = tokio::task::JoinSet::new();
    for lane in 0..16 {
        // From the trusted proxy, so each attempt is judged by its own
        // forwarded address.
        let mut c = site
            .h1_from("127.0.0.1".parse().unwrap(), "chat.test")
            .await;
        burst.spawn(async move {
            let mut throttled = 0;
            for i in (lane..BURST).step_by(16) {
                c.ready().await.unwrap();
                let r = c
                    .send_request(
                        get("chat.test", "/")
                            .header("x-forwarded-for", format!("198.51.100.{}", i % 250))
                            .header(AUTHORIZATION, basic(&format!("intruder{i}"), "guess"))
                            .body(empty())
                            .unwrap(),
                    )
                    .await
                    .unwrap();
                let status = r.status();
                assert!(
                    matches!(
                        status,
                        StatusCode::UNAUTHORIZED
                            | StatusCode::TOO_MANY_REQUESTS
                            | StatusCode::SERVICE_UNAVAILABLE
                    ),
                    "{status}"
                );
                throttled += usize::from(status == StatusCode::TOO_MANY_REQUESTS);
                body_text(r).await;
            }
            throttled
        });
    }

    // Wait until the burst is really hashing, then use the chat as usual.
    while gate.verifier.argon2_runs() < before + 4 {
        tokio::task::yield_now().await;
    }
    for _ in 0..20 {
        user.ready().await.unwrap();
        let r = user
            .send_request(
                get("chat.test", "/headers")
                    .header(COOKIE, cookie.clone())
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        body_text(r).await;
    }
    let mut throttled = 0;
    while let Some(lane) = burst.join_next().await {
        throttled += lane.expect("every burst attempt got 401, 429 or 503");
    }
    let hashed = gate.verifier.argon2_runs() - before;
    let free = burrow_edge::access::throttle::USER_FREE_FAILURES as u64;
    assert!(
        hashed <= 2 * free,
        "{hashed} made-up names were hashed; the shared bucket allows {free} and then locks"
    );
    assert!(
        throttled >= BURST - 2 * free as usize,
        "{throttled} throttled"
    );
    // The real user still signs in with a password.
    let mut fresh = site
        .h1_from("127.0.0.3".parse().unwrap(), "chat.test")
        .await;
    let r = fresh
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, basic("alice", "wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn ip_rules_judge_the_real_client_and_ignore_forged_headers() {
    // Not behind a trusted proxy: X-Forwarded-For is ignored entirely.
    let (site, _) = auth_site("", "deny = [\"127.0.0.0/8\"]").await;
    let r = site
        .h1("chat.test")
        .await
        .send_request(
            get("chat.test", "/manifest.json")
                .header("x-forwarded-for", "8.8.8.8")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "a forged X-Forwarded-For does not get past a deny rule"
    );

    // Behind a trusted proxy: the right-most untrusted hop is judged.
    let (site, _) = auth_site(
        "[access]\ntrusted_proxies = [\"127.0.0.1/32\"]\ndeny = [\"203.0.113.0/24\"]",
        "",
    )
    .await;
    let mut c = site.h1("chat.test").await;
    let r = c
        .send_request(
            get("chat.test", "/manifest.json")
                .header("x-forwarded-for", "1.2.3.4, 203.0.113.7")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .send_request(
            get("chat.test", "/manifest.json")
                .header("x-forwarded-for", "203.0.113.7, 1.2.3.4")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "1.2.3.4 is judged and allowed; the service answered"
    );
}

#[tokio::test]
async fn a_client_behind_the_proxy_cannot_choose_its_address_with_the_other_header() {
    // Sent by the trusted proxy (127.0.0.1): the client's own Forwarded
    // passed through, and X-Forwarded-For with the client appended.
    let via_proxy = |forwarded: &str, xff: &str| {
        get("chat.test", "/manifest.json")
            .header("forwarded", forwarded)
            .header("x-forwarded-for", xff)
            .body(empty())
            .unwrap()
    };
    let proxy = "[access]\ntrusted_proxies = [\"127.0.0.1/32\"]";

    // The allow rule would admit the forged address only.
    let (site, _) = auth_site(proxy, "allow = [\"192.168.1.0/24\"]").await;
    let mut c = site.h1("chat.test").await;
    let r = c
        .send_request(via_proxy("for=192.168.1.5", "203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "the real client 203.0.113.7 is judged, not the forged Forwarded"
    );
    let r = c
        .send_request(via_proxy("for=203.0.113.7", "192.168.1.5"))
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "a client the proxy names in X-Forwarded-For is allowed; the service answered"
    );

    // A proxy that writes Forwarded instead: now the client's own
    // X-Forwarded-For is the forgery, and it is not read.
    let (site, _) = auth_site(
        &format!("{proxy}\nclient_ip_header = \"forwarded\""),
        "allow = [\"192.168.1.0/24\"]",
    )
    .await;
    let mut c = site.h1("chat.test").await;
    let r = c
        .send_request(via_proxy("for=203.0.113.7", "192.168.1.5"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = c
        .send_request(via_proxy("for=192.168.1.5", "203.0.113.7"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// A phone keyboard capitalises the first letter: user names sign in
/// ignoring case (two names that differ only in case are a config error).
#[tokio::test]
async fn user_names_sign_in_ignoring_case() {
    let (site, up) = auth_site("", "").await;
    let mut c = site.h1("chat.test").await;
    for typed in ["Alice", "ALICE", "alice"] {
        let r = c
            .send_request(
                get("chat.test", "/headers")
                    .header(AUTHORIZATION, basic(typed, "wonderland"))
                    .body(empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{typed}");
        body_text(r).await;
    }
    assert!(
        up.last_headers
            .lock()
            .unwrap()
            .get("authorization")
            .is_none()
    );
    // The password still is exact.
    let r = c
        .send_request(
            get("chat.test", "/headers")
                .header(AUTHORIZATION, basic("Alice", "Wonderland"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
}
