//! Tensor names of the original Stable Diffusion code (the "LDM" layout of single-file
//! checkpoints) for the diffusers names our networks ask for.
//!
//! One map per network, from the diffusers name to where the single file stores it:
//!
//! | network | single-file prefix | differences |
//! |---|---|---|
//! | UNet | `model.diffusion_model.` | one flat list of `input_blocks` (conv_in, then per level `layers_per_block` ResNet(+transformer) blocks and a downsampler), `middle_block.0/1/2`, `output_blocks` likewise; ResNet layers are `in_layers`/`out_layers`/`emb_layers`/`skip_connection`; `time_embed.0/2`, SDXL's `label_emb.0.0/0.2`, `out.0/2` |
//! | VAE | `first_stage_model.` | `down.i.block.j`, `up.i` counted from the lowest resolution (diffusers' `up_blocks` from the highest), `mid.block_1/2`, `mid.attn_1` with q/k/v/proj_out as 1×1 convolutions (diffusers: linear), `norm_out`, `nin_shortcut` |
//! | CLIP ViT-L (SD 1.x, SDXL's first) | `cond_stage_model.transformer.` / `conditioner.embedders.0.transformer.` | none: transformers' own names |
//! | OpenCLIP (SD 2.x, SDXL's second) | `cond_stage_model.model.` / `conditioner.embedders.1.model.` | `transformer.resblocks.l` with `ln_1/ln_2`, `mlp.c_fc/c_proj`, `attn.out_proj` and the query, key and value projections fused in `attn.in_proj_weight/bias`; `token_embedding`, `positional_embedding`, `ln_final`, `text_projection` stored transposed |
//!
//! SD 2.x's text features are OpenCLIP's penultimate layer: diffusers' (and our) encoder
//! stops one layer early, so the file's last layer and its projection go unused.
//!
//! The same maps write a single file from a diffusers model (`write.rs`), so a test can
//! check that a model loads to the same network from either layout.

use crate::config::UNetConfig;
use crate::weights::{is_buffer, Form, Naming, Stored};

pub(crate) const UNET: &str = "model.diffusion_model.";
pub(crate) const VAE: &str = "first_stage_model.";
pub(crate) const SD1_CLIP: &str = "cond_stage_model.transformer.";
pub(crate) const SD2_OPEN_CLIP: &str = "cond_stage_model.model.";
pub(crate) const SDXL_CLIP: &str = "conditioner.embedders.0.transformer.";
pub(crate) const SDXL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's only text encoder, which no supported family has there.
pub(crate) const SDXL_REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";

/// One network's map from diffusers names to single-file names.
pub(crate) trait KeyMap: Send + Sync {
    /// The prefix of every tensor of this network in the single file.
    fn prefix(&self) -> &str;
    /// Where the single file stores the tensor diffusers calls `name`; `None` for a name
    /// with no place in the single-file layout.
    fn ldm(&self, name: &str) -> Option<Stored>;
    /// Tensors under the prefix that the network does not use, by design.
    fn unused_by_design(&self, _rest: &str) -> bool {
        false
    }
}

impl<K: KeyMap + ?Sized> KeyMap for Box<K> {
    fn prefix(&self) -> &str {
        (**self).prefix()
    }

    fn ldm(&self, name: &str) -> Option<Stored> {
        (**self).ldm(name)
    }

    fn unused_by_design(&self, rest: &str) -> bool {
        (**self).unused_by_design(rest)
    }
}

/// Wraps a [`KeyMap`] as the weight loader's [`Naming`].
pub(crate) struct LdmNames<K>(pub K);

impl<K: KeyMap> Naming for LdmNames<K> {
    fn locate(&self, name: &str) -> Stored {
        // A name without a counterpart is looked for under the prefix, where it will not be
        // found: the error then names it.
        self.0
            .ldm(name)
            .unwrap_or_else(|| Stored::same(format!("{}{name}", self.0.prefix())))
    }

    fn owns(&self, key: &str) -> bool {
        match key.strip_prefix(self.0.prefix()) {
            Some(rest) => !is_buffer(rest) && !self.0.unused_by_design(rest),
            None => false,
        }
    }
}

