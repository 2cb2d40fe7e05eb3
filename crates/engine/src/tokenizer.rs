//! CLIP's tokenizer: white-space clean-up, lower case, CLIP's pre-tokenization pattern,
//! bytes mapped to printable symbols, byte-pair merges by rank, and `</w>` on the last
//! symbol of each word. Reads diffusers' `tokenizer/vocab.json` and `tokenizer/merges.txt`.

use crate::vocab::byte_symbols;
use crate::EngineError;
use regex::Regex;
use std::collections::HashMap;
use std::path::Path;

/// CLIP's context length: start token, up to 75 text tokens, end token, padding.
pub const MAX_TOKENS: usize = 77;

const START: &str = "<|startoftext|>";
const END: &str = "<|endoftext|>";
const PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

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
    /// `dir/special_tokens_map.json` or `dir/tokenizer_config.json` (default: end of text,
    /// as Stable Diffusion 1.x; 2.x pads with `!`).
    pub fn load(dir: &Path) -> Result<Self, EngineError> {
        let vocab_path = dir.join("vocab.json");
        let vocab: HashMap<String, u32> = serde_json::from_str(&read(&vocab_path)?)
            .map_err(|e| EngineError::invalid_model(&vocab_path, e.to_string()))?;
        let merges_path = dir.join("merges.txt");
        let merges = read(&merges_path)?
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.starts_with("#version") && !l.trim().is_empty())
            .map(|(n, l)| {
                l.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        EngineError::invalid_model(
                            &merges_path,
                            format!("line {} is not a pair of symbols", n + 1),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pad = pad_token(dir)?;
        Self::new(vocab, merges, pad.as_deref(), &vocab_path)
    }

    /// CLIP's own tokenizer from the bundled vocabulary (what every Stable Diffusion text
    /// encoder uses), padding with `pad` (default: end of text); `source` names it in errors.
    pub fn bundled(pad: Option<&str>, source: &Path) -> Result<Self, EngineError> {
        let merges = crate::vocab::merges()?;
        let vocab = crate::vocab::tokens(&merges)
            .into_iter()
            .zip(0u32..)
            .collect();
        Self::new(vocab, merges, pad, source)
    }

    /// A tokenizer from a token table and a merge list; `source` names them in errors.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: Option<&str>,
        source: &Path,
    ) -> Result<Self, EngineError> {
        let special = |name: &str| {
            vocab
                .get(name)
                .copied()
                .ok_or_else(|| EngineError::invalid_model(source, format!("has no {name:?} token")))
        };
        let bos = special(START)?;
        let eos = special(END)?;
        let pad = match pad {
            None => eos,
            Some(p) => special(p)?,
        };
        let pattern = Regex::new(PATTERN)
            .map_err(|e| EngineError::invalid_model(source, format!("tokenizer pattern: {e}")))?;
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

    /// Token ids of `text`, without start/end tokens, untruncated. A piece missing from the
    /// vocabulary (impossible with CLIP's, which holds every byte) becomes the unknown
    /// token, end of text, as transformers does.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        let mut ids = Vec::new();
        for word in self.pattern.find_iter(&cleaned) {
            match word.as_str() {
                START => ids.push(self.bos),
                END => ids.push(self.eos),
                word => {
                    let symbols: String = word.bytes().map(|b| self.bytes[b as usize]).collect();
                    ids.extend(
                        self.bpe(&symbols)
                            .iter()
                            .map(|piece| self.vocab.get(piece).copied().unwrap_or(self.eos)),
                    );
                }
            }
        }
        ids
    }

    /// Exactly [`MAX_TOKENS`] ids: start, the text (truncated), end, padding.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        ids.push(self.bos);
        ids.extend(self.encode(text).into_iter().take(MAX_TOKENS - 2));
        ids.push(self.eos);
        ids.resize(MAX_TOKENS, self.pad);
        ids
    }

    /// The start-of-text id.
    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// The id rows are padded with after their end token.
    pub fn pad(&self) -> u32 {
        self.pad
    }

    /// The end-of-text id: its first position in a row is where CLIP pools the row.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The largest token id the text encoder will see.
    pub fn max_id(&self) -> u32 {
        self.vocab.values().copied().max().unwrap_or(0)
    }

    /// Splits one word (already in byte symbols) into vocabulary pieces: repeatedly merge
    /// every occurrence of the adjacent pair with the lowest rank until none is left.
    fn bpe(&self, word: &str) -> Vec<String> {
        let chars: Vec<char> = word.chars().collect();
        let Some((last, rest)) = chars.split_last() else {
            return Vec::new();
        };
        let mut parts: Vec<String> = rest.iter().map(char::to_string).collect();
        parts.push(format!("{last}</w>"));
        let rank = |a: &str, b: &str| self.ranks.get(&(a.to_string(), b.to_string())).copied();
        while parts.len() > 1 {
            let best = parts.windows(2).filter_map(|w| rank(&w[0], &w[1])).min();
            let Some(best) = best else { break };
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len() && rank(&parts[i], &parts[i + 1]) == Some(best) {
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

/// The pad token named by `special_tokens_map.json` or `tokenizer_config.json`, either as a
/// string or as transformers' `{"content": …}` object.
fn pad_token(dir: &Path) -> Result<Option<String>, EngineError> {
    for name in ["special_tokens_map.json", "tokenizer_config.json"] {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(&read(&path)?)
            .map_err(|e| EngineError::invalid_model(&path, e.to_string()))?;
        let pad = match value.get("pad_token") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()),
            _ => None,
        };
        if let Some(pad) = pad {
            return Ok(Some(pad.to_string()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(pad: Option<&str>) -> Tokenizer {
        Tokenizer::bundled(pad, Path::new("bundled")).expect("tokenizer")
    }

    #[test]
    fn encodes_like_clip() {
        // Expected ids from CLIP's reference tokenizer on the same vocabulary.
        let t = bundled(None);
        let cases: [(&str, &[u32]); 6] = [
            ("a photo of a cat", &[320, 1125, 539, 320, 2368]),
            ("  A   Photo of a\tCAT \n", &[320, 1125, 539, 320, 2368]),
            (
                "a corgi, style of monet",
                &[320, 31320, 267, 1844, 539, 24499],
            ),
            (
                "I'M HERE, they'll've",
                &[328, 880, 763, 267, 889, 1342, 1200],
            ),
            (
                "supercalifragilisticexpialidocious",
                &[1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466],
            ),
            (
                "柴犬 🐕 don't",
                &[162, 253, 112, 163, 232, 361, 41069, 847, 713],
            ),
        ];
        for (text, ids) in cases {
            assert_eq!(t.encode(text), ids, "{text:?}");
        }
        assert_eq!(
            t.encode("Hello, World! It's 2024... e=mc^2 café naïve"),
            [
                3306, 267, 1002, 256, 585, 568, 273, 271, 273, 275, 678, 324, 284, 4126, 317, 273,
                15304, 1097, 35689, 563
            ]
        );
        assert_eq!(t.encode("a <|endoftext|>"), [320, 49407]);
    }

    #[test]
    fn pads_and_truncates_to_77() {
        let t = bundled(None);
        let ids = t.encode_padded("a photo of a cat");
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert!(ids[7..].iter().all(|&id| id == 49407));
        let long = t.encode_padded(&"cat ".repeat(200));
        assert_eq!(
            (long.len(), long[0], long[75], long[76]),
            (77, 49406, 2368, 49407)
        );
        // Stable Diffusion 2.x pads with "!" (id 0).
        let sd2 = bundled(Some("!")).encode_padded("a cat");
        assert_eq!(&sd2[..5], &[49406, 320, 2368, 49407, 0]);
        assert!(sd2[4..].iter().all(|&id| id == 0));
        assert_eq!(t.encode_padded(""), {
            let mut v = vec![49406, 49407];
            v.resize(77, 49407);
            v
        });
    }
}
