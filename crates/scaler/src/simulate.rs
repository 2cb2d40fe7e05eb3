//! A discrete-event simulation of a pool of GPU workers under a trace of arrivals, scaled by
//! a [`ScalingPolicy`] — the same code the scaler runs — ticking once a second.
//!
//! Jobs queue in arrival order; a ready worker takes the oldest and holds it for
//! `per_image_secs × n + secs_per_unit × cost`; a started worker is ready `cold_start_secs`
//! later. Workers stop gracefully: the starting first, then the idle, never one with a job.
//! Every second a worker is up (starting included) is a GPU-second spent; the run goes on
//! after the last job until the pool is back at what the policy keeps when idle, or for at
//! most two hours, so a policy that holds idle GPUs pays for them.

use crate::cost::{job_cost, Rate};
use crate::policy::{Observation, ScalingPolicy};
use std::collections::VecDeque;

/// One line of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceJob {
    pub arrival_secs: f64,
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub n: u32,
}

/// The header every trace starts with.
pub const TRACE_HEADER: &str = "arrival_secs,model,width,height,steps,n";

/// Reads a trace: CSV with [`TRACE_HEADER`], arrivals in order. Errors name the line.
pub fn read_trace(text: &str) -> Result<Vec<TraceJob>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    match lines.next() {
        Some((_, header)) if header.trim() == TRACE_HEADER => {}
        _ => return Err(format!("the first line must be `{TRACE_HEADER}`")),
    }
    let mut jobs = Vec::new();
    let mut last = 0.0;
    for (i, line) in lines {
        let n = i + 1;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [arrival, model, width, height, steps, count] = fields.as_slice() else {
            return Err(format!("line {n}: expected 6 fields, got {}", fields.len()));
        };
        let number = |what: &str, text: &str| -> Result<u32, String> {
            text.parse::<u32>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("line {n}: {what} must be a positive integer, got {text:?}"))
        };
        let arrival_secs: f64 = arrival
            .parse()
            .ok()
            .filter(|a: &f64| a.is_finite() && *a >= 0.0)
            .ok_or_else(|| format!("line {n}: arrival_secs must be seconds, 0 or more"))?;
        if arrival_secs < last {
            return Err(format!("line {n}: arrivals must be in order"));
        }
        last = arrival_secs;
        if model.is_empty() {
            return Err(format!("line {n}: the model is empty"));
        }
        jobs.push(TraceJob {
            arrival_secs,
            model: model.to_string(),
            width: number("width", width)?,
            height: number("height", height)?,
            steps: number("steps", steps)?,
            n: number("n", count)?,
        });
    }
    Ok(jobs)
}

/// The simulated GPUs.
#[derive(Debug, Clone, PartialEq)]
pub struct Hardware {
    /// GPU-seconds per cost unit (one SD 1.5 step at 512²).
    pub secs_per_unit: f64,
    /// Seconds per image beside the steps (text encoder, VAE decode, PNG).
    pub per_image_secs: f64,
    /// Seconds from starting a worker to its being ready.
    pub cold_start_secs: f64,
}

/// What a run came to.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    pub jobs: usize,
    pub p50_wait_secs: f64,
    pub p95_wait_secs: f64,
    pub p99_wait_secs: f64,
    pub gpu_secs_per_image: f64,
    pub idle_gpu_secs: f64,
    pub cold_starts: u64,
    pub peak_workers: u32,
}

#[derive(Debug, Clone)]
struct Worker {
    ready_at: f64,
    /// The job in hand and when it ends.
    job: Option<(usize, f64)>,
}

/// The longest a run goes on after its last job, waiting for the pool to wind down.
const WIND_DOWN_SECS: f64 = 7200.0;

