//! LoRAs beside a model: listed with it, applied per request through `loras` or a
//! `<lora:NAME:WEIGHT>` tag (the same image either way, and the one `sparkle generate --lora`
//! makes), refused by name when unknown or made for another model family, and suggested by
//! `/sparkle`'s autocomplete.

use crate::discord::{key as discord_key, send, FakeDiscord};
use crate::image_to_image::run;
use crate::support::{generate_with, png_pixels, tiny_model, Service};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;

/// The names and shapes of a safetensors file's tensors, from its header.
fn shapes(file: &Path) -> Vec<(String, Vec<usize>)> {
    let bytes = std::fs::read(file).expect("read");
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("length")) as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes[8..8 + len]).expect("header");
    let mut found: Vec<(String, Vec<usize>)> = header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, info)| {
            let shape = info["shape"]
                .as_array()
                .expect("shape")
                .iter()
                .map(|d| d.as_u64().expect("dim") as usize)
                .collect();
            (name, shape)
        })
        .collect();
    found.sort();
    found
}

/// A safetensors file of f32 tensors.
fn save(file: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, shape, values) in tensors {
        let start = data.len();
        data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut header = Value::Object(header).to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&data);
    std::fs::write(file, bytes).expect("save");
}

fn wave(n: usize, seed: f32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| scale * (i as f32 * 0.37 + seed).sin())
        .collect()
}

/// A kohya-ss LoRA of rank 2 on every attention projection of the tiny UNet.
fn write_lora(model: &Path, file: &Path) {
    let unet = shapes(&model.join("unet/diffusion_pytorch_model.safetensors"));
    let mut tensors = Vec::new();
    for (i, (name, shape)) in unet.iter().enumerate() {
        let projection = [".to_q.weight", ".to_k.weight", ".to_v.weight"];
        if !projection.iter().any(|p| name.ends_with(p)) {
            continue;
        }
        let key = format!(
            "lora_unet_{}",
            name.trim_end_matches(".weight").replace('.', "_")
        );
        let (out, input) = (shape[0], shape[1]);
        tensors.push((
            format!("{key}.lora_down.weight"),
            vec![2, input],
            wave(2 * input, i as f32, 0.5),
        ));
        tensors.push((
            format!("{key}.lora_up.weight"),
            vec![out, 2],
            wave(2 * out, i as f32 + 1.0, 0.5),
        ));
    }
    assert!(
        !tensors.is_empty(),
        "the tiny UNet has attention projections"
    );
    save(file, &tensors);
}

