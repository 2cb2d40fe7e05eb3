//! Delivery: the control plane's side of answering Discord, beside the gateway.
//!
//! Workers never hold a bot token or an interaction token; they only finish jobs. This task
//! works the Discord outbox: every due delivery is compared with its job — queued or running
//! jobs get a progress edit when the text changed and the last edit is old enough, finished
//! jobs get their image (or the reason they failed) as an edit of the original response.
//! Discord's answers decide the next attempt: a 429 waits exactly as long as Discord asks, a
//! 5xx or a timeout backs off, a refusal (the token died, the message is gone) abandons the
//! delivery. A Discord failure never touches the job: the image stays in the store and the
//! next attempt sends the same bytes.

use sparkle_core::JobStatus;
use sparkle_discord::{Attachment, ButtonSigner, DiscordRest, Message, RestError};
use sparkle_queue::{Delivery, DiscordOutbox, Job, JobQueue, QueueError};
use sparkle_store::{ImageKey, ImageStore};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// How often the outbox is read.
    pub poll: Duration,
    /// Least time between two progress edits of one message.
    pub progress_every: Duration,
    /// Attempts at one delivery before it is abandoned.
    pub max_attempts: u32,
    /// How long before the interaction token dies the user is told that the answer will come
    /// another way (or not at all).
    pub deadline_margin: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        DeliveryOptions {
            poll: Duration::from_millis(500),
            progress_every: Duration::from_secs(2),
            max_attempts: 10,
            deadline_margin: Duration::from_secs(60),
        }
    }
}

/// What delivery works with.
#[derive(Clone)]
pub struct Deliverer {
    pub queue: Arc<dyn JobQueue>,
    pub outbox: Arc<dyn DiscordOutbox>,
    pub store: Arc<dyn ImageStore>,
    pub discord: Arc<DiscordRest>,
    /// The bot token, when configured: lets a result outlive its interaction token by
    /// posting in the channel instead.
    pub bot_token: Option<Arc<Zeroizing<String>>>,
    /// Signs the buttons on messages; none without it.
    pub buttons: Option<Arc<ButtonSigner>>,
    pub options: DeliveryOptions,
}

