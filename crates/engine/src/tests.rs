//! End-to-end engine tests on the tiny model.

use crate::{
    describe, write_tiny_model, Architecture, Batch, BatchItem, DeviceChoice, Engine, EngineError,
    EngineOptions, GeneratedImage,
};
use sparkle_core::Scheduler;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const CPU: EngineOptions = EngineOptions {
    device: DeviceChoice::Cpu,
    precision: crate::Precision::Auto,
};

pub(crate) fn tiny_dir() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("tiny-sd");
        write_tiny_model(&dir, 0).expect("write tiny model");
        (root, dir)
    })
    .1
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(tiny_dir(), &CPU).expect("load"))
}

fn batch(scheduler: Scheduler, items: &[(&str, u64)]) -> Batch {
    Batch {
        width: 64,
        height: 64,
        steps: 4,
        guidance_scale: 7.5,
        scheduler,
        strength: 1.0,
        hires: None,
        loras: Vec::new(),
        items: items
            .iter()
            .map(|(p, s)| BatchItem {
                prompt: p.to_string(),
                negative_prompt: "blurry".into(),
                seed: *s,
                source: None,
            })
            .collect(),
    }
}

fn run(b: &Batch) -> Vec<GeneratedImage> {
    run_counting(b).0
}

/// The images, and every progress report `(step, total)` on the way.
fn run_counting(b: &Batch) -> (Vec<GeneratedImage>, Vec<(u32, u32)>) {
    let mut seen = Vec::new();
    let images = engine()
        .generate(b, &mut |p| {
            seen.push((p.step, p.total));
            ControlFlow::Continue(())
        })
        .expect("generate");
    (images, seen)
}

/// The decoded images before quantization, to see NaN that 8-bit rounding would hide.
fn float_pixels(b: &Batch) -> Vec<f32> {
    let latents = engine()
        .denoise_seeded(
            b,
            &engine().encode_prompts(b).expect("embeddings"),
            &mut |_| ControlFlow::Continue(()),
            &mut None,
        )
        .expect("denoise");
    let images = engine().decode(&latents).expect("decode");
    images
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .expect("pixels")
}

fn max_diff(a: &GeneratedImage, b: &GeneratedImage) -> u8 {
    a.rgb
        .iter()
        .zip(&b.rgb)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn the_engine_can_move_to_its_own_thread() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
}

#[test]
fn model_info_describes_the_tiny_model() {
    let info = engine().info();
    assert_eq!(info.name, "tiny-sd");
    assert_eq!(info.architecture, Architecture::Sd15);
    assert_eq!(info.architecture.to_string(), "sd1.5");
    assert_eq!((info.native_size, info.vae_scale_factor), (512, 8));
    assert_eq!((info.device.as_str(), info.dtype.as_str()), ("cpu", "f32"));
}

