//! Parity with diffusers: the same tiny weights (regenerated from their seed), the same
//! initial noise and ancestral noise, compared stage by stage against the reference outputs
//! that `tools/reference/diffusers_reference.py` wrote into `tests/fixtures/`.

use crate::{
    write_random, Batch, BatchItem, DeviceChoice, Engine, EngineOptions, ModelScale, RandomModel,
};
use candle_core::{DType, Device, IndexOp, Tensor};
use sparkle_core::Scheduler;
use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

/// Relative error allowed per stage, in f32.
const TOLERANCE: f64 = 1e-3;

fn fixtures(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(arch)
}

/// ‖a − b‖ / ‖b‖ over every element.
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .expect("a");
    let b = b
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .expect("b");
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let diff = (&a - &b)
        .and_then(|d| d.sqr())
        .and_then(|d| d.sum_all())
        .and_then(|d| d.to_scalar::<f64>());
    let norm = b
        .sqr()
        .and_then(|d| d.sum_all())
        .and_then(|d| d.to_scalar::<f64>());
    (diff.expect("diff") / norm.expect("norm").max(1e-30)).sqrt()
}

/// A case's settings (`case.json`) and the tiny model it was made with, loaded on the CPU.
fn case_and_engine(dir: &Path, kind: RandomModel) -> (serde_json::Value, Engine) {
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).expect("case.json"))
            .expect("case json");
    let model = tempfile::tempdir().expect("tempdir");
    write_random(model.path(), 0, kind, ModelScale::Tiny).expect("tiny model");
    let engine = Engine::load(
        model.path(),
        &EngineOptions {
            device: DeviceChoice::Cpu,
            ..EngineOptions::default()
        },
    )
    .expect("load");
    (case, engine)
}

/// The case's batch of one image.
fn case_batch(
    case: &serde_json::Value,
    scheduler: Scheduler,
    strength: f32,
    source: Option<crate::SourceImage>,
) -> Batch {
    Batch {
        width: case["width"].as_u64().expect("width") as u32,
        height: case["height"].as_u64().expect("height") as u32,
        steps: case["steps"].as_u64().expect("steps") as u32,
        guidance_scale: case["guidance_scale"].as_f64().expect("guidance") as f32,
        scheduler,
        strength,
        hires: None,
        loras: Vec::new(),
        items: vec![BatchItem {
            prompt: case["prompt"].as_str().expect("prompt").into(),
            negative_prompt: case["negative_prompt"].as_str().expect("negative").into(),
            seed: 0,
            source,
        }],
    }
}

/// One reference file: its tensors, compared stage by stage.
struct Reference {
    label: String,
    tensors: HashMap<String, Tensor>,
}

impl Reference {
    fn load(file: &Path, label: String) -> Reference {
        Reference {
            label,
            tensors: candle_core::safetensors::load(file, &Device::Cpu).expect("fixture"),
        }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{} lacks {name}", self.label))
    }

    fn stage(&self, what: &str, ours: &Tensor, theirs: &Tensor) {
        let err = relative_error(ours, theirs);
        assert!(
            err <= TOLERANCE,
            "{} {what}: relative error {err:.2e} > {TOLERANCE:.0e}",
            self.label
        );
        eprintln!("{} {what}: relative error {err:.2e}", self.label);
    }

    /// The loop from the recorded initial noise (and ancestral noise, for Euler a): the
    /// latents after the first step that runs and after the last, and the decoded image.
    fn check_loop(
        &self,
        engine: &Engine,
        batch: &Batch,
        conditioning: &crate::pipeline::Conditioning,
        sources: Option<&crate::pipeline::Sources>,
        inpaint: Option<&crate::pipeline::InpaintInput>,
    ) {
        let mut drawn = 0;
        let mut noise = || {
            let all = self
                .tensors
                .get("noise")
                .ok_or_else(|| candle_core::Error::Msg("no noise in fixture".into()))?;
            drawn += 1;
            all.i(drawn - 1..drawn)
        };
        let mut first = None;
        let last = engine
            .denoise(
                batch,
                conditioning,
                crate::pipeline::Start {
                    noise: self.get("initial").clone(),
                    sources,
                    inpaint,
                },
                &mut noise,
                &mut |_| ControlFlow::Continue(()),
                &mut first,
            )
            .expect("denoise");
        self.stage(
            "latents after the first step",
            &first.expect("first"),
            self.get("first"),
        );
        self.stage("latents after the last step", &last, self.get("last"));
        let image = engine.decode(self.get("last")).expect("decode");
        let image = ((image / 2.0).and_then(|t| t + 0.5))
            .and_then(|t| t.clamp(0f32, 1f32))
            .expect("scale");
        self.stage("decoded image", &image, self.get("image"));
    }
}

