//! Answers by webhook, as the Standard Webhooks specification has them: once the job is
//! final, one signed POST of `job.succeeded` (with signed image links), `job.failed` or
//! `job.cancelled`, retried on the specification's schedule for about a day.
//!
//! The message id is the delivery's, so every retry of one answer carries the same
//! `webhook-id` and a receiver can drop repeats. The signing secrets are the API key's, read
//! at each attempt, so a rotation applies to answers still on their way; during the grace
//! period old and new secrets both sign. Where the URL may point is checked again at each
//! attempt, against the addresses its name resolves to then.

use crate::channel::ReplyChannel;
use crate::webhook::{
    signature_header, RetrySchedule, SendOutcome, UrlPolicy, WebhookClient, WebhookSecret,
};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sparkle_core::JobStatus;
use sparkle_queue::{ApiKeys, ClaimedDelivery, Job, ReplyTarget, Settle};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The outbox channel of webhooks.
pub const CHANNEL: &str = "webhook";

/// Where a job's webhook goes, and whose secrets sign it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookReply {
    pub url: String,
    /// The API key that submitted the job.
    pub key_id: String,
}

impl std::fmt::Debug for WebhookReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A URL may carry a receiver's token in its path or query.
        f.debug_struct("WebhookReply")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl WebhookReply {
    pub fn target(&self) -> ReplyTarget {
        ReplyTarget::new(CHANNEL, serde_json::to_vec(self).unwrap_or_default())
    }
}

/// Makes the `images` of a succeeded job's view: signed links, fresh at each attempt.
pub type ImageViews = Arc<dyn Fn(&Job) -> Vec<Value> + Send + Sync>;

pub struct WebhookChannel {
    pub client: WebhookClient,
    pub keys: Arc<dyn ApiKeys>,
    pub images: ImageViews,
    pub schedule: RetrySchedule,
    pub policy: UrlPolicy,
}

/// The event a final job announces.
pub fn event_type(status: JobStatus) -> &'static str {
    match status {
        JobStatus::Succeeded => "job.succeeded",
        JobStatus::Cancelled => "job.cancelled",
        _ => "job.failed",
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

impl WebhookChannel {
    /// The body of `job`'s event.
    pub fn body(&self, job: &Job, now: i64) -> Value {
        let images = if job.status == JobStatus::Succeeded {
            (self.images)(job)
        } else {
            Vec::new()
        };
        json!({
            "type": event_type(job.status),
            "timestamp": rfc3339(now),
            "data": {
                "id": job.id.to_string(),
                "object": "job",
                "status": job.status,
                "created_at": job.created_at_ms / 1000,
                "finished_at": job.finished_at_ms.map(|t| t / 1000),
                "images": images,
                "error": job.error.as_ref().map(|e| json!({ "code": e.code, "message": e.message })),
            }
        })
    }
}

#[async_trait]
impl ReplyChannel for WebhookChannel {
    fn name(&self) -> &'static str {
        CHANNEL
    }

    async fn attempt(&self, d: &ClaimedDelivery, job: Option<&Job>) -> Settle {
        let Ok(reply) = serde_json::from_slice::<WebhookReply>(&d.payload) else {
            return Settle::Abandoned {
                reason: "the webhook reply is unreadable".into(),
            };
        };
        let Some(job) = job else {
            return Settle::Abandoned {
                reason: "the job no longer exists".into(),
            };
        };
        if !job.status.is_final() {
            return Settle::AwaitChange {
                not_before: Duration::ZERO,
                fallback: Duration::from_secs(600),
                state: None,
            };
        }
        let secrets = match self.keys.webhook_secrets(&reply.key_id).await {
            Ok(secrets) => secrets,
            Err(e) => {
                tracing::warn!(job = %job.id, error = %e, "cannot read a key's webhook secrets");
                return Settle::Retry {
                    after: Duration::from_secs(5),
                    error: "the signing secret could not be read".into(),
                };
            }
        };
        let secrets: Vec<WebhookSecret> = secrets
            .iter()
            .filter_map(|s| WebhookSecret::from_bytes(s).ok())
            .collect();
        if secrets.is_empty() {
            return Settle::Abandoned {
                reason: "the API key has no webhook signing secret".into(),
            };
        }
        let url = match self.policy.check_syntax(&reply.url) {
            Ok(url) => url,
            Err(why) => {
                return Settle::Abandoned {
                    reason: why.to_string(),
                }
            }
        };
        let now = now_secs();
        let body = serde_json::to_vec(&self.body(job, now)).unwrap_or_default();
        let msg_id = format!("msg_{}", d.claim.delivery_id.trim_start_matches("dlv_"));
        let signing: Vec<&WebhookSecret> = secrets.iter().collect();
        let signature = signature_header(&signing, &msg_id, now, &body);
        match self
            .client
            .send(&url, &msg_id, now, &signature, body.into())
            .await
        {
            SendOutcome::Delivered { status } => {
                tracing::info!(job = %job.id, status, "webhook delivered");
                Settle::Delivered
            }
            SendOutcome::Refused { reason } => {
                tracing::warn!(job = %job.id, %reason, "webhook abandoned");
                Settle::Abandoned { reason }
            }
            SendOutcome::Retry {
                reason,
                retry_after,
            } => {
                let failures = d.attempts + 1;
                match self
                    .schedule
                    .delay_after(failures, retry_after, &mut rand::thread_rng())
                {
                    Some(after) => {
                        tracing::info!(job = %job.id, %reason, retry_in_s = after.as_secs(), "webhook failed; will retry");
                        Settle::Retry {
                            after,
                            error: reason,
                        }
                    }
                    None => {
                        tracing::warn!(job = %job.id, %reason, "webhook abandoned after its last retry");
                        Settle::Abandoned {
                            reason: format!("gave up after {failures} attempts: {reason}"),
                        }
                    }
                }
            }
        }
    }
}
