//! Jobs that start from an image: image-to-image, inpainting and outpainting through the
//! whole service (gateway, sealed source in the store, the worker protocol, the engine),
//! and the images a client sends, checked before anything is enqueued.

use crate::support::{generate_with, png_info, png_pixels, tiny_model, Service, BIN};
use base64::Engine as _;
use serde_json::{json, Value};
use std::process::{Command, Stdio};

/// An RGB PNG of `width × height`, a gradient.
pub(crate) fn gradient(width: u32, height: u32) -> Vec<u8> {
    let pixels: Vec<u8> = (0..height)
        .flat_map(|y| (0..width).flat_map(move |x| [(x * 3) as u8, (y * 5) as u8, 90]))
        .collect();
    encode(width, height, png::ColorType::Rgb, &pixels)
}

/// A greyscale mask of `width × height`, white (repainted) left of `edge`.
fn left_mask(width: u32, height: u32, edge: u32) -> Vec<u8> {
    let pixels: Vec<u8> = (0..height)
        .flat_map(|_| (0..width).map(|x| if x < edge { 255 } else { 0 }))
        .collect();
    encode(width, height, png::ColorType::Grayscale, &pixels)
}

fn encode(width: u32, height: u32, color: png::ColorType, pixels: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("header");
    writer.write_image_data(pixels).expect("pixels");
    writer.finish().expect("finish");
    out
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `sparkle generate` from a source image with the tiny model on the CPU.
fn generate_from(source: &[u8], mask: Option<&[u8]>, args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("source.png");
    std::fs::write(&image, source).expect("write");
    let out = dir.path().join("out.png");
    let mut command = Command::new(BIN);
    command
        .args([
            "generate",
            "a lighthouse at dusk",
            "--device",
            "cpu",
            "--image",
        ])
        .arg(&image)
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg("--model")
        .arg(tiny_model())
        .stderr(Stdio::null());
    if let Some(mask) = mask {
        let path = dir.path().join("mask.png");
        std::fs::write(&path, mask).expect("write");
        command.arg("--mask").arg(path);
    }
    assert!(command.status().expect("generate").success());
    std::fs::read(out).expect("png")
}

pub(crate) async fn run(svc: &Service, body: Value) -> (Value, Vec<u8>) {
    let key = &svc.admin_key;
    let (status, job) = svc.post_json("/v1/jobs", &body, Some(key)).await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_string();
    let done = svc
        .wait_for(&id, key, |j| {
            j["status"] != "queued" && j["status"] != "running"
        })
        .await;
    assert_eq!(done["status"], "succeeded", "{done}\n{}", svc.log());
    let (status, png) = svc.get(&format!("/v1/jobs/{id}/images/0"), key).await;
    assert_eq!(status, 200);
    (done, png)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_start_from_an_image_a_mask_or_a_wider_canvas_as_generate_does() {
    let svc = Service::start(&[]).await;
    let source = gradient(96, 64);
    let mask = left_mask(96, 64, 40);

    // Image-to-image: half the schedule, recorded with the job and in the PNG.
    let (job, png) = run(
        &svc,
        json!({"prompt": "a lighthouse at dusk", "image": b64(&source), "strength": 0.5,
               "size": "64x64", "steps": 4, "seed": 3}),
    )
    .await;
    assert_eq!(
        (&job["request"]["source"], &job["request"]["strength"]),
        (&json!("image"), &json!(0.5)),
        "{job}"
    );
    let (w, h, parameters) = png_info(&png);
    assert_eq!((w, h), (64, 64));
    assert!(
        parameters.ends_with("Denoising strength: 0.5"),
        "{parameters}"
    );
    let solo = generate_from(
        &source,
        None,
        &[
            "--strength",
            "0.5",
            "--size",
            "64x64",
            "--steps",
            "4",
            "--seed",
            "3",
        ],
    );
    assert_eq!(
        png_pixels(&png),
        png_pixels(&solo),
        "the service's image is the one `sparkle generate` makes from the same source"
    );
    let (_, text) = run(
        &svc,
        json!({"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 4, "seed": 3}),
    )
    .await;
    assert_ne!(
        png_pixels(&png),
        png_pixels(&text),
        "the source changed nothing"
    );

    // Inpainting (a data: URL this time), and without a size the canvas keeps the
    // source's 3:2.
    let (job, png) = run(
        &svc,
        json!({"prompt": "a lighthouse at dusk",
               "image": format!("data:image/png;base64,{}", b64(&source)),
               "mask": b64(&mask), "steps": 4, "seed": 4}),
    )
    .await;
    assert_eq!(
        (&job["request"]["source"], &job["request"]["strength"]),
        (&json!("inpaint"), &json!(1.0)),
        "{job}"
    );
    let size = job["request"]["size"].as_str().expect("size").to_string();
    let (w, h, _) = png_info(&png);
    assert_eq!(format!("{w}x{h}"), size);
    assert!((f64::from(w) / f64::from(h) - 1.5).abs() < 0.05, "{size}");
    let solo = generate_from(&source, Some(&mask), &["--steps", "4", "--seed", "4"]);
    assert_eq!(png_pixels(&png), png_pixels(&solo));

    // Outpainting: 32 pixels more on the right.
    let (job, png) = run(
        &svc,
        json!({"prompt": "a lighthouse at dusk", "image": b64(&source), "size": "96x64",
               "outpaint": {"right": 32}, "steps": 4, "seed": 5}),
    )
    .await;
    assert_eq!(job["request"]["source"], "inpaint", "{job}");
    assert_eq!(png_info(&png).0, 96);
    let solo = generate_from(
        &source,
        None,
        &[
            "--size",
            "96x64",
            "--outpaint",
            "0,32,0,0",
            "--steps",
            "4",
            "--seed",
            "5",
        ],
    );
    assert_eq!(png_pixels(&png), png_pixels(&solo));

    // A photo-sized upload (3 MB of noise, past axum's own 2 MiB default) is taken.
    let mut state = 12345u32;
    let noise: Vec<u8> = (0..1000 * 1000 * 3)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 24) as u8
        })
        .collect();
    let photo = encode(1000, 1000, png::ColorType::Rgb, &noise);
    assert!(photo.len() > 2_500_000, "{} bytes", photo.len());
    let (job, png) = run(
        &svc,
        json!({"prompt": "a lighthouse at dusk", "image": b64(&photo), "size": "64x64",
               "steps": 2, "seed": 6}),
    )
    .await;
    assert_eq!(job["request"]["source"], "image");
    assert_eq!(png_info(&png).0, 64);

    // The source is stored sealed: no PNG anywhere under the data directory but sealed.
    let sources = svc.data_dir().join("images").join("sources");
    let stored: Vec<_> = std::fs::read_dir(&sources)
        .unwrap_or_else(|e| panic!("{}: {e}", sources.display()))
        .flatten()
        .collect();
    assert_eq!(stored.len(), 4, "one source per job");
    for file in stored {
        let bytes = std::fs::read(file.path()).expect("read");
        assert!(!bytes.windows(4).any(|w| w == b"\x89PNG"));
    }
    assert!(!svc.log().contains("panicked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_get_clear_refusals_and_enqueue_nothing() {
    let svc = Service::start(&[("SPARKLE_SCALER__MAX_WORKERS", "0")]).await;
    let key = &svc.admin_key;
    let source = gradient(64, 64);
    // A PNG header that claims 30000×30000 over one pixel's data: never decoded.
    let mut bomb = gradient(1, 1);
    bomb[16..20].copy_from_slice(&30_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&30_000u32.to_be_bytes());
    let crc = {
        let mut crc = !0u32;
        for &byte in &bomb[12..29] {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    };
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let before = svc.job_count();
    let cases: Vec<(Value, &str, &str, &str)> = vec![
        (
            json!({"prompt": "a", "image": "%%% not base64"}),
            "invalid_image",
            "image",
            "base64",
        ),
        (
            json!({"prompt": "a", "image": b64(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")}),
            "invalid_image",
            "image",
            "PNG, JPEG or WebP",
        ),
        (
            json!({"prompt": "a", "image": b64(&bomb)}),
            "invalid_image",
            "image",
            "30000x30000",
        ),
        (
            json!({"prompt": "a", "image": b64(&source), "mask": b64(&left_mask(32, 32, 8))}),
            "invalid_image",
            "mask",
            "32x32",
        ),
        (
            json!({"prompt": "a", "mask": b64(&source)}),
            "invalid_image",
            "mask",
            "send one in image",
        ),
        (
            json!({"prompt": "a", "strength": 0.5}),
            "invalid_strength",
            "strength",
            "send one in image",
        ),
        (
            json!({"prompt": "a", "image": b64(&source), "strength": 1.5}),
            "invalid_strength",
            "strength",
            "1.5",
        ),
        (
            json!({"prompt": "a", "image": b64(&source), "size": "64x64",
                   "outpaint": {"left": 32, "right": 32}}),
            "invalid_image",
            "outpaint",
            "no room",
        ),
        (
            json!({"prompt": "a", "image": b64(&source), "outpaint": {"sideways": 3}}),
            "invalid_json",
            "",
            "sideways",
        ),
    ];
    for (body, code, param, mention) in cases {
        let (status, err) = svc.post_json("/v1/jobs", &body, Some(key)).await;
        assert_eq!(status, 400, "{err}");
        assert_eq!(err["error"]["code"], code, "{err}");
        if !param.is_empty() {
            assert_eq!(err["error"]["param"], param, "{err}");
        }
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(mention), "{message} should say {mention}");
    }
    assert_eq!(svc.job_count(), before, "nothing enqueued");

    // One idempotency key, two different images: the second is a conflict.
    let keyed = |image: &[u8]| json!({"prompt": "a", "image": b64(image), "size": "64x64"});
    let first = gradient(64, 64);
    let headers = [("Idempotency-Key", "edit-1")];
    let (status, job) = svc
        .post_json_with("/v1/jobs", &keyed(&first), key, &headers)
        .await;
    assert_eq!(status, 202, "{job}");
    let (status, again) = svc
        .post_json_with("/v1/jobs", &keyed(&first), key, &headers)
        .await;
    assert_eq!((status, &again["id"]), (200, &job["id"]), "{again}");
    let (status, err) = svc
        .post_json_with("/v1/jobs", &keyed(&gradient(64, 56)), key, &headers)
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("idempotency_conflict")),
        "{err}"
    );
    assert_eq!(svc.job_count(), before + 1);
    // The sources of the repeated and refused submissions are not kept.
    let sources = std::fs::read_dir(svc.data_dir().join("images").join("sources"))
        .expect("sources")
        .count();
    assert_eq!(sources, 1);
}

/// A1111's hires fix through the service: the image comes out at the second pass's size,
/// the same image `sparkle generate --hires` makes; bad settings are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pass_makes_the_larger_image_generate_makes() {
    let svc = Service::start(&[]).await;
    let (job, png) = run(
        &svc,
        json!({"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 4, "seed": 9,
               "hires": {"scale": 2, "steps": 4, "strength": 0.5}}),
    )
    .await;
    assert_eq!(
        job["request"]["hires"],
        json!({"size": "128x128", "steps": 4, "strength": 0.5}),
        "{job}"
    );
    let (w, h, parameters) = png_info(&png);
    assert_eq!((w, h), (128, 128));
    assert!(parameters.contains("Hires upscale: 2"), "{parameters}");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.png");
    let status = Command::new(BIN)
        .args([
            "generate",
            "a lighthouse at dusk",
            "--device",
            "cpu",
            "--size",
            "64x64",
        ])
        .args([
            "--steps",
            "4",
            "--seed",
            "9",
            "--hires",
            "2",
            "--hires-steps",
            "4",
        ])
        .args(["--hires-strength", "0.5", "-o"])
        .arg(&out)
        .arg("--model")
        .arg(tiny_model())
        .stderr(Stdio::null())
        .status()
        .expect("generate");
    assert!(status.success());
    let solo = std::fs::read(out).expect("png");
    assert_eq!(png_pixels(&png), png_pixels(&solo));

    let (status, err) = svc
        .post_json(
            "/v1/jobs",
            &json!({"prompt": "a", "size": "1024x1024", "hires": {"scale": 3}}),
            Some(&svc.admin_key),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["code"], "invalid_hires");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .contains("3072x3072"));
}

/// A textual-inversion embedding in the `embeddings` directory beside a model is used where
/// a prompt names it, by the service's workers as by `sparkle generate`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedding_beside_the_model_is_used_where_a_prompt_names_it() {
    let models = tempfile::tempdir().expect("tempdir");
    let model = models.path().join("tiny-styled");
    std::os::unix::fs::symlink(tiny_model(), &model).expect("symlink");
    std::fs::create_dir(models.path().join("embeddings")).expect("embeddings");
    // A1111's format: `emb_params`, two vectors as wide as the tiny text encoder (32).
    let vectors: Vec<u8> = (0..2 * 32)
        .flat_map(|i| (i as f32 * 0.61).cos().to_le_bytes())
        .collect();
    let header = format!(
        r#"{{"emb_params":{{"dtype":"F32","shape":[2,32],"data_offsets":[0,{}]}}}}"#,
        vectors.len()
    );
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&vectors);
    std::fs::write(models.path().join("embeddings/glowstyle.safetensors"), file).expect("save");
    let served = format!("[{:?}]", model.display().to_string());
    let svc = Service::start(&[("SPARKLE_MODELS", served.as_str())]).await;
    let body = |model: &str| {
        json!({"prompt": "a lighthouse, glowstyle", "model": model, "size": "64x64",
               "steps": 3, "seed": 4})
    };
    let (_, styled) = run(&svc, body("tiny-styled")).await;
    let (_, plain) = run(&svc, body("tiny-model")).await;
    assert_ne!(
        png_pixels(&styled),
        png_pixels(&plain),
        "the embedding was not used"
    );
    let args = ["--size", "64x64", "--steps", "3", "--seed", "4"];
    assert_eq!(
        png_pixels(&styled),
        png_pixels(&generate_with(&model, "a lighthouse, glowstyle", &args))
    );
}
