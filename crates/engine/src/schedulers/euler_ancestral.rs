//! "Euler a" (diffusers' `EulerAncestralDiscreteScheduler`): an Euler step down to a sigma
//! below the next one, then fresh noise to bring the sample back up to the next sigma.
//! The noise comes from the pipeline's per-image streams, so an image depends only on its
//! seed.

use super::{Sampler, Schedule, SigmaGrid};
use candle_core::{Result, Tensor};

pub struct EulerAncestral {
    schedule: Schedule,
    grid: SigmaGrid,
}

impl EulerAncestral {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let grid = SigmaGrid::new(&schedule, steps);
        EulerAncestral { schedule, grid }
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

impl Sampler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.grid.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.grid.init_noise_sigma()
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
        let (down, up) = ancestral_split(sigma, next);
        let moved = (sample + (derivative * (down - sigma))?)?;
        if up == 0.0 {
            return Ok(moved);
        }
        moved + (noise()? * up)?
    }
}
