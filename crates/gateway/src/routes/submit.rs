//! The one path every generation request takes: validate, admit, enqueue.

use crate::auth::Caller;
use crate::{ApiError, GatewayState};
use axum::http::HeaderMap;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Map, Value};
use sparkle_core::{
    ErrorCode, HiresRequest, ImageRequest, JobId, LoraWeight, Outpaint, Scheduler, Source,
};
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
    /// A source image to start from (image-to-image, inpainting): PNG, JPEG or WebP,
    /// base64 or a `data:` URL. It is brought to the canvas by scaling it to cover and
    /// cropping the centre; without `size`, the canvas keeps its aspect ratio.
    image: Option<String>,
    /// With `image`: a mask of its dimensions, white where the model repaints and black
    /// where the image is kept (base64 or a `data:` URL).
    mask: Option<String>,
    /// With `image`: how far the result may move from it, above 0 up to 1 (default 0.75;
    /// 1 with a mask or `outpaint`). `⌊steps × strength⌋` steps run.
    strength: Option<f32>,
    /// With `image`: pixels added on each side for the model to paint in.
    outpaint: Option<Outpaint>,
    /// Without `image`: a second pass at `scale` times the size (A1111's hires fix), from
    /// the first pass's latents upscaled, for `⌊steps × strength⌋` more steps (default:
    /// this request's steps, strength 0.7).
    hires: Option<HiresRequest>,
    /// LoRAs to apply, by name (one of the model's `loras` in `/v1/models`) with a weight
    /// from -4 to 4 (default 1); the prompt may also name them as `<lora:NAME:WEIGHT>`.
    loras: Option<Vec<LoraWeight>>,
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
    /// The request and its uploaded source image (still encoded), once every field is known
    /// to this route.
    pub fn into_request(
        self,
        allowed_extra: &[&str],
    ) -> Result<(ImageRequest, Option<Upload>), ApiError> {
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
        let upload = match (self.image, self.mask) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ApiError {
                    param: Some("mask"),
                    ..ApiError::new(
                        ErrorCode::InvalidImage,
                        "a mask applies to a source image; send one in image",
                    )
                })
            }
            (Some(image), mask) => Some(Upload {
                image: base64_field("image", &image)?,
                mask: mask.map(|m| base64_field("mask", &m)).transpose()?,
                transparent_edits: false,
            }),
        };
        let request = ImageRequest {
            prompt: self.prompt,
            negative_prompt: self.negative_prompt,
            model: self.model,
            size: self.size,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            seed: self.seed,
            scheduler: self.scheduler,
            n: self.n,
            strength: self.strength,
            outpaint: self.outpaint,
            hires: self.hires,
            loras: self.loras,
        };
        Ok((request, upload))
    }
}

/// A source image as a client sent it, not yet decoded.
pub struct Upload {
    pub image: Vec<u8>,
    pub mask: Option<Vec<u8>>,
    /// OpenAI's convention: fully transparent areas are repainted (the mask is its alpha).
    pub transparent_edits: bool,
}

/// The bytes of a base64 field, with or without a `data:image/…;base64,` prefix.
fn base64_field(param: &'static str, text: &str) -> Result<Vec<u8>, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(";base64,")
            .map(|(_, b)| b)
            .ok_or_else(|| ApiError {
                param: Some(param),
                ..ApiError::new(
                    ErrorCode::InvalidImage,
                    format!("{param} is a data: URL that is not base64"),
                )
            })?,
        None => text,
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| ApiError {
            param: Some(param),
            ..ApiError::new(
                ErrorCode::InvalidImage,
                format!("{param} is not base64 (or a data: URL): {e}"),
            )
        })
}

impl Upload {
    /// Decodes and checks the upload off the async threads (decoding a large image takes a
    /// while; its cost is bounded by the limits).
    pub async fn decode(self, state: &GatewayState) -> Result<Source, ApiError> {
        let limits = state.limits.clone();
        tokio::task::spawn_blocking(move || {
            if self.transparent_edits {
                Source::decode_transparent(&self.image, self.mask.as_deref(), &limits)
            } else {
                Source::decode(&self.image, self.mask.as_deref(), &limits)
            }
        })
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("decoding stopped: {e}")))?
        .map_err(ApiError::from)
    }
}

