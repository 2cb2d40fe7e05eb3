//! The convolution and GroupNorm layers of the UNet and the VAE. On the CPU they are
//! candle's; on CUDA in f16, bf16 or f32 they run our own path (`cuda.rs`): cuDNN
//! convolutions with plans cached per shape and a fused bias epilogue, and a one-kernel
//! GroupNorm with the SiLU that follows it in every ResNet block.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};

/// A 2-D convolution with bias.
pub(crate) struct Conv {
    inner: Conv2d,
}

impl Conv {
    pub fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let config = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        Ok(Conv {
            inner: candle_nn::conv2d(cin, cout, kernel, config, vb)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, None, None)
    }

    /// Whether this is a 1×1 convolution that runs on `xs`'s device as a linear layer over
    /// channels-last rows (CUDA): one cuBLASLt product with the bias in its epilogue, where
    /// cuDNN would convert the layout on the way in and out.
    #[cfg(feature = "cuda")]
    pub fn pointwise_on(&self, xs: &Tensor) -> bool {
        let config = self.inner.config();
        crate::cuda::accelerated(xs)
            && self.inner.bias().is_some()
            && self.inner.weight().dims()[2..] == [1, 1]
            && (config.stride, config.padding, config.dilation, config.groups) == (1, 0, 1, 1)
    }

    /// This 1×1 convolution over `[b, n, channels]` rows (see [`Conv::pointwise_on`]).
    #[cfg(feature = "cuda")]
    pub fn pointwise(&self, rows: &Tensor) -> Result<Tensor> {
        let weight = self.inner.weight();
        let (k, c) = (weight.dim(0)?, weight.dim(1)?);
        let bias = self
            .inner
            .bias()
            .ok_or_else(|| candle_core::Error::Msg("a pointwise convolution without bias".into()))?;
        crate::cuda::linear(rows, &weight.reshape((k, c))?, bias, None)
    }

    /// `conv(xs) + per_image[n, c] + residual`, one pass over the output on CUDA: the
    /// time embedding a ResNet block adds after its first convolution, and the skip
    /// connection it adds after its second.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        per_image: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (true, Some(bias)) = (crate::cuda::accelerated(xs), self.inner.bias()) {
            let config = self.inner.config();
            return crate::cuda::conv2d(
                xs,
                self.inner.weight(),
                bias,
                config.padding,
                config.stride,
                residual,
                per_image,
            );
        }
        let mut out = self.inner.forward(xs)?;
        if let Some(per_image) = per_image {
            out = out.broadcast_add(&per_image.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        match residual {
            Some(residual) => residual + out,
            None => Ok(out),
        }
    }
}

/// GroupNorm over `[b, c, …]`, optionally followed by SiLU.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct Norm {
    inner: GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl Norm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        Ok(Norm {
            inner: GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(norm(xs))`, one kernel on CUDA.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::cuda::accelerated(xs) {
            return crate::cuda::group_norm(
                xs,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                silu,
            );
        }
        let normed = self.inner.forward(xs)?;
        if silu {
            normed.silu()
        } else {
            Ok(normed)
        }
    }
}

/// Softmax over the last dimension, in f32 arithmetic whatever the storage type (candle's
/// kernel on the CPU; on CUDA one that holds each row in registers).
pub(crate) fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::accelerated(xs) {
        return crate::cuda::softmax_last_dim(xs);
    }
    candle_nn::ops::softmax_last_dim(xs)
}

/// GEGLU: `value · GELU(gate)` (exact GELU) of a `[…, 2·inner]` projection whose first half
/// is the value; one kernel on CUDA.
pub(crate) fn geglu(projected: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::cuda::accelerated(projected) {
        return crate::cuda::geglu(projected);
    }
    let chunks = projected.chunk(2, candle_core::D::Minus1)?;
    &chunks[0] * chunks[1].gelu_erf()?
}

/// A linear layer with bias whose output may take a residual in the same pass (on CUDA).
pub(crate) struct Dense {
    inner: candle_nn::Linear,
}

impl Dense {
    pub fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Dense {
            inner: candle_nn::linear(cin, cout, vb)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_add(xs, None)
    }

    /// `linear(xs) + residual`.
    pub fn forward_add(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (true, Some(bias)) = (crate::cuda::accelerated(xs), self.inner.bias()) {
            return crate::cuda::linear(xs, self.inner.weight(), bias, residual);
        }
        let out = self.inner.forward(xs)?;
        match residual {
            Some(residual) => out + residual,
            None => Ok(out),
        }
    }
}