/// `a.b` + `.c.d`, skipping empty parts.
fn join(head: &str, tail: &[&str]) -> String {
    let mut name = head.to_string();
    for part in tail {
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(part);
    }
    name
}

fn number(text: &str) -> Option<usize> {
    text.parse().ok()
}

/// The UNet's map: the flat block lists need the number of ResNet blocks per level and
/// which decoder levels have transformers (their upsampler comes after them).
pub(crate) struct UNetKeys {
    layers_per_block: usize,
    /// Per diffusers `up_blocks` index.
    up_attention: Vec<bool>,
}

impl UNetKeys {
    pub fn new(config: &UNetConfig) -> Self {
        UNetKeys {
            layers_per_block: config.layers_per_block,
            up_attention: config.blocks.iter().rev().map(|b| b.up_attention).collect(),
        }
    }

    /// ResNet layer names: diffusers → LDM.
    fn resnet(rest: &[&str]) -> Option<String> {
        let (layer, tail) = rest.split_first()?;
        let ldm = match *layer {
            "norm1" => "in_layers.0",
            "conv1" => "in_layers.2",
            "norm2" => "out_layers.0",
            "conv2" => "out_layers.3",
            "time_emb_proj" => "emb_layers.1",
            "conv_shortcut" => "skip_connection",
            _ => return None,
        };
        Some(join(ldm, tail))
    }

    fn map(&self, parts: &[&str]) -> Option<String> {
        let per_level = self.layers_per_block + 1;
        let name = match parts {
            ["conv_in", rest @ ..] => join("input_blocks.0.0", rest),
            ["time_embedding", "linear_1", rest @ ..] => join("time_embed.0", rest),
            ["time_embedding", "linear_2", rest @ ..] => join("time_embed.2", rest),
            ["add_embedding", "linear_1", rest @ ..] => join("label_emb.0.0", rest),
            ["add_embedding", "linear_2", rest @ ..] => join("label_emb.0.2", rest),
            ["conv_norm_out", rest @ ..] => join("out.0", rest),
            ["conv_out", rest @ ..] => join("out.2", rest),
            ["down_blocks", level, kind, j, rest @ ..] if *kind != "downsamplers" => {
                let (level, j) = (number(level)?, number(j)?);
                if j >= self.layers_per_block {
                    return None;
                }
                let block = 1 + level * per_level + j;
                match *kind {
                    "resnets" => join(&format!("input_blocks.{block}.0"), &[&Self::resnet(rest)?]),
                    "attentions" => join(&format!("input_blocks.{block}.1"), rest),
                    _ => return None,
                }
            }
            ["down_blocks", level, "downsamplers", "0", "conv", rest @ ..] => {
                let block = (number(level)? + 1) * per_level;
                join(&format!("input_blocks.{block}.0.op"), rest)
            }
            ["mid_block", "resnets", j @ ("0" | "1"), rest @ ..] => {
                let block = 2 * number(j)?;
                join(&format!("middle_block.{block}"), &[&Self::resnet(rest)?])
            }
            ["mid_block", "attentions", "0", rest @ ..] => join("middle_block.1", rest),
            ["up_blocks", level, kind, j, rest @ ..] if *kind != "upsamplers" => {
                let (level, j) = (number(level)?, number(j)?);
                if j >= per_level {
                    return None;
                }
                let block = level * per_level + j;
                match *kind {
                    "resnets" => join(&format!("output_blocks.{block}.0"), &[&Self::resnet(rest)?]),
                    "attentions" => join(&format!("output_blocks.{block}.1"), rest),
                    _ => return None,
                }
            }
            ["up_blocks", level, "upsamplers", "0", "conv", rest @ ..] => {
                let level = number(level)?;
                let block = level * per_level + self.layers_per_block;
                // After the ResNet block, and after its transformer where it has one.
                let slot = if *self.up_attention.get(level)? { 2 } else { 1 };
                join(&format!("output_blocks.{block}.{slot}.conv"), rest)
            }
            _ => return None,
        };
        Some(name)
    }
}

impl KeyMap for UNetKeys {
    fn prefix(&self) -> &str {
        UNET
    }

