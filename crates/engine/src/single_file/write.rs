//! A diffusers-layout model written as one single-file checkpoint, through the key maps the
//! loader reads with, run the other way: so a model must load to the same networks from
//! either layout. The file is what the original code would have saved — fused OpenCLIP
//! attention, 1×1 VAE attention kernels, SD 2.x's unused last text layer and projection —
//! with ModelSpec metadata, and the head counts in metadata where they are not the family's
//! convention. A few-step model gets a settings file beside it (`{"turbo": true}`).
//!
//! Tensors are written in f32.

use super::keys::{KeyMap, SD2_OPEN_CLIP};
use super::shapes::{HEAD_WIDTH, SD1_UNET_HEADS, TEXT_HEADS, UNET_HEADS};
use super::variant::Settings;
use crate::config::{Prediction, Spacing};
use crate::layout::{Configs, Layout, Part};
use crate::model::Architecture;
use crate::weights::{is_buffer, weight_file, Form};
use crate::{write_random, EngineError, ModelScale, RandomModel};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// Writes the diffusers-layout model in `dir` as the single-file checkpoint `file` (and, for
/// a few-step model, its settings file).
pub fn write_single_file(dir: &Path, file: &Path) -> Result<(), EngineError> {
    let configs = Layout::Diffusers(dir.to_path_buf()).configs()?;
    let architecture = family(&configs);
    let mut tensors = BTreeMap::new();
    let mut parts = vec![Part::TextEncoder, Part::Unet, Part::Vae];
    if configs.text_encoder_2.is_some() {
        parts.push(Part::TextEncoder2);
    }
    for part in parts {
        let map = super::key_map(architecture, part, &configs);
        let source = weight_file(&dir.join(part.dir()))?;
        tensors.extend(convert(&*map, &source)?);
    }
    if architecture == Architecture::Sd21 {
        add_sd2_unused(&mut tensors, &configs)?;
    }
    save(&tensors, &metadata(architecture, &configs, file), file)?;
    let settings = Settings::path(file);
    if configs.schedule.timestep_spacing == Some(Spacing::Trailing) {
        let text = json!({ "turbo": true }).to_string();
        std::fs::write(&settings, text).map_err(|e| EngineError::io(&settings, e))?;
    } else if settings.exists() {
        std::fs::remove_file(&settings).map_err(|e| EngineError::io(&settings, e))?;
    }
    Ok(())
}

/// Writes a random-weight model of the given kind and scale as the single file `file`.
pub fn write_random_single_file(
    file: &Path,
    seed: u64,
    kind: RandomModel,
    scale: ModelScale,
) -> Result<(), EngineError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "sparkle-single-file-{}-{nanos}",
        std::process::id()
    ));
    let written =
        write_random(&dir, seed, kind, scale).and_then(|()| write_single_file(&dir, file));
    let removed = std::fs::remove_dir_all(&dir).map_err(|e| EngineError::io(&dir, e));
    written.and(removed)
}

/// SD 1.x by CLIP's quick GELU, SD 2.x by OpenCLIP's GELU, SDXL by its second encoder.
fn family(configs: &Configs) -> Architecture {
    if configs.text_encoder_2.is_some() {
        Architecture::Sdxl
    } else if configs.text_encoder.quick_gelu {
        Architecture::Sd15
    } else {
        Architecture::Sd21
    }
}

/// One part's tensors under their single-file names.
fn convert(map: &dyn KeyMap, source: &Path) -> Result<BTreeMap<String, Tensor>, EngineError> {
    let mut converted = BTreeMap::new();
    let mut fused: HashMap<String, Vec<Option<Tensor>>> = HashMap::new();
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(source, &Device::Cpu)?
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, tensor) in tensors {
        if is_buffer(&name) {
            continue;
        }
        let stored = map.ldm(&name).ok_or_else(|| {
            EngineError::invalid_model(
                source,
                format!("tensor `{name}` has no place in a single-file checkpoint"),
            )
        })?;
        let tensor = match stored.form {
            Form::Same => tensor,
            Form::Conv1x1 => match *tensor.dims() {
                [out, input] => tensor.reshape((out, input, 1, 1))?,
                _ => tensor,
            },
            Form::Transposed => tensor.t()?.contiguous()?,
            Form::Slice { index, parts } => {
                let slots = fused.entry(stored.key).or_insert_with(|| vec![None; parts]);
                if let Some(slot) = slots.get_mut(index) {
                    *slot = Some(tensor);
                }
                continue;
            }
        };
        if converted.insert(stored.key.clone(), tensor).is_some() {
            return Err(EngineError::invalid_model(
                source,
                format!("two tensors would be stored as `{}`", stored.key),
            ));
        }
    }
    for (key, slots) in fused {
        let slices = slots
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                EngineError::invalid_model(source, format!("`{key}` lacks one of its parts"))
            })?;
        converted.insert(key, Tensor::cat(&slices, 0)?);
    }
    Ok(converted)
}

