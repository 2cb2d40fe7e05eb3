//! Textual-inversion embeddings: learned token vectors a prompt uses by naming them, as the
//! web UIs do (the file `embeddings/NAME.safetensors` is used wherever `NAME` appears in a
//! prompt or a negative prompt, with the weight of the brackets around it).
//!
//! The formats people download, all `.safetensors` (pickled `.pt` files are never read):
//! - A1111's: `emb_params`, `[vectors, width]`;
//! - diffusers': one tensor named after its placeholder token, `[width]` or `[vectors, width]`;
//! - SDXL's: `clip_l` `[vectors, 768]` and `clip_g` `[vectors, 1280]`, one for each encoder.
//!
//! An embedding fits a model when it has a vector set for each of the model's text encoders
//! of that encoder's width; one that does not (another model family) is left out, and a
//! prompt naming it reads the name as text.
//!
//! In the encoder, each vector is a token of its own: the embedding's name, as tokenized, is
//! replaced by ids past the vocabulary whose rows are the learned vectors.

use crate::EngineError;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The most vectors one embedding may have (a chunk holds 75 tokens).
pub const MAX_VECTORS: usize = 75;

/// One embedding's vectors, one tensor `[vectors, width]` per text encoder (f32, host).
#[derive(Debug, Clone)]
pub struct TextualInversion {
    pub vectors: Vec<Tensor>,
}

impl TextualInversion {
    /// Reads an embedding file for a model whose text encoders have these widths; the
    /// reason it does not fit otherwise.
    pub fn read(file: &Path, widths: &[usize]) -> Result<TextualInversion, String> {
        let tensors = candle_core::safetensors::load(file, &Device::Cpu)
            .map_err(|e| format!("not a safetensors file of tensors: {e}"))?;
        let as_rows = |t: &Tensor| -> Result<Tensor, String> {
            let t = t.to_dtype(DType::F32).map_err(|e| e.to_string())?;
            match t.dims() {
                [width] => t.reshape((1, *width)).map_err(|e| e.to_string()),
                [_, _] => Ok(t),
                other => Err(format!("vectors of shape {other:?}")),
            }
        };
        let sets: Vec<Tensor> = match (
            tensors.get("clip_l"),
            tensors.get("clip_g"),
            tensors.get("emb_params"),
        ) {
            (Some(l), Some(g), _) => vec![as_rows(l)?, as_rows(g)?],
            (_, _, Some(params)) => vec![as_rows(params)?],
            _ if tensors.len() == 1 => {
                let only = tensors.values().next().ok_or("no tensors")?;
                vec![as_rows(only)?]
            }
            _ => {
                return Err(
                    "not a textual-inversion embedding (no emb_params, clip_l/clip_g or single token vector)"
                        .into(),
                )
            }
        };
        let have: Vec<usize> = sets.iter().map(|t| t.dims()[1]).collect();
        if have != widths {
            return Err(format!(
                "its vectors are {have:?} wide; this model's text encoders take {widths:?} (an embedding for another model family)"
            ));
        }
        let count = sets[0].dims()[0];
        if count == 0 || count > MAX_VECTORS || sets.iter().any(|t| t.dims()[0] != count) {
            return Err(format!(
                "it has {count} vectors; 1 to {MAX_VECTORS} are accepted, the same number for each encoder"
            ));
        }
        Ok(TextualInversion { vectors: sets })
    }

    pub fn count(&self) -> usize {
        self.vectors[0].dims()[0]
    }
}

/// The embeddings a model uses: each name's placeholder ids, and per encoder the rows those
/// ids select, past its vocabulary.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Name → (first placeholder offset past the vocabulary, vectors).
    pub names: Vec<(String, usize, usize)>,
    /// Per text encoder: `[all vectors, width]` in the model's dtype, on its device.
    pub rows: Vec<Tensor>,
}

