//! Webhooks, the parts that need no queue: the Standard Webhooks signature ([`WebhookSecret`],
//! [`signature_header`]), where a webhook may go ([`UrlPolicy`] when a URL is given,
//! [`GuardedResolver`] again at every send, so that a name cannot be rebound to an internal
//! address in between), one signed POST and what its answer means ([`WebhookClient`],
//! [`SendOutcome`]), and how long to wait before the next attempt ([`RetrySchedule`]).
//!
//! None of it knows the queue: which event is due, how attempts are recorded and who owns the
//! secret are decided by the caller, which hands over a URL, a message id, a timestamp, the
//! signature and the body, and gets back delivered, retry (perhaps after a time the receiver
//! asked for) or refused.

mod address;
mod schedule;
mod secret;
mod send;

pub use address::{forbidden_address, GuardedResolver, UrlPolicy, UrlRefusal, MAX_URL_LEN};
pub use schedule::RetrySchedule;
pub use secret::{signature_header, WebhookSecret};
pub use send::{SendOutcome, WebhookClient};

/// What can go wrong with a secret or the HTTP client. Messages never contain the secret.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook secret is empty")]
    SecretEmpty,
    #[error("webhook secret must start with whsec_")]
    SecretPrefix,
    #[error("webhook secret is not standard base64 after whsec_")]
    SecretEncoding,
    #[error("webhook secret must be {min} to {max} bytes ({given} given)")]
    SecretLength {
        min: usize,
        max: usize,
        given: usize,
    },
    #[error("webhook HTTP client could not be built: {0}")]
    Client(#[source] reqwest::Error),
}
