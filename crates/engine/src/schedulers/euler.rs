//! Euler's method on the probability-flow ODE (diffusers' `EulerDiscreteScheduler` with
//! `s_churn = 0`): follow the derivative `(x - x0) / σ` from one sigma to the next.
//!
//! Its ancestral variant, "Euler a" (`EulerAncestralDiscreteScheduler`), steps down to a
//! sigma below the next one and adds fresh noise to come back up to it. The noise comes from
//! the pipeline's per-image streams, so an image depends only on its seed.

use super::{Sampler, Schedule, SigmaGrid};
use candle_core::{Result, Tensor};

pub struct Euler {
    schedule: Schedule,
    grid: SigmaGrid,
    ancestral: bool,
}

impl Euler {
    pub fn new(schedule: Schedule, steps: usize, ancestral: bool) -> Self {
        let grid = SigmaGrid::new(&schedule, steps);
        Euler {
            schedule,
            grid,
            ancestral,
        }
    }
}

/// Splits the step from `sigma` to `next` into a deterministic part down to `σ_down` and
/// fresh noise of `σ_up`, with `σ_down² + σ_up² = next²`.
pub(crate) fn ancestral_split(sigma: f64, next: f64) -> (f64, f64) {
    let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma))
        .max(0.0)
        .sqrt();
    let down = (next * next - up * up).max(0.0).sqrt();
    (down, up)
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.grid.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.grid.init_noise_sigma()
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        x0 + (noise * self.grid.sigmas[i])?
    }

    fn scale_model_input(&self, sample: Tensor, i: usize) -> Result<Tensor> {
        self.grid.scale_model_input(sample, i)
    }

    fn step(
        &mut self,
        output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.grid.sigmas[i], self.grid.sigmas[i + 1]);
        let denoised = self.schedule.denoised(output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        let (down, up) = if self.ancestral {
            ancestral_split(sigma, next)
        } else {
            (next, 0.0)
        };
        let moved = (sample + (derivative * (down - sigma))?)?;
        if up == 0.0 {
            return Ok(moved);
        }
        moved + (noise()? * up)?
    }
}
