//! The diffusers layout: an optional `model_index.json`, and one directory per part with its
//! configuration. Only the fields the pipeline needs are read and unknown fields are
//! ignored; a missing or malformed field is an error that names the file and the field.

use crate::EngineError;
use candle_transformers::models::stable_diffusion::unet_2d::{
    BlockConfig, UNet2DConditionModelConfig,
};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One parsed JSON configuration file, with accessors that name the file and field on error.
pub(crate) struct JsonFile {
    path: PathBuf,
    value: Value,
}

impl JsonFile {
    pub fn read(path: PathBuf) -> Result<Self, EngineError> {
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| EngineError::invalid_model(&path, e.to_string()))?;
        if !value.is_object() {
            return Err(EngineError::invalid_model(&path, "is not a JSON object"));
        }
        Ok(JsonFile { path, value })
    }

    pub fn bad(&self, field: &str, what: &str) -> EngineError {
        EngineError::invalid_model(&self.path, format!("field `{field}` {what}"))
    }

    pub fn get(&self, field: &str) -> Option<&Value> {
        self.value.get(field).filter(|v| !v.is_null())
    }

    pub fn usize(&self, field: &str) -> Result<usize, EngineError> {
        match self.get(field) {
            None => Err(self.bad(field, "is missing")),
            Some(v) => as_usize(v).ok_or_else(|| self.bad(field, "is not a whole number")),
        }
    }

    pub fn usize_or(&self, field: &str, default: usize) -> Result<usize, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(_) => self.usize(field),
        }
    }

    /// A required whole number that must be at least 1 (a count, a width, a divisor).
    pub fn positive(&self, field: &str) -> Result<usize, EngineError> {
        match self.usize(field)? {
            0 => Err(self.bad(field, "must be at least 1")),
            value => Ok(value),
        }
    }

    pub fn positive_or(&self, field: &str, default: usize) -> Result<usize, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(_) => self.positive(field),
        }
    }

    pub fn f64_or(&self, field: &str, default: f64) -> Result<f64, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.bad(field, "is not a finite number")),
        }
    }

    pub fn bool_or(&self, field: &str, default: bool) -> Result<bool, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(field, "is not true or false")),
        }
    }

    pub fn str_or<'a>(&'a self, field: &str, default: &'a str) -> Result<&'a str, EngineError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(field, "is not a string")),
        }
    }

    /// A non-empty list of numbers, each at least 1.
    pub fn positive_list(&self, field: &str) -> Result<Vec<usize>, EngineError> {
        let list = self
            .get(field)
            .and_then(Value::as_array)
            .ok_or_else(|| self.bad(field, "is missing or not a list"))?;
        let numbers: Vec<usize> = list
            .iter()
            .map(|v| as_usize(v).filter(|&n| n > 0))
            .collect::<Option<_>>()
            .ok_or_else(|| self.bad(field, "must hold whole numbers of at least 1"))?;
        if numbers.is_empty() {
            return Err(self.bad(field, "is empty"));
        }
        Ok(numbers)
    }

    pub fn string_list(&self, field: &str) -> Result<Vec<String>, EngineError> {
        self.get(field)
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|v| v.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| self.bad(field, "is missing or not a list of strings"))
    }

    /// A field that is either one number for every block or a list with one per block.
    fn per_block(
        &self,
        field: &str,
        blocks: usize,
        default: usize,
    ) -> Result<Vec<usize>, EngineError> {
        match self.get(field) {
            None => Ok(vec![default; blocks]),
            Some(Value::Array(_)) => {
                let list = self.positive_list(field)?;
                if list.len() != blocks {
                    return Err(self.bad(
                        field,
                        &format!("has {} entries for {blocks} blocks", list.len()),
                    ));
                }
                Ok(list)
            }
            Some(_) => Ok(vec![self.positive_or(field, default)?; blocks]),
        }
    }
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|n| usize::try_from(n).ok())
}

