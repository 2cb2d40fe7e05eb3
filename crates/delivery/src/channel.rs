//! The loop every reply channel runs: claim due deliveries, attempt each against its job as it
//! is now, settle the claim; sleep until the queue changes or a retry may be due.

use crate::events::JobEvents;
use async_trait::async_trait;
use futures::StreamExt;
use sparkle_queue::{ClaimedDelivery, Job, JobQueue, Outbox, QueueError, Settle};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// One way answers leave: Discord, webhooks.
#[async_trait]
pub trait ReplyChannel: Send + Sync + 'static {
    /// The channel's name in the outbox.
    fn name(&self) -> &'static str;
    /// One attempt at `delivery`, whose job is `job` now (`None`: it no longer exists).
    async fn attempt(&self, delivery: &ClaimedDelivery, job: Option<&Job>) -> Settle;
}

#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// How long a claim lasts: longer than any one attempt takes.
    pub claim_for: Duration,
    /// Deliveries claimed at once.
    pub batch: usize,
    /// Attempts in flight at once.
    pub concurrency: usize,
    /// Longest sleep between two looks at the outbox (retries come due on their own).
    pub idle: Duration,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            claim_for: Duration::from_secs(60),
            batch: 32,
            concurrency: 8,
            idle: Duration::from_secs(1),
        }
    }
}

/// Works `channel`'s deliveries until `shutdown`; attempts in flight then finish, and
/// claimed deliveries not yet attempted are given back.
pub async fn run_channel(
    channel: Arc<dyn ReplyChannel>,
    outbox: Arc<dyn Outbox>,
    queue: Arc<dyn JobQueue>,
    events: Arc<JobEvents>,
    options: ChannelOptions,
    shutdown: CancellationToken,
) {
    let name = channel.name();
    while !shutdown.is_cancelled() {
        let claimed = match outbox.claim(name, options.batch, options.claim_for).await {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::warn!(channel = name, error = %e, "cannot claim deliveries");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = events.changed(options.idle) => {}
            }
            continue;
        }
        futures::stream::iter(claimed)
            .for_each_concurrent(options.concurrency, |delivery| {
                let (channel, outbox, queue, shutdown) =
                    (channel.clone(), outbox.clone(), queue.clone(), shutdown.clone());
                let claim_for = options.claim_for;
                async move {
                    if shutdown.is_cancelled() {
                        if let Err(e) = outbox.unclaim(&delivery.claim).await {
                            tracing::warn!(channel = name, error = %e, "cannot give a delivery back");
                        }
                        return;
                    }
                    if let Err(e) =
                        attempt(&*channel, &*outbox, &*queue, &delivery, claim_for).await
                    {
                        tracing::warn!(channel = name, job = %delivery.job, error = %e, "delivery bookkeeping failed");
                    }
                }
            })
            .await;
    }
    tracing::info!(channel = name, "delivery stopped");
}

async fn attempt(
    channel: &dyn ReplyChannel,
    outbox: &dyn Outbox,
    queue: &dyn JobQueue,
    delivery: &ClaimedDelivery,
    claim_for: Duration,
) -> Result<(), QueueError> {
    let job = match queue.get(delivery.job).await {
        Ok(job) => job,
        Err(e) => {
            // The job cannot be read now (the database is away): try again soon.
            outbox
                .settle(
                    &delivery.claim,
                    Settle::Retry {
                        after: Duration::from_secs(5),
                        error: "the job could not be read".into(),
                    },
                )
                .await?;
            return Err(e);
        }
    };
    let settle = channel.attempt(delivery, job.as_ref()).await;
    let name = channel.name();
    let outcome = match &settle {
        Settle::Delivered => "sent",
        Settle::AwaitChange { state: Some(_), .. } => "progress",
        Settle::AwaitChange { state: None, .. } => "waiting",
        Settle::Retry { .. } => "retried",
        Settle::Abandoned { .. } => "failed",
    };
    if outcome != "waiting" {
        metrics::counter!("sparkle_deliveries_total", "channel" => name, "outcome" => outcome)
            .increment(1);
    }
    // From the job's end to its answer's delivery.
    if let (Settle::Delivered, Some(finished)) =
        (&settle, job.as_ref().and_then(|j| j.finished_at_ms))
    {
        metrics::histogram!("sparkle_delivery_seconds", "channel" => name)
            .record((crate::now_ms() - finished).max(0) as f64 / 1000.0);
    }
    // The answer has left: recording that must not be given up while the claim still holds,
    // or the claim runs out and the answer is sent again. A database that is away for a
    // moment (a failover, a restart) is waited for, within half the claim.
    let give_up = std::time::Instant::now() + claim_for / 2;
    let mut pause = Duration::from_millis(100);
    loop {
        match outbox.settle(&delivery.claim, settle.clone()).await {
            Err(QueueError::ClaimLost(id)) => {
                tracing::warn!(channel = name, delivery = %id, "a delivery's claim ran out during its attempt");
                return Ok(());
            }
            Err(e) if transient(&e) && std::time::Instant::now() + pause < give_up => {
                tracing::debug!(channel = name, job = %delivery.job, error = %e, "recording a delivery again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Errors a moment later may not repeat: the database was away or refused the commit.
fn transient(e: &QueueError) -> bool {
    matches!(
        e,
        QueueError::Unavailable(_)
            | QueueError::Postgres(_)
            | QueueError::Database(_)
            | QueueError::CommitFailed(_)
    )
}

/// Reports the outbox's backlog as metrics until `shutdown`.
pub async fn report_backlog(outbox: Arc<dyn Outbox>, every: Duration, shutdown: CancellationToken) {
    loop {
        match outbox.outbox_stats().await {
            Ok(stats) => {
                metrics::gauge!("sparkle_deliveries_pending").set(stats.pending as f64);
                metrics::gauge!("sparkle_delivery_oldest_pending_seconds")
                    .set(stats.oldest_pending_age_ms.unwrap_or(0) as f64 / 1000.0);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the outbox backlog"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
