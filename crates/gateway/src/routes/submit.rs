//! The one path every generation request takes: validate, admit, enqueue.

use crate::auth::Caller;
use crate::{ApiError, GatewayState};
use axum::http::HeaderMap;
use sparkle_core::{ErrorCode, ImageRequest};
use sparkle_queue::{Enqueued, NewJob, Scope};

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

/// Validates, admits and commits a request. Nothing is enqueued unless every check passes.
pub async fn submit(
    state: &GatewayState,
    caller: &Caller,
    request: ImageRequest,
    end_user: Option<&str>,
    dedup_key: Option<String>,
) -> Result<Enqueued, ApiError> {
    caller.require(Scope::Generate)?;
    let fingerprint = request.fingerprint();
    let valid = request.validate(&state.limits, &state.catalog, rand::random::<u32>)?;
    let stats = state.queue.stats().await?;
    if stats.queued >= state.options.max_queued_jobs {
        return Err(
            ApiError::new(ErrorCode::QueueFull, "the queue is full; retry later").retry_after(30),
        );
    }
    // Fairness is per key, and per end user within a key when the client names one.
    let group = match end_user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(user) => format!(
            "{}:{}",
            caller.0.id,
            user.chars().take(64).collect::<String>()
        ),
        None => caller.0.id.clone(),
    };
    let enqueued = state
        .queue
        .enqueue(NewJob {
            owner: caller.0.id.clone(),
            group,
            dedup_key,
            fingerprint,
            request: valid,
            max_attempts: state.options.max_attempts,
        })
        .await?;
    if enqueued.created {
        tracing::info!(job = %enqueued.job.id, key = %caller.0.id, "job enqueued");
    }
    Ok(enqueued)
}
