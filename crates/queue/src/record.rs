//! How the queue stores a request: its own record, read back through validation, so what the
//! database holds never becomes a [`ValidImageRequest`] unchecked.

use serde::{Deserialize, Serialize};
use sparkle_core::{HiresFix, Init, LoraWeight, RequestParts, Scheduler, ValidImageRequest};

/// A request as stored (sealed) in `jobs.request`.
#[derive(Serialize, Deserialize)]
pub struct StoredRequest {
    prompt: String,
    negative_prompt: String,
    model: String,
    width: u32,
    height: u32,
    steps: u32,
    guidance_scale: f32,
    seed: u32,
    scheduler: Scheduler,
    n: u32,
    /// The source image the job starts from (stored beside it), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    init: Option<Init>,
    /// A second pass at a larger size, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hires: Option<HiresFix>,
    /// The LoRAs applied, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    loras: Vec<LoraWeight>,
}

impl From<&ValidImageRequest> for StoredRequest {
    fn from(r: &ValidImageRequest) -> Self {
        StoredRequest {
            prompt: r.prompt.clone(),
            negative_prompt: r.negative_prompt.clone(),
            model: r.model.clone(),
            width: r.width,
            height: r.height,
            steps: r.steps,
            guidance_scale: r.guidance_scale,
            seed: r.seed,
            scheduler: r.scheduler,
            n: r.n,
            init: r.init,
            hires: r.hires,
            loras: r.loras.clone(),
        }
    }
}

impl StoredRequest {
    /// The stored JSON.
    pub fn encode(request: &ValidImageRequest) -> Result<String, String> {
        serde_json::to_string(&StoredRequest::from(request)).map_err(|e| e.to_string())
    }

    /// The request the stored JSON holds, once it passes validation again.
    pub fn decode(json: &str) -> Result<ValidImageRequest, String> {
        let r: StoredRequest = serde_json::from_str(json).map_err(|e| e.to_string())?;
        ValidImageRequest::from_parts(RequestParts {
            prompt: r.prompt,
            negative_prompt: r.negative_prompt,
            model: r.model,
            width: r.width,
            height: r.height,
            steps: r.steps,
            guidance_scale: r.guidance_scale,
            seed: r.seed,
            scheduler: r.scheduler,
            n: r.n,
            init: r.init,
            hires: r.hires,
            loras: r.loras,
        })
        .map_err(|e| e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_request_outside_what_validation_allows_is_not_read_back() {
        let good = r#"{"prompt":"a corgi","negative_prompt":"","model":"tiny","width":64,
            "height":64,"steps":4,"guidance_scale":7.5,"seed":1,"scheduler":"euler","n":1}"#;
        let request = StoredRequest::decode(good).expect("valid");
        assert_eq!((request.width, request.steps), (64, 4));
        let again = StoredRequest::encode(&request).expect("encode");
        assert_eq!(StoredRequest::decode(&again).expect("round trip"), request);
        for bad in [
            good.replace("\"width\":64", "\"width\":65"),
            good.replace("\"steps\":4", "\"steps\":100000"),
            good.replace("\"n\":1", "\"n\":0"),
            good.replace("\"model\":\"tiny\"", "\"model\":\"\""),
        ] {
            assert!(StoredRequest::decode(&bad).is_err(), "{bad}");
        }
    }
}
