//! The diffusers layout: an optional `model_index.json`, and one directory per part with its
//! configuration. Only the fields the pipeline needs are read and unknown fields are
//! ignored; a missing or malformed field is an error that names the file and the field.

use crate::EngineError;
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
        Self::new(path, value)
    }

    /// A configuration that is not read from a file (a single-file checkpoint's built-in
    /// one); `path` is what errors name.
    pub fn new(path: PathBuf, value: Value) -> Result<Self, EngineError> {
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

/// What `model_index.json` says beyond the parts' own configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelIndex {
    /// SDXL pipelines encode an empty negative prompt as zeros rather than as text.
    pub force_zeros_for_empty_prompt: bool,
}

/// `model_index.json`, when present: the pipeline class, checked before anything is loaded.
pub fn check_model_index(dir: &Path) -> Result<ModelIndex, EngineError> {
    let path = dir.join("model_index.json");
    if !path.exists() {
        return Ok(ModelIndex::default());
    }
    let f = JsonFile::read(path)?;
    let class = f.str_or("_class_name", "StableDiffusionPipeline")?;
    let supported = [
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
    ];
    if class.contains("StableDiffusion3") || class.contains("Flux") || class.contains("Upscale") {
        return Err(f.bad(
            "_class_name",
            &format!(
                "is {class}; supported pipelines are {}",
                supported.join(", ")
            ),
        ));
    }
    if !supported.contains(&class) {
        tracing::warn!(class, "model_index.json names an unfamiliar pipeline class");
    }
    Ok(ModelIndex {
        force_zeros_for_empty_prompt: f
            .bool_or("force_zeros_for_empty_prompt", class.contains("XL"))?,
    })
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
    /// Width of the projected pooled features (SDXL's second encoder).
    pub projection_dim: usize,
    pub quick_gelu: bool,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        Self::parse(&JsonFile::read(dir.join("config.json"))?)
    }

    pub fn parse(f: &JsonFile) -> Result<Self, EngineError> {
        let config = ClipConfig {
            vocab_size: f.positive_or("vocab_size", 49408)?,
            hidden_size: f.positive("hidden_size")?,
            intermediate_size: f.positive("intermediate_size")?,
            num_attention_heads: f.positive("num_attention_heads")?,
            num_hidden_layers: f.positive("num_hidden_layers")?,
            max_position_embeddings: f.positive_or("max_position_embeddings", 77)?,
            projection_dim: f.positive_or("projection_dim", 512)?,
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

/// One resolution level of the UNet.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetBlock {
    pub channels: usize,
    /// Attention heads of the level's transformers (head width: `channels / heads`).
    pub heads: usize,
    /// Whether the encoder's blocks at this level have spatial transformers.
    pub down_attention: bool,
    /// Whether the decoder's blocks at this level have spatial transformers.
    pub up_attention: bool,
    /// Transformer blocks per spatial transformer in the encoder (and, for the last level,
    /// the middle block).
    pub transformer_layers: usize,
    /// The same for the decoder.
    pub up_transformer_layers: usize,
}

/// SDXL's "text_time" conditioning: pooled text features and size/crop ids, added to the
/// time embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdditionEmbedding {
    /// Width of each id's sinusoidal embedding (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// Pooled width plus six embedded ids (`projection_class_embeddings_input_dim`).
    pub input_dim: usize,
}

/// The UNet's shape (`unet/config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: usize,
    pub blocks: Vec<UNetBlock>,
    pub layers_per_block: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
    time_embed_dim: usize,
    pub addition: Option<AdditionEmbedding>,
}

