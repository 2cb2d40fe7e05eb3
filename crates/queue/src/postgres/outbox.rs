//! The [`Outbox`] on PostgreSQL: due deliveries claimed with `FOR UPDATE SKIP LOCKED`, so any
//! number of processes claim disjoint rows without waiting on one another.

use super::PgQueue;
use crate::fields::Field;
use crate::outbox::{millis, DeliveryRow};
use crate::{
    ClaimedDelivery, DeliveryClaim, DeliveryState, Outbox, OutboxStats, QueueError, Settle,
};
use async_trait::async_trait;
use sparkle_core::JobId;
use std::time::Duration;

#[async_trait]
impl Outbox for PgQueue {
    async fn claim(
        &self,
        channel: &str,
        max: usize,
        claim_for: Duration,
    ) -> Result<Vec<ClaimedDelivery>, QueueError> {
        let now = self.now();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                "SELECT id, job_id, payload, state, attempts, created_at FROM deliveries
                 WHERE status = 'pending' AND channel = $1 AND next_attempt_at <= $2
                 ORDER BY next_attempt_at LIMIT $3 FOR UPDATE SKIP LOCKED",
                &[&channel, &now, &i64::try_from(max).unwrap_or(i64::MAX)],
            )
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
            match delivery.open(&*self.fields, channel) {
                Ok(mut opened) => {
                    let claim_id = uuid::Uuid::new_v4().simple().to_string();
                    tx.execute(
                        "UPDATE deliveries SET claim_id = $2, next_attempt_at = $3,
                            wake_on_change = FALSE, job_changed = FALSE, updated_at = $4
                         WHERE id = $1",
                        &[&id, &claim_id, &now.saturating_add(millis(claim_for)), &now],
                    )
                    .await?;
                    opened.claim.claim_id = claim_id;
                    claimed.push(opened);
                }
                Err(reason) => {
                    tracing::error!(delivery = %id, %reason, "a delivery cannot be opened; set aside as dead");
                    tx.execute(
                        "UPDATE deliveries SET status = 'dead', last_error = $2, updated_at = $3
                         WHERE id = $1",
                        &[&id, &format!("cannot be opened: {reason}"), &now],
                    )
                    .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    async fn settle(&self, claim: &DeliveryClaim, settle: Settle) -> Result<(), QueueError> {
        let now = self.now();
        let id = &claim.delivery_id;
        let client = self.client().await?;
        let done = match &settle {
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
                client
                    .execute(
                        // A change while the claim was held is not waited for again.
                        "UPDATE deliveries SET claim_id = NULL,
                            wake_on_change = NOT job_changed,
                            next_attempt_at = CASE WHEN job_changed THEN $3::BIGINT ELSE $4::BIGINT END,
                            job_changed = FALSE, not_before = $3, state = COALESCE($5, state),
                            attempts = CASE WHEN $6::BOOLEAN THEN 0 ELSE attempts END,
                            last_error = CASE WHEN $6 THEN NULL ELSE last_error END,
                            updated_at = $7
                         WHERE id = $1 AND claim_id = $2 AND status = 'pending'",
                        &[
                            id,
                            &claim.claim_id,
                            &now.saturating_add(millis(*not_before)),
                            &now.saturating_add(millis(*fallback).max(millis(*not_before))),
                            &sealed,
                            &sent,
                            &now,
                        ],
                    )
                    .await?
            }
            Settle::Retry { after, error } => {
                client
                    .execute(
                        "UPDATE deliveries SET claim_id = NULL, wake_on_change = FALSE,
                            next_attempt_at = $3, attempts = attempts + 1, last_error = $4,
                            updated_at = $5
                         WHERE id = $1 AND claim_id = $2 AND status = 'pending'",
                        &[
                            id,
                            &claim.claim_id,
                            &now.saturating_add(millis(*after)),
                            error,
                            &now,
                        ],
                    )
                    .await?
            }
            Settle::Delivered => {
                client
                    .execute(
                        "UPDATE deliveries SET claim_id = NULL, status = 'delivered',
                            last_error = NULL, updated_at = $3
                         WHERE id = $1 AND claim_id = $2 AND status = 'pending'",
                        &[id, &claim.claim_id, &now],
                    )
                    .await?
            }
            Settle::Abandoned { reason } => {
                client
                    .execute(
                        "UPDATE deliveries SET claim_id = NULL, status = 'abandoned',
                            last_error = $3, updated_at = $4
                         WHERE id = $1 AND claim_id = $2 AND status = 'pending'",
                        &[id, &claim.claim_id, reason, &now],
                    )
                    .await?
            }
        };
        if done == 1 {
            Ok(())
        } else {
            Err(QueueError::ClaimLost(id.clone()))
        }
    }

    async fn unclaim(&self, claim: &DeliveryClaim) -> Result<(), QueueError> {
        let now = self.now();
        let client = self.client().await?;
        let done = client
            .execute(
                "UPDATE deliveries SET claim_id = NULL, next_attempt_at = $3, updated_at = $3
                 WHERE id = $1 AND claim_id = $2 AND status = 'pending'",
                &[&claim.delivery_id, &claim.claim_id, &now],
            )
            .await?;
        if done == 1 {
            Ok(())
        } else {
            Err(QueueError::ClaimLost(claim.delivery_id.clone()))
        }
    }

    async fn deliveries_of(&self, job: JobId) -> Result<Vec<DeliveryState>, QueueError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT channel, status, attempts, last_error, next_attempt_at FROM deliveries
                 WHERE job_id = $1 ORDER BY created_at, id",
                &[&job.to_string()],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let status: String = row.try_get("status")?;
                let next: i64 = row.try_get("next_attempt_at")?;
                Ok(DeliveryState {
                    channel: row.try_get("channel")?,
                    next_attempt_at_ms: (status == "pending").then_some(next),
                    status,
                    attempts: row.try_get::<_, i64>("attempts")?.max(0) as u32,
                    last_error: row.try_get("last_error")?,
                })
            })
            .collect()
    }

    async fn outbox_stats(&self) -> Result<OutboxStats, QueueError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) AS pending, MIN(created_at) AS oldest FROM deliveries
                 WHERE status = 'pending'",
                &[],
            )
            .await?;
        let oldest: Option<i64> = row.try_get("oldest")?;
        Ok(OutboxStats {
            pending: row.try_get::<_, i64>("pending")?.max(0) as u64,
            oldest_pending_age_ms: oldest.map(|t| (self.now() - t).max(0)),
        })
    }
}
