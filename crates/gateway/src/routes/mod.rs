mod discord;
#[cfg(test)]
pub(crate) mod fixture;
mod health;
mod jobs;
pub(crate) mod links;
mod models;
mod openai;
pub(crate) mod openapi;
mod page;
mod session;
mod submit;
pub(crate) mod views;

use crate::{limits, ApiError, GatewayState};
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;
use sparkle_core::ErrorCode;
use tower_http::set_header::SetResponseHeaderLayer;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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
/// OpenAI route and event streams) the answer within it too. The API's routes are declared
/// once, with their OpenAPI description, which `/openapi.json` serves.
pub fn router(state: GatewayState) -> Router {
    let (router, document) = api(&state).split_for_parts();
    // Made and serialised once: every request gets the same bytes.
    let document =
        openapi::for_deployment(openapi::finish(document), &state.limits, &state.catalog);
    let document = bytes::Bytes::from(serde_json::to_vec(&document).unwrap_or_default());
    let router = router
        .route(
            "/openapi.json",
            get(move || {
                std::future::ready((
                    [(header::CONTENT_TYPE, "application/json")],
                    document.clone(),
                ))
            }),
        )
        .merge(page::routes())
        // `read_body` bounds every body (by route and credentials); axum's own 2 MiB
        // default would refuse the images the image routes take.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(from_fn_with_state(state.clone(), limits::read_body))
        .layer(from_fn_with_state(state.clone(), limits::per_ip));
    with_security_headers(router).with_state(state)
}

/// The API's routes and their description.
pub(crate) fn api(state: &GatewayState) -> OpenApiRouter<GatewayState> {
    let waiting = OpenApiRouter::new()
        .routes(routes!(openai::generate))
        .routes(routes!(openai::edit))
        .routes(routes!(jobs::events));
    let answering = OpenApiRouter::new()
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(discord::interactions))
        .routes(routes!(models::list))
        .routes(routes!(models::show))
        .routes(routes!(jobs::create, jobs::list))
        .routes(routes!(jobs::show, jobs::cancel))
        .routes(routes!(jobs::image))
        .routes(routes!(session::sign_in, session::show, session::sign_out))
        .fallback(|| async { ApiError::new(ErrorCode::NotFound, "no such route") })
        .layer(from_fn_with_state(state.clone(), limits::deadline));
    waiting.merge(answering)
}

/// Adds [`SECURITY_HEADERS`], and `Cache-Control: no-store` where a route set no caching
/// of its own (answers belong to one API key).
pub(crate) fn with_security_headers<S: Clone + Send + Sync + 'static>(
    mut router: Router<S>,
) -> Router<S> {
    for (name, value) in SECURITY_HEADERS {
        // The page sets a policy of its own that lets it load its own script and style.
        let layer = if *name == header::CONTENT_SECURITY_POLICY {
            SetResponseHeaderLayer::if_not_present
        } else {
            SetResponseHeaderLayer::overriding
        };
        router = router.layer(layer(name.clone(), HeaderValue::from_static(value)));
    }
    router.layer(SetResponseHeaderLayer::if_not_present(
        header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    ))
}
