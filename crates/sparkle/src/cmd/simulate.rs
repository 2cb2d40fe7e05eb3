//! `sparkle scaler simulate`: a trace of arrivals through a simulated pool of GPU workers,
//! scaled by Sparkle's policy or by the reference deployment's — the very code the scaler
//! runs — and what came of it: waits, GPU-seconds per image, idle GPU-seconds, cold starts.

use anyhow::Context;
use clap::Args;
use sparkle_scaler::simulate::{read_trace, simulate, Hardware, Report};
use sparkle_scaler::{Policy, ReferencePolicy, ScalingPolicy};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// The trace: CSV with the header `arrival_secs,model,width,height,steps,n`.
    #[arg(long, value_name = "FILE")]
    trace: PathBuf,
    /// `sparkle` (this scaler's policy, with the settings below) or `reference` (the
    /// reference deployment's: 4 jobs a task, alarms of 15 and 150 ten-second points, a
    /// 600-s cooldown, a 55-s wait from zero, 2 GPUs at most).
    #[arg(long, default_value = "sparkle", value_parser = ["sparkle", "reference"])]
    policy: String,
    /// One JSON object instead of a line of text.
    #[arg(long)]
    json: bool,
    /// GPU-seconds per SD 1.5 step at 512² (an A10G-class GPU: about 0.12).
    #[arg(long, default_value_t = 0.12)]
    secs_per_step: f64,
    /// Seconds per image beside the steps (text encoder, VAE, PNG).
    #[arg(long, default_value_t = 0.4)]
    per_image_secs: f64,
    /// Seconds from starting a worker to its being ready, for both policies.
    #[arg(long, default_value_t = 30.0)]
    cold_start_secs: f64,
    /// Sparkle's policy: most workers.
    #[arg(long, default_value_t = 8)]
    max_workers: u32,
    /// Sparkle's policy: workers kept when idle.
    #[arg(long, default_value_t = 0)]
    min_workers: u32,
    /// Sparkle's policy: the wait the pool is sized for (`scaler.target_wait_secs`).
    #[arg(long, default_value_t = 45.0)]
    target_wait_secs: f64,
    /// Sparkle's policy: how long workers stay surplus before they stop
    /// (`scaler.idle_grace_secs`).
    #[arg(long, default_value_t = 120.0)]
    idle_grace_secs: f64,
    /// Sparkle's policy: GPU-seconds the pool may spend in any hour.
    #[arg(long)]
    budget_gpu_secs_per_hour: Option<f64>,
}

pub fn run(args: SimulateArgs) -> anyhow::Result<()> {
    for (name, value) in [
        ("--secs-per-step", args.secs_per_step),
        ("--target-wait-secs", args.target_wait_secs),
    ] {
        anyhow::ensure!(
            value.is_finite() && value > 0.0,
            "{name} must be a positive number"
        );
    }
    for (name, value) in [
        ("--per-image-secs", args.per_image_secs),
        ("--cold-start-secs", args.cold_start_secs),
        ("--idle-grace-secs", args.idle_grace_secs),
    ] {
        anyhow::ensure!(
            value.is_finite() && value >= 0.0,
            "{name} must be seconds, 0 or more"
        );
    }
    anyhow::ensure!(
        args.max_workers >= 1 && args.min_workers <= args.max_workers,
        "--max-workers must be at least 1 and at least --min-workers"
    );
    let text = std::fs::read_to_string(&args.trace)
        .with_context(|| format!("cannot read {}", args.trace.display()))?;
    let trace =
        read_trace(&text).map_err(|why| anyhow::anyhow!("{}: {why}", args.trace.display()))?;
    let hardware = Hardware {
        secs_per_unit: args.secs_per_step,
        per_image_secs: args.per_image_secs,
        cold_start_secs: args.cold_start_secs,
    };
    let mut policy: Box<dyn ScalingPolicy> = match args.policy.as_str() {
        "reference" => Box::new(ReferencePolicy::default()),
        _ => Box::new(
            Policy {
                min_workers: args.min_workers,
                max_workers: args.max_workers,
                target_wait_secs: args.target_wait_secs,
                idle_grace_secs: args.idle_grace_secs,
                budget_gpu_secs_per_hour: args.budget_gpu_secs_per_hour,
            }
            .decider(),
        ),
    };
    let report = simulate(&trace, policy.as_mut(), &hardware);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_line(&args.policy, &report);
    }
    Ok(())
}

fn print_line(policy: &str, r: &Report) {
    println!(
        "{policy}: {} jobs, wait p50 {:.1} s, p95 {:.1} s, p99 {:.1} s; {:.2} GPU-s per image, \
         {:.0} idle GPU-s, {} cold starts, {} workers at most",
        r.jobs,
        r.p50_wait_secs,
        r.p95_wait_secs,
        r.p99_wait_secs,
        r.gpu_secs_per_image,
        r.idle_gpu_secs,
        r.cold_starts,
        r.peak_workers
    );
}
