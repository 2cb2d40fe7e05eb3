//! Signed image links: made for every image a job shows, checked when one is fetched
//! without an API key.

use crate::{ApiError, GatewayState};
use serde_json::{json, Value};
use sparkle_core::JobId;
use sparkle_queue::Job;
use sparkle_store::{ImageKey, LinkQuery, LinkRefusal, SignedLink};
use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A signed link to image `index` of `job`, made with the gateway's public URL.
pub fn sign(state: &GatewayState, job: JobId, index: u32) -> SignedLink {
    state.links.sign(
        &state.options.public_url,
        ImageKey { job, index },
        unix_now(),
    )
}

/// The images of a job as its views show them: `{"index", "url", "expires_at"}` each, the
/// URL a signed link that fetches the PNG without an API key.
pub fn image_views(state: &GatewayState, job: &Job) -> Vec<Value> {
    (0..job.images)
        .map(|index| {
            let link = sign(state, job.id, index);
            json!({ "index": index, "url": link.url, "expires_at": link.expires_at })
        })
        .collect()
}

/// The job a signed link opens image `n` of, and the seconds the link has left; refused
/// unless the link is genuine, live, and names this very image.
pub async fn linked_job(
    state: &GatewayState,
    id: &str,
    n: &str,
    query: &LinkQuery,
) -> Result<(Job, i64), ApiError> {
    let job: JobId = id.parse().map_err(|_| LinkRefusal::Altered)?;
    let index: u32 = n.parse().map_err(|_| LinkRefusal::Altered)?;
    let now = unix_now();
    state.links.verify(ImageKey { job, index }, query, now)?;
    let job = state
        .queue
        .get(job)
        .await?
        .ok_or_else(ApiError::job_not_found)?;
    // `verify` accepted the expiry, so it parses.
    let left = query.expires.parse::<i64>().unwrap_or(now) - now;
    Ok((job, left.max(0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Admission, GatewayOptions};
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use axum::response::Response;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use sparkle_core::{Catalog, Limits, ModelEntry};
    use sparkle_queue::{ApiKeys, Field, FieldCipher, FieldError, JobQueue, Scope, SqliteQueue};
    use sparkle_seal::{Keyring, MasterKeys};
    use sparkle_store::{ImageLinks, ObjectImageStore};
    use std::sync::Arc;
    use std::time::Duration;
    use tower::ServiceExt;
    use zeroize::Zeroizing;

    const PUBLIC: &str = "https://sparkle.test:8443";
    const PNG: &[u8] = b"\x89PNG\r\n\x1a\nnot really a picture";

    /// Fields in the clear, bound to their field and row: these tests are about links.
    struct ClearFields;

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

    struct Fixture {
        _dir: tempfile::TempDir,
        state: GatewayState,
        queue: Arc<SqliteQueue>,
        secret: String,
    }

    async fn fixture() -> Fixture {
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
        let store =
            ObjectImageStore::local(&dir.path().join("images"), keys.clone()).expect("store");
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
        async fn send(&self, method: &str, uri: &str, key: bool, body: &str) -> Response {
            let mut request = Request::builder().method(method).uri(uri);
            if key {
                request = request.header(header::AUTHORIZATION, format!("Bearer {}", self.secret));
            }
            if !body.is_empty() {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            crate::router(self.state.clone())
                .oneshot(request.body(Body::from(body.to_string())).expect("request"))
                .await
                .expect("infallible")
        }

        /// A succeeded job with one stored image; its id.
        async fn finished_job(&self) -> JobId {
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

    async fn body_of(answer: Response) -> Vec<u8> {
        axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .expect("body")
            .to_vec()
    }

    async fn json_of(answer: Response) -> Value {
        serde_json::from_slice(&body_of(answer).await).expect("json")
    }

    /// The path and query of a link made for `PUBLIC`.
    fn route_of(url: &str) -> String {
        url.strip_prefix(PUBLIC).expect("public URL").to_string()
    }

    #[tokio::test]
    async fn a_jobs_image_links_fetch_it_without_a_key_and_nothing_else() {
        let f = fixture().await;
        let id = f.finished_job().await;
        let view = json_of(f.send("GET", &format!("/v1/jobs/{id}"), true, "").await).await;
        let images = view["images"].as_array().expect("images");
        assert_eq!(images.len(), 1, "{view}");
        assert_eq!(images[0]["index"], 0);
        let url = images[0]["url"].as_str().expect("url");
        let expires_at = images[0]["expires_at"].as_i64().expect("expires_at");
        assert!((expires_at - unix_now() - 3600).abs() <= 2, "{view}");
        let link = route_of(url);
        assert!(link.starts_with(&format!("/v1/jobs/{id}/images/0?expires=")));

        let answer = f.send("GET", &link, false, "").await;
        assert_eq!(answer.status(), StatusCode::OK);
        let cache = answer.headers()[header::CACHE_CONTROL]
            .to_str()
            .expect("ascii")
            .to_string();
        let max_age: i64 = cache
            .strip_prefix("private, max-age=")
            .and_then(|s| s.parse().ok())
            .expect(&cache);
        assert!((3590..=3600).contains(&max_age), "{cache}");
        assert_eq!(body_of(answer).await, PNG);

        let refused = |answer: Response| async move {
            assert_eq!(answer.status(), StatusCode::FORBIDDEN);
            let no_store = answer.headers()[header::CACHE_CONTROL].clone();
            assert_eq!(no_store, "no-store");
            let error = json_of(answer).await;
            assert_eq!(error["error"]["code"], "invalid_image_link", "{error}");
            error["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let (head, sig) = link.split_once("&sig=").expect("sig");
        let flipped = if sig.starts_with('A') { "B" } else { "A" };
        let forged = format!("{head}&sig={flipped}{}", &sig[1..]);
        let message = refused(f.send("GET", &forged, false, "").await).await;
        assert!(message.contains("not valid"), "{message}");
        let other_image = link.replacen("/images/0?", "/images/1?", 1);
        refused(f.send("GET", &other_image, false, "").await).await;
        let unsigned = link.split_once("&key=").expect("key").0.to_string();
        refused(f.send("GET", &unsigned, false, "").await).await;

        let stale = f
            .state
            .links
            .sign(PUBLIC, ImageKey { job: id, index: 0 }, unix_now() - 7200);
        let message = refused(f.send("GET", &route_of(&stale.url), false, "").await).await;
        assert!(message.contains("expired"), "{message}");

        // The key still works as it always did, and without either there is no image.
        let answer = f
            .send("GET", &format!("/v1/jobs/{id}/images/0"), true, "")
            .await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(
            answer.headers()[header::CACHE_CONTROL],
            "private, max-age=3600"
        );
        let answer = f
            .send("GET", &format!("/v1/jobs/{id}/images/0"), false, "")
            .await;
        assert_eq!(answer.status(), StatusCode::UNAUTHORIZED);
    }
}
