//! What a checkpoint's tensors cannot say: whether the UNet predicts noise or velocity, the
//! size it was trained at, and whether it is distilled for a few steps (SD-Turbo,
//! SDXL-Turbo). Each comes from the first of:
//!
//! 1. the settings file beside the checkpoint, `NAME.sparkle.json` for `NAME.safetensors`
//!    ([`Settings`]): how a user says what nothing else does;
//! 2. the file's ModelSpec metadata: `modelspec.prediction_type` (`epsilon` or `v`),
//!    `modelspec.resolution` (`768x768`), then `modelspec.architecture`
//!    (`stable-diffusion-v2-512` is epsilon at 512, `stable-diffusion-v2-768-v` velocity at
//!    768);
//! 3. the family: SD 1.x epsilon at 512; SD 2.x velocity at 768 (what diffusers assumes for a
//!    2.x file), or epsilon at 512 when said to be epsilon or few-step; SDXL epsilon at 1024,
//!    512 when few-step.

use crate::config::Prediction;
use crate::model::Architecture;
use crate::EngineError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub(crate) const SPEC_ARCHITECTURE: &str = "modelspec.architecture";
const SPEC_PREDICTION: &str = "modelspec.prediction_type";
/// The same, as ComfyUI writes it.
const SPEC_PREDICT_KEY: &str = "modelspec.predict_key";
const SPEC_RESOLUTION: &str = "modelspec.resolution";

/// The settings file beside a checkpoint, for what neither its tensors nor its metadata say:
///
/// ```json
/// { "prediction_type": "epsilon", "turbo": true, "native_size": 512 }
/// ```
///
/// Every field is optional; unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    /// `epsilon` or `v_prediction`.
    pub prediction_type: Option<Prediction>,
    /// Distilled for a few steps on "trailing" timesteps: one step without guidance by
    /// default, 512 pixels and epsilon unless said otherwise.
    #[serde(default)]
    pub turbo: bool,
    /// The side, in pixels, of the images the model was trained on.
    pub native_size: Option<usize>,
}

impl Settings {
    /// `NAME.sparkle.json` for `NAME.safetensors`.
    pub fn path(checkpoint: &Path) -> PathBuf {
        let stem = checkpoint.file_stem().unwrap_or_default().to_string_lossy();
        checkpoint.with_file_name(format!("{stem}.sparkle.json"))
    }

    /// The settings file beside `checkpoint`; none there means no settings.
    pub fn beside(checkpoint: &Path) -> Result<Self, EngineError> {
        let path = Self::path(checkpoint);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Settings::default()),
            Err(e) => return Err(EngineError::io(&path, e)),
        };
        serde_json::from_str(&text).map_err(|e| EngineError::invalid_model(&path, e.to_string()))
    }
}

/// What was chosen for a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Variant {
    pub prediction: Prediction,
    /// Pixels per side.
    pub native_size: usize,
    /// A few-step model with a "trailing" schedule.
    pub turbo: bool,
}

/// What ModelSpec metadata says, when it says it about this family.
#[derive(Debug, Default)]
struct Spec {
    prediction: Option<Prediction>,
    native_size: Option<usize>,
}

impl Spec {
    fn read(
        architecture: Architecture,
        metadata: &HashMap<String, String>,
        file: &Path,
    ) -> Result<Self, EngineError> {
        let bad = |key: &str, value: &str, expected: &str| {
            EngineError::invalid_model(
                file,
                format!("metadata {key} is {value:?}; expected {expected}"),
            )
        };
        let mut spec = Spec::default();
        if let Some(said) = metadata.get(SPEC_ARCHITECTURE) {
            let family = if said.starts_with("stable-diffusion-xl-") {
                Some(Architecture::Sdxl)
            } else if said.starts_with("stable-diffusion-v2") {
                Some(Architecture::Sd21)
            } else if said.starts_with("stable-diffusion-v1") {
                Some(Architecture::Sd15)
            } else {
                None
            };
            if family != Some(architecture) {
                // The tensors decide; merges often carry a parent's metadata.
                tracing::warn!(
                    file = %file.display(), metadata = %said, tensors = %architecture,
                    "the checkpoint's metadata names another architecture than its tensors; \
                     its metadata is ignored"
                );
                return Ok(spec);
            }
            if said.contains("768") {
                spec.native_size = Some(768);
            } else if said.contains("512") {
                spec.native_size = Some(512);
            }
            if said.ends_with("-v") {
                spec.prediction = Some(Prediction::VPrediction);
            } else if said.starts_with("stable-diffusion-v2-512") {
                spec.prediction = Some(Prediction::Epsilon);
            }
        }
        for key in [SPEC_PREDICTION, SPEC_PREDICT_KEY] {
            if let Some(value) = metadata.get(key) {
                spec.prediction = Some(match value.as_str() {
                    "epsilon" | "eps" => Prediction::Epsilon,
                    "v" | "v_prediction" | "v-prediction" => Prediction::VPrediction,
                    other => return Err(bad(key, other, "epsilon or v")),
                });
                break;
            }
        }
        if let Some(value) = metadata.get(SPEC_RESOLUTION) {
            let side = value
                .split_once('x')
                .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
                .map(|(w, h): (usize, usize)| w.max(h))
                .filter(|&side| side > 0)
                .ok_or_else(|| bad(SPEC_RESOLUTION, value, "WIDTHxHEIGHT"))?;
            spec.native_size = Some(side);
        }
        Ok(spec)
    }
}