    fn ldm(&self, name: &str) -> Option<Stored> {
        let parts: Vec<&str> = name.split('.').collect();
        Some(Stored::same(format!("{UNET}{}", self.map(&parts)?)))
    }
}

/// The VAE's map: the decoder's levels are numbered the other way round.
pub(crate) struct VaeKeys {
    levels: usize,
}

impl VaeKeys {
    pub fn new(levels: usize) -> Self {
        VaeKeys { levels }
    }

    fn resnet(rest: &[&str]) -> Option<String> {
        let (layer, tail) = rest.split_first()?;
        let ldm = match *layer {
            "conv_shortcut" => "nin_shortcut",
            "norm1" | "conv1" | "norm2" | "conv2" => layer,
            _ => return None,
        };
        Some(join(ldm, tail))
    }

    /// The mid-block attention: diffusers' linear layers (named either way diffusers has
    /// named them) are 1×1 convolutions in the single file.
    fn attention(side: &str, rest: &[&str]) -> Option<Stored> {
        let (layer, param) = match rest {
            ["to_out", "0", param] => ("proj_out", *param),
            [layer, param] => (*layer, *param),
            _ => return None,
        };
        let ldm = match layer {
            "group_norm" => "norm",
            "to_q" | "query" => "q",
            "to_k" | "key" => "k",
            "to_v" | "value" => "v",
            "proj_out" | "proj_attn" => "proj_out",
            _ => return None,
        };
        let form = if ldm != "norm" && param == "weight" {
            Form::Conv1x1
        } else {
            Form::Same
        };
        Some(Stored {
            key: format!("{VAE}{side}.mid.attn_1.{ldm}.{param}"),
            form,
        })
    }
}

impl KeyMap for VaeKeys {
    fn prefix(&self) -> &str {
        VAE
    }

    fn ldm(&self, name: &str) -> Option<Stored> {
        let parts: Vec<&str> = name.split('.').collect();
        let name = match parts.as_slice() {
            [conv @ ("quant_conv" | "post_quant_conv"), rest @ ..] => join(conv, rest),
            [side @ ("encoder" | "decoder"), rest @ ..] => {
                let inner = match (*side, rest) {
                    (_, ["conv_in" | "conv_out", ..]) => join("", rest),
                    (_, ["conv_norm_out", tail @ ..]) => join("norm_out", tail),
                    (_, ["mid_block", "resnets", j @ ("0" | "1"), tail @ ..]) => join(
                        &format!("mid.block_{}", number(j)? + 1),
                        &[&Self::resnet(tail)?],
                    ),
                    (_, ["mid_block", "attentions", "0", tail @ ..]) => {
                        return Self::attention(side, tail)
                    }
                    ("encoder", ["down_blocks", i, "resnets", j, tail @ ..]) => {
                        join(&format!("down.{i}.block.{j}"), &[&Self::resnet(tail)?])
                    }
                    ("encoder", ["down_blocks", i, "downsamplers", "0", "conv", tail @ ..]) => {
                        join(&format!("down.{i}.downsample.conv"), tail)
                    }
                    ("decoder", ["up_blocks", i, "resnets", j, tail @ ..]) => {
                        let level = self.levels.checked_sub(number(i)? + 1)?;
                        join(&format!("up.{level}.block.{j}"), &[&Self::resnet(tail)?])
                    }
                    ("decoder", ["up_blocks", i, "upsamplers", "0", "conv", tail @ ..]) => {
                        let level = self.levels.checked_sub(number(i)? + 1)?;
                        join(&format!("up.{level}.upsample.conv"), tail)
                    }
                    _ => return None,
                };
                format!("{side}.{inner}")
            }
            _ => return None,
        };
        Some(Stored::same(format!("{VAE}{name}")))
    }

    fn unused_by_design(&self, rest: &str) -> bool {
        // Training-only weights of the autoencoder's loss (discriminator, perceptual
        // network), which unpruned checkpoints carry.
        rest.starts_with("loss.")
    }
}

/// transformers' CLIP text model under a prefix: the names are diffusers' own.
pub(crate) struct ClipKeys {
    prefix: &'static str,
}

