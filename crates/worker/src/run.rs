use crate::plane::{ControlPlane, PlaneError, Serving};
use crate::{EngineThread, ModelLoaded, WorkerError};
use bytes::Bytes;
use sparkle_core::{Progress, SourcePixels};
use sparkle_engine::{Batch, BatchItem, EngineError, GeneratedImage, Hires, SourceImage};
use sparkle_queue::{Failure, HeartbeatOutcome, Lease};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Names this worker in leases (host and process id make a good one).
    pub worker_id: String,
    /// How long a lease lasts without a heartbeat (the visibility timeout).
    pub lease_timeout: Duration,
    /// How often a running batch heartbeats when no progress is reported.
    pub heartbeat_interval: Duration,
    /// Most jobs leased as one batch.
    pub max_batch: usize,
    /// How long a stopping worker may spend finishing the batch in hand.
    pub drain_timeout: Duration,
    /// How long a partly filled batch waits for compatible jobs before it starts anyway.
    pub batch_wait: Duration,
    /// How long a job may run before it fails with `timeout`; `None`: derived from each
    /// job's cost ([`deadline_of`]).
    pub max_job: Option<Duration>,
    /// The largest image in pixels this worker takes, below what its device can make;
    /// `None`: what the device can make.
    pub max_pixels: Option<u64>,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            worker_id: format!("worker-{}", std::process::id()),
            lease_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(5),
            max_batch: 1,
            drain_timeout: Duration::from_secs(30),
            batch_wait: Duration::from_millis(50),
            max_job: None,
            max_pixels: None,
        }
    }
}

/// The deadline of a job by its cost: two minutes, and 20 s for each step of each megapixel
/// of each image (a CPU's pace; a GPU is tens of times faster), every pass counted.
pub fn deadline_of(request: &sparkle_core::ValidImageRequest) -> Duration {
    let megapixels = |w: u32, h: u32| f64::from(w) * f64::from(h) / 1e6;
    let first = f64::from(request.steps) * megapixels(request.width, request.height);
    let second = request.hires.map_or(0.0, |h| {
        f64::from(sparkle_core::steps_run(h.steps, h.strength)) * megapixels(h.width, h.height)
    });
    Duration::from_secs_f64(120.0 + 20.0 * (first + second) * f64::from(request.n))
}

/// How long one ask for leases waits for work; also the longest a stopping idle worker
/// takes to notice.
const LONG_POLL: Duration = Duration::from_secs(2);

