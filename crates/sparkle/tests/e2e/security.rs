//! The security posture from the outside: `sparkle audit` under both profiles, and the
//! production profile refusing to start on a critical failure.

use crate::support::{self, sparkle, TestCa};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A production configuration in `dir` with a CA-signed certificate and a keyring kept
/// apart from the data directory.
pub(crate) fn production_setup(dir: &Path, ca: &TestCa) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let (cert, key) = ca.issue(dir, "server", "sparkle.test", 90);
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).expect("secrets");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let config = dir.join("sparkle.toml");
    std::fs::write(
        &config,
        format!(
            "profile = \"production\"\ndata_dir = {:?}\n[tls]\ncert_file = {cert:?}\nkey_file = {key:?}\n\
             [encryption]\nkeyring_file = {:?}\n",
            dir.join("data"),
            secrets.join("keyring"),
        ),
    )
    .expect("config");
    let config_arg = config.to_str().expect("utf-8");
    let (ok, _, err) = sparkle(&["keyring", "rotate", "--config", config_arg], &[]);
    assert!(ok, "{err}");
    config
}

/// Runs `sparkle ARGS…` that should exit by itself within a minute: (success, stderr).
fn exits(args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_sparkle"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let mut err = String::new();
            if let Some(mut stderr) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
            }
            return (status.success(), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("sparkle {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn audit_passes_a_sound_production_setup_and_production_refuses_a_public_admin_listener() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new();
    let config = production_setup(dir.path(), &ca);
    let config = config.to_str().expect("utf-8");

    let (ok, out, err) = sparkle(&["audit", "--config", config], &[]);
    assert!(ok, "{out}{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 11, "{out}");
    for line in &lines[..lines.len() - 1] {
        assert!(line.starts_with("pass") || line.starts_with("n/a"), "{out}");
    }
    assert!(
        out.contains("n/a   database-tls  SQLite on local disk"),
        "{out}"
    );
    assert!(out.contains("none fails (production profile)"), "{out}");

    let public = [("SPARKLE_ADMIN_LISTEN", "0.0.0.0:9464")];
    let (ok, out, err) = sparkle(&["audit", "--config", config], &public);
    assert!(!ok, "{out}");
    let admin = out
        .lines()
        .find(|l| l.starts_with("fail  admin"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(admin.ends_with("[critical]"), "{admin}");
    assert!(err.contains("fail under the production profile"), "{err}");

    let model = support::tiny_model().to_str().expect("utf-8");
    for role in ["up", "gateway"] {
        let (ok, err) = exits(&[
            role,
            "--config",
            config,
            "--model",
            model,
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
        ]);
        assert!(!ok, "{role} started");
        assert!(
            err.contains("refuses to start") && err.contains("admin"),
            "{role}: {err}"
        );
    }
}

#[test]
fn audit_under_the_dev_profile_reports_failures_and_exits_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8");
    let (ok, out, err) = sparkle(&["audit", "--data-dir", data], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("none fails (dev profile)"), "{out}");
    let facing = [
        ("SPARKLE_LISTEN", "0.0.0.0:8443"),
        (
            "SPARKLE_DISCORD__API_BASE",
            "http://discord.example/api/v10",
        ),
    ];
    let (ok, out, err) = sparkle(&["audit", "--data-dir", data], &facing);
    assert!(ok, "the dev profile only reports: {err}");
    assert!(out.contains("fail  profile"), "{out}");
    assert!(out.contains("fail  outbound-tls"), "{out}");
    assert!(out.contains("the dev profile only reports them"), "{out}");
}
