//! Answers to Discord: progress edits of the interaction's response while the job runs, then
//! its image (or the reason it failed).
//!
//! Discord's answers decide the next attempt: a 429 waits exactly as long as Discord asks, a
//! 5xx or a timeout backs off, a refusal (the message is gone) abandons the delivery. A
//! Discord failure never touches the job: the image stays in the store and the next attempt
//! sends the same bytes. The interaction token lives 15 minutes: a little before it dies the
//! user is told the answer will come another way, and after it a finished result is posted in
//! the channel with the bot token when one is configured. Transient failures are retried for
//! as long as one of those paths can still answer, not a fixed number of times.
//!
//! A result must fit the attachment size Discord allows the interaction (carried in the
//! reply; 10 MiB when Discord did not say). Images that do not are re-encoded, or left to
//! the API, on copies only ([`fit()`](crate::fit())), and the message says so.

use crate::channel::ReplyChannel;
use crate::fit::{fit, Encoding, Fitted, StoredImage, DEFAULT_ATTACHMENT_LIMIT};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sparkle_core::JobStatus;
use sparkle_discord::{Attachment, ButtonSigner, DiscordRest, Message, RestError};
use sparkle_queue::{ClaimedDelivery, Job, JobQueue, ReplyTarget, Settle};
use sparkle_store::{ImageKey, ImageStore};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

/// The outbox channel of Discord answers.
pub const CHANNEL: &str = "discord";

/// Interaction tokens live 15 minutes.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// How long after the interaction token died a result may still be posted with the bot token.
const BOT_HORIZON: Duration = Duration::from_secs(60 * 60);

/// Where a job's answer goes: the interaction it answers.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscordReply {
    pub application_id: String,
    /// The interaction token: a secret, never printed.
    pub token: String,
    pub channel_id: Option<String>,
    /// The largest attachment, in bytes, Discord said the response may carry; `None` when it
    /// did not say.
    pub attachment_size_limit: Option<u64>,
    /// When the interaction token dies (Unix milliseconds).
    pub token_expires_at_ms: i64,
}

impl fmt::Debug for DiscordReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DiscordReply")
            .field("application_id", &self.application_id)
            .field("token", &"<redacted>")
            .field("channel_id", &self.channel_id)
            .field("attachment_size_limit", &self.attachment_size_limit)
            .field("token_expires_at_ms", &self.token_expires_at_ms)
            .finish()
    }
}

impl DiscordReply {
    /// The reply target a job owes this interaction.
    pub fn target(&self) -> ReplyTarget {
        let payload = Zeroizing::new(serde_json::to_vec(self).unwrap_or_default());
        ReplyTarget::new(CHANNEL, payload.to_vec())
    }

    fn from_payload(payload: &[u8]) -> Option<DiscordReply> {
        serde_json::from_slice(payload).ok()
    }
}

#[derive(Debug, Clone)]
pub struct DiscordOptions {
    /// Least time between two progress edits of one message.
    pub progress_every: Duration,
    /// How long before the interaction token dies the user is told that the answer will come
    /// another way (or not at all).
    pub deadline_margin: Duration,
}

impl Default for DiscordOptions {
    fn default() -> Self {
        DiscordOptions {
            progress_every: Duration::from_secs(2),
            deadline_margin: Duration::from_secs(60),
        }
    }
}

/// What Discord delivery works with.
pub struct DiscordChannel {
    pub queue: Arc<dyn JobQueue>,
    pub store: Arc<dyn ImageStore>,
    pub discord: Arc<DiscordRest>,
    /// The bot token, when configured: lets a result outlive its interaction token by
    /// posting in the channel instead.
    pub bot_token: Option<Arc<Zeroizing<String>>>,
    /// Signs the buttons on messages; none without it.
    pub buttons: Option<Arc<ButtonSigner>>,
    pub options: DiscordOptions,
}

/// Shown when the interaction token will die before the job is done.
const LATE_WITH_BOT: &str = "is taking longer than Discord lets me keep this message; the image will be posted in this channel when it is ready.";
const LATE_WITHOUT_BOT: &str = "is taking longer than Discord lets me keep this message, and I have no way to post it later. Please ask again in a while.";

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

fn until(at_ms: i64, now: i64) -> Duration {
    Duration::from_millis(u64::try_from(at_ms - now).unwrap_or(0))
}

/// Text recorded as a delivery's state.
fn state_text(d: &ClaimedDelivery) -> Option<String> {
    d.state
        .as_ref()
        .map(|s| String::from_utf8_lossy(s).into_owned())
}

/// Waiting for a change of the job after showing `shown` (if something was just shown).
fn await_change(not_before: Duration, fallback: Duration, shown: Option<String>) -> Settle {
    Settle::AwaitChange {
        not_before,
        fallback,
        state: shown.map(String::into_bytes),
    }
}