/// Progress is written to the queue at most this often.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Leases and runs batches until `shutdown` fires, then drains.
pub async fn run(
    plane: Arc<dyn ControlPlane>,
    engine: EngineThread,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let first = capped(engine.first_load().clone(), &options);
    tracing::info!(worker = %options.worker_id, model = %first.model, serves = ?engine.serves(), pixels = first.pixels, "worker ready");
    // Submits larger than every worker can make are refused from now on.
    if let Err(e) = plane.loaded(&options.worker_id, &first).await {
        tracing::warn!(error = %e, "could not report this worker's capacity");
    }
    while !shutdown.is_cancelled() {
        let serving = Serving {
            serves: engine.serves(),
            loaded: engine.loaded().into_iter().map(|l| l.model).collect(),
        };
        // Not cut short by a shutdown: an ask abandoned after the control plane leased
        // would leave those leases to expire.
        let leases = plane
            .lease(
                &options.worker_id,
                &serving,
                None,
                options.max_batch.max(1),
                options.lease_timeout,
                LONG_POLL,
            )
            .await;
        let leases = match leases {
            Ok(leases) => leases,
            Err(PlaneError::Unauthorized(why) | PlaneError::ModelsNotServed(why)) => {
                return Err(WorkerError::Refused(why))
            }
            Err(e) => {
                tracing::warn!(error = %e, "lease failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        if leases.is_empty() {
            continue;
        }
        let leases = fill_batch(&*plane, &serving, leases, &options).await;
        let Some(budget) = make_ready(&*plane, &engine, &leases, &options).await else {
            continue;
        };
        // A job larger than this worker takes is refused for good, before any work.
        let mut fitting = Vec::with_capacity(leases.len());
        for lease in leases {
            let (width, height) = lease.job.request.output_size();
            let pixels = u64::from(width) * u64::from(height);
            if pixels > budget {
                let too_large = EngineError::TooLarge { pixels, budget };
                record_failure(&*plane, &lease, failure_of(&too_large)).await;
            } else {
                fitting.push(lease);
            }
        }
        let (fitting, sources) = with_sources(&*plane, fitting, &options).await;
        if fitting.is_empty() {
            continue;
        }
        run_batch(&*plane, &engine, fitting, sources, &options, &shutdown).await?;
    }
    tracing::info!(worker = %options.worker_id, "worker stopped");
    Ok(())
}

/// `pixels` within `worker.max_pixels`.
fn within_cap(pixels: u64, options: &WorkerOptions) -> u64 {
    options.max_pixels.map_or(pixels, |cap| cap.min(pixels))
}

/// A load's capacity within `worker.max_pixels`.
fn capped(mut load: ModelLoaded, options: &WorkerOptions) -> ModelLoaded {
    load.pixels = within_cap(load.pixels, options);
    load
}

/// Loads the batch's model unless it is loaded (reporting the load), and returns the largest
/// image this worker makes of it. `None` when it cannot be loaded: the batch has failed.
async fn make_ready(
    plane: &dyn ControlPlane,
    engine: &EngineThread,
    leases: &[Lease],
    options: &WorkerOptions,
) -> Option<u64> {
    let model = leases.first()?.job.request.model.clone();
    if !engine.serves().contains(&model) {
        // Never leased so by a control plane that knows what this worker serves; another
        // worker may serve it.
        let failure = Failure {
            code: "model_not_served".into(),
            message: format!("the worker that took this job does not serve model {model}"),
            detail: None,
            retryable: true,
        };
        for lease in leases {
            record_failure(plane, lease, failure.clone()).await;
        }
        return None;
    }
    let loaded_now = || engine.loaded().into_iter().find(|l| l.model == model);
    // A model already loaded needs no trip to the engine thread: the batch itself marks it
    // the most recently used.
    let load = match loaded_now() {
        Some(_) => Ok(None),
        None => engine.load(&model).await,
    };
    match load {
        Ok(Some(load)) => {
            let load = capped(load, options);
            if let Err(e) = plane.loaded(&options.worker_id, &load).await {
                tracing::warn!(error = %e, "could not report a model load");
            }
        }
        Ok(None) => {}
        Err(e) => {
            let failure = match e {
                WorkerError::EngineStart(e) => failure_of(&e),
                e => Failure {
                    code: "engine_error".into(),
                    message: "the image could not be made".into(),
                    detail: Some(e.to_string()),
                    retryable: true,
                },
            };
            tracing::warn!(model, error = ?failure.detail, "could not load the model");
            for lease in leases {
                record_failure(plane, lease, failure.clone()).await;
            }
            return None;
        }
    }
    Some(within_cap(loaded_now().map_or(0, |l| l.pixels), options))
}

/// Tops a partly filled batch up with compatible jobs that arrive within `batch_wait`.
/// Nothing waits longer than that: a lone job starts after at most this short delay.
async fn fill_batch(
    plane: &dyn ControlPlane,
    serving: &Serving,
    mut leases: Vec<Lease>,
    options: &WorkerOptions,
) -> Vec<Lease> {
    let max = options.max_batch.max(1);
    if leases.len() >= max || options.batch_wait.is_zero() {
        return leases;
    }
    let key = leases[0].job.request.batch_key();
    let deadline = Instant::now() + options.batch_wait;
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        match plane
            .lease(
                &options.worker_id,
                serving,
                Some(&key),
                max - leases.len(),
                options.lease_timeout,
                wait,
            )
            .await
        {
            Ok(more) => leases.extend(more),
            Err(e) => tracing::warn!(error = %e, "could not fill the batch"),
        }
        if leases.len() >= max || Instant::now() >= deadline {
            return leases;
        }
    }
}

/// The source image of each job that starts from one, read from the control plane; a job
/// whose source cannot be had is failed (or dropped, its lease lost) and left out.
async fn with_sources(
    plane: &dyn ControlPlane,
    leases: Vec<Lease>,
    options: &WorkerOptions,
) -> (Vec<Lease>, Vec<Option<SourceImage>>) {
    let mut kept = Vec::with_capacity(leases.len());
    let mut sources = Vec::with_capacity(leases.len());
    for lease in leases {
        let r = &lease.job.request;
        let Some(init) = r.init else {
            kept.push(lease);
            sources.push(None);
            continue;
        };
        let fetched = while_unavailable(|| plane.source(&lease.token, options.lease_timeout)).await;
        let png = match fetched {
            Ok(png) => png,
            Err(PlaneError::LeaseLost(_)) => {
                tracing::info!(job = %lease.job.id, "the lease was lost before the batch started");
                continue;
            }
            Err(e) => {
                let failure = Failure {
                    code: "source_unavailable".into(),
                    message: "the image this job starts from could not be read".into(),
                    detail: Some(e.to_string()),
                    retryable: matches!(e, PlaneError::Unavailable(_)),
                };
                record_failure(plane, &lease, failure).await;
                continue;
            }
        };
        let (width, height) = (r.width, r.height);
        let read = tokio::task::spawn_blocking(move || {
            SourcePixels::from_png(&png, width, height, init.masked)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok(pixels) => {
                kept.push(lease);
                sources.push(Some(SourceImage {
                    rgb: pixels.rgb,
                    mask: pixels.mask,
                }));
            }
            Err(why) => {
                let failure = Failure {
                    code: "invalid_source".into(),
                    message: "the image this job starts from could not be read".into(),
                    detail: Some(why),
                    retryable: false,
                };
                record_failure(plane, &lease, failure).await;
            }
        }
    }
    (kept, sources)
}

fn batch_of(leases: &[Lease], sources: &[Option<SourceImage>]) -> Batch {
    let first = &leases[0].job.request;
    Batch {
        width: first.width,
        height: first.height,
        steps: first.steps,
        guidance_scale: first.guidance_scale,
        scheduler: first.scheduler,
        strength: first.init.map_or(1.0, |init| init.strength),
        hires: first.hires.map(|h| Hires {
            width: h.width,
            height: h.height,
            steps: h.steps,
            strength: h.strength,
        }),
        loras: first.loras.clone(),
        items: leases
            .iter()
            .zip(sources)
            .flat_map(|(lease, source)| {
                let r = &lease.job.request;
                (0..r.n).map(move |i| BatchItem {
                    prompt: r.prompt.clone(),
                    negative_prompt: r.negative_prompt.clone(),
                    seed: r.seed_of(i) as u64,
                    source: source.clone(),
                })
            })
            .collect(),
    }
}

async fn run_batch(
    plane: &dyn ControlPlane,
    engine: &EngineThread,
    leases: Vec<Lease>,
    sources: Vec<Option<SourceImage>>,
    options: &WorkerOptions,
    shutdown: &CancellationToken,
) -> Result<(), WorkerError> {
    let ids: Vec<_> = leases.iter().map(|l| l.job.id.to_string()).collect();
    tracing::info!(jobs = ?ids, "batch leased");
    let mut live = vec![true; leases.len()];
    let model = leases[0].job.request.model.clone();
    let mut running = engine.submit(&model, batch_of(&leases, &sources)).await?;
    let mut ticker = tokio::time::interval(options.heartbeat_interval);
    ticker.tick().await;
    let mut progress_open = true;
    let mut last_beat = Instant::now();
    let mut drain_until: Option<Instant> = None;
    let budget = options.max_job.unwrap_or_else(|| {
        leases
            .iter()
            .map(|l| deadline_of(&l.job.request))
            .max()
            .unwrap_or_default()
    });
    let deadline = Instant::now() + budget;
    let mut timed_out = false;

    let result = loop {
        let beat_now = tokio::select! {
            result = &mut running.result => break result,
            _ = ticker.tick() => true,
            changed = running.progress.changed(), if progress_open => {
                progress_open = changed.is_ok();
                last_beat.elapsed() >= PROGRESS_EVERY
            }
            _ = shutdown.cancelled(), if drain_until.is_none() => {
                tracing::info!("stopping: finishing the batch in hand");
                drain_until = Some(Instant::now() + options.drain_timeout);
                false
            }
            _ = tokio::time::sleep_until(deadline), if !timed_out => {
                timed_out = true;
                tracing::warn!(secs = budget.as_secs(), "the batch ran past its deadline");
                let failure = Failure {
                    code: "timeout".into(),
                    message: format!("the job ran longer than its deadline of {} s", budget.as_secs()),
                    detail: None,
                    retryable: false,
                };
                for (lease, live) in leases.iter().zip(live.iter_mut()) {
                    if std::mem::replace(live, false) {
                        record_failure(plane, lease, failure.clone()).await;
                    }
                }
                false
            }
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => {
                tracing::warn!("drain deadline passed: giving the leases back");
                for (lease, live) in leases.iter().zip(live.iter_mut()) {
                    if std::mem::replace(live, false) {
                        if let Err(e) = while_unavailable(|| plane.release(&lease.token)).await {
                            tracing::warn!(job = %lease.job.id, error = %e, "release failed");
                        }
                    }
                }
                drain_until = None;
                false
            }
        };
        if beat_now {
            let progress: Option<Progress> = *running.progress.borrow();
            heartbeat_all(plane, &leases, &mut live, progress, options.lease_timeout).await;
            last_beat = Instant::now();
        }
        if !live.iter().any(|l| *l) {
            running.stop.store(true, Ordering::Relaxed);
        }
    };

    match result {
        Err(_) => Err(WorkerError::EngineGone),
        Ok(Err(EngineError::Cancelled)) => Ok(()),
        Ok(Err(e)) => {
            let failure = failure_of(&e);
            tracing::warn!(error = %e, retryable = failure.retryable, "batch failed");
            for (lease, _) in leases.iter().zip(&live).filter(|(_, live)| **live) {
                match while_unavailable(|| plane.fail(&lease.token, failure.clone())).await {
                    Ok(status) => tracing::info!(job = %lease.job.id, %status, "job failed"),
                    Err(e) => {
                        tracing::warn!(job = %lease.job.id, error = %e, "could not record failure")
                    }
                }
            }
            Ok(())
        }
        Ok(Ok(images)) => {
            let mut images = images.into_iter();
            for (lease, live) in leases.iter().zip(&live) {
                let mine: Vec<_> = images.by_ref().take(lease.job.request.n as usize).collect();
                if *live {
                    finish(plane, lease, mine).await;
                }
            }
            Ok(())
        }
    }
}

async fn heartbeat_all(
    plane: &dyn ControlPlane,
    leases: &[Lease],
    live: &mut [bool],
    progress: Option<Progress>,
    lease_timeout: Duration,
) {
    for (lease, live) in leases.iter().zip(live.iter_mut()).filter(|(_, l)| **l) {
        match plane.heartbeat(&lease.token, progress, lease_timeout).await {
            Ok(HeartbeatOutcome::Continue) => {}
            Ok(HeartbeatOutcome::Cancelled) => {
                tracing::info!(job = %lease.job.id, "job cancelled while running");
                *live = false;
            }
            Err(PlaneError::LeaseLost(_)) => {
                tracing::warn!(job = %lease.job.id, "lease lost; dropping the job");
                *live = false;
            }
            // A database hiccup: keep going; the next heartbeat may get through in time.
            Err(e) => tracing::warn!(job = %lease.job.id, error = %e, "heartbeat failed"),
        }
    }
}

/// Encodes a job's images and hands them over with its completion.
async fn finish(plane: &dyn ControlPlane, lease: &Lease, images: Vec<GeneratedImage>) {
    let request = lease.job.request.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        images
            .iter()
            .enumerate()
            .map(|(i, image)| sparkle_engine::encode_png(image, &request.parameters_text(i as u32)))
            .collect::<Result<Vec<_>, _>>()
    })
    .await;
    let pngs: Vec<Bytes> = match encoded {
        Ok(Ok(pngs)) => pngs.into_iter().map(Bytes::from).collect(),
        Ok(Err(e)) => return record_failure(plane, lease, failure_of(&e)).await,
        Err(e) => {
            let failure = Failure {
                code: "encode_failed".into(),
                message: "the images could not be encoded".into(),
                detail: Some(e.to_string()),
                retryable: true,
            };
            return record_failure(plane, lease, failure).await;
        }
    };
    let count = pngs.len();
    match while_unavailable(|| plane.complete(lease, pngs.clone())).await {
        Ok(()) => tracing::info!(job = %lease.job.id, images = count, "job succeeded"),
        Err(PlaneError::LeaseLost(_)) => {
            // Cancelled, or reclaimed for another attempt.
            tracing::info!(job = %lease.job.id, "the lease was lost before completing");
        }
        Err(e) => tracing::warn!(job = %lease.job.id, error = %e, "could not complete"),
    }
}