impl ClipKeys {
    pub fn new(prefix: &'static str) -> Self {
        ClipKeys { prefix }
    }
}

impl KeyMap for ClipKeys {
    fn prefix(&self) -> &str {
        self.prefix
    }

    fn ldm(&self, name: &str) -> Option<Stored> {
        Some(Stored::same(format!("{}{name}", self.prefix)))
    }
}

/// OpenCLIP's text tower (SD 2.x's ViT-H, SDXL's ViT-bigG).
pub(crate) struct OpenClipKeys {
    prefix: &'static str,
    /// The layers the encoder runs.
    layers: usize,
    /// Whether the encoder projects its pooled features (SDXL's second encoder).
    projection: bool,
}

impl OpenClipKeys {
    pub fn new(prefix: &'static str, layers: usize, projection: bool) -> Self {
        OpenClipKeys {
            prefix,
            layers,
            projection,
        }
    }

    fn layer(&self, l: &str, rest: &[&str]) -> Option<Stored> {
        let block = format!("{}transformer.resblocks.{l}", self.prefix);
        let fused = |index: usize, param: &str| Stored {
            key: format!("{block}.attn.in_proj_{param}"),
            form: Form::Slice { index, parts: 3 },
        };
        let stored = match rest {
            ["self_attn", proj @ ("q_proj" | "k_proj" | "v_proj"), param] => {
                let index = match *proj {
                    "q_proj" => 0,
                    "k_proj" => 1,
                    _ => 2,
                };
                fused(index, param)
            }
            ["self_attn", "out_proj", param] => {
                Stored::same(format!("{block}.attn.out_proj.{param}"))
            }
            ["layer_norm1", param] => Stored::same(format!("{block}.ln_1.{param}")),
            ["layer_norm2", param] => Stored::same(format!("{block}.ln_2.{param}")),
            ["mlp", "fc1", param] => Stored::same(format!("{block}.mlp.c_fc.{param}")),
            ["mlp", "fc2", param] => Stored::same(format!("{block}.mlp.c_proj.{param}")),
            _ => return None,
        };
        Some(stored)
    }
}

impl KeyMap for OpenClipKeys {
    fn prefix(&self) -> &str {
        self.prefix
    }

    fn ldm(&self, name: &str) -> Option<Stored> {
        let p = self.prefix;
        let parts: Vec<&str> = name.split('.').collect();
        let stored = match parts.as_slice() {
            ["text_model", "embeddings", "token_embedding", "weight"] => {
                Stored::same(format!("{p}token_embedding.weight"))
            }
            ["text_model", "embeddings", "position_embedding", "weight"] => {
                Stored::same(format!("{p}positional_embedding"))
            }
            ["text_model", "final_layer_norm", param] => {
                Stored::same(format!("{p}ln_final.{param}"))
            }
            ["text_model", "encoder", "layers", l, rest @ ..] => self.layer(l, rest)?,
            ["text_projection", "weight"] => Stored {
                key: format!("{p}text_projection"),
                form: Form::Transposed,
            },
            _ => return None,
        };
        Some(stored)
    }

