//! The embedded backend: one SQLite file in WAL mode with `synchronous = FULL`, so a
//! committed job survives a power cut before anyone is told it was accepted. Several
//! processes (the gateway and local workers) share the file; writes take the lock up front
//! (`BEGIN IMMEDIATE`) and wait for it with a busy timeout rather than failing.
//!
//! Sensitive fields are sealed by the [`FieldCipher`] the queue is opened with (see
//! [`crate::fields`]); `secure_delete` is on, so a value overwritten or deleted does not
//! linger in free pages.

use crate::fields::{Field, FieldCipher};
use crate::group_commit::{answer, Completion, Prepared, Submits, Writer, Written, MAX_GROUP};
use crate::job_row::{
    kept_images, parse_id, random_lease_id, status_of_row, JobColumns, JOB_COLUMNS,
};
use crate::Pick;
use crate::{
    CancelOutcome, Clock, DeleteOutcome, Enqueued, Failure, HeartbeatOutcome, Job, JobQueue,
    KeptImages, Lease, LeaseToken, NewJob, QueueError, QueueStats, SystemClock,
};
use async_trait::async_trait;
use sparkle_core::{JobId, JobStatus, Progress};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Row;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How a worker without in-process wake-ups polls for work.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// Apply pending migrations when opening (the gateway does; workers open a migrated file).
    pub migrate: bool,
    pub max_connections: u32,
    pub busy_timeout: Duration,
    /// How long a retryable failure waits before its next lease: doubled with each attempt
    /// (at most [`MAX_RETRY_BACKOFF`]), ±20 % jitter.
    pub retry_backoff: Duration,
}

/// The longest a retry waits.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(300);

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            migrate: true,
            max_connections: 8,
            busy_timeout: Duration::from_secs(10),
            retry_backoff: Duration::from_secs(2),
        }
    }
}

#[derive(Clone)]
pub struct SqliteQueue {
    pub(crate) pool: SqlitePool,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) fields: Arc<dyn FieldCipher>,
    work: Arc<Notify>,
    /// Woken after each commit of this process that changes a job.
    changed: Arc<Notify>,
    retry_backoff_ms: i64,
    /// Commits submits in groups.
    writer: Writer,
    /// Commits completions in groups.
    completions: Writer<(), Completion>,
    /// Commits leases in groups.
    leases: Writer<Vec<LeaseToken>, LeaseAsk>,
    /// Taken by this process's write transactions, one at a time (see [`begin_write`]).
    pub(crate) write_turn: WriteTurn,
    /// This boot's offset onto the lease clock, once read (see [`SqliteQueue::lease_now`]).
    lease_epoch: crate::clock::LeaseEpoch,
}

impl std::fmt::Debug for SqliteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteQueue").finish_non_exhaustive()
    }
}

impl SqliteQueue {
    /// Opens (creating if needed) the database file at `path`, sealing sensitive fields
    /// with `fields`.
    pub async fn open(
        path: &Path,
        options: &SqliteOptions,
        fields: Arc<dyn FieldCipher>,
    ) -> Result<Self, QueueError> {
        Self::open_with_clock(path, options, Arc::new(SystemClock), fields).await
    }

    pub async fn open_with_clock(
        path: &Path,
        options: &SqliteOptions,
        clock: Arc<dyn Clock>,
        fields: Arc<dyn FieldCipher>,
    ) -> Result<Self, QueueError> {
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(options.migrate)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(options.busy_timeout)
            .pragma("secure_delete", "on")
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .connect_with(connect)
            .await?;
        if options.migrate {
            sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        }
        let work = Arc::new(Notify::new());
        let changed = Arc::new(Notify::new());
        let write_turn = WriteTurn::default();
        let writer = Writer::<Written>::start(
            pool.clone(),
            write_turn.clone(),
            fields.clone(),
            vec![work.clone(), changed.clone()],
        );
        let (completions, receiver) = Writer::channel();
        tokio::spawn(complete_groups(
            pool.clone(),
            write_turn.clone(),
            changed.clone(),
            receiver,
        ));
        let retry_backoff_ms = options.retry_backoff.as_millis().min(i64::MAX as u128) as i64;
        let (leases, receiver) = Writer::channel();
        tokio::spawn(lease_groups(
            pool.clone(),
            write_turn.clone(),
            changed.clone(),
            retry_backoff_ms,
            receiver,
        ));
        let queue = SqliteQueue {
            pool,
            clock,
            fields,
            work,
            changed,
            writer,
            completions,
            leases,
            write_turn,
            retry_backoff_ms,
            lease_epoch: Default::default(),
        };
        if options.migrate {
            queue.seal_plain_rows().await?;
            queue.tag_legacy_keys().await?;
        }
        Ok(queue)
    }