/// How long a completion or a failure is retried while the database cannot be reached (a
/// restart, a failover to a standby). Both are safe to repeat; past the lease, the job is
/// another attempt's.
const OUTAGE_RETRY: Duration = Duration::from_secs(30);

/// Repeats a call while the control plane is unavailable, up to [`OUTAGE_RETRY`].
async fn while_unavailable<T, F, Fut>(mut call: F) -> Result<T, PlaneError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PlaneError>>,
{
    let until = Instant::now() + OUTAGE_RETRY;
    let mut pause = Duration::from_millis(100);
    loop {
        match call().await {
            Err(PlaneError::Unavailable(e)) if Instant::now() + pause < until => {
                tracing::warn!(error = %e, "the control plane is unavailable; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            outcome => return outcome,
        }
    }
}

async fn record_failure(plane: &dyn ControlPlane, lease: &Lease, failure: Failure) {
    if let Err(e) = while_unavailable(|| plane.fail(&lease.token, failure.clone())).await {
        tracing::warn!(job = %lease.job.id, error = %e, "could not record failure");
    }
}

/// A request the engine refuses will be refused again; anything else may pass next time.
fn failure_of(e: &EngineError) -> Failure {
    if let EngineError::TooLarge { pixels, budget } = e {
        return Failure {
            code: "too_large_for_device".into(),
            message: format!(
                "an image of {pixels} pixels is more than the serving devices can make ({budget} at most)"
            ),
            detail: None,
            retryable: false,
        };
    }
    let retryable = !matches!(e, EngineError::InvalidRequest(_));
    // A refused request's reason is the client's to read; any other engine error may name
    // files or devices, and is kept for operators only.
    let (message, detail) = if retryable {
        (
            "the image could not be made".to_string(),
            Some(e.to_string()),
        )
    } else {
        (e.to_string(), None)
    };
    Failure {
        code: if retryable {
            "engine_error"
        } else {
            "invalid_request"
        }
        .into(),
        message,
        detail,
        retryable,
    }
}
