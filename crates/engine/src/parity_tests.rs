//! Parity with diffusers: the same tiny weights (regenerated from their seed), the same
//! initial noise and ancestral noise, compared stage by stage against the reference outputs
//! that `tools/reference/diffusers_reference.py` wrote into `tests/fixtures/`.

use crate::{
    write_random, Batch, BatchItem, DeviceChoice, Engine, EngineError, EngineOptions, ModelScale,
    RandomModel,
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

fn check_architecture(arch: &str, write: impl Fn(&Path) -> Result<(), EngineError>) {
    let dir = fixtures(arch);
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).expect("case.json"))
            .expect("case json");
    let model = tempfile::tempdir().expect("tempdir");
    write(model.path()).expect("tiny model");
    let engine = Engine::load(
        model.path(),
        &EngineOptions {
            device: DeviceChoice::Cpu,
            ..EngineOptions::default()
        },
    )
    .expect("load");

    for scheduler in Scheduler::ALL {
        let file = dir.join(format!("{}.safetensors", scheduler.as_str()));
        let reference: HashMap<String, Tensor> =
            candle_core::safetensors::load(&file, &Device::Cpu).expect("fixture");
        let get = |name: &str| {
            reference
                .get(name)
                .unwrap_or_else(|| panic!("{file:?} lacks {name}"))
        };
        let batch = Batch {
            width: case["width"].as_u64().expect("width") as u32,
            height: case["height"].as_u64().expect("height") as u32,
            steps: case["steps"].as_u64().expect("steps") as u32,
            guidance_scale: case["guidance_scale"].as_f64().expect("guidance") as f32,
            scheduler,
            strength: 1.0,
            hires: None,
            items: vec![BatchItem {
                prompt: case["prompt"].as_str().expect("prompt").into(),
                negative_prompt: case["negative_prompt"].as_str().expect("negative").into(),
                seed: 0,
                source: None,
            }],
        };
        let stage = |name: &str, ours: &Tensor, theirs: &Tensor| {
            let err = relative_error(ours, theirs);
            assert!(
                err <= TOLERANCE,
                "{arch}/{scheduler} {name}: relative error {err:.2e} > {TOLERANCE:.0e}"
            );
            eprintln!("{arch}/{scheduler} {name}: relative error {err:.2e}");
        };

        let conditioning = engine.encode_prompts(&batch).expect("embeddings");
        let rows = |name: &str| {
            if batch.guidance_scale > 1.0 {
                Tensor::cat(
                    &[get(&format!("uncond{name}")), get(&format!("cond{name}"))],
                    0,
                )
                .expect("cat")
            } else {
                get(&format!("cond{name}")).clone()
            }
        };
        stage("text embeddings", &conditioning.context, &rows(""));
        if let Some(pooled) = &conditioning.pooled {
            stage("pooled text embeddings", pooled, &rows("_pooled"));
        }

        let mut drawn = 0;
        let mut noise = || {
            let all = reference
                .get("noise")
                .ok_or_else(|| candle_core::Error::Msg("no noise in fixture".into()))?;
            drawn += 1;
            all.i(drawn - 1..drawn)
        };
        let mut first = None;
        let mut go_on = |_| ControlFlow::Continue(());
        let last = engine
            .denoise(
                &batch,
                &conditioning,
                crate::pipeline::Start {
                    noise: get("initial").clone(),
                    sources: None,
                    inpaint: None,
                },
                &mut noise,
                &mut go_on,
                &mut first,
            )
            .expect("denoise");
        stage(
            "latents after the first step",
            &first.expect("first"),
            get("first"),
        );
        stage("latents after the last step", &last, get("last"));

        let image = engine.decode(get("last")).expect("decode");
        let image = ((image / 2.0).and_then(|t| t + 0.5))
            .and_then(|t| t.clamp(0f32, 1f32))
            .expect("scale");
        stage("decoded image", &image, get("image"));
    }
}

#[test]
fn sd15_matches_diffusers_for_every_scheduler() {
    check_architecture("sd15", |dir| {
        write_random(dir, 0, RandomModel::Sd15, ModelScale::Tiny)
    });
}

