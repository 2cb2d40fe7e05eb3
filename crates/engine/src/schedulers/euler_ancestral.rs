//! Euler with fresh noise at every step ("Euler a"; diffusers'
//! `EulerAncestralDiscreteScheduler`).

use super::{LinspaceSigmas, Sampler, Schedule};
use candle_core::{Result, Tensor};

pub struct EulerAncestral {
    schedule: Schedule,
    grid: LinspaceSigmas,
}

impl EulerAncestral {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let grid = LinspaceSigmas::new(&schedule, steps);
        EulerAncestral { schedule, grid }
    }
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
        let denoised = self.schedule.denoised_ve(output, sample, sigma)?;
        let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma))
            .max(0.0)
            .sqrt();
        let down = (next * next - up * up).max(0.0).sqrt();
        let derivative = ((sample - denoised)? / sigma)?;
        let moved = (sample + (derivative * (down - sigma))?)?;
        if up == 0.0 {
            return Ok(moved);
        }
        moved + (noise()? * up)?
    }
}
