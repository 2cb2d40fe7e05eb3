//! Single-file checkpoints: the one `.safetensors` file that Stable Diffusion's original code
//! saved and that most fine-tunes are shared as, every network under its own prefix
//! (`model.diffusion_model.`, `first_stage_model.`, `cond_stage_model.` or SDXL's
//! `conditioner.embedders.0/1.`).
//!
//! Reading one takes three steps, none of which reads a weight:
//!
//! 1. The header ([`header`]) says which family the file is, by where its text encoders live:
//!    CLIP under `cond_stage_model.transformer.` (SD 1.x), OpenCLIP under
//!    `cond_stage_model.model.` (SD 2.x), both under `conditioner.embedders.` (SDXL; the
//!    refiner, with OpenCLIP alone, is refused).
//! 2. The configurations a diffusers directory would hold are derived from tensor shapes
//!    ([`shapes`]): channels, levels, blocks per level, transformer depths, widths, vocabulary.
//!    What shapes cannot say follows the family's convention — attention heads of 8 (SD 1.x)
//!    or 64 wide (SD 2.x, XL), 1000 scaled-linear training steps — unless the file's metadata
//!    says otherwise; the prediction type, native size and a few-step schedule come from a
//!    settings file beside the checkpoint, then ModelSpec metadata, then the family
//!    ([`variant`]).
//! 3. Each network is built through the weight loader with its key map ([`keys`]), so every
//!    tensor is checked by the name the file stores it under: a missing, mis-shaped or
//!    unexpected tensor under a network's prefix is an error that names it. Tensors outside
//!    every network's prefix (EMA copies, training buffers) are not read.
//!
//! Single files carry no tokenizer: every family uses CLIP's, which is bundled.
//! [`write`] goes the other way, from a diffusers directory to a single file, with the same
//! key maps.

mod header;
mod keys;
mod shapes;
mod variant;
pub(crate) mod write;

use crate::layout::{Configs, Part};
use crate::model::Architecture;
use crate::tokenizer::Tokenizer;
use crate::weights::Naming;
use crate::EngineError;
use header::Header;
use keys::{ClipKeys, KeyMap, LdmNames, OpenClipKeys, UNetKeys, VaeKeys};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub(crate) use variant::Settings;

/// File extensions of pickled checkpoints, which are refused by name: unpickling runs code.
const PICKLES: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// A single-file checkpoint whose configurations are known and whose weights are not yet read.
pub(crate) struct Checkpoint {
    file: PathBuf,
    architecture: Architecture,
    configs: Configs,
}

