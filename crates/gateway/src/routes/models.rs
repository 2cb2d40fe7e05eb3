//! `GET /v1/models` and `GET /v1/models/{model}`, as OpenAI's models API: the models this
//! deployment serves, the default first, each with the defaults a request naming it gets.

use super::views::{ModelList, ModelView};
use crate::auth::Caller;
use crate::{ApiError, GatewayState};
use axum::extract::{Path, State};
use sparkle_core::{ErrorCode, ModelEntry};

fn model_view(model: &ModelEntry, default: bool) -> ModelView {
    ModelView {
        id: model.name.clone(),
        object: "model",
        created: 0,
        owned_by: "sparkle",
        default,
        default_size: format!("{}x{}", model.default_width, model.default_height),
        default_steps: model.default_steps,
        default_guidance_scale: model.default_guidance_scale,
        default_scheduler: model.default_scheduler,
        loras: model.loras.clone(),
        embeddings: model.embeddings.clone(),
    }
}

/// The models this deployment serves, the default first.
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses((status = 200, body = ModelList)),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn list(State(state): State<GatewayState>, _caller: Caller) -> axum::Json<ModelList> {
    let data = state
        .catalog
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| model_view(m, i == 0))
        .collect();
    axum::Json(ModelList {
        object: "list",
        data,
    })
}

/// One model, with the defaults a request naming it gets.
#[utoipa::path(
    get,
    path = "/v1/models/{model}",
    tag = "models",
    params(("model" = String, Path, description = "The model's name")),
    responses((status = 200, body = ModelView), (status = 404)),
    security(("bearer" = []), ("session" = [])),
)]
pub async fn show(
    State(state): State<GatewayState>,
    _caller: Caller,
    Path(name): Path<String>,
) -> Result<axum::Json<ModelView>, ApiError> {
    let models = &state.catalog.models;
    match models.iter().position(|m| m.name == name) {
        Some(i) => Ok(axum::Json(model_view(&models[i], i == 0))),
        None => Err(ApiError::new(
            ErrorCode::NotFound,
            format!(
                "model {name:?} is not served here; available: {}",
                models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
