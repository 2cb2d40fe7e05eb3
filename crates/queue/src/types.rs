use sparkle_core::{JobId, JobStatus, Progress, ValidImageRequest};

/// A job to commit.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Its id, chosen by the caller ([`JobId::random`]) so that what the job needs beside
    /// its row (a source image) can be stored under it before the job exists.
    pub id: JobId,
    /// Who may see and cancel it (an API key id).
    pub owner: String,
    /// Its fairness share: shares take turns round-robin (an API key, or one Discord user).
    pub share: String,
    /// Its group inside the share: groups of one share take turns, FIFO inside each (an
    /// API key's end user; the share itself when there is none).
    pub group: String,
    /// The client's `Idempotency-Key`, unique per owner.
    pub dedup_key: Option<String>,
    /// Digest of the request as the client sent it; a dedup key reused with another
    /// fingerprint is a conflict.
    pub fingerprint: String,
    pub request: ValidImageRequest,
    pub max_attempts: u32,
    /// Refuse the job ([`QueueError::OwnerQuota`]) when its owner already has this many
    /// queued or running jobs; a repeated dedup key still gets its job back.
    pub owner_live_limit: Option<u64>,
    /// Refuse the job ([`QueueError::GroupQuota`]) when its group already has this many
    /// queued or running jobs (a Discord user's limit).
    pub group_live_limit: Option<u64>,
    /// Refuse the job ([`QueueError::QueueFull`]) when this many jobs are already queued.
    pub max_queued: Option<u64>,
    /// The answers the job owes, written in the same transaction as the job.
    pub replies: Vec<crate::ReplyTarget>,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: JobId,
    pub owner: String,
    pub group: String,
    pub status: JobStatus,
    pub request: ValidImageRequest,
    pub attempts: u32,
    pub max_attempts: u32,
    pub progress: Option<Progress>,
    /// Number of images stored for the job (set when it succeeds).
    pub images: u32,
    /// Why the job failed or was dead-lettered, or why its last attempt failed.
    pub error: Option<JobError>,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub finished_at_ms: Option<i64>,
    /// The attempt the job's images were made by (their names include it); `None` for
    /// jobs that have none, or completed before images were named by attempt.
    pub images_attempt: Option<u32>,
    /// The change counter at the job's last visible change (see [`JobQueue::changed_since`](crate::JobQueue::changed_since)).
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub code: String,
    pub message: String,
}

/// The answer to an enqueue: the job, and whether this call created it.
#[derive(Debug, Clone)]
pub struct Enqueued {
    pub job: Job,
    pub created: bool,
}

/// Proof of holding a job: without the current lease id nothing can end the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken {
    pub job_id: JobId,
    pub lease_id: String,
}

#[derive(Debug, Clone)]
pub struct Lease {
    pub job: Job,
    pub token: LeaseToken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatOutcome {
    /// The lease is extended; carry on.
    Continue,
    /// The job was cancelled; stop and drop it.
    Cancelled,
}

/// Why an attempt failed.
#[derive(Debug, Clone)]
pub struct Failure {
    pub code: String,
    /// What a client is told: names no server path and no internal error.
    pub message: String,
    /// What went wrong in detail, for operators (sealed at rest, never shown to clients).
    pub detail: Option<String>,
    /// A fault another attempt may not meet (out of memory, a lost device), as opposed to a
    /// request that can never be generated.
    pub retryable: bool,
}

/// What [`JobQueue::delete_finished`](crate::JobQueue::delete_finished) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// The job is queued or running (cancel it first); nothing changed.
    Live(JobStatus),
    NotFound,
}

/// The images a job keeps, as a sweep of orphaned images needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeptImages {
    /// None: the job is gone, failed or was cancelled, or is waiting for an attempt.
    Nothing,
    /// Those made by this attempt (`None`: named before attempts named images): the
    /// attempt that completed the job, or the one running now.
    Attempt(Option<u32>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was queued or running and is now cancelled.
    Cancelled,
    /// It had already reached this final status; nothing changed.
    AlreadyFinal(JobStatus),
    NotFound,
}

/// Backlog figures.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QueueStats {
    pub queued: u64,
    pub running: u64,
    /// Age of the oldest queued job, in milliseconds.
    pub oldest_queued_age_ms: Option<i64>,
    /// Mean run time of recently succeeded jobs, in milliseconds.
    pub recent_run_ms: Option<f64>,
    /// What the queued jobs cost, in units of one SD 1.5 step at 512×512.
    pub queued_cost: f64,
    /// What the running jobs cost (whole jobs), in the same units.
    pub running_cost: f64,
    /// Cost units per second of run time over recently succeeded jobs: what a job in hand
    /// gets through (a worker running a batch gets through that times the batch).
    pub recent_units_per_sec: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("idempotency key reused with a different request")]
    IdempotencyConflict,
    #[error("the owner already has {live} queued or running jobs (the limit is {limit})")]
    OwnerQuota { live: u64, limit: u64 },
    #[error("the group already has {live} queued or running jobs (the limit is {limit})")]
    GroupQuota { live: u64, limit: u64 },
    #[error("{queued} jobs are queued (the limit is {limit})")]
    QueueFull { queued: u64, limit: u64 },
    #[error("delivery {0} is no longer claimed")]
    ClaimLost(String),
    #[error("the lease on job {0} is no longer held")]
    LeaseLost(JobId),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database error: {}", pg_message(.0))]
    Postgres(tokio_postgres::Error),
    /// No database server could be reached (or none that takes writes): retry shortly.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    #[error("database configuration: {0}")]
    Config(String),
    /// A commit shared by several submits failed; each of them gets this.
    #[error("the database could not commit: {0}")]
    CommitFailed(String),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("stored job {id} is unreadable: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("cannot seal a field: {0}")]
    Seal(#[from] crate::fields::FieldError),
}

impl From<tokio_postgres::Error> for QueueError {
    /// Errors that mean no primary is reachable now — a closed connection, a server
    /// shutting down or starting, a standby refusing writes — are [`QueueError::Unavailable`].
    fn from(e: tokio_postgres::Error) -> Self {
        let unavailable = match e.code() {
            None => {
                e.is_closed()
                    || std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>())
            }
            Some(code) => {
                let code = code.code();
                code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "25006")
            }
        };
        if unavailable {
            QueueError::Unavailable(e.to_string())
        } else {
            QueueError::Postgres(e)
        }
    }
}

impl QueueError {
    /// Whether the same call may succeed when retried shortly (the database was unreachable).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

/// What the server said, when it said something (its message, code and detail).
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{} ({})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => e.to_string(),
    }
}
