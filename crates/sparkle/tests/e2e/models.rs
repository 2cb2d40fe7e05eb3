//! `sparkle model pull | list` and `sparkle generate` against a fake hub on loopback that
//! serves the tiny model the way the Hugging Face hub serves repositories.

use crate::support;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

const BIN: &str = env!("CARGO_BIN_EXE_sparkle");

fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(rel) = path.strip_prefix(root) {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

async fn listing(State(root): State<Arc<PathBuf>>) -> Response {
    let siblings: Vec<_> = files_under(&root)
        .into_iter()
        .map(|f| {
            let bytes = std::fs::read(root.join(&f)).expect("file");
            let lfs = f
                .ends_with(".safetensors")
                .then(|| serde_json::json!({"sha256": hex::encode(Sha256::digest(&bytes)), "size": bytes.len()}));
            serde_json::json!({"rfilename": f, "size": bytes.len(), "lfs": lfs})
        })
        .collect();
    axum::Json(serde_json::json!({"sha": "c0ffee", "siblings": siblings})).into_response()
}

async fn resolve(
    State(root): State<Arc<PathBuf>>,
    UrlPath((_rev, path)): UrlPath<(String, String)>,
) -> Response {
    match std::fs::read(root.join(&path)) {
        Ok(bytes) if !path.contains("..") => bytes.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_list_and_generate_with_a_model_from_the_hub() {
    let root = Arc::new(support::tiny_model().to_path_buf());
    let app = Router::new()
        .route("/api/models/acme/tiny-sd/revision/{rev}", get(listing))
        .route("/acme/tiny-sd/resolve/{rev}/{*path}", get(resolve))
        .with_state(root);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let models = tempfile::tempdir().expect("tempdir");
    let dir = models.path().to_str().expect("utf-8 path");
    let pulled = tokio::task::spawn_blocking({
        let endpoint = endpoint.clone();
        let dir = dir.to_string();
        move || {
            run(&[
                "model",
                "pull",
                "acme/tiny-sd",
                "--dir",
                &dir,
                "--endpoint",
                &endpoint,
            ])
        }
    })
    .await
    .expect("join");
    assert!(pulled.0, "{}", pulled.2);
    assert!(pulled.2.contains("at c0ffee"), "{}", pulled.2);

    let (ok, listed, err) = run(&["model", "list", "--dir", dir]);
    assert!(ok, "{err}");
    assert!(listed.starts_with("tiny-sd\tsd1.5\t512px"), "{listed}");

    let out = models.path().join("x.png");
    let model = models.path().join("tiny-sd");
    let (ok, _, err) = run(&[
        "generate",
        "a corgi",
        "-o",
        out.to_str().expect("path"),
        "--model",
        model.to_str().expect("path"),
        "--size",
        "64x64",
        "--steps",
        "2",
        "--seed",
        "7",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let (w, h, params) = support::png_info(&std::fs::read(&out).expect("png"));
    assert_eq!((w, h), (64, 64));
    assert!(
        params.contains("Seed: 7") && params.contains("Model: tiny-sd"),
        "{params}"
    );
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run sparkle");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
