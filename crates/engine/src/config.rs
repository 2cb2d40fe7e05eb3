//! The diffusers layout: `model_index.json`, and one directory per part with its
//! `config.json`. Only the fields the pipeline needs are read; a missing required field is
//! an error that names the file and the field.

use crate::EngineError;
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};

pub(crate) struct JsonFile {
    path: PathBuf,
    value: Value,
}

impl JsonFile {
    pub fn read(path: PathBuf) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let value = serde_json::from_str(&text)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
        Ok(JsonFile { path, value })
    }

    fn missing(&self, field: &str, what: &str) -> EngineError {
        EngineError::InvalidModel(format!("{}: field `{field}` {what}", self.path.display()))
    }

    pub fn get(&self, field: &str) -> Option<&Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize, EngineError> {
        self.get(field)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.missing(field, "is missing or not a whole number"))
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize, EngineError> {
        if self.get(field).is_none() {
            Ok(default)
        } else {
            self.usize(field)
        }
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| self.missing(field, "is not a number")),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.missing(field, "is not true or false")),
        }
    }

    pub fn str_or<'a>(&'a self, field: &str, default: &'a str) -> Result<&'a str, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.missing(field, "is not a string")),
        }
    }

    pub fn usize_list(&self, field: &str) -> Result<Vec<usize>, EngineError> {
        self.get(field)
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_u64().map(|v| v as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.missing(field, "is missing or not a list of whole numbers"))
    }

    /// A field that is either one number for every block or one per block.
    fn per_block(
        &self,
        field: &str,
        blocks: usize,
        default: usize,
    ) -> Result<Vec<usize>, EngineError> {
        match self.get(field) {
            None => Ok(vec![default; blocks]),
            Some(Value::Number(n)) => {
                Ok(vec![n.as_u64().unwrap_or(default as u64) as usize; blocks])
            }
            Some(_) => {
                let list = self.usize_list(field)?;
                if list.len() != blocks {
                    return Err(self.missing(
                        field,
                        &format!("has {} entries for {blocks} blocks", list.len()),
                    ));
                }
                Ok(list)
            }
        }
    }
}

/// The text encoder's shape (`text_encoder/config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_hidden_layers: usize,
    pub max_position_embeddings: usize,
    pub quick_gelu: bool,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let f = JsonFile::read(dir.join("config.json"))?;
        let act = f.str_or("hidden_act", "quick_gelu")?;
        Ok(ClipConfig {
            vocab_size: f.usize("vocab_size")?,
            hidden_size: f.usize("hidden_size")?,
            intermediate_size: f.usize("intermediate_size")?,
            num_attention_heads: f.usize("num_attention_heads")?,
            num_hidden_layers: f.usize("num_hidden_layers")?,
            max_position_embeddings: f.usize_or("max_position_embeddings", 77)?,
            quick_gelu: match act {
                "quick_gelu" => true,
                "gelu" => false,
                other => {
                    return Err(f.missing(
                        "hidden_act",
                        &format!("is {other:?}, not quick_gelu or gelu"),
                    ))
                }
            },
            layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
        })
    }
}

/// The UNet's shape (`unet/config.json`) in candle's terms.
pub struct UNetConfig {
    pub candle: UNet2DConditionModelConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: usize,
}

impl UNetConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let f = JsonFile::read(dir.join("config.json"))?;
        let channels = f.usize_list("block_out_channels")?;
        let n = channels.len();
        let down: Vec<String> = match f.get("down_block_types").and_then(Value::as_array) {
            Some(list) => list
                .iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
            None => return Err(f.missing("down_block_types", "is missing")),
        };
        if down.len() != n {
            return Err(f.missing(
                "down_block_types",
                &format!("has {} entries for {n} blocks", down.len()),
            ));
        }
        if f.get("addition_embed_type").is_some() {
            return Err(EngineError::InvalidModel(format!(
                "{}: SDXL-style UNets (addition_embed_type) are not supported yet",
                dir.display()
            )));
        }
        let heads = f.per_block("attention_head_dim", n, 8)?;
        let layers = f.per_block("transformer_layers_per_block", n, 1)?;
        let blocks = (0..n)
            .map(|i| BlockConfig {
                out_channels: channels[i],
                use_cross_attn: down[i].starts_with("CrossAttn").then_some(layers[i]),
                attention_head_dim: heads[i],
            })
            .collect();
        let candle = UNet2DConditionModelConfig {
            center_input_sample: f.bool_or("center_input_sample", false)?,
            flip_sin_to_cos: f.bool_or("flip_sin_to_cos", true)?,
            freq_shift: f.f64_or("freq_shift", 0.0)?,
            blocks,
            layers_per_block: f.usize_or("layers_per_block", 2)?,
            downsample_padding: f.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: f.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups: f.usize_or("norm_num_groups", 32)?,
            norm_eps: f.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim: f.usize("cross_attention_dim")?,
            sliced_attention_size: None,
            use_linear_projection: f.bool_or("use_linear_projection", false)?,
        };
        Ok(UNetConfig {
            candle,
            in_channels: f.usize_or("in_channels", 4)?,
            out_channels: f.usize_or("out_channels", 4)?,
            sample_size: f.usize_or("sample_size", 64)?,
        })
    }
}

/// The VAE's shape (`vae/config.json`).
pub struct VaeConfig {
    pub candle: AutoEncoderKLConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f64,
}

impl VaeConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let f = JsonFile::read(dir.join("config.json"))?;
        Ok(VaeConfig {
            candle: AutoEncoderKLConfig {
                block_out_channels: f.usize_list("block_out_channels")?,
                layers_per_block: f.usize_or("layers_per_block", 2)?,
                latent_channels: f.usize_or("latent_channels", 4)?,
                norm_num_groups: f.usize_or("norm_num_groups", 32)?,
                use_quant_conv: f.bool_or("use_quant_conv", true)?,
                use_post_quant_conv: f.bool_or("use_post_quant_conv", true)?,
            },
            in_channels: f.usize_or("in_channels", 3)?,
            out_channels: f.usize_or("out_channels", 3)?,
            scaling_factor: f.f64_or("scaling_factor", 0.18215)?,
        })
    }

    /// How many pixels one latent stands for, per side.
    pub fn scale_factor(&self) -> usize {
        1 << self.candle.block_out_channels.len().saturating_sub(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// The noise schedule (`scheduler/scheduler_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub scaled_linear: bool,
    pub prediction: Prediction,
    pub steps_offset: usize,
    pub set_alpha_to_one: bool,
}

impl ScheduleConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let f = JsonFile::read(dir.join("scheduler_config.json"))?;
        Ok(ScheduleConfig {
            num_train_timesteps: f.usize_or("num_train_timesteps", 1000)?,
            beta_start: f.f64_or("beta_start", 0.00085)?,
            beta_end: f.f64_or("beta_end", 0.012)?,
            scaled_linear: match f.str_or("beta_schedule", "scaled_linear")? {
                "scaled_linear" => true,
                "linear" => false,
                other => {
                    return Err(f.missing(
                        "beta_schedule",
                        &format!("is {other:?}, not linear or scaled_linear"),
                    ))
                }
            },
            prediction: match f.str_or("prediction_type", "epsilon")? {
                "epsilon" => Prediction::Epsilon,
                "v_prediction" => Prediction::VPrediction,
                other => {
                    return Err(f.missing(
                        "prediction_type",
                        &format!("is {other:?}, not epsilon or v_prediction"),
                    ))
                }
            },
            steps_offset: f.usize_or("steps_offset", 1)?,
            set_alpha_to_one: f.bool_or("set_alpha_to_one", false)?,
        })
    }
}
