//! What a worker asks of the control plane, and nothing more: leases, heartbeats, and the
//! end of each lease (complete with the images, fail, release). The worker loop speaks only
//! this; [`Embedded`] answers it from the queue and the image store in the same process, as
//! the control plane's side of the worker protocol does for remote workers.

use crate::engine_thread::ModelLoaded;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sparkle_core::{JobStatus, Progress};
use sparkle_queue::{Failure, HeartbeatOutcome, JobQueue, Lease, LeaseToken, QueueError};
use sparkle_store::{ImageKey, ImageStore};
use std::sync::Arc;
use std::time::Duration;

/// Why a call to the control plane did not do what it asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PlaneError {
    /// The lease is no longer this worker's (expired, reclaimed, the job cancelled): its
    /// job must be dropped, its images are no one's.
    #[error("the lease on job {0} was lost")]
    LeaseLost(sparkle_core::JobId),
    /// The control plane (or what it stands on) cannot be reached now; the call may be
    /// repeated, every call being safe to repeat.
    #[error("the control plane is unavailable: {0}")]
    Unavailable(String),
    /// The control plane no longer accepts this worker (its enrollment revoked, its token
    /// refused): the worker stops.
    #[error("the control plane refused this worker: {0}")]
    Unauthorized(String),
    /// Refused for good; repeating it will not help.
    #[error("{0}")]
    Refused(String),
    /// The worker serves none of the deployment's models: it has nothing to do here.
    #[error("{0}")]
    ModelsNotServed(String),
}

impl From<QueueError> for PlaneError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::LeaseLost(id) => PlaneError::LeaseLost(id),
            e if e.is_unavailable() => PlaneError::Unavailable(e.to_string()),
            e => PlaneError::Refused(e.to_string()),
        }
    }
}

/// The models a worker serves and, of those, the ones it has loaded now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serving {
    pub serves: Vec<String>,
    pub loaded: Vec<String>,
}

/// The control plane as a worker sees it. Every call is idempotent under retry: a
/// completion repeated after its answer was lost succeeds and completes nothing twice.
#[async_trait]
pub trait ControlPlane: Send + Sync {
    /// Tells the control plane this worker loaded a model: the largest image (pixels) it
    /// makes of it, what the load took, and which models it unloaded to make room.
    async fn loaded(&self, worker: &str, load: &ModelLoaded) -> Result<(), PlaneError>;

    /// Up to `max` compatible jobs (with `batch_key` when given), leased for `visibility`;
    /// waits up to `wait` for work when none is queued (a long poll). Only jobs for models
    /// the worker serves; those for models it has loaded first.
    async fn lease(
        &self,
        worker: &str,
        models: &Serving,
        batch_key: Option<&str>,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, PlaneError>;

    /// Extends a lease by `visibility` and reports progress; says whether the job was
    /// cancelled meanwhile.
    async fn heartbeat(
        &self,
        lease: &LeaseToken,
        progress: Option<Progress>,
        visibility: Duration,
    ) -> Result<HeartbeatOutcome, PlaneError>;

    /// Hands the job's PNGs over and completes it: stored (sealed) before the job is
    /// marked succeeded, so a succeeded job always has its images.
    async fn complete(&self, lease: &Lease, images: Vec<Bytes>) -> Result<(), PlaneError>;

    /// Ends a lease with a failure; the job's status after it.
    async fn fail(&self, lease: &LeaseToken, failure: Failure) -> Result<JobStatus, PlaneError>;

    /// Gives a lease back unworked, without spending an attempt.
    async fn release(&self, lease: &LeaseToken) -> Result<(), PlaneError>;
}

/// The control plane's side: the queue and the image store of this process.
pub struct Embedded {
    queue: Arc<dyn JobQueue>,
    store: Arc<dyn ImageStore>,
    /// The models the deployment serves.
    models: Vec<String>,
}

impl Embedded {
    pub fn new(
        queue: Arc<dyn JobQueue>,
        store: Arc<dyn ImageStore>,
        models: Vec<String>,
    ) -> Embedded {
        Embedded {
            queue,
            store,
            models,
        }
    }

    async fn lease_once(
        &self,
        worker: &str,
        models: Option<&[String]>,
        batch_key: Option<&str>,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        match (batch_key, models) {
            (Some(key), _) => {
                self.queue
                    .lease_compatible(worker, key, max, visibility)
                    .await
            }
            (None, None) => self.queue.lease(worker, max, visibility).await,
            (None, Some(models)) => {
                self.queue
                    .lease_models(worker, models, max, visibility)
                    .await
            }
        }
    }

    /// The job as the queue has it now.
    pub async fn job(
        &self,
        id: sparkle_core::JobId,
    ) -> Result<Option<sparkle_queue::Job>, PlaneError> {
        Ok(self.queue.get(id).await?)
    }

    /// Removes what one attempt stored.
    async fn discard(&self, lease: &Lease) {
        if let Err(e) = self
            .store
            .delete_attempt(lease.job.id, Some(lease.job.attempts))
            .await
        {
            tracing::warn!(job = %lease.job.id, error = %e, "could not remove this attempt's images");
        }
    }
}

#[async_trait]
impl ControlPlane for Embedded {
    async fn loaded(&self, worker: &str, load: &ModelLoaded) -> Result<(), PlaneError> {
        if !self.models.contains(&load.model) {
            return Err(PlaneError::Refused(format!(
                "model {} is not served here",
                load.model
            )));
        }
        let model = load.model.clone();
        metrics::histogram!("sparkle_model_load_seconds", "model" => model.clone())
            .record(load.seconds);
        metrics::counter!("sparkle_model_loads_total", "model" => model.clone()).increment(1);
        if !load.evicted.is_empty() {
            metrics::counter!("sparkle_model_swaps_total", "model" => model).increment(1);
        }
        Ok(self
            .queue
            .report_capacity(worker, &load.model, load.pixels)
            .await?)
    }

