//! LoRA files in the layouts people download, read into low-rank deltas on the model's own
//! weights.
//!
//! A LoRA holds, for some of a network's linear and convolution layers, a pair of low-rank
//! factors `down` (`[rank, in]`, or `[rank, in, kh, kw]` for LoCon's convolutions) and `up`
//! (`[out, rank]` or `[out, rank, 1, 1]`), and a scale `alpha / rank`: the layer's weight
//! becomes `W + weight × (alpha / rank) × up · down`. The layouts:
//!
//! | layout | a layer's factors | scale |
//! |---|---|---|
//! | kohya-ss (A1111, most downloads) | `lora_unet_<layer>.lora_down.weight` / `.lora_up.weight`, `lora_te_…` (SD 1.x/2.x), `lora_te1_…` / `lora_te2_…` (SDXL's two encoders); `<layer>` is the layer's name with `_` for `.` — diffusers' names for SD 1.x, the original (LDM) names for SDXL | `.alpha` (the rank when absent) |
//! | diffusers / PEFT | `unet.<layer>.lora_A.weight` / `.lora_B.weight`, `text_encoder.…`, `text_encoder_2.…` | 1 |
//!
//! Every factor must name a layer of the model with matching shapes; a file with factors for
//! layers the model does not have is for another model family and is refused whole.

