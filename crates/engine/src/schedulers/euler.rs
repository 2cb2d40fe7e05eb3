//! Euler's method on the probability-flow ODE (diffusers' `EulerDiscreteScheduler`), and
//! its ancestral variant, "Euler a" (`EulerAncestralDiscreteScheduler`), which steps to a
//! lower sigma and adds fresh noise back at every step.

use super::{LinspaceSigmas, Sampler, Schedule};
use candle_core::{Result, Tensor};

pub struct Euler {
    schedule: Schedule,
    grid: LinspaceSigmas,
    ancestral: bool,
}

impl Euler {
    pub fn new(schedule: Schedule, steps: usize, ancestral: bool) -> Self {
        let grid = LinspaceSigmas::new(&schedule, steps);
        Euler {
            schedule,
            grid,
            ancestral,
        }
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
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.grid.sigmas[i], self.grid.sigmas[i + 1]);
        let denoised = self.schedule.denoised_ve(output, sample, sigma)?;
        let derivative = ((sample - denoised)? / sigma)?;
        let (down, up) = if self.ancestral {
            let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma))
                .max(0.0)
                .sqrt();
            ((next * next - up * up).max(0.0).sqrt(), up)
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
