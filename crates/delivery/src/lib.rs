//! Delivery: the one place answers leave from.
//!
//! A job's answers are written with it, as reply targets in the queue's outbox (a channel
//! name and a sealed payload only this crate reads). Each channel — [`discord`] and
//! [`webhooks`] — runs one loop ([`channel::run_channel`]) in every control-plane process:
//! claim due deliveries, attempt each against its job as it is now, settle the claim. Claims
//! make any number of processes safe: a message goes out once, and a process that dies
//! mid-send leaves only that message to be sent again when its claim runs out. A delivery
//! waiting for its job is made due by the job's next change, in the transaction that makes it.
//!
//! Clients that follow a job live — event streams and the synchronous OpenAI route — do not
//! poll: they subscribe to [`events::JobEvents`], which follows the queue's change counter
//! once per process and pushes each change to the subscribers of that job.
//!
//! Workers never hold a bot token, an interaction token or a signing secret; they only
//! finish jobs. Delivery never touches a job: a failed answer is retried on its own, and the
//! image is never made again.

pub mod channel;
pub mod discord;
pub mod events;
mod fit;
pub mod webhook;
pub mod webhooks;

/// Wall-clock milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub use channel::{report_backlog, run_channel, ChannelOptions, ReplyChannel};
pub use fit::{fit, Encoding, Fitted, StoredImage, DEFAULT_ATTACHMENT_LIMIT};
