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

/// Submits `n` jobs of `size` and `steps` (prompts `{prompt} {i}`, seeds `i`); their ids.
async fn submit(svc: &Service, n: u64, prompt: &str, size: &str, steps: u32) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, job) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": format!("{prompt} {i}"), "size": size, "steps": steps, "seed": i}),
                Some(&svc.admin_key),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().expect("id").to_string());
    }
    ids
}

/// Waits for each job to end and checks it succeeded.
async fn all_succeed(svc: &Service, ids: &[String]) {
    for id in ids {
        let done = svc
            .wait_for(id, &svc.admin_key, |j| {
                j["status"] != "queued" && j["status"] != "running"
            })
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
    }
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
    let ids = submit(&svc, 20, "a harbour", "128x128", 60).await;
    until(
        "a second worker under the backlog",
        Duration::from_secs(60),
        || svc.worker_pids().len() == 2,
    )
    .await;
    all_succeed(&svc, &ids).await;
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

/// The `CUDA_VISIBLE_DEVICES` a process was started with.
fn visible_devices(pid: u32) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    environ
        .split(|&b| b == 0)
        .filter_map(|var| std::str::from_utf8(var).ok())
        .find_map(|var| var.strip_prefix("CUDA_VISIBLE_DEVICES=").map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_without_cuda_on_a_gpu_host_runs_its_workers_on_the_cpu() {
    // An `nvidia-smi` that lists two GPUs. A build with CUDA pins one worker to each (the
    // scaler's own tests check the pinning); this one cannot use them, says so, and runs
    // unpinned CPU workers that do the work.
    let bin = tempfile::tempdir().expect("tempdir");
    let smi = bin.path().join("nvidia-smi");
    std::fs::write(
        &smi,
        "#!/bin/sh\nprintf '0, GPU-1a2b3c4d-0000-1111-2222-333344445555, NVIDIA H200, 143771\\n\
         1, GPU-9f8e7d6c-0000-1111-2222-333344445555, NVIDIA H200, 143771\\n'\n",
    )
    .expect("write nvidia-smi");
    std::fs::set_permissions(&smi, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let svc = Service::start(&[
        ("PATH", path.as_str()),
        ("SPARKLE_SCALER__MAX_WORKERS", "2"),
        ("SPARKLE_SCALER__TARGET_WAIT_SECS", "2"),
        ("SPARKLE_SCALER__IDLE_GRACE_SECS", "3"),
    ])
    .await;
    let ids = submit(&svc, 6, "a lighthouse", "64x64", 4).await;
    until("a worker", Duration::from_secs(60), || {
        !svc.worker_pids().is_empty()
    })
    .await;
    for pid in svc.worker_pids() {
        assert_eq!(visible_devices(pid), None, "worker {pid} is not pinned");
    }
    all_succeed(&svc, &ids).await;
    let log = svc.log();
    assert!(log.contains("built without CUDA"), "{log}");
    assert!(!log.contains("panicked"));
}
