//! The Qwen2.5-VL vision tower: patch embedding, 2D RoPE, window attention with the window reordering,
//! full-attention blocks, and the 2x2 patch merger.
//!
//! Reference: transformers v5.17 `Qwen2_5_VisionTransformerPretrainedModel` and `vision_utils.py`
//! (`get_vision_window_index`, `get_vision_cu_seqlens`).

use burn::prelude::*;
use burn::tensor::Int;
use burn::tensor::activation::gelu;

use crate::attention::Segments;
use crate::config::VisionConfig;
use crate::layers::{Linear, Mlp, RmsNorm};
use crate::rope::{apply_rope, vision_patch_positions, vision_rope};

/// Epsilon of every RMSNorm in the vision tower (fixed in the reference code).
pub const VISION_RMS_EPS: f64 = 1e-6;

/// Host-side layout of a batch of images: the window reordering and the attention segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisionLayout {
    /// For each merged-token slot in window order, the merged token it holds (transformers' `window_index`).
    pub window_index: Vec<usize>,
    /// Window boundaries in patches over the reordered sequence (`cu_window_seqlens`, empty windows kept).
    pub cu_windows: Vec<usize>,
    /// Image (frame) boundaries in patches (`cu_seqlens`), for the full-attention blocks.
    pub cu_images: Vec<usize>,
}

impl VisionLayout {
    /// Computes the layout for images of the given `grid_thw`.
    pub fn new(grids: &[[usize; 3]], config: &VisionConfig) -> Self {
        let m = config.spatial_merge_size;
        let unit = config.merge_unit();
        let win = config.window_merged();
        let mut window_index = Vec::new();
        let mut cu_windows = vec![0];
        let mut cu_images = vec![0];
        let mut offset = 0;
        for &[t, h, w] in grids {
            let (lh, lw) = (h / m, w / m);
            // transformers always pads, by a whole window when the side is already a multiple.
            let (nh, nw) = ((lh + win - lh % win) / win, (lw + win - lw % win) / win);
            for tt in 0..t {
                for wh in 0..nh {
                    for ww in 0..nw {
                        let mut count = 0;
                        for r in wh * win..((wh + 1) * win).min(lh) {
                            for c in ww * win..((ww + 1) * win).min(lw) {
                                window_index.push(offset + tt * lh * lw + r * lw + c);
                                count += 1;
                            }
                        }
                        let last = *cu_windows.last().unwrap_or(&0);
                        cu_windows.push(last + count * unit);
                    }
                }
                let last = *cu_images.last().unwrap_or(&0);
                cu_images.push(last + h * w);
            }
            offset += t * lh * lw;
        }
        Self {
            window_index,
            cu_windows,
            cu_images,
        }
    }

    /// `argsort(window_index)`: where each merged token landed.
    pub fn reverse_index(&self) -> Vec<usize> {
        let mut reverse = vec![0; self.window_index.len()];
        for (slot, &token) in self.window_index.iter().enumerate() {
            reverse[token] = slot;
        }
        reverse
    }
}

/// Attention of one vision block: fused qkv, 2D RoPE, non-causal within segments.
#[derive(Module, Debug)]
pub struct VisionAttention<B: Backend> {
    /// `[3 * hidden, hidden]` with bias.
    pub qkv: Linear<B>,
    /// `[hidden, hidden]` with bias.
    pub proj: Linear<B>,
    /// Attention heads.
    #[module(skip)]
    pub num_heads: usize,
}

impl<B: Backend> VisionAttention<B> {
    /// # Shapes
    /// - `x`: `[seq, hidden]`; `cos`, `sin`: `[seq, 1, head_dim]` -> `[seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        segments: &Segments<B>,
    ) -> Tensor<B, 2> {
        let [n, c] = x.dims();
        let (h, d) = (self.num_heads, c / self.num_heads);
        // [seq, 3 * hidden] -> [seq, 3, heads, head_dim]
        let qkv = self.qkv.forward(x).reshape([n, 3, h, d]);
        let part = |i| qkv.clone().narrow(1, i, 1).reshape([n, h, d]);
        let q = apply_rope(part(0), cos, sin);
        let k = apply_rope(part(1), cos, sin);
        let out = segments.attend(q, k, part(2));
        self.proj.forward(out.reshape([n, c]))
    }
}

/// One pre-norm transformer block of the vision tower.
#[derive(Module, Debug)]
pub struct VisionBlock<B: Backend> {
    /// Before attention.
    pub norm1: RmsNorm<B>,
    /// Before the MLP.
    pub norm2: RmsNorm<B>,
    /// Self-attention.
    pub attn: VisionAttention<B>,
    /// SwiGLU with biases.
    pub mlp: Mlp<B>,
}

impl<B: Backend> VisionBlock<B> {
    fn forward(
        &self,
        x: Tensor<B, 2>,
        cos: &Tensor<B, 3>,
        sin: &Tensor<B, 3>,
        segments: &Segments<B>,
    ) -> Tensor<B, 2> {
        let x = x.clone() + self.attn.forward(self.norm1.forward(x), cos, sin, segments);
        x.clone() + self.mlp.forward(self.norm2.forward(x))
    }
}

