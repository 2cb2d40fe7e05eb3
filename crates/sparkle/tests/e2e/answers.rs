//! Every answer leaves from one outbox, written with the job: a Discord command survives a
//! crash right after its acknowledgement, two gateways deliver each message once, webhooks
//! arrive signed (checked with the Standard Webhooks reference library, not Sparkle's code)
//! through failures, and webhook URLs cannot point inside the network.

use crate::discord::{command, job_id, send, start_with, FakeDiscord};
use crate::support::{kill, Service};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a webhook receiver answers one request.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Status(u16),
    /// Answers 200, but only after this long (past the sender's timeout).
    Slow(Duration),
}

/// One request a receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Received {
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
    answered: u16,
}

#[derive(Default)]
struct Receiver {
    script: Mutex<VecDeque<Answer>>,
    received: Mutex<Vec<Received>>,
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> Response {
    let answer = rx
        .script
        .lock()
        .expect("script")
        .pop_front()
        .unwrap_or(Answer::Status(200));
    let answered = match answer {
        Answer::Status(code) => code,
        // The sender gave up long before this answer; record it as the timeout it was.
        Answer::Slow(_) => 0,
    };
    rx.received.lock().expect("received").push(Received {
        headers: headers
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: body.to_vec(),
        answered,
    });
    if let Answer::Slow(wait) = answer {
        tokio::time::sleep(wait).await;
    }
    StatusCode::from_u16(answered.max(200))
        .unwrap_or(StatusCode::OK)
        .into_response()
}

impl Receiver {
    async fn serve(self: &Arc<Self>) -> String {
        let app = Router::new()
            .route("/hooks/sparkle", axum::routing::post(receive))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hooks/sparkle")
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().expect("received").clone()
    }

