//! Euler's method on the probability-flow ODE (diffusers' `EulerDiscreteScheduler`).

use super::{linspace_timesteps, Sampler, Schedule};
use candle_core::{Result, Tensor};

pub struct Euler {
    schedule: Schedule,
    timesteps: Vec<f64>,
    /// One sigma per timestep, then 0.
    sigmas: Vec<f64>,
}

impl Euler {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let timesteps = linspace_timesteps(&schedule, steps);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule.sigma_at(t)).collect();
        sigmas.push(0.0);
        Euler {
            schedule,
            timesteps,
            sigmas,
        }
    }
}

impl Sampler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        (self.sigmas[0] * self.sigmas[0] + 1.0).sqrt()
    }

    fn scale_model_input(&self, sample: Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        sample / (sigma * sigma + 1.0).sqrt()
    }

    fn step(
        &mut self,
        output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let denoised = self.schedule.denoised_ve(output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        sample + (derivative * (next - sigma))?
    }
}
