//! Limits against abuse, seen by a client: slow clients are cut off at every stage, one
//! address cannot hold more than its share of connections or send more than its rate, and
//! oversized requests are refused.

use crate::support::{port_of, tls_connect, until_closed, Service};
use serde_json::{json, Value};
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

/// Whether the connection was closed by the server between `low` and `high` seconds.
fn closed_in(what: &str, closed: Option<Duration>, low: f64, high: f64) {
    let took = closed.unwrap_or_else(|| panic!("{what}: still open after 15 s"));
    let secs = took.as_secs_f64();
    assert!(
        (low..high).contains(&secs),
        "{what}: closed after {secs:.2} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off_at_every_stage() {
    let svc = Service::start(&[
        ("SPARKLE_GATEWAY__HANDSHAKE_TIMEOUT_SECS", "2"),
        ("SPARKLE_GATEWAY__HEADER_TIMEOUT_SECS", "2"),
        ("SPARKLE_GATEWAY__REQUEST_TIMEOUT_SECS", "2"),
    ])
    .await;
    let port = port_of(&svc.url);
    let cert = svc.certificate();
    let stages = tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            // TCP open, no TLS handshake.
            let silent = scope.spawn(|| {
                let mut sock = TcpStream::connect(("127.0.0.1", port)).expect("connect");
                sock.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
                until_closed(&mut sock)
            });
            // Slowloris: a request line and one header, then nothing.
            let partial = scope.spawn(|| {
                let mut tls = tls_connect(port, &cert).expect("tls");
                tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
                    .expect("partial");
                tls.flush().expect("flush");
                until_closed(&mut tls)
            });
            // A whole request answered, then the connection left idle.
            let idle = scope.spawn(|| {
                let mut tls = tls_connect(port, &cert).expect("tls");
                tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    .expect("request");
                until_closed(&mut tls)
            });
            // Headers announce a body that never comes whole.
            let trickle = scope.spawn(|| {
                let mut tls = tls_connect(port, &cert).expect("tls");
                tls.write_all(
                    b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
                )
                .expect("request");
                until_closed(&mut tls)
            });
            [silent, partial, idle, trickle].map(|t| t.join().expect("client thread"))
        })
    })
    .await
    .expect("clients");
    let [silent, partial, idle, trickle] = stages;
    closed_in("no handshake", silent.0, 1.5, 6.0);
    closed_in("partial headers", partial.0, 1.5, 6.0);
    let idle_answer = String::from_utf8_lossy(&idle.1);
    assert!(idle_answer.starts_with("HTTP/1.1 200"), "{idle_answer}");
    closed_in("idle keep-alive", idle.0, 1.5, 6.0);
    let answer = String::from_utf8_lossy(&trickle.1);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"request_timeout\""), "{answer}");
    closed_in("trickled body", trickle.0, 1.5, 6.0);
    // The service is none the worse.
    let (status, _) = svc.get("/healthz", "").await;
    assert_eq!(status, 200);
}

/// Asks `/healthz` on an open connection; the status line and the rest of the head.
fn ask_health(conn: &mut (impl std::io::Read + std::io::Write)) -> String {
    conn.write_all(b"GET /healthz HTTP/1.1\r\nHost: sparkle\r\n\r\n")
        .expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_past_its_connection_share_is_answered_503_not_reset() {
    let svc = Service::start(&[("SPARKLE_GATEWAY__MAX_CONNECTIONS_PER_IP", "3")]).await;
    let port = port_of(&svc.url);
    let cert = svc.certificate();
    tokio::task::spawn_blocking(move || {
        // The test's HTTP client may keep one connection of its own open.
        let mut held = Vec::new();
        let refused = loop {
            let mut conn = tls_connect(port, &cert).expect("a handshake, not a reset");
            let head = ask_health(&mut conn);
            if head.starts_with("HTTP/1.1 200") {
                held.push(conn);
                assert!(held.len() <= 3, "over the cap");
            } else {
                break head;
            }
        };
        assert!((2..=3).contains(&held.len()), "{} admitted", held.len());
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(
            refused.to_ascii_lowercase().contains("retry-after: 1"),
            "{refused}"
        );
        assert!(
            refused.to_ascii_lowercase().contains("connection: close"),
            "{refused}"
        );
        drop(held.pop());
        // The server notices the close within moments; then there is room again.
        let mut admitted = false;
        for _ in 0..50 {
            let mut conn = tls_connect(port, &cert).expect("handshake");
            if ask_health(&mut conn).starts_with("HTTP/1.1 200") {
                admitted = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(admitted, "a closed connection gives its place back");
    })
    .await
    .expect("clients");
    let metrics = svc.metrics().await;
    assert!(
        metrics.contains("sparkle_connections_refused_total{reason=\"max_connections_per_ip\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_over_its_rate_gets_429_before_authentication() {
    let svc = Service::start(&[
        ("SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC", "1"),
        ("SPARKLE_GATEWAY__PER_IP_BURST", "5"),
    ])
    .await;
    let body = json!({"prompt": "a"});
    let mut statuses = Vec::new();
    let mut refusal = None;
    for _ in 0..8 {
        let r = svc
            .client()
            .post(format!("{}/v1/jobs", svc.url))
            .json(&body)
            .send()
            .await
            .expect("answer");
        statuses.push(r.status().as_u16());
        if r.status() == 429 && refusal.is_none() {
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .expect("ascii")
                .parse()
                .expect("seconds");
            refusal = Some((retry, r.json::<Value>().await.expect("json")));
        }
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert!(statuses[5..].iter().all(|s| *s == 429), "{statuses:?}");
    let (retry, error) = refusal.expect("a refusal");
    assert_eq!(error["error"]["code"], "rate_limited", "{error}");
    assert!((1..=3).contains(&retry), "{retry}");
    // Health probes are not counted; the address may ask again once it has waited.
    let (status, _) = svc.get("/healthz", "").await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let (status, _) = svc.post_json("/v1/jobs", &body, None).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_and_bodies_are_refused() {
    let svc = Service::start(&[("SPARKLE_GATEWAY__MAX_IMAGE_BODY_BYTES", "200000")]).await;
    let r = svc
        .client()
        .get(format!("{}/healthz", svc.url))
        .header("x-padding", "p".repeat(20_000))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 431);
    let r = svc
        .client()
        .get(format!("{}/healthz", svc.url))
        .header("x-padding", "p".repeat(4_000))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 200, "within the limit");
    // A route that takes no images, and one that does without credentials: max_body_bytes.
    for (route, key) in [
        ("/v1/session", Some(svc.admin_key.as_str())),
        ("/v1/jobs", None),
    ] {
        let (status, err) = svc
            .post_json(route, &json!({"prompt": "y".repeat(70_000)}), key)
            .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (413, Some("body_too_large")),
            "{route}: {err}"
        );
    }
    // Credentials that do not hold unlock nothing: checked once the body passes
    // max_body_bytes, before more is read.
    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a", "image": "A".repeat(150_000)}),
            Some("spk_not_a_key"),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{err}"
    );
    // With credentials, a route that takes images reads up to max_image_body_bytes.
    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a", "image": "A".repeat(150_000)}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_image")),
        "{err}"
    );
    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a", "image": "A".repeat(250_000)}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (413, Some("body_too_large"))
    );
    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "y".repeat(2_001)}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("prompt_too_long"))
    );
}