/// The source image a finished job started from, read back for a job that repeats it (a
/// re-roll); `None` for a job from text.
pub async fn stored_source(
    state: &GatewayState,
    job: &sparkle_queue::Job,
) -> Result<Option<Source>, ApiError> {
    if job.request.init.is_none() {
        return Ok(None);
    }
    let png = state
        .store
        .get_source(job.id)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()).retry_after(1))?
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::ImageNotFound,
                format!("job {}'s source image is no longer stored", job.id),
            )
        })?;
    let source = tokio::task::spawn_blocking(move || Source::from_stored(&png))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Internal, format!("decoding stopped: {e}")))?
        .map_err(|why| ApiError::new(ErrorCode::Internal, why))?;
    Ok(Some(source))
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
    /// The source image it starts from, decoded and checked.
    pub source: Option<Source>,
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
    upload: Option<Upload>,
) -> Result<Enqueued, ApiError> {
    caller.require(Scope::Generate)?;
    let source = match upload {
        Some(upload) => Some(upload.decode(state).await?),
        None => None,
    };
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
            source,
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
    Store(sparkle_store::StoreError),
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> ApiError {
        match refused {
            Refused::Invalid(e) => e.into(),
            Refused::Queue(e) => e.into(),
            Refused::Store(e) => {
                tracing::warn!(error = %e, "could not store a source image");
                ApiError::new(ErrorCode::Unavailable, "the image store is not reachable")
                    .retry_after(1)
            }
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
        source,
        dedup_key,
        owner_live_limit,
        group_live_limit,
        replies,
    } = submission;
    // The same request with another image is another request.
    let fingerprint = match &source {
        None => request.fingerprint(),
        Some(source) => format!("{}+{}", request.fingerprint(), source.digest()),
    };
    let outpaint = request.outpaint.unwrap_or_default();
    let facts = source.as_ref().map(|s| s.facts(&outpaint));
    let valid = request
        .validate(
            &state.limits,
            &state.catalog,
            facts.as_ref(),
            rand::random::<u32>,
        )
        .map_err(Refused::Invalid)?;
    // Bounded by what the serving devices can make, as their workers last reported.
    let (out_width, out_height) = valid.output_size();
    let pixels = u64::from(out_width) * u64::from(out_height);
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
                    "{out_width}x{out_height} is {pixels} pixels; the serving devices make images of at most {budget} pixels (e.g. {side}x{side})"
                ),
            )));
        }
    }
    let id = JobId::random();
    let stored_source = source.is_some();
    // The source is stored (sealed, durably) under the job's id before the job exists, so
    // no worker can lease the job before its source is there.
    if let Some(source) = source {
        let (width, height) = (valid.width, valid.height);
        let png = tokio::task::spawn_blocking(move || source.fit(width, height, &outpaint))
            .await
            .map_err(|e| {
                Refused::Invalid(sparkle_core::RequestError::new(
                    ErrorCode::Internal,
                    None,
                    format!("preparing the source image stopped: {e}"),
                ))
            })?;
        state
            .store
            .put_source(id, bytes::Bytes::from(png))
            .await
            .map_err(Refused::Store)?;
    }
    let enqueued = state
        .queue
        .enqueue(NewJob {
            id,
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
        .await;
    let enqueued = match enqueued {
        Ok(enqueued) => enqueued,
        Err(e) => {
            // A failure may come after the job committed (its read-back, a lost reply): the
            // source goes only once the job is known not to exist; else the sweep decides.
            if stored_source && matches!(state.queue.get(id).await, Ok(None)) {
                forget_source(state, id).await;
            }
            return Err(Refused::Queue(e));
        }
    };
    if stored_source && !enqueued.created {
        // An earlier submission under the same idempotency key: its job has its own.
        forget_source(state, id).await;
    }
    if enqueued.created {
        metrics::counter!("sparkle_jobs_submitted_total").increment(1);
        tracing::info!(job = %enqueued.job.id, %owner, "job enqueued");
    }
    Ok(enqueued)
}

/// Removes a source stored for a job that was not created (best effort: the sweep removes
/// what this leaves).
async fn forget_source(state: &GatewayState, id: JobId) {
    if let Err(e) = state.store.delete_job(id).await {
        tracing::warn!(job = %id, error = %e, "an unused source image is left to the sweep");
    }
}
