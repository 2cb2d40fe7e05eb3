//! A gateway over a real SQLite queue and local store, with fields in the clear, for the
//! routes' tests.

use crate::{Admission, GatewayOptions, GatewayState};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::response::Response;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::Value;
use sparkle_core::{Catalog, JobId, Limits, ModelEntry};
use sparkle_queue::{ApiKeys, Field, FieldCipher, FieldError, JobQueue, Scope, SqliteQueue};
use sparkle_seal::{Keyring, MasterKeys};
use sparkle_store::{ImageKey, ImageLinks, ObjectImageStore};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;
use zeroize::Zeroizing;

pub const PUBLIC: &str = "https://sparkle.test:8443";
pub const PNG: &[u8] = b"\x89PNG\r\n\x1a\nnot really a picture";

/// Fields in the clear, bound to their field and row: these tests are about links.
pub struct ClearFields;

impl FieldCipher for ClearFields {
    fn seal(&self, field: Field, row: &str, plain: &[u8]) -> Result<String, FieldError> {
        let bound = URL_SAFE_NO_PAD.encode(format!("{}|{row}", field.name()));
        Ok(format!("c:{bound}:{}", URL_SAFE_NO_PAD.encode(plain)))
    }
    fn open(
        &self,
        field: Field,
        row: &str,
        sealed: &str,
    ) -> Result<Zeroizing<Vec<u8>>, FieldError> {
        let bound = URL_SAFE_NO_PAD.encode(format!("{}|{row}", field.name()));
        sealed
            .strip_prefix(&format!("c:{bound}:"))
            .and_then(|v| URL_SAFE_NO_PAD.decode(v).ok())
            .map(Zeroizing::new)
            .ok_or_else(|| FieldError("not for this field and row".into()))
    }
    fn blind(&self, field: Field, value: &[u8]) -> String {
        format!("b:{}:{}", field.name(), URL_SAFE_NO_PAD.encode(value))
    }
    fn key_of(&self, sealed: &str) -> Option<String> {
        sealed.starts_with("c:").then(|| "c".to_string())
    }
    fn active_key(&self) -> String {
        "c".into()
    }
}

pub struct Fixture {
    _dir: tempfile::TempDir,
    pub state: GatewayState,
    pub queue: Arc<SqliteQueue>,
    pub secret: String,
}

pub async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let queue = Arc::new(
        SqliteQueue::open(
            &dir.path().join("sparkle.db"),
            &Default::default(),
            Arc::new(ClearFields),
        )
        .await
        .expect("queue"),
    );
    let (_, secret) = queue
        .create_key("app", &[Scope::Generate, Scope::Read])
        .await
        .expect("key");
    let keys = Arc::new(MasterKeys::fixed(Keyring::generate(1)));
    let store = ObjectImageStore::local(&dir.path().join("images"), keys.clone()).expect("store");
    let options = Arc::new(GatewayOptions {
        public_url: PUBLIC.into(),
        ..GatewayOptions::default()
    });
    let state = GatewayState {
        queue: queue.clone(),
        keys: queue.clone(),
        store: Arc::new(store),
        links: Arc::new(ImageLinks::new(keys, Duration::from_secs(3600))),
        catalog: Arc::new(Catalog {
            models: vec![ModelEntry::new("tiny", 64)],
        }),
        limits: Arc::new(Limits::default()),
        admission: Arc::new(Admission::new(&options)),
        events: sparkle_delivery::events::JobEvents::new(queue.clone(), Default::default()),
        outbox: queue.clone(),
        streams: crate::StreamPermits::new(16, 4),
        webhooks: sparkle_delivery::webhook::UrlPolicy::default(),
        options,
        discord: None,
    };
    Fixture {
        _dir: dir,
        state,
        queue,
        secret: secret.expose().to_string(),
    }
}

impl Fixture {
    /// A request with the given headers (a JSON body is labelled as one).
    pub async fn send_with(
        &self,
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if !body.is_empty() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        crate::router(self.state.clone())
            .oneshot(request.body(Body::from(body.to_string())).expect("request"))
            .await
            .expect("infallible")
    }

    /// A request, with the fixture's key when `key`.
    pub async fn send(&self, method: &str, uri: &str, key: bool, body: &str) -> Response {
        let bearer = format!("Bearer {}", self.secret);
        let headers: &[(&str, &str)] = if key {
            &[("authorization", &bearer)]
        } else {
            &[]
        };
        self.send_with(method, uri, headers, body).await
    }

    /// A succeeded job with one stored image; its id.
    pub async fn finished_job(&self) -> JobId {
        let answer = self
            .send(
                "POST",
                "/v1/jobs",
                true,
                r#"{"prompt": "a corgi", "steps": 1}"#,
            )
            .await;
        assert_eq!(answer.status(), StatusCode::ACCEPTED);
        let view = json_of(answer).await;
        let id: JobId = view["id"].as_str().expect("id").parse().expect("job id");
        let leased = self
            .queue
            .lease("test", 1, Duration::from_secs(60))
            .await
            .expect("lease");
        let image = ImageKey { job: id, index: 0 };
        self.state
            .store
            .put(
                image,
                Some(leased[0].job.attempts),
                bytes::Bytes::from_static(PNG),
            )
            .await
            .expect("put");
        self.queue
            .complete(&leased[0].token, 1)
            .await
            .expect("complete");
        id
    }
}

pub async fn body_of(answer: Response) -> Vec<u8> {
    axum::body::to_bytes(answer.into_body(), 1 << 20)
        .await
        .expect("body")
        .to_vec()
}

pub async fn json_of(answer: Response) -> Value {
    serde_json::from_slice(&body_of(answer).await).expect("json")
}