fn check_architecture(arch: &str, kind: RandomModel) {
    let dir = fixtures(arch);
    let (case, engine) = case_and_engine(&dir, kind);
    let checked = check_schedulers(&dir, arch, &case, &engine, &[]);
    assert_eq!(
        checked,
        Scheduler::ALL.len(),
        "{arch}: a fixture per scheduler"
    );
}

/// Every scheduler the case has a fixture for: the text embeddings, then the loop. How many
/// were checked.
fn check_schedulers(
    dir: &Path,
    label: &str,
    case: &serde_json::Value,
    engine: &Engine,
    loras: &[crate::lora::LoraWeight],
) -> usize {
    let mut checked = 0;
    for scheduler in Scheduler::ALL {
        let file = dir.join(format!("{}.safetensors", scheduler.as_str()));
        if !file.is_file() {
            continue;
        }
        let reference = Reference::load(&file, format!("{label}/{scheduler}"));
        let batch = Batch {
            loras: loras.to_vec(),
            ..case_batch(case, scheduler, 1.0, None)
        };
        let conditioning = engine.encode_prompts(&batch).expect("embeddings");
        let rows = |name: &str| {
            if batch.guidance_scale > 1.0 {
                Tensor::cat(
                    &[
                        reference.get(&format!("uncond{name}")),
                        reference.get(&format!("cond{name}")),
                    ],
                    0,
                )
                .expect("cat")
            } else {
                reference.get(&format!("cond{name}")).clone()
            }
        };
        reference.stage("text embeddings", &conditioning.context, &rows(""));
        if let Some(pooled) = &conditioning.pooled {
            reference.stage("pooled text embeddings", pooled, &rows("_pooled"));
        }
        reference.check_loop(engine, &batch, &conditioning, None, None);
        checked += 1;
    }
    checked
}

/// A case made with a LoRA (`loras/style.safetensors`, loaded by diffusers'
/// `load_lora_weights`) or a textual-inversion embedding (`embeddings/NAME.safetensors`,
/// `load_textual_inversion`) beside the tiny SD 1.5 model: the engine reads the same files.
fn check_with_additions(fixture: &str) {
    let dir = fixtures(fixture);
    let (case, mut engine) = case_and_engine(&dir, RandomModel::Sd15);
    let mut loras = Vec::new();
    if let Some(lora) = case.get("lora") {
        let found = engine.load_loras(&dir.join("loras")).expect("loras");
        assert_eq!(found.names, ["style"], "{:?}", found.skipped);
        loras.push(crate::lora::LoraWeight {
            name: lora["name"].as_str().expect("name").into(),
            weight: lora["weight"].as_f64().expect("weight") as f32,
        });
    }
    if let Some(name) = case.get("embedding") {
        let found = engine
            .load_embeddings(&dir.join("embeddings"))
            .expect("embeddings");
        assert_eq!(found.names, [name.as_str().expect("name")]);
    }
    let checked = check_schedulers(&dir, fixture, &case, &engine, &loras);
    assert!(checked > 0, "{fixture} has no scheduler's fixture");
    // The fixture tells the LoRA or embedding apart: without it, the text embeddings are
    // far from diffusers'.
    let scheduler = Scheduler::ALL
        .into_iter()
        .find(|s| dir.join(format!("{}.safetensors", s.as_str())).is_file())
        .expect("a scheduler");
    let reference = Reference::load(
        &dir.join(format!("{}.safetensors", scheduler.as_str())),
        fixture.into(),
    );
    let plain = case_batch(&case, scheduler, 1.0, None);
    if case.get("embedding").is_some() {
        let (_, fresh) = case_and_engine(&dir, RandomModel::Sd15);
        engine = fresh;
    }
    let context = engine.encode_prompts(&plain).expect("embeddings").context;
    let cond = context.i(1..2).expect("cond row");
    let err = relative_error(&cond, reference.get("cond"));
    assert!(
        err > 1e-2,
        "{fixture}: without it the embeddings differ by only {err:.2e}"
    );
}

#[test]
fn sd15_kohya_lora_matches_diffusers_load_lora_weights() {
    check_with_additions("sd15-lora-kohya");
}

#[test]
fn sd15_peft_lora_matches_diffusers_load_lora_weights() {
    check_with_additions("sd15-lora-peft");
}

