//! DDIM with eta = 0 (diffusers' `DDIMScheduler`): predict the clean sample, then re-noise
//! it deterministically to the previous timestep's level. "leading" timestep spacing plus
//! `steps_offset` unless the configuration names another spacing.

use super::{Sampler, Schedule};
use crate::config::{Prediction, Spacing};
use candle_core::{Result, Tensor};

pub struct Ddim {
    schedule: Schedule,
    timesteps: Vec<f64>,
    /// How far back the previous timestep is; diffusers uses `train // steps` whatever the
    /// spacing.
    ratio: usize,
}

impl Ddim {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let spacing = schedule.spacing.unwrap_or(Spacing::Leading);
        let timesteps = schedule
            .timesteps(spacing, steps)
            .into_iter()
            .map(f64::round)
            .collect();
        let ratio = (schedule.train_steps() / steps).max(1);
        Ddim {
            schedule,
            timesteps,
            ratio,
        }
    }
}

impl Sampler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        let acp = &self.schedule.alphas_cumprod;
        let alpha = acp[(self.timesteps[i] as usize).min(acp.len() - 1)];
        (x0 * alpha.sqrt())? + (noise * (1.0 - alpha).sqrt())?
    }

    fn step(
        &mut self,
        output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let acp = &self.schedule.alphas_cumprod;
        let t = (self.timesteps[i] as usize).min(acp.len() - 1);
        let alpha = acp[t];
        let alpha_prev = match t.checked_sub(self.ratio) {
            Some(prev) => acp[prev],
            None if self.schedule.set_alpha_to_one => 1.0,
            None => acp[0],
        };
        let (x0, eps) = match self.schedule.prediction {
            Prediction::Epsilon => {
                let x0 = ((sample - (output * (1.0 - alpha).sqrt())?)? / alpha.sqrt())?;
                (x0, output.clone())
            }
            Prediction::VPrediction => {
                let x0 = ((sample * alpha.sqrt())? - (output * (1.0 - alpha).sqrt())?)?;
                let eps = ((output * alpha.sqrt())? + (sample * (1.0 - alpha).sqrt())?)?;
                (x0, eps)
            }
        };
        (x0 * alpha_prev.sqrt())? + (eps * (1.0 - alpha_prev).sqrt())?
    }
}
