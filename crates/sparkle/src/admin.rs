//! The admin listener: Prometheus metrics, plain HTTP, meant for loopback or a private
//! network only (it carries no secrets, but it is no business of the public).
//!
//! | metric | kind | meaning |
//! |---|---|---|
//! | `sparkle_queue_depth` | gauge | queued jobs |
//! | `sparkle_queue_running` | gauge | leased jobs |
//! | `sparkle_queue_oldest_age_seconds` | gauge | age of the oldest queued job |
//! | `sparkle_workers` | gauge | local workers running |
//! | `sparkle_workers_desired` | gauge | the scaler's target |
//! | `sparkle_jobs_submitted_total` | counter | jobs accepted (not counting idempotent repeats) |
//! | `sparkle_requests_refused_total{code}` | counter | error answers, by error code |
//! | `sparkle_connections_open` | gauge | connections admitted to the public listener and still open |
//! | `sparkle_connections_refused_total{reason}` | counter | connections closed at once: `max_connections`, `max_connections_per_ip` |
//! | `sparkle_model_load_seconds{model}` | summary | how long workers took to load a model |
//! | `sparkle_model_loads_total{model}`, `sparkle_model_swaps_total{model}` | counter | model loads reported by workers; those that unloaded another model |
//!
//! The README's table has every metric.

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::SocketAddr;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Installs the metrics recorder and serves `/metrics` on `addr` until `shutdown`.
pub async fn start(
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (admin)"))?;
    let bound = listener.local_addr()?;
    println!("Metrics at http://{bound}/metrics");
    let app = Router::new().route("/metrics", get(move || std::future::ready(handle.render())));
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    }))
}
