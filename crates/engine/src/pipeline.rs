//! The pipeline: tokens → text embeddings (one batched call for every prompt and negative
//! prompt) → seeded latents, or a source image's latents noised part-way → the denoising loop
//! (UNet + classifier-free guidance + sampler, with an inpainting mask kept or fed to the
//! UNet) → VAE decode → RGB bytes. Image-to-image and inpainting follow diffusers'
//! pipelines, so that the same weights, image and noise give the same result.

use crate::clip::ClipTextModel;
use crate::config::{ClipConfig, ScheduleConfig, UNetConfig, VaeConfig};
use crate::layout::{Configs, Layout, Part};
use crate::lora::{self, LoraWeight, Network, Targets};
use crate::model::{self, Architecture, ModelInfo};
use crate::prompt;
use crate::schedulers::sampler;
use crate::tokenizer::{Tokenizer, MAX_TOKENS};
use crate::unet::{AddedConditions, UNet};
use crate::vae::{VaeDecoder, VaeEncoder};
use crate::weights::{Kept, Shapes};
use crate::EngineError;
use candle_core::{DType, Device, DeviceLocation, IndexOp, Tensor, D};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use sparkle_core::Scheduler;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

/// Where to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// CUDA device 0 when built with the `cuda` feature and one is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

/// The numeric type of weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 on the CPU, f16 on CUDA.
    #[default]
    Auto,
    F32,
    /// CUDA only.
    F16,
    /// CUDA only: f32's range at f16's cost, for models whose activations overflow f16.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim() {
            "auto" => Ok(Precision::Auto),
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "precision must be auto, f32, f16 or bf16; got {other:?}"
            )),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    pub precision: Precision,
}

/// Every image of a batch shares these settings; each item has its own prompt and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    /// Classifier-free guidance; at 1.0 or below the negative prompts are not used.
    pub guidance_scale: f32,
    pub scheduler: Scheduler,
    /// With source images: how much of them is repainted, in `(0, 1]`. The loop skips the
    /// first `steps − ⌊steps × strength⌋` steps of its schedule and starts from the source's
    /// latents noised to that level (diffusers' rule), so `⌊steps × strength⌋` steps run.
    /// Unused without sources.
    pub strength: f32,
    /// A second pass at a larger size (text-to-image only).
    pub hires: Option<Hires>,
    /// LoRAs merged into the networks for this batch, with their weights (none: the model
    /// as loaded). Prompts may also carry `<lora:NAME:WEIGHT>`; the text encoders never see
    /// those tags, and only this list decides what is applied.
    pub loras: Vec<LoraWeight>,
    pub items: Vec<BatchItem>,
}

/// A1111's "hires fix": the first pass's latents are upscaled (bilinearly, A1111's "Latent"
/// upscaler) to `width × height`, noised to `strength` and denoised again there for
/// `⌊steps × strength⌋` of a `steps`-step schedule, with the same prompts; the images come
/// out at `width × height`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hires {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub strength: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BatchItem {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    /// The image this item starts from: every item of a batch has one or none has.
    pub source: Option<SourceImage>,
}

/// What an image-to-image or inpainting item starts from, at the batch's size.
#[derive(Clone, PartialEq)]
pub struct SourceImage {
    /// RGB8, row-major, `width × height × 3` bytes.
    pub rgb: Vec<u8>,
    /// For inpainting, one byte per pixel: 128 and above is repainted, below is kept. Every
    /// item of a batch has a mask or none has.
    pub mask: Option<Vec<u8>>,
}

impl std::fmt::Debug for SourceImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceImage")
            .field("rgb_bytes", &self.rgb.len())
            .field("mask", &self.mask.as_ref().map(Vec::len))
            .finish()
    }
}

/// A batch's sources on the device, ready for the loop.
pub(crate) struct Sources {
    /// The sources' latents (scaled), `[n, channels, h/8, w/8]`, f32.
    latents: Tensor,
    /// Where a 4-channel UNet repaints, `[n, 1, h/8, w/8]`, f32 of 0 and 1: the rest is
    /// blended back after each step.
    blend: Option<Tensor>,
    /// Whether the loop starts from pure noise rather than the noised source (inpainting at
    /// strength 1, as diffusers).
    from_noise: bool,
}

/// What an inpainting UNet sees beside the latents: the mask and the masked image's latents,
/// `[n, 1 + channels, h/8, w/8]` in the model's dtype.
pub(crate) struct InpaintInput(Tensor);

/// Reported after each denoising step: `step` of `total` done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepProgress {
    pub step: u32,
    pub total: u32,
}

/// An RGB8 image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

/// A tokenizer, and what it gives the encoder it feeds (the encoder is in [`Networks`]).
struct TextEncoder {
    tokenizer: Tokenizer,
    /// Its features' width.
    width: usize,
    /// Textual-inversion names as this tokenizer spells them, and the ids past the
    /// vocabulary that replace them.
    placeholders: Vec<(Vec<u32>, Vec<u32>)>,
    /// The rows those ids select, `[vectors, width]`.
    extra: Option<Tensor>,
}

/// A batch of prompts as chunks: every prompt padded with empty chunks to the longest.
struct Chunked {
    /// `[prompts × chunks, 77]`.
    ids: Tensor,
    /// Chunks per prompt.
    chunks: usize,
    /// Each token's weight, in `ids`' order; `None` when every weight is 1.
    weights: Option<Vec<f32>>,
    /// Where each prompt's first chunk has its end token.
    eos: Vec<usize>,
}

impl TextEncoder {
    /// The prompts read as the web UIs read them ([`crate::prompt`]), in chunks of 75 tokens.
    fn chunked(&self, texts: &[&str], device: &Device) -> Result<Chunked, EngineError> {
        let mut all: Vec<Vec<prompt::Chunk>> = texts
            .iter()
            .map(|t| prompt::chunks_with(&self.tokenizer, t, &self.placeholders))
            .collect();
        let chunks = all.iter().map(Vec::len).max().unwrap_or(1);
        let empty = prompt::empty_chunk(&self.tokenizer);
        for row in &mut all {
            row.resize(chunks, empty.clone());
        }
        let eos = all.iter().map(|row| row[0].eos).collect();
        let weighted = all
            .iter()
            .flatten()
            .any(|c| c.weights.iter().any(|&w| w != 1.0));
        let weights = weighted.then(|| {
            all.iter()
                .flatten()
                .flat_map(|c| c.weights.iter().copied())
                .collect()
        });
        let flat: Vec<u32> = all.into_iter().flatten().flat_map(|c| c.ids).collect();
        Ok(Chunked {
            ids: Tensor::from_vec(flat, (texts.len() * chunks, MAX_TOKENS), device)?,
            chunks,
            weights,
            eos,
        })
    }
}

/// Features `[prompts × chunks, 77, d]` scaled by their tokens' weights, each chunk's mean
/// kept, then each prompt's chunks side by side: `[prompts, chunks × 77, d]`.
fn weighted(features: Tensor, chunked: &Chunked) -> Result<Tensor, EngineError> {
    let (rows, tokens, width) = features.dims3()?;
    let features = match &chunked.weights {
        None => features,
        Some(weights) => {
            let dtype = features.dtype();
            let z = features.to_dtype(DType::F32)?;
            let w = Tensor::from_slice(weights, (rows, tokens, 1), z.device())?;
            let before = z.mean_keepdim(2)?.mean_keepdim(1)?;
            let scaled = z.broadcast_mul(&w)?;
            let after = scaled.mean_keepdim(2)?.mean_keepdim(1)?;
            scaled.broadcast_mul(&(before / after)?)?.to_dtype(dtype)?
        }
    };
    Ok(features.reshape((rows / chunked.chunks, chunked.chunks * tokens, width))?)
}

