//! `POST /v1/images/generations`, as OpenAI's images API: the official clients work
//! unchanged. It is synchronous — the answer carries the images — but the job behind it
//! is as durable as any other: a client that disconnects can still find it by its
//! `Idempotency-Key`. With `response_format: "url"` each image is a signed, expiring link
//! that fetches the PNG without an API key, as OpenAI's own URLs do.

use super::jobs::image_bytes;
use super::links;
use super::submit::{idempotency_key, submit, GenerationBody};
use super::views::{GeneratedImage, ImagesResponse};
use crate::auth::Caller;
use crate::json::Json;
use crate::{ApiError, GatewayState};
use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine as _;
use sparkle_core::{ErrorCode, JobId, JobStatus};
use sparkle_queue::Job;
use tokio::time::Instant;

/// Waits for job `id` to reach a final status, pushed by the job events (no polling), for at
/// most the synchronous timeout.
async fn wait_until_final(state: &GatewayState, id: JobId) -> Result<Job, ApiError> {
    let mut subscription = state
        .events
        .subscribe(id)
        .await?
        .ok_or_else(ApiError::job_not_found)?;
    let deadline = Instant::now() + state.options.sync_timeout;
    let mut update = subscription.current();
    loop {
        if update.job.status.is_final() {
            return Ok((*update.job).clone());
        }
        match tokio::time::timeout_at(deadline, subscription.next()).await {
            Ok(Some(next)) => update = next,
            Ok(None) => {
                return Err(ApiError::new(
                    ErrorCode::Unavailable,
                    format!("the gateway is stopping; follow job {id} at /v1/jobs/{id}"),
                )
                .retry_after(1))
            }
            Err(_) => {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!(
                        "job {id} is still {}; follow it at /v1/jobs/{id}",
                        update.job.status
                    ),
                ))
            }
        }
    }
}

/// Fields OpenAI defines for its own models; accepted and ignored so that existing clients
/// keep working.
const OPENAI_ONLY: &[&str] = &[
    "quality",
    "style",
    "background",
    "moderation",
    "output_compression",
    "output_format",
    "partial_images",
    "stream",
];

/// OpenAI's image generation: waits for the images and answers with them (base64, or signed
/// links with `response_format: "url"`).
#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "openai",
    request_body = GenerationBody,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request wait for the job the first one made", pattern = "^[ -~]*[!-~][ -~]*$", max_length = 255)),
    responses((status = 200, body = ImagesResponse), (status = 409), (status = 504)),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn generate(
    State(state): State<GatewayState>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<GenerationBody>,
) -> Result<axum::Json<ImagesResponse>, ApiError> {
    let as_url = match body.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError {
                param: Some("response_format"),
                ..ApiError::new(
                    ErrorCode::InvalidResponseFormat,
                    format!("response_format must be b64_json or url; got {other:?}"),
                )
            })
        }
    };
    let dedup = idempotency_key(&headers)?;
    if body.webhook_url.is_some() {
        return Err(ApiError {
            param: Some("webhook_url"),
            ..ApiError::new(
                ErrorCode::InvalidJson,
                "webhook_url belongs to /v1/jobs; this route answers with the images",
            )
        });
    }
    let user = body.user.clone();
    let request = body.into_request(OPENAI_ONLY)?;
    let enqueued = submit(&state, &caller, request, user.as_deref(), dedup, None).await?;
    let id = enqueued.job.id;
    let job = wait_until_final(&state, id).await?;
    if job.status != JobStatus::Succeeded {
        let reason = job
            .error
            .as_ref()
            .map(|e| e.message.as_str())
            .unwrap_or("no reason recorded");
        return Err(ApiError::new(
            ErrorCode::JobFailed,
            format!("job {id} {}: {reason}", job.status),
        ));
    }
    let mut data = Vec::new();
    for i in 0..job.images {
        let seed = job.request.seed_of(i);
        if as_url {
            let link = links::sign(&state, id, i);
            data.push(GeneratedImage {
                b64_json: None,
                url: Some(link.url),
                revised_prompt: None,
                seed: seed.into(),
            });
        } else {
            let png = image_bytes(&state, &job, &i.to_string()).await?;
            data.push(GeneratedImage {
                b64_json: Some(base64::engine::general_purpose::STANDARD.encode(&png)),
                url: None,
                revised_prompt: Some(job.request.prompt.clone()),
                seed: seed.into(),
            });
        }
    }
    Ok(axum::Json(ImagesResponse {
        created: job.finished_at_ms.unwrap_or(job.created_at_ms) / 1000,
        data,
        id: id.to_string(),
    }))
}
