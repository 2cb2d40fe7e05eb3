//! `sparkle bench queue`: jobs enqueued, leased and completed per second through the
//! configured database (SQLite in the data directory, or PostgreSQL by `database.url`), with
//! durable commits, at a given concurrency. Point it at a scratch data directory or schema:
//! it adds the jobs it measures with.

use crate::Common;
use clap::Args;
use sparkle_queue::Database;
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
}

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
        "backend {backend}, {} jobs per phase, concurrency {}, lease batch {}, {} shares",
        args.jobs, args.concurrency, args.batch, args.shares
    );
    let enqueue = time(|| submit(&queue, &args, args.jobs)).await?;
    report("enqueue", args.jobs, enqueue);
    let drain = time(|| work(&queue, &args, args.jobs)).await?;
    report("lease + complete", args.jobs, drain);
    // Both at once: submitters and workers sharing the database.
    let started = Instant::now();
    let (submitted, worked) = tokio::join!(
        submit(&queue, &args, args.jobs),
        work(&queue, &args, args.jobs)
    );
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

async fn work(queue: &Arc<dyn Database>, args: &QueueBench, jobs: usize) -> anyhow::Result<()> {
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.concurrency {
        let (queue, done, batch) = (queue.clone(), done.clone(), args.batch);
        tasks.spawn(async move {
            let worker = format!("bench-worker-{n}");
            while done.load(Ordering::Relaxed) < jobs {
                let leases = queue.lease(&worker, batch, Duration::from_secs(60)).await?;
                if leases.is_empty() {
                    queue.wait_for_work(Duration::from_millis(20)).await;
                    continue;
                }
                for lease in &leases {
                    queue.complete(&lease.token, 1).await?;
                }
                done.fetch_add(leases.len(), Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}