/// The text side of a model: one CLIP encoder (SD 1.x, 2.x), or SDXL's two.
struct TextEncoders {
    first: TextEncoder,
    /// SDXL's OpenCLIP bigG encoder with its projection; it alone gives the pooled features.
    second: Option<TextEncoder>,
    /// Encode an empty negative prompt as zeros (SDXL's `force_zeros_for_empty_prompt`).
    zero_empty_negative: bool,
}

/// What the UNet attends to and, for SDXL, the pooled features it adds to its time
/// embedding; rows in batch order (`[uncond…, cond…]` when guided).
pub(crate) struct Conditioning {
    pub context: Tensor,
    pub pooled: Option<Tensor>,
    /// The networks the prompts were encoded with (the model's own, or with the batch's
    /// LoRAs merged in): the UNet that denoises under this conditioning is theirs.
    pub networks: Arc<Networks>,
}

/// The networks a LoRA can change. The model's own are loaded once; a set of LoRAs gets a
/// copy of the weights it touches merged in, sharing every other tensor with the model's.
pub(crate) struct Networks {
    unet: Arc<UNet>,
    text: Arc<ClipTextModel>,
    /// SDXL's second text encoder.
    text_2: Option<Arc<ClipTextModel>>,
}

/// What the model's networks were built from, kept to build them again with LoRAs merged:
/// the UNet's tensors, and each text encoder's with its configuration.
struct KeptNetworks {
    unet: Kept,
    text: (Kept, ClipConfig),
    text_2: Option<(Kept, ClipConfig)>,
}

impl KeptNetworks {
    fn of(&self, network: Network) -> Option<&Kept> {
        match network {
            Network::Unet => Some(&self.unet),
            Network::TextEncoder => Some(&self.text.0),
            Network::TextEncoder2 => self.text_2.as_ref().map(|(kept, _)| kept),
        }
    }
}

/// The LoRAs a model can use, and the merged networks of the sets used last.
#[derive(Default)]
struct Loras {
    dir: Option<PathBuf>,
    names: Vec<String>,
    targets: Targets,
    /// Most recently used first, at most [`LORA_SETS_KEPT`]; each key sorted by name.
    sets: Mutex<Vec<(Vec<LoraWeight>, Arc<Networks>)>>,
}

/// Sets of LoRAs whose merged weights stay on the device, so that jobs alternating between
/// two sets merge neither again.
const LORA_SETS_KEPT: usize = 2;

/// What [`Engine::load_loras`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LorasLoaded {
    /// Usable by name.
    pub names: Vec<String>,
    /// Left out: name and why (another model family, not a LoRA).
    pub skipped: Vec<(String, String)>,
}

/// A loaded Stable Diffusion pipeline.
pub struct Engine {
    info: ModelInfo,
    device: Device,
    dtype: DType,
    text: TextEncoders,
    networks: Arc<Networks>,
    kept: KeptNetworks,
    loras: Loras,
    unet_config: UNetConfig,
    vae: VaeDecoder,
    vae_encoder: VaeEncoder,
    /// The UNet takes a mask and the masked image's latents beside the latents (an
    /// inpainting checkpoint's 9 input channels).
    inpainting_unet: bool,
    /// f32 for a VAE that overflows in f16 (SDXL's), else the model's dtype.
    vae_dtype: DType,
    vae_scale: usize,
    scaling_factor: f64,
    latent_channels: usize,
    schedule: ScheduleConfig,
    /// The textual-inversion embeddings loaded.
    embedding_names: Vec<String>,
}

/// What [`Engine::load_embeddings`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EmbeddingsLoaded {
    /// Usable by name in prompts.
    pub names: Vec<String>,
    /// Left out: name and why.
    pub skipped: Vec<(String, String)>,
}

fn pick_device(choice: DeviceChoice) -> Result<Device, EngineError> {
    Ok(match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => cuda_device(n)?,
        DeviceChoice::Auto if crate::CUDA => cuda_device(0)?,
        DeviceChoice::Auto => Device::Cpu,
    })
}

/// GPU `ordinal` as the engine runs on it (see `cuda::device`).
pub(crate) fn cuda_device(ordinal: usize) -> candle_core::Result<Device> {
    #[cfg(feature = "cuda")]
    return crate::cuda::device(ordinal);
    #[cfg(not(feature = "cuda"))]
    Device::new_cuda(ordinal)
}

#[cfg(all(test, feature = "cuda"))]
impl Engine {
    pub(crate) fn unet_for_tests(&self) -> Arc<UNet> {
        Arc::clone(&self.networks.unet)
    }
}

fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

