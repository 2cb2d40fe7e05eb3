use crate::{ErrorCode, RequestError, Scheduler};
use serde::{Deserialize, Serialize};

/// Limits applied to every request, whatever route it came through.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest prompt (and negative prompt), in characters.
    pub max_prompt_chars: usize,
    /// Smallest width or height, in pixels.
    pub min_side: u32,
    /// Largest width or height, in pixels.
    pub max_side: u32,
    /// Fewest and most denoising steps.
    pub min_steps: u32,
    pub max_steps: u32,
    /// Most images in one request.
    pub max_n: u32,
    /// Largest guidance (CFG) scale.
    pub max_guidance_scale: f32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_prompt_chars: 2000,
            min_side: 64,
            max_side: 2048,
            min_steps: 1,
            max_steps: 150,
            max_n: 8,
            max_guidance_scale: 30.0,
        }
    }
}

/// A model the deployment serves, with the defaults a request gets when it says nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    pub default_width: u32,
    pub default_height: u32,
    pub default_steps: u32,
    pub default_guidance_scale: f32,
    pub default_scheduler: Scheduler,
}

impl ModelEntry {
    /// Defaults for an SD 1.5-style model of the given native size.
    pub fn new(name: impl Into<String>, native_side: u32) -> Self {
        ModelEntry {
            name: name.into(),
            default_width: native_side,
            default_height: native_side,
            default_steps: 20,
            default_guidance_scale: 7.5,
            default_scheduler: Scheduler::Euler,
        }
    }
}

/// The models a deployment serves; the first is the default.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Catalog {
    pub models: Vec<ModelEntry>,
}

impl Catalog {
    pub fn find(&self, name: Option<&str>) -> Option<&ModelEntry> {
        match name {
            None => self.models.first(),
            Some(name) => self.models.iter().find(|m| m.name == name),
        }
    }
}

/// What a client asked for, before validation. Every field but the prompt is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub model: Option<String>,
    /// `WIDTHxHEIGHT`, e.g. `512x512`.
    pub size: Option<String>,
    pub steps: Option<u32>,
    pub guidance_scale: Option<f32>,
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    pub n: Option<u32>,
}

/// A request that passed validation: every field resolved, every limit respected.
/// Only these cross into the queue. Only validation makes one: [`ImageRequest::validate`]
/// for a client's request, [`ValidImageRequest::from_parts`] for one read back from storage;
/// the fields can be read, but a value cannot be written out by hand:
///
/// ```compile_fail
/// let forged = sparkle_core::ValidImageRequest {
///     prompt: "a corgi".into(), negative_prompt: String::new(), model: "m".into(),
///     width: 1 << 20, height: 1 << 20, steps: 100_000, guidance_scale: 7.5, seed: 1,
///     scheduler: sparkle_core::Scheduler::Euler, n: 1_000,
/// };
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct ValidImageRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    /// Seed of the first image; image `i` of the request uses `seed + i`.
    pub seed: u32,
    pub scheduler: Scheduler,
    pub n: u32,
    /// Only this module makes one.
    validated: Validated,
}

/// Proof that a [`ValidImageRequest`] went through validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Validated;

/// The fields of a request as stored, not yet trusted: [`ValidImageRequest::from_parts`]
/// checks them.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestParts {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance_scale: f32,
    pub seed: u32,
    pub scheduler: Scheduler,
    pub n: u32,
}

/// The work of one denoising step per latent pixel relative to SD 1.5's, by words in a
/// model's name: SDXL's UNet does a little less per latent pixel at 1024² than SD 1.5's at
/// 512² (measured: 37 ms a step at 1024² against 10.7 ms at 512² on one GPU).
pub fn model_factor(model: &str) -> f64 {
    if model.to_ascii_lowercase().contains("xl") {
        0.9
    } else {
        1.0
    }
}

/// The cost of a job of `n` images in units of one SD 1.5 step at 512×512.
pub fn job_cost(model: &str, width: u32, height: u32, steps: u32, n: u32) -> f64 {
    f64::from(steps) * f64::from(width) * f64::from(height) / (512.0 * 512.0)
        * f64::from(n.max(1))
        * model_factor(model)
}

