use crate::limits::retry_after_secs;
use crate::{ApiError, GatewayState};
use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use sparkle_core::ErrorCode;
use sparkle_queue::{ApiKey, Scope};

/// The API key that authenticated this request, within its request rate.
pub struct Caller(pub ApiKey);

impl Caller {
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.0.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::InsufficientScope,
                format!("this key lacks the `{}` scope", scope.as_str()),
            ))
        }
    }

    /// Whether this caller may see a job owned by `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        self.0.id == owner || self.0.allows(Scope::Admin)
    }
}

impl FromRequestParts<GatewayState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &GatewayState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::new(
                ErrorCode::MissingApiKey,
                "send your API key as `Authorization: Bearer <key>`",
            )
        })?;
        let secret = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::MissingApiKey,
                    "the Authorization header must be `Bearer <key>`",
                )
            })?;
        let key =
            state.keys.authenticate(secret).await?.ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid")
            })?;
        if let Some(limiter) = &state.admission.per_key {
            if let Err(wait) = limiter.take(&key.id, std::time::Instant::now()) {
                let secs = retry_after_secs(wait);
                return Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!("too many requests with this key; retry in {secs} s"),
                )
                .retry_after(secs));
            }
        }
        Ok(Caller(key))
    }
}