/// What an SD 2.x file holds beyond what the engine runs: OpenCLIP's last layer (a copy of
/// the one before) and its projection.
fn add_sd2_unused(
    tensors: &mut BTreeMap<String, Tensor>,
    configs: &Configs,
) -> Result<(), EngineError> {
    let layers = configs.text_encoder.num_hidden_layers;
    let last = format!(
        "{SD2_OPEN_CLIP}transformer.resblocks.{}.",
        layers.saturating_sub(1)
    );
    let copies: Vec<(String, Tensor)> = tensors
        .range(last.clone()..)
        .take_while(|(key, _)| key.starts_with(&last))
        .map(|(key, tensor)| {
            let rest = &key[last.len()..];
            let key = format!("{SD2_OPEN_CLIP}transformer.resblocks.{layers}.{rest}");
            (key, tensor.clone())
        })
        .collect();
    tensors.extend(copies);
    let hidden = configs.text_encoder.hidden_size;
    tensors.insert(
        format!("{SD2_OPEN_CLIP}text_projection"),
        Tensor::eye(hidden, DType::F32, &Device::Cpu)?,
    );
    Ok(())
}

/// ModelSpec keys, and the head counts where they are not the family's convention.
fn metadata(
    architecture: Architecture,
    configs: &Configs,
    file: &Path,
) -> BTreeMap<String, String> {
    let v = configs.schedule.prediction == Prediction::VPrediction;
    let side = configs.unet.sample_size * configs.vae.scale_factor();
    let (spec, implementation) = match architecture {
        Architecture::Sd15 => (
            "stable-diffusion-v1",
            "https://github.com/CompVis/stable-diffusion",
        ),
        Architecture::Sd21 if v => (
            "stable-diffusion-v2-768-v",
            "https://github.com/Stability-AI/stablediffusion",
        ),
        Architecture::Sd21 => (
            "stable-diffusion-v2-512",
            "https://github.com/Stability-AI/stablediffusion",
        ),
        Architecture::Sdxl => ("stable-diffusion-xl-v1-base", "sgm"),
    };
    let title = file.file_stem().unwrap_or_default().to_string_lossy();
    let mut metadata: BTreeMap<String, String> = [
        ("modelspec.sai_model_spec", "1.0.0".to_string()),
        ("modelspec.architecture", spec.to_string()),
        ("modelspec.implementation", implementation.to_string()),
        ("modelspec.title", title.into_owned()),
        (
            "modelspec.prediction_type",
            if v { "v" } else { "epsilon" }.to_string(),
        ),
        ("modelspec.resolution", format!("{side}x{side}")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();

    let heads: Vec<usize> = configs.unet.blocks.iter().map(|b| b.heads).collect();
    let convention: Vec<usize> = match architecture {
        Architecture::Sd15 => vec![SD1_UNET_HEADS; heads.len()],
        _ => configs
            .unet
            .blocks
            .iter()
            .map(|b| b.channels / HEAD_WIDTH)
            .collect(),
    };
    if heads != convention {
        let list: Vec<String> = heads.iter().map(usize::to_string).collect();
        metadata.insert(UNET_HEADS.to_string(), list.join(","));
    }
    let encoders = [Some(&configs.text_encoder), configs.text_encoder_2.as_ref()];
    for (key, config) in TEXT_HEADS.iter().zip(encoders) {
        if let Some(c) = config {
            if c.hidden_size != c.num_attention_heads * HEAD_WIDTH {
                metadata.insert(key.to_string(), c.num_attention_heads.to_string());
            }
        }
    }
    metadata
}

/// Writes a safetensors file of f32 tensors with `metadata` in its header, under a temporary
/// name first, so that a mapped file is never rewritten in place.
pub(super) fn save(
    tensors: &BTreeMap<String, Tensor>,
    metadata: &BTreeMap<String, String>,
    file: &Path,
) -> Result<(), EngineError> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!(metadata));
    let mut offset = 0;
    for (name, tensor) in tensors {
        let end = offset + tensor.elem_count() * 4;
        let entry =
            json!({ "dtype": "F32", "shape": tensor.dims(), "data_offsets": [offset, end] });
        header.insert(name.clone(), entry);
        offset = end;
    }
    let mut text = Value::Object(header).to_string();
    // The data starts on an 8-byte boundary.
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let partial = file.with_extension("safetensors.partial");
    let io = |e| EngineError::io(&partial, e);
    let mut out = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
    out.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(text.as_bytes()).map_err(io)?;
    for tensor in tensors.values() {
        let values = tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write_all(&bytes).map_err(io)?;
    }
    out.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    std::fs::rename(&partial, file).map_err(|e| EngineError::io(file, e))
}
