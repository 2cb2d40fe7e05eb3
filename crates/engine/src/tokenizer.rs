//! CLIP's tokenizer: clean-up, lower case, CLIP's pre-tokenization pattern, byte symbols,
//! byte-pair merges by rank, `</w>` on the last symbol of each word. Reads diffusers'
//! `tokenizer/vocab.json` and `tokenizer/merges.txt`.

use crate::vocab::byte_symbols;
use crate::EngineError;
use regex::Regex;
use std::collections::HashMap;
use std::path::Path;

pub const MAX_TOKENS: usize = 77;

pub struct Tokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    pattern: Regex,
    bytes: Vec<char>,
    bos: u32,
    eos: u32,
    pad: u32,
}

fn read(path: &Path) -> Result<String, EngineError> {
    std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))
}

impl Tokenizer {
    /// Loads `dir/vocab.json`, `dir/merges.txt`, and the pad token from
    /// `dir/special_tokens_map.json` or `dir/tokenizer_config.json` (default: end of text).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let vocab_path = dir.join("vocab.json");
        let vocab: HashMap<String, u32> = serde_json::from_str(&read(&vocab_path)?)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", vocab_path.display())))?;
        let merges_text = read(&dir.join("merges.txt"))?;
        let merges: Vec<(String, String)> = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .filter_map(|l| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let pad = pad_token(dir)?;
        Self::new(vocab, merges, pad.as_deref())
    }

    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: Option<&str>,
    ) -> Result<Self, EngineError> {
        let special = |name: &str| {
            vocab.get(name).copied().ok_or_else(|| {
                EngineError::InvalidModel(format!("tokenizer/vocab.json has no {name} token"))
            })
        };
        let bos = special("<|startoftext|>")?;
        let eos = special("<|endoftext|>")?;
        let pad = match pad {
            None => eos,
            Some(p) => special(p)?,
        };
        let pattern = Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| EngineError::InvalidModel(format!("tokenizer pattern: {e}")))?;
        let ranks = merges
            .into_iter()
            .enumerate()
            .map(|(rank, pair)| (pair, rank))
            .collect();
        Ok(Tokenizer {
            vocab,
            ranks,
            pattern,
            bytes: byte_symbols(),
            bos,
            eos,
            pad,
        })
    }

    /// Token ids of `text`, without start/end tokens, untruncated.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        let mut ids = Vec::new();
        for word in self.pattern.find_iter(&cleaned) {
            let symbols: String = word
                .as_str()
                .bytes()
                .map(|b| self.bytes[b as usize])
                .collect();
            for piece in self.bpe(&symbols) {
                if let Some(&id) = self.vocab.get(&piece) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Exactly 77 ids: start, the text (truncated), end, padding.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(self.bos);
        ids.extend(self.encode(text).into_iter().take(MAX_TOKENS - 2));
        ids.push(self.eos);
        ids.resize(MAX_TOKENS, self.pad);
        ids
    }

    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let Some((last, rest)) = chars.split_last() else {
            return Vec::new();
        };
        let mut parts: Vec<String> = rest.iter().map(|c| c.to_string()).collect();
        parts.push(format!("{last}</w>"));
        while parts.len() > 1 {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((rank, _)) = best else { break };
            // Merge every occurrence of the best pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len()
                    && self.ranks.get(&(parts[i].clone(), parts[i + 1].clone())) == Some(&rank)
                {
                    merged.push(format!("{}{}", parts[i], parts[i + 1]));
                    i += 2;
                } else {
                    merged.push(parts[i].clone());
                    i += 1;
                }
            }
            parts = merged;
        }
        parts
    }
}

fn pad_token(dir: &Path) -> Result<Option<String>, EngineError> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&read(&path)?)
            .map_err(|e| EngineError::InvalidModel(format!("{}: {e}", path.display())))?;
        match &value["pad_token"] {
            serde_json::Value::String(s) => return Ok(Some(s.clone())),
            serde_json::Value::Object(o) => {
                if let Some(s) = o.get("content").and_then(|c| c.as_str()) {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
pub(crate) fn bundled() -> Tokenizer {
    let merges = crate::vocab::merges().expect("bundled merges");
    let vocab = crate::vocab::tokens(&merges)
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    Tokenizer::new(vocab, merges, None).expect("tokenizer")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_clip() {
        let t = bundled();
        assert_eq!(
            t.encode("a photo of a cat"),
            vec![320, 1125, 539, 320, 2368]
        );
        assert_eq!(
            t.encode("  A   Photo of a CAT "),
            vec![320, 1125, 539, 320, 2368]
        );
        let corgi = t.encode("a corgi, style of monet");
        assert!(corgi.len() >= 6, "{corgi:?}");
        assert!(corgi.iter().all(|&id| id < 49406));
    }

    #[test]
    fn pads_and_truncates_to_77() {
        let t = bundled();
        let ids = t.encode_padded("a photo of a cat");
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&id| id == 49407));
        let long = t.encode_padded(&"cat ".repeat(200));
        assert_eq!((long.len(), long[0], long[76]), (77, 49406, 49407));
    }
}
