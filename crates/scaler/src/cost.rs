//! What a job costs a GPU, in units the scaler can add up: one unit is one denoising step of
//! one SD 1.5 image at 512×512 ([`job_cost`]; the queue stores each job's cost with it).
//!
//! How many units a worker gets through a second is measured, not assumed ([`Rate`]): it
//! depends on the GPU, the batch sizes and the engine.

use std::collections::VecDeque;

pub use sparkle_core::{job_cost, model_factor};

/// A measured rate — units a worker gets through per second, or seconds a worker takes to
/// become ready — as the mean of the last few observations, with a prior until there are any.
#[derive(Debug, Clone)]
pub struct Rate {
    prior: f64,
    recent: VecDeque<f64>,
    keep: usize,
}

impl Rate {
    pub fn new(prior: f64, keep: usize) -> Rate {
        Rate {
            prior,
            recent: VecDeque::with_capacity(keep),
            keep: keep.max(1),
        }
    }

    /// Records one observation; ignored unless finite and positive.
    pub fn observe(&mut self, value: f64) {
        if !(value.is_finite() && value > 0.0) {
            return;
        }
        if self.recent.len() == self.keep {
            self.recent.pop_front();
        }
        self.recent.push_back(value);
    }

    pub fn value(&self) -> f64 {
        if self.recent.is_empty() {
            self.prior
        } else {
            self.recent.iter().sum::<f64>() / self.recent.len() as f64
        }
    }

    pub fn observed(&self) -> usize {
        self.recent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_grows_with_steps_pixels_and_images() {
        let one = job_cost("sd15", 512, 512, 25, 1);
        assert_eq!(one, 25.0);
        assert_eq!(job_cost("sd15", 1024, 1024, 25, 1), 100.0);
        assert_eq!(job_cost("sd15", 512, 512, 25, 4), 100.0);
        assert!(job_cost("sdxl-base", 1024, 1024, 20, 1) < job_cost("sd15", 1024, 1024, 20, 1));
    }

    #[test]
    fn a_rate_is_its_prior_until_observed_then_the_recent_mean() {
        let mut rate = Rate::new(10.0, 3);
        assert_eq!(rate.value(), 10.0);
        rate.observe(f64::NAN);
        rate.observe(-1.0);
        assert_eq!(rate.observed(), 0);
        for v in [1.0, 2.0, 3.0, 4.0] {
            rate.observe(v);
        }
        assert_eq!(rate.value(), 3.0, "the last three");
    }
}
