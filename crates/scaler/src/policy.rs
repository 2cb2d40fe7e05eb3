//! How the backlog becomes a worker count, as pure functions of what is observed: the same
//! code decides in the scaler and in the simulator.
//!
//! Sparkle's policy thinks in time. The work waiting and in flight, in cost units
//! ([`crate::cost`]), over what one worker gets through a second (measured), is how many
//! worker-seconds the backlog holds; spread over the target wait, that is how many workers
//! it needs — a worker still to be started counting only for the part of the target wait
//! left once it is ready (the ready time is measured too). Work arriving at an empty pool starts a worker at once. More workers than jobs
//! are never asked for (a job does not split), never fewer than are busy, never more than
//! `max_workers`; workers beyond what the backlog needs stop only once they have been surplus
//! for `idle_grace`, so a pause between requests does not pay a cold start. An optional
//! budget in GPU-seconds per hour holds the pool to its busy workers once the last hour has
//! spent it.

use std::collections::VecDeque;

/// What a policy sees each tick.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Observation {
    /// Seconds on a monotonic clock.
    pub now: f64,
    pub queued: u64,
    pub running: u64,
    /// Cost units of the queued jobs.
    pub queued_cost: f64,
    /// Cost units of the running jobs (whole jobs: what remains of them is not known).
    pub running_cost: f64,
    /// Workers running or starting.
    pub workers: u32,
    /// Of those, workers not yet ready.
    pub starting: u32,
    /// Of those, workers with a job in hand.
    pub busy: u32,
    /// Cost units one worker gets through a second (measured).
    pub throughput: f64,
    /// Seconds a new worker takes to become ready (measured).
    pub ready_secs: f64,
}

/// Turns observations into a worker count.
pub trait ScalingPolicy: Send {
    /// The workers wanted now. Called about once a second, with time moving forward.
    fn desired(&mut self, seen: &Observation) -> u32;
}

/// The settings of Sparkle's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Workers kept even when idle (0 allows scale to zero).
    pub min_workers: u32,
    /// Never more than this (the GPUs on a machine, or a deployment's cap).
    pub max_workers: u32,
    /// The wait the pool is sized for: the backlog should drain within it.
    pub target_wait_secs: f64,
    /// How long workers stay surplus before they stop.
    pub idle_grace_secs: f64,
    /// GPU-seconds the pool may spend in any hour; `None`: no budget.
    pub budget_gpu_secs_per_hour: Option<f64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_workers: 0,
            max_workers: 1,
            target_wait_secs: 45.0,
            idle_grace_secs: 120.0,
            budget_gpu_secs_per_hour: None,
        }
    }
}

impl Policy {
    /// The workers the backlog needs, before the grace and the budget: monotone in the
    /// backlog, at least the busy workers, at most `max_workers`.
    pub fn needed(&self, seen: &Observation) -> u32 {
        let max = self.max_workers.max(self.min_workers);
        let jobs = seen.queued + seen.running;
        if jobs == 0 {
            return seen.busy.clamp(self.min_workers, max);
        }
        let throughput = if seen.throughput.is_finite() && seen.throughput > 0.0 {
            seen.throughput
        } else {
            // Nothing measured and no prior: one worker per job, the safe side.
            f64::MIN_POSITIVE
        };
        let horizon = self.target_wait_secs.max(1.0);
        // The queued work in worker-seconds. Jobs in hand cannot move to another worker:
        // their workers take queued work only once they finish, on average half a job from
        // now, and what they reach within the horizon needs no one else.
        let queued_secs = seen.queued_cost.max(0.0) / throughput;
        let busy = f64::from(seen.busy);
        let in_hand = if seen.busy > 0 {
            seen.running_cost.max(0.0) / throughput / busy / 2.0
        } else {
            0.0
        };
        let left_to_others = (queued_secs - busy * (horizon - in_hand).max(0.0)).max(0.0);
        let for_queue = (left_to_others / horizon).ceil();
        let up = f64::from(seen.workers);
        let by_time = if busy + for_queue <= up || up == 0.0 {
            (busy + for_queue).max(1.0)
        } else {
            // More than are up: a worker started now is worth starting only for work still
            // left once it is ready, and a whole horizon's worth of it — one that would find
            // the backlog gone costs a cold start and a grace period for nothing.
            let idle = up - busy;
            let after_start = horizon - seen.ready_secs.max(0.0);
            let per_new = after_start.max(horizon / 4.0);
            let left = (left_to_others - idle * horizon).max(0.0);
            up + (left / per_new).floor()
        };
        let by_time = if by_time.is_finite() {
            by_time.min(f64::from(u32::MAX)) as u32
        } else {
            u32::MAX
        };
        let by_jobs = u32::try_from(jobs).unwrap_or(u32::MAX);
        by_time
            .min(by_jobs)
            .max(1)
            .max(seen.busy)
            .clamp(self.min_workers, max)
    }

