//! What a model is: its family, its native size, and how it is described to the rest of the
//! service, read from configuration files (or a single file's header) alone.

use crate::config::{Prediction, ScheduleConfig, UNetConfig, VaeConfig};
use crate::layout::Layout;
use crate::EngineError;
use std::fmt;
use std::path::Path;

/// The model families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Stable Diffusion 1.x: CLIP ViT-L/14 text features (768 wide), epsilon prediction.
    Sd15,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H/14 text features (1024 wide), usually
    /// v-prediction.
    Sd21,
    /// Stable Diffusion XL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, features
    /// concatenated), pooled text and size/crop conditioning added to the time embedding.
    Sdxl,
}

impl Architecture {
    /// SDXL by its added conditioning; the others by the text-feature width the UNet
    /// attends to; models of neither width (tiny test models) by the prediction type, which
    /// is what tells the two families apart in the sampler.
    pub(crate) fn detect(unet: &UNetConfig, schedule: &ScheduleConfig) -> Self {
        if unet.addition.is_some() {
            return Architecture::Sdxl;
        }
        match unet.cross_attention_dim {
            768 => Architecture::Sd15,
            1024 => Architecture::Sd21,
            _ if schedule.prediction == Prediction::VPrediction => Architecture::Sd21,
            _ => Architecture::Sd15,
        }
    }
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Sd15 => "sd1.5",
            Architecture::Sd21 => "sd2.1",
            Architecture::Sdxl => "sdxl",
        })
    }
}

/// How a model is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// A directory with one subdirectory per part.
    Diffusers,
    /// One `.safetensors` checkpoint in the original code's layout.
    SingleFile,
}

impl fmt::Display for ModelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelFormat::Diffusers => "diffusers",
            ModelFormat::SingleFile => "single file",
        })
    }
}

/// What a loaded engine runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The model directory's name, or the single file's without its extension.
    pub name: String,
    pub architecture: Architecture,
    /// The size the model was trained at, in pixels per side.
    pub native_size: u32,
    /// How many pixels one latent stands for, per side; image sides are multiples of it.
    pub vae_scale_factor: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `f32` or `f16`.
    pub dtype: String,
}

/// A model, described from its configuration files (or a single file's header) without
/// loading weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    pub name: String,
    pub format: ModelFormat,
    pub architecture: Architecture,
    pub native_size: u32,
    /// Total size of the weight files, in bytes.
    pub bytes: u64,
    /// What a request that names nothing gets from this model.
    pub defaults: Defaults,
}

/// A model's sensible request defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Defaults {
    pub steps: u32,
    pub guidance_scale: f32,
    pub scheduler: sparkle_core::Scheduler,
    /// A distilled few-step model (SD-Turbo and kin): 1–4 steps, no classifier-free guidance.
    pub few_step: bool,
}

impl Defaults {
    /// Distilled few-step models ship a "trailing" timestep spacing (every step lands on the
    /// timesteps they were distilled at) and are run with 1–4 steps and no guidance; the rest
    /// get the usual 20 Euler steps at CFG 7.5.
    pub(crate) fn for_schedule(schedule: &ScheduleConfig) -> Self {
        use sparkle_core::Scheduler;
        if schedule.timestep_spacing == Some(crate::config::Spacing::Trailing) {
            Defaults {
                steps: 1,
                guidance_scale: 0.0,
                scheduler: Scheduler::Euler,
                few_step: true,
            }
        } else {
            Defaults {
                steps: 20,
                guidance_scale: 7.5,
                scheduler: Scheduler::Euler,
                few_step: false,
            }
        }
    }
}

/// Describes the model at `path`: a directory in the diffusers layout, or a single-file
/// `.safetensors` checkpoint.
pub fn describe(path: &Path) -> Result<ModelDescription, EngineError> {
    let layout = Layout::open(path)?;
    let configs = layout.configs()?;
    Ok(ModelDescription {
        name: layout.name(),
        format: match layout {
            Layout::Diffusers(_) => ModelFormat::Diffusers,
            Layout::SingleFile(_) => ModelFormat::SingleFile,
        },
        architecture: layout.architecture(&configs),
        native_size: native_size(&configs.unet, &configs.vae),
        bytes: layout.weight_bytes(&configs)?,
        defaults: Defaults::for_schedule(&configs.schedule),
    })
}

pub(crate) fn native_size(unet: &UNetConfig, vae: &VaeConfig) -> u32 {
    u32::try_from(unet.sample_size.saturating_mul(vae.scale_factor())).unwrap_or(u32::MAX)
}
