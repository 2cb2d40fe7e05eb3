//! End-to-end tests: the real `sparkle` binary on loopback with the tiny model, spoken to
//! over HTTPS like any client would.

use crate::support::{self, png_info, Service};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_documented_codes_and_enqueue_nothing() {
    let svc = Service::start(&[]).await;
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (json!({"prompt": ""}), 400, "invalid_prompt", "prompt"),
        (
            json!({"prompt": "x".repeat(2001)}),
            400,
            "prompt_too_long",
            "prompt",
        ),
        (
            json!({"prompt": "a", "size": "500x512"}),
            400,
            "invalid_size",
            "size",
        ),
        (
            json!({"prompt": "a", "size": "4096x4096"}),
            400,
            "invalid_size",
            "size",
        ),
        (
            json!({"prompt": "a", "steps": 0}),
            400,
            "invalid_steps",
            "steps",
        ),
        (
            json!({"prompt": "a", "steps": 1000}),
            400,
            "invalid_steps",
            "steps",
        ),
        (json!({"prompt": "a", "n": 50}), 400, "invalid_n", "n"),
        (
            json!({"prompt": "a", "model": "nope"}),
            400,
            "unknown_model",
            "model",
        ),
        (
            json!({"prompt": "a", "scheduler": "plms"}),
            400,
            "unknown_scheduler",
            "scheduler",
        ),
        (
            json!({"prompt": "a", "guidance_scale": 99}),
            400,
            "invalid_guidance_scale",
            "guidance_scale",
        ),
    ];
    for route in ["/v1/jobs", "/v1/images/generations"] {
        for (body, status, code, param) in &cases {
            let (got, err) = svc.post_json(route, body, Some(&svc.admin_key)).await;
            assert_eq!(got, *status, "{route} {body}: {err}");
            assert_eq!(err["error"]["code"], *code, "{route} {body}: {err}");
            assert_eq!(err["error"]["param"], *param, "{route}: {err}");
            let message = err["error"]["message"].as_str().unwrap_or_default();
            assert!(
                message.contains(param),
                "message must name the field: {message}"
            );
        }
    }
    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a", "stpes": 3}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{err}"
    );
    let (status, err) = svc
        .post_raw("/v1/jobs", "{not json", Some(&svc.admin_key))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_json")),
        "{err}"
    );
    // Past `max_body_bytes` without credentials (a request with them may carry images, up
    // to `max_image_body_bytes`).
    let huge = json!({"prompt": "y".repeat(100_000)});
    let (status, err) = svc.post_json("/v1/jobs", &huge, None).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (413, Some("body_too_large")),
        "{err}"
    );
    let (status, err) = svc
        .post_json("/v1/jobs", &json!({"prompt": "a"}), None)
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("missing_api_key")),
        "{err}"
    );
    let (status, err) = svc
        .post_json("/v1/jobs", &json!({"prompt": "a"}), Some("spk_wrong"))
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (401, Some("invalid_api_key")),
        "{err}"
    );
    let (status, err) = svc
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a", "response_format": "gif"}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_response_format")),
        "{err}"
    );
    let (status, _) = svc.get("/v1/jobs/not-a-job", &svc.admin_key).await;
    assert_eq!(status, 404);

    let ready = svc.get_json("/readyz", &svc.admin_key).await;
    assert_eq!(
        (ready["queued"].as_u64(), ready["running"].as_u64()),
        (Some(0), Some(0)),
        "nothing enqueued: {ready}"
    );
    assert_eq!(svc.job_count(), 0, "no job row was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_async_routes_generate_pngs_with_progress() {
    let svc = Service::start(&[]).await;

    let (status, body) = svc
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a corgi, style of monet", "size": "64x64", "steps": 3, "seed": 7, "negative_prompt": "blurry"}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let b64 = body["data"][0]["b64_json"].as_str().expect("b64_json");
    let png =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).expect("base64");
    let (w, h, params) = png_info(&png);
    assert_eq!((w, h), (64, 64));
    assert!(params.starts_with("a corgi, style of monet\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, CFG scale: 7.5, Seed: 7, Size: 64x64, Model: "), "{params}");

    let key = svc.create_key("app").await;
    let (status, job) = svc
        .post_json("/v1/jobs", &json!({"prompt": "a lighthouse", "size": "128x96", "steps": 100, "seed": 3, "scheduler": "ddim"}), Some(&key))
        .await;
    assert_eq!(status, 202, "{job}");
    assert!(
        job["queue_position"].is_u64() || job["status"] != "queued",
        "{job}"
    );
    let id = job["id"].as_str().expect("id").to_string();

    let events = svc.events(&id, &key).await;
    let progress: Vec<_> = events
        .iter()
        .filter(|(name, _)| name == "progress")
        .collect();
    let steps: Vec<u64> = progress
        .iter()
        .filter_map(|(_, v)| v["progress"]["step"].as_u64())
        .collect();
    assert!(!steps.is_empty(), "progress events carry steps: {events:?}");
    assert!(
        steps.windows(2).all(|w| w[0] <= w[1]),
        "steps only go forward: {steps:?}"
    );
    let (last_name, last) = events.last().expect("a final event");
    assert_eq!(last_name, "done");
    assert_eq!(last["status"], "succeeded", "{last}");
    assert_eq!(last["images"][0]["index"], 0, "{last}");
    let link = last["images"][0]["url"].as_str().expect("a signed link");
    assert!(
        link.starts_with(&format!("{}/v1/jobs/{id}/images/0?", svc.url)),
        "{link}"
    );

    let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/0"), &key).await;
    assert_eq!(status, 200);
    let (w, h, params) = png_info(&png);
    assert_eq!((w, h), (128, 96));
    assert!(
        params.contains("Steps: 100, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 128x96"),
        "{params}"
    );
    let (status, _) = svc.get(&format!("/v1/jobs/{id}/images/1"), &key).await;
    assert_eq!(status, 404);

    // Another key cannot see the job; the admin can.
    let other = svc.create_key("other").await;
    assert_eq!(svc.get(&format!("/v1/jobs/{id}"), &other).await.0, 404);
    assert_eq!(
        svc.get(&format!("/v1/jobs/{id}"), &svc.admin_key).await.0,
        200
    );

    // Idempotency: the same key and body give the same job; another body conflicts.
    let body = json!({"prompt": "once", "size": "64x64", "steps": 1});
    let (s1, j1) = svc
        .post_json_with("/v1/jobs", &body, &key, &[("Idempotency-Key", "abc-1")])
        .await;
    let (s2, j2) = svc
        .post_json_with("/v1/jobs", &body, &key, &[("Idempotency-Key", "abc-1")])
        .await;
    assert_eq!((s1, s2), (202, 200));
    assert_eq!(j1["id"], j2["id"]);
    let metrics = svc.metrics().await;
    assert!(
        metrics.contains("sparkle_jobs_submitted_total 3"),
        "{metrics}"
    );
    assert!(metrics.contains("sparkle_queue_depth"), "{metrics}");
    assert!(
        svc.metrics_url.starts_with("http://127.0.0.1:"),
        "admin listens on loopback"
    );

    let (s3, j3) = svc
        .post_json_with(
            "/v1/jobs",
            &json!({"prompt": "twice", "size": "64x64"}),
            &key,
            &[("Idempotency-Key", "abc-1")],
        )
        .await;
    assert_eq!(
        (s3, j3["error"]["code"].as_str()),
        (409, Some("idempotency_conflict"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_queued_and_running_jobs() {
    let svc = Service::start(&[]).await;
    let key = &svc.admin_key;
    let long = json!({"prompt": "slow", "size": "128x128", "steps": 150});
    let (_, running) = svc.post_json("/v1/jobs", &long, Some(key)).await;
    let (_, queued) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "next", "size": "64x64", "steps": 2}),
            Some(key),
        )
        .await;
    let running = running["id"].as_str().expect("id").to_string();
    let queued = queued["id"].as_str().expect("id").to_string();

    svc.wait_for(&running, key, |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let (status, cancelled) = svc.delete(&format!("/v1/jobs/{queued}"), key).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    let (status, cancelled) = svc.delete(&format!("/v1/jobs/{running}"), key).await;
    assert_eq!(
        (status, cancelled["status"].as_str()),
        (200, Some("cancelled")),
        "{cancelled}"
    );
    // A finished job is deleted: gone for good.
    let (status, deleted) = svc.delete(&format!("/v1/jobs/{queued}"), key).await;
    assert_eq!(
        (status, &deleted["deleted"]),
        (200, &json!(true)),
        "{deleted}"
    );
    let (status, _) = svc.get(&format!("/v1/jobs/{queued}"), key).await;
    assert_eq!(status, 404, "a deleted job is not found");

    // The worker drops the cancelled job and is free for the next one.
    let (_, after) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "after", "size": "64x64", "steps": 2}),
            Some(key),
        )
        .await;
    let after = after["id"].as_str().expect("id").to_string();
    let done = svc
        .wait_for(&after, key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(done["attempts"], 1);
    let job = svc.get_json(&format!("/v1/jobs/{running}"), key).await;
    assert_eq!(
        job["status"], "cancelled",
        "a cancelled job stays cancelled: {job}"
    );
    assert_eq!(job["images"].as_array().map(Vec::len), Some(0));

    // Deleting a succeeded job removes its images from the store.
    let images = svc.data_dir().join(format!("images/images/{after}"));
    assert!(images.join("a1/0.png").exists(), "stored under its attempt");
    let (status, _) = svc.delete(&format!("/v1/jobs/{after}"), key).await;
    assert_eq!(status, 200);
    assert!(!images.join("a1/0.png").exists(), "its image is gone");
    let (status, _) = svc.get(&format!("/v1/jobs/{after}/images/0"), key).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_loses_nothing_and_the_job_completes_once() {
    let svc = Service::start(&[("SPARKLE_QUEUE__LEASE_TIMEOUT_SECS", "3")]).await;
    let key = &svc.admin_key;
    let (_, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "survivor", "size": "128x128", "steps": 60, "seed": 11}),
            Some(key),
        )
        .await;
    let id = job["id"].as_str().expect("id").to_string();
    svc.wait_for(&id, key, |j| {
        j["progress"]["step"].as_u64().unwrap_or(0) >= 1
    })
    .await;
    let workers = svc.worker_pids();
    assert_eq!(workers.len(), 1, "one local worker: {workers:?}");
    support::kill(workers[0], "KILL");

    let done = svc
        .wait_for(&id, key, |j| {
            j["status"] != "running" && j["status"] != "queued"
        })
        .await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        done["attempts"], 2,
        "leased again after the lease expired: {done}"
    );
    assert_eq!(done["images"].as_array().map(Vec::len), Some(1));
    let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/0"), key).await;
    assert_eq!(status, 200);
    assert_eq!(png_info(&png).0, 128);
    assert_eq!(svc.job_count(), 1, "one job, completed once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_after_acknowledging_loses_nothing() {
    // No workers at first, so the job is only in the queue when the gateway dies.
    let mut svc = Service::start(&[("SPARKLE_SCALER__MAX_WORKERS", "0")]).await;
    let key = svc.admin_key.clone();
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "durable", "size": "64x64", "steps": 2}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 202);
    let id = job["id"].as_str().expect("id").to_string();
    support::kill(svc.pid(), "KILL");
    svc.wait_exit();

    svc.restart(&[]).await;
    let done = svc
        .wait_for(&id, &key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(done["request"]["prompt"], "durable");
    assert_eq!(done["attempts"], 1);
    let (status, _) = svc.get(&format!("/v1/jobs/{id}/images/0"), &key).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// The official `openai` Python client, unchanged. `scripts/test.sh` installs it and sets
/// OPENAI_CLIENT_PYTHON to the interpreter that has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_unchanged() {
    let Some(python) = std::env::var_os("OPENAI_CLIENT_PYTHON") else {
        eprintln!("skipped: OPENAI_CLIENT_PYTHON is not set (./scripts/test.sh sets it up)");
        return;
    };
    let svc = Service::start(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/openai_client.py");
    let out = tokio::process::Command::new(python)
        .arg(script)
        .arg(&svc.url)
        .arg(&svc.admin_key)
        .env("SSL_CERT_FILE", svc.certificate())
        .output()
        .await
        .expect("run the openai client");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("json line");
    assert_eq!(seen["images"], 2);
    assert_eq!(
        seen["url"],
        json!({"status": 200, "content_type": "image/png", "png": true, "same_host": true}),
        "response_format=url gives a link that fetches the PNG without a key"
    );
    assert_eq!(
        seen["bad_request"],
        json!({"status": 400, "code": "invalid_size", "param": "size"})
    );
    assert_eq!(
        seen["auth"],
        json!({"status": 401, "code": "invalid_api_key"})
    );
    assert_eq!(seen["models"], json!(["tiny-model"]), "models.list()");
    assert_eq!(
        (&seen["edit"]["width"], &seen["edit"]["height"]),
        (&json!(96), &json!(64)),
        "images.edit() with a transparent area: {seen}"
    );
    let job = seen["edit"]["job"].as_str().expect("the edit's job id");
    let job = svc
        .get_json(&format!("/v1/jobs/{job}"), &svc.admin_key)
        .await;
    assert_eq!(
        (&job["request"]["source"], &job["request"]["strength"]),
        (&json!("inpaint"), &json!(1.0)),
        "the transparent half is the mask: {job}"
    );
    assert_eq!(
        seen["bad_edit"],
        json!({"status": 400, "code": "invalid_image", "param": "image"})
    );
}

/// Compatible jobs run as one batch, and each image is the image its job gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_jobs_run_as_one_batch_and_match_their_solo_images() {
    let svc = Service::start(&[
        ("SPARKLE_WORKER__MAX_BATCH", "4"),
        ("SPARKLE_WORKER__BATCH_WAIT_MS", "1500"),
    ])
    .await;
    let key = &svc.admin_key;
    let jobs = [("a red fox", 1), ("a lighthouse", 2), ("a corgi", 3)];
    let mut ids = Vec::new();
    for (prompt, seed) in jobs {
        let (status, job) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": prompt, "size": "64x64", "steps": 6, "seed": seed}),
                Some(key),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        svc.wait_for(id, key, |j| j["status"] == "succeeded").await;
    }
    let batches: Vec<String> = svc
        .log()
        .lines()
        .filter(|l| l.contains("batch leased"))
        .map(str::to_string)
        .collect();
    assert_eq!(batches.len(), 1, "one batch: {batches:?}");
    assert!(
        ids.iter().all(|id| batches[0].contains(id.as_str())),
        "{batches:?}"
    );

    for ((prompt, seed), id) in jobs.iter().zip(&ids) {
        let (_, served) = svc.get(&format!("/v1/jobs/{id}/images/0"), key).await;
        let solo = support::generate_solo(prompt, *seed, "64x64", 6);
        let (a, b) = (support::png_pixels(&served), support::png_pixels(&solo));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(255);
        assert!(
            a.len() == b.len() && worst <= 2,
            "{prompt}: batched and solo differ by {worst}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_when_no_worker_may_run_the_jobs() {
    let svc = Service::start(&[("SPARKLE_SCALER__MAX_WORKERS", "0")]).await;
    let (status, body) = svc.get("/readyz", "").await;
    let body: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(message.contains("scaler.max_workers"), "{message}");
    let (status, _) = svc.get("/healthz", "").await;
    assert_eq!(status, 200, "alive all the same");
}

/// `GET /v1/jobs`: a key's own jobs, newest first, a page at a time; bad parameters named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_lists_its_own_jobs_newest_first_in_pages() {
    let svc = Service::start(&[]).await;
    let (mine, other) = (
        svc.create_key("lister").await,
        svc.create_key("other").await,
    );
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, job) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": format!("job {i}"), "size": "64x64", "steps": 1}),
                Some(&mine),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().expect("id").to_string());
    }
    let (status, _) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "not yours", "size": "64x64", "steps": 1}),
            Some(&other),
        )
        .await;
    assert_eq!(status, 202);
    let page = svc.get_json("/v1/jobs?limit=2", &mine).await;
    assert_eq!(page["object"], "list", "{page}");
    let listed: Vec<&str> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()], "newest first");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["last_id"], ids[1].as_str());
    let next = svc
        .get_json(&format!("/v1/jobs?limit=2&before={}", ids[1]), &mine)
        .await;
    let listed: Vec<&str> = next["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(listed, [ids[0].as_str()]);
    assert_eq!(next["has_more"], false);
    // Status filter: wait until all three are done.
    for id in &ids {
        svc.wait_for(id, &mine, |j| j["status"] == "succeeded")
            .await;
    }
    let done = svc.get_json("/v1/jobs?status=succeeded", &mine).await;
    assert_eq!(done["data"].as_array().map(Vec::len), Some(3), "{done}");
    let none = svc.get_json("/v1/jobs?status=queued", &mine).await;
    assert_eq!(none["data"].as_array().map(Vec::len), Some(0), "{none}");
    for (query, param) in [
        ("status=paused", Some("status")),
        ("limit=0", Some("limit")),
        ("limit=101", Some("limit")),
        ("before=nope", Some("before")),
        ("colour=blue", None),
    ] {
        let (status, body) = svc.get(&format!("/v1/jobs?{query}"), &mine).await;
        let body: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["code"], "invalid_query", "{query}: {body}");
        if let Some(param) = param {
            assert_eq!(body["error"]["param"], param, "{query}: {body}");
        }
    }
}
