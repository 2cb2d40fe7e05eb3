//! High availability on PostgreSQL, while jobs flow: the primary crashes and restarts
//! (`pg_ctl -m immediate`), then crashes for good and its synchronous standby is promoted
//! (`pg_ctl promote`), the service's connection string listing both hosts. No acknowledged
//! job is lost; while no primary answers, submits are refused with 503 and `Retry-After`
//! (never a 500) and `/readyz` says so; everything reconnects by itself. And the service's
//! password rotated under load, taking effect without a restart.

use crate::postgres::TestDatabase;
use crate::support::Service;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/postgres.sh");

fn script(args: &[&Path]) -> String {
    let out = Command::new("bash")
        .arg(SCRIPT)
        .args(args)
        .output()
        .expect("run scripts/postgres.sh");
    assert!(
        out.status.success(),
        "scripts/postgres.sh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn settings(printed: &str) -> HashMap<String, String> {
    printed
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// A primary (and, for failover, its synchronous standby) of one test alone: the run's shared
/// server is not to be crashed or have its passwords changed under the other tests.
pub(crate) struct Cluster {
    primary: tempfile::TempDir,
    standby: Option<tempfile::TempDir>,
    settings: HashMap<String, String>,
}

impl Cluster {
    pub(crate) fn start(with_standby: bool) -> Cluster {
        let dir = |role| {
            tempfile::Builder::new()
                .prefix(&format!("sparkle-failover-{role}."))
                .tempdir()
                .expect("tempdir")
        };
        let primary = dir("primary");
        let mut settings = settings(&script(&[Path::new("start"), primary.path()]));
        let standby = with_standby.then(|| dir("standby"));
        if let Some(standby) = &standby {
            settings.extend(self::settings(&script(&[
                Path::new("standby"),
                primary.path(),
                standby.path(),
            ])));
        }
        Cluster {
            primary,
            standby,
            settings,
        }
    }

    pub(crate) fn database(&self) -> TestDatabase {
        let var = |name: &str| self.settings[name].clone();
        TestDatabase {
            owner_url: var("TEST_PG_URL"),
            owner_password_file: var("TEST_PG_PASSWORD_FILE"),
            app_url: var("TEST_PG_APP_URL"),
            app_password_file: var("TEST_PG_APP_PASSWORD_FILE"),
            ca_file: var("TEST_PG_CA_FILE"),
        }
    }

    /// The service's connection string for `url` (on the primary) listing the standby too,
    /// and taking only a server that accepts writes.
    fn both_hosts(&self, url: &str) -> String {
        let standby = format!("127.0.0.1:{}", self.settings["TEST_PG_STANDBY_PORT"]);
        let (head, rest) = url.split_once('@').expect("user@host");
        let (host, tail) = rest.split_once('/').expect("host/database");
        format!("{head}@{host},{standby}/{tail}&target_session_attrs=read-write")
    }

    pub(crate) fn primary(&self, command: &str) {
        script(&[Path::new(command), self.primary.path()]);
    }

    fn standby(&self, command: &str) {
        let standby = self.standby.as_ref().expect("a standby");
        script(&[Path::new(command), standby.path()]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let standby = self.standby.as_ref().map(|s| s.path());
        for dir in standby.into_iter().chain([self.primary.path()]) {
            let _ = Command::new("bash")
                .arg(SCRIPT)
                .arg("stop")
                .arg(dir)
                .output();
        }
    }
}

#[derive(Default)]
struct Tally {
    acknowledged: Vec<String>,
    refused: u32,
    without_retry_after: u32,
    unexpected: Vec<(u16, String)>,
}

/// Submits jobs until `stop`, from `clients` clients at once.
fn load(
    svc: &Service,
    key: &str,
    clients: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..clients)
        .map(|client| {
            let http = svc.client().clone();
            let url = format!("{}/v1/jobs", svc.url);
            let (key, stop, tally) = (key.to_string(), stop.clone(), tally.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = json!({
                        "prompt": format!("a quay, client {client}, job {n}"),
                        "size": "64x64",
                        "steps": 1,
                    });
                    let sent = http.post(&url).bearer_auth(&key).json(&body).send().await;
                    let (status, retry_after, answer) = match sent {
                        Ok(r) => {
                            let status = r.status().as_u16();
                            let retry_after = r.headers().contains_key("retry-after");
                            (status, retry_after, r.json().await.unwrap_or(Value::Null))
                        }
                        Err(e) => (0, false, Value::String(e.to_string())),
                    };
                    {
                        let mut tally = tally.lock().expect("tally");
                        match (status, answer["id"].as_str()) {
                            (202, Some(id)) => tally.acknowledged.push(id.to_string()),
                            (503, _) => {
                                tally.refused += 1;
                                tally.without_retry_after += u32::from(!retry_after);
                            }
                            _ => tally.unexpected.push((status, answer.to_string())),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        })
        .collect()
}

/// Waits until `/readyz` answers `want`.
async fn readiness(svc: &Service, want: u16, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = match svc.client().get(format!("{}/readyz", svc.url)).send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        };
        if status == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "/readyz answered {status}, not {want}, for {within:?}; log:\n{}",
            svc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `sparkle up` on a fresh schema of `cluster`, connected by the string `url` makes of the
/// primary's; an API key for it. Request rates are not limited: the load is the test's.
async fn service_on(cluster: &Cluster, url: impl Fn(&str) -> String) -> (Service, String) {
    let db = cluster.database();
    let root = tempfile::tempdir().expect("tempdir");
    let url = url(&db.migrated_schema(&root.path().join("migrate")));
    let config = db.config(root.path(), &url);
    let cert = root.path().join("data/tls/cert.pem");
    let limits = [
        ("SPARKLE_GATEWAY__PER_IP_REQUESTS_PER_SEC", "0"),
        ("SPARKLE_GATEWAY__PER_KEY_REQUESTS_PER_SEC", "0"),
        ("SPARKLE_GATEWAY__MAX_LIVE_JOBS_PER_KEY", "100000"),
    ];
    let svc = Service::start_configured(root, config, &cert, &limits).await;
    let key = svc.create_key("load").await;
    (svc, key)
}

/// Waits for every acknowledged job to end: how many succeeded, and those that did not.
async fn settle(svc: &Service, key: &str, acknowledged: &[String]) -> (usize, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut completed = 0;
    let mut lost = Vec::new();
    for id in acknowledged {
        loop {
            let job = svc.get_json(&format!("/v1/jobs/{id}"), key).await;
            match job["status"].as_str() {
                Some("succeeded") => {
                    completed += 1;
                    break;
                }
                Some("queued" | "running" | "retry_wait") if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => {
                    lost.push(format!("{id}: {job}"));
                    break;
                }
            }
        }
    }
    (completed, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_job_is_lost_across_a_crash_and_a_failover() {
    let cluster = Cluster::start(true);
    let (svc, key) = service_on(&cluster, |url| cluster.both_hosts(url)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients = load(&svc, &key, 4, stop.clone(), tally.clone());
    let pause = |secs| tokio::time::sleep(Duration::from_secs(secs));
    pause(3).await;

    // The primary crashes, and comes back after crash recovery.
    cluster.primary("kill");
    let noticed = readiness(&svc, 503, Duration::from_secs(10)).await;
    pause(2).await;
    cluster.primary("resume");
    let back = readiness(&svc, 200, Duration::from_secs(30)).await;
    pause(3).await;

    // The primary is lost for good; the standby takes over.
    cluster.primary("kill");
    let noticed_again = readiness(&svc, 503, Duration::from_secs(10)).await;
    pause(2).await;
    cluster.standby("promote");
    let failed_over = readiness(&svc, 200, Duration::from_secs(30)).await;
    pause(3).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }

    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let (completed, lost) = settle(&svc, &key, &tally.acknowledged).await;
    // Written past the test harness's capture: the run's log carries these numbers.
    let _ = writeln!(
        std::io::stderr(),
        "failover: acknowledged {}, completed {completed}, lost {}, refused with 503 {} \
         (outages noticed by /readyz in {noticed:?} and {noticed_again:?}; ready again \
         {back:?} after the restart, {failed_over:?} after the promotion)",
        tally.acknowledged.len(),
        lost.len(),
        tally.refused,
    );
    assert!(lost.is_empty(), "acknowledged jobs lost: {lost:#?}");
    assert!(
        tally.unexpected.is_empty(),
        "answers other than 202 and 503: {:?}",
        tally.unexpected
    );
    assert_eq!(tally.without_retry_after, 0, "every 503 has Retry-After");
    assert!(
        tally.refused > 0,
        "submits made while no primary answered are refused with 503"
    );
    assert!(
        tally.acknowledged.len() > 50,
        "jobs flowed: {}",
        tally.acknowledged.len()
    );
    let log = svc.log();
    assert!(!log.contains("panicked"), "{log}");
}

/// The service's password rotated twice while jobs flow, each time with every session of its
/// role ended: connections log in again with what the password file holds now, no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_rotated_under_load_takes_effect_without_a_restart() {
    let cluster = Cluster::start(false);
    let (svc, key) = service_on(&cluster, str::to_string).await;
    let password_file = cluster.database().app_password_file;
    let before = std::fs::read_to_string(&password_file).expect("password");

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let clients = load(&svc, &key, 4, stop.clone(), tally.clone());
    let acknowledged = || tally.lock().expect("tally").acknowledged.len();
    let mut since_rotation = Vec::new();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for _ in 0..2 {
        cluster.primary("rotate");
        let at = acknowledged();
        tokio::time::sleep(Duration::from_secs(3)).await;
        since_rotation.push(acknowledged() - at);
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.expect("client");
    }
    assert_ne!(
        std::fs::read_to_string(&password_file).expect("password"),
        before,
        "rotated"
    );

    let tally = std::mem::take(&mut *tally.lock().expect("tally"));
    let (completed, lost) = settle(&svc, &key, &tally.acknowledged).await;
    let _ = writeln!(
        std::io::stderr(),
        "rotation: acknowledged {}, completed {completed}, lost {}, refused with 503 {}, \
         acknowledged in the 3 s after each rotation {since_rotation:?}",
        tally.acknowledged.len(),
        lost.len(),
        tally.refused,
    );
    assert!(lost.is_empty(), "acknowledged jobs lost: {lost:#?}");
    assert!(
        tally.unexpected.is_empty(),
        "answers other than 202 and 503: {:?}",
        tally.unexpected
    );
    assert_eq!(tally.without_retry_after, 0, "every 503 has Retry-After");
    assert!(
        since_rotation.iter().all(|&n| n >= 10),
        "submits go on after each rotation: {since_rotation:?}"
    );
    let log = svc.log();
    assert!(
        !log.contains("password authentication failed"),
        "no connection logged in with a stale password: {log}"
    );
}
