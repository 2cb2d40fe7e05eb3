//! Prompts as the popular web UIs read them: attention weights in brackets, `BREAK`, and any
//! length, encoded 75 tokens at a time.
//!
//! - `(words)` weighs the words 1.1 times more, `[words]` 1.1 times less, `(words:1.3)` sets
//!   the factor; brackets nest and multiply; `\(`, `\)`, `\[`, `\]` and `\\` are the
//!   characters themselves; a bracket left open closes at the end; a `)` or `]` with none open
//!   is text.
//! - `BREAK` (a word of its own, in capitals) ends the chunk: what follows starts the next.
//! - The tokens are cut into chunks of 75; a chunk that fills up ends after its last comma
//!   when that comma is among its last 20 tokens, so a phrase is not split between chunks.
//!   Each chunk is encoded on its own (start token, its 75 tokens padded, end token) and the
//!   chunks' features are concatenated, so the UNet attends to all of them.
//! - Each token's features are scaled by its weight, and each chunk's features then rescaled
//!   so their mean is what it was unweighted. Unlike the web UIs, which take that mean over a
//!   whole batch, the mean is each prompt's own: an image does not depend on which other
//!   prompts shared its batch.

use crate::tokenizer::{Tokenizer, MAX_TOKENS};

/// Text tokens in one chunk: CLIP's context less the start and end tokens.
pub const CHUNK_TOKENS: usize = MAX_TOKENS - 2;
/// How far back from a full chunk's end a comma may be to end the chunk there instead.
const COMMA_BACKTRACK: usize = 20;
/// Most chunks a prompt may take (a 2000-character prompt needs fewer than 10).
pub const MAX_CHUNKS: usize = 32;

const ROUND_UP: f32 = 1.1;
const SQUARE_DOWN: f32 = 1.0 / 1.1;

/// A stretch of prompt text and its weight; `None` text is a `BREAK`.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    pub text: Option<String>,
    pub weight: f32,
}

fn text(text: &str, weight: f32) -> Piece {
    Piece {
        text: Some(text.to_string()),
        weight,
    }
}

/// The prompt as weighted pieces, in order; neighbours of equal weight are merged.
pub fn parse(prompt: &str) -> Vec<Piece> {
    // Each open bracket: the index of the first piece inside it, and whether it is round.
    let mut open: Vec<(usize, bool)> = Vec::new();
    let mut pieces: Vec<Piece> = Vec::new();
    let mut chars = prompt.char_indices().peekable();
    let mut plain = String::new();
    let flush = |plain: &mut String, pieces: &mut Vec<Piece>| {
        if !plain.is_empty() {
            pieces.push(text(plain, 1.0));
            plain.clear();
        }
    };
    // Brackets weigh text; a `BREAK` inside them stays a break of weight 1.
    let multiply = |pieces: &mut Vec<Piece>, from: usize, by: f32| {
        for piece in pieces[from..].iter_mut().filter(|p| p.text.is_some()) {
            piece.weight *= by;
        }
    };
    while let Some((at, c)) = chars.next() {
        match c {
            // An escaped bracket or backslash is the character; a lone backslash is dropped.
            '\\' => {
                if let Some(&(_, next @ ('(' | ')' | '[' | ']' | '\\'))) = chars.peek() {
                    plain.push(next);
                    chars.next();
                }
            }
            '(' | '[' => {
                flush(&mut plain, &mut pieces);
                open.push((pieces.len(), c == '('));
            }
            ')' if open.last().is_some_and(|(_, round)| *round) => {
                // `(text:1.3)`: the number after the last colon, when it is one.
                let mut explicit = None;
                if let Some(colon) = plain.rfind(':') {
                    if let Some(weight) = weight_of(&plain[colon + 1..]) {
                        explicit = Some(weight);
                        plain.truncate(colon);
                    }
                }
                flush(&mut plain, &mut pieces);
                let (from, _) = open.pop().unwrap_or((pieces.len(), true));
                multiply(&mut pieces, from, explicit.unwrap_or(ROUND_UP));
            }
            ']' if open.last().is_some_and(|(_, round)| !*round) => {
                flush(&mut plain, &mut pieces);
                let (from, _) = open.pop().unwrap_or((pieces.len(), false));
                multiply(&mut pieces, from, SQUARE_DOWN);
            }
            _ if c == 'B' && prompt[at..].starts_with("BREAK") && is_break(prompt, at) => {
                flush(&mut plain, &mut pieces);
                pieces.push(Piece {
                    text: None,
                    weight: 1.0,
                });
                for _ in 0.."BREAK".len() - 1 {
                    chars.next();
                }
            }
            c => plain.push(c),
        }
    }
    flush(&mut plain, &mut pieces);
    // Brackets left open close at the end.
    while let Some((from, round)) = open.pop() {
        multiply(
            &mut pieces,
            from,
            if round { ROUND_UP } else { SQUARE_DOWN },
        );
    }
    let mut merged: Vec<Piece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match (merged.last_mut(), &piece.text) {
            (Some(last), Some(more)) if last.text.is_some() && last.weight == piece.weight => {
                if let Some(t) = &mut last.text {
                    t.push_str(more);
                }
            }
            _ => merged.push(piece),
        }
    }
    if merged.is_empty() {
        merged.push(text("", 1.0));
    }
    merged
}