    fn unused_by_design(&self, rest: &str) -> bool {
        if rest == "logit_scale" || rest == "attn_mask" {
            return true;
        }
        if self.projection {
            return false;
        }
        // SD 2.x: the layer after the penultimate one, and the projection.
        rest == "text_projection"
            || rest.starts_with(&format!("transformer.resblocks.{}.", self.layers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{JsonFile, UNetConfig};

    fn sd15_unet() -> UNetKeys {
        let config = serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                               "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768,
        });
        let file = JsonFile::new("unet".into(), config).expect("json");
        UNetKeys::new(&UNetConfig::parse(&file).expect("config"))
    }

    fn key(map: &impl KeyMap, name: &str) -> String {
        map.ldm(name).map(|s| s.key).unwrap_or_default()
    }

    #[test]
    fn unet_names_follow_the_original_block_lists() {
        // Names as SD 1.5's v1-5-pruned-emaonly.safetensors has them.
        let unet = sd15_unet();
        let cases = [
            ("conv_in.weight", "input_blocks.0.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            (
                "down_blocks.0.resnets.1.conv1.weight",
                "input_blocks.2.0.in_layers.2.weight",
            ),
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.bias",
                "input_blocks.4.0.skip_connection.bias",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.weight",
                "input_blocks.9.0.op.weight",
            ),
            (
                "down_blocks.3.resnets.1.time_emb_proj.weight",
                "input_blocks.11.0.emb_layers.1.weight",
            ),
            (
                "mid_block.resnets.1.norm2.weight",
                "middle_block.2.out_layers.0.weight",
            ),
            (
                "mid_block.attentions.0.proj_out.bias",
                "middle_block.1.proj_out.bias",
            ),
            (
                "up_blocks.0.resnets.2.conv2.weight",
                "output_blocks.2.0.out_layers.3.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.3.attentions.2.norm.weight",
                "output_blocks.11.1.norm.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(key(&unet, diffusers), format!("{UNET}{ldm}"), "{diffusers}");
        }
        assert!(unet.ldm("down_blocks.0.resnets.2.conv1.weight").is_none());
        assert!(unet.ldm("mid_block.resnets.2.conv1.weight").is_none());
    }

    #[test]
    fn vae_names_count_decoder_levels_from_the_bottom() {
        let vae = VaeKeys::new(4);
        let cases = [
            ("encoder.conv_norm_out.bias", "encoder.norm_out.bias"),
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "encoder.down.0.downsample.conv.bias",
            ),
            (
                "encoder.mid_block.resnets.1.norm1.weight",
                "encoder.mid.block_2.norm1.weight",
            ),
            (
                "decoder.up_blocks.0.resnets.2.conv2.weight",
                "decoder.up.3.block.2.conv2.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                "decoder.mid.attn_1.norm.weight",
            ),
            ("post_quant_conv.bias", "post_quant_conv.bias"),
        ];
        for (diffusers, ldm) in cases {
            assert_eq!(key(&vae, diffusers), format!("{VAE}{ldm}"), "{diffusers}");
        }
        for (name, form) in [
            ("encoder.mid_block.attentions.0.to_q.weight", Form::Conv1x1),
            ("encoder.mid_block.attentions.0.query.weight", Form::Conv1x1),
            (
                "encoder.mid_block.attentions.0.to_out.0.weight",
                Form::Conv1x1,
            ),
            ("encoder.mid_block.attentions.0.proj_attn.bias", Form::Same),
        ] {
            let stored = vae.ldm(name).expect("mapped");
            assert!(
                stored.key.starts_with(&format!("{VAE}encoder.mid.attn_1.")),
                "{name}"
            );
            assert_eq!(stored.form, form, "{name}");
        }
    }

    #[test]
    fn open_clip_fuses_attention_and_drops_sd2s_last_layer() {
        let sd2 = LdmNames(OpenClipKeys::new(SD2_OPEN_CLIP, 23, false));
        let q = sd2.locate("text_model.encoder.layers.3.self_attn.v_proj.bias");
        assert_eq!(
            q.key,
            format!("{SD2_OPEN_CLIP}transformer.resblocks.3.attn.in_proj_bias")
        );
        assert_eq!(q.form, Form::Slice { index: 2, parts: 3 });
        assert_eq!(
            sd2.locate("text_model.encoder.layers.0.mlp.fc2.weight").key,
            format!("{SD2_OPEN_CLIP}transformer.resblocks.0.mlp.c_proj.weight")
        );
        assert!(sd2.owns(&format!(
            "{SD2_OPEN_CLIP}transformer.resblocks.22.ln_1.weight"
        )));
        assert!(!sd2.owns(&format!(
            "{SD2_OPEN_CLIP}transformer.resblocks.23.ln_1.weight"
        )));
        assert!(!sd2.owns(&format!("{SD2_OPEN_CLIP}text_projection")));
        assert!(!sd2.owns("model.diffusion_model.out.0.weight"));
        let xl = LdmNames(OpenClipKeys::new(SDXL_OPEN_CLIP, 32, true));
        assert!(xl.owns(&format!("{SDXL_OPEN_CLIP}text_projection")));
        assert_eq!(xl.locate("text_projection.weight").form, Form::Transposed);
    }
}
