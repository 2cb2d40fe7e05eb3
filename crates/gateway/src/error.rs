use crate::routes::views::{ErrorBody, ErrorDetail};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sparkle_core::{ErrorCode, RequestError};
use sparkle_queue::QueueError;
use sparkle_store::{LinkRefusal, StoreError};

/// Seconds a key over its job quota is asked to wait: about what a small job takes.
const QUOTA_RETRY_AFTER_SECS: u64 = 5;

/// Every error the gateway answers with. Rendered in OpenAI's error shape:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub param: Option<&'static str>,
    pub message: String,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            param: None,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn job_not_found() -> Self {
        ApiError::new(ErrorCode::JobNotFound, "no such job")
    }
}

impl From<RequestError> for ApiError {
    fn from(e: RequestError) -> Self {
        ApiError {
            code: e.code,
            param: e.param,
            message: e.message,
            retry_after_secs: None,
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::IdempotencyConflict => ApiError {
                param: Some("Idempotency-Key"),
                ..ApiError::new(
                    ErrorCode::IdempotencyConflict,
                    "this Idempotency-Key was already used with a different request",
                )
            },
            QueueError::OwnerQuota { live, limit } => ApiError::new(
                ErrorCode::JobQuotaExceeded,
                format!(
                    "this key already has {live} queued or running jobs (the limit is {limit}); retry when one finishes"
                ),
            )
            .retry_after(QUOTA_RETRY_AFTER_SECS),
            QueueError::GroupQuota { live, limit } => ApiError::new(
                ErrorCode::JobQuotaExceeded,
                format!(
                    "you already have {live} queued or running jobs (the limit is {limit}); retry when one finishes"
                ),
            )
            .retry_after(QUOTA_RETRY_AFTER_SECS),
            QueueError::QueueFull { .. } => {
                ApiError::new(ErrorCode::QueueFull, "the queue is full; retry later").retry_after(30)
            }
            other => {
                tracing::error!(error = %other, "queue error");
                ApiError::new(
                    ErrorCode::Unavailable,
                    "the job queue is unavailable; retry shortly",
                )
                .retry_after(1)
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "image store error");
        ApiError::new(
            ErrorCode::Unavailable,
            "the image store is unavailable; retry shortly",
        )
        .retry_after(1)
    }
}

impl From<LinkRefusal> for ApiError {
    fn from(refusal: LinkRefusal) -> Self {
        let message = match refusal {
            LinkRefusal::Expired => {
                "this image link has expired; GET /v1/jobs/{id} with your API key gives a new one"
            }
            LinkRefusal::UnknownKey => {
                "this image link is not valid: the key that signed it has been retired"
            }
            LinkRefusal::Altered | LinkRefusal::Malformed => "this image link is not valid",
        };
        ApiError::new(ErrorCode::InvalidImageLink, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!("sparkle_requests_refused_total", "code" => self.code.as_str())
            .increment(1);
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                message: self.message,
                kind: self.code.kind(),
                param: self.param,
                code: self.code,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after_secs {
            if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, value);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}
