//! `medvl quantize`: write an NF4 checkpoint in the bitsandbytes layout, which transformers + bitsandbytes load
//! as a pre-quantized model (`quantization_config` in `config.json`), and so does [`crate::load_dir`].
//! Tensors are read one at a time; the file is written to a temporary name and renamed, so an interrupted run
//! leaves no partial checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use crate::config::QwenVlConfig;
use crate::error::{ModelError, Result};
use crate::loader::{Checkpoint, QuantizeOptions, hub_name, linear_specs, quantize_host};

/// Files copied unchanged from the source directory when present.
const COPIED: [&str; 5] = [
    "tokenizer.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
    "chat_template.json",
];

/// What [`quantize_dir`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeReport {
    /// Linear layers stored as NF4.
    pub quantized: usize,
    /// Tensors stored as they were.
    pub kept: usize,
    /// Size of the written safetensors file in bytes.
    pub bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Quantizes the model in `src` into `out` (created if needed): linear weights to NF4 (bitsandbytes layout,
/// `options`), everything else unchanged, plus `config.json` with its `quantization_config` and the tokenizer and
/// processor files.
pub fn quantize_dir(src: &Path, out: &Path, options: &QuantizeOptions) -> Result<QuantizeReport> {
    let config_path = src.join("config.json");
    let config = QwenVlConfig::from_file(&config_path)?;
    let mut checkpoint = Checkpoint::open_dir(src)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    let linears: BTreeMap<String, [usize; 2]> = linear_specs(&config).into_iter().collect();
    let mut quantized = 0;
    // The compute dtype recorded for transformers: the dtype the weights came in.
    let mut compute_dtype = "bfloat16";
    let stored_names: Vec<String> = checkpoint.names().into_keys().map(str::to_string).collect();
    for stored in stored_names {
        // Both key layouts map to the same linear names (hub-original in `linear_specs`).
        let canonical = hub_name(stored.trim_end_matches(".weight"));
        match linears.get(&canonical) {
            Some(&shape) if stored.ends_with(".weight") && !options.skips(&canonical) => {
                let data = checkpoint.read(&format!("{canonical}.weight"), &shape)?;
                let dtype = dtype_name(data.dtype);
                compute_dtype = dtype;
                let nf4 = quantize_host(&stored, data, shape, options)?;
                let parts = medvl_nf4::bnb::BnbParts::from_tensor(&nf4, dtype);
                let n = parts.weight.len();
                tensors.insert(
                    stored.clone(),
                    (Dtype::U8, vec![n, 1], parts.weight.clone()),
                );
                if let Some(codes) = &parts.absmax_u8 {
                    tensors.insert(
                        format!("{stored}.absmax"),
                        (Dtype::U8, vec![codes.len()], codes.clone()),
                    );
                }
                if let Some(scales) = &parts.absmax_f32 {
                    tensors.insert(
                        format!("{stored}.absmax"),
                        (Dtype::F32, vec![scales.len()], f32_bytes(scales)),
                    );
                }
                tensors.insert(
                    format!("{stored}.quant_map"),
                    (Dtype::F32, vec![16], f32_bytes(&parts.quant_map)),
                );
                if let (Some(na), Some(nm)) = (&parts.nested_absmax, &parts.nested_quant_map) {
                    tensors.insert(
                        format!("{stored}.nested_absmax"),
                        (Dtype::F32, vec![na.len()], f32_bytes(na)),
                    );
                    tensors.insert(
                        format!("{stored}.nested_quant_map"),
                        (Dtype::F32, vec![nm.len()], f32_bytes(nm)),
                    );
                }
                let state = parts.state_bytes();
                let key = format!("{stored}.{}", medvl_nf4::bnb::QUANT_STATE_KEY);
                tensors.insert(key, (Dtype::U8, vec![state.len()], state));
                quantized += 1;
            }
            _ => {
                let (dtype, shape, bytes) =
                    checkpoint
                        .raw(&stored)
                        .ok_or_else(|| ModelError::MissingTensor {
                            name: stored.clone(),
                            files: src.display().to_string(),
                        })?;
                tensors.insert(stored.clone(), (dtype, shape, bytes));
            }
        }
    }
    let kept = tensors.len() - quantized;
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| ModelError::Safetensors {
                    path: out.to_path_buf(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    let file = out.join("model.safetensors");
    let tmp = out.join("model.safetensors.partial");
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    safetensors::serialize_to_file(views, metadata, &tmp).map_err(|e| ModelError::Safetensors {
        path: tmp.clone(),
        reason: e.to_string(),
    })?;
    std::fs::rename(&tmp, &file).map_err(io(&file))?;

    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).map_err(io(&config_path))?)
            .map_err(|source| ModelError::ConfigJson {
                path: Some(config_path.clone()),
                source,
            })?;
    json["quantization_config"] = serde_json::json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": options.double_quant,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": options.skip,
    });
    let text = serde_json::to_string_pretty(&json).unwrap_or_default();
    let config_out = out.join("config.json");
    std::fs::write(&config_out, text).map_err(io(&config_out))?;
    for name in COPIED {
        let from = src.join(name);
        if from.is_file() {
            std::fs::copy(&from, out.join(name)).map_err(io(&from))?;
        }
    }
    let bytes = std::fs::metadata(&file).map_err(io(&file))?.len();
    Ok(QuantizeReport {
        quantized,
        kept,
        bytes,
    })
}

fn dtype_name(dtype: burn::tensor::DType) -> &'static str {
    match dtype {
        burn::tensor::DType::BF16 => "bfloat16",
        burn::tensor::DType::F16 => "float16",
        _ => "float32",
    }
}