impl Variant {
    pub fn choose(
        architecture: Architecture,
        metadata: &HashMap<String, String>,
        settings: &Settings,
        file: &Path,
    ) -> Result<Self, EngineError> {
        let spec = Spec::read(architecture, metadata, file)?;
        let turbo = settings.turbo;
        let prediction =
            settings
                .prediction_type
                .or(spec.prediction)
                .unwrap_or(match architecture {
                    Architecture::Sd21 if !turbo => Prediction::VPrediction,
                    _ => Prediction::Epsilon,
                });
        let native_size = settings
            .native_size
            .or(spec.native_size)
            .unwrap_or(match architecture {
                Architecture::Sd15 => 512,
                Architecture::Sd21 if prediction == Prediction::VPrediction && !turbo => 768,
                Architecture::Sd21 => 512,
                Architecture::Sdxl if turbo => 512,
                Architecture::Sdxl => 1024,
            });
        Ok(Variant {
            prediction,
            native_size,
            turbo,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn choose(
        architecture: Architecture,
        metadata: &[(&str, &str)],
        settings: &Settings,
    ) -> Result<Variant, EngineError> {
        let metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Variant::choose(
            architecture,
            &metadata,
            settings,
            Path::new("x.safetensors"),
        )
    }

    fn variant(prediction: Prediction, native_size: usize, turbo: bool) -> Variant {
        Variant {
            prediction,
            native_size,
            turbo,
        }
    }

    #[test]
    fn settings_then_metadata_then_the_family_decide() {
        use Architecture::*;
        use Prediction::*;
        let none = Settings::default();
        assert_eq!(
            choose(Sd15, &[], &none).ok(),
            Some(variant(Epsilon, 512, false))
        );
        assert_eq!(
            choose(Sd21, &[], &none).ok(),
            Some(variant(VPrediction, 768, false))
        );
        assert_eq!(
            choose(Sdxl, &[], &none).ok(),
            Some(variant(Epsilon, 1024, false))
        );
        let base = [(SPEC_ARCHITECTURE, "stable-diffusion-v2-512")];
        assert_eq!(
            choose(Sd21, &base, &none).ok(),
            Some(variant(Epsilon, 512, false))
        );
        let v = [(SPEC_ARCHITECTURE, "stable-diffusion-v2-768-v")];
        assert_eq!(
            choose(Sd21, &v, &none).ok(),
            Some(variant(VPrediction, 768, false))
        );
        let explicit = [
            (SPEC_ARCHITECTURE, "stable-diffusion-v1"),
            (SPEC_PREDICTION, "v"),
            (SPEC_RESOLUTION, "768x768"),
        ];
        assert_eq!(
            choose(Sd15, &explicit, &none).ok(),
            Some(variant(VPrediction, 768, false))
        );
        // Metadata about another family is ignored.
        assert_eq!(
            choose(Sd15, &v, &none).ok(),
            Some(variant(Epsilon, 512, false))
        );

        let turbo = Settings {
            turbo: true,
            ..Settings::default()
        };
        assert_eq!(
            choose(Sd21, &[], &turbo).ok(),
            Some(variant(Epsilon, 512, true))
        );
        assert_eq!(
            choose(Sdxl, &[], &turbo).ok(),
            Some(variant(Epsilon, 512, true))
        );
        let said = Settings {
            prediction_type: Some(Epsilon),
            native_size: Some(640),
            turbo: false,
        };
        assert_eq!(
            choose(Sd21, &v, &said).ok(),
            Some(variant(Epsilon, 640, false))
        );
    }

    #[test]
    fn malformed_metadata_and_settings_are_named() {
        let err = choose(
            Architecture::Sd15,
            &[(SPEC_PREDICTION, "x0")],
            &Settings::default(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains(SPEC_PREDICTION), "{err}");
        let err = choose(
            Architecture::Sd15,
            &[(SPEC_RESOLUTION, "big")],
            &Settings::default(),
        )
        .expect_err("refused");
        assert!(err.to_string().contains(SPEC_RESOLUTION), "{err}");

        let dir = tempfile::tempdir().expect("tempdir");
        let checkpoint = dir.path().join("model.safetensors");
        assert_eq!(
            Settings::beside(&checkpoint).ok(),
            Some(Settings::default())
        );
        let path = Settings::path(&checkpoint);
        assert_eq!(path, dir.path().join("model.sparkle.json"));
        std::fs::write(&path, r#"{"prediction": "v"}"#).expect("write");
        let err = Settings::beside(&checkpoint).expect_err("unknown field");
        assert!(err.to_string().contains("model.sparkle.json"), "{err}");
        std::fs::write(
            &path,
            r#"{"prediction_type": "v_prediction", "turbo": true}"#,
        )
        .expect("write");
        let settings = Settings::beside(&checkpoint).expect("settings");
        assert_eq!(settings.prediction_type, Some(Prediction::VPrediction));
        assert!(settings.turbo);
    }
}
