//! No secret reaches the logs. A service logging at debug level is taken along every path
//! that touches one: API keys (accepted and refused), a Discord interaction token, a signed
//! button id checked against the button key, the bot token (a channel post after the
//! interaction token's end), the TLS private key (loaded at start), the keyring (a rotation
//! under the running service). Then its whole log, and what the rotation printed, are
//! searched for every secret.

use crate::discord::{buttons, click, command, job_id, key, send, FakeDiscord};
use crate::support::{self, Service};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const BOT_TOKEN: &str = "bot-token-3c9e51d7a0f2b8e6";
const INTERACTION_TOKEN: &str = "aW50ZXJhY3Rpb24tc2VjcmV0-5e7b20c4";

/// Hex runs of at least 32 characters in a file: key material.
fn hex_material(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    text.split(|c: char| !c.is_ascii_hexdigit())
        .filter(|t| t.len() >= 32)
        .map(str::to_owned)
        .collect()
}

/// The base64 lines of a PEM private key.
fn pem_body(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).expect("the TLS key");
    assert!(text.contains("PRIVATE KEY"), "a private key");
    text.lines()
        .filter(|l| !l.starts_with("-----") && l.len() >= 32)
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_on_any_path_that_uses_one() {
    use std::os::unix::fs::PermissionsExt;
    let fake = Arc::new(FakeDiscord::default());
    let api = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("bot-token");
    std::fs::write(&token_file, BOT_TOKEN).expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let public = hex::encode(key().verifying_key().to_bytes());
    let token_path = token_file.display().to_string();
    let svc = Service::start(&[
        ("RUST_LOG", "debug"),
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_DISCORD__BOT_TOKEN_FILE", token_path.as_str()),
        ("SPARKLE_DISCORD__TOKEN_LIFETIME_SECS", "3"),
    ])
    .await;

    // An API key refused, then one accepted.
    let mut wrong_key = svc.admin_key.clone();
    let last = wrong_key.pop().expect("a key");
    wrong_key.push(if last == 'a' { 'b' } else { 'a' });
    let (status, _) = svc
        .get("/v1/jobs/00000000-0000-0000-0000-000000000000", &wrong_key)
        .await;
    assert_eq!(status, 401, "a wrong key is refused");

    // A Discord command whose job outlives its interaction token: progress through the
    // token, then the image through the bot token.
    let user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a slow sunset"},
        {"name": "size", "type": 3, "value": "192x192"},
        {"name": "steps", "type": 4, "value": 120},
    ]);
    let mut interaction = command("5001", user, options);
    interaction["token"] = json!(INTERACTION_TOKEN);
    let (status, ack) = send(&svc, &interaction).await;
    assert_eq!(status, 200, "{ack}");
    let id = job_id(&ack);

    // Someone else presses the progress message's Cancel: the signed id is checked, and
    // the click refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    let cancel = loop {
        let found = fake.edits().iter().find_map(|e| {
            let payload: Value = serde_json::from_slice(&e.body).ok()?;
            buttons(&payload)
                .into_iter()
                .find(|(label, _)| label == "Cancel")
                .map(|(_, custom_id)| custom_id)
        });
        if let Some(custom_id) = found {
            break custom_id;
        }
        assert!(
            Instant::now() < deadline,
            "no progress message with a Cancel button"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stranger = json!({"user": {"id": "43", "username": "eve"}});
    let (status, refused) = send(&svc, &click("5002", &stranger, &cancel)).await;
    assert_eq!(status, 200, "{refused}");
    assert_eq!(
        refused["data"]["flags"], 64,
        "an ephemeral refusal: {refused}"
    );

    svc.wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.channel_posts.lock().expect("posts").is_empty() {
        assert!(Instant::now() < deadline, "the bot never posted the image");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let posts = fake.channel_posts.lock().expect("posts").clone();
    assert_eq!(
        posts[0].1,
        format!("Bot {BOT_TOKEN}"),
        "the bot token was used"
    );

    // The keyring, rotated under the running service.
    let data = svc.data_dir().to_path_buf();
    let data_arg = data.display().to_string();
    let (ok, rotate_out, rotate_err) = support::sparkle(
        &["keyring", "rotate", "--data-dir", &data_arg],
        &[("RUST_LOG", "debug")],
    );
    assert!(ok, "rotate: {rotate_err}");

    let mut secrets: Vec<(String, String)> = vec![
        ("the admin API key".into(), svc.admin_key.clone()),
        ("a refused API key".into(), wrong_key),
        ("the bot token".into(), BOT_TOKEN.into()),
        ("the interaction token".into(), INTERACTION_TOKEN.into()),
    ];
    let keyring = hex_material(&data.join("keyring"));
    assert!(
        keyring.len() >= 3,
        "an index key and two master keys: {}",
        keyring.len()
    );
    secrets.extend(keyring.into_iter().map(|k| ("keyring material".into(), k)));
    let button_key = hex_material(&data.join("discord-button.key"));
    assert!(!button_key.is_empty(), "the button key was made");
    secrets.extend(button_key.into_iter().map(|k| ("the button key".into(), k)));
    secrets.extend(
        pem_body(&data.join("tls/key.pem"))
            .into_iter()
            .map(|l| ("the TLS private key".into(), l)),
    );

    let log = format!("{}\n{rotate_out}\n{rotate_err}", svc.log());
    assert!(log.contains("DEBUG"), "the service logged at debug level");
    let leaked: Vec<&str> = secrets
        .iter()
        .filter(|(_, secret)| log.contains(secret.as_str()))
        .map(|(name, _)| name.as_str())
        .collect();
    assert!(leaked.is_empty(), "secrets in the logs: {leaked:?}");
}
