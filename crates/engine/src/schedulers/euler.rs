//! Euler's method on the probability-flow ODE (diffusers' `EulerDiscreteScheduler`).

use super::{LinspaceSigmas, Sampler, Schedule};
use candle_core::{Result, Tensor};

pub struct Euler {
    schedule: Schedule,
    grid: LinspaceSigmas,
}

impl Euler {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let grid = LinspaceSigmas::new(&schedule, steps);
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
        let denoised = self.schedule.denoised_ve(output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        sample + (derivative * (next - sigma))?
    }
}