impl UNetConfig {
    /// Width of the time embedding every ResNet block receives.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embed_dim
    }

    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        Self::parse(&JsonFile::read(dir.join("config.json"))?)
    }

    pub fn parse(f: &JsonFile) -> Result<Self, EngineError> {
        // Variants of the network this engine does not build: refused by name rather than
        // loaded wrongly.
        for field in [
            "class_embed_type",
            "num_class_embeds",
            "encoder_hid_dim",
            "time_cond_proj_dim",
            "timestep_post_act",
            "reverse_transformer_layers_per_block",
        ] {
            if f.get(field).is_some() {
                return Err(f.bad(field, "is set; this UNet variant is not supported"));
            }
        }
        for (field, default) in [
            ("act_fn", "silu"),
            ("resnet_time_scale_shift", "default"),
            ("time_embedding_type", "positional"),
            ("mid_block_type", "UNetMidBlock2DCrossAttn"),
        ] {
            let value = f.str_or(field, default)?;
            if value != default {
                return Err(f.bad(
                    field,
                    &format!("is {value:?}; only {default:?} is supported"),
                ));
            }
        }
        for field in ["only_cross_attention", "dual_cross_attention"] {
            if f.bool_or(field, false)? {
                return Err(f.bad(field, "is true; this UNet variant is not supported"));
            }
        }
        let channels = f.positive_list("block_out_channels")?;
        let n = channels.len();
        let kinds = |field: &str, cross: &str, plain: &str| -> Result<Vec<bool>, EngineError> {
            let types = f.string_list(field)?;
            if types.len() != n {
                return Err(f.bad(
                    field,
                    &format!("has {} entries for {n} blocks", types.len()),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    t if t == cross => Ok(true),
                    t if t == plain => Ok(false),
                    other => Err(f.bad(
                        field,
                        &format!("names {other:?}; only {cross} and {plain} are supported"),
                    )),
                })
                .collect()
        };
        let down = kinds("down_block_types", "CrossAttnDownBlock2D", "DownBlock2D")?;
        let up = kinds("up_block_types", "CrossAttnUpBlock2D", "UpBlock2D")?;
        // diffusers' `attention_head_dim` is, for these models, really the number of heads;
        // `num_attention_heads` says so explicitly where a config has it.
        let heads = if f.get("num_attention_heads").is_some() {
            f.per_block("num_attention_heads", n, 8)?
        } else {
            f.per_block("attention_head_dim", n, 8)?
        };
        let layers = f.per_block("transformer_layers_per_block", n, 1)?;
        let groups = f.positive_or("norm_num_groups", 32)?;
        let mut blocks = Vec::with_capacity(n);
        for level in 0..n {
            if !channels[level].is_multiple_of(heads[level]) {
                return Err(f.bad(
                    "attention_head_dim",
                    &format!(
                        "{} heads do not divide {} channels",
                        heads[level], channels[level]
                    ),
                ));
            }
            if !channels[level].is_multiple_of(groups) {
                return Err(f.bad(
                    "norm_num_groups",
                    &format!("{groups} groups do not divide {} channels", channels[level]),
                ));
            }
            blocks.push(UNetBlock {
                channels: channels[level],
                heads: heads[level],
                down_attention: down[level],
                // The decoder lists its levels from the lowest resolution up.
                up_attention: up[n - 1 - level],
                transformer_layers: layers[level],
                up_transformer_layers: layers[level],
            });
        }
        let addition = match f.get("addition_embed_type") {
            None => None,
            Some(_) => match f.str_or("addition_embed_type", "")? {
                "text_time" => Some(AdditionEmbedding {
                    time_embed_dim: f.positive("addition_time_embed_dim")?,
                    input_dim: f.positive("projection_class_embeddings_input_dim")?,
                }),
                other => {
                    return Err(f.bad(
                        "addition_embed_type",
                        &format!("is {other:?}; only \"text_time\" (SDXL) is supported"),
                    ))
                }
            },
        };
        if let Some(a) = addition {
            if a.input_dim <= 6 * a.time_embed_dim {
                return Err(f.bad(
                    "projection_class_embeddings_input_dim",
                    "leaves no room for pooled text features beside six embedded ids",
                ));
            }
        }
        let downsample_padding = f.usize_or("downsample_padding", 1)?;
        if downsample_padding != 1 {
            return Err(f.bad("downsample_padding", "must be 1"));
        }
        Ok(UNetConfig {
            in_channels: f.positive_or("in_channels", 4)?,
            out_channels: f.positive_or("out_channels", 4)?,
            sample_size: f.positive_or("sample_size", 64)?,
            layers_per_block: f.positive_or("layers_per_block", 2)?,
            downsample_padding,
            mid_block_scale_factor: f.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups: groups,
            norm_eps: f.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim: f.positive("cross_attention_dim")?,
            use_linear_projection: f.bool_or("use_linear_projection", false)?,
            flip_sin_to_cos: f.bool_or("flip_sin_to_cos", true)?,
            freq_shift: f.f64_or("freq_shift", 0.0)?,
            center_input_sample: f.bool_or("center_input_sample", false)?,
            time_embed_dim: f.positive_or("time_embedding_dim", channels[0] * 4)?,
            addition,
            blocks,
        })
    }
}

/// The VAE's shape (`vae/config.json`).
#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub candle: AutoEncoderKLConfig,
    pub in_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f64,
    /// The VAE overflows in f16 and must run in f32 (SDXL's original VAE).
    pub force_upcast: bool,
}

impl VaeConfig {
    pub fn read(dir: &Path) -> Result<Self, EngineError> {
        Self::parse(&JsonFile::read(dir.join("config.json"))?)
    }

    pub fn parse(f: &JsonFile) -> Result<Self, EngineError> {
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
            force_upcast: f.bool_or("force_upcast", true)?,
        })
    }

    /// How many pixels one latent stands for, per side: one halving per block but the last.
    pub fn scale_factor(&self) -> usize {
        let halvings = self.candle.block_out_channels.len().saturating_sub(1);
        1usize.checked_shl(halvings as u32).unwrap_or(usize::MAX)
    }
}

/// What the UNet predicts (diffusers' `prediction_type`: `epsilon` or `v_prediction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The noise.
    Epsilon,
    /// The velocity: SD 2.x at 768.
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
        Self::parse(&JsonFile::read(dir.join("scheduler_config.json"))?)
    }

    pub fn parse(f: &JsonFile) -> Result<Self, EngineError> {
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
