//! CLIP's byte-pair vocabulary. It ships (MIT, see `assets/LICENSE-open-clip.txt`) as the
//! merge list `bpe_simple_vocab_16e6.txt.gz`; the token table follows from it the way CLIP
//! builds it: the 256 byte symbols, the same with the end-of-word mark, one token per
//! merge, then the start and end tokens.

use crate::EngineError;
use std::io::Read;

const MERGES_GZ: &[u8] = include_bytes!("../assets/bpe_simple_vocab_16e6.txt.gz");
/// How errors name the bundled file.
const MERGES_NAME: &str = "assets/bpe_simple_vocab_16e6.txt.gz";
/// CLIP uses the first 49152 - 256 - 2 merges.
const MERGE_COUNT: usize = 49152 - 256 - 2;

/// The 256 bytes in CLIP's order: the printable ones first, then the rest.
fn byte_order() -> Vec<u8> {
    let mut order: Vec<u8> = (0..=255u8).filter(|&b| printable(b)).collect();
    order.extend((0..=255u8).filter(|&b| !printable(b)));
    order
}

fn printable(b: u8) -> bool {
    matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// The printable character that stands for each byte (indexed by byte) in BPE symbols:
/// printable bytes stand for themselves, the others for 256, 257, … in byte order.
pub fn byte_symbols() -> Vec<char> {
    let mut symbols = vec!['\0'; 256];
    let mut extra = 0u32;
    for b in byte_order() {
        symbols[b as usize] = if printable(b) {
            char::from(b)
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap_or('?')
        };
    }
    symbols
}

/// The merges, in rank order, as pairs of symbols.
pub fn merges() -> Result<Vec<(String, String)>, EngineError> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(MERGES_GZ)
        .read_to_string(&mut text)
        .map_err(|e| EngineError::invalid_model(MERGES_NAME, e.to_string()))?;
    text.lines()
        .skip(1)
        .take(MERGE_COUNT)
        .map(|line| {
            line.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    EngineError::invalid_model(MERGES_NAME, format!("bad merge line {line:?}"))
                })
        })
        .collect()
}

/// The token table (index = token id), 49408 entries.
pub fn tokens(merges: &[(String, String)]) -> Vec<String> {
    let symbols = byte_symbols();
    let ordered: Vec<char> = byte_order()
        .into_iter()
        .map(|b| symbols[b as usize])
        .collect();
    let mut tokens: Vec<String> = ordered.iter().map(|c| c.to_string()).collect();
    tokens.extend(ordered.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    tokens
}

/// diffusers' `tokenizer/vocab.json` and `tokenizer/merges.txt` contents.
pub fn diffusers_files() -> Result<(String, String), EngineError> {
    let merges = merges()?;
    let vocab: serde_json::Map<String, serde_json::Value> = tokens(&merges)
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, serde_json::Value::from(id)))
        .collect();
    let vocab = serde_json::to_string(&vocab)
        .map_err(|e| EngineError::invalid_model("tokenizer/vocab.json", e.to_string()))?;
    let mut merges_txt = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        merges_txt.push_str(a);
        merges_txt.push(' ');
        merges_txt.push_str(b);
        merges_txt.push('\n');
    }
    Ok((vocab, merges_txt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_table_is_clips() {
        let merges = merges().expect("merges");
        assert_eq!(merges.len(), MERGE_COUNT);
        let tokens = tokens(&merges);
        assert_eq!(tokens.len(), 49408);
        assert_eq!((tokens[0].as_str(), tokens[256].as_str()), ("!", "!</w>"));
        assert_eq!(tokens[320], "a</w>");
        assert_eq!(tokens[49406], "<|startoftext|>");
        assert_eq!(tokens[49407], "<|endoftext|>");
        let symbols = byte_symbols();
        assert_eq!((symbols[b' ' as usize], symbols[b'a' as usize]), ('Ġ', 'a'));
    }

    #[test]
    fn diffusers_files_have_every_token_and_merge() {
        let (vocab, merges_txt) = diffusers_files().expect("files");
        assert!(merges_txt.starts_with("#version: 0.2\n"));
        assert_eq!(merges_txt.lines().count(), MERGE_COUNT + 1);
        let vocab: std::collections::HashMap<String, u32> =
            serde_json::from_str(&vocab).expect("json");
        assert_eq!(vocab.len(), 49408);
        assert_eq!(vocab.get("<|endoftext|>"), Some(&49407));
    }
}
