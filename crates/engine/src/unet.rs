//! The denoising network: diffusers' `UNet2DConditionModel` for SD 1.x, SD 2.x and SDXL,
//! with diffusers' tensor names.
//!
//! An encoder of resolution levels (ResNet blocks, optionally followed by spatial
//! transformers that attend to the text) halves the latent at each level but the last; a
//! middle block works at the lowest resolution; a decoder mirrors the encoder, consuming the
//! encoder's activations through skip connections. The time step enters every ResNet block
//! as an embedding; SDXL adds to that embedding its pooled text features and the image's
//! size and crop ("text_time" conditioning).

use crate::config::UNetConfig;
use crate::layers::{row_norm, Channels, Conv, Dense, Norm};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};

/// GroupNorm epsilon of the spatial transformers (diffusers fixes it at 1e-6).
const TRANSFORMER_NORM_EPS: f64 = 1e-6;
/// LayerNorm epsilon inside the transformer blocks.
const LAYER_NORM_EPS: f64 = 1e-5;

/// diffusers' sinusoidal embedding of `values` (`[n]`, f32) into `[n, dim]`.
pub(crate) fn sinusoidal(values: &Tensor, dim: usize, flip: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let exponents: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(exponents, (1, half), values.device())?;
    let args = values
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `linear_1 → SiLU → linear_2`.
struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    fn new(vb: VarBuilder, input: usize, dim: usize) -> Result<Self> {
        Ok(TimestepEmbedding {
            linear_1: linear(input, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

fn conv(vb: VarBuilder, cin: usize, cout: usize, kernel: usize, stride: usize) -> Result<Conv> {
    Conv::new(vb, cin, cout, kernel, stride, kernel / 2)
}

struct ResnetBlock {
    norm1: Norm,
    conv1: Conv,
    time_emb_proj: Linear,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
    output_scale: f64,
}

impl ResnetBlock {
    fn new(
        vb: VarBuilder,
        c: &UNetConfig,
        cin: usize,
        cout: usize,
        output_scale: f64,
    ) -> Result<Self> {
        let (groups, eps) = (c.norm_num_groups, c.norm_eps);
        Ok(ResnetBlock {
            norm1: Norm::new(groups, cin, eps, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1)?,
            time_emb_proj: linear(c.time_embed_dim(), cout, vb.pp("time_emb_proj"))?,
            norm2: Norm::new(groups, cout, eps, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1)?,
            shortcut: (cin != cout)
                .then(|| conv(vb.pp("conv_shortcut"), cin, cout, 1, 1))
                .transpose()?,
            output_scale,
        })
    }

    fn forward(&self, xs: &Tensor, temb: &Tensor, ch: Channels) -> Result<Tensor> {
        let t = self.time_emb_proj.forward(&temb.silu()?)?;
        let h = self
            .conv1
            .apply(&self.norm1.apply(xs, true, ch)?, None, Some(&t), ch)?;
        let skip = match &self.shortcut {
            Some(conv) => conv.apply(xs, None, None, ch)?,
            None => xs.clone(),
        };
        let out = self
            .conv2
            .apply(&self.norm2.apply(&h, true, ch)?, Some(&skip), None, ch)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale
        }
    }
}

/// Multi-head attention of `[b, n, dim]` queries over `[b, m, context]` keys and values.
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Dense,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, context: usize, heads: usize) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Attention {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(context, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(context, dim, vb.pp("to_v"))?,
            to_out: Dense::new(dim, dim, vb.pp("to_out.0"))?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `[b, n, heads·d]` → `[b·heads, n, d]`, contiguous.
    fn split(&self, xs: Tensor) -> Result<Tensor> {
        let (b, n, dim) = xs.dims3()?;
        xs.reshape((b, n, self.heads, dim / self.heads))?
            .transpose(1, 2)?
            .reshape((b * self.heads, n, dim / self.heads))
    }

    /// Attention of `xs` over `context` (itself when `None`), plus `residual`.
    fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, n, dim) = xs.dims3()?;
        let context = context.unwrap_or(xs);
        #[cfg(feature = "cuda")]
        if crate::cuda::fused_attention(xs, dim / self.heads) {
            // The projections through cuBLASLt, as every linear layer of the network on CUDA.
            let project =
                |layer: &Linear, xs: &Tensor| crate::cuda::linear(xs, layer.weight(), None, None);
            let out = crate::cuda::attention(
                &project(&self.to_q, xs)?,
                &project(&self.to_k, context)?,
                &project(&self.to_v, context)?,
                self.heads,
                self.scale,
            )?;
            return self.to_out.forward_add(&out, residual);
        }
        let q = self.split((self.to_q.forward(xs)? * self.scale)?)?;
        let k = self.split(self.to_k.forward(context)?)?;
        let v = self.split(self.to_v.forward(context)?)?;
        let out = attend(&q, &k, &v)?
            .reshape((b, self.heads, n, dim / self.heads))?
            .transpose(1, 2)?
            .reshape((b, n, dim))?;
        self.to_out.forward_add(&out, residual)
    }
}

/// Most score elements one product may hold: candle's kernels and cuBLAS index with 32 bits,
/// and a batch of 16 guided images at 512×512 would have 2³² scores.
pub(crate) const MAX_SCORES: usize = 1 << 30;

/// `softmax(q·kᵀ)·v` over `[rows, n, d]` (q already scaled), in slices of rows small enough
/// that no score tensor exceeds [`MAX_SCORES`].
fn attend(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (rows, n, _) = q.dims3()?;
    let m = k.dim(1)?;
    let per_slice = (MAX_SCORES / (n * m).max(1)).max(1);
    let kt = k.t()?.contiguous()?;
    let mut outs = Vec::with_capacity(rows.div_ceil(per_slice));
    for start in (0..rows).step_by(per_slice) {
        let len = per_slice.min(rows - start);
        let scores = q
            .narrow(0, start, len)?
            .matmul(&kt.narrow(0, start, len)?)?;
        let probs = crate::layers::softmax_last_dim(&scores)?;
        outs.push(probs.matmul(&v.narrow(0, start, len)?)?);
    }
    if outs.len() == 1 {
        Ok(outs.remove(0))
    } else {
        Tensor::cat(&outs, 0)
    }
}

/// GEGLU feed-forward: `proj` to twice the inner width, `value · GELU(gate)`, back down.
struct FeedForward {
    proj: Dense,
    out: Dense,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj: Dense::new(dim, inner * 2, vb.pp("net.0.proj"))?,
            out: Dense::new(inner, dim, vb.pp("net.2"))?,
        })
    }

    /// `ff(xs) + residual`.
    fn forward(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let hidden = crate::layers::geglu(&self.proj.forward(xs)?)?;
        self.out.forward_add(&hidden, residual)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl TransformerBlock {
    fn new(vb: VarBuilder, dim: usize, context: usize, heads: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, dim, heads)?,
            norm2: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, context, heads)?,
            norm3: layer_norm(dim, LAYER_NORM_EPS, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = self
            .attn1
            .forward(&row_norm(&self.norm1, xs)?, None, Some(xs))?;
        let xs = self
            .attn2
            .forward(&row_norm(&self.norm2, &xs)?, Some(context), Some(&xs))?;
        self.ff.forward(&row_norm(&self.norm3, &xs)?, Some(&xs))
    }
}

