//! The worker loop against a control plane that misbehaves on purpose: a lost lease, a
//! cancel notice, an outage during the completion, a refused completion, a drain deadline.
//! The engine is real (the tiny model on the CPU); the control plane is a script.

use async_trait::async_trait;
use bytes::Bytes;
use sparkle_core::{JobId, JobStatus, Progress, RequestParts, Scheduler, ValidImageRequest};
use sparkle_engine::{DeviceChoice, EngineOptions};
use sparkle_queue::{Failure, HeartbeatOutcome, Job, Lease, LeaseToken};
use sparkle_worker::{
    ControlPlane, EngineThread, ModelLoaded, ModelSource, PlaneError, Serving, WorkerOptions,
};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A tiny model named `name`, written once per test binary.
fn tiny_model(name: &'static str) -> ModelSource {
    static DIRS: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    let dirs = DIRS.get_or_init(|| Mutex::new(Vec::new()));
    let mut dirs = dirs.lock().expect("dirs");
    let path = match dirs.iter().find(|(n, _)| *n == name) {
        Some((_, path)) => path.clone(),
        None => {
            let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
            let _ = std::fs::remove_dir_all(&path);
            sparkle_engine::write_tiny_model(&path, 7).expect("write the tiny model");
            dirs.push((name, path.clone()));
            path
        }
    };
    ModelSource::describe(path).expect("describe")
}

const MODEL: &str = "worker-loop-tiny";

