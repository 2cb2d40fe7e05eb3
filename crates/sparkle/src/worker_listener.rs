//! The control plane's side of the worker protocol (see `sparkle_worker::protocol`), on its
//! own listener (`worker_listen`): workers exchange an enrollment secret for a worker token,
//! then lease, heartbeat, complete with their images, fail and release. The control plane
//! seals and stores the images; workers hold no database, store or master-key credentials.

use crate::control_plane::QueuePlane;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::http::{header, request::Parts, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use sparkle_queue::{ApiKeys, Failure, HeartbeatOutcome, LeaseToken, Scope};
use sparkle_store::WorkerTokens;
use sparkle_worker::protocol::{self, *};
use sparkle_worker::{ControlPlane, PlaneError};
use std::sync::Arc;
use std::time::Duration;

/// Largest completion body: the images of one job (n ≤ 10 images of up to 32 MiB each is
/// far beyond what any size makes).
const MAX_COMPLETION_BYTES: usize = 256 * 1024 * 1024;

/// How long a lease is extended while its completion is stored.
const COMPLETION_GRACE: Duration = Duration::from_secs(120);

#[derive(Clone)]
pub struct WorkerApi {
    pub plane: Arc<QueuePlane>,
    pub keys: Arc<dyn ApiKeys>,
    pub tokens: Arc<WorkerTokens>,
}

pub fn router(api: WorkerApi) -> Router {
    Router::new()
        .route(protocol::TOKEN, post(token))
        .route(protocol::CAPACITY, post(capacity))
        .route(protocol::LEASE, post(lease))
        .route(protocol::HEARTBEAT, post(heartbeat))
        .route(protocol::COMPLETE, post(complete))
        .route(protocol::FAIL, post(fail))
        .route(protocol::RELEASE, post(release))
        .route(protocol::SOURCE, post(source))
        .layer(DefaultBodyLimit::max(MAX_COMPLETION_BYTES))
        .with_state(api)
}

/// A refusal in the protocol's shape.
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let Refusal(status, code, message) = self;
        let mut response = (
            status,
            Json(WireError {
                code: code.into(),
                message,
            }),
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<PlaneError> for Refusal {
    fn from(e: PlaneError) -> Self {
        match e {
            PlaneError::LeaseLost(_) => Refusal(StatusCode::CONFLICT, "lease_lost", e.to_string()),
            PlaneError::Unavailable(why) => {
                tracing::warn!(error = %why, "worker protocol: unavailable");
                Refusal(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the control plane cannot reach the queue or the image store; retry shortly"
                        .into(),
                )
            }
            PlaneError::Unauthorized(why) => Refusal(StatusCode::UNAUTHORIZED, "unauthorized", why),
            PlaneError::Refused(why) => Refusal(StatusCode::UNPROCESSABLE_ENTITY, "refused", why),
            PlaneError::ModelsNotServed(why) => {
                Refusal(StatusCode::UNPROCESSABLE_ENTITY, "models_not_served", why)
            }
        }
    }
}

fn bad_request(message: impl Into<String>) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, "invalid_request", message.into())
}

fn bearer(headers: &HeaderMap) -> Result<&str, Refusal> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            Refusal(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send the worker token as `Authorization: Bearer <token>`".into(),
            )
        })
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The enrollment a request's worker token was issued to.
struct Enrolled(String);

impl FromRequestParts<WorkerApi> for Enrolled {
    type Rejection = Refusal;

    async fn from_request_parts(parts: &mut Parts, api: &WorkerApi) -> Result<Self, Refusal> {
        let token = bearer(&parts.headers)?;
        api.tokens
            .verify(token, now_secs())
            .map(Enrolled)
            .map_err(|why| {
                Refusal(
                    StatusCode::UNAUTHORIZED,
                    "invalid_worker_token",
                    why.to_string(),
                )
            })
    }
}

/// Names a worker by its enrollment, so one enrollment cannot speak for another's workers.
fn worker_name(enrolled: &Enrolled, worker: &str) -> Result<String, Refusal> {
    if worker.is_empty() || worker.len() > 200 || worker.chars().any(char::is_control) {
        return Err(bad_request("worker must be 1 to 200 printable characters"));
    }
    Ok(format!("{}/{worker}", enrolled.0))
}

/// Most models a worker may name in one call.
const MAX_MODELS: usize = 256;

fn model_names(field: &str, names: &[String]) -> Result<(), Refusal> {
    if names.len() > MAX_MODELS {
        return Err(bad_request(format!(
            "{field} names at most {MAX_MODELS} models"
        )));
    }
    match names.iter().find(|n| !sparkle_core::is_model_name(n)) {
        Some(bad) => Err(bad_request(format!("{field}: {bad:?} is not a model name"))),
        None => Ok(()),
    }
}

fn lease_token(job_id: &str, lease_id: &str) -> Result<LeaseToken, Refusal> {
    Ok(LeaseToken {
        job_id: job_id
            .parse()
            .map_err(|_| bad_request("job_id is not a job id"))?,
        lease_id: lease_id.to_string(),
    })
}

async fn token(
    State(api): State<WorkerApi>,
    headers: HeaderMap,
) -> Result<Json<TokenGrant>, Refusal> {
    let secret = bearer(&headers)?;
    let refused = || {
        Refusal(
            StatusCode::UNAUTHORIZED,
            "invalid_enrollment",
            "the enrollment secret is not valid, or its enrollment was revoked".into(),
        )
    };
    let key = api
        .keys
        .authenticate(secret)
        .await
        .map_err(|e| Refusal::from(PlaneError::from(e)))?
        .ok_or_else(refused)?;
    if !key.allows(Scope::Worker) {
        return Err(refused());
    }
    let (token, expires_at) = api.tokens.issue(&key.id, now_secs());
    tracing::info!(enrollment = %key.id, "worker token issued");
    Ok(Json(TokenGrant { token, expires_at }))
}

