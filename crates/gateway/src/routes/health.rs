use crate::{ApiError, GatewayState};
use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

/// The process is up.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// The process can serve: its database answers.
pub async fn readyz(State(state): State<GatewayState>) -> Result<Json<Value>, ApiError> {
    let stats = state.queue.stats().await?;
    Ok(Json(
        json!({ "status": "ready", "queued": stats.queued, "running": stats.running }),
    ))
}
