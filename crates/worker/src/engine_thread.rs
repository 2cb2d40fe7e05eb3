use crate::WorkerError;
use sparkle_core::Progress;
use sparkle_engine::{Batch, Engine, EngineError, EngineOptions, GeneratedImage, ModelInfo};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

struct Request {
    batch: Batch,
    progress: watch::Sender<Option<Progress>>,
    stop: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Vec<GeneratedImage>, EngineError>>,
}

/// The engine, owned by one named OS thread; the async side sends it batches.
#[derive(Clone)]
pub struct EngineThread {
    requests: mpsc::Sender<Request>,
    info: Arc<ModelInfo>,
    pixel_budget: u64,
}

/// A batch in flight on the engine thread.
pub struct GenerateOutcome {
    pub progress: watch::Receiver<Option<Progress>>,
    /// Set to make the engine stop at its next step.
    pub stop: Arc<AtomicBool>,
    pub result: oneshot::Receiver<Result<Vec<GeneratedImage>, EngineError>>,
}

impl EngineThread {
    /// Starts the thread and loads the model on it; returns once the model is loaded.
    pub async fn start(model: PathBuf, options: EngineOptions) -> Result<Self, WorkerError> {
        let (requests, mut inbox) = mpsc::channel::<Request>(1);
        let (loaded_tx, loaded_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("sparkle-engine".into())
            .spawn(move || {
                let engine = match Engine::load(&model, &options) {
                    Ok(engine) => engine,
                    Err(e) => {
                        let _ = loaded_tx.send(Err(e));
                        return;
                    }
                };
                if loaded_tx
                    .send(Ok((engine.info().clone(), engine.pixel_budget())))
                    .is_err()
                {
                    return;
                }
                while let Some(request) = inbox.blocking_recv() {
                    let Request {
                        batch,
                        progress,
                        stop,
                        reply,
                    } = request;
                    let mut on_step = |p: sparkle_engine::StepProgress| {
                        let _ = progress.send(Some(Progress {
                            step: p.step,
                            total: p.total,
                        }));
                        if stop.load(Ordering::Relaxed) {
                            ControlFlow::Break(())
                        } else {
                            ControlFlow::Continue(())
                        }
                    };
                    let _ = reply.send(engine.generate(&batch, &mut on_step));
                }
            })
            .map_err(|_| WorkerError::EngineGone)?;
        let (info, pixel_budget) = loaded_rx.await.map_err(|_| WorkerError::EngineGone)??;
        Ok(EngineThread {
            requests,
            info: Arc::new(info),
            pixel_budget,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The largest image, in pixels, the engine's device could make when it loaded.
    pub fn pixel_budget(&self) -> u64 {
        self.pixel_budget
    }

    /// Hands a batch to the engine thread.
    pub async fn submit(&self, batch: Batch) -> Result<GenerateOutcome, WorkerError> {
        let (progress_tx, progress_rx) = watch::channel(None);
        let (reply, result) = oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        self.requests
            .send(Request {
                batch,
                progress: progress_tx,
                stop: stop.clone(),
                reply,
            })
            .await
            .map_err(|_| WorkerError::EngineGone)?;
        Ok(GenerateOutcome {
            progress: progress_rx,
            stop,
            result,
        })
    }
}
