//! Flash attention: the score matrix never leaves the SMs.

use super::*;
use candle_core::CustomOp3;

/// Head widths the attention kernel is built for (d rounded up to one of these).
const FLASH_WIDTHS: [usize; 5] = [48, 64, 80, 128, 160];

/// 16-query tiles per warp for heads `dp` wide: two up to 64 (each K and V fragment serves
/// both, halving shared-memory traffic per query), one above (registers).
/// `SPARKLE_FLASH_ROWS=1` forces one, for comparison.
fn flash_rows(dp: usize) -> usize {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if dp <= 64 && !env_is(&ONE, "SPARKLE_FLASH_ROWS", "1") {
        2
    } else {
        1
    }
}

/// Whether [`attention`] takes these: f16 or bf16 on CUDA, heads a multiple of 8 and at
/// most 160 wide (every Stable Diffusion UNet's), unless `SPARKLE_FLASH_ATTENTION=0` asks
/// for the score matrix through cuBLAS instead.
pub(crate) fn fused_attention(q: &Tensor, head_dim: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !env_is(&OFF, "SPARKLE_FLASH_ATTENTION", "0")
        && q.device().is_cuda()
        && matches!(q.dtype(), DType::F16 | DType::BF16)
        && head_dim.is_multiple_of(8)
        && head_dim <= FLASH_WIDTHS[FLASH_WIDTHS.len() - 1]
}

/// The warpgroup kernel heads up to 64 wide take on Hopper GPUs: with
/// `SPARKLE_HOPPER_ATTENTION=1` the plain one, `=2` the pipelined one, `=3` the pipelined one
/// in blocks of one warpgroup (the `mma.sync` kernel everywhere otherwise, until a warpgroup
/// one is measured ahead of it).
fn hopper_attention() -> Option<Hopper> {
    static CHOICE: std::sync::OnceLock<Option<Hopper>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let value = std::env::var("SPARKLE_HOPPER_ATTENTION").ok()?;
        HOPPER_FORMS
            .iter()
            .find(|(name, _)| name.split_once(':').is_some_and(|(v, _)| v == value))
            .map(|&(_, form)| form)
    })
}

/// The warpgroup forms `SPARKLE_HOPPER_ATTENTION` picks between, named by its value first.
const HOPPER_FORMS: [(&str, Hopper); 3] = [
    ("1: warpgroups", Hopper::Plain),
    ("2: pipelined", Hopper::Pipelined),
    ("3: pipelined, one warpgroup a block", Hopper::Single),
];

/// Whether the warpgroup kernel takes heads `d` wide in rows `width` wide on `dev`: an sm_90
/// GPU, heads up to 64 wide, and a 64-key tile's rows addressable with 32 bits.
fn warpgroup_takes(dev: &CudaDevice, d: usize, width: usize) -> bool {
    d <= 64 && 64 * width < i32::MAX as usize && hopper(dev)
}

/// The forms of the warpgroup kernel (`kernels/hopper.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hopper {
    /// Per key tile: Q·Kᵀ, the softmax, P·V, one after the other.
    Plain,
    /// [`Hopper::Plain`] reading V's layout with its two strides exchanged, which only a
    /// test of the layout's reading wants.
    #[cfg_attr(not(test), allow(dead_code))]
    Swapped,
    /// The next tile's Q·Kᵀ and this tile's P·V on the tensor cores while the next softmax
    /// runs; row sums from a column of ones where heads are narrower than the kernel.
    Pipelined,
    /// [`Hopper::Pipelined`] in blocks of one warpgroup, which wait at no other's barriers
    /// (and copy K and V for 64 queries instead of 128).
    Single,
}

/// The kernel an attention runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// The warpgroup kernel where it applies and is turned on, else the portable one.
    Auto,
    /// `mma.sync`, on every GPU from sm_80.
    Portable,
    /// `wgmma` on sm_90, heads up to 64 wide.
    Hopper(Hopper),
}

/// `softmax(q·kᵀ·scale)·v` per head without the score matrix: q `[b, n, heads·d]`, k and
/// v `[b, m, heads·d]` (the projections as they come), out `[b, n, heads·d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    attention_on(q, k, v, heads, scale, Kernel::Auto)
}

