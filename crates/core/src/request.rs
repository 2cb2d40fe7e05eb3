use crate::lora::{is_lora_name, lora_tags, LoraWeight, MAX_LORA_WEIGHT};
use crate::source::{natural_size, Outpaint, SourceFacts};
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
    /// Largest source image or mask, in bytes as sent.
    pub max_source_bytes: usize,
    /// Largest width or height of a source image or mask, in pixels.
    pub max_source_side: u32,
    /// Most LoRAs one request applies (in `loras` and `<lora:…>` tags together).
    pub max_loras: usize,
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
            max_source_bytes: 10 << 20,
            max_source_side: 4096,
            max_loras: 4,
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
    /// The LoRAs in the deployment's `loras` directory made for this model, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<String>,
    /// Those a request for this model cannot use: made for another model family, or in a
    /// layout not read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_loras: Vec<String>,
    /// The textual-inversion embeddings a prompt for this model can name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub embeddings: Vec<String>,
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
            loras: Vec::new(),
            other_loras: Vec::new(),
            embeddings: Vec::new(),
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
    /// With a source image: how far from it the result may go, above 0 up to 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// With a source image: pixels added around it for the model to paint in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outpaint: Option<Outpaint>,
    /// From text: a second pass at a larger size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hires: Option<HiresRequest>,
    /// LoRAs to apply, beside any `<lora:NAME:WEIGHT>` tags in the prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loras: Option<Vec<LoraWeight>>,
}

/// A second pass at a larger size, as a client asks for it (A1111's "hires fix"): the first
/// pass's latents upscaled by `scale`, then denoised again there.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HiresRequest {
    /// The final size over `size`, above 1 and at most 4 (A1111's `hr_scale`); the final
    /// sides are rounded to multiples of 8.
    pub scale: f32,
    /// The second pass's schedule (A1111's `hr_second_pass_steps`; default: `steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// The share of that schedule that runs (A1111's `denoising_strength`; default 0.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
}

/// A validated second pass: the scale asked for, the final size it made, its schedule and
/// the share that runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HiresFix {
    pub scale: f32,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub strength: f32,
}

/// The second pass's strength when a request names none: A1111's.
pub const DEFAULT_HIRES_STRENGTH: f32 = 0.7;
/// The largest hires scale.
pub const MAX_HIRES_SCALE: f32 = 4.0;

/// What a job starts from when it has a source image (stored beside the job, at the job's
/// size): image-to-image, or inpainting when part of it is masked for repainting.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Init {
    /// The share of the schedule that runs: `⌊steps × strength⌋` steps, from the source's
    /// latents noised to that level.
    pub strength: f32,
    /// Part of the image is repainted and the rest kept (inpainting, outpainting).
    pub masked: bool,
}

