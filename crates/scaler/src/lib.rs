//! The scaler: every tick it reads the backlog from the queue, turns it into a desired
//! worker count with a [`ScalingPolicy`], and tells an [`Actuator`] to get there.
//!
//! Policies are pure arithmetic over an [`Observation`], tested as such, and the same code
//! runs in the [`simulate`] module's discrete-event simulation; actuators do the starting
//! and stopping: [`LocalProcesses`] runs `sparkle worker` child processes on this machine
//! (one per GPU, pinned to it), [`MetricOnly`] only exports the count for an autoscaler
//! outside, and a Kubernetes actuator scales a Deployment, all behind the same trait.
//! The scaler knows nothing of how images are made.

pub mod cost;
pub mod gpus;
mod kubernetes;
mod local;
mod metric;
mod policy;
pub mod reference;
pub mod simulate;

pub use cost::Rate;
pub use gpus::{Gpu, GpuChoice};
pub use kubernetes::KubernetesDeployment;
pub use local::LocalProcesses;
pub use metric::MetricOnly;
pub use policy::{Observation, Policy, ScalingPolicy, SparklePolicy};
pub use reference::ReferencePolicy;

use async_trait::async_trait;
use sparkle_queue::JobQueue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ScalerError {
    #[error("cannot start a worker: {0}")]
    Spawn(std::io::Error),
    #[error("Kubernetes: {0}")]
    Kubernetes(String),
}

/// What a local worker prints on its standard output once its model is loaded and it
/// starts asking for work: its scaler times the start by it.
pub const READY_LINE: &str = "sparkle-worker ready";

/// Something that can run a number of workers.
#[async_trait]
pub trait Actuator: Send {
    /// Workers running or starting now (after reaping any that exited).
    async fn current(&mut self) -> u32;
    /// Of those, workers not yet ready; 0 when the actuator cannot tell.
    async fn starting(&mut self) -> u32 {
        0
    }
    /// Seconds each worker that became ready since the last call took from its start; empty
    /// when the actuator cannot tell.
    async fn ready_times(&mut self) -> Vec<f64> {
        Vec::new()
    }
    /// Starts or stops workers to reach `desired`. Stopping is graceful: a worker finishes
    /// or gives back its batch.
    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError>;
    /// Stops every worker, waiting up to `drain` for them to finish.
    async fn stop_all(&mut self, drain: Duration);
}

#[async_trait]
impl<A: Actuator + ?Sized> Actuator for Box<A> {
    async fn current(&mut self) -> u32 {
        (**self).current().await
    }
    async fn starting(&mut self) -> u32 {
        (**self).starting().await
    }
    async fn ready_times(&mut self) -> Vec<f64> {
        (**self).ready_times().await
    }
    async fn scale_to(&mut self, desired: u32) -> Result<(), ScalerError> {
        (**self).scale_to(desired).await
    }
    async fn stop_all(&mut self, drain: Duration) {
        (**self).stop_all(drain).await
    }
}

/// What the scaler assumes until it has measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Priors {
    /// Cost units one worker gets through a second.
    pub units_per_sec: f64,
    /// Seconds a started worker takes to be ready.
    pub ready_secs: f64,
}

impl Default for Priors {
    fn default() -> Self {
        // A CPU worker of the tiny model, or a GPU's first seconds: cautious on both.
        Priors {
            units_per_sec: 25.0,
            ready_secs: 10.0,
        }
    }
}

/// Runs the scaling loop until `shutdown`, then stops every worker.
pub async fn run(
    queue: Arc<dyn JobQueue>,
    mut policy: impl ScalingPolicy,
    mut actuator: impl Actuator,
    priors: Priors,
    tick: Duration,
    drain: Duration,
    shutdown: CancellationToken,
) {
    let started = Instant::now();
    let mut throughput = Rate::new(priors.units_per_sec, 8);
    let mut ready = Rate::new(priors.ready_secs, 8);
    let mut ticker = tokio::time::interval(tick);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {}
        }
        match queue.reclaim_expired().await {
            Ok(0) => {}
            Ok(n) => metrics::counter!("sparkle_leases_reclaimed_total").increment(n),
            Err(e) => tracing::warn!(error = %e, "reclaiming expired leases failed"),
        }
        let stats = match queue.stats().await {
            Ok(stats) => stats,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the backlog; holding the worker count");
                continue;
            }
        };
        if let Some(rate) = stats.recent_units_per_sec {
            throughput.observe(rate);
        }
        let current = actuator.current().await;
        for secs in actuator.ready_times().await {
            metrics::histogram!("sparkle_worker_ready_seconds").record(secs);
            ready.observe(secs);
        }
        let seen = Observation {
            now: started.elapsed().as_secs_f64(),
            queued: stats.queued,
            running: stats.running,
            queued_cost: stats.queued_cost,
            running_cost: stats.running_cost,
            workers: current,
            starting: actuator.starting().await,
            busy: u32::try_from(stats.running)
                .unwrap_or(u32::MAX)
                .min(current),
            throughput: throughput.value(),
            ready_secs: ready.value(),
        };
        let desired = policy.desired(&seen);
        metrics::gauge!("sparkle_queue_depth").set(stats.queued as f64);
        metrics::gauge!("sparkle_queue_running").set(stats.running as f64);
        metrics::gauge!("sparkle_queue_cost").set(stats.queued_cost);
        metrics::gauge!("sparkle_queue_running_cost").set(stats.running_cost);
        metrics::gauge!("sparkle_queue_oldest_age_seconds")
            .set(stats.oldest_queued_age_ms.unwrap_or(0) as f64 / 1000.0);
        metrics::gauge!("sparkle_workers").set(f64::from(current));
        metrics::gauge!("sparkle_workers_starting").set(f64::from(seen.starting));
        metrics::gauge!("sparkle_workers_desired").set(f64::from(desired));
        metrics::gauge!("sparkle_worker_units_per_second").set(seen.throughput);
        metrics::gauge!("sparkle_worker_ready_time_seconds").set(seen.ready_secs);
        if desired != current {
            tracing::info!(
                current,
                desired,
                queued = stats.queued,
                running = stats.running,
                queued_cost = stats.queued_cost,
                "scaling"
            );
            if let Err(e) = actuator.scale_to(desired).await {
                tracing::error!(error = %e, "scaling failed");
            }
        }
    }
    actuator.stop_all(drain).await;
}
