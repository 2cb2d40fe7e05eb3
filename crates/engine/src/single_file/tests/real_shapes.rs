//! The published checkpoints' shapes, without their weights: each network is built from the
//! published diffusers configuration on a backend that only records what it is asked for,
//! mapped to single-file names, and compared with names and shapes that the published
//! single files have. The configurations derived from those shapes must be the published
//! ones.

use super::super::header::Header;
use super::super::key_map;
use super::super::keys::SD2_OPEN_CLIP;
use super::super::shapes;
use super::super::variant::{Settings, Variant};
use crate::clip::ClipTextModel;
use crate::config::{ClipConfig, JsonFile, ModelIndex, ScheduleConfig, UNetConfig, VaeConfig};
use crate::layout::{Configs, Part};
use crate::model::Architecture;
use crate::unet::UNet;
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The names and shapes a network built by `build` asks for.
fn record<T>(
    build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
) -> BTreeMap<String, Vec<usize>> {
    crate::weights::shapes_of(build)
        .expect("build")
        .into_iter()
        .collect()
}

fn parse<T>(value: Value, parse: impl FnOnce(&JsonFile) -> Result<T, crate::EngineError>) -> T {
    parse(&JsonFile::new("published".into(), value).expect("json")).expect("config")
}

const CROSS: &str = "CrossAttnDownBlock2D";
const UP_CROSS: &str = "CrossAttnUpBlock2D";

fn clip_l() -> ClipConfig {
    parse(
        json!({"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
               "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768,
               "vocab_size": 49408, "max_position_embeddings": 77}),
        ClipConfig::parse,
    )
}

fn vae(scaling_factor: f64) -> VaeConfig {
    parse(
        json!({"block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
               "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
               "scaling_factor": scaling_factor}),
        VaeConfig::parse,
    )
}

fn schedule(prediction: &str, spacing: Option<&str>) -> ScheduleConfig {
    let mut value = json!({"beta_end": 0.012, "beta_schedule": "scaled_linear",
        "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": prediction,
        "set_alpha_to_one": false, "steps_offset": 1});
    if let Some(spacing) = spacing {
        value["timestep_spacing"] = json!(spacing);
    }
    parse(value, ScheduleConfig::parse)
}

/// stable-diffusion-v1-5's published configuration.
fn sd15() -> Configs {
    Configs {
        index: ModelIndex::default(),
        text_encoder: clip_l(),
        text_encoder_2: None,
        unet: parse(
            json!({"attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
                   "cross_attention_dim": 768, "layers_per_block": 2, "sample_size": 64,
                   "down_block_types": [CROSS, CROSS, CROSS, "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", UP_CROSS, UP_CROSS, UP_CROSS]}),
            UNetConfig::parse,
        ),
        vae: vae(0.18215),
        schedule: schedule("epsilon", None),
    }
}

/// stable-diffusion-2-1's.
fn sd21() -> Configs {
    Configs {
        index: ModelIndex::default(),
        text_encoder: parse(
            json!({"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                   "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
                   "vocab_size": 49408, "max_position_embeddings": 77}),
            ClipConfig::parse,
        ),
        text_encoder_2: None,
        unet: parse(
            json!({"attention_head_dim": [5, 10, 20, 20],
                   "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
                   "layers_per_block": 2, "sample_size": 96, "use_linear_projection": true,
                   "upcast_attention": true,
                   "down_block_types": [CROSS, CROSS, CROSS, "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", UP_CROSS, UP_CROSS, UP_CROSS]}),
            UNetConfig::parse,
        ),
        vae: vae(0.18215),
        schedule: schedule("v_prediction", None),
    }
}

/// stable-diffusion-xl-base-1.0's.
fn sdxl() -> Configs {
    Configs {
        index: ModelIndex {
            force_zeros_for_empty_prompt: true,
        },
        text_encoder: clip_l(),
        text_encoder_2: Some(parse(
            json!({"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
                   "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
                   "vocab_size": 49408, "max_position_embeddings": 77}),
            ClipConfig::parse,
        )),
        unet: parse(
            json!({"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                   "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
                   "cross_attention_dim": 2048, "layers_per_block": 2,
                   "projection_class_embeddings_input_dim": 2816, "sample_size": 128,
                   "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": true,
                   "down_block_types": ["DownBlock2D", CROSS, CROSS],
                   "up_block_types": [UP_CROSS, UP_CROSS, "UpBlock2D"]}),
            UNetConfig::parse,
        ),
        vae: vae(0.13025),
        schedule: schedule("epsilon", Some("leading")),
    }
}

