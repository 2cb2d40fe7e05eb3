//! Every kernel of the CUDA path against a reference computed on the CPU in f32 from the
//! same (rounded) inputs, at the shapes the models use and at odd ones; the UNet's recorded
//! graphs against its eager pass; whole pipelines against the CPU. These need a GPU: they are
//! built with `--features cuda` and run on one by `tools/device/cuda-tests.sh`; without a
//! GPU they fail, they do not skip.

use super::attention::{attention_on, Hopper, Kernel};
use super::*;
use crate::tiny::{write_random, ModelScale, RandomModel};
use crate::{Batch, BatchItem, DeviceChoice, Engine, EngineOptions, Precision};
use candle_core::{Device, D};
use sparkle_core::Scheduler;

fn gpu() -> Device {
    super::device(0).expect("the CUDA tests need a CUDA GPU")
}

/// A `[shape]` tensor of values in [-1, 1) on the CPU, f32, reproducible by `seed`.
fn random(shape: &[usize], seed: u64) -> Tensor {
    // SplitMix64: the same values on every machine.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor")
}

/// `t` rounded to `dtype` (so the reference sees the values the GPU does), as f32 on the
/// CPU, and the same values on the GPU in `dtype`.
fn operand(t: &Tensor, dtype: DType, gpu: &Device) -> (Tensor, Tensor) {
    let rounded = t.to_dtype(dtype).expect("cast");
    (
        rounded.to_dtype(DType::F32).expect("f32"),
        rounded.to_device(gpu).expect("upload"),
    )
}

/// ‖got − want‖ / ‖want‖ with `got` brought back to the CPU in f32.
fn relative(got: &Tensor, want: &Tensor) -> f64 {
    let got = cpu_f32(got);
    assert_eq!(got.dims(), want.dims(), "shapes");
    let diff = (&got - want).and_then(|d| d.sqr()?.sum_all()?.to_scalar::<f32>());
    let norm = want.sqr().and_then(|d| d.sum_all()?.to_scalar::<f32>());
    (f64::from(diff.expect("diff")) / f64::from(norm.expect("norm")).max(1e-30)).sqrt()
}

/// The bound on the relative error of one operation in `dtype`: a few units of the last
/// place of its storage type (TF32 for f32 convolutions and products, hence 10 bits too).
fn bound(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        _ => 3e-3,
    }
}

const TYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

fn check(what: &str, dtype: DType, got: &Tensor, want: &Tensor, bound: f64) {
    let error = relative(got, want);
    println!("{what} {dtype:?}: relative error {error:.2e}");
    assert!(
        error < bound,
        "{what} {dtype:?}: relative error {error:.2e} ≥ {bound:.0e}"
    );
}

