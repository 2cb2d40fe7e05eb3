//! `sparkle bench queue`: jobs enqueued, leased and completed per second through the
//! configured database (SQLite in the data directory, or PostgreSQL by `database.url`), with
//! durable commits, at a given concurrency. Point it at a scratch data directory or schema:
//! it adds the jobs it measures with.
//!
//! `--through` says what workers lease and complete through: the queue itself; the control
//! plane in the same process (the queue, and a small image sealed into the store for each
//! job); or the worker protocol (the same control plane behind an HTTPS listener on
//! loopback, each call made as a remote worker makes it). The last two differ by what the
//! protocol costs a job.

use crate::Common;
use clap::Args;
use sparkle_queue::Database;
use sparkle_worker::{ControlPlane, Serving};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Args)]
pub struct QueueBench {
    #[command(flatten)]
    common: Common,
    /// Jobs per phase.
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Submitters, and workers, at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Jobs a worker leases at once.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Fairness shares the jobs are spread over (API keys, Discord users).
    #[arg(long, default_value_t = 100)]
    shares: usize,
    /// What workers lease and complete through: `queue`, `control-plane` (in this process,
    /// storing an image per job) or `worker-protocol` (the control plane over HTTPS).
    #[arg(long, default_value = "queue", value_parser = ["queue", "control-plane", "worker-protocol"])]
    through: String,
}

/// A stand-in for a job's PNG: what a completion hands over and the store seals.
const IMAGE_BYTES: usize = 16 * 1024;

pub async fn run(args: QueueBench) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.jobs > 0 && args.concurrency > 0 && args.batch > 0 && args.shares > 0,
        "--jobs, --concurrency, --batch and --shares must be at least 1"
    );
    let config = super::super::load_config(&args.common, None)?;
    let queue = super::super::open_queue(&config).await?;
    let backend = match &config.database.url {
        Some(_) => "postgresql",
        None => "sqlite",
    };
    println!(
        "backend {backend}, {} jobs per phase, concurrency {}, lease batch {}, {} shares, \
         workers through {}",
        args.jobs, args.concurrency, args.batch, args.shares, args.through
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    let plane = match args.through.as_str() {
        "queue" => None,
        through => {
            Some(control_plane(&config, &queue, through == "worker-protocol", &shutdown).await?)
        }
    };
    let workers = Workers {
        queue: queue.clone(),
        plane,
    };
    let enqueue = time(|| submit(&queue, &args, args.jobs)).await?;
    report("enqueue", args.jobs, enqueue);
    let drain = time(|| workers.work(&args, args.jobs)).await?;
    report("lease + complete", args.jobs, drain);
    // Both at once: submitters and workers sharing the database.
    let started = Instant::now();
    let (submitted, worked) = tokio::join!(
        submit(&queue, &args, args.jobs),
        workers.work(&args, args.jobs)
    );
    shutdown.cancel();
    submitted?;
    worked?;
    report(
        "enqueue, lease and complete at once",
        args.jobs,
        started.elapsed(),
    );
    queue.close().await;
    Ok(())
}

async fn time<F, Fut>(f: F) -> anyhow::Result<Duration>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let started = Instant::now();
    f().await?;
    Ok(started.elapsed())
}

fn report(phase: &str, jobs: usize, took: Duration) {
    println!(
        "{phase:<38} {:>9.0} jobs/s ({jobs} in {:.2} s)",
        jobs as f64 / took.as_secs_f64().max(1e-9),
        took.as_secs_f64()
    );
}

async fn submit(queue: &Arc<dyn Database>, args: &QueueBench, jobs: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency {
        let (queue, next, shares) = (queue.clone(), next.clone(), args.shares);
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return anyhow::Ok(());
                }
                let share = format!("bench-{}", n % shares);
                queue
                    .enqueue(sparkle_queue::conformance::new_job(
                        &share,
                        &format!("job {n}"),
                    ))
                    .await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// The control plane the workers use: in this process, or behind a worker listener on
/// loopback, spoken to over HTTPS with an enrollment of its own.
async fn control_plane(
    config: &crate::config::Config,
    queue: &Arc<dyn Database>,
    over_https: bool,
    shutdown: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Arc<dyn ControlPlane>> {
    let keys = crate::keyring::open(config)?;
    let store: Arc<dyn sparkle_store::ImageStore> =
        Arc::new(super::super::open_store(config, keys.clone())?);
    let plane = Arc::new(crate::control_plane::QueuePlane::new(
        queue.clone() as Arc<dyn sparkle_queue::JobQueue>,
        store,
        vec![MODEL.to_string()],
    ));
    if !over_https {
        return Ok(plane);
    }
    let api = crate::worker_listener::WorkerApi {
        plane,
        keys: queue.clone(),
        tokens: Arc::new(sparkle_store::WorkerTokens::new(
            keys,
            Duration::from_secs(config.worker.token_lifetime_secs),
        )),
    };
    let local = super::super::serve::start_local_plane(config, queue, &api, shutdown).await?;
    let secret = crate::secrets::read_secret_file(&local.secret_file)?;
    let remote = sparkle_worker::Remote::new(&local.url, Some(&local.ca_file), secret.to_string())
        .map_err(|e| anyhow::anyhow!("the loopback worker listener: {e}"))?;
    Ok(Arc::new(remote))
}

/// The model the benchmark's jobs name.
const MODEL: &str = "tiny";

struct Workers {
    queue: Arc<dyn Database>,
    plane: Option<Arc<dyn ControlPlane>>,
}

impl Workers {
    async fn work(&self, args: &QueueBench, jobs: usize) -> anyhow::Result<()> {
        let done = Arc::new(AtomicUsize::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..args.concurrency {
            let (queue, plane, done, batch) = (
                self.queue.clone(),
                self.plane.clone(),
                done.clone(),
                args.batch,
            );
            tasks.spawn(async move {
                let worker = format!("bench-worker-{n}");
                while done.load(Ordering::Relaxed) < jobs {
                    let finished = match &plane {
                        None => through_queue(&*queue, &worker, batch).await?,
                        Some(plane) => through_plane(&**plane, &worker, batch).await?,
                    };
                    if finished == 0 {
                        queue.wait_for_work(Duration::from_millis(20)).await;
                    }
                    done.fetch_add(finished, Ordering::Relaxed);
                }
                anyhow::Ok(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    }
}

async fn through_queue(queue: &dyn Database, worker: &str, batch: usize) -> anyhow::Result<usize> {
    let leases = queue.lease(worker, batch, Duration::from_secs(60)).await?;
    for lease in &leases {
        queue.complete(&lease.token, 1).await?;
    }
    Ok(leases.len())
}

async fn through_plane(
    plane: &dyn ControlPlane,
    worker: &str,
    batch: usize,
) -> anyhow::Result<usize> {
    let serving = Serving {
        serves: vec![MODEL.to_string()],
        loaded: vec![MODEL.to_string()],
    };
    let leases = plane
        .lease(
            worker,
            &serving,
            None,
            batch,
            Duration::from_secs(60),
            Duration::ZERO,
        )
        .await?;
    for lease in &leases {
        let image = bytes::Bytes::from(vec![0x5a; IMAGE_BYTES]);
        plane.complete(lease, vec![image]).await?;
    }
    Ok(leases.len())
}
