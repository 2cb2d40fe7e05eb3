//! The worker: lease a batch of compatible jobs, generate on the engine thread, store the
//! images, complete the jobs.
//!
//! The engine is synchronous and runs on its own named OS thread ([`EngineThread`]); the
//! async side never blocks on it. A worker serves one or more models and keeps the most
//! recently used loaded as its device's memory allows; it asks for jobs of the models it has
//! loaded first, and loads another only when none of those has work. While a batch runs, progress flows from the engine's step
//! callback through a `watch` channel into heartbeats, which also extend the leases; a
//! heartbeat that reports a cancelled (or lost) job drops it from the batch, and when every
//! job of the batch is gone the engine is told to stop at its next step.
//!
//! The worker opens no listening socket and holds no Discord or API credentials: it talks
//! only to the control plane ([`ControlPlane`]), which leases, and stores the images it
//! hands over. On shutdown it finishes the batch in hand within
//! the drain deadline, or gives the leases back; it never drops a lease silently.

mod engine_thread;
pub mod plane;
pub mod protocol;
mod run;

pub use engine_thread::{EngineThread, GenerateOutcome, Loaded, ModelLoaded, ModelSource};
pub use plane::{ControlPlane, PlaneError, Serving};
pub use protocol::Remote;
pub use run::{deadline_of, run, WorkerOptions};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the engine could not start: {0}")]
    EngineStart(#[from] sparkle_engine::EngineError),
    #[error("the engine thread stopped unexpectedly")]
    EngineGone,
    #[error("a worker needs at least one model")]
    NoModel,
    #[error("queue: {0}")]
    Queue(#[from] sparkle_queue::QueueError),
    #[error("the control plane refused this worker: {0}")]
    Refused(String),
}
