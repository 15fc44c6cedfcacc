//! Helpers shared by the model's integration tests: fixture paths, safetensors readers, and the logits of the
//! tiny reference model's three prompts compared with a reference file.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::Backend;
use medvl_model::image::{ProcessorConfig, preprocess_bytes};
use medvl_model::{PixelValues, QwenVl};
use safetensors::SafeTensors;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub fn f32s(st: &SafeTensors<'_>, name: &str) -> Vec<f32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn ids(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// Per prompt: (max |a - b| / max |b|, relative Frobenius error) of the logits against those in `fixture`.
pub fn logits_errors<B: Backend>(
    model: &QwenVl<B>,
    fixture: &str,
) -> Vec<(&'static str, f32, f32)> {
    let device = Default::default();
    let ref_bytes = std::fs::read(fixtures().join("tiny/reference.safetensors")).unwrap();
    let reference = SafeTensors::deserialize(&ref_bytes).unwrap();
    let bnb_bytes = std::fs::read(fixtures().join(fixture)).unwrap();
    let bnb = SafeTensors::deserialize(&bnb_bytes).unwrap();
    let processor = ProcessorConfig::from_model_dir(&fixtures().join("tiny/hub")).unwrap();
    let image = |n: &str| -> PixelValues {
        preprocess_bytes(
            &std::fs::read(fixtures().join(format!("tiny/{n}.png"))).unwrap(),
            &processor,
        )
        .unwrap()
    };
    let mut errors = Vec::new();
    for (case, images) in [
        ("one_image", vec![image("page")]),
        ("two_images", vec![image("page"), image("stamp")]),
        ("text_only", vec![]),
    ] {
        let prompt = ids(&reference, &format!("{case}.input_ids"));
        let mut cache = model.new_cache();
        let prefill = model
            .prefill(&prompt, &images, &mut cache, &device)
            .unwrap();
        let ours: Vec<f32> = model
            .logits(prefill.hidden)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .unwrap();
        let theirs = f32s(&bnb, &format!("{case}.logits"));
        assert_eq!(ours.len(), theirs.len(), "{case}: logits size");
        let diff = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let scale = theirs.iter().map(|b| b.abs()).fold(0.0, f32::max);
        let sq = |v: &mut dyn Iterator<Item = f32>| v.map(|x| x * x).sum::<f32>().sqrt();
        let frobenius =
            sq(&mut ours.iter().zip(&theirs).map(|(a, b)| a - b)) / sq(&mut theirs.iter().copied());
        println!(
            "{case}: logits max rel error {:.2e}, rel Frobenius {frobenius:.2e}",
            diff / scale
        );
        errors.push((case, diff / scale, frobenius));
    }
    errors
}
