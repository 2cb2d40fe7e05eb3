//! [`JobQueue`] on PostgreSQL. Every statement that reads the lease clock takes it as a
//! parameter that is `NULL` when leases are counted on the database's clock
//! (`COALESCE($n, sparkle_now_ms())`).

use super::claim::{self, Next, TOOK_TURN_SQL};
use super::submit::{retryable, Written};
use super::{PgQueue, NOTIFIED_FALLBACK};
use crate::fields::{Field, FieldCipher};
use crate::group_commit::{Completion, Prepared};
use crate::job_row::{
    kept_images, parse_id, random_lease_id, status_of_row, JobColumns, JOB_COLUMNS,
};
use crate::outbox::millis;
use crate::position::MAX_COUNTED_AHEAD;
use crate::sqlite::MAX_RETRY_BACKOFF;
use crate::{
    CancelOutcome, DeleteOutcome, Enqueued, Failure, HeartbeatOutcome, Job, JobQueue, KeptImages,
    Lease, LeaseToken, NewJob, QueueError, QueueStats,
};
use crate::{Pick, CAPACITY_HORIZON_MS};
use async_trait::async_trait;
use sparkle_core::{JobId, JobStatus, Progress};
use std::time::Duration;
use tokio_postgres::Row;

const FINAL: &str = "status IN ('succeeded', 'failed', 'cancelled', 'dead_lettered')";