#[async_trait]
impl ReplyChannel for DiscordChannel {
    fn name(&self) -> &'static str {
        CHANNEL
    }

    async fn attempt(&self, d: &ClaimedDelivery, job: Option<&Job>) -> Settle {
        let Some(reply) = DiscordReply::from_payload(&d.payload) else {
            return Settle::Abandoned {
                reason: "the Discord reply is unreadable".into(),
            };
        };
        let Some(job) = job else {
            return Settle::Abandoned {
                reason: "the job no longer exists".into(),
            };
        };
        let now = crate::now_ms();
        if now >= reply.token_expires_at_ms {
            return self.after_token_expiry(d, &reply, job, now).await;
        }
        let margin = ms(self.options.deadline_margin);
        let notice_at = reply.token_expires_at_ms - margin;
        let last = state_text(d);
        if !job.status.is_final() && now >= notice_at {
            // Tell the user while the message can still be edited; then wait for the job.
            let late = if self.bot_token.is_some() {
                LATE_WITH_BOT
            } else {
                LATE_WITHOUT_BOT
            };
            let notice = format!("**{}** {late}", shown(&job.request.prompt));
            let expiry = until(reply.token_expires_at_ms, now);
            if last.as_deref() == Some(notice.as_str()) {
                return await_change(Duration::ZERO, expiry, None);
            }
            return match self
                .discord
                .edit_original(&reply.application_id, &reply.token, &text_only(&notice))
                .await
            {
                Ok(()) => await_change(Duration::ZERO, expiry, Some(notice)),
                Err(e) => self.failed_attempt(d, &reply, e, now),
            };
        }
        if !job.status.is_final() {
            let text = self.progress_text(job).await;
            // Whatever happens, look again when the user must be told of the deadline.
            let fallback = until(notice_at, now);
            if last.as_deref() == Some(text.as_str()) {
                return await_change(Duration::ZERO, fallback, None);
            }
            return match self
                .discord
                .edit_original(
                    &reply.application_id,
                    &reply.token,
                    &self.with_cancel(&text, job.id),
                )
                .await
            {
                Ok(()) => await_change(self.options.progress_every, fallback, Some(text)),
                Err(e) => self.failed_attempt(d, &reply, e, now),
            };
        }
        let outcome = match self.result_of(job, reply.attachment_size_limit).await {
            Ok(outcome) => outcome,
            Err(()) => return store_unavailable(),
        };
        match self
            .discord
            .edit_original(&reply.application_id, &reply.token, &outcome.message())
            .await
        {
            Ok(()) => {
                tracing::info!(job = %job.id, "delivered to Discord");
                Settle::Delivered
            }
            Err(e) => self.failed_attempt(d, &reply, e, now),
        }
    }
}

fn store_unavailable() -> Settle {
    Settle::Retry {
        after: Duration::from_secs(5),
        error: "image store unavailable".into(),
    }
}

impl DiscordChannel {
    /// The interaction token is dead: post the result in the channel with the bot token, or
    /// give up (the user was told before the token died).
    async fn after_token_expiry(
        &self,
        d: &ClaimedDelivery,
        reply: &DiscordReply,
        job: &Job,
        now: i64,
    ) -> Settle {
        let (Some(bot), Some(channel)) = (&self.bot_token, &reply.channel_id) else {
            return Settle::Abandoned {
                reason: "the interaction token expired and no bot token is configured".into(),
            };
        };
        if !job.status.is_final() {
            return await_change(Duration::ZERO, Duration::from_secs(60), None);
        }
        // The interaction's limit is the server's upload limit, which a channel message
        // from the bot meets too.
        let outcome = match self.result_of(job, reply.attachment_size_limit).await {
            Ok(outcome) => outcome,
            Err(()) => return store_unavailable(),
        };
        match self
            .discord
            .create_message(bot, channel, &outcome.message())
            .await
        {
            Ok(()) => {
                tracing::info!(job = %job.id, "delivered to the Discord channel after the token expired");
                Settle::Delivered
            }
            Err(e) => self.failed_attempt(d, reply, e, now),
        }
    }

    /// The last moment an answer can still reach the user: the token's death, or with a bot
    /// token and a channel, a while after it.
    fn horizon_ms(&self, reply: &DiscordReply) -> i64 {
        match (&self.bot_token, &reply.channel_id) {
            (Some(_), Some(_)) => reply.token_expires_at_ms + ms(BOT_HORIZON),
            _ => reply.token_expires_at_ms,
        }
    }

