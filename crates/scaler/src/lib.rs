//! The scaler: every tick it reads the backlog from the queue, turns it into a desired
//! worker count with a [`Policy`], and tells an [`Actuator`] to get there.
//!
//! Policy is pure arithmetic and tested as such; actuators do the starting and stopping:
//! [`LocalProcesses`] runs `sparkle worker` child processes on this machine (one per GPU),
//! and other actuators (Kubernetes, metric only) come behind the same trait. The scaler
//! knows nothing of how images are made.

mod local;
mod policy;

pub use local::LocalProcesses;
pub use policy::Policy;

use async_trait::async_trait;
use sparkle_queue::JobQueue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("cannot start a worker: {0}")]
    Spawn(std::io::Error),
}

/// Something that can run a number of workers.
#[async_trait]
pub trait Actuator: Send {
    /// Workers running now (after reaping any that exited).
    async fn current(&mut self) -> u32;
    /// Starts or stops workers to reach `desired`. Stopping is graceful: a worker finishes
    /// or gives back its batch.
    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError>;
    /// Stops every worker, waiting up to `drain` for them to finish.
    async fn stop_all(&mut self, drain: Duration);
}

/// Runs the scaling loop until `shutdown`, then stops every worker.
pub async fn run(
    queue: Arc<dyn JobQueue>,
    policy: Policy,
    mut actuator: impl Actuator,
    tick: Duration,
    drain: Duration,
    shutdown: CancellationToken,
) {
    let mut last_busy = Instant::now();
    let mut ticker = tokio::time::interval(tick);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        if let Err(e) = queue.reclaim_expired().await {
            tracing::warn!(error = %e, "reclaiming expired leases failed");
        }
        let stats = match queue.stats().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the backlog; holding the worker count");
                continue;
            }
        };
        if stats.queued + stats.running > 0 {
            last_busy = Instant::now();
        }
        let current = actuator.current().await;
        let desired = policy.desired_workers(&stats, current, last_busy.elapsed());
        metrics::gauge!("sparkle_queue_depth").set(stats.queued as f64);
        metrics::gauge!("sparkle_queue_running").set(stats.running as f64);
        metrics::gauge!("sparkle_queue_oldest_age_seconds")
            .set(stats.oldest_queued_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!("sparkle_workers").set(f64::from(current));
        metrics::gauge!("sparkle_workers_desired").set(f64::from(desired));
        if desired != current {
            tracing::info!(
                current,
                desired,
                queued = stats.queued,
                running = stats.running,
                "scaling"
            );
            if let Err(e) = actuator.scale_to(desired).await {
                tracing::error!(error = %e, "scaling failed");
            }
        }
    }
    actuator.stop_all(drain).await;
}