/// A weight as written after a colon: an optional sign, digits and dots, spaces around.
fn weight_of(text: &str) -> Option<f32> {
    let text = text.trim();
    let digits = text.strip_prefix(['+', '-']).unwrap_or(text);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return None;
    }
    text.parse().ok()
}

/// Whether the `BREAK` at byte `at` is a word of its own (no letter, digit or `_` touching it).
fn is_break(prompt: &str, at: usize) -> bool {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let before = prompt[..at].chars().next_back();
    let after = prompt[at + "BREAK".len()..].chars().next();
    !before.is_some_and(word) && !after.is_some_and(word)
}

/// One chunk, as CLIP takes it: [`MAX_TOKENS`] ids (start, up to 75 tokens, end, padding) and a
/// weight for each.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
    /// Where its end token is (the pooled features are read there).
    pub eos: usize,
}

/// The prompt's chunks: at least one, at most [`MAX_CHUNKS`] (tokens past those are dropped).
pub fn chunks(tokenizer: &Tokenizer, prompt: &str) -> Vec<Chunk> {
    chunks_with(tokenizer, prompt, &[])
}

/// [`chunks`], with each run of tokens that spells an embedding's name replaced by its
/// placeholder ids (`(name's tokens, ids)`, longest first; see [`crate::embeddings`]).
pub fn chunks_with(
    tokenizer: &Tokenizer,
    prompt: &str,
    placeholders: &[(Vec<u32>, Vec<u32>)],
) -> Vec<Chunk> {
    let comma = tokenizer.encode(",").first().copied();
    let mut done: Vec<Chunk> = Vec::new();
    let mut tokens: Vec<(u32, f32)> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let close = |tokens: &mut Vec<(u32, f32)>, done: &mut Vec<Chunk>| {
        let mut ids = Vec::with_capacity(MAX_TOKENS);
        let mut weights = Vec::with_capacity(MAX_TOKENS);
        ids.push(tokenizer.bos());
        weights.push(1.0);
        for (id, weight) in tokens.drain(..) {
            ids.push(id);
            weights.push(weight);
        }
        let eos = ids.len();
        ids.push(tokenizer.eos());
        ids.resize(MAX_TOKENS, tokenizer.pad());
        weights.resize(MAX_TOKENS, 1.0);
        done.push(Chunk { ids, weights, eos });
    };
    for piece in parse(prompt) {
        let Some(text) = piece.text else {
            close(&mut tokens, &mut done);
            last_comma = None;
            continue;
        };
        for id in crate::embeddings::substitute(tokenizer.encode(&text), placeholders) {
            if Some(id) == comma {
                last_comma = Some(tokens.len());
            } else if let (CHUNK_TOKENS, Some(at)) = (tokens.len(), last_comma) {
                // Full, and a comma is near its end: end it there, carrying the rest on.
                if CHUNK_TOKENS - at <= COMMA_BACKTRACK {
                    let carried = tokens.split_off(at + 1);
                    close(&mut tokens, &mut done);
                    tokens = carried;
                    last_comma = None;
                }
            }
            if tokens.len() == CHUNK_TOKENS {
                close(&mut tokens, &mut done);
                last_comma = None;
            }
            tokens.push((id, piece.weight));
        }
    }
    if !tokens.is_empty() || done.is_empty() {
        close(&mut tokens, &mut done);
    }
    done.truncate(MAX_CHUNKS);
    done
}