#[test]
fn sd21_v_prediction_matches_diffusers_for_every_scheduler() {
    check_architecture("sd21", |dir| {
        write_random(dir, 0, RandomModel::Sd21, ModelScale::Tiny)
    });
}

#[test]
fn sd_turbo_few_steps_without_guidance_matches_diffusers() {
    check_architecture("sd-turbo", |dir| {
        write_random(dir, 0, RandomModel::SdTurbo, ModelScale::Tiny)
    });
}

#[test]
fn sdxl_two_encoders_pooled_and_size_conditioning_match_diffusers() {
    check_architecture("sdxl", |dir| {
        write_random(dir, 0, RandomModel::Sdxl, ModelScale::Tiny)
    });
}

#[test]
fn sdxl_turbo_few_steps_without_guidance_matches_diffusers() {
    check_architecture("sdxl-turbo", |dir| {
        write_random(dir, 0, RandomModel::SdxlTurbo, ModelScale::Tiny)
    });
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
            let reference: HashMap<String, Tensor> =
                candle_core::safetensors::load(&file, &Device::Cpu).expect("fixture");
            let get = |name: &str| {
                reference
                    .get(name)
                    .unwrap_or_else(|| panic!("{file:?} lacks {name}"))
            };
            let stage = |what: &str, ours: &Tensor, theirs: &Tensor| {
                let err = relative_error(ours, theirs);
                assert!(
                    err <= TOLERANCE,
                    "{fixture}/{name} {what}: relative error {err:.2e} > {TOLERANCE:.0e}"
                );
                eprintln!("{fixture}/{name} {what}: relative error {err:.2e}");
            };
            let source = crate::SourceImage {
                rgb: bytes(get("source")),
                mask: reference.get("mask").map(bytes),
            };
            let batch = Batch {
                width: case["width"].as_u64().expect("width") as u32,
                height: case["height"].as_u64().expect("height") as u32,
                steps: case["steps"].as_u64().expect("steps") as u32,
                guidance_scale: case["guidance_scale"].as_f64().expect("guidance") as f32,
                scheduler,
                strength: strength as f32,
                hires: None,
                items: vec![BatchItem {
                    prompt: case["prompt"].as_str().expect("prompt").into(),
                    negative_prompt: case["negative_prompt"].as_str().expect("negative").into(),
                    seed: 0,
                    source: Some(source),
                }],
            };
            let (sources, inpaint) = engine.prepare_sources(&batch).expect("sources");
            let pixels = Tensor::from_vec(
                bytes(get("source"))
                    .into_iter()
                    .map(|v| f32::from(v) / 127.5 - 1.0)
                    .collect::<Vec<_>>(),
                (1, batch.height as usize, batch.width as usize, 3),
                &Device::Cpu,
            )
            .and_then(|t| t.permute((0, 3, 1, 2)))
            .expect("pixels");
            stage(
                "source latents",
                &engine.encode_images(&pixels).expect("encode"),
                get("source_latents"),
            );
            let conditioning = engine.encode_prompts(&batch).expect("embeddings");
            let mut drawn = 0;
            let mut noise = || {
                let all = reference
                    .get("noise")
                    .ok_or_else(|| candle_core::Error::Msg("no noise in fixture".into()))?;
                drawn += 1;
                all.i(drawn - 1..drawn)
            };
            let mut first = None;
            let last = engine
                .denoise(
                    &batch,
                    &conditioning,
                    crate::pipeline::Start {
                        noise: get("initial").clone(),
                        sources: sources.as_ref(),
                        inpaint: inpaint.as_ref(),
                    },
                    &mut noise,
                    &mut |_| ControlFlow::Continue(()),
                    &mut first,
                )
                .expect("denoise");
            stage(
                "latents after the first step",
                &first.expect("first"),
                get("first"),
            );
            stage("latents after the last step", &last, get("last"));
            let image = engine.decode(get("last")).expect("decode");
            let image = ((image / 2.0).and_then(|t| t + 0.5))
                .and_then(|t| t.clamp(0f32, 1f32))
                .expect("scale");
            stage("decoded image", &image, get("image"));
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
