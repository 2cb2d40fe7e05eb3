//! Stable Diffusion on candle: everything between a prompt and RGB pixels.
//!
//! [`Engine::load`] reads a model in the diffusers layout — CLIP's tokenizer files, the
//! text encoder, UNet and VAE weights (memory-mapped safetensors, checked tensor by tensor),
//! the noise schedule — onto the CPU (f32) or a CUDA device (f16). [`Engine::generate`] runs
//! a [`Batch`]: every prompt and negative prompt through the text encoder in one call, seeded
//! latents per image (made on the CPU, so an image depends only on its seed), the denoising
//! loop with classifier-free guidance and one of our [`schedulers`], then the VAE decode.
//! A step callback reports progress and can stop the batch.
//!
//! The engine is synchronous and knows nothing of tokio, HTTP or the queue: the worker runs
//! it on its own OS thread.

mod clip;
mod config;
mod error;
mod pipeline;
mod png;
pub mod schedulers;
mod tiny;
mod tokenizer;
mod vocab;
mod weights;

pub use error::EngineError;
pub use pipeline::{Batch, BatchItem, DeviceChoice, Engine, EngineOptions, StepProgress};
pub use png::encode_png;
pub use tiny::write_tiny_model;

use std::fmt;
use std::path::Path;

/// The model families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Sd15,
    Sd21,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Architecture::Sd15 => "sd1.5",
            Architecture::Sd21 => "sd2.1",
        })
    }
}

/// What a loaded engine runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub name: String,
    pub architecture: Architecture,
    /// The size the model was trained at, in pixels per side.
    pub native_size: u32,
    pub vae_scale_factor: u32,
    pub device: String,
    pub dtype: String,
}

/// A model directory, described from its configuration files without loading weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    pub name: String,
    pub architecture: Architecture,
    pub native_size: u32,
    /// Total size of the weight files, in bytes.
    pub bytes: u64,
}

/// Describes the model in `dir` from its configuration files.
pub fn describe(dir: &Path) -> Result<ModelDescription, EngineError> {
    let unet = config::UNetConfig::read(&dir.join("unet"))?;
    let vae = config::VaeConfig::read(&dir.join("vae"))?;
    let schedule = config::ScheduleConfig::read(&dir.join("scheduler"))?;
    let mut bytes = 0;
    for part in ["text_encoder", "unet", "vae"] {
        let file = weights::weight_file(&dir.join(part))?;
        bytes += std::fs::metadata(&file)
            .map_err(|e| EngineError::io(&file, e))?
            .len();
    }
    Ok(ModelDescription {
        name: pipeline::model_name(dir),
        architecture: pipeline::architecture(&schedule, unet.candle.cross_attention_dim),
        native_size: (unet.sample_size * vae.scale_factor()) as u32,
        bytes,
    })
}

/// An RGB8 image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedImage {
    pub width: u32,
    pub height: u32,
    pub rgb: Vec<u8>,
}

#[cfg(test)]
mod tests;
