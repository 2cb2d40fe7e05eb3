//! The configurations a diffusers directory would hold for a checkpoint, derived from its
//! tensor shapes and written as diffusers' own `config.json` fields, then parsed and
//! checked by the same code as a directory's files.
//!
//! Shapes give every width, count and depth. Attention heads do not show in any shape: they
//! follow the family's convention (SD 1.x: 8 per UNet level; SD 2.x and XL: 64 channels per
//! head; text encoders: 64 channels per head) unless the file's metadata names them
//! ([`UNET_HEADS`], [`TEXT_HEADS`]), as files of other proportions must.

use super::header::Header;
use super::keys::{SD1_CLIP, SD2_OPEN_CLIP, SDXL_CLIP, SDXL_OPEN_CLIP, UNET, VAE};
use super::variant::Variant;
use crate::config::{
    ClipConfig, JsonFile, ModelIndex, Prediction, ScheduleConfig, UNetConfig, VaeConfig,
};
use crate::layout::Configs;
use crate::model::Architecture;
use crate::EngineError;
use serde_json::{json, Value};
use std::path::Path;

/// Metadata naming the UNet's attention heads per level (`8` or `5,10,20`).
pub(crate) const UNET_HEADS: &str = "sparkle.unet.attention_heads";
/// Metadata naming the attention heads of the first and second text encoder.
pub(crate) const TEXT_HEADS: [&str; 2] = [
    "sparkle.text_encoder.attention_heads",
    "sparkle.text_encoder_2.attention_heads",
];
/// Channels per attention head in SD 2.x's and SDXL's UNets and in every text encoder.
pub(crate) const HEAD_WIDTH: usize = 64;
/// Attention heads per level of SD 1.x's UNet.
pub(crate) const SD1_UNET_HEADS: usize = 8;

/// A header's shapes, with errors that name the file and tensor.
struct Shapes<'a> {
    header: &'a Header,
    file: &'a Path,
}

impl Shapes<'_> {
    fn bad(&self, why: impl Into<String>) -> EngineError {
        EngineError::invalid_model(self.file, why)
    }

    /// The shape of `key`, which must have `N` dimensions.
    fn get<const N: usize>(&self, key: &str) -> Result<[usize; N], EngineError> {
        let shape = self
            .header
            .shape(key)
            .ok_or_else(|| EngineError::MissingTensor {
                file: self.file.to_path_buf(),
                tensor: key.to_string(),
            })?;
        <[usize; N]>::try_from(shape).map_err(|_| {
            self.bad(format!(
                "tensor `{key}` has shape {shape:?}; {N} dimensions expected"
            ))
        })
    }

    fn has(&self, key: &str) -> bool {
        self.header.has(key)
    }

    /// How many of `prefix(0)`, `prefix(1)`, … have tensors under them, counting until the
    /// first that has none.
    fn count(&self, prefix: impl Fn(usize) -> String) -> usize {
        (0..)
            .take_while(|&i| self.header.any_under(&prefix(i)))
            .count()
    }

    /// Numbers from metadata: `8` or `5,10,20`.
    fn numbers(&self, key: &str) -> Result<Option<Vec<usize>>, EngineError> {
        let Some(text) = self.header.metadata.get(key) else {
            return Ok(None);
        };
        text.split(',')
            .map(|n| n.trim().parse().ok().filter(|&n: &usize| n > 0))
            .collect::<Option<Vec<_>>>()
            .filter(|list| !list.is_empty())
            .map(Some)
            .ok_or_else(|| {
                self.bad(format!(
                    "metadata {key} is {text:?}; expected whole numbers separated by commas"
                ))
            })
    }

    /// A text encoder's heads: from metadata, else 64 channels each.
    fn text_heads(&self, key: &str, hidden: usize) -> Result<usize, EngineError> {
        match self.numbers(key)?.as_deref() {
            Some([heads]) => Ok(*heads),
            Some(_) => Err(self.bad(format!("metadata {key} must be one number"))),
            None if hidden.is_multiple_of(HEAD_WIDTH) => Ok(hidden / HEAD_WIDTH),
            None => Err(self.bad(format!(
                "the text encoder is {hidden} wide, not a multiple of {HEAD_WIDTH}: its \
                 attention heads must be named in metadata {key}"
            ))),
        }
    }

    /// Parses a derived configuration as if it were a file's.
    fn parse<T>(
        &self,
        value: Value,
        parse: impl FnOnce(&JsonFile) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        parse(&JsonFile::new(self.file.to_path_buf(), value)?)
    }
}

