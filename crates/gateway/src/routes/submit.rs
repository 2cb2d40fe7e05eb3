//! The one path every generation request takes: validate, admit, enqueue.

use crate::auth::Caller;
use crate::{ApiError, GatewayState};
use axum::http::HeaderMap;
use serde::Deserialize;
use serde_json::{Map, Value};
use sparkle_core::{ErrorCode, ImageRequest, Scheduler};
use sparkle_delivery::webhooks::WebhookReply;
use sparkle_queue::{Enqueued, NewJob, ReplyTarget, Scope};

/// The body of both generation routes: OpenAI's fields plus Sparkle's extensions. Fields
/// nobody defines are refused, so a typo (`"stpes"`) is an error, not a silently ignored
/// setting; `allowed_extra` names fields a route accepts and ignores.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct GenerationBody {
    /// What to draw.
    #[schema(example = "a corgi, style of monet")]
    prompt: String,
    /// What to steer away from.
    negative_prompt: Option<String>,
    /// One of `/v1/models` (default: the first).
    model: Option<String>,
    /// `WIDTHxHEIGHT`, multiples of 8 (default: the model's).
    #[schema(example = "512x512")]
    size: Option<String>,
    /// Denoising steps (default: the model's).
    steps: Option<u32>,
    /// How strongly the prompt steers (classifier-free guidance).
    guidance_scale: Option<f32>,
    /// The first image's seed (default: random); image `i` uses `seed + i`.
    seed: Option<u64>,
    /// The sampler (default: the model's).
    #[schema(value_type = Option<Scheduler>)]
    scheduler: Option<String>,
    /// Images to make.
    n: Option<u32>,
    /// An end user of the calling application, for fairness between its users.
    pub user: Option<String>,
    /// OpenAI's `b64_json` or `url` (the synchronous route only).
    pub response_format: Option<String>,
    /// Where to POST the job's outcome (the jobs route only).
    pub webhook_url: Option<String>,
    #[serde(flatten)]
    #[schema(ignore)]
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

/// A request on its way into the queue, with everything admission counts against.
pub struct Submission {
    /// Who may see and cancel the job (an API key id, or `discord`).
    pub owner: String,
    /// Its fairness share (an API key, or one Discord user): shares take turns.
    pub share: String,
    /// Its group inside the share (an end user of the key): orders jobs inside the share only.
    pub group: String,
    pub request: ImageRequest,
    pub dedup_key: Option<String>,
    /// Most queued and running jobs the owner may have.
    pub owner_live_limit: Option<u64>,
    /// Most queued and running jobs the group may have.
    pub group_live_limit: Option<u64>,
    /// The answers the job owes, written with it.
    pub replies: Vec<ReplyTarget>,
}

/// Validates, admits and commits a request from an API key, with a webhook when one is
/// asked for. Nothing is enqueued unless every check passes.
pub async fn submit(
    state: &GatewayState,
    caller: &Caller,
    request: ImageRequest,
    end_user: Option<&str>,
    dedup_key: Option<String>,
    webhook_url: Option<&str>,
) -> Result<Enqueued, ApiError> {
    caller.require(Scope::Generate)?;
    // The key is the fair share; an end user the client names only orders jobs inside it.
    let group = match end_user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(user) => format!(
            "{}:{}",
            caller.0.id,
            user.chars().take(64).collect::<String>()
        ),
        None => caller.0.id.clone(),
    };
    let mut replies = Vec::new();
    if let Some(url) = webhook_url {
        replies.push(webhook_reply(state, caller, url).await?);
    }
    let quota = state.options.max_live_jobs_per_key;
    enqueue(
        state,
        Submission {
            owner: caller.0.id.clone(),
            share: caller.0.id.clone(),
            group,
            request,
            dedup_key,
            owner_live_limit: (quota > 0).then_some(quota),
            group_live_limit: None,
            replies,
        },
    )
    .await
    .map_err(ApiError::from)
}

/// The webhook a job owes `url`, once the URL is known to point somewhere it may and the
/// key has a secret to sign with.
async fn webhook_reply(
    state: &GatewayState,
    caller: &Caller,
    url: &str,
) -> Result<ReplyTarget, ApiError> {
    // The key's secret first: the address check may wait on a name lookup.
    if state.keys.webhook_secrets(&caller.0.id).await?.is_empty() {
        return Err(ApiError {
            param: Some("webhook_url"),
            ..ApiError::new(
                ErrorCode::WebhookSecretMissing,
                format!(
                    "this API key has no webhook signing secret; make one with `sparkle key rotate-webhook-secret {}`",
                    caller.0.id
                ),
            )
        });
    }
    let url = state.webhooks.check(url).await.map_err(|why| ApiError {
        param: Some("webhook_url"),
        ..ApiError::new(ErrorCode::InvalidWebhookUrl, why.to_string())
    })?;
    Ok(WebhookReply {
        url: url.to_string(),
        key_id: caller.0.id.clone(),
    }
    .target())
}

/// Why a submission was not enqueued: the request is invalid, or the queue refused it
/// (a limit) or failed.
pub enum Refused {
    Invalid(sparkle_core::RequestError),
    Queue(sparkle_queue::QueueError),
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> ApiError {
        match refused {
            Refused::Invalid(e) => e.into(),
            Refused::Queue(e) => e.into(),
        }
    }
}

/// Validates, admits and commits a submission. The queue counts every limit (the owner's,
/// the group's, the queue's) in the transaction that inserts the job and its replies.
pub async fn enqueue(state: &GatewayState, submission: Submission) -> Result<Enqueued, Refused> {
    let Submission {
        owner,
        share,
        group,
        request,
        dedup_key,
        owner_live_limit,
        group_live_limit,
        replies,
    } = submission;
    let fingerprint = request.fingerprint();
    let valid = request
        .validate(&state.limits, &state.catalog, rand::random::<u32>)
        .map_err(Refused::Invalid)?;
    // Bounded by what the serving devices can make, as their workers last reported.
    let pixels = u64::from(valid.width) * u64::from(valid.height);
    if let Some(budget) = state
        .queue
        .capacity(&valid.model)
        .await
        .map_err(Refused::Queue)?
    {
        if pixels > budget {
            let side = (budget as f64).sqrt() as u64 / 8 * 8;
            return Err(Refused::Invalid(sparkle_core::RequestError::new(
                ErrorCode::TooLargeForDevice,
                Some("size"),
                format!(
                    "{}x{} is {pixels} pixels; the serving devices make images of at most {budget} pixels (e.g. {side}x{side})",
                    valid.width, valid.height
                ),
            )));
        }
    }
    let enqueued = state
        .queue
        .enqueue(NewJob {
            owner: owner.clone(),
            share,
            group,
            dedup_key,
            fingerprint,
            request: valid,
            max_attempts: state.options.max_attempts,
            owner_live_limit,
            group_live_limit,
            max_queued: Some(state.options.max_queued_jobs),
            replies,
        })
        .await
        .map_err(Refused::Queue)?;
    if enqueued.created {
        metrics::counter!("sparkle_jobs_submitted_total").increment(1);
        tracing::info!(job = %enqueued.job.id, %owner, "job enqueued");
    }
    Ok(enqueued)
}