/// A file for SDXL's second text encoder, which SD 1.5 does not have.
fn write_other_family(file: &Path) {
    let key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    save(
        file,
        &[
            (
                format!("{key}.lora_down.weight"),
                vec![2, 32],
                wave(64, 0.0, 0.1),
            ),
            (
                format!("{key}.lora_up.weight"),
                vec![32, 2],
                wave(64, 1.0, 0.1),
            ),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_beside_the_model_is_listed_applied_by_field_or_tag_and_refused_by_name() {
    let models = tempfile::tempdir().expect("tempdir");
    let model = models.path().join("tiny-lora");
    std::os::unix::fs::symlink(tiny_model(), &model).expect("symlink");
    let loras = models.path().join("loras");
    std::fs::create_dir(&loras).expect("loras");
    write_lora(tiny_model(), &loras.join("style.safetensors"));
    write_other_family(&loras.join("xl-only.safetensors"));

    let fake = Arc::new(FakeDiscord::default());
    let public = hex::encode(discord_key().verifying_key().to_bytes());
    let api = fake.serve().await;
    let served = format!("[{:?}]", model.display().to_string());
    let svc = Service::start(&[
        ("SPARKLE_MODELS", served.as_str()),
        ("SPARKLE_DISCORD__PUBLIC_KEY", public.as_str()),
        ("SPARKLE_DISCORD__API_BASE", api.as_str()),
    ])
    .await;
    let key = &svc.admin_key;

    let listed = svc.get_json("/v1/models", key).await;
    let by_id = |id: &str| {
        listed["data"]
            .as_array()
            .expect("data")
            .iter()
            .find(|m| m["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} is not listed: {listed}"))
    };
    assert_eq!(by_id("tiny-lora")["loras"], json!(["style"]), "{listed}");
    assert_eq!(by_id("tiny-model")["loras"], json!([]), "{listed}");

    let body = |prompt: &str, loras: Value| {
        let mut body = json!({"prompt": prompt, "model": "tiny-lora", "size": "64x64",
                              "steps": 3, "seed": 4});
        if !loras.is_null() {
            body["loras"] = loras;
        }
        body
    };
    let (plain_job, plain) = run(&svc, body("a lighthouse", Value::Null)).await;
    let (job, by_field) = run(
        &svc,
        body("a lighthouse", json!([{"name": "style", "weight": 1.5}])),
    )
    .await;
    let (_, by_tag) = run(&svc, body("a lighthouse <lora:style:1.5>", Value::Null)).await;
    assert_ne!(
        png_pixels(&plain),
        png_pixels(&by_field),
        "the LoRA changed nothing"
    );
    assert_eq!(
        png_pixels(&by_field),
        png_pixels(&by_tag),
        "the field and the tag apply the same LoRA, and the tag is not read as text"
    );
    assert_eq!(
        job["request"]["loras"],
        json!([{"name": "style", "weight": 1.5}]),
        "{job}"
    );
    assert!(plain_job["request"].get("loras").is_none(), "{plain_job}");

    // `sparkle generate --lora` makes the same image on one machine.
    let args = [
        "--size",
        "64x64",
        "--steps",
        "3",
        "--seed",
        "4",
        "--lora",
        "style:1.5",
    ];
    assert_eq!(
        png_pixels(&by_field),
        png_pixels(&generate_with(&model, "a lighthouse", &args))
    );

    // Refusals name the LoRA and queue nothing.
    let jobs = svc.job_count();
    for (model, loras, code, mention) in [
        (
            "tiny-lora",
            json!([{"name": "nope"}]),
            "unknown_lora",
            "\"nope\"",
        ),
        (
            "tiny-lora",
            json!([{"name": "xl-only"}]),
            "invalid_lora",
            "another model family",
        ),
        (
            "tiny-model",
            json!([{"name": "style"}]),
            "unknown_lora",
            "\"style\"",
        ),
        (
            "tiny-lora",
            json!([{"name": "style", "weight": 9}]),
            "invalid_lora",
            "-4 to 4",
        ),
    ] {
        let request = json!({"prompt": "x", "model": model, "loras": loras});
        let (status, err) = svc.post_json("/v1/jobs", &request, Some(key)).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["code"], code, "{err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{err} should say {mention}");
    }
    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "x <lora:nope:1>", "model": "tiny-lora"}),
            Some(key),
        )
        .await;
    assert_eq!(
        (status, &err["error"]["code"]),
        (400, &json!("unknown_lora")),
        "{err}"
    );
    assert_eq!(svc.job_count(), jobs, "a refused request queues nothing");

    // /sparkle suggests the model's LoRAs as they are typed, and tags in the prompt.
    let typing = |options: Value| {
        json!({
            "id": "1", "application_id": "900", "type": 4, "token": "tok", "version": 1,
            "channel_id": "600", "user": {"id": "42", "username": "ada"},
            "data": {"id": "77", "name": "sparkle", "type": 1, "options": options},
        })
    };
    let (status, answer) = send(
        &svc,
        &typing(json!([
            {"name": "prompt", "type": 3, "value": "a corgi"},
            {"name": "model", "type": 3, "value": "tiny-lora"},
            {"name": "lora", "type": 3, "value": "st", "focused": true},
        ])),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["type"], 8, "{answer}");
    assert_eq!(
        answer["data"]["choices"],
        json!([{"name": "style", "value": "style"}])
    );
    let (_, answer) = send(
        &svc,
        &typing(json!([
            {"name": "prompt", "type": 3, "value": "a corgi <lora:s", "focused": true},
            {"name": "model", "type": 3, "value": "tiny-lora"},
        ])),
    )
    .await;
    assert_eq!(
        answer["data"]["choices"][0]["value"], "a corgi <lora:style:1>",
        "{answer}"
    );
    let (_, answer) = send(
        &svc,
        &typing(json!([{"name": "lora", "type": 3, "value": "", "focused": true}])),
    )
    .await;
    assert_eq!(
        answer["data"]["choices"],
        json!([]),
        "the default model has no LoRAs: {answer}"
    );
}