/// The strength a request with a source image gets when it names none: A1111's for
/// image-to-image, everything for inpainting (the masked area starts from noise).
pub const DEFAULT_STRENGTH: f32 = 0.75;
pub const DEFAULT_INPAINT_STRENGTH: f32 = 1.0;

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
    /// The source image the job starts from, if any.
    pub init: Option<Init>,
    /// A second pass at a larger size, if any.
    pub hires: Option<HiresFix>,
    /// The LoRAs applied (from `loras` and the prompt's tags), sorted by name.
    pub loras: Vec<LoraWeight>,
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
    pub init: Option<Init>,
    pub hires: Option<HiresFix>,
    pub loras: Vec<LoraWeight>,
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
const MAX_LORAS: usize = 32;

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
        if let Some(init) = parts.init {
            check_strength(init.strength, parts.steps)?;
        }
        if let Some(h) = parts.hires {
            let fits = h.scale.is_finite()
                && h.scale > 1.0
                && h.scale <= MAX_HIRES_SCALE
                && h.width >= parts.width
                && h.height >= parts.height
                && h.width % 8 == 0
                && h.height % 8 == 0
                && h.width <= MAX_SIDE
                && h.height <= MAX_SIDE
                && (1..=MAX_STEPS).contains(&h.steps)
                && h.strength.is_finite()
                && h.strength > 0.0
                && h.strength <= 1.0
                && steps_run(h.steps, h.strength) > 0
                && parts.init.is_none();
            if !fits {
                return bad(
                    "hires",
                    format!("{h:?} is not a second pass validation allows"),
                );
            }
        }
        let sorted = parts.loras.windows(2).all(|w| w[0].name < w[1].name);
        let loras_fit = parts.loras.len() <= MAX_LORAS
            && sorted
            && parts.loras.iter().all(|l| {
                is_lora_name(&l.name) && l.weight.is_finite() && l.weight.abs() <= MAX_LORA_WEIGHT
            });
        if !loras_fit {
            return bad(
                "loras",
                format!(
                    "at most {MAX_LORAS} LoRAs, each once, sorted by name, weights within ±{MAX_LORA_WEIGHT}"
                ),
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
            init,
            hires,
            loras,
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
            init,
            hires,
            loras,
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

    /// Checks every field against `limits` and `catalog`, with what is known of the source
    /// image the request came with (decoded and checked by [`crate::Source`]). A missing seed
    /// is drawn from `random_seed`, so this function stays free of randomness and easy to test.
    pub fn validate(
        self,
        limits: &Limits,
        catalog: &Catalog,
        source: Option<&SourceFacts>,
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

        let outpaint = self.outpaint.unwrap_or_default();
        if source.is_none() {
            if self.strength.is_some() {
                return Err(RequestError::new(
                    ErrorCode::InvalidStrength,
                    Some("strength"),
                    "strength applies to a source image; send one in image",
                ));
            }
            if self.outpaint.is_some() {
                return Err(RequestError::new(
                    ErrorCode::InvalidImage,
                    Some("outpaint"),
                    "outpaint extends a source image; send one in image",
                ));
            }
        }
        let (width, height) = match (self.size.as_deref(), source) {
            (Some(size), _) => parse_size(size, limits)?,
            (None, Some(facts)) => natural_size(
                facts,
                &outpaint,
                u64::from(model.default_width) * u64::from(model.default_height),
                limits.min_side,
                limits.max_side,
            ),
            (None, None) => (model.default_width, model.default_height),
        };
        if width
            < outpaint
                .left
                .saturating_add(outpaint.right)
                .saturating_add(8)
            || height < outpaint.up.saturating_add(outpaint.down).saturating_add(8)
        {
            return Err(RequestError::new(
                ErrorCode::InvalidImage,
                Some("outpaint"),
                format!(
                    "outpaint margins of {}+{} by {}+{} pixels leave no room for the image on a {width}x{height} canvas",
                    outpaint.left, outpaint.right, outpaint.up, outpaint.down
                ),
            ));
        }

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

        let hires = match self.hires {
            None => None,
            Some(asked) => Some(check_hires(&asked, width, height, steps, source, limits)?),
        };
        let init = match source {
            None => None,
            Some(facts) => {
                let strength = self.strength.unwrap_or(if facts.masked {
                    DEFAULT_INPAINT_STRENGTH
                } else {
                    DEFAULT_STRENGTH
                });
                check_strength(strength, steps)?;
                Some(Init {
                    strength,
                    masked: facts.masked,
                })
            }
        };

        let loras = check_loras(self.loras.unwrap_or_default(), &prompt, model, limits)?;

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
            init,
            hires,
            loras,
        })
    }
}

