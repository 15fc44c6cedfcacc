//! Rotary position embeddings: the decoder's 3-axis M-RoPE with `get_rope_index` semantics, and the vision
//! tower's 2D RoPE. Positions and angles are computed on the host in f32, exactly as transformers does (its
//! rotary modules force float32), then uploaded once per forward.
//!
//! Reference: transformers v5.17 `models/qwen2_5_vl/modeling_qwen2_5_vl.py` (`get_rope_index`,
//! `get_vision_position_ids`, `Qwen2_5_VLRotaryEmbedding`, `Qwen2_5_VLVisionRotaryEmbedding`) and
//! `vision_utils.py` (`get_vision_position_ids`).

use burn::prelude::*;

use crate::config::{TextConfig, TokenIds};
use crate::error::{ModelError, Result};

/// 3D positions (temporal, height, width) of every prompt token, plus the offset that continues them in decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    /// `[3][seq_len]`: t, h, w position of each token.
    pub axes: [Vec<i64>; 3],
    /// `max_position + 1 - seq_len`: during decode, token `i` (0-based in the whole sequence) has position
    /// `i + rope_delta` on all three axes.
    pub rope_delta: i64,
}

impl MropePositions {
    /// Sequential positions on all axes (a text-only prompt), starting at `start`.
    pub fn text(start: i64, len: usize) -> Self {
        let seq: Vec<i64> = (start..start + len as i64).collect();
        Self {
            axes: [seq.clone(), seq.clone(), seq],
            rope_delta: 0,
        }
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.axes[0].len()
    }

    /// True for an empty prompt.
    pub fn is_empty(&self) -> bool {
        self.axes[0].is_empty()
    }
}

/// `get_rope_index` for one sequence: text tokens get the same sequential id on all axes; each run of
/// `<|image_pad|>` tokens is one image, laid out as its `(t, h/m, w/m)` grid starting at the current position;
/// text after an image continues from the image's largest position + 1.
///
/// `grids` are the images' `grid_thw` in patches, in prompt order.
pub fn mrope_positions(
    ids: &[u32],
    grids: &[[usize; 3]],
    tokens: &TokenIds,
    spatial_merge: usize,
) -> Result<MropePositions> {
    let mut axes: [Vec<i64>; 3] = [Vec::with_capacity(ids.len()), Vec::new(), Vec::new()];
    axes[1].reserve(ids.len());
    axes[2].reserve(ids.len());
    let mut images = grids.iter();
    let mut pos: i64 = 0;
    let mut i = 0;
    let mut image_index = 0;
    while i < ids.len() {
        if ids[i] != tokens.image {
            for axis in axes.iter_mut() {
                axis.push(pos);
            }
            pos += 1;
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&t| t == tokens.image).count();
        let &[t, h, w] = images.next().ok_or_else(|| {
            ModelError::Input(format!(
                "prompt has more <|image_pad|> runs than the {} image(s) given",
                grids.len()
            ))
        })?;
        let (lh, lw) = (h / spatial_merge, w / spatial_merge);
        if run != t * lh * lw {
            return Err(ModelError::Input(format!(
                "image {image_index} has {} tokens (grid {t}x{h}x{w} / {spatial_merge}^2) but the prompt holds {run} \
                 <|image_pad|> tokens for it",
                t * lh * lw
            )));
        }
        for tt in 0..t as i64 {
            for hh in 0..lh as i64 {
                for ww in 0..lw as i64 {
                    axes[0].push(pos + tt);
                    axes[1].push(pos + hh);
                    axes[2].push(pos + ww);
                }
            }
        }
        pos += lh.max(lw) as i64;
        i += run;
        image_index += 1;
    }
    if images.next().is_some() {
        return Err(ModelError::Input(format!(
            "{} image(s) given but the prompt has only {image_index} <|image_pad|> run(s)",
            grids.len()
        )));
    }
    let max = axes
        .iter()
        .flat_map(|a| a.iter().copied())
        .max()
        .unwrap_or(-1);
    Ok(MropePositions {
        rope_delta: max + 1 - ids.len() as i64,
        axes,
    })
}