async fn capacity(
    State(api): State<WorkerApi>,
    enrolled: Enrolled,
    Json(report): Json<CapacityReport>,
) -> Result<StatusCode, Refusal> {
    let worker = worker_name(&enrolled, &report.worker)?;
    model_names("model", std::slice::from_ref(&report.model))?;
    model_names("evicted", &report.evicted)?;
    if !(report.load_secs.is_finite() && report.load_secs >= 0.0) {
        return Err(bad_request(
            "load_secs must be a number of seconds, 0 or more",
        ));
    }
    let load = sparkle_worker::ModelLoaded {
        model: report.model,
        pixels: report.pixels,
        seconds: report.load_secs,
        evicted: report.evicted,
    };
    api.plane.loaded(&worker, &load).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn lease(
    State(api): State<WorkerApi>,
    enrolled: Enrolled,
    Json(ask): Json<LeaseAsk>,
) -> Result<Json<Vec<WireLease>>, Refusal> {
    let worker = worker_name(&enrolled, &ask.worker)?;
    if ask.max == 0 || ask.max > MAX_LEASE {
        return Err(bad_request(format!("max must be 1 to {MAX_LEASE}")));
    }
    let visibility = Duration::from_millis(ask.visibility_ms);
    if visibility < Duration::from_secs(1) || visibility > MAX_VISIBILITY {
        return Err(bad_request("visibility_ms must be 1000 to 3600000"));
    }
    model_names("serves", &ask.models.serves)?;
    model_names("loaded", &ask.models.loaded)?;
    let wait = Duration::from_millis(ask.wait_ms).min(MAX_WAIT);
    let leases = api
        .plane
        .lease(
            &worker,
            &ask.models,
            ask.batch_key.as_deref(),
            ask.max,
            visibility,
            wait,
        )
        .await?;
    let mut wire = Vec::with_capacity(leases.len());
    for lease in &leases {
        match WireLease::of(lease) {
            Ok(w) => wire.push(w),
            Err(why) => {
                tracing::error!(job = %lease.job.id, error = %why, "a leased job could not be sent")
            }
        }
    }
    Ok(Json(wire))
}

async fn heartbeat(
    State(api): State<WorkerApi>,
    _: Enrolled,
    Json(report): Json<HeartbeatReport>,
) -> Result<Json<HeartbeatAnswer>, Refusal> {
    let token = lease_token(&report.job_id, &report.lease_id)?;
    let visibility = Duration::from_millis(report.visibility_ms).min(MAX_VISIBILITY);
    let outcome = api
        .plane
        .heartbeat(&token, report.progress, visibility)
        .await?;
    Ok(Json(HeartbeatAnswer {
        cancelled: outcome == HeartbeatOutcome::Cancelled,
    }))
}

#[derive(serde::Deserialize)]
struct CompleteQuery {
    job_id: String,
    lease_id: String,
}

async fn complete(
    State(api): State<WorkerApi>,
    _: Enrolled,
    Query(query): Query<CompleteQuery>,
    body: Bytes,
) -> Result<StatusCode, Refusal> {
    let token = lease_token(&query.job_id, &query.lease_id)?;
    let images =
        unframe_images(body).ok_or_else(|| bad_request("the images' framing is broken"))?;
    // The lease is checked (and extended) before anything is stored: while it is held, the
    // job's attempt is this lease's, which the images are named by.
    if api.plane.heartbeat(&token, None, COMPLETION_GRACE).await? == HeartbeatOutcome::Cancelled {
        return Err(PlaneError::LeaseLost(token.job_id).into());
    }
    let job = api
        .plane
        .job(token.job_id)
        .await?
        .ok_or(PlaneError::LeaseLost(token.job_id))?;
    if images.len() != job.request.n as usize {
        return Err(bad_request(format!(
            "the job asks for {} images; {} were sent",
            job.request.n,
            images.len()
        )));
    }
    let lease = sparkle_queue::Lease { job, token };
    api.plane.complete(&lease, images).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn fail(
    State(api): State<WorkerApi>,
    _: Enrolled,
    Json(report): Json<FailureReport>,
) -> Result<Json<FailAnswer>, Refusal> {
    let token = lease_token(&report.job_id, &report.lease_id)?;
    let failure = Failure {
        code: report.code,
        message: report.message,
        detail: report.detail,
        retryable: report.retryable,
    };
    let status = api.plane.fail(&token, failure).await?;
    Ok(Json(FailAnswer {
        status: status.to_string(),
    }))
}

async fn source(
    State(api): State<WorkerApi>,
    _: Enrolled,
    Json(ask): Json<SourceAsk>,
) -> Result<Response, Refusal> {
    let token = lease_token(&ask.job_id, &ask.lease_id)?;
    let visibility = Duration::from_millis(ask.visibility_ms).min(MAX_VISIBILITY);
    let png = api.plane.source(&token, visibility).await?;
    Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response())
}

async fn release(
    State(api): State<WorkerApi>,
    _: Enrolled,
    Json(reference): Json<LeaseRef>,
) -> Result<StatusCode, Refusal> {
    let token = lease_token(&reference.job_id, &reference.lease_id)?;
    api.plane.release(&token).await?;
    Ok(StatusCode::NO_CONTENT)
}