pub(crate) fn job_from_row(row: &Row, fields: &dyn FieldCipher) -> Result<Job, QueueError> {
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

/// Queues again or dead-letters every running job whose lease ended by `$4` on the lease
/// clock (`$1`: the wall clock, `$2`/`$3`: the retry backoff and its cap).
const RECLAIM_SQL: &str = "UPDATE jobs SET
        status = CASE WHEN attempts >= max_attempts THEN 'dead_lettered' ELSE 'retry_wait' END,
        available_at = CASE WHEN attempts >= max_attempts THEN NULL ELSE $1 +
            LEAST($2::BIGINT << LEAST(GREATEST(attempts - 1, 0), 20)::INT, $3::BIGINT)
                * (80 + floor(random() * 41))::BIGINT / 100 END,
        error_code = 'lease_expired',
        error_message = 'the worker stopped heartbeating (attempt ' || attempts || ' of '
            || max_attempts || ')',
        finished_at = CASE WHEN attempts >= max_attempts THEN $1 ELSE NULL END,
        lease_id = NULL, lease_owner = NULL, lease_until = NULL,
        progress_step = NULL, progress_total = NULL, updated_at = $1
    WHERE status = 'running' AND lease_until <= COALESCE($4::BIGINT, sparkle_now_ms())";

/// A due retry queues again: its share and group rows are locked first, in the order
/// submits take them.
const DUE_SHARES_SQL: &str = "SELECT 1 FROM shares WHERE name IN
        (SELECT share_key FROM jobs WHERE status = 'retry_wait' AND available_at <= $1)
    ORDER BY name FOR UPDATE";
const DUE_GROUPS_SQL: &str = "SELECT 1 FROM groups WHERE name IN
        (SELECT group_key FROM jobs WHERE status = 'retry_wait' AND available_at <= $1)
    ORDER BY name FOR UPDATE";
const DUE_SQL: &str = "UPDATE jobs SET status = 'queued', available_at = NULL, updated_at = $1
    WHERE status = 'retry_wait' AND available_at <= $1";

impl PgQueue {
    /// Queues again (or dead-letters) every job whose lease ended, and queues every retry
    /// whose wait is over; how many of each.
    async fn reclaim(&self) -> Result<(u64, u64), QueueError> {
        let now = self.now();
        let lease_now = self.lease_now().await?;
        let mut client = self.client().await?;
        let reclaimed = client
            .execute(
                RECLAIM_SQL,
                &[
                    &now,
                    &self.retry_backoff_ms,
                    &millis(MAX_RETRY_BACKOFF),
                    &lease_now,
                ],
            )
            .await?;
        let any_due: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'retry_wait' AND available_at <= $1)",
                &[&now],
            )
            .await?
            .try_get(0)?;
        let mut due = 0;
        if any_due {
            for attempt in 1.. {
                let tx = client.transaction().await?;
                let outcome = async {
                    tx.execute(DUE_SHARES_SQL, &[&now]).await?;
                    tx.execute(DUE_GROUPS_SQL, &[&now]).await?;
                    let n = tx.execute(DUE_SQL, &[&now]).await?;
                    tx.commit().await?;
                    Ok::<_, tokio_postgres::Error>(n)
                }
                .await;
                match outcome {
                    Ok(n) => {
                        due = n;
                        break;
                    }
                    Err(e) if retryable(&e) && attempt < 4 => continue,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok((reclaimed, due))
    }

    async fn jobs_by_id(&self, ids: &[String]) -> Result<Vec<Job>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1)"),
                &[&ids],
            )
            .await?;
        let mut jobs = rows
            .iter()
            .map(|row| job_from_row(row, &*self.fields))
            .collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|job| ids.iter().position(|id| *id == job.id.to_string()));
        Ok(jobs)
    }

    /// Leases up to `max` jobs in fairness order, as `pick` says; all with the batch key of
    /// the first one leased. The asks of this process are served in
    /// groups: whoever takes the claim turn serves every ask waiting, in one transaction with
    /// one reclaim and one commit, so claimers of one process neither race each other for
    /// the same turns nor pay a commit each.
    async fn lease_where(
        &self,
        worker: &str,
        max: usize,
        visibility: Duration,
        pick: Pick,
    ) -> Result<Vec<Lease>, QueueError> {
        let ask = LeaseAsk {
            worker: worker.to_string(),
            max,
            pick,
            visibility: millis(visibility),
        };
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.lease_asks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push((ask, reply));
        {
            let _turn = self.claim_turn.lock().await;
            let mut group = std::mem::take(
                &mut *self
                    .lease_asks
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
            if !group.is_empty() {
                let outcome = self.lease_group(&group).await;
                crate::group_commit::answer(&mut group, outcome, "leases");
            }
        }
        let tokens = answer.await.map_err(|_| {
            QueueError::Unavailable("the lease was abandoned by its group; ask again".into())
        })??;
        if tokens.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = tokens.iter().map(|(id, _)| id.clone()).collect();
        let jobs = self.jobs_by_id(&ids).await?;
        let mut leases = Vec::with_capacity(jobs.len());
        for job in jobs {
            let Some((_, lease_id)) = tokens.iter().find(|(id, _)| *id == job.id.to_string())
            else {
                continue;
            };
            leases.push(Lease {
                token: LeaseToken {
                    job_id: job.id,
                    lease_id: lease_id.clone(),
                },
                job,
            });
        }
        Ok(leases)
    }

    /// Serves a group of asks in one transaction: each ask's jobs and lease ids.
    async fn lease_group(&self, group: &[(LeaseAsk, LeaseReply)]) -> LeaseOutcomes {
        self.reclaim().await?;
        let now = self.now();
        let lease_now = self.lease_now().await?;
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut outcomes = Vec::with_capacity(group.len());
        for (ask, _) in group {
            outcomes.push(Ok(lease_for(&tx, ask, now, lease_now).await?));
        }
        tx.commit().await?;
        Ok(outcomes)
    }
}

/// One claimer's ask for leases.
pub(crate) struct LeaseAsk {
    worker: String,
    max: usize,
    pick: Pick,
    visibility: i64,
}

/// Where an ask's (job id, lease id) pairs go.
pub(crate) type LeaseReply = crate::group_commit::Reply<Vec<(String, String)>>;

type LeaseOutcomes = Result<Vec<Result<Vec<(String, String)>, QueueError>>, QueueError>;

