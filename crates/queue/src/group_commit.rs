//! Submits committed in groups: every submit waiting while a commit is under way joins the
//! next transaction, so the durable write (a synchronous commit) is paid once per group, not
//! once per job. Each job runs in a savepoint of its own: one refused by a limit or failing
//! changes nothing of the others, and limits are counted in the transaction as each job
//! joins it, so they hold across the group as across separate transactions. Nothing is
//! acknowledged before its group's commit returned.

use crate::fields::{Field, FieldCipher};
use crate::job_row::JOB_COLUMNS;
use crate::sqlite::{begin_write, job_from_row, WriteTurn};
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

pub(crate) type Reply<W> = oneshot::Sender<Result<W, QueueError>>;

/// What a writer's task receives: each item with where its outcome goes.
pub(crate) type Submits<W, I = Prepared> = mpsc::Receiver<(I, Reply<W>)>;

/// The sending side of a writer of items `I` (submits, completions) answering with `W`; the
/// writer stops when the last one is dropped.
pub(crate) struct Writer<W = Written, I = Prepared> {
    items: mpsc::Sender<(I, Reply<W>)>,
}

impl<W, I> Clone for Writer<W, I> {
    fn clone(&self) -> Self {
        Writer {
            items: self.items.clone(),
        }
    }
}

impl<W, I> Writer<W, I> {
    /// A writer and what its task receives.
    pub fn channel() -> (Writer<W, I>, Submits<W, I>) {
        let (items, receiver) = mpsc::channel(4 * MAX_GROUP);
        (Writer { items }, receiver)
    }

    pub async fn write(&self, item: I) -> Result<W, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.items
            .send((item, reply))
            .await
            .map_err(|_| QueueError::CommitFailed("the queue's writer has stopped".into()))?;
        answer.await.map_err(|_| {
            QueueError::CommitFailed("the queue's writer stopped before answering".into())
        })?
    }
}

/// Answers each item of `group` with its outcome, or every one with the error that undid the
/// whole group (an unreachable database stays [`QueueError::Unavailable`], so callers can
/// tell an outage from a refusal); empties `group`.
pub(crate) fn answer<W, I>(
    group: &mut Vec<(I, Reply<W>)>,
    outcome: Result<Vec<Result<W, QueueError>>, QueueError>,
    what: &str,
) {
    match outcome {
        Ok(each) => {
            for ((_, reply), outcome) in group.drain(..).zip(each) {
                let _ = reply.send(outcome);
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, items = group.len(), "a group of {what} could not commit");
            let unavailable = e.is_unavailable();
            let reason = e.to_string();
            for (_, reply) in group.drain(..) {
                let _ = reply.send(Err(if unavailable {
                    QueueError::Unavailable(reason.clone())
                } else {
                    QueueError::CommitFailed(reason.clone())
                }));
            }
        }
    }
}

/// A completion waiting for its group ([`crate::JobQueue::complete`]): completions are
/// committed in groups too, one statement for the group.
pub(crate) struct Completion {
    pub job: JobId,
    pub lease: String,
    pub images: u32,
    pub now: i64,
    /// The lease clock's reading, where this process keeps it.
    pub lease_now: Option<i64>,
}

impl Completion {
    pub fn new(lease: &crate::LeaseToken, images: u32, now: i64, lease_now: Option<i64>) -> Self {
        Completion {
            job: lease.job_id,
            lease: lease.lease_id.clone(),
            images,
            now,
            lease_now,
        }
    }
}

/// The outcome of each completion of a group, given what the group's statement completed
/// (job, lease, images) and, for the rest, whether each had committed before (a retry whose
/// first answer was lost): those succeed too, any other is [`QueueError::LeaseLost`].
pub(crate) async fn completion_outcomes<F, Fut>(
    group: &[(Completion, Reply<()>)],
    completed: &[(String, String, i64)],
    mut completed_before: F,
) -> Result<Vec<Result<(), QueueError>>, QueueError>
where
    F: FnMut(JobId, String, i64) -> Fut,
    Fut: std::future::Future<Output = Result<bool, QueueError>>,
{
    let completed: std::collections::HashSet<_> = completed.iter().collect();
    let mut outcomes = Vec::with_capacity(group.len());
    for (c, _) in group {
        let key = (c.job.to_string(), c.lease.clone(), i64::from(c.images));
        let done = completed.contains(&key) || completed_before(c.job, key.1, key.2).await?;
        outcomes.push(if done {
            Ok(())
        } else {
            Err(QueueError::LeaseLost(c.job))
        });
    }
    Ok(outcomes)
}

impl Writer {
    /// Starts the writer over `pool`; `committed` is woken after each commit that created
    /// a job.
    pub fn start(
        pool: SqlitePool,
        turn: WriteTurn,
        fields: Arc<dyn FieldCipher>,
        committed: Vec<Arc<Notify>>,
    ) -> Writer {
        let (writer, receiver) = Writer::channel();
        tokio::spawn(run(pool, turn, fields, committed, receiver));
        writer
    }
}

async fn run(
    pool: SqlitePool,
    turn: WriteTurn,
    fields: Arc<dyn FieldCipher>,
    committed: Vec<Arc<Notify>>,
    mut receiver: Submits<Written>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let outcomes = commit_group(&pool, &turn, &*fields, &group).await;
        let created = match &outcomes {
            Ok(each) => each.iter().any(|r| matches!(r, Ok(Written::Created(_)))),
            Err(_) => false,
        };
        if created {
            for notify in &committed {
                notify.notify_waiters();
            }
        }
        answer(&mut group, outcomes, "submits");
    }
}

/// One transaction for the whole group: the outcome of each job, or the error that undid
/// them all (the commit failing).
async fn commit_group(
    pool: &SqlitePool,
    turn: &WriteTurn,
    fields: &dyn FieldCipher,
    group: &[(Prepared, Reply<Written>)],
) -> Result<Vec<Result<Written, QueueError>>, QueueError> {
    let (_turn, mut tx) = begin_write(pool, turn).await?;
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
            status, max_attempts, created_at, updated_at, group_sealed, share_key, cost)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, ?9, ?10, ?11, ?12)",
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
    .bind(job.request.cost())
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
        let id = job.id;
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
