//! Weight files: found in the diffusers layout, checked tensor by tensor before a network is
//! built, so a missing or mis-shaped tensor is reported by name and file.

use crate::EngineError;
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};

/// The safetensors file of one part (`unet`, `vae`, `text_encoder`).
pub fn weight_file(part_dir: &Path) -> Result<PathBuf, EngineError> {
    let candidates = [
        "model.safetensors",
        "diffusion_pytorch_model.safetensors",
        "model.fp16.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
    ];
    candidates
        .iter()
        .map(|name| part_dir.join(name))
        .find(|p| p.exists())
        .ok_or_else(|| {
            EngineError::InvalidModel(format!(
                "{}: no weights (looked for {})",
                part_dir.display(),
                candidates.join(", ")
            ))
        })
}

/// Memory-maps a safetensors file as a `VarBuilder`.
#[allow(unsafe_code)]
pub fn mmap(
    file: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, EngineError> {
    // SAFETY: the mapping is only sound while the file is not modified. Model files are
    // written once and only read afterwards (a model is replaced by a new directory, never
    // rewritten in place), which is the contract of the model directory.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, device) }
        .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", file.display())))
}

/// Builds a network, turning candle's "cannot find tensor" and shape errors into errors
/// that name the file.
pub fn build<T>(
    file: &Path,
    make: impl FnOnce() -> candle_core::Result<T>,
) -> Result<T, EngineError> {
    make().map_err(|e| EngineError::InvalidModel(format!("{}: {}", file.display(), flatten(&e))))
}

fn flatten(e: &candle_core::Error) -> String {
    // candle wraps errors with backtraces and context; keep the first line of the message.
    e.to_string().lines().next().unwrap_or_default().to_string()
}