    /// A stateful decider with these settings.
    pub fn decider(&self) -> SparklePolicy {
        SparklePolicy {
            policy: self.clone(),
            surplus_since: None,
            spent: VecDeque::new(),
            last_now: None,
        }
    }
}

/// Sparkle's policy with what it remembers: since when workers have been surplus, and the
/// GPU-seconds spent over the last hour.
#[derive(Debug, Clone)]
pub struct SparklePolicy {
    policy: Policy,
    surplus_since: Option<f64>,
    /// (when, GPU-seconds spent in the tick that ended then)
    spent: VecDeque<(f64, f64)>,
    last_now: Option<f64>,
}

const HOUR: f64 = 3600.0;

impl ScalingPolicy for SparklePolicy {
    fn desired(&mut self, seen: &Observation) -> u32 {
        let p = &self.policy;
        let max = p.max_workers.max(p.min_workers);
        // The budget: GPU-seconds the pool spent in the last hour.
        if let Some(last) = self.last_now {
            let dt = (seen.now - last).max(0.0);
            self.spent
                .push_back((seen.now, dt * f64::from(seen.workers)));
        }
        self.last_now = Some(seen.now);
        while self
            .spent
            .front()
            .is_some_and(|(at, _)| *at < seen.now - HOUR)
        {
            self.spent.pop_front();
        }
        let needed = p.needed(seen);
        let keep = seen.busy.clamp(p.min_workers, max);
        let current = seen.workers;
        let desired = if needed >= current {
            self.surplus_since = None;
            needed
        } else {
            let since = *self.surplus_since.get_or_insert(seen.now);
            if seen.now - since >= p.idle_grace_secs {
                needed
            } else {
                current.min(max)
            }
        };
        match p.budget_gpu_secs_per_hour {
            Some(budget) if self.spent.iter().map(|(_, s)| s).sum::<f64>() >= budget => {
                desired.min(keep)
            }
            _ => desired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> Policy {
        Policy {
            min_workers: 0,
            max_workers: 4,
            target_wait_secs: 10.0,
            idle_grace_secs: 60.0,
            budget_gpu_secs_per_hour: None,
        }
    }

    fn seen(queued: u64, cost_each: f64, workers: u32, busy: u32, now: f64) -> Observation {
        Observation {
            now,
            queued,
            running: u64::from(busy),
            queued_cost: queued as f64 * cost_each,
            running_cost: f64::from(busy) * cost_each,
            workers,
            starting: 0,
            busy,
            throughput: 25.0,
            ready_secs: 5.0,
        }
    }

    #[test]
    fn work_arriving_at_an_empty_pool_starts_a_worker_at_once() {
        let mut p = policy().decider();
        assert_eq!(p.desired(&seen(0, 25.0, 0, 0, 0.0)), 0);
        assert_eq!(p.desired(&seen(1, 25.0, 0, 0, 1.0)), 1);
    }

    #[test]
    fn the_pool_is_sized_to_drain_the_backlog_within_the_target_wait() {
        let p = policy();
        // 25 units a second per worker, 10 s target: 250 units per worker.
        assert_eq!(p.needed(&seen(10, 25.0, 1, 0, 0.0)), 1, "250 units");
        // 11 s of work: a worker started now (ready in 5 s) would find 1 s of it left.
        assert_eq!(p.needed(&seen(11, 25.0, 1, 0, 0.0)), 1, "275 units");
        // 20 s: 10 s left over, 5 s of each new worker's horizon once ready.
        assert_eq!(p.needed(&seen(20, 25.0, 1, 0, 0.0)), 3, "500 units");
        assert_eq!(
            p.needed(&seen(1, 25.0, 0, 0, 0.0)),
            1,
            "any work gets a worker"
        );
        assert_eq!(
            p.needed(&seen(100, 25.0, 1, 0, 0.0)),
            4,
            "capped at max_workers"
        );
        // Two big jobs want two workers, not eight.
        assert_eq!(
            p.needed(&seen(2, 1000.0, 1, 0, 0.0)),
            2,
            "no more workers than jobs"
        );
    }

    #[test]
    fn surplus_workers_stop_after_the_grace_and_busy_ones_never() {
        let mut p = policy().decider();
        assert_eq!(p.desired(&seen(100, 25.0, 0, 0, 0.0)), 4);
        // The backlog is gone but three workers still hold jobs.
        assert_eq!(p.desired(&seen(0, 25.0, 4, 3, 1.0)), 4, "within the grace");
        assert_eq!(
            p.desired(&seen(0, 25.0, 4, 3, 61.0)),
            3,
            "never a busy worker"
        );
        assert_eq!(
            p.desired(&seen(0, 25.0, 3, 0, 62.0)),
            0,
            "all idle, grace long over"
        );
        // A burst within the grace re-arms it.
        let mut p = policy().decider();
        p.desired(&seen(100, 25.0, 0, 0, 0.0));
        p.desired(&seen(0, 25.0, 4, 0, 10.0));
        assert_eq!(p.desired(&seen(100, 25.0, 4, 4, 50.0)), 4);
        assert_eq!(
            p.desired(&seen(0, 25.0, 4, 0, 100.0)),
            4,
            "grace counted anew"
        );
    }

    #[test]
    fn a_spent_budget_holds_the_pool_to_its_busy_workers() {
        let mut p = Policy {
            budget_gpu_secs_per_hour: Some(100.0),
            ..policy()
        }
        .decider();
        assert_eq!(p.desired(&seen(100, 25.0, 0, 0, 0.0)), 4);
        // Four workers for 30 s: 120 GPU-seconds, over the budget.
        assert_eq!(p.desired(&seen(100, 25.0, 4, 2, 30.0)), 2);
        // Nothing ran since; an hour later the spending has aged out.
        assert_eq!(p.desired(&seen(100, 25.0, 0, 0, 3700.0)), 4);
    }

    proptest! {
        #[test]
        fn needed_is_bounded_and_monotone_in_the_backlog(
            queued in 0u64..10_000,
            more in 0u64..10_000,
            cost in 0.1f64..2_000.0,
            busy in 0u32..8,
            max in 1u32..16,
            min in 0u32..4,
            throughput in 0.01f64..1_000.0,
            target in 1.0f64..600.0,
        ) {
            let p = Policy {
                min_workers: min,
                max_workers: max,
                target_wait_secs: target,
                idle_grace_secs: 60.0,
                budget_gpu_secs_per_hour: None,
            };
            let mut a = seen(queued, cost, busy, busy, 0.0);
            a.throughput = throughput;
            let mut b = a;
            b.queued += more;
            b.queued_cost += more as f64 * cost;
            let (na, nb) = (p.needed(&a), p.needed(&b));
            prop_assert!(na <= nb, "monotone: {na} then {nb}");
            prop_assert!(nb <= max.max(min), "never above max");
            prop_assert!(na >= busy.min(max.max(min)), "never below busy");
            if queued + u64::from(busy) > 0 {
                prop_assert!(na >= 1, "work gets a worker");
            }
        }

        #[test]
        fn the_decider_never_drops_below_busy_nor_exceeds_max(
            steps in proptest::collection::vec((0u64..500, 0u32..8), 1..50),
            max in 1u32..8,
        ) {
            let p = Policy { max_workers: max, ..policy() };
            let mut d = p.decider();
            let mut workers = 0;
            for (i, (queued, busy)) in steps.into_iter().enumerate() {
                let busy = busy.min(workers);
                let w = d.desired(&seen(queued, 25.0, workers, busy, i as f64 * 7.0));
                prop_assert!(w <= max);
                prop_assert!(w >= busy);
                workers = w;
            }
        }
    }
}