/// [`attention`] on a given kernel.
pub(crate) fn attention_on(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    kernel: Kernel,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(
        &k,
        &v,
        &AttentionOp {
            heads,
            scale,
            kernel,
        },
    )
}

struct AttentionOp {
    heads: usize,
    scale: f64,
    kernel: Kernel,
}

impl AttentionOp {
    fn run<T: Element>(
        &self,
        qs: &CudaStorage,
        ql: &Layout,
        ks: &CudaStorage,
        kl: &Layout,
        vs: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = qs.device().clone();
        let (&[b, n, width], &[kb, m, kw]) = (ql.dims(), kl.dims()) else {
            return Err(fail("attention inputs must be [b, n, heads·d]"));
        };
        let heads = self.heads;
        if heads == 0 || width % heads != 0 || kb != b || kw != width || vl.dims() != kl.dims() {
            return Err(fail(format!(
                "attention shapes {:?} {:?} {:?} with {heads} heads",
                ql.dims(),
                kl.dims(),
                vl.dims()
            )));
        }
        let d = width / heads;
        if m == 0 || b * heads > 65_535 {
            return Err(fail(format!(
                "attention of {b}×{heads} heads over {m} keys: no keys, or too many heads"
            )));
        }
        // 16-byte rows for `cp.async`: heads a multiple of 8 wide, tensors starting aligned.
        if !d.is_multiple_of(8)
            || [ql, kl, vl]
                .iter()
                .any(|l| !l.start_offset().is_multiple_of(8))
        {
            return Err(fail(format!(
                "attention heads {d} wide or inputs not 16-byte aligned"
            )));
        }
        let dp = FLASH_WIDTHS
            .into_iter()
            .find(|&w| w >= d)
            .ok_or_else(|| fail(format!("no attention kernel for heads {d} wide")))?;
        let fits = warpgroup_takes(&dev, d, width);
        let kernel = match (self.kernel, hopper_attention()) {
            (Kernel::Auto, Some(form)) if fits => Kernel::Hopper(form),
            (Kernel::Auto, _) => Kernel::Portable,
            (Kernel::Hopper(_), _) if !fits => {
                let needs = "an sm_90 GPU, heads up to 64 wide and rows under 2³¹ / 64 elements";
                return Err(fail(format!(
                    "the warpgroup attention kernel needs {needs}, not heads {d} wide in rows of {width}"
                )));
            }
            (chosen, _) => chosen,
        };
        let size = std::mem::size_of::<T>();
        let (kernels, name, block_queries, threads, bytes) = match kernel {
            Kernel::Hopper(form) => {
                // Tiles of 64 keys (a K and a V tile per stage), unpadded, after the Q tile of
                // the block's warpgroups of 64 queries. Reading V's layout the wrong way round
                // reaches past the last V tile by less than a tile: one more keeps it inside.
                let ones = d < dp;
                let (form, tiles, groups) = match form {
                    Hopper::Plain => ("", 2 * 2, 2),
                    Hopper::Swapped => ("swap", 2 * 2 + 1, 2),
                    Hopper::Pipelined if ones => ("pipep", 3 * 2, 2),
                    Hopper::Pipelined => ("pipe", 3 * 2, 2),
                    Hopper::Single if ones => ("pipep1", 3 * 2, 1),
                    Hopper::Single => ("pipe1", 3 * 2, 1),
                };
                let queries = 64 * groups;
                let bytes = (queries + tiles * 64) * dp * size;
                let name = format!("flash_attention_wg{dp}{form}_{}", T::SUFFIX);
                (Kernels::Hopper, name, queries, 128 * groups as u32, bytes)
            }
            _ => {
                let rt = flash_rows(dp);
                // Heads narrower than the kernel's width (SD 1.5's 40 in 48) get the row sums
                // from a column of ones beside V; that form is built for the 64×64 layers'
                // shape.
                let ones = if d < dp && (dp, rt) == (48, 2) {
                    "p"
                } else {
                    ""
                };
                // The Q tile and one K and V tile per stage (two up to heads 128 wide, as the
                // kernel), rows padded by 16 bytes.
                let stages = if dp <= 128 { 2 } else { 1 };
                let bytes = (64 * rt + 2 * 64 * stages) * (dp + 8) * size;
                let name = format!("flash_attention_{dp}x{rt}{ones}_{}", T::SUFFIX);
                (Kernels::Fused, name, 64 * rt, 128, bytes)
            }
        };
        let (q, k, v) = (
            view::<T>(qs, ql, "queries")?,
            view::<T>(ks, kl, "keys")?,
            view::<T>(vs, vl, "values")?,
        );
        let func = function_with(&dev, kernels, &name, |func| {
            use cudarc::driver::sys::CUfunction_attribute as Attribute;
            func.set_attribute(
                Attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(driver)?;
            if kernels == Kernels::Hopper {
                // All of the SM's L1 as shared memory: three or four blocks of the
                // one-warpgroup form need more than the driver's default split leaves.
                func.set_attribute(
                    Attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                    100,
                )
                .map_err(driver)?;
            }
            Ok(())
        })?;
        // SAFETY: every output element is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(b * n * width)? };
        let stream = dev.cuda_stream();
        let (heads32, n32, m32, d32) = (heads as i32, n as i32, m as i32, d as i32);
        let (q_batch, q_row, kv_batch, kv_row) = (
            (n * width) as i64,
            width as i64,
            (m * width) as i64,
            width as i64,
        );
        let scale_log2 = (self.scale * std::f64::consts::LOG2_E) as f32;
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&q)
            .arg(&k)
            .arg(&v)
            .arg(&mut out)
            .arg(&heads32)
            .arg(&n32)
            .arg(&m32)
            .arg(&d32)
            .arg(&q_batch)
            .arg(&q_row)
            .arg(&kv_batch)
            .arg(&kv_row)
            .arg(&scale_log2);
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(block_queries) as u32, (b * heads) as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        // SAFETY: one block per `block_queries` queries of one (image, head); reads stay below
        // n and m rows and d columns of each head, writes below n rows.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(output::<T>(out, dev, (b, n, width)))
    }
}