/// The chunks of an empty prompt, to pad a prompt with fewer chunks than its batch.
pub fn empty_chunk(tokenizer: &Tokenizer) -> Chunk {
    chunks(tokenizer, "").remove(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pieces(prompt: &str) -> Vec<(Option<String>, f32)> {
        parse(prompt)
            .into_iter()
            .map(|p| (p.text, p.weight))
            .collect()
    }

    fn assert_pieces(prompt: &str, want: &[(&str, f32)]) {
        let got = pieces(prompt);
        let same = got.len() == want.len()
            && got
                .iter()
                .zip(want)
                .all(|((text, weight), (w_text, w_weight))| {
                    let text_ok = match text {
                        Some(t) => t == w_text,
                        None => *w_text == "BREAK",
                    };
                    text_ok && (weight - w_weight).abs() < 1e-5
                });
        assert!(same, "{prompt:?}: got {got:?}, want {want:?}");
    }

    #[test]
    fn attention_is_read_as_the_web_uis_document_it() {
        assert_pieces("normal text", &[("normal text", 1.0)]);
        assert_pieces(
            "an (important) word",
            &[("an ", 1.0), ("important", 1.1), (" word", 1.0)],
        );
        assert_pieces("(unbalanced", &[("unbalanced", 1.1)]);
        assert_pieces(r"\(literal\]", &[("(literal]", 1.0)]);
        assert_pieces("(unnecessary)(parens)", &[("unnecessaryparens", 1.1)]);
        assert_pieces(
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            &[
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ],
        );
    }

    #[test]
    fn nesting_escapes_and_odd_brackets() {
        assert_pieces("((a):1.5)", &[("a", 1.1 * 1.5)]);
        assert_pieces("[[a]]", &[("a", 1.0 / 1.21)]);
        assert_pieces("(a [b] c)", &[("a ", 1.1), ("b", 1.0), (" c", 1.1)]);
        assert_pieces("(a:b:1.2)", &[("a:b", 1.2)]);
        assert_pieces("(a: 0.8 )", &[("a", 0.8)]);
        // Not a weight: the colon and what follows are text, and the bracket counts 1.1.
        assert_pieces("(a:1e3)", &[("a:1e3", 1.1)]);
        assert_pieces("(ratio 16:9 widescreen)", &[("ratio 16:9 widescreen", 1.1)]);
        // Closing brackets with none open are text; a lone backslash is dropped.
        assert_pieces("a) b]", &[("a) b]", 1.0)]);
        assert_pieces(r"a\b \\ c", &[(r"ab \ c", 1.0)]);
        assert_pieces("(a]", &[("a]", 1.1)]);
        assert_pieces("", &[("", 1.0)]);
        assert_pieces("()", &[("", 1.0)]);
    }

    #[test]
    fn break_is_a_word_of_its_own() {
        assert_pieces("a BREAK b", &[("a ", 1.0), ("BREAK", 1.0), (" b", 1.0)]);
        assert_pieces("a,BREAK,b", &[("a,", 1.0), ("BREAK", 1.0), (",b", 1.0)]);
        assert_pieces(
            "BREAKFAST break UNBREAK",
            &[("BREAKFAST break UNBREAK", 1.0)],
        );
        assert_pieces("(a BREAK b)", &[("a ", 1.1), ("BREAK", 1.0), (" b", 1.1)]);
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::bundled(None, Path::new("bundled")).expect("tokenizer")
    }

    /// `n` words of one token each ("cat" is one token in CLIP's vocabulary).
    fn words(n: usize) -> String {
        vec!["cat"; n].join(" ")
    }

    #[test]
    fn prompts_are_cut_into_chunks_of_75_tokens() {
        let t = tokenizer();
        let cat = t.encode("cat")[0];
        for (n, want) in [
            (0, 1),
            (1, 1),
            (74, 1),
            (75, 1),
            (76, 2),
            (150, 2),
            (151, 3),
        ] {
            let chunks = chunks(&t, &words(n));
            assert_eq!(chunks.len(), want, "{n} tokens");
            let mut text = 0;
            for chunk in &chunks {
                assert_eq!(
                    (chunk.ids.len(), chunk.weights.len()),
                    (MAX_TOKENS, MAX_TOKENS)
                );
                assert_eq!(chunk.ids[0], t.bos());
                assert_eq!(chunk.ids[chunk.eos], t.eos());
                assert!(chunk.ids[chunk.eos + 1..].iter().all(|&id| id == t.pad()));
                text += chunk.ids[1..chunk.eos]
                    .iter()
                    .filter(|&&id| id == cat)
                    .count();
            }
            assert_eq!(text, n, "every token is kept, once");
        }
        // Up to 75 tokens, a chunk is exactly what a plain encoding gives.
        for n in [0, 20, 75] {
            assert_eq!(chunks(&t, &words(n))[0].ids, t.encode_padded(&words(n)));
        }
    }

    #[test]
    fn a_full_chunk_ends_at_a_near_comma_and_break_starts_a_new_one() {
        let t = tokenizer();
        // 70 words, a comma, 10 more: the chunk ends after the comma (5 from its end).
        let prompt = format!("{}, {}", words(70), words(10));
        let c = chunks(&t, &prompt);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].eos, 1 + 71, "70 words and the comma");
        assert_eq!(c[1].eos, 1 + 10);
        // A comma 30 tokens back is too far: cut at 75.
        let prompt = format!("{}, {}", words(45), words(40));
        let c = chunks(&t, &prompt);
        assert_eq!((c[0].eos, c[1].eos), (76, 1 + 86 - 75));
        // BREAK pads the chunk out; leading and repeated breaks make empty chunks.
        let c = chunks(&t, "a cat BREAK a dog");
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].eos, c[1].eos), (3, 3));
        assert_eq!(chunks(&t, "BREAK cat").len(), 2);
        assert_eq!(chunks(&t, "cat BREAK BREAK cat").len(), 3);
        assert_eq!(
            chunks(&t, "cat BREAK").len(),
            1,
            "a break at the end adds nothing"
        );
    }

    #[test]
    fn weights_follow_their_tokens_into_the_chunks() {
        let t = tokenizer();
        let c = chunks(&t, "a (cat:1.5) [dog]");
        let w = &c[0].weights;
        assert_eq!(w[0], 1.0, "start");
        assert_eq!(w[1], 1.0, "a");
        assert!((w[2] - 1.5).abs() < 1e-6, "cat");
        assert!((w[3] - 1.0 / 1.1).abs() < 1e-6, "dog");
        assert!(w[4..].iter().all(|&x| x == 1.0), "end and padding");
        assert_eq!(chunks(&t, &words(5000)).len(), MAX_CHUNKS, "bounded");
    }
}
