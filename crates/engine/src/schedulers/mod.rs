//! Samplers (diffusers calls them schedulers), one file each, following diffusers' math so
//! that the same noise gives the same image. All are deterministic: the ancestral sampler
//! draws its fresh noise through a callback the pipeline seeds per image.

mod ddim;
mod dpmpp_2m;
mod euler;

use crate::config::{Prediction, ScheduleConfig};
use candle_core::{Result, Tensor};
use sparkle_core::Scheduler;

/// One denoising loop's schedule and update rule.
pub trait Sampler {
    /// The timesteps the UNet sees, in order.
    fn timesteps(&self) -> &[f64];
    /// The scale of the initial noise.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the latents before they enter the UNet at step `i`.
    fn scale_model_input(&self, sample: Tensor, _i: usize) -> Result<Tensor> {
        Ok(sample)
    }
    /// One update from step `i` to `i + 1`. `noise` gives fresh standard normal noise shaped
    /// like the sample, for ancestral samplers.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor>;
}

pub fn sampler(kind: Scheduler, config: &ScheduleConfig, steps: usize) -> Box<dyn Sampler> {
    let schedule = Schedule::new(config);
    match kind {
        Scheduler::Euler => Box::new(euler::Euler::new(schedule, steps, false)),
        Scheduler::EulerA => Box::new(euler::Euler::new(schedule, steps, true)),
        Scheduler::Ddim => Box::new(ddim::Ddim::new(schedule, steps)),
        Scheduler::DpmPp2mKarras => Box::new(dpmpp_2m::DpmPp2m::new(schedule, steps)),
    }
}

/// The training noise schedule: cumulative alphas per training timestep.
pub(crate) struct Schedule {
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
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
        let mut product = 1.0;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                product *= 1.0 - b;
                product
            })
            .collect();
        Schedule {
            alphas_cumprod,
            prediction: c.prediction,
            steps_offset: c.steps_offset,
            set_alpha_to_one: c.set_alpha_to_one,
        }
    }

    pub fn train_steps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// Karras' sigma per training timestep: sqrt((1 - ᾱ) / ᾱ).
    pub fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// The sigma at a fractional timestep, by linear interpolation (as diffusers does).
    pub fn sigma_at(&self, t: f64) -> f64 {
        interpolate(&self.train_sigmas(), t)
    }

    /// The fractional timestep of a sigma, interpolating in log-sigma.
    pub fn timestep_of(&self, sigma: f64) -> f64 {
        let logs: Vec<f64> = self.train_sigmas().iter().map(|s| s.ln()).collect();
        let target = sigma.max(1e-10).ln();
        match logs.iter().position(|&l| l >= target) {
            None => (logs.len() - 1) as f64,
            Some(0) => 0.0,
            Some(hi) => {
                let lo = hi - 1;
                let w = (target - logs[lo]) / (logs[hi] - logs[lo]);
                lo as f64 + w.clamp(0.0, 1.0)
            }
        }
    }

    /// The denoised estimate `x0` from a model output in sigma (variance-exploding) space.
    pub fn denoised_ve(&self, output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => sample - (output * sigma)?,
            Prediction::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (output * (-sigma / s2.sqrt()))? + (sample / s2)?
            }
        }
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

/// `values` sampled at fractional index `x`.
fn interpolate(values: &[f64], x: f64) -> f64 {
    let last = values.len().saturating_sub(1);
    let x = x.clamp(0.0, last as f64);
    let lo = x.floor() as usize;
    let hi = (lo + 1).min(last);
    values[lo] + (values[hi] - values[lo]) * (x - lo as f64)
}

/// The timesteps and sigmas of the Euler samplers: diffusers' "linspace" spacing, `steps`
/// timesteps from the last training step to 0, each with its sigma, then a final sigma of 0.
/// The sample lives in sigma (variance-exploding) space, scaled down before the UNet.
pub(crate) struct LinspaceSigmas {
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f64>,
}

impl LinspaceSigmas {
    pub fn new(schedule: &Schedule, steps: usize) -> Self {
        let mut timesteps = linspace(0.0, (schedule.train_steps() - 1) as f64, steps.max(1));
        timesteps.reverse();
        let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| schedule.sigma_at(t)).collect();
        sigmas.push(0.0);
        LinspaceSigmas { timesteps, sigmas }
    }

    pub fn init_noise_sigma(&self) -> f64 {
        (self.sigmas[0] * self.sigmas[0] + 1.0).sqrt()
    }

    pub fn scale_model_input(&self, sample: Tensor, i: usize) -> Result<Tensor> {
        let sigma = self.sigmas[i];
        sample / (sigma * sigma + 1.0).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config(prediction: Prediction) -> ScheduleConfig {
        ScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            scaled_linear: true,
            prediction,
            steps_offset: 1,
            set_alpha_to_one: false,
        }
    }

    #[test]
    fn every_sampler_has_the_requested_number_of_decreasing_timesteps() {
        for kind in Scheduler::ALL {
            for steps in [1, 4, 20] {
                let s = sampler(kind, &config(Prediction::Epsilon), steps);
                let t = s.timesteps();
                assert_eq!(t.len(), steps, "{kind}");
                assert!(t.windows(2).all(|w| w[0] > w[1]), "{kind}: {t:?}");
                assert!(
                    t.iter().all(|&x| (0.0..1000.0).contains(&x)),
                    "{kind}: {t:?}"
                );
            }
        }
    }

    #[test]
    fn a_perfect_noise_predictor_recovers_the_clean_sample() {
        // x_T = x0 + sigma_T * eps, with the model always predicting eps: every sampler's
        // deterministic path must land on x0 (DDIM on its final alpha, ᾱ_0, by design).
        let device = Device::Cpu;
        let x0 = Tensor::new(&[0.5f32, -0.25, 1.0, 0.0], &device).expect("x0");
        let eps = Tensor::new(&[1.0f32, -1.0, 0.5, 2.0], &device).expect("eps");
        for kind in [Scheduler::Euler, Scheduler::Ddim, Scheduler::DpmPp2mKarras] {
            let schedule = Schedule::new(&config(Prediction::Epsilon));
            let mut s = sampler(kind, &config(Prediction::Epsilon), 10);
            let t0 = s.timesteps()[0];
            let mut x = if kind == Scheduler::Euler {
                (&x0 + (&eps * schedule.sigma_at(t0)).expect("mul")).expect("add")
            } else {
                let a = schedule.alphas_cumprod[t0.round() as usize];
                ((&x0 * a.sqrt()).expect("mul") + (&eps * (1.0 - a).sqrt()).expect("mul"))
                    .expect("add")
            };
            for i in 0..s.timesteps().len() {
                let mut no_noise = || Tensor::zeros(4, candle_core::DType::F32, &device);
                x = s.step(&eps, i, &x, &mut no_noise).expect("step");
            }
            let expected = if kind == Scheduler::Ddim {
                let a = schedule.alphas_cumprod[0];
                ((&x0 * a.sqrt()).expect("mul") + (&eps * (1.0 - a).sqrt()).expect("mul"))
                    .expect("add")
            } else {
                x0.clone()
            };
            let diff: Vec<f32> = (&x - &expected)
                .expect("sub")
                .abs()
                .expect("abs")
                .to_vec1()
                .expect("vec");
            assert!(diff.iter().all(|d| *d < 1e-3), "{kind}: {diff:?}");
        }
    }
}