/// A published single file's header, as far as the engine reads it: every network's tensors
/// under their single-file names and shapes, and SD 2.x's unused last text layer.
/// Returns the header and the number of tensors per network.
fn header(architecture: Architecture, configs: &Configs) -> (Header, HashMap<&'static str, usize>) {
    let mut parts = vec![Part::TextEncoder, Part::Unet, Part::Vae];
    if configs.text_encoder_2.is_some() {
        parts.push(Part::TextEncoder2);
    }
    let mut header = Header::default();
    let mut counts = HashMap::new();
    for part in parts {
        let recorded = match part {
            Part::TextEncoder => record(|vb| ClipTextModel::new(vb, &configs.text_encoder)),
            Part::TextEncoder2 => record(|vb| {
                let config = configs.text_encoder_2.as_ref().expect("second encoder");
                ClipTextModel::with_projection(vb, config)
            }),
            Part::Unet => record(|vb| UNet::new(vb, &configs.unet)),
            Part::Vae => record(|vb| {
                let c = &configs.vae;
                AutoEncoderKL::new(vb, c.in_channels, c.out_channels, c.candle.clone())
            }),
        };
        let map = key_map(architecture, part, configs);
        let before = header.shapes.len();
        for (name, shape) in recorded {
            let stored = map
                .ldm(&name)
                .unwrap_or_else(|| panic!("{name} has no place"));
            header
                .shapes
                .insert(stored.key, stored.form.stored_shape(&shape));
        }
        counts.insert(part.dir(), header.shapes.len() - before);
    }
    if architecture == Architecture::Sd21 {
        let last = format!("{SD2_OPEN_CLIP}transformer.resblocks.22.");
        let copies: Vec<(String, Vec<usize>)> = header
            .shapes
            .iter()
            .filter_map(|(key, shape)| {
                let rest = key.strip_prefix(&last)?;
                Some((
                    format!("{SD2_OPEN_CLIP}transformer.resblocks.23.{rest}"),
                    shape.clone(),
                ))
            })
            .collect();
        header.shapes.extend(copies);
        header
            .shapes
            .insert(format!("{SD2_OPEN_CLIP}text_projection"), vec![1024, 1024]);
    }
    (header, counts)
}

/// Configurations derived from the header equal the published ones (but for the projection
/// width of a text encoder without projection, which nothing reads).
fn assert_derived(architecture: Architecture, published: &Configs, header: &Header) {
    let file = Path::new("published.safetensors");
    let variant = Variant::choose(architecture, &HashMap::new(), &Settings::default(), file)
        .expect("variant");
    let derived = shapes::configs(header, file, architecture, &variant).expect("derived");
    let mut text_encoder = derived.text_encoder.clone();
    text_encoder.projection_dim = published.text_encoder.projection_dim;
    assert_eq!(text_encoder, published.text_encoder, "{architecture}");
    assert_eq!(
        derived.text_encoder_2, published.text_encoder_2,
        "{architecture}"
    );
    assert_eq!(derived.unet, published.unet, "{architecture}");
    let vaes = [&derived.vae, &published.vae].map(|v| format!("{v:?}"));
    assert_eq!(vaes[0], vaes[1], "{architecture}");
    assert_eq!(derived.schedule, published.schedule, "{architecture}");
    assert_eq!(derived.index, published.index, "{architecture}");
}

fn assert_has(header: &Header, cases: &[(&str, &[usize])]) {
    for (key, shape) in cases {
        assert_eq!(header.shape(key), Some(*shape), "{key}");
    }
}

#[test]
fn sd15_names_shapes_and_configuration_are_the_published_checkpoints() {
    let published = sd15();
    let (header, counts) = header(Architecture::Sd15, &published);
    // v1-5-pruned-emaonly.safetensors: 686 UNet, 248 VAE and 196 text encoder tensors (and
    // the text encoder's position ids, a buffer).
    assert_eq!(counts["unet"], 686);
    assert_eq!(counts["vae"], 248);
    assert_eq!(counts["text_encoder"], 196);
    assert_has(
        &header,
        &[
            (
                "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                &[320, 320],
            ),
            (
                "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                &[320, 320, 1, 1],
            ),
            (
                "model.diffusion_model.input_blocks.3.0.op.weight",
                &[320, 320, 3, 3],
            ),
            (
                "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
                &[1280, 1280, 3, 3],
            ),
            (
                "model.diffusion_model.middle_block.2.emb_layers.1.weight",
                &[1280, 1280],
            ),
            // The first decoder level has no transformer: its upsampler is block 1.
            (
                "model.diffusion_model.output_blocks.2.1.conv.weight",
                &[1280, 1280, 3, 3],
            ),
            (
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                &[1280, 1280, 3, 3],
            ),
            (
                "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
                &[320, 640, 1, 1],
            ),
            ("model.diffusion_model.time_embed.0.weight", &[1280, 320]),
            ("model.diffusion_model.out.2.weight", &[4, 320, 3, 3]),
            (
                "first_stage_model.decoder.up.3.block.0.conv1.weight",
                &[512, 512, 3, 3],
            ),
            (
                "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight",
                &[128, 256, 1, 1],
            ),
            (
                "first_stage_model.encoder.mid.attn_1.q.weight",
                &[512, 512, 1, 1],
            ),
            (
                "first_stage_model.decoder.mid.attn_1.proj_out.weight",
                &[512, 512, 1, 1],
            ),
            ("first_stage_model.quant_conv.weight", &[8, 8, 1, 1]),
            (
                "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                &[768, 3072],
            ),
        ],
    );
    assert_derived(Architecture::Sd15, &published, &header);
}

