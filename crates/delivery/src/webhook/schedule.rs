//! When to try a webhook again: the Standard Webhooks (Svix) schedule, jittered so that the
//! retries of many failed deliveries do not arrive at a receiver all at once.

use rand::Rng;
use std::time::Duration;

/// The longest wait a receiver's `Retry-After` can ask for.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);
/// Each delay is drawn from ±20 % around its nominal value.
const JITTER: f64 = 0.2;

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;

/// The delays before each retry; when they are spent the delivery is given up.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySchedule {
    delays: Vec<Duration>,
}

impl RetrySchedule {
    /// 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h: about 27.5 hours from the first failure to the
    /// last attempt.
    pub fn standard() -> RetrySchedule {
        RetrySchedule::new(
            [
                5,
                5 * MINUTE,
                30 * MINUTE,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                10 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        )
    }

    pub fn new(delays: Vec<Duration>) -> RetrySchedule {
        RetrySchedule { delays }
    }

    /// The nominal delays, before jitter.
    pub fn delays(&self) -> &[Duration] {
        &self.delays
    }

    /// How long to wait after `failures` failed attempts (counted from 1): the schedule's
    /// delay with ±20 % jitter, or the receiver's `Retry-After` (at most a day) when that is
    /// longer. `None` when the schedule is spent and the delivery should be given up. With no
    /// failure yet there is nothing to wait for.
    pub fn delay_after(
        &self,
        failures: u32,
        retry_after: Option<Duration>,
        rng: &mut impl Rng,
    ) -> Option<Duration> {
        let Some(index) = failures.checked_sub(1) else {
            return Some(Duration::ZERO);
        };
        let nominal = *self.delays.get(usize::try_from(index).ok()?)?;
        let factor = rng.gen_range(1.0 - JITTER..=1.0 + JITTER);
        let jittered =
            Duration::try_from_secs_f64(nominal.as_secs_f64() * factor).unwrap_or(Duration::MAX);
        let asked = retry_after.map_or(Duration::ZERO, |wait| wait.min(MAX_RETRY_AFTER));
        Some(jittered.max(asked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn the_standard_schedule_spans_about_a_day_and_a_bit() {
        let schedule = RetrySchedule::standard();
        assert_eq!(schedule.delays().len(), 7);
        let total: Duration = schedule.delays().iter().sum();
        assert_eq!(total, Duration::from_secs(27 * HOUR + 35 * MINUTE + 5));
    }

    #[test]
    fn every_delay_stays_within_its_jitter() {
        let schedule = RetrySchedule::standard();
        let mut rng = rng();
        for (failures, nominal) in (1..).zip(schedule.delays().iter().copied()) {
            let (low, high) = (nominal.mul_f64(0.8), nominal.mul_f64(1.2));
            let drawn: Vec<Duration> = (0..500)
                .map(|_| {
                    schedule
                        .delay_after(failures, None, &mut rng)
                        .expect("within the schedule")
                })
                .collect();
            assert!(
                drawn.iter().all(|d| (low..=high).contains(d)),
                "retry {failures}"
            );
            let below = drawn.iter().filter(|d| **d < nominal).count();
            let above = drawn.iter().filter(|d| **d > nominal).count();
            assert!(
                below > 100 && above > 100,
                "retry {failures} is not jittered"
            );
            assert!(drawn.iter().any(|d| *d < nominal.mul_f64(0.85)));
            assert!(drawn.iter().any(|d| *d > nominal.mul_f64(1.15)));
        }
    }

    #[test]
    fn gives_up_when_the_schedule_is_spent() {
        let schedule = RetrySchedule::standard();
        let mut rng = rng();
        assert!(schedule.delay_after(7, None, &mut rng).is_some());
        assert_eq!(schedule.delay_after(8, None, &mut rng), None);
        assert_eq!(schedule.delay_after(u32::MAX, None, &mut rng), None);
        let hour = Some(Duration::from_secs(HOUR));
        assert_eq!(schedule.delay_after(8, hour, &mut rng), None);
        assert_eq!(
            RetrySchedule::new(Vec::new()).delay_after(1, None, &mut rng),
            None
        );
    }

    #[test]
    fn nothing_failed_means_no_wait() {
        let mut rng = rng();
        assert_eq!(
            RetrySchedule::standard().delay_after(0, None, &mut rng),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn a_longer_retry_after_wins_up_to_a_day() {
        let schedule = RetrySchedule::standard();
        let mut rng = rng();
        let hour = Duration::from_secs(HOUR);
        assert_eq!(schedule.delay_after(1, Some(hour), &mut rng), Some(hour));

        let week = Duration::from_secs(7 * 24 * HOUR);
        assert_eq!(
            schedule.delay_after(1, Some(week), &mut rng),
            Some(MAX_RETRY_AFTER)
        );

        let short = Duration::from_secs(1);
        let delay = schedule
            .delay_after(2, Some(short), &mut rng)
            .expect("within the schedule");
        assert!(delay >= Duration::from_secs(4 * MINUTE), "{delay:?}");
    }

    #[test]
    fn a_configured_schedule_is_followed() {
        let schedule = RetrySchedule::new(vec![Duration::from_millis(100), Duration::MAX]);
        let mut rng = rng();
        let first = schedule
            .delay_after(1, None, &mut rng)
            .expect("within the schedule");
        assert!((Duration::from_millis(80)..=Duration::from_millis(120)).contains(&first));
        let huge = schedule
            .delay_after(2, None, &mut rng)
            .expect("within the schedule");
        assert!(huge > Duration::from_secs(u64::MAX / 2), "{huge:?}");
        assert_eq!(schedule.delay_after(3, None, &mut rng), None);
    }
}
