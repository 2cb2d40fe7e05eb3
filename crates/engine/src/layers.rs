//! The layers of the UNet and the VAE. Over NCHW maps (the CPU) they are candle's; over
//! channels-last maps (CUDA in f16, bf16 or f32) they run our own path (`cuda/`): cuDNN
//! convolutions with plans cached per shape and a fused bias epilogue, a one-kernel GroupNorm
//! with the SiLU that follows it in every ResNet block, and the transformers' row kernels.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, GroupNorm, VarBuilder};

/// Where a feature map keeps its channels: `[b, c, h, w]` (candle's layout: the CPU path) or
/// `[b, h, w, c]` (the UNet and the VAE on CUDA: cuDNN's fast convolutions are channels-last,
/// and an attention block's rows are then the map itself, with nothing to transpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Channels {
    First,
    Last,
}

impl Channels {
    /// The layout a network should run `xs` in: channels-last where our CUDA kernels take it.
    pub fn for_input(xs: &Tensor) -> Channels {
        #[cfg(feature = "cuda")]
        if crate::cuda::accelerated(xs) {
            return Channels::Last;
        }
        let _ = xs;
        Channels::First
    }

    /// A convolution kernel `[k, c, kh, kw]` in the layout the maps it convolves run in, and
    /// that layout: as it is for NCHW, KRSC (`[k, kh, kw, c]`, contiguous) for channels-last.
    /// A kernel already held as KRSC storage (viewed as `[k, c, kh, kw]`) is not copied.
    pub fn kernel(weight: Tensor) -> Result<(Tensor, Channels)> {
        Ok(match Channels::for_input(&weight) {
            Channels::First => (weight, Channels::First),
            Channels::Last => (weight.permute((0, 2, 3, 1))?.contiguous()?, Channels::Last),
        })
    }

    /// The dimension that holds the channels of a 4-D map.
    pub fn dim(self) -> usize {
        match self {
            Channels::First => 1,
            Channels::Last => 3,
        }
    }

    /// `(h, w)` of a 4-D map.
    pub fn size(self, xs: &Tensor) -> Result<(usize, usize)> {
        let (_, a, b, c) = xs.dims4()?;
        Ok(match self {
            Channels::First => (b, c),
            Channels::Last => (a, b),
        })
    }

    /// An NCHW map in this layout, contiguous.
    pub fn of_nchw(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Channels::First => Ok(xs.clone()),
            Channels::Last => xs.permute((0, 2, 3, 1))?.contiguous(),
        }
    }

    /// A map in this layout as NCHW, contiguous.
    pub fn to_nchw(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Channels::First => Ok(xs.clone()),
            Channels::Last => xs.permute((0, 3, 1, 2))?.contiguous(),
        }
    }

    /// `maps` side by side along the channels.
    pub fn cat(self, maps: &[&Tensor]) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Channels::Last, [a, b]) = (self, maps) {
            if crate::cuda::accelerated(a) {
                return crate::cuda::concat_last(a, b);
            }
        }
        Tensor::cat(maps, self.dim())
    }

    /// Nearest-neighbour upsampling to `(h, w)`.
    pub fn upsample_nearest(self, xs: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        match self {
            Channels::First => xs.upsample_nearest2d(h, w),
            Channels::Last => {
                let (b, ih, iw, c) = xs.dims4()?;
                if (h, w) == (2 * ih, 2 * iw) {
                    #[cfg(feature = "cuda")]
                    if crate::cuda::accelerated(xs) {
                        return crate::cuda::upsample2x_last(xs);
                    }
                    xs.reshape((b, ih, 1, iw, 1, c))?
                        .broadcast_as((b, ih, 2, iw, 2, c))?
                        .reshape((b, h, w, c))
                } else {
                    self.of_nchw(&self.to_nchw(xs)?.upsample_nearest2d(h, w)?)
                }
            }
        }
    }
}

