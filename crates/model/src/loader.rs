//! Weight loading: Hugging Face safetensors (one file or sharded with `model.safetensors.index.json`, either key
//! layout, bf16/f16/f32 on disk) or random weights at any size, into a [`QwenVl`].
//!
//! Files are memory-mapped and each tensor goes to the device on its own, so host memory holds at most one
//! tensor's converted copy at a time, never a second copy of the model.
//!
//! The architecture (`model.rs`, `vision.rs`, `text.rs`) is separate from the names: [`tensor_specs`] is the table
//! of every tensor a config needs, under the hub-original names, and [`build`] asks a [`TensorSource`] for each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::{DType, Distribution};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::config::QwenVlConfig;
use crate::error::{ModelError, Result};
use crate::layers::{Linear, LinearWeight, Mlp, Nf4Weight, RmsNorm};
use crate::model::QwenVl;
use crate::text::{DecoderLayer, TextAttention, TextModel};
use crate::vision::{PatchMerger, VISION_RMS_EPS, VisionAttention, VisionBlock, VisionTower};

/// One tensor the model needs: hub-original name and shape as stored.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct TensorSpec {
    /// Name in the hub-original layout (`model.layers.0...`, `visual.blocks.0...`, `lm_head.weight`).
    pub name: String,
    /// Shape as stored on disk.
    pub shape: Vec<usize>,
}

/// Every tensor a Qwen2.5-VL of this config has, in the hub-original key layout.
///
/// | module path                                   | tensors                                        |
/// |-----------------------------------------------|------------------------------------------------|
/// | `visual.patch_embed.proj`                      | weight `[hidden, C, tp, p, p]`                 |
/// | `visual.blocks.{i}.norm1/norm2`                | weight `[hidden]`                              |
/// | `visual.blocks.{i}.attn.qkv`                   | weight `[3 hidden, hidden]`, bias              |
/// | `visual.blocks.{i}.attn.proj`                  | weight `[hidden, hidden]`, bias                |
/// | `visual.blocks.{i}.mlp.{gate,up}_proj`         | weight `[inter, hidden]`, bias                 |
/// | `visual.blocks.{i}.mlp.down_proj`              | weight `[hidden, inter]`, bias                 |
/// | `visual.merger.ln_q`                           | weight `[hidden]`                              |
/// | `visual.merger.mlp.0` / `mlp.2`                | `[4 hidden, 4 hidden]` / `[out, 4 hidden]`, bias |
/// | `model.embed_tokens`                           | weight `[vocab, H]`                            |
/// | `model.layers.{i}.{input,post_attention}_layernorm` | weight `[H]`                              |
/// | `model.layers.{i}.self_attn.{q,k,v}_proj`      | weight, bias                                   |
/// | `model.layers.{i}.self_attn.o_proj`            | weight `[H, heads * hd]`                       |
/// | `model.layers.{i}.mlp.{gate,up,down}_proj`     | weight                                         |
/// | `model.norm`, `lm_head` (untied only)          | weight                                         |
pub fn tensor_specs(config: &QwenVlConfig) -> Vec<TensorSpec> {
    let mut specs = Vec::new();
    let mut add = |name: String, shape: &[usize]| {
        specs.push(TensorSpec {
            name,
            shape: shape.to_vec(),
        })
    };
    let v = &config.vision;
    let (vh, vi) = (v.hidden_size, v.intermediate_size);
    add(
        "visual.patch_embed.proj.weight".into(),
        &[
            vh,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    );
    for i in 0..v.depth {
        let p = format!("visual.blocks.{i}");
        add(format!("{p}.norm1.weight"), &[vh]);
        add(format!("{p}.norm2.weight"), &[vh]);
        add(format!("{p}.attn.qkv.weight"), &[3 * vh, vh]);
        add(format!("{p}.attn.qkv.bias"), &[3 * vh]);
        add(format!("{p}.attn.proj.weight"), &[vh, vh]);
        add(format!("{p}.attn.proj.bias"), &[vh]);
        for proj in ["gate_proj", "up_proj"] {
            add(format!("{p}.mlp.{proj}.weight"), &[vi, vh]);
            add(format!("{p}.mlp.{proj}.bias"), &[vi]);
        }
        add(format!("{p}.mlp.down_proj.weight"), &[vh, vi]);
        add(format!("{p}.mlp.down_proj.bias"), &[vh]);
    }
    let merged = vh * v.merge_unit();
    add("visual.merger.ln_q.weight".into(), &[vh]);
    add("visual.merger.mlp.0.weight".into(), &[merged, merged]);
    add("visual.merger.mlp.0.bias".into(), &[merged]);
    add(
        "visual.merger.mlp.2.weight".into(),
        &[v.out_hidden_size, merged],
    );
    add("visual.merger.mlp.2.bias".into(), &[v.out_hidden_size]);

    let t = &config.text;
    let (h, hd) = (t.hidden_size, t.head_dim());
    let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
    add("model.embed_tokens.weight".into(), &[t.vocab_size, h]);
    for i in 0..t.num_hidden_layers {
        let p = format!("model.layers.{i}");
        add(format!("{p}.input_layernorm.weight"), &[h]);
        add(format!("{p}.post_attention_layernorm.weight"), &[h]);
        for (proj, out) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            add(format!("{p}.self_attn.{proj}.weight"), &[out, h]);
            add(format!("{p}.self_attn.{proj}.bias"), &[out]);
        }
        add(format!("{p}.self_attn.o_proj.weight"), &[h, q]);
        add(
            format!("{p}.mlp.gate_proj.weight"),
            &[t.intermediate_size, h],
        );
        add(format!("{p}.mlp.up_proj.weight"), &[t.intermediate_size, h]);
        add(
            format!("{p}.mlp.down_proj.weight"),
            &[h, t.intermediate_size],
        );
    }
    add("model.norm.weight".into(), &[h]);
    if !t.tie_word_embeddings {
        add("lm_head.weight".into(), &[t.vocab_size, h]);
    }
    specs
}