/// `model_index.json`, when present: the pipeline class, checked before anything is loaded.
pub fn check_model_index(dir: &Path) -> Result<(), EngineError> {
    let path = dir.join("model_index.json");
    if !path.exists() {
        return Ok(());
    }
    let f = JsonFile::read(path)?;
    let class = f.str_or("_class_name", "StableDiffusionPipeline")?;
    if class.contains("XL") || class.contains("StableDiffusion3") || class.contains("Flux") {
        return Err(f.bad(
            "_class_name",
            &format!("is {class}; only Stable Diffusion 1.x and 2.x pipelines are supported"),
        ));
    }
    if !class.starts_with("StableDiffusion") {
        tracing::warn!(class, "model_index.json names an unfamiliar pipeline class");
    }
    Ok(())
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
        let config = ClipConfig {
            vocab_size: f.positive_or("vocab_size", 49408)?,
            hidden_size: f.positive("hidden_size")?,
            intermediate_size: f.positive("intermediate_size")?,
            num_attention_heads: f.positive("num_attention_heads")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            max_position_embeddings: f.positive_or("max_position_embeddings", 77)?,
            quick_gelu: match f.str_or("hidden_act", "quick_gelu")? {
                "quick_gelu" => true,
                "gelu" => false,
                other => {
                    return Err(f.bad(
                        "hidden_act",
                        &format!("is {other:?}, not quick_gelu or gelu"),
                    ))
                }
            },
            layer_norm_eps: f.f64_or("layer_norm_eps", 1e-5)?,
        };
        if !config
            .hidden_size
            .is_multiple_of(config.num_attention_heads)
        {
            return Err(f.bad(
                "num_attention_heads",
                &format!("does not divide hidden_size {}", config.hidden_size),
            ));
        }
        if config.max_position_embeddings < crate::tokenizer::MAX_TOKENS {
            return Err(f.bad(
                "max_position_embeddings",
                &format!("must be at least {}", crate::tokenizer::MAX_TOKENS),
            ));
        }
        Ok(config)
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
        if f.get("addition_embed_type").is_some() {
            return Err(f.bad(
                "addition_embed_type",
                "is set: SDXL-style UNets are not supported",
            ));
        }
        let channels = f.positive_list("block_out_channels")?;
        let n = channels.len();
        let down = f.string_list("down_block_types")?;
        if down.len() != n {
            return Err(f.bad(
                "down_block_types",
                &format!("has {} entries for {n} blocks", down.len()),
            ));
        }
        // diffusers' `attention_head_dim` is, for SD 1.x/2.x, really the number of heads;
        // candle's `BlockConfig::attention_head_dim` follows the same convention.
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
            layers_per_block: f.positive_or("layers_per_block", 2)?,
            downsample_padding: f.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: f.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups: f.positive_or("norm_num_groups", 32)?,
            norm_eps: f.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim: f.positive("cross_attention_dim")?,
            sliced_attention_size: None,
            use_linear_projection: f.bool_or("use_linear_projection", false)?,
        };
        Ok(UNetConfig {
            candle,
            in_channels: f.positive_or("in_channels", 4)?,
            out_channels: f.positive_or("out_channels", 4)?,
            sample_size: f.positive_or("sample_size", 64)?,
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
        let scaling_factor = f.f64_or("scaling_factor", 0.18215)?;
        if scaling_factor <= 0.0 {
            return Err(f.bad("scaling_factor", "must be positive"));
        }
        Ok(VaeConfig {
            candle: AutoEncoderKLConfig {
                block_out_channels: f.positive_list("block_out_channels")?,
                layers_per_block: f.positive_or("layers_per_block", 2)?,
                latent_channels: f.positive_or("latent_channels", 4)?,
                norm_num_groups: f.positive_or("norm_num_groups", 32)?,
                use_quant_conv: f.bool_or("use_quant_conv", true)?,
                use_post_quant_conv: f.bool_or("use_post_quant_conv", true)?,
            },
            in_channels: f.positive_or("in_channels", 3)?,
            out_channels: f.positive_or("out_channels", 3)?,
            scaling_factor,
        })
    }

    /// How many pixels one latent stands for, per side: one halving per block but the last.
    pub fn scale_factor(&self) -> usize {
        let halvings = self.candle.block_out_channels.len().saturating_sub(1);
        1usize.checked_shl(halvings as u32).unwrap_or(usize::MAX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// How inference timesteps are spread over the training timesteps (diffusers'
/// `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    Linspace,
    Leading,
    Trailing,
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
    /// `None` when the file does not say: each sampler then uses diffusers' default for it.
    pub timestep_spacing: Option<Spacing>,
}

impl ScheduleConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        let f = JsonFile::read(dir.join("scheduler_config.json"))?;
        let num_train_timesteps = f.usize_or("num_train_timesteps", 1000)?;
        if num_train_timesteps < 2 {
            return Err(f.bad("num_train_timesteps", "must be at least 2"));
        }
        let beta_start = f.f64_or("beta_start", 0.00085)?;
        let beta_end = f.f64_or("beta_end", 0.012)?;
        for (field, beta) in [("beta_start", beta_start), ("beta_end", beta_end)] {
            if !(beta > 0.0 && beta < 1.0) {
                return Err(f.bad(field, "must lie strictly between 0 and 1"));
            }
        }
        Ok(ScheduleConfig {
            num_train_timesteps,
            beta_start,
            beta_end,
            scaled_linear: match f.str_or("beta_schedule", "scaled_linear")? {
                "scaled_linear" => true,
                "linear" => false,
                other => {
                    return Err(f.bad(
                        "beta_schedule",
                        &format!("is {other:?}, not linear or scaled_linear"),
                    ))
                }
            },
            prediction: match f.str_or("prediction_type", "epsilon")? {
                "epsilon" => Prediction::Epsilon,
                "v_prediction" => Prediction::VPrediction,
                other => {
                    return Err(f.bad(
                        "prediction_type",
                        &format!("is {other:?}, not epsilon or v_prediction"),
                    ))
                }
            },
            steps_offset: f.usize_or("steps_offset", 0)?,
            set_alpha_to_one: f.bool_or("set_alpha_to_one", true)?,
            timestep_spacing: match f.get("timestep_spacing") {
                None => None,
                Some(_) => Some(match f.str_or("timestep_spacing", "")? {
                    "linspace" => Spacing::Linspace,
                    "leading" => Spacing::Leading,
                    "trailing" => Spacing::Trailing,
                    other => {
                        return Err(f.bad(
                            "timestep_spacing",
                            &format!("is {other:?}, not linspace, leading or trailing"),
                        ))
                    }
                }),
            },
        })
    }
}