/// Every configuration of a checkpoint of `architecture`.
pub(crate) fn configs(
    header: &Header,
    file: &Path,
    architecture: Architecture,
    variant: &Variant,
) -> Result<Configs, EngineError> {
    let s = Shapes { header, file };
    let (text_encoder, text_encoder_2) = match architecture {
        Architecture::Sd15 => (clip(&s, SD1_CLIP, TEXT_HEADS[0])?, None),
        Architecture::Sd21 => (open_clip(&s, SD2_OPEN_CLIP, false, TEXT_HEADS[0])?, None),
        Architecture::Sdxl => (
            clip(&s, SDXL_CLIP, TEXT_HEADS[0])?,
            Some(open_clip(&s, SDXL_OPEN_CLIP, true, TEXT_HEADS[1])?),
        ),
    };
    let vae = vae(&s, architecture)?;
    let scale = vae.scale_factor();
    if variant.native_size == 0 || !variant.native_size.is_multiple_of(scale) {
        return Err(s.bad(format!(
            "a native size of {} pixels is not a multiple of the VAE's {scale}",
            variant.native_size
        )));
    }
    let pooled = text_encoder_2.as_ref().map(|c| c.projection_dim);
    let unet = unet(&s, architecture, variant.native_size / scale, pooled)?;
    Ok(Configs {
        index: ModelIndex {
            force_zeros_for_empty_prompt: architecture == Architecture::Sdxl,
        },
        text_encoder,
        text_encoder_2,
        unet,
        vae,
        schedule: s.parse(schedule(architecture, variant), ScheduleConfig::parse)?,
    })
}

/// transformers' CLIP text model (SD 1.x's, SDXL's first).
fn clip(s: &Shapes, prefix: &str, heads: &str) -> Result<ClipConfig, EngineError> {
    let key = |rest: &str| format!("{prefix}text_model.{rest}");
    let [vocab, hidden] = s.get(&key("embeddings.token_embedding.weight"))?;
    let [positions, _] = s.get(&key("embeddings.position_embedding.weight"))?;
    let layers = s.count(|i| key(&format!("encoder.layers.{i}.")));
    let [intermediate, _] = s.get(&key("encoder.layers.0.mlp.fc1.weight"))?;
    let config = json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": s.text_heads(heads, hidden)?,
        "num_hidden_layers": layers,
        "max_position_embeddings": positions,
        "projection_dim": hidden,
        "hidden_act": "quick_gelu",
    });
    s.parse(config, ClipConfig::parse)
}

/// OpenCLIP's text tower: SD 2.x's, whose features are its penultimate layer's (so the
/// encoder stops one layer early), or SDXL's second, every layer and the projection.
fn open_clip(
    s: &Shapes,
    prefix: &str,
    projection: bool,
    heads: &str,
) -> Result<ClipConfig, EngineError> {
    let [vocab, hidden] = s.get(&format!("{prefix}token_embedding.weight"))?;
    let [positions, _] = s.get(&format!("{prefix}positional_embedding"))?;
    let blocks = s.count(|i| format!("{prefix}transformer.resblocks.{i}."));
    let [intermediate, _] = s.get(&format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"))?;
    let layers = match projection {
        true => blocks,
        false if blocks >= 2 => blocks - 1,
        false => {
            return Err(s.bad(format!(
                "the text encoder under {prefix} has {blocks} layer; its features are the \
                 penultimate layer's"
            )))
        }
    };
    let projection_dim = match projection {
        // Stored as `[hidden, projection]`: the features are multiplied by it.
        true => s.get::<2>(&format!("{prefix}text_projection"))?[1],
        false => hidden,
    };
    let config = json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_attention_heads": s.text_heads(heads, hidden)?,
        "num_hidden_layers": layers,
        "max_position_embeddings": positions,
        "projection_dim": projection_dim,
        "hidden_act": "gelu",
    });
    s.parse(config, ClipConfig::parse)
}