#[test]
fn convolutions_match_the_cpu() {
    let gpu = gpu();
    // n, h, w, c, k, kernel, padding, stride: the UNet's and VAE's shapes, and odd ones.
    let shapes = [
        (1, 64, 64, 320, 320, 3, 1, 1),
        (2, 64, 64, 4, 320, 3, 1, 1),
        (2, 32, 32, 320, 320, 3, 1, 2),
        (16, 8, 8, 1280, 1280, 3, 1, 1),
        (2, 16, 16, 960, 640, 1, 0, 1),
        (3, 9, 7, 24, 40, 3, 1, 2),
        (1, 11, 5, 8, 16, 3, 1, 1),
    ];
    for (i, &(n, h, w, c, k, kernel, pad, stride)) in shapes.iter().enumerate() {
        let seed = 10 * i as u64;
        let x = random(&[n, h, w, c], seed);
        // Weights scaled as initialisation would, so outputs stay of order one.
        let scale = 1.0 / ((c * kernel * kernel) as f64).sqrt();
        let wt = (random(&[k, kernel, kernel, c], seed + 1) * scale).expect("scale");
        let bias = random(&[k], seed + 2);
        let oh = (h + 2 * pad - kernel) / stride + 1;
        let ow = (w + 2 * pad - kernel) / stride + 1;
        let residual = random(&[n, oh, ow, k], seed + 3);
        let per_image = random(&[n, k], seed + 4);
        for dtype in TYPES {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let (w_ref, w_gpu) = operand(&wt, dtype, &gpu);
            let (b_ref, b_gpu) = operand(&bias, dtype, &gpu);
            let (r_ref, r_gpu) = operand(&residual, dtype, &gpu);
            let (p_ref, p_gpu) = operand(&per_image, dtype, &gpu);
            let conv = x_ref
                .permute((0, 3, 1, 2))
                .and_then(|x| x.conv2d(&w_ref.permute((0, 3, 1, 2))?, pad, stride, 1, 1))
                .and_then(|y| y.permute((0, 2, 3, 1)))
                .and_then(|y| y.broadcast_add(&b_ref))
                .expect("reference");
            let plain = conv2d(&x_gpu, &w_gpu, &b_gpu, pad, stride, None, None).expect("conv");
            check(
                &format!("conv {:?}", shapes[i]),
                dtype,
                &plain,
                &conv,
                bound(dtype),
            );
            let full = conv
                .broadcast_add(&p_ref.reshape((n, 1, 1, k)).expect("reshape"))
                .and_then(|y| y + &r_ref)
                .expect("reference");
            let fused = conv2d(
                &x_gpu,
                &w_gpu,
                &b_gpu,
                pad,
                stride,
                Some(&r_gpu),
                Some(&p_gpu),
            )
            .expect("conv with residual and per-image bias");
            check(
                &format!("conv+epilogue {:?}", shapes[i]),
                dtype,
                &fused,
                &full,
                bound(dtype),
            );
        }
    }
}

/// GroupNorm in f32 over `[b, hw, c]`, then SiLU.
fn group_norm_reference(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, silu: bool) -> Tensor {
    let (n, hw, c) = x.dims3().expect("dims");
    let g = x.reshape((n, hw, groups, c / groups)).expect("reshape");
    let mean = g
        .mean_keepdim(3)
        .and_then(|m| m.mean_keepdim(1))
        .expect("mean");
    let centred = g.broadcast_sub(&mean).expect("centre");
    let var = centred
        .sqr()
        .and_then(|s| s.mean_keepdim(3)?.mean_keepdim(1))
        .expect("var");
    let y = centred
        .broadcast_div(&(var + 1e-5).and_then(|v| v.sqrt()).expect("std"))
        .and_then(|y| y.reshape((n, hw, c)))
        .and_then(|y| y.broadcast_mul(w)?.broadcast_add(b))
        .expect("normalised");
    if silu {
        y.silu().expect("silu")
    } else {
        y
    }
}

#[test]
fn group_norms_match_the_cpu() {
    let gpu = gpu();
    // b, pixels, channels, groups.
    let shapes = [
        (1, 64 * 64, 320, 32),
        (2, 32 * 32, 640, 32),
        (16, 8 * 8, 1280, 32),
        (2, 16 * 16, 2560, 32),
        (1, 128 * 128, 128, 32),
        (3, 7 * 5, 96, 32),
        (2, 3, 12, 4),
    ];
    for (i, &(b, hw, c, groups)) in shapes.iter().enumerate() {
        // An offset per channel, as activations have: the statistics must not cancel it badly.
        let x = (random(&[b, hw, c], 100 + i as u64) * 3.0)
            .and_then(|x| x.broadcast_add(&random(&[c], 200 + i as u64)))
            .expect("input");
        let w = (random(&[c], 300 + i as u64) + 1.0).expect("weight");
        let bias = random(&[c], 400 + i as u64);
        for dtype in TYPES {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let (w_ref, w_gpu) = operand(&w, dtype, &gpu);
            let (b_ref, b_gpu) = operand(&bias, dtype, &gpu);
            for silu in [false, true] {
                let want = group_norm_reference(&x_ref, &w_ref, &b_ref, groups, silu);
                let got = group_norm(&x_gpu, &w_gpu, &b_gpu, groups, 1e-5, silu).expect("norm");
                let what = format!("GroupNorm {:?} silu={silu}", shapes[i]);
                check(&what, dtype, &got, &want, bound(dtype));
            }
        }
    }
}

