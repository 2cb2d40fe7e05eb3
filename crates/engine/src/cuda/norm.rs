//! GroupNorm (+SiLU) over channels-last maps and LayerNorm over rows.

use super::*;
use candle_core::CustomOp3;

/// GroupNorm over a channels-last map `[b, …, c]`, then SiLU when `silu`.
pub(crate) fn group_norm(
    xs: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let xs = xs.contiguous()?;
    let weight = weight.to_dtype(xs.dtype())?.contiguous()?;
    let bias = bias.to_dtype(xs.dtype())?.contiguous()?;
    xs.apply_op3_no_bwd(&weight, &bias, &NormOp { groups, eps, silu })
}

struct NormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Channels the GroupNorm kernel's scale and shift fit for: 48 KiB of shared memory, what
/// a kernel may use without asking.
const GROUP_NORM_MAX_CHANNELS: usize = 6144;

impl NormOp {
    fn run<T: Element>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let dims = xl.dims();
        let (Some(&b), Some(&c), true) = (dims.first(), dims.last(), dims.len() > 1) else {
            return Err(fail("GroupNorm input must be [b, …, c]"));
        };
        let hw: usize = dims.iter().product::<usize>() / (b * c).max(1);
        let groups = self.groups;
        if groups == 0 || c % groups != 0 || wl.dims() != [c] || bl.dims() != [c] {
            return Err(fail(format!("GroupNorm of {dims:?} in {groups} groups")));
        }
        if hw * c > i32::MAX as usize || b > 65_535 || c > GROUP_NORM_MAX_CHANNELS {
            return Err(fail(format!("GroupNorm of {b} images of {hw}×{c}")));
        }
        let x = view::<T>(xs, xl, "GroupNorm input")?;
        let gamma = view::<T>(ws, wl, "GroupNorm weight")?;
        let beta = view::<T>(bs, bl, "GroupNorm bias")?;
        let cpg = c / groups;
        let stream = dev.cuda_stream();
        let mut stats = dev.alloc_zeros::<f64>(2 * b * groups)?;
        // SAFETY: the kernel below writes every element.
        let mut out = unsafe { dev.alloc::<T>(b * hw * c)? };
        let vec = vec8(&stream, [&x, &gamma, &beta, &out.slice(..)], c);
        let (hw32, c32, cpg32, groups32, eps) = (
            hw as i32,
            c as i32,
            cpg as i32,
            groups as i32,
            self.eps as f32,
        );
        let stats_fn = function(&dev, &format!("group_stats_last{vec}_{}", T::SUFFIX))?;
        // Statistics: about a thousand blocks in all, each a slice of one image's pixels.
        let splits = (1024 / b).clamp(1, hw.div_ceil(16).max(1)) as u32;
        let mut launch = stream.launch_builder(&stats_fn);
        launch
            .arg(&x)
            .arg(&mut stats)
            .arg(&hw32)
            .arg(&c32)
            .arg(&cpg32)
            .arg(&groups32);
        let config = LaunchConfig {
            grid_dim: (splits, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: (2 * groups * 4) as u32,
        };
        // SAFETY: blocks (split, image) read pixel slices of b images of hw·c elements,
        // `vec` channels at a time and aligned to it; they add into 2·b·groups doubles.
        unsafe { launch.launch(config) }.map_err(driver)?;
        let name = format!(
            "group_apply{}_last{vec}_{}",
            if self.silu { "_silu" } else { "" },
            T::SUFFIX
        );
        let apply = function(&dev, &name)?;
        let mut launch = stream.launch_builder(&apply);
        launch
            .arg(&x)
            .arg(&stats)
            .arg(&gamma)
            .arg(&beta)
            .arg(&mut out)
            .arg(&hw32)
            .arg(&c32)
            .arg(&cpg32)
            .arg(&groups32)
            .arg(&eps);
        let mut config = image_grid(b, hw * c, vec)?;
        config.shared_mem_bytes = (2 * c * 4) as u32;
        // SAFETY: blocks (x, image) over b images of hw·c elements of `x` and `out`, `vec`
        // at a time and aligned to it; channels below c (≤ GROUP_NORM_MAX_CHANNELS, the
        // shared scale and shift), groups below b·groups.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(output::<T>(out, dev, xl.shape().clone()))
    }
}

ternary_op!(
    NormOp,
    "sparkle-group-norm",
    "the fused GroupNorm runs on CUDA only",
    "no GroupNorm",
    [F16 => f16, BF16 => bf16, F32 => f32]
);

/// Widest rows [`layer_norm`] takes (the kernel holds 8·32·8 values per row).
pub(crate) const LAYER_NORM_MAX_COLS: usize = 2048;

/// LayerNorm over the last dimension of `xs` (contiguous, starting 16-byte aligned, the
/// last dimension a multiple of 8 up to [`LAYER_NORM_MAX_COLS`]): one warp per row.
pub(crate) fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = xs.dtype();
    let (weight, bias) = (
        weight.to_dtype(dtype)?.contiguous()?,
        bias.to_dtype(dtype)?.contiguous()?,
    );
    xs.apply_op3_no_bwd(&weight, &bias, &LayerNormOp { eps })
}

struct LayerNormOp {
    eps: f64,
}

impl LayerNormOp {
    fn run<T: Element>(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = xs.device().clone();
        let cols = *xl
            .dims()
            .last()
            .ok_or_else(|| fail("LayerNorm of a scalar"))?;
        let rows = xl.shape().elem_count() / cols.max(1);
        let x = view::<T>(xs, xl, "LayerNorm input")?;
        let gamma = view::<T>(ws, wl, "LayerNorm weight")?;
        let beta = view::<T>(bs, bl, "LayerNorm bias")?;
        let stream = dev.cuda_stream();
        if wl.dims() != [cols]
            || bl.dims() != [cols]
            || cols > LAYER_NORM_MAX_COLS
            || vec8(&stream, [&x, &gamma, &beta], cols) != 8
        {
            return Err(fail(format!(
                "LayerNorm of {:?} needs 16-bit rows of a multiple of 8 up to {LAYER_NORM_MAX_COLS}, aligned",
                xl.dims()
            )));
        }
        let func = function(&dev, &format!("layer_norm_{}", T::SUFFIX))?;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(rows * cols)? };
        let (cols32, rows64, eps) = (cols as i32, rows as i64, self.eps as f32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&x)
            .arg(&gamma)
            .arg(&beta)
            .arg(&mut out)
            .arg(&cols32)
            .arg(&rows64)
            .arg(&eps);
        let config = LaunchConfig {
            grid_dim: (rows.div_ceil(8).clamp(1, 132 * 32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: a warp per row over `rows` rows of `cols` elements of x and out, 8 at a
        // time and aligned to it (checked above); gamma and beta hold `cols`.
        unsafe { launch.launch(config) }.map_err(driver)?;
        Ok(output::<T>(out, dev, xl.shape().clone()))
    }
}

ternary_op!(
    LayerNormOp,
    "sparkle-layer-norm",
    "the fused LayerNorm runs on CUDA only",
    "no fused LayerNorm",
    [F16 => f16, BF16 => bf16]
);
