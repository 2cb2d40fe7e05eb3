//! Softmax and GEGLU over the last dimension.

use super::*;

/// Rows up to this long are held in registers by the softmax kernel.
const SOFTMAX_MAX_COLS: usize = 128 * 64;

/// Softmax over the last dimension of a contiguous tensor, f32 arithmetic.
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    let cols = xs.dim(candle_core::D::Minus1)?;
    if !accelerated(xs) || cols > SOFTMAX_MAX_COLS || cols == 0 {
        return candle_nn::ops::softmax_last_dim(xs);
    }
    xs.contiguous()?.apply_op1_no_bwd(&SoftmaxOp)
}

struct SoftmaxOp;

impl SoftmaxOp {
    fn run<T: Element>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let n = l.shape().elem_count();
        let cols = *l.dims().last().ok_or_else(|| fail("softmax of a scalar"))?;
        let rows = n / cols;
        let per_thread = [1usize, 8, 32, 64]
            .into_iter()
            .find(|e| e * 128 >= cols)
            .ok_or_else(|| fail("softmax row too long"))?;
        let config = LaunchConfig {
            grid_dim: (
                u32::try_from(rows).map_err(|_| fail("too many rows"))?,
                1,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = format!("softmax_{per_thread}");
        let out = launch_unary::<T>(s, l, &name, n, config, &[cols as i64], "softmax input")?;
        Ok(output::<T>(out, s.device().clone(), l.shape().clone()))
    }
}

/// `value · GELU(gate)` of a `[…, 2·inner]` projection whose first half is the value.
pub(crate) fn geglu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&GegluOp)
}

struct GegluOp;

impl GegluOp {
    fn run<T: Element>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dims = l.dims();
        let last = *dims.last().ok_or_else(|| fail("GEGLU of a scalar"))?;
        if last % 2 != 0 {
            return Err(fail("GEGLU needs an even last dimension"));
        }
        let inner = last / 2;
        let n = l.shape().elem_count() / 2;
        let config = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(132 * 64) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let out = launch_unary::<T>(
            s,
            l,
            "geglu",
            n,
            config,
            &[inner as i64, n as i64],
            "GEGLU input",
        )?;
        let mut shape = dims.to_vec();
        if let Some(d) = shape.last_mut() {
            *d = inner;
        }
        Ok(output::<T>(out, s.device().clone(), shape))
    }
}

unary_op!(SoftmaxOp, "sparkle-softmax");
unary_op!(GegluOp, "sparkle-geglu");
