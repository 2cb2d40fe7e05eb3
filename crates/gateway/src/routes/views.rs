//! The shapes the API answers with. The OpenAPI document at `/openapi.json` is derived from
//! these types and the routes' annotations, so what is served and what is described are
//! one thing.

use serde::Serialize;
use sparkle_core::{ErrorCode, JobStatus, Progress, Scheduler};
use utoipa::ToSchema;

/// A job, as every route that shows one shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    /// The job's id (a UUID).
    pub id: String,
    /// Always `job`.
    #[schema(example = "job")]
    pub object: &'static str,
    pub status: JobStatus,
    /// Attempts made so far (a worker that vanished mid-job costs one).
    pub attempts: u32,
    pub max_attempts: u32,
    /// Unix seconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The request, with every default filled in.
    pub request: RequestView,
    /// Denoising steps done, while it runs.
    pub progress: Option<Progress>,
    /// The images, once it succeeded: each with a signed link that needs no key.
    pub images: Vec<ImageView>,
    /// Why it failed, when it did.
    pub error: Option<JobErrorView>,
    /// Jobs that will be leased before this one (queued jobs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Estimated seconds until it starts (queued jobs only, once throughput is known).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    /// Where each answer it owes stands (webhooks, Discord): on single-job reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Vec<DeliveryView>>,
}

/// A job's request as it runs: what was asked, with the model's defaults filled in.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RequestView {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    /// `WIDTHxHEIGHT`.
    #[schema(example = "512x512")]
    pub size: String,
    pub steps: u32,
    pub guidance_scale: f32,
    /// The first image's seed; image `i` uses `seed + i`.
    pub seed: u32,
    pub scheduler: Scheduler,
    pub n: u32,
    /// With a source image: `image` (image-to-image) or `inpaint` (part of it repainted);
    /// absent for text-to-image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<&'static str>,
    /// With a source image: the share of the schedule that runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// A second pass at a larger size, which the images come out at.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresView>,
    /// The LoRAs applied (from `loras` and the prompt's tags), by name.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<sparkle_core::LoraWeight>,
}

/// A job's second pass.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HiresView {
    /// `WIDTHxHEIGHT` of the images.
    #[schema(example = "1024x1024")]
    pub size: String,
    pub steps: u32,
    pub strength: f32,
}

/// One image of a finished job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageView {
    pub index: u32,
    /// A signed link to the PNG, good without an API key until `expires_at`.
    pub url: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// Why a job failed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobErrorView {
    pub code: String,
    pub message: String,
}

/// Where one answer a job owes stands.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DeliveryView {
    /// `webhook` or `discord`.
    pub channel: String,
    /// `pending`, `delivered`, `abandoned` or `dead`.
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// Unix seconds (pending deliveries only).
    pub next_attempt_at: Option<i64>,
}

/// A page of the key's jobs, newest first, in OpenAI's list shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobList {
    /// Always `list`.
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<JobView>,
    pub first_id: Option<String>,
    /// Pass as `before` for the next page.
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// A finished job, deleted.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub deleted: bool,
}

/// A model this deployment serves, in OpenAI's shape with the defaults a request naming it
/// gets.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelView {
    pub id: String,
    /// Always `model`.
    #[schema(example = "model")]
    pub object: &'static str,
    /// OpenAI's field; when a model was made is not known here, so 0.
    pub created: i64,
    pub owned_by: &'static str,
    /// The model a request naming none gets.
    pub default: bool,
    #[schema(example = "512x512")]
    pub default_size: String,
    pub default_steps: u32,
    pub default_guidance_scale: f32,
    pub default_scheduler: Scheduler,
    /// LoRAs a request for this model may apply (`loras`, `<lora:NAME:WEIGHT>`).
    pub loras: Vec<String>,
    /// Textual-inversion embeddings a prompt for this model may name.
    pub embeddings: Vec<String>,
}

/// The models this deployment serves, the default first.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<ModelView>,
}

/// OpenAI's answer to an image generation.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: i64,
    pub data: Vec<GeneratedImage>,
    /// The job behind the answer, also readable at `/v1/jobs/{id}`.
    pub id: String,
}

/// One generated image: the PNG in base64, or a signed link to it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct GeneratedImage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revised_prompt: Option<String>,
    pub seed: u64,
}

/// Every error, in OpenAI's error shape.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// What went wrong, naming the field, the limit and the value given.
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `authentication_error`,
    /// `not_found_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The field or header concerned, if any.
    pub param: Option<&'static str>,
    pub code: ErrorCode,
}

/// A signed-in browser session.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionView {
    /// Always `session`.
    #[schema(example = "session")]
    pub object: &'static str,
    /// The name of the API key the session acts as.
    pub key_name: String,
    /// What it may do: `generate`, `read`, `admin`.
    pub scopes: Vec<&'static str>,
    /// Unix seconds.
    pub expires_at: i64,
    /// Send as `X-CSRF-Token` with every request that changes something.
    pub csrf_token: String,
}

/// A PNG image.
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary, content_media_type = "image/png")]
pub struct Png(#[allow(dead_code)] Vec<u8>);

/// Server-sent events: `progress` (a [`JobView`] as JSON) whenever the job's state or queue
/// position changes, then one `done` with the final state.
#[derive(ToSchema)]
#[schema(value_type = String)]
pub struct JobEvents(#[allow(dead_code)] String);
