use crate::limits::retry_after_secs;
use crate::{ApiError, GatewayState};
use axum::extract::{FromRequestParts, Query};
use axum::http::{header, request::Parts, HeaderMap};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sparkle_core::ErrorCode;
use sparkle_queue::{ApiKey, Scope};
use sparkle_store::LinkQuery;
use subtle::ConstantTimeEq;

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
        let key = match parts.headers.get(header::AUTHORIZATION) {
            Some(header) => {
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
                state.keys.authenticate(secret).await?.ok_or_else(|| {
                    ApiError::new(ErrorCode::InvalidApiKey, "the API key is not valid")
                })?
            }
            None => match session_cookie(&parts.headers) {
                Some(secret) => BrowserSession::open(parts, state, secret).await?.key,
                None => {
                    return Err(ApiError::new(
                        ErrorCode::MissingApiKey,
                        "send your API key as `Authorization: Bearer <key>`, or sign in",
                    ))
                }
            },
        };
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

/// The cookie a signed-in browser holds: `__Host-` makes browsers keep it to this origin,
/// over HTTPS, for every path.
pub const SESSION_COOKIE: &str = "__Host-sparkle_session";
/// The header a signed-in page sends its session's CSRF token in, with every request that
/// changes something.
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The value of the session cookie, when the request carries one.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim())
}

/// The CSRF token of a session: derived from its secret, so nothing more is stored, and
/// unknowable without the cookie (which scripts of other origins cannot read).
pub fn csrf_token(secret: &str) -> String {
    let mut digest = Sha256::new();
    digest.update(b"sparkle csrf\0");
    digest.update(secret.as_bytes());
    hex::encode(digest.finalize())
}

/// A signed-in browser: the session its cookie opens. A request that can change something
/// must carry the session's CSRF token too (`SameSite=Strict` already keeps the cookie off
/// other sites' requests; the token holds where a browser does not honour it).
pub struct BrowserSession {
    pub secret: String,
    pub key: ApiKey,
    pub expires_at_ms: i64,
}

/// Whether the request's credentials (a bearer key, or a session cookie with its CSRF
/// token) hold, without spending the key's request rate: what lets a request send a body
/// larger than `max_body_bytes`.
pub async fn credentials_hold(parts: &Parts, state: &GatewayState) -> bool {
    if let Some(header) = parts.headers.get(header::AUTHORIZATION) {
        let secret = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| !s.is_empty());
        return match secret {
            Some(secret) => matches!(state.keys.authenticate(secret).await, Ok(Some(_))),
            None => false,
        };
    }
    match session_cookie(&parts.headers) {
        Some(secret) => BrowserSession::open(parts, state, secret).await.is_ok(),
        None => false,
    }
}

impl BrowserSession {
    async fn open(parts: &Parts, state: &GatewayState, secret: &str) -> Result<Self, ApiError> {
        let session = state.keys.session(secret).await?.ok_or_else(|| {
            ApiError::new(
                ErrorCode::InvalidApiKey,
                "your session has ended (signed out, expired, or its key was revoked); sign in again",
            )
        })?;
        if !parts.method.is_safe() {
            let sent = parts
                .headers
                .get(CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(sent.ct_eq(csrf_token(secret).as_bytes())) {
                return Err(ApiError {
                    param: Some("X-CSRF-Token"),
                    ..ApiError::new(
                        ErrorCode::InvalidCsrfToken,
                        "a signed-in request that changes something must send the session's csrf_token as X-CSRF-Token",
                    )
                });
            }
        }
        Ok(BrowserSession {
            secret: secret.to_string(),
            key: session.key,
            expires_at_ms: session.expires_at_ms,
        })
    }
}

impl FromRequestParts<GatewayState> for BrowserSession {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &GatewayState,
    ) -> Result<Self, Self::Rejection> {
        let secret = session_cookie(&parts.headers)
            .ok_or_else(|| ApiError::new(ErrorCode::MissingApiKey, "not signed in"))?
            .to_string();
        BrowserSession::open(parts, state, &secret).await
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
