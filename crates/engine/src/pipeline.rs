//! The text-to-image pipeline: tokens → text embeddings (one batched call for every prompt
//! and negative prompt) → seeded latents → the denoising loop (UNet + classifier-free
//! guidance + sampler) → VAE decode → RGB bytes.

use crate::clip::ClipTextModel;
use crate::config::{ClipConfig, Prediction, ScheduleConfig, UNetConfig, VaeConfig};
use crate::schedulers::sampler;
use crate::tokenizer::Tokenizer;
use crate::weights::{build, mmap, weight_file};
use crate::{Architecture, EngineError, GeneratedImage, ModelInfo};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_transformers::models::stable_diffusion::unet_2d::UNet2DConditionModel;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use sparkle_core::Scheduler;
use std::ops::ControlFlow;
use std::path::Path;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when built with CUDA and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: DeviceChoice,
}

/// Every image of a batch shares these settings; each item has its own prompt and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    pub scheduler: Scheduler,
    pub items: Vec<BatchItem>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
}

/// Reported after each denoising step: `step` of `total` done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    pub step: u32,
    pub total: u32,
}

/// A loaded Stable Diffusion pipeline.
pub struct Engine {
    info: ModelInfo,
    device: Device,
    dtype: DType,
    tokenizer: Tokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: AutoEncoderKL,
    vae_scale: usize,
    scaling_factor: f64,
    latent_channels: usize,
    schedule: ScheduleConfig,
}

fn pick_device(choice: DeviceChoice) -> Result<Device, EngineError> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::new_cuda(n)?,
        DeviceChoice::Auto if cfg!(feature = "cuda") => Device::cuda_if_available(0)?,
        DeviceChoice::Auto => Device::Cpu,
    })
}

