//! PEFT LoRA adapters on the model: the tiny reference model with an adapter peft made (`fixtures/lora.py`:
//! r=4 with a rank_pattern/alpha_pattern entry, random A and B, language and vision modules) gives peft's logits,
//! unmerged, over a dense base and over an NF4 base (against peft over bitsandbytes); bad adapters are refused with
//! an error naming what is wrong.

#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{f32s, fixtures, logits_errors};
use medvl_model::backend::Cpu;
use medvl_model::lora::apply_adapter;
use medvl_model::{QuantizeOptions, load_dir, load_dir_with};
use safetensors::SafeTensors;

fn adapter() -> std::path::PathBuf {
    fixtures().join("tiny/lora")
}

#[test]
fn adapter_logits_equal_peft() {
    let mut model = load_dir::<Cpu>(&fixtures().join("tiny/v5"), &Default::default()).unwrap();
    let summary = apply_adapter(&mut model, &adapter(), &Default::default()).unwrap();
    // q_proj, v_proj, gate_proj, down_proj of the 3 decoder layers, gate_proj and down_proj of the 4 vision blocks.
    assert_eq!(summary.modules, 3 * 4 + 4 * 2);
    assert_eq!((model.text.layers.len(), model.visual.blocks.len()), (3, 4));
    let layer1_q = model.text.layers[1].self_attn.q_proj.lora.as_ref().unwrap();
    // rank_pattern r=2, alpha_pattern 6: scale 3; everywhere else 8 / 4.
    assert_eq!((layer1_q.a.dims(), layer1_q.scale), ([2, 64], 3.0));
    assert_eq!(
        model.text.layers[0]
            .self_attn
            .q_proj
            .lora
            .as_ref()
            .unwrap()
            .scale,
        2.0
    );
    assert!(model.text.layers[0].self_attn.k_proj.lora.is_none());
    for (case, max_rel, _) in logits_errors(&model, "tiny/lora/logits.safetensors") {
        assert!(max_rel <= 1e-4, "{case}: max rel error {max_rel}");
    }
    // The adapter matters: peft's logits are far from the base model's.
    let bytes = std::fs::read(adapter().join("logits.safetensors")).unwrap();
    let with = f32s(
        &SafeTensors::deserialize(&bytes).unwrap(),
        "text_only.logits",
    );
    let base = load_dir::<Cpu>(&fixtures().join("tiny/v5"), &Default::default()).unwrap();
    let worst = logits_errors(&base, "tiny/lora/logits.safetensors")
        .into_iter()
        .map(|e| e.1)
        .fold(0.0, f32::max);
    assert!(worst > 1e-2 && !with.is_empty(), "base vs adapted: {worst}");
}

/// QLoRA's layout: the adapter over an NF4 base, against peft over transformers + bitsandbytes NF4 (the bounds of
/// the NF4 tests: 1e-4 for bitsandbytes' own checkpoint, 1e-3 when medvl quantizes while loading).
#[test]
fn adapter_on_an_nf4_base_equals_peft_on_bitsandbytes() {
    for (dir, quantize, bound) in [
        ("tiny/nf4-bnb", None, 1e-4),
        ("tiny/v5", Some(QuantizeOptions::default()), 1e-3),
    ] {
        let mut model =
            load_dir_with::<Cpu>(&fixtures().join(dir), &Default::default(), quantize).unwrap();
        assert!(model.text.layers[0].self_attn.q_proj.is_quantized());
        apply_adapter(&mut model, &adapter(), &Default::default()).unwrap();
        for (case, max_rel, _) in logits_errors(&model, "tiny/lora/nf4_logits.safetensors") {
            assert!(max_rel <= bound, "{dir} {case}: max rel error {max_rel}");
        }
    }
}

#[test]
fn bad_adapters_are_refused_by_name() {
    let dir = std::env::temp_dir().join(format!("medvl-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = std::fs::read_to_string(adapter().join("adapter_config.json")).unwrap();
    let apply = || {
        let mut model = load_dir::<Cpu>(&fixtures().join("tiny/v5"), &Default::default()).unwrap();
        apply_adapter(&mut model, &dir, &Default::default())
            .unwrap_err()
            .to_string()
    };
    assert!(apply().contains("adapter_config.json"), "{}", apply());
    std::fs::write(
        dir.join("adapter_config.json"),
        config.replace("\"use_dora\": false", "\"use_dora\": true"),
    )
    .unwrap();
    assert!(apply().contains("DoRA"), "{}", apply());
    std::fs::write(dir.join("adapter_config.json"), &config).unwrap();
    assert!(
        apply().contains("adapter_model.safetensors: no such file"),
        "{}",
        apply()
    );
    // A module the model does not have, and a B that does not fit.
    let write = |tensors: &[(&str, Vec<usize>)]| {
        let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, shape)| {
                (
                    n.to_string(),
                    vec![0u8; 4 * shape.iter().product::<usize>()],
                    shape.clone(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
            .iter()
            .map(|(n, bytes, shape)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        bytes,
                    )
                    .unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("adapter_model.safetensors"))
            .unwrap();
    };
    let q = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
    write(&[
        (
            "base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_A.weight",
            vec![4, 64],
        ),
        (
            "base_model.model.model.language_model.layers.9.self_attn.q_proj.lora_B.weight",
            vec![64, 4],
        ),
    ]);
    let err = apply();
    assert!(
        err.contains(
            "module `model.language_model.layers.9.self_attn.q_proj` is not a linear layer"
        ),
        "{err}"
    );
    write(&[
        (&format!("{q}.lora_A.weight"), vec![4, 64]),
        (&format!("{q}.lora_B.weight"), vec![65, 4]),
    ]);
    let err = apply();
    assert!(err.contains("do not fit a [64, 64] layer"), "{err}");
    write(&[(&format!("{q}.lora_A.weight"), vec![4, 64])]);
    let err = apply();
    assert!(
        err.contains("has no `") && err.contains("lora_B.weight"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
