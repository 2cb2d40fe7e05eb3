//! Nothing lost across machines. Two gateways and three workers elsewhere (each speaking only
//! the worker protocol) on one PostgreSQL over verified TLS and the S3 server; jobs through
//! REST (half with webhooks), the OpenAI route and Discord, while gateways and workers are
//! killed with SIGKILL and started again, one worker is frozen past its lease (SIGSTOP), and
//! PostgreSQL crashes and restarts (`pg_ctl -m immediate`). Clients do what clients do: a
//! REST or OpenAI request without an answer is sent again with its `Idempotency-Key`.
//!
//! Then every job is classified as Jepsen's total-queue checker does — acknowledged,
//! completed, lost (acknowledged, never completed), unexpected (in the database, explained
//! by no request), executed more than once — and every answer owed (a webhook, a Discord
//! message) as delivered once, never, or more than once. The table is printed; lost,
//! unexpected and duplicated deliveries must be none.

use crate::answers::sparkle_command;
use crate::discord::{key as discord_key, FakeDiscord};
use crate::failover::Cluster;
use crate::support::{client_for, fixed_port, kill, sparkle, tiny_model};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use ed25519_dalek::Signer;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const BIN: &str = env!("CARGO_BIN_EXE_sparkle");

/// How long jobs are submitted while faults are injected.
const LOAD: Duration = Duration::from_secs(75);
/// How long a worker's lease lasts without a heartbeat.
const LEASE_SECS: u64 = 6;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs the S3 server scripts/test.sh starts \
             (`scripts/s3.sh start DIR PYTHON`)"
        )
    })
}

/// One server process, started again with the same arguments after a kill.
struct Proc {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn new(name: &str, args: Vec<String>, env: Vec<(String, String)>, log: PathBuf) -> Proc {
        Proc {
            name: name.to_string(),
            args,
            env,
            log,
            child: None,
        }
    }

    /// Starts it; returns what it printed on standard output up to `until` (if given).
    fn start(&mut self, until: Option<&str>) -> Vec<String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let mut child = Command::new(BIN)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn sparkle");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut printed = Vec::new();
        if let Some(until) = until {
            loop {
                let line = rx
                    .recv_timeout(Duration::from_secs(60))
                    .unwrap_or_else(|_| {
                        panic!(
                            "{} did not print {until:?}; log:\n{}",
                            self.name,
                            std::fs::read_to_string(&self.log).unwrap_or_default()
                        )
                    });
                let done = line.starts_with(until);
                printed.push(line);
                if done {
                    break;
                }
            }
        }
        self.child = Some(child);
        printed
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            kill(child.id(), signal);
        }
    }

    /// SIGKILL, and reaped.
    fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(child.id(), "CONT");
            kill(child.id(), "TERM");
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A webhook receiver: every request, with what it answered (always 200).
#[derive(Default)]
struct Hooks {
    /// (webhook-id, job id, event type)
    received: Mutex<Vec<(String, String, String)>>,
}

async fn hook(State(hooks): State<Arc<Hooks>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let job = body["data"]["id"].as_str().unwrap_or_default().to_string();
    let kind = body["type"].as_str().unwrap_or_default().to_string();
    hooks.received.lock().expect("hooks").push((id, job, kind));
    StatusCode::OK
}