/// `1 / theta^(2i/dim)` for `i in 0..dim/2`, in f32 as torch computes it.
pub fn inverse_frequencies(theta: f64, dim: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..dim / 2)
        .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// Host-side cos/sin tables, row-major `[seq_len, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    /// cos of each angle.
    pub cos: Vec<f32>,
    /// sin of each angle.
    pub sin: Vec<f32>,
    /// Width of a row (head_dim).
    pub dim: usize,
}

impl RopeTables {
    fn from_angles(angles: Vec<f32>, half: usize) -> Self {
        // emb = cat(freqs, freqs): each row of `half` angles is used twice.
        let rows = angles.len() / half;
        let mut cos = Vec::with_capacity(rows * half * 2);
        let mut sin = Vec::with_capacity(rows * half * 2);
        for row in angles.chunks(half) {
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        Self {
            cos,
            sin,
            dim: half * 2,
        }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.cos.len() / self.dim
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.cos.is_empty()
    }

    /// Uploads as two `[seq_len, head_dim]` f32 tensors.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let shape = [self.len(), self.dim];
        let opts = (device, burn::tensor::DType::F32);
        (
            Tensor::from_data(TensorData::new(self.cos.clone(), shape), opts),
            Tensor::from_data(TensorData::new(self.sin.clone(), shape), opts),
        )
    }
}

/// The decoder's M-RoPE tables for the given positions: frequency `j` of `head_dim/2` takes its angle from
/// the temporal axis for `j < s0`, the height axis for `j < s0 + s1`, the width axis otherwise.
pub fn text_rope(config: &TextConfig, positions: &MropePositions) -> RopeTables {
    let half = config.head_dim() / 2;
    let inv = inverse_frequencies(config.rope_theta, config.head_dim());
    let [s0, s1, _] = config.mrope_section;
    let axis_of = |j: usize| {
        if j < s0 {
            0
        } else if j < s0 + s1 {
            1
        } else {
            2
        }
    };
    let mut angles = Vec::with_capacity(positions.len() * half);
    for i in 0..positions.len() {
        for (j, f) in inv.iter().enumerate() {
            angles.push(positions.axes[axis_of(j)][i] as f32 * f);
        }
    }
    RopeTables::from_angles(angles, half)
}

/// Per patch, its (row, col) in the patch grid, in the processor's merged-block-major row order.
pub fn vision_patch_positions(grids: &[[usize; 3]], spatial_merge: usize) -> Vec<[usize; 2]> {
    let m = spatial_merge;
    let mut out = Vec::new();
    for &[t, h, w] in grids {
        for _ in 0..t {
            for bh in 0..h / m {
                for bw in 0..w / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            out.push([bh * m + ih, bw * m + iw]);
                        }
                    }
                }
            }
        }
    }
    out
}

/// The vision tower's 2D RoPE tables for patches at the given (row, col): `head_dim/4` frequencies of the row,
/// then the same of the column, duplicated to `head_dim`.
pub fn vision_rope(head_dim: usize, theta: f64, positions: &[[usize; 2]]) -> RopeTables {
    let spatial = head_dim / 2;
    let inv = inverse_frequencies(theta, spatial);
    let half = spatial;
    let mut angles = Vec::with_capacity(positions.len() * half);
    for &[row, col] in positions {
        angles.extend(inv.iter().map(|f| row as f32 * f));
        angles.extend(inv.iter().map(|f| col as f32 * f));
    }
    RopeTables::from_angles(angles, half)
}

