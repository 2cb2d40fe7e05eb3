//! Channels-last copies in one vectorised pass: nearest upsampling by two and the skip
//! connections' concatenation.

use super::*;

/// Grid of 256-thread blocks over `total` output vectors (the loops stride past the grid).
fn vector_grid(total: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (total.div_ceil(256).clamp(1, 132 * 32) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A size the copy kernels index with `int`, or an error.
fn int_total(total: usize, what: &str) -> Result<i32> {
    i32::try_from(total).map_err(|_| fail(format!("{what} of {total} vectors is too large")))
}

/// Nearest-neighbour upsampling by two of a channels-last map `[b, h, w, c]`: one pass,
/// 16 bytes per access where the channels allow.
pub(crate) fn upsample2x_last(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1_no_bwd(&Upsample2xOp)
}

struct Upsample2xOp;

impl Upsample2xOp {
    fn run<T: Element>(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let &[b, h, w, c] = l.dims() else {
            return Err(fail(format!(
                "upsampling needs [b, h, w, c], not {:?}",
                l.dims()
            )));
        };
        let dev = s.device().clone();
        let x = view::<T>(s, l, "upsampling input")?;
        let stream = dev.cuda_stream();
        let elements = b * 4 * h * w * c;
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(elements)? };
        let vec = vec8(&stream, [&x, &out.slice(..)], c);
        let total = int_total(elements / vec, "upsampling")?;
        let func = function(&dev, &format!("upsample2x_last{vec}_{}", T::SUFFIX))?;
        let (h32, w32, c32) = (h as i32, w as i32, c as i32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&x)
            .arg(&mut out)
            .arg(&h32)
            .arg(&w32)
            .arg(&c32)
            .arg(&total);
        // SAFETY: `total` vectors of `vec` elements are written, each read from inside the
        // b·h·w·c input; `vec` divides c and both pointers are aligned to it (`vec8`).
        unsafe { launch.launch(vector_grid(total as usize)) }.map_err(driver)?;
        Ok(output::<T>(out, dev, (b, 2 * h, 2 * w, c)))
    }
}

unary_op!(Upsample2xOp, "sparkle-upsample2x");

/// `a` and `b` side by side along their last dimension (every other dimension equal).
pub(crate) fn concat_last(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.contiguous()?
        .apply_op2_no_bwd(&b.contiguous()?, &ConcatOp)
}

struct ConcatOp;

impl ConcatOp {
    fn run<T: Element>(
        &self,
        as_: &CudaStorage,
        al: &Layout,
        bs: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (ad, bd) = (al.dims(), bl.dims());
        let (Some((&ca, arest)), Some((&cb, brest))) = (ad.split_last(), bd.split_last()) else {
            return Err(fail("concatenation of scalars"));
        };
        if arest != brest {
            return Err(fail(format!("concatenation of {ad:?} and {bd:?}")));
        }
        let rows: usize = arest.iter().product();
        let dev = as_.device().clone();
        let (a, b) = (
            view::<T>(as_, al, "concatenated input")?,
            view::<T>(bs, bl, "concatenated input")?,
        );
        let stream = dev.cuda_stream();
        let elements = rows * (ca + cb);
        // SAFETY: the kernel writes every element.
        let mut out = unsafe { dev.alloc::<T>(elements)? };
        // Both widths must split into whole vectors.
        let vec = if cb.is_multiple_of(8) {
            vec8(&stream, [&a, &b, &out.slice(..)], ca)
        } else {
            1
        };
        let total = int_total(elements / vec, "concatenation")?;
        let func = function(&dev, &format!("concat_last{vec}_{}", T::SUFFIX))?;
        let (ca32, cb32) = (ca as i32, cb as i32);
        let mut launch = stream.launch_builder(&func);
        launch
            .arg(&a)
            .arg(&b)
            .arg(&mut out)
            .arg(&ca32)
            .arg(&cb32)
            .arg(&total);
        // SAFETY: `total` vectors are written, each read from inside `rows` rows of `a` (ca
        // wide) or `b` (cb wide); `vec` divides both widths and the pointers are aligned.
        unsafe { launch.launch(vector_grid(total as usize)) }.map_err(driver)?;
        let mut shape = arest.to_vec();
        shape.push(ca + cb);
        Ok(output::<T>(out, dev, shape))
    }
}

binary_op!(
    ConcatOp,
    "sparkle-concat",
    "the concatenation kernel runs on CUDA only",
    "no concatenation"
);