/// Quantize dense linear weights to NF4 while loading, one tensor at a time (bitsandbytes' `load_in_4bit`).
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    /// Values per block (64, as bitsandbytes' default).
    pub blocksize: usize,
    /// Quantize the block scales too (bitsandbytes' `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
    /// Linear layers whose name contains one of these stay dense (transformers' `llm_int8_skip_modules`).
    pub skip: Vec<String>,
    /// Quantize the token embedding too (transformers keeps it dense): the lookup then dequantizes the rows it
    /// reads. Saves three quarters of the table's memory (1,090 MB in bf16 for the 7B) at NF4's precision.
    pub embedding: bool,
}

impl Default for QuantizeOptions {
    /// What transformers does for Qwen2.5-VL with `load_in_4bit`: every linear layer except `lm_head`.
    fn default() -> Self {
        Self {
            blocksize: 64,
            double_quant: true,
            skip: vec!["lm_head".into()],
            embedding: false,
        }
    }
}

impl QuantizeOptions {
    /// Also quantize `lm_head` (smaller, slightly less accurate).
    pub fn with_lm_head(mut self) -> Self {
        self.skip.retain(|s| s != "lm_head");
        self
    }

    /// Also quantize the token embedding (see [`Self::embedding`]).
    pub fn with_embedding(mut self) -> Self {
        self.embedding = true;
        self
    }

    /// Every 2-D weight in NF4: the linear layers, `lm_head` and the token embedding (the smallest model).
    pub fn everything() -> Self {
        Self::default().with_lm_head().with_embedding()
    }

    pub(crate) fn skips(&self, name: &str) -> bool {
        self.skip.iter().any(|k| name.contains(k.as_str()))
    }
}

/// Where [`build`] gets each tensor from.
pub trait TensorSource<B: Backend> {
    /// The tensor `name` (hub-original layout) with the stored shape `shape`, on the device.
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>>;

    /// The weight of linear layer `name` (`[out, in]`): dense by default.
    fn linear_weight(&mut self, name: &str, out: usize, inp: usize) -> Result<LinearWeight<B>> {
        Ok(LinearWeight::Dense(burn::module::Param::from_tensor(
            self.tensor(&format!("{name}.weight"), [out, inp])?,
        )))
    }

    /// The token embedding `name` (`[vocab, hidden]`): dense by default.
    fn embedding(&mut self, name: &str, vocab: usize, hidden: usize) -> Result<LinearWeight<B>> {
        Ok(LinearWeight::Dense(burn::module::Param::from_tensor(
            self.tensor(&format!("{name}.weight"), [vocab, hidden])?,
        )))
    }
}

fn upload_nf4<B: Backend>(tensor: &medvl_nf4::Nf4Tensor, device: &B::Device) -> LinearWeight<B> {
    LinearWeight::Nf4(Nf4Weight::from_host(tensor, device))
}