/// `rotate_half` RoPE: `x * cos + rotate_half(x) * sin`, computed in f32 and cast back to `x`'s dtype.
///
/// # Shapes
/// - `x`: `[..., head_dim]`, e.g. `[batch, heads, seq, head_dim]` or `[seq, heads, head_dim]`
/// - `cos`, `sin`: f32, broadcastable to `x` (`[1, 1, seq, head_dim]` or `[seq, 1, head_dim]`)
pub fn apply_rope<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    cos: &Tensor<B, D>,
    sin: &Tensor<B, D>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(burn::tensor::FloatDType::F32);
    let d = x.dims()[D - 1];
    let x1 = x.clone().narrow(D - 1, 0, d / 2);
    let x2 = x.clone().narrow(D - 1, d / 2, d / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], D - 1);
    (x * cos.clone() + rotated * sin.clone()).cast(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QwenVlConfig;

    #[test]
    fn text_only_positions_are_sequential() {
        let tokens = QwenVlConfig::qwen2_5_vl_7b().tokens;
        let p = mrope_positions(&[1, 2, 3], &[], &tokens, 2).unwrap();
        assert_eq!(p.axes, [vec![0, 1, 2], vec![0, 1, 2], vec![0, 1, 2]]);
        assert_eq!(p.rope_delta, 0);
    }

    #[test]
    fn image_positions_hand_worked() {
        // text(2) <image 1x4x6 patches = 2x3 tokens> text(2)
        let tokens = QwenVlConfig::qwen2_5_vl_7b().tokens;
        let img = tokens.image;
        let ids = [7, 8, img, img, img, img, img, img, 9, 10];
        let p = mrope_positions(&ids, &[[1, 4, 6]], &tokens, 2).unwrap();
        assert_eq!(p.axes[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 5, 6]);
        assert_eq!(p.axes[1], vec![0, 1, 2, 2, 2, 3, 3, 3, 5, 6]);
        assert_eq!(p.axes[2], vec![0, 1, 2, 3, 4, 2, 3, 4, 5, 6]);
        // max 6 + 1 - 10 tokens
        assert_eq!(p.rope_delta, -3);
    }

    #[test]
    fn image_count_mismatches_are_errors() {
        let tokens = QwenVlConfig::qwen2_5_vl_7b().tokens;
        let img = tokens.image;
        let err = mrope_positions(&[img, img], &[[1, 4, 6]], &tokens, 2)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("6 tokens") && err.contains("2 <|image_pad|>"),
            "{err}"
        );
        let err = mrope_positions(&[1, 2], &[[1, 2, 2]], &tokens, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 image(s) given"), "{err}");
        let err = mrope_positions(&[img], &[], &tokens, 2)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more <|image_pad|> runs"), "{err}");
    }

    #[test]
    fn inverse_frequencies_of_the_7b() {
        let inv = inverse_frequencies(1e6, 128);
        assert_eq!(inv.len(), 64);
        assert_eq!(inv[0], 1.0);
        // 1e6^(-2/128) = exp(-ln(1e6) / 64) = 0.805842...
        assert!((inv[1] - 0.805_842_2).abs() < 1e-6, "{}", inv[1]);
        assert!((inv[63] - 1e6f32.powf(-126.0 / 128.0)).abs() / inv[63] < 1e-6);
    }

    #[test]
    fn mrope_sections_pick_their_axis() {
        let mut config = QwenVlConfig::qwen2_5_vl_7b().text;
        config.hidden_size = 16 * 4;
        config.num_attention_heads = 4; // head_dim 16, 8 frequencies
        config.mrope_section = [2, 3, 3];
        let positions = MropePositions {
            axes: [vec![1], vec![2], vec![3]],
            rope_delta: 0,
        };
        let tables = text_rope(&config, &positions);
        let inv = inverse_frequencies(config.rope_theta, 16);
        let expect: Vec<f32> = (0..8)
            .map(|j| [1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0][j] * inv[j])
            .collect();
        for (j, angle) in expect.iter().enumerate() {
            assert_eq!(tables.cos[j], angle.cos());
            assert_eq!(tables.cos[j + 8], angle.cos());
            assert_eq!(tables.sin[j], angle.sin());
        }
    }

    #[test]
    fn vision_positions_are_block_major() {
        let pos = vision_patch_positions(&[[1, 2, 4]], 2);
        assert_eq!(
            pos,
            vec![
                [0, 0],
                [0, 1],
                [1, 0],
                [1, 1],
                [0, 2],
                [0, 3],
                [1, 2],
                [1, 3]
            ]
        );
    }
}
