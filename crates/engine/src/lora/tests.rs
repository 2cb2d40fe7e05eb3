use super::*;

fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) -> std::path::PathBuf {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    let file = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(&map, &file).expect("save");
    file
}

fn ramp(shape: &[usize], seed: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.13 + seed).sin()).collect();
    Tensor::from_vec(values, shape, &Device::Cpu).expect("ramp")
}

fn scalar(v: f32) -> Tensor {
    Tensor::new(v, &Device::Cpu).expect("scalar")
}

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight";

/// An SD 1.x-like set of layers, with the original names SDXL's kohya files use.
fn targets(sdxl: bool) -> Targets {
    let unet = vec![
        (Q.to_string(), vec![32, 32]),
        (
            "down_blocks.0.attentions.0.proj_in.weight".to_string(),
            vec![32, 32, 1, 1],
        ),
        ("conv_in.weight".to_string(), vec![32, 4, 3, 3]),
        ("conv_in.bias".to_string(), vec![32]),
    ];
    let text = vec![(
        "text_model.encoder.layers.0.self_attn.q_proj.weight".to_string(),
        vec![32, 32],
    )];
    let mut t = Targets::default();
    t.add(
        Network::Unet,
        &unet,
        |name| {
            (name == Q).then(|| "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight".into())
        },
        sdxl,
    );
    t.add(Network::TextEncoder, &text, |_| None, sdxl);
    if sdxl {
        t.add(Network::TextEncoder2, &text, |_| None, sdxl);
    }
    t
}

#[test]
fn kohya_files_with_alpha_and_convolutions_become_deltas_on_the_models_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let file = save(
        dir.path(),
        "style",
        &[
            (&format!("{q}.lora_down.weight"), ramp(&[4, 32], 0.0)),
            (&format!("{q}.lora_up.weight"), ramp(&[32, 4], 1.0)),
            (&format!("{q}.alpha"), scalar(2.0)),
            (
                "lora_unet_conv_in.lora_down.weight",
                ramp(&[4, 4, 3, 3], 2.0),
            ),
            (
                "lora_unet_conv_in.lora_up.weight",
                ramp(&[32, 4, 1, 1], 3.0),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                ramp(&[8, 32], 4.0),
            ),
            (
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                ramp(&[32, 8], 5.0),
            ),
        ],
    );
    let deltas = read(&file, &targets(false)).expect("read");
    assert_eq!(deltas.len(), 3);
    let q = deltas.iter().find(|d| d.weight == Q).expect("to_q");
    assert_eq!((q.network, q.scale), (Network::Unet, 0.5));
    let full = q.full().expect("full");
    assert_eq!(full.dims(), &[32, 32]);
    // One element by hand: 0.5 × Σ_r up[3, r] · down[r, 5].
    let (up, down) = (ramp(&[32, 4], 1.0), ramp(&[4, 32], 0.0));
    let up = up.to_vec2::<f32>().expect("up");
    let down = down.to_vec2::<f32>().expect("down");
    let want: f32 = 0.5 * (0..4).map(|r| up[3][r] * down[r][5]).sum::<f32>();
    let got = full.to_vec2::<f32>().expect("full")[3][5];
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    let conv = deltas
        .iter()
        .find(|d| d.weight == "conv_in.weight")
        .expect("conv");
    assert_eq!(conv.scale, 1.0, "no alpha: the rank");
    assert_eq!(conv.full().expect("full").dims(), &[32, 4, 3, 3]);
    let text = deltas
        .iter()
        .find(|d| d.network == Network::TextEncoder)
        .expect("text");
    assert_eq!(
        text.weight,
        "text_model.encoder.layers.0.self_attn.q_proj.weight"
    );
}