    /// Checks the database answers (for readiness probes).
    pub async fn ping(&self) -> Result<(), QueueError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Now on the lease clock: the host's monotonic clock plus an offset per boot, stored in
    /// the database. A boot's offset is past every lease written before it, so a lease from
    /// an earlier boot has expired, and no wall-clock jump moves a lease.
    pub(crate) async fn lease_now(&self) -> Result<i64, QueueError> {
        self.lease_epoch
            .now(&*self.clock, |boot| async move {
                self.lease_offset(&boot).await
            })
            .await
    }

    /// The offset of boot `boot`, recorded by the first process of that boot to ask.
    async fn lease_offset(&self, boot: &str) -> Result<i64, QueueError> {
        let (_turn, mut tx) = begin_write(&self.pool, &self.write_turn).await?;
        let known: Option<i64> =
            sqlx::query_scalar("SELECT offset_ms FROM lease_epochs WHERE boot_id = ?1")
                .bind(boot)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some(offset) = known {
            return Ok(offset);
        }
        let offset: i64 = sqlx::query_scalar(
            "SELECT MAX(
                (SELECT COALESCE(MAX(lease_until), 0) FROM jobs WHERE status = 'running'),
                (SELECT COALESCE(MAX(offset_ms), 0) FROM lease_epochs)) + 1",
        )
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO lease_epochs (boot_id, offset_ms) VALUES (?1, ?2)")
            .bind(boot)
            .bind(offset)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(offset)
    }
}

pub(crate) fn job_from_row(row: &SqliteRow, fields: &dyn FieldCipher) -> Result<Job, QueueError> {
    JobColumns {
        id: row.try_get("id")?,
        owner: row.try_get("owner")?,
        group_sealed: row.try_get("group_sealed")?,
        status: row.try_get("status")?,
        request: row.try_get("request")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        progress_step: row.try_get("progress_step")?,
        progress_total: row.try_get("progress_total")?,
        images: row.try_get("images")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        revision: row.try_get("revision")?,
        images_attempt: row.try_get("images_attempt")?,
    }
    .into_job(fields)
}

/// SQL that queues again or dead-letters every running job whose lease ended at or before
/// `?4` on the lease clock (`?1`: the wall clock, `?2`/`?3`: the retry backoff and its cap).
/// Completes every job of a group (a JSON array of `{id, lease, images, now, lease_now}`)
/// whose lease is still held: one statement, one durable commit.
const COMPLETE_GROUP_SQL: &str = "UPDATE jobs SET status = 'succeeded', images = c.images,
        finished_at = c.now, updated_at = c.now, error_code = NULL, error_message = NULL,
        error_detail = NULL, lease_until = NULL, progress_step = progress_total,
        images_attempt = attempts
    FROM (SELECT json_extract(value, '$.id') AS id, json_extract(value, '$.lease') AS lease,
                 json_extract(value, '$.images') AS images, json_extract(value, '$.now') AS now,
                 json_extract(value, '$.lease_now') AS lease_now
          FROM json_each(?1)) AS c
    WHERE jobs.id = c.id AND jobs.lease_id = c.lease AND jobs.status = 'running'
      AND jobs.lease_until > c.lease_now
    RETURNING jobs.id, jobs.lease_id, jobs.images";

/// This process's turn at the database's write lock. SQLite lets one writer in at a time and
/// has the others sleep and try again (milliseconds each); taking turns in the process first
/// leaves only other processes to wait on.
pub(crate) type WriteTurn = Arc<tokio::sync::Mutex<()>>;

/// A write transaction (`BEGIN IMMEDIATE`), begun in this process's turn; the turn is held
/// until the guard is dropped, after the commit.
pub(crate) async fn begin_write<'t>(
    pool: &SqlitePool,
    turn: &'t WriteTurn,
) -> Result<
    (
        tokio::sync::MutexGuard<'t, ()>,
        sqlx::Transaction<'static, sqlx::Sqlite>,
    ),
    QueueError,
> {
    let guard = turn.lock().await;
    let tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    Ok((guard, tx))
}

async fn complete_groups(
    pool: SqlitePool,
    turn: WriteTurn,
    changed: Arc<Notify>,
    mut receiver: Submits<(), Completion>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcome = {
            let _turn = turn.lock().await;
            complete_group(&pool, &group).await
        };
        if matches!(&outcome, Ok(each) if each.iter().any(Result::is_ok)) {
            changed.notify_waiters();
        }
        answer(&mut group, outcome, "completions");
    }
}