/// The LoRAs a request applies: those of `loras` and the prompt's `<lora:…>` tags, each
/// known to the model and made for its family, each once, weights in range, at most
/// `limits.max_loras`; sorted by name.
fn check_loras(
    asked: Vec<LoraWeight>,
    prompt: &str,
    model: &ModelEntry,
    limits: &Limits,
) -> Result<Vec<LoraWeight>, RequestError> {
    let invalid = |field: &'static str, message: String| {
        Err(RequestError::new(
            ErrorCode::InvalidLora,
            Some(field),
            message,
        ))
    };
    let tags = match lora_tags(prompt) {
        Ok(tags) => tags,
        Err(why) => return invalid("prompt", why),
    };
    let mut loras: Vec<LoraWeight> = asked.into_iter().chain(tags).collect();
    let most = limits.max_loras.min(MAX_LORAS);
    if loras.len() > most {
        return invalid(
            "loras",
            format!(
                "at most {most} LoRAs per request (in loras and <lora:…> tags together); got {}",
                loras.len()
            ),
        );
    }
    for lora in &loras {
        if !model.loras.contains(&lora.name) {
            if model.other_loras.contains(&lora.name) {
                return invalid(
                    "loras",
                    format!(
                        "LoRA {:?} cannot be used with {}: it is made for another model family, \
                         or in a layout not read here (the service logged which at start)",
                        lora.name, model.name
                    ),
                );
            }
            let known = match model.loras.len() {
                0 => "none".to_string(),
                n if n <= 20 => model.loras.join(", "),
                n => format!("{}, and {} more", model.loras[..20].join(", "), n - 20),
            };
            return Err(RequestError::new(
                ErrorCode::UnknownLora,
                Some("loras"),
                format!(
                    "LoRA {:?} is not served for {}; available: {known}",
                    lora.name, model.name
                ),
            ));
        }
        if !(lora.weight.is_finite() && lora.weight.abs() <= MAX_LORA_WEIGHT) {
            return invalid(
                "loras",
                format!(
                    "LoRA {:?}: the weight must be from -{MAX_LORA_WEIGHT} to {MAX_LORA_WEIGHT}; got {}",
                    lora.name, lora.weight
                ),
            );
        }
    }
    loras.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(twice) = loras.windows(2).find(|w| w[0].name == w[1].name) {
        return invalid("loras", format!("LoRA {:?} is named twice", twice[0].name));
    }
    Ok(loras)
}

/// A second pass as asked, checked against the first pass and the limits.
fn check_hires(
    asked: &HiresRequest,
    width: u32,
    height: u32,
    steps: u32,
    source: Option<&SourceFacts>,
    limits: &Limits,
) -> Result<HiresFix, RequestError> {
    let invalid = |message: String| {
        Err(RequestError::new(
            ErrorCode::InvalidHires,
            Some("hires"),
            message,
        ))
    };
    if source.is_some() {
        return invalid("hires follows text-to-image; it does not apply to a source image".into());
    }
    let scale = asked.scale;
    if !(scale.is_finite() && scale > 1.0 && scale <= MAX_HIRES_SCALE) {
        return invalid(format!(
            "hires.scale must be above 1 and at most {MAX_HIRES_SCALE}; got {scale}"
        ));
    }
    let side = |base: u32| ((f64::from(base) * f64::from(scale) / 8.0).round() as u32) * 8;
    let (w, h) = (side(width), side(height));
    if w > limits.max_side || h > limits.max_side {
        return invalid(format!(
            "hires.scale {scale} makes {w}x{h}; width and height may be at most {}",
            limits.max_side
        ));
    }
    let hires_steps = asked.steps.unwrap_or(steps);
    if !(limits.min_steps..=limits.max_steps).contains(&hires_steps) {
        return invalid(format!(
            "hires.steps must be between {} and {}; got {hires_steps}",
            limits.min_steps, limits.max_steps
        ));
    }
    let strength = asked.strength.unwrap_or(DEFAULT_HIRES_STRENGTH);
    if let Err(e) = check_strength(strength, hires_steps) {
        return invalid(format!("hires.{}", e.message));
    }
    Ok(HiresFix {
        scale,
        width: w,
        height: h,
        steps: hires_steps,
        strength,
    })
}

