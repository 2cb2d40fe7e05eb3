//! The engine thread: one named OS thread owns every loaded model and runs batches on them.
//!
//! A worker serves the models it was given ([`ModelSource`]) and keeps some of them loaded,
//! least recently used first. A batch for a model that is not loaded loads it, first
//! unloading the least recently used models until the new one's weights fit in the memory
//! the device has free (and the count stays within `max_loaded`); should the load still fail,
//! every other model is unloaded and it is tried once more.

use crate::WorkerError;
use sparkle_core::Progress;
use sparkle_engine::{Batch, Engine, EngineError, EngineOptions, GeneratedImage};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};

/// A model this worker can serve.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Its name, as requests name it.
    pub name: String,
    /// A diffusers-layout directory or a single-file checkpoint.
    pub path: PathBuf,
    /// Bytes of its weights: roughly what loading it takes.
    pub bytes: u64,
}

impl ModelSource {
    /// Reads a model's name and size without loading it.
    pub fn describe(path: PathBuf) -> Result<ModelSource, EngineError> {
        let description = sparkle_engine::describe(&path)?;
        Ok(ModelSource {
            name: description.name,
            path,
            bytes: description.bytes,
        })
    }
}

/// What loading a model took, and what it unloaded to make room.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLoaded {
    pub model: String,
    /// The largest image, in pixels, the device could make of it once it was loaded.
    pub pixels: u64,
    pub seconds: f64,
    /// Models unloaded to make room, least recently used first.
    pub evicted: Vec<String>,
}

/// Memory kept free beside the weights, for a batch's activations.
const ACTIVATION_RESERVE: u64 = 2 << 30;

enum Command {
    Load {
        model: String,
        reply: oneshot::Sender<Result<Option<ModelLoaded>, EngineError>>,
    },
    Generate(Request),
}

struct Request {
    model: String,
    batch: Batch,
    progress: watch::Sender<Option<Progress>>,
    stop: Arc<AtomicBool>,
    reply: oneshot::Sender<Result<Vec<GeneratedImage>, EngineError>>,
}

/// A loaded model and the largest image its device could make when it loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub model: String,
    pub pixels: u64,
}

/// The engine, owned by one named OS thread; the async side sends it batches.
#[derive(Clone)]
pub struct EngineThread {
    commands: mpsc::Sender<Command>,
    sources: Arc<Vec<ModelSource>>,
    /// Least recently used first; written by the engine thread only.
    loaded: Arc<Mutex<Vec<Loaded>>>,
    first_load: Arc<ModelLoaded>,
}

/// A batch in flight on the engine thread.
pub struct GenerateOutcome {
    pub progress: watch::Receiver<Option<Progress>>,
    /// Set to make the engine stop at its next step.
    pub stop: Arc<AtomicBool>,
    pub result: oneshot::Receiver<Result<Vec<GeneratedImage>, EngineError>>,
}

impl EngineThread {
    /// Starts the thread and loads the first of `sources` on it (the deployment's default);
    /// returns once it is loaded. At most `max_loaded` models stay loaded at once (0: as many
    /// as the device's memory holds).
    pub async fn start(
        sources: Vec<ModelSource>,
        options: EngineOptions,
        max_loaded: usize,
    ) -> Result<Self, WorkerError> {
        let first = sources
            .first()
            .map(|s| s.name.clone())
            .ok_or(WorkerError::NoModel)?;
        let (commands, inbox) = mpsc::channel::<Command>(1);
        let loaded = Arc::new(Mutex::new(Vec::new()));
        let shelf = Shelf {
            sources: sources.clone(),
            options,
            max_loaded,
            engines: Vec::new(),
            loaded: loaded.clone(),
        };
        std::thread::Builder::new()
            .name("sparkle-engine".into())
            .spawn(move || shelf.serve(inbox))
            .map_err(|_| WorkerError::EngineGone)?;
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command::Load {
                model: first,
                reply,
            })
            .await
            .map_err(|_| WorkerError::EngineGone)?;
        let first_load = answer
            .await
            .map_err(|_| WorkerError::EngineGone)??
            .ok_or(WorkerError::EngineGone)?;
        Ok(EngineThread {
            commands,
            sources: Arc::new(sources),
            loaded,
            first_load: Arc::new(first_load),
        })
    }

    /// The models this worker serves, the default first.
    pub fn serves(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.name.clone()).collect()
    }

    /// The models loaded now, most recently used first.
    pub fn loaded(&self) -> Vec<Loaded> {
        let mut loaded = self
            .loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        loaded.reverse();
        loaded
    }

    /// What loading the default model at start took.
    pub fn first_load(&self) -> &ModelLoaded {
        &self.first_load
    }

    /// Makes sure `model` is loaded; what its load took, or `None` when it already was.
    pub async fn load(&self, model: &str) -> Result<Option<ModelLoaded>, WorkerError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Load {
                model: model.to_string(),
                reply,
            })
            .await
            .map_err(|_| WorkerError::EngineGone)?;
        Ok(answer.await.map_err(|_| WorkerError::EngineGone)??)
    }

    /// Hands a batch of `model` to the engine thread (loading the model first if need be).
    pub async fn submit(&self, model: &str, batch: Batch) -> Result<GenerateOutcome, WorkerError> {
        let (progress_tx, progress_rx) = watch::channel(None);
        let (reply, result) = oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        self.commands
            .send(Command::Generate(Request {
                model: model.to_string(),
                batch,
                progress: progress_tx,
                stop: stop.clone(),
                reply,
            }))
            .await
            .map_err(|_| WorkerError::EngineGone)?;
        Ok(GenerateOutcome {
            progress: progress_rx,
            stop,
            result,
        })
    }
}

