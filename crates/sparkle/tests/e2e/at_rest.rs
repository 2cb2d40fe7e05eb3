//! Encryption at rest, seen from outside: after real jobs through the REST API and Discord,
//! no file under the data directory (database, write-ahead log, images, keys, everything)
//! holds a prompt, a user id, an idempotency key, an interaction token or a PNG.

use crate::discord::{command, job_id, send, start_with, FakeDiscord};
use crate::support::{self, Service};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROMPT: &str = "quokka astronaut painting nebula teacups 7f3a";
const NEGATIVE: &str = "blurry harpsichord 9c1e";
const END_USER: &str = "enduser-5b2d81c4";
const IDEMPOTENCY_KEY: &str = "idem-8e4f2a7b";
const DISCORD_USER: &str = "770012345678901234";
const INTERACTION_TOKEN: &str = "aW50ZXJhY3Rpb24tdG9rZW4-93f1c6d2";
const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_under(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Every secret (by name) found in any file under `dir`, with the file; and how many files
/// were read.
fn scan(dir: &Path) -> (Vec<String>, usize) {
    let needles: [(&str, &[u8]); 7] = [
        ("the prompt", PROMPT.as_bytes()),
        ("the negative prompt", NEGATIVE.as_bytes()),
        ("the API end user", END_USER.as_bytes()),
        ("the idempotency key", IDEMPOTENCY_KEY.as_bytes()),
        ("the Discord user id", DISCORD_USER.as_bytes()),
        ("the interaction token", INTERACTION_TOKEN.as_bytes()),
        ("a PNG signature", PNG_SIGNATURE),
    ];
    let files = files_under(dir);
    let mut found = Vec::new();
    for file in &files {
        let bytes = std::fs::read(file).expect("read");
        for (name, needle) in needles {
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(format!("{name} in {}", file.display()));
            }
        }
    }
    (found, files.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_prompt_user_token_or_png_is_readable_in_the_data_directory() {
    let fake = Arc::new(FakeDiscord::default());
    let mut svc = start_with(&fake).await;

    // The REST API, with an end user and an idempotency key.
    let (status, job) = svc
        .post_json_with(
            "/v1/jobs",
            &json!({"prompt": PROMPT, "negative_prompt": NEGATIVE, "size": "64x64",
                    "steps": 2, "seed": 3, "user": END_USER}),
            &svc.admin_key,
            &[("idempotency-key", IDEMPOTENCY_KEY)],
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let rest_id = job["id"].as_str().expect("id").to_string();

    // Discord, as a user in a server, with its interaction token.
    let user = json!({"guild": true, "user": {"id": DISCORD_USER, "username": "ada"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": PROMPT},
        {"name": "size", "type": 3, "value": "64x64"},
        {"name": "steps", "type": 4, "value": 2},
    ]);
    let mut interaction = command("4001", user, options);
    interaction["token"] = json!(INTERACTION_TOKEN);
    let (status, ack) = send(&svc, &interaction).await;
    assert_eq!(status, 200, "{ack}");
    let discord_id = job_id(&ack);

    for id in [&rest_id, &discord_id] {
        svc.wait_for(id, &svc.admin_key, |j| j["status"] == "succeeded")
            .await;
    }
    let (status, png) = svc
        .get(&format!("/v1/jobs/{rest_id}/images/0"), &svc.admin_key)
        .await;
    assert_eq!(status, 200);
    assert!(
        png.starts_with(PNG_SIGNATURE),
        "the image opens for its owner"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fake.edits().iter().any(|e| e.multipart && e.status == 200) {
        assert!(Instant::now() < deadline, "the image never reached Discord");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let repeat = svc
        .post_json_with(
            "/v1/jobs",
            &json!({"prompt": PROMPT, "negative_prompt": NEGATIVE, "size": "64x64",
                    "steps": 2, "seed": 3, "user": END_USER}),
            &svc.admin_key,
            &[("idempotency-key", IDEMPOTENCY_KEY)],
        )
        .await;
    assert_eq!(
        repeat.1["id"],
        rest_id.as_str(),
        "dedup works on sealed keys"
    );

    let data = svc.certificate();
    let data = data
        .parent()
        .and_then(Path::parent)
        .expect("the data directory")
        .to_path_buf();
    // While it runs (the write-ahead log holds the newest pages)...
    let (found, files) = scan(&data);
    assert!(files >= 5, "database, log, keyring, images: {files} files");
    assert_eq!(found, Vec::<String>::new(), "readable while running");
    // ...and once stopped (the log folded into the database).
    support::kill(svc.pid(), "TERM");
    svc.wait_exit();
    let (found, _) = scan(&data);
    assert_eq!(found, Vec::<String>::new(), "readable after shutdown");
}

/// `sparkle keyring …` on `data`: (success, stdout, stderr).
fn keys(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sparkle"))
        .arg("keyring")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .output()
        .expect("sparkle keyring");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_under_a_running_service_and_the_old_key_retires() {
    let svc = Service::start(&[]).await;
    let data = svc
        .certificate()
        .parent()
        .and_then(Path::parent)
        .expect("the data directory")
        .to_path_buf();
    let submit = |prompt: &'static str| {
        let svc = &svc;
        async move {
            let (status, job) = svc
                .post_json(
                    "/v1/jobs",
                    &json!({"prompt": prompt, "size": "64x64", "steps": 2}),
                    Some(&svc.admin_key),
                )
                .await;
            assert_eq!(status, 202, "{job}");
            let id = job["id"].as_str().expect("id").to_string();
            svc.wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
                .await;
            id
        }
    };
    let before = submit("a lighthouse before the rotation").await;

    let (ok, listed, err) = keys(&data, &["list"]);
    assert!(ok, "{err}");
    let old = listed.split('\t').next().expect("an id").to_string();
    assert!(listed.trim_end().ends_with("active"), "{listed}");

    let (ok, _, said) = keys(&data, &["rotate"]);
    assert!(ok, "{said}");
    assert!(said.contains("Images: 1 re-wrapped"), "{said}");
    assert!(said.contains("re-sealed"), "{said}");
    // The running service meets the new key id and follows the keyring file.
    let (status, png) = svc
        .get(&format!("/v1/jobs/{before}/images/0"), &svc.admin_key)
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&png));
    assert!(png.starts_with(PNG_SIGNATURE));
    let job = svc
        .get_json(&format!("/v1/jobs/{before}"), &svc.admin_key)
        .await;
    assert_eq!(
        job["request"]["prompt"], "a lighthouse before the rotation",
        "{job}"
    );

    let (ok, _, err) = keys(&data, &["retire", &old]);
    assert!(ok, "{err}");
    let (ok, _, err) = keys(&data, &["retire", &old]);
    assert!(!ok && err.contains("already retired"), "{err}");
    let (ok, listed, _) = keys(&data, &["list"]);
    assert!(ok);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].starts_with(&old) && lines[0].contains("retired"),
        "{listed}"
    );
    assert!(lines[1].ends_with("active"), "{listed}");
    let new = lines[1].split('\t').next().expect("id").to_string();
    let (ok, _, err) = keys(&data, &["retire", &new]);
    assert!(!ok && err.contains("active key"), "{err}");

    // The material is in the keyring file and nowhere in what `list` shows.
    let ring = std::fs::read_to_string(data.join("keyring")).expect("keyring");
    for word in ring.split_whitespace().filter(|w| w.len() == 64) {
        assert!(!listed.contains(word));
    }

    // New images are sealed under the new key, and old ones still open after the retirement.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let after = submit("a lighthouse after the rotation").await;
    let image = std::fs::read(data.join(format!("images/images/{after}/a1/0.png"))).expect("image");
    let id_len = usize::from(image[6]);
    assert_eq!(
        &image[7..7 + id_len],
        new.as_bytes(),
        "sealed under the new key"
    );
    for id in [&before, &after] {
        let (status, png) = svc
            .get(&format!("/v1/jobs/{id}/images/0"), &svc.admin_key)
            .await;
        assert_eq!(status, 200);
        assert!(png.starts_with(PNG_SIGNATURE));
    }
}
