//! Single-file checkpoints: the same model loads to the same images from either layout; bad
//! files are refused with the tensor named as the file stores it.

use super::header::Header;
use super::write::{save, write_single_file};
use crate::layout::{Layout, Part};
use crate::weights::weight_file;
use crate::{
    describe, write_random, Architecture, Batch, BatchItem, DeviceChoice, Engine, EngineError,
    EngineOptions, ModelFormat, ModelScale, RandomModel,
};
use candle_core::{DType, Device, Tensor};
use sparkle_core::Scheduler;
use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

mod real_shapes;

// The options beyond the device keep their defaults, however many there are.
#[allow(clippy::needless_update)]
fn cpu() -> EngineOptions {
    EngineOptions {
        device: DeviceChoice::Cpu,
        ..EngineOptions::default()
    }
}

/// A random model of `kind` in both layouts: `(root, directory, single file)`.
fn both_layouts(kind: RandomModel) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join(kind.name());
    write_random(&dir, 0, kind, ModelScale::Tiny).expect("diffusers layout");
    let file = root.path().join(format!("{}.safetensors", kind.name()));
    write_single_file(&dir, &file).expect("single file");
    (root, dir, file)
}

/// Every tensor of one part, read through the single file's names, equals the directory's
/// bit for bit; the single file has no tensor under the part's prefix that is not read.
fn assert_same_weights(dir: &Path, file: &Path, part: Part) {
    let source = weight_file(&dir.join(part.dir())).expect("weight file");
    let expected = candle_core::safetensors::load(&source, &Device::Cpu).expect("load");
    let layout = Layout::open(file).expect("single file");
    let weights = layout.weights().expect("map");
    let weights = weights.part(part, DType::F32, &Device::Cpu).expect("part");
    let read = weights
        .build(|vb| {
            expected
                .iter()
                .map(|(name, tensor)| Ok((name.clone(), vb.get(tensor.dims(), name)?)))
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .expect("every tensor, and nothing else");
    for (name, tensor) in read {
        let bits = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values")
        };
        let (ours, theirs) = (bits(&tensor), bits(&expected[&name]));
        assert!(ours == theirs, "{}: {name}", file.display());
    }
}

fn assert_same_images(kind: RandomModel) {
    let (_root, dir, file) = both_layouts(kind);
    let mut parts = vec![Part::TextEncoder, Part::Unet, Part::Vae];
    if kind.architecture() == Architecture::Sdxl {
        parts.push(Part::TextEncoder2);
    }
    for part in parts {
        assert_same_weights(&dir, &file, part);
    }

    let from_dir = Engine::load(&dir, &cpu()).expect("load the directory");
    let from_file = Engine::load(&file, &cpu()).expect("load the single file");
    assert_eq!(from_file.info().name, kind.name());
    assert_eq!(from_file.info().native_size, from_dir.info().native_size);
    let few_step = describe(&file).expect("describe").defaults.few_step;
    for scheduler in [Scheduler::EulerA, Scheduler::DpmPp2mKarras] {
        let batch = Batch {
            width: 64,
            height: 64,
            steps: if few_step { 1 } else { 3 },
            guidance_scale: if few_step { 0.0 } else { 7.5 },
            scheduler,
            strength: 1.0,
            hires: None,
            loras: Vec::new(),
            items: vec![BatchItem {
                prompt: "a corgi, style of monet".into(),
                negative_prompt: String::new(),
                seed: 7,
                source: None,
            }],
        };
        // The bundled tokenizer encodes as the directory's files do.
        let text = |e: &Engine| e.encode_prompts(&batch).expect("encode");
        let (a, b) = (text(&from_dir), text(&from_file));
        let bits = |t: &Tensor| {
            t.flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values")
        };
        assert!(bits(&a.context) == bits(&b.context), "{}", kind.name());
        assert_eq!(a.pooled.map(|p| bits(&p)), b.pooled.map(|p| bits(&p)));

        let image = |e: &Engine| {
            e.generate(&batch, &mut |_| ControlFlow::Continue(()))
                .expect("generate")
        };
        assert_eq!(
            image(&from_dir),
            image(&from_file),
            "{} {scheduler}",
            kind.name()
        );
    }
}

#[test]
fn an_sd15_single_file_makes_the_same_image_as_its_diffusers_directory() {
    assert_same_images(RandomModel::Sd15);
}

#[test]
fn an_sd21_single_file_makes_the_same_image_as_its_diffusers_directory() {
    assert_same_images(RandomModel::Sd21);
}

#[test]
fn an_sdxl_single_file_makes_the_same_image_as_its_diffusers_directory() {
    assert_same_images(RandomModel::Sdxl);
}

#[test]
fn turbo_single_files_make_the_same_images_with_their_settings_file() {
    assert_same_images(RandomModel::SdTurbo);
    assert_same_images(RandomModel::SdxlTurbo);
}

#[test]
fn configurations_derived_from_shapes_equal_the_directorys() {
    for kind in RandomModel::ALL {
        let (_root, dir, file) = both_layouts(kind);
        let theirs = Layout::open(&dir)
            .and_then(|l| l.configs())
            .expect("directory");
        let ours = Layout::open(&file)
            .and_then(|l| l.configs())
            .expect("single file");
        let name = kind.name();
        assert_eq!(ours.text_encoder, theirs.text_encoder, "{name}");
        assert_eq!(ours.text_encoder_2, theirs.text_encoder_2, "{name}");
        assert_eq!(ours.unet, theirs.unet, "{name}");
        assert_eq!(
            format!("{:?}", ours.vae),
            format!("{:?}", theirs.vae),
            "{name}"
        );
        assert_eq!(ours.schedule, theirs.schedule, "{name}");
        assert_eq!(ours.index, theirs.index, "{name}");
    }
}

#[test]
fn single_files_are_described_by_name_family_and_size() {
    let (_root, _dir, file) = both_layouts(RandomModel::SdTurbo);
    let described = describe(&file).expect("describe");
    assert_eq!(described.name, "sd-turbo");
    assert_eq!(described.format, ModelFormat::SingleFile);
    assert_eq!(described.architecture, Architecture::Sd21);
    assert_eq!(described.native_size, 512);
    assert!(described.defaults.few_step);
    let size = std::fs::metadata(&file).expect("metadata").len();
    assert_eq!(described.bytes, size);

    // Without its settings file it is what its metadata says: SD 2.x base, epsilon at 512.
    std::fs::remove_file(super::Settings::path(&file)).expect("remove settings");
    let plain = describe(&file).expect("describe");
    assert_eq!((plain.native_size, plain.defaults.few_step), (512, false));
}

/// The single file's tensors and metadata, to be changed and written back.
fn contents(file: &Path) -> (BTreeMap<String, Tensor>, BTreeMap<String, String>) {
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).expect("load");
    let metadata = Header::read(file).expect("header").metadata;
    (
        tensors.into_iter().collect(),
        metadata.into_iter().collect(),
    )
}

