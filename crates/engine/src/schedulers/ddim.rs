//! DDIM with eta = 0 (diffusers' `DDIMScheduler`, "leading" timestep spacing).

use super::{Sampler, Schedule};
use crate::config::Prediction;
use candle_core::{Result, Tensor};

pub struct Ddim {
    schedule: Schedule,
    timesteps: Vec<f64>,
    ratio: usize,
}

impl Ddim {
    pub fn new(schedule: Schedule, steps: usize) -> Self {
        let steps = steps.max(1);
        let train = schedule.train_steps();
        let ratio = (train / steps).max(1);
        let timesteps = (0..steps)
            .rev()
            .map(|i| ((i * ratio + schedule.steps_offset).min(train - 1)) as f64)
            .collect();
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

    fn step(
        &mut self,
        output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let t = self.timesteps[i] as usize;
        let acp = &self.schedule.alphas_cumprod;
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
