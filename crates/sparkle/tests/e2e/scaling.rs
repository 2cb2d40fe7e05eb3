//! The scaler of `sparkle up` on the CPU: a backlog more than one worker drains within the
//! target wait starts a second worker; once the backlog is gone and the grace period is over,
//! both stop (gracefully: every job completes); a job afterwards starts one from zero.

use crate::support::Service;
use serde_json::json;
use std::io::Write;
use std::time::{Duration, Instant};

async fn until(what: &str, within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_starts_a_second_worker_and_both_stop_after_the_grace() {
    let svc = Service::start(&[
        ("SPARKLE_SCALER__MAX_WORKERS", "2"),
        ("SPARKLE_SCALER__TARGET_WAIT_SECS", "2"),
        ("SPARKLE_SCALER__IDLE_GRACE_SECS", "3"),
    ])
    .await;
    let key = &svc.admin_key;
    assert!(svc.worker_pids().is_empty(), "no worker before any work");
    let mut ids = Vec::new();
    for i in 0..20 {
        let (status, job) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": format!("a harbour {i}"), "size": "128x128", "steps": 60, "seed": i}),
                Some(key),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().expect("id").to_string());
    }
    until(
        "a second worker under the backlog",
        Duration::from_secs(60),
        || svc.worker_pids().len() == 2,
    )
    .await;
    for id in &ids {
        let done = svc
            .wait_for(id, key, |j| {
                j["status"] != "queued" && j["status"] != "running"
            })
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
    until(
        "both workers stopped after the grace",
        Duration::from_secs(60),
        || svc.worker_pids().is_empty(),
    )
    .await;
    let metrics = svc.metrics().await;
    assert!(metrics.contains("sparkle_workers_desired 0"), "{metrics}");
    assert!(
        metrics.contains("sparkle_worker_ready_seconds_count 2"),
        "both starts timed: {metrics}"
    );
    // From zero again: one job, one worker, its image.
    let started = Instant::now();
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "after the quiet", "size": "64x64", "steps": 2}),
            Some(key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id");
    let done = svc
        .wait_for(id, key, |j| {
            j["status"] != "queued" && j["status"] != "running"
        })
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // Written past the test harness's capture: the run's log carries it.
    let _ = writeln!(
        std::io::stderr(),
        "scaling: from zero workers to a finished image in {:?}",
        started.elapsed()
    );
    assert!(!svc.log().contains("panicked"));
}