#[test]
fn layer_norms_match_the_cpu() {
    let gpu = gpu();
    for (i, &(rows, cols)) in [(2 * 4096, 320), (77, 768), (5, 1280), (3, 2048), (1, 8)]
        .iter()
        .enumerate()
    {
        let x = (random(&[rows, cols], 500 + i as u64) * 2.0)
            .and_then(|x| x + 0.5)
            .expect("input");
        let w = (random(&[cols], 600 + i as u64) + 1.0).expect("weight");
        let b = random(&[cols], 700 + i as u64);
        // LayerNorm runs on 16-bit rows only.
        for dtype in [DType::F16, DType::BF16] {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let (w_ref, w_gpu) = operand(&w, dtype, &gpu);
            let (b_ref, b_gpu) = operand(&b, dtype, &gpu);
            let want = candle_nn::ops::layer_norm(&x_ref, &w_ref, &b_ref, 1e-5).expect("ref");
            let got = layer_norm(&x_gpu, &w_gpu, &b_gpu, 1e-5).expect("layer norm");
            check(
                &format!("LayerNorm {rows}×{cols}"),
                dtype,
                &got,
                &want,
                bound(dtype),
            );
        }
    }
}

#[test]
fn linear_layers_match_the_cpu() {
    let gpu = gpu();
    // Leading dims, input features, output features.
    let shapes: [(&[usize], usize, usize); 5] = [
        (&[2, 4096], 320, 320),
        (&[2, 1024], 640, 5120),
        (&[16, 77], 768, 320),
        (&[1], 1280, 1280),
        (&[3, 7], 24, 40),
    ];
    for (i, &(lead, k, n)) in shapes.iter().enumerate() {
        let mut x_shape = lead.to_vec();
        x_shape.push(k);
        let mut out_shape = lead.to_vec();
        out_shape.push(n);
        let x = random(&x_shape, 800 + i as u64);
        let w = (random(&[n, k], 900 + i as u64) * (1.0 / (k as f64).sqrt())).expect("w");
        let b = random(&[n], 1000 + i as u64);
        let r = random(&out_shape, 1100 + i as u64);
        for dtype in TYPES {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let (w_ref, w_gpu) = operand(&w, dtype, &gpu);
            let (b_ref, b_gpu) = operand(&b, dtype, &gpu);
            let (r_ref, r_gpu) = operand(&r, dtype, &gpu);
            let product = x_ref
                .broadcast_matmul(&w_ref.t().expect("t"))
                .and_then(|y| y.broadcast_add(&b_ref))
                .expect("reference");
            let bare = x_ref
                .broadcast_matmul(&w_ref.t().expect("t"))
                .expect("reference");
            let got = linear(&x_gpu, &w_gpu, None, None).expect("linear without bias");
            check(
                &format!("linear, no bias {x_shape:?}→{n}"),
                dtype,
                &got,
                &bare,
                bound(dtype),
            );
            let got = linear(&x_gpu, &w_gpu, Some(&b_gpu), None).expect("linear");
            check(
                &format!("linear {x_shape:?}→{n}"),
                dtype,
                &got,
                &product,
                bound(dtype),
            );
            let want = (product + r_ref).expect("residual");
            let got = linear(&x_gpu, &w_gpu, Some(&b_gpu), Some(&r_gpu)).expect("linear+residual");
            check(
                &format!("linear+residual {x_shape:?}→{n}"),
                dtype,
                &got,
                &want,
                bound(dtype),
            );
        }
    }
}

/// `softmax(q·kᵀ·scale)·v` per head in f32, over `[b, n, heads·d]` projections.
fn attention_reference(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
    let split = |t: &Tensor| {
        let (b, n, width) = t.dims3().expect("dims");
        t.reshape((b, n, heads, width / heads))
            .and_then(|t| t.transpose(1, 2)?.contiguous())
            .expect("heads")
    };
    let (q, k, v) = (split(q), split(k), split(v));
    let scores = (q.matmul(&k.t().expect("t")).expect("scores") * scale).expect("scale");
    let out = candle_nn::ops::softmax_last_dim(&scores)
        .and_then(|p| p.matmul(&v))
        .expect("weighted");
    let (b, h, n, d) = out.dims4().expect("dims");
    out.transpose(1, 2)
        .and_then(|o| o.reshape((b, n, h * d)))
        .expect("merge")
}