/// Runs `trace` on `hardware` under `policy`.
pub fn simulate(trace: &[TraceJob], policy: &mut dyn ScalingPolicy, hardware: &Hardware) -> Report {
    let costs: Vec<f64> = trace
        .iter()
        .map(|j| job_cost(&j.model, j.width, j.height, j.steps, j.n))
        .collect();
    let run_secs = |i: usize| {
        hardware.secs_per_unit * costs[i] + hardware.per_image_secs * f64::from(trace[i].n)
    };
    let mut throughput = Rate::new(1.0 / hardware.secs_per_unit.max(1e-9), 32);
    let mut ready_time = Rate::new(hardware.cold_start_secs, 8);
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut workers: Vec<Worker> = Vec::new();
    let mut waits: Vec<f64> = Vec::with_capacity(trace.len());
    let (mut gpu_secs, mut busy_secs) = (0.0, 0.0);
    let mut cold_starts = 0u64;
    let mut peak = 0u32;
    let mut next_arrival = 0usize;
    let mut done = 0usize;
    let mut now = 0.0f64;
    let mut next_tick = 0.0f64;
    let mut idle_floor = None;
    loop {
        // The next event: an arrival, a worker ready, a job done, or the policy's tick.
        let mut next = next_tick;
        if let Some(job) = trace.get(next_arrival) {
            next = next.min(job.arrival_secs);
        }
        for w in &workers {
            if w.ready_at > now {
                next = next.min(w.ready_at);
            }
            if let Some((_, end)) = w.job {
                next = next.min(end);
            }
        }
        let dt = (next - now).max(0.0);
        gpu_secs += dt * workers.len() as f64;
        busy_secs += dt * workers.iter().filter(|w| w.job.is_some()).count() as f64;
        now = next;
        while trace
            .get(next_arrival)
            .is_some_and(|j| j.arrival_secs <= now)
        {
            queue.push_back(next_arrival);
            next_arrival += 1;
        }
        for w in &mut workers {
            if let Some((i, end)) = w.job {
                if end <= now {
                    throughput.observe(costs[i] / run_secs(i).max(1e-9));
                    w.job = None;
                    done += 1;
                }
            }
        }
        dispatch(&mut workers, &mut queue, &mut waits, now, trace, &run_secs);
        if now >= next_tick {
            next_tick = now.floor() + 1.0;
            let running: Vec<usize> = workers.iter().filter_map(|w| w.job.map(|j| j.0)).collect();
            let seen = Observation {
                now,
                queued: queue.len() as u64,
                running: running.len() as u64,
                queued_cost: queue.iter().map(|&i| costs[i]).sum(),
                running_cost: running.iter().map(|&i| costs[i]).sum(),
                workers: workers.len() as u32,
                starting: workers.iter().filter(|w| w.ready_at > now).count() as u32,
                busy: running.len() as u32,
                throughput: throughput.value(),
                ready_secs: ready_time.value(),
            };
            let desired = policy.desired(&seen) as usize;
            while workers.len() < desired {
                workers.push(Worker {
                    ready_at: now + hardware.cold_start_secs,
                    job: None,
                });
                ready_time.observe(hardware.cold_start_secs);
                cold_starts += 1;
            }
            while workers.len() > desired {
                // The starting first (latest started), then the idle; never one with a job.
                let victim = workers
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.job.is_none())
                    .max_by(|a, b| a.1.ready_at.total_cmp(&b.1.ready_at))
                    .map(|(i, _)| i);
                match victim {
                    Some(i) => {
                        workers.swap_remove(i);
                    }
                    None => break,
                }
            }
            peak = peak.max(workers.len() as u32);
            // A newly started worker may already be ready (no cold start): give it work.
            dispatch(&mut workers, &mut queue, &mut waits, now, trace, &run_secs);
        }
        if done == trace.len() && next_arrival == trace.len() {
            // Over once every worker has stopped (a pool that keeps workers when idle winds
            // down to them only by the time limit).
            let floor = *idle_floor.get_or_insert(now);
            if workers.is_empty() || now - floor > WIND_DOWN_SECS {
                break;
            }
        }
    }
    waits.sort_by(f64::total_cmp);
    let images: u64 = trace.iter().map(|j| u64::from(j.n)).sum();
    Report {
        jobs: trace.len(),
        p50_wait_secs: percentile(&waits, 0.50),
        p95_wait_secs: percentile(&waits, 0.95),
        p99_wait_secs: percentile(&waits, 0.99),
        gpu_secs_per_image: if images == 0 {
            0.0
        } else {
            gpu_secs / images as f64
        },
        idle_gpu_secs: gpu_secs - busy_secs,
        cold_starts,
        peak_workers: peak,
    }
}