fn vae(s: &Shapes, architecture: Architecture) -> Result<VaeConfig, EngineError> {
    let key = |rest: &str| format!("{VAE}{rest}");
    let [_, in_channels, _, _] = s.get(&key("encoder.conv_in.weight"))?;
    let [out_channels, _, _, _] = s.get(&key("decoder.conv_out.weight"))?;
    let [_, latent_channels, _, _] = s.get(&key("decoder.conv_in.weight"))?;
    let levels = s.count(|i| key(&format!("encoder.down.{i}."))).max(1);
    let channels = (0..levels)
        .map(|i| {
            let [c, _, _, _] = s.get(&key(&format!("encoder.down.{i}.block.0.conv1.weight")))?;
            Ok(c)
        })
        .collect::<Result<Vec<usize>, EngineError>>()?;
    let layers = s.count(|j| key(&format!("encoder.down.0.block.{j}.")));
    let config = json!({
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent_channels,
        "norm_num_groups": 32,
        "scaling_factor": match architecture {
            Architecture::Sdxl => 0.13025,
            _ => 0.18215,
        },
        "use_quant_conv": s.has(&key("quant_conv.weight")),
        "use_post_quant_conv": s.has(&key("post_quant_conv.weight")),
    });
    s.parse(config, VaeConfig::parse)
}

/// One level of the UNet's encoder, as its blocks show it.
struct Level {
    channels: usize,
    resnets: usize,
    /// Transformer blocks after each ResNet block; 0 for none.
    depth: usize,
}

/// The blocks of one encoder level, `(channels, transformer depth)` each, checked to agree.
fn level(s: &Shapes, blocks: &[(usize, usize)], last_block: usize) -> Result<Level, EngineError> {
    let at = format!("{UNET}input_blocks.{last_block}");
    let Some(&(channels, depth)) = blocks.first() else {
        return Err(s.bad(format!("{at}: a UNet level without ResNet blocks")));
    };
    if blocks.iter().any(|&b| b != (channels, depth)) {
        return Err(s.bad(format!(
            "{at}: the blocks of one level differ in width or transformer depth: {blocks:?}"
        )));
    }
    Ok(Level {
        channels,
        resnets: blocks.len(),
        depth,
    })
}