/// The model a batch key ([`ValidImageRequest::batch_key`]) names.
pub fn model_of_batch_key(batch_key: &str) -> &str {
    batch_key.split('|').next().unwrap_or(batch_key)
}

/// A model's name: up to 200 characters, none of them `|` (batch keys are `|`-separated) or
/// a control character.
pub fn is_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.chars().count() <= 200
        && !name.chars().any(|c| c == '|' || c.is_control())
}

/// The bounds no deployment's limits go beyond.
const MAX_SIDE: u32 = 8192;
const MAX_STEPS: u32 = 1000;
const MAX_N: u32 = 64;
const MAX_PROMPT_BYTES: usize = 64 * 1024;

impl ValidImageRequest {
    /// A request read back from storage, checked against what any validation guarantees
    /// (sides multiples of 8 up to 8192, 1 to 1000 steps, 1 to 64 images, a finite guidance,
    /// seeds that do not overflow, a named model, bounded prompts); the deployment's own,
    /// narrower limits were checked when it was submitted.
    pub fn from_parts(parts: RequestParts) -> Result<ValidImageRequest, RequestError> {
        let bad = |field: &'static str, what: String| {
            Err(RequestError::new(ErrorCode::InvalidJson, Some(field), what))
        };
        for (field, side) in [("width", parts.width), ("height", parts.height)] {
            if side == 0 || side % 8 != 0 || side > MAX_SIDE {
                return bad(
                    field,
                    format!("{field} must be a multiple of 8 up to {MAX_SIDE}; got {side}"),
                );
            }
        }
        if !(1..=MAX_STEPS).contains(&parts.steps) {
            return bad(
                "steps",
                format!("steps must be 1 to {MAX_STEPS}; got {}", parts.steps),
            );
        }
        if !(1..=MAX_N).contains(&parts.n) || parts.seed.checked_add(parts.n - 1).is_none() {
            return bad(
                "n",
                format!(
                    "n must be 1 to {MAX_N} with room after the seed; got {}",
                    parts.n
                ),
            );
        }
        if !parts.guidance_scale.is_finite() {
            return bad("guidance_scale", "guidance_scale must be finite".into());
        }
        if parts.model.is_empty() {
            return bad("model", "the model must be named".into());
        }
        if !is_model_name(&parts.model) {
            return bad("model", format!("{:?} is not a model name", parts.model));
        }
        if parts.prompt.len() > MAX_PROMPT_BYTES || parts.negative_prompt.len() > MAX_PROMPT_BYTES {
            return bad(
                "prompt",
                format!("prompts must be at most {MAX_PROMPT_BYTES} bytes"),
            );
        }
        let RequestParts {
            prompt,
            negative_prompt,
            model,
            width,
            height,
            steps,
            guidance_scale,
            seed,
            scheduler,
            n,
        } = parts;
        Ok(ValidImageRequest {
            prompt,
            negative_prompt,
            model,
            width,
            height,
            steps,
            guidance_scale,
            seed,
            scheduler,
            n,
            validated: Validated,
        })
    }
}