#[test]
fn missing_extra_and_misshapen_tensors_are_named_as_stored() {
    let (_root, _dir, file) = both_layouts(RandomModel::Sd15);
    let (mut tensors, metadata) = contents(&file);
    let victim = "model.diffusion_model.input_blocks.4.1.proj_in.weight";
    let original = tensors.remove(victim).expect("present");
    save(&tensors, &metadata, &file).expect("save");
    match Engine::load(&file, &cpu()) {
        Err(EngineError::MissingTensor { file: f, tensor }) => {
            assert_eq!((f, tensor.as_str()), (file.clone(), victim));
        }
        other => panic!("expected a missing tensor, got {:?}", other.err()),
    }

    // What checkpoints carry beside the networks is not read: EMA copies, buffers, the
    // autoencoder's training loss.
    tensors.insert(victim.into(), original.clone());
    let scalar = Tensor::new(&[0.5f32], &Device::Cpu).expect("tensor");
    for harmless in [
        "model_ema.decay",
        "alphas_cumprod",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "first_stage_model.loss.logvar",
    ] {
        tensors.insert(harmless.into(), scalar.clone());
    }
    save(&tensors, &metadata, &file).expect("save");
    Engine::load(&file, &cpu()).expect("loads despite what the networks do not use");

    let extra = "model.diffusion_model.input_blocks.4.1.proj_extra.weight";
    tensors.insert(extra.into(), original.clone());
    save(&tensors, &metadata, &file).expect("save");
    match Engine::load(&file, &cpu()) {
        Err(EngineError::UnexpectedTensor {
            file: f,
            tensor,
            count,
        }) => assert_eq!((f, tensor.as_str(), count), (file.clone(), extra, 1)),
        other => panic!("expected an unexpected tensor, got {:?}", other.err()),
    }
    tensors.remove(extra);

    tensors.insert(victim.into(), original.narrow(0, 0, 16).expect("narrow"));
    save(&tensors, &metadata, &file).expect("save");
    match Engine::load(&file, &cpu()) {
        Err(EngineError::TensorShape {
            file: f,
            tensor,
            expected,
            found,
        }) => {
            assert_eq!((f, tensor.as_str()), (file.clone(), victim));
            assert_eq!((expected, found), (vec![64, 64, 1, 1], vec![16, 64, 1, 1]));
        }
        other => panic!("expected a mis-shaped tensor, got {:?}", other.err()),
    }
}