/// Ready workers without a job take the oldest queued jobs at `now`.
fn dispatch(
    workers: &mut [Worker],
    queue: &mut VecDeque<usize>,
    waits: &mut Vec<f64>,
    now: f64,
    trace: &[TraceJob],
    run_secs: &dyn Fn(usize) -> f64,
) {
    for w in workers {
        if w.job.is_none() && w.ready_at <= now {
            if let Some(i) = queue.pop_front() {
                waits.push(now - trace[i].arrival_secs);
                w.job = Some((i, now + run_secs(i)));
            }
        }
    }
}

/// The `q` quantile of sorted `values` (nearest rank); 0 when there are none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::reference::ReferencePolicy;

    fn job(at: f64) -> TraceJob {
        TraceJob {
            arrival_secs: at,
            model: "sd15".into(),
            width: 512,
            height: 512,
            steps: 25,
            n: 1,
        }
    }

    fn hardware() -> Hardware {
        Hardware {
            secs_per_unit: 0.1,
            per_image_secs: 0.5,
            cold_start_secs: 20.0,
        }
    }

    #[test]
    fn traces_are_read_and_bad_lines_named() {
        let ok = format!("{TRACE_HEADER}\n0.5,sd15,512,512,25,1\n1,sdxl,1024,1024,20,2\n");
        let jobs = read_trace(&ok).expect("a trace");
        assert_eq!(jobs.len(), 2);
        assert_eq!(jobs[1].model, "sdxl");
        assert!(read_trace("a,b\n")
            .expect_err("no header")
            .contains("first line"));
        let bad = format!("{TRACE_HEADER}\n1,sd15,512,0,25,1\n");
        assert!(read_trace(&bad)
            .expect_err("a zero height")
            .contains("line 2: height"));
        let unordered = format!("{TRACE_HEADER}\n2,sd15,512,512,25,1\n1,sd15,512,512,25,1\n");
        assert!(read_trace(&unordered)
            .expect_err("out of order")
            .contains("in order"));
    }

    #[test]
    fn one_job_waits_for_one_cold_start_and_every_gpu_second_is_counted() {
        let trace = [job(10.0)];
        let policy = Policy {
            idle_grace_secs: 30.0,
            ..Policy::default()
        };
        let report = simulate(&trace, &mut policy.decider(), &hardware());
        // Seen at the tick after arrival (10 s), ready 20 s later.
        assert!((report.p50_wait_secs - 20.0).abs() < 1.01, "{report:?}");
        assert_eq!(report.cold_starts, 1);
        // 20 s starting + 3 s busy + 30 s of grace.
        assert!((report.gpu_secs_per_image - 53.0).abs() < 2.0, "{report:?}");
        assert!((report.idle_gpu_secs - 50.0).abs() < 2.0, "{report:?}");
    }

    #[test]
    fn a_burst_waits_far_less_under_sparkle_than_under_the_reference() {
        let trace: Vec<TraceJob> = (0..600).map(|i| job(100.0 + f64::from(i) * 0.2)).collect();
        let sparkle = Policy {
            max_workers: 8,
            target_wait_secs: 30.0,
            idle_grace_secs: 120.0,
            ..Policy::default()
        };
        let ours = simulate(&trace, &mut sparkle.decider(), &hardware());
        let theirs = simulate(&trace, &mut ReferencePolicy::default(), &hardware());
        assert!(
            ours.p95_wait_secs * 5.0 < theirs.p95_wait_secs,
            "{ours:?} vs {theirs:?}"
        );
        assert_eq!(ours.jobs, 600);
        assert_eq!(theirs.jobs, 600);
    }
}
