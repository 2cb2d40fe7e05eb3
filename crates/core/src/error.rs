use serde::Serialize;
use std::fmt;

/// The table of every error a client can see: one stable code each, with its HTTP status.
///
/// Codes are part of the API contract: clients match on them, so they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON, or a field has the wrong type.
    InvalidJson,
    /// The body is larger than the gateway accepts.
    BodyTooLarge,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The prompt is empty or only whitespace.
    InvalidPrompt,
    /// The prompt or negative prompt is longer than the limit.
    PromptTooLong,
    /// Width or height is malformed, not a multiple of 8, or out of range.
    InvalidSize,
    /// Steps out of range.
    InvalidSteps,
    /// Number of images out of range.
    InvalidN,
    /// Guidance scale out of range or not a finite number.
    InvalidGuidanceScale,
    /// Seed out of range.
    InvalidSeed,
    /// The model is not served by this deployment.
    UnknownModel,
    /// The scheduler (sampler) is not known.
    UnknownScheduler,
    /// `response_format` is neither `b64_json` nor `url`.
    InvalidResponseFormat,
    /// The `Idempotency-Key` header is empty, too long or not printable ASCII.
    InvalidIdempotencyKey,
    /// A query parameter is unknown or out of range (`GET /v1/jobs`).
    InvalidQuery,
    /// No `Authorization: Bearer` header.
    MissingApiKey,
    /// The key is unknown or revoked.
    InvalidApiKey,
    /// The key lacks the scope this route needs.
    InsufficientScope,
    /// A signed-in page's request that changes something lacks its session's
    /// `X-CSRF-Token`, or carries another.
    InvalidCsrfToken,
    /// A signed image link expired, was altered, or was signed with a retired key.
    InvalidImageLink,
    /// No such job (or it belongs to another key).
    JobNotFound,
    /// No such image on the job.
    ImageNotFound,
    /// The route does not exist.
    NotFound,
    /// The same `Idempotency-Key` was used with a different request.
    IdempotencyConflict,
    /// The job is not finished, so it has no images yet.
    JobNotFinished,
    /// The job already reached a final status, so it cannot be cancelled.
    JobAlreadyFinished,
    /// The job failed, was cancelled or was dead-lettered.
    JobFailed,
    /// Too many requests; see `Retry-After`.
    RateLimited,
    /// The API key already has as many queued and running jobs as it may; see `Retry-After`.
    JobQuotaExceeded,
    /// The queue refuses new work for now; see `Retry-After`.
    QueueFull,
    /// A synchronous request waited longer than the gateway allows.
    Timeout,
    /// The client took longer than the gateway allows to send its request.
    RequestTimeout,
    /// Something failed inside Sparkle; the message says what, without secrets.
    Internal,
    /// A dependency (database, store) is not reachable.
    Unavailable,
    /// `webhook_url` is malformed, not https where https is required, or points at a
    /// private, loopback or link-local address.
    InvalidWebhookUrl,
    /// The key has no webhook signing secret, so its webhooks could not be signed.
    WebhookSecretMissing,
    /// Too many event streams are open, for this key or in all; see `Retry-After`.
    TooManyStreams,
    /// The gateway holds as many connections as it may (in all, or from this address);
    /// see `Retry-After`.
    TooManyConnections,
    /// The image is larger than any serving device can make in the memory it has.
    TooLargeForDevice,
    /// A source image or mask is not PNG, JPEG or WebP, cannot be decoded, is over the byte
    /// or dimension limits, or does not fit the request (a mask of other dimensions,
    /// outpainting margins that leave no room).
    InvalidImage,
    /// `strength` is not above 0 and at most 1, runs no step, or comes without an image.
    InvalidStrength,
    /// `hires` asks for a scale, steps or strength out of range, a final size past the
    /// limits, or comes with a source image.
    InvalidHires,
    /// A LoRA the model does not have, in `loras` or a `<lora:NAME:WEIGHT>` tag.
    UnknownLora,
    /// A LoRA for another model family, a weight out of range, a LoRA named twice, more
    /// than `limits.max_loras`, or a broken `<lora:…>` tag.
    InvalidLora,
}

