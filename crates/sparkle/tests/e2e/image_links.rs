//! Signed image links: what a job shows and the OpenAI route's `url` fetch the PNG with no
//! API key, until they expire, and not at all once altered.

use crate::support::Service;
use serde_json::{json, Value};
use std::time::Duration;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// A succeeded job of one image; its view.
async fn finished_job(svc: &Service) -> Value {
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a lighthouse", "size": "64x64", "steps": 2, "seed": 4}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    svc.wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await
}

/// GET with no `Authorization` header: status, headers and body.
async fn fetch(svc: &Service, url: &str) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let r = svc.client().get(url).send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.bytes().await.expect("body").to_vec())
}

/// The error code and message of a refusal.
fn refusal(body: &[u8]) -> (String, String) {
    let error: Value = serde_json::from_slice(body).expect("json error");
    (
        error["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        error["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// `url` with the value of query parameter `name` replaced by what `change` makes of it.
fn with_param(url: &str, name: &str, change: impl Fn(&str) -> String) -> String {
    let (base, query) = url.split_once('?').expect("a query");
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((n, v)) if n == name => format!("{n}={}", change(v)),
            _ => pair.to_string(),
        })
        .collect();
    format!("{base}?{}", query.join("&"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_image_link_fetches_the_png_without_a_key_and_an_altered_one_does_not() {
    let svc = Service::start(&[]).await;
    let job = finished_job(&svc).await;
    let id = job["id"].as_str().expect("id");
    let image = &job["images"][0];
    assert_eq!(image["index"], 0, "{job}");
    let url = image["url"].as_str().expect("url");
    assert!(
        url.starts_with(&format!("{}/v1/jobs/{id}/images/0?expires=", svc.url)),
        "made with the address the gateway is reached at: {url}"
    );
    let expires_at = image["expires_at"].as_i64().expect("expires_at");
    assert!(url.contains(&format!("expires={expires_at}&")), "{url}");

    let (status, headers, png) = fetch(&svc, url).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    assert!(png.starts_with(PNG_SIGNATURE));
    assert_eq!(headers["content-type"], "image/png");
    let cache = headers["cache-control"].to_str().expect("ascii");
    let max_age: u64 = cache
        .strip_prefix("private, max-age=")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{cache}"));
    assert!((1..=3600).contains(&max_age), "{cache}");

    let forged = with_param(url, "sig", |sig| {
        let first = if sig.starts_with('A') { 'B' } else { 'A' };
        format!("{first}{}", &sig[1..])
    });
    let (status, headers, body) = fetch(&svc, &forged).await;
    assert_eq!(status, 403);
    assert_eq!(headers["cache-control"], "no-store");
    let (code, message) = refusal(&body);
    assert_eq!(code, "invalid_image_link");
    assert!(message.contains("not valid"), "{message}");

    let later = with_param(url, "expires", |e| {
        (e.parse::<i64>().expect("expiry") + 60).to_string()
    });
    let (status, _, body) = fetch(&svc, &later).await;
    assert_eq!(status, 403);
    assert_eq!(refusal(&body).0, "invalid_image_link");

    // The link opens its own image only.
    let other = url.replacen("/images/0?", "/images/1?", 1);
    let (status, _, body) = fetch(&svc, &other).await;
    assert_eq!(
        (status, refusal(&body).0.as_str()),
        (403, "invalid_image_link")
    );

    // The OpenAI route's `url` is such a link too.
    let (status, body) = svc
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a red fox", "size": "64x64", "steps": 2, "response_format": "url"}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let url = body["data"][0]["url"].as_str().expect("url");
    assert!(url.starts_with(&svc.url), "{url}");
    let (status, _, png) = fetch(&svc, url).await;
    assert_eq!(status, 200);
    assert!(png.starts_with(PNG_SIGNATURE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_link_stops_working_when_it_expires() {
    let svc = Service::start(&[("SPARKLE_GATEWAY__IMAGE_LINK_SECS", "1")]).await;
    let job = finished_job(&svc).await;
    let url = job["images"][0]["url"].as_str().expect("url").to_string();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, _, body) = fetch(&svc, &url).await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let (code, message) = refusal(&body);
    assert_eq!(code, "invalid_image_link");
    assert!(message.contains("expired"), "{message}");
}
