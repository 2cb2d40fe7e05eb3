//! The outbox: the answers a job owes, written with the job and worked by delivery.
//!
//! A reply is a channel name (`discord`, `webhook`, ...) and a payload the queue seals and
//! never reads: what a channel needs and how it answers belong to delivery. Each channel's
//! delivery task [`claim`](Outbox::claim)s due rows for a while, so any number of processes
//! can work one outbox and a message goes out once; a process that dies mid-send leaves its
//! claim to expire, and only that message is sent again. Every claim ends with a
//! [`Settle`]: wait for the job to change, try again later, delivered, or abandoned. A row
//! whose payload cannot be opened (a retired key, corruption) is set aside as `dead` with the
//! reason when it is claimed, and never holds up the others.

use crate::fields::{Field, FieldCipher};
use crate::{QueueError, SqliteQueue};
use async_trait::async_trait;
use sparkle_core::JobId;
use sqlx::Row;
use std::fmt;
use std::time::Duration;
use zeroize::Zeroizing;

/// An answer a job owes: where to (the channel) and what the channel needs to get there.
#[derive(Clone, PartialEq, Eq)]
pub struct ReplyTarget {
    pub channel: String,
    /// Opaque to the queue; sealed at rest. May hold secrets (an interaction token).
    pub payload: Zeroizing<Vec<u8>>,
}

impl ReplyTarget {
    pub fn new(channel: &str, payload: Vec<u8>) -> ReplyTarget {
        ReplyTarget {
            channel: channel.to_string(),
            payload: Zeroizing::new(payload),
        }
    }
}

impl fmt::Debug for ReplyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyTarget")
            .field("channel", &self.channel)
            .field("payload", &format_args!("<{} bytes>", self.payload.len()))
            .finish()
    }
}

/// Proof of holding a delivery: without the current claim id nothing can settle it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryClaim {
    pub delivery_id: String,
    pub claim_id: String,
}

/// A delivery that is due, claimed by the caller.
#[derive(Clone)]
pub struct ClaimedDelivery {
    pub claim: DeliveryClaim,
    pub job: JobId,
    pub channel: String,
    pub payload: Zeroizing<Vec<u8>>,
    /// What the channel last recorded with [`Settle`] (a progress text), if anything.
    pub state: Option<Zeroizing<Vec<u8>>>,
    /// Failed attempts since the last success.
    pub attempts: u32,
    pub created_at_ms: i64,
}

impl fmt::Debug for ClaimedDelivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimedDelivery")
            .field("claim", &self.claim)
            .field("job", &self.job)
            .field("channel", &self.channel)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// How a claim ends.
#[derive(Debug, Clone)]
pub enum Settle {
    /// Nothing (more) to send until the job changes: due at its next change, no sooner
    /// than `not_before` from now, and after `fallback` whatever happens. `state` replaces
    /// the recorded state when given (something was sent: the failure count starts again).
    AwaitChange {
        not_before: Duration,
        fallback: Duration,
        state: Option<Vec<u8>>,
    },
    /// The attempt failed; due again after `after`. Counts a failed attempt and keeps `error`.
    Retry { after: Duration, error: String },
    /// The answer went out; the delivery is over.
    Delivered,
    /// Given up; the reason is kept.
    Abandoned { reason: String },
}

/// Where a delivery stands, as a client may see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryState {
    pub channel: String,
    /// `pending`, `delivered`, `abandoned` or `dead`.
    pub status: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    /// When the next attempt is due (pending only).
    pub next_attempt_at_ms: Option<i64>,
}

/// Figures for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutboxStats {
    pub pending: u64,
    /// Age of the oldest pending delivery, in milliseconds.
    pub oldest_pending_age_ms: Option<i64>,
}