/// Shown when the interaction token will die before the job is done.
const LATE_WITH_BOT: &str = "is taking longer than Discord lets me keep this message; the image will be posted in this channel when it is ready.";
const LATE_WITHOUT_BOT: &str = "is taking longer than Discord lets me keep this message, and I have no way to post it later. Please ask again in a while.";

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Deliverer {
    /// Works the outbox until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.options.poll);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let due = match self.outbox.due(32).await {
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the Discord outbox");
                    continue;
                }
            };
            for delivery in due {
                let job = delivery.target.job;
                if let Err(e) = self.deliver(&delivery).await {
                    tracing::warn!(%job, error = %e, "delivery bookkeeping failed");
                }
            }
        }
    }

    async fn deliver(&self, d: &Delivery) -> Result<(), QueueError> {
        let id = d.target.job;
        let Some(job) = self.queue.get(id).await? else {
            return self.outbox.abandoned(id, "the job no longer exists").await;
        };
        let poll = self.options.poll.as_millis() as i64;
        let now = now_ms();
        if now >= d.token_expires_at_ms {
            return self.after_token_expiry(d, &job).await;
        }
        let margin = self.options.deadline_margin.as_millis() as i64;
        if !job.status.is_final() && now >= d.token_expires_at_ms - margin {
            // Tell the user while the message can still be edited; then wait for the job.
            let late = if self.bot_token.is_some() {
                LATE_WITH_BOT
            } else {
                LATE_WITHOUT_BOT
            };
            let notice = format!("**{}** {late}", job.request.prompt);
            if d.last_progress.as_deref() == Some(notice.as_str()) {
                return self.outbox.wait(id, poll).await;
            }
            return match self
                .discord
                .edit_original(
                    &d.target.application_id,
                    &d.target.token,
                    &text_only(&notice),
                )
                .await
            {
                Ok(()) => self.outbox.progressed(id, &notice).await,
                Err(e) => self.failed_attempt(d, e).await,
            };
        }
        if !job.status.is_final() {
            let text = self.progress_text(&job).await;
            let recent = d
                .last_edit_at_ms
                .is_some_and(|t| now_ms() - t < self.options.progress_every.as_millis() as i64);
            if d.last_progress.as_deref() == Some(text.as_str()) || recent {
                return self.outbox.wait(id, poll).await;
            }
            return match self
                .discord
                .edit_original(
                    &d.target.application_id,
                    &d.target.token,
                    &self.with_cancel(&text, id),
                )
                .await
            {
                Ok(()) => self.outbox.progressed(id, &text).await,
                Err(e) => self.failed_attempt(d, e).await,
            };
        }
        let outcome = match self.result_of(&job).await {
            Ok(outcome) => outcome,
            Err(()) => {
                return self
                    .outbox
                    .retry_later(id, 5_000, "image store unavailable")
                    .await
            }
        };
        match self
            .discord
            .edit_original(
                &d.target.application_id,
                &d.target.token,
                &outcome.message(),
            )
            .await
        {
            Ok(()) => {
                tracing::info!(job = %id, "delivered to Discord");
                self.outbox.delivered(id).await
            }
            Err(e) => self.failed_attempt(d, e).await,
        }
    }

    /// The interaction token is dead: post the result in the channel with the bot token, or
    /// give up (the user was told before the token died).
    async fn after_token_expiry(&self, d: &Delivery, job: &Job) -> Result<(), QueueError> {
        let id = d.target.job;
        let (Some(bot), Some(channel)) = (&self.bot_token, &d.target.channel_id) else {
            return self
                .outbox
                .abandoned(
                    id,
                    "the interaction token expired and no bot token is configured",
                )
                .await;
        };
        if !job.status.is_final() {
            return self
                .outbox
                .wait(id, self.options.poll.as_millis() as i64)
                .await;
        }
        let outcome = match self.result_of(job).await {
            Ok(outcome) => outcome,
            Err(()) => {
                return self
                    .outbox
                    .retry_later(id, 5_000, "image store unavailable")
                    .await
            }
        };
        match self
            .discord
            .create_message(bot, channel, &outcome.message())
            .await
        {
            Ok(()) => {
                tracing::info!(job = %id, "delivered to the Discord channel after the token expired");
                self.outbox.delivered(id).await
            }
            Err(e) => self.failed_attempt(d, e).await,
        }
    }

    /// The final message of a finished job: its text, its images, and the buttons that go
    /// with it; `Err` when the image store cannot be read right now.
    async fn result_of(&self, job: &Job) -> Result<Outcome, ()> {
        let id = job.id;
        if job.status != JobStatus::Succeeded {
            let reason = job
                .error
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or("no reason recorded");
            let content = format!(
                "Could not make **{}** ({}): {reason}",
                job.request.prompt, job.status
            );
            // An empty row list removes the Cancel button the progress message had.
            return Ok(Outcome {
                content,
                images: Vec::new(),
                components: Some(serde_json::json!([])),
            });
        }
        let mut images = Vec::new();
        for index in 0..job.images {
            match self.store.get(ImageKey { job: id, index }).await {
                Ok(Some(png)) => images.push(Attachment {
                    filename: format!("sparkle-{}.png", job.request.seed_of(index)),
                    bytes: png.to_vec(),
                }),
                Ok(None) => tracing::warn!(job = %id, index, "a finished job's image is missing"),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "image store unavailable for delivery");
                    return Err(());
                }
            }
        }
        let components = match &self.buttons {
            Some(buttons) => Some(buttons.result_buttons(&id.to_string())),
            None => Some(serde_json::json!([])),
        };
        Ok(Outcome {
            content: result_text(job),
            images,
            components,
        })
    }

    async fn failed_attempt(&self, d: &Delivery, error: RestError) -> Result<(), QueueError> {
        let id = d.target.job;
        match &error {
            RestError::RateLimited { retry_after, .. } => {
                self.outbox
                    .retry_later(id, retry_after.as_millis() as i64, &error.to_string())
                    .await
            }
            e if e.is_transient() && d.attempts + 1 < self.options.max_attempts => {
                let backoff = 500i64.saturating_mul(1 << d.attempts.min(7)).min(60_000);
                tracing::warn!(job = %id, error = %e, backoff_ms = backoff, "Discord delivery failed; will retry");
                self.outbox.retry_later(id, backoff, &e.to_string()).await
            }
            e => {
                tracing::warn!(job = %id, error = %e, "Discord delivery abandoned");
                self.outbox.abandoned(id, &e.to_string()).await
            }
        }
    }

    /// A progress message, with a Cancel button when buttons are configured.
    fn with_cancel<'a>(&self, content: &'a str, job: sparkle_core::JobId) -> Message<'a> {
        Message {
            content,
            images: &[],
            components: self
                .buttons
                .as_ref()
                .map(|b| b.cancel_button(&job.to_string())),
        }
    }

    async fn progress_text(&self, job: &Job) -> String {
        let prompt = &job.request.prompt;
        match (job.status, job.progress) {
            (JobStatus::Running, Some(p)) => {
                format!("Painting **{prompt}** — step {}/{}", p.step, p.total)
            }
            (JobStatus::Running, None) => format!("Painting **{prompt}** — starting"),
            _ => match self.queue.position(job.id).await.ok().flatten() {
                Some(0) => format!("Queued **{prompt}** — next in line"),
                Some(n) => format!("Queued **{prompt}** — {n} ahead"),
                None => format!("Queued **{prompt}**"),
            },
        }
    }
}

/// A finished job's message.
struct Outcome {
    content: String,
    images: Vec<Attachment>,
    components: Option<serde_json::Value>,
}

impl Outcome {
    fn message(&self) -> Message<'_> {
        Message {
            content: &self.content,
            images: &self.images,
            components: self.components.clone(),
        }
    }
}

fn text_only(content: &str) -> Message<'_> {
    Message {
        content,
        images: &[],
        components: None,
    }
}

fn result_text(job: &Job) -> String {
    let r = &job.request;
    format!(
        "**{}**\nSeed {} · {} steps · {} · CFG {} · {}x{} · {}",
        r.prompt,
        r.seed,
        r.steps,
        r.scheduler.display_name(),
        r.guidance_scale,
        r.width,
        r.height,
        r.model
    )
}
