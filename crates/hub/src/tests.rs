//! A fake hub on loopback, serving files the way the Hugging Face hub does: a revision
//! listing with sizes and LFS hashes, and `resolve` URLs that honour range requests.

use super::*;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Hub {
    files: BTreeMap<String, Vec<u8>>,
    /// Files whose bytes are served altered (the listing keeps the true hash).
    corrupt: Vec<String>,
    /// Every resolve request: (path, Range header).
    log: Mutex<Vec<(String, Option<String>)>>,
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn listing(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    if (owner.as_str(), name.as_str()) != ("acme", "tiny") {
        return StatusCode::NOT_FOUND.into_response();
    }
    let siblings: Vec<_> = hub
        .files
        .iter()
        .map(|(path, bytes)| {
            let lfs = path
                .ends_with(".safetensors")
                .then(|| serde_json::json!({"sha256": sha(bytes), "size": bytes.len()}));
            serde_json::json!({"rfilename": path, "size": bytes.len(), "lfs": lfs})
        })
        .collect();
    axum::Json(serde_json::json!({"id": "acme/tiny", "sha": "0123abcd", "siblings": siblings}))
        .into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((_o, _n, rev, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    hub.log
        .lock()
        .expect("log")
        .push((path.clone(), range.clone()));
    let Some(bytes) = hub.files.get(&path).filter(|_| rev == "0123abcd") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut bytes = bytes.clone();
    if hub.corrupt.contains(&path) {
        bytes[0] ^= 0xff;
    }
    match range.and_then(|r| {
        r.strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok())
    }) {
        Some(from) if from < bytes.len() => {
            (StatusCode::PARTIAL_CONTENT, bytes[from..].to_vec()).into_response()
        }
        _ => (StatusCode::OK, bytes).into_response(),
    }
}

async fn serve(hub: Hub) -> (String, Arc<Hub>) {
    let hub = Arc::new(hub);
    let app = Router::new()
        .route("/api/models/{owner}/{name}/revision/{rev}", get(listing))
        .route("/{owner}/{name}/resolve/{rev}/{*path}", get(resolve))
        .with_state(hub.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), hub)
}

fn model() -> Hub {
    let mut files = BTreeMap::new();
    let weights: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    files.insert(
        "model_index.json".to_string(),
        br#"{"_class_name": "StableDiffusionPipeline"}"#.to_vec(),
    );
    files.insert("README.md".to_string(), b"# tiny".to_vec());
    files.insert("unet/config.json".to_string(), b"{}".to_vec());
    files.insert(
        "unet/diffusion_pytorch_model.safetensors".to_string(),
        weights.clone(),
    );
    files.insert(
        "unet/diffusion_pytorch_model.fp16.safetensors".to_string(),
        weights[..1000].to_vec(),
    );
    files.insert(
        "unet/diffusion_pytorch_model.bin".to_string(),
        b"pickle".to_vec(),
    );
    files.insert(
        "text_encoder/model.safetensors".to_string(),
        weights[..5000].to_vec(),
    );
    files.insert(
        "tokenizer/merges.txt".to_string(),
        b"#version: 0.2\n".to_vec(),
    );
    Hub {
        files,
        ..Default::default()
    }
}

fn options(endpoint: &str) -> PullOptions {
    PullOptions {
        endpoint: endpoint.into(),
        revision: "main".into(),
        fp16: false,
        token: None,
    }
}

#[tokio::test]
async fn pulls_the_diffusers_files_verified_and_skips_the_rest() {
    let (endpoint, hub) = serve(model()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let pulled = pull("acme/tiny", dir.path(), &options(&endpoint), &mut Quiet)
        .await
        .expect("pull");
    assert_eq!(pulled.revision, "0123abcd");
    assert_eq!(
        pulled.files,
        [
            "model_index.json",
            "text_encoder/model.safetensors",
            "tokenizer/merges.txt",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors"
        ]
    );
    for file in &pulled.files {
        assert_eq!(
            std::fs::read(dir.path().join(file)).expect("file"),
            hub.files[file],
            "{file}"
        );
    }
    assert!(
        !dir.path().join("unet/diffusion_pytorch_model.bin").exists(),
        "pickles are never fetched"
    );
    assert!(!dir.path().join("README.md").exists());

    // Everything is in place and verified: a second pull fetches nothing.
    hub.log.lock().expect("log").clear();
    let again = pull("acme/tiny", dir.path(), &options(&endpoint), &mut Quiet)
        .await
        .expect("pull");
    assert_eq!(again.bytes, 0);
    assert!(hub.log.lock().expect("log").is_empty());

    let fp16 = tempfile::tempdir().expect("tempdir");
    let pulled = pull(
        "acme/tiny",
        fp16.path(),
        &PullOptions {
            fp16: true,
            ..options(&endpoint)
        },
        &mut Quiet,
    )
    .await
    .expect("pull");
    assert!(pulled
        .files
        .contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
    assert!(!pulled
        .files
        .contains(&"unet/diffusion_pytorch_model.safetensors".to_string()));
    assert!(
        pulled
            .files
            .contains(&"text_encoder/model.safetensors".to_string()),
        "no fp16 variant: the full one"
    );
}

#[tokio::test]
async fn an_interrupted_download_resumes_with_a_range_request() {
    let (endpoint, hub) = serve(model()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let name = "unet/diffusion_pytorch_model.safetensors";
    let full = &hub.files[name];
    std::fs::create_dir_all(dir.path().join("unet")).expect("mkdir");
    std::fs::write(dir.path().join(format!("{name}.part")), &full[..120_000]).expect("part");
    let pulled = pull("acme/tiny", dir.path(), &options(&endpoint), &mut Quiet)
        .await
        .expect("pull");
    assert_eq!(std::fs::read(dir.path().join(name)).expect("file"), *full);
    let log = hub.log.lock().expect("log").clone();
    assert!(
        log.contains(&(name.to_string(), Some("bytes=120000-".to_string()))),
        "{log:?}"
    );
    let others: u64 = [
        "model_index.json",
        "text_encoder/model.safetensors",
        "tokenizer/merges.txt",
        "unet/config.json",
    ]
    .iter()
    .map(|f| hub.files[*f].len() as u64)
    .sum();
    assert_eq!(
        pulled.bytes,
        others + 80_000,
        "only the missing bytes travel"
    );
    assert!(!dir.path().join(format!("{name}.part")).exists());
}

#[tokio::test]
async fn a_checksum_mismatch_keeps_nothing() {
    let mut hub = model();
    hub.corrupt.push("text_encoder/model.safetensors".into());
    let (endpoint, _hub) = serve(hub).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let err = pull("acme/tiny", dir.path(), &options(&endpoint), &mut Quiet)
        .await
        .expect_err("corrupt");
    assert!(matches!(err, HubError::Verify { .. }), "{err}");
    assert!(
        err.to_string().contains("text_encoder/model.safetensors")
            && err.to_string().contains("sha256"),
        "{err}"
    );
    assert!(!dir.path().join("text_encoder/model.safetensors").exists());
    assert!(!dir
        .path()
        .join("text_encoder/model.safetensors.part")
        .exists());
}

#[tokio::test]
async fn bad_names_and_missing_repositories_are_clear_errors() {
    let (endpoint, _hub) = serve(model()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["tiny", "../etc/passwd", "acme/", "a/b/c"] {
        let err = pull(name, dir.path(), &options(&endpoint), &mut Quiet)
            .await
            .expect_err("bad name");
        assert!(matches!(err, HubError::BadName { .. }), "{name}: {err}");
    }
    let err = pull("acme/nope", dir.path(), &options(&endpoint), &mut Quiet)
        .await
        .expect_err("404");
    assert!(
        err.to_string().contains("404") && err.to_string().contains("no such repository"),
        "{err}"
    );
    let secret = PullOptions {
        token: Some(Zeroizing::new("hf_secret".into())),
        ..options(&endpoint)
    };
    assert!(!format!("{secret:?}").contains("hf_secret"));
}

#[tokio::test]
async fn plain_http_is_refused_beyond_this_machine() {
    let dir = tempfile::tempdir().expect("tempdir");
    for endpoint in [
        "http://hub.example",
        "http://10.0.0.1:8080",
        "ftp://hub.example",
    ] {
        let options = PullOptions {
            token: Some(Zeroizing::new("hf_secret".into())),
            ..options(endpoint)
        };
        let err = pull("acme/tiny", dir.path(), &options, &mut Quiet)
            .await
            .expect_err("refused");
        assert!(
            matches!(err, HubError::Insecure { .. }),
            "{endpoint}: {err}"
        );
    }
    assert!(plain_to_loopback("http://127.0.0.1:9/x"));
    assert!(plain_to_loopback("http://[::1]:9"));
    assert!(plain_to_loopback("http://localhost:9"));
    assert!(!plain_to_loopback("http://localhost.example:9"));
    assert!(!plain_to_loopback("https://127.0.0.1"));
}
