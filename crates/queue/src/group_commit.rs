//! Submits committed in groups: every submit waiting while a commit is under way joins the
//! next transaction, so the durable write (a synchronous commit) is paid once per group, not
//! once per job. Each job runs in a savepoint of its own: one refused by a limit or failing
//! changes nothing of the others, and limits are counted in the transaction as each job
//! joins it, so they hold across the group as across separate transactions. Nothing is
//! acknowledged before its group's commit returned.

use crate::fields::{Field, FieldCipher};
use crate::job_row::JOB_COLUMNS;
use crate::sqlite::job_from_row;
use crate::{Job, NewJob, QueueError};
use sparkle_core::JobId;
use sqlx::sqlite::SqlitePool;
use sqlx::{Acquire, Row};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Notify};

/// Jobs one transaction takes at most.
pub(crate) const MAX_GROUP: usize = 256;

/// A job with everything sealed and blinded that can be, before it waits for the writer.
pub(crate) struct Prepared {
    pub id: JobId,
    pub row: String,
    pub job: NewJob,
    pub hash: String,
    pub legacy_hash: String,
    pub request: String,
    pub group_index: String,
    pub share_index: String,
    pub group_sealed: String,
    pub dedup_key: Option<String>,
    pub legacy_dedup_key: Option<String>,
    pub now: i64,
}

/// What the writer did with one job.
pub(crate) enum Written {
    Created(JobId),
    /// The owner's earlier job with the same idempotency key.
    Existing(Box<Job>),
}

type Reply<W> = oneshot::Sender<Result<W, QueueError>>;

/// What a writer's task receives: each job with where its outcome goes.
pub(crate) type Submits<W> = mpsc::Receiver<(Prepared, Reply<W>)>;

/// The sending side of a writer answering with `W`; the writer stops when the last one is
/// dropped.
pub(crate) struct Writer<W = Written> {
    jobs: mpsc::Sender<(Prepared, Reply<W>)>,
}

impl<W> Clone for Writer<W> {
    fn clone(&self) -> Self {
        Writer {
            jobs: self.jobs.clone(),
        }
    }
}

impl<W> Writer<W> {
    /// A writer and what its task receives.
    pub fn channel() -> (Writer<W>, Submits<W>) {
        let (jobs, receiver) = mpsc::channel(4 * MAX_GROUP);
        (Writer { jobs }, receiver)
    }

    pub async fn write(&self, job: Prepared) -> Result<W, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send((job, reply))
            .await
            .map_err(|_| QueueError::CommitFailed("the queue's writer has stopped".into()))?;
        answer.await.map_err(|_| {
            QueueError::CommitFailed("the queue's writer stopped before answering".into())
        })?
    }
}

impl Writer {
    /// Starts the writer over `pool`; `committed` is woken after each commit that created
    /// a job.
    pub fn start(
        pool: SqlitePool,
        fields: Arc<dyn FieldCipher>,
        committed: Vec<Arc<Notify>>,
    ) -> Writer {
        let (writer, receiver) = Writer::channel();
        tokio::spawn(run(pool, fields, committed, receiver));
        writer
    }
}

async fn run(
    pool: SqlitePool,
    fields: Arc<dyn FieldCipher>,
    committed: Vec<Arc<Notify>>,
    mut receiver: Submits<Written>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcomes = commit_group(&pool, &*fields, &group).await;
        let created = match &outcomes {
            Ok(each) => each.iter().any(|r| matches!(r, Ok(Written::Created(_)))),
            Err(_) => false,
        };
        if created {
            for notify in &committed {
                notify.notify_waiters();
            }
        }
        match outcomes {
            Ok(each) => {
                for ((_, reply), outcome) in group.drain(..).zip(each) {
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = group.len(), "a group of submits could not commit");
                let reason = e.to_string();
                for (_, reply) in group.drain(..) {
                    let _ = reply.send(Err(QueueError::CommitFailed(reason.clone())));
                }
            }
        }
    }
}

/// One transaction for the whole group: the outcome of each job, or the error that undid
/// them all (the commit failing).
async fn commit_group(
    pool: &SqlitePool,
    fields: &dyn FieldCipher,
    group: &[(Prepared, Reply<Written>)],
) -> Result<Vec<Result<Written, QueueError>>, QueueError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut outcomes = Vec::with_capacity(group.len());
    for (job, _) in group {
        let mut savepoint = tx.begin().await?;
        let outcome = insert(&mut savepoint, fields, job).await;
        if outcome.is_ok() {
            savepoint.commit().await?;
        } else {
            savepoint.rollback().await?;
        }
        outcomes.push(outcome);
    }
    tx.commit().await?;
    Ok(outcomes)
}

