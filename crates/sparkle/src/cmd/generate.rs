//! `sparkle generate`: one image, no server, through the same validation and the same
//! engine as the service.

use anyhow::Context;
use clap::Args;
use sparkle_core::{ImageRequest, Limits};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// What to draw.
    prompt: String,
    /// Where to write the PNG.
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// The model: a directory in the diffusers layout or a single-file .safetensors checkpoint.
    #[arg(long, value_name = "PATH", env = "SPARKLE_MODEL")]
    model: PathBuf,
    /// Denoising steps.
    #[arg(long)]
    steps: Option<u32>,
    /// Image size as WIDTHxHEIGHT, multiples of 8 (default: the model's native size).
    #[arg(long)]
    size: Option<String>,
    /// Seed; the same seed, settings and device give the same image (random if unset).
    #[arg(long)]
    seed: Option<u64>,
    /// Guidance (CFG) scale; 1 or less turns classifier-free guidance off.
    #[arg(long)]
    guidance: Option<f32>,
    /// What to steer away from.
    #[arg(long)]
    negative: Option<String>,
    /// Scheduler: euler, euler_a, ddim, dpmpp_2m_karras.
    #[arg(long)]
    scheduler: Option<String>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// auto (f32 on CPU, f16 on CUDA), f32, f16 or bf16 (CUDA).
    #[arg(long, default_value = "auto")]
    precision: String,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let catalog = super::catalog(std::slice::from_ref(&args.model))?;
    let request = ImageRequest {
        prompt: args.prompt,
        negative_prompt: args.negative,
        model: None,
        size: args.size,
        steps: args.steps,
        guidance_scale: args.guidance,
        seed: args.seed,
        scheduler: args.scheduler,
        n: Some(1),
    }
    .validate(&Limits::default(), &catalog, rand::random::<u32>)
    .map_err(|e| anyhow::anyhow!("{e}"))?;

    let started = Instant::now();
    let options = sparkle_engine::EngineOptions {
        device: super::serve::parse_device(&args.device)?,
        precision: args
            .precision
            .parse()
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?,
    };
    let engine = sparkle_engine::Engine::load(&args.model, &options)
        .with_context(|| format!("cannot load the model at {}", args.model.display()))?;
    let loaded = started.elapsed();
    let batch = sparkle_engine::Batch {
        width: request.width,
        height: request.height,
        steps: request.steps,
        guidance_scale: request.guidance_scale,
        scheduler: request.scheduler,
        strength: 1.0,
        items: vec![sparkle_engine::BatchItem {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            seed: u64::from(request.seed),
            source: None,
        }],
    };
    let mut on_step = |p: sparkle_engine::StepProgress| {
        eprint!("\rstep {}/{}", p.step, p.total);
        ControlFlow::Continue(())
    };
    let image = engine
        .generate(&batch, &mut on_step)?
        .into_iter()
        .next()
        .context("the engine returned no image")?;
    eprintln!();
    let png = sparkle_engine::encode_png(&image, &request.parameters_text(0))?;
    std::fs::write(&args.output, png)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "wrote {} ({}x{}, seed {}) — model loaded in {:.2?}, generated in {:.2?}",
        args.output.display(),
        image.width,
        image.height,
        request.seed,
        loaded,
        started.elapsed() - loaded
    );
    Ok(())
}
