//! Sparkle's domain types, shared by every other crate and free of I/O.
//!
//! A request arrives as an [`ImageRequest`] (whatever a client sent, every field optional
//! but the prompt). [`ImageRequest::validate`] turns it into a [`ValidImageRequest`] against
//! the [`Limits`] and the [`Catalog`] of models the workers serve; only valid requests cross
//! into the queue. Every error a client can see has one stable machine-readable code in the
//! [`ErrorCode`] table, with its HTTP status, so the gateway maps errors in exactly one place.

mod error;
mod job;
mod lora;
mod request;
mod scheduler;
pub mod source;

pub use error::{ErrorCode, RequestError};
pub use job::{JobId, JobStatus, Progress};
pub use lora::{is_lora_name, lora_tags, strip_lora_tags, LoraWeight, MAX_LORA_WEIGHT};
pub use request::{
    is_model_name, job_cost, model_factor, model_of_batch_key, steps_run, Catalog, HiresFix,
    HiresRequest, ImageRequest, Init, Limits, ModelEntry, RequestParts, ValidImageRequest,
    DEFAULT_HIRES_STRENGTH, DEFAULT_INPAINT_STRENGTH, DEFAULT_STRENGTH, MAX_HIRES_SCALE,
};
pub use scheduler::Scheduler;
pub use source::{Outpaint, Source, SourceFacts, SourcePixels};