impl ErrorCode {
    /// Every code, in the order they are documented.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::BodyTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::InvalidPrompt,
        ErrorCode::PromptTooLong,
        ErrorCode::InvalidSize,
        ErrorCode::InvalidSteps,
        ErrorCode::InvalidN,
        ErrorCode::InvalidGuidanceScale,
        ErrorCode::InvalidSeed,
        ErrorCode::UnknownModel,
        ErrorCode::UnknownScheduler,
        ErrorCode::InvalidResponseFormat,
        ErrorCode::InvalidIdempotencyKey,
        ErrorCode::InvalidQuery,
        ErrorCode::MissingApiKey,
        ErrorCode::InvalidApiKey,
        ErrorCode::InsufficientScope,
        ErrorCode::InvalidCsrfToken,
        ErrorCode::InvalidImageLink,
        ErrorCode::JobNotFound,
        ErrorCode::ImageNotFound,
        ErrorCode::NotFound,
        ErrorCode::IdempotencyConflict,
        ErrorCode::JobNotFinished,
        ErrorCode::JobAlreadyFinished,
        ErrorCode::JobFailed,
        ErrorCode::RateLimited,
        ErrorCode::JobQuotaExceeded,
        ErrorCode::QueueFull,
        ErrorCode::Timeout,
        ErrorCode::RequestTimeout,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::InvalidWebhookUrl,
        ErrorCode::WebhookSecretMissing,
        ErrorCode::TooManyStreams,
        ErrorCode::TooManyConnections,
        ErrorCode::TooLargeForDevice,
        ErrorCode::InvalidImage,
        ErrorCode::InvalidStrength,
        ErrorCode::InvalidHires,
        ErrorCode::UnknownLora,
        ErrorCode::InvalidLora,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::InvalidPrompt => "invalid_prompt",
            ErrorCode::PromptTooLong => "prompt_too_long",
            ErrorCode::InvalidSize => "invalid_size",
            ErrorCode::InvalidSteps => "invalid_steps",
            ErrorCode::InvalidN => "invalid_n",
            ErrorCode::InvalidGuidanceScale => "invalid_guidance_scale",
            ErrorCode::InvalidSeed => "invalid_seed",
            ErrorCode::UnknownModel => "unknown_model",
            ErrorCode::UnknownScheduler => "unknown_scheduler",
            ErrorCode::InvalidResponseFormat => "invalid_response_format",
            ErrorCode::InvalidIdempotencyKey => "invalid_idempotency_key",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::MissingApiKey => "missing_api_key",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::InsufficientScope => "insufficient_scope",
            ErrorCode::InvalidCsrfToken => "invalid_csrf_token",
            ErrorCode::InvalidImageLink => "invalid_image_link",
            ErrorCode::JobNotFound => "job_not_found",
            ErrorCode::ImageNotFound => "image_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::IdempotencyConflict => "idempotency_conflict",
            ErrorCode::JobNotFinished => "job_not_finished",
            ErrorCode::JobAlreadyFinished => "job_already_finished",
            ErrorCode::JobFailed => "job_failed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::JobQuotaExceeded => "job_quota_exceeded",
            ErrorCode::QueueFull => "queue_full",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::InvalidWebhookUrl => "invalid_webhook_url",
            ErrorCode::WebhookSecretMissing => "webhook_secret_missing",
            ErrorCode::TooManyStreams => "too_many_streams",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::TooLargeForDevice => "too_large_for_device",
            ErrorCode::InvalidImage => "invalid_image",
            ErrorCode::InvalidStrength => "invalid_strength",
            ErrorCode::InvalidHires => "invalid_hires",
            ErrorCode::UnknownLora => "unknown_lora",
            ErrorCode::InvalidLora => "invalid_lora",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn http_status(self) -> u16 {
        use ErrorCode::*;
        match self {
            InvalidJson
            | InvalidPrompt
            | PromptTooLong
            | InvalidSize
            | InvalidSteps
            | InvalidN
            | InvalidGuidanceScale
            | InvalidSeed
            | UnknownModel
            | UnknownScheduler
            | InvalidResponseFormat
            | InvalidIdempotencyKey
            | InvalidQuery
            | InvalidWebhookUrl
            | WebhookSecretMissing
            | TooLargeForDevice
            | InvalidImage
            | InvalidStrength
            | InvalidHires
            | UnknownLora
            | InvalidLora => 400,
            MissingApiKey | InvalidApiKey => 401,
            InsufficientScope | InvalidCsrfToken | InvalidImageLink => 403,
            JobNotFound | ImageNotFound | NotFound => 404,
            IdempotencyConflict | JobNotFinished | JobAlreadyFinished => 409,
            RequestTimeout => 408,
            BodyTooLarge => 413,
            UnsupportedMediaType => 415,
            RateLimited | JobQuotaExceeded | TooManyStreams => 429,
            JobFailed | Internal => 500,
            QueueFull | Unavailable | TooManyConnections => 503,
            Timeout => 504,
        }
    }

    /// The OpenAI error `type` this code belongs to.
    pub fn kind(self) -> &'static str {
        match self.http_status() {
            401 | 403 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A client error: the code, the field it concerns (if any) and a message that names the
/// field, the limit and the value given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RequestError {
    pub code: ErrorCode,
    pub param: Option<&'static str>,
    pub message: String,
}

impl RequestError {
    pub fn new(code: ErrorCode, param: Option<&'static str>, message: impl Into<String>) -> Self {
        RequestError {
            code,
            param,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_code_once() {
        use utoipa::PartialSchema;
        let schema = serde_json::to_value(ErrorCode::schema()).expect("schema");
        let mut declared: Vec<String> = serde_json::from_value(schema["enum"].clone())
            .expect("the schema enumerates the codes");
        let mut listed: Vec<String> = ErrorCode::ALL
            .iter()
            .map(|c| c.as_str().to_string())
            .collect();
        declared.sort();
        listed.sort();
        assert_eq!(listed, declared);
    }

    #[test]
    fn a_refused_image_link_is_forbidden_under_its_own_code() {
        let code = ErrorCode::InvalidImageLink;
        assert_eq!(code.as_str(), "invalid_image_link");
        assert_eq!(
            serde_json::to_value(code).ok(),
            Some(serde_json::json!(code.as_str())),
            "the serialised name is the code"
        );
        assert_eq!(
            (code.http_status(), code.kind()),
            (403, "authentication_error")
        );
    }
}
