//! Submits committed in groups, as in the embedded backend ([`crate::group_commit`]), with a
//! handful of statements per group whatever its size: limits are read once and counted on
//! in the group, then shares, groups, jobs and deliveries are written with one statement each.
//!
//! Limits hold across processes because what they count is locked first: an advisory lock
//! per owner (its quota, its idempotency keys), per group (its quota) and one for the whole
//! queue (`max_queued`), taken in ascending order so that two groups never wait on each
//! other. Nothing is acknowledged before the group's commit returned; a group undone by a
//! deadlock or a serialization failure is tried again whole.

use super::connect::Pool;
use super::jobs::job_from_row;
use crate::fields::{Field, FieldCipher};
use crate::group_commit::{answer, Prepared, Submits, Writer, MAX_GROUP};
use crate::job_row::JOB_COLUMNS;
use crate::{Job, QueueError};
use sha2::{Digest, Sha256};
use sparkle_core::JobId;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Times a group undone by a deadlock or serialization failure is tried.
const ATTEMPTS: usize = 4;

/// What the writer did with one job.
pub(crate) enum Written {
    Created(JobId),
    /// The owner's earlier job with the same idempotency key.
    Existing(Box<Job>),
    /// The same idempotency key as a job created in the same group: that job.
    SameAs(JobId),
}

impl Writer<Written> {
    pub fn start(pool: Pool, fields: Arc<dyn FieldCipher>) -> Writer<Written> {
        let (writer, receiver) = Writer::channel();
        tokio::spawn(run(pool, fields, receiver));
        writer
    }
}

async fn run(pool: Pool, fields: Arc<dyn FieldCipher>, mut receiver: Submits<Written>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while receiver.recv_many(&mut group, MAX_GROUP).await > 0 {
        let jobs: Vec<&Prepared> = group.iter().map(|(job, _)| job).collect();
        let mut outcome = commit_group(&pool, &*fields, &jobs).await;
        for _ in 1..ATTEMPTS {
            match &outcome {
                Err(QueueError::Postgres(e)) if retryable(e) => {
                    outcome = commit_group(&pool, &*fields, &jobs).await;
                }
                _ => break,
            }
        }
        answer(&mut group, outcome, "submits");
    }
}