fn unet(
    s: &Shapes,
    architecture: Architecture,
    sample_size: usize,
    pooled: Option<usize>,
) -> Result<UNetConfig, EngineError> {
    let key = |rest: &str| format!("{UNET}{rest}");
    let [_, in_channels, _, _] = s.get(&key("input_blocks.0.0.weight"))?;
    let [out_channels, _, _, _] = s.get(&key("out.2.weight"))?;
    // An inpainting UNet takes the mask and the masked image's latents beside the latents.
    if in_channels != out_channels && in_channels != 2 * out_channels + 1 {
        return Err(s.bad(format!(
            "the UNet takes {in_channels} channels and gives {out_channels}: neither a \
             text-to-image nor an inpainting model (an image-editing model?), which is not \
             supported"
        )));
    }
    let [time_embed_dim, _] = s.get(&key("time_embed.0.weight"))?;

    // The encoder: per level, ResNet blocks (each maybe followed by a transformer), then a
    // downsampler, except after the last level.
    let mut levels = Vec::new();
    let mut blocks = Vec::new();
    let mut block = 1;
    while s.header.any_under(&key(&format!("input_blocks.{block}."))) {
        let at = |rest: &str| key(&format!("input_blocks.{block}.{rest}"));
        if s.has(&at("0.op.weight")) {
            levels.push(level(s, &blocks, block)?);
            blocks.clear();
        } else {
            let [channels, _, _, _] = s.get(&at("0.in_layers.2.weight"))?;
            let depth = s.count(|t| at(&format!("1.transformer_blocks.{t}.")));
            blocks.push((channels, depth));
        }
        block += 1;
    }
    levels.push(level(s, &blocks, block - 1)?);
    let layers_per_block = levels[0].resnets;
    if let Some(other) = levels.iter().find(|l| l.resnets != layers_per_block) {
        return Err(s.bad(format!(
            "{UNET}input_blocks: levels have {layers_per_block} and {} ResNet blocks; the \
             UNet needs as many at every level",
            other.resnets
        )));
    }

    // The decoder, from the lowest resolution up: one block more per level.
    let n = levels.len();
    let mut up_depth = vec![0; n];
    for (up, depth) in up_depth.iter_mut().rev().enumerate() {
        let depths: Vec<usize> = (0..=layers_per_block)
            .map(|j| {
                let block = up * (layers_per_block + 1) + j;
                s.count(|t| key(&format!("output_blocks.{block}.1.transformer_blocks.{t}.")))
            })
            .collect();
        if depths.iter().any(|&d| d != depths[0]) {
            return Err(s.bad(format!(
                "{UNET}output_blocks: the blocks of decoder level {up} differ in transformer \
                 depth: {depths:?}"
            )));
        }
        *depth = depths[0];
    }
    let mid_depth = s.count(|t| key(&format!("middle_block.1.transformer_blocks.{t}.")));
    if mid_depth == 0 {
        return Err(s.bad(format!(
            "{UNET}middle_block.1: the UNet's middle block has no transformer"
        )));
    }
    let [_, context] = s.get(&key(
        "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    ))?;
    let linear_projection = s
        .header
        .shape(&key("middle_block.1.proj_in.weight"))
        .map(<[_]>::len)
        == Some(2);

    let channels: Vec<usize> = levels.iter().map(|l| l.channels).collect();
    let heads = match s.numbers(UNET_HEADS)? {
        Some(heads) => heads,
        None if architecture == Architecture::Sd15 => vec![SD1_UNET_HEADS; n],
        None => channels
            .iter()
            .map(|&c| match c.is_multiple_of(HEAD_WIDTH) {
                true => Ok(c / HEAD_WIDTH),
                false => Err(s.bad(format!(
                    "a UNet level is {c} wide, not a multiple of {HEAD_WIDTH}: its attention \
                     heads must be named in metadata {UNET_HEADS}"
                ))),
            })
            .collect::<Result<_, _>>()?,
    };
    // Levels without a transformer in the encoder take their depth from the middle block
    // (the last level) or the decoder, so that the configuration names one per level.
    let depth: Vec<usize> = levels
        .iter()
        .enumerate()
        .map(|(i, l)| match (l.depth, up_depth[i]) {
            (0, _) if i == n - 1 => mid_depth,
            (0, 0) => 1,
            (0, up) => up,
            (down, _) => down,
        })
        .collect();
    let cross = |yes: bool, cross: &str, plain: &str| if yes { cross } else { plain }.to_string();
    let mut config = json!({
        "sample_size": sample_size,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": levels
            .iter()
            .map(|l| cross(l.depth > 0, "CrossAttnDownBlock2D", "DownBlock2D"))
            .collect::<Vec<_>>(),
        "up_block_types": up_depth
            .iter()
            .rev()
            .map(|&d| cross(d > 0, "CrossAttnUpBlock2D", "UpBlock2D"))
            .collect::<Vec<_>>(),
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear_projection,
        "time_embedding_dim": time_embed_dim,
    });
    if s.header.any_under(&key("label_emb.")) {
        let [_, input] = s.get(&key("label_emb.0.0.weight"))?;
        let Some(pooled) = pooled else {
            return Err(s.bad(format!(
                "{UNET}label_emb: a class-conditioned UNet, which is not supported"
            )));
        };
        // SDXL: the pooled text features and six size and crop ids, each embedded.
        let ids = input
            .checked_sub(pooled)
            .filter(|w| *w > 0 && w.is_multiple_of(6));
        let Some(ids) = ids else {
            return Err(s.bad(format!(
                "{UNET}label_emb.0.0.weight takes {input} features; the pooled text ({pooled}) \
                 and six embedded ids cannot make that"
            )));
        };
        config["addition_embed_type"] = json!("text_time");
        config["addition_time_embed_dim"] = json!(ids / 6);
        config["projection_class_embeddings_input_dim"] = json!(input);
    }
    let mut unet = s.parse(config, UNetConfig::parse)?;
    for (block, up) in unet.blocks.iter_mut().zip(up_depth) {
        if up > 0 {
            block.up_transformer_layers = up;
        }
    }
    Ok(unet)
}

/// The noise schedule every family was trained with (1000 scaled-linear steps), as the
/// published diffusers configurations write it.
fn schedule(architecture: Architecture, variant: &Variant) -> Value {
    let mut schedule = json!({
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": match variant.prediction {
            Prediction::Epsilon => "epsilon",
            Prediction::VPrediction => "v_prediction",
        },
        "steps_offset": 1,
        "set_alpha_to_one": false,
    });
    if variant.turbo {
        schedule["timestep_spacing"] = json!("trailing");
    } else if architecture == Architecture::Sdxl {
        schedule["timestep_spacing"] = json!("leading");
    }
    schedule
}
