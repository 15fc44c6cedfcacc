//! The bitsandbytes safetensors layout of one quantized linear weight `P` (what transformers writes and reads):
//!
//! | key | dtype, shape | content |
//! |---|---|---|
//! | `P.weight` | u8 `[ceil(n/2), 1]` | packed codes |
//! | `P.weight.absmax` | u8 `[blocks]` with double quant, f32 without | block scales |
//! | `P.weight.quant_map` | f32 `[16]` | the NF4 code book |
//! | `P.weight.nested_absmax` | f32 `[ceil(blocks/256)]` | double quant only |
//! | `P.weight.nested_quant_map` | f32 `[256]` | double quant only |
//! | `P.weight.quant_state.bitsandbytes__nf4` | u8 bytes of JSON | quant_type, blocksize, dtype, shape, nested_* |

use serde::{Deserialize, Serialize};

use crate::{Absmax, NESTED_BLOCKSIZE, NF4_CODE, Nf4Error, Nf4Tensor};

/// Suffix of the JSON state key (after `P.weight.`).
pub const QUANT_STATE_KEY: &str = "quant_state.bitsandbytes__nf4";

/// The JSON state stored beside a quantized weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantStateJson {
    /// `"nf4"`.
    pub quant_type: String,
    /// Values per block.
    pub blocksize: usize,
    /// Dtype of the original weight (`"bfloat16"`, `"float16"`, `"float32"`).
    pub dtype: String,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// 256 with double quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_blocksize: Option<usize>,
    /// `"float32"` with double quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_dtype: Option<String>,
    /// Mean of the scales with double quantization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nested_offset: Option<f64>,
}

/// The stored parts of one quantized weight, as read from or written to safetensors.
#[derive(Debug, Clone, PartialEq)]
pub struct BnbParts {
    /// `P.weight`.
    pub weight: Vec<u8>,
    /// `P.weight.absmax` as u8 codes (double quant).
    pub absmax_u8: Option<Vec<u8>>,
    /// `P.weight.absmax` as f32 (no double quant).
    pub absmax_f32: Option<Vec<f32>>,
    /// `P.weight.quant_map`.
    pub quant_map: Vec<f32>,
    /// `P.weight.nested_absmax`.
    pub nested_absmax: Option<Vec<f32>>,
    /// `P.weight.nested_quant_map`.
    pub nested_quant_map: Option<Vec<f32>>,
    /// `P.weight.quant_state.bitsandbytes__nf4`, parsed.
    pub state: QuantStateJson,
}

impl BnbParts {
    /// Assembles and checks an [`Nf4Tensor`].
    pub fn into_tensor(self) -> Result<Nf4Tensor, Nf4Error> {
        let bad = |m: String| Err(Nf4Error::Inconsistent(m));
        if self.state.quant_type != "nf4" {
            return bad(format!(
                "quant_type {:?}; only nf4 is supported",
                self.state.quant_type
            ));
        }
        if self.quant_map != NF4_CODE {
            return bad("quant_map is not the NF4 code book".into());
        }
        let absmax = match (self.absmax_u8, self.absmax_f32, self.state.nested_offset) {
            (Some(codes), None, Some(offset)) => {
                let (Some(nested_absmax), Some(nested_code)) =
                    (self.nested_absmax, self.nested_quant_map)
                else {
                    return bad(
                        "double quantization without nested_absmax / nested_quant_map".into(),
                    );
                };
                if self.state.nested_blocksize != Some(NESTED_BLOCKSIZE) {
                    return bad(format!(
                        "nested_blocksize {:?}, expected 256",
                        self.state.nested_blocksize
                    ));
                }
                Absmax::Double {
                    codes,
                    nested_absmax,
                    nested_code,
                    offset: offset as f32,
                }
            }
            (None, Some(scales), None) => Absmax::Plain(scales),
            _ => return bad("absmax dtype does not match the presence of nested_offset".into()),
        };
        let tensor = Nf4Tensor {
            packed: self.weight,
            absmax,
            blocksize: self.state.blocksize,
            shape: self.state.shape,
        };
        tensor.validate()?;
        Ok(tensor)
    }

    /// The parts transformers writes for `tensor`, which was quantized from a weight of `dtype`.
    pub fn from_tensor(tensor: &Nf4Tensor, dtype: &str) -> Self {
        let mut state = QuantStateJson {
            quant_type: "nf4".into(),
            blocksize: tensor.blocksize,
            dtype: dtype.into(),
            shape: tensor.shape.clone(),
            nested_blocksize: None,
            nested_dtype: None,
            nested_offset: None,
        };
        let mut parts = BnbParts {
            weight: tensor.packed.clone(),
            absmax_u8: None,
            absmax_f32: None,
            quant_map: NF4_CODE.to_vec(),
            nested_absmax: None,
            nested_quant_map: None,
            state: state.clone(),
        };
        match &tensor.absmax {
            Absmax::Plain(scales) => parts.absmax_f32 = Some(scales.clone()),
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
            } => {
                state.nested_blocksize = Some(NESTED_BLOCKSIZE);
                state.nested_dtype = Some("float32".into());
                state.nested_offset = Some(f64::from(*offset));
                parts.absmax_u8 = Some(codes.clone());
                parts.nested_absmax = Some(nested_absmax.clone());
                parts.nested_quant_map = Some(nested_code.clone());
            }
        }
        parts.state = state;
        parts
    }

    /// The JSON bytes of the state key, formatted as bitsandbytes formats them.
    pub fn state_bytes(&self) -> Vec<u8> {
        serde_json::to_string(&self.state)
            .map(String::into_bytes)
            .unwrap_or_default()
    }
}
