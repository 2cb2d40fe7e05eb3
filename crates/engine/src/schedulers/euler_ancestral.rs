//! Euler with fresh noise at every step ("Euler a"; diffusers'
//! `EulerAncestralDiscreteScheduler`).

use super::{linspace_timesteps, Sampler, Schedule};
use candle_core::{Result, Tensor};

pub struct EulerAncestral {
    schedule: Schedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
}

impl EulerAncestral {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let timesteps = linspace_timesteps(&schedule, steps);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule.sigma_at(t)).collect();
        sigmas.push(0.0);
        EulerAncestral {
            schedule,
            timesteps,
            sigmas,
        }
    }
}

impl Sampler for EulerAncestral {
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
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
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