impl ImageRequest {
    /// A digest of exactly what the client asked for, before defaults and random seeds are
    /// filled in: two submissions under one idempotency key must have the same fingerprint.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(&canonical))
    }

    /// Checks every field against `limits` and `catalog`. A missing seed is drawn from
    /// `random_seed`, so this function stays free of randomness and easy to test.
    pub fn validate(
        self,
        limits: &Limits,
        catalog: &Catalog,
        random_seed: impl FnOnce() -> u32,
    ) -> Result<ValidImageRequest, RequestError> {
        let prompt = check_prompt("prompt", &self.prompt, limits)?;
        if prompt.is_empty() {
            return Err(RequestError::new(
                ErrorCode::InvalidPrompt,
                Some("prompt"),
                "prompt must not be empty",
            ));
        }
        let negative_prompt = check_prompt(
            "negative_prompt",
            self.negative_prompt.as_deref().unwrap_or(""),
            limits,
        )?;

        let model = catalog.find(self.model.as_deref()).ok_or_else(|| {
            let known: Vec<_> = catalog.models.iter().map(|m| m.name.as_str()).collect();
            RequestError::new(
                ErrorCode::UnknownModel,
                Some("model"),
                format!(
                    "model {:?} is not served here; available: {}",
                    self.model.as_deref().unwrap_or(""),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })?;

        let (width, height) = match self.size.as_deref() {
            None => (model.default_width, model.default_height),
            Some(size) => parse_size(size, limits)?,
        };

        let steps = self.steps.unwrap_or(model.default_steps);
        if !(limits.min_steps..=limits.max_steps).contains(&steps) {
            return Err(RequestError::new(
                ErrorCode::InvalidSteps,
                Some("steps"),
                format!(
                    "steps must be between {} and {}; got {steps}",
                    limits.min_steps, limits.max_steps
                ),
            ));
        }

        let guidance_scale = self.guidance_scale.unwrap_or(model.default_guidance_scale);
        if !guidance_scale.is_finite()
            || !(0.0..=limits.max_guidance_scale).contains(&guidance_scale)
        {
            return Err(RequestError::new(
                ErrorCode::InvalidGuidanceScale,
                Some("guidance_scale"),
                format!(
                    "guidance_scale must be between 0 and {}; got {guidance_scale}",
                    limits.max_guidance_scale
                ),
            ));
        }

        let n = self.n.unwrap_or(1);
        if n < 1 || n > limits.max_n {
            return Err(RequestError::new(
                ErrorCode::InvalidN,
                Some("n"),
                format!("n must be between 1 and {}; got {n}", limits.max_n),
            ));
        }

        let seed = match self.seed {
            None => random_seed(),
            Some(seed) => u32::try_from(seed)
                .ok()
                .filter(|s| s.checked_add(n - 1).is_some())
                .ok_or_else(|| {
                    RequestError::new(
                        ErrorCode::InvalidSeed,
                        Some("seed"),
                        format!(
                            "seed must be between 0 and {} (for n = {n}); got {seed}",
                            u32::MAX - (n - 1)
                        ),
                    )
                })?,
        };
        // A drawn seed must leave room for the n images that follow it.
        let seed = seed.min(u32::MAX - (n - 1));

        let scheduler = match self.scheduler.as_deref() {
            None => model.default_scheduler,
            Some(name) => name.parse().map_err(|message: String| {
                RequestError::new(ErrorCode::UnknownScheduler, Some("scheduler"), message)
            })?,
        };

        // Within the bounds any stored request is checked against, whatever the limits.
        ValidImageRequest::from_parts(RequestParts {
            prompt,
            negative_prompt,
            model: model.name.clone(),
            width,
            height,
            steps,
            guidance_scale,
            seed,
            scheduler,
            n,
        })
    }
}

fn check_prompt(field: &'static str, text: &str, limits: &Limits) -> Result<String, RequestError> {
    let text = text.trim();
    let chars = text.chars().count();
    if chars > limits.max_prompt_chars {
        return Err(RequestError::new(
            ErrorCode::PromptTooLong,
            Some(field),
            format!(
                "{field} may be at most {} characters; got {chars}",
                limits.max_prompt_chars
            ),
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(RequestError::new(
            ErrorCode::InvalidPrompt,
            Some(field),
            format!("{field} must not contain control characters"),
        ));
    }
    Ok(text.to_string())
}

/// Parses `WIDTHxHEIGHT`; both sides multiples of 8 within the limits.
pub(crate) fn parse_size(size: &str, limits: &Limits) -> Result<(u32, u32), RequestError> {
    let invalid = |why: String| RequestError::new(ErrorCode::InvalidSize, Some("size"), why);
    let (w, h) = size
        .trim()
        .split_once(['x', 'X'])
        .ok_or_else(|| invalid(format!("size must look like 512x512; got {size:?}")))?;
    let side = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| invalid(format!("size must look like 512x512; got {size:?}")))
    };
    let (w, h) = (side(w)?, side(h)?);
    for v in [w, h] {
        if !(limits.min_side..=limits.max_side).contains(&v) {
            return Err(invalid(format!(
                "size: width and height must be between {} and {}; got {size:?}",
                limits.min_side, limits.max_side
            )));
        }
        if v % 8 != 0 {
            return Err(invalid(format!(
                "size: width and height must be multiples of 8; got {size:?}"
            )));
        }
    }
    Ok((w, h))
}

impl ValidImageRequest {
    /// The `parameters` text the popular web UIs write into a PNG, for image `index`
    /// of this request.
    pub fn parameters_text(&self, index: u32) -> String {
        let mut text = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            text.push_str("\nNegative prompt: ");
            text.push_str(&self.negative_prompt);
        }
        text.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.scheduler.display_name(),
            self.guidance_scale,
            self.seed_of(index),
            self.width,
            self.height,
            self.model
        ));
        text
    }

    /// The seed of image `index` of this request.
    pub fn seed_of(&self, index: u32) -> u32 {
        self.seed.wrapping_add(index)
    }

    /// The same request again for `n` images, with a fresh seed drawn at validation: what
    /// a re-roll or variations button asks for.
    pub fn again(&self, n: u32) -> ImageRequest {
        ImageRequest {
            prompt: self.prompt.clone(),
            negative_prompt: Some(self.negative_prompt.clone()).filter(|p| !p.is_empty()),
            model: Some(self.model.clone()),
            size: Some(format!("{}x{}", self.width, self.height)),
            steps: Some(self.steps),
            guidance_scale: Some(self.guidance_scale),
            seed: None,
            scheduler: Some(self.scheduler.as_str().to_string()),
            n: Some(n),
        }
    }

    /// What the job costs a GPU, in units of one SD 1.5 denoising step at 512×512:
    /// `steps × (width × height / 512²) × n × model_factor(model)`. The scaler sizes the
    /// pool by it.
    pub fn cost(&self) -> f64 {
        job_cost(&self.model, self.width, self.height, self.steps, self.n)
    }

    /// Jobs with equal batch keys can run as one batch on the GPU. The model comes first
    /// ([`model_of_batch_key`] reads it back; model names never hold `|`).
    pub fn batch_key(&self) -> String {
        format!(
            "{}|{}x{}|{}|{}",
            self.model, self.width, self.height, self.steps, self.scheduler
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog {
            models: vec![ModelEntry::new("tiny", 512)],
        }
    }

    fn req(prompt: &str) -> ImageRequest {
        ImageRequest {
            prompt: prompt.into(),
            ..Default::default()
        }
    }

    fn check(r: ImageRequest) -> Result<ValidImageRequest, RequestError> {
        r.validate(&Limits::default(), &catalog(), || 42)
    }

    #[test]
    fn defaults_come_from_the_model() {
        let v = check(req("  a corgi  ")).expect("valid");
        assert_eq!(v.prompt, "a corgi");
        assert_eq!(
            (v.width, v.height, v.steps, v.seed, v.n),
            (512, 512, 20, 42, 1)
        );
        assert_eq!(v.model, "tiny");
        assert_eq!(v.scheduler, Scheduler::Euler);
    }

    #[test]
    fn each_bad_field_names_itself_the_limit_and_the_value() {
        let cases: Vec<(ImageRequest, ErrorCode, &str, &str)> = vec![
            (req("   "), ErrorCode::InvalidPrompt, "prompt", "empty"),
            (
                req(&"x".repeat(2001)),
                ErrorCode::PromptTooLong,
                "prompt",
                "2001",
            ),
            (
                ImageRequest {
                    negative_prompt: Some("y".repeat(3000)),
                    ..req("a")
                },
                ErrorCode::PromptTooLong,
                "negative_prompt",
                "2000",
            ),
            (
                ImageRequest {
                    size: Some("500x512".into()),
                    ..req("a")
                },
                ErrorCode::InvalidSize,
                "size",
                "500x512",
            ),
            (
                ImageRequest {
                    size: Some("4096x512".into()),
                    ..req("a")
                },
                ErrorCode::InvalidSize,
                "size",
                "2048",
            ),
            (
                ImageRequest {
                    size: Some("big".into()),
                    ..req("a")
                },
                ErrorCode::InvalidSize,
                "size",
                "big",
            ),
            (
                ImageRequest {
                    steps: Some(0),
                    ..req("a")
                },
                ErrorCode::InvalidSteps,
                "steps",
                "got 0",
            ),
            (
                ImageRequest {
                    steps: Some(151),
                    ..req("a")
                },
                ErrorCode::InvalidSteps,
                "steps",
                "150",
            ),
            (
                ImageRequest {
                    n: Some(9),
                    ..req("a")
                },
                ErrorCode::InvalidN,
                "n",
                "got 9",
            ),
            (
                ImageRequest {
                    guidance_scale: Some(f32::NAN),
                    ..req("a")
                },
                ErrorCode::InvalidGuidanceScale,
                "guidance_scale",
                "NaN",
            ),
            (
                ImageRequest {
                    seed: Some(1 << 40),
                    ..req("a")
                },
                ErrorCode::InvalidSeed,
                "seed",
                "1099511627776",
            ),
            (
                ImageRequest {
                    model: Some("sdxl".into()),
                    ..req("a")
                },
                ErrorCode::UnknownModel,
                "model",
                "tiny",
            ),
            (
                ImageRequest {
                    scheduler: Some("plms".into()),
                    ..req("a")
                },
                ErrorCode::UnknownScheduler,
                "scheduler",
                "plms",
            ),
        ];
        for (r, code, field, mention) in cases {
            let err = check(r).expect_err("must be refused");
            assert_eq!(err.code, code, "{err}");
            assert_eq!(err.param, Some(field), "{err}");
            assert!(err.message.contains(field) || field == "prompt", "{err}");
            assert!(
                err.message.contains(mention),
                "{err} should mention {mention}"
            );
        }
    }

    #[test]
    fn seeds_leave_room_for_every_image() {
        let v = check(ImageRequest {
            n: Some(4),
            seed: Some(7),
            ..req("a")
        })
        .expect("valid");
        assert_eq!((v.seed_of(0), v.seed_of(3)), (7, 10));
        let err = check(ImageRequest {
            n: Some(2),
            seed: Some(u32::MAX as u64),
            ..req("a")
        })
        .expect_err("no room");
        assert_eq!(err.code, ErrorCode::InvalidSeed);
        let v = ImageRequest {
            n: Some(3),
            ..req("a")
        }
        .validate(&Limits::default(), &catalog(), || u32::MAX)
        .expect("drawn seed is clamped");
        assert_eq!(v.seed_of(2), u32::MAX);
    }

    #[test]
    fn again_keeps_everything_but_the_seed_and_count() {
        let first = check(ImageRequest {
            negative_prompt: Some("blurry".into()),
            size: Some("512x384".into()),
            steps: Some(9),
            guidance_scale: Some(3.5),
            scheduler: Some("dpmpp_2m_karras".into()),
            seed: Some(7),
            ..req("a corgi")
        })
        .expect("valid");
        let again = first
            .again(4)
            .validate(&Limits::default(), &catalog(), || 99)
            .expect("valid again");
        assert_eq!((again.seed, again.n), (99, 4));
        assert_eq!(
            ValidImageRequest {
                seed: first.seed,
                n: first.n,
                ..again
            },
            first
        );
    }

    #[test]
    fn parameters_follow_the_web_ui_layout() {
        let v = check(ImageRequest {
            negative_prompt: Some("blurry".into()),
            scheduler: Some("euler_a".into()),
            seed: Some(7),
            ..req("a corgi, style of monet")
        })
        .expect("valid");
        assert_eq!(
            v.parameters_text(1),
            "a corgi, style of monet\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 8, Size: 512x512, Model: tiny"
        );
        let plain = check(req("x")).expect("valid");
        assert!(!plain.parameters_text(0).contains("Negative prompt"));
    }
}
