//! The front door: HTTPS, authentication, validation and admission, then the queue.
//!
//! Every request follows one path: TLS (rustls) → body and header limits → API key →
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
mod routes;
mod state;
pub mod tls;

pub use error::ApiError;
pub use state::{DiscordEndpoint, DiscordPolicies, DiscordPolicy, GatewayOptions, GatewayState};

use axum::Router;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// All routes of the public listener.
pub fn router(state: GatewayState) -> Router {
    routes::router(state)
}

/// Serves `router` over TLS on an already bound listener until `shutdown` fires, then lets
/// open requests finish for up to `drain`.
pub async fn serve_tls(
    listener: std::net::TcpListener,
    tls: axum_server::tls_rustls::RustlsConfig,
    router: Router,
    shutdown: CancellationToken,
    drain: Duration,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let handle = axum_server::Handle::new();
    let stopper = handle.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        stopper.graceful_shutdown(Some(drain));
    });
    axum_server::from_tcp_rustls(listener, tls)?
        .http1_only()
        .handle(handle)
        .serve(router.into_make_service_with_connect_info::<SocketAddr>())
        .await
}