#[test]
fn every_scheduler_makes_a_deterministic_finite_non_constant_image() {
    for scheduler in Scheduler::ALL {
        let b = batch(scheduler, &[("a corgi, style of monet", 7)]);
        let first = run(&b);
        assert_eq!(first.len(), 1);
        let img = &first[0];
        assert_eq!(
            (img.width, img.height, img.rgb.len()),
            (64, 64, 64 * 64 * 3),
            "{scheduler}"
        );
        let (lo, hi) = img
            .rgb
            .iter()
            .fold((255u8, 0u8), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        assert!(hi > lo + 10, "{scheduler}: the image is flat ({lo}..{hi})");
        let pixels = float_pixels(&b);
        assert!(pixels.iter().all(|v| v.is_finite()), "{scheduler}: NaN");
        assert_eq!(run(&b)[0], *img, "{scheduler}: same seed, same image");
        let other = run(&batch(scheduler, &[("a corgi, style of monet", 8)]));
        assert_ne!(other[0], *img, "{scheduler}: another seed, another image");
    }
}

#[test]
fn the_prompt_steers_the_image() {
    let a = run(&batch(Scheduler::Euler, &[("a red fox", 5)]));
    let b = run(&batch(Scheduler::Euler, &[("a lighthouse at night", 5)]));
    assert_ne!(a[0], b[0]);
}

#[test]
fn each_image_of_a_batch_equals_its_solo_run() {
    let items = [("a red fox", 1), ("a lighthouse at night", 2)];
    for scheduler in Scheduler::ALL {
        for guidance_scale in [7.5, 1.0] {
            let mut together = batch(scheduler, &items);
            together.guidance_scale = guidance_scale;
            let images = run(&together);
            assert_eq!(images.len(), 2);
            for (i, item) in items.iter().enumerate() {
                let mut solo = batch(scheduler, &[*item]);
                solo.guidance_scale = guidance_scale;
                // Batched matrix products may sum in another order: a few float ulps, which
                // can move a pixel by a level after rounding; a mixed-up item moves it by tens.
                let diff = max_diff(&images[i], &run(&solo)[0]);
                assert!(
                    diff <= 2,
                    "{scheduler}, cfg {guidance_scale}, item {i}: {diff}"
                );
            }
        }
    }
}

#[test]
fn a_batch_over_the_device_limit_runs_in_passes_with_the_same_images() {
    let items = [
        ("a red fox", 1),
        ("a lighthouse at night", 2),
        ("a corgi", 3),
    ];
    let b = batch(Scheduler::EulerA, &items);
    let whole = run(&b);
    let mut reports = Vec::new();
    let passes = engine()
        .generate_limited(
            &b,
            &mut |p| {
                reports.push((p.step, p.total));
                ControlFlow::Continue(())
            },
            2,
        )
        .expect("generate");
    assert_eq!(passes.len(), 3);
    for (i, (a, b)) in whole.iter().zip(&passes).enumerate() {
        assert!(max_diff(a, b) <= 2, "image {i}");
    }
    let total = b.steps * 2;
    assert_eq!(reports, (1..=total).map(|s| (s, total)).collect::<Vec<_>>());
}

#[test]
fn probes_agree_with_themselves_and_tell_seeds_apart() {
    let b = batch(Scheduler::Ddim, &[("a red fox", 1)]);
    let first = engine().probe(&b).expect("probe");
    assert_eq!(
        first.relative_error(&engine().probe(&b).expect("probe")),
        (0.0, 0.0)
    );
    let other = engine()
        .probe(&batch(Scheduler::Ddim, &[("a red fox", 2)]))
        .expect("probe");
    let (step, image) = other.relative_error(&first);
    assert!(step > 0.1 && image > 0.01, "{step} {image}");
}

#[test]
fn decoding_a_batch_equals_decoding_each_image() {
    use candle_core::{IndexOp, Tensor};
    let latents =
        Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &candle_core::Device::Cpu).expect("latents");
    let together = engine().decode(&latents).expect("decode");
    for i in 0..2 {
        let alone = engine()
            .decode(&latents.i(i..i + 1).expect("one"))
            .expect("decode");
        let diff = (together.i(i..i + 1).expect("one") - alone)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert_eq!(diff, 0.0, "image {i}");
    }
}

#[test]
fn progress_is_reported_and_break_cancels() {
    let b = batch(Scheduler::Euler, &[("x", 1)]);
    let (_, seen) = run_counting(&b);
    assert_eq!(seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    let mut calls = 0;
    let stopped = engine().generate(&b, &mut |p| {
        calls += 1;
        if p.step == 2 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    });
    assert!(matches!(stopped, Err(EngineError::Cancelled)));
    assert_eq!(calls, 2);
}

#[test]
fn requests_the_model_cannot_run_are_refused() {
    let refused = |change: &dyn Fn(&mut Batch)| {
        let mut b = batch(Scheduler::Euler, &[("x", 1)]);
        change(&mut b);
        matches!(
            engine().generate(&b, &mut |_| ControlFlow::Continue(())),
            Err(EngineError::InvalidRequest(_))
        )
    };
    assert!(refused(&|b| b.width = 60));
    assert!(refused(&|b| b.height = 0));
    assert!(refused(&|b| b.steps = 0));
    assert!(refused(&|b| b.steps = 1001));
    assert!(refused(&|b| b.items.clear()));
    assert!(refused(&|b| b.guidance_scale = f32::NAN));
    let mut wide = batch(Scheduler::Euler, &[("x", 1)]);
    (wide.width, wide.height) = (64, 48);
    let image = &run(&wide)[0];
    assert_eq!(
        (image.width, image.height, image.rgb.len()),
        (64, 48, 64 * 48 * 3)
    );
}

#[test]
fn tiny_models_are_byte_identical_for_a_seed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(dir.path(), 0).expect("write");
    let other = tempfile::tempdir().expect("tempdir");
    write_tiny_model(other.path(), 1).expect("write");
    for file in [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ] {
        let read = |root: &Path| std::fs::read(root.join(file)).expect("read");
        let same = read(dir.path());
        assert!(same == read(tiny_dir()), "{file} differs for one seed");
        if file.ends_with(".safetensors") {
            assert!(same != read(other.path()), "{file} ignores the seed");
        }
    }
    let described = describe(dir.path()).expect("describe");
    assert_eq!(
        (described.native_size, described.architecture),
        (512, Architecture::Sd15)
    );
    assert!(described.bytes > 0);
}