async fn serve_hooks(hooks: &Arc<Hooks>) -> String {
    let app = axum::Router::new()
        .route("/hooks", axum::routing::post(hook))
        .with_state(hooks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/hooks")
}

/// What the clients saw.
#[derive(Default)]
struct Ledger {
    /// REST jobs acknowledged (202, or 200 for a repeat): id → whether it has a webhook.
    rest: HashMap<String, bool>,
    /// OpenAI requests answered with their images.
    openai_done: u64,
    /// OpenAI requests given up without an answer (their job may exist).
    openai_unknown: u64,
    /// Discord commands acknowledged: interaction token → job id.
    discord: HashMap<String, String>,
    /// Discord commands without an answer (their job may exist).
    discord_unknown: u64,
    /// Requests sent again after no answer, a 503 or a dropped connection.
    retried: u64,
    /// Answers no client should ever get (a 500, a 4xx to a valid request).
    unexpected_answers: Vec<String>,
}

/// How one attempt at a request ended.
enum Attempt {
    Answered(u16, Value),
    /// Refused before anything was sent (nothing listening): safe to send elsewhere.
    NotSent,
    /// Sent, no answer: it may or may not have taken effect.
    Unknown,
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    idempotency: &str,
) -> Attempt {
    let sent = http
        .post(url)
        .bearer_auth(key)
        .header("Idempotency-Key", idempotency)
        .json(body)
        .send()
        .await;
    attempt(sent).await
}

/// How a request ended, from what the client got back.
async fn attempt(sent: reqwest::Result<reqwest::Response>) -> Attempt {
    match sent {
        Ok(r) => {
            let status = r.status().as_u16();
            match r.json::<Value>().await {
                Ok(v) => Attempt::Answered(status, v),
                Err(_) => Attempt::Unknown,
            }
        }
        Err(e) if e.is_connect() => Attempt::NotSent,
        Err(_) => Attempt::Unknown,
    }
}

/// Where a client sends its requests, as whom, and where it notes what it saw.
#[derive(Clone)]
struct Client {
    http: reqwest::Client,
    gateways: Vec<String>,
    key: String,
    ledger: Arc<Mutex<Ledger>>,
}

impl Client {
    /// Sends one request until it is answered for good, alternating gateways, with the same
    /// idempotency key each time; `None` when it never was within `patience`.
    async fn until_answered(
        &self,
        route: &str,
        body: &Value,
        idempotency: &str,
        patience: Duration,
    ) -> Option<(u16, Value)> {
        let started = Instant::now();
        let mut turn = idempotency.len();
        loop {
            let url = format!("{}{route}", self.gateways[turn % self.gateways.len()]);
            turn += 1;
            match post(&self.http, &url, &self.key, body, idempotency).await {
                Attempt::Answered(status, answer) if status != 503 => {
                    return Some((status, answer))
                }
                _ if started.elapsed() > patience => return None,
                _ => {
                    self.ledger.lock().expect("ledger").retried += 1;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// A signed Discord interaction to one gateway.
async fn send_command(http: &reqwest::Client, gateway: &str, command: &Value) -> Attempt {
    let body = command.to_string();
    let ts = now_secs().to_string();
    let signature = hex::encode(
        discord_key()
            .sign(format!("{ts}{body}").as_bytes())
            .to_bytes(),
    );
    let sent = http
        .post(format!("{gateway}/discord/interactions"))
        .header("content-type", "application/json")
        .header("x-signature-ed25519", signature)
        .header("x-signature-timestamp", ts)
        .body(body)
        .send()
        .await;
    attempt(sent).await
}

/// The database's view of every job: id → (status, attempts), read as the owner with psql.
fn jobs_in_database(cluster: &Cluster, schema: &str) -> HashMap<String, (String, u32)> {
    let db = cluster.database();
    let password = std::fs::read_to_string(&db.owner_password_file).expect("password");
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        db.owner_url, db.ca_file
    );
    let out = Command::new("psql")
        .args([&url, "-At", "-F", " ", "-c"])
        .arg(format!("SELECT id, status, attempts FROM {schema}.jobs"))
        .env("PGPASSWORD", password.trim())
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.split(' ');
            let id = parts.next()?.to_string();
            let status = parts.next()?.to_string();
            let attempts = parts.next()?.parse().ok()?;
            Some((id, (status, attempts)))
        })
        .collect()
}

/// Counts of how often each answer owed arrived.
#[derive(Debug, Default, PartialEq)]
struct Deliveries {
    once: usize,
    never: usize,
    more_than_once: usize,
    /// The same message received again (same id): a retry the receiver recognises.
    repeated_ids: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_across_killed_gateways_and_workers_and_a_database_crash() {
    let cluster = Cluster::start(false);
    let db = cluster.database();
    let root = tempfile::tempdir().expect("tempdir");
    let data = root.path().join("data");
    let app_url = db.migrated_schema(&root.path().join("migrate"));
    let schema = app_url
        .split("search_path%3D")
        .nth(1)
        .expect("the schema in the url")
        .to_string();
    let prefix = format!("chaos-{}", std::process::id());
    let config = root.path().join("sparkle.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{app_url}\"\nca_file = \"{}\"\npassword_file = \"{}\"\n\n\
             [store]\nurl = \"s3://{}/{prefix}\"\nendpoint = \"{}\"\nregion = \"{}\"\n\
             ca_file = \"{}\"\ncredentials_file = \"{}\"\n",
            db.ca_file,
            db.app_password_file,
            var("TEST_S3_BUCKET"),
            var("TEST_S3_ENDPOINT"),
            var("TEST_S3_REGION"),
            var("TEST_S3_CA_FILE"),
            var("TEST_S3_CREDENTIALS_FILE"),
        ),
    )
    .expect("configuration");
    let config_arg = config.to_string_lossy().into_owned();
    let data_arg = data.to_string_lossy().into_owned();
    let model = tiny_model().to_string_lossy().into_owned();
    let fake = Arc::new(FakeDiscord::default());
    let discord_api = fake.serve().await;
    let hooks = Arc::new(Hooks::default());
    let hook_url = serve_hooks(&hooks).await;
    let public = hex::encode(discord_key().verifying_key().to_bytes());
    let lease = LEASE_SECS.to_string();

    // Two gateways, each with its own public and worker listeners, on one data directory
    // (one keyring, one certificate).
    let common_env = |extra: Vec<(&str, String)>| -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("SPARKLE_QUEUE__LEASE_TIMEOUT_SECS", lease.clone()),
            // More attempts than the worker faults injected (seven): a batch that happens to
            // sit on the worker killed each time is still not dead-lettered by the faults
            // alone, so a job that ends dead-lettered here was lost by Sparkle.
            ("SPARKLE_QUEUE__MAX_ATTEMPTS", "10".into()),
            ("SPARKLE_WORKER__HEARTBEAT_SECS", "1".into()),
            ("SPARKLE_WORKER__DEVICE", "cpu".into()),
            ("SPARKLE_WORKER__MAX_BATCH", "8".into()),
            ("SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC", "0".into()),
            ("SPARKLE_GATEWAY__PER_KEY_REQUESTS_PER_SEC", "0".into()),
            ("SPARKLE_GATEWAY__MAX_LIVE_JOBS_PER_KEY", "100000".into()),
            ("SPARKLE_DISCORD__PER_USER_REQUESTS_PER_SEC", "0".into()),
            ("SPARKLE_DISCORD__PER_GUILD_REQUESTS_PER_SEC", "0".into()),
            ("SPARKLE_DISCORD__PUBLIC_KEY", public.clone()),
            ("SPARKLE_DISCORD__API_BASE", discord_api.clone()),
            ("SPARKLE_WEBHOOKS__ALLOW_PRIVATE_ADDRESSES", "true".into()),
            (
                "SPARKLE_WEBHOOKS__RETRY_DELAYS_SECS",
                "[1, 1, 2, 2, 5, 5, 10]".into(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        env.extend(extra.into_iter().map(|(k, v)| (k.to_string(), v)));
        env
    };
    let mut gateways = Vec::new();
    let mut public_urls = Vec::new();
    let mut worker_urls = Vec::new();
    for i in 0..2 {
        let (port, worker_port) = (fixed_port(), fixed_port());
        let args = [
            "gateway",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_arg,
            "--config",
            &config_arg,
            "--model",
            &model,
        ]
        .map(str::to_string)
        .to_vec();
        let env = common_env(vec![(
            "SPARKLE_WORKER_LISTEN",
            format!("127.0.0.1:{worker_port}"),
        )]);
        let log = root.path().join(format!("gateway-{i}.log"));
        gateways.push(Proc::new(&format!("gateway {i}"), args, env, log));
        public_urls.push(format!("https://127.0.0.1:{port}"));
        worker_urls.push(format!("https://127.0.0.1:{worker_port}"));
    }
    let mut admin_key = None;
    for gateway in &mut gateways {
        for line in gateway.start(Some("Sparkle is up at ")) {
            if let Some(k) =
                line.strip_prefix("Admin API key (shown once; only its hash is stored): ")
            {
                admin_key = Some(k.trim().to_string());
            }
        }
    }
    assert!(
        admin_key.is_some(),
        "the first gateway printed an admin key"
    );
    let cert = data.join("tls/cert.pem");
    let http = client_for(&cert);

    // An API key with a webhook secret, and an enrollment for the workers.
    // A key for the REST clients (with a webhook secret) and one for the OpenAI client: two
    // shares, so the synchronous client's jobs take turns with the REST backlog.
    let create = |what: &str, name: &str| {
        let (ok, out, err) = sparkle(
            &[
                what,
                "create",
                "--name",
                name,
                "--config",
                &config_arg,
                "--data-dir",
                &data_arg,
            ],
            &[],
        );
        assert!(ok, "{what} create: {err}");
        out.trim().to_string()
    };
    let key = create("key", "chaos-rest");
    let openai_key = create("key", "chaos-openai");
    let secret = create("enrollment", "chaos-workers");
    let elsewhere = root.path().join("workers");
    std::fs::create_dir_all(&elsewhere).expect("workers' host");
    let secret_file = elsewhere.join("enrollment.secret");
    std::fs::write(&secret_file, secret.trim()).expect("secret");
    std::fs::set_permissions(
        &secret_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let ca = elsewhere.join("control-plane.pem");
    std::fs::copy(&cert, &ca).expect("the control plane's certificate");

    // Three workers on "another machine": their own directory, the secret and the CA alone.
    let mut workers = Vec::new();
    for i in 0..3 {
        let own = elsewhere.join(format!("worker-{i}"));
        std::fs::create_dir_all(&own).expect("worker directory");
        let args = vec![
            "worker".to_string(),
            "--control-plane".into(),
            worker_urls[i % 2].clone(),
            "--enrollment-token-file".into(),
            secret_file.to_string_lossy().into_owned(),
            "--ca-file".into(),
            ca.to_string_lossy().into_owned(),
            "--data-dir".into(),
            own.to_string_lossy().into_owned(),
            "--model".into(),
            model.clone(),
        ];
        let env = common_env(Vec::new());
        let mut worker = Proc::new(
            &format!("worker {i}"),
            args,
            env,
            elsewhere.join(format!("worker-{i}.log")),
        );
        worker.start(None);
        workers.push(worker);
    }

    // The load: REST (every other job with a webhook), OpenAI and Discord, each client
    // retrying with its idempotency key as a careful client does.
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let sequence = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    let api = Client {
        http: http.clone(),
        gateways: public_urls.clone(),
        key: key.clone(),
        ledger: ledger.clone(),
    };
    for client in 0..3 {
        let (api, hook_url) = (api.clone(), hook_url.clone());
        let (ledger, stop, sequence) = (ledger.clone(), stop.clone(), sequence.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let n = sequence.fetch_add(1, Ordering::Relaxed);
                let with_hook = n % 2 == 0;
                let mut body = json!({
                    "prompt": format!("a quay {n}"), "size": "64x64", "steps": 1, "seed": n % 1000,
                });
                if with_hook {
                    body["webhook_url"] = json!(hook_url);
                }
                let idempotency = format!("rest-{client}-{n}");
                let answer = api
                    .until_answered("/v1/jobs", &body, &idempotency, Duration::from_secs(60))
                    .await;
                {
                    let mut ledger = ledger.lock().expect("ledger");
                    match answer {
                        Some((202 | 200, job)) => match job["id"].as_str() {
                            Some(id) => {
                                ledger.rest.insert(id.to_string(), with_hook);
                            }
                            None => ledger.unexpected_answers.push(job.to_string()),
                        },
                        Some((status, answer)) => ledger
                            .unexpected_answers
                            .push(format!("REST {status}: {answer}")),
                        None => ledger
                            .unexpected_answers
                            .push(format!("REST {idempotency}: no answer in 60 s")),
                    }
                }
                // About as fast as the three workers make images: the backlog stays short
                // enough to drain within the test's bounds.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    {
        let api = Client {
            key: openai_key,
            ..api.clone()
        };
        let (ledger, stop) = (ledger.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let body = json!({"prompt": format!("a mill {n}"), "size": "64x64", "steps": 1});
                let answer = api
                    .until_answered(
                        "/v1/images/generations",
                        &body,
                        &format!("openai-{n}"),
                        Duration::from_secs(90),
                    )
                    .await;
                let mut ledger = ledger.lock().expect("ledger");
                match answer {
                    Some((200, done)) if done["data"][0]["b64_json"].is_string() => {
                        ledger.openai_done += 1
                    }
                    Some((status, answer)) => ledger
                        .unexpected_answers
                        .push(format!("OpenAI {status}: {answer}")),
                    None => ledger.openai_unknown += 1,
                }
            }
        }));
    }
    {
        let (http, urls) = (http.clone(), public_urls.clone());
        let (ledger, stop) = (ledger.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let id = format!("9{n:06}");
                let command = sparkle_command(&id, &format!("two doors {n}"));
                // Discord sends an interaction once; a gateway not listening is another
                // address behind the load balancer.
                let mut outcome = Attempt::NotSent;
                for gateway in urls.iter().cycle().skip(n as usize % 2).take(2) {
                    outcome = send_command(&http, gateway, &command).await;
                    if !matches!(outcome, Attempt::NotSent) {
                        break;
                    }
                }
                {
                    let mut ledger = ledger.lock().expect("ledger");
                    match outcome {
                        Attempt::Answered(200, ack) => {
                            let content = ack["data"]["content"].as_str().unwrap_or_default();
                            match content.split('`').nth(1) {
                                Some(job) if ack["type"] == 5 || ack["type"] == 4 => {
                                    ledger.discord.insert(format!("tok-{id}"), job.to_string());
                                }
                                _ => ledger.discord_unknown += 1,
                            }
                        }
                        Attempt::Answered(status, _) if status >= 500 => {
                            ledger.discord_unknown += 1
                        }
                        Attempt::Answered(status, answer) => ledger
                            .unexpected_answers
                            .push(format!("Discord {status}: {answer}")),
                        Attempt::NotSent | Attempt::Unknown => ledger.discord_unknown += 1,
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }));
    }

    // The faults, on a schedule over the load.
    let started = Instant::now();
    let at = |secs: u64| async move {
        let when = started + Duration::from_secs(secs);
        tokio::time::sleep_until(when.into()).await;
    };
    let mut faults: Vec<String> = Vec::new();
    at(6).await;
    workers[0].crash();
    faults.push("SIGKILL worker 0".into());
    at(8).await;
    workers[0].start(None);
    at(12).await;
    gateways[1].crash();
    faults.push("SIGKILL gateway 1".into());
    at(15).await;
    gateways[1].start(Some("Sparkle is up at "));
    at(20).await;
    // Frozen mid-batch past its lease: another worker takes its jobs; when it thaws, its
    // completions are refused and its images discarded.
    workers[1].signal("STOP");
    faults.push(format!("SIGSTOP worker 1 for {} s", LEASE_SECS + 6));
    at(20 + LEASE_SECS + 6).await;
    workers[1].signal("CONT");
    at(34).await;
    cluster.primary("kill");
    faults.push("PostgreSQL stopped with -m immediate".into());
    at(37).await;
    cluster.primary("resume");
    at(44).await;
    gateways[0].crash();
    faults.push("SIGKILL gateway 0".into());
    at(47).await;
    gateways[0].start(Some("Sparkle is up at "));
    let mut rounds = 0u64;
    while started.elapsed() < LOAD {
        rounds += 1;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (victim, at_worker) = ((rounds as usize) % 5, rounds % 5 < 3);
        if at_worker {
            workers[victim].crash();
            faults.push(format!("SIGKILL worker {victim}"));
            tokio::time::sleep(Duration::from_millis(800)).await;
            workers[victim].start(None);
        } else {
            let g = victim % 2;
            gateways[g].crash();
            faults.push(format!("SIGKILL gateway {g}"));
            tokio::time::sleep(Duration::from_millis(800)).await;
            gateways[g].start(Some("Sparkle is up at "));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = tokio::time::timeout(Duration::from_secs(120), client).await;
    }

    // Settle: every acknowledged job reaches a final status, every answer goes out.
    let ledger = std::mem::take(&mut *ledger.lock().expect("ledger"));
    let acknowledged: HashSet<String> = ledger
        .rest
        .keys()
        .chain(ledger.discord.values())
        .cloned()
        .collect();
    let deadline = Instant::now() + Duration::from_secs(300);
    let jobs = loop {
        let jobs = jobs_in_database(&cluster, &schema);
        let open = acknowledged
            .iter()
            .filter(|id| {
                jobs.get(*id)
                    .is_some_and(|(s, _)| matches!(s.as_str(), "queued" | "running" | "retry_wait"))
            })
            .count();
        if open == 0 || Instant::now() > deadline {
            break jobs;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let hooked: Vec<&String> = ledger
        .rest
        .iter()
        .filter(|(_, hook)| **hook)
        .map(|(id, _)| id)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let delivered: HashSet<String> = hooks
            .received
            .lock()
            .expect("hooks")
            .iter()
            .map(|(_, job, _)| job.clone())
            .collect();
        let finals = crate::answers::final_edits(&fake).len();
        let done =
            hooked.iter().all(|id| delivered.contains(*id)) && finals >= ledger.discord.len();
        if done || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Late duplicates would come now.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Jobs, as the total-queue checker sees them.
    let completed = acknowledged
        .iter()
        .filter(|id| jobs.get(*id).is_some_and(|(s, _)| s == "succeeded"))
        .count();
    let lost: Vec<String> = acknowledged
        .iter()
        .filter(|id| jobs.get(*id).is_none_or(|(s, _)| s != "succeeded"))
        .map(|id| format!("{id}: {:?}", jobs.get(id)))
        .collect();
    let unexplained = jobs.keys().filter(|id| !acknowledged.contains(*id)).count();
    let explained = (ledger.openai_done + ledger.openai_unknown + ledger.discord_unknown) as usize;
    let unexpected = unexplained.saturating_sub(explained);
    let executed_twice = jobs.values().filter(|(_, attempts)| *attempts > 1).count();

    // Answers: webhooks by job and message id, Discord's final edits by interaction.
    let received = hooks.received.lock().expect("hooks").clone();
    let mut by_job: BTreeMap<&str, HashSet<&str>> = BTreeMap::new();
    let mut messages = 0;
    for (id, job, kind) in &received {
        if kind == "job.succeeded" {
            by_job.entry(job.as_str()).or_default().insert(id.as_str());
            messages += 1;
        }
    }
    let mut webhooks = Deliveries::default();
    for id in &hooked {
        match by_job.get(id.as_str()).map_or(0, HashSet::len) {
            0 => webhooks.never += 1,
            1 => webhooks.once += 1,
            _ => webhooks.more_than_once += 1,
        }
    }
    webhooks.repeated_ids = messages - by_job.values().map(HashSet::len).sum::<usize>();
    // An edit of `@original` sent again with the same content leaves the one message as it
    // was (an answer whose recording was cut off by a kill is sent again); an edit that
    // differs would change what the user sees.
    let mut edits: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    for edit in fake.edits() {
        if edit.multipart && edit.status == 200 {
            edits
                .entry(edit.path)
                .or_default()
                .push(without_boundary(&edit.body));
        }
    }
    let mut discord = Deliveries::default();
    for token in ledger.discord.keys() {
        let path = format!("/webhooks/900/{token}/messages/@original");
        let sent = edits.get(&path).map_or(&[][..], Vec::as_slice);
        let distinct: HashSet<&Vec<u8>> = sent.iter().collect();
        match distinct.len() {
            0 => discord.never += 1,
            1 => discord.once += 1,
            _ => discord.more_than_once += 1,
        }
        discord.repeated_ids += sent.len().saturating_sub(distinct.len());
    }

    let table = format!(
        "nothing lost across machines ({} s of load; faults: {})\n\
         | jobs | count |\n|---|---:|\n\
         | acknowledged (REST {}, Discord {}) | {} |\n\
         | completed | {completed} |\n\
         | lost | {} |\n\
         | unexpected | {unexpected} |\n\
         | executed more than once (attempts > 1) | {executed_twice} |\n\
         | OpenAI answered with images / given up | {} / {} |\n\
         | Discord commands without an answer | {} |\n\
         | requests sent again (no answer, 503, connection refused) | {} |\n\
         | answers | once | never | more than once | same message again |\n\
         |---|---:|---:|---:|---:|\n\
         | webhooks | {} | {} | {} | {} |\n\
         | Discord (edits of @original) | {} | {} | {} | {} |",
        LOAD.as_secs(),
        faults.join(", "),
        ledger.rest.len(),
        ledger.discord.len(),
        acknowledged.len(),
        lost.len(),
        ledger.openai_done,
        ledger.openai_unknown,
        ledger.discord_unknown,
        ledger.retried,
        webhooks.once,
        webhooks.never,
        webhooks.more_than_once,
        webhooks.repeated_ids,
        discord.once,
        discord.never,
        discord.more_than_once,
        discord.repeated_ids,
    );
    // Written past the test harness's capture: the run's log carries the table.
    let _ = writeln!(std::io::stderr(), "{table}");
    let logs = || {
        let mut all = String::new();
        for path in [
            root.path().join("gateway-0.log"),
            root.path().join("gateway-1.log"),
        ] {
            all.push_str(&std::fs::read_to_string(path).unwrap_or_default());
        }
        all
    };
    assert!(lost.is_empty(), "{table}\nlost: {lost:#?}\n{}", logs());
    assert_eq!(unexpected, 0, "{table}");
    assert_eq!(webhooks.never + webhooks.more_than_once, 0, "{table}");
    assert_eq!(discord.never + discord.more_than_once, 0, "{table}");
    assert!(
        ledger.unexpected_answers.is_empty(),
        "{table}\n{:#?}",
        ledger.unexpected_answers
    );
    assert!(
        acknowledged.len() >= 500,
        "jobs flowed under the faults: {table}"
    );
    assert!(!logs().contains("panicked"), "{}", logs());
}

/// A multipart body with its boundary (chosen anew for each request) made the same.
fn without_boundary(body: &[u8]) -> Vec<u8> {
    let Some(end) = body.windows(2).position(|w| w == b"\r\n") else {
        return body.to_vec();
    };
    let boundary = &body[..end];
    let mut out = Vec::with_capacity(body.len());
    let mut rest = body;
    while let Some(at) = rest.windows(boundary.len()).position(|w| w == boundary) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(b"--boundary");
        rest = &rest[at + boundary.len()..];
    }
    out.extend_from_slice(rest);
    out
}