#[test]
fn sdxl_kohya_names_and_peft_names_find_the_same_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = save(
        dir.path(),
        "xl",
        &[
            (
                "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                ramp(&[4, 32], 0.0),
            ),
            (
                "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight",
                ramp(&[32, 4], 1.0),
            ),
            (
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
                ramp(&[4, 32], 2.0),
            ),
            (
                "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
                ramp(&[32, 4], 3.0),
            ),
        ],
    );
    let deltas = read(&file, &targets(true)).expect("read");
    let networks: Vec<_> = deltas
        .iter()
        .map(|d| (d.network, d.weight.as_str()))
        .collect();
    assert!(networks.contains(&(Network::Unet, Q)));
    assert!(networks.contains(&(
        Network::TextEncoder2,
        "text_model.encoder.layers.0.self_attn.q_proj.weight"
    )));

    let peft = save(
        dir.path(),
        "peft",
        &[
            (
                &format!("unet.{}.lora_A.weight", Q.trim_end_matches(".weight")),
                ramp(&[4, 32], 0.0),
            ),
            (
                &format!("unet.{}.lora_B.weight", Q.trim_end_matches(".weight")),
                ramp(&[32, 4], 1.0),
            ),
        ],
    );
    let deltas = read(&peft, &targets(false)).expect("peft");
    assert_eq!((deltas[0].weight.as_str(), deltas[0].scale), (Q, 1.0));
}

#[test]
fn files_for_other_families_or_not_loras_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let cases: Vec<(Vec<(String, Tensor)>, &str)> = vec![
        (
            vec![
                (
                    "lora_unet_mid_block_nothing.lora_down.weight".into(),
                    ramp(&[4, 32], 0.0),
                ),
                (
                    "lora_unet_mid_block_nothing.lora_up.weight".into(),
                    ramp(&[32, 4], 0.0),
                ),
            ],
            "another model family",
        ),
        (
            vec![
                (format!("{q}.lora_down.weight"), ramp(&[4, 64], 0.0)),
                (format!("{q}.lora_up.weight"), ramp(&[32, 4], 0.0)),
            ],
            "do not make the layer's [32, 32]",
        ),
        (
            vec![(format!("{q}.lora_down.weight"), ramp(&[4, 32], 0.0))],
            "lacks its down or up",
        ),
        (
            vec![(
                "model.diffusion_model.out.2.weight".into(),
                ramp(&[4, 4], 0.0),
            )],
            "not a LoRA factor",
        ),
    ];
    for (i, (tensors, why)) in cases.into_iter().enumerate() {
        let named: Vec<(&str, Tensor)> = tensors
            .iter()
            .map(|(k, t)| (k.as_str(), t.clone()))
            .collect();
        let file = save(d, &format!("case{i}"), &named);
        let err = read(&file, &targets(false)).expect_err("refused");
        assert!(err.contains(why), "{err} should say {why}");
    }
    std::fs::write(d.join("text.safetensors"), "no").expect("write");
    assert!(read(&d.join("text.safetensors"), &targets(false))
        .expect_err("not tensors")
        .contains("not a safetensors"));
    let names = list(d).expect("list");
    assert!(names.contains(&"case0".to_string()) && names.contains(&"text".to_string()));
}