/// RMSNorm, then 4 neighbouring patches as one row -> Linear -> GELU -> Linear to the LLM width.
#[derive(Module, Debug)]
pub struct PatchMerger<B: Backend> {
    /// `ln_q`: RMSNorm over the vision width.
    pub ln_q: RmsNorm<B>,
    /// `mlp.0`: `[4 * hidden, 4 * hidden]`.
    pub fc1: Linear<B>,
    /// `mlp.2`: `[out_hidden, 4 * hidden]`.
    pub fc2: Linear<B>,
}

impl<B: Backend> PatchMerger<B> {
    /// # Shapes
    /// - `x`: `[seq, hidden]` -> `[seq / 4, out_hidden]`
    pub fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, c] = x.dims();
        let unit = self.fc1.shape()[1] / c;
        // [seq, hidden] -> [seq / unit, unit * hidden]: consecutive rows are one 2x2 block.
        let x = self.ln_q.forward(x).reshape([n / unit, unit * c]);
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// The whole vision tower.
#[derive(Module, Debug)]
pub struct VisionTower<B: Backend> {
    /// Conv3d(kernel = stride = (2, 14, 14)) as a `[hidden, 1176]` linear without bias.
    pub patch_embed: Linear<B>,
    /// `depth` blocks.
    pub blocks: Vec<VisionBlock<B>>,
    /// The patch merger.
    pub merger: PatchMerger<B>,
    /// Architecture.
    #[module(skip)]
    pub config: VisionConfig,
}

impl<B: Backend> VisionTower<B> {
    /// Runs the tower over the patch rows of one or more images (concatenated in prompt order).
    ///
    /// # Shapes
    /// - `patches`: `[sum of t*h*w, 1176]`; `grids`: each image's `(t, h, w)` in patches
    /// - returns `[sum of t*h*w / 4, out_hidden]`, image tokens in prompt order
    pub fn forward(&self, patches: Tensor<B, 2>, grids: &[[usize; 3]]) -> Tensor<B, 2> {
        let device = patches.device();
        let config = &self.config;
        let layout = VisionLayout::new(grids, config);
        let unit = config.merge_unit();
        let heads = config.num_heads;
        let n = patches.dims()[0];
        let window_index = index_tensor::<B>(&layout.window_index, &device);

        // Reorder merged units (4 patch rows each) window by window.
        let x = self.patch_embed.forward(patches);
        let c = x.dims()[1];
        let x = x
            .reshape([n / unit, unit * c])
            .select(0, window_index)
            .reshape([n, c]);

        let positions = vision_patch_positions(grids, config.spatial_merge_size);
        let reordered: Vec<[usize; 2]> = layout
            .window_index
            .iter()
            .flat_map(|&token| positions[token * unit..(token + 1) * unit].iter().copied())
            .collect();
        let tables = vision_rope(config.head_dim(), config.rope_theta, &reordered);
        let (cos, sin) = tables.to_device::<B>(&device);
        let d = config.head_dim();
        let (cos, sin) = (cos.reshape([n, 1, d]), sin.reshape([n, 1, d]));

        let windows = Segments::new(&layout.cu_windows, heads, &device);
        let images = Segments::new(&layout.cu_images, heads, &device);
        let mut x = x;
        for (i, block) in self.blocks.iter().enumerate() {
            let segments = if config.is_full_attention(i) {
                &images
            } else {
                &windows
            };
            x = block.forward(x, &cos, &sin, segments);
        }
        let merged = self.merger.forward(x);
        merged.select(0, index_tensor::<B>(&layout.reverse_index(), &device))
    }
}

/// Uploads host indices as an Int tensor.
pub(crate) fn index_tensor<B: Backend>(index: &[usize], device: &B::Device) -> Tensor<B, 1, Int> {
    let data: Vec<i64> = index.iter().map(|&i| i as i64).collect();
    Tensor::from_data(TensorData::new(data, [index.len()]), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::QwenVlConfig;

    #[test]
    fn window_layout_hand_worked() {
        let config = QwenVlConfig::qwen2_5_vl_7b().vision;
        // 12x20 patches -> 6x10 merged tokens -> windows of 4x4: rows [0..4, 4..6] x cols [0..4, 4..8, 8..10].
        let layout = VisionLayout::new(&[[1, 12, 20]], &config);
        assert_eq!(layout.window_index.len(), 60);
        // First window: rows 0..4, cols 0..4.
        assert_eq!(&layout.window_index[..5], &[0, 1, 2, 3, 10]);
        let sizes = |l: &VisionLayout| {
            l.cu_windows
                .windows(2)
                .map(|w| (w[1] - w[0]) / 4)
                .collect::<Vec<_>>()
        };
        assert_eq!(sizes(&layout), vec![16, 16, 8, 8, 8, 4]);
        assert_eq!(layout.cu_images, vec![0, 240]);
        // 8x8 merged tokens: a side that is already a multiple of 4 still gets a whole padding window.
        assert_eq!(
            sizes(&VisionLayout::new(&[[1, 16, 16]], &config)),
            vec![16, 16, 0, 16, 16, 0, 0, 0, 0]
        );
        let reverse = layout.reverse_index();
        for (slot, &token) in layout.window_index.iter().enumerate() {
            assert_eq!(reverse[token], slot);
        }
    }

    #[test]
    fn second_image_indices_are_offset() {
        let config = QwenVlConfig::qwen2_5_vl_7b().vision;
        let layout = VisionLayout::new(&[[1, 4, 4], [1, 2, 4]], &config);
        assert_eq!(layout.window_index, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(layout.cu_images, vec![0, 16, 24]);
    }
}
