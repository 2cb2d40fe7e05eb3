//! A worker elsewhere: `sparkle worker --control-plane` with its own, empty data directory
//! (no database, no keyring, no image store of its own) speaks only the worker protocol to
//! the control plane's worker listener, enrolled with a secret from `sparkle enrollment
//! create`, and completes jobs; a worker with a secret that is not an enrollment is refused.

use crate::support::{fixed_port, sparkle, tiny_model, Service};
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sparkle");

fn secret_file(dir: &Path, secret: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("a directory");
    let path = dir.join("enrollment.secret");
    std::fs::write(&path, format!("{secret}\n")).expect("write the secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// `sparkle worker` against the worker listener at `url`, in `data` (empty of everything).
fn remote_worker(url: &str, secret: &Path, ca: &Path, data: &Path) -> Child {
    std::fs::create_dir_all(data).expect("data directory");
    let log = std::fs::File::create(data.join("worker.log")).expect("log");
    Command::new(BIN)
        .args(["worker", "--control-plane", url, "--enrollment-token-file"])
        .arg(secret)
        .arg("--ca-file")
        .arg(ca)
        .arg("--data-dir")
        .arg(data)
        .arg("--model")
        .arg(tiny_model())
        .env("SPARKLE_WORKER__DEVICE", "cpu")
        .env("SPARKLE_WORKER__HEARTBEAT_SECS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn sparkle worker")
}

struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        crate::support::kill(self.0.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_elsewhere_completes_jobs_over_the_worker_protocol_alone() {
    let port = fixed_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let svc = Service::start(&[
        ("SPARKLE_WORKER_LISTEN", listen.as_str()),
        // No local workers: every job here is the remote worker's.
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
    ])
    .await;
    let data = svc.data_dir().to_string_lossy().into_owned();
    let (ok, secret, err) = sparkle(
        &[
            "enrollment",
            "create",
            "--name",
            "gpu-1",
            "--data-dir",
            &data,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let secret = secret.trim().to_string();
    assert!(
        !secret.is_empty() && !secret.contains('\n'),
        "the secret alone: {secret:?}"
    );
    let (ok, listed, err) = sparkle(&["enrollment", "list", "--data-dir", &data], &[]);
    assert!(
        ok && listed.contains("gpu-1") && !listed.contains(&secret),
        "{listed}{err}"
    );
    // An enrollment secret is no API key.
    let (status, body) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a quay", "size": "64x64", "steps": 2}),
            Some(&secret),
        )
        .await;
    assert_eq!(status, 403, "{body}");

    let elsewhere = tempfile::tempdir().expect("tempdir");
    let file = secret_file(elsewhere.path(), &secret);
    let url = format!("https://{listen}");
    let worker_data = elsewhere.path().join("data");
    let worker = Stopped(remote_worker(&url, &file, &svc.certificate(), &worker_data));

    let key = svc.create_key("remote").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let (status, job) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": format!("a harbour {i}"), "size": "64x64", "steps": 2}),
                Some(&key),
            )
            .await;
        assert_eq!(status, 202, "{job}");
        ids.push(job["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        let done = svc
            .wait_for(id, &key, |j| {
                j["status"] != "queued" && j["status"] != "running"
            })
            .await;
        assert_eq!(
            done["status"],
            "succeeded",
            "{done}; worker log:\n{}",
            std::fs::read_to_string(worker_data.join("worker.log")).unwrap_or_default()
        );
        let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/0"), &key).await;
        assert_eq!(status, 200);
        assert!(png.starts_with(b"\x89PNG"));
    }
    // The worker's machine holds nothing of the deployment.
    for kept in ["sparkle.db", "keyring", "images"] {
        assert!(
            !worker_data.join(kept).exists(),
            "{kept} on the worker's machine"
        );
    }
    drop(worker);
    let log = std::fs::read_to_string(worker_data.join("worker.log")).unwrap_or_default();
    assert!(log.contains("worker token renewed"), "{log}");
    assert!(!log.contains(&secret), "the secret is never logged");

    // A secret that is not an enrollment: the worker is refused and stops.
    let bad = secret_file(&elsewhere.path().join("bad"), &key);
    let bad_data = elsewhere.path().join("bad-data");
    let mut refused = remote_worker(&url, &bad, &svc.certificate(), &bad_data);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = refused.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "a refused worker keeps running");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(bad_data.join("worker.log")).unwrap_or_default();
    assert!(log.contains("refused this worker"), "{log}");
    assert!(!log.contains(&key), "the secret is never logged: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_enrollment_stops_its_workers_at_their_next_renewal() {
    let listen = format!("127.0.0.1:{}", fixed_port());
    let svc = Service::start(&[
        ("SPARKLE_WORKER_LISTEN", listen.as_str()),
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
        ("SPARKLE_WORKER__TOKEN_LIFETIME_SECS", "6"),
    ])
    .await;
    let data = svc.data_dir().to_string_lossy().into_owned();
    let (ok, secret, err) = sparkle(
        &[
            "enrollment",
            "create",
            "--name",
            "gpu-2",
            "--data-dir",
            &data,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let file = secret_file(elsewhere.path(), secret.trim());
    let worker_data = elsewhere.path().join("data");
    let url = format!("https://{listen}");
    let mut worker = remote_worker(&url, &file, &svc.certificate(), &worker_data);
    let key = svc.create_key("revocation").await;
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a mill", "size": "64x64", "steps": 2}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id");
    svc.wait_for(id, &key, |j| j["status"] == "succeeded").await;

    let (_, listed, _) = sparkle(&["enrollment", "list", "--data-dir", &data], &[]);
    let enrollment = listed
        .lines()
        .find(|l| l.contains("gpu-2"))
        .and_then(|l| l.split('\t').next())
        .expect("the enrollment listed")
        .to_string();
    let (ok, _, err) = sparkle(
        &["enrollment", "revoke", &enrollment, "--data-dir", &data],
        &[],
    );
    assert!(ok, "{err}");
    // A token lives 6 s and is renewed after 4: the worker stops within a lifetime.
    let revoked = Instant::now();
    let status = loop {
        if let Some(status) = worker.try_wait().expect("wait") {
            break status;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(30),
            "the worker of a revoked enrollment keeps running"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    assert!(
        revoked.elapsed() <= Duration::from_secs(8),
        "{:?}",
        revoked.elapsed()
    );
    let log = std::fs::read_to_string(worker_data.join("worker.log")).unwrap_or_default();
    assert!(log.contains("refused this worker"), "{log}");
}
