use crate::{ApiError, GatewayState};
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};
use sparkle_core::ErrorCode;

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, body = Object)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The process can serve: its database answers (one read of the queue's counters, whose
/// cost does not grow with the queue), and jobs it accepts can be run.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses((status = 200, description = "`status`, and the jobs queued and running", body = Object), (status = 503)),
)]
pub async fn readyz(State(state): State<GatewayState>) -> Result<Json<Value>, ApiError> {
    let stats = state.queue.stats().await?;
    if let Some(why) = &state.options.no_workers {
        return Err(ApiError::new(ErrorCode::Unavailable, why.clone()).retry_after(30));
    }
    Ok(Json(
        json!({ "status": "ready", "queued": stats.queued, "running": stats.running }),
    ))
}
