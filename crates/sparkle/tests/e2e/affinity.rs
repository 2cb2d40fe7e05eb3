//! A deployment serving two models: both listed in OpenAI's shape, each request served by the
//! model it names, an unknown one refused, and one worker that holds one model at a time
//! swapping between them, counted in the control plane's metrics.

use crate::support::{png_info, Service};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const BIN: &str = env!("CARGO_BIN_EXE_sparkle");

/// A second tiny model, with other weights and another name.
fn second_model() -> &'static Path {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-model-b");
        let _ = std::fs::remove_dir_all(&dir);
        let status = std::process::Command::new(BIN)
            .args(["model", "tiny", "--seed", "1"])
            .arg(&dir)
            .status()
            .expect("run sparkle model tiny");
        assert!(status.success(), "sparkle model tiny failed");
        dir
    })
}

/// The value of the Prometheus counter `name` with label `model="…"`, 0 when absent.
fn counter(metrics: &str, name: &str, model: &str) -> f64 {
    let prefix = format!("{name}{{model=\"{model}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_models_are_listed_served_by_name_and_swapped_on_one_worker() {
    let second = second_model().to_str().expect("a UTF-8 path").to_string();
    let svc = Service::start(&[
        ("SPARKLE_MODELS", &format!("[{second:?}]")),
        ("SPARKLE_WORKER__MAX_LOADED_MODELS", "1"),
    ])
    .await;
    let key = &svc.admin_key;

    let listed = svc.get_json("/v1/models", key).await;
    assert_eq!(listed["object"], "list", "{listed}");
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, ["tiny-model", "tiny-model-b"]);
    assert_eq!(listed["data"][0]["default"], true);
    assert_eq!(listed["data"][1]["object"], "model");
    let one = svc.get_json("/v1/models/tiny-model-b", key).await;
    assert_eq!(one["id"], "tiny-model-b", "{one}");
    let (status, _) = svc.get("/v1/models/nope", key).await;
    assert_eq!(status, 404);
    let (status, _) = svc.get("/v1/models", "spk_not_a_key").await;
    assert_eq!(status, 401, "the list needs a key, as OpenAI's does");

    // An unknown model is refused, naming those served; nothing is queued.
    let (status, body) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "x", "model": "sd-unknown", "size": "64x64", "steps": 1}),
            Some(key),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "model", "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("tiny-model-b"), "{body}");

    // Jobs naming each model, interleaved: each is made by the model it names.
    let mut jobs = Vec::new();
    for (i, model) in ["tiny-model-b", "tiny-model", "tiny-model-b"]
        .iter()
        .enumerate()
    {
        let (status, job) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": "a lighthouse", "model": model, "size": "64x64", "steps": 2, "seed": i}),
                Some(key),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        jobs.push((job["id"].as_str().expect("id").to_string(), *model));
    }
    for (id, model) in &jobs {
        let done: Value = svc
            .wait_for(id, key, |j| {
                j["status"] != "queued" && j["status"] != "running"
            })
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["request"]["model"], *model, "{done}");
        let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/0"), key).await;
        assert_eq!(status, 200);
        let (_, _, params) = png_info(&png);
        assert!(params.ends_with(&format!("Model: {model}")), "{params}");
    }
    // Same seed and prompt, other weights: other pixels.
    let (_, a) = svc
        .get(&format!("/v1/jobs/{}/images/0", jobs[0].0), key)
        .await;
    let (_, b) = svc
        .get(&format!("/v1/jobs/{}/images/0", jobs[1].0), key)
        .await;
    assert_ne!(
        crate::support::png_pixels(&a),
        crate::support::png_pixels(&b)
    );

    // One model at a time on the one worker: the second model was loaded in place of the
    // first at least once, and the loads were reported to the control plane.
    let metrics = svc.metrics().await;
    assert!(
        counter(&metrics, "sparkle_model_loads_total", "tiny-model") >= 1.0,
        "{metrics}"
    );
    assert!(
        counter(&metrics, "sparkle_model_loads_total", "tiny-model-b") >= 1.0,
        "{metrics}"
    );
    assert!(
        counter(&metrics, "sparkle_model_swaps_total", "tiny-model-b") >= 1.0,
        "{metrics}"
    );
    assert!(metrics.contains("sparkle_model_load_seconds"), "{metrics}");
}