#[test]
fn a_misshapen_fused_or_transposed_tensor_is_named_as_stored() {
    let (_root, _dir, file) = both_layouts(RandomModel::Sdxl);
    let (mut tensors, metadata) = contents(&file);
    let fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight";
    let original = tensors.insert(
        fused.into(),
        Tensor::zeros((95, 32), DType::F32, &Device::Cpu).expect("zeros"),
    );
    save(&tensors, &metadata, &file).expect("save");
    match Engine::load(&file, &cpu()) {
        Err(EngineError::TensorShape {
            tensor,
            expected,
            found,
            ..
        }) => {
            assert_eq!(tensor, fused);
            assert_eq!((expected, found), (vec![96, 32], vec![95, 32]));
        }
        other => panic!("expected a mis-shaped tensor, got {:?}", other.err()),
    }
    tensors.insert(fused.into(), original.expect("present"));

    // The projection's shape gives the pooled width: without it there is no configuration,
    // and the error names it.
    tensors.remove("conditioner.embedders.1.model.text_projection");
    save(&tensors, &metadata, &file).expect("save");
    match Engine::load(&file, &cpu()) {
        Err(EngineError::MissingTensor { tensor, .. }) => {
            assert_eq!(tensor, "conditioner.embedders.1.model.text_projection");
        }
        other => panic!("expected a missing tensor, got {:?}", other.err()),
    }
}

/// A single file of small tensors with these names (and metadata), for detection.
fn file_with(dir: &Path, name: &str, keys: &[&str], metadata: &[(&str, &str)]) -> PathBuf {
    let one = Tensor::zeros(1, DType::F32, &Device::Cpu).expect("zeros");
    let tensors = keys.iter().map(|k| (k.to_string(), one.clone())).collect();
    let metadata = metadata
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let file = dir.join(name);
    save(&tensors, &metadata, &file).expect("save");
    file
}

fn refusal(path: &Path) -> String {
    let err = Engine::load(path, &cpu()).err().expect("refused");
    let described = describe(path).expect_err("refused").to_string();
    assert_eq!(err.to_string(), described);
    assert!(
        described.contains(&path.display().to_string()),
        "{described}"
    );
    described
}

#[test]
fn files_that_are_not_stable_diffusion_checkpoints_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let lora = file_with(
        d,
        "lora.safetensors",
        &["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"],
        &[("modelspec.architecture", "stable-diffusion-v1/lora")],
    );
    let why = refusal(&lora);
    assert!(
        why.contains("not a Stable Diffusion") && why.contains("/lora"),
        "{why}"
    );

    let unet = file_with(
        d,
        "unet.safetensors",
        &["model.diffusion_model.out.2.bias"],
        &[],
    );
    assert!(refusal(&unet).contains("has a UNet but no text encoder"));

    let refiner = file_with(
        d,
        "refiner.safetensors",
        &[
            "conditioner.embedders.0.model.token_embedding.weight",
            "model.diffusion_model.out.2.bias",
        ],
        &[],
    );
    assert!(refusal(&refiner).contains("SDXL refiner"));

    let half_xl = file_with(
        d,
        "xl.safetensors",
        &["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
        &[],
    );
    assert!(refusal(&half_xl).contains("conditioner.embedders.1.model."));

    let no_vae = file_with(
        d,
        "no-vae.safetensors",
        &[
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
            "model.diffusion_model.out.2.bias",
        ],
        &[],
    );
    assert!(refusal(&no_vae).contains("without its VAE"));

    let empty = file_with(d, "empty.safetensors", &[], &[]);
    assert!(refusal(&empty).contains("holds no tensors"));

    let text = d.join("notes.safetensors");
    std::fs::write(&text, "not tensors at all").expect("write");
    assert!(refusal(&text).contains("not a safetensors file"));

    let pickle = d.join("model.ckpt");
    std::fs::write(&pickle, "PK").expect("write");
    assert!(refusal(&pickle).contains("pickled"));

    // An image-editing UNet (the latents beside the source's: 8 channels in) is neither a
    // text-to-image nor an inpainting model (9 in, which loads).
    let editing = {
        let (_root, model, file) = both_layouts(RandomModel::Sd15);
        let (mut tensors, metadata) = contents(&file);
        let conv_in = "model.diffusion_model.input_blocks.0.0.weight";
        let wider = Tensor::zeros((32, 8, 3, 3), DType::F32, &Device::Cpu).expect("zeros");
        tensors.insert(conv_in.into(), wider);
        let file = d.join("editing.safetensors");
        save(&tensors, &metadata, &file).expect("save");
        drop(model);
        file
    };
    assert!(refusal(&editing).contains("takes 8 channels and gives 4"));

    let missing = d.join("nowhere.safetensors");
    assert!(matches!(
        Engine::load(&missing, &cpu()),
        Err(EngineError::Io { .. })
    ));
}
