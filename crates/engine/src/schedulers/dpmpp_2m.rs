//! DPM-Solver++ (2M) with Karras sigmas (diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type="dpmsolver++"`, `solver_order=2`, `use_karras_sigmas=True` and its
//! default `final_sigmas_type="zero"`): second order from the previous denoised estimate,
//! first order on the first step and on the last, which lands on the estimate itself.

use super::{linspace, Sampler, Schedule};
use candle_core::{Result, Tensor};

/// Karras et al.'s schedule exponent.
const RHO: f64 = 7.0;

pub struct DpmPp2m {
    schedule: Schedule,
    timesteps: Vec<f64>,
    /// Karras sigmas, one per step, then 0.
    sigmas: Vec<f64>,
    previous: Option<Tensor>,
}

/// `steps` sigmas from `max` to `min`, evenly spaced in `σ^(1/ρ)`.
pub(crate) fn karras_sigmas(min: f64, max: f64, steps: usize) -> Vec<f64> {
    let (min_inv, max_inv) = (min.powf(1.0 / RHO), max.powf(1.0 / RHO));
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(RHO))
        .collect()
}

impl DpmPp2m {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let min = schedule.sigmas[0];
        let max = schedule.sigmas[schedule.sigmas.len() - 1];
        let mut sigmas = karras_sigmas(min, max, steps);
        // diffusers rounds these timesteps to whole numbers before the UNet sees them.
        let timesteps = sigmas
            .iter()
            .map(|&s| schedule.timestep_of(s).round())
            .collect();
        sigmas.push(0.0);
        DpmPp2m {
            schedule,
            timesteps,
            sigmas,
            previous: None,
        }
    }

    /// `(α_t, σ_t, λ_t)` in variance-preserving terms for a Karras sigma.
    fn vp(sigma: f64) -> (f64, f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        let s = sigma * alpha;
        (alpha, s, alpha.ln() - s.ln())
    }
}

impl Sampler for DpmPp2m {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha, sigma, _) = Self::vp(self.sigmas[i]);
        (x0 * alpha)? + (noise * sigma)?
    }

    fn step(
        &mut self,
        output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let (sigma, next) = (self.sigmas[i], self.sigmas[i + 1]);
        let (alpha_s, sigma_s, lambda_s) = Self::vp(sigma);
        // The sample lives in variance-preserving space; the denoiser works in sigma space.
        let denoised = self
            .schedule
            .denoised(output, &(sample / alpha_s)?, sigma)?;
        let previous = self.previous.replace(denoised.clone());
        if next == 0.0 {
            return Ok(denoised);
        }
        let (alpha_t, sigma_t, lambda_t) = Self::vp(next);
        let h = lambda_t - lambda_s;
        let decay = (-h).exp() - 1.0;
        let d = match previous {
            Some(prev) if i > 0 => {
                let (_, _, lambda_prev) = Self::vp(self.sigmas[i - 1]);
                let r = (lambda_s - lambda_prev) / h;
                let d1 = ((&denoised - prev)? / r)?;
                (denoised + (d1 * 0.5)?)?
            }
            _ => denoised,
        };
        (sample * (sigma_t / sigma_s))? - (d * (alpha_t * decay))?
    }
}
