//! What a worker asks of the control plane, and nothing more: leases, heartbeats, and the
//! end of each lease (complete with the images, fail, release). The worker loop speaks only
//! this, over the worker protocol ([`crate::Remote`]); the control plane answers it from its
//! queue and image store, which the worker never sees.

use crate::engine_thread::ModelLoaded;
use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sparkle_core::{JobStatus, Progress};
use sparkle_queue::{Failure, HeartbeatOutcome, Lease, LeaseToken, QueueError};
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

    /// The source image (PNG, at the job's size; RGBA when masked) of a leased job that
    /// starts from one, extending the lease by `visibility` as a heartbeat does.
    async fn source(&self, lease: &LeaseToken, visibility: Duration) -> Result<Bytes, PlaneError>;
}
