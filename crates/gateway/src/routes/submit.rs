//! The one path every generation request takes: validate, admit, enqueue.

use crate::auth::Caller;
use crate::{ApiError, GatewayState};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value};
use sparkle_core::{ErrorCode, ImageRequest};
use sparkle_queue::{Enqueued, NewJob, Scope};

/// The body of both generation routes: OpenAI's fields plus Sparkle's extensions. Fields
/// nobody defines are refused, so a typo (`"stpes"`) is an error, not a silently ignored
/// setting; `allowed_extra` names fields a route accepts and ignores.
#[derive(Debug, Deserialize)]
pub struct GenerationBody {
    prompt: String,
    negative_prompt: Option<String>,
    model: Option<String>,
    size: Option<String>,
    steps: Option<u32>,
    guidance_scale: Option<f32>,
    seed: Option<u64>,
    scheduler: Option<String>,
    n: Option<u32>,
    /// An end user of the calling application, for fairness between its users.
    pub user: Option<String>,
    /// OpenAI's `b64_json` or `url` (the synchronous route only).
    pub response_format: Option<String>,
    #[serde(flatten)]
    other: Map<String, Value>,
}

impl GenerationBody {
    /// The request, once every field is known to this route.
    pub fn into_request(self, allowed_extra: &[&str]) -> Result<ImageRequest, ApiError> {
        if let Some(field) = self
            .other
            .keys()
            .find(|k| !allowed_extra.contains(&k.as_str()))
        {
            return Err(ApiError::new(
                ErrorCode::InvalidJson,
                format!("unknown field `{field}`"),
            ));
        }
        Ok(ImageRequest {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            model: self.model,
            size: self.size,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            scheduler: self.scheduler,
            n: self.n,
        })
    }
}

const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Reads and checks the `Idempotency-Key` header.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let invalid = || ApiError {
        param: Some("Idempotency-Key"),
        ..ApiError::new(
            ErrorCode::InvalidIdempotencyKey,
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
            ),
        )
    };
    let key = value.to_str().map_err(|_| invalid())?.trim();
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.chars().all(|c| c.is_ascii_graphic() || c == ' ')
    {
        return Err(invalid());
    }
    Ok(Some(key.to_string()))
}

/// Validates, admits and commits a request from an API key. Nothing is enqueued unless
/// every check passes.
pub async fn submit(
    state: &GatewayState,
    caller: &Caller,
    request: ImageRequest,
    end_user: Option<&str>,
    dedup_key: Option<String>,
) -> Result<Enqueued, ApiError> {
    caller.require(Scope::Generate)?;
    // Fairness is per key, and per end user within a key when the client names one.
    let group = match end_user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(user) => format!(
            "{}:{}",
            caller.0.id,
            user.chars().take(64).collect::<String>()
        ),
        None => caller.0.id.clone(),
    };
    let quota = state.options.max_live_jobs_per_key;
    enqueue(
        state,
        &caller.0.id,
        group,
        request,
        dedup_key,
        (quota > 0).then_some(quota),
    )
    .await
}

/// Validates, admits and commits a request for `owner`, in fairness group `group`; with
/// `owner_live_limit`, only while the owner has fewer queued and running jobs.
pub async fn enqueue(
    state: &GatewayState,
    owner: &str,
    group: String,
    request: ImageRequest,
    dedup_key: Option<String>,
    owner_live_limit: Option<u64>,
) -> Result<Enqueued, ApiError> {
    let fingerprint = request.fingerprint();
    let valid = request.validate(&state.limits, &state.catalog, rand::random::<u32>)?;
    let stats = state.queue.stats().await?;
    if stats.queued >= state.options.max_queued_jobs {
        return Err(
            ApiError::new(ErrorCode::QueueFull, "the queue is full; retry later").retry_after(30),
        );
    }
    let enqueued = state
        .queue
        .enqueue(NewJob {
            owner: owner.to_string(),
            group,
            dedup_key,
            fingerprint,
            request: valid,
            max_attempts: state.options.max_attempts,
            owner_live_limit,
        })
        .await?;
    if enqueued.created {
        metrics::counter!("sparkle_jobs_submitted_total").increment(1);
        tracing::info!(job = %enqueued.job.id, %owner, "job enqueued");
    }
    Ok(enqueued)
}