#[async_trait]
pub trait Outbox: Send + Sync + 'static {
    /// Claims up to `max` due deliveries of `channel` for `claim_for`; a claim that ran out
    /// is claimable again. Rows that cannot be opened are marked `dead` and skipped.
    async fn claim(
        &self,
        channel: &str,
        max: usize,
        claim_for: Duration,
    ) -> Result<Vec<ClaimedDelivery>, QueueError>;
    /// Ends a claim. [`QueueError::ClaimLost`] when the claim ran out and someone else holds it.
    async fn settle(&self, claim: &DeliveryClaim, settle: Settle) -> Result<(), QueueError>;
    /// Gives a claim back untouched, due at once (a process told to stop).
    async fn unclaim(&self, claim: &DeliveryClaim) -> Result<(), QueueError>;
    /// Every delivery of a job, oldest first.
    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryState>, QueueError>;
    async fn outbox_stats(&self) -> Result<OutboxStats, QueueError>;
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// Writes `replies` for job `job` inside the enqueue transaction.
pub(crate) async fn write_replies(
    tx: &mut sqlx::SqliteConnection,
    fields: &dyn FieldCipher,
    job: &str,
    replies: &[ReplyTarget],
    now: i64,
) -> Result<(), QueueError> {
    for reply in replies {
        let id = format!("dlv_{}", uuid::Uuid::new_v4().simple());
        let payload = fields.seal(Field::ReplyPayload, &id, &reply.payload)?;
        sqlx::query(
            "INSERT INTO deliveries (id, job_id, channel, payload, status, next_attempt_at,
                created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'pending', ?5, ?5, ?5)",
        )
        .bind(&id)
        .bind(job)
        .bind(&reply.channel)
        .bind(&payload)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

fn open_bytes(
    fields: &dyn FieldCipher,
    field: Field,
    id: &str,
    sealed: &str,
) -> Result<Zeroizing<Vec<u8>>, String> {
    fields
        .open(field, id, sealed)
        .map_err(|e| format!("{}: {e}", field.name()))
}

/// A due delivery as stored, before it is opened.
pub(crate) struct DeliveryRow {
    pub id: String,
    pub job_id: String,
    pub payload: String,
    pub state: Option<String>,
    pub attempts: i64,
    pub created_at: i64,
}

impl DeliveryRow {
    /// The delivery opened, its claim id still to be filled in; why it cannot be opened.
    pub fn open(self, fields: &dyn FieldCipher, channel: &str) -> Result<ClaimedDelivery, String> {
        let job: JobId = self.job_id.parse().map_err(|e| format!("job id: {e}"))?;
        let payload = open_bytes(fields, Field::ReplyPayload, &self.id, &self.payload)?;
        let state = self
            .state
            .map(|s| open_bytes(fields, Field::ReplyState, &self.id, &s))
            .transpose()?;
        Ok(ClaimedDelivery {
            claim: DeliveryClaim {
                delivery_id: self.id,
                claim_id: String::new(),
            },
            job,
            channel: channel.to_string(),
            payload,
            state,
            attempts: self.attempts.max(0) as u32,
            created_at_ms: self.created_at,
        })
    }
}

#[async_trait]
impl Outbox for SqliteQueue {
    async fn claim(
        &self,
        channel: &str,
        max: usize,
        claim_for: Duration,
    ) -> Result<Vec<ClaimedDelivery>, QueueError> {
        let now = self.clock.now_ms();
        let fields = &*self.fields;
        let (_turn, mut tx) = crate::sqlite::begin_write(&self.pool, &self.write_turn).await?;
        let rows = sqlx::query(
            "SELECT id, job_id, payload, state, attempts, created_at FROM deliveries
             WHERE status = 'pending' AND channel = ?1 AND next_attempt_at <= ?2
             ORDER BY next_attempt_at LIMIT ?3",
        )
        .bind(channel)
        .bind(now)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in rows {
            let delivery = DeliveryRow {
                id: row.try_get("id")?,
                job_id: row.try_get("job_id")?,
                payload: row.try_get("payload")?,
                state: row.try_get("state")?,
                attempts: row.try_get("attempts")?,
                created_at: row.try_get("created_at")?,
            };
            let id = delivery.id.clone();
            let mut opened = match delivery.open(fields, channel) {
                Ok(opened) => opened,
                Err(reason) => {
                    tracing::error!(delivery = %id, %reason, "a delivery cannot be opened; set aside as dead");
                    sqlx::query(
                        "UPDATE deliveries SET status = 'dead', last_error = ?2, updated_at = ?3
                         WHERE id = ?1",
                    )
                    .bind(&id)
                    .bind(format!("cannot be opened: {reason}"))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    continue;
                }
            };
            let claim_id = uuid::Uuid::new_v4().simple().to_string();
            sqlx::query(
                "UPDATE deliveries SET claim_id = ?2, next_attempt_at = ?3, wake_on_change = 0,
                    job_changed = 0, updated_at = ?4 WHERE id = ?1",
            )
            .bind(&id)
            .bind(&claim_id)
            .bind(now.saturating_add(millis(claim_for)))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            opened.claim.claim_id = claim_id;
            claimed.push(opened);
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn settle(&self, claim: &DeliveryClaim, settle: Settle) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        let id = &claim.delivery_id;
        let query = match &settle {
            Settle::AwaitChange {
                not_before,
                fallback,
                state,
            } => {
                let sealed = state
                    .as_ref()
                    .map(|s| self.fields.seal(Field::ReplyState, id, s))
                    .transpose()?;
                let sent = sealed.is_some();
                sqlx::query(
                    // A change while the claim was held is not waited for again.
                    "UPDATE deliveries SET claim_id = NULL,
                        wake_on_change = CASE WHEN job_changed = 1 THEN 0 ELSE 1 END,
                        next_attempt_at = CASE WHEN job_changed = 1 THEN ?3 ELSE ?4 END,
                        job_changed = 0, not_before = ?3, state = COALESCE(?5, state),
                        attempts = CASE WHEN ?6 THEN 0 ELSE attempts END,
                        last_error = CASE WHEN ?6 THEN NULL ELSE last_error END, updated_at = ?7
                     WHERE id = ?1 AND claim_id = ?2 AND status = 'pending'",
                )
                .bind(id)
                .bind(&claim.claim_id)
                .bind(now.saturating_add(millis(*not_before)))
                .bind(now.saturating_add(millis(*fallback).max(millis(*not_before))))
                .bind(sealed)
                .bind(sent)
                .bind(now)
            }
            Settle::Retry { after, error } => sqlx::query(
                "UPDATE deliveries SET claim_id = NULL, wake_on_change = 0,
                    next_attempt_at = ?3, attempts = attempts + 1, last_error = ?4, updated_at = ?5
                 WHERE id = ?1 AND claim_id = ?2 AND status = 'pending'",
            )
            .bind(id)
            .bind(&claim.claim_id)
            .bind(now.saturating_add(millis(*after)))
            .bind(error.clone())
            .bind(now),
            Settle::Delivered => sqlx::query(
                "UPDATE deliveries SET claim_id = NULL, status = 'delivered', last_error = NULL,
                    updated_at = ?3
                 WHERE id = ?1 AND claim_id = ?2 AND status = 'pending'",
            )
            .bind(id)
            .bind(&claim.claim_id)
            .bind(now),
            Settle::Abandoned { reason } => sqlx::query(
                "UPDATE deliveries SET claim_id = NULL, status = 'abandoned', last_error = ?3,
                    updated_at = ?4
                 WHERE id = ?1 AND claim_id = ?2 AND status = 'pending'",
            )
            .bind(id)
            .bind(&claim.claim_id)
            .bind(reason.clone())
            .bind(now),
        };
        let done = query.execute(&self.pool).await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(QueueError::ClaimLost(id.clone()))
        }
    }

    async fn unclaim(&self, claim: &DeliveryClaim) -> Result<(), QueueError> {
        let now = self.clock.now_ms();
        let done = sqlx::query(
            "UPDATE deliveries SET claim_id = NULL, next_attempt_at = ?3, updated_at = ?3
             WHERE id = ?1 AND claim_id = ?2 AND status = 'pending'",
        )
        .bind(&claim.delivery_id)
        .bind(&claim.claim_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(QueueError::ClaimLost(claim.delivery_id.clone()))
        }
    }

    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryState>, QueueError> {
        let rows = sqlx::query(
            "SELECT channel, status, attempts, last_error, next_attempt_at FROM deliveries
             WHERE job_id = ?1 ORDER BY created_at, id",
        )
        .bind(job.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                let next: i64 = row.try_get("next_attempt_at")?;
                Ok(DeliveryState {
                    channel: row.try_get("channel")?,
                    next_attempt_at_ms: (status == "pending").then_some(next),
                    status,
                    attempts: row.try_get::<i64, _>("attempts")?.max(0) as u32,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    async fn outbox_stats(&self) -> Result<OutboxStats, QueueError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest FROM deliveries
             WHERE status = 'pending'",
        )
        .fetch_one(&self.pool)
        .await?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(OutboxStats {
            pending: row.try_get::<i64, _>("pending")?.max(0) as u64,
            oldest_pending_age_ms: oldest.map(|t| (self.clock.now_ms() - t).max(0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::new_job;
    use crate::fields::testing::test_cipher;
    use crate::{JobQueue, SqliteOptions};

    #[tokio::test]
    async fn a_delivery_that_cannot_be_opened_is_set_aside_and_holds_up_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let q = SqliteQueue::open(
            &dir.path().join("o.db"),
            &SqliteOptions::default(),
            test_cipher(),
        )
        .await
        .expect("open");
        let mut broken = new_job("alice", "broken");
        broken.replies = vec![ReplyTarget::new("discord", b"a".to_vec())];
        let broken = q.enqueue(broken).await.expect("enqueue").job;
        let mut fine = new_job("bob", "fine");
        fine.replies = vec![ReplyTarget::new("discord", b"b".to_vec())];
        let fine = q.enqueue(fine).await.expect("enqueue").job;
        // A payload sealed for another row does not open here.
        sqlx::query(
            "UPDATE deliveries SET payload = (SELECT payload FROM deliveries WHERE job_id = ?2)
             WHERE job_id = ?1",
        )
        .bind(broken.id.to_string())
        .bind(fine.id.to_string())
        .execute(&q.pool)
        .await
        .expect("corrupt");
        let claimed = q
            .claim("discord", 10, Duration::from_secs(30))
            .await
            .expect("claim");
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].job, fine.id);
        let dead = &q.deliveries_of(broken.id).await.expect("of")[0];
        assert_eq!(dead.status, "dead");
        assert!(dead
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot be opened")));
        assert!(!format!("{:?}", claimed[0]).contains("payload: ["));
        assert!(format!("{:?}", ReplyTarget::new("x", b"secret".to_vec())).contains("6 bytes"));
    }
}
