mod discord;
mod health;
mod jobs;
mod openai;
mod submit;

use crate::{ApiError, GatewayState};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use sparkle_core::ErrorCode;

pub fn router(state: GatewayState) -> Router {
    let body_limit = state.options.max_body_bytes;
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/discord/interactions", post(discord::interactions))
        .route("/v1/images/generations", post(openai::generate))
        .route("/v1/jobs", post(jobs::create))
        .route("/v1/jobs/{id}", get(jobs::show).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/jobs/{id}/images/{n}", get(jobs::image))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}