#[test]
fn a_missing_or_misshapen_tensor_is_named_with_its_file() {
    use candle_core::safetensors::{load, save};
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(dir.path(), 0).expect("write");
    let file = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    let mut tensors = load(&file, &candle_core::Device::Cpu).expect("load");
    let victim = "down_blocks.1.attentions.0.proj_in.weight";
    let original = tensors.remove(victim).expect("present");
    save(&tensors, &file).expect("save");
    match Engine::load(dir.path(), &CPU) {
        Err(EngineError::MissingTensor { file: f, tensor }) => {
            assert_eq!((f, tensor.as_str()), (file.clone(), victim));
        }
        other => panic!("expected a missing tensor, got {:?}", other.err()),
    }
    let message = Engine::load(dir.path(), &CPU).err().map(|e| e.to_string());
    let message = message.unwrap_or_default();
    assert!(
        message.contains(victim) && message.contains("unet"),
        "{message}"
    );

    let extra = "down_blocks.1.attentions.0.proj_extra.weight";
    tensors.insert(victim.to_string(), original.clone());
    tensors.insert(extra.to_string(), original.clone());
    save(&tensors, &file).expect("save");
    match Engine::load(dir.path(), &CPU) {
        Err(EngineError::UnexpectedTensor {
            file: f,
            tensor,
            count,
        }) => assert_eq!((f, tensor.as_str(), count), (file.clone(), extra, 1)),
        other => panic!("expected an unexpected tensor, got {:?}", other.err()),
    }
    tensors.remove(extra);

    let wrong = original.narrow(0, 0, 16).expect("narrow");
    tensors.insert(victim.to_string(), wrong);
    save(&tensors, &file).expect("save");
    match Engine::load(dir.path(), &CPU) {
        Err(EngineError::TensorShape {
            file: f,
            tensor,
            expected,
            found,
        }) => {
            assert_eq!((f, tensor.as_str()), (file, victim));
            assert_eq!((expected[0], found[0]), (64, 16));
        }
        other => panic!("expected a mis-shaped tensor, got {:?}", other.err()),
    }
}

#[test]
fn sdxl_models_are_described_and_zero_an_empty_negative_prompt() {
    use crate::{write_random, ModelScale, RandomModel};
    let dir = tempfile::tempdir().expect("tempdir");
    write_random(dir.path(), 0, RandomModel::Sdxl, ModelScale::Tiny).expect("sdxl");
    let described = describe(dir.path()).expect("describe");
    assert_eq!(
        (
            described.architecture,
            described.native_size,
            described.defaults.few_step
        ),
        (Architecture::Sdxl, 1024, false)
    );
    let turbo = tempfile::tempdir().expect("tempdir");
    write_random(turbo.path(), 0, RandomModel::SdxlTurbo, ModelScale::Tiny).expect("turbo");
    let described = describe(turbo.path()).expect("describe");
    assert_eq!(
        (described.native_size, described.defaults.few_step),
        (512, true)
    );

    let engine = Engine::load(dir.path(), &CPU).expect("load");
    assert_eq!(engine.info().architecture, Architecture::Sdxl);
    let mut b = batch(Scheduler::Euler, &[("a corgi", 1), ("a cat", 2)]);
    b.items[1].negative_prompt.clear();
    let conditioning = engine.encode_prompts(&b).expect("encode");
    let (context, pooled) = (conditioning.context, conditioning.pooled.expect("pooled"));
    assert_eq!(context.dims(), &[4, 77, 64]);
    assert_eq!(pooled.dims(), &[4, 32]);
    // A long prompt: both encoders in chunks side by side, pooled from the first chunk.
    let long = vec!["corgi"; 80].join(" ");
    let mut lb = batch(Scheduler::Euler, &[(&long, 1)]);
    lb.items[0].negative_prompt.clear();
    let c = engine.encode_prompts(&lb).expect("encode");
    assert_eq!(c.context.dims(), &[2, 154, 64]);
    assert_eq!(c.pooled.expect("pooled").dims(), &[2, 32]);
    let row_norm = |t: &candle_core::Tensor, i: usize| -> f32 {
        t.get(i)
            .and_then(|r| r.sqr())
            .and_then(|r| r.sum_all())
            .and_then(|r| r.to_scalar())
            .expect("norm")
    };
    // Rows: [uncond 1, uncond 2, cond 1, cond 2]; only the empty negative prompt is zero.
    for (row, zero) in [(0, false), (1, true), (2, false), (3, false)] {
        assert_eq!(row_norm(&context, row) == 0.0, zero, "context row {row}");
        assert_eq!(row_norm(&pooled, row) == 0.0, zero, "pooled row {row}");
    }
    let images = engine
        .generate(&b, &mut |_| ControlFlow::Continue(()))
        .expect("generate");
    assert_eq!(images.len(), 2);
}

