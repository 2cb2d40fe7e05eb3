//! Beyond one machine's database: `sparkle up` and a second `sparkle gateway` on one
//! PostgreSQL (the server `scripts/postgres.sh` starts: TLS verified in full against its test
//! CA, passwords from files), the schema made by `sparkle migrate` as the database's owner and
//! the service connected as a role that may only read and write rows. Both gateways serve the
//! same API over the same queue: REST, the OpenAI route and Discord, one idempotency key
//! across both, each Discord answer delivered once.

use crate::answers::{sparkle_command, wait_for_finals};
use crate::discord::{job_id, key, send, FakeDiscord};
use crate::support::{sparkle, Service};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The test server's settings (exported by scripts/test.sh).
pub(crate) struct TestDatabase {
    pub owner_url: String,
    pub owner_password_file: String,
    pub app_url: String,
    pub app_password_file: String,
    pub ca_file: String,
}

impl TestDatabase {
    pub(crate) fn from_env() -> TestDatabase {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!(
                    "{name} is not set: this test needs PostgreSQL. Start one with \
                     `scripts/postgres.sh start DIR` and export what it prints (scripts/test.sh does)"
                )
            })
        };
        TestDatabase {
            owner_url: var("TEST_PG_URL"),
            owner_password_file: var("TEST_PG_PASSWORD_FILE"),
            app_url: var("TEST_PG_APP_URL"),
            app_password_file: var("TEST_PG_APP_PASSWORD_FILE"),
            ca_file: var("TEST_PG_CA_FILE"),
        }
    }

    /// A fresh schema made by `sparkle migrate` as the owner, the service's role granted its
    /// rows; the service's connection string for it.
    pub(crate) fn migrated_schema(&self, data: &std::path::Path) -> String {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let schema = format!("e2e_{}_{nanos}", std::process::id());
        let in_schema = |url: &str| format!("{url}?options=-c%20search_path%3D{schema}");
        let owner = in_schema(&self.owner_url);
        let data = data.to_string_lossy();
        let (ok, out, err) = sparkle(
            &[
                "migrate",
                "--data-dir",
                &data,
                "--database-url",
                &owner,
                "--password-file",
                &self.owner_password_file,
                "--grant-to",
                "sparkle_app",
            ],
            &[("SPARKLE_DATABASE__CA_FILE", self.ca_file.as_str())],
        );
        assert!(ok, "sparkle migrate failed: {out}{err}");
        assert!(out.contains("from migration 0 to"), "{out}");
        in_schema(&self.app_url)
    }

    /// A configuration file for a service on `url`, with its data in `data`.
    pub(crate) fn config(&self, root: &std::path::Path, url: &str) -> std::path::PathBuf {
        let path = root.join("sparkle.toml");
        std::fs::write(
            &path,
            format!(
                "[database]\nurl = \"{url}\"\nca_file = \"{}\"\npassword_file = \"{}\"\n",
                self.ca_file, self.app_password_file
            ),
        )
        .expect("write the configuration");
        path
    }
}

async fn get_at(svc: &Service, base: &str, route: &str, key: &str) -> (u16, Value) {
    let r = svc
        .client()
        .get(format!("{base}{route}"))
        .bearer_auth(key)
        .send()
        .await
        .expect("request");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

async fn post_at(
    svc: &Service,
    base: &str,
    route: &str,
    body: &Value,
    key: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut req = svc
        .client()
        .post(format!("{base}{route}"))
        .bearer_auth(key)
        .json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let r = req.send().await.expect("request");
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_and_workers_share_one_postgresql_over_verified_tls() {
    let db = TestDatabase::from_env();
    let root = tempfile::tempdir().expect("tempdir");
    let url = db.migrated_schema(&root.path().join("migrate"));
    let config = db.config(root.path(), &url);
    let cert = root.path().join("data/tls/cert.pem");
    let fake = Arc::new(FakeDiscord::default());
    let api = fake.serve().await;
    let public = hex::encode(key().verifying_key().to_bytes());
    let discord = [
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
    ];
    let svc = Service::start_configured(root, config, &cert, &discord).await;
    let second = svc.start_beside("gateway", &discord);
    let deadline = Instant::now() + Duration::from_secs(30);
    while get_at(&svc, &second.url, "/readyz", "").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the second gateway never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = svc.create_key("app").await;

    // REST through the first gateway, followed through the second.
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a harbour", "size": "64x64", "steps": 2}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let done = loop {
        let (status, seen) = get_at(&svc, &second.url, &format!("/v1/jobs/{id}"), &key).await;
        assert_eq!(status, 200, "{seen}");
        if seen["status"] == "succeeded" {
            break seen;
        }
        assert!(Instant::now() < deadline, "never finished: {seen}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(done["images"].as_array().map(Vec::len), Some(1), "{done}");

    // The OpenAI route through the second gateway, waiting for a worker the first started.
    let (status, body) = post_at(
        &svc,
        &second.url,
        "/v1/images/generations",
        &json!({"prompt": "a lighthouse", "size": "64x64", "steps": 2}),
        &key,
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["data"][0]["b64_json"]
            .as_str()
            .is_some_and(|b| !b.is_empty()),
        "{body}"
    );

    // One idempotency key, two gateways: one job.
    let request = json!({"prompt": "a mill", "size": "64x64", "steps": 2});
    let idem = [("Idempotency-Key", "mill-1")];
    let (s1, first) = post_at(&svc, &svc.url, "/v1/jobs", &request, &key, &idem).await;
    let (s2, again) = post_at(&svc, &second.url, "/v1/jobs", &request, &key, &idem).await;
    assert_eq!((s1, s2), (202, 200), "{first} {again}");
    assert_eq!(first["id"], again["id"]);

    // Discord: commands acknowledged by the first gateway; both work the outbox, each
    // answer goes out once.
    let commands = 3;
    for i in 0..commands {
        let (status, ack) = send(&svc, &sparkle_command(&format!("81{i:02}"), "two doors")).await;
        assert_eq!(status, 200, "{ack}");
        assert!(!job_id(&ack).is_empty(), "{ack}");
    }
    let finals = wait_for_finals(&fake, commands).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(finals.len(), commands, "{finals:?}");
    assert!(
        finals.values().all(|&n| n == 1),
        "each answer once: {finals:?}"
    );

    // Nothing of it in the data directory's embedded database.
    assert!(!svc.data_dir().join("sparkle.db").exists());
}
