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
//! A text encoder's layers are found with or without the `text_model.` of their weights'
//! names (transformers 5 names the modules without it).
//!
//! Every factor must name a layer of the model with matching shapes; a file with factors for
//! layers the model does not have is for another model family and is refused whole.

use crate::weights::{first_line, MappedFile};
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
            // transformers 5 names CLIP's modules without the `text_model.` its weight
            // files keep, and files written by tools on it do the same.
            if let Some(short) = layer.strip_prefix("text_model.") {
                for prefix in kohya {
                    self.by_kohya.insert(
                        format!("{prefix}{}", short.replace('.', "_")),
                        target.clone(),
                    );
                }
                self.by_peft
                    .insert(format!("{peft}{short}"), target.clone());
            }
            self.by_peft.insert(format!("{peft}{layer}"), target);
        }
    }

    fn find(&self, layer: &str) -> Option<&(Network, String, Vec<usize>)> {
        self.by_kohya.get(layer).or_else(|| self.by_peft.get(layer))
    }
}

/// One layer's factors as the file names them, checked against the model before any data
/// is read.
struct Planned {
    network: Network,
    weight: String,
    down: String,
    up: String,
    alpha: Option<String>,
}

/// The names of a layer's factors as the file has them.
#[derive(Default)]
struct Factors {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Checks a file's tensors (names and shapes) against the model's layers: the layers it
/// changes, or why it cannot be used (not a LoRA, another model family).
fn plan(tensors: &[(String, Vec<usize>)], targets: &Targets) -> Result<Vec<Planned>, String> {
    let shapes: HashMap<&str, &[usize]> = tensors
        .iter()
        .map(|(k, s)| (k.as_str(), s.as_slice()))
        .collect();
    let mut layers: BTreeMap<String, Factors> = BTreeMap::new();
    for (key, _) in tensors {
        let (layer, part) = split_key(key).ok_or_else(|| {
            format!("{key} is not a LoRA factor (kohya-ss lora_down/lora_up/alpha or PEFT lora_A/lora_B)")
        })?;
        let entry = layers.entry(layer.to_string()).or_default();
        let slot = match part {
            Part::Down => &mut entry.down,
            Part::Up => &mut entry.up,
            Part::Alpha => &mut entry.alpha,
        };
        *slot = Some(key.clone());
    }
    if layers.is_empty() {
        return Err("it holds no LoRA factors".into());
    }
    let mut planned = Vec::with_capacity(layers.len());
    for (layer, factors) in layers {
        let (Some(down), Some(up)) = (factors.down, factors.up) else {
            return Err(format!("{layer} lacks its down or up factor"));
        };
        let (network, weight, shape) = targets.find(&layer).ok_or_else(|| {
            format!("{layer} is not a layer of this model (a LoRA for another model family)")
        })?;
        let (d, u) = (shapes[down.as_str()], shapes[up.as_str()]);
        let rank = d.first().copied().unwrap_or(0);
        let fits = rank > 0
            && u.len() == shape.len()
            && u[0] == shape[0]
            && u[1] == rank
            && u[2..].iter().all(|&x| x == 1)
            && d.len() == shape.len()
            && d[1..] == shape[1..];
        if !fits {
            return Err(format!(
                "{layer}: factors {u:?} · {d:?} do not make the layer's {shape:?} (a LoRA for another model family)"
            ));
        }
        planned.push(Planned {
            network: *network,
            weight: weight.clone(),
            down,
            up,
            alpha: factors.alpha,
        });
    }
    Ok(planned)
}

/// A LoRA file mapped, not read, and its tensors' names and shapes.
fn map(file: &Path) -> Result<(MappedFile, crate::weights::Shapes), String> {
    let mapped = MappedFile::open(file).map_err(|e| match e {
        EngineError::InvalidModel { reason, .. } => {
            format!("not a safetensors file of tensors: {reason}")
        }
        other => other.to_string(),
    })?;
    let shapes = mapped.shapes();
    Ok((mapped, shapes))
}

/// Whether a LoRA file fits the model: the number of layers it changes, or why not. Reads
/// the file's header only.
pub fn check(file: &Path, targets: &Targets) -> Result<usize, String> {
    let (_, tensors) = map(file)?;
    Ok(plan(&tensors, targets)?.len())
}

/// Reads a LoRA file against the model's layers. The reason it cannot be used otherwise
/// (not a LoRA, another model family, a layout not supported).
pub fn read(file: &Path, targets: &Targets) -> Result<Vec<Delta>, String> {
    let (mapped, tensors) = map(file)?;
    let load = |key: &str| -> Result<Tensor, String> {
        mapped
            .load(key, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| format!("{key}: {}", first_line(&e)))
    };
    plan(&tensors, targets)?
        .into_iter()
        .map(|p| {
            let down = load(&p.down)?;
            let rank = down.dim(0).map_err(|e| e.to_string())?;
            let scale = match &p.alpha {
                None => 1.0,
                Some(key) => {
                    let alpha = load(key)?
                        .flatten_all()
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(|e| e.to_string())?;
                    match alpha.first() {
                        Some(a) if a.is_finite() => a / rank as f32,
                        _ => return Err(format!("{key} is not a number")),
                    }
                }
            };
            Ok(Delta {
                network: p.network,
                weight: p.weight,
                down,
                up: load(&p.up)?,
                scale,
            })
        })
        .collect()
}

pub use sparkle_core::LoraWeight;

/// The weights a set of LoRAs changes, each merged: `W + Σ weight × scale × up · down` over
/// every LoRA touching it, summed in f32 on the weight's device and returned in its dtype.
/// `base` gives a network's weight by name.
pub(crate) fn merge(
    loras: &[(Vec<Delta>, f32)],
    base: impl Fn(Network, &str) -> Option<Tensor>,
) -> Result<BTreeMap<Network, HashMap<String, Tensor>>, EngineError> {
    // Per weight: the model's own, and the sum of the changes to it so far.
    let mut sums: BTreeMap<(Network, String), (Tensor, Tensor)> = BTreeMap::new();
    for (deltas, weight) in loras {
        for delta in deltas {
            let key = (delta.network, delta.weight.clone());
            let (original, sum) = match sums.remove(&key) {
                Some((original, sum)) => (original, Some(sum)),
                None => {
                    let original = base(delta.network, &delta.weight).ok_or_else(|| {
                        EngineError::InvalidRequest(format!(
                            "the model has no weight {}",
                            delta.weight
                        ))
                    })?;
                    (original, None)
                }
            };
            let device = original.device();
            let on = Delta {
                down: delta.down.to_device(device)?,
                up: delta.up.to_device(device)?,
                ..delta.clone()
            };
            let change = (on.full()? * f64::from(*weight))?;
            let sum = match sum {
                Some(sum) => (sum + change)?,
                None => change,
            };
            sums.insert(key, (original, sum));
        }
    }
    let mut merged: BTreeMap<Network, HashMap<String, Tensor>> = BTreeMap::new();
    for ((network, name), (original, sum)) in sums {
        let tensor = (original.to_dtype(DType::F32)? + sum)?.to_dtype(original.dtype())?;
        merged.entry(network).or_default().insert(name, tensor);
    }
    Ok(merged)
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

/// Where a model's LoRAs live: the `loras` directory beside it (beside the model's directory
/// or file), as `embeddings` is.
pub fn beside(model: &Path) -> std::path::PathBuf {
    model
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("loras")
}

/// The LoRA files in `dir` (`NAME.safetensors`) with a usable name, by name.
pub fn list(dir: &Path) -> Result<Vec<String>, EngineError> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| EngineError::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let path = e.path();
            (path.extension().and_then(|x| x.to_str()) == Some("safetensors"))
                .then(|| path.file_stem()?.to_str().map(str::to_string))
                .flatten()
                .filter(|name| sparkle_core::is_lora_name(name))
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Writes a random LoRA of `rank` for the model at `model` (kohya-ss names, alpha = rank):
/// factors for every linear layer of the UNet's transformers — the attention projections,
/// the feed-forward and the transformers' in and out projections where they are linear —
/// as most LoRAs people train are. For benchmarks: the layers and ranks of a real one, random
/// values. The number of layers.
pub fn write_random(model: &Path, file: &Path, rank: usize) -> Result<usize, EngineError> {
    let layout = crate::layout::Layout::open(model)?;
    let configs = layout.configs()?;
    let weights = crate::weights::shapes_of(|vb| crate::unet::UNet::new(vb, &configs.unet))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut layers = 0;
    for (name, shape) in weights {
        let Some(layer) = name.strip_suffix(".weight") else {
            continue;
        };
        let in_transformer = layer.contains(".attentions.")
            && (layer.contains(".transformer_blocks.")
                || layer.ends_with("proj_in")
                || layer.ends_with("proj_out"));
        if !in_transformer || shape.len() != 2 || layer.contains("norm") {
            continue;
        }
        let (out, input) = (shape[0], shape[1]);
        let key = format!("lora_unet_{}", layer.replace('.', "_"));
        let scale = 1.0 / (input as f64).sqrt();
        tensors.insert(
            format!("{key}.lora_down.weight"),
            (Tensor::randn(0f32, 1.0, (rank, input), &Device::Cpu)? * scale)?,
        );
        tensors.insert(
            format!("{key}.lora_up.weight"),
            (Tensor::randn(0f32, 1.0, (out, rank), &Device::Cpu)? * 0.01)?,
        );
        tensors.insert(
            format!("{key}.alpha"),
            Tensor::new(rank as f32, &Device::Cpu)?,
        );
        layers += 1;
    }
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    }
    candle_core::safetensors::save(&tensors, file)?;
    Ok(layers)
}

#[cfg(test)]
mod tests;