#[test]
fn attention_matches_the_formula() {
    let gpu = gpu();
    // b, queries, keys, heads, head width: SD 1.5's levels (d 40, 80, 160) and its
    // cross-attention to 77 tokens, SDXL's 64-wide heads, and odd sizes.
    let shapes = [
        (1, 4096, 4096, 8, 40),
        (2, 4096, 77, 8, 40),
        (2, 1024, 1024, 8, 80),
        (2, 256, 77, 8, 160),
        (2, 1024, 1024, 10, 64),
        (1, 4096, 77, 20, 64),
        (3, 1000, 999, 5, 64),
        (2, 77, 131, 3, 128),
        (1, 17, 5, 2, 8),
    ];
    for (i, &(b, n, m, heads, d)) in shapes.iter().enumerate() {
        let seed = 1200 + 10 * i as u64;
        let q = (random(&[b, n, heads * d], seed) * 2.0).expect("q");
        let k = (random(&[b, m, heads * d], seed + 1) * 2.0).expect("k");
        let v = random(&[b, m, heads * d], seed + 2);
        let scale = 1.0 / (d as f64).sqrt();
        for dtype in [DType::F16, DType::BF16] {
            let (q_ref, q_gpu) = operand(&q, dtype, &gpu);
            let (k_ref, k_gpu) = operand(&k, dtype, &gpu);
            let (v_ref, v_gpu) = operand(&v, dtype, &gpu);
            let want = attention_reference(&q_ref, &k_ref, &v_ref, heads, scale);
            assert!(
                fused_attention(&q_gpu, d),
                "the fused kernel takes {d}-wide heads"
            );
            let got = attention_on(&q_gpu, &k_gpu, &v_gpu, heads, scale, Kernel::Portable)
                .expect("attention");
            check(
                &format!("attention {:?}", shapes[i]),
                dtype,
                &got,
                &want,
                bound(dtype),
            );
            if d > 64 {
                continue;
            }
            // The warpgroup kernels, and the reading of V's layout they do not use: that one
            // must be wrong (else the layout test says nothing).
            let error = |form| {
                let got = attention_on(&q_gpu, &k_gpu, &v_gpu, heads, scale, Kernel::Hopper(form))
                    .expect("warpgroup attention");
                relative(&got, &want)
            };
            let (plain, pipelined, single, swapped) = (
                error(Hopper::Plain),
                error(Hopper::Pipelined),
                error(Hopper::Single),
                error(Hopper::Swapped),
            );
            println!(
                "warpgroup attention {:?} {dtype:?}: relative error {plain:.2e}, pipelined {pipelined:.2e}, one warpgroup a block {single:.2e} (V read swapped: {swapped:.2e})",
                shapes[i]
            );
            assert!(plain < bound(dtype), "warpgroup attention: {plain:.2e}");
            assert!(pipelined < bound(dtype), "pipelined: {pipelined:.2e}");
            assert!(single < bound(dtype), "one warpgroup a block: {single:.2e}");
        }
    }
}

#[test]
fn row_kernels_match_the_cpu() {
    let gpu = gpu();
    for (i, shape) in [&[8usize, 77][..], &[2, 8, 4096], &[3, 1000], &[5, 3]]
        .iter()
        .enumerate()
    {
        let x = (random(shape, 1400 + i as u64) * 8.0).expect("x");
        for dtype in TYPES {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let want = candle_nn::ops::softmax_last_dim(&x_ref).expect("reference");
            let got = softmax_last_dim(&x_gpu).expect("softmax");
            check(
                &format!("softmax {shape:?}"),
                dtype,
                &got,
                &want,
                bound(dtype),
            );
        }
    }
    for (i, shape) in [
        &[2usize, 4096, 2 * 1280][..],
        &[1, 77, 2 * 640],
        &[3, 5, 16],
        &[7, 6],
    ]
    .iter()
    .enumerate()
    {
        let x = (random(shape, 1500 + i as u64) * 3.0).expect("x");
        for dtype in TYPES {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let half = shape[shape.len() - 1] / 2;
            let value = x_ref.narrow(D::Minus1, 0, half).expect("value");
            let gate = x_ref.narrow(D::Minus1, half, half).expect("gate");
            let want = (value * gate.gelu_erf().expect("gelu")).expect("reference");
            let got = geglu(&x_gpu).expect("geglu");
            check(
                &format!("GEGLU {shape:?}"),
                dtype,
                &got,
                &want,
                bound(dtype),
            );
        }
    }
}