async fn complete_group(
    pool: &SqlitePool,
    group: &[(Completion, crate::group_commit::Reply<()>)],
) -> Result<Vec<Result<(), QueueError>>, QueueError> {
    let items: Vec<serde_json::Value> = group
        .iter()
        .map(|(c, _)| {
            serde_json::json!({
                "id": c.job.to_string(), "lease": c.lease, "images": c.images,
                "now": c.now, "lease_now": c.lease_now,
            })
        })
        .collect();
    let completed: Vec<(String, String, i64)> = sqlx::query_as(COMPLETE_GROUP_SQL)
        .bind(serde_json::Value::Array(items).to_string())
        .fetch_all(pool)
        .await?;
    crate::group_commit::completion_outcomes(group, &completed, |job, lease, images| async move {
        let before: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE id = ?1 AND lease_id = ?2 AND status = 'succeeded'
                AND images = ?3 AND images_attempt = attempts",
        )
        .bind(job.to_string())
        .bind(lease)
        .bind(images)
        .fetch_optional(pool)
        .await?;
        Ok(before.is_some())
    })
    .await
}

const RECLAIM_SQL: &str = "UPDATE jobs SET
        status = CASE WHEN attempts >= max_attempts THEN 'dead_lettered' ELSE 'retry_wait' END,
        available_at = CASE WHEN attempts >= max_attempts THEN NULL ELSE ?1 +
            MIN(?2 << MIN(MAX(attempts - 1, 0), 20), ?3) * (80 + ABS(RANDOM()) % 41) / 100 END,
        error_code = 'lease_expired',
        error_message = 'the worker stopped heartbeating (attempt ' || attempts || ' of ' || max_attempts || ')',
        finished_at = CASE WHEN attempts >= max_attempts THEN ?1 ELSE NULL END,
        lease_id = NULL, lease_owner = NULL, lease_until = NULL,
        progress_step = NULL, progress_total = NULL, updated_at = ?1
    WHERE status = 'running' AND lease_until <= ?4";

/// The status of job `id` as clients see it, read in the caller's transaction.
async fn status_of(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: JobId,
) -> Result<Option<JobStatus>, QueueError> {
    let status: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?1")
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await?;
    status
        .map(|s| status_of_row(&id.to_string(), &s))
        .transpose()
}