/// The conditioning of one guided prompt (negative prompt empty): `[2, tokens, d]`.
fn conditioning_of(engine: &Engine, prompt: &str) -> candle_core::Tensor {
    let mut b = batch(Scheduler::Euler, &[(prompt, 1)]);
    b.items[0].negative_prompt.clear();
    engine.encode_prompts(&b).expect("encode").context
}

/// The largest absolute difference between two tensors of one shape.
pub(crate) fn max_tensor_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("difference")
}

#[test]
fn weighted_and_long_prompts_follow_the_web_uis_algorithm() {
    use candle_core::{IndexOp, Tensor};
    let engine = engine();
    // Unweighted and short: what the plain encoder gives, one 77-token chunk.
    let plain = conditioning_of(engine, "a cat on a hill");
    assert_eq!(plain.dims()[..2], [2, 77]);
    assert_eq!(
        max_tensor_diff(&plain, &conditioning_of(engine, "a cat on a hill")),
        0.0
    );

    // `(cat:1.5)`: the token's features scaled by 1.5, then the chunk's mean put back.
    let z = plain.i(1).expect("cond row");
    let weighted = conditioning_of(engine, "a (cat:1.5) on a hill")
        .i(1)
        .expect("row");
    let mut w = vec![1f32; 77];
    w[2] = 1.5;
    let w = Tensor::from_vec(w, (77, 1), z.device()).expect("w");
    let scaled = z.broadcast_mul(&w).expect("scale");
    let ratio = (z
        .mean_all()
        .and_then(|m| m.to_scalar::<f32>())
        .expect("mean"))
        / (scaled
            .mean_all()
            .and_then(|m| m.to_scalar::<f32>())
            .expect("mean"));
    let want = (scaled * f64::from(ratio)).expect("restore");
    assert!(
        max_tensor_diff(&weighted, &want) < 1e-5,
        "{}",
        max_tensor_diff(&weighted, &want)
    );
    assert!(
        max_tensor_diff(&weighted, &z) > 1e-3,
        "the weight changed something"
    );
    // Escaped brackets are text, not weights.
    assert!(max_tensor_diff(&conditioning_of(engine, r"a \(cat\) on a hill"), &plain) > 0.0);

    // 100 tokens: two chunks side by side, each encoded on its own; the negative prompt
    // (empty) padded to two chunks as well.
    let words = |n: usize| vec!["cat"; n].join(" ");
    let long = conditioning_of(engine, &words(100));
    assert_eq!(long.dims()[..2], [2, 154]);
    let first = conditioning_of(engine, &words(75)).i(1).expect("row");
    let second = conditioning_of(engine, &words(25)).i(1).expect("row");
    let joined = Tensor::cat(&[first, second], 0).expect("cat");
    assert!(max_tensor_diff(&long.i(1).expect("row"), &joined) < 1e-5);
    let empty = conditioning_of(engine, "").i(1).expect("row");
    let padded = Tensor::cat(&[empty.clone(), empty], 0).expect("cat");
    assert!(
        max_tensor_diff(&long.i(0).expect("row"), &padded) < 1e-5,
        "the negative prompt, padded"
    );
    // And it makes an image.
    let mut b = batch(Scheduler::Euler, &[(&words(100), 1), ("a (cat:1.2)", 2)]);
    b.steps = 2;
    assert_eq!(run(&b).len(), 2);
}

