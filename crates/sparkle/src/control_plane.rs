//! The control plane's side of the worker protocol: what a worker asks ([`ControlPlane`]),
//! answered from this process's queue and image store. The worker listener serves it to
//! workers anywhere, the local workers of `sparkle up` included; a worker never holds the
//! database, the store or the keyring.

use async_trait::async_trait;
use bytes::Bytes;
use sparkle_core::{JobStatus, Progress};
use sparkle_queue::{
    Clock, Failure, HeartbeatOutcome, JobQueue, Lease, LeaseToken, QueueError, SystemClock,
};
use sparkle_store::{ImageKey, ImageStore};
use sparkle_worker::{ControlPlane, ModelLoaded, PlaneError, Serving};
use std::sync::Arc;
use std::time::Duration;

/// The control plane's side: the queue and the image store of this process.
pub struct QueuePlane {
    queue: Arc<dyn JobQueue>,
    store: Arc<dyn ImageStore>,
    /// The models the deployment serves.
    models: Vec<String>,
}

impl QueuePlane {
    pub fn new(
        queue: Arc<dyn JobQueue>,
        store: Arc<dyn ImageStore>,
        models: Vec<String>,
    ) -> QueuePlane {
        QueuePlane {
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
impl ControlPlane for QueuePlane {
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
            let model = sparkle_core::model_of_batch_key(key);
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
                    for lease in &leases {
                        let job = &lease.job;
                        if let Some(started) = job.started_at_ms {
                            let waited = (started - job.created_at_ms).max(0) as f64 / 1000.0;
                            metrics::histogram!("sparkle_queue_wait_seconds").record(waited);
                        }
                    }
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
            Ok(()) => {
                if let Some(started) = lease.job.started_at_ms {
                    let ran = (SystemClock.now_ms() - started).max(0);
                    metrics::histogram!("sparkle_generation_seconds").record(ran as f64 / 1000.0);
                }
                Ok(())
            }
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
        let status = self.queue.fail(lease, failure).await?;
        if status == JobStatus::DeadLettered {
            metrics::counter!("sparkle_jobs_dead_lettered_total").increment(1);
        }
        Ok(status)
    }

    async fn release(&self, lease: &LeaseToken) -> Result<(), PlaneError> {
        Ok(self.queue.release(lease).await?)
    }

    async fn source(&self, lease: &LeaseToken, visibility: Duration) -> Result<Bytes, PlaneError> {
        // Only for the lease's holder, while it holds it.
        if self.queue.heartbeat(lease, None, visibility).await? == HeartbeatOutcome::Cancelled {
            return Err(PlaneError::LeaseLost(lease.job_id));
        }
        let job = self
            .queue
            .get(lease.job_id)
            .await?
            .ok_or(PlaneError::LeaseLost(lease.job_id))?;
        if job.request.init.is_none() {
            return Err(PlaneError::Refused(format!(
                "job {} starts from text, not from an image",
                job.id
            )));
        }
        match self.store.get_source(job.id).await {
            Ok(Some(png)) => Ok(png),
            Ok(None) => Err(PlaneError::Refused(format!(
                "job {}'s source image is not stored",
                job.id
            ))),
            // The store's error names paths and hosts: operators get it, workers not.
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "could not read a source image");
                Err(PlaneError::Unavailable(
                    "the image store could not be read".into(),
                ))
            }
        }
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