use crate::EngineError;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Which network a delta changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Network {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

/// A low-rank change to one weight of the model.
#[derive(Debug, Clone)]
pub struct Delta {
    pub network: Network,
    /// The weight's name as the network's diffusers layout has it (`….to_q.weight`).
    pub weight: String,
    /// `[rank, in]` or `[rank, in, kh, kw]`, f32.
    pub down: Tensor,
    /// `[out, rank]` or `[out, rank, 1, 1]`, f32.
    pub up: Tensor,
    /// `alpha / rank`.
    pub scale: f32,
}

impl Delta {
    /// `scale × up · down`, in the shape of the weight (`[out, in]` or `[out, in, kh, kw]`).
    pub fn full(&self) -> candle_core::Result<Tensor> {
        let rank = self.down.dim(0)?;
        let out = self.up.dim(0)?;
        let down = self.down.flatten_from(1)?;
        let up = self.up.reshape((out, rank))?;
        let product = (up.matmul(&down)? * f64::from(self.scale))?;
        let mut shape = vec![out];
        shape.extend_from_slice(&self.down.dims()[1..]);
        product.reshape(shape)
    }
}

/// The layers a LoRA may change: every linear and convolution weight of the model's
/// networks, by the names each layout gives them.
#[derive(Debug, Default)]
pub struct Targets {
    /// A layer's name as kohya-ss writes it (`lora_unet_…`, `lora_te1_…`) → the weight and
    /// its shape.
    by_kohya: HashMap<String, (Network, String, Vec<usize>)>,
    /// `unet.<layer>`, `text_encoder.<layer>`, `text_encoder_2.<layer>` → the same.
    by_peft: HashMap<String, (Network, String, Vec<usize>)>,
}

impl Targets {
    /// Adds a network's weights: `(diffusers name, shape)`, and for the UNet the original
    /// (LDM) name of each, which SDXL's kohya-ss files use.
    pub fn add(
        &mut self,
        network: Network,
        weights: &[(String, Vec<usize>)],
        ldm: impl Fn(&str) -> Option<String>,
        sdxl: bool,
    ) {
        let (kohya, peft): (&[&str], &str) = match (network, sdxl) {
            (Network::Unet, _) => (&["lora_unet_"], "unet."),
            (Network::TextEncoder, false) => (&["lora_te_"], "text_encoder."),
            (Network::TextEncoder, true) => (&["lora_te1_", "lora_te_"], "text_encoder."),
            (Network::TextEncoder2, _) => (&["lora_te2_"], "text_encoder_2."),
        };
        for (name, shape) in weights {
            let Some(layer) = name.strip_suffix(".weight") else {
                continue;
            };
            if !matches!(shape.len(), 2 | 4) {
                continue;
            }
            let target = (network, name.clone(), shape.clone());
            for prefix in kohya {
                self.by_kohya.insert(
                    format!("{prefix}{}", layer.replace('.', "_")),
                    target.clone(),
                );
            }
            if let Some(original) =
                ldm(name).and_then(|n| n.strip_suffix(".weight").map(str::to_string))
            {
                for prefix in kohya {
                    self.by_kohya.insert(
                        format!("{prefix}{}", original.replace('.', "_")),
                        target.clone(),
                    );
                }
            }
            self.by_peft.insert(format!("{peft}{layer}"), target);
        }
    }

    fn find(&self, layer: &str) -> Option<&(Network, String, Vec<usize>)> {
        self.by_kohya.get(layer).or_else(|| self.by_peft.get(layer))
    }
}

/// The factors of one layer as the file has them.
#[derive(Default)]
struct Factors {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f32>,
}

/// Reads a LoRA file against the model's layers. The reason it cannot be used otherwise
/// (not a LoRA, another model family, a layout not supported).
pub fn read(file: &Path, targets: &Targets) -> Result<Vec<Delta>, String> {
    let tensors = candle_core::safetensors::load(file, &Device::Cpu)
        .map_err(|e| format!("not a safetensors file of tensors: {e}"))?;
    let mut layers: BTreeMap<String, Factors> = BTreeMap::new();
    for (key, tensor) in tensors {
        let (layer, part) = split_key(&key).ok_or_else(|| {
            format!("{key} is not a LoRA factor (kohya-ss lora_down/lora_up/alpha or PEFT lora_A/lora_B)")
        })?;
        let entry = layers.entry(layer.to_string()).or_default();
        let tensor = tensor.to_dtype(DType::F32).map_err(|e| e.to_string())?;
        match part {
            Part::Down => entry.down = Some(tensor),
            Part::Up => entry.up = Some(tensor),
            Part::Alpha => {
                let alpha = tensor
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| e.to_string())?;
                entry.alpha = alpha.first().copied();
            }
        }
    }
    if layers.is_empty() {
        return Err("it holds no LoRA factors".into());
    }
    let mut deltas = Vec::with_capacity(layers.len());
    for (layer, factors) in layers {
        let (Some(down), Some(up)) = (factors.down, factors.up) else {
            return Err(format!("{layer} lacks its down or up factor"));
        };
        let (network, weight, shape) = targets.find(&layer).ok_or_else(|| {
            format!("{layer} is not a layer of this model (a LoRA for another model family)")
        })?;
        let rank = down.dim(0).map_err(|e| e.to_string())?;
        let fits = rank > 0
            && up.dims().len() == shape.len()
            && up.dims()[0] == shape[0]
            && up.dims()[1] == rank
            && up.dims()[2..].iter().all(|&d| d == 1)
            && down.dims().len() == shape.len()
            && down.dims()[1..] == shape[1..];
        if !fits {
            return Err(format!(
                "{layer}: factors {:?} · {:?} do not make the layer's {shape:?} (a LoRA for another model family)",
                up.dims(),
                down.dims()
            ));
        }
        let scale = factors.alpha.map_or(1.0, |alpha| alpha / rank as f32);
        deltas.push(Delta {
            network: *network,
            weight: weight.clone(),
            down,
            up,
            scale,
        });
    }
    Ok(deltas)
}

enum Part {
    Down,
    Up,
    Alpha,
}

/// A factor's layer (as a target name) and which factor it is.
fn split_key(key: &str) -> Option<(&str, Part)> {
    const SUFFIXES: [(&str, Part); 5] = [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".alpha", Part::Alpha),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
    ];
    SUFFIXES.into_iter().find_map(|(suffix, part)| {
        let layer = key.strip_suffix(suffix)?;
        // PEFT files may carry diffusers' `base_model.model.` wrapper.
        Some((
            layer.strip_prefix("base_model.model.").unwrap_or(layer),
            part,
        ))
    })
}

/// The LoRA files in `dir` (`NAME.safetensors`), by name.
pub fn list(dir: &Path) -> Result<Vec<String>, EngineError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            (path.extension().and_then(|x| x.to_str()) == Some("safetensors"))
                .then(|| path.file_stem()?.to_str().map(str::to_string))
                .flatten()
        })
        .collect();
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests;
