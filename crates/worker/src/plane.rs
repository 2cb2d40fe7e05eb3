//! What a worker asks of the control plane, and nothing more: leases, heartbeats, and the
//! end of each lease (complete with the images, fail, release). The worker loop speaks only
//! this; [`Embedded`] answers it from the queue and the image store in the same process, as
//! the control plane's side of the worker protocol does for remote workers.

use async_trait::async_trait;
use bytes::Bytes;
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

/// The control plane as a worker sees it. Every call is idempotent under retry: a
/// completion repeated after its answer was lost succeeds and completes nothing twice.
#[async_trait]
pub trait ControlPlane: Send + Sync {
    /// Tells the control plane the largest image (pixels) this worker makes of `model`.
    async fn report_capacity(
        &self,
        worker: &str,
        model: &str,
        pixels: u64,
    ) -> Result<(), PlaneError>;

    /// Up to `max` compatible jobs (with `batch_key` when given), leased for `visibility`;
    /// waits up to `wait` for work when none is queued (a long poll).
    async fn lease(
        &self,
        worker: &str,
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
}

impl Embedded {
    pub fn new(queue: Arc<dyn JobQueue>, store: Arc<dyn ImageStore>) -> Embedded {
        Embedded { queue, store }
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
    async fn report_capacity(
        &self,
        worker: &str,
        model: &str,
        pixels: u64,
    ) -> Result<(), PlaneError> {
        Ok(self.queue.report_capacity(worker, model, pixels).await?)
    }

    async fn lease(
        &self,
        worker: &str,
        batch_key: Option<&str>,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, PlaneError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let leases = match batch_key {
                None => self.queue.lease(worker, max, visibility).await?,
                Some(key) => {
                    self.queue
                        .lease_compatible(worker, key, max, visibility)
                        .await?
                }
            };
            let now = tokio::time::Instant::now();
            if !leases.is_empty() || now >= deadline {
                return Ok(leases);
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
