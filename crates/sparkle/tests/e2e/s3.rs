//! Images in an S3-compatible bucket (moto's server, which `scripts/s3.sh` starts over TLS
//! with a test CA): `sparkle up` with `[store] url = "s3://…"` stores each image sealed, with
//! server-side encryption asked for, serves it back through the API, and keeps nothing in
//! the data directory's image folder.

use crate::support::Service;
use serde_json::json;

fn var(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: this test needs an S3-compatible server. Start one with \
             `scripts/s3.sh start DIR PYTHON` and export what it prints (scripts/test.sh does)"
        )
    })
}

/// The objects under `prefix`: (key, first bytes, server-side encryption), read with boto3.
fn objects(prefix: &str) -> Vec<(String, String, String)> {
    let python = std::env::var("OPENAI_CLIENT_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .args([
            "-c",
            r#"
import json, sys, boto3
endpoint, ca, bucket, prefix, credentials = sys.argv[1:6]
keys = dict(l.split("=", 1) for l in open(credentials) if "=" in l)
s3 = boto3.client("s3", endpoint_url=endpoint, verify=ca, region_name="us-east-1",
    aws_access_key_id=keys["aws_access_key_id "].strip(),
    aws_secret_access_key=keys["aws_secret_access_key "].strip())
out = []
for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", []):
    got = s3.get_object(Bucket=bucket, Key=o["Key"])
    out.append([o["Key"], got["Body"].read()[:8].hex(), got.get("ServerSideEncryption", "")])
print(json.dumps(out))
"#,
        ])
        .args([
            var("TEST_S3_ENDPOINT"),
            var("TEST_S3_CA_FILE"),
            var("TEST_S3_BUCKET"),
            prefix.to_string(),
            var("TEST_S3_CREDENTIALS_FILE"),
        ])
        .output()
        .expect("python with boto3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_live_sealed_in_an_s3_bucket() {
    let prefix = format!("e2e-{}", std::process::id());
    let url = format!("s3://{}/{prefix}", var("TEST_S3_BUCKET"));
    let (endpoint, region) = (var("TEST_S3_ENDPOINT"), var("TEST_S3_REGION"));
    let (ca, credentials) = (var("TEST_S3_CA_FILE"), var("TEST_S3_CREDENTIALS_FILE"));
    let svc = Service::start(&[
        ("SPARKLE_STORE__URL", url.as_str()),
        ("SPARKLE_STORE__ENDPOINT", endpoint.as_str()),
        ("SPARKLE_STORE__REGION", region.as_str()),
        ("SPARKLE_STORE__CA_FILE", ca.as_str()),
        ("SPARKLE_STORE__CREDENTIALS_FILE", credentials.as_str()),
    ])
    .await;
    let key = svc.create_key("s3").await;
    let (status, job) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a harbour", "size": "64x64", "steps": 2, "n": 2}),
            Some(&key),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let done = svc
        .wait_for(&id, &key, |j| {
            j["status"] != "queued" && j["status"] != "running"
        })
        .await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", svc.log());
    for n in 0..2 {
        let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/{n}"), &key).await;
        assert_eq!(status, 200);
        assert!(png.starts_with(b"\x89PNG"), "served opened");
    }
    let stored = objects(&prefix);
    assert_eq!(stored.len(), 2, "{stored:?}");
    for (name, head, sse) in &stored {
        assert!(name.contains(&id), "{name}");
        assert_ne!(
            head, "89504e470d0a1a0a",
            "{name} is stored sealed, not as a PNG"
        );
        assert_eq!(sse, "AES256", "{name}: server-side encryption asked for");
    }
    let local = svc.data_dir().join("images");
    let local_files = std::fs::read_dir(&local).map(|d| d.count()).unwrap_or(0);
    assert_eq!(local_files, 0, "nothing in {}", local.display());
}
