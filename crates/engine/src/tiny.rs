//! A tiny model with the real Stable Diffusion 1.5 architecture — CLIP text encoder, UNet
//! with cross-attention, a VAE that scales by 8 — and deterministic random weights, in the
//! diffusers layout. It exercises every code path of the pipeline in well under a second a
//! step on a CPU; its images are noise-like, as random weights make them.

use crate::clip::ClipTextModel;
use crate::config::{ClipConfig, UNetConfig, VaeConfig};
use crate::unet::UNet;
use crate::{Architecture, EngineError};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::PoisonError;

const DIFFUSERS_VERSION: &str = "0.30.0";

fn text_encoder_config() -> Value {
    json!({
        "_name_or_path": "sparkle-tiny",
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 37,
        "projection_dim": 32,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
        "torch_dtype": "float32",
        "transformers_version": "4.44.0",
    })
}

fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "center_input_sample": false,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        // Cross-attention in the lower-resolution block, as diffusers' own tiny test models
        // have it: the same block types and wiring as SD 1.5, at a quarter of the attention
        // cost, so a 512x512 image stays affordable on a CPU.
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "only_cross_attention": false,
        "block_out_channels": [32, 64],
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 32,
        "attention_head_dim": 2,
        "use_linear_projection": false,
    })
}

fn vae_config() -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 32, 32, 32],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    })
}

fn scheduler_config() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
    })
}

fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "safety_checker": [null, null],
        "requires_safety_checker": false,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

fn sdxl_model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "force_zeros_for_empty_prompt": true,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// CLIP's tokenizer files, padding with `pad`.
fn write_tokenizer(dir: &Path, pad: &str) -> Result<(), EngineError> {
    let (vocab, merges) = crate::vocab::diffusers_files()?;
    write(&dir.join("vocab.json"), vocab.as_bytes())?;
    write(&dir.join("merges.txt"), merges.as_bytes())?;
    let special = json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>",
    });
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    let mut tokenizer_config = special.clone();
    tokenizer_config["model_max_length"] = json!(77);
    tokenizer_config["tokenizer_class"] = json!("CLIPTokenizer");
    tokenizer_config["errors"] = json!("replace");
    tokenizer_config["add_prefix_space"] = json!(false);
    tokenizer_config["clean_up_tokenization_spaces"] = json!(true);
    write_json(&dir.join("tokenizer_config.json"), &tokenizer_config)
}

fn write(path: &Path, contents: &[u8]) -> Result<(), EngineError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    }
    std::fs::write(path, contents).map_err(|e| EngineError::io(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<(), EngineError> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| EngineError::invalid_model(path, e.to_string()))?;
    write(path, text.as_bytes())
}

/// The seed of one tensor's values: a stable 64-bit hash (FNV-1a) of the model seed and the
/// tensor's name, so that values depend on nothing else (not on the order tensors are made).
fn tensor_seed(seed: u64, name: &str) -> u64 {
    seed.to_le_bytes()
        .iter()
        .chain(name.as_bytes())
        .fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// Gives every variable deterministic values and saves them: norm scales near 1, small
/// biases, other weights scaled by `1/√fan_in` so activations keep their size.
fn fill_and_save(varmap: &VarMap, seed: u64, path: &Path) -> Result<(), EngineError> {
    {
        let vars = varmap.data().lock().unwrap_or_else(PoisonError::into_inner);
        for (name, var) in vars.iter() {
            let dims = var.dims().to_vec();
            let count: usize = dims.iter().product();
            let mut rng = ChaCha8Rng::seed_from_u64(tensor_seed(seed, name));
            let mut normal = || -> f32 { StandardNormal.sample(&mut rng) };
            let values: Vec<f32> = if dims.len() == 1 && name.ends_with("weight") {
                (0..count).map(|_| 1.0 + 0.1 * normal()).collect()
            } else if name.ends_with("bias") {
                (0..count).map(|_| 0.02 * normal()).collect()
            } else {
                let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
                let scale = 1.0 / (fan_in as f32).sqrt();
                (0..count).map(|_| scale * normal()).collect()
            };
            var.set(&Tensor::from_vec(values, dims, &Device::Cpu)?)?;
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    }
    varmap.save(path)?;
    Ok(())
}

/// Writes the tiny SD 1.5 model into `dir` (created if needed).
pub fn write_tiny_model(dir: &Path, seed: u64) -> Result<(), EngineError> {
    write_random(dir, seed, RandomModel::Sd15, ModelScale::Tiny)
}

/// How big the random model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelScale {
    /// A few megabytes, for tests and offline demos on a CPU.
    Tiny,
    /// The real checkpoints' shapes (about 4 GB in f32 for SD 1.5, 14 GB for SDXL), for
    /// benchmarks: same arithmetic as the real model, random weights.
    Full,
}

/// The random-weight models the engine can write: each with the real architecture of a
/// published model family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomModel {
    Sd15,
    /// A GELU text encoder padded with `!`, per-block head counts and linear projections in
    /// the UNet's transformers, v-prediction: where SD 2.1 differs from SD 1.5.
    Sd21,
    /// SD 2.1's networks at 512 with epsilon prediction and a few-step "trailing" schedule.
    SdTurbo,
    /// Two text encoders, pooled text and size conditioning, deeper transformers at the low
    /// resolutions, no attention at the highest.
    Sdxl,
    /// SDXL's networks at 512 with a few-step "trailing" schedule.
    SdxlTurbo,
    /// SD 1.5 with an inpainting UNet: 9 input channels (the latents, the mask and the
    /// masked image's latents).
    Sd15Inpainting,
    /// SDXL with an inpainting UNet.
    SdxlInpainting,
}

