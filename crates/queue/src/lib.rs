//! The durable job queue and the metadata it needs: jobs and API keys.
//!
//! [`JobQueue`] is the boundary the gateway, the worker and the scaler program against; the
//! SQLite backend ([`SqliteQueue`]) is the embedded default and the PostgreSQL backend
//! ([`PgQueue`]) takes over when one machine is not enough. [`Database`] is all of it — the
//! queue, the outbox, the keys — as the binary opens it. The [`conformance`] suite states
//! the contract and runs against every backend.
//!
//! The life of a job: `enqueue` commits it (durable before the caller acknowledges anything),
//! deduplicated by `(owner, dedup_key)`. `lease` hands a worker the next job in turn — shares
//! (API keys, Discord users) round-robin, the groups of a share (its end users) round-robin
//! inside it, FIFO within a group; a share or group that starts waiting queues behind those
//! already waiting ([`fairness`](crate::fairness)) — for a visibility timeout. `heartbeat` extends the lease and records progress; it also tells the worker when
//! the job was cancelled. `complete` and `fail` end a lease; a lease that expires is reclaimed
//! and the job queued again, until `max_attempts` leases have been spent, when the job is
//! dead-lettered with the reason kept. Every operation that ends a lease checks the lease id,
//! so a worker that lost its lease can never complete a job someone else now holds.
//!
//! The answers a job owes (a Discord interaction, a webhook) are written with it, in the
//! same transaction, as opaque reply targets in the [`Outbox`]; limits counted against live
//! jobs (per owner, per group, the whole queue) are counted in that transaction too, so no
//! two submits can both slip under one. Every commit that changes what a client can see of a
//! job moves a change counter on ([`JobQueue::changed_since`]), which is how any process
//! learns of any other's commits with one cheap query, and how delivery pushes events
//! instead of every client polling.
//!
//! Prompts, user ids and reply payloads are sealed before they reach the database, and the
//! values the queue compares are stored as blind indexes ([`fields`]).
//!
//! This crate knows nothing of HTTP, of any reply channel's details, of GPUs or of key files.

mod clock;
pub mod conformance;
mod fairness;
pub mod fields;
mod group_commit;
mod job_row;
mod keys;
mod outbox;
mod position;
mod postgres;
pub mod record;
mod sealing;
mod sqlite;
mod types;

pub use clock::{Clock, ManualClock, SystemClock};
pub use fields::{Field, FieldCipher, FieldError, FieldKeyUsage};
pub use keys::{ApiKey, ApiKeys, KeySecret, Scope, Session, SessionSecret, MAX_SESSIONS_PER_KEY};
pub use outbox::{
    ClaimedDelivery, DeliveryClaim, DeliveryState, Outbox, OutboxStats, ReplyTarget, Settle,
};
pub use postgres::{server_certificates, Connection, DatabaseUrl, LeaseClock, PgOptions, PgQueue};
pub use sqlite::{SqliteOptions, SqliteQueue};
pub use types::*;

use async_trait::async_trait;
use sparkle_core::JobId;
use std::time::Duration;

/// How long a worker's reported capacity counts.
pub(crate) const CAPACITY_HORIZON_MS: i64 = 7 * 86_400_000;

/// Everything a deployment keeps in its database, whichever backend holds it.
#[async_trait]
pub trait Database: JobQueue + Outbox + ApiKeys {
    /// Checks the database answers (and, for a server, takes writes).
    async fn ping(&self) -> Result<(), QueueError>;
    /// Re-seals every sealed value not under the active key; how many were rewritten.
    async fn reseal_fields(&self) -> Result<u64, QueueError>;
    /// How many sealed values each key holds.
    async fn field_key_usage(&self) -> Result<FieldKeyUsage, QueueError>;
    async fn close(&self);
}

macro_rules! database {
    ($backend:ty) => {
        #[async_trait]
        impl Database for $backend {
            async fn ping(&self) -> Result<(), QueueError> {
                <$backend>::ping(self).await
            }
            async fn reseal_fields(&self) -> Result<u64, QueueError> {
                <$backend>::reseal_fields(self).await
            }
            async fn field_key_usage(&self) -> Result<FieldKeyUsage, QueueError> {
                <$backend>::field_key_usage(self).await
            }
            async fn close(&self) {
                <$backend>::close(self).await
            }
        }
    };
}
database!(SqliteQueue);
database!(PgQueue);

/// Which queued jobs an ask for leases takes first (the rest of its batch has the first's
/// batch key).
#[derive(Debug, Clone)]
pub(crate) enum Pick {
    /// The next job in turn, of any model.
    Any,
    /// The next job in turn among those of these models.
    Models(Vec<String>),
    /// The next job in turn with this batch key: a batch being filled.
    Compatible(String),
}

impl Pick {
    pub(crate) fn batch_key(&self) -> Option<&str> {
        match self {
            Pick::Compatible(key) => Some(key),
            Pick::Any | Pick::Models(_) => None,
        }
    }
}

