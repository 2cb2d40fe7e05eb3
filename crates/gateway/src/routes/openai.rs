//! `POST /v1/images/generations`, as OpenAI's images API: the official clients work
//! unchanged. It is synchronous — the answer carries the images — but the job behind it
//! is as durable as any other: a client that disconnects can still find it by its
//! `Idempotency-Key`. With `response_format: "url"` each image is a signed, expiring link
//! that fetches the PNG without an API key, as OpenAI's own URLs do.

use super::jobs::image_bytes;
use super::links;
use super::submit::{idempotency_key, submit, GenerationBody, Upload};
use super::views::{GeneratedImage, ImagesResponse};
use crate::auth::Caller;
use crate::json::Json;
use crate::{ApiError, GatewayState};
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::{Multipart, State};
use axum::http::HeaderMap;
use base64::Engine as _;
use sparkle_core::{ErrorCode, JobId, JobStatus, Scheduler};
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
    let as_url = answers_with_images(&body)?;
    let dedup = idempotency_key(&headers)?;
    let user = body.user.clone();
    let (request, upload) = body.into_request(OPENAI_ONLY)?;
    let enqueued = submit(
        &state,
        &caller,
        request,
        user.as_deref(),
        dedup,
        None,
        upload,
    )
    .await?;
    answer_with_images(&state, enqueued.job.id, as_url).await
}

/// Checks a body for a route that answers with its images (no webhook); whether they are
/// wanted as links (`response_format: "url"`) rather than base64.
fn answers_with_images(body: &GenerationBody) -> Result<bool, ApiError> {
    if body.webhook_url.is_some() {
        return Err(ApiError {
            param: Some("webhook_url"),
            ..ApiError::new(
                ErrorCode::InvalidJson,
                "webhook_url belongs to /v1/jobs; this route answers with the images",
            )
        });
    }
    wants_url(body.response_format.as_deref())
}

/// `response_format`: `b64_json` (the default) or `url`.
fn wants_url(format: Option<&str>) -> Result<bool, ApiError> {
    match format {
        None | Some("b64_json") => Ok(false),
        Some("url") => Ok(true),
        Some(other) => Err(ApiError {
            param: Some("response_format"),
            ..ApiError::new(
                ErrorCode::InvalidResponseFormat,
                format!("response_format must be b64_json or url; got {other:?}"),
            )
        }),
    }
}

/// Waits for job `id` and answers with its images, as OpenAI's image routes do.
async fn answer_with_images(
    state: &GatewayState,
    id: JobId,
    as_url: bool,
) -> Result<axum::Json<ImagesResponse>, ApiError> {
    let job = wait_until_final(state, id).await?;
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
            let link = links::sign(state, id, i);
            data.push(GeneratedImage {
                b64_json: None,
                url: Some(link.url),
                revised_prompt: None,
                seed: seed.into(),
            });
        } else {
            let png = image_bytes(state, &job, &i.to_string()).await?;
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

/// The form of `POST /v1/images/edits`, as OpenAI's clients send it (`multipart/form-data`).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct EditForm {
    /// The image to edit: PNG, JPEG or WebP. Its fully transparent areas are repainted
    /// when no mask is sent; an image without any is edited as a whole (image-to-image).
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    /// What the edited image shows.
    prompt: String,
    /// A PNG of the image's dimensions whose fully transparent areas are repainted.
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<Vec<u8>>,
    /// One of `/v1/models` (default: the first).
    model: Option<String>,
    /// Images to make.
    n: Option<u32>,
    /// `WIDTHxHEIGHT` (default: the image's aspect ratio at the model's size).
    size: Option<String>,
    /// `b64_json` (default) or `url`.
    response_format: Option<String>,
    /// An end user of the calling application, for fairness between its users.
    user: Option<String>,
    /// Sparkle's extensions, as on `/v1/images/generations`.
    negative_prompt: Option<String>,
    steps: Option<u32>,
    guidance_scale: Option<f32>,
    seed: Option<u64>,
    #[schema(value_type = Option<Scheduler>)]
    scheduler: Option<String>,
    /// How far the result may move from the image, above 0 up to 1 (default 0.75; 1
    /// where a mask or transparency says what to repaint).
    strength: Option<f32>,
}

/// Fields OpenAI's edit route defines for its own models; accepted and ignored.
const OPENAI_EDIT_ONLY: &[&str] = &[
    "quality",
    "background",
    "input_fidelity",
    "output_format",
    "output_compression",
    "partial_images",
    "stream",
];

/// OpenAI's image edit: the image (and mask) as multipart form fields; waits for the
/// images and answers with them, as `/v1/images/generations` does.
#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "openai",
    request_body(content = EditForm, content_type = "multipart/form-data"),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried request wait for the job the first one made", pattern = "^[ -~]*[!-~][ -~]*$", max_length = 255)),
    responses((status = 200, body = ImagesResponse), (status = 409), (status = 504)),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn edit(
    State(state): State<GatewayState>,
    caller: Caller,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<axum::Json<ImagesResponse>, ApiError> {
    let mut form = form.map_err(|e| {
        ApiError::new(
            ErrorCode::UnsupportedMediaType,
            format!("the body must be multipart/form-data: {}", e.body_text()),
        )
    })?;
    let dedup = idempotency_key(&headers)?;
    let broken = |e: MultipartError| {
        ApiError::new(
            ErrorCode::InvalidJson,
            format!("the form cannot be read: {}", e.body_text()),
        )
    };
    let mut image = None;
    let mut mask = None;
    let mut fields = serde_json::Map::new();
    while let Some(field) = form.next_field().await.map_err(broken)? {
        let name = field.name().unwrap_or_default().to_string();
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_some() {
                    return Err(ApiError {
                        param: Some("image"),
                        ..ApiError::new(ErrorCode::InvalidImage, "send one image to edit")
                    });
                }
                image = Some(field.bytes().await.map_err(broken)?.to_vec());
            }
            "mask" => mask = Some(field.bytes().await.map_err(broken)?.to_vec()),
            _ => {
                let text = field.text().await.map_err(broken)?;
                let value = form_value(&name, text);
                fields.insert(name, value);
            }
        }
    }
    let image = image.ok_or_else(|| ApiError {
        param: Some("image"),
        ..ApiError::new(
            ErrorCode::InvalidImage,
            "image is required: the image to edit",
        )
    })?;
    let body: GenerationBody = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| ApiError::new(ErrorCode::InvalidJson, e.to_string()))?;
    let as_url = answers_with_images(&body)?;
    let user = body.user.clone();
    let (request, upload) = body.into_request(OPENAI_EDIT_ONLY)?;
    if upload.is_some() || request.outpaint.is_some() {
        return Err(ApiError::new(
            ErrorCode::InvalidJson,
            "send the image and mask as files of the form",
        ));
    }
    let upload = Upload {
        image,
        mask,
        transparent_edits: true,
    };
    let enqueued = submit(
        &state,
        &caller,
        request,
        user.as_deref(),
        dedup,
        None,
        Some(upload),
    )
    .await?;
    answer_with_images(&state, enqueued.job.id, as_url).await
}

/// The form's numeric fields.
const NUMBERS: &[&str] = &["n", "steps", "guidance_scale", "seed", "strength"];

/// A form field's text as the JSON value it stands for: a number for the numeric fields
/// (when it reads as one), text otherwise; the fields' types then check it, as for a JSON
/// body.
fn form_value(name: &str, text: String) -> serde_json::Value {
    match text.trim().parse::<serde_json::Number>() {
        Ok(number) if NUMBERS.contains(&name) => serde_json::Value::Number(number),
        _ => serde_json::Value::String(text),
    }
}
