//! PEFT LoRA adapters, unmerged: `adapter_config.json` + `adapter_model.safetensors` as peft writes them.
//!
//! Each adapted linear layer computes `y = base(x) + B(A(x)) * scale` with `A` `[r, in]`, `B` `[out, r]` and
//! `scale = alpha / r` (`alpha / sqrt(r)` with rsLoRA), where `r` is the stored `A`'s rank (so `rank_pattern` is
//! honoured by construction) and `alpha` is `lora_alpha` or the `alpha_pattern` entry whose key ends the module
//! path. The base weight stays as loaded (dense or NF4): QLoRA's layout. Keys are
//! `base_model.model.<module path>.lora_{A,B}.weight`, with the module path in either transformers layout
//! (`model.language_model.layers.N...` or `model.layers.N...`, `model.visual...` or `visual...`).
//! Not supported (a clear error): DoRA, LoRA biases, other PEFT types, regular-expression pattern keys.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Param;
use burn::prelude::{Backend, Tensor};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::layers::{Linear, Lora};
use crate::loader::Checkpoint;
use crate::model::QwenVl;

/// The fields of `adapter_config.json` medvl reads (others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    /// Default rank.
    pub r: usize,
    /// Default alpha.
    pub lora_alpha: f64,
    /// Scale by `alpha / sqrt(r)` instead of `alpha / r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Per-module alpha, keyed by a suffix of the module path.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// `LORA`.
    #[serde(default)]
    pub peft_type: Option<String>,
    /// Weight-decomposed LoRA (not supported).
    #[serde(default)]
    pub use_dora: bool,
    /// `none` (LoRA biases are not supported).
    #[serde(default)]
    pub bias: Option<String>,
}

/// What [`apply_adapter`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Linear layers adapted.
    pub modules: usize,
    /// Parameters in the adapter (`A` and `B` of every module).
    pub parameters: usize,
}

fn config_error(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Adapter {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl AdapterConfig {
    /// Reads and checks `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let config: Self =
            serde_json::from_str(&text).map_err(|e| config_error(&path, e.to_string()))?;
        if let Some(t) = config.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(config_error(
                &path,
                format!("peft_type {t}: only LORA adapters load"),
            ));
        }
        if config.use_dora {
            return Err(config_error(
                &path,
                "DoRA adapters (use_dora) are not supported",
            ));
        }
        if let Some(b) = config.bias.as_deref().filter(|b| *b != "none") {
            return Err(config_error(
                &path,
                format!("bias \"{b}\": LoRA biases are not supported"),
            ));
        }
        if let Some(key) = config
            .alpha_pattern
            .keys()
            .find(|k| k.contains(['*', '(', '[', '|', '^', '$', '\\', '?', '+']))
        {
            return Err(config_error(
                &path,
                format!(
                    "alpha_pattern key `{key}`: regular expressions are not supported, only module-path suffixes"
                ),
            ));
        }
        Ok(config)
    }

    /// The scale of the module at `path` with rank `r`.
    pub fn scale(&self, path: &str, r: usize) -> f64 {
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(key, _)| path == key.as_str() || path.ends_with(&format!(".{key}")))
            .map_or(self.lora_alpha, |(_, a)| *a);
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// The linear layer of `model` at a PEFT module path (without the `base_model.model.` prefix), in either
/// transformers layout.
pub fn linear_mut<'a, B: Backend>(
    model: &'a mut QwenVl<B>,
    path: &str,
) -> Option<&'a mut Linear<B>> {
    let path = path.strip_prefix("model.").unwrap_or(path);
    if path == "lm_head" {
        return model.text.lm_head.as_mut();
    }
    if let Some(rest) = path.strip_prefix("visual.") {
        let vision = &mut model.visual;
        return match rest {
            "merger.mlp.0" => Some(&mut vision.merger.fc1),
            "merger.mlp.2" => Some(&mut vision.merger.fc2),
            _ => {
                let (index, module) = rest.strip_prefix("blocks.")?.split_once('.')?;
                let block = vision.blocks.get_mut(index.parse::<usize>().ok()?)?;
                match module {
                    "attn.qkv" => Some(&mut block.attn.qkv),
                    "attn.proj" => Some(&mut block.attn.proj),
                    "mlp.gate_proj" => Some(&mut block.mlp.gate_proj),
                    "mlp.up_proj" => Some(&mut block.mlp.up_proj),
                    "mlp.down_proj" => Some(&mut block.mlp.down_proj),
                    _ => None,
                }
            }
        };
    }
    let path = path.strip_prefix("language_model.").unwrap_or(path);
    let (index, module) = path.strip_prefix("layers.")?.split_once('.')?;
    let layer = model.text.layers.get_mut(index.parse::<usize>().ok()?)?;
    match module {
        "self_attn.q_proj" => Some(&mut layer.self_attn.q_proj),
        "self_attn.k_proj" => Some(&mut layer.self_attn.k_proj),
        "self_attn.v_proj" => Some(&mut layer.self_attn.v_proj),
        "self_attn.o_proj" => Some(&mut layer.self_attn.o_proj),
        "mlp.gate_proj" => Some(&mut layer.mlp.gate_proj),
        "mlp.up_proj" => Some(&mut layer.mlp.up_proj),
        "mlp.down_proj" => Some(&mut layer.mlp.down_proj),
        _ => None,
    }
}

