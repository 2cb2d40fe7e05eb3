//! `/discord/interactions` with requests signed by a real Ed25519 key, the way Discord sends
//! them: PING, every bad signature variant, guild and DM commands, duplicates, bad options.

use crate::support::Service;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn sign(key: &SigningKey, timestamp: &str, body: &str) -> String {
    hex::encode(key.sign(format!("{timestamp}{body}").as_bytes()).to_bytes())
}

async fn start() -> Service {
    let public = hex::encode(key().verifying_key().to_bytes());
    Service::start(&[("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str())]).await
}

async fn send(svc: &Service, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let ts = now().to_string();
    let sig = sign(&key(), &ts, &body);
    svc.post_signed("/discord/interactions", &body, Some(&sig), Some(&ts))
        .await
}

fn command(id: &str, user: Value, options: Value) -> Value {
    let mut i = json!({
        "id": id, "application_id": "900", "type": 2, "token": format!("tok-{id}"), "version": 1,
        "channel_id": "600",
        "data": {"id": "77", "name": "sparkle", "type": 1, "options": options},
    });
    if user.get("guild").is_some() {
        i["guild_id"] = json!("500");
        i["member"] = json!({"user": user["user"].clone(), "roles": []});
    } else {
        i["user"] = user["user"].clone();
    }
    i
}

fn job_id(response: &Value) -> String {
    let content = response["data"]["content"].as_str().unwrap_or_default();
    content.split('`').nth(1).unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_every_bad_signature() {
    let svc = start().await;
    let (status, body) = send(
        &svc,
        &json!({"id": "1", "application_id": "900", "type": 1, "token": "t"}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"type": 1})));

    let ping = json!({"id": "1", "application_id": "900", "type": 1, "token": "t"}).to_string();
    let ts = now().to_string();
    let good = sign(&key(), &ts, &ping);
    let stale = (now() - 3600).to_string();
    let other = SigningKey::from_bytes(&[1u8; 32]);
    let cases: Vec<(&str, Option<String>, Option<String>, String)> = vec![
        ("no headers", None, None, ping.clone()),
        ("no timestamp", Some(good.clone()), None, ping.clone()),
        ("no signature", None, Some(ts.clone()), ping.clone()),
        (
            "not hex",
            Some("xyz".into()),
            Some(ts.clone()),
            ping.clone(),
        ),
        (
            "zeros",
            Some("00".repeat(64)),
            Some(ts.clone()),
            ping.clone(),
        ),
        (
            "other key",
            Some(sign(&other, &ts, &ping)),
            Some(ts.clone()),
            ping.clone(),
        ),
        (
            "tampered body",
            Some(good.clone()),
            Some(ts.clone()),
            ping.replace("\"type\":1", "\"type\":2"),
        ),
        (
            "other timestamp",
            Some(good.clone()),
            Some((now() + 1).to_string()),
            ping.clone(),
        ),
        (
            "stale",
            Some(sign(&key(), &stale, &ping)),
            Some(stale.clone()),
            ping.clone(),
        ),
    ];
    for (what, sig, ts, body) in cases {
        let (status, _) = svc
            .post_signed(
                "/discord/interactions",
                &body,
                sig.as_deref(),
                ts.as_deref(),
            )
            .await;
        assert_eq!(status, 401, "{what}");
    }
    assert_eq!(svc.job_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guild_and_dm_commands_queue_one_job_per_interaction() {
    let svc = start().await;
    let guild_user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a corgi, style of monet"},
        {"name": "size", "type": 3, "value": "64x64"},
        {"name": "steps", "type": 4, "value": 2},
        {"name": "seed", "type": 4, "value": 7},
    ]);
    let (status, first) = send(&svc, &command("1001", guild_user.clone(), options.clone())).await;
    assert_eq!(status, 200);
    assert_eq!(first["type"], 4, "{first}");
    assert!(
        first["data"]["flags"].is_null(),
        "a public acknowledgement: {first}"
    );
    assert!(
        first["data"]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("Submitted"),
        "{first}"
    );
    let id = job_id(&first);

    // Delivered again (same interaction id): the same job, nothing new.
    let (_, again) = send(&svc, &command("1001", guild_user.clone(), options.clone())).await;
    assert_eq!(job_id(&again), id);
    assert_eq!(svc.job_count(), 1);

    let job = svc
        .wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(job["request"]["prompt"], "a corgi, style of monet");
    assert_eq!(
        (
            job["request"]["size"].as_str(),
            job["request"]["seed"].as_u64()
        ),
        (Some("64x64"), Some(7))
    );

    let dm_user = json!({"user": {"id": "43", "username": "bob"}});
    let (status, dm) = send(&svc, &command("1002", dm_user, options)).await;
    assert_eq!((status, dm["type"].as_u64()), (200, Some(4)), "{dm}");
    assert_ne!(job_id(&dm), id);
    assert_eq!(svc.job_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_options_get_an_ephemeral_explanation_and_queue_nothing() {
    let svc = start().await;
    let user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let cases = [
        (
            json!([{"name": "prompt", "type": 3, "value": "x"}, {"name": "size", "type": 3, "value": "500x500"}]),
            "multiples of 8",
        ),
        (
            json!([{"name": "prompt", "type": 3, "value": "x"}, {"name": "steps", "type": 4, "value": 0}]),
            "steps",
        ),
        (
            json!([{"name": "prompt", "type": 3, "value": "   "}]),
            "prompt",
        ),
        (
            json!([{"name": "prompt", "type": 3, "value": "x"}, {"name": "scheduler", "type": 3, "value": "plms"}]),
            "plms",
        ),
        (
            json!([{"name": "prompt", "type": 3, "value": "x"}, {"name": "seed", "type": 4, "value": -1}]),
            "seed",
        ),
        (json!([]), "prompt"),
    ];
    for (i, (options, mention)) in cases.iter().enumerate() {
        let (status, body) = send(
            &svc,
            &command(&format!("20{i}"), user.clone(), options.clone()),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["flags"], 64, "ephemeral: {body}");
        let content = body["data"]["content"].as_str().unwrap_or_default();
        assert!(
            content.contains(mention),
            "{content} should mention {mention}"
        );
    }
    assert_eq!(svc.job_count(), 0, "nothing enqueued");
}
