//! Euler's method on the probability-flow ODE (diffusers' `EulerDiscreteScheduler` with
//! `s_churn = 0`): follow the derivative `(x - x0) / σ` from one sigma to the next.

use super::{Sampler, Schedule, SigmaGrid};
use candle_core::{Result, Tensor};

pub struct Euler {
    schedule: Schedule,
    grid: SigmaGrid,
}

impl Euler {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let grid = SigmaGrid::new(&schedule, steps);
        Euler { schedule, grid }
    }
}

impl Sampler for Euler {
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
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.grid.sigmas[i], self.grid.sigmas[i + 1]);
        let denoised = self.schedule.denoised(output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        sample + (derivative * (next - sigma))?
    }
}
