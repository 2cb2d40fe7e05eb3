use super::dpmpp_2m::karras_sigmas;
use super::euler::ancestral_split;
use super::*;
use candle_core::{DType, Device};

/// Stable Diffusion 1.5's `scheduler_config.json`.
fn config(prediction: Prediction, spacing: Option<Spacing>) -> ScheduleConfig {
    ScheduleConfig {
        num_train_timesteps: 1000,
        beta_start: 0.00085,
        beta_end: 0.012,
        scaled_linear: true,
        prediction,
        steps_offset: 1,
        set_alpha_to_one: false,
        timestep_spacing: spacing,
    }
}

fn sd15() -> ScheduleConfig {
    config(Prediction::Epsilon, None)
}

fn close(a: f64, b: f64, tolerance: f64) -> bool {
    (a - b).abs() <= tolerance
}

#[test]
fn every_sampler_has_the_requested_number_of_decreasing_timesteps() {
    let spacings = [
        None,
        Some(Spacing::Linspace),
        Some(Spacing::Leading),
        Some(Spacing::Trailing),
    ];
    for kind in Scheduler::ALL {
        for spacing in spacings {
            for steps in [1, 2, 4, 20, 50] {
                let s = sampler(kind, &config(Prediction::Epsilon, spacing), steps);
                let t = s.timesteps();
                assert_eq!(t.len(), steps, "{kind} {spacing:?}");
                // DPM++ rounds its Karras timesteps, as diffusers does; near t = 0 two may
                // round alike (their sigmas still differ).
                let decreasing = |w: &[f64]| match kind {
                    Scheduler::DpmPp2mKarras => w[0] >= w[1],
                    _ => w[0] > w[1],
                };
                assert!(t.windows(2).all(decreasing), "{kind}: {t:?}");
                assert!(
                    t.iter().all(|&x| (0.0..1000.0).contains(&x)),
                    "{kind}: {t:?}"
                );
            }
        }
    }
}

#[test]
fn timesteps_match_diffusers_spacings() {
    let schedule = Schedule::new(&sd15());
    assert_eq!(
        schedule.timesteps(Spacing::Linspace, 4),
        [999.0, 666.0, 333.0, 0.0]
    );
    assert_eq!(
        schedule.timesteps(Spacing::Trailing, 4),
        [999.0, 749.0, 499.0, 249.0]
    );
    let leading = schedule.timesteps(Spacing::Leading, 50);
    assert_eq!((leading[0], leading[49]), (981.0, 1.0));
    // DDIM defaults to "leading", the Euler samplers to "linspace".
    assert_eq!(sampler(Scheduler::Ddim, &sd15(), 50).timesteps(), leading);
    assert_eq!(
        sampler(Scheduler::Euler, &sd15(), 4).timesteps(),
        [999.0, 666.0, 333.0, 0.0]
    );
}

#[test]
fn euler_sigmas_fall_to_zero_and_start_at_sd15s_largest_sigma() {
    let schedule = Schedule::new(&sd15());
    let grid = SigmaGrid::new(&schedule, 20);
    assert_eq!(grid.sigmas.len(), 21);
    assert!(grid.sigmas.windows(2).all(|w| w[0] > w[1]));
    assert_eq!(grid.sigmas[20], 0.0);
    // diffusers reports init_noise_sigma = 14.6146 for Stable Diffusion 1.5.
    assert!(close(grid.init_noise_sigma(), 14.6146, 1e-3));
    let leading = Schedule::new(&config(Prediction::Epsilon, Some(Spacing::Leading)));
    let grid = SigmaGrid::new(&leading, 20);
    let max = grid.sigmas[0];
    assert!(close(
        grid.init_noise_sigma(),
        (max * max + 1.0).sqrt(),
        1e-12
    ));
}

#[test]
fn karras_sigmas_span_the_training_range() {
    let schedule = Schedule::new(&sd15());
    let (min, max) = (schedule.sigmas[0], schedule.sigmas[999]);
    let sigmas = karras_sigmas(min, max, 20);
    assert!(close(sigmas[0], max, 1e-9) && close(sigmas[19], min, 1e-9));
    assert!(sigmas.windows(2).all(|w| w[0] > w[1]));
    let dpm = sampler(Scheduler::DpmPp2mKarras, &sd15(), 20);
    let t = dpm.timesteps();
    assert_eq!((t[0], t[19]), (999.0, 0.0));
    assert!(t.iter().all(|x| x.fract() == 0.0), "{t:?}");
    // The timestep of a training sigma is that training step.
    assert!(close(
        schedule.timestep_of(schedule.sigmas[500]),
        500.0,
        1e-9
    ));
    assert!(close(schedule.sigma_at(500.0), schedule.sigmas[500], 1e-12));
}

