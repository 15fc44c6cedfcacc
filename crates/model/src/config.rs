//! Qwen2.5-VL configuration, parsed from any of the three `config.json` shapes found in the wild.
//!
//! 1. the hub original: text fields at the top level, `rope_scaling {type: "mrope", mrope_section}`;
//! 2. transformers >= 4.5x: the text fields nested under `text_config`;
//! 3. transformers 5.x: `rope_parameters {rope_type, mrope_section, rope_theta}` inside `text_config`.
//!
//! The vision config may name its input channels `in_chans` or `in_channels`.
//! There is no fallback to the Python class defaults (those are the 72B's): a missing architecture field is an
//! error naming that field.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Special token ids of a Qwen2.5-VL vocabulary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenIds {
    /// `<|image_pad|>`: one per image token after expansion.
    pub image: u32,
    /// `<|video_pad|>`.
    pub video: u32,
    /// `<|vision_start|>`.
    pub vision_start: u32,
    /// `<|vision_end|>`.
    pub vision_end: u32,
    /// Ids that end generation (`<|im_end|>`, `<|endoftext|>`).
    pub eos: Vec<u32>,
    /// `<|endoftext|>`, used for padding.
    pub pad: u32,
}

/// The token ids shared by every Qwen2.5-VL size (REFERENCE.md §1), used where a config names none.
pub mod qwen_ids {
    /// `<|endoftext|>` (pad, and a stop token).
    pub const ENDOFTEXT: u32 = 151_643;
    /// `<|im_start|>`.
    pub const IM_START: u32 = 151_644;
    /// `<|im_end|>` (eos).
    pub const IM_END: u32 = 151_645;
    /// `<|vision_start|>`.
    pub const VISION_START: u32 = 151_652;
    /// `<|vision_end|>`.
    pub const VISION_END: u32 = 151_653;
    /// `<|image_pad|>`.
    pub const IMAGE_PAD: u32 = 151_655;
    /// `<|video_pad|>`.
    pub const VIDEO_PAD: u32 = 151_656;
}

/// The language model half of Qwen2.5-VL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextConfig {
    /// Width of the residual stream (3584 for the 7B).
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP (18944 for the 7B).
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// Epsilon of every RMSNorm in the decoder.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Frequencies given to the temporal, height and width position (sums to head_dim / 2).
    pub mrope_section: [usize; 3],
    /// Whether `lm_head` shares the embedding matrix (false for the 7B, true for the 3B).
    pub tie_word_embeddings: bool,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
}

impl TextConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Query heads per key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }
}

/// The vision tower half of Qwen2.5-VL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Number of transformer blocks (32).
    pub depth: usize,
    /// Width of the vision residual stream (1280).
    pub hidden_size: usize,
    /// Width of the vision SwiGLU MLP (3420).
    pub intermediate_size: usize,
    /// Attention heads (16, head_dim 80).
    pub num_heads: usize,
    /// Input channels (3).
    pub in_channels: usize,
    /// Width of the merged image tokens handed to the LLM (= text hidden size).
    pub out_hidden_size: usize,
    /// Side of one square patch in pixels (14).
    pub patch_size: usize,
    /// Frames per temporal patch (2; a still image is repeated).
    pub temporal_patch_size: usize,
    /// Patches merged per side into one LLM token (2).
    pub spatial_merge_size: usize,
    /// Side of one attention window in pixels (112).
    pub window_size: usize,
    /// Blocks that attend over the whole image instead of windows.
    pub fullatt_block_indexes: Vec<usize>,
    /// Temporal position scale for videos.
    pub tokens_per_second: f64,
    /// Base of the 2D rotary embedding (10000).
    pub rope_theta: f64,
}

impl VisionConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Length of one flattened patch row: channels x temporal x patch x patch (1176).
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Patches merged into one LLM token (4).
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Side of an attention window in merged tokens (112 / 14 / 2 = 4).
    pub fn window_merged(&self) -> usize {
        self.window_size / self.spatial_merge_size / self.patch_size
    }

    /// Whether block `i` attends over the whole image.
    pub fn is_full_attention(&self, block: usize) -> bool {
        self.fullatt_block_indexes.contains(&block)
    }

    /// Pixel side that every resized image must be a multiple of (28).
    pub fn resize_factor(&self) -> usize {
        self.patch_size * self.spatial_merge_size
    }
}

