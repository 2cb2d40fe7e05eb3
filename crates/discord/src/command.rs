//! The `/sparkle` slash command as Discord registers it, and the suggestions its
//! autocompleted options offer.

use serde_json::{json, Value};

/// The command definition: a required prompt and the optional settings, with choices for
/// the sizes and schedulers offered.
pub fn sparkle_command(sizes: &[String], schedulers: &[&str], models: &[String]) -> Value {
    let choices = |values: &[&str]| -> Vec<Value> {
        values
            .iter()
            .take(25)
            .map(|v| json!({ "name": v, "value": v }))
            .collect()
    };
    let sizes: Vec<&str> = sizes.iter().map(String::as_str).collect();
    let models: Vec<&str> = models.iter().map(String::as_str).collect();
    let mut options = vec![
        json!({"type": 3, "name": "prompt", "description": "What to draw", "required": true, "max_length": 2000, "autocomplete": true}),
        json!({"type": 3, "name": "negative_prompt", "description": "What to steer away from", "max_length": 2000}),
        json!({"type": 3, "name": "size", "description": "Width x height", "choices": choices(&sizes)}),
        json!({"type": 4, "name": "steps", "description": "Denoising steps", "min_value": 1, "max_value": 150}),
        json!({"type": 4, "name": "seed", "description": "Seed, for the same image again", "min_value": 0, "max_value": 4_294_967_295u64}),
        json!({"type": 10, "name": "guidance", "description": "How closely to follow the prompt", "min_value": 0, "max_value": 30}),
        json!({"type": 3, "name": "scheduler", "description": "Sampler", "choices": choices(schedulers)}),
        json!({"type": 11, "name": "image", "description": "Start from this image (PNG, JPEG or WebP)"}),
        json!({"type": 11, "name": "mask", "description": "With an image: repaint where this mask is white, keep where black"}),
        json!({"type": 10, "name": "strength", "description": "With an image: how far to move from it (0.01 to 1)", "min_value": 0.01, "max_value": 1}),
        json!({"type": 10, "name": "hires", "description": "Without an image: a second pass at this many times the size", "min_value": 1.25, "max_value": 4}),
        json!({"type": 3, "name": "lora", "description": "A LoRA to apply (more with <lora:NAME:WEIGHT> in the prompt)", "autocomplete": true, "max_length": 100}),
        json!({"type": 10, "name": "lora_weight", "description": "With a LoRA: its weight (default 1)", "min_value": -4, "max_value": 4}),
    ];
    if !models.is_empty() {
        options.push(json!({"type": 3, "name": "model", "description": "Model", "choices": choices(&models)}));
    }
    json!({
        "name": "sparkle",
        "type": 1,
        "description": "Draw an image from a prompt",
        "options": options,
        "contexts": [0, 1, 2],
        "integration_types": [0, 1],
    })
}

/// Discord's bounds on an autocomplete answer: 25 choices, each name and value 1 to 100
/// characters.
const MAX_CHOICES: usize = 25;
const MAX_CHOICE_CHARS: usize = 100;

fn choice(name: &str, value: &str) -> Option<Value> {
    let fits = |t: &str| (1..=MAX_CHOICE_CHARS).contains(&t.chars().count());
    (fits(name) && fits(value)).then(|| json!({ "name": name, "value": value }))
}

/// The names that hold `typed` (ignoring case), those beginning with it first.
fn matching<'a>(names: &'a [String], typed: &str) -> Vec<&'a String> {
    let typed = typed.trim().to_lowercase();
    let mut found: Vec<(bool, &String)> = names
        .iter()
        .filter_map(|n| {
            let lower = n.to_lowercase();
            lower
                .contains(&typed)
                .then(|| (!lower.starts_with(&typed), n))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, n)| n).collect()
}

/// Suggestions for the `lora` option: the model's LoRAs holding what is typed.
pub fn lora_choices(loras: &[String], typed: &str) -> Vec<Value> {
    matching(loras, typed)
        .into_iter()
        .filter_map(|name| choice(name, name))
        .take(MAX_CHOICES)
        .collect()
}