/// A deadlock or serialization failure: the same transaction may succeed when run again.
pub(crate) fn retryable(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// The advisory lock key of what a limit counts.
fn lock_key(kind: &str, value: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(kind.as_bytes())
        .chain_update([0])
        .chain_update(value.as_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// The key of the lock on the whole queue's count.
const QUEUE_LOCK: i64 = 0x5350_4b4c_0000_0002;

const LIVE: &str = "status IN ('queued', 'retry_wait', 'running')";

async fn commit_group(
    pool: &Pool,
    fields: &dyn FieldCipher,
    jobs: &[&Prepared],
) -> Result<Vec<Result<Written, QueueError>>, QueueError> {
    let mut client = super::get(pool).await?;
    let tx = client.transaction().await?;

    // Lock what the limits count, in ascending order.
    let mut locks = BTreeSet::new();
    for p in jobs {
        if p.job.max_queued.is_some() {
            locks.insert(QUEUE_LOCK);
        }
        if p.job.owner_live_limit.is_some() || p.dedup_key.is_some() {
            locks.insert(lock_key("owner", &p.job.owner));
        }
        if p.job.group_live_limit.is_some() {
            locks.insert(lock_key("group", &p.group_index));
        }
    }
    if !locks.is_empty() {
        let keys: Vec<i64> = locks.into_iter().collect();
        tx.execute(
            "SELECT pg_advisory_xact_lock(k) FROM unnest($1::BIGINT[]) AS k",
            &[&keys],
        )
        .await?;
    }

    // What the limits count now, read once.
    let mut queued: Option<u64> = None;
    if jobs.iter().any(|p| p.job.max_queued.is_some()) {
        let n: i64 = tx
            .query_one("SELECT queued FROM queue_state", &[])
            .await?
            .try_get(0)?;
        queued = Some(n.max(0) as u64);
    }
    let owners: Vec<&str> = distinct(
        jobs.iter()
            .filter(|p| p.job.owner_live_limit.is_some())
            .map(|p| p.job.owner.as_str()),
    );
    let mut owner_live = count_live(&tx, "owner", &owners).await?;
    let groups: Vec<&str> = distinct(
        jobs.iter()
            .filter(|p| p.job.group_live_limit.is_some())
            .map(|p| p.group_index.as_str()),
    );
    let mut group_live = count_live(&tx, "group_key", &groups).await?;
    let existing = existing_jobs(&tx, fields, jobs).await?;

    // Each job in turn, counted on from there.
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut accepted: Vec<&Prepared> = Vec::new();
    let mut created_keys: HashMap<(&str, &str), (JobId, &str)> = HashMap::new();
    for p in jobs {
        let job = &p.job;
        if let Some(key) = &p.dedup_key {
            if let Some((stored_hash, found)) = existing.get(&(job.owner.clone(), key.clone())) {
                outcomes.push(if *stored_hash == p.hash {
                    Ok(Written::Existing(Box::new(found.clone())))
                } else {
                    Err(QueueError::IdempotencyConflict)
                });
                continue;
            }
            if let Some((id, hash)) = created_keys.get(&(job.owner.as_str(), key.as_str())) {
                outcomes.push(if *hash == p.hash {
                    Ok(Written::SameAs(*id))
                } else {
                    Err(QueueError::IdempotencyConflict)
                });
                continue;
            }
        }
        if let (Some(limit), Some(queued)) = (job.max_queued, queued) {
            if queued >= limit {
                outcomes.push(Err(QueueError::QueueFull { queued, limit }));
                continue;
            }
        }
        if let Some(limit) = job.owner_live_limit {
            let live = owner_live.get(job.owner.as_str()).copied().unwrap_or(0);
            if live >= limit {
                outcomes.push(Err(QueueError::OwnerQuota { live, limit }));
                continue;
            }
        }
        if let Some(limit) = job.group_live_limit {
            let live = group_live.get(p.group_index.as_str()).copied().unwrap_or(0);
            if live >= limit {
                outcomes.push(Err(QueueError::GroupQuota { live, limit }));
                continue;
            }
        }
        queued = queued.map(|q| q + 1);
        *owner_live.entry(job.owner.clone()).or_default() += 1;
        *group_live.entry(p.group_index.clone()).or_default() += 1;
        if let Some(key) = &p.dedup_key {
            created_keys.insert((job.owner.as_str(), key.as_str()), (p.id, p.hash.as_str()));
        }
        accepted.push(p);
        outcomes.push(Ok(Written::Created(p.id)));
    }

    if !accepted.is_empty() {
        insert(&tx, fields, &accepted).await?;
    }
    tx.commit().await?;
    Ok(outcomes)
}

fn distinct<'a>(values: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    values.collect::<BTreeSet<_>>().into_iter().collect()
}

/// Live jobs of each of `values` of `column` (`owner` or `group_key`).
async fn count_live(
    tx: &tokio_postgres::Transaction<'_>,
    column: &str,
    values: &[&str],
) -> Result<HashMap<String, u64>, QueueError> {
    if values.is_empty() {
        return Ok(HashMap::new());
    }
    let rows = tx
        .query(
            &format!(
                "SELECT {column}, COUNT(*) FROM jobs WHERE {column} = ANY($1) AND {LIVE}
                 GROUP BY {column}"
            ),
            &[&values],
        )
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get(0)?, row.try_get::<_, i64>(1)?.max(0) as u64)))
        .collect()
}

/// The stored jobs that the group's idempotency keys name, by (owner, key), with their
/// request fingerprints.
async fn existing_jobs(
    tx: &tokio_postgres::Transaction<'_>,
    fields: &dyn FieldCipher,
    jobs: &[&Prepared],
) -> Result<BTreeMap<(String, String), (String, Job)>, QueueError> {
    let (owners, keys): (Vec<&str>, Vec<&str>) = jobs
        .iter()
        .filter_map(|p| p.dedup_key.as_deref().map(|k| (p.job.owner.as_str(), k)))
        .unzip();
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let rows = tx
        .query(
            &format!(
                "SELECT {JOB_COLUMNS}, request_hash, dedup_key FROM jobs
                 WHERE (owner, dedup_key) IN (SELECT * FROM unnest($1::TEXT[], $2::TEXT[]))"
            ),
            &[&owners, &keys],
        )
        .await?;
    let mut found = BTreeMap::new();
    for row in &rows {
        let owner: String = row.try_get("owner")?;
        let key: String = row.try_get("dedup_key")?;
        let hash: String = row.try_get("request_hash")?;
        found.insert((owner, key), (hash, job_from_row(row, fields)?));
    }
    Ok(found)
}

