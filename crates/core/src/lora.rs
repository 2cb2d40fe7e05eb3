//! LoRAs as requests name them: the `loras` field (`[{name, weight}]`) and A1111's prompt
//! syntax `<lora:NAME:WEIGHT>` (`<lora:NAME>` weighs 1).

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// A LoRA a request applies, with its weight (the multiplier of its change to the model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraWeight {
    /// The file's name in the deployment's `loras` directory, without `.safetensors`.
    pub name: String,
    /// Default 1; from -4 to 4.
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

/// The largest weight, either way, a LoRA may be applied with.
pub const MAX_LORA_WEIGHT: f32 = 4.0;

/// A name a request and the prompt syntax can carry: 1 to 100 characters, no space at
/// either end, none of them a control character or one of `| : < > , / \`.
pub fn is_lora_name(name: &str) -> bool {
    !name.is_empty()
        && name.trim() == name
        && name.chars().count() <= 100
        && !name
            .chars()
            .any(|c| c.is_control() || "|:<>,/\\".contains(c))
}

impl std::str::FromStr for LoraWeight {
    type Err = String;

    /// `NAME` (weight 1) or `NAME:WEIGHT`, as a tag and `sparkle generate --lora` write it.
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, weight) = match text.split_once(':') {
            None => (text, 1.0),
            Some((name, weight)) => (
                name,
                weight
                    .trim()
                    .parse()
                    .map_err(|_| "the weight is not a number".to_string())?,
            ),
        };
        let name = name.trim();
        if !is_lora_name(name) {
            return Err("not a LoRA name".into());
        }
        Ok(LoraWeight {
            name: name.to_string(),
            weight,
        })
    }
}

const OPEN: &str = "<lora:";

/// The LoRAs a prompt names with `<lora:NAME>` or `<lora:NAME:WEIGHT>`, in order; or what is
/// wrong with a tag.
pub fn lora_tags(prompt: &str) -> Result<Vec<LoraWeight>, String> {
    let mut found = Vec::new();
    let mut rest = prompt;
    while let Some(at) = rest.find(OPEN) {
        let tail = &rest[at + OPEN.len()..];
        let Some(end) = tail.find('>') else {
            return Err(format!(
                "the tag <lora:{} is not closed with >",
                short(tail)
            ));
        };
        let inner = &tail[..end];
        let lora = inner
            .parse()
            .map_err(|why| format!("<lora:{}>: {why}", short(inner)))?;
        found.push(lora);
        rest = &tail[end + 1..];
    }
    Ok(found)
}

/// At most 40 characters of a tag, for an error message.
fn short(text: &str) -> String {
    match text.char_indices().nth(40) {
        None => text.to_string(),
        Some((at, _)) => format!("{}…", &text[..at]),
    }
}

/// The prompt without its `<lora:…>` tags: what the text encoders read, as A1111 does.
pub fn strip_lora_tags(prompt: &str) -> Cow<'_, str> {
    if !prompt.contains(OPEN) {
        return Cow::Borrowed(prompt);
    }
    let mut out = String::with_capacity(prompt.len());
    let mut rest = prompt;
    while let Some(at) = rest.find(OPEN) {
        out.push_str(&rest[..at]);
        match rest[at..].find('>') {
            Some(end) => rest = &rest[at + end + 1..],
            None => {
                rest = &rest[at..];
                break;
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_read_and_stripped_as_a1111_writes_them() {
        let prompt = "a corgi <lora:watercolor:0.8>, style of monet <lora:film grain>";
        let tags = lora_tags(prompt).expect("tags");
        assert_eq!(
            tags,
            vec![
                LoraWeight {
                    name: "watercolor".into(),
                    weight: 0.8
                },
                LoraWeight {
                    name: "film grain".into(),
                    weight: 1.0
                },
            ]
        );
        assert_eq!(strip_lora_tags(prompt), "a corgi , style of monet ");
        assert!(matches!(strip_lora_tags("no tags"), Cow::Borrowed(_)));
        assert_eq!(lora_tags("<b>bold</b> text").expect("none"), vec![]);
    }

    #[test]
    fn a_broken_tag_says_what_is_wrong() {
        for (prompt, why) in [
            ("a <lora:x:heavy>", "not a number"),
            ("a <lora:x:0.5", "not closed"),
            ("a <lora::0.5>", "not a LoRA name"),
            ("a <lora:a/b:1>", "not a LoRA name"),
        ] {
            let err = lora_tags(prompt).expect_err(prompt);
            assert!(err.contains(why), "{prompt}: {err}");
        }
        // A long broken tag is echoed in part, so the message stays short.
        let err = lora_tags(&format!("<lora:{}>", "a".repeat(1100))).expect_err("name");
        assert!(
            err.contains("not a LoRA name") && err.chars().count() < 100,
            "{err}"
        );
        let err = lora_tags(&format!("<lora:{}:x>", "a".repeat(1100))).expect_err("weight");
        assert!(err.chars().count() < 100, "{err}");
        let err = lora_tags(&format!("<lora:{}", "é".repeat(1100))).expect_err("open");
        assert!(err.chars().count() < 100, "{err}");
        assert!(!is_lora_name(" film") && !is_lora_name("film ") && is_lora_name("film grain"));
    }
}
