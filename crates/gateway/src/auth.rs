use crate::limits::retry_after_secs;
use crate::{ApiError, GatewayState};
use axum::extract::{FromRequestParts, Query};
use axum::http::{header, request::Parts};
use serde::Deserialize;
use sparkle_core::ErrorCode;
use sparkle_queue::{ApiKey, Scope};
use sparkle_store::LinkQuery;

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

/// Who may fetch an image: an API key, or — on a request with no `Authorization` header
/// that carries a link's `expires`, `key` and `sig` — whoever holds a signed link, which the
/// route checks against the image it names.
pub enum ImageAccess {
    Key(Caller),
    Link(LinkQuery),
}

/// The query parameters of a signed image link, each as sent.
#[derive(Deserialize)]
struct LinkParams {
    expires: Option<String>,
    key: Option<String>,
    sig: Option<String>,
}

impl FromRequestParts<GatewayState> for ImageAccess {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &GatewayState,
    ) -> Result<Self, Self::Rejection> {
        if !parts.headers.contains_key(header::AUTHORIZATION) {
            let params = Query::<LinkParams>::try_from_uri(&parts.uri)
                .map_err(|_| ApiError::from(sparkle_store::LinkRefusal::Malformed))?;
            let LinkParams { expires, key, sig } = params.0;
            if expires.is_some() || key.is_some() || sig.is_some() {
                return Ok(ImageAccess::Link(LinkQuery {
                    expires: expires.unwrap_or_default(),
                    key: key.unwrap_or_default(),
                    sig: sig.unwrap_or_default(),
                }));
            }
        }
        Ok(ImageAccess::Key(
            Caller::from_request_parts(parts, state).await?,
        ))
    }
}
