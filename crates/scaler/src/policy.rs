use sparkle_queue::QueueStats;
use std::time::Duration;

/// How the backlog becomes a worker count.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Workers kept even when idle (0 allows scale to zero).
    pub min_workers: u32,
    /// Never more than this (the number of GPUs on a machine, or a budget).
    pub max_workers: u32,
    /// Queued plus running jobs one worker is expected to absorb.
    pub jobs_per_worker: u32,
    /// How long the queue must stay empty before idle workers are stopped.
    pub idle_grace: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            min_workers: 0,
            max_workers: 1,
            jobs_per_worker: 4,
            idle_grace: Duration::from_secs(300),
        }
    }
}

impl Policy {
    /// The worker count for this backlog. Work waiting always gets at least one worker
    /// (scale from zero); an idle queue keeps the current workers until `idle_grace` has
    /// passed, so a pause between requests does not pay a cold start.
    pub fn desired_workers(&self, stats: &QueueStats, current: u32, idle_for: Duration) -> u32 {
        let max = self.max_workers.max(self.min_workers);
        let demand = stats.queued + stats.running;
        let wanted = if demand == 0 {
            if idle_for >= self.idle_grace {
                self.min_workers
            } else {
                current
            }
        } else {
            let per = u64::from(self.jobs_per_worker.max(1));
            // Never stop a worker that may be running a job.
            let needed = demand
                .div_ceil(per)
                .max(stats.running.min(u64::from(current)));
            u32::try_from(needed).unwrap_or(u32::MAX).max(1)
        };
        wanted.clamp(self.min_workers, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(queued: u64, running: u64) -> QueueStats {
        QueueStats {
            queued,
            running,
            ..Default::default()
        }
    }

    #[test]
    fn backlog_becomes_workers_within_bounds() {
        let p = Policy {
            min_workers: 0,
            max_workers: 4,
            jobs_per_worker: 2,
            idle_grace: Duration::from_secs(60),
        };
        let busy = Duration::ZERO;
        assert_eq!(
            p.desired_workers(&stats(1, 0), 0, busy),
            1,
            "scale from zero"
        );
        assert_eq!(p.desired_workers(&stats(5, 0), 1, busy), 3);
        assert_eq!(p.desired_workers(&stats(100, 0), 1, busy), 4, "capped");
        assert_eq!(
            p.desired_workers(&stats(0, 3), 3, busy),
            3,
            "busy workers are kept"
        );
        assert_eq!(
            p.desired_workers(&stats(0, 0), 2, Duration::from_secs(59)),
            2,
            "grace"
        );
        assert_eq!(
            p.desired_workers(&stats(0, 0), 2, Duration::from_secs(60)),
            0,
            "scale to zero"
        );
        let floor = Policy {
            min_workers: 1,
            ..p
        };
        assert_eq!(
            floor.desired_workers(&stats(0, 0), 0, Duration::from_secs(600)),
            1
        );
    }
}
