//! The VAE: diffusers' `AutoencoderKL`, its decoder from `post_quant_conv` to pixels and its
//! encoder from pixels to the latent distribution's mean (image-to-image and inpainting
//! start from it), with diffusers' tensor names. Its convolutions and GroupNorms are the
//! engine's own layers, which on CUDA run through cuDNN and fused kernels: at 512×512 the
//! decoder moves more data than a whole UNet step.

use crate::config::VaeConfig;
use crate::layers::{Channels, Conv, Norm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// GroupNorm epsilon throughout the VAE.
const EPS: f64 = 1e-6;

struct ResnetBlock {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, groups: usize, cin: usize, cout: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: Norm::new(groups, cin, EPS, vb.pp("norm1"))?,
            conv1: Conv::new(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            norm2: Norm::new(groups, cout, EPS, vb.pp("norm2"))?,
            conv2: Conv::new(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut: (cin != cout)
                .then(|| Conv::new(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0))
                .transpose()?,
        })
    }

    fn forward(&self, xs: &Tensor, ch: Channels) -> Result<Tensor> {
        let h = self
            .conv1
            .apply(&self.norm1.apply(xs, true, ch)?, None, None, ch)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.apply(xs, None, None, ch)?,
            None => xs.clone(),
        };
        self.conv2
            .apply(&self.norm2.apply(&h, true, ch)?, Some(&skip), None, ch)
    }
}

fn projection(vb: VarBuilder, channels: usize) -> Result<Linear> {
    candle_nn::linear(channels, channels, vb)
}

/// Single-head self-attention over the pixels, with a residual.
struct AttentionBlock {
    norm: Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    scale: f64,
}

