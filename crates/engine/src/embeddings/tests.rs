use super::*;
use crate::pipeline::Batch;
use crate::tests::{max_tensor_diff, tiny_dir};
use crate::{BatchItem, DeviceChoice, Engine, EngineOptions};
use sparkle_core::Scheduler;

fn save(dir: &Path, name: &str, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| (k.to_string(), t.clone()))
        .collect();
    candle_core::safetensors::save(&map, dir.join(format!("{name}.safetensors"))).expect("save");
}

use std::collections::HashMap;

fn rows(n: usize, width: usize, seed: f32) -> Tensor {
    let values: Vec<f32> = (0..n * width)
        .map(|i| (i as f32 * 0.37 + seed).sin())
        .collect();
    Tensor::from_vec(values, (n, width), &Device::Cpu).expect("rows")
}

#[test]
fn the_formats_people_download_are_read_and_other_families_left_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    save(d, "a1111", &[("emb_params", rows(3, 32, 0.0))]);
    save(
        d,
        "diffusers",
        &[("<cat-toy>", rows(1, 32, 1.0).flatten_all().expect("flat"))],
    );
    save(
        d,
        "xl",
        &[("clip_l", rows(2, 32, 2.0)), ("clip_g", rows(2, 64, 3.0))],
    );
    save(d, "wide", &[("emb_params", rows(2, 768, 4.0))]);
    save(d, "many", &[("emb_params", rows(76, 32, 5.0))]);
    save(
        d,
        "odd",
        &[("a", rows(1, 32, 0.0)), ("b", rows(1, 32, 0.0))],
    );
    save(d, "bad name!", &[("emb_params", rows(1, 32, 0.0))]);
    std::fs::write(d.join("notes.safetensors"), "not tensors").expect("write");
    std::fs::write(d.join("readme.txt"), "ignored").expect("write");

    let (found, skipped) = scan(d, &[32]).expect("scan");
    let names: Vec<_> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a1111", "diffusers"]);
    assert_eq!(found[0].1.count(), 3);
    assert_eq!(found[1].1.count(), 1);
    let why = |name: &str| {
        skipped
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, w)| w.clone())
            .unwrap_or_else(|| panic!("{name} is not reported: {skipped:?}"))
    };
    assert!(
        why("wide").contains("another model family"),
        "{}",
        why("wide")
    );
    assert!(why("xl").contains("another model family"));
    assert!(why("many").contains("76 vectors"));
    assert!(why("odd").contains("not a textual-inversion"));
    assert!(why("bad name!").contains("usable name"));
    assert!(why("notes").contains("not a safetensors"));
    assert!(!skipped.iter().any(|(n, _)| n == "readme"));

    // SDXL's two encoders take the two-set files only.
    let (found, _) = scan(d, &[32, 64]).expect("scan");
    assert_eq!(
        found.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["xl"]
    );
}

#[test]
fn a_name_is_replaced_by_its_placeholders_longest_first() {
    let placeholders = vec![(vec![7, 8], vec![100, 101, 102]), (vec![7], vec![103])];
    assert_eq!(
        substitute(vec![1, 7, 8, 9, 7, 2], &placeholders),
        vec![1, 100, 101, 102, 9, 103, 2]
    );
    assert_eq!(substitute(vec![1, 2], &[]), vec![1, 2]);
}

fn cpu() -> EngineOptions {
    EngineOptions {
        device: DeviceChoice::Cpu,
        ..EngineOptions::default()
    }
}

fn prompt_batch(prompt: &str) -> Batch {
    Batch {
        width: 64,
        height: 64,
        steps: 2,
        guidance_scale: 7.5,
        scheduler: Scheduler::Euler,
        strength: 1.0,
        hires: None,
        loras: Vec::new(),
        items: vec![BatchItem {
            prompt: prompt.into(),
            negative_prompt: "blurry".into(),
            seed: 1,
            source: None,
        }],
    }
}

/// The vocabulary's own rows for `word`'s tokens.
fn rows_of(engine: &Engine, word: &str) -> Tensor {
    let table = candle_core::safetensors::load(
        tiny_dir().join("text_encoder/model.safetensors"),
        &Device::Cpu,
    )
    .expect("weights");
    let table = &table["text_model.embeddings.token_embedding.weight"];
    let ids = engine.first_tokens(word);
    let ids = Tensor::from_vec(ids.clone(), ids.len(), &Device::Cpu).expect("ids");
    table.index_select(&ids, 0).expect("rows")
}

#[test]
fn an_embedding_stands_in_for_its_name_in_prompts_and_negative_prompts() {
    let mut engine = Engine::load(tiny_dir(), &cpu()).expect("load");
    let plain = |engine: &Engine, prompt: &str| {
        engine
            .encode_prompts(&prompt_batch(prompt))
            .expect("encode")
            .context
    };
    let before = plain(&engine, "a photo of corgi, blurry");
    // An embedding whose vectors are the vocabulary's own rows for the words it is named
    // after changes nothing: the substitution is exact.
    let dir = tempfile::tempdir().expect("tempdir");
    save(
        dir.path(),
        "corgi",
        &[("emb_params", rows_of(&engine, "corgi"))],
    );
    let loaded = engine.load_embeddings(dir.path()).expect("embeddings");
    assert_eq!(loaded.names, ["corgi"]);
    assert_eq!(engine.embeddings(), ["corgi"]);
    let same = plain(&engine, "a photo of corgi, blurry");
    assert!(max_tensor_diff(&before, &same) < 1e-6);

    // Other vectors change the prompt where the name is, and only there (the negative
    // prompt's rows stay).
    save(dir.path(), "corgi", &[("emb_params", rows(2, 32, 9.0))]);
    engine.load_embeddings(dir.path()).expect("embeddings");
    let changed = plain(&engine, "a photo of corgi, blurry");
    let negative = |t: &Tensor| t.narrow(0, 0, 1).expect("negative row");
    assert!(max_tensor_diff(&negative(&before), &negative(&changed)) < 1e-6);
    assert!(max_tensor_diff(&before, &changed) > 1e-3);
    // In a negative prompt too.
    let mut b = prompt_batch("a lighthouse");
    b.items[0].negative_prompt = "corgi".into();
    let with = engine.encode_prompts(&b).expect("encode").context;
    let fresh = Engine::load(tiny_dir(), &cpu()).expect("load");
    let without = fresh.encode_prompts(&b).expect("encode").context;
    assert!(max_tensor_diff(&negative(&with), &negative(&without)) > 1e-3);
    // Images come out, and an emptied directory unloads them.
    let image = engine
        .generate(&prompt_batch("corgi"), &mut |_| {
            std::ops::ControlFlow::Continue(())
        })
        .expect("generate");
    assert_eq!(image.len(), 1);
    let empty = tempfile::tempdir().expect("tempdir");
    engine.load_embeddings(empty.path()).expect("none");
    assert!(engine.embeddings().is_empty());
    assert!(max_tensor_diff(&before, &plain(&engine, "a photo of corgi, blurry")) < 1e-6);
}
