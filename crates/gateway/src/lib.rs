//! The front door: HTTPS, authentication, validation and admission, then the queue.
//!
//! Every request follows one path: connection caps → TLS (rustls) → header limits and
//! timeouts ([`listener`]) → per-address rate → body limit and timeout ([`limits`]) → API key
//! (or, to fetch one image, a signed link) →
//! [`ImageRequest::validate`](sparkle_core::ImageRequest::validate) → admission (queue
//! capacity) → enqueue, which commits before anything is answered → the answer. Errors
//! become HTTP in one place ([`ApiError`]), in OpenAI's error shape with a stable code from
//! the core error table, for every route.
//!
//! The gateway never makes images and never talks to workers: it reads job state and images
//! back from the queue and the image store, which makes it stateless and replicable.

mod auth;
mod error;
mod json;
pub mod limits;
pub mod listener;
mod routes;
mod state;
pub mod streams;
pub mod tls;

pub use axum_server::tls_rustls::RustlsConfig;
pub use error::ApiError;
pub use listener::{serve_tls, ListenerOptions};
pub use routes::links::image_views;
pub use state::{
    Admission, DiscordEndpoint, DiscordPolicies, DiscordPolicy, DiscordRates, GatewayOptions,
    GatewayState,
};
pub use streams::StreamPermits;

use axum::Router;

/// All routes of the public listener.
pub fn router(state: GatewayState) -> Router {
    routes::router(state)
}