/// In `tx`: claims up to `ask.max` jobs in turn order.
async fn lease_for(
    tx: &tokio_postgres::Transaction<'_>,
    ask: &LeaseAsk,
    now: i64,
    lease_now: Option<i64>,
) -> Result<Vec<(String, String)>, QueueError> {
    let mut batch_key = ask.pick.batch_key().map(str::to_string);
    let mut tokens = Vec::new();
    while tokens.len() < ask.max {
        let next: Option<Next> = match (&batch_key, &ask.pick) {
            (Some(key), _) => claim::next_compatible(tx, key).await?,
            (None, Pick::Models(models)) => claim::next_job_of(tx, models).await?,
            (None, _) => claim::next_job(tx).await?,
        };
        let Some(next) = next else { break };
        let lease_id = random_lease_id();
        let lease_params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] = [
            &next.id,
            &lease_id,
            &ask.worker,
            &lease_now,
            &ask.visibility,
            &now,
        ];
        let lease = tx.execute(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, lease_id = $2,
                lease_owner = $3, lease_until = COALESCE($4::BIGINT, sparkle_now_ms()) + $5,
                started_at = $6, updated_at = $6, progress_step = NULL, progress_total = NULL
             WHERE id = $1",
            &lease_params,
        );
        let turn_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&next.share, &next.group];
        let turn = tx.execute(TOOK_TURN_SQL, &turn_params);
        tokio::try_join!(lease, turn)?;
        if batch_key.is_none() {
            batch_key = Some(next.batch_key.clone());
        }
        tokens.push((next.id, lease_id));
    }
    Ok(tokens)
}