/// Loads the adapter in `dir` into `model` (unmerged, in the backend's float dtype). Every `lora_A` needs its
/// `lora_B`, every module path must name a linear layer of the model, and the shapes must fit it; an adapter
/// already on a layer is replaced.
pub fn apply_adapter<B: Backend>(
    model: &mut QwenVl<B>,
    dir: &Path,
    device: &B::Device,
) -> Result<AdapterSummary> {
    let config = AdapterConfig::from_dir(dir)?;
    let file = dir.join("adapter_model.safetensors");
    if !file.exists() {
        return Err(config_error(
            &file,
            "no such file (adapter_model.bin is not read: convert it to safetensors)",
        ));
    }
    let mut checkpoint = Checkpoint::open_files(std::slice::from_ref(&file))?;
    let names: Vec<String> = checkpoint.names().keys().map(|n| n.to_string()).collect();
    let mut summary = AdapterSummary {
        modules: 0,
        parameters: 0,
    };
    for name in &names {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            if !name.ends_with(".lora_B.weight") {
                return Err(config_error(
                    &file,
                    format!("tensor `{name}` is not a LoRA A or B weight"),
                ));
            }
            continue;
        };
        let path = module.strip_prefix("base_model.model.").unwrap_or(module);
        let b_name = format!("{module}.lora_B.weight");
        let shape_of = |checkpoint: &Checkpoint, n: &str| -> Result<Vec<usize>> {
            checkpoint
                .shape(n)
                .ok_or_else(|| config_error(&file, format!("`{name}` has no `{n}`")))
        };
        let (a_shape, b_shape) = (
            shape_of(&checkpoint, name)?,
            shape_of(&checkpoint, &b_name)?,
        );
        let linear = linear_mut(model, path).ok_or_else(|| {
            config_error(
                &file,
                format!("module `{path}` is not a linear layer of this model"),
            )
        })?;
        let [out, inp] = linear.shape();
        let r = a_shape.first().copied().unwrap_or(0);
        if a_shape != [r, inp] || b_shape != [out, r] || r == 0 {
            return Err(config_error(
                &file,
                format!(
                    "`{path}`: A {a_shape:?} and B {b_shape:?} do not fit a [{out}, {inp}] layer"
                ),
            ));
        }
        let a = checkpoint.read(name, &a_shape)?;
        let b = checkpoint.read(&b_name, &b_shape)?;
        linear.lora = Some(Lora {
            a: Param::from_tensor(Tensor::from_data(a, device)),
            b: Param::from_tensor(Tensor::from_data(b, device)),
            scale: config.scale(path, r),
        });
        summary.modules += 1;
        summary.parameters += r * (inp + out);
    }
    if summary.modules == 0 {
        return Err(config_error(&file, "no LoRA weights in the file"));
    }
    Ok(summary)
}
