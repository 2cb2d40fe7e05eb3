//! `sparkle generate`: one image, no server, through the same validation and the same
//! engine as the service.

use anyhow::Context;
use clap::Args;
use sparkle_core::{
    HiresRequest, ImageRequest, Limits, LoraWeight, Outpaint, Source, SourcePixels,
};
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
    /// Textual-inversion embeddings (`NAME.safetensors`) in an `embeddings` directory beside
    /// it are used wherever a prompt names them; LoRAs in a `loras` directory beside it are
    /// applied with --lora or `<lora:NAME:WEIGHT>` in the prompt.
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
    /// Start from this image (PNG, JPEG or WebP): scaled to cover the size and cropped to
    /// its centre; without --size, the size keeps its aspect ratio.
    #[arg(long, value_name = "FILE")]
    image: Option<PathBuf>,
    /// With --image: repaint where this mask (of the image's dimensions) is white, keep
    /// where it is black.
    #[arg(long, value_name = "FILE", requires = "image")]
    mask: Option<PathBuf>,
    /// With --image: how far the result may move from it, above 0 up to 1 (default 0.75; 1
    /// with --mask or --outpaint).
    #[arg(long, requires = "image")]
    strength: Option<f32>,
    /// With --image: pixels to add on each side for the model to paint in, as
    /// LEFT,RIGHT,UP,DOWN.
    #[arg(long, value_name = "L,R,U,D", requires = "image", value_parser = parse_outpaint)]
    outpaint: Option<Outpaint>,
    /// From text: a second pass at SCALE times the size (above 1, at most 4), from the first
    /// pass's latents upscaled (A1111's hires fix).
    #[arg(long, value_name = "SCALE", conflicts_with = "image")]
    hires: Option<f32>,
    /// With --hires: the second pass's steps (default: --steps).
    #[arg(long, requires = "hires")]
    hires_steps: Option<u32>,
    /// With --hires: the share of the second pass's schedule that runs (default 0.7).
    #[arg(long, requires = "hires")]
    hires_strength: Option<f32>,
    /// Apply the LoRA `loras/NAME.safetensors` beside the model, with a weight from -4 to
    /// 4 (default 1); repeat for several.
    #[arg(long, value_name = "NAME[:WEIGHT]")]
    lora: Vec<LoraWeight>,
}

fn parse_outpaint(text: &str) -> Result<Outpaint, String> {
    let sides: Vec<u32> = text
        .split(',')
        .map(|v| v.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("expected LEFT,RIGHT,UP,DOWN in pixels; got {text:?}"))?;
    match sides.as_slice() {
        &[left, right, up, down] => Ok(Outpaint {
            left,
            right,
            up,
            down,
        }),
        _ => Err(format!(
            "expected four numbers, LEFT,RIGHT,UP,DOWN; got {text:?}"
        )),
    }
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let catalog = super::catalog(std::slice::from_ref(&args.model))?;
    let limits = Limits::default();
    let read = |path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
    };
    let source = match &args.image {
        None => None,
        Some(image) => {
            let mask = args.mask.as_ref().map(read).transpose()?;
            Some(Source::decode(&read(image)?, mask.as_deref(), &limits)?)
        }
    };
    let outpaint = args.outpaint.unwrap_or_default();
    let facts = source.as_ref().map(|s| s.facts(&outpaint));
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
        strength: args.strength,
        outpaint: args.outpaint,
        hires: args.hires.map(|scale| HiresRequest {
            scale,
            steps: args.hires_steps,
            strength: args.hires_strength,
        }),
        loras: (!args.lora.is_empty()).then_some(args.lora),
    }
    .validate(&limits, &catalog, facts.as_ref(), rand::random::<u32>)
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // The source as a worker reads it: brought to the canvas, then back to pixels.
    let source = match (source, request.init) {
        (Some(source), Some(init)) => {
            let png = source.fit(request.width, request.height, &outpaint);
            let pixels = SourcePixels::from_png(&png, request.width, request.height, init.masked)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Some(sparkle_engine::SourceImage {
                rgb: pixels.rgb,
                mask: pixels.mask,
            })
        }
        _ => None,
    };

    let started = Instant::now();
    let options = sparkle_engine::EngineOptions {
        device: super::serve::parse_device(&args.device)?,
        precision: args
            .precision
            .parse()
            .map_err(|e| anyhow::anyhow!("--precision: {e}"))?,
    };
    let mut engine = sparkle_engine::Engine::load(&args.model, &options)
        .with_context(|| format!("cannot load the model at {}", args.model.display()))?;
    // Textual-inversion embeddings and LoRAs beside the model.
    let beside = engine.load_beside(&args.model)?;
    for (name, why) in &beside.embeddings.skipped {
        eprintln!("embedding {name} left out: {why}");
    }
    let loaded = started.elapsed();
    let batch = sparkle_engine::Batch {
        width: request.width,
        height: request.height,
        steps: request.steps,
        guidance_scale: request.guidance_scale,
        scheduler: request.scheduler,
        strength: request.init.map_or(1.0, |init| init.strength),
        hires: request.hires.map(|h| sparkle_engine::Hires {
            width: h.width,
            height: h.height,
            steps: h.steps,
            strength: h.strength,
        }),
        loras: request.loras.clone(),
        items: vec![sparkle_engine::BatchItem {
            prompt: request.prompt.clone(),
            negative_prompt: request.negative_prompt.clone(),
            seed: u64::from(request.seed),
            source,
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