#[test]
fn broken_configuration_names_the_file_and_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_tiny_model(dir.path(), 0).expect("write");
    let config = dir.path().join("unet/config.json");
    let text = std::fs::read_to_string(&config).expect("read");
    let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
    value["attention_head_dim"] = serde_json::json!("two");
    std::fs::write(&config, value.to_string()).expect("write");
    let err = Engine::load(dir.path(), &CPU).err().map(|e| e.to_string());
    let err = err.unwrap_or_default();
    assert!(
        err.contains("unet/config.json") && err.contains("attention_head_dim"),
        "{err}"
    );

    std::fs::write(&config, text).expect("restore");
    std::fs::remove_file(dir.path().join("vae/config.json")).expect("remove");
    let err = describe(dir.path()).expect_err("no config").to_string();
    assert!(err.contains("vae/config.json"), "{err}");
}

/// Dependencies build with optimizations even in test builds (see the workspace's
/// `profile.dev.package."*"`), so this measures the same tensor code a release build runs.
#[test]
#[ignore = "timing, not a check: cargo test -p sparkle-engine -- --ignored --nocapture time_one_512"]
fn time_one_512_image() {
    let mut b = batch(Scheduler::Euler, &[("a corgi, style of monet", 7)]);
    (b.width, b.height, b.steps) = (512, 512, 20);
    let started = std::time::Instant::now();
    let latents = engine()
        .denoise_seeded(
            &b,
            &engine().encode_prompts(&b).expect("embeddings"),
            &mut |_| ControlFlow::Continue(()),
            &mut None,
        )
        .expect("denoise");
    let denoised = started.elapsed();
    engine().decode(&latents).expect("decode");
    let total = started.elapsed();
    eprintln!(
        "512x512, tiny model, CPU, 20 Euler steps with guidance: {total:.2?} \
         (text encoder + denoising {denoised:.2?}, VAE decode {:.2?})",
        total - denoised
    );
}

/// A 64×64 source: a diagonal gradient with a bright square, and a mask over its right half.
fn source(masked: bool) -> crate::SourceImage {
    let mut rgb = Vec::with_capacity(64 * 64 * 3);
    for y in 0..64u32 {
        for x in 0..64u32 {
            let square = (16..40).contains(&x) && (20..44).contains(&y);
            let v = if square { 250 } else { ((x + y) * 2) as u8 };
            rgb.extend([v, (x * 4) as u8, (y * 4) as u8]);
        }
    }
    let mask = masked.then(|| {
        (0..64 * 64)
            .map(|p| if p % 64 >= 32 { 255 } else { 0 })
            .collect()
    });
    crate::SourceImage { rgb, mask }
}

fn from_source(scheduler: Scheduler, strength: f32, masked: bool) -> Batch {
    let mut b = batch(scheduler, &[("a corgi", 5)]);
    b.strength = strength;
    b.items[0].source = Some(source(masked));
    b
}

#[test]
fn image_to_image_runs_the_strengths_share_of_the_schedule_from_the_source() {
    let mut b = from_source(Scheduler::Euler, 0.5, false);
    b.steps = 10;
    let (images, seen) = run_counting(&b);
    assert_eq!(seen, (1..=5).map(|s| (s, 5)).collect::<Vec<_>>());
    // The source decides the image: another source, same seed and prompt, another image.
    let mut other = b.clone();
    if let Some(s) = other.items[0].source.as_mut() {
        s.rgb.iter_mut().for_each(|v| *v = 255 - *v);
    }
    assert!(max_diff(&images[0], &run(&other)[0]) > 0);
    // And it is deterministic, in a batch as alone.
    let mut pair = b.clone();
    pair.items.push(pair.items[0].clone());
    let both = run(&pair);
    assert_eq!(both[0], images[0]);
    assert_eq!(both[1], images[0]);
}