#[test]
fn ancestral_steps_keep_the_variance_of_the_next_sigma() {
    for (sigma, next) in [(14.6, 7.0), (1.0, 0.5), (0.3, 0.0)] {
        let (down, up) = ancestral_split(sigma, next);
        assert!(close(down * down + up * up, next * next, 1e-12));
        assert!(down <= next);
    }
    assert_eq!(ancestral_split(0.3, 0.0), (0.0, 0.0));
}

#[test]
fn euler_a_draws_noise_on_every_step_but_the_last() {
    let device = Device::Cpu;
    let mut s = sampler(Scheduler::EulerA, &sd15(), 5);
    let mut x = Tensor::ones(4, DType::F32, &device).expect("x");
    let mut draws = 0;
    for i in 0..5 {
        let mut noise = || {
            draws += 1;
            Tensor::zeros(4, DType::F32, &device)
        };
        let out = Tensor::zeros(4, DType::F32, &device).expect("out");
        x = s.step(&out, i, &x, &mut noise).expect("step");
    }
    assert_eq!(draws, 4);
}

/// The noise level `(√ᾱ, √(1-ᾱ))` a sampler's sample is at before step `i`, in
/// variance-preserving terms, and the factor from VP to the sampler's own space.
fn level(kind: Scheduler, schedule: &Schedule, t: &[f64], i: usize) -> (f64, f64, f64) {
    let from_sigma = |sigma: f64| {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    };
    let (a, s) = match kind {
        Scheduler::Ddim => {
            let a = schedule.alphas_cumprod[t[i] as usize];
            (a.sqrt(), (1.0 - a).sqrt())
        }
        Scheduler::DpmPp2mKarras => {
            let (min, max) = (schedule.sigmas[0], schedule.sigmas[999]);
            from_sigma(karras_sigmas(min, max, t.len())[i])
        }
        _ => from_sigma(schedule.sigma_at(t[i])),
    };
    // The Euler samplers keep the sample in sigma space: x_vp / √ᾱ.
    let to_space = if matches!(kind, Scheduler::Euler) {
        1.0 / a
    } else {
        1.0
    };
    (a, s, to_space)
}

#[test]
fn a_perfect_predictor_recovers_the_clean_sample() {
    // A model that knows x0 answers exactly (ε or v); every deterministic sampler must then
    // stay on the path x = √ᾱ·x0 + √(1-ᾱ)·ε and land on x0 (DDIM on its final alpha, ᾱ_0).
    let device = Device::Cpu;
    let x0 = Tensor::new(&[0.5f32, -0.25, 1.0, 0.0], &device).expect("x0");
    let eps = Tensor::new(&[1.0f32, -1.0, 0.5, 2.0], &device).expect("eps");
    let mix = |a: f64, b: &Tensor, c: f64, d: &Tensor| {
        ((b * a).expect("mul") + (d * c).expect("mul")).expect("add")
    };
    for prediction in [Prediction::Epsilon, Prediction::VPrediction] {
        let cfg = config(prediction, None);
        let schedule = Schedule::new(&cfg);
        for kind in [Scheduler::Euler, Scheduler::Ddim, Scheduler::DpmPp2mKarras] {
            let mut s = sampler(kind, &cfg, 10);
            let t = s.timesteps().to_vec();
            let (a, sd, to_space) = level(kind, &schedule, &t, 0);
            let mut x = (mix(a, &x0, sd, &eps) * to_space).expect("scale");
            for i in 0..t.len() {
                let (a, sd, _) = level(kind, &schedule, &t, i);
                let output = match prediction {
                    Prediction::Epsilon => eps.clone(),
                    Prediction::VPrediction => mix(a, &eps, -sd, &x0),
                };
                let mut no_noise = || Tensor::zeros(4, DType::F32, &device);
                x = s.step(&output, i, &x, &mut no_noise).expect("step");
            }
            let expected = if kind == Scheduler::Ddim {
                let a = schedule.alphas_cumprod[0];
                mix(a.sqrt(), &x0, (1.0 - a).sqrt(), &eps)
            } else {
                x0.clone()
            };
            let diff: Vec<f32> = (&x - &expected)
                .and_then(|d| d.abs())
                .and_then(|d| d.to_vec1())
                .expect("diff");
            assert!(
                diff.iter().all(|d| *d < 1e-3),
                "{kind} {prediction:?}: {diff:?}"
            );
        }
    }
}