/// Deletes job `id` and its deliveries, in the caller's transaction.
async fn delete_job_rows(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    id: &str,
) -> Result<(), QueueError> {
    sqlx::query("DELETE FROM deliveries WHERE job_id = ?1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM jobs WHERE id = ?1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// SQL that queues again every retry whose wait is over at `?1`.
const RETRIES_DUE_SQL: &str =
    "UPDATE jobs SET status = 'queued', available_at = NULL, updated_at = ?1
    WHERE status = 'retry_wait' AND available_at <= ?1";

#[async_trait]
impl JobQueue for SqliteQueue {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let prepared = Prepared::new(&*self.fields, job, self.now())?;
        let id = match self.writer.write(prepared).await? {
            Written::Existing(job) => {
                return Ok(Enqueued {
                    job: *job,
                    created: false,
                })
            }
            Written::Created(id) => id,
        };
        let job = self.get(id).await?.ok_or_else(|| QueueError::Corrupt {
            id: id.to_string(),
            reason: "vanished after commit".into(),
        })?;
        Ok(Enqueued { job, created: true })
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, QueueError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|row| job_from_row(row, &*self.fields))
            .transpose()
    }

    async fn position(&self, id: JobId) -> Result<Option<u64>, QueueError> {
        Ok(self.positions(&[id]).await?.pop().flatten())
    }

    async fn list_jobs(
        &self,
        owner: &str,
        status: Option<JobStatus>,
        before: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<Job>, QueueError> {
        let statuses = status.map(|s| {
            serde_json::to_string(&crate::job_row::stored_statuses(s)).unwrap_or_default()
        });
        let rows = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_by_owner_seq
             WHERE owner = ?1
               AND (?2 IS NULL OR status IN (SELECT value FROM json_each(?2)))
               AND (?3 IS NULL OR seq < (SELECT seq FROM jobs WHERE id = ?3 AND owner = ?1))
             ORDER BY seq DESC LIMIT ?4"
        ))
        .bind(owner)
        .bind(statuses)
        .bind(before.map(|id| id.to_string()))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| job_from_row(row, &*self.fields))
            .collect()
    }

    async fn lease(
        &self,
        worker: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        self.lease_where(worker, max, visibility, Pick::Any).await
    }

    async fn lease_models(
        &self,
        worker: &str,
        models: &[String],
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        self.lease_where(worker, max, visibility, Pick::Models(models.to_vec()))
            .await
    }

    async fn lease_compatible(
        &self,
        worker: &str,
        batch_key: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Lease>, QueueError> {
        self.lease_where(
            worker,
            max,
            visibility,
            Pick::Compatible(batch_key.to_string()),
        )
        .await
    }

    async fn heartbeat(
        &self,
        lease: &LeaseToken,
        progress: Option<Progress>,
        visibility: Duration,
    ) -> Result<HeartbeatOutcome, QueueError> {
        let now = self.now();
        let lease_now = self.lease_now().await?;
        let until = lease_now + visibility.as_millis() as i64;
        let updated = sqlx::query(
            "UPDATE jobs SET lease_until = ?3, updated_at = ?4,
                progress_step = COALESCE(?5, progress_step),
                progress_total = COALESCE(?6, progress_total)
             WHERE id = ?1 AND lease_id = ?2 AND status = 'running' AND lease_until > ?7",
        )
        .bind(lease.job_id.to_string())
        .bind(&lease.lease_id)
        .bind(until)
        .bind(now)
        .bind(progress.map(|p| p.step as i64))
        .bind(progress.map(|p| p.total as i64))
        .bind(lease_now)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 1 {
            if progress.is_some() {
                self.changed.notify_waiters();
            }
            return Ok(HeartbeatOutcome::Continue);
        }
        let cancelled = sqlx::query(
            "SELECT 1 FROM jobs WHERE id = ?1 AND lease_id = ?2 AND status = 'cancelled'",
        )
        .bind(lease.job_id.to_string())
        .bind(&lease.lease_id)
        .fetch_optional(&self.pool)
        .await?;
        match cancelled {
            Some(_) => Ok(HeartbeatOutcome::Cancelled),
            None => Err(QueueError::LeaseLost(lease.job_id)),
        }
    }

    async fn complete(&self, lease: &LeaseToken, images: u32) -> Result<(), QueueError> {
        let lease_now = self.lease_now().await?;
        let completion = Completion::new(lease, images, self.now(), Some(lease_now));
        self.completions.write(completion).await
    }

    async fn fail(&self, lease: &LeaseToken, failure: Failure) -> Result<JobStatus, QueueError> {
        let now = self.now();
        let row = lease.job_id.to_string();
        let detail = failure
            .detail
            .as_deref()
            .map(|d| self.fields.seal(Field::JobErrorDetail, &row, d.as_bytes()))
            .transpose()?;
        let jitter = rand::Rng::gen_range(&mut rand::thread_rng(), 80..=120);
        let lease_now = self.lease_now().await?;
        let row = sqlx::query(
            "UPDATE jobs SET
                status = CASE WHEN ?3 = 0 THEN 'failed'
                              WHEN attempts >= max_attempts THEN 'dead_lettered'
                              ELSE 'retry_wait' END,
                available_at = CASE WHEN ?3 = 0 OR attempts >= max_attempts THEN NULL
                    ELSE ?6 + MIN(?7 << MIN(MAX(attempts - 1, 0), 20), ?8) * ?9 / 100 END,
                finished_at = CASE WHEN ?3 = 0 OR attempts >= max_attempts THEN ?6 ELSE NULL END,
                error_code = ?4, error_message = ?5, error_detail = ?10,
                lease_id = NULL, lease_owner = NULL, lease_until = NULL,
                progress_step = NULL, progress_total = NULL, updated_at = ?6
             WHERE id = ?1 AND lease_id = ?2 AND status = 'running' AND lease_until > ?11
             RETURNING status",
        )
        .bind(&row)
        .bind(&lease.lease_id)
        .bind(failure.retryable as i64)
        .bind(&failure.code)
        .bind(&failure.message)
        .bind(now)
        .bind(self.retry_backoff_ms)
        .bind(MAX_RETRY_BACKOFF.as_millis() as i64)
        .bind(jitter)
        .bind(&detail)
        .bind(lease_now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Err(QueueError::LeaseLost(lease.job_id));
        };
        let status: String = row.try_get("status")?;
        self.changed.notify_waiters();
        status_of_row(&lease.job_id.to_string(), &status)
    }

    async fn release(&self, lease: &LeaseToken) -> Result<(), QueueError> {
        let now = self.now();
        let updated = sqlx::query(
            "UPDATE jobs SET status = 'queued', attempts = MAX(attempts - 1, 0),
                lease_id = NULL, lease_owner = NULL, lease_until = NULL,
                progress_step = NULL, progress_total = NULL, started_at = NULL, updated_at = ?3
             WHERE id = ?1 AND lease_id = ?2 AND status = 'running' AND lease_until > ?4",
        )
        .bind(lease.job_id.to_string())
        .bind(&lease.lease_id)
        .bind(now)
        .bind(self.lease_now().await?)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 1 {
            self.work.notify_waiters();
            self.changed.notify_waiters();
            Ok(())
        } else {
            Err(QueueError::LeaseLost(lease.job_id))
        }
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, QueueError> {
        let now = self.now();
        let (_turn, mut tx) = begin_write(&self.pool, &self.write_turn).await?;
        let Some(status) = status_of(&mut tx, id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if status.is_final() {
            return Ok(CancelOutcome::AlreadyFinal(status));
        }
        // A running job keeps its lease id so its worker's next heartbeat hears of the cancel.
        sqlx::query(
            "UPDATE jobs SET status = 'cancelled', finished_at = ?2, updated_at = ?2,
                error_code = 'cancelled', error_message = 'cancelled by the client'
             WHERE id = ?1",
        )
        .bind(id.to_string())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.changed.notify_waiters();
        Ok(CancelOutcome::Cancelled)
    }

    async fn delete_finished(&self, id: JobId) -> Result<DeleteOutcome, QueueError> {
        let (_turn, mut tx) = begin_write(&self.pool, &self.write_turn).await?;
        let Some(status) = status_of(&mut tx, id).await? else {
            return Ok(DeleteOutcome::NotFound);
        };
        if !status.is_final() {
            return Ok(DeleteOutcome::Live(status));
        }
        delete_job_rows(&mut tx, &id.to_string()).await?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted)
    }

    async fn purge_finished(&self, before_ms: i64, max: u32) -> Result<Vec<JobId>, QueueError> {
        let (_turn, mut tx) = begin_write(&self.pool, &self.write_turn).await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs INDEXED BY jobs_by_finish
             WHERE status IN ('succeeded', 'failed', 'cancelled', 'dead_lettered')
               AND finished_at < ?1
             ORDER BY finished_at LIMIT ?2",
        )
        .bind(before_ms)
        .bind(i64::from(max))
        .fetch_all(&mut *tx)
        .await?;
        for id in &ids {
            delete_job_rows(&mut tx, id).await?;
        }
        tx.commit().await?;
        ids.iter().map(|id| parse_id(id)).collect()
    }

    async fn kept_images(&self, ids: &[JobId]) -> Result<Vec<KeptImages>, QueueError> {
        let mut kept = Vec::with_capacity(ids.len());
        for id in ids {
            let row =
                sqlx::query("SELECT status, attempts, images_attempt FROM jobs WHERE id = ?1")
                    .bind(id.to_string())
                    .fetch_optional(&self.pool)
                    .await?;
            kept.push(match row {
                None => KeptImages::Nothing,
                Some(row) => kept_images(
                    &row.try_get::<String, _>("status")?,
                    row.try_get("attempts")?,
                    row.try_get("images_attempt")?,
                ),
            });
        }
        Ok(kept)
    }

    async fn report_capacity(
        &self,
        worker: &str,
        model: &str,
        pixels: u64,
    ) -> Result<(), QueueError> {
        let now = self.now();
        let (_turn, mut tx) = begin_write(&self.pool, &self.write_turn).await?;
        sqlx::query("DELETE FROM worker_capacity WHERE reported_at < ?1")
            .bind(now - crate::CAPACITY_HORIZON_MS)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO worker_capacity (worker, model, pixels, reported_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (worker, model) DO UPDATE SET pixels = ?3, reported_at = ?4",
        )
        .bind(worker)
        .bind(model)
        .bind(i64::try_from(pixels).unwrap_or(i64::MAX))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn capacity(&self, model: &str) -> Result<Option<u64>, QueueError> {
        let pixels: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(pixels) FROM worker_capacity WHERE model = ?1 AND reported_at >= ?2",
        )
        .bind(model)
        .bind(self.now() - crate::CAPACITY_HORIZON_MS)
        .fetch_one(&self.pool)
        .await?;
        Ok(pixels.map(|p| p.max(0) as u64))
    }

    async fn reclaim_expired(&self) -> Result<u64, QueueError> {
        let now = self.now();
        let lease_now = self.lease_now().await?;
        let (_turn, mut tx) = begin_write(&self.pool, &self.write_turn).await?;
        // Retries whose wait is over become visible to the scaler even with no worker
        // leasing.
        let (reclaimed, due) = reclaim_in(&mut tx, self.retry_backoff_ms, now, lease_now).await?;
        tx.commit().await?;
        if reclaimed + due > 0 {
            self.work.notify_waiters();
            self.changed.notify_waiters();
        }
        Ok(reclaimed)
    }

    async fn live_in_group(&self, group: &str) -> Result<u64, QueueError> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE group_key = ?1 AND status IN ('queued', 'retry_wait', 'running')",
        )
        .bind(self.fields.blind(Field::JobGroup, group.as_bytes()))
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let now = self.now();
        // Counters, the ends of two indexes, the last 20 successes once, and the live jobs'
        // costs summed from an index over (status, cost): only that grows with the backlog.
        let row = sqlx::query(
            "SELECT c.queued, c.running, r.recent_run, r.recent_rate,
                (SELECT created_at FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1) AS oldest,
                (SELECT TOTAL(cost) FROM jobs INDEXED BY jobs_cost_by_status
                    WHERE status = 'queued') AS queued_cost,
                (SELECT TOTAL(cost) FROM jobs INDEXED BY jobs_cost_by_status
                    WHERE status = 'running') AS running_cost
             FROM queue_counts c,
                (SELECT AVG(finished_at - started_at) AS recent_run,
                    SUM(cost) * 1000.0 / NULLIF(SUM(finished_at - started_at), 0) AS recent_rate
                 FROM (SELECT cost, finished_at, started_at FROM jobs WHERE status = 'succeeded'
                       ORDER BY finished_at DESC LIMIT 20)) r",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(QueueStats {
            queued: row.try_get::<i64, _>("queued")?.max(0) as u64,
            running: row.try_get::<i64, _>("running")?.max(0) as u64,
            oldest_queued_age_ms: oldest.map(|t| (now - t).max(0)),
            recent_run_ms: row.try_get("recent_run")?,
            queued_cost: row.try_get("queued_cost")?,
            running_cost: row.try_get("running_cost")?,
            recent_units_per_sec: row.try_get("recent_rate")?,
        })
    }

    async fn revision(&self) -> Result<u64, QueueError> {
        let value: i64 = sqlx::query_scalar("SELECT value FROM job_revision")
            .fetch_one(&self.pool)
            .await?;
        Ok(value.max(0) as u64)
    }

    async fn changed_since(
        &self,
        revision: u64,
        max: usize,
    ) -> Result<Vec<(JobId, u64)>, QueueError> {
        let rows = sqlx::query(
            "SELECT id, revision FROM jobs WHERE revision > ?1 ORDER BY revision LIMIT ?2",
        )
        .bind(i64::try_from(revision).unwrap_or(i64::MAX))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("id")?;
                let revision: i64 = row.try_get("revision")?;
                let id = parse_id(&id)?;
                Ok((id, revision.max(0) as u64))
            })
            .collect()
    }

    async fn wait_for_change(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    async fn positions(&self, ids: &[JobId]) -> Result<Vec<Option<u64>>, QueueError> {
        let mut conn = self.pool.acquire().await?;
        // One read: the jobs asked about, and the counters of whoever waits with them.
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let row = sqlx::query(
                "SELECT group_key, share_key, seq FROM jobs WHERE id = ?1 AND status = 'queued'",
            )
            .bind(id.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                out.push(None);
                continue;
            };
            let group: String = row.try_get("group_key")?;
            let share: String = row.try_get("share_key")?;
            let seq: i64 = row.try_get("seq")?;
            // Counted up to a bound: a position deeper than that in one group's own backlog
            // is reported as the bound (a lower bound), so the count never costs more.
            let ahead: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM (SELECT 1 FROM jobs
                 WHERE status = 'queued' AND group_key = ?1 AND seq < ?2 LIMIT ?3)",
            )
            .bind(&group)
            .bind(seq)
            .bind(crate::position::MAX_COUNTED_AHEAD)
            .fetch_one(&mut *tx)
            .await?;
            out.push(Some(
                crate::position::position(&mut tx, ahead.max(0) as u64, &group, &share).await?,
            ));
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout.min(POLL_INTERVAL), self.work.notified()).await;
    }
}

