//! CLIP's text encoder (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection`
//! for SDXL's second encoder), batched properly: the causal mask is shaped
//! `[1, 1, seq, seq]` so it broadcasts over batch and heads alike.

use crate::config::ClipConfig;
use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Attention {
            q: linear(h, h, vb.pp("q_proj"))?,
            k: linear(h, h, vb.pp("k_proj"))?,
            v: linear(h, h, vb.pp("v_proj"))?,
            out: linear(h, h, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let split = |t: Tensor| {
            t.reshape((b, s, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let q = split((self.q.forward(xs)? * scale)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        self.out.forward(&out)
    }
}

struct Layer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    quick_gelu: bool,
}

impl Layer {
    fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Layer {
            norm1: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            norm2: layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: linear(c.intermediate_size, h, vb.pp("mlp.fc2"))?,
            quick_gelu: c.quick_gelu,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?, mask)?)?;
        let hidden = self.fc1.forward(&self.norm2.forward(&xs)?)?;
        let hidden = if self.quick_gelu {
            (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?
        } else {
            hidden.gelu_erf()?
        };
        xs + self.fc2.forward(&hidden)?
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    /// `text_projection` of the with-projection variant (no bias).
    projection: Option<Linear>,
}

/// What one run of the encoder gives.
pub struct ClipOutput {
    /// The output of the last layer but one (SDXL's features), `[batch, seq, hidden]`.
    pub penultimate: Tensor,
    /// The last layer's output after the final LayerNorm, `[batch, seq, hidden]`.
    pub last: Tensor,
}

impl ClipTextModel {
    pub fn new(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let layers = (0..c.num_hidden_layers)
            .map(|i| Layer::new(vb.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<_>>()?;
        Ok(ClipTextModel {
            token_embedding: embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_norm: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?,
            projection: None,
        })
    }

    /// `CLIPTextModelWithProjection`: the same encoder and a projection of the pooled
    /// features to `projection_dim`.
    pub fn with_projection(vb: VarBuilder, c: &ClipConfig) -> Result<Self> {
        let mut model = Self::new(vb.clone(), c)?;
        model.projection = Some(linear_no_bias(
            c.hidden_size,
            c.projection_dim,
            vb.pp("text_projection"),
        )?);
        Ok(model)
    }

    /// `[batch, seq]` token ids → `[batch, seq, hidden]` last hidden state.
    #[cfg(test)]
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.run(ids, None)?.last)
    }

    /// The pooled features: each row of `last` at the position of its first end-of-text
    /// token (`eos[row]`), projected when the model has a projection. `[batch, dim]`.
    pub fn pooled(&self, last: &Tensor, eos: &[usize]) -> Result<Tensor> {
        let rows = eos
            .iter()
            .enumerate()
            .map(|(row, &at)| last.i((row, at)))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&rows, 0)?;
        match &self.projection {
            Some(projection) => projection.forward(&pooled),
            None => Ok(pooled),
        }
    }

    /// Ids in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.token_embedding.embeddings().dims()[0]
    }

    /// Runs every layer, keeping the penultimate layer's output too; ids past the
    /// vocabulary select rows of `extra` (textual-inversion vectors).
    pub fn run(&self, ids: &Tensor, extra: Option<&Tensor>) -> Result<ClipOutput> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let tokens = match extra {
            None => self.token_embedding.forward(ids)?,
            Some(extra) => {
                crate::embeddings::token_rows(self.token_embedding.embeddings(), Some(extra), ids)?
            }
        };
        let xs = tokens.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq, xs.dtype(), ids.device())?;
        let mut xs = xs;
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            penultimate = xs;
            xs = layer.forward(&penultimate, &mask)?;
        }
        Ok(ClipOutput {
            penultimate,
            last: self.final_norm.forward(&xs)?,
        })
    }
}

fn causal_mask(seq: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| (0..seq).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (1, 1, seq, seq), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn model() -> ClipTextModel {
        let config = ClipConfig {
            vocab_size: 100,
            hidden_size: 16,
            intermediate_size: 24,
            num_attention_heads: 4,
            num_hidden_layers: 2,
            max_position_embeddings: 77,
            projection_dim: 16,
            quick_gelu: true,
            layer_norm_eps: 1e-5,
        };
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        ClipTextModel::new(vb, &config).expect("model")
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).expect("ids")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar())
            .expect("diff")
    }

    #[test]
    fn a_batch_encodes_each_row_as_alone() {
        let m = model();
        let (a, b): (&[u32], &[u32]) = (&[1, 5, 9, 2, 2], &[1, 7, 3, 8, 2]);
        let both = m.forward(&ids(&[a, b])).expect("batch");
        assert_eq!(both.dims(), &[2, 5, 16]);
        for (i, row) in [a, b].into_iter().enumerate() {
            let alone = m.forward(&ids(&[row])).expect("alone");
            let diff = max_diff(&both.i(i..i + 1).expect("row"), &alone);
            assert!(diff < 1e-5, "row {i}: {diff}");
        }
    }

    #[test]
    fn a_token_only_affects_the_positions_after_it() {
        let m = model();
        let before = m.forward(&ids(&[&[1, 5, 9, 2, 2]])).expect("before");
        let after = m.forward(&ids(&[&[1, 5, 9, 4, 2]])).expect("after");
        let prefix = |t: &Tensor| t.narrow(1, 0, 3).expect("prefix");
        assert!(max_diff(&prefix(&before), &prefix(&after)) == 0.0);
        assert!(max_diff(&before, &after) > 1e-3);
    }
}