impl AttentionBlock {
    fn new(vb: VarBuilder, groups: usize, channels: usize) -> Result<Self> {
        let legacy = !vb.contains_tensor("to_q.weight");
        let names = if legacy {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(AttentionBlock {
            norm: Norm::new(groups, channels, EPS, vb.pp("group_norm"))?,
            q: projection(vb.pp(names[0]), channels)?,
            k: projection(vb.pp(names[1]), channels)?,
            v: projection(vb.pp(names[2]), channels)?,
            out: projection(vb.pp(names[3]), channels)?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    fn forward(&self, xs: &Tensor, ch: Channels) -> Result<Tensor> {
        if ch == Channels::Last {
            // The map is already the rows `[b, h·w, c]`.
            let (b, h, w, c) = xs.dims4()?;
            let seq = self.norm.apply(xs, false, ch)?.reshape((b, h * w, c))?;
            return self.attend(&seq)?.reshape((b, h, w, c))? + xs;
        }
        let (b, c, h, w) = xs.dims4()?;
        let seq = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let attended = self
            .attend(&seq)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, c, h, w))?;
        attended + xs
    }

    /// Single-head attention over `[b, n, c]` rows, projected out.
    fn attend(&self, seq: &Tensor) -> Result<Tensor> {
        self.attend_within(seq, MAX_SCORE_BYTES)
    }

    /// Attention whose score matrix holds at most `max_score_bytes` at once: the queries
    /// are taken in slices of rows, each row's softmax being over all keys as before, so the
    /// result is the same, and a large image decodes in bounded memory (the full matrix of
    /// a 2048² image is 16 GiB).
    fn attend_within(&self, seq: &Tensor, max_score_bytes: usize) -> Result<Tensor> {
        let q = (self.q.forward(seq)? * self.scale)?;
        let k_t = self.k.forward(seq)?.t()?.contiguous()?;
        let v = self.v.forward(seq)?;
        let (b, n, _) = q.dims3()?;
        let row_bytes = b * n * q.dtype().size_in_bytes();
        let rows = (max_score_bytes / row_bytes.max(1)).clamp(1, n.max(1));
        let attended = if rows >= n {
            let probs = crate::layers::softmax_last_dim(&q.matmul(&k_t)?)?;
            probs.matmul(&v)?
        } else {
            let mut slices = Vec::with_capacity(n.div_ceil(rows));
            for start in (0..n).step_by(rows) {
                let q = q.narrow(1, start, rows.min(n - start))?;
                let probs = crate::layers::softmax_last_dim(&q.matmul(&k_t)?)?;
                slices.push(probs.matmul(&v)?);
            }
            Tensor::cat(&slices, 1)?
        };
        self.out.forward(&attended)
    }
}

/// The most a VAE attention score matrix may hold at once (the queries are sliced beyond).
pub(crate) const MAX_SCORE_BYTES: usize = 512 << 20;

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv>,
}

/// The decoder, from (unscaled) latents to images in about `[-1, 1]`.
pub(crate) struct VaeDecoder {
    post_quant_conv: Option<Conv>,
    conv_in: Conv,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: AttentionBlock,
    up: Vec<UpBlock>,
    norm_out: Norm,
    conv_out: Conv,
}

impl VaeDecoder {
    /// The decoder of the VAE `vb` holds; `vb` is the VAE's root (with `decoder.` and
    /// `post_quant_conv.` under it).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let c = &config.candle;
        let groups = c.norm_num_groups;
        let latent = c.latent_channels;
        let channels: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = channels[0];
        let d = vb.pp("decoder");
        let mut up = Vec::with_capacity(channels.len());
        let mut prev = top;
        for (i, &cout) in channels.iter().enumerate() {
            let block = d.pp(format!("up_blocks.{i}"));
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { cout };
                    ResnetBlock::new(block.pp(format!("resnets.{j}")), groups, cin, cout)
                })
                .collect::<Result<_>>()?;
            let upsample = (i + 1 < channels.len())
                .then(|| Conv::new(block.pp("upsamplers.0.conv"), cout, cout, 3, 1, 1))
                .transpose()?;
            up.push(UpBlock { resnets, upsample });
            prev = cout;
        }
        let bottom = *channels.last().unwrap_or(&top);
        Ok(VaeDecoder {
            post_quant_conv: c
                .use_post_quant_conv
                .then(|| Conv::new(vb.pp("post_quant_conv"), latent, latent, 1, 1, 0))
                .transpose()?,
            conv_in: Conv::new(d.pp("conv_in"), latent, top, 3, 1, 1)?,
            mid_resnets: [
                ResnetBlock::new(d.pp("mid_block.resnets.0"), groups, top, top)?,
                ResnetBlock::new(d.pp("mid_block.resnets.1"), groups, top, top)?,
            ],
            mid_attention: AttentionBlock::new(d.pp("mid_block.attentions.0"), groups, top)?,
            up,
            norm_out: Norm::new(groups, bottom, EPS, d.pp("conv_norm_out"))?,
            conv_out: Conv::new(d.pp("conv_out"), bottom, config.out_channels, 3, 1, 1)?,
        })
    }

    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        // Channels-last on CUDA, as the UNet.
        let ch = Channels::for_input(latents);
        let mut xs = ch.of_nchw(latents)?;
        if let Some(conv) = &self.post_quant_conv {
            xs = conv.apply(&xs, None, None, ch)?;
        }
        xs = self.conv_in.apply(&xs, None, None, ch)?;
        xs = self.mid_resnets[0].forward(&xs, ch)?;
        xs = self.mid_attention.forward(&xs, ch)?;
        xs = self.mid_resnets[1].forward(&xs, ch)?;
        for block in &self.up {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, ch)?;
            }
            if let Some(conv) = &block.upsample {
                let (h, w) = ch.size(&xs)?;
                xs = conv.apply(&ch.upsample_nearest(&xs, h * 2, w * 2)?, None, None, ch)?;
            }
        }
        let xs = self.norm_out.apply(&xs, true, ch)?;
        ch.to_nchw(&self.conv_out.apply(&xs, None, None, ch)?)
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// A stride-2 convolution after a zero row and column at the bottom and right.
    downsample: Option<Conv>,
}

/// The encoder, from images in `[-1, 1]` to the (unscaled) latents' mean.
pub(crate) struct VaeEncoder {
    conv_in: Conv,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: AttentionBlock,
    norm_out: Norm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
    latent_channels: usize,
}