pub(crate) fn quantize_host(
    name: &str,
    data: TensorData,
    shape: [usize; 2],
    q: &QuantizeOptions,
) -> Result<medvl_nf4::Nf4Tensor> {
    let values: Vec<f32> =
        data.convert::<f32>()
            .to_vec()
            .map_err(|e| ModelError::Quantization {
                name: name.into(),
                reason: format!("{e:?}"),
            })?;
    medvl_nf4::quantize(&values, &shape, q.blocksize, q.double_quant).map_err(|e| {
        ModelError::Quantization {
            name: name.into(),
            reason: e.to_string(),
        }
    })
}

/// Builds the model by asking `source` for every tensor of [`tensor_specs`].
pub fn build<B: Backend, S: TensorSource<B>>(
    config: &QwenVlConfig,
    source: &mut S,
) -> Result<QwenVl<B>> {
    let v = &config.vision;
    let (vh, vi) = (v.hidden_size, v.intermediate_size);
    let linear =
        |src: &mut S, name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear<B>> {
            let weight = src.linear_weight(name, out, inp)?;
            let bias = if bias {
                Some(burn::module::Param::from_tensor(
                    src.tensor(&format!("{name}.bias"), [out])?,
                ))
            } else {
                None
            };
            Ok(Linear {
                weight,
                bias,
                lora: None,
            })
        };
    let norm = |src: &mut S, name: &str, dim: usize, eps: f64| -> Result<RmsNorm<B>> {
        Ok(RmsNorm::new(
            src.tensor(&format!("{name}.weight"), [dim])?,
            eps,
        ))
    };
    let mlp = |src: &mut S, p: &str, h: usize, i: usize, bias: bool| -> Result<Mlp<B>> {
        Ok(Mlp {
            gate_proj: linear(src, &format!("{p}.gate_proj"), i, h, bias)?,
            up_proj: linear(src, &format!("{p}.up_proj"), i, h, bias)?,
            down_proj: linear(src, &format!("{p}.down_proj"), h, i, bias)?,
        })
    };

    // Conv3d weight [hidden, C, tp, p, p] flattened to the [hidden, C*tp*p*p] of a patch row.
    let patch: Tensor<B, 5> = source.tensor(
        "visual.patch_embed.proj.weight",
        [
            vh,
            v.in_channels,
            v.temporal_patch_size,
            v.patch_size,
            v.patch_size,
        ],
    )?;
    let patch_embed = Linear::new(patch.reshape([vh, v.patch_dim()]), None);
    let mut blocks = Vec::with_capacity(v.depth);
    for i in 0..v.depth {
        let p = format!("visual.blocks.{i}");
        blocks.push(VisionBlock {
            norm1: norm(source, &format!("{p}.norm1"), vh, VISION_RMS_EPS)?,
            norm2: norm(source, &format!("{p}.norm2"), vh, VISION_RMS_EPS)?,
            attn: VisionAttention {
                qkv: linear(source, &format!("{p}.attn.qkv"), 3 * vh, vh, true)?,
                proj: linear(source, &format!("{p}.attn.proj"), vh, vh, true)?,
                num_heads: v.num_heads,
            },
            mlp: mlp(source, &format!("{p}.mlp"), vh, vi, true)?,
        });
    }
    let merged = vh * v.merge_unit();
    let merger = PatchMerger {
        ln_q: norm(source, "visual.merger.ln_q", vh, VISION_RMS_EPS)?,
        fc1: linear(source, "visual.merger.mlp.0", merged, merged, true)?,
        fc2: linear(
            source,
            "visual.merger.mlp.2",
            v.out_hidden_size,
            merged,
            true,
        )?,
    };
    let visual = VisionTower {
        patch_embed,
        blocks,
        merger,
        config: v.clone(),
    };

    let t = &config.text;
    let (h, hd, eps) = (t.hidden_size, t.head_dim(), t.rms_norm_eps);
    let embed_tokens = source.embedding("model.embed_tokens", t.vocab_size, h)?;
    let mut layers = Vec::with_capacity(t.num_hidden_layers);
    for i in 0..t.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let (q, kv) = (t.num_attention_heads * hd, t.num_key_value_heads * hd);
        layers.push(DecoderLayer {
            input_layernorm: norm(source, &format!("{p}.input_layernorm"), h, eps)?,
            self_attn: TextAttention {
                q_proj: linear(source, &format!("{p}.self_attn.q_proj"), q, h, true)?,
                k_proj: linear(source, &format!("{p}.self_attn.k_proj"), kv, h, true)?,
                v_proj: linear(source, &format!("{p}.self_attn.v_proj"), kv, h, true)?,
                o_proj: linear(source, &format!("{p}.self_attn.o_proj"), h, q, false)?,
                num_heads: t.num_attention_heads,
                num_kv_heads: t.num_key_value_heads,
            },
            post_attention_layernorm: norm(
                source,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: mlp(source, &format!("{p}.mlp"), h, t.intermediate_size, false)?,
        });
    }
    let norm_final = norm(source, "model.norm", h, eps)?;
    let lm_head = if t.tie_word_embeddings {
        None
    } else {
        Some(linear(source, "lm_head", t.vocab_size, h, false)?)
    };
    let text = TextModel {
        embed_tokens,
        layers,
        norm: norm_final,
        lm_head,
        config: t.clone(),
    };
    Ok(QwenVl {
        visual,
        text,
        config: config.clone(),
    })
}