    async fn wait_for(&self, what: &str, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.received();
            if done(&got) {
                return got;
            }
            assert!(Instant::now() < deadline, "{what}: got {got:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Verifies each request with the `standardwebhooks` reference library under `secret`:
/// for each, true if it verifies.
fn verified_by_reference(secret: &str, requests: &[Received]) -> Vec<bool> {
    let python = std::env::var("OPENAI_CLIENT_PYTHON").expect(
        "OPENAI_CLIENT_PYTHON must name a python with `standardwebhooks` installed (scripts/test.sh makes one)",
    );
    let cases: Vec<Value> = requests
        .iter()
        .map(|r| {
            json!({
                "headers": r.headers,
                "body": String::from_utf8_lossy(&r.body),
            })
        })
        .collect();
    let script = r#"
import json, sys
from standardwebhooks.webhooks import Webhook
secret, cases = sys.argv[1], json.loads(sys.stdin.read())
out = []
for case in cases:
    try:
        Webhook(secret).verify(case["body"], case["headers"])
        out.append(True)
    except Exception:
        out.append(False)
print(json.dumps(out))
"#;
    let mut child = Command::new(python)
        .args(["-c", script, secret])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python with standardwebhooks");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(Value::Array(cases).to_string().as_bytes())
        .expect("cases");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "the reference verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a list of verdicts")
}

/// A key made with `sparkle key create`: (API key, webhook signing secret).
fn key_with_secret(svc: &Service, name: &str) -> (String, String) {
    let (key, stderr) = svc.key_command(&["create", "--name", name]);
    let secret = stderr
        .split_whitespace()
        .find(|w| w.starts_with("whsec_"))
        .expect("key create shows the webhook signing secret once")
        .to_string();
    (key, secret)
}

const WEBHOOKS_TO_LOOPBACK: [(&str, &str); 3] = [
    ("SPARKLE_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES", "true"),
    ("SPARKLE_WEBHOOKS__TIMEOUT_SECS", "1"),
    ("SPARKLE_WEBHOOKS__RETRY_DELAYS_SECS", "[1, 1, 1, 1]"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_through_a_500_and_a_timeout_arrives_once_signed() {
    let receiver = Arc::new(Receiver::default());
    receiver.script.lock().expect("script").extend([
        Answer::Status(500),
        Answer::Slow(Duration::from_secs(3)),
        Answer::Status(200),
    ]);
    let url = receiver.serve().await;
    let svc = Service::start(&WEBHOOKS_TO_LOOPBACK).await;
    let (key, secret) = key_with_secret(&svc, "hooks");
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a lighthouse", "size": "64x64", "steps": 2, "webhook_url": url}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(job["deliveries"][0]["channel"], "webhook");
    assert_eq!(job["deliveries"][0]["status"], "pending");

    let got = receiver
        .wait_for("a 200 after the 500 and the timeout", |r| {
            r.iter().any(|r| r.answered == 200)
        })
        .await;
    assert_eq!(
        got.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [500, 0, 200],
        "retried after the 500 and the timeout, then delivered"
    );
    let ids: Vec<&String> = got.iter().map(|r| &r.headers["webhook-id"]).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one message id for every attempt at one answer: {ids:?}"
    );
    assert_eq!(
        verified_by_reference(&secret, &got),
        [true, true, true],
        "every attempt verifies with the reference library"
    );
    assert_eq!(
        verified_by_reference("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", &got[2..]),
        [false],
        "and not under another secret"
    );
    let event: Value = serde_json::from_slice(&got[2].body).expect("json");
    assert_eq!(event["type"], "job.succeeded");
    assert_eq!(event["data"]["id"], id.as_str());
    assert_eq!(event["data"]["status"], "succeeded");
    assert_eq!(event["data"]["images"].as_array().map(Vec::len), Some(1));

    let view = svc
        .wait_for(&id, &key, |j| j["deliveries"][0]["status"] == "delivered")
        .await;
    assert_eq!(
        view["deliveries"][0]["attempts"], 2,
        "the failed attempts stay counted: {view}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(receiver.received().len(), 3, "nothing more once delivered");
    let metrics = svc.metrics().await;
    assert!(
        metrics.contains("sparkle_deliveries_total{channel=\"webhook\",outcome=\"retried\"} 2"),
        "{metrics}"
    );

    // After a rotation the old and the new secret both sign, for the grace period.
    let (new_secret, _) = svc.key_command(&["rotate-webhook-secret", &key_id(&svc, "hooks")]);
    assert!(new_secret.starts_with("whsec_") && new_secret != secret);
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a second lighthouse", "size": "64x64", "steps": 2, "webhook_url": url}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let got = receiver
        .wait_for("the second job's webhook", |r| r.len() == 4)
        .await;
    let last = &got[3..];
    assert_eq!(last[0].headers["webhook-signature"].split(' ').count(), 2);
    assert_eq!(verified_by_reference(&new_secret, last), [true]);
    assert_eq!(verified_by_reference(&secret, last), [true]);
}

/// The id of the key named `name`, from `sparkle key list`.
fn key_id(svc: &Service, name: &str) -> String {
    let (list, _) = svc.key_command(&["list"]);
    list.lines()
        .find(|l| l.split('\t').nth(1) == Some(name))
        .and_then(|l| l.split('\t').next())
        .expect("the key is listed")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_into_the_private_network_are_refused_with_the_field_named() {
    let svc = Service::start(&[("SPARKLE_SCALER__MAX_WORKERS", "0")]).await;
    let (key, _) = key_with_secret(&svc, "hooks");
    let before = svc.job_count();
    for url in [
        "http://127.0.0.1:9/hook",
        "https://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://10.1.2.3/hook",
        "http://localhost:8080/hook",
        "ftp://example.com/hook",
        "https://user:pass@example.com/hook",
        "not a url",
    ] {
        let (status, body) = svc
            .post_json(
                "/v1/jobs",
                &json!({"prompt": "a corgi", "size": "64x64", "steps": 2, "webhook_url": url}),
                Some(&key),
            )
            .await;
        assert_eq!(status, 400, "{url}: {body}");
        assert_eq!(
            body["error"]["code"], "invalid_webhook_url",
            "{url}: {body}"
        );
        assert_eq!(body["error"]["param"], "webhook_url", "{url}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("webhook_url")),
            "{url}: {body}"
        );
    }
    // A key without a signing secret (the admin key made at first start) is told how to get one.
    let (status, body) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a corgi", "size": "64x64", "steps": 2, "webhook_url": "https://example.com/hook"}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "webhook_secret_missing");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("rotate-webhook-secret")));
    let (status, body) = svc
        .post_json(
            "/v1/images/generations",
            &json!({"prompt": "a corgi", "size": "64x64", "webhook_url": "https://example.com/hook"}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "webhook_url");
    assert_eq!(svc.job_count(), before, "nothing was queued");
}

/// Multipart (final) edits of each interaction's original message that Discord accepted.
pub(crate) fn final_edits(fake: &FakeDiscord) -> BTreeMap<String, usize> {
    let mut by_path = BTreeMap::new();
    for edit in fake.edits() {
        if edit.multipart && edit.status == 200 {
            *by_path.entry(edit.path).or_default() += 1;
        }
    }
    by_path
}

pub(crate) async fn wait_for_finals(fake: &FakeDiscord, n: usize) -> BTreeMap<String, usize> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let finals = final_edits(fake);
        if finals.len() >= n || Instant::now() > deadline {
            return finals;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) fn sparkle_command(id: &str, prompt: &str) -> Value {
    let user = json!({"guild": true, "user": {"id": format!("u{id}"), "username": "ada"}});
    command(
        id,
        user,
        json!([
            {"name": "prompt", "type": 3, "value": prompt},
            {"name": "size", "type": 3, "value": "64x64"},
            {"name": "steps", "type": 4, "value": 2},
        ]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_acknowledged_then_killed_still_gets_its_image_exactly_once() {
    let fake = Arc::new(FakeDiscord::default());
    let mut svc = start_with(&fake).await;
    let (status, ack) = send(&svc, &sparkle_command("7001", "a lighthouse at dusk")).await;
    assert_eq!(status, 200);
    let id = job_id(&ack);
    assert!(!id.is_empty(), "{ack}");
    // Killed the moment the acknowledgement is out: nothing gets a chance to flush.
    kill(svc.pid(), "KILL");
    svc.wait_exit();
    for pid in svc.worker_pids() {
        kill(pid, "KILL");
    }
    let public = hex::encode(crate::discord::key().verifying_key().to_bytes());
    let api = fake.api_base();
    svc.restart(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
    ])
    .await;
    let finals = wait_for_finals(&fake, 1).await;
    assert_eq!(
        finals,
        BTreeMap::from([("/webhooks/900/tok-7001/messages/@original".to_string(), 1)]),
        "the image reached Discord after the restart"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(final_edits(&fake).len(), 1, "exactly once");
    assert_eq!(
        final_edits(&fake).values().copied().collect::<Vec<_>>(),
        [1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_one_data_directory_deliver_each_discord_message_once() {
    let fake = Arc::new(FakeDiscord::default());
    let svc = start_with(&fake).await;
    let public = hex::encode(crate::discord::key().verifying_key().to_bytes());
    let api = fake.api_base();
    let second = svc.start_beside(
        "gateway",
        &[
            ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
            ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ],
    );
    assert_ne!(second.url, svc.url);
    let commands = 6;
    for i in 0..commands {
        let (status, ack) = send(&svc, &sparkle_command(&format!("80{i:02}"), "two doors")).await;
        assert_eq!(status, 200, "{ack}");
        assert!(!job_id(&ack).is_empty(), "{ack}");
    }
    let finals = wait_for_finals(&fake, commands).await;
    // Both gateways keep working the outbox a while longer: nothing may go out twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let finals_later = final_edits(&fake);
    assert_eq!(finals, finals_later);
    assert_eq!(finals.len(), commands, "{finals:?}");
    assert!(
        finals.values().all(|&n| n == 1),
        "each message delivered once: {finals:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_per_key_and_end_with_the_job() {
    let svc = Service::start(&[
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
        ("SPARKLE_GATEWAY__MAX_EVENT_STREAMS_PER_KEY", "2"),
    ])
    .await;
    let key = svc.create_key("streams").await;
    let (_, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a queue", "size": "64x64", "steps": 2}),
            Some(&key),
        )
        .await;
    let id = job["id"].as_str().expect("id").to_string();
    let open = || async {
        svc.client()
            .get(format!("{}/v1/jobs/{id}/events", svc.url))
            .bearer_auth(&key)
            .send()
            .await
            .expect("events")
    };
    let first = open().await;
    let second = open().await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await;
    assert_eq!(third.status(), 429);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.expect("json");
    assert_eq!(body["error"]["code"], "too_many_streams");
    drop(first);
    // The closed stream's place comes back once the server notices the connection is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    let again = loop {
        let r = open().await;
        if r.status() == 200 || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(again.status(), 200);
    drop(again);
    drop(second);
    // A cancelled job's stream says so and ends.
    let (status, _) = svc.delete(&format!("/v1/jobs/{id}"), &key).await;
    assert_eq!(status, 200);
    let events = svc.events(&id, &key).await;
    let (name, last) = events.last().expect("an event");
    assert_eq!(
        (name.as_str(), &last["status"]),
        ("done", &json!("cancelled"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_commands_from_one_user_cannot_slip_past_their_limit() {
    let fake = Arc::new(FakeDiscord::default());
    let public = hex::encode(crate::discord::key().verifying_key().to_bytes());
    let api = fake.serve().await;
    let svc = Service::start(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_DISCORD__MAX_JOBS_PER_USER", "3"),
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
    ])
    .await;
    let user = json!({"guild": true, "user": {"id": "4242", "username": "eager"}});
    let sends = (0..8).map(|i| {
        let body = command(
            &format!("91{i:02}"),
            user.clone(),
            json!([{"name": "prompt", "type": 3, "value": format!("corgi {i}")}]),
        );
        let svc = &svc;
        async move { send(svc, &body).await }
    });
    let answers = futures::future::join_all(sends).await;
    let accepted = answers
        .iter()
        .filter(|(status, ack)| *status == 200 && !job_id(ack).is_empty())
        .count();
    let refused: Vec<&Value> = answers
        .iter()
        .map(|(_, ack)| ack)
        .filter(|ack| job_id(ack).is_empty())
        .collect();
    assert_eq!(
        accepted, 3,
        "8 parallel commands against a limit of 3: {answers:?}"
    );
    assert_eq!(refused.len(), 5);
    for ack in refused {
        assert_eq!(ack["data"]["flags"], 64, "refusals are ephemeral: {ack}");
        assert!(ack["data"]["content"]
            .as_str()
            .is_some_and(|c| c.contains("the limit is 3")));
    }
    assert_eq!(svc.job_count(), 3);
}
