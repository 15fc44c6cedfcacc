//! What the engine's integration tests share: the tiny reference model's fixtures and its three prompts with
//! transformers' greedy tokens (`fixtures/generate.py`).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use medvl_model::image::{PixelValues, ProcessorConfig, preprocess_bytes};
use safetensors::SafeTensors;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny")
}

fn ids(st: &SafeTensors<'_>, name: &str) -> Vec<u32> {
    st.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

pub struct Case {
    pub name: &'static str,
    pub prompt: Vec<u32>,
    pub images: Vec<PixelValues>,
    pub expected: Vec<u32>,
}

pub fn cases() -> Vec<Case> {
    let processor = ProcessorConfig::from_model_dir(&fixtures().join("hub")).unwrap();
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let image = |name: &str| {
        preprocess_bytes(&std::fs::read(fixtures().join(name)).unwrap(), &processor).unwrap()
    };
    [
        ("one_image", vec![image("page.png")]),
        ("two_images", vec![image("page.png"), image("stamp.png")]),
        ("text_only", vec![]),
    ]
    .into_iter()
    .map(|(name, images)| Case {
        name,
        prompt: ids(&st, &format!("{name}.input_ids")),
        images,
        expected: ids(&st, &format!("{name}.greedy")),
    })
    .collect()
}
