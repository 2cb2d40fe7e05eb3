//! Discord's side of Sparkle: what Discord sends to the interactions endpoint and how to
//! know it was Discord that sent it.
//!
//! Every request is verified before anything in it is parsed: an Ed25519 signature over the
//! timestamp header followed by the raw body, made with the application's key, and a
//! timestamp inside a small window around now (Discord gives no replay protection of its
//! own; the gateway also refuses an interaction id it has already seen). Only then is the
//! body read as an [`Interaction`].
//!
//! [`DiscordRest`] talks back: it edits an interaction's original response, honouring
//! Discord's rate limits in one place.
//!
//! This crate knows nothing of the queue's internals or of HTTP serving.

mod buttons;
mod command;
mod files;
mod interaction;
mod rest;
mod verify;

pub use buttons::{ButtonAction, ButtonSigner};
pub use command::{autocomplete_answer, lora_choices, prompt_choices, sparkle_command};
pub use files::{AttachedFiles, DISCORD_FILE_HOSTS};
pub use interaction::{
    AttachedFile, CommandData, CommandOption, Interaction, InteractionKind, OptionValue, Resolved,
    User,
};
pub use rest::{Attachment, DiscordRest, Message, RestError};
pub use verify::{SignatureError, Verifier};
