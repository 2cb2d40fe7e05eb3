//! Stable Diffusion 1.x, 2.x and XL on candle: everything between a prompt and RGB pixels.
//!
//! This crate owns the model: reading a directory in the diffusers layout, the networks,
//! the samplers and the image bytes. [`Engine::load`] reads the configuration of every part
//! (text encoder, UNet, VAE, noise schedule), checks that the parts fit together, then
//! memory-maps each safetensors file and builds its network, checking every tensor's name
//! and shape on the way so that a broken file is reported by file and tensor. The VAE is
//! candle's; the UNet (SD 1.x/2.x/XL, with SDXL's added conditioning), the CLIP text
//! encoders and the tokenizer are our own. Weights live on the CPU in f32 or on a CUDA device in
//! f16.
//!
//! [`Engine::generate`] runs a [`Batch`]: all prompts and negative prompts are tokenized
//! and encoded in one text-encoder call; each image's initial latents come from its own
//! seeded ChaCha8 stream, drawn on the CPU, so an image depends on its seed alone, not on
//! the device or the rest of the batch; the denoising loop runs the UNet once per step on
//! the whole batch, with classifier-free guidance and one of our samplers (Euler, Euler a,
//! DDIM, DPM++ 2M Karras); the VAE decodes the result to RGB8. A step callback reports
//! progress and can cancel the batch. [`encode_png`] then writes an image with its
//! generation parameters, and [`write_tiny_model`] writes a small model of the real
//! architecture for tests and demos.
//!
//! The engine is synchronous and knows nothing of tokio, HTTP or the queue: the worker runs
//! it on its own OS thread.

mod clip;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
pub mod embeddings;
mod error;
mod kernel_bench;
mod layers;
mod layout;
pub mod lora;
mod model;
mod pipeline;
mod png;
pub mod prompt;
mod schedulers;
mod single_file;
mod tiny;
mod tokenizer;
mod unet;
mod vae;
mod vocab;
mod weights;

pub use error::EngineError;
pub use kernel_bench::{time_attention, AttentionShape, AttentionTiming};

/// Whether this build runs on NVIDIA GPUs (the `cuda` feature).
pub const CUDA: bool = cfg!(feature = "cuda");
pub use model::{describe, Architecture, Defaults, ModelDescription, ModelFormat, ModelInfo};
pub use pipeline::{
    Additions, Batch, BatchItem, DeviceChoice, EmbeddingsLoaded, Engine, EngineOptions,
    GeneratedImage, Hires, LorasLoaded, Precision, Probe, SourceImage, StepProgress,
};
pub use png::encode_png;
pub use single_file::write::{write_random_single_file, write_single_file};
pub use tiny::{write_random, write_tiny_model, ModelScale, RandomModel};

#[cfg(test)]
mod parity_tests;
#[cfg(test)]
mod tests;