ternary_op!(
    AttentionOp,
    "sparkle-attention",
    "the fused attention runs on CUDA only",
    "no fused attention",
    [F16 => f16, BF16 => bf16]
);

/// Seconds per call of each attention kernel this GPU has, on random `[b, n, heads·d]`
/// queries over `[b, m, heads·d]` keys and values of `dtype` on `device`: the mean of `repeat`
/// calls after one untimed one, the GPU drained before and after. The kernels' names are
/// those `SPARKLE_HOPPER_ATTENTION` chooses between.
pub(crate) fn time_kernels(
    device: &candle_core::Device,
    dtype: DType,
    (b, n, m, heads, d): (usize, usize, usize, usize, usize),
    repeat: usize,
) -> Result<Vec<(&'static str, f64)>> {
    let candle_core::Device::Cuda(dev) = device else {
        return Err(fail("timing the attention kernels needs a CUDA device"));
    };
    let make = |rows| Tensor::randn(0f32, 1.0, (b, rows, heads * d), device)?.to_dtype(dtype);
    let (q, k, v) = (make(n)?, make(m)?, make(m)?);
    let scale = 1.0 / (d as f64).sqrt();
    let mut kernels = vec![("0: mma.sync", Kernel::Portable)];
    if warpgroup_takes(dev, d, heads * d) {
        kernels.extend(
            HOPPER_FORMS
                .iter()
                .map(|&(name, form)| (name, Kernel::Hopper(form))),
        );
    }
    kernels
        .into_iter()
        .map(|(name, kernel)| {
            attention_on(&q, &k, &v, heads, scale, kernel)?;
            device.synchronize()?;
            let started = std::time::Instant::now();
            for _ in 0..repeat {
                attention_on(&q, &k, &v, heads, scale, kernel)?;
            }
            device.synchronize()?;
            Ok((name, started.elapsed().as_secs_f64() / repeat.max(1) as f64))
        })
        .collect()
}