impl RandomModel {
    pub const ALL: [RandomModel; 7] = [
        RandomModel::Sd15,
        RandomModel::Sd21,
        RandomModel::SdTurbo,
        RandomModel::Sdxl,
        RandomModel::SdxlTurbo,
        RandomModel::Sd15Inpainting,
        RandomModel::SdxlInpainting,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RandomModel::Sd15 => "sd1.5",
            RandomModel::Sd21 => "sd2.1",
            RandomModel::SdTurbo => "sd-turbo",
            RandomModel::Sdxl => "sdxl",
            RandomModel::SdxlTurbo => "sdxl-turbo",
            RandomModel::Sd15Inpainting => "sd1.5-inpainting",
            RandomModel::SdxlInpainting => "sdxl-inpainting",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn architecture(self) -> Architecture {
        match self {
            RandomModel::Sd15 | RandomModel::Sd15Inpainting => Architecture::Sd15,
            RandomModel::Sd21 | RandomModel::SdTurbo => Architecture::Sd21,
            RandomModel::Sdxl | RandomModel::SdxlTurbo | RandomModel::SdxlInpainting => {
                Architecture::Sdxl
            }
        }
    }

    fn inpainting(self) -> bool {
        matches!(
            self,
            RandomModel::Sd15Inpainting | RandomModel::SdxlInpainting
        )
    }

    fn turbo(self) -> bool {
        matches!(self, RandomModel::SdTurbo | RandomModel::SdxlTurbo)
    }
}

/// Resizes the tiny configurations to the real checkpoints' sizes.
fn full_size(arch: Architecture, text: &mut Value, unet: &mut Value, vae: &mut Value) {
    let sd21 = arch == Architecture::Sd21;
    let (hidden, layers, heads) = if sd21 { (1024, 23, 16) } else { (768, 12, 12) };
    text["hidden_size"] = json!(hidden);
    text["intermediate_size"] = json!(hidden * 4);
    text["projection_dim"] = json!(if sd21 { 512 } else { 768 });
    text["num_attention_heads"] = json!(heads);
    text["num_hidden_layers"] = json!(layers);
    vae["block_out_channels"] = json!([128, 256, 512, 512]);
    vae["layers_per_block"] = json!(2);
    if arch == Architecture::Sdxl {
        unet["block_out_channels"] = json!([320, 640, 1280]);
        unet["down_block_types"] = json!([
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D"
        ]);
        unet["up_block_types"] = json!(["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]);
        unet["attention_head_dim"] = json!([5, 10, 20]);
        unet["transformer_layers_per_block"] = json!([1, 2, 10]);
        unet["cross_attention_dim"] = json!(2048);
        unet["addition_time_embed_dim"] = json!(256);
        unet["projection_class_embeddings_input_dim"] = json!(2816);
        return;
    }
    let cross = [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ];
    unet["down_block_types"] = json!(cross);
    unet["up_block_types"] = json!([
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D"
    ]);
    unet["block_out_channels"] = json!([320, 640, 1280, 1280]);
    unet["cross_attention_dim"] = json!(hidden);
    unet["attention_head_dim"] = if sd21 {
        json!([5, 10, 20, 20])
    } else {
        json!(8)
    };
}

/// SDXL's second text encoder (OpenCLIP bigG with its projection), tiny or full-size.
fn second_text_encoder_config(scale: ModelScale) -> Value {
    let mut config = text_encoder_config();
    config["architectures"] = json!(["CLIPTextModelWithProjection"]);
    config["hidden_act"] = json!("gelu");
    config["pad_token_id"] = json!(0);
    if scale == ModelScale::Full {
        config["hidden_size"] = json!(1280);
        config["intermediate_size"] = json!(5120);
        config["projection_dim"] = json!(1280);
        config["num_attention_heads"] = json!(20);
        config["num_hidden_layers"] = json!(32);
    }
    config
}

/// Writes a random-weight model of the given kind and scale into `dir`.
pub fn write_random(
    dir: &Path,
    seed: u64,
    kind: RandomModel,
    scale: ModelScale,
) -> Result<(), EngineError> {
    let cpu = Device::Cpu;
    let arch = kind.architecture();
    let (mut text_encoder, mut unet, mut scheduler) =
        (text_encoder_config(), unet_config(), scheduler_config());
    let mut vae = vae_config();
    let mut index = model_index();
    let mut pad = "<|endoftext|>";
    match arch {
        Architecture::Sd15 => {}
        Architecture::Sd21 => {
            text_encoder["hidden_act"] = json!("gelu");
            text_encoder["pad_token_id"] = json!(0);
            unet["attention_head_dim"] = json!([2, 4]);
            unet["use_linear_projection"] = json!(true);
            unet["sample_size"] = json!(96);
            scheduler["_class_name"] = json!("DDIMScheduler");
            scheduler["prediction_type"] = json!("v_prediction");
            pad = "!";
        }
        Architecture::Sdxl => {
            unet["attention_head_dim"] = json!([2, 4]);
            unet["transformer_layers_per_block"] = json!([1, 2]);
            unet["use_linear_projection"] = json!(true);
            unet["cross_attention_dim"] = json!(64);
            unet["addition_embed_type"] = json!("text_time");
            unet["addition_time_embed_dim"] = json!(8);
            unet["projection_class_embeddings_input_dim"] = json!(32 + 6 * 8);
            unet["sample_size"] = json!(128);
            vae["scaling_factor"] = json!(0.13025);
            vae["force_upcast"] = json!(true);
            scheduler["_class_name"] = json!("EulerDiscreteScheduler");
            scheduler["timestep_spacing"] = json!("leading");
            scheduler["interpolation_type"] = json!("linear");
            index = sdxl_model_index();
        }
    }
    if kind.turbo() {
        // Distilled for a few steps on "trailing" timesteps, at 512 with epsilon prediction.
        unet["sample_size"] = json!(64);
        scheduler["_class_name"] = json!("EulerDiscreteScheduler");
        scheduler["prediction_type"] = json!("epsilon");
        scheduler["timestep_spacing"] = json!("trailing");
    }
    if scale == ModelScale::Full {
        full_size(arch, &mut text_encoder, &mut unet, &mut vae);
    }
    if kind.inpainting() {
        unet["in_channels"] = json!(9);
    }
    write_json(&dir.join("model_index.json"), &index)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler)?;
    write_json(&dir.join("text_encoder/config.json"), &text_encoder)?;
    write_json(&dir.join("unet/config.json"), &unet)?;
    write_json(&dir.join("vae/config.json"), &vae)?;

    write_tokenizer(&dir.join("tokenizer"), pad)?;
    let clip = ClipConfig::read(&dir.join("text_encoder"))?;
    let varmap = VarMap::new();
    ClipTextModel::new(VarBuilder::from_varmap(&varmap, DType::F32, &cpu), &clip)?;
    fill_and_save(&varmap, seed, &dir.join("text_encoder/model.safetensors"))?;

    if arch == Architecture::Sdxl {
        write_json(
            &dir.join("text_encoder_2/config.json"),
            &second_text_encoder_config(scale),
        )?;
        write_tokenizer(&dir.join("tokenizer_2"), "!")?;
        let clip = ClipConfig::read(&dir.join("text_encoder_2"))?;
        let varmap = VarMap::new();
        ClipTextModel::with_projection(VarBuilder::from_varmap(&varmap, DType::F32, &cpu), &clip)?;
        fill_and_save(&varmap, seed, &dir.join("text_encoder_2/model.safetensors"))?;
    }

    let unet = UNetConfig::read(&dir.join("unet"))?;
    let varmap = VarMap::new();
    UNet::new(VarBuilder::from_varmap(&varmap, DType::F32, &cpu), &unet)?;
    fill_and_save(
        &varmap,
        seed,
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
    )?;

    let vae = VaeConfig::read(&dir.join("vae"))?;
    let varmap = VarMap::new();
    AutoEncoderKL::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &cpu),
        vae.in_channels,
        vae.out_channels,
        vae.candle,
    )?;
    fill_and_save(
        &varmap,
        seed,
        &dir.join("vae/diffusion_pytorch_model.safetensors"),
    )?;
    Ok(())
}
