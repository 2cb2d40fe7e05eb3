//! Faults that heal: a short outage of the image store is retried with backoff, and what a
//! client reads of it names no server path.

use crate::support::Service;
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_store_outage_is_retried_with_backoff_and_the_client_reads_no_path() {
    let svc = Service::start(&[
        ("SPARKLE_QUEUE__RETRY_BACKOFF_SECS", "1"),
        ("SPARKLE_QUEUE__MAX_ATTEMPTS", "6"),
    ])
    .await;
    let key = &svc.admin_key;
    // The store's directory of images is a file: every write fails.
    let images = svc.data_dir().join("images/images");
    let _ = std::fs::remove_dir_all(&images);
    std::fs::write(&images, b"in the way").expect("block the store");

    let started = Instant::now();
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "through an outage", "size": "64x64", "steps": 1}),
            Some(key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let failed_once = svc
        .wait_for(&id, key, |j| j["error"]["code"] == "store_unavailable")
        .await;
    assert_eq!(
        failed_once["status"], "queued",
        "a retry waits: {failed_once}"
    );
    let message = failed_once["error"]["message"].as_str().expect("message");
    assert!(
        !message.contains('/') && !message.contains(svc.data_dir().to_str().expect("utf-8")),
        "the client reads no server path: {message}"
    );

    // Two seconds of outage spend a few of the six attempts, not all (1 s, then 2 s, then 4 s
    // of backoff), and the job waits on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = svc.get_json(&format!("/v1/jobs/{id}"), key).await;
    assert_eq!(during["status"], "queued", "not dead-lettered: {during}");
    assert!(
        during["attempts"].as_u64().expect("attempts") <= 3,
        "{during}"
    );

    std::fs::remove_file(&images).expect("end the outage");
    let done = svc.wait_for(&id, key, |j| j["status"] == "succeeded").await;
    assert!(done["attempts"].as_u64().expect("attempts") >= 2, "{done}");
    assert!(started.elapsed() >= Duration::from_secs(2));
    let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/0"), key).await;
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_fails_with_timeout_and_the_worker_goes_on() {
    let svc = Service::start(&[("SPARKLE_QUEUE__MAX_JOB_SECS", "1")]).await;
    let key = &svc.admin_key;
    let (_, slow) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a long one", "size": "512x512", "steps": 150}),
            Some(key),
        )
        .await;
    let slow = slow["id"].as_str().expect("id").to_string();
    let failed = svc
        .wait_for(&slow, key, |j| {
            j["status"] != "queued" && j["status"] != "running"
        })
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "timeout", "{failed}");
    assert_eq!(failed["attempts"], 1, "a timeout is not retried: {failed}");

    // The same worker takes the next job.
    let (_, next) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a quick one", "size": "64x64", "steps": 1}),
            Some(key),
        )
        .await;
    let next = next["id"].as_str().expect("id").to_string();
    let done = svc
        .wait_for(&next, key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(done["attempts"], 1);
    assert_eq!(svc.worker_pids().len(), 1, "the worker stayed up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_larger_than_the_workers_can_make_is_refused_and_never_crashes_one() {
    // A worker that takes at most 128x128 (as a device with little memory would say).
    let svc = Service::start(&[("SPARKLE_WORKER__MAX_PIXELS", "16384")]).await;
    let key = &svc.admin_key;
    // Before any worker has reported, the job is queued; the worker refuses it for good.
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "too big", "size": "256x256", "steps": 1}),
            Some(key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let failed = svc
        .wait_for(&id, key, |j| {
            j["status"] != "queued" && j["status"] != "running"
        })
        .await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["error"]["code"], "too_large_for_device", "{failed}");
    assert_eq!(failed["attempts"], 1, "not retried: {failed}");

    // Now that the worker has reported, the gateway refuses such a request at submit.
    let (status, refused) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "too big", "size": "256x256", "steps": 1}),
            Some(key),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["code"], "too_large_for_device");
    assert_eq!(refused["error"]["param"], "size");
    let message = refused["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("65536") && message.contains("16384"),
        "{message}"
    );

    // What fits still runs, on the same worker.
    let (_, ok) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "fits", "size": "128x128", "steps": 1}),
            Some(key),
        )
        .await;
    let ok = ok["id"].as_str().expect("id").to_string();
    svc.wait_for(&ok, key, |j| j["status"] == "succeeded").await;
    assert_eq!(svc.worker_pids().len(), 1);
}