    async fn lease(
        &self,
        worker: &str,
        models: &Serving,
        batch_key: Option<&str>,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, PlaneError> {
        let order = lease_order(&self.models, models)?;
        if let Some(key) = batch_key {
            let model = key.split('|').next().unwrap_or_default();
            if !models.serves.iter().any(|m| m == model) {
                return Err(PlaneError::Refused(format!(
                    "this worker does not serve model {model}"
                )));
            }
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            for models in &order {
                let leases = self
                    .lease_once(worker, models.as_deref(), batch_key, max, visibility)
                    .await?;
                if !leases.is_empty() {
                    return Ok(leases);
                }
                if batch_key.is_some() {
                    break;
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            self.queue.wait_for_work(deadline - now).await;
        }
    }

    async fn heartbeat(
        &self,
        lease: &LeaseToken,
        progress: Option<Progress>,
        visibility: Duration,
    ) -> Result<HeartbeatOutcome, PlaneError> {
        Ok(self.queue.heartbeat(lease, progress, visibility).await?)
    }

    async fn complete(&self, lease: &Lease, images: Vec<Bytes>) -> Result<(), PlaneError> {
        let count = images.len() as u32;
        // Named by this attempt: should the lease be lost meanwhile, these files cannot
        // replace the images another attempt completes the job with.
        let attempt = Some(lease.job.attempts);
        for (index, png) in images.into_iter().enumerate() {
            let key = ImageKey {
                job: lease.job.id,
                index: index as u32,
            };
            if let Err(e) = self.store.put(key, attempt, png).await {
                self.discard(lease).await;
                // The store's error names paths and hosts: operators get it, clients not.
                let failure = Failure {
                    code: "store_unavailable".into(),
                    message: "the image store could not be written".into(),
                    detail: Some(e.to_string()),
                    retryable: true,
                };
                self.queue.fail(&lease.token, failure).await?;
                return Err(PlaneError::Refused(
                    "the image store could not be written; the job will be retried".into(),
                ));
            }
        }
        match self.queue.complete(&lease.token, count).await {
            Ok(()) => Ok(()),
            Err(QueueError::LeaseLost(id)) => {
                // Cancelled, or reclaimed for another attempt: these images are no one's.
                self.discard(lease).await;
                Err(PlaneError::LeaseLost(id))
            }
            // Whether the completion committed is unknown: the images stay (an orphan
            // sweep removes them if the job is not theirs), and a retry finds out.
            Err(e) => Err(e.into()),
        }
    }

    async fn fail(&self, lease: &LeaseToken, failure: Failure) -> Result<JobStatus, PlaneError> {
        Ok(self.queue.fail(lease, failure).await?)
    }

    async fn release(&self, lease: &LeaseToken) -> Result<(), PlaneError> {
        Ok(self.queue.release(lease).await?)
    }
}

/// The sets of models a worker's asks lease from, in order of preference: those it has
/// loaded, then every one it serves; `None` stands for every model of the deployment (the
/// queue's cheapest ask).
fn lease_order(
    deployment: &[String],
    serving: &Serving,
) -> Result<Vec<Option<Vec<String>>>, PlaneError> {
    let serves: Vec<String> = deployment
        .iter()
        .filter(|m| serving.serves.contains(m))
        .cloned()
        .collect();
    if serves.is_empty() {
        return Err(PlaneError::ModelsNotServed(format!(
            "this worker serves none of the models served here ({}); it serves {}",
            deployment.join(", "),
            serving.serves.join(", ")
        )));
    }
    let loaded: Vec<String> = serves
        .iter()
        .filter(|m| serving.loaded.contains(m))
        .cloned()
        .collect();
    let every = |set: Vec<String>| (set.len() < deployment.len()).then_some(set);
    let mut order = Vec::with_capacity(2);
    if !loaded.is_empty() {
        order.push(every(loaded.clone()));
    }
    if loaded.len() < serves.len() {
        order.push(every(serves));
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn serving(serves: &[&str], loaded: &[&str]) -> Serving {
        Serving {
            serves: names(serves),
            loaded: names(loaded),
        }
    }

    #[test]
    fn loaded_models_are_asked_for_first_then_the_rest_served() {
        let deployment = names(&["sd15", "sdxl", "turbo"]);
        let order = |s: &Serving| lease_order(&deployment, s).expect("an order");
        assert_eq!(
            order(&serving(&["sd15", "sdxl"], &["sdxl"])),
            [Some(names(&["sdxl"])), Some(names(&["sd15", "sdxl"]))]
        );
        // Everything served and loaded: one ask for any model.
        assert_eq!(
            order(&serving(
                &["turbo", "sdxl", "sd15"],
                &["sd15", "sdxl", "turbo"]
            )),
            [None]
        );
        // Everything served, one loaded: that one, then any.
        assert_eq!(
            order(&serving(&["sd15", "sdxl", "turbo"], &["turbo"])),
            [Some(names(&["turbo"])), None]
        );
        // Names the deployment does not serve are ignored; loaded must be served.
        assert_eq!(
            order(&serving(&["sd15", "other"], &["other"])),
            [Some(names(&["sd15"]))]
        );
        assert!(matches!(
            lease_order(&deployment, &serving(&["other"], &[])),
            Err(PlaneError::ModelsNotServed(_))
        ));
    }
}