/// Random weights at the config's real shapes, generated on the device (for benchmarks without a download):
/// RMSNorm weights are ones, biases zeros, everything else normal with std 0.02 (transformers' init).
#[derive(Debug)]
pub struct RandomSource<'a, B: Backend> {
    device: &'a B::Device,
    quantize: Option<QuantizeOptions>,
}

impl<'a, B: Backend> RandomSource<'a, B> {
    /// Random tensors on `device`. Seed the backend (`B::seed`) for reproducible values.
    pub fn new(device: &'a B::Device) -> Self {
        Self {
            device,
            quantize: None,
        }
    }

    /// Random weights, linear layers quantized to NF4 (on the host, one layer at a time).
    pub fn quantized(device: &'a B::Device, options: QuantizeOptions) -> Self {
        Self {
            device,
            quantize: Some(options),
        }
    }
}

impl<B: Backend> TensorSource<B> for RandomSource<'_, B> {
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let is_norm = D == 1 && (name.contains("norm") || name.contains("ln_q"));
        Ok(if is_norm {
            Tensor::ones(shape, self.device)
        } else if name.ends_with(".bias") {
            Tensor::zeros(shape, self.device)
        } else {
            Tensor::random(shape, Distribution::Normal(0.0, 0.02), self.device)
        })
    }

    fn linear_weight(&mut self, name: &str, out: usize, inp: usize) -> Result<LinearWeight<B>> {
        let quantize = self.quantize.as_ref().is_some_and(|q| !q.skips(name));
        self.weight(name, [out, inp], quantize)
    }

    fn embedding(&mut self, name: &str, vocab: usize, hidden: usize) -> Result<LinearWeight<B>> {
        let quantize = self.quantize.as_ref().is_some_and(|q| q.embedding);
        self.weight(name, [vocab, hidden], quantize)
    }
}

impl<B: Backend> RandomSource<'_, B> {
    /// The random 2-D weight of module `name`, quantized on the host when `quantize`.
    fn weight(&mut self, name: &str, shape: [usize; 2], quantize: bool) -> Result<LinearWeight<B>> {
        let dense: Tensor<B, 2> = self.tensor(&format!("{name}.weight"), shape)?;
        match &self.quantize {
            Some(q) if quantize => Ok(upload_nf4(
                &quantize_host(name, dense.into_data(), shape, q)?,
                self.device,
            )),
            _ => Ok(LinearWeight::Dense(burn::module::Param::from_tensor(dense))),
        }
    }
}

/// Maps a hub-original name to the transformers >= 4.52 layout (`model.language_model.*`, `model.visual.*`).
/// The inverse of [`v5_name`]: the hub-original name of a stored name in either layout.
pub(crate) fn hub_name(stored: &str) -> String {
    stored
        .replacen("model.language_model.", "model.", 1)
        .replacen("model.visual.", "visual.", 1)
}

fn v5_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("visual.") {
        Some(format!("model.visual.{rest}"))
    } else {
        name.strip_prefix("model.")
            .map(|rest| format!("model.language_model.{rest}"))
    }
}

/// Tensors stored in some checkpoints that carry no weights.
fn is_ignorable(name: &str) -> bool {
    name.ends_with("rotary_emb.inv_freq")
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

/// Where one stored tensor's bytes are.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range in the mapped file (header included in the offset).
    range: std::ops::Range<usize>,
}

