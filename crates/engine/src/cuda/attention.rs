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

/// `softmax(q·kᵀ·scale)·v` per head without the score matrix: q `[b, n, heads·d]`, k and
/// v `[b, m, heads·d]` (the projections as they come), out `[b, n, heads·d]`.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    q.apply_op3_no_bwd(&k, &v, &AttentionOp { heads, scale })
}

struct AttentionOp {
    heads: usize,
    scale: f64,
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
        let rt = flash_rows(dp);
        let block_queries = 64 * rt;
        let (q, k, v) = (
            view::<T>(qs, ql, "queries")?,
            view::<T>(ks, kl, "keys")?,
            view::<T>(vs, vl, "values")?,
        );
        // Heads narrower than the kernel's width (SD 1.5's 40 in 48) get the row sums from
        // a column of ones beside V; that form is built for the 64×64 layers' shape.
        let ones = if d < dp && (dp, rt) == (48, 2) {
            "p"
        } else {
            ""
        };
        // The kernel's shared memory: the Q tile and one K and V tile per stage (two up to
        // heads 128 wide, as the kernel), rows padded by 16 bytes.
        let stages = if dp <= 128 { 2 } else { 1 };
        let bytes = (block_queries + 2 * 64 * stages) * (dp + 8) * std::mem::size_of::<T>();
        let name = format!("flash_attention_{dp}x{rt}{ones}_{}", T::SUFFIX);
        let func = function_with(&dev, &name, |func| {
            func.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(driver)
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
            block_dim: (128, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        // SAFETY: one block per 64·rt queries of one (image, head); reads stay below n and m
        // rows and d columns of each head, writes below n rows.
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