async fn engine_of(models: &[&'static str], max_loaded: usize) -> EngineThread {
    let options = EngineOptions {
        device: DeviceChoice::Cpu,
        precision: "f32".parse().expect("precision"),
    };
    let sources = models.iter().map(|m| tiny_model(m)).collect();
    EngineThread::start(sources, options, max_loaded)
        .await
        .expect("engine")
}

/// A leased job of `steps` steps (1000 at most: long enough on the tiny model, at 256², to
/// outlast what a test waits for).
fn lease(steps: u32) -> Lease {
    lease_of(MODEL, steps)
}

fn lease_of(model: &str, steps: u32) -> Lease {
    let side = if steps > 100 { 256 } else { 64 };
    let request = ValidImageRequest::from_parts(RequestParts {
        prompt: "a lighthouse".into(),
        negative_prompt: String::new(),
        model: model.into(),
        width: side,
        height: side,
        steps,
        guidance_scale: 7.5,
        seed: 3,
        scheduler: Scheduler::Euler,
        n: 1,
        init: None,
        hires: None,
        loras: Vec::new(),
    })
    .expect("a valid request");
    let id = JobId::random();
    Lease {
        token: LeaseToken {
            job_id: id,
            lease_id: format!("lease-{id}"),
        },
        job: Job {
            id,
            owner: "alice".into(),
            group: "alice".into(),
            status: JobStatus::Running,
            request,
            attempts: 1,
            max_attempts: 3,
            progress: None,
            images: 0,
            error: None,
            created_at_ms: 0,
            started_at_ms: Some(0),
            finished_at_ms: None,
            images_attempt: None,
            revision: 0,
        },
    }
}

/// What the script answers, and what the worker did.
#[derive(Default)]
struct Script {
    to_lease: VecDeque<Lease>,
    /// Answers to heartbeats, in order; `Continue` once they run out.
    heartbeats: VecDeque<Result<HeartbeatOutcome, PlaneError>>,
    /// Answers to completions, in order; `Ok` once they run out.
    completions: VecDeque<Result<(), PlaneError>>,
    heartbeat_calls: usize,
    completed: Vec<(JobId, usize)>,
    completion_calls: usize,
    failed: Vec<(JobId, Failure)>,
    released: Vec<JobId>,
    /// What the worker said it serves and had loaded, at each ask for new work.
    asks: Vec<Serving>,
    loads: Vec<ModelLoaded>,
    /// Source images by job.
    sources: std::collections::HashMap<JobId, Bytes>,
}

#[derive(Default, Clone)]
struct Scripted(Arc<Mutex<Script>>);

impl Scripted {
    fn with(f: impl FnOnce(&mut Script)) -> Scripted {
        let plane = Scripted::default();
        f(&mut plane.0.lock().expect("script"));
        plane
    }

    fn seen<T>(&self, f: impl FnOnce(&Script) -> T) -> T {
        f(&self.0.lock().expect("script"))
    }
}

#[async_trait]
impl ControlPlane for Scripted {
    async fn loaded(&self, _: &str, load: &ModelLoaded) -> Result<(), PlaneError> {
        self.0.lock().expect("script").loads.push(load.clone());
        Ok(())
    }

    async fn lease(
        &self,
        _worker: &str,
        models: &Serving,
        batch_key: Option<&str>,
        _max: usize,
        _visibility: Duration,
        wait: Duration,
    ) -> Result<Vec<Lease>, PlaneError> {
        let next = match batch_key {
            Some(_) => None,
            None => {
                let mut script = self.0.lock().expect("script");
                if script.asks.last() != Some(models) {
                    script.asks.push(models.clone());
                }
                script.to_lease.pop_front()
            }
        };
        match next {
            Some(lease) => Ok(vec![lease]),
            None => {
                tokio::time::sleep(wait.min(Duration::from_millis(20))).await;
                Ok(Vec::new())
            }
        }
    }

    async fn heartbeat(
        &self,
        _: &LeaseToken,
        _: Option<Progress>,
        _: Duration,
    ) -> Result<HeartbeatOutcome, PlaneError> {
        let mut script = self.0.lock().expect("script");
        script.heartbeat_calls += 1;
        script
            .heartbeats
            .pop_front()
            .unwrap_or(Ok(HeartbeatOutcome::Continue))
    }

    async fn complete(&self, lease: &Lease, images: Vec<Bytes>) -> Result<(), PlaneError> {
        let mut script = self.0.lock().expect("script");
        script.completion_calls += 1;
        let answer = script.completions.pop_front().unwrap_or(Ok(()));
        if answer.is_ok() {
            assert!(images.iter().all(|png| png.starts_with(b"\x89PNG")), "PNGs");
            script.completed.push((lease.job.id, images.len()));
        }
        answer
    }

    async fn fail(&self, lease: &LeaseToken, failure: Failure) -> Result<JobStatus, PlaneError> {
        let mut script = self.0.lock().expect("script");
        script.failed.push((lease.job_id, failure));
        Ok(JobStatus::Queued)
    }

    async fn release(&self, lease: &LeaseToken) -> Result<(), PlaneError> {
        self.0.lock().expect("script").released.push(lease.job_id);
        Ok(())
    }

    async fn source(&self, lease: &LeaseToken, _: Duration) -> Result<Bytes, PlaneError> {
        self.0
            .lock()
            .expect("script")
            .sources
            .get(&lease.job_id)
            .cloned()
            .ok_or_else(|| PlaneError::Refused("no source image".into()))
    }
}

fn options() -> WorkerOptions {
    WorkerOptions {
        worker_id: "test-worker".into(),
        lease_timeout: Duration::from_secs(60),
        heartbeat_interval: Duration::from_millis(10),
        max_batch: 1,
        drain_timeout: Duration::from_secs(30),
        batch_wait: Duration::ZERO,
        max_job: None,
        max_pixels: None,
    }
}

/// Runs the worker until `done` holds of what it did (or 60 s pass), then stops it.
async fn run_until(
    plane: &Scripted,
    options: WorkerOptions,
    done: impl Fn(&Script) -> bool,
) -> Result<(), sparkle_worker::WorkerError> {
    run_on(plane, engine_of(&[MODEL], 0).await, options, done).await
}

/// Runs the worker on `engine` until `done` holds (or 60 s pass), then stops it.
async fn run_on(
    plane: &Scripted,
    engine: EngineThread,
    options: WorkerOptions,
    done: impl Fn(&Script) -> bool,
) -> Result<(), sparkle_worker::WorkerError> {
    let shutdown = CancellationToken::new();
    let worker = tokio::spawn(sparkle_worker::run(
        Arc::new(plane.clone()),
        engine,
        options,
        shutdown.clone(),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !plane.seen(&done) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker never got there"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), worker)
        .await
        .expect("the worker stops")
        .expect("the worker task")
}

#[tokio::test]
async fn a_job_is_generated_and_completed_with_its_images() {
    let job = lease(2);
    let id = job.job.id;
    let plane = Scripted::with(|s| s.to_lease.push_back(job));
    run_until(&plane, options(), |s| !s.completed.is_empty())
        .await
        .expect("run");
    assert_eq!(plane.seen(|s| s.completed.clone()), vec![(id, 1)]);
    assert!(plane.seen(|s| s.failed.is_empty()));
}

#[tokio::test]
async fn a_lost_lease_drops_the_job_without_completing_it() {
    let plane = Scripted::with(|s| {
        s.to_lease.push_back(lease(400));
        s.heartbeats
            .push_back(Err(PlaneError::LeaseLost(JobId::random())));
    });
    let next = lease(2);
    let next_id = next.job.id;
    plane.0.lock().expect("script").to_lease.push_back(next);
    // The worker goes on to the next job: the lost one was dropped, not finished.
    run_until(&plane, options(), |s| !s.completed.is_empty())
        .await
        .expect("run");
    assert_eq!(plane.seen(|s| s.completed.clone()), vec![(next_id, 1)]);
    assert!(plane.seen(|s| s.failed.is_empty() && s.released.is_empty()));
}

#[tokio::test]
async fn a_cancel_notice_stops_the_engine_and_nothing_is_completed() {
    let plane = Scripted::with(|s| {
        s.to_lease.push_back(lease(1000));
        s.heartbeats.push_back(Ok(HeartbeatOutcome::Cancelled));
    });
    let next = lease(2);
    let next_id = next.job.id;
    plane.0.lock().expect("script").to_lease.push_back(next);
    // A thousand steps at 256² take far longer: the next job completing shows the engine
    // stopped at the cancel.
    run_until(&plane, options(), |s| !s.completed.is_empty())
        .await
        .expect("run");
    assert_eq!(plane.seen(|s| s.completed.clone()), vec![(next_id, 1)]);
    assert!(plane.seen(|s| s.failed.is_empty()));
}

#[tokio::test]
async fn a_completion_is_repeated_through_an_outage_of_the_control_plane() {
    let job = lease(2);
    let id = job.job.id;
    let plane = Scripted::with(|s| {
        s.to_lease.push_back(job);
        for _ in 0..3 {
            s.completions
                .push_back(Err(PlaneError::Unavailable("restarting".into())));
        }
    });
    run_until(&plane, options(), |s| !s.completed.is_empty())
        .await
        .expect("run");
    assert_eq!(plane.seen(|s| s.completed.clone()), vec![(id, 1)]);
    assert_eq!(
        plane.seen(|s| s.completion_calls),
        4,
        "three refusals, then through"
    );
}

#[tokio::test]
async fn a_refused_completion_is_not_repeated() {
    let plane = Scripted::with(|s| {
        s.to_lease.push_back(lease(2));
        s.completions.push_back(Err(PlaneError::Refused(
            "the image store could not be written; the job will be retried".into(),
        )));
    });
    let next = lease(2);
    let next_id = next.job.id;
    plane.0.lock().expect("script").to_lease.push_back(next);
    run_until(&plane, options(), |s| !s.completed.is_empty())
        .await
        .expect("run");
    assert_eq!(plane.seen(|s| s.completed.clone()), vec![(next_id, 1)]);
    assert_eq!(plane.seen(|s| s.completion_calls), 2, "once each");
}

#[tokio::test]
async fn a_batch_past_the_drain_deadline_is_given_back() {
    let job = lease(1000);
    let id = job.job.id;
    let plane = Scripted::with(|s| s.to_lease.push_back(job));
    let mut options = options();
    options.drain_timeout = Duration::from_millis(200);
    // Stop once the batch is running (it has heartbeated); the drain deadline passes long
    // before a thousand steps end.
    run_until(&plane, options, |s| s.heartbeat_calls > 0)
        .await
        .expect("run");
    assert_eq!(plane.seen(|s| s.released.clone()), vec![id]);
    assert!(plane.seen(|s| s.completed.is_empty() && s.failed.is_empty()));
}

#[tokio::test]
async fn a_job_for_another_model_loads_it_in_place_of_the_least_recently_used() {
    let (first, second) = ("loop-model-a", "loop-model-b");
    let engine = engine_of(&[first, second], 1).await;
    let plane = Scripted::with(|s| {
        s.to_lease.push_back(lease_of(second, 2));
        s.to_lease.push_back(lease_of(first, 2));
    });
    run_on(&plane, engine, options(), |s| s.completed.len() == 2)
        .await
        .expect("run");
    assert!(plane.seen(|s| s.failed.is_empty()));
    let loads: Vec<(String, Vec<String>)> = plane.seen(|s| {
        s.loads
            .iter()
            .map(|l| (l.model.clone(), l.evicted.clone()))
            .collect()
    });
    assert_eq!(
        loads,
        [
            (first.to_string(), vec![]),
            (second.to_string(), vec![first.to_string()]),
            (first.to_string(), vec![second.to_string()]),
        ],
        "one model at a time: each load unloads the other"
    );
    assert!(plane.seen(|s| s.loads.iter().all(|l| l.pixels > 0 && l.seconds > 0.0)));
    // Each ask for work names both models and the one loaded then.
    let asks = plane.seen(|s| s.asks.clone());
    let serves = vec![first.to_string(), second.to_string()];
    assert_eq!(
        asks[0],
        Serving {
            serves: serves.clone(),
            loaded: vec![first.to_string()]
        }
    );
    assert!(
        asks.contains(&Serving {
            serves,
            loaded: vec![second.to_string()]
        }),
        "{asks:?}"
    );
}

#[tokio::test]
async fn a_job_for_a_model_the_worker_does_not_serve_fails_and_the_worker_goes_on() {
    let plane = Scripted::with(|s| {
        s.to_lease.push_back(lease_of("someone-elses-model", 2));
        s.to_lease.push_back(lease(2));
    });
    run_until(&plane, options(), |s| !s.completed.is_empty())
        .await
        .expect("run");
    let failed = plane.seen(|s| s.failed.clone());
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].1.retryable,
        "another worker may serve it: {:?}",
        failed[0].1
    );
}