async fn insert(
    tx: &mut sqlx::SqliteConnection,
    fields: &dyn FieldCipher,
    p: &Prepared,
) -> Result<Written, QueueError> {
    let job = &p.job;
    if let Some(key) = &p.dedup_key {
        let existing = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, request_hash FROM jobs
             WHERE owner = ?1 AND dedup_key IN (?2, ?3)"
        ))
        .bind(&job.owner)
        .bind(key)
        .bind(&p.legacy_dedup_key)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = existing {
            let stored_hash: String = row.try_get("request_hash")?;
            if stored_hash != p.hash && stored_hash != p.legacy_hash {
                return Err(QueueError::IdempotencyConflict);
            }
            return Ok(Written::Existing(Box::new(job_from_row(&row, fields)?)));
        }
    }
    // Every limit is counted in the transaction that inserts: two submits cannot both slip
    // in under it.
    if let Some(limit) = job.max_queued {
        // The counter kept by triggers: its cost does not grow with the queue.
        let queued: i64 = sqlx::query_scalar("SELECT queued FROM queue_counts")
            .fetch_one(&mut *tx)
            .await?;
        let queued = queued.max(0) as u64;
        if queued >= limit {
            return Err(QueueError::QueueFull { queued, limit });
        }
    }
    if let Some(limit) = job.owner_live_limit {
        let live = live_jobs(tx, LiveOf::Owner, &job.owner).await?;
        if live >= limit {
            return Err(QueueError::OwnerQuota { live, limit });
        }
    }
    if let Some(limit) = job.group_live_limit {
        let live = live_jobs(tx, LiveOf::Group, &p.group_index).await?;
        if live >= limit {
            return Err(QueueError::GroupQuota { live, limit });
        }
    }
    crate::fairness::join_queue(&mut *tx, &p.share_index, &p.group_index).await?;
    sqlx::query(
        "INSERT INTO jobs (id, owner, group_key, dedup_key, request_hash, request, batch_key,
            status, max_attempts, created_at, updated_at, group_sealed, share_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?9, ?10, ?11)",
    )
    .bind(&p.row)
    .bind(&job.owner)
    .bind(&p.group_index)
    .bind(&p.dedup_key)
    .bind(&p.hash)
    .bind(&p.request)
    .bind(job.request.batch_key())
    .bind(job.max_attempts.max(1) as i64)
    .bind(p.now)
    .bind(&p.group_sealed)
    .bind(&p.share_index)
    .execute(&mut *tx)
    .await?;
    crate::outbox::write_replies(&mut *tx, fields, &p.row, &job.replies, p.now).await?;
    Ok(Written::Created(p.id))
}

/// Whose live jobs to count.
enum LiveOf {
    Owner,
    Group,
}

/// Queued, waiting-to-retry and running jobs of one owner or one group (by its index).
async fn live_jobs(
    tx: &mut sqlx::SqliteConnection,
    of: LiveOf,
    value: &str,
) -> Result<u64, QueueError> {
    let sql = match of {
        LiveOf::Owner => {
            "SELECT COUNT(*) FROM jobs
             WHERE owner = ?1 AND status IN ('queued', 'retry_wait', 'running')"
        }
        LiveOf::Group => {
            "SELECT COUNT(*) FROM jobs
             WHERE group_key = ?1 AND status IN ('queued', 'retry_wait', 'running')"
        }
    };
    let live: i64 = sqlx::query_scalar(sql)
        .bind(value)
        .fetch_one(&mut *tx)
        .await?;
    Ok(live.max(0) as u64)
}

impl Prepared {
    /// Seals and blinds what `job` stores.
    pub fn new(fields: &dyn FieldCipher, job: NewJob, now: i64) -> Result<Prepared, QueueError> {
        let id = JobId::random();
        let row = id.to_string();
        // Keyed per owner: identical requests of two owners store different hashes. Rows
        // written before were keyed by the value alone, and still match.
        let hash = fields.blind(Field::JobFingerprint, &owned(&job.owner, &job.fingerprint));
        let legacy_hash = fields.blind(Field::JobFingerprint, job.fingerprint.as_bytes());
        let request =
            zeroize::Zeroizing::new(crate::record::StoredRequest::encode(&job.request).map_err(
                |reason| QueueError::Corrupt {
                    id: "new job".into(),
                    reason,
                },
            )?);
        let request = fields.seal(Field::JobRequest, &row, request.as_bytes())?;
        let group_index = fields.blind(Field::JobGroup, job.group.as_bytes());
        let share_index = fields.blind(Field::JobGroup, job.share.as_bytes());
        let group_sealed = fields.seal(Field::JobGroup, &row, job.group.as_bytes())?;
        let dedup_key = job
            .dedup_key
            .as_ref()
            .map(|key| fields.blind(Field::JobDedup, &owned(&job.owner, key)));
        let legacy_dedup_key = job
            .dedup_key
            .as_ref()
            .map(|key| fields.blind(Field::JobDedup, key.as_bytes()));
        Ok(Prepared {
            id,
            row,
            job,
            hash,
            legacy_hash,
            request,
            group_index,
            share_index,
            group_sealed,
            dedup_key,
            legacy_dedup_key,
            now,
        })
    }
}

/// `value` bound to `owner`, for a blind index that differs between owners.
fn owned(owner: &str, value: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(4 + owner.len() + value.len());
    bytes.extend_from_slice(&(owner.len() as u32).to_be_bytes());
    bytes.extend_from_slice(owner.as_bytes());
    bytes.extend_from_slice(value.as_bytes());
    bytes
}
