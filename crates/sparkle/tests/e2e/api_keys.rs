//! API keys from the outside: shown once and stored hashed, scoped, revocable, and held to a
//! request rate and a job quota, each refusal with its code and `Retry-After`.

use crate::support::Service;
use serde_json::{json, Value};
use std::time::Duration;

fn key_id(created_stderr: &str) -> String {
    created_stderr
        .split_whitespace()
        .find(|w| w.starts_with("key_"))
        .expect("the key id")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_shown_once_stored_hashed_scoped_and_revocable() {
    let svc = Service::start(&[("SPARKLE_SCALER__MAX_WORKERS", "0")]).await;
    let (reader, _) = svc.key_command(&["create", "--name", "dashboard", "--scope", "read"]);
    let (maker, made) = svc.key_command(&["create", "--name", "ci"]);
    let (other, _) = svc.key_command(&["create", "--name", "other"]);
    for secret in [&reader, &maker, &other] {
        assert!(
            secret.starts_with("spk_") && secret.len() == 4 + 64,
            "256 bits, hex"
        );
    }

    let body = json!({"prompt": "a lighthouse", "size": "64x64", "steps": 1});
    let (status, err) = svc.post_json("/v1/jobs", &body, Some(&reader)).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (403, Some("insufficient_scope")),
        "{err}"
    );
    let (status, job) = svc.post_json("/v1/jobs", &body, Some(&maker)).await;
    assert_eq!(status, 202, "{job}");
    let route = format!("/v1/jobs/{}", job["id"].as_str().expect("id"));
    assert_eq!(svc.get(&route, &maker).await.0, 200, "its own job");
    assert_eq!(
        svc.get(&route, &svc.admin_key).await.0,
        200,
        "an admin key sees all"
    );
    assert_eq!(
        svc.get(&route, &other).await.0,
        404,
        "another key's job is not found"
    );

    // Never shown again: not by `key list`, not in any file of the data directory.
    let (listed, _) = svc.key_command(&["list"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    for secret in [&reader, &maker, &other, &svc.admin_key] {
        assert!(!listed.contains(&secret[4..]), "{listed}");
        for entry in std::fs::read_dir(svc.data_dir())
            .expect("data dir")
            .flatten()
        {
            if let Ok(bytes) = std::fs::read(entry.path()) {
                let hex = secret.as_bytes();
                assert!(
                    !bytes.windows(hex.len()).any(|w| w == hex),
                    "{} holds a key",
                    entry.path().display()
                );
            }
        }
    }

    svc.key_command(&["revoke", &key_id(&made)]);
    let (status, err) = svc.post_json("/v1/jobs", &body, Some(&maker)).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{err}"
    );
    assert_eq!(svc.get(&route, &maker).await.0, 401, "revoked at once");
}

/// (status, Retry-After, error code) of an answer.
async fn refusal(answer: reqwest::Response) -> (u16, Option<u64>, Value) {
    let status = answer.status().as_u16();
    let retry = answer
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status, retry, answer.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_over_its_rate_or_its_job_quota_gets_429_with_retry_after() {
    let svc = Service::start(&[
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
        ("SPARKLE_GATEWAY__PER_KEY_REQUESTS_PER_SEC", "1"),
        ("SPARKLE_GATEWAY__PER_KEY_BURST", "3"),
        ("SPARKLE_GATEWAY__MAX_LIVE_JOBS_PER_KEY", "2"),
    ])
    .await;
    let busy = svc.create_key("busy").await;
    let calm = svc.create_key("calm").await;
    let get = |key: &str| {
        svc.client()
            .get(format!("{}/v1/jobs/00000000000000000000000000", svc.url))
            .bearer_auth(key)
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            get(&busy).await.expect("answer").status(),
            404,
            "within the burst"
        );
    }
    let (status, retry, err) = refusal(get(&busy).await.expect("answer")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "{err}"
    );
    assert_eq!(retry, Some(1));
    assert_eq!(
        get(&calm).await.expect("answer").status(),
        404,
        "each key has its own rate"
    );

    // The quota: two live jobs, then 429 until one finishes; a repeat of a job it already
    // has is answered with that job.
    let quota = svc.create_key("quota").await;
    let submit = |prompt: &str, idem: &str| {
        svc.client()
            .post(format!("{}/v1/jobs", svc.url))
            .bearer_auth(&quota)
            .header("idempotency-key", idem)
            .json(&json!({"prompt": prompt, "size": "64x64", "steps": 1}))
            .send()
    };
    let first: Value = submit("one", "i-1")
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(first["status"], "queued", "{first}");
    assert_eq!(submit("two", "i-2").await.expect("answer").status(), 202);
    let (status, retry, err) = refusal(submit("three", "i-3").await.expect("answer")).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (429, Some("job_quota_exceeded")),
        "{err}"
    );
    assert!(retry.is_some_and(|s| s >= 1), "{retry:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = submit("one", "i-1").await.expect("answer");
    assert_eq!(again.status(), 200, "the job it already has");
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["id"], first["id"]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let id = first["id"].as_str().expect("id");
    let cancelled = svc
        .client()
        .delete(format!("{}/v1/jobs/{id}", svc.url))
        .bearer_auth(&quota)
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancelled.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        submit("three", "i-3").await.expect("answer").status(),
        202,
        "room again"
    );
}