/// The denoising steps a schedule of `steps` runs from a source image at `strength`
/// (diffusers' rule: the schedule's last `⌊steps × strength⌋` steps).
/// The strength is taken as the decimal it was written as (0.7, not 0.699999988 of its f32),
/// so 20 steps at 0.7 run 14, as diffusers' and A1111's Python does.
pub fn steps_run(steps: u32, strength: f32) -> u32 {
    let strength: f64 = strength
        .to_string()
        .parse()
        .unwrap_or_else(|_| f64::from(strength));
    ((f64::from(steps) * strength) as u32).min(steps)
}

fn check_strength(strength: f32, steps: u32) -> Result<(), RequestError> {
    let invalid = |message: String| {
        Err(RequestError::new(
            ErrorCode::InvalidStrength,
            Some("strength"),
            message,
        ))
    };
    if !(strength.is_finite() && strength > 0.0 && strength <= 1.0) {
        return invalid(format!(
            "strength must be above 0 and at most 1; got {strength}"
        ));
    }
    if steps_run(steps, strength) == 0 {
        return invalid(format!(
            "strength {strength} of {steps} steps runs no step; steps × strength must be at least 1"
        ));
    }
    Ok(())
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
        if let Some(init) = self.init {
            text.push_str(&format!(", Denoising strength: {}", init.strength));
        }
        if let Some(h) = self.hires {
            text.push_str(&format!(
                ", Denoising strength: {}, Hires upscale: {}, Hires resize: {}x{}, Hires steps: {}, Hires upscaler: Latent",
                h.strength,
                self.hires_scale().unwrap_or(1.0),
                h.width,
                h.height,
                h.steps
            ));
        }
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
            strength: self.init.map(|init| init.strength),
            // The stored source is the whole canvas already.
            outpaint: None,
            hires: self.hires.map(|h| HiresRequest {
                scale: h.scale,
                steps: Some(h.steps),
                strength: Some(h.strength),
            }),
            // The prompt names its own LoRAs again; the rest came in `loras`.
            loras: {
                let tagged = lora_tags(&self.prompt).unwrap_or_default();
                let rest: Vec<LoraWeight> = self
                    .loras
                    .iter()
                    .filter(|l| !tagged.iter().any(|t| t.name == l.name))
                    .cloned()
                    .collect();
                (!rest.is_empty()).then_some(rest)
            },
        }
    }

    /// The hires pass's scale, as asked.
    pub fn hires_scale(&self) -> Option<f32> {
        self.hires.map(|h| h.scale)
    }

    /// The size the images come out at.
    pub fn output_size(&self) -> (u32, u32) {
        self.hires
            .map_or((self.width, self.height), |h| (h.width, h.height))
    }

    /// What the job costs a GPU, in units of one SD 1.5 denoising step at 512×512:
    /// `steps × (width × height / 512²) × n × model_factor(model)`. The scaler sizes the
    /// pool by it.
    pub fn cost(&self) -> f64 {
        let first = job_cost(
            &self.model,
            self.width,
            self.height,
            self.steps_run(),
            self.n,
        );
        let second = self.hires.map_or(0.0, |h| {
            job_cost(
                &self.model,
                h.width,
                h.height,
                steps_run(h.steps, h.strength),
                self.n,
            )
        });
        first + second
    }

    /// The denoising steps that run: all of them from text, the strength's share from a
    /// source image.
    pub fn steps_run(&self) -> u32 {
        match self.init {
            None => self.steps,
            Some(init) => steps_run(self.steps, init.strength),
        }
    }

    /// Jobs with equal batch keys can run as one batch on the GPU. The model comes first
    /// ([`model_of_batch_key`] reads it back; model names never hold `|`).
    pub fn batch_key(&self) -> String {
        let base = format!(
            "{}|{}x{}|{}|{}",
            self.model, self.width, self.height, self.steps, self.scheduler
        );
        let base = match self.init {
            None => base,
            Some(init) => format!(
                "{base}|{}{}",
                if init.masked { "inpaint@" } else { "img2img@" },
                init.strength
            ),
        };
        let base = match self.hires {
            None => base,
            Some(h) => format!(
                "{base}|hires@{}x{}/{}/{}",
                h.width, h.height, h.steps, h.strength
            ),
        };
        if self.loras.is_empty() {
            return base;
        }
        // The set by a digest: batch keys are stored in the clear, the sets' names are not.
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        for l in &self.loras {
            digest.update(format!("{}:{}\n", l.name, l.weight));
        }
        format!("{base}|lora@{}", hex::encode(&digest.finalize()[..12]))
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
        r.validate(&Limits::default(), &catalog(), None, || 42)
    }

    #[test]
    fn loras_come_from_the_field_and_the_prompts_tags_known_once_and_in_range() {
        let mut model = ModelEntry::new("tiny", 512);
        model.loras = vec!["film".into(), "watercolor".into()];
        model.other_loras = vec!["xl-style".into()];
        let catalog = Catalog {
            models: vec![model],
        };
        let lora = |name: &str, weight: f32| LoraWeight {
            name: name.into(),
            weight,
        };
        let check = |prompt: &str, loras: Option<Vec<LoraWeight>>| {
            ImageRequest {
                prompt: prompt.into(),
                loras,
                ..Default::default()
            }
            .validate(&Limits::default(), &catalog, None, || 42)
        };
        let ok = check(
            "a corgi <lora:watercolor:0.6>",
            Some(vec![lora("film", -0.5)]),
        )
        .expect("valid");
        assert_eq!(ok.loras, [lora("film", -0.5), lora("watercolor", 0.6)]);
        assert_eq!(ok.prompt, "a corgi <lora:watercolor:0.6>", "kept as given");
        let key = ok.batch_key();
        assert!(key.contains("|lora@") && !key.contains("film"), "{key}");
        let plain = check("a corgi", None).expect("valid");
        assert!(!plain.batch_key().contains("lora@"));
        let other = check("a corgi <lora:watercolor:0.7> <lora:film:-0.5>", None).expect("valid");
        assert_ne!(other.batch_key(), key, "another weight, another batch");
        let same = check("a corgi <lora:watercolor:0.6> <lora:film:-0.5>", None).expect("valid");
        assert_eq!(same.batch_key(), key, "the same set, in any order");
        // A re-roll names the tagged one again through its prompt, the other in `loras`.
        let again = ok.again(1);
        assert_eq!(again.loras, Some(vec![lora("film", -0.5)]));
        assert_eq!(
            again
                .validate(&Limits::default(), &catalog, None, || 1)
                .expect("again")
                .loras,
            ok.loras
        );

        for (prompt, loras, code, mention) in [
            (
                "x",
                vec![lora("nope", 1.0)],
                ErrorCode::UnknownLora,
                "\"nope\"",
            ),
            (
                "x",
                vec![lora("xl-style", 1.0)],
                ErrorCode::InvalidLora,
                "another model family",
            ),
            (
                "x",
                vec![lora("film", 4.5)],
                ErrorCode::InvalidLora,
                "from -4 to 4",
            ),
            (
                "x",
                vec![lora("film", f32::NAN)],
                ErrorCode::InvalidLora,
                "from -4 to 4",
            ),
            (
                "x <lora:film>",
                vec![lora("film", 1.0)],
                ErrorCode::InvalidLora,
                "named twice",
            ),
            (
                "x <lora:film:heavy>",
                vec![],
                ErrorCode::InvalidLora,
                "not a number",
            ),
            (
                "x <lora:gone:1>",
                vec![],
                ErrorCode::UnknownLora,
                "\"gone\"",
            ),
            (
                "x <lora:film><lora:watercolor>",
                vec![lora("a", 1.0), lora("b", 1.0), lora("c", 1.0)],
                ErrorCode::InvalidLora,
                "at most 4",
            ),
        ] {
            let err = check(prompt, Some(loras)).expect_err(prompt);
            assert_eq!(err.code, code, "{err}");
            assert!(err.message.contains(mention), "{err} should say {mention}");
        }
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
        .validate(&Limits::default(), &catalog(), None, || u32::MAX)
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
            .validate(&Limits::default(), &catalog(), None, || 99)
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

    #[test]
    fn a_source_image_sets_the_strength_the_size_and_the_batch() {
        let facts = SourceFacts {
            width: 1024,
            height: 768,
            masked: false,
        };
        let with = |r: ImageRequest, facts: &SourceFacts| {
            r.validate(&Limits::default(), &catalog(), Some(facts), || 42)
        };
        let text = check(req("a")).expect("text");
        let img = with(req("a"), &facts).expect("img2img");
        assert_eq!(
            img.init,
            Some(Init {
                strength: DEFAULT_STRENGTH,
                masked: false
            })
        );
        // The source's aspect at the model's default area.
        assert_eq!((img.width, img.height), (592, 440));
        let inpaint = with(
            ImageRequest {
                size: Some("512x512".into()),
                ..req("a")
            },
            &SourceFacts {
                masked: true,
                ..facts
            },
        )
        .expect("inpaint");
        assert_eq!(inpaint.init.map(|i| i.strength), Some(1.0));
        assert_eq!((inpaint.width, inpaint.height), (512, 512));
        // Three kinds of job, three batches; a fraction of the steps costs that fraction.
        let text_512 = text.batch_key();
        assert_ne!(text_512, inpaint.batch_key());
        assert!(
            inpaint.batch_key().starts_with(&text_512),
            "{}",
            inpaint.batch_key()
        );
        let half = with(
            ImageRequest {
                size: Some("512x512".into()),
                strength: Some(0.5),
                ..req("a")
            },
            &facts,
        )
        .expect("half");
        assert_eq!(half.steps_run(), 10);
        assert!((half.cost() - text.cost() / 2.0).abs() < 1e-9);
        assert!(half
            .parameters_text(0)
            .ends_with(", Denoising strength: 0.5"));
        assert_eq!(half.again(1).strength, Some(0.5));

        let refusals: Vec<(ImageRequest, Option<&SourceFacts>, ErrorCode, &str, &str)> = vec![
            (
                ImageRequest {
                    strength: Some(0.5),
                    ..req("a")
                },
                None,
                ErrorCode::InvalidStrength,
                "strength",
                "send one in image",
            ),
            (
                ImageRequest {
                    outpaint: Some(Outpaint {
                        left: 64,
                        ..Outpaint::default()
                    }),
                    ..req("a")
                },
                None,
                ErrorCode::InvalidImage,
                "outpaint",
                "send one in image",
            ),
            (
                ImageRequest {
                    strength: Some(1.5),
                    ..req("a")
                },
                Some(&facts),
                ErrorCode::InvalidStrength,
                "strength",
                "got 1.5",
            ),
            (
                ImageRequest {
                    strength: Some(0.0),
                    ..req("a")
                },
                Some(&facts),
                ErrorCode::InvalidStrength,
                "strength",
                "above 0",
            ),
            (
                ImageRequest {
                    strength: Some(0.04),
                    ..req("a")
                },
                Some(&facts),
                ErrorCode::InvalidStrength,
                "strength",
                "runs no step",
            ),
            (
                ImageRequest {
                    size: Some("512x512".into()),
                    outpaint: Some(Outpaint {
                        left: 256,
                        right: 256,
                        ..Outpaint::default()
                    }),
                    ..req("a")
                },
                Some(&facts),
                ErrorCode::InvalidImage,
                "outpaint",
                "no room",
            ),
        ];
        for (r, source, code, param, mention) in refusals {
            let err = r
                .validate(&Limits::default(), &catalog(), source, || 1)
                .expect_err("refused");
            assert_eq!((err.code, err.param), (code, Some(param)), "{err}");
            assert!(err.message.contains(mention), "{err} should say {mention}");
        }
        // A stored request with a strength no validation allows is not read back.
        let mut parts = RequestParts {
            prompt: "a".into(),
            negative_prompt: String::new(),
            model: "tiny".into(),
            width: 64,
            height: 64,
            steps: 4,
            guidance_scale: 7.5,
            seed: 1,
            scheduler: Scheduler::Euler,
            n: 1,
            init: Some(Init {
                strength: f32::NAN,
                masked: false,
            }),
            hires: None,
            loras: Vec::new(),
        };
        assert!(ValidImageRequest::from_parts(parts.clone()).is_err());
        parts.init = Some(Init {
            strength: 0.5,
            masked: true,
        });
        assert!(ValidImageRequest::from_parts(parts).is_ok());
    }

    #[test]
    fn a_second_pass_scales_the_size_and_counts_in_the_cost() {
        let hires = |scale: f32, steps: Option<u32>, strength: Option<f32>| ImageRequest {
            size: Some("512x384".into()),
            steps: Some(20),
            hires: Some(HiresRequest {
                scale,
                steps,
                strength,
            }),
            ..req("a")
        };
        let v = check(hires(1.5, None, None)).expect("hires");
        assert_eq!(
            v.hires,
            Some(HiresFix {
                scale: 1.5,
                width: 768,
                height: 576,
                steps: 20,
                strength: DEFAULT_HIRES_STRENGTH
            })
        );
        assert_eq!(v.output_size(), (768, 576));
        assert_eq!(
            (v.width, v.height),
            (512, 384),
            "the first pass keeps the size"
        );
        let plain = check(ImageRequest {
            hires: None,
            ..hires(1.5, None, None)
        })
        .expect("plain");
        // 14 more steps (⌊20 × 0.7⌋, the decimal as written) at 2.25 times the pixels.
        assert_eq!(steps_run(20, 0.7), 14);
        assert_eq!(steps_run(10, 0.3), 3);
        assert!((v.cost() - plain.cost() * (1.0 + 14.0 / 20.0 * 2.25)).abs() < 1e-9);
        assert_ne!(v.batch_key(), plain.batch_key());
        assert!(v.parameters_text(0).ends_with(
            "Hires upscale: 1.5, Hires resize: 768x576, Hires steps: 20, Hires upscaler: Latent"
        ));
        let again = v
            .again(1)
            .validate(&Limits::default(), &catalog(), None, || 3)
            .expect("again");
        assert_eq!(again.hires, v.hires);
        // A scale whose sides round differently keeps its size when the job is made again.
        let odd = check(ImageRequest {
            size: Some("512x768".into()),
            ..hires(1.26, None, None)
        })
        .expect("odd scale");
        assert_eq!(odd.output_size(), (648, 968));
        let again = odd
            .again(1)
            .validate(&Limits::default(), &catalog(), None, || 5)
            .expect("again");
        assert_eq!(again.output_size(), (648, 968));

        for (r, mention) in [
            (hires(1.0, None, None), "above 1"),
            (hires(f32::NAN, None, None), "above 1"),
            (hires(5.0, None, None), "at most 4"),
            (
                ImageRequest {
                    size: Some("768x768".into()),
                    ..hires(3.0, None, None)
                },
                "2304x2304",
            ),
            (hires(2.0, Some(0), None), "hires.steps"),
            (hires(2.0, None, Some(1.5)), "hires.strength"),
            (hires(2.0, Some(2), Some(0.3)), "runs no step"),
        ] {
            let err = check(r).expect_err("refused");
            assert_eq!(
                (err.code, err.param),
                (ErrorCode::InvalidHires, Some("hires"))
            );
            assert!(err.message.contains(mention), "{err} should say {mention}");
        }
        let facts = SourceFacts {
            width: 64,
            height: 64,
            masked: false,
        };
        let err = hires(2.0, None, None)
            .validate(&Limits::default(), &catalog(), Some(&facts), || 1)
            .expect_err("not with a source");
        assert_eq!(err.code, ErrorCode::InvalidHires);
    }
}