#[test]
fn copies_are_exact() {
    let gpu = gpu();
    for (i, &(b, h, w, c)) in [(2, 8, 8, 1280), (1, 7, 5, 4), (3, 32, 32, 320)]
        .iter()
        .enumerate()
    {
        let x = random(&[b, h, w, c], 1600 + i as u64);
        let other = random(&[b, h, w, c / 2 + 4], 1700 + i as u64);
        for dtype in TYPES {
            let (x_ref, x_gpu) = operand(&x, dtype, &gpu);
            let (o_ref, o_gpu) = operand(&other, dtype, &gpu);
            let want = x_ref
                .permute((0, 3, 1, 2))
                .and_then(|t| t.upsample_nearest2d(2 * h, 2 * w)?.permute((0, 2, 3, 1)))
                .expect("reference");
            let got = upsample2x_last(&x_gpu).expect("upsample");
            check(
                &format!("upsample {:?}", (b, h, w, c)),
                dtype,
                &got,
                &want,
                1e-7,
            );
            let want = Tensor::cat(&[&x_ref, &o_ref], 3).expect("reference");
            let got = concat_last(&x_gpu, &o_gpu).expect("concat");
            check(
                &format!("concat {:?}", (b, h, w, c)),
                dtype,
                &got,
                &want,
                1e-7,
            );
        }
    }
}

/// A random-weight model of the real architecture, small, in a directory of its own.
fn model(kind: RandomModel) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    write_random(dir.path(), 3, kind, ModelScale::Tiny).expect("write the model");
    dir
}

fn batch(items: usize, steps: u32, width: u32, scheduler: Scheduler) -> Batch {
    Batch {
        width,
        height: width,
        steps,
        guidance_scale: 7.5,
        scheduler,
        strength: 1.0,
        hires: None,
        loras: Vec::new(),
        items: (0..items)
            .map(|i| BatchItem {
                prompt: format!("a corgi number {i}, style of monet"),
                negative_prompt: "blurry".into(),
                seed: 7 + i as u64,
                source: None,
            })
            .collect(),
    }
}

trait WithPrompt {
    fn with_prompt(self, i: usize) -> Self;
}

impl WithPrompt for Batch {
    /// The batch with its first prompt made the `i`-th of a list of different ones.
    fn with_prompt(mut self, i: usize) -> Self {
        let prompts = [
            "a corgi",
            "a castle at dusk",
            "two cats, oil on canvas",
            "rain",
        ];
        self.items[0].prompt = prompts[i % prompts.len()].into();
        self
    }
}

fn load(dir: &std::path::Path, device: DeviceChoice, precision: Precision) -> Engine {
    Engine::load(dir, &EngineOptions { device, precision }).expect("load")
}

#[test]
fn pipelines_match_the_cpu() {
    for kind in [RandomModel::Sd15, RandomModel::Sdxl] {
        let dir = model(kind);
        let cpu = load(dir.path(), DeviceChoice::Cpu, Precision::F32);
        for precision in [Precision::F16, Precision::Bf16, Precision::F32] {
            let gpu = load(dir.path(), DeviceChoice::Cuda(0), precision);
            for items in [1, 3] {
                let batch = batch(items, 3, 64, Scheduler::Ddim);
                let reference = cpu.probe(&batch).expect("cpu");
                let (first, image) = gpu.probe(&batch).expect("gpu").relative_error(&reference);
                println!(
                    "{} {precision:?} batch {items}: first step {first:.2e}, image {image:.2e}",
                    kind.name()
                );
                let bound = if precision == Precision::Bf16 {
                    5e-2
                } else {
                    1e-2
                };
                assert!(
                    first < bound && image < bound,
                    "{first:.2e} / {image:.2e} ≥ {bound:.0e}"
                );
            }
        }
    }
}