#[test]
fn the_tiny_models_own_layers_are_found_by_their_kohya_names() {
    let unet = candle_core::safetensors::load(
        crate::tests::tiny_dir().join("unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .expect("unet");
    let weights: Vec<(String, Vec<usize>)> = unet
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let mut t = Targets::default();
    t.add(Network::Unet, &weights, |_| None, false);
    let attention = weights
        .iter()
        .find(|(k, _)| k.ends_with("attn2.to_k.weight"))
        .expect("a cross-attention key projection");
    let kohya = format!(
        "lora_unet_{}",
        attention.0.trim_end_matches(".weight").replace('.', "_")
    );
    let found = t.find(&kohya).expect("found");
    assert_eq!(found.1, attention.0);
}

/// The first weight of `file` whose name ends with `suffix`.
fn weight_named(tensors: &HashMap<String, Tensor>, suffix: &str) -> (String, Tensor) {
    let mut names: Vec<&String> = tensors.keys().filter(|k| k.ends_with(suffix)).collect();
    names.sort();
    let name = names
        .first()
        .unwrap_or_else(|| panic!("no weight ends with {suffix}"));
    ((*name).clone(), tensors[*name].clone())
}

/// Factors of rank 2 for a weight of this shape (a kernel's spatial size stays on `down`).
fn factors(shape: &[usize], seed: f32) -> (Tensor, Tensor) {
    let mut down = vec![2];
    down.extend_from_slice(&shape[1..]);
    let mut up = vec![shape[0], 2];
    up.extend(std::iter::repeat_n(1, shape.len() - 2));
    (
        ramp(&down, seed),
        (ramp(&up, seed + 1.0) * 0.1).expect("scale"),
    )
}

fn kohya(layer: &str, prefix: &str) -> String {
    format!(
        "{prefix}{}",
        layer.trim_end_matches(".weight").replace('.', "_")
    )
}

/// A layer the test LoRA changes: the part's weight file, the end of the weight's name, its
/// kohya-ss prefix, and whether kohya-ss names it by the original (LDM) layout (SDXL's UNet).
struct Chosen {
    file: &'static str,
    suffix: &'static str,
    prefix: &'static str,
    ldm: bool,
}

const UNET_FILE: &str = "unet/diffusion_pytorch_model.safetensors";

/// A kohya-ss LoRA on `chosen` (at weight 0.8, alpha 1 over rank 2) applied to a batch of the
/// random model `kind` gives what the same model with the LoRA merged into its files gives;
/// it changes the image, is kept for the next batch of its set, and leaves the model's own
/// networks as they were. A file for layers the model lacks is left out, and an unknown name
/// refused.
fn a_lora_is_the_model_with_its_weights_changed(kind: crate::RandomModel, chosen: &[Chosen]) {
    use crate::{Batch, BatchItem, DeviceChoice, Engine, EngineOptions, ModelScale};
    let cpu = EngineOptions {
        device: DeviceChoice::Cpu,
        ..EngineOptions::default()
    };
    let root = tempfile::tempdir().expect("tempdir");
    let model = root.path().join("models/tiny");
    crate::write_random(&model, 0, kind, ModelScale::Tiny).expect("model");
    let unet_config = crate::layout::Layout::open(&model)
        .and_then(|l| l.configs())
        .expect("configs")
        .unet;
    let (weight, alpha) = (0.8f32, 1.0f32);
    let mut parts: BTreeMap<&str, HashMap<String, Tensor>> = BTreeMap::new();
    let mut file = Vec::new();
    for (i, c) in chosen.iter().enumerate() {
        let tensors = parts.entry(c.file).or_insert_with(|| {
            candle_core::safetensors::load(model.join(c.file), &Device::Cpu).expect("part")
        });
        let (name, original) = weight_named(tensors, c.suffix);
        let (down, up) = factors(original.dims(), i as f32);
        let layer = if c.ldm {
            let ldm = crate::single_file::ldm_unet_name(&unet_config, &name).expect("ldm name");
            kohya(&ldm, c.prefix)
        } else {
            kohya(&name, c.prefix)
        };
        file.push((format!("{layer}.lora_down.weight"), down.clone()));
        file.push((format!("{layer}.lora_up.weight"), up.clone()));
        file.push((format!("{layer}.alpha"), scalar(alpha)));
        let delta = Delta {
            network: Network::Unet,
            weight: name.clone(),
            down,
            up,
            scale: alpha / 2.0,
        };
        let change = (delta.full().expect("full") * f64::from(weight)).expect("weigh");
        tensors.insert(name, (original + change).expect("merge"));
    }
    let loras = root.path().join("models/loras");
    std::fs::create_dir_all(&loras).expect("loras");
    let named: Vec<(&str, Tensor)> = file.iter().map(|(k, t)| (k.as_str(), t.clone())).collect();
    save(&loras, "style", &named);
    save(
        &loras,
        "elsewhere",
        &[
            (
                "lora_unet_no_such_layer.lora_down.weight",
                ramp(&[2, 32], 0.0),
            ),
            (
                "lora_unet_no_such_layer.lora_up.weight",
                ramp(&[32, 2], 0.0),
            ),
        ],
    );

    // The same model with the LoRA merged into its files, as a reference.
    let reference_dir = root.path().join("reference/tiny");
    crate::write_random(&reference_dir, 0, kind, ModelScale::Tiny).expect("reference");
    for (part, tensors) in &parts {
        candle_core::safetensors::save(tensors, reference_dir.join(part)).expect("save");
    }

    let mut engine = Engine::load(&model, &cpu).expect("load");
    let beside = engine.load_beside(&model).expect("beside");
    assert_eq!(beside.loras.names, ["style"]);
    assert_eq!(beside.loras.skipped.len(), 1);
    assert!(
        beside.loras.skipped[0].1.contains("another model family"),
        "{:?}",
        beside.loras.skipped
    );
    // What a control plane reads, without loading the model, agrees.
    let listed = crate::Additions::of(&model).expect("additions");
    assert_eq!(listed.loras, beside.loras);
    let reference = Engine::load(&reference_dir, &cpu).expect("reference");

    let batch = |loras: Vec<LoraWeight>| Batch {
        width: 64,
        height: 64,
        steps: 3,
        guidance_scale: 7.5,
        scheduler: sparkle_core::Scheduler::Euler,
        strength: 1.0,
        hires: None,
        loras,
        items: vec![BatchItem {
            prompt: "a corgi <lora:style:0.8>".into(),
            negative_prompt: String::new(),
            seed: 7,
            source: None,
        }],
    };
    let style = vec![LoraWeight {
        name: "style".into(),
        weight,
    }];
    let probe = |e: &Engine, b: &Batch| e.probe(b).expect("probe");
    let before = probe(&engine, &batch(vec![]));
    let with = probe(&engine, &batch(style.clone()));
    let merged = probe(&reference, &batch(vec![]));
    let (first, image) = with.relative_error(&merged);
    assert!(
        first < 1e-5 && image < 1e-5,
        "merged for the batch vs in the files: {first}, {image}"
    );
    let (_, changed) = with.relative_error(&before);
    assert!(changed > 1e-3, "the LoRA changes the image ({changed})");
    // The set is kept; the model's own networks are untouched.
    let again = probe(&engine, &batch(style));
    assert_eq!(again.image, with.image);
    let after = probe(&engine, &batch(vec![]));
    assert_eq!(
        after.image, before.image,
        "nothing leaks into the next batch"
    );

    let unknown = engine
        .probe(&batch(vec![LoraWeight {
            name: "nope".into(),
            weight: 1.0,
        }]))
        .expect_err("unknown");
    assert!(
        unknown.to_string().contains("unknown LoRA \"nope\""),
        "{unknown}"
    );
}

#[test]
fn a_lora_on_sd15_is_its_unet_locon_and_text_encoder_weights_changed() {
    a_lora_is_the_model_with_its_weights_changed(
        crate::RandomModel::Sd15,
        &[
            Chosen {
                file: UNET_FILE,
                suffix: "attn2.to_k.weight",
                prefix: "lora_unet_",
                ldm: false,
            },
            Chosen {
                file: UNET_FILE,
                suffix: "resnets.0.conv1.weight",
                prefix: "lora_unet_",
                ldm: false,
            },
            Chosen {
                file: "text_encoder/model.safetensors",
                suffix: "layers.0.self_attn.q_proj.weight",
                prefix: "lora_te_",
                ldm: false,
            },
        ],
    );
}

/// SDXL's kohya-ss files name the UNet's layers in the original layout and the two text
/// encoders `lora_te1_` and `lora_te2_`.
#[test]
fn a_lora_on_sdxl_reaches_both_text_encoders_by_kohya_names() {
    a_lora_is_the_model_with_its_weights_changed(
        crate::RandomModel::Sdxl,
        &[
            Chosen {
                file: UNET_FILE,
                suffix: "attn1.to_q.weight",
                prefix: "lora_unet_",
                ldm: true,
            },
            Chosen {
                file: "text_encoder/model.safetensors",
                suffix: "layers.0.self_attn.v_proj.weight",
                prefix: "lora_te1_",
                ldm: false,
            },
            Chosen {
                file: "text_encoder_2/model.safetensors",
                suffix: "layers.0.self_attn.q_proj.weight",
                prefix: "lora_te2_",
                ldm: false,
            },
        ],
    );
}
