mod discord;
mod health;
mod jobs;
pub(crate) mod links;
mod models;
mod openai;
mod submit;

use crate::{limits, ApiError, GatewayState};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use sparkle_core::ErrorCode;
use tower_http::set_header::SetResponseHeaderLayer;

/// Headers on every response, errors and refusals included. The API serves JSON, PNG and
/// event streams, never pages to embed or scripts to run, so the policy allows nothing.
const SECURITY_HEADERS: &[(HeaderName, &str)] = &[
    (
        header::STRICT_TRANSPORT_SECURITY,
        "max-age=63072000; includeSubDomains",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    ),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// Every route, behind the limits: per-address rate, then the body read within the
/// request timeout, then (except for the routes that wait for images: the synchronous
/// OpenAI route and event streams) the answer within it too.
pub fn router(state: GatewayState) -> Router {
    let waiting = Router::new()
        .route("/v1/images/generations", post(openai::generate))
        .route("/v1/jobs/{id}/events", get(jobs::events));
    let answering = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/discord/interactions", post(discord::interactions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{model}", get(models::show))
        .route("/v1/jobs", post(jobs::create).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::show).delete(jobs::cancel))
        .route("/v1/jobs/{id}/images/{n}", get(jobs::image))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(from_fn_with_state(state.clone(), limits::deadline));
    let router = waiting
        .merge(answering)
        .layer(from_fn_with_state(state.clone(), limits::read_body))
        .layer(from_fn_with_state(state.clone(), limits::per_ip));
    with_security_headers(router).with_state(state)
}

/// Adds [`SECURITY_HEADERS`], and `Cache-Control: no-store` where a route set no caching
/// of its own (answers belong to one API key).
pub(crate) fn with_security_headers<S: Clone + Send + Sync + 'static>(
    mut router: Router<S>,
) -> Router<S> {
    for (name, value) in SECURITY_HEADERS {
        router = router.layer(SetResponseHeaderLayer::overriding(
            name.clone(),
            HeaderValue::from_static(value),
        ));
    }
    router.layer(SetResponseHeaderLayer::if_not_present(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    ))
}