impl VaeEncoder {
    /// The encoder of the VAE `vb` holds (`encoder.` and `quant_conv.` under it).
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let c = &config.candle;
        let groups = c.norm_num_groups;
        let latent = c.latent_channels;
        let channels = &c.block_out_channels;
        let first = channels[0];
        let top = *channels.last().unwrap_or(&first);
        let e = vb.pp("encoder");
        let mut down = Vec::with_capacity(channels.len());
        let mut prev = first;
        for (i, &cout) in channels.iter().enumerate() {
            let block = e.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { cout };
                    ResnetBlock::new(block.pp(format!("resnets.{j}")), groups, cin, cout)
                })
                .collect::<Result<_>>()?;
            let downsample = (i + 1 < channels.len())
                .then(|| Conv::new(block.pp("downsamplers.0.conv"), cout, cout, 3, 2, 0))
                .transpose()?;
            down.push(DownBlock {
                resnets,
                downsample,
            });
            prev = cout;
        }
        Ok(VaeEncoder {
            conv_in: Conv::new(e.pp("conv_in"), config.in_channels, first, 3, 1, 1)?,
            down,
            mid_resnets: [
                ResnetBlock::new(e.pp("mid_block.resnets.0"), groups, top, top)?,
                ResnetBlock::new(e.pp("mid_block.resnets.1"), groups, top, top)?,
            ],
            mid_attention: AttentionBlock::new(e.pp("mid_block.attentions.0"), groups, top)?,
            norm_out: Norm::new(groups, top, EPS, e.pp("conv_norm_out"))?,
            conv_out: Conv::new(e.pp("conv_out"), top, 2 * latent, 3, 1, 1)?,
            quant_conv: c
                .use_quant_conv
                .then(|| Conv::new(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, 1, 0))
                .transpose()?,
            latent_channels: latent,
        })
    }

    /// The mean of the latent distribution of `images` (`[n, 3, h, w]` in `[-1, 1]`), NCHW.
    /// The mean, not a sample: an image's latents then depend on the image alone.
    pub fn encode(&self, images: &Tensor) -> Result<Tensor> {
        let ch = Channels::for_input(images);
        let mut xs = self.conv_in.apply(&ch.of_nchw(images)?, None, None, ch)?;
        let (h_dim, w_dim) = match ch {
            Channels::First => (2, 3),
            Channels::Last => (1, 2),
        };
        for block in &self.down {
            for resnet in &block.resnets {
                xs = resnet.forward(&xs, ch)?;
            }
            if let Some(conv) = &block.downsample {
                let padded = xs
                    .pad_with_zeros(h_dim, 0, 1)?
                    .pad_with_zeros(w_dim, 0, 1)?;
                xs = conv.apply(&padded, None, None, ch)?;
            }
        }
        xs = self.mid_resnets[0].forward(&xs, ch)?;
        xs = self.mid_attention.forward(&xs, ch)?;
        xs = self.mid_resnets[1].forward(&xs, ch)?;
        let xs = self.norm_out.apply(&xs, true, ch)?;
        let mut moments = self.conv_out.apply(&xs, None, None, ch)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.apply(&moments, None, None, ch)?;
        }
        ch.to_nchw(&moments)?.narrow(1, 0, self.latent_channels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    #[test]
    fn sliced_attention_gives_the_same_rows_as_the_whole_matrix() {
        let device = Device::Cpu;
        let channels = 32;
        let map = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &device);
        let block = AttentionBlock::new(vb, 8, channels).expect("block");
        // Weights are zeros from a fresh map: give them values.
        for var in map.all_vars() {
            let random = Tensor::randn(0f32, 0.2, var.shape(), &device).expect("randn");
            var.set(&random).expect("set");
        }
        let seq = Tensor::randn(0f32, 1.0, (2, 300, channels), &device).expect("seq");
        let whole = block.attend_within(&seq, usize::MAX).expect("whole");
        // 300 rows of 2 × 300 f32 scores are 2400 bytes each: 7 rows a slice, the last short.
        let sliced = block.attend_within(&seq, 7 * 2400).expect("sliced");
        let one_row = block.attend_within(&seq, 1).expect("one row at a time");
        for other in [&sliced, &one_row] {
            let diff = (&whole - other)
                .expect("diff")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("scalar");
            assert!(diff < 1e-5, "largest difference {diff}");
        }
        assert_eq!(sliced.dims(), whole.dims());
    }
}