impl Engine {
    pub fn load(dir: &Path, options: &EngineOptions) -> Result<Engine, EngineError> {
        let device = pick_device(options.device)?;
        let dtype = if device.is_cpu() {
            DType::F32
        } else {
            DType::F16
        };
        let tokenizer = Tokenizer::load(&dir.join("tokenizer"))?;

        let clip_config = ClipConfig::read(&dir.join("text_encoder"))?;
        let file = weight_file(&dir.join("text_encoder"))?;
        let vb = mmap(&file, dtype, &device)?;
        let text_encoder = build(&file, || ClipTextModel::new(vb, &clip_config))?;

        let unet_config = UNetConfig::read(&dir.join("unet"))?;
        let file = weight_file(&dir.join("unet"))?;
        let vb = mmap(&file, dtype, &device)?;
        let unet = build(&file, || {
            UNet2DConditionModel::new(
                vb,
                unet_config.in_channels,
                unet_config.out_channels,
                false,
                unet_config.candle.clone(),
            )
        })?;

        let vae_config = VaeConfig::read(&dir.join("vae"))?;
        let file = weight_file(&dir.join("vae"))?;
        let vb = mmap(&file, dtype, &device)?;
        let vae = build(&file, || {
            AutoEncoderKL::new(
                vb,
                vae_config.in_channels,
                vae_config.out_channels,
                vae_config.candle.clone(),
            )
        })?;

        if clip_config.hidden_size != unet_config.candle.cross_attention_dim {
            return Err(EngineError::InvalidModel(format!(
                "text encoder width {} does not match the UNet's cross_attention_dim {}",
                clip_config.hidden_size, unet_config.candle.cross_attention_dim
            )));
        }
        let schedule = ScheduleConfig::read(&dir.join("scheduler"))?;
        let vae_scale = vae_config.scale_factor();
        let info = ModelInfo {
            name: model_name(dir),
            architecture: architecture(&schedule, unet_config.candle.cross_attention_dim),
            native_size: (unet_config.sample_size * vae_scale) as u32,
            vae_scale_factor: vae_scale as u32,
            device: format!("{device:?}"),
            dtype: format!("{dtype:?}"),
        };
        tracing::info!(model = %info.name, arch = %info.architecture, device = %info.device, "model loaded");
        Ok(Engine {
            info,
            device,
            dtype,
            tokenizer,
            text_encoder,
            unet,
            vae,
            vae_scale,
            scaling_factor: vae_config.scaling_factor,
            latent_channels: vae_config.candle.latent_channels,
            schedule,
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Generates one image per batch item. `on_step` is called after every denoising step;
    /// returning `Break` stops the batch with [`EngineError::Cancelled`].
    pub fn generate(
        &self,
        batch: &Batch,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        let scale = self.vae_scale as u32;
        if batch.items.is_empty() {
            return Err(EngineError::InvalidRequest(
                "a batch needs at least one image".into(),
            ));
        }
        if !batch.width.is_multiple_of(scale)
            || !batch.height.is_multiple_of(scale)
            || batch.width == 0
            || batch.height == 0
        {
            return Err(EngineError::InvalidRequest(format!(
                "size {}x{} must be a non-zero multiple of {scale}",
                batch.width, batch.height
            )));
        }
        if batch.steps == 0 {
            return Err(EngineError::InvalidRequest(
                "steps must be at least 1".into(),
            ));
        }
        let n = batch.items.len();
        let guided = batch.guidance_scale > 1.0;
        let embeddings = self.encode_prompts(batch, guided)?;
        let (lh, lw) = (
            (batch.height / scale) as usize,
            (batch.width / scale) as usize,
        );
        let shape = (self.latent_channels, lh, lw);

        let mut sampler = sampler(batch.scheduler, &self.schedule, batch.steps as usize);
        let mut rngs: Vec<(ChaCha8Rng, ChaCha8Rng)> = batch
            .items
            .iter()
            .map(|item| {
                (
                    ChaCha8Rng::seed_from_u64(item.seed),
                    ChaCha8Rng::seed_from_u64(item.seed ^ 0x5eed_a5ce_0000_0001),
                )
            })
            .collect();
        let initial: Vec<Tensor> = rngs
            .iter_mut()
            .map(|(rng, _)| normal(rng, shape, &self.device))
            .collect::<Result<_, _>>()?;
        let mut latents =
            (Tensor::stack(&initial, 0)? * sampler.init_noise_sigma())?.to_dtype(self.dtype)?;

        let timesteps = sampler.timesteps().to_vec();
        let total = timesteps.len() as u32;
        for (i, &t) in timesteps.iter().enumerate() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = sampler.scale_model_input(input, i)?;
            let output = self.unet.forward(&input, t, &embeddings)?;
            let output = if guided {
                let uncond = output.i(0..n)?;
                let cond = output.i(n..2 * n)?;
                (&uncond + ((&cond - &uncond)? * f64::from(batch.guidance_scale))?)?
            } else {
                output
            };
            let mut noise = || -> candle_core::Result<Tensor> {
                let fresh: Vec<Tensor> = rngs
                    .iter_mut()
                    .map(|(_, rng)| normal(rng, shape, &self.device))
                    .collect::<Result<_, _>>()
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Tensor::stack(&fresh, 0)?.to_dtype(self.dtype)
            };
            latents = sampler.step(&output, i, &latents, &mut noise)?;
            if on_step(StepProgress {
                step: i as u32 + 1,
                total,
            })
            .is_break()
            {
                return Err(EngineError::Cancelled);
            }
        }
        self.decode(&latents, batch.width, batch.height)
    }

    /// Text embeddings for the batch: `[uncond…, cond…]` when guided, `[cond…]` otherwise.
    fn encode_prompts(&self, batch: &Batch, guided: bool) -> Result<Tensor, EngineError> {
        let mut texts: Vec<&str> = Vec::new();
        if guided {
            texts.extend(batch.items.iter().map(|i| i.negative_prompt.as_str()));
        }
        texts.extend(batch.items.iter().map(|i| i.prompt.as_str()));
        let ids: Vec<u32> = texts
            .iter()
            .flat_map(|t| self.tokenizer.encode_padded(t))
            .collect();
        let ids = Tensor::from_vec(
            ids,
            (texts.len(), crate::tokenizer::MAX_TOKENS),
            &self.device,
        )?;
        Ok(self.text_encoder.forward(&ids)?)
    }

    fn decode(
        &self,
        latents: &Tensor,
        width: u32,
        height: u32,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        let images = self.vae.decode(&(latents / self.scaling_factor)?)?;
        let images = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        let images = (images * 255.0)?
            .round()?
            .to_dtype(DType::U8)?
            .permute((0, 2, 3, 1))?
            .to_device(&Device::Cpu)?;
        let n = images.dim(0)?;
        (0..n)
            .map(|i| {
                Ok(GeneratedImage {
                    width,
                    height,
                    rgb: images.i(i)?.flatten_all()?.to_vec1::<u8>()?,
                })
            })
            .collect()
    }
}

/// Standard normal noise from a seeded stream, made on the CPU so that an image depends
/// only on its seed, not on the device or the rest of the batch.
fn normal(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize, usize),
    device: &Device,
) -> Result<Tensor, EngineError> {
    let count = shape.0 * shape.1 * shape.2;
    let values: Vec<f32> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
}

pub(crate) fn model_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

pub(crate) fn architecture(schedule: &ScheduleConfig, cross_attention_dim: usize) -> Architecture {
    if schedule.prediction == Prediction::VPrediction || cross_attention_dim == 1024 {
        Architecture::Sd21
    } else {
        Architecture::Sd15
    }
}