    fn failed_attempt(
        &self,
        d: &ClaimedDelivery,
        reply: &DiscordReply,
        error: RestError,
        now: i64,
    ) -> Settle {
        let horizon = self.horizon_ms(reply);
        match &error {
            RestError::RateLimited { retry_after, .. } if now + ms(*retry_after) < horizon => {
                Settle::Retry {
                    after: *retry_after,
                    error: error.to_string(),
                }
            }
            e if e.is_transient() => {
                let backoff = 500i64.saturating_mul(1 << d.attempts.min(7)).min(60_000);
                if now + backoff >= horizon {
                    tracing::warn!(job = %d.job, error = %e, "Discord delivery abandoned: no time left to answer");
                    return Settle::Abandoned {
                        reason: format!("no time left to answer: {e}"),
                    };
                }
                tracing::warn!(job = %d.job, error = %e, backoff_ms = backoff, "Discord delivery failed; will retry");
                Settle::Retry {
                    after: Duration::from_millis(backoff as u64),
                    error: e.to_string(),
                }
            }
            e => {
                tracing::warn!(job = %d.job, error = %e, "Discord delivery abandoned");
                Settle::Abandoned {
                    reason: e.to_string(),
                }
            }
        }
    }

    /// The final message of a finished job: its text, its images (re-encoded or left out when
    /// they exceed `attachment_limit`, Discord's default when unknown), and the buttons that
    /// go with it; `Err` when the image store cannot be read right now.
    async fn result_of(&self, job: &Job, attachment_limit: Option<u64>) -> Result<Outcome, ()> {
        let id = job.id;
        if job.status != JobStatus::Succeeded {
            let reason = job
                .error
                .as_ref()
                .map(|e| e.message.as_str())
                .unwrap_or("no reason recorded");
            let content = format!(
                "Could not make **{}** ({}): {reason}",
                shown(&job.request.prompt),
                job.status
            );
            // An empty row list removes the Cancel button the progress message had.
            return Ok(Outcome {
                content,
                images: Vec::new(),
                components: Some(serde_json::json!([])),
            });
        }
        let mut stored = Vec::new();
        for index in 0..job.images {
            match self
                .store
                .get(ImageKey { job: id, index }, job.images_attempt)
                .await
            {
                Ok(Some(png)) => stored.push(StoredImage {
                    stem: format!("sparkle-{}", job.request.seed_of(index)),
                    png: png.to_vec(),
                }),
                Ok(None) => tracing::warn!(job = %id, index, "a finished job's image is missing"),
                Err(e) => {
                    tracing::warn!(job = %id, error = %e, "image store unavailable for delivery");
                    return Err(());
                }
            }
        }
        let limit = attachment_limit.unwrap_or(DEFAULT_ATTACHMENT_LIMIT);
        let available = stored.len();
        // Re-encoding is CPU work: off the runtime. The store keeps its PNGs whatever happens.
        let fitted = match tokio::task::spawn_blocking(move || fit(&stored, limit)).await {
            Ok(fitted) => fitted,
            Err(e) => {
                tracing::warn!(job = %id, error = %e, "fitting images to Discord's limit failed");
                Fitted {
                    attachments: Vec::new(),
                    encoding: Encoding::Stored,
                    left_out: available,
                }
            }
        };
        let mut content = result_text(job);
        if let Some(note) = fit_note(&fitted, available, limit, &id.to_string()) {
            tracing::info!(job = %id, encoding = ?fitted.encoding, left_out = fitted.left_out, limit, "images fitted to Discord's attachment limit");
            content.push('\n');
            content.push_str(&note);
        }
        let components = match &self.buttons {
            Some(buttons) => Some(buttons.result_buttons(&id.to_string())),
            None => Some(serde_json::json!([])),
        };
        Ok(Outcome {
            content,
            images: fitted.attachments,
            components,
        })
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
        let prompt = &shown(&job.request.prompt);
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

/// What the message says when its images are not the stored PNGs, all of them: how they were
/// re-encoded, how many were left out, and where all `available` images are.
fn fit_note(fitted: &Fitted, available: usize, limit: u64, job: &str) -> Option<String> {
    let reencoded = match fitted.encoding {
        Encoding::Jpeg { quality } if !fitted.attachments.is_empty() => Some(quality),
        _ => None,
    };
    if reencoded.is_none() && fitted.left_out == 0 {
        return None;
    }
    let limit = human_size(limit);
    let plural = available != 1;
    let mut note = Vec::new();
    if let Some(quality) = reencoded {
        note.push(format!(
            "Re-encoded as JPEG (quality {quality}) to fit Discord's {limit} upload limit."
        ));
    }
    if fitted.left_out > 0 && fitted.attachments.is_empty() {
        let what = if plural {
            "The images are"
        } else {
            "The image is"
        };
        note.push(format!(
            "{what} too large for Discord's {limit} upload limit."
        ));
    } else if fitted.left_out > 0 {
        note.push(format!(
            "{} of {available} images did not fit Discord's {limit} upload limit.",
            fitted.left_out
        ));
    }
    let where_ = format!("available through the API at `/v1/jobs/{job}`.");
    note.push(match (fitted.left_out, plural) {
        (0, false) => format!("The original PNG is {where_}"),
        (0, true) => format!("The original PNGs are {where_}"),
        (_, false) => format!("1 image is {where_}"),
        (_, true) => format!("{available} images are {where_}"),
    });
    Some(note.join(" "))
}

/// `10 MiB`, `1.5 KiB`, `900 bytes`.
fn human_size(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    let (unit, name) = match bytes {
        b if b >= MIB => (MIB, "MiB"),
        b if b >= KIB => (KIB, "KiB"),
        _ => return format!("{bytes} bytes"),
    };
    let tenths = bytes.saturating_mul(10).saturating_add(unit / 2) / unit;
    let (whole, tenth) = (tenths / 10, tenths - tenths / 10 * 10);
    if tenth == 0 {
        format!("{whole} {name}")
    } else {
        format!("{whole}.{tenth} {name}")
    }
}

/// Most characters of a prompt a message shows: Discord refuses messages over 2000, and
/// the prompt shares one with the parameters and notes. The full prompt stays in the job.
const SHOWN_PROMPT_CHARS: usize = 900;

/// The prompt as messages show it: clipped, and without `*` so it cannot break the bold.
fn shown(prompt: &str) -> String {
    let mut text: String = prompt
        .chars()
        .filter(|&c| c != '*')
        .take(SHOWN_PROMPT_CHARS)
        .collect();
    if prompt.chars().filter(|&c| c != '*').count() > SHOWN_PROMPT_CHARS {
        text.push('…');
    }
    text
}

fn result_text(job: &Job) -> String {
    let r = &job.request;
    format!(
        "**{}**\nSeed {} · {} steps · {} · CFG {} · {}x{} · {}",
        shown(&r.prompt),
        r.seed,
        r.steps,
        r.scheduler.display_name(),
        r.guidance_scale,
        r.width,
        r.height,
        r.model
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_are_clipped_for_messages() {
        assert_eq!(shown("a **bold** corgi"), "a bold corgi");
        let long = "x".repeat(5000);
        let clipped = shown(&long);
        assert_eq!(clipped.chars().count(), SHOWN_PROMPT_CHARS + 1);
        assert!(clipped.ends_with('…'));
    }

    fn fitted(attached: usize, encoding: Encoding, left_out: usize) -> Fitted {
        Fitted {
            attachments: (0..attached)
                .map(|i| Attachment::jpeg(format!("{i}.jpg"), vec![0; 10]))
                .collect(),
            encoding,
            left_out,
        }
    }

    #[test]
    fn the_message_says_what_happened_to_the_images() {
        let jpeg = Encoding::Jpeg { quality: 70 };
        assert_eq!(fit_note(&fitted(1, Encoding::Stored, 0), 1, 10, "j"), None);
        assert_eq!(
            fit_note(&fitted(1, Encoding::Recompressed, 0), 1, 10, "j"),
            None,
            "same pixels: nothing to say"
        );
        assert_eq!(
            fit_note(&fitted(1, jpeg, 0), 1, 1536, "j").as_deref(),
            Some("Re-encoded as JPEG (quality 70) to fit Discord's 1.5 KiB upload limit. The original PNG is available through the API at `/v1/jobs/j`.")
        );
        assert_eq!(
            fit_note(&fitted(2, jpeg, 2), 4, 10 << 20, "j").as_deref(),
            Some("Re-encoded as JPEG (quality 70) to fit Discord's 10 MiB upload limit. 2 of 4 images did not fit Discord's 10 MiB upload limit. 4 images are available through the API at `/v1/jobs/j`.")
        );
        assert_eq!(
            fit_note(&fitted(0, Encoding::Stored, 1), 1, 100, "j").as_deref(),
            Some("The image is too large for Discord's 100 bytes upload limit. 1 image is available through the API at `/v1/jobs/j`.")
        );
        assert_eq!(
            fit_note(&fitted(0, Encoding::Stored, 4), 4, 100, "j").as_deref(),
            Some("The images are too large for Discord's 100 bytes upload limit. 4 images are available through the API at `/v1/jobs/j`.")
        );
    }

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human_size(0), "0 bytes");
        assert_eq!(human_size(1023), "1023 bytes");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(10 * 1024 * 1024), "10 MiB");
        assert_eq!(human_size(25 * 1024 * 1024 + 1), "25 MiB");
        assert!(human_size(u64::MAX).ends_with("MiB"));
    }
}