impl Engine {
    /// Loads the model at `model` — a directory in the diffusers layout or a single-file
    /// `.safetensors` checkpoint — onto the chosen device: f32 on the CPU, f16 on CUDA. Every
    /// weight is checked against the configuration on the way.
    pub fn load(model: &Path, options: &EngineOptions) -> Result<Engine, EngineError> {
        let started = Instant::now();
        let device = pick_device(options.device)?;
        let dtype = match (options.precision, device.is_cpu()) {
            (Precision::Auto, true) | (Precision::F32, _) => DType::F32,
            (Precision::Auto, false) | (Precision::F16, false) => DType::F16,
            (Precision::Bf16, false) => DType::BF16,
            (Precision::F16 | Precision::Bf16, true) => {
                return Err(EngineError::InvalidRequest(
                    "f16 and bf16 run on CUDA only; the CPU runs f32".into(),
                ))
            }
        };
        let layout = Layout::open(model)?;
        let configs = layout.configs()?;
        let architecture = layout.architecture(&configs);
        let Configs {
            index,
            text_encoder: clip_config,
            text_encoder_2,
            unet: unet_config,
            vae: vae_config,
            schedule,
        } = configs;
        let (tokenizer, tokenizer_2) = layout.tokenizers()?;
        let second = match (tokenizer_2, text_encoder_2) {
            (Some(tokenizer), Some(config)) => Some((tokenizer, config)),
            _ => None,
        };
        let mut encoders = vec![(&tokenizer, &clip_config)];
        if let Some((tokenizer, config)) = &second {
            encoders.push((tokenizer, config));
        }
        check_parts_fit(&layout, &encoders, &unet_config, &vae_config)?;

        let weights = layout.weights()?;
        let open = |part, dtype| weights.part(part, dtype, &device);
        let (text_model, text_kept) = open(Part::TextEncoder, dtype)?
            .build_kept(|vb| ClipTextModel::new(vb, &clip_config))?;
        let first = TextEncoder {
            tokenizer,
            width: clip_config.hidden_size,
            placeholders: Vec::new(),
            extra: None,
        };
        let (second, text_2) = match second {
            None => (None, None),
            Some((tokenizer, config)) => {
                let (model, kept) = open(Part::TextEncoder2, dtype)?
                    .build_kept(|vb| ClipTextModel::with_projection(vb, &config))?;
                let encoder = TextEncoder {
                    tokenizer,
                    width: config.hidden_size,
                    placeholders: Vec::new(),
                    extra: None,
                };
                (Some(encoder), Some((Arc::new(model), kept, config)))
            }
        };
        let (unet, unet_kept) =
            open(Part::Unet, dtype)?.build_kept(|vb| UNet::new(vb, &unet_config))?;
        let vae_dtype = if architecture == Architecture::Sdxl && vae_config.force_upcast {
            DType::F32
        } else {
            dtype
        };
        let (vae, vae_encoder) = open(Part::Vae, vae_dtype)?.build(|vb| {
            Ok((
                VaeDecoder::new(vb.clone(), &vae_config)?,
                VaeEncoder::new(vb, &vae_config)?,
            ))
        })?;
        let inpainting_unet = unet_config.in_channels != vae_config.candle.latent_channels;

        let vae_scale = vae_config.scale_factor();
        let info = ModelInfo {
            name: layout.name(),
            architecture,
            native_size: model::native_size(&unet_config, &vae_config),
            vae_scale_factor: u32::try_from(vae_scale).unwrap_or(u32::MAX),
            device: device_name(&device),
            dtype: dtype.as_str().to_string(),
        };
        tracing::info!(
            model = %info.name, arch = %info.architecture, device = %info.device,
            dtype = %info.dtype, seconds = started.elapsed().as_secs_f32(), "model loaded"
        );
        Ok(Engine {
            info,
            device,
            dtype,
            text: TextEncoders {
                first,
                second,
                zero_empty_negative: index.force_zeros_for_empty_prompt,
            },
            networks: Arc::new(Networks {
                unet: Arc::new(unet),
                text: Arc::new(text_model),
                text_2: text_2.as_ref().map(|(model, _, _)| Arc::clone(model)),
            }),
            kept: KeptNetworks {
                unet: unet_kept,
                text: (text_kept, clip_config),
                text_2: text_2.map(|(_, kept, config)| (kept, config)),
            },
            loras: Loras::default(),
            unet_config,
            vae,
            vae_encoder,
            inpainting_unet,
            vae_dtype,
            vae_scale,
            scaling_factor: vae_config.scaling_factor,
            latent_channels: vae_config.candle.latent_channels,
            schedule,
            embedding_names: Vec::new(),
        })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Multiply-adds ×2 of one UNet call on `rows` latents of an image of this size (CFG
    /// doubles the rows), counted from the network's shape.
    pub fn unet_flops(&self, rows: usize, width: u32, height: u32) -> f64 {
        let scale = self.vae_scale;
        self.unet_config.flops(
            rows,
            height as usize / scale,
            width as usize / scale,
            MAX_TOKENS,
        )
    }

    /// Bytes of device memory in use on a CUDA device (by every process), when known.
    pub fn device_memory_in_use(&self) -> Option<u64> {
        #[cfg(feature = "cuda")]
        if !self.device.is_cpu() {
            let (free, total) = candle_core::cuda::cudarc::driver::result::mem_get_info().ok()?;
            return Some((total - free) as u64);
        }
        None
    }

    /// The largest image, in pixels, this device can make now: the memory free (on the
    /// CPU, what the system says is available), less a reserve for the bounded attention
    /// scores, over an estimate of what one image needs per pixel at its peak (the decoder's
    /// full-resolution activations, or the UNet's rows with guidance, whichever is more).
    /// Larger images are refused before any work; several images share it by passes.
    pub fn pixel_budget(&self) -> u64 {
        let free = self.free_memory();
        let element = self.dtype.size_in_bytes() as u64;
        let scale = (self.vae_scale as u64).max(1);
        let width0 = self.unet_config.blocks.first().map_or(320, |b| b.channels) as u64;
        // Per image pixel: the decoder's top level (128 channels, f32, about eight maps
        // alive), or two UNet rows (guidance) of the first level's activations per latent.
        let decode = 128 * 4 * 8;
        let denoise = 2 * width0 * element * ROW_ACTIVATIONS / (scale * scale);
        let reserve = (crate::unet::MAX_SCORES as u64) * element
            + (crate::vae::MAX_SCORE_BYTES as u64)
            + (1 << 30);
        free.saturating_sub(reserve) / decode.max(denoise).max(1)
    }

    /// Bytes free for work on this device now (on the CPU, what the system says is
    /// available).
    pub fn free_memory(&self) -> u64 {
        #[cfg(feature = "cuda")]
        if !self.device.is_cpu() {
            if let Ok((free, _)) = candle_core::cuda::cudarc::driver::result::mem_get_info() {
                return free as u64;
            }
        }
        available_system_memory().unwrap_or(u64::MAX)
    }

    /// Generates one image per batch item, in order. `on_step` is called after every
    /// denoising step; returning `Break` stops the batch with [`EngineError::Cancelled`].
    pub fn generate(
        &self,
        batch: &Batch,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        // A set of LoRAs is merged first, so that the memory it takes is not counted free.
        self.networks(&batch.loras)?;
        let (width, height) = batch.output_size();
        let pixels = u64::from(width) * u64::from(height);
        let budget = self.pixel_budget();
        if pixels > budget {
            return Err(EngineError::TooLarge { pixels, budget });
        }
        let limit = self.batch_limit(width, height, guided(batch));
        self.generate_limited(batch, on_step, limit)
    }

    /// The most images of this size one pass of the UNet may hold on this device: the memory
    /// free now, less a reserve for one slice of attention scores and one image's decode,
    /// over an estimate of one UNet row's activations at their peak (the first level's
    /// skip connections, the transformer's projections and feed-forward). Unlimited on the
    /// CPU, where the configured batch size decides.
    pub fn batch_limit(&self, width: u32, height: u32, guided: bool) -> usize {
        #[cfg(feature = "cuda")]
        if !self.device.is_cpu() {
            if let Ok((free, _)) = candle_core::cuda::cudarc::driver::result::mem_get_info() {
                let scale = self.vae_scale as u64;
                let latent_pixels = u64::from(width) * u64::from(height) / (scale * scale);
                let width0 = self.unet_config.blocks.first().map_or(320, |b| b.channels) as u64;
                let element = self.dtype.size_in_bytes() as u64;
                let per_row = latent_pixels * width0 * element * ROW_ACTIVATIONS;
                let decode = u64::from(width) * u64::from(height) * 128 * 4 * 8;
                let reserve = (crate::unet::MAX_SCORES as u64) * element + decode + (1 << 30);
                let rows = if guided { 2 } else { 1 };
                let fit = (free as u64).saturating_sub(reserve) / (per_row * rows).max(1);
                return usize::try_from(fit).unwrap_or(usize::MAX).max(1);
            }
        }
        let _ = (width, height, guided);
        usize::MAX
    }

    /// [`Engine::generate`] in passes of at most `limit` images; each image is the same
    /// whichever pass it runs in. Progress counts the steps of every pass.
    pub(crate) fn generate_limited(
        &self,
        batch: &Batch,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
        limit: usize,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        let started = Instant::now();
        self.validate(batch)?;
        let passes: Vec<&[BatchItem]> = batch.items.chunks(limit.max(1)).collect();
        let first_steps = batch.steps_run();
        let steps = first_steps + batch.hires.map_or(0, |h| steps_at(h.steps, h.strength));
        let total = steps.saturating_mul(passes.len() as u32);
        let (width, height) = batch.output_size();
        let mut images = Vec::with_capacity(batch.items.len());
        for (pass, items) in passes.iter().enumerate() {
            let part = Batch {
                items: items.to_vec(),
                ..batch.clone()
            };
            let done_before = steps.saturating_mul(pass as u32);
            let mut counted = |p: StepProgress| {
                on_step(StepProgress {
                    step: done_before + p.step,
                    total,
                })
            };
            // One encoding of the prompts serves both passes.
            let conditioning = self.encode_prompts(&part)?;
            let mut latents = self.denoise_seeded(&part, &conditioning, &mut counted, &mut None)?;
            if let Some(hires) = &batch.hires {
                let mut counted = |p: StepProgress| {
                    on_step(StepProgress {
                        step: done_before + first_steps + p.step,
                        total,
                    })
                };
                latents = self.refine(&part, &conditioning, hires, &latents, &mut counted)?;
            }
            images.extend(to_rgb8(&self.decode(&latents)?, width, height)?);
        }
        tracing::debug!(
            images = images.len(), steps = batch.steps, scheduler = %batch.scheduler,
            seconds = started.elapsed().as_secs_f32(), "batch generated"
        );
        Ok(images)
    }

    /// The latents after the first denoising step and the decoded images of `batch`, as
    /// f32 values on the host, from the items' seeds as in [`Engine::generate`]: for
    /// comparing this engine with another on the same weights, such as a GPU precision with
    /// the CPU in f32.
    pub fn probe(&self, batch: &Batch) -> Result<Probe, EngineError> {
        self.validate(batch)?;
        let mut first = None;
        let conditioning = self.encode_prompts(batch)?;
        let latents = self.denoise_seeded(
            batch,
            &conditioning,
            &mut |_| ControlFlow::Continue(()),
            &mut first,
        )?;
        let host = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.to_device(&Device::Cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()
        };
        let first = first.ok_or_else(|| EngineError::InvalidRequest("no step ran".into()))?;
        Ok(Probe {
            first_step: host(&first)?,
            image: host(&self.decode(&latents)?)?,
        })
    }

    fn validate(&self, batch: &Batch) -> Result<(), EngineError> {
        let scale = self.info.vae_scale_factor;
        let refuse = |why: String| Err(EngineError::InvalidRequest(why));
        if batch.items.is_empty() {
            return refuse("a batch needs at least one image".into());
        }
        if batch.width == 0
            || batch.height == 0
            || !batch.width.is_multiple_of(scale)
            || !batch.height.is_multiple_of(scale)
        {
            return refuse(format!(
                "size {}x{} must be a non-zero multiple of {scale} on each side",
                batch.width, batch.height
            ));
        }
        let max_steps = self.schedule.num_train_timesteps;
        if batch.steps == 0 || batch.steps as usize > max_steps {
            return refuse(format!(
                "steps must be between 1 and {max_steps}, not {}",
                batch.steps
            ));
        }
        if !batch.guidance_scale.is_finite() {
            return refuse("the guidance scale must be a finite number".into());
        }
        let with_source = batch.items.iter().filter(|i| i.source.is_some()).count();
        if let Some(hires) = &batch.hires {
            if with_source != 0 {
                return refuse("a second pass at a larger size follows text-to-image only".into());
            }
            if hires.width < batch.width
                || hires.height < batch.height
                || !hires.width.is_multiple_of(scale)
                || !hires.height.is_multiple_of(scale)
            {
                return refuse(format!(
                    "the second pass's size {}x{} must be multiples of {scale}, at least {}x{}",
                    hires.width, hires.height, batch.width, batch.height
                ));
            }
            if hires.steps == 0 || hires.steps as usize > max_steps {
                return refuse(format!(
                    "the second pass's steps must be between 1 and {max_steps}, not {}",
                    hires.steps
                ));
            }
            if !(hires.strength > 0.0 && hires.strength <= 1.0)
                || steps_at(hires.steps, hires.strength) == 0
            {
                return refuse(format!(
                    "the second pass's strength {} of {} steps must be above 0, at most 1, and run a step",
                    hires.strength, hires.steps
                ));
            }
        }
        if with_source == 0 {
            return Ok(());
        }
        if with_source != batch.items.len() {
            return refuse("every image of a batch starts from a source image, or none".into());
        }
        let masked = batch
            .items
            .iter()
            .filter(|i| i.source.as_ref().is_some_and(|s| s.mask.is_some()))
            .count();
        if masked != 0 && masked != batch.items.len() {
            return refuse("every image of a batch has a mask, or none".into());
        }
        if !(batch.strength > 0.0 && batch.strength <= 1.0) {
            return refuse(format!(
                "strength must be above 0 and at most 1, not {}",
                batch.strength
            ));
        }
        if start_step(batch) >= batch.steps as usize {
            return refuse(format!(
                "strength {} of {} steps runs no step: steps × strength must be at least 1",
                batch.strength, batch.steps
            ));
        }
        let pixels = batch.width as usize * batch.height as usize;
        for source in batch.items.iter().filter_map(|i| i.source.as_ref()) {
            if source.rgb.len() != pixels * 3 {
                return refuse(format!(
                    "a source image of {}x{} has {} RGB bytes, not {}",
                    batch.width,
                    batch.height,
                    source.rgb.len(),
                    pixels * 3
                ));
            }
            if source.mask.as_ref().is_some_and(|m| m.len() != pixels) {
                return refuse(format!(
                    "a mask of {}x{} has one byte per pixel, {pixels} in all",
                    batch.width, batch.height
                ));
            }
        }
        Ok(())
    }

    /// The denoising loop from each image's seed, under the batch's encoded prompts: initial
    /// latents and ancestral noise come from per-image streams made on the CPU, so an image
    /// depends on its seed alone.
    pub(crate) fn denoise_seeded(
        &self,
        batch: &Batch,
        conditioning: &Conditioning,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
        first: &mut Option<Tensor>,
    ) -> Result<Tensor, EngineError> {
        let shape = self.latent_shape(batch);
        // Per image: one stream for the initial latents, a second for ancestral noise.
        let mut streams = SeededNoise::new(batch, 0, shape, &self.device);
        let initial = streams.initial()?;
        let mut noise = || streams.fresh();
        let (sources, inpaint) = self.prepare_sources(batch)?;
        self.denoise(
            batch,
            conditioning,
            Start {
                noise: initial,
                sources: sources.as_ref(),
                inpaint: inpaint.as_ref(),
            },
            &mut noise,
            on_step,
            first,
        )
    }

    /// The second pass of a hires batch: `latents` (the first pass's, f32) upscaled to the
    /// second pass's size and denoised from there as image-to-image, under the first pass's
    /// `conditioning` (the same prompts). Its noise comes from each image's seed on streams
    /// of its own, so an image depends on its seed alone.
    fn refine(
        &self,
        batch: &Batch,
        conditioning: &Conditioning,
        hires: &Hires,
        latents: &Tensor,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
    ) -> Result<Tensor, EngineError> {
        let second = Batch {
            width: hires.width,
            height: hires.height,
            steps: hires.steps,
            strength: hires.strength,
            hires: None,
            ..batch.clone()
        };
        let shape = self.latent_shape(&second);
        let upscaled = latents.upsample_bilinear2d(shape.1, shape.2, false)?;
        let mut streams = SeededNoise::new(&second, 2, shape, &self.device);
        let initial = streams.initial()?;
        let mut noise = || streams.fresh();
        // An inpainting UNet sees everything repainted, as for text.
        let (_, inpaint) = self.prepare_sources(&second)?;
        let sources = Sources {
            latents: upscaled,
            blend: None,
            from_noise: false,
        };
        self.denoise(
            &second,
            conditioning,
            Start {
                noise: initial,
                sources: Some(&sources),
                inpaint: inpaint.as_ref(),
            },
            &mut noise,
            on_step,
            &mut None,
        )
    }

    /// Images `[n, 3, h, w]` in `[-1, 1]` (f32, any device) to their scaled latents, f32.
    /// One image at a time, as [`Engine::decode`], for the same reasons.
    pub(crate) fn encode_images(&self, images: &Tensor) -> Result<Tensor, EngineError> {
        let images = images.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
        let latents = (0..images.dim(0)?)
            .map(|i| {
                self.vae_encoder
                    .encode(&images.i(i..i + 1)?)?
                    .to_dtype(DType::F32)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok((Tensor::cat(&latents, 0)? * self.scaling_factor)?)
    }

    /// The batch's source images encoded, their masks at the latents' size, and what an
    /// inpainting UNet sees beside the latents (for a batch without sources too: everything
    /// repainted, nothing kept).
    pub(crate) fn prepare_sources(
        &self,
        batch: &Batch,
    ) -> Result<(Option<Sources>, Option<InpaintInput>), EngineError> {
        let (w, h) = (batch.width as usize, batch.height as usize);
        let (_, lh, lw) = self.latent_shape(batch);
        let n = batch.items.len();
        let sources: Vec<&SourceImage> = batch
            .items
            .iter()
            .filter_map(|i| i.source.as_ref())
            .collect();
        let masks: Vec<&[u8]> = sources.iter().filter_map(|s| s.mask.as_deref()).collect();
        // A pixel in [-1, 1]; zero (grey) where a mask repaints, for the masked image.
        let pixels = |masked: bool| -> candle_core::Result<Tensor> {
            let mut values = Vec::with_capacity(n * 3 * h * w);
            for (k, source) in sources.iter().enumerate() {
                for c in 0..3 {
                    for p in 0..h * w {
                        let repaint = masked && masks.get(k).is_some_and(|m| m[p] >= 128);
                        let v = f32::from(source.rgb[p * 3 + c]) / 127.5 - 1.0;
                        values.push(if repaint { 0.0 } else { v });
                    }
                }
            }
            Tensor::from_vec(values, (sources.len(), 3, h, w), &Device::Cpu)
        };
        // Nearest-neighbour to the latents' size (torch's `interpolate` default): each
        // latent pixel takes the mask at its top-left image pixel.
        let scale = self.vae_scale;
        let latent_masks = if masks.len() == n {
            let mut values = Vec::with_capacity(n * lh * lw);
            for mask in &masks {
                for y in 0..lh {
                    for x in 0..lw {
                        let repaint = mask[(y * scale) * w + x * scale] >= 128;
                        values.push(if repaint { 1f32 } else { 0.0 });
                    }
                }
            }
            Some(Tensor::from_vec(values, (n, 1, lh, lw), &self.device)?)
        } else {
            None
        };
        let encoded = if sources.is_empty() {
            None
        } else {
            Some(self.encode_images(&pixels(false)?)?)
        };
        let inpaint = if self.inpainting_unet {
            let (mask, masked) = match (&latent_masks, &encoded) {
                (Some(mask), _) => (mask.clone(), self.encode_images(&pixels(true)?)?),
                // An image without a mask is repainted everywhere, as text is.
                _ => {
                    let grey = Tensor::zeros((1, 3, h, w), DType::F32, &Device::Cpu)?;
                    let masked = self.encode_images(&grey)?.repeat((n, 1, 1, 1))?;
                    (
                        Tensor::ones((n, 1, lh, lw), DType::F32, &self.device)?,
                        masked,
                    )
                }
            };
            Some(InpaintInput(
                Tensor::cat(&[mask, masked], 1)?.to_dtype(self.dtype)?,
            ))
        } else {
            None
        };
        let sources = encoded.map(|latents| Sources {
            latents,
            from_noise: latent_masks.is_some() && batch.strength >= 1.0,
            blend: latent_masks.filter(|_| !self.inpainting_unet),
        });
        Ok((sources, inpaint))
    }

    /// The latent shape of one image: `[channels, h/8, w/8]`.
    fn latent_shape(&self, batch: &Batch) -> (usize, usize, usize) {
        let scale = self.vae_scale;
        (
            self.latent_channels,
            batch.height as usize / scale,
            batch.width as usize / scale,
        )
    }

    /// Runs the denoising loop from `start` (its noise is `[n, channels, h/8, w/8]`, before
    /// the sampler's initial scaling); returns the final latents, f32. `noise` gives the
    /// ancestral samplers' fresh noise; `first` receives the latents after the first step.
    pub(crate) fn denoise(
        &self,
        batch: &Batch,
        conditioning: &Conditioning,
        start: Start,
        noise: &mut dyn FnMut() -> candle_core::Result<Tensor>,
        on_step: &mut dyn FnMut(StepProgress) -> ControlFlow<()>,
        first: &mut Option<Tensor>,
    ) -> Result<Tensor, EngineError> {
        let n = batch.items.len();
        let guided = guided(batch);
        let mut sampler = sampler(batch.scheduler, &self.schedule, batch.steps as usize);
        // The sampler works in f32 whatever the model's dtype, as diffusers' samplers do.
        let initial = start.noise.to_device(&self.device)?.to_dtype(DType::F32)?;
        let skip = if start.sources.is_some() {
            start_step(batch)
        } else {
            0
        };
        let mut latents = match start.sources {
            Some(s) if !s.from_noise => sampler.add_noise(&s.latents, &initial, skip)?,
            _ => (&initial * sampler.init_noise_sigma())?,
        };
        let inpaint = match start.inpaint {
            Some(InpaintInput(extra)) if guided => Some(Tensor::cat(&[extra, extra], 0)?),
            Some(InpaintInput(extra)) => Some(extra.clone()),
            None => None,
        };
        let mut noise = || noise()?.to_device(&self.device)?.to_dtype(DType::F32);

        // SDXL's size conditioning: original size, crop corner (0, 0), target size.
        let rows = conditioning.context.dim(0)?;
        let (h, w) = (batch.height as f32, batch.width as f32);
        let time_ids =
            Tensor::from_vec([h, w, 0.0, 0.0, h, w].repeat(rows), (rows, 6), &self.device)?;

        let timesteps = sampler.timesteps().to_vec();
        let total = u32::try_from(timesteps.len() - skip).unwrap_or(u32::MAX);
        let unet = &conditioning.networks.unet;
        let added = conditioning
            .pooled
            .as_ref()
            .map(|text_embeds| AddedConditions {
                text_embeds,
                time_ids: &time_ids,
            });
        // Every step's time embedding at once: the steps then upload nothing.
        let tembs = unet.embed_times(&timesteps[skip..], self.dtype, &self.device, added)?;
        for i in skip..timesteps.len() {
            let input = if guided {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let mut input = sampler.scale_model_input(input, i)?.to_dtype(self.dtype)?;
            if let Some(extra) = &inpaint {
                input = Tensor::cat(&[&input, extra], 1)?;
            }
            let output = unet
                .forward_embedded(&input, &tembs.get(i - skip)?, &conditioning.context)?
                .to_dtype(DType::F32)?;
            let output = if guided {
                let (uncond, cond) = (output.i(0..n)?, output.i(n..2 * n)?);
                (&uncond + ((&cond - &uncond)? * f64::from(batch.guidance_scale))?)?
            } else {
                output
            };
            latents = sampler.step(&output, i, &latents, &mut noise)?;
            if let Some((sources, repaint)) =
                start.sources.and_then(|s| s.blend.as_ref().map(|b| (s, b)))
            {
                // What is kept is the source, noised to the level of the next step.
                let kept = if i + 1 < timesteps.len() {
                    sampler.add_noise(&sources.latents, &initial, i + 1)?
                } else {
                    sources.latents.clone()
                };
                let keep = (1.0 - repaint)?;
                latents = (kept.broadcast_mul(&keep)? + latents.broadcast_mul(repaint)?)?;
            }
            if i == skip && first.is_none() {
                *first = Some(latents.clone());
            }
            let done = u32::try_from(i + 1 - skip).unwrap_or(u32::MAX);
            if on_step(StepProgress { step: done, total }).is_break() {
                return Err(EngineError::Cancelled);
            }
        }
        Ok(latents)
    }

    /// Text conditioning for the batch, one call per text encoder for every prompt:
    /// `[uncond…, cond…]` when guided, `[cond…]` otherwise.
    pub(crate) fn encode_prompts(&self, batch: &Batch) -> Result<Conditioning, EngineError> {
        let guided = guided(batch);
        let mut texts: Vec<&str> = Vec::with_capacity(2 * batch.items.len());
        if guided {
            texts.extend(batch.items.iter().map(|i| i.negative_prompt.as_str()));
        }
        texts.extend(batch.items.iter().map(|i| i.prompt.as_str()));
        // A1111's `<lora:NAME:WEIGHT>` tags name LoRAs (applied through `batch.loras`); the
        // encoders read the prompts without them.
        let texts: Vec<String> = texts
            .into_iter()
            .map(|t| sparkle_core::strip_lora_tags(t).into_owned())
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let networks = self.networks(&batch.loras)?;
        let first = &self.text.first;
        let chunked = first.chunked(&texts, &self.device)?;
        let (Some(second), Some(second_model)) = (&self.text.second, &networks.text_2) else {
            let out = networks.text.run(&chunked.ids, first.extra.as_ref())?;
            return Ok(Conditioning {
                context: weighted(out.last, &chunked)?,
                pooled: None,
                networks,
            });
        };
        // SDXL: both encoders' penultimate layers side by side; the second's pooled output,
        // from each prompt's first chunk.
        let features = networks
            .text
            .run(&chunked.ids, first.extra.as_ref())?
            .penultimate;
        let chunked_2 = second.chunked(&texts, &self.device)?;
        let out = second_model.run(&chunked_2.ids, second.extra.as_ref())?;
        let context = Tensor::cat(&[features, out.penultimate], D::Minus1)?;
        let mut context = weighted(context, &chunked)?;
        let firsts: Vec<u32> = (0..texts.len())
            .map(|i| (i * chunked_2.chunks) as u32)
            .collect();
        let firsts = Tensor::from_vec(firsts, texts.len(), &self.device)?;
        let mut pooled =
            second_model.pooled(&out.last.index_select(&firsts, 0)?, &chunked_2.eos)?;
        if guided && self.text.zero_empty_negative {
            let keep: Vec<f32> = texts
                .iter()
                .enumerate()
                .map(|(row, text)| {
                    if row < batch.items.len() && text.is_empty() {
                        0.0
                    } else {
                        1.0
                    }
                })
                .collect();
            let keep = Tensor::from_vec(keep, texts.len(), &self.device)?.to_dtype(self.dtype)?;
            context = context.broadcast_mul(&keep.reshape((texts.len(), 1, 1))?)?;
            pooled = pooled.broadcast_mul(&keep.reshape((texts.len(), 1))?)?;
        }
        Ok(Conditioning {
            context,
            pooled: Some(pooled),
            networks,
        })
    }

    /// Makes the textual-inversion embeddings in `dir` (`NAME.safetensors`) usable by name
    /// in prompts, replacing those loaded before; embeddings for another model family are
    /// left out with the reason.
    pub fn load_embeddings(&mut self, dir: &Path) -> Result<EmbeddingsLoaded, EngineError> {
        let mut widths = vec![self.text.first.width];
        if let Some(second) = &self.text.second {
            widths.push(second.width);
        }
        let (found, skipped) = crate::embeddings::scan(dir, &widths)?;
        let loaded = crate::embeddings::Loaded::new(found, widths.len(), self.dtype, &self.device)?;
        let models = std::iter::once(&self.networks.text).chain(self.networks.text_2.as_ref());
        let encoders = std::iter::once(&mut self.text.first).chain(self.text.second.as_mut());
        for (e, (encoder, model)) in encoders.zip(models).enumerate() {
            let tokenizer = &encoder.tokenizer;
            encoder.placeholders =
                loaded.placeholders(|name| tokenizer.encode(name), model.vocab_size());
            encoder.extra = loaded.rows.get(e).cloned();
        }
        for (name, why) in &skipped {
            tracing::warn!(embedding = %name, reason = %why, "embedding left out");
        }
        let names: Vec<String> = loaded.names.iter().map(|(n, _, _)| n.clone()).collect();
        self.embedding_names = names.clone();
        Ok(EmbeddingsLoaded { names, skipped })
    }

    /// The textual-inversion embeddings prompts may name.
    pub fn embeddings(&self) -> &[String] {
        &self.embedding_names
    }

    /// Makes the LoRAs in `dir` (`NAME.safetensors`) usable by name in batches, replacing
    /// those found before; a file for another model family, or not a LoRA, is left out with
    /// the reason. Only the files' headers are read here; a LoRA's factors are read when a
    /// batch first uses it.
    pub fn load_loras(&mut self, dir: &Path) -> Result<LorasLoaded, EngineError> {
        let targets = self.lora_targets();
        let found = check_loras(dir, &targets)?;
        for (name, why) in &found.skipped {
            tracing::warn!(lora = %name, reason = %why, "LoRA left out");
        }
        self.loras = Loras {
            dir: Some(dir.to_path_buf()),
            names: found.names.clone(),
            targets,
            sets: Mutex::default(),
        };
        Ok(found)
    }

    /// Loads what lies beside the model at `model` (the path it was loaded from): the
    /// textual-inversion embeddings of `embeddings/` and the LoRAs of `loras/`, where
    /// those directories exist.
    pub fn load_beside(&mut self, model: &Path) -> Result<Additions, EngineError> {
        let mut additions = Additions::default();
        let embeddings = crate::embeddings::beside(model);
        if embeddings.is_dir() {
            additions.embeddings = self.load_embeddings(&embeddings)?;
        }
        let loras = lora::beside(model);
        if loras.is_dir() {
            additions.loras = self.load_loras(&loras)?;
        }
        Ok(additions)
    }

    /// The LoRAs batches may name.
    pub fn loras(&self) -> &[String] {
        &self.loras.names
    }

    /// The layers of this model a LoRA may change, by every name the layouts give them.
    fn lora_targets(&self) -> Targets {
        lora_targets(
            self.info.architecture,
            &self.unet_config,
            [
                Some(self.kept.unet.shapes()),
                Some(self.kept.text.0.shapes()),
                self.kept.text_2.as_ref().map(|(kept, _)| kept.shapes()),
            ],
        )
    }

    /// Makes the networks of a set of LoRAs ready (merging them unless the set is among the
    /// last used); how long that took.
    pub fn prepare_loras(&self, loras: &[LoraWeight]) -> Result<std::time::Duration, EngineError> {
        let started = Instant::now();
        self.networks(loras)?;
        Ok(started.elapsed())
    }

    /// What applying the UNet layers of `loras` as low-rank side paths would add to one UNet
    /// call on `rows` latents of `width × height` (guidance doubles the rows), instead of
    /// merging them: for every linear layer a LoRA changes, its two low-rank products and
    /// the addition into the layer's output, on the device, at the rows the layer sees
    /// there (the latent's tokens at its level, 77 per text chunk for cross-attention keys and
    /// values). Convolutions (LoCon) are left out, so this is a lower bound. The best of
    /// `repeat` passes; and the layers counted.
    pub fn time_lora_side_paths(
        &self,
        loras: &[LoraWeight],
        rows: usize,
        width: u32,
        height: u32,
        repeat: usize,
    ) -> Result<(std::time::Duration, usize), EngineError> {
        let levels = self.unet_config.blocks.len();
        let (lh, lw) = (
            height as usize / self.vae_scale,
            width as usize / self.vae_scale,
        );
        let level_of = |name: &str| -> usize {
            let mut parts = name.split('.');
            match (
                parts.next(),
                parts.next().and_then(|i| i.parse::<usize>().ok()),
            ) {
                (Some("down_blocks"), Some(i)) => i,
                (Some("up_blocks"), Some(i)) => levels.saturating_sub(1 + i),
                _ => levels.saturating_sub(1),
            }
        };
        let mut paths = Vec::new();
        for l in loras {
            for d in self
                .read_lora(l)?
                .iter()
                .filter(|d| d.network == Network::Unet && d.down.rank() == 2)
            {
                let level = level_of(&d.weight);
                let tokens = if d.weight.contains("attn2.to_k") || d.weight.contains("attn2.to_v") {
                    77
                } else {
                    (lh >> level).max(1) * (lw >> level).max(1)
                };
                let n = rows * tokens;
                let (rank, input) = d.down.dims2()?;
                let out = d.up.dim(0)?;
                let to = |t: Tensor| -> candle_core::Result<Tensor> {
                    t.to_device(&self.device)?.to_dtype(self.dtype)
                };
                let down_t = to(d.down.t()?.contiguous()?)?;
                let up_t = to(
                    (d.up.reshape((out, rank))?.t()? * f64::from(d.scale * l.weight))?
                        .contiguous()?,
                )?;
                let x = to(Tensor::randn(0f32, 1.0, (n, input), &Device::Cpu)?)?;
                let y = Tensor::zeros((n, out), self.dtype, &self.device)?;
                paths.push((x, down_t, up_t, y));
            }
        }
        let pass = || -> candle_core::Result<()> {
            for (x, down_t, up_t, y) in &paths {
                let side = x.matmul(down_t)?.matmul(up_t)?;
                let _sum = (y + side)?;
            }
            self.device.synchronize()
        };
        pass()?;
        let mut best = std::time::Duration::MAX;
        for _ in 0..repeat.max(1) {
            let started = Instant::now();
            pass()?;
            best = best.min(started.elapsed());
        }
        Ok((best, paths.len()))
    }

    /// The networks for a set of LoRAs: the model's own for none; else the set's merged
    /// networks, from the last sets used or merged now.
    fn networks(&self, loras: &[LoraWeight]) -> Result<Arc<Networks>, EngineError> {
        if loras.is_empty() {
            return Ok(Arc::clone(&self.networks));
        }
        let mut key = loras.to_vec();
        key.sort_by(|a, b| a.name.cmp(&b.name));
        let sets = || {
            self.loras
                .sets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        {
            let mut sets = sets();
            if let Some(i) = sets.iter().position(|(k, _)| *k == key) {
                let used = sets.remove(i);
                let networks = Arc::clone(&used.1);
                sets.insert(0, used);
                return Ok(networks);
            }
        }
        // The least recently used set goes before a new one is merged, so that at most
        // LORA_SETS_KEPT sets are ever on the device.
        sets().truncate(LORA_SETS_KEPT - 1);
        let networks = Arc::new(self.merge_loras(&key)?);
        let mut sets = sets();
        sets.insert(0, (key, Arc::clone(&networks)));
        sets.truncate(LORA_SETS_KEPT);
        Ok(networks)
    }

    /// The factors of a LoRA this model has, read from its file, for a finite weight.
    fn read_lora(&self, l: &LoraWeight) -> Result<Vec<lora::Delta>, EngineError> {
        let refuse = |why: String| EngineError::InvalidRequest(why);
        let (Some(dir), true) = (&self.loras.dir, self.loras.names.contains(&l.name)) else {
            return Err(refuse(format!(
                "unknown LoRA {:?} (this model has: {})",
                l.name,
                self.loras.names.join(", ")
            )));
        };
        if !l.weight.is_finite() {
            return Err(refuse(format!(
                "LoRA {:?}: the weight must be finite",
                l.name
            )));
        }
        let file = dir.join(format!("{}.safetensors", l.name));
        lora::read(&file, &self.loras.targets)
            .map_err(|why| refuse(format!("LoRA {:?}: {why}", l.name)))
    }

    /// The model's networks with `loras` merged into a copy of each weight they touch.
    fn merge_loras(&self, loras: &[LoraWeight]) -> Result<Networks, EngineError> {
        let started = Instant::now();
        let mut read = Vec::with_capacity(loras.len());
        for (i, l) in loras.iter().enumerate() {
            if loras[..i].iter().any(|other| other.name == l.name) {
                return Err(EngineError::InvalidRequest(format!(
                    "LoRA {:?} is named twice",
                    l.name
                )));
            }
            read.push((self.read_lora(l)?, l.weight));
        }
        let mut merged = lora::merge(&read, |network, name| {
            self.kept.of(network)?.get(name).cloned()
        })?;
        let kept = &self.kept;
        let unet = match merged.remove(&Network::Unet) {
            None => Arc::clone(&self.networks.unet),
            Some(changed) => {
                Arc::new(kept.unet.rebuild(changed, self.dtype, &self.device, |vb| {
                    UNet::new(vb, &self.unet_config)
                })?)
            }
        };
        let text = match merged.remove(&Network::TextEncoder) {
            None => Arc::clone(&self.networks.text),
            Some(changed) => {
                let (base, config) = &kept.text;
                Arc::new(base.rebuild(changed, self.dtype, &self.device, |vb| {
                    ClipTextModel::new(vb, config)
                })?)
            }
        };
        let text_2 = match (merged.remove(&Network::TextEncoder2), &kept.text_2) {
            (Some(changed), Some((base, config))) => Some(Arc::new(base.rebuild(
                changed,
                self.dtype,
                &self.device,
                |vb| ClipTextModel::with_projection(vb, config),
            )?)),
            _ => self.networks.text_2.clone(),
        };
        tracing::info!(
            loras = ?loras, seconds = started.elapsed().as_secs_f32(), "LoRAs merged"
        );
        Ok(Networks { unet, text, text_2 })
    }

    /// `text` as the first text encoder's tokenizer reads it.
    #[cfg(test)]
    pub(crate) fn first_tokens(&self, text: &str) -> Vec<u32> {
        self.text.first.tokenizer.encode(text)
    }

    /// Latents to images in `[-1, 1]`, `[n, 3, h, w]`, f32.
    ///
    /// One image at a time: the decoder's activations at full resolution are the largest
    /// tensors of the pipeline, and candle 0.11.1's CPU matmul folds a batch whose weights
    /// are shared into one product even when the input is a transposed view (as in the
    /// VAE's attention block), which computes every image but the first wrongly.
    pub(crate) fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        let latents = (latents / self.scaling_factor)?.to_dtype(self.vae_dtype)?;
        let images = (0..latents.dim(0)?)
            .map(|i| self.vae.decode(&latents.i(i..i + 1)?)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }
}

/// The layers of a model a LoRA may change: its networks' weights (UNet, text encoder, SDXL's
/// second text encoder) by name and shape.
fn lora_targets(
    architecture: Architecture,
    unet: &UNetConfig,
    [unet_weights, text, text_2]: [Option<Shapes>; 3],
) -> Targets {
    let sdxl = architecture == Architecture::Sdxl;
    let mut targets = Targets::default();
    let ldm = |name: &str| crate::single_file::ldm_unet_name(unet, name);
    for (network, weights) in [
        (Network::Unet, unet_weights),
        (Network::TextEncoder, text),
        (Network::TextEncoder2, text_2),
    ] {
        if let Some(weights) = weights {
            targets.add(network, &weights, ldm, sdxl);
        }
    }
    targets
}

/// What a model can use beside its own weights, from the directories beside it: the
/// textual-inversion embeddings and LoRAs that fit it, and those left out with why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Additions {
    pub embeddings: EmbeddingsLoaded,
    pub loras: LorasLoaded,
}

impl Additions {
    /// Reads the model's configuration, the embeddings (small) and the LoRAs' headers; loads
    /// no weights. What a control plane lists and checks requests against.
    pub fn of(model: &Path) -> Result<Additions, EngineError> {
        let layout = Layout::open(model)?;
        let configs = layout.configs()?;
        let architecture = layout.architecture(&configs);
        let mut additions = Additions::default();
        let embeddings = crate::embeddings::beside(model);
        if embeddings.is_dir() {
            let mut widths = vec![configs.text_encoder.hidden_size];
            widths.extend(configs.text_encoder_2.as_ref().map(|c| c.hidden_size));
            let (found, skipped) = crate::embeddings::scan(&embeddings, &widths)?;
            additions.embeddings = EmbeddingsLoaded {
                names: found.into_iter().map(|(name, _)| name).collect(),
                skipped,
            };
        }
        let loras = lora::beside(model);
        if loras.is_dir() {
            let unet = crate::weights::shapes_of(|vb| UNet::new(vb, &configs.unet))?;
            let text =
                crate::weights::shapes_of(|vb| ClipTextModel::new(vb, &configs.text_encoder))?;
            let text_2 = match &configs.text_encoder_2 {
                None => None,
                Some(config) => Some(crate::weights::shapes_of(|vb| {
                    ClipTextModel::with_projection(vb, config)
                })?),
            };
            let targets = lora_targets(
                architecture,
                &configs.unet,
                [Some(unet), Some(text), text_2],
            );
            additions.loras = check_loras(&loras, &targets)?;
        }
        Ok(additions)
    }
}

/// The LoRA files in `dir` that fit the model of these targets, and those that do not, with
/// why; headers only.
fn check_loras(dir: &Path, targets: &Targets) -> Result<LorasLoaded, EngineError> {
    let mut found = LorasLoaded::default();
    for name in lora::list(dir)? {
        match lora::check(&dir.join(format!("{name}.safetensors")), targets) {
            Ok(_) => found.names.push(name),
            Err(why) => found.skipped.push((name, why)),
        }
    }
    Ok(found)
}

/// Noise from each image's seed alone, whatever batch it is in: its initial latents from
/// stream `first` of the seed's generator, the fresh noise an ancestral sampler draws at
/// each step from stream `first + 1`.
struct SeededNoise<'a> {
    streams: Vec<(ChaCha8Rng, ChaCha8Rng)>,
    shape: (usize, usize, usize),
    device: &'a Device,
}

impl<'a> SeededNoise<'a> {
    fn new(batch: &Batch, first: u64, shape: (usize, usize, usize), device: &'a Device) -> Self {
        let stream = |seed: u64, n: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(n);
            rng
        };
        SeededNoise {
            streams: batch
                .items
                .iter()
                .map(|item| (stream(item.seed, first), stream(item.seed, first + 1)))
                .collect(),
            shape,
            device,
        }
    }

    /// `[n, channels, h, w]` from each image's first stream.
    fn initial(&mut self) -> candle_core::Result<Tensor> {
        self.draw(|(first, _)| first)
    }

    /// `[n, channels, h, w]` from each image's second stream.
    fn fresh(&mut self) -> candle_core::Result<Tensor> {
        self.draw(|(_, second)| second)
    }

    /// `[n, channels, h, w]`, each image's from the stream `pick` chooses of its two.
    fn draw(
        &mut self,
        pick: fn(&mut (ChaCha8Rng, ChaCha8Rng)) -> &mut ChaCha8Rng,
    ) -> candle_core::Result<Tensor> {
        let (shape, device) = (self.shape, self.device);
        let drawn = self
            .streams
            .iter_mut()
            .map(|pair| normal(pick(pair), shape, device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::stack(&drawn, 0)
    }
}

/// Where a denoising loop starts: its noise, and for image-to-image and inpainting the
/// sources it starts from and what an inpainting UNet sees beside the latents.
pub(crate) struct Start<'a> {
    pub noise: Tensor,
    pub sources: Option<&'a Sources>,
    pub inpaint: Option<&'a InpaintInput>,
}

/// The first step that runs for a loop that starts from latents (a source's, or a first
/// pass's): diffusers' `get_timesteps`.
fn start_step(batch: &Batch) -> usize {
    (batch.steps - steps_at(batch.steps, batch.strength)) as usize
}

/// The steps of a `steps`-step schedule that run from latents at `strength`: the last
/// `⌊steps × strength⌋` (the rule validation counts by).
fn steps_at(steps: u32, strength: f32) -> u32 {
    sparkle_core::steps_run(steps, strength)
}

impl Batch {
    /// The denoising steps that run for each image in the first pass: all of them for
    /// text, the strength's share (rounded down) from a source image.
    pub fn steps_run(&self) -> u32 {
        if self.items.iter().any(|i| i.source.is_some()) {
            steps_at(self.steps, self.strength)
        } else {
            self.steps
        }
    }

    /// The size the images come out at: the second pass's, with one.
    pub fn output_size(&self) -> (u32, u32) {
        self.hires
            .map_or((self.width, self.height), |h| (h.width, h.height))
    }
}

/// What [`Engine::probe`] returns.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Latents after the first step, `[n, channels, h/8, w/8]` flattened.
    pub first_step: Vec<f32>,
    /// Decoded images in about `[-1, 1]`, `[n, 3, h, w]` flattened.
    pub image: Vec<f32>,
}

impl Probe {
    /// `‖a − b‖ / ‖b‖` per part: (first step, image).
    pub fn relative_error(&self, reference: &Probe) -> (f64, f64) {
        fn rel(a: &[f32], b: &[f32]) -> f64 {
            let (mut diff, mut norm) = (0f64, 0f64);
            for (x, y) in a.iter().zip(b) {
                diff += f64::from(x - y).powi(2);
                norm += f64::from(*y).powi(2);
            }
            if a.len() != b.len() {
                return f64::INFINITY;
            }
            (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
        }
        (
            rel(&self.first_step, &reference.first_step),
            rel(&self.image, &reference.image),
        )
    }
}

/// One UNet row's peak activations, in units of (latent pixels × first-level channels ×
/// element size): the skip connections kept for the decoder, the transformer's q, k, v and
/// output, and its 8×-wide feed-forward projection, with room to spare.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const ROW_ACTIVATIONS: u64 = 48;

/// What the system says is available for new work (`MemAvailable`), in bytes.
pub fn available_system_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Classifier-free guidance is on above a scale of 1; at 1 or below it would change nothing.
fn guided(batch: &Batch) -> bool {
    batch.guidance_scale > 1.0
}

/// Checks that the parts agree with each other before any weight is read.
fn check_parts_fit(
    layout: &Layout,
    encoders: &[(&Tokenizer, &ClipConfig)],
    unet: &UNetConfig,
    vae: &VaeConfig,
) -> Result<(), EngineError> {
    let unet_file = layout.config_file(Part::Unet);
    let vae_file = layout.config_file(Part::Vae);
    let width: usize = encoders.iter().map(|(_, c)| c.hidden_size).sum();
    if width != unet.cross_attention_dim {
        return Err(EngineError::invalid_model(
            unet_file,
            format!(
                "cross_attention_dim {} does not match the text features' width {width}",
                unet.cross_attention_dim
            ),
        ));
    }
    match (&unet.addition, encoders.get(1)) {
        (Some(added), Some((_, second))) => {
            let expected = second.projection_dim + 6 * added.time_embed_dim;
            if added.input_dim != expected {
                return Err(EngineError::invalid_model(
                    unet_file,
                    format!(
                        "projection_class_embeddings_input_dim is {}; the pooled text ({}) and \
                         six ids of {} make {expected}",
                        added.input_dim, second.projection_dim, added.time_embed_dim
                    ),
                ));
            }
        }
        (Some(_), None) => {
            return Err(EngineError::invalid_model(
                layout.path(),
                "the UNet wants pooled text features, but there is no text_encoder_2",
            ))
        }
        (None, Some(_)) => {
            return Err(EngineError::invalid_model(
                unet_file,
                "there is a text_encoder_2, but the UNet has no addition_embed_type",
            ))
        }
        (None, None) => {}
    }
    let latent = vae.candle.latent_channels;
    // An inpainting UNet takes the mask and the masked image's latents beside the latents.
    let inpainting = 2 * latent + 1;
    if (unet.in_channels != latent && unet.in_channels != inpainting) || unet.out_channels != latent
    {
        return Err(EngineError::invalid_model(
            unet_file,
            format!(
                "in_channels {} must be the VAE's latent_channels {latent} (or {inpainting} \
                 for inpainting), and out_channels {} must be {latent}",
                unet.in_channels, unet.out_channels
            ),
        ));
    }
    if vae.out_channels != 3 {
        return Err(EngineError::invalid_model(
            vae_file,
            format!("out_channels is {}; RGB needs 3", vae.out_channels),
        ));
    }
    for (i, (tokenizer, clip)) in encoders.iter().enumerate() {
        if tokenizer.max_id() as usize >= clip.vocab_size {
            return Err(EngineError::invalid_model(
                layout.vocab_file(i > 0),
                format!(
                    "has token id {}, beyond the text encoder's vocab_size {}",
                    tokenizer.max_id(),
                    clip.vocab_size
                ),
            ));
        }
    }
    Ok(())
}

/// Standard normal noise from a seeded stream, made on the CPU so that an image depends
/// only on its seed, not on the device or the rest of the batch.
fn normal(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize, usize),
    device: &Device,
) -> candle_core::Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2;
    let values: Vec<f32> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)
}

/// `[n, 3, h, w]` images in `[-1, 1]` to RGB8, rounding to the nearest level.
fn to_rgb8(images: &Tensor, width: u32, height: u32) -> Result<Vec<GeneratedImage>, EngineError> {
    let images = ((images / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let images = (images * 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .to_device(&Device::Cpu)?;
    (0..images.dim(0)?)
        .map(|i| {
            Ok(GeneratedImage {
                width,
                height,
                rgb: images.i(i)?.flatten_all()?.to_vec1::<u8>()?,
            })
        })
        .collect()
}