impl Checkpoint {
    /// Reads `file`'s header (and settings file, if any) and derives every configuration.
    pub fn read(file: &Path) -> Result<Self, EngineError> {
        let extension = file
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        if PICKLES.contains(&extension.to_ascii_lowercase().as_str()) {
            return Err(EngineError::invalid_model(
                file,
                "a pickled checkpoint; only .safetensors files are loaded (unpickling runs code)",
            ));
        }
        let header = Header::read(file)?;
        let architecture = detect(&header, file)?;
        let settings = Settings::beside(file)?;
        let variant = variant::Variant::choose(architecture, &header.metadata, &settings, file)?;
        let configs = shapes::configs(&header, file, architecture, &variant)?;
        Ok(Checkpoint {
            file: file.to_path_buf(),
            architecture,
            configs,
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn architecture(&self) -> Architecture {
        self.architecture
    }

    pub fn configs(&self) -> &Configs {
        &self.configs
    }

    /// CLIP's tokenizer, padding as the family's own tokenizer files do: SD 1.x's and SDXL's
    /// first with end-of-text, OpenCLIP's with `!`.
    pub fn tokenizers(&self) -> Result<(Tokenizer, Option<Tokenizer>), EngineError> {
        let clip = || Tokenizer::bundled(None, &self.file);
        let open_clip = || Tokenizer::bundled(Some("!"), &self.file);
        Ok(match self.architecture {
            Architecture::Sd15 => (clip()?, None),
            Architecture::Sd21 => (open_clip()?, None),
            Architecture::Sdxl => (clip()?, Some(open_clip()?)),
        })
    }

    /// Where each of a network's tensors is stored in the file.
    pub fn naming(&self, part: Part) -> Arc<dyn Naming> {
        Arc::new(LdmNames(key_map(self.architecture, part, &self.configs)))
    }
}

/// A UNet weight's name (diffusers') in the original (LDM) layout, without a checkpoint's
/// prefix: the names SDXL's kohya-ss LoRAs are written in.
pub(crate) fn ldm_unet_name(config: &crate::config::UNetConfig, name: &str) -> Option<String> {
    let stored = UNetKeys::new(config).ldm(name)?;
    stored.key.strip_prefix(keys::UNET).map(str::to_string)
}

/// The key map of one network of a checkpoint of `architecture` with these configurations.
fn key_map(architecture: Architecture, part: Part, configs: &Configs) -> Box<dyn KeyMap> {
    let text_layers = configs.text_encoder.num_hidden_layers;
    match (part, architecture) {
        (Part::Unet, _) => Box::new(UNetKeys::new(&configs.unet)),
        (Part::Vae, _) => Box::new(VaeKeys::new(configs.vae.candle.block_out_channels.len())),
        (Part::TextEncoder, Architecture::Sd15) => Box::new(ClipKeys::new(keys::SD1_CLIP)),
        (Part::TextEncoder, Architecture::Sd21) => {
            Box::new(OpenClipKeys::new(keys::SD2_OPEN_CLIP, text_layers, false))
        }
        (Part::TextEncoder, Architecture::Sdxl) => Box::new(ClipKeys::new(keys::SDXL_CLIP)),
        (Part::TextEncoder2, _) => {
            let layers = configs
                .text_encoder_2
                .as_ref()
                .map_or(0, |c| c.num_hidden_layers);
            Box::new(OpenClipKeys::new(keys::SDXL_OPEN_CLIP, layers, true))
        }
    }
}

/// The family, from where the text encoders live; refuses what is not a checkpoint of one.
fn detect(header: &Header, file: &Path) -> Result<Architecture, EngineError> {
    let refuse = |why: String| Err(EngineError::invalid_model(file, why));
    if header.any_under(keys::SDXL_REFINER_OPEN_CLIP) {
        return refuse(format!(
            "an SDXL refiner checkpoint (OpenCLIP alone, under {}); only SDXL base models \
             run here",
            keys::SDXL_REFINER_OPEN_CLIP
        ));
    }
    let architecture = if header.any_under("conditioner.embedders.") {
        for prefix in [keys::SDXL_CLIP, keys::SDXL_OPEN_CLIP] {
            if !header.any_under(prefix) {
                return refuse(format!(
                    "an SDXL checkpoint without its text encoder under {prefix}"
                ));
            }
        }
        Architecture::Sdxl
    } else if header.any_under(keys::SD1_CLIP) {
        Architecture::Sd15
    } else if header.any_under(keys::SD2_OPEN_CLIP) {
        Architecture::Sd21
    } else {
        return refuse(not_a_checkpoint(header));
    };
    for (prefix, network) in [(keys::UNET, "UNet"), (keys::VAE, "VAE")] {
        if !header.any_under(prefix) {
            return refuse(format!(
                "a {architecture} checkpoint without its {network} (no tensor under {prefix})"
            ));
        }
    }
    Ok(architecture)
}

/// Why a safetensors file with no Stable Diffusion text encoder is refused.
fn not_a_checkpoint(header: &Header) -> String {
    let mut why = match header.shapes.keys().next() {
        None => "holds no tensors".to_string(),
        Some(first) if header.any_under(keys::UNET) => format!(
            "not a Stable Diffusion 1.x, 2.x or XL checkpoint: it has a UNet but no text \
             encoder under {}, {} or conditioner.embedders. (first tensor: {first})",
            keys::SD1_CLIP,
            keys::SD2_OPEN_CLIP
        ),
        Some(first) => format!(
            "not a Stable Diffusion 1.x, 2.x or XL checkpoint: no tensor under {}, {} or \
             {} (first tensor: {first})",
            keys::UNET,
            keys::SD1_CLIP,
            keys::SD2_OPEN_CLIP
        ),
    };
    if let Some(said) = header.metadata.get(variant::SPEC_ARCHITECTURE) {
        why.push_str(&format!("; its metadata says it is {said:?}"));
    }
    why
}

#[cfg(test)]
mod tests;