/// A 1×1 convolution or a linear layer, as `use_linear_projection` says.
enum Projection {
    Conv(Conv),
    Linear(Dense),
}

/// diffusers' `Transformer2DModel`: Norm, projection in, transformer blocks over the
/// pixels as a sequence, projection out, residual.
struct SpatialTransformer {
    norm: Norm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl SpatialTransformer {
    fn new(
        vb: VarBuilder,
        c: &UNetConfig,
        channels: usize,
        heads: usize,
        layers: usize,
    ) -> Result<Self> {
        let projection = |name: &str| -> Result<Projection> {
            Ok(if c.use_linear_projection {
                Projection::Linear(Dense::new(channels, channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv(vb.pp(name), channels, channels, 1, 1)?)
            })
        };
        Ok(SpatialTransformer {
            norm: Norm::new(
                c.norm_num_groups,
                channels,
                TRANSFORMER_NORM_EPS,
                vb.pp("norm"),
            )?,
            proj_in: projection("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::new(
                        vb.pp(format!("transformer_blocks.{i}")),
                        channels,
                        c.cross_attention_dim,
                        heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: projection("proj_out")?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, layout: Channels) -> Result<Tensor> {
        if layout == Channels::Last {
            // The map is already the rows `[b, h·w, c]`: no transposes.
            let (b, h, w, ch) = xs.dims4()?;
            let rows = xs.reshape((b, h * w, ch))?;
            let normed = self
                .norm
                .apply(xs, false, layout)?
                .reshape((b, h * w, ch))?;
            let mut seq = match &self.proj_in {
                Projection::Conv(conv) => conv.forward_rows(&normed, None)?,
                Projection::Linear(linear) => linear.forward(&normed)?,
            };
            for block in &self.blocks {
                seq = block.forward(&seq, context)?;
            }
            let out = match &self.proj_out {
                Projection::Conv(conv) => conv.forward_rows(&seq, Some(&rows))?,
                Projection::Linear(linear) => linear.forward_add(&seq, Some(&rows))?,
            };
            return out.reshape((b, h, w, ch));
        }
        let (b, ch, h, w) = xs.dims4()?;
        let to_sequence = |t: &Tensor| -> Result<Tensor> {
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, t.dim(1)?))
        };
        let normed = self.norm.forward(xs)?;
        let mut seq = match &self.proj_in {
            Projection::Conv(conv) => to_sequence(&conv.forward(&normed)?)?,
            Projection::Linear(linear) => linear.forward(&to_sequence(&normed)?)?,
        };
        for block in &self.blocks {
            seq = block.forward(&seq, context)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_with(&to_image(&seq)?, Some(xs), None),
            Projection::Linear(linear) => to_image(&linear.forward(&seq)?)? + xs,
        }
    }
}

/// One level of the encoder or decoder: ResNet blocks, each optionally followed by a
/// spatial transformer.
struct Level {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<SpatialTransformer>,
}

impl Level {
    fn step(
        &self,
        i: usize,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ch: Channels,
    ) -> Result<Tensor> {
        let xs = self.resnets[i].forward(xs, temb, ch)?;
        match self.attentions.get(i) {
            Some(attention) => attention.forward(&xs, context, ch),
            None => Ok(xs),
        }
    }
}

struct DownLevel {
    level: Level,
    downsample: Option<Conv>,
}

struct UpLevel {
    level: Level,
    upsample: Option<Conv>,
}

struct MidBlock {
    first: ResnetBlock,
    attention: SpatialTransformer,
    second: ResnetBlock,
}

/// SDXL's extra conditioning: pooled text features and the size/crop ids.
struct AddedEmbedding {
    time_dim: usize,
    embedding: TimestepEmbedding,
}

/// Per-image extra conditioning for SDXL-style UNets.
pub struct AddedConditions<'a> {
    /// Pooled, projected text features, `[b, pooled]`.
    pub text_embeds: &'a Tensor,
    /// Original size, crop corner and target size, `[b, 6]`.
    pub time_ids: &'a Tensor,
}

pub struct UNet {
    conv_in: Conv,
    time_embedding: TimestepEmbedding,
    added: Option<AddedEmbedding>,
    down: Vec<DownLevel>,
    mid: MidBlock,
    up: Vec<UpLevel>,
    norm_out: Norm,
    conv_out: Conv,
    block0: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    center_input_sample: bool,
    /// The body's recordings, by input shape (CUDA).
    #[cfg(feature = "cuda")]
    graphs: crate::cuda::Graphs,
}

impl UNet {
    pub fn new(vb: VarBuilder, c: &UNetConfig) -> Result<Self> {
        let channels: Vec<usize> = c.blocks.iter().map(|b| b.channels).collect();
        let n = channels.len();
        let temb = c.time_embed_dim();
        let added = match &c.addition {
            None => None,
            Some(a) => Some(AddedEmbedding {
                time_dim: a.time_embed_dim,
                embedding: TimestepEmbedding::new(vb.pp("add_embedding"), a.input_dim, temb)?,
            }),
        };

        let mut down = Vec::with_capacity(n);
        let mut cout = channels[0];
        for (i, block) in c.blocks.iter().enumerate() {
            let cin = cout;
            cout = block.channels;
            let vb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let input = if j == 0 { cin } else { cout };
                    ResnetBlock::new(vb.pp(format!("resnets.{j}")), c, input, cout, 1.0)
                })
                .collect::<Result<_>>()?;
            let attentions = match block.down_attention {
                false => Vec::new(),
                true => (0..c.layers_per_block)
                    .map(|j| {
                        SpatialTransformer::new(
                            vb.pp(format!("attentions.{j}")),
                            c,
                            cout,
                            block.heads,
                            block.transformer_layers,
                        )
                    })
                    .collect::<Result<_>>()?,
            };
            let downsample = (i + 1 < n)
                .then(|| {
                    Conv::new(
                        vb.pp("downsamplers.0.conv"),
                        cout,
                        cout,
                        3,
                        2,
                        c.downsample_padding,
                    )
                })
                .transpose()?;
            down.push(DownLevel {
                level: Level {
                    resnets,
                    attentions,
                },
                downsample,
            });
        }

        let last = &c.blocks[n - 1];
        let vb_mid = vb.pp("mid_block");
        let scale = c.mid_block_scale_factor;
        let mid = MidBlock {
            first: ResnetBlock::new(
                vb_mid.pp("resnets.0"),
                c,
                last.channels,
                last.channels,
                scale,
            )?,
            attention: SpatialTransformer::new(
                vb_mid.pp("attentions.0"),
                c,
                last.channels,
                last.heads,
                last.transformer_layers,
            )?,
            second: ResnetBlock::new(
                vb_mid.pp("resnets.1"),
                c,
                last.channels,
                last.channels,
                scale,
            )?,
        };

        let mut up = Vec::with_capacity(n);
        let mut prev_out = last.channels;
        for i in 0..n {
            let level = n - 1 - i;
            let block = &c.blocks[level];
            let cout = block.channels;
            let skip_in = channels[level.saturating_sub(1)];
            let vb = vb.pp(format!("up_blocks.{i}"));
            let count = c.layers_per_block + 1;
            let resnets = (0..count)
                .map(|j| {
                    let skip = if j == count - 1 { skip_in } else { cout };
                    let input = if j == 0 { prev_out } else { cout };
                    ResnetBlock::new(vb.pp(format!("resnets.{j}")), c, input + skip, cout, 1.0)
                })
                .collect::<Result<_>>()?;
            let attentions = match block.up_attention {
                false => Vec::new(),
                true => (0..count)
                    .map(|j| {
                        SpatialTransformer::new(
                            vb.pp(format!("attentions.{j}")),
                            c,
                            cout,
                            block.heads,
                            block.up_transformer_layers,
                        )
                    })
                    .collect::<Result<_>>()?,
            };
            let upsample = (i + 1 < n)
                .then(|| conv(vb.pp("upsamplers.0.conv"), cout, cout, 3, 1))
                .transpose()?;
            up.push(UpLevel {
                level: Level {
                    resnets,
                    attentions,
                },
                upsample,
            });
            prev_out = cout;
        }

        Ok(UNet {
            conv_in: conv(vb.pp("conv_in"), c.in_channels, channels[0], 3, 1)?,
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], temb)?,
            added,
            down,
            mid,
            up,
            norm_out: Norm::new(
                c.norm_num_groups,
                channels[0],
                c.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv(vb.pp("conv_out"), channels[0], c.out_channels, 3, 1)?,
            block0: channels[0],
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            center_input_sample: c.center_input_sample,
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// The model's output (noise, or v) for `xs` (`[b, c, h, w]`) at `timestep`, attending
    /// to `context` (`[b, tokens, cross_attention_dim]`): one step on its own (a denoising
    /// run embeds its steps' times at once, [`UNet::embed_times`]).
    #[cfg(all(test, feature = "cuda"))]
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<AddedConditions>,
    ) -> Result<Tensor> {
        let temb = self.embed_times(&[timestep], xs.dtype(), xs.device(), added)?;
        self.forward_embedded(xs, &temb.get(0)?, context)
    }

    /// [`UNet::forward`] with the time embedding of the step given, one row of what
    /// [`UNet::embed_times`] made.
    pub fn forward_embedded(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        let xs = if self.center_input_sample {
            ((xs * 2.0)? - 1.0)?
        } else {
            xs.clone()
        };
        #[cfg(feature = "cuda")]
        if crate::cuda::accelerated(&xs) {
            return self.graphs.run(&[&xs, temb, context], |inputs| {
                self.body(inputs[0], inputs[1], inputs[2])
            });
        }
        self.body(&xs, temb, context)
    }

    /// The time embeddings of `timesteps` at once, `[steps, rows, time_embed_dim]` in
    /// `dtype` on `device` (rows: 1, or the rows of SDXL's pooled text and size
    /// conditioning, added in). A denoising run makes them before its first step, so that
    /// no step uploads anything from the host: an upload from ordinary host memory may wait
    /// for the GPU, and the host could then no longer queue a step while the last one runs.
    pub fn embed_times(
        &self,
        timesteps: &[f64],
        dtype: DType,
        device: &Device,
        added: Option<AddedConditions>,
    ) -> Result<Tensor> {
        let steps: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(steps, timesteps.len(), device)?;
        let t = sinusoidal(&t, self.block0, self.flip_sin_to_cos, self.freq_shift)?;
        let temb = self
            .time_embedding
            .forward(&t.to_dtype(dtype)?)?
            .unsqueeze(1)?;
        match (&self.added, added) {
            (Some(embedding), Some(added)) => {
                let (b, ids) = added.time_ids.dims2()?;
                let times = sinusoidal(
                    &added.time_ids.flatten_all()?,
                    embedding.time_dim,
                    self.flip_sin_to_cos,
                    self.freq_shift,
                )?
                .reshape((b, ids * embedding.time_dim))?;
                let input = Tensor::cat(&[added.text_embeds.to_dtype(DType::F32)?, times], 1)?;
                let aug = embedding.embedding.forward(&input.to_dtype(dtype)?)?;
                temb.broadcast_add(&aug.unsqueeze(0)?)?.contiguous()
            }
            (Some(_), None) => Err(candle_core::Error::Msg(
                "this UNet needs pooled text features and size ids".into(),
            )),
            (None, _) => Ok(temb),
        }
    }

    /// The network from the first convolution to the last, on the (centred) input, the
    /// time embedding and the text: everything a denoising step runs that depends on no
    /// value on the host, so that on CUDA it can be recorded once and replayed.
    fn body(&self, xs: &Tensor, temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Channels-last on CUDA, from the first convolution to the last.
        let ch = Channels::for_input(xs);
        let mut xs = self.conv_in.apply(&ch.of_nchw(xs)?, None, None, ch)?;
        let mut skips = vec![xs.clone()];
        for down in &self.down {
            for i in 0..down.level.resnets.len() {
                xs = down.level.step(i, &xs, temb, context, ch)?;
                skips.push(xs.clone());
            }
            if let Some(conv) = &down.downsample {
                xs = conv.apply(&xs, None, None, ch)?;
                skips.push(xs.clone());
            }
        }

        xs = self.mid.first.forward(&xs, temb, ch)?;
        xs = self.mid.attention.forward(&xs, context, ch)?;
        xs = self.mid.second.forward(&xs, temb, ch)?;

        for up in &self.up {
            for i in 0..up.level.resnets.len() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("UNet skip connections ran out".into())
                })?;
                xs = ch.cat(&[&xs, &skip])?;
                xs = up.level.step(i, &xs, temb, context, ch)?;
            }
            if let Some(conv) = &up.upsample {
                // Up to the size of the next skip connection, which odd sizes make
                // other than exactly twice.
                let (h, w) = match skips.last() {
                    Some(next) => ch.size(next)?,
                    None => {
                        let (h, w) = ch.size(&xs)?;
                        (h * 2, w * 2)
                    }
                };
                xs = conv.apply(&ch.upsample_nearest(&xs, h, w)?, None, None, ch)?;
            }
        }

        let xs = self.norm_out.apply(&xs, true, ch)?;
        ch.to_nchw(&self.conv_out.apply(&xs, None, None, ch)?)
    }
}