/// A safetensors checkpoint on disk: one file, a sharded set with its index, or every `*.safetensors` of a dir.
/// Headers are parsed once on open.
pub struct Checkpoint {
    files: Vec<MappedFile>,
    /// Stored name -> location.
    names: HashMap<String, Entry>,
    used: BTreeSet<String>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.file_list())
            .field("tensors", &self.names.len())
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Checkpoint {
    /// Opens the safetensors weights of a model directory: `model.safetensors.index.json` when present,
    /// otherwise every `*.safetensors` file in it.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let parsed: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::Safetensors {
                    path: index.clone(),
                    reason: e.to_string(),
                })?;
            let map = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Safetensors {
                    path: index.clone(),
                    reason: "no `weight_map` object".into(),
                })?;
            let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(io_err(dir))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            found
        };
        if files.is_empty() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors weights in this directory",
                ),
            });
        }
        Self::open_files(&files)
    }

    /// Opens the given safetensors files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut names = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(io_err(path))?;
            // SAFETY: the map is read-only; a checkpoint modified on disk while loading is outside our contract
            // (as for every safetensors loader: transformers, candle).
            #[allow(unsafe_code)]
            let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
            let (header, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            let base = 8 + header;
            for (name, info) in metadata.tensors() {
                let (start, end) = info.data_offsets;
                if base + end > mmap.len() {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor `{name}` ends past the end of the file"),
                    });
                }
                let entry = Entry {
                    file: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    range: base + start..base + end,
                };
                names.insert(name, entry);
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
            });
        }
        Ok(Self {
            files,
            names,
            used: BTreeSet::new(),
        })
    }

    fn file_list(&self) -> String {
        self.files
            .iter()
            .map(|f| f.path.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Stored names, sorted.
    pub fn names(&self) -> BTreeMap<&str, &Path> {
        self.names
            .iter()
            .map(|(n, e)| (n.as_str(), self.files[e.file].path.as_path()))
            .collect()
    }

    /// Finds `name` (hub-original) under either layout; returns the stored name.
    pub fn resolve(&self, name: &str) -> Option<String> {
        if self.names.contains_key(name) {
            return Some(name.to_string());
        }
        v5_name(name).filter(|n| self.names.contains_key(n))
    }

    /// Reads one tensor as host data in its stored dtype (bf16/f16/f32), checking its shape.
    pub fn read(&mut self, name: &str, shape: &[usize]) -> Result<TensorData> {
        let stored = self
            .resolve(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                files: self.file_list(),
            })?;
        let entry = &self.names[&stored];
        let file = &self.files[entry.file];
        if entry.shape != shape {
            return Err(ModelError::TensorShape {
                name: stored,
                path: file.path.clone(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        let dtype = match entry.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            other => {
                return Err(ModelError::TensorDtype {
                    name: stored,
                    path: file.path.clone(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        let bytes = &file.mmap[entry.range.clone()];
        if bytes.len() != shape.iter().product::<usize>() * dtype.size() {
            return Err(ModelError::Safetensors {
                path: file.path.clone(),
                reason: format!(
                    "tensor `{stored}` has {} bytes for shape {shape:?} of {dtype:?}",
                    bytes.len()
                ),
            });
        }
        let data = TensorData::from_bytes_vec(bytes.to_vec(), shape.to_vec(), dtype);
        self.used.insert(stored);
        Ok(data)
    }

    /// The shape of a stored tensor.
    pub fn shape(&self, stored: &str) -> Option<Vec<usize>> {
        self.names.get(stored).map(|e| e.shape.clone())
    }

    /// Raw dtype, shape and bytes of a stored tensor (any dtype) under its stored name, marked as used.
    pub fn raw(&mut self, stored: &str) -> Option<(Dtype, Vec<usize>, Vec<u8>)> {
        let entry = self.names.get(stored)?.clone();
        self.used.insert(stored.to_string());
        Some((
            entry.dtype,
            entry.shape.clone(),
            self.files[entry.file].mmap[entry.range].to_vec(),
        ))
    }

    /// Reads a bitsandbytes NF4 weight (`name` plus its `absmax`, `quant_map`, `nested_*` and quant-state keys) when
    /// the checkpoint holds one under `name`; `None` for a dense weight.
    pub fn read_bnb_nf4(
        &mut self,
        name: &str,
        shape: [usize; 2],
    ) -> Result<Option<medvl_nf4::Nf4Tensor>> {
        let state_key = format!("{name}.{}", medvl_nf4::bnb::QUANT_STATE_KEY);
        let Some(stored_state) = self.resolve(&state_key) else {
            return Ok(None);
        };
        let stored =
            &stored_state[..stored_state.len() - medvl_nf4::bnb::QUANT_STATE_KEY.len() - 1];
        let path = self.files[self.names[&stored_state].file].path.clone();
        let err = |reason: String| ModelError::Quantization {
            name: stored.to_string(),
            reason,
        };
        let f32s = |bytes: Vec<u8>| -> Vec<f32> {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let (_, _, state) = self
            .raw(&stored_state)
            .ok_or_else(|| err("no quant state".into()))?;
        let state: medvl_nf4::bnb::QuantStateJson =
            serde_json::from_slice(&state).map_err(|e| err(format!("quant state JSON: {e}")))?;
        if state.shape != shape {
            return Err(ModelError::TensorShape {
                name: stored.into(),
                path,
                expected: shape.to_vec(),
                found: state.shape,
            });
        }
        let (_, _, weight) = self
            .raw(stored)
            .ok_or_else(|| err("no packed weight".into()))?;
        let (absmax_dtype, _, absmax) = self
            .raw(&format!("{stored}.absmax"))
            .ok_or_else(|| err("no absmax".into()))?;
        let (_, _, quant_map) = self
            .raw(&format!("{stored}.quant_map"))
            .ok_or_else(|| err("no quant_map".into()))?;
        let nested_absmax = self
            .raw(&format!("{stored}.nested_absmax"))
            .map(|(_, _, b)| f32s(b));
        let nested_quant_map = self
            .raw(&format!("{stored}.nested_quant_map"))
            .map(|(_, _, b)| f32s(b));
        let (absmax_u8, absmax_f32) = match absmax_dtype {
            Dtype::U8 => (Some(absmax), None),
            Dtype::F32 => (None, Some(f32s(absmax))),
            other => return Err(err(format!("absmax of dtype {other:?}"))),
        };
        let parts = medvl_nf4::bnb::BnbParts {
            weight,
            absmax_u8,
            absmax_f32,
            quant_map: f32s(quant_map),
            nested_absmax,
            nested_quant_map,
            state,
        };
        parts
            .into_tensor()
            .map(Some)
            .map_err(|e| err(e.to_string()))
    }

    /// Errors if the checkpoint holds tensors that were never read (other than known non-weights).
    pub fn check_all_used(&self) -> Result<()> {
        let mut unused: Vec<(&String, usize)> = self
            .names
            .iter()
            .filter(|(n, _)| !self.used.contains(*n) && !is_ignorable(n))
            .map(|(n, e)| (n, e.file))
            .collect();
        unused.sort();
        match unused.first() {
            None => Ok(()),
            Some((name, file)) => Err(ModelError::UnexpectedTensors {
                count: unused.len(),
                example: (*name).clone(),
                path: self.files[*file].path.clone(),
            }),
        }
    }
}

/// [`TensorSource`] over a [`Checkpoint`]: each tensor converted to the backend's float dtype on its own.
#[derive(Debug)]
pub struct CheckpointSource<'a, B: Backend> {
    /// The checkpoint read from.
    pub checkpoint: Checkpoint,
    device: &'a B::Device,
    quantize: Option<QuantizeOptions>,
}

impl<'a, B: Backend> CheckpointSource<'a, B> {
    /// Reads from `checkpoint` onto `device`; pre-quantized bitsandbytes weights load as NF4, and with `quantize`
    /// dense linear weights are quantized as they are read.
    pub fn new(
        checkpoint: Checkpoint,
        device: &'a B::Device,
        quantize: Option<QuantizeOptions>,
    ) -> Self {
        Self {
            checkpoint,
            device,
            quantize,
        }
    }
}

impl<B: Backend> TensorSource<B> for CheckpointSource<'_, B> {
    fn tensor<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>> {
        let data = self.checkpoint.read(name, &shape)?;
        Ok(Tensor::from_data(data, self.device))
    }

    fn linear_weight(&mut self, name: &str, out: usize, inp: usize) -> Result<LinearWeight<B>> {
        let quantize = self.quantize.as_ref().is_some_and(|q| !q.skips(name));
        self.weight(name, [out, inp], quantize)
    }

    fn embedding(&mut self, name: &str, vocab: usize, hidden: usize) -> Result<LinearWeight<B>> {
        let quantize = self.quantize.as_ref().is_some_and(|q| q.embedding);
        self.weight(name, [vocab, hidden], quantize)
    }
}

impl<B: Backend> CheckpointSource<'_, B> {
    /// The 2-D weight of module `name`: NF4 as stored when the checkpoint holds it in bitsandbytes' layout,
    /// else quantized as it is read when `quantize`, else dense.
    fn weight(
        &mut self,
        name: &str,
        [out, inp]: [usize; 2],
        quantize: bool,
    ) -> Result<LinearWeight<B>> {
        let weight = format!("{name}.weight");
        if let Some(tensor) = self.checkpoint.read_bnb_nf4(&weight, [out, inp])? {
            return Ok(upload_nf4(&tensor, self.device));
        }
        let data = self.checkpoint.read(&weight, &[out, inp])?;
        match &self.quantize {
            Some(q) if quantize => Ok(upload_nf4(
                &quantize_host(&weight, data, [out, inp], q)?,
                self.device,
            )),
            _ => Ok(LinearWeight::Dense(burn::module::Param::from_tensor(
                Tensor::from_data(data, self.device),
            ))),
        }
    }
}

/// Loads a model directory (`config.json` + safetensors) onto `device`, in the backend's float dtype.
/// Pre-quantized bitsandbytes NF4 weights load as NF4.
pub fn load_dir<B: Backend>(dir: &Path, device: &B::Device) -> Result<QwenVl<B>> {
    load_dir_with(dir, device, None)
}

/// [`load_dir`], quantizing dense linear weights to NF4 as they are read when `quantize` is given.
pub fn load_dir_with<B: Backend>(
    dir: &Path,
    device: &B::Device,
    quantize: Option<QuantizeOptions>,
) -> Result<QwenVl<B>> {
    let config = QwenVlConfig::from_file(&dir.join("config.json"))?;
    let _span = tracing::info_span!("load_weights", dir = %dir.display()).entered();
    let mut source = CheckpointSource::<B>::new(Checkpoint::open_dir(dir)?, device, quantize);
    let model = build(&config, &mut source)?;
    source.checkpoint.check_all_used()?;
    Ok(model)
}

/// A model of the given config with random weights (see [`RandomSource`]).
pub fn random<B: Backend>(config: &QwenVlConfig, device: &B::Device) -> QwenVl<B> {
    build(config, &mut RandomSource::new(device)).expect("random weights cannot fail")
}

/// The linear layers of a config: every 2-D weight of [`tensor_specs`] except the token embedding.
pub fn linear_specs(config: &QwenVlConfig) -> Vec<(String, [usize; 2])> {
    tensor_specs(config)
        .into_iter()
        .filter(|s| {
            s.shape.len() == 2
                && s.name.ends_with(".weight")
                && s.name != "model.embed_tokens.weight"
        })
        .map(|s| {
            (
                s.name.trim_end_matches(".weight").to_string(),
                [s.shape[0], s.shape[1]],
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(path)
    }

    /// The 7B's tensors as transformers builds them (fixtures/tensor_list.py, meta device) equal our table.
    #[test]
    fn seven_b_specs_equal_transformers() {
        let config = QwenVlConfig::from_file(&fixture("configs/qwen2_5_vl_7b_hub.json")).unwrap();
        assert_eq!(config, QwenVlConfig::qwen2_5_vl_7b());
        let text = std::fs::read_to_string(fixture("configs/qwen2_5_vl_7b_tensors.json")).unwrap();
        let expected: BTreeMap<String, Vec<usize>> = serde_json::from_str(&text).unwrap();
        let ours: BTreeMap<String, Vec<usize>> = tensor_specs(&config)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing {missing:?}, extra {extra:?}"
        );
        assert_eq!(ours, expected);
        let params: usize = ours.values().map(|s| s.iter().product::<usize>()).sum();
        assert_eq!(params, 8_292_166_656);
    }

    /// A source that records what `build` asks for; the requests must be exactly `tensor_specs`.
    struct Recording<'a, B: Backend> {
        device: &'a B::Device,
        asked: Vec<TensorSpec>,
    }

    impl<B: Backend> TensorSource<B> for Recording<'_, B> {
        fn tensor<const D: usize>(
            &mut self,
            name: &str,
            shape: [usize; D],
        ) -> Result<Tensor<B, D>> {
            self.asked.push(TensorSpec {
                name: name.into(),
                shape: shape.to_vec(),
            });
            Ok(Tensor::zeros(shape, self.device))
        }
    }

    #[cfg(feature = "ndarray")]
    #[test]
    fn build_asks_for_exactly_the_specs() {
        type B = burn::backend::NdArray<f32>;
        let device = Default::default();
        let config = QwenVlConfig::from_file(&fixture("tiny/hub/config.json")).unwrap();
        let mut source = Recording::<B> {
            device: &device,
            asked: Vec::new(),
        };
        build(&config, &mut source).unwrap();
        let mut asked = source.asked;
        asked.sort();
        let mut specs = tensor_specs(&config);
        specs.sort();
        assert_eq!(asked, specs);
    }

    #[cfg(feature = "ndarray")]
    mod errors {
        use super::*;
        type B = burn::backend::NdArray<f32>;

        /// Copies the tiny hub checkpoint into a temp dir with `edit` applied to its tensors.
        fn edited(
            tag: &str,
            edit: impl FnOnce(&mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
        ) -> PathBuf {
            let src = fixture("tiny/hub");
            let dir =
                std::env::temp_dir().join(format!("medvl-loader-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
            let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
                .tensors()
                .into_iter()
                .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
                .collect();
            edit(&mut tensors);
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
                .iter()
                .map(|(n, (d, s, b))| {
                    (
                        n.clone(),
                        safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                    )
                })
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
            dir
        }

        fn load_err(dir: &Path) -> String {
            let device = Default::default();
            let err = load_dir::<B>(dir, &device).unwrap_err().to_string();
            std::fs::remove_dir_all(dir).ok();
            err
        }

        #[test]
        fn missing_tensor_is_named() {
            let dir = edited("missing", |t| {
                t.remove("model.layers.1.mlp.up_proj.weight");
            });
            let err = load_err(&dir);
            assert!(
                err.contains("model.layers.1.mlp.up_proj.weight")
                    && err.contains("model.safetensors"),
                "{err}"
            );
        }

        #[test]
        fn wrong_shape_names_expected_and_found() {
            let dir = edited("shape", |t| {
                let e = t.get_mut("model.norm.weight").unwrap();
                e.1 = vec![32];
                e.2.truncate(32 * 4);
            });
            let err = load_err(&dir);
            assert!(
                err.contains("model.norm.weight") && err.contains("[64]") && err.contains("[32]"),
                "{err}"
            );
        }

        #[test]
        fn extra_tensor_is_named() {
            let dir = edited("extra", |t| {
                t.insert(
                    "model.layers.9.surprise.weight".into(),
                    (Dtype::F32, vec![1], vec![0; 4]),
                );
            });
            let err = load_err(&dir);
            assert!(err.contains("model.layers.9.surprise.weight"), "{err}");
        }

        /// bf16 and f16 on disk load and convert: the model equals the f32 one rounded to that dtype.
        #[test]
        fn half_precision_on_disk_loads() {
            for (tag, dtype) in [("bf16", Dtype::BF16), ("f16", Dtype::F16)] {
                let dir = edited(tag, |t| {
                    for (_, (d, _, b)) in t.iter_mut() {
                        let halves: Vec<u8> = b
                            .chunks_exact(4)
                            .flat_map(|c| {
                                let x = f32::from_le_bytes(c.try_into().unwrap());
                                match dtype {
                                    Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                                    _ => half::f16::from_f32(x).to_le_bytes(),
                                }
                            })
                            .collect();
                        *d = dtype;
                        *b = halves;
                    }
                });
                let device = Default::default();
                let model = load_dir::<B>(&dir, &device).unwrap();
                std::fs::remove_dir_all(&dir).ok();
                let w: Vec<f32> = model.text.norm.weight.val().into_data().to_vec().unwrap();
                let mut cp = Checkpoint::open_dir(&fixture("tiny/hub")).unwrap();
                let orig: Vec<f32> = cp
                    .read("model.norm.weight", &[64])
                    .unwrap()
                    .to_vec()
                    .unwrap();
                for (a, b) in w.iter().zip(&orig) {
                    let rounded = match dtype {
                        Dtype::BF16 => half::bf16::from_f32(*b).to_f32(),
                        _ => half::f16::from_f32(*b).to_f32(),
                    };
                    assert_eq!(*a, rounded, "{tag}");
                }
            }
        }
    }
}