/// How far a replayed pass may be from an eager one in f16: two eager passes on the same
/// inputs differ too (GroupNorm's statistics add up in whatever order the blocks finish, and
/// a difference in the last place grows through a network of random weights), by about
/// 1e-3; a replay that read stale inputs or memory is off by far more.
const REPLAY_BOUND: f64 = 5e-3;

#[test]
fn recorded_passes_equal_eager_ones() {
    // The first call at a shape runs eagerly, the second records and replays, later ones
    // replay; every one must give what the eager pass gives on the same inputs, including
    // inputs that differ from those of the recording.
    let dir = model(RandomModel::Sd15);
    let engine = load(dir.path(), DeviceChoice::Cuda(0), Precision::F16);
    let unet = engine.unet_for_tests();
    let inputs: Vec<(Tensor, Tensor)> = (0..4)
        .map(|i| {
            // Guided text conditioning, [uncond, cond], of another prompt each time.
            let text = engine
                .encode_prompts(&batch(1, 1, 64, Scheduler::Ddim).with_prompt(i))
                .expect("text")
                .context;
            // On the engine's own device (its stream): a pass over tensors of two devices is
            // never recorded.
            let xs = random(&[2, 4, 8, 8], 1800 + i as u64)
                .to_dtype(DType::F16)
                .and_then(|t| t.to_device(text.device()))
                .expect("latents");
            (xs, text)
        })
        .collect();
    let eager: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, (xs, context))| {
            unet.forward_eager_for_tests(xs, 900.0 - 100.0 * i as f64, context)
                .expect("eager")
        })
        .collect();
    let again = unet
        .forward_eager_for_tests(&inputs[0].0, 900.0, &inputs[0].1)
        .expect("eager again");
    let spread = relative(&again, &cpu_f32(&eager[0]));
    println!("two eager passes on the same inputs: relative difference {spread:.2e}");
    for round in 0..2 {
        for (i, (xs, context)) in inputs.iter().enumerate() {
            let got = unet
                .forward(xs, 900.0 - 100.0 * i as f64, context, None)
                .expect("forward");
            check(
                &format!("UNet pass {i}, round {round}"),
                DType::F16,
                &got,
                &cpu_f32(&eager[i]),
                REPLAY_BOUND,
            );
        }
    }
    let (recorded, refused) = unet.recorded_for_tests();
    assert!(recorded >= 1, "no pass was recorded: {refused:?}");
    // The inputs' outputs are far apart, so a replay that read another pass's inputs could
    // not have passed the checks above.
    for i in 1..eager.len() {
        let apart = relative(&eager[i], &cpu_f32(&eager[0]));
        assert!(
            apart > 10.0 * REPLAY_BOUND,
            "pass {i}: only {apart:.2e} from pass 0"
        );
    }
}

/// `t` on the CPU in f32, the form [`relative`] compares against.
fn cpu_f32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_device(&Device::Cpu))
        .expect("download")
}

#[test]
fn batches_repeat_through_recordings() {
    // Through the pipeline: the same batch three times (eager, recorded, replayed) gives
    // the same images, and a batch of another size in between changes nothing.
    let dir = model(RandomModel::Sd15);
    let engine = load(dir.path(), DeviceChoice::Cuda(0), Precision::F16);
    let one = batch(1, 4, 64, Scheduler::EulerA);
    let two = batch(2, 4, 64, Scheduler::EulerA);
    let first = engine.probe(&one).expect("first");
    let _ = engine.probe(&two).expect("two");
    for run in 0..2 {
        let again = engine.probe(&one).expect("again");
        let (step, image) = again.relative_error(&first);
        println!("run {run}: first step {step:.2e}, image {image:.2e}");
        // Guidance (7.5) scales the difference of two passes' outputs up with them.
        let bound = 4.0 * REPLAY_BOUND;
        assert!(step < bound && image < bound, "{step:.2e} / {image:.2e}");
    }
    let (recorded, refused) = engine.unet_for_tests().recorded_for_tests();
    assert!(
        recorded >= 2,
        "{recorded} shapes recorded, refused: {refused:?}"
    );
}
