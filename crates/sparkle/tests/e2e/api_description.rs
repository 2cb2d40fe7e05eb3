//! `/openapi.json` against the service it describes: schemathesis (installed by
//! scripts/test.sh beside the other Python clients) generates requests from the document —
//! valid ones, edge cases and invalid ones — sends them with a real key, and checks every
//! answer against the document: no server error, only documented statuses, content types,
//! headers and bodies, invalid requests refused, authentication not ignored.
//!
//! No worker runs (jobs stay queued), so generation costs nothing; the routes that wait for
//! a worker (OpenAI's synchronous route, event streams, readiness) and Discord's signed
//! endpoint have tests of their own.

use crate::support::Service;
use std::path::PathBuf;
use std::process::Command;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_the_description_does_not_say() {
    let python = std::env::var("OPENAI_CLIENT_PYTHON").expect(
        "OPENAI_CLIENT_PYTHON must name a python with schemathesis installed (scripts/test.sh makes one)",
    );
    let schemathesis = PathBuf::from(&python).with_file_name("schemathesis");
    assert!(
        schemathesis.exists(),
        "{} is missing: scripts/test.sh installs schemathesis",
        schemathesis.display()
    );
    let svc = Service::start(&[
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
        ("SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC", "0"),
        ("SPARKLE_GATEWAY__PER_KEY_REQUESTS_PER_SEC", "0"),
    ])
    .await;
    // Its caches go to a directory of its own, not the working tree.
    let scratch = tempfile::tempdir().expect("tempdir");
    let output = Command::new(&schemathesis)
        .current_dir(scratch.path())
        .arg("run")
        .arg(format!("{}/openapi.json", svc.url))
        .args([
            "--header",
            &format!("Authorization: Bearer {}", svc.admin_key),
        ])
        .arg("--tls-verify")
        .arg(svc.certificate())
        .args([
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--max-examples",
            "50",
            "--workers",
            "1",
            "--request-timeout",
            "10",
        ])
        .args(["--exclude-path", "/v1/images/generations"])
        .args(["--exclude-path", "/v1/images/edits"])
        .args(["--exclude-path", "/v1/jobs/{id}/events"])
        .args(["--exclude-path", "/readyz"])
        .args(["--exclude-path", "/discord/interactions"])
        .env("NO_COLOR", "1")
        .output()
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{report}"
    );
    // It did test: every selected operation, with many cases.
    assert!(report.contains("Tested: 11"), "{report}");
    assert!(!svc.log().contains("panicked"), "{}", svc.log());
}