impl SqliteQueue {
    /// Leases up to `max` jobs in fairness order, as `pick` says; all with the batch key of
    /// the first one leased. Leases are committed in groups.
    async fn lease_where(
        &self,
        worker: &str,
        max: usize,
        visibility: Duration,
        pick: Pick,
    ) -> Result<Vec<Lease>, QueueError> {
        let lease_now = self.lease_now().await?;
        let ask = LeaseAsk {
            worker: worker.to_string(),
            max,
            pick,
            until: lease_now + visibility.as_millis() as i64,
            now: self.now(),
            lease_now,
        };
        let tokens = self.leases.write(ask).await?;
        let mut leases = Vec::with_capacity(tokens.len());
        for token in tokens {
            if let Some(job) = self.get(token.job_id).await? {
                leases.push(Lease { job, token });
            }
        }
        Ok(leases)
    }
}

/// In `tx`: queues again (or dead-letters) every job whose lease ended by `lease_now`, and
/// queues every retry whose wait is over at `now`; how many of each.
async fn reclaim_in(
    tx: &mut sqlx::SqliteConnection,
    retry_backoff_ms: i64,
    now: i64,
    lease_now: i64,
) -> Result<(u64, u64), QueueError> {
    let reclaimed = sqlx::query(RECLAIM_SQL)
        .bind(now)
        .bind(retry_backoff_ms)
        .bind(MAX_RETRY_BACKOFF.as_millis() as i64)
        .bind(lease_now)
        .execute(&mut *tx)
        .await?;
    let due = sqlx::query(RETRIES_DUE_SQL)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    Ok((reclaimed.rows_affected(), due.rows_affected()))
}