/// Writes the accepted jobs: their shares and groups joining the round-robin (behind everyone
/// waiting, when they were not waiting), the jobs in order, and their deliveries.
async fn insert(
    tx: &tokio_postgres::Transaction<'_>,
    fields: &dyn FieldCipher,
    jobs: &[&Prepared],
) -> Result<(), QueueError> {
    // Rows locked in ascending order, shares before groups.
    let shares: Vec<&str> = distinct(jobs.iter().map(|p| p.share_index.as_str()));
    tx.execute(
        "INSERT INTO shares (name, last_served)
         SELECT name, nextval('turn_stamps') FROM unnest($1::TEXT[]) AS name
         ON CONFLICT (name) DO UPDATE SET last_served = CASE WHEN shares.queued = 0
             THEN EXCLUDED.last_served ELSE shares.last_served END",
        &[&shares],
    )
    .await?;
    let groups: BTreeMap<&str, &str> = jobs
        .iter()
        .map(|p| (p.group_index.as_str(), p.share_index.as_str()))
        .collect();
    let (group_names, group_shares): (Vec<&str>, Vec<&str>) = groups.into_iter().unzip();
    tx.execute(
        "INSERT INTO groups (name, share, last_served)
         SELECT name, share, nextval('turn_stamps')
         FROM unnest($1::TEXT[], $2::TEXT[]) AS t (name, share)
         ON CONFLICT (name) DO UPDATE SET
             last_served = CASE WHEN groups.queued = 0
                 THEN EXCLUDED.last_served ELSE groups.last_served END,
             share = CASE WHEN groups.queued = 0 THEN EXCLUDED.share ELSE groups.share END",
        &[&group_names, &group_shares],
    )
    .await?;
    let ids: Vec<&str> = jobs.iter().map(|p| p.row.as_str()).collect();
    let owners: Vec<&str> = jobs.iter().map(|p| p.job.owner.as_str()).collect();
    let group_keys: Vec<&str> = jobs.iter().map(|p| p.group_index.as_str()).collect();
    let share_keys: Vec<&str> = jobs.iter().map(|p| p.share_index.as_str()).collect();
    let dedup: Vec<Option<&str>> = jobs.iter().map(|p| p.dedup_key.as_deref()).collect();
    let hashes: Vec<&str> = jobs.iter().map(|p| p.hash.as_str()).collect();
    let requests: Vec<&str> = jobs.iter().map(|p| p.request.as_str()).collect();
    let batch_keys: Vec<String> = jobs.iter().map(|p| p.job.request.batch_key()).collect();
    let max_attempts: Vec<i64> = jobs
        .iter()
        .map(|p| i64::from(p.job.max_attempts.max(1)))
        .collect();
    let nows: Vec<i64> = jobs.iter().map(|p| p.now).collect();
    let sealed_groups: Vec<&str> = jobs.iter().map(|p| p.group_sealed.as_str()).collect();
    let costs: Vec<f64> = jobs.iter().map(|p| p.job.request.cost()).collect();
    tx.execute(
        "INSERT INTO jobs (id, owner, group_key, share_key, dedup_key, request_hash, request,
            batch_key, status, max_attempts, created_at, updated_at, group_sealed, cost)
         SELECT id, owner, group_key, share_key, dedup_key, request_hash, request, batch_key,
            'queued', max_attempts, now, now, group_sealed, cost
         FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
             $7::TEXT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[], $11::TEXT[], $12::FLOAT8[])
             AS t (id, owner, group_key, share_key, dedup_key, request_hash, request, batch_key,
                   max_attempts, now, group_sealed, cost)",
        &[
            &ids,
            &owners,
            &group_keys,
            &share_keys,
            &dedup,
            &hashes,
            &requests,
            &batch_keys,
            &max_attempts,
            &nows,
            &sealed_groups,
            &costs,
        ],
    )
    .await?;
    let mut delivery_ids = Vec::new();
    let mut delivery_jobs = Vec::new();
    let mut channels = Vec::new();
    let mut payloads = Vec::new();
    let mut delivery_nows = Vec::new();
    for p in jobs {
        for reply in &p.job.replies {
            let id = format!("dlv_{}", uuid::Uuid::new_v4().simple());
            payloads.push(fields.seal(Field::ReplyPayload, &id, &reply.payload)?);
            delivery_ids.push(id);
            delivery_jobs.push(p.row.as_str());
            channels.push(reply.channel.as_str());
            delivery_nows.push(p.now);
        }
    }
    if !delivery_ids.is_empty() {
        tx.execute(
            "INSERT INTO deliveries (id, job_id, channel, payload, status, next_attempt_at,
                created_at, updated_at)
             SELECT id, job_id, channel, payload, 'pending', now, now, now
             FROM unnest($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::BIGINT[])
                 AS t (id, job_id, channel, payload, now)",
            &[
                &delivery_ids,
                &delivery_jobs,
                &channels,
                &payloads,
                &delivery_nows,
            ],
        )
        .await?;
    }
    Ok(())
}