#[test]
fn sd21_names_shapes_and_configuration_are_the_published_checkpoints() {
    let published = sd21();
    let (header, _) = header(Architecture::Sd21, &published);
    assert_has(
        &header,
        &[
            (
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                &[3072, 1024],
            ),
            (
                "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias",
                &[3072],
            ),
            (
                "cond_stage_model.model.transformer.resblocks.22.mlp.c_fc.weight",
                &[4096, 1024],
            ),
            (
                "cond_stage_model.model.transformer.resblocks.23.ln_2.bias",
                &[1024],
            ),
            (
                "cond_stage_model.model.token_embedding.weight",
                &[49408, 1024],
            ),
            ("cond_stage_model.model.positional_embedding", &[77, 1024]),
            ("cond_stage_model.model.ln_final.weight", &[1024]),
            ("cond_stage_model.model.text_projection", &[1024, 1024]),
            (
                "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                &[320, 320],
            ),
            (
                "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                &[320, 1024],
            ),
        ],
    );
    assert_derived(Architecture::Sd21, &published, &header);
}

#[test]
fn sdxl_names_shapes_and_configuration_are_the_published_checkpoints() {
    let published = sdxl();
    let (header, counts) = header(Architecture::Sdxl, &published);
    // sd_xl_base_1.0.safetensors: 2515 tensors, of which these 2513, the first text
    // encoder's position ids and OpenCLIP's logit scale.
    assert_eq!(header.shapes.len(), 2513);
    assert_eq!(counts["unet"], 1680);
    assert_has(
        &header,
        &[
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                &[3840, 1280],
            ),
            (
                "conditioner.embedders.1.model.text_projection",
                &[1280, 1280],
            ),
            ("model.diffusion_model.label_emb.0.0.weight", &[1280, 2816]),
            ("model.diffusion_model.label_emb.0.2.weight", &[1280, 1280]),
            (
                "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                &[640, 2048],
            ),
            (
                "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
                &[1280, 5120],
            ),
            (
                "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight",
                &[1280],
            ),
            // The first decoder level has transformers: its upsampler is block 2.
            (
                "model.diffusion_model.output_blocks.2.2.conv.weight",
                &[1280, 1280, 3, 3],
            ),
            (
                "model.diffusion_model.output_blocks.5.2.conv.weight",
                &[640, 640, 3, 3],
            ),
            (
                "model.diffusion_model.output_blocks.8.0.skip_connection.weight",
                &[320, 640, 1, 1],
            ),
        ],
    );
    assert_derived(Architecture::Sdxl, &published, &header);
}

#[test]
fn diffusers_names_map_to_the_names_diffusers_converts_from() {
    // Pairs as diffusers' single-file conversion reads them.
    let sd15 = sd15();
    let cases = [
        (
            Part::Unet,
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            Part::Unet,
            "up_blocks.0.upsamplers.0.conv.weight",
            "model.diffusion_model.output_blocks.2.1.conv.weight",
        ),
        (
            Part::Unet,
            "up_blocks.3.resnets.2.conv_shortcut.bias",
            "model.diffusion_model.output_blocks.11.0.skip_connection.bias",
        ),
        (
            Part::Unet,
            "mid_block.resnets.0.time_emb_proj.weight",
            "model.diffusion_model.middle_block.0.emb_layers.1.weight",
        ),
        (
            Part::Vae,
            "decoder.up_blocks.0.resnets.0.conv1.weight",
            "first_stage_model.decoder.up.3.block.0.conv1.weight",
        ),
        (
            Part::Vae,
            "encoder.mid_block.attentions.0.to_out.0.weight",
            "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        ),
        (
            Part::TextEncoder,
            "text_model.embeddings.position_embedding.weight",
            "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
        ),
    ];
    for (part, diffusers, ldm) in cases {
        let map = key_map(Architecture::Sd15, part, &sd15);
        assert_eq!(
            map.ldm(diffusers).map(|s| s.key).as_deref(),
            Some(ldm),
            "{diffusers}"
        );
    }
    let sd21 = sd21();
    let open_clip = key_map(Architecture::Sd21, Part::TextEncoder, &sd21);
    for (proj, index) in [("q_proj", 0), ("k_proj", 1), ("v_proj", 2)] {
        let name = format!("text_model.encoder.layers.0.self_attn.{proj}.weight");
        let stored = open_clip.ldm(&name).expect("mapped");
        assert_eq!(
            stored.key,
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
        );
        assert_eq!(stored.form, crate::weights::Form::Slice { index, parts: 3 });
    }
}