#[cfg(all(test, feature = "cuda"))]
impl UNet {
    /// The pass without recordings.
    pub(crate) fn forward_eager_for_tests(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
    ) -> Result<Tensor> {
        let temb = self.embed_times(&[timestep], xs.dtype(), xs.device(), None)?;
        self.body(xs, &temb.get(0)?, context)
    }

    /// How many input shapes have a recording, and why those refused have none.
    pub(crate) fn recorded_for_tests(&self) -> (usize, Vec<String>) {
        self.graphs.recorded()
    }
}

impl UNetConfig {
    /// Floating-point operations (2 per multiply-add) of one forward pass on `rows` latents of
    /// `h`×`w`, attending to `tokens` text tokens: convolutions, linear layers and the two
    /// attention products, following the same structure as [`UNet::new`]. Norms, activations
    /// and softmax (a few percent) are not counted.
    pub fn flops(&self, rows: usize, h: usize, w: usize, tokens: usize) -> f64 {
        let conv = |cin: usize, cout: usize, k: usize, h: usize, w: usize| {
            2.0 * (cin * cout * k * k * h * w) as f64
        };
        let resnet = |cin: usize, cout: usize, h: usize, w: usize| {
            let shortcut = if cin == cout {
                0.0
            } else {
                conv(cin, cout, 1, h, w)
            };
            conv(cin, cout, 3, h, w) + conv(cout, cout, 3, h, w) + shortcut
        };
        let ctx = self.cross_attention_dim;
        let transformer = |c: usize, layers: usize, h: usize, w: usize| {
            let n = (h * w) as f64;
            let (c, t) = (c as f64, tokens as f64);
            let block = 2.0 * 4.0 * c * c * n          // self-attention projections
                + 2.0 * 2.0 * n * n * c                // its scores and weighted sum
                + 2.0 * 2.0 * c * c * n                // cross-attention q and out
                + 2.0 * 2.0 * ctx as f64 * c * t       // its k and v
                + 2.0 * 2.0 * n * t * c                // its scores and weighted sum
                + 2.0 * (8.0 + 4.0) * c * c * n; // GEGLU feed-forward
            2.0 * 2.0 * c * c * n + layers as f64 * block
        };
        let mut sizes = vec![(h, w)];
        for _ in 1..self.blocks.len() {
            let (h, w) = sizes[sizes.len() - 1];
            sizes.push((h.div_ceil(2), w.div_ceil(2)));
        }
        let c0 = self.blocks[0].channels;
        let mut total = conv(self.in_channels, c0, 3, h, w) + conv(c0, self.out_channels, 3, h, w);
        let mut skips = vec![c0];
        let mut cout = c0;
        for (level, block) in self.blocks.iter().enumerate() {
            let (lh, lw) = sizes[level];
            for j in 0..self.layers_per_block {
                let cin = if j == 0 { cout } else { block.channels };
                total += resnet(cin, block.channels, lh, lw);
                if block.down_attention {
                    total += transformer(block.channels, block.transformer_layers, lh, lw);
                }
                skips.push(block.channels);
            }
            cout = block.channels;
            if level + 1 < self.blocks.len() {
                let (nh, nw) = sizes[level + 1];
                total += conv(cout, cout, 3, nh, nw);
                skips.push(cout);
            }
        }
        let last = &self.blocks[self.blocks.len() - 1];
        let (mh, mw) = sizes[self.blocks.len() - 1];
        total += 2.0 * resnet(last.channels, last.channels, mh, mw)
            + transformer(last.channels, last.transformer_layers, mh, mw);
        let mut prev = last.channels;
        for level in (0..self.blocks.len()).rev() {
            let block = &self.blocks[level];
            let (lh, lw) = sizes[level];
            for _ in 0..=self.layers_per_block {
                let skip = skips.pop().unwrap_or(0);
                total += resnet(prev + skip, block.channels, lh, lw);
                if block.up_attention {
                    total += transformer(block.channels, block.up_transformer_layers, lh, lw);
                }
                prev = block.channels;
            }
            if level > 0 {
                let (uh, uw) = sizes[level - 1];
                total += conv(prev, prev, 3, uh, uw);
            }
        }
        total * rows as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sinusoidal_embedding_matches_the_formula() {
        let t = Tensor::new(&[0f32, 981.0], &Device::Cpu).expect("t");
        let emb = sinusoidal(&t, 8, true, 1.0).expect("emb");
        let rows = emb.to_vec2::<f32>().expect("rows");
        // flip_sin_to_cos: cosines first. At t = 0: cos = 1, sin = 0.
        assert_eq!(rows[0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        for i in 0..4 {
            let freq = (-(10000f64.ln()) * i as f64 / 3.0).exp();
            let arg = 981.0 * freq;
            assert!((f64::from(rows[1][i]) - arg.cos()).abs() < 1e-3, "cos {i}");
            assert!(
                (f64::from(rows[1][4 + i]) - arg.sin()).abs() < 1e-3,
                "sin {i}"
            );
        }
    }

    #[test]
    fn sd15_unet_costs_what_is_published() {
        // SD 1.5's UNet at 512x512 (64x64 latents), one sample: about 0.8 TFLOP per call
        // (twice the ~400 GMAC usually quoted).
        let dir = tempfile::tempdir().expect("tempdir");
        let unet = dir.path().join("unet");
        std::fs::create_dir_all(&unet).expect("mkdir");
        let config = serde_json::json!({
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                 "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                               "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
        });
        std::fs::write(unet.join("config.json"), config.to_string()).expect("write");
        let config = UNetConfig::read(&unet).expect("config");
        let tflop = config.flops(1, 64, 64, 77) / 1e12;
        assert!((0.7..0.9).contains(&tflop), "{tflop}");
        assert!((config.flops(2, 64, 64, 77) / 1e12 - 2.0 * tflop).abs() < 1e-9);
    }
}