#[async_trait]
impl JobQueue for PgQueue {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        let prepared = Prepared::new(&*self.fields, job, self.now())?;
        let (id, created) = match self.writer.write(prepared).await? {
            Written::Existing(job) => {
                return Ok(Enqueued {
                    job: *job,
                    created: false,
                })
            }
            Written::Created(id) => (id, true),
            Written::SameAs(id) => (id, false),
        };
        let job = self.get(id).await?.ok_or_else(|| QueueError::Corrupt {
            id: id.to_string(),
            reason: "vanished after commit".into(),
        })?;
        Ok(Enqueued { job, created })
    }

    async fn list_jobs(
        &self,
        owner: &str,
        status: Option<JobStatus>,
        before: Option<JobId>,
        limit: u32,
    ) -> Result<Vec<Job>, QueueError> {
        let client = self.client().await?;
        let statuses: Option<Vec<&str>> = status.map(crate::job_row::stored_statuses);
        let before = before.map(|id| id.to_string());
        let rows = client
            .query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE owner = $1
                       AND ($2::TEXT[] IS NULL OR status = ANY($2))
                       AND ($3::TEXT IS NULL
                            OR seq < (SELECT seq FROM jobs WHERE id = $3 AND owner = $1))
                     ORDER BY seq DESC LIMIT $4"
                ),
                &[&owner, &statuses, &before, &i64::from(limit)],
            )
            .await?;
        rows.iter()
            .map(|row| job_from_row(row, &*self.fields))
            .collect()
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
                &[&id.to_string()],
            )
            .await?;
        row.as_ref()
            .map(|row| job_from_row(row, &*self.fields))
            .transpose()
    }

    async fn position(&self, id: JobId) -> Result<Option<u64>, QueueError> {
        Ok(self.positions(&[id]).await?.pop().flatten())
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
        let client = self.client().await?;
        let id = lease.job_id.to_string();
        let updated = client
            .execute(
                "UPDATE jobs SET lease_until = COALESCE($3::BIGINT, sparkle_now_ms()) + $4,
                    updated_at = $5,
                    progress_step = COALESCE($6, progress_step),
                    progress_total = COALESCE($7, progress_total)
                 WHERE id = $1 AND lease_id = $2 AND status = 'running'
                   AND lease_until > COALESCE($3::BIGINT, sparkle_now_ms())",
                &[
                    &id,
                    &lease.lease_id,
                    &lease_now,
                    &millis(visibility),
                    &now,
                    &progress.map(|p| i64::from(p.step)),
                    &progress.map(|p| i64::from(p.total)),
                ],
            )
            .await?;
        if updated == 1 {
            return Ok(HeartbeatOutcome::Continue);
        }
        let cancelled = client
            .query_opt(
                "SELECT 1 FROM jobs WHERE id = $1 AND lease_id = $2 AND status = 'cancelled'",
                &[&id, &lease.lease_id],
            )
            .await?;
        match cancelled {
            Some(_) => Ok(HeartbeatOutcome::Cancelled),
            None => Err(QueueError::LeaseLost(lease.job_id)),
        }
    }

    async fn complete(&self, lease: &LeaseToken, images: u32) -> Result<(), QueueError> {
        let lease_now = self.lease_now().await?;
        let completion = Completion::new(lease, images, self.now(), lease_now);
        self.completions.write(completion).await
    }

    async fn fail(&self, lease: &LeaseToken, failure: Failure) -> Result<JobStatus, QueueError> {
        let now = self.now();
        let id = lease.job_id.to_string();
        let detail = failure
            .detail
            .as_deref()
            .map(|d| self.fields.seal(Field::JobErrorDetail, &id, d.as_bytes()))
            .transpose()?;
        let jitter: i64 = rand::Rng::gen_range(&mut rand::thread_rng(), 80..=120);
        let lease_now = self.lease_now().await?;
        let client = self.client().await?;
        let row = client
            .query_opt(
                "UPDATE jobs SET
                    status = CASE WHEN NOT $3 THEN 'failed'
                                  WHEN attempts >= max_attempts THEN 'dead_lettered'
                                  ELSE 'retry_wait' END,
                    available_at = CASE WHEN NOT $3 OR attempts >= max_attempts THEN NULL
                        ELSE $6 + LEAST($7::BIGINT << LEAST(GREATEST(attempts - 1, 0), 20)::INT,
                            $8::BIGINT) * $9 / 100 END,
                    finished_at = CASE WHEN NOT $3 OR attempts >= max_attempts THEN $6
                        ELSE NULL END,
                    error_code = $4, error_message = $5, error_detail = $10,
                    lease_id = NULL, lease_owner = NULL, lease_until = NULL,
                    progress_step = NULL, progress_total = NULL, updated_at = $6
                 WHERE id = $1 AND lease_id = $2 AND status = 'running'
                   AND lease_until > COALESCE($11::BIGINT, sparkle_now_ms())
                 RETURNING status",
                &[
                    &id,
                    &lease.lease_id,
                    &failure.retryable,
                    &failure.code,
                    &failure.message,
                    &now,
                    &self.retry_backoff_ms,
                    &millis(MAX_RETRY_BACKOFF),
                    &jitter,
                    &detail,
                    &lease_now,
                ],
            )
            .await?;
        let Some(row) = row else {
            return Err(QueueError::LeaseLost(lease.job_id));
        };
        status_of_row(&id, &row.try_get::<_, String>("status")?)
    }

    async fn release(&self, lease: &LeaseToken) -> Result<(), QueueError> {
        let now = self.now();
        let lease_now = self.lease_now().await?;
        let client = self.client().await?;
        let updated = client
            .execute(
                "UPDATE jobs SET status = 'queued', attempts = GREATEST(attempts - 1, 0),
                    lease_id = NULL, lease_owner = NULL, lease_until = NULL,
                    progress_step = NULL, progress_total = NULL, started_at = NULL, updated_at = $3
                 WHERE id = $1 AND lease_id = $2 AND status = 'running'
                   AND lease_until > COALESCE($4::BIGINT, sparkle_now_ms())",
                &[&lease.job_id.to_string(), &lease.lease_id, &now, &lease_now],
            )
            .await?;
        if updated == 1 {
            Ok(())
        } else {
            Err(QueueError::LeaseLost(lease.job_id))
        }
    }

    async fn cancel(&self, id: JobId) -> Result<CancelOutcome, QueueError> {
        let now = self.now();
        let client = self.client().await?;
        let row_id = id.to_string();
        // A running job keeps its lease id so its worker's next heartbeat hears of the cancel.
        let cancelled = client
            .execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = $2, updated_at = $2,
                    error_code = 'cancelled', error_message = 'cancelled by the client'
                 WHERE id = $1 AND status IN ('queued', 'retry_wait', 'running')",
                &[&row_id, &now],
            )
            .await?;
        if cancelled == 1 {
            return Ok(CancelOutcome::Cancelled);
        }
        let row = client
            .query_opt("SELECT status FROM jobs WHERE id = $1", &[&row_id])
            .await?;
        match row {
            None => Ok(CancelOutcome::NotFound),
            Some(row) => Ok(CancelOutcome::AlreadyFinal(status_of_row(
                &row_id,
                &row.try_get::<_, String>(0)?,
            )?)),
        }
    }

    async fn delete_finished(&self, id: JobId) -> Result<DeleteOutcome, QueueError> {
        let mut client = self.client().await?;
        let row_id = id.to_string();
        let tx = client.transaction().await?;
        let deleted = tx
            .execute(
                &format!("DELETE FROM jobs WHERE id = $1 AND {FINAL}"),
                &[&row_id],
            )
            .await?;
        if deleted == 1 {
            tx.execute("DELETE FROM deliveries WHERE job_id = $1", &[&row_id])
                .await?;
            tx.commit().await?;
            return Ok(DeleteOutcome::Deleted);
        }
        let row = tx
            .query_opt("SELECT status FROM jobs WHERE id = $1", &[&row_id])
            .await?;
        tx.commit().await?;
        match row {
            None => Ok(DeleteOutcome::NotFound),
            Some(row) => Ok(DeleteOutcome::Live(status_of_row(
                &row_id,
                &row.try_get::<_, String>(0)?,
            )?)),
        }
    }

    async fn purge_finished(&self, before_ms: i64, max: u32) -> Result<Vec<JobId>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "WITH victims AS (
                        SELECT id FROM jobs WHERE {FINAL} AND finished_at < $1
                        ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED),
                     gone AS (DELETE FROM jobs WHERE id IN (SELECT id FROM victims) RETURNING id),
                     answers AS (DELETE FROM deliveries WHERE job_id IN (SELECT id FROM gone))
                     SELECT id FROM gone"
                ),
                &[&before_ms, &i64::from(max)],
            )
            .await?;
        rows.iter()
            .map(|row| parse_id(&row.try_get::<_, String>(0)?))
            .collect()
    }

    async fn kept_images(&self, ids: &[JobId]) -> Result<Vec<KeptImages>, QueueError> {
        let client = self.client().await?;
        let wanted: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let rows = client
            .query(
                "SELECT id, status, attempts, images_attempt FROM jobs WHERE id = ANY($1)",
                &[&wanted],
            )
            .await?;
        let mut found = std::collections::HashMap::new();
        for row in &rows {
            found.insert(
                row.try_get::<_, String>("id")?,
                kept_images(
                    &row.try_get::<_, String>("status")?,
                    row.try_get("attempts")?,
                    row.try_get("images_attempt")?,
                ),
            );
        }
        Ok(wanted
            .iter()
            .map(|id| found.get(id).copied().unwrap_or(KeptImages::Nothing))
            .collect())
    }

    async fn report_capacity(
        &self,
        worker: &str,
        model: &str,
        pixels: u64,
    ) -> Result<(), QueueError> {
        let now = self.now();
        let client = self.client().await?;
        let horizon = now - CAPACITY_HORIZON_MS;
        let forget_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&horizon];
        let forget = client.execute(
            "DELETE FROM worker_capacity WHERE reported_at < $1",
            &forget_params,
        );
        let pixels = i64::try_from(pixels).unwrap_or(i64::MAX);
        let record_params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&worker, &model, &pixels, &now];
        let record = client.execute(
            "INSERT INTO worker_capacity (worker, model, pixels, reported_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (worker, model) DO UPDATE SET pixels = $3, reported_at = $4",
            &record_params,
        );
        tokio::try_join!(forget, record)?;
        Ok(())
    }

    async fn capacity(&self, model: &str) -> Result<Option<u64>, QueueError> {
        let client = self.client().await?;
        let pixels: Option<i64> = client
            .query_one(
                "SELECT MAX(pixels) FROM worker_capacity WHERE model = $1 AND reported_at >= $2",
                &[&model, &(self.now() - CAPACITY_HORIZON_MS)],
            )
            .await?
            .try_get(0)?;
        Ok(pixels.map(|p| p.max(0) as u64))
    }

    async fn reclaim_expired(&self) -> Result<u64, QueueError> {
        Ok(self.reclaim().await?.0)
    }

    async fn live_in_group(&self, group: &str) -> Result<u64, QueueError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                "SELECT COUNT(*) FROM jobs WHERE group_key = $1
                   AND status IN ('queued', 'retry_wait', 'running')",
                &[&self.fields.blind(Field::JobGroup, group.as_bytes())],
            )
            .await?
            .try_get(0)?;
        Ok(n.max(0) as u64)
    }

    async fn stats(&self) -> Result<QueueStats, QueueError> {
        let now = self.now();
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT q.queued, q.running, r.recent_run, r.recent_rate,
                    (SELECT created_at FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1)
                        AS oldest,
                    (SELECT COALESCE(SUM(cost), 0)::FLOAT8 FROM jobs WHERE status = 'queued')
                        AS queued_cost,
                    (SELECT COALESCE(SUM(cost), 0)::FLOAT8 FROM jobs WHERE status = 'running')
                        AS running_cost
                 FROM queue_state q,
                    (SELECT AVG(finished_at - started_at)::FLOAT8 AS recent_run,
                        (SUM(cost) * 1000.0 / NULLIF(SUM(finished_at - started_at), 0))::FLOAT8
                            AS recent_rate
                     FROM (SELECT cost, finished_at, started_at FROM jobs
                           WHERE status = 'succeeded' ORDER BY finished_at DESC LIMIT 20) l) r",
                &[],
            )
            .await?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(QueueStats {
            queued: row.try_get::<_, i64>("queued")?.max(0) as u64,
            running: row.try_get::<_, i64>("running")?.max(0) as u64,
            oldest_queued_age_ms: oldest.map(|t| (now - t).max(0)),
            recent_run_ms: row.try_get("recent_run")?,
            queued_cost: row.try_get("queued_cost")?,
            running_cost: row.try_get("running_cost")?,
            recent_units_per_sec: row.try_get("recent_rate")?,
        })
    }

    async fn revision(&self) -> Result<u64, QueueError> {
        let client = self.client().await?;
        let value: i64 = client
            .query_one("SELECT revision FROM queue_state", &[])
            .await?
            .try_get(0)?;
        Ok(value.max(0) as u64)
    }

    async fn changed_since(
        &self,
        revision: u64,
        max: usize,
    ) -> Result<Vec<(JobId, u64)>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT id, revision FROM jobs WHERE revision > $1 ORDER BY revision LIMIT $2",
                &[
                    &i64::try_from(revision).unwrap_or(i64::MAX),
                    &i64::try_from(max).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let id = parse_id(&row.try_get::<_, String>("id")?)?;
                Ok((id, row.try_get::<_, i64>("revision")?.max(0) as u64))
            })
            .collect()
    }

    async fn wait_for_change(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }

    async fn positions(&self, ids: &[JobId]) -> Result<Vec<Option<u64>>, QueueError> {
        let mut client = self.client().await?;
        // One consistent read: the jobs asked about and the counters of whoever waits.
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let wanted: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
        let rows = tx
            .query(
                "SELECT id, group_key, share_key, seq FROM jobs
                 WHERE id = ANY($1) AND status = 'queued'",
                &[&wanted],
            )
            .await?;
        let mut found = std::collections::HashMap::new();
        for row in &rows {
            let group: String = row.try_get("group_key")?;
            let share: String = row.try_get("share_key")?;
            let seq: i64 = row.try_get("seq")?;
            let ahead: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM (SELECT 1 FROM jobs
                     WHERE status = 'queued' AND group_key = $1 AND seq < $2 LIMIT $3) a",
                    &[&group, &seq, &MAX_COUNTED_AHEAD],
                )
                .await?
                .try_get(0)?;
            let position = claim::position(&tx, ahead.max(0) as u64, &group, &share).await?;
            found.insert(row.try_get::<_, String>("id")?, position);
        }
        tx.commit().await?;
        Ok(wanted.iter().map(|id| found.get(id).copied()).collect())
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout.min(NOTIFIED_FALLBACK), self.work.notified()).await;
    }
}