/// A whole Qwen2.5-VL configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QwenVlConfig {
    /// The decoder.
    pub text: TextConfig,
    /// The vision tower.
    pub vision: VisionConfig,
    /// Special token ids.
    pub tokens: TokenIds,
}

// ---------------------------------------------------------------------------------------------------------------
// Raw shapes as found on disk.

#[derive(Debug, Default, Deserialize)]
struct RawRope {
    #[serde(rename = "type")]
    kind: Option<String>,
    rope_type: Option<String>,
    mrope_section: Option<Vec<usize>>,
    rope_theta: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct RawText {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
    rope_scaling: Option<RawRope>,
    rope_parameters: Option<RawRope>,
    image_token_id: Option<u32>,
    video_token_id: Option<u32>,
    vision_start_token_id: Option<u32>,
    vision_end_token_id: Option<u32>,
    eos_token_id: Option<EosIds>,
    pad_token_id: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum EosIds {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct RawVision {
    depth: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_heads: Option<usize>,
    in_chans: Option<usize>,
    in_channels: Option<usize>,
    out_hidden_size: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    window_size: Option<usize>,
    fullatt_block_indexes: Option<Vec<usize>>,
    tokens_per_second: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_theta: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(flatten)]
    top: RawText,
    text_config: Option<RawText>,
    vision_config: Option<RawVision>,
}

fn need<T>(value: Option<T>, field: &str) -> Result<T> {
    value.ok_or_else(|| ModelError::ConfigField {
        field: field.to_string(),
    })
}

impl QwenVlConfig {
    /// Reads `config.json` from a file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::ConfigJson { source, .. } => ModelError::ConfigJson {
                path: Some(path.to_path_buf()),
                source,
            },
            other => other,
        })
    }

    /// Parses the text of a `config.json` in any of the three known shapes.
    pub fn from_json(json: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(json)
            .map_err(|source| ModelError::ConfigJson { path: None, source })?;
        let top = raw.top;
        let nested = raw.text_config.unwrap_or_default();
        // A field nested in text_config wins over the same field at the top level.
        macro_rules! pick {
            ($f:ident) => {
                nested.$f.or(top.$f)
            };
        }
        let rope = nested
            .rope_parameters
            .or(nested.rope_scaling)
            .or(top.rope_parameters)
            .or(top.rope_scaling)
            .unwrap_or_default();
        let rope_kind = rope
            .rope_type
            .as_deref()
            .or(rope.kind.as_deref())
            .unwrap_or("default");
        if !matches!(rope_kind, "default" | "mrope") {
            return Err(ModelError::ConfigValue {
                field: "rope_scaling.type".into(),
                reason: format!("unsupported rope type {rope_kind:?} (only default/mrope)"),
            });
        }
        let section = need(rope.mrope_section, "mrope_section")?;
        let mrope_section: [usize; 3] =
            section
                .as_slice()
                .try_into()
                .map_err(|_| ModelError::ConfigValue {
                    field: "mrope_section".into(),
                    reason: format!("expected 3 sections (t, h, w), found {section:?}"),
                })?;
        let text = TextConfig {
            hidden_size: need(pick!(hidden_size), "hidden_size")?,
            intermediate_size: need(pick!(intermediate_size), "intermediate_size")?,
            num_hidden_layers: need(pick!(num_hidden_layers), "num_hidden_layers")?,
            num_attention_heads: need(pick!(num_attention_heads), "num_attention_heads")?,
            num_key_value_heads: need(pick!(num_key_value_heads), "num_key_value_heads")?,
            vocab_size: need(pick!(vocab_size), "vocab_size")?,
            rms_norm_eps: need(pick!(rms_norm_eps), "rms_norm_eps")?,
            rope_theta: need(rope.rope_theta.or(pick!(rope_theta)), "rope_theta")?,
            mrope_section,
            tie_word_embeddings: pick!(tie_word_embeddings).unwrap_or(false),
            max_position_embeddings: need(
                pick!(max_position_embeddings),
                "max_position_embeddings",
            )?,
        };
        let v = need(raw.vision_config, "vision_config")?;
        let vision = VisionConfig {
            depth: need(v.depth, "vision_config.depth")?,
            hidden_size: need(v.hidden_size, "vision_config.hidden_size")?,
            intermediate_size: need(v.intermediate_size, "vision_config.intermediate_size")?,
            num_heads: need(v.num_heads, "vision_config.num_heads")?,
            in_channels: v.in_channels.or(v.in_chans).unwrap_or(3),
            out_hidden_size: need(v.out_hidden_size, "vision_config.out_hidden_size")?,
            patch_size: need(v.patch_size, "vision_config.patch_size")?,
            temporal_patch_size: need(v.temporal_patch_size, "vision_config.temporal_patch_size")?,
            spatial_merge_size: need(v.spatial_merge_size, "vision_config.spatial_merge_size")?,
            window_size: need(v.window_size, "vision_config.window_size")?,
            fullatt_block_indexes: need(
                v.fullatt_block_indexes,
                "vision_config.fullatt_block_indexes",
            )?,
            tokens_per_second: v.tokens_per_second.unwrap_or(2.0),
            rope_theta: v
                .rope_parameters
                .and_then(|r| r.rope_theta)
                .or(v.rope_theta)
                .unwrap_or(10_000.0),
        };
        let eos = match pick!(eos_token_id) {
            Some(EosIds::One(id)) => vec![id],
            Some(EosIds::Many(ids)) => ids,
            None => vec![qwen_ids::IM_END],
        };
        let pad = pick!(pad_token_id).unwrap_or(qwen_ids::ENDOFTEXT);
        let mut eos = eos;
        // Generation also stops on the pad token <|endoftext|> (generation_config.json of the instruct models).
        if !eos.contains(&pad) {
            eos.push(pad);
        }
        let tokens = TokenIds {
            image: pick!(image_token_id).unwrap_or(qwen_ids::IMAGE_PAD),
            video: pick!(video_token_id).unwrap_or(qwen_ids::VIDEO_PAD),
            vision_start: pick!(vision_start_token_id).unwrap_or(qwen_ids::VISION_START),
            vision_end: pick!(vision_end_token_id).unwrap_or(qwen_ids::VISION_END),
            eos,
            pad,
        };
        let config = Self {
            text,
            vision,
            tokens,
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the relations between fields that the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let t = &self.text;
        let bad = |field: &str, reason: String| {
            Err(ModelError::ConfigValue {
                field: field.into(),
                reason,
            })
        };
        if t.num_attention_heads == 0 || !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return bad(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    t.num_attention_heads, t.hidden_size
                ),
            );
        }
        if t.num_key_value_heads == 0
            || !t.num_attention_heads.is_multiple_of(t.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} does not divide num_attention_heads {}",
                    t.num_key_value_heads, t.num_attention_heads
                ),
            );
        }
        if !t.head_dim().is_multiple_of(2)
            || t.mrope_section.iter().sum::<usize>() != t.head_dim() / 2
        {
            return bad(
                "mrope_section",
                format!(
                    "{:?} must sum to head_dim/2 = {}",
                    t.mrope_section,
                    t.head_dim() / 2
                ),
            );
        }
        let v = &self.vision;
        if v.num_heads == 0
            || !v.hidden_size.is_multiple_of(v.num_heads)
            || !v.head_dim().is_multiple_of(4)
        {
            return bad(
                "vision_config.num_heads",
                format!(
                    "{} heads do not split hidden {} into a head_dim divisible by 4",
                    v.num_heads, v.hidden_size
                ),
            );
        }
        if v.window_merged() == 0 {
            return bad(
                "vision_config.window_size",
                format!("{} is smaller than one merged token", v.window_size),
            );
        }
        if let Some(&b) = v.fullatt_block_indexes.iter().find(|&&b| b >= v.depth) {
            return bad(
                "vision_config.fullatt_block_indexes",
                format!("block {b} >= depth {}", v.depth),
            );
        }
        Ok(())
    }

    /// Qwen2.5-VL-7B-Instruct as published on the hub.
    pub fn qwen2_5_vl_7b() -> Self {
        Self::preset(3584, 18944, 28, 28, 4, 152_064, false, 3584)
    }

    /// Qwen2.5-VL-3B-Instruct as published on the hub.
    pub fn qwen2_5_vl_3b() -> Self {
        Self::preset(2048, 11008, 36, 16, 2, 151_936, true, 2048)
    }

    #[allow(clippy::too_many_arguments)]
    fn preset(
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        vocab: usize,
        tied: bool,
        out_hidden: usize,
    ) -> Self {
        Self {
            text: TextConfig {
                hidden_size: hidden,
                intermediate_size: intermediate,
                num_hidden_layers: layers,
                num_attention_heads: heads,
                num_key_value_heads: kv_heads,
                vocab_size: vocab,
                rms_norm_eps: 1e-6,
                rope_theta: 1_000_000.0,
                mrope_section: [16, 24, 24],
                tie_word_embeddings: tied,
                max_position_embeddings: 128_000,
            },
            vision: VisionConfig {
                depth: 32,
                hidden_size: 1280,
                intermediate_size: 3420,
                num_heads: 16,
                in_channels: 3,
                out_hidden_size: out_hidden,
                patch_size: 14,
                temporal_patch_size: 2,
                spatial_merge_size: 2,
                window_size: 112,
                fullatt_block_indexes: vec![7, 15, 23, 31],
                tokens_per_second: 2.0,
                rope_theta: 10_000.0,
            },
            tokens: TokenIds {
                image: qwen_ids::IMAGE_PAD,
                video: qwen_ids::VIDEO_PAD,
                vision_start: qwen_ids::VISION_START,
                vision_end: qwen_ids::VISION_END,
                eos: vec![qwen_ids::IM_END, qwen_ids::ENDOFTEXT],
                pad: qwen_ids::ENDOFTEXT,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB_7B: &str = r#"{
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "bos_token_id": 151643, "eos_token_id": 151645,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
      "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
      "intermediate_size": 18944, "max_position_embeddings": 128000, "model_type": "qwen2_5_vl",
      "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
      "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16", "vocab_size": 152064,
      "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}
    }"#;

    /// The shape transformers 5.x writes: nested text_config with rope_parameters, both channel names.
    const V5_7B: &str = r#"{
      "architectures": ["Qwen2_5_VLForConditionalGeneration"], "image_token_id": 151655, "video_token_id": 151656,
      "vision_start_token_id": 151652, "vision_end_token_id": 151653, "model_type": "qwen2_5_vl",
      "text_config": {"hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 128000,
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "vocab_size": 152064, "eos_token_id": 151645, "tie_word_embeddings": false,
        "rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}},
      "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_channels": 3, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2}
    }"#;

    #[test]
    fn hub_and_v5_shapes_parse_to_the_7b_preset() {
        let preset = QwenVlConfig::qwen2_5_vl_7b();
        assert_eq!(QwenVlConfig::from_json(HUB_7B).unwrap(), preset);
        assert_eq!(QwenVlConfig::from_json(V5_7B).unwrap(), preset);
    }

    #[test]
    fn nested_text_config_with_rope_scaling_parses() {
        // transformers 4.5x: nested text_config, rope still under rope_scaling, rope_theta beside it.
        let json = V5_7B.replace(
            r#""rope_parameters": {"rope_type": "default", "type": "mrope", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0}"#,
            r#""rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}"#,
        );
        assert_eq!(
            QwenVlConfig::from_json(&json).unwrap(),
            QwenVlConfig::qwen2_5_vl_7b()
        );
    }

    #[test]
    fn derived_values_of_the_7b() {
        let c = QwenVlConfig::qwen2_5_vl_7b();
        assert_eq!(c.text.head_dim(), 128);
        assert_eq!(c.text.kv_groups(), 7);
        assert_eq!(c.vision.head_dim(), 80);
        assert_eq!(c.vision.patch_dim(), 1176);
        assert_eq!(c.vision.window_merged(), 4);
        assert_eq!(c.vision.resize_factor(), 28);
        assert!(c.vision.is_full_attention(7) && !c.vision.is_full_attention(8));
        assert_eq!(c.tokens.eos, vec![151_645, 151_643]);
    }

    #[test]
    fn missing_field_is_named() {
        let json = HUB_7B.replace(r#""num_key_value_heads": 4,"#, "");
        let err = QwenVlConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn bad_mrope_section_is_rejected() {
        let json = HUB_7B.replace("[16, 24, 24]", "[16, 24, 20]");
        let err = QwenVlConfig::from_json(&json).unwrap_err().to_string();
        assert!(err.contains("mrope_section"), "{err}");
    }
}
