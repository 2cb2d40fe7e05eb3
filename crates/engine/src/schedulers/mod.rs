//! Samplers (diffusers calls them schedulers), one file each, following diffusers' math so
//! that the same noise gives the same image. All are deterministic: the ancestral sampler
//! draws its fresh noise through a callback that the pipeline seeds per image.
//!
//! Two spaces appear. DDIM and DPM++ keep the sample in the variance-preserving space the
//! UNet was trained in (`x = √ᾱ·x0 + √(1-ᾱ)·ε`). The Euler samplers keep it in Karras'
//! variance-exploding space (`x = x0 + σ·ε`, with `σ = √((1-ᾱ)/ᾱ)`) and scale it back by
//! `1/√(σ²+1)` before the UNet sees it.

mod ddim;
mod dpmpp_2m;
mod euler;

use crate::config::{Prediction, ScheduleConfig, Spacing};
use candle_core::{Result, Tensor};
use sparkle_core::Scheduler;

/// One denoising loop's schedule and update rule.
pub trait Sampler {
    /// The timesteps the UNet sees, in order.
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the latents before they enter the UNet at step `i`.
    fn scale_model_input(&self, sample: Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample)
    }
    /// A clean sample `x0` noised to the level step `i` starts from, in the space this
    /// sampler keeps its sample in: where image-to-image begins, and what inpainting blends
    /// the kept area back in as.
    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor>;
    /// One update from step `i` to `i + 1`. `noise` gives fresh standard normal noise shaped
    /// like the sample; only ancestral samplers call it.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor>;
}

/// A fresh sampler of `kind` for a loop of `steps` steps (at least 1).
pub fn sampler(kind: Scheduler, config: &ScheduleConfig, steps: usize) -> Box<dyn Sampler> {
    let schedule = Schedule::new(config);
    let steps = steps.max(1);
    match kind {
        Scheduler::Euler => Box::new(euler::Euler::new(schedule, steps, false)),
        Scheduler::EulerA => Box::new(euler::Euler::new(schedule, steps, true)),
        Scheduler::Ddim => Box::new(ddim::Ddim::new(schedule, steps)),
        Scheduler::DpmPp2mKarras => Box::new(dpmpp_2m::DpmPp2m::new(schedule, steps)),
    }
}

/// The training noise schedule: cumulative alphas and Karras sigmas per training timestep.
pub(crate) struct Schedule {
    pub alphas_cumprod: Vec<f64>,
    /// `σ_t = √((1 - ᾱ_t) / ᾱ_t)`, increasing with `t`.
    pub sigmas: Vec<f64>,
    pub prediction: Prediction,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
    pub spacing: Option<Spacing>,
}

impl Schedule {
    pub fn new(c: &ScheduleConfig) -> Self {
        let n = c.num_train_timesteps.max(2);
        let betas: Vec<f64> = if c.scaled_linear {
            linspace(c.beta_start.sqrt(), c.beta_end.sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        } else {
            linspace(c.beta_start, c.beta_end, n)
        };
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .scan(1.0, |product, beta| {
                *product *= 1.0 - beta;
                Some(*product)
            })
            .collect();
        let sigmas = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        Schedule {
            alphas_cumprod,
            sigmas,
            prediction: c.prediction,
            steps_offset: c.steps_offset,
            set_alpha_to_one: c.set_alpha_to_one,
            spacing: c.timestep_spacing,
        }
    }

    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `steps` timesteps from noisy to clean, spread as diffusers' `timestep_spacing` says.
    pub fn timesteps(&self, spacing: Spacing, steps: usize) -> Vec<f64> {
        let train = self.train_steps();
        let last = (train - 1) as f64;
        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => linspace(0.0, last, steps),
            Spacing::Leading => {
                let ratio = (train / steps).max(1);
                (0..steps)
                    .map(|i| ((i * ratio + self.steps_offset) as f64).min(last))
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                (0..steps)
                    .rev()
                    .map(|i| ((train as f64 - i as f64 * ratio).round() - 1.0).clamp(0.0, last))
                    .collect()
            }
        };
        timesteps.reverse();
        timesteps
    }

    /// The sigma at a fractional timestep, by linear interpolation (numpy's `interp`).
    pub fn sigma_at(&self, t: f64) -> f64 {
        let last = self.sigmas.len() - 1;
        let t = t.clamp(0.0, last as f64);
        let lo = t.floor() as usize;
        let hi = (lo + 1).min(last);
        self.sigmas[lo] + (self.sigmas[hi] - self.sigmas[lo]) * (t - lo as f64)
    }

    /// The fractional timestep of a sigma, interpolating in log-sigma (diffusers'
    /// `_sigma_to_t`).
    pub fn timestep_of(&self, sigma: f64) -> f64 {
        let target = sigma.max(1e-10).ln();
        let logs: Vec<f64> = self.sigmas.iter().map(|s| s.ln()).collect();
        let lo = logs
            .iter()
            .rposition(|&l| l <= target)
            .unwrap_or(0)
            .min(logs.len() - 2);
        let w = ((logs[lo] - target) / (logs[lo] - logs[lo + 1])).clamp(0.0, 1.0);
        lo as f64 + w
    }

    /// The denoised estimate `x0` from a model output at `sigma`, for a sample in
    /// variance-exploding space.
    pub fn denoised(&self, output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => sample - (output * sigma)?,
            Prediction::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (output * (-sigma / s2.sqrt()))? + (sample / s2)?
            }
        }
    }
}

/// The timesteps and sigmas the Euler samplers walk: diffusers' "linspace" spacing unless
/// the configuration names another, each timestep's sigma, then a final sigma of 0.
pub(crate) struct SigmaGrid {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
    spacing: Spacing,
}

impl SigmaGrid {
    pub fn new(schedule: &Schedule, steps: usize) -> Self {
        let spacing = schedule.spacing.unwrap_or(Spacing::Linspace);
        let timesteps = schedule.timesteps(spacing, steps);
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule.sigma_at(t)).collect();
        sigmas.push(0.0);
        SigmaGrid {
            timesteps,
            sigmas,
            spacing,
        }
    }

    /// As diffusers: the largest sigma for "linspace" and "trailing" (k-diffusion's
    /// convention), `√(σ²+1)` for "leading".
    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0, f64::max);
        match self.spacing {
            Spacing::Linspace | Spacing::Trailing => max,
            Spacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    pub fn scale_model_input(&self, sample: Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        sample / (sigma * sigma + 1.0).sqrt()
    }
}

pub(crate) fn linspace(start: f64, end: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![start];
    }
    (0..n)
        .map(|i| start + (end - start) * i as f64 / (n - 1) as f64)
        .collect()
}

#[cfg(test)]
mod tests;
