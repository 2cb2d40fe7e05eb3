//! The front door and Discord: Discord's few addresses carry every user's commands, so a
//! busy bot must not look like one abusive client. Over a connection cap the gateway answers
//! (503 with `Retry-After`) instead of resetting; signed interactions are limited per Discord
//! user and per guild, after verification, not per address.

use crate::discord::{command, key, send};
use crate::support::{client_for, Service};
use ed25519_dalek::Signer;
use serde_json::{json, Value};
use std::sync::Arc;

async fn discord_service(env: &[(&str, &str)]) -> Service {
    let public = hex::encode(key().verifying_key().to_bytes());
    let mut all = vec![
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        // Answers are not followed here; nothing listens at this address.
        ("SPARKLE_DISCORD__API_BASE", "http://127.0.0.1:9"),
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
        ("SPARKLE_DISCORD__MAX_JOBS_PER_USER", "0"),
    ];
    all.extend_from_slice(env);
    Service::start(&all).await
}

fn prompt() -> Value {
    json!([{"name": "prompt", "type": 3, "value": "a corgi"}])
}

fn user(id: usize) -> Value {
    json!({"guild": true, "user": {"id": format!("{}", 1000 + id), "username": "u"}})
}

/// One signed command on its own client (its own connection), kept open by the caller.
async fn send_on(client: &reqwest::Client, svc: &Service, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string();
    let sig = hex::encode(key().sign(format!("{ts}{body}").as_bytes()).to_bytes());
    let r = client
        .post(format!("{}/discord/interactions", svc.url))
        .header("content-type", "application/json")
        .header("x-signature-ed25519", sig)
        .header("x-signature-timestamp", ts)
        .body(body)
        .send()
        .await
        .expect("an HTTP answer, not a reset");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_commands_past_the_per_address_connection_cap_are_all_answered() {
    let svc = Arc::new(discord_service(&[("SPARKLE_GATEWAY__MAX_CONNECTIONS_PER_IP", "4")]).await);
    let (total, connections) = (96usize, 16usize);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            // Each task is one client holding its own connection open between commands.
            let client = client_for(&svc.certificate());
            let mut answers = Vec::new();
            for i in (c..total).step_by(connections) {
                let body = command(&format!("7{i:06}"), user(i), prompt());
                answers.push(send_on(&client, &svc, &body).await);
            }
            (client, answers)
        }));
    }
    let mut held = Vec::new();
    for task in tasks {
        let (client, answers) = task.await.expect("task");
        for (status, reply) in answers {
            assert_eq!((status, reply["type"].as_u64()), (200, Some(4)), "{reply}");
        }
        held.push(client);
    }
    assert_eq!(svc.job_count(), total as i64, "every command queued a job");

    // Anything else past the cap is answered, not reset: 503 with Retry-After.
    let other = client_for(&svc.certificate());
    let r = other
        .get(format!("{}/healthz", svc.url))
        .send()
        .await
        .expect("an HTTP answer, not a reset");
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_connections");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verified_commands_spend_no_address_rate_and_forged_ones_do() {
    let svc = discord_service(&[
        ("SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC", "1"),
        ("SPARKLE_GATEWAY__PER_IP_BURST", "2"),
    ])
    .await;
    for i in 0..20 {
        let (status, reply) = send(&svc, &command(&format!("8{i:06}"), user(i), prompt())).await;
        assert_eq!((status, reply["type"].as_u64()), (200, Some(4)), "{reply}");
    }
    let forged = command("8999999", user(0), prompt()).to_string();
    let ts = "1700000000";
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let (status, _) = svc
            .post_signed(
                "/discord/interactions",
                &forged,
                Some(&"00".repeat(64)),
                Some(ts),
            )
            .await;
        statuses.push(status);
    }
    // The 20 verified commands left the burst of 2 as it was; forged ones drain it.
    assert_eq!(statuses[0], 401, "{statuses:?}");
    assert_eq!(
        statuses[3], 429,
        "failed signatures spend the address's rate: {statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_discord_user_is_limited_on_their_own() {
    let svc = discord_service(&[
        ("SPARKLE_DISCORD__PER_USER_REQUESTS_PER_SEC", "1"),
        ("SPARKLE_DISCORD__PER_USER_BURST", "5"),
    ])
    .await;
    let mut queued = 0;
    let mut told = 0;
    for i in 0..8 {
        let (status, reply) = send(&svc, &command(&format!("6{i:06}"), user(1), prompt())).await;
        assert_eq!(status, 200, "{reply}");
        let content = reply["data"]["content"].as_str().unwrap_or_default();
        if content.contains("try again") {
            assert_eq!(reply["data"]["flags"], 64, "told ephemerally: {reply}");
            told += 1;
        } else {
            queued += 1;
        }
    }
    // The burst of 5, and at most one token refilled while the 8 were sent.
    assert!(
        (5..=6).contains(&queued) && told == 8 - queued,
        "{queued} queued, {told} told"
    );
    // Another user is not held back by the first.
    let (_, reply) = send(&svc, &command("6999999", user(2), prompt())).await;
    assert!(!reply["data"]["content"]
        .as_str()
        .unwrap_or_default()
        .contains("try again"));
    assert_eq!(svc.job_count(), queued as i64 + 1);
}