/// One worker's ask for leases, waiting for its group.
pub(crate) struct LeaseAsk {
    worker: String,
    max: usize,
    pick: Pick,
    until: i64,
    now: i64,
    lease_now: i64,
}

/// Serves every ask waiting while a group commits in one transaction: reclaims once, then
/// leases for each ask in turn, in fairness order, and commits once.
async fn lease_groups(
    pool: SqlitePool,
    turn: WriteTurn,
    changed: Arc<Notify>,
    retry_backoff_ms: i64,
    mut receiver: Submits<Vec<LeaseToken>, LeaseAsk>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcome = lease_group(&pool, &turn, retry_backoff_ms, &group).await;
        if matches!(&outcome, Ok(each) if each.iter().any(|t| t.as_ref().is_ok_and(|t| !t.is_empty())))
        {
            changed.notify_waiters();
        }
        answer(&mut group, outcome, "leases");
    }
}

async fn lease_group(
    pool: &SqlitePool,
    turn: &WriteTurn,
    retry_backoff_ms: i64,
    group: &[(LeaseAsk, crate::group_commit::Reply<Vec<LeaseToken>>)],
) -> Result<Vec<Result<Vec<LeaseToken>, QueueError>>, QueueError> {
    let (_turn, mut tx) = begin_write(pool, turn).await?;
    let now = group
        .iter()
        .map(|(ask, _)| ask.now)
        .max()
        .unwrap_or_default();
    let lease_now = group
        .iter()
        .map(|(ask, _)| ask.lease_now)
        .max()
        .unwrap_or_default();
    reclaim_in(&mut tx, retry_backoff_ms, now, lease_now).await?;
    let mut outcomes = Vec::with_capacity(group.len());
    for (ask, _) in group {
        outcomes.push(Ok(lease_for(&mut tx, ask).await?));
    }
    tx.commit().await?;
    Ok(outcomes)
}

