//! `/discord/interactions` with requests signed by a real Ed25519 key, the way Discord sends
//! them: PING, every bad signature variant, guild and DM commands, duplicates, bad options.

use crate::support::{kill, Service};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::patch;
use axum::Router;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A scripted answer: status, body, extra headers.
type Answer = (u16, String, Vec<(&'static str, String)>);

/// A stand-in for Discord's REST API on loopback: it records every edit of an original
/// response and answers image uploads from a script (then 200).
#[derive(Default)]
pub(crate) struct FakeDiscord {
    edits: Mutex<Vec<Edit>>,
    upload_script: Mutex<VecDeque<Answer>>,
    /// Command registrations: (path, Authorization header, body).
    registrations: Mutex<Vec<(String, String, Value)>>,
    /// Channel messages: (path, Authorization header, multipart body).
    pub(crate) channel_posts: Mutex<Vec<(String, String, Vec<u8>)>>,
    /// Files it serves at `/files/{name}`, as Discord's CDN serves attachments.
    pub(crate) files: Mutex<std::collections::HashMap<String, Vec<u8>>>,
    /// Where it serves, once it does.
    base: Mutex<Option<String>>,
}

async fn attached_file(State(fake): State<Arc<FakeDiscord>>, Path(name): Path<String>) -> Response {
    match fake.files.lock().expect("files").get(&name) {
        Some(bytes) => (StatusCode::OK, bytes.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn channel_message(
    State(fake): State<Arc<FakeDiscord>>,
    Path(channel): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let path = format!("/channels/{channel}/messages");
    fake.channel_posts
        .lock()
        .expect("posts")
        .push((path, auth, body.to_vec()));
    (StatusCode::OK, "{}").into_response()
}

#[derive(Debug, Clone)]
pub(crate) struct Edit {
    pub(crate) path: String,
    pub(crate) multipart: bool,
    pub(crate) body: Vec<u8>,
    pub(crate) status: u16,
}

async fn edit_original(
    State(fake): State<Arc<FakeDiscord>>,
    Path((app, token)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let multipart = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let scripted = if multipart {
        fake.upload_script.lock().expect("script").pop_front()
    } else {
        None
    };
    let (status, reply, extra) = scripted.unwrap_or((200, "{}".to_string(), Vec::new()));
    fake.edits.lock().expect("edits").push(Edit {
        path: format!("/webhooks/{app}/{token}/messages/@original"),
        multipart,
        body: body.to_vec(),
        status,
    });
    let mut response = (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        reply,
    )
        .into_response();
    for (name, value) in extra {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

async fn register_command(
    State(fake): State<Arc<FakeDiscord>>,
    Path((app, guild)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let json = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let path = format!("/applications/{app}/guilds/{guild}/commands");
    fake.registrations
        .lock()
        .expect("registrations")
        .push((path, auth, json));
    (StatusCode::CREATED, "{}").into_response()
}

impl FakeDiscord {
    pub(crate) async fn serve(self: &Arc<Self>) -> String {
        let app = Router::new()
            .route(
                "/api/v10/webhooks/{app}/{token}/messages/@original",
                patch(edit_original),
            )
            .route(
                "/api/v10/applications/{app}/guilds/{guild}/commands",
                axum::routing::post(register_command),
            )
            .route(
                "/api/v10/channels/{channel}/messages",
                axum::routing::post(channel_message),
            )
            .route("/files/{name}", axum::routing::get(attached_file))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let base = format!("http://{addr}/api/v10");
        *self.base.lock().expect("base") = Some(base.clone());
        base
    }

    /// The API base it serves at (after `serve`).
    pub(crate) fn api_base(&self) -> String {
        self.base
            .lock()
            .expect("base")
            .clone()
            .expect("the fake serves")
    }

    pub(crate) fn edits(&self) -> Vec<Edit> {
        self.edits.lock().expect("edits").clone()
    }
}

pub(crate) fn key() -> SigningKey {
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

/// A service whose Discord API is a fake on loopback (never the real one).
pub(crate) async fn start_with(fake: &Arc<FakeDiscord>) -> Service {
    let public = hex::encode(key().verifying_key().to_bytes());
    let api = fake.serve().await;
    Service::start(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
    ])
    .await
}

async fn start() -> Service {
    start_with(&Arc::new(FakeDiscord::default())).await
}

pub(crate) async fn send(svc: &Service, body: &Value) -> (u16, Value) {
    let body = body.to_string();
    let ts = now().to_string();
    let sig = sign(&key(), &ts, &body);
    svc.post_signed("/discord/interactions", &body, Some(&sig), Some(&ts))
        .await
}

pub(crate) fn command(id: &str, user: Value, options: Value) -> Value {
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

pub(crate) fn job_id(response: &Value) -> String {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_reaches_discord_once_through_a_429_and_a_500() {
    let fake = Arc::new(FakeDiscord::default());
    fake.upload_script.lock().expect("script").extend([
        (
            429,
            json!({"message": "You are being rate limited.", "retry_after": 0.3, "global": false})
                .to_string(),
            vec![("retry-after", "1".to_string())],
        ),
        (500, "{}".to_string(), Vec::new()),
    ]);
    let svc = start_with(&fake).await;
    let user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a lighthouse"},
        {"name": "size", "type": 3, "value": "64x64"},
        {"name": "steps", "type": 4, "value": 30},
        {"name": "seed", "type": 4, "value": 5},
    ]);
    let (_, ack) = send(&svc, &command("3001", user, options)).await;
    let id = job_id(&ack);
    svc.wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;

    let deadline = Instant::now() + Duration::from_secs(30);
    let uploads = loop {
        let uploads: Vec<Edit> = fake.edits().into_iter().filter(|e| e.multipart).collect();
        if uploads.iter().any(|e| e.status == 200) || Instant::now() > deadline {
            break uploads;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let statuses: Vec<u16> = uploads.iter().map(|e| e.status).collect();
    assert_eq!(
        statuses,
        [429, 500, 200],
        "retried after the 429 and the 500, then delivered once"
    );
    let last = &uploads[2];
    assert_eq!(last.path, "/webhooks/900/tok-3001/messages/@original");
    let body = String::from_utf8_lossy(&last.body);
    assert!(
        body.contains("name=\"payload_json\"") && body.contains("name=\"files[0]\""),
        "multipart parts"
    );
    assert!(
        body.contains("Seed 5") && body.contains("a lighthouse"),
        "the message carries the parameters"
    );
    assert!(
        last.body.windows(8).any(|w| w == b"\x89PNG\r\n\x1a\n"),
        "the PNG is attached"
    );

    // Nothing more is sent once delivered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(fake.edits().iter().filter(|e| e.multipart).count(), 3);
    let edits = fake.edits();
    assert!(edits
        .iter()
        .all(|e| e.path.ends_with("/messages/@original")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_sends_the_command_with_the_bot_token_from_a_private_file() {
    use std::os::unix::fs::PermissionsExt;
    let fake = Arc::new(FakeDiscord::default());
    let api = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("bot-token");
    std::fs::write(&token, "bot-secret\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = dir.path().join("sparkle.toml");
    std::fs::write(
        &config,
        format!(
            "[discord]\napplication_id = \"900\"\nbot_token_file = {:?}\napi_base = {api:?}\n",
            token.display().to_string()
        ),
    )
    .expect("config");
    let register_with = |env: &[(&str, &str)]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_sparkle"))
            .args(["discord", "register", "--guild", "55", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--model")
            .arg(crate::support::tiny_model())
            .envs(env.iter().copied())
            .output()
            .expect("run")
    };
    let register = || register_with(&[]);
    let refused = register();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("chmod 600") && !err.contains("bot-secret"),
        "{err}"
    );
    assert!(fake.registrations.lock().expect("r").is_empty());

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let done = register();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let registrations = fake.registrations.lock().expect("r").clone();
    assert_eq!(registrations.len(), 1);
    let (path, auth, body) = &registrations[0];
    assert_eq!(
        (path.as_str(), auth.as_str()),
        ("/applications/900/guilds/55/commands", "Bot bot-secret")
    );
    assert_eq!(body["name"], "sparkle");
    assert_eq!(body["options"][0]["name"], "prompt");
    assert_eq!(body["options"][0]["required"], true);

    // An application id from the environment, a snowflake as Discord shows it.
    let done = register_with(&[("SPARKLE_DISCORD__APPLICATION_ID", "123456789012345678")]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let registrations = fake.registrations.lock().expect("r").clone();
    assert_eq!(
        registrations.get(1).map(|r| r.0.as_str()),
        Some("/applications/123456789012345678/guilds/55/commands")
    );
}

/// A job that outlives its interaction token: the user is told while the message can still be
/// edited, and the image arrives in the channel through the bot token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_outlives_its_token_is_posted_in_the_channel() {
    use std::os::unix::fs::PermissionsExt;
    let fake = Arc::new(FakeDiscord::default());
    let api = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("bot-token");
    std::fs::write(&token, "bot-secret").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let public = hex::encode(key().verifying_key().to_bytes());
    let token_path = token.display().to_string();
    let discord = [
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_DISCORD__BOT_TOKEN_FILE", token_path.as_str()),
        ("SPARKLE_DISCORD__TOKEN_LIFETIME_SECS", "6"),
    ];
    // No worker at first: the job waits in the queue past its token, however fast the
    // machine, and the user is told while the message can still be edited.
    let mut waiting = discord.to_vec();
    waiting.push(("SPARKLE_SCALER__MAX_WORKERS", "0"));
    let mut svc = Service::start(&waiting).await;
    let user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a slow sunset"},
        {"name": "size", "type": 3, "value": "64x64"},
        {"name": "steps", "type": 4, "value": 4},
        {"name": "seed", "type": 4, "value": 9},
    ]);
    let (_, ack) = send(&svc, &command("4001", user, options)).await;
    let acknowledged = Instant::now();
    let id = job_id(&ack);
    let told = |fake: &FakeDiscord| {
        fake.edits().iter().any(|e| {
            !e.multipart && String::from_utf8_lossy(&e.body).contains("posted in this channel")
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !told(&fake) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the token's life, a worker may run it.
    tokio::time::sleep(
        (acknowledged + Duration::from_secs(7)).saturating_duration_since(Instant::now()),
    )
    .await;
    kill(svc.pid(), "TERM");
    svc.wait_exit();
    svc.restart(&discord).await;
    let job = svc
        .wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    assert!(
        job["finished_at"].as_i64() > job["created_at"].as_i64().map(|t| t + 6),
        "the job outlived the token: {job}"
    );

    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.channel_posts.lock().expect("posts").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let notices: Vec<String> = fake
        .edits()
        .iter()
        .filter(|e| !e.multipart)
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect();
    assert!(
        notices.iter().any(|n| n.contains("posted in this channel")),
        "{notices:?}"
    );
    assert!(
        fake.edits().iter().all(|e| !e.multipart),
        "no upload through the dead token"
    );
    let posts = fake.channel_posts.lock().expect("posts").clone();
    assert_eq!(posts.len(), 1, "one channel message");
    let (path, auth, body) = &posts[0];
    assert_eq!(
        (path.as_str(), auth.as_str()),
        ("/channels/600/messages", "Bot bot-secret")
    );
    assert!(
        body.windows(8).any(|w| w == b"\x89PNG\r\n\x1a\n"),
        "the PNG is attached"
    );
}

/// Acknowledgement latency under a load of signed commands (a benchmark, not a check):
/// `cargo test -p sparkle --test e2e -- --ignored --nocapture ack_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand, see the doc comment"]
async fn ack_latency_under_load() {
    let fake = Arc::new(FakeDiscord::default());
    let public = hex::encode(key().verifying_key().to_bytes());
    let api = fake.serve().await;
    // No workers: only the acknowledgement path is measured, with the queue growing.
    let svc = Arc::new(
        Service::start(&[
            ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
            ("SPARKLE_DISCORD__API_BASE", api.as_str()),
            ("SPARKLE_SCALER__MAX_WORKERS", "0"),
            ("SPARKLE_DISCORD__MAX_JOBS_PER_USER", "0"),
            // Discord sends every interaction from its own few addresses: the per-address
            // rate a busy bot's gateway needs is off here.
            ("SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC", "0"),
        ])
        .await,
    );
    let (total, concurrency) = (1000usize, 16usize);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (worker..total).step_by(concurrency) {
                let user =
                    json!({"guild": true, "user": {"id": format!("{}", i % 50), "username": "u"}});
                let body = command(
                    &format!("9{i:06}"),
                    user,
                    json!([{"name": "prompt", "type": 3, "value": "a corgi"}]),
                );
                let t = Instant::now();
                let (status, reply) = send(&svc, &body).await;
                latencies.push(t.elapsed());
                assert_eq!((status, reply["type"].as_u64()), (200, Some(4)), "{reply}");
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    eprintln!(
        "{total} signed /sparkle commands, {concurrency} at a time, loopback HTTPS: p50 {:.1?}, p99 {:.1?}, max {:.1?}; {:.0} commands/s",
        pct(0.50),
        pct(0.99),
        all[all.len() - 1],
        total as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(svc.job_count(), total as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_policy_denied_words_and_per_user_limits_refuse_ephemerally() {
    let fake = Arc::new(FakeDiscord::default());
    let public = hex::encode(key().verifying_key().to_bytes());
    let api = fake.serve().await;
    let svc = Service::start(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_DISCORD__ALLOWED_CHANNELS", r#"["600"]"#),
        ("SPARKLE_DISCORD__DENIED_WORDS", r#"["gore", "bad thing"]"#),
        ("SPARKLE_DISCORD__MAX_JOBS_PER_USER", "2"),
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
    ])
    .await;
    let user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let prompt = |p: &str| json!([{"name": "prompt", "type": 3, "value": p}]);
    let refused = |reply: &Value, mention: &str| {
        assert_eq!(reply["data"]["flags"], 64, "ephemeral: {reply}");
        let content = reply["data"]["content"].as_str().unwrap_or_default();
        assert!(
            content.contains(mention),
            "{content} should mention {mention}"
        );
    };

    let mut elsewhere = command("5001", user.clone(), prompt("a corgi"));
    elsewhere["channel_id"] = json!("601");
    refused(
        &send(&svc, &elsewhere).await.1,
        "not enabled in this channel",
    );
    refused(
        &send(
            &svc,
            &command("5002", user.clone(), prompt("Some GORE, please")),
        )
        .await
        .1,
        "not allowed",
    );
    refused(
        &send(
            &svc,
            &command("5003", user.clone(), prompt("a bad thing happens")),
        )
        .await
        .1,
        "not allowed",
    );
    assert_eq!(svc.job_count(), 0);

    for (i, id) in ["5004", "5005"].iter().enumerate() {
        let (_, ok) = send(
            &svc,
            &command(id, user.clone(), prompt(&format!("corgi {i}"))),
        )
        .await;
        assert!(ok["data"]["flags"].is_null(), "{ok}");
    }
    refused(
        &send(&svc, &command("5006", user.clone(), prompt("corgi 3")))
            .await
            .1,
        "limit is 2",
    );
    let other = json!({"guild": true, "user": {"id": "7", "username": "eve"}});
    let (_, ok) = send(&svc, &command("5007", other, prompt("a cat"))).await;
    assert!(
        ok["data"]["flags"].is_null(),
        "another user is not limited by ada's jobs: {ok}"
    );
    assert_eq!(svc.job_count(), 3);
}

/// The `payload_json` part of a multipart message, or the body of a JSON edit.
fn payload_of(edit: &Edit) -> Value {
    if !edit.multipart {
        return serde_json::from_slice(&edit.body).unwrap_or(Value::Null);
    }
    let body = String::from_utf8_lossy(&edit.body);
    let part = body
        .split("name=\"payload_json\"")
        .nth(1)
        .and_then(|rest| rest.split_once("\r\n\r\n"))
        .and_then(|(_, rest)| rest.split("\r\n--").next())
        .unwrap_or_default();
    serde_json::from_str(part).unwrap_or(Value::Null)
}

/// The `custom_id`s of a message's buttons, by label.
pub(crate) fn buttons(payload: &Value) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for row in payload["components"].as_array().into_iter().flatten() {
        for button in row["components"].as_array().into_iter().flatten() {
            found.push((
                button["label"].as_str().unwrap_or_default().to_string(),
                button["custom_id"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    found
}

/// A click on a button, the way Discord sends it (type 3, the button's `custom_id`).
pub(crate) fn click(id: &str, user: &Value, custom_id: &str) -> Value {
    json!({
        "id": id, "application_id": "900", "type": 3, "token": format!("tok-{id}"), "version": 1,
        "channel_id": "600", "guild_id": "500",
        "member": {"user": user["user"].clone(), "roles": []},
        "message": {"id": "1", "channel_id": "600", "content": "", "components": []},
        "data": {"custom_id": custom_id, "component_type": 2},
    })
}

/// Waits for the message Discord got under `token` that satisfies `done`.
async fn wait_for_edit(fake: &FakeDiscord, token: &str, done: impl Fn(&Edit) -> bool) -> Edit {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = fake
            .edits()
            .into_iter()
            .find(|e| e.path.contains(&format!("/{token}/")) && e.status == 200 && done(e));
        if let Some(edit) = found {
            return edit;
        }
        assert!(Instant::now() < deadline, "no such message for {token}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reroll_and_variations_buttons_queue_new_jobs_and_forged_ones_do_nothing() {
    let fake = Arc::new(FakeDiscord::default());
    let svc = start_with(&fake).await;
    let ada = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let eve = json!({"guild": true, "user": {"id": "7", "username": "eve"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a red kite"},
        {"name": "negative_prompt", "type": 3, "value": "blurry"},
        {"name": "size", "type": 3, "value": "64x64"},
        {"name": "steps", "type": 4, "value": 3},
        {"name": "seed", "type": 4, "value": 5},
    ]);
    let (_, ack) = send(&svc, &command("6001", ada.clone(), options)).await;
    let first = job_id(&ack);
    let result = wait_for_edit(&fake, "tok-6001", |e| e.multipart).await;
    let labels = buttons(&payload_of(&result));
    assert_eq!(
        labels.iter().map(|(l, _)| l.as_str()).collect::<Vec<_>>(),
        ["Re-roll", "Variations"],
        "the result carries its buttons"
    );
    let (reroll, variations) = (labels[0].1.clone(), labels[1].1.clone());

    // Anyone who sees the result may re-roll it, as their own job.
    let (status, reply) = send(&svc, &click("6002", &eve, &reroll)).await;
    assert_eq!(status, 200);
    assert!(reply["data"]["flags"].is_null(), "{reply}");
    let again = job_id(&reply);
    assert!(!again.is_empty() && again != first, "{reply}");
    let (_, duplicate) = send(&svc, &click("6002", &eve, &reroll)).await;
    assert_eq!(job_id(&duplicate), again, "one click, one job");
    let original = svc
        .get_json(&format!("/v1/jobs/{first}"), &svc.admin_key)
        .await;
    let job = svc
        .wait_for(&again, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(job["request"]["n"], 1);
    assert_ne!(
        job["request"]["seed"], original["request"]["seed"],
        "a new seed"
    );
    for field in [
        "prompt",
        "negative_prompt",
        "size",
        "steps",
        "scheduler",
        "guidance_scale",
    ] {
        assert_eq!(job["request"][field], original["request"][field], "{field}");
    }
    let delivered = wait_for_edit(&fake, "tok-6002", |e| e.multipart).await;
    assert!(String::from_utf8_lossy(&delivered.body).contains("a red kite"));

    let (_, reply) = send(&svc, &click("6003", &ada, &variations)).await;
    let four = job_id(&reply);
    let job = svc
        .wait_for(&four, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(job["request"]["n"], 4);
    let delivered = wait_for_edit(&fake, "tok-6003", |e| e.multipart).await;
    let body = String::from_utf8_lossy(&delivered.body);
    assert!(
        (0..4).all(|i| body.contains(&format!("name=\"files[{i}]\""))),
        "four images in one message"
    );

    // Forged, altered and foreign ids change nothing.
    let jobs = svc.job_count();
    let (action, rest) = reroll.split_once(':').expect("tagged id");
    let altered_job = format!("{action}:{}", rest.replacen(&first[..4], "ffff", 1));
    let as_cancel = format!("c:{rest}");
    for (i, forged) in [altered_job.as_str(), as_cancel.as_str(), "r:x:AAAA", ""]
        .iter()
        .enumerate()
    {
        let (status, reply) = send(&svc, &click(&format!("61{i:02}"), &eve, forged)).await;
        assert_eq!(status, 200);
        assert_eq!(reply["data"]["flags"], 64, "ephemeral: {reply}");
        assert!(
            reply["data"]["content"]
                .as_str()
                .unwrap_or_default()
                .contains("not one Sparkle made"),
            "{reply}"
        );
    }
    assert_eq!(svc.job_count(), jobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cancel_button_cancels_for_the_person_who_asked_only() {
    let fake = Arc::new(FakeDiscord::default());
    let public = hex::encode(key().verifying_key().to_bytes());
    let api = fake.serve().await;
    let svc = Service::start(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
    ])
    .await;
    let ada = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let eve = json!({"guild": true, "user": {"id": "7", "username": "eve"}});
    let prompt = json!([{"name": "prompt", "type": 3, "value": "a slow snail"}]);
    let (_, ack) = send(&svc, &command("7001", ada.clone(), prompt)).await;
    let id = job_id(&ack);
    let progress = wait_for_edit(&fake, "tok-7001", |e| {
        buttons(&payload_of(e)).iter().any(|(l, _)| l == "Cancel")
    })
    .await;
    let cancel = buttons(&payload_of(&progress))[0].1.clone();

    let (_, reply) = send(&svc, &click("7002", &eve, &cancel)).await;
    assert_eq!(reply["data"]["flags"], 64, "{reply}");
    assert!(
        reply["data"]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("Only the person who asked"),
        "{reply}"
    );
    let job = svc
        .get_json(&format!("/v1/jobs/{id}"), &svc.admin_key)
        .await;
    assert_eq!(job["status"], "queued");

    let (_, reply) = send(&svc, &click("7003", &ada, &cancel)).await;
    assert_eq!(reply["data"]["content"], "Cancelled.", "{reply}");
    svc.wait_for(&id, &svc.admin_key, |j| j["status"] == "cancelled")
        .await;
    let last = wait_for_edit(&fake, "tok-7001", |e| {
        String::from_utf8_lossy(&e.body).contains("cancelled")
    })
    .await;
    assert_eq!(
        payload_of(&last)["components"],
        json!([]),
        "the Cancel button is gone"
    );
    let (_, reply) = send(&svc, &click("7004", &ada, &cancel)).await;
    assert!(
        reply["data"]["content"]
            .as_str()
            .unwrap_or_default()
            .contains("Too late"),
        "{reply}"
    );
}

/// The file part of a multipart body that starts with `magic`: its bytes, up to the boundary.
fn file_part<'a>(body: &'a [u8], magic: &[u8]) -> Option<&'a [u8]> {
    let start = body.windows(magic.len()).position(|w| w == magic)?;
    let rest = &body[start..];
    let end = rest.windows(4).position(|w| w == b"\r\n--")?;
    Some(&rest[..end])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_over_the_interactions_attachment_limit_are_reencoded_or_left_to_the_api() {
    let fake = Arc::new(FakeDiscord::default());
    let svc = start_with(&fake).await;
    let ada = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a red kite"},
        {"name": "size", "type": 3, "value": "64x64"},
        {"name": "steps", "type": 4, "value": 2},
        {"name": "seed", "type": 4, "value": 5},
    ]);
    // The tiny model's 64x64 PNG is about 12 KB of noise: 3000 bytes needs a JPEG.
    let mut asked = command("8001", ada.clone(), options.clone());
    asked["attachment_size_limit"] = json!(3000);
    let (_, ack) = send(&svc, &asked).await;
    let id = job_id(&ack);
    let result = wait_for_edit(&fake, "tok-8001", |e| e.multipart).await;
    let body = String::from_utf8_lossy(&result.body);
    assert!(body.contains("filename=\"sparkle-5.jpg\""), "{body}");
    assert!(body.contains("Content-Type: image/jpeg"), "{body}");
    let jpeg = file_part(&result.body, b"\xFF\xD8\xFF").expect("a JPEG is attached");
    assert!(
        jpeg.ends_with(b"\xFF\xD9") && jpeg.len() <= 3000,
        "{}",
        jpeg.len()
    );
    assert!(file_part(&result.body, b"\x89PNG").is_none(), "no PNG");
    let payload = payload_of(&result);
    assert_eq!(payload["attachments"][0]["filename"], "sparkle-5.jpg");
    let content = payload["content"].as_str().unwrap_or_default();
    assert!(content.contains("Seed 5"), "the parameters stay: {content}");
    assert!(content.contains("Re-encoded as JPEG"), "{content}");
    assert!(content.contains(&format!("`/v1/jobs/{id}`")), "{content}");
    // The stored image is still the PNG.
    let (status, png) = svc
        .get(&format!("/v1/jobs/{id}/images/0"), &svc.admin_key)
        .await;
    assert_eq!(status, 200);
    assert!(png.starts_with(b"\x89PNG") && png.len() > 3000);

    // Too small for any encoding: the text, and where to find the image.
    let mut tiny = command("8002", ada, options);
    tiny["attachment_size_limit"] = json!(200);
    let (_, ack) = send(&svc, &tiny).await;
    let id = job_id(&ack);
    let result = wait_for_edit(&fake, "tok-8002", |e| {
        String::from_utf8_lossy(&e.body).contains("available through the API")
    })
    .await;
    assert!(!result.multipart, "no attachment at all");
    let content = payload_of(&result)["content"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(content.contains("too large"), "{content}");
    assert!(
        content.contains(&format!(
            "1 image is available through the API at `/v1/jobs/{id}`"
        )),
        "{content}"
    );
    assert!(fake
        .edits()
        .iter()
        .all(|e| !(e.path.contains("/tok-8002/") && e.multipart)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_server_gets_its_own_policy_and_dms_the_global_one() {
    let fake = Arc::new(FakeDiscord::default());
    let public = hex::encode(key().verifying_key().to_bytes());
    let api = fake.serve().await;
    // A known button key, so the test can make the buttons Discord would show.
    let secrets = tempfile::tempdir().expect("tempdir");
    let key_file = secrets.path().join("button.key");
    let button_key = [7u8; 32];
    std::fs::write(&key_file, hex::encode(button_key)).expect("write key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let key_path = key_file.to_string_lossy().into_owned();
    let svc = Service::start(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_DISCORD__BUTTON_KEY_FILE", key_path.as_str()),
        ("SPARKLE_DISCORD__DENIED_WORDS", r#"["gore"]"#),
        ("SPARKLE_DISCORD__MAX_JOBS_PER_USER", "3"),
        // Server 500: stricter words, one job at a time.
        (
            "SPARKLE_DISCORD__GUILDS__500__DENIED_WORDS",
            r#"["gore", "dragon"]"#,
        ),
        ("SPARKLE_DISCORD__GUILDS__500__MAX_JOBS_PER_USER", "1"),
        // Server 501: any words, one channel; the global limit.
        ("SPARKLE_DISCORD__GUILDS__501__DENIED_WORDS", "[]"),
        (
            "SPARKLE_DISCORD__GUILDS__501__ALLOWED_CHANNELS",
            r#"["601"]"#,
        ),
        ("SPARKLE_SCALER__MAX_WORKERS", "0"),
    ])
    .await;
    let ada = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let eve = json!({"guild": true, "user": {"id": "7", "username": "eve"}});
    let prompt = |p: &str| json!([{"name": "prompt", "type": 3, "value": p}]);
    let in_server = |mut i: Value, guild: &str, channel: &str| {
        i["guild_id"] = json!(guild);
        i["channel_id"] = json!(channel);
        i
    };
    let content = |reply: &Value| {
        reply["data"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let refused = |reply: &Value, mention: &str| {
        assert_eq!(reply["data"]["flags"], 64, "ephemeral: {reply}");
        assert!(
            content(reply).contains(mention),
            "{reply} should mention {mention}"
        );
    };
    let accepted = |reply: &Value| {
        assert!(reply["data"]["flags"].is_null(), "{reply}");
        let id = job_id(reply);
        assert!(!id.is_empty(), "{reply}");
        id
    };

    // A word server 500 denies and server 501 allows.
    let (_, r) = send(&svc, &command("8101", ada.clone(), prompt("a red dragon"))).await;
    refused(&r, "not allowed");
    let (_, r) = send(
        &svc,
        &in_server(
            command("8102", ada.clone(), prompt("a red dragon")),
            "501",
            "601",
        ),
    )
    .await;
    let dragon = accepted(&r);
    let (_, r) = send(
        &svc,
        &in_server(
            command("8103", eve.clone(), prompt("some gore")),
            "501",
            "601",
        ),
    )
    .await;
    accepted(&r);
    // 501's channel list; other servers keep the global one (empty: every channel).
    let (_, r) = send(
        &svc,
        &in_server(command("8104", eve.clone(), prompt("a cat")), "501", "600"),
    )
    .await;
    refused(&r, "not enabled in this channel");
    let (_, r) = send(
        &svc,
        &in_server(
            command("8105", eve.clone(), prompt("a red dragon")),
            "502",
            "600",
        ),
    )
    .await;
    accepted(&r);

    // DMs: the global policy.
    let bob = json!({"user": {"id": "43", "username": "bob"}});
    let (_, r) = send(&svc, &command("8106", bob.clone(), prompt("some gore"))).await;
    refused(&r, "not allowed");
    let (_, r) = send(&svc, &command("8107", bob, prompt("a red dragon"))).await;
    accepted(&r);

    // Server 500 allows one live job per user; ada already has one (from 501).
    let (_, r) = send(&svc, &command("8108", ada.clone(), prompt("a corgi"))).await;
    refused(&r, "limit is 1");
    let carol = json!({"guild": true, "user": {"id": "44", "username": "carol"}});
    let (_, r) = send(&svc, &command("8109", carol.clone(), prompt("a corgi"))).await;
    accepted(&r);
    let (_, r) = send(&svc, &command("8110", carol.clone(), prompt("a cat"))).await;
    refused(&r, "limit is 1");
    // …while the global limit of 3 holds for her in server 501.
    let (_, r) = send(
        &svc,
        &in_server(
            command("8111", carol.clone(), prompt("a cat")),
            "501",
            "601",
        ),
    )
    .await;
    accepted(&r);

    // Buttons follow the server they are pressed in.
    let signer = sparkle_discord::ButtonSigner::new(&button_key).expect("signer");
    let reroll = signer.sign(sparkle_discord::ButtonAction::Reroll, &dragon);
    let jobs = svc.job_count();
    let (_, r) = send(&svc, &click("8112", &eve, &reroll)).await;
    refused(&r, "not allowed");
    assert_eq!(svc.job_count(), jobs, "nothing queued");
    let mut there = click("8113", &eve, &reroll);
    there["guild_id"] = json!("501");
    there["channel_id"] = json!("601");
    let (_, r) = send(&svc, &there).await;
    accepted(&r);
    assert_eq!(svc.job_count(), jobs + 1);
}

/// `/sparkle` with an image attached: fetched from Discord's CDN (a fake on loopback, the one
/// host allowed), checked like any upload, and the job starts from it; a file that is not an
/// image, one from another host, or a mask alone are refused to the person, privately.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attached_image_starts_the_job_and_bad_files_are_refused_privately() {
    let fake = Arc::new(FakeDiscord::default());
    let api = fake.serve().await;
    let host = api
        .trim_start_matches("http://")
        .split('/')
        .next()
        .expect("host")
        .to_string();
    fake.files.lock().expect("files").extend([
        (
            "source.png".to_string(),
            crate::image_to_image::gradient(96, 64),
        ),
        ("notes.txt".to_string(), b"not an image at all".to_vec()),
    ]);
    let public = hex::encode(key().verifying_key().to_bytes());
    let hosts = format!("[\"{host}\"]");
    let svc = Service::start(&[
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
        ("SPARKLE_DISCORD__ATTACHMENT_HOSTS", hosts.as_str()),
    ])
    .await;
    let user = json!({"guild": true, "user": {"id": "42", "username": "ada"}});
    let with_files = |id: &str, options: Value, files: &[(&str, &str)]| {
        let mut c = command(id, user.clone(), options);
        let resolved: serde_json::Map<String, Value> = files
            .iter()
            .map(|(att, url)| {
                (
                    att.to_string(),
                    json!({"id": att, "filename": url.rsplit('/').next(), "size": 100,
                           "url": url, "content_type": "image/png"}),
                )
            })
            .collect();
        c["data"]["resolved"] = json!({ "attachments": resolved });
        c
    };
    let source_url = format!("http://{host}/files/source.png");
    let options = json!([
        {"name": "prompt", "type": 3, "value": "a lighthouse"},
        {"name": "image", "type": 11, "value": "att-1"},
        {"name": "strength", "type": 10, "value": 0.5},
        {"name": "steps", "type": 4, "value": 4},
    ]);
    let (status, ack) = send(
        &svc,
        &with_files("5001", options, &[("att-1", &source_url)]),
    )
    .await;
    assert_eq!(status, 200, "{ack}");
    let id = job_id(&ack);
    assert!(!id.is_empty(), "{ack}");
    let done = svc
        .wait_for(&id, &svc.admin_key, |j| j["status"] == "succeeded")
        .await;
    assert_eq!(
        (
            &done["request"]["source"],
            &done["request"]["strength"],
            &done["request"]["size"]
        ),
        (&json!("image"), &json!(0.5), &json!("624x416")),
        "the image's 3:2 at the model's pixel count: {done}"
    );
    // Re-roll starts from the same stored source, with a new seed.
    let result = wait_for_edit(&fake, "tok-5001", |e| e.multipart).await;
    let labels = buttons(&payload_of(&result));
    let (status, reply) = send(&svc, &click("5002", &user, &labels[0].1)).await;
    assert_eq!(status, 200, "{reply}");
    let again = svc
        .wait_for(&job_id(&reply), &svc.admin_key, |j| {
            j["status"] == "succeeded"
        })
        .await;
    for field in ["source", "strength", "size", "steps"] {
        assert_eq!(again["request"][field], done["request"][field], "{field}");
    }
    assert_ne!(again["request"]["seed"], done["request"]["seed"]);

    let before = svc.job_count();
    let text_url = format!("http://{host}/files/notes.txt");
    let refusals = [
        (
            json!([{"name": "prompt", "type": 3, "value": "a"},
                   {"name": "image", "type": 11, "value": "att-2"}]),
            vec![("att-2", text_url.as_str())],
            "PNG, JPEG or WebP",
        ),
        (
            json!([{"name": "prompt", "type": 3, "value": "a"},
                   {"name": "image", "type": 11, "value": "att-3"}]),
            vec![("att-3", "http://169.254.169.254/latest/meta-data")],
            "not served by Discord",
        ),
        (
            json!([{"name": "prompt", "type": 3, "value": "a"},
                   {"name": "mask", "type": 11, "value": "att-4"}]),
            vec![("att-4", source_url.as_str())],
            "attach one as `image`",
        ),
    ];
    for (i, (options, files, why)) in refusals.into_iter().enumerate() {
        let (status, answer) = send(&svc, &with_files(&format!("510{i}"), options, &files)).await;
        assert_eq!(status, 200);
        let content = answer["data"]["content"].as_str().unwrap_or_default();
        assert!(content.contains(why), "{content} should say {why}");
        assert_eq!(answer["data"]["flags"], 64, "only the person sees it");
    }
    assert_eq!(svc.job_count(), before, "nothing enqueued");
}