impl Loaded {
    /// Puts `found` (name → embedding) in one table per encoder.
    pub fn new(
        mut found: Vec<(String, TextualInversion)>,
        encoders: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Loaded, EngineError> {
        found.sort_by(|a, b| a.0.cmp(&b.0));
        if found.is_empty() {
            return Ok(Loaded::default());
        }
        let mut names = Vec::with_capacity(found.len());
        let mut offset = 0;
        for (name, embedding) in &found {
            names.push((name.clone(), offset, embedding.count()));
            offset += embedding.count();
        }
        let rows = (0..encoders)
            .map(|e| {
                let sets: Vec<&Tensor> = found.iter().map(|(_, t)| &t.vectors[e]).collect();
                Tensor::cat(&sets, 0)?.to_dtype(dtype)?.to_device(device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Loaded { names, rows })
    }

    /// For a tokenizer whose vocabulary has `vocab` ids: each name's tokens, and the ids that
    /// replace them, longest names first.
    pub fn placeholders(
        &self,
        encode: impl Fn(&str) -> Vec<u32>,
        vocab: usize,
    ) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut all: Vec<(Vec<u32>, Vec<u32>)> = self
            .names
            .iter()
            .map(|(name, offset, count)| {
                let first = (vocab + offset) as u32;
                (encode(name), (first..first + *count as u32).collect())
            })
            .filter(|(tokens, _)| !tokens.is_empty())
            .collect();
        all.sort_by_key(|(tokens, _)| std::cmp::Reverse(tokens.len()));
        all
    }
}

/// Where a model's embeddings live: the `embeddings` directory beside it (beside the model's
/// directory or file).
pub fn beside(model: &Path) -> std::path::PathBuf {
    model
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("embeddings")
}

/// What [`scan`] finds: the embeddings that fit, by name, and those left out with why.
pub(crate) type Scanned = (Vec<(String, TextualInversion)>, Vec<(String, String)>);

/// Every `*.safetensors` file in `dir` that fits, by its file stem; and those left out,
/// with why.
pub(crate) fn scan(dir: &Path, widths: &[usize]) -> Result<Scanned, EngineError> {
    let entries = std::fs::read_dir(dir).map_err(|e| EngineError::io(dir, e))?;
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            continue;
        }
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if !is_embedding_name(name) {
            skipped.push((
                name.to_string(),
                "not a usable name (letters, digits, - and _ only)".into(),
            ));
            continue;
        }
        match TextualInversion::read(&path, widths) {
            Ok(embedding) => found.push((name.to_string(), embedding)),
            Err(why) => skipped.push((name.to_string(), why)),
        }
    }
    Ok((found, skipped))
}

/// A name a prompt can carry as a word: 1 to 64 letters, digits, `-` and `_`.
pub fn is_embedding_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '-' || c == '_')
}

/// `tokens` with every run that spells a name replaced by that name's placeholder ids.
pub(crate) fn substitute(tokens: Vec<u32>, placeholders: &[(Vec<u32>, Vec<u32>)]) -> Vec<u32> {
    if placeholders.is_empty() {
        return tokens;
    }
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    'scan: while i < tokens.len() {
        for (name, ids) in placeholders {
            if tokens[i..].starts_with(name) {
                out.extend_from_slice(ids);
                i += name.len();
                continue 'scan;
            }
        }
        out.push(tokens[i]);
        i += 1;
    }
    out
}

/// The token rows for `ids`: the vocabulary's, and `extra`'s for the ids past it — each
/// table looked up on its own, never the two joined into a copy of the vocabulary.
pub(crate) fn token_rows(
    table: &Tensor,
    extra: Option<&Tensor>,
    ids: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, s) = ids.dims2()?;
    let width = table.dim(1)?;
    let vocab = table.dim(0)? as u32;
    let flat = ids.flatten_all()?;
    let host: Vec<u32> = flat.to_vec1()?;
    let extra = match extra {
        Some(extra) if host.iter().any(|&id| id >= vocab) => extra,
        _ => return table.index_select(&flat, 0)?.reshape((b, s, width)),
    };
    let last = extra.dim(0)?.saturating_sub(1) as u32;
    let device = ids.device();
    let select = |rows: Vec<u32>| Tensor::from_vec(rows, host.len(), device);
    let base = table.index_select(
        &select(host.iter().map(|&id| id.min(vocab - 1)).collect())?,
        0,
    )?;
    let learned = extra.to_dtype(table.dtype())?.index_select(
        &select(
            host.iter()
                .map(|&id| id.saturating_sub(vocab).min(last))
                .collect(),
        )?,
        0,
    )?;
    let past: Vec<u8> = host.iter().map(|&id| u8::from(id >= vocab)).collect();
    Tensor::from_vec(past, (host.len(), 1), device)?
        .broadcast_as((host.len(), width))?
        .contiguous()?
        .where_cond(&learned, &base)?
        .reshape((b, s, width))
}

#[cfg(test)]
mod tests;