/// The engine thread's state: the loaded engines, least recently used first.
struct Shelf {
    sources: Vec<ModelSource>,
    options: EngineOptions,
    max_loaded: usize,
    engines: Vec<(String, Engine)>,
    loaded: Arc<Mutex<Vec<Loaded>>>,
}

impl Shelf {
    fn serve(mut self, mut inbox: mpsc::Receiver<Command>) {
        while let Some(command) = inbox.blocking_recv() {
            match command {
                Command::Load { model, reply } => {
                    let _ = reply.send(self.ensure(&model));
                }
                Command::Generate(request) => self.generate(request),
            }
        }
    }

    fn generate(&mut self, request: Request) {
        let Request {
            model,
            batch,
            progress,
            stop,
            reply,
        } = request;
        if let Err(e) = self.ensure(&model) {
            let _ = reply.send(Err(e));
            return;
        }
        let Some((_, engine)) = self.engines.last() else {
            let _ = reply.send(Err(EngineError::InvalidRequest(format!(
                "model {model} is not loaded"
            ))));
            return;
        };
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

    /// Loads `model` unless it is loaded, and makes it the most recently used.
    fn ensure(&mut self, model: &str) -> Result<Option<ModelLoaded>, EngineError> {
        if let Some(at) = self.engines.iter().position(|(name, _)| name == model) {
            // Already the most recently used (the common case): nothing moves.
            if at + 1 < self.engines.len() {
                let engine = self.engines.remove(at);
                self.engines.push(engine);
                self.publish();
            }
            return Ok(None);
        }
        let source = self
            .sources
            .iter()
            .find(|s| s.name == model)
            .cloned()
            .ok_or_else(|| {
                EngineError::InvalidRequest(format!("this worker does not serve model {model}"))
            })?;
        let started = Instant::now();
        let mut evicted = self.make_room(&source);
        let engine = match Engine::load(&source.path, &self.options) {
            Ok(engine) => engine,
            Err(e) if !self.engines.is_empty() => {
                tracing::warn!(model, error = %e, "loading failed; unloading every other model and trying again");
                evicted.extend(self.engines.drain(..).map(|(name, _)| name));
                self.publish();
                Engine::load(&source.path, &self.options)?
            }
            Err(e) => return Err(e),
        };
        let mut engine = engine;
        let beside = engine.load_beside(&source.path)?;
        tracing::info!(
            model, embeddings = ?beside.embeddings.names, loras = ?beside.loras.names,
            skipped = beside.embeddings.skipped.len() + beside.loras.skipped.len(),
            "embeddings and LoRAs beside the model loaded"
        );
        let pixels = engine.pixel_budget();
        self.engines.push((source.name.clone(), engine));
        self.publish();
        let loaded = ModelLoaded {
            model: source.name,
            pixels,
            seconds: started.elapsed().as_secs_f64(),
            evicted,
        };
        tracing::info!(model = %loaded.model, seconds = loaded.seconds, evicted = ?loaded.evicted, "model ready");
        Ok(Some(loaded))
    }

    /// Unloads the least recently used models until `source` fits: fewer than `max_loaded`
    /// stay, and the device has its weights and a reserve for activations free.
    fn make_room(&mut self, source: &ModelSource) -> Vec<String> {
        let mut evicted = Vec::new();
        while !self.engines.is_empty() {
            let over_count = self.max_loaded > 0 && self.engines.len() >= self.max_loaded;
            let free = self.engines[0].1.free_memory();
            let short = free < source.bytes.saturating_add(ACTIVATION_RESERVE);
            if !over_count && !short {
                break;
            }
            let (name, engine) = self.engines.remove(0);
            drop(engine);
            tracing::info!(model = %name, for_model = %source.name, "unloading the least recently used model");
            evicted.push(name);
        }
        if !evicted.is_empty() {
            self.publish();
        }
        evicted
    }

    fn publish(&self) {
        let now: Vec<Loaded> = self
            .engines
            .iter()
            .map(|(name, engine)| Loaded {
                model: name.clone(),
                pixels: engine.pixel_budget(),
            })
            .collect();
        *self
            .loaded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = now;
    }
}