/// In `tx`: leases up to `ask.max` jobs in fairness order, as the ask picks them; all with
/// the batch key of the first one leased.
async fn lease_for(
    tx: &mut sqlx::SqliteConnection,
    ask: &LeaseAsk,
) -> Result<Vec<LeaseToken>, QueueError> {
    let mut batch_key = ask.pick.batch_key().map(str::to_string);
    let mut tokens = Vec::new();
    while tokens.len() < ask.max {
        let next = match (&batch_key, &ask.pick) {
            (Some(key), _) => crate::fairness::next_compatible(&mut *tx, key).await?,
            (None, Pick::Models(models)) => crate::fairness::next_job_of(&mut *tx, models).await?,
            (None, _) => crate::fairness::next_job(&mut *tx).await?,
        };
        let Some(next) = next else { break };
        let lease_id = random_lease_id();
        sqlx::query(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_id = ?2,
                lease_owner = ?3, lease_until = ?4, started_at = ?5, updated_at = ?5,
                progress_step = NULL, progress_total = NULL
             WHERE id = ?1",
        )
        .bind(&next.id)
        .bind(&lease_id)
        .bind(&ask.worker)
        .bind(ask.until)
        .bind(ask.now)
        .execute(&mut *tx)
        .await?;
        crate::fairness::took_turn(&mut *tx, &next).await?;
        if batch_key.is_none() {
            batch_key = Some(next.batch_key.clone());
        }
        tokens.push(LeaseToken {
            job_id: parse_id(&next.id)?,
            lease_id,
        });
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::testing::test_cipher;
    use crate::ManualClock;

    /// A new queue in `dir`, on the system clock.
    async fn fresh(dir: &Path) -> SqliteQueue {
        SqliteQueue::open(&dir.join("q.db"), &SqliteOptions::default(), test_cipher())
            .await
            .expect("open")
    }

    #[tokio::test]
    async fn sqlite_backend_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir_path = dir.path().to_path_buf();
        let counter = std::sync::atomic::AtomicU32::new(0);
        crate::conformance::run(|clock: ManualClock| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let path = dir_path.join(format!("queue-{n}.db"));
            async move {
                SqliteQueue::open_with_clock(
                    &path,
                    &SqliteOptions::default(),
                    Arc::new(clock),
                    test_cipher(),
                )
                .await
                .expect("open sqlite queue")
            }
        })
        .await;
    }

    #[tokio::test]
    async fn positions_among_thousands_of_waiting_shares_are_where_each_is_leased() {
        // More waiting shares than a position counts from either end of the round-robin:
        // the front, the back and the middle each take their own way of counting.
        let dir = tempfile::tempdir().expect("tempdir");
        let q = fresh(dir.path()).await;
        let shares = 2 * 2000 + 200;
        let submits = (0..shares).map(|i| {
            let q = q.clone();
            async move {
                let job = crate::conformance::new_job(&format!("user-{i}"), "a corgi");
                q.enqueue(job).await.expect("enqueue").job.id
            }
        });
        let ids = futures::future::join_all(submits).await;
        let positions = q.positions(&ids).await.expect("positions");
        let mut order = Vec::with_capacity(shares);
        while let Some(lease) = q
            .lease("w", 1, Duration::from_secs(600))
            .await
            .expect("lease")
            .pop()
        {
            order.push(lease.job.id);
        }
        assert_eq!(order.len(), shares);
        for (id, position) in ids.iter().zip(positions) {
            let leased_at = order.iter().position(|o| o == id).expect("leased");
            assert_eq!(position, Some(leased_at as u64), "job {id}");
        }
    }

    #[tokio::test]
    async fn identical_requests_of_two_owners_store_different_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = fresh(dir.path()).await;
        for owner in ["alice", "bob"] {
            let mut job = crate::conformance::new_job(owner, "a corgi");
            job.fingerprint = "the same request".into();
            job.dedup_key = Some("the same key".into());
            q.enqueue(job).await.expect("enqueue");
        }
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT request_hash, dedup_key FROM jobs ORDER BY owner")
                .fetch_all(&q.pool)
                .await
                .expect("rows");
        assert_ne!(rows[0].0, rows[1].0, "request hashes are keyed per owner");
        assert_ne!(rows[0].1, rows[1].1, "idempotency keys are keyed per owner");
    }

    #[tokio::test]
    async fn a_job_hashed_before_owner_keying_is_still_found_by_its_idempotency_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = fresh(dir.path()).await;
        let mut job = crate::conformance::new_job("alice", "a corgi");
        job.dedup_key = Some("key-1".into());
        let first = q.enqueue(job.clone()).await.expect("enqueue").job.id;
        // As an earlier version stored it: hashed by the value alone.
        sqlx::query("UPDATE jobs SET request_hash = ?1, dedup_key = ?2")
            .bind(
                q.fields
                    .blind(Field::JobFingerprint, job.fingerprint.as_bytes()),
            )
            .bind(q.fields.blind(Field::JobDedup, b"key-1"))
            .execute(&q.pool)
            .await
            .expect("rewrite");
        let again = q.enqueue(job.clone()).await.expect("again");
        assert_eq!((again.job.id, again.created), (first, false));
        job.fingerprint = "another request".into();
        assert!(matches!(
            q.enqueue(job).await,
            Err(QueueError::IdempotencyConflict)
        ));
    }

    #[tokio::test]
    async fn a_committed_job_survives_reopening_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("q.db");
        let q = SqliteQueue::open(&path, &SqliteOptions::default(), test_cipher())
            .await
            .expect("open");
        let job = q
            .enqueue(crate::conformance::new_job("alice", "durable"))
            .await
            .expect("enqueue")
            .job;
        drop(q);
        let q = SqliteQueue::open(
            &path,
            &SqliteOptions {
                migrate: false,
                ..Default::default()
            },
            test_cipher(),
        )
        .await
        .expect("reopen");
        let again = q.get(job.id).await.expect("get").expect("still there");
        assert_eq!(again.request.prompt, "durable");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&q.pool)
            .await
            .expect("pragma");
        assert_eq!(mode, "wal");
        let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&q.pool)
            .await
            .expect("pragma");
        assert_eq!(sync, 2, "synchronous must be FULL");
    }
}
