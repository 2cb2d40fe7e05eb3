//! The reference deployment's scaling policy, as its source has it, for the simulator to
//! compare against: a metric of ceil((visible + in-flight) / 4) desired tasks, refreshed every
//! 10 s; CloudWatch alarms of 10-s periods that must see 15 points in a row above the
//! running tasks (150 s) to add one instance and one task, then a 600-s cooldown, and 150
//! points in a row below (25 minutes) to remove one; a start from zero through a Step
//! Function that waits 55 s before it asks for the first instance; at most 2 GPUs.

use crate::policy::{Observation, ScalingPolicy};

/// The reference's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferencePolicy {
    pub jobs_per_task: u64,
    /// Seconds between metric points (and alarm evaluations).
    pub period_secs: f64,
    pub points_to_add: u32,
    pub points_to_remove: u32,
    pub cooldown_secs: f64,
    /// The Step Function's wait before the first instance, from zero.
    pub from_zero_wait_secs: f64,
    pub max_workers: u32,
    state: State,
}

#[derive(Debug, Clone, PartialEq, Default)]
struct State {
    next_point: f64,
    above: u32,
    below: u32,
    last_added: Option<f64>,
    /// When the Step Function started waiting to start the first instance.
    from_zero_since: Option<f64>,
    desired: u32,
}

impl Default for ReferencePolicy {
    fn default() -> Self {
        ReferencePolicy {
            jobs_per_task: 4,
            period_secs: 10.0,
            points_to_add: 15,
            points_to_remove: 150,
            cooldown_secs: 600.0,
            from_zero_wait_secs: 55.0,
            max_workers: 2,
            state: State::default(),
        }
    }
}

impl ScalingPolicy for ReferencePolicy {
    fn desired(&mut self, seen: &Observation) -> u32 {
        let s = &mut self.state;
        let demand = seen.queued + seen.running;
        // From zero: the Step Function waits, then asks for one instance.
        if s.desired == 0 {
            if demand == 0 {
                s.from_zero_since = None;
                return 0;
            }
            let since = *s.from_zero_since.get_or_insert(seen.now);
            if seen.now - since >= self.from_zero_wait_secs {
                s.from_zero_since = None;
                s.desired = 1;
                s.last_added = Some(seen.now);
                s.above = 0;
                s.below = 0;
                s.next_point = seen.now + self.period_secs;
            }
            return s.desired;
        }
        // One metric point (and alarm evaluation) per period.
        if seen.now < s.next_point {
            return s.desired;
        }
        s.next_point = seen.now + self.period_secs;
        let metric = demand.div_ceil(self.jobs_per_task.max(1));
        let tasks = u64::from(s.desired);
        if metric > tasks {
            s.above += 1;
            s.below = 0;
        } else if metric < tasks {
            s.below += 1;
            s.above = 0;
        } else {
            s.above = 0;
            s.below = 0;
        }
        let cooled = s
            .last_added
            .is_none_or(|at| seen.now - at >= self.cooldown_secs);
        if s.above >= self.points_to_add && cooled && s.desired < self.max_workers {
            s.desired += 1;
            s.last_added = Some(seen.now);
            s.above = 0;
        } else if s.below >= self.points_to_remove {
            s.desired -= 1;
            s.below = 0;
        }
        s.desired
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(now: f64, queued: u64) -> Observation {
        Observation {
            now,
            queued,
            ..Observation::default()
        }
    }

    #[test]
    fn from_zero_it_waits_55_s_then_adds_one_per_150_s_of_alarm_and_600_s_of_cooldown() {
        let mut p = ReferencePolicy::default();
        let mut first = None;
        let mut second = None;
        let mut t = 0.0;
        while t < 2000.0 {
            let d = p.desired(&at(t, 100));
            if d >= 1 && first.is_none() {
                first = Some(t);
            }
            if d >= 2 && second.is_none() {
                second = Some(t);
            }
            assert!(d <= 2, "at most two GPUs");
            t += 1.0;
        }
        assert_eq!(first, Some(55.0));
        // The alarm needs 15 points after the first start, and the cooldown runs 600 s.
        assert_eq!(second, Some(655.0));
    }

    #[test]
    fn a_task_is_removed_only_after_150_points_below() {
        let mut p = ReferencePolicy::default();
        let mut t = 0.0;
        while p.desired(&at(t, 1)) == 0 {
            t += 1.0;
        }
        let empty_from = t;
        while p.desired(&at(t, 0)) == 1 {
            t += 1.0;
            assert!(t < 10_000.0);
        }
        assert!(
            (t - empty_from - 1500.0).abs() <= 10.0,
            "{}",
            t - empty_from
        );
    }
}