/// The durable queue of image jobs. See the crate documentation for the life of a job.
#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Commits a new job, or returns the existing one with the same `(owner, dedup_key)`.
    /// A dedup key reused with a different request is [`QueueError::IdempotencyConflict`].
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError>;

    /// The job with this id, in any state.
    async fn get(&self, id: JobId) -> Result<Option<Job>, QueueError>;

    /// An estimate of how many queued jobs will be leased before this one, under the
    /// round-robin across groups. `None` when the job is not queued.
    async fn position(&self, id: JobId) -> Result<Option<u64>, QueueError>;

    /// Leases up to `max` queued jobs for `visibility`: the head of the least recently
    /// served group first, then more jobs with the same batch key (compatible for one batch).
    /// Reclaims expired leases first.
    async fn lease(
        &self,
        worker: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError>;

    /// As [`lease`](JobQueue::lease), among the queued jobs of `models` only: a worker that
    /// serves some of the deployment's models, or prefers those it has loaded. FIFO holds
    /// within each group's jobs of those models.
    async fn lease_models(
        &self,
        worker: &str,
        models: &[String],
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError>;

    /// Leases up to `max` more queued jobs with this batch key, in fairness order: a worker
    /// filling a batch it has started.
    async fn lease_compatible(
        &self,
        worker: &str,
        batch_key: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError>;

    /// Extends a held lease by `visibility` from now and records progress.
    async fn heartbeat(
        &self,
        lease: &LeaseToken,
        progress: Option<sparkle_core::Progress>,
        visibility: Duration,
    ) -> Result<HeartbeatOutcome, QueueError>;

    /// Marks a leased job succeeded with `images` stored images. Idempotent for the holder: a
    /// retry of a completion that committed (its answer lost with the connection) succeeds
    /// and changes nothing; any other lease gets [`QueueError::LeaseLost`].
    async fn complete(&self, lease: &LeaseToken, images: u32) -> Result<(), QueueError>;

    /// Ends a lease with a failure: queued again if retryable and attempts remain,
    /// dead-lettered if retryable and none remain, failed otherwise. Returns the new status.
    async fn fail(
        &self,
        lease: &LeaseToken,
        failure: Failure,
    ) -> Result<sparkle_core::JobStatus, QueueError>;

    /// Gives a lease back without spending an attempt (a worker told to stop).
    async fn release(&self, lease: &LeaseToken) -> Result<(), QueueError>;

    /// Cancels a queued or running job. A running job's worker learns it at its next heartbeat.
    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, QueueError>;

    /// Queues again (or dead-letters) every job whose lease has expired; returns how many.
    async fn reclaim_expired(&self) -> Result<u64, QueueError>;

    /// Backlog figures for the scaler and for estimates.
    async fn stats(&self) -> Result<QueueStats, QueueError>;

    /// Queued and running jobs of one group, for per-user quotas.
    async fn live_in_group(&self, group: &str) -> Result<u64, QueueError>;

    /// Waits until new work may be available, or `timeout` passes.
    async fn wait_for_work(&self, timeout: Duration);

    /// The change counter: moved on, in commit order, by every commit that changes what a
    /// client can see of a job (its status, progress, images or error).
    async fn revision(&self) -> Result<u64, QueueError>;

    /// Jobs whose last change came after `revision`, in the order of those changes, each
    /// with the revision of its change; at most `max`.
    async fn changed_since(
        &self,
        revision: u64,
        max: usize,
    ) -> Result<Vec<(JobId, u64)>, QueueError>;

    /// Returns when this process has committed a change, or after `timeout`; other
    /// processes' commits are found by the caller's next [`changed_since`](JobQueue::changed_since)
    /// (a backend with notifications returns on theirs too).
    async fn wait_for_change(&self, timeout: Duration);

    /// The jobs of `owner`, newest first: up to `limit`, those submitted before job `before`
    /// when given (a job of another owner, or none, gives nothing), of `status` when given.
    async fn list_jobs(
        &self,
        owner: &str,
        status: Option<sparkle_core::JobStatus>,
        before: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<Job>, QueueError>;

    /// The [`position`](JobQueue::position) of each of `ids`, from one read of the queue.
    async fn positions(&self, ids: &[JobId]) -> Result<Vec<Option<u64>>, QueueError>;

    /// Deletes a finished job with everything kept of it (its sealed fields, its
    /// deliveries); a live job is left as it is. The caller removes its images.
    async fn delete_finished(&self, id: JobId) -> Result<DeleteOutcome, QueueError>;

    /// Deletes up to `max` jobs that finished before `before_ms` (oldest first) with their
    /// deliveries, returning their ids so that their images can be removed.
    async fn purge_finished(&self, before_ms: i64, max: u32) -> Result<Vec<JobId>, QueueError>;

    /// Which images each of `ids` keeps, for a sweep of orphaned images.
    async fn kept_images(&self, ids: &[JobId]) -> Result<Vec<KeptImages>, QueueError>;

    /// Records the largest image (in pixels) worker `worker` can make of `model`.
    async fn report_capacity(
        &self,
        worker: &str,
        model: &str,
        pixels: u64,
    ) -> Result<(), QueueError>;

    /// The largest image of `model` any worker reported in the last week it can make, the
    /// limit a request is admitted under; `None` before any worker reported.
    async fn capacity(&self, model: &str) -> Result<Option<u64>, QueueError>;
}