#[test]
fn masked_image_to_image_keeps_the_unmasked_latents_exactly() {
    for scheduler in Scheduler::ALL {
        for strength in [1.0, 0.75] {
            let b = from_source(scheduler, strength, true);
            let latents = engine()
                .denoise_seeded(
                    &b,
                    &engine().encode_prompts(&b).expect("embeddings"),
                    &mut |_| ControlFlow::Continue(()),
                    &mut None,
                )
                .expect("inpaint");
            let pixels = candle_core::Tensor::from_vec(
                source(false)
                    .rgb
                    .iter()
                    .map(|&v| f32::from(v) / 127.5 - 1.0)
                    .collect::<Vec<_>>(),
                (1, 64, 64, 3),
                &candle_core::Device::Cpu,
            )
            .and_then(|t| t.permute((0, 3, 1, 2)))
            .expect("pixels");
            let encoded = engine().encode_images(&pixels).expect("encode");
            use candle_core::IndexOp;
            // The latents' left half (x < 4 of 8) is kept; the right half is repainted.
            let kept = |t: &candle_core::Tensor| t.i((.., .., .., 0..4)).expect("left");
            let repainted = |t: &candle_core::Tensor| t.i((.., .., .., 4..8)).expect("right");
            let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| max_tensor_diff(a, b);
            assert!(
                diff(&kept(&latents), &kept(&encoded)) < 1e-6,
                "{scheduler} at {strength}: the kept half moved"
            );
            assert!(
                diff(&repainted(&latents), &repainted(&encoded)) > 1e-2,
                "{scheduler} at {strength}: the masked half was not repainted"
            );
        }
    }
}

#[test]
fn sources_that_do_not_fit_the_batch_are_refused() {
    let refused = |b: &Batch| match engine().generate(b, &mut |_| ControlFlow::Continue(())) {
        Err(EngineError::InvalidRequest(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let mut b = from_source(Scheduler::Euler, 0.0, false);
    assert!(refused(&b).contains("strength"));
    b.strength = 0.1; // 4 steps × 0.1 runs none
    assert!(refused(&b).contains("at least 1"));
    b.strength = 0.5;
    b.items
        .push(batch(Scheduler::Euler, &[("x", 1)]).items.remove(0));
    assert!(refused(&b).contains("or none"));
    let mut b = from_source(Scheduler::Euler, 0.5, false);
    if let Some(s) = b.items[0].source.as_mut() {
        s.rgb.pop();
    }
    assert!(refused(&b).contains("RGB bytes"));
    let mut b = from_source(Scheduler::Euler, 0.5, true);
    if let Some(s) = b.items[0].source.as_mut() {
        s.mask = Some(vec![0; 10]);
    }
    assert!(refused(&b).contains("one byte per pixel"));
}

#[test]
fn a_hires_batch_runs_a_second_pass_at_the_larger_size() {
    let mut b = batch(Scheduler::Euler, &[("a corgi", 5), ("a cat", 6)]);
    b.hires = Some(crate::Hires {
        width: 128,
        height: 96,
        steps: 6,
        strength: 0.5,
    });
    let (images, seen) = run_counting(&b);
    // Four steps at 64², then three (⌊6 × 0.5⌋) at 128×96.
    assert_eq!(seen, (1..=7).map(|s| (s, 7)).collect::<Vec<_>>());
    assert!(images.iter().all(|i| (i.width, i.height) == (128, 96)));
    assert_eq!(images[0].rgb.len(), 128 * 96 * 3);
    // Each image depends on its seed alone, whichever batch it is in.
    let alone = Batch {
        items: b.items[1..].to_vec(),
        ..b.clone()
    };
    assert_eq!(run(&alone)[0], images[1]);
    assert_ne!(images[0], images[1]);
    // Not the same as making the large image directly.
    let direct = Batch {
        width: 128,
        height: 96,
        hires: None,
        loras: Vec::new(),
        ..alone.clone()
    };
    assert_ne!(run(&direct)[0], images[1]);

    let refused = |b: &Batch| match engine().generate(b, &mut |_| ControlFlow::Continue(())) {
        Err(EngineError::InvalidRequest(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    };
    let mut smaller = alone.clone();
    smaller.hires = Some(crate::Hires {
        width: 32,
        height: 96,
        steps: 6,
        strength: 0.5,
    });
    assert!(refused(&smaller).contains("at least 64x64"));
    let mut none_run = alone.clone();
    none_run.hires = Some(crate::Hires {
        width: 128,
        height: 128,
        steps: 4,
        strength: 0.2,
    });
    assert!(refused(&none_run).contains("run a step"));
    let mut with_source = from_source(Scheduler::Euler, 0.5, false);
    with_source.hires = alone.hires;
    assert!(refused(&with_source).contains("text-to-image only"));
}