/// A 2-D convolution with bias. Its weight is kept in the layout the maps it convolves run
/// in (decided once, at load, from the device and type): `[k, c, kh, kw]` for candle's NCHW
/// path, `[k, kh, kw, c]` (KRSC) for channels-last maps on CUDA. One copy on the device,
/// never both.
pub(crate) struct Conv {
    weight: Tensor,
    bias: Tensor,
    layout: Channels,
    config: Conv2dConfig,
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
        let weight = vb.get_with_hints(
            (cout, cin, kernel, kernel),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1. / (cin as f64).sqrt();
        let bias = vb.get_with_hints(
            cout,
            "bias",
            candle_nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let (weight, layout) = Channels::kernel(weight)?;
        Ok(Conv {
            weight,
            bias,
            layout,
            config,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, None, None)
    }

    /// `(kh, kw)` of the kernel.
    fn kernel_size(&self) -> (usize, usize) {
        let dims = self.weight.dims();
        match self.layout {
            Channels::First => (dims[2], dims[3]),
            Channels::Last => (dims[1], dims[2]),
        }
    }

    /// Whether this is a 1×1 convolution without stride or padding, which over
    /// channels-last rows is a linear layer.
    pub fn pointwise(&self) -> bool {
        let config = &self.config;
        self.kernel_size() == (1, 1)
            && (
                config.stride,
                config.padding,
                config.dilation,
                config.groups,
            ) == (1, 0, 1, 1)
    }

    /// This 1×1 convolution over `[b, n, channels]` rows (+ residual): on CUDA one cuBLASLt
    /// product with the bias in its epilogue. Any other convolution is an error.
    pub fn forward_rows(&self, rows: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if !self.pointwise() {
            return Err(candle_core::Error::Msg(
                "only a 1×1 convolution runs over rows".into(),
            ));
        }
        // `[k, c, 1, 1]` and `[k, 1, 1, c]` alike.
        let weight = self.weight.reshape((self.weight.dim(0)?, ()))?;
        #[cfg(feature = "cuda")]
        if crate::cuda::accelerated(rows) {
            return crate::cuda::linear(rows, &weight, Some(&self.bias), residual);
        }
        let out = rows
            .broadcast_matmul(&weight.t()?)?
            .broadcast_add(&self.bias)?;
        match residual {
            Some(residual) => out + residual,
            None => Ok(out),
        }
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
        self.apply(xs, residual, per_image, Channels::First)
    }

    /// [`Conv::forward_with`] over a map in the given layout (channels-last on CUDA only).
    pub fn apply(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        per_image: Option<&Tensor>,
        channels: Channels,
    ) -> Result<Tensor> {
        if channels == Channels::Last {
            #[cfg(feature = "cuda")]
            if crate::cuda::accelerated(xs) && self.layout == Channels::Last {
                return crate::cuda::conv2d(
                    xs,
                    &self.weight,
                    &self.bias,
                    self.config.padding,
                    self.config.stride,
                    residual,
                    per_image,
                );
            }
            return Err(candle_core::Error::Msg(
                "channels-last convolutions run on CUDA only, with weights loaded there".into(),
            ));
        }
        // Weights loaded channels-last serve an NCHW map too (never on the hot path).
        let weight = match self.layout {
            Channels::First => self.weight.clone(),
            Channels::Last => self.weight.permute((0, 3, 1, 2))?.contiguous()?,
        };
        let config = &self.config;
        let out = xs.conv2d(
            &weight,
            config.padding,
            config.stride,
            config.dilation,
            config.groups,
        )?;
        let mut out = out.broadcast_add(&self.bias.reshape((1, (), 1, 1))?)?;
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
        self.apply(xs, false, Channels::First)
    }

    /// GroupNorm (then SiLU when `silu`) over a map in the given layout (channels-last on
    /// CUDA only).
    pub fn apply(&self, xs: &Tensor, silu: bool, channels: Channels) -> Result<Tensor> {
        if channels == Channels::Last {
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
            return Err(candle_core::Error::Msg(
                "channels-last GroupNorm runs on CUDA only".into(),
            ));
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

/// LayerNorm over the last dimension: on CUDA in f16/bf16 one warp per row with the row in
/// registers (rows a multiple of 8 wide, up to 2048); candle's elsewhere.
pub(crate) fn row_norm(norm: &candle_nn::LayerNorm, xs: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let (true, Some(bias)) = (
        xs.device().is_cuda()
            && matches!(
                xs.dtype(),
                candle_core::DType::F16 | candle_core::DType::BF16
            ),
        norm.bias(),
    ) {
        let cols = xs.dim(candle_core::D::Minus1)?;
        let xs = xs.contiguous()?;
        if cols % 8 == 0
            && cols <= crate::cuda::LAYER_NORM_MAX_COLS
            && xs.layout().start_offset() % 8 == 0
        {
            return crate::cuda::layer_norm(&xs, norm.weight(), bias, norm.eps());
        }
    }
    norm.forward(xs)
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
            return crate::cuda::linear(xs, self.inner.weight(), Some(bias), residual);
        }
        let out = self.inner.forward(xs)?;
        match residual {
            Some(residual) => out + residual,
            None => Ok(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::max_tensor_diff as max_diff;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    fn random(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).expect("randn")
    }

    #[test]
    fn a_pointwise_convolution_over_rows_is_the_convolution() {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let pointwise = Conv::new(vb.pp("a"), 8, 6, 1, 1, 0).expect("conv");
        let spatial = Conv::new(vb.pp("b"), 8, 6, 3, 1, 1).expect("conv");
        assert!(pointwise.pointwise() && !spatial.pointwise());
        let xs = random(&[2, 8, 3, 5]);
        let skip = random(&[2, 6, 3, 5]);
        let expected = pointwise
            .forward_with(&xs, Some(&skip), None)
            .expect("conv");
        let rows = |t: &Tensor| {
            let c = t.dim(1).expect("dim");
            Channels::Last
                .of_nchw(t)
                .and_then(|t| t.reshape((2, 15, c)))
                .expect("rows")
        };
        let got = pointwise
            .forward_rows(&rows(&xs), Some(&rows(&skip)))
            .expect("rows");
        assert!(max_diff(&got, &rows(&expected)) < 1e-5);
    }

    #[test]
    fn channels_last_maps_round_trip_and_upsample_like_nchw() {
        let xs = random(&[2, 3, 4, 5]);
        let last = Channels::Last.of_nchw(&xs).expect("to last");
        assert_eq!(last.dims(), [2, 4, 5, 3]);
        assert_eq!(Channels::Last.size(&last).expect("size"), (4, 5));
        assert_eq!(Channels::First.size(&xs).expect("size"), (4, 5));
        assert_eq!(
            max_diff(&Channels::Last.to_nchw(&last).expect("back"), &xs),
            0.0
        );
        for (h, w) in [(8, 10), (9, 11)] {
            let expected = xs.upsample_nearest2d(h, w).expect("upsample");
            let got = Channels::Last
                .upsample_nearest(&last, h, w)
                .and_then(|t| Channels::Last.to_nchw(&t))
                .expect("upsample");
            assert_eq!(max_diff(&got, &expected), 0.0, "{h}x{w}");
        }
    }
}
