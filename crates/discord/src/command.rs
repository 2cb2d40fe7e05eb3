//! The `/sparkle` slash command as Discord registers it.

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
        json!({"type": 3, "name": "prompt", "description": "What to draw", "required": true, "max_length": 2000}),
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

#[cfg(test)]
mod tests {
    use super::*;

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
        for file in ["image", "mask"] {
            let option = options.iter().find(|o| o["name"] == file).expect("file");
            assert_eq!(option["type"], 11, "an attachment option");
        }
        // Discord allows 25 options at most, required ones first.
        assert!(options.len() <= 25);
        assert!(options.iter().skip(1).all(|o| o["required"].is_null()));
    }
}