#[test]
fn sd15_textual_inversion_matches_diffusers_load_textual_inversion() {
    check_with_additions("sd15-embedding");
}

#[test]
fn sd15_matches_diffusers_for_every_scheduler() {
    check_architecture("sd15", RandomModel::Sd15);
}

#[test]
fn sd21_v_prediction_matches_diffusers_for_every_scheduler() {
    check_architecture("sd21", RandomModel::Sd21);
}

#[test]
fn sd_turbo_few_steps_without_guidance_matches_diffusers() {
    check_architecture("sd-turbo", RandomModel::SdTurbo);
}

#[test]
fn sdxl_two_encoders_pooled_and_size_conditioning_match_diffusers() {
    check_architecture("sdxl", RandomModel::Sdxl);
}

#[test]
fn sdxl_turbo_few_steps_without_guidance_matches_diffusers() {
    check_architecture("sdxl-turbo", RandomModel::SdxlTurbo);
}

#[test]
fn few_step_models_default_to_one_step_without_guidance() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_random(dir.path(), 0, RandomModel::SdTurbo, ModelScale::Tiny).expect("turbo");
    let defaults = crate::describe(dir.path()).expect("describe").defaults;
    assert!(defaults.few_step);
    assert_eq!((defaults.steps, defaults.guidance_scale), (1, 0.0));
    let sd15 = tempfile::tempdir().expect("tempdir");
    write_random(sd15.path(), 0, RandomModel::Sd15, ModelScale::Tiny).expect("sd15");
    let defaults = crate::describe(sd15.path()).expect("describe").defaults;
    assert!(!defaults.few_step);
    assert_eq!((defaults.steps, defaults.guidance_scale), (20, 7.5));
}

/// Image-to-image and inpainting against diffusers' own pipelines
/// (`tools/reference/diffusers_image_reference.py`): the source's latents, then from the
/// same initial and ancestral noise the latents after the first step that runs and the last,
/// and the decoded image, for every scheduler and strength of the case.
fn check_from_source(fixture: &str, kind: RandomModel) {
    let dir = fixtures(fixture);
    let (case, engine) = case_and_engine(&dir, kind);
    let strengths = case["strengths"].as_array().expect("strengths");
    assert!(!strengths.is_empty());
    let bytes = |t: &Tensor| -> Vec<u8> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("values")
            .into_iter()
            .map(|v| v as u8)
            .collect()
    };
    for strength in strengths {
        let strength = strength.as_f64().expect("strength");
        for scheduler in Scheduler::ALL {
            let name = format!("{}-{}", scheduler.as_str(), (strength * 100.0).round());
            let file = dir.join(format!("{name}.safetensors"));
            let reference = Reference::load(&file, format!("{fixture}/{name}"));
            let source = crate::SourceImage {
                rgb: bytes(reference.get("source")),
                mask: reference.tensors.get("mask").map(bytes),
            };
            let batch = case_batch(&case, scheduler, strength as f32, Some(source));
            let (sources, inpaint) = engine.prepare_sources(&batch).expect("sources");
            let pixels = Tensor::from_vec(
                bytes(reference.get("source"))
                    .into_iter()
                    .map(|v| f32::from(v) / 127.5 - 1.0)
                    .collect::<Vec<_>>(),
                (1, batch.height as usize, batch.width as usize, 3),
                &Device::Cpu,
            )
            .and_then(|t| t.permute((0, 3, 1, 2)))
            .expect("pixels");
            reference.stage(
                "source latents",
                &engine.encode_images(&pixels).expect("encode"),
                reference.get("source_latents"),
            );
            let conditioning = engine.encode_prompts(&batch).expect("embeddings");
            reference.check_loop(
                &engine,
                &batch,
                &conditioning,
                sources.as_ref(),
                inpaint.as_ref(),
            );
        }
    }
}

#[test]
fn sd15_image_to_image_matches_diffusers_at_two_strengths() {
    check_from_source("sd15-img2img", RandomModel::Sd15);
}

#[test]
fn sd15_masked_image_to_image_matches_diffusers() {
    check_from_source("sd15-inpaint", RandomModel::Sd15);
}

#[test]
fn sd15_inpainting_unet_matches_diffusers() {
    check_from_source("sd15-inpainting", RandomModel::Sd15Inpainting);
}

#[test]
fn sdxl_image_to_image_matches_diffusers_at_two_strengths() {
    check_from_source("sdxl-img2img", RandomModel::Sdxl);
}

#[test]
fn sdxl_inpainting_unet_matches_diffusers() {
    check_from_source("sdxl-inpainting", RandomModel::SdxlInpainting);
}