/// Suggestions for the prompt as it is typed: its last word completed to the name of an
/// embedding (used by writing its name) or to a `<lora:NAME:1>` tag, for the names that
/// begin with that word (after any `(`, `[` or `<lora:`). None while the last word is empty,
/// or once a completed prompt would pass 100 characters (Discord's longest choice); the
/// prompt typed is sent as typed either way.
pub fn prompt_choices(typed: &str, loras: &[String], embeddings: &[String]) -> Vec<Value> {
    let word = typed.rsplit(char::is_whitespace).next().unwrap_or(typed);
    let (head, word) = match word.strip_prefix("<lora:") {
        Some(rest) => (&typed[..typed.len() - rest.len() - "<lora:".len()], rest),
        None => {
            let rest = word.trim_start_matches(['(', '[']);
            (&typed[..typed.len() - rest.len()], rest)
        }
    };
    if word.is_empty() {
        return Vec::new();
    }
    let starts = |names: &[String]| -> Vec<String> {
        let lower = word.to_lowercase();
        names
            .iter()
            .filter(|n| n.to_lowercase().starts_with(&lower))
            .cloned()
            .collect()
    };
    let completed = starts(embeddings)
        .into_iter()
        .map(|name| format!("{head}{name}"))
        .chain(
            starts(loras)
                .into_iter()
                .map(|name| format!("{head}<lora:{name}:1>")),
        );
    completed
        .filter_map(|text| choice(&text, &text))
        .take(MAX_CHOICES)
        .collect()
}

/// The answer to an autocomplete interaction (type 8) with these choices.
pub fn autocomplete_answer(choices: Vec<Value>) -> Value {
    json!({ "type": 8, "data": { "choices": choices } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loras_and_embeddings_are_suggested_as_they_are_typed() {
        let loras = vec![
            "Watercolor".to_string(),
            "film-grain".into(),
            "cold-water".into(),
        ];
        let embeddings = vec!["EasyNegative".to_string(), "easy-hands".into()];
        let names = |c: Vec<Value>| -> Vec<String> {
            c.iter()
                .map(|v| v["value"].as_str().unwrap_or_default().to_string())
                .collect()
        };
        assert_eq!(
            names(lora_choices(&loras, "water")),
            ["Watercolor", "cold-water"]
        );
        assert_eq!(
            lora_choices(&loras, "").len(),
            3,
            "everything before typing"
        );
        assert_eq!(
            names(prompt_choices("a corgi, easy", &loras, &embeddings)),
            ["a corgi, EasyNegative", "a corgi, easy-hands"]
        );
        assert_eq!(
            names(prompt_choices("a corgi (film", &loras, &embeddings)),
            ["a corgi (<lora:film-grain:1>"]
        );
        assert_eq!(
            names(prompt_choices("a corgi <lora:Wat", &loras, &embeddings)),
            ["a corgi <lora:Watercolor:1>"]
        );
        assert!(prompt_choices("a corgi ", &loras, &embeddings).is_empty());
        // Spaces of more than one byte (a full-width space, a no-break space) end a word too.
        assert_eq!(
            names(prompt_choices(
                "a\u{3000}corgi\u{a0}easy",
                &loras,
                &embeddings
            )),
            [
                "a\u{3000}corgi\u{a0}EasyNegative",
                "a\u{3000}corgi\u{a0}easy-hands"
            ]
        );
        let long = format!("{} easy", "x".repeat(96));
        assert!(
            prompt_choices(&long, &loras, &embeddings).is_empty(),
            "past 100 characters"
        );
        let many: Vec<String> = (0..40).map(|i| format!("style{i}")).collect();
        assert_eq!(lora_choices(&many, "style").len(), 25);
        assert_eq!(autocomplete_answer(vec![])["type"], 8);
    }

    #[test]
    fn the_command_has_a_required_prompt_and_choices() {
        let c = sparkle_command(
            &["512x512".into(), "768x768".into()],
            &["euler", "ddim"],
            &["sd15".into()],
        );
        assert_eq!(c["name"], "sparkle");
        let options = c["options"].as_array().expect("options");
        assert_eq!(options[0]["name"], "prompt");
        assert_eq!(options[0]["required"], true);
        let size = options.iter().find(|o| o["name"] == "size").expect("size");
        assert_eq!(size["choices"][1]["value"], "768x768");
        assert!(options.iter().any(|o| o["name"] == "model"));
        let lora = options.iter().find(|o| o["name"] == "lora").expect("lora");
        assert_eq!(lora["autocomplete"], true);
        assert_eq!(
            options[0]["autocomplete"], true,
            "the prompt suggests names"
        );
        for file in ["image", "mask"] {
            let option = options.iter().find(|o| o["name"] == file).expect("file");
            assert_eq!(option["type"], 11, "an attachment option");
        }
        // Discord allows 25 options at most, required ones first.
        assert!(options.len() <= 25);
        assert!(options.iter().skip(1).all(|o| o["required"].is_null()));
    }
}
