//! Qwen2.5-VL: the vision tower and the decoder joined. Image features replace the `<|image_pad|>` embeddings
//! in order; positions follow `get_rope_index`. Prefill and decode are separate steps over one [`KvCache`].
//!
//! Reference: transformers v5.17 `Qwen2_5_VLModel.forward` and `Qwen2_5_VLForConditionalGeneration`.

use burn::prelude::*;
use burn::tensor::Int;

use crate::config::QwenVlConfig;
use crate::error::{ModelError, Result};
use crate::image::PixelValues;
use crate::rope::{MropePositions, mrope_positions, text_rope};
use crate::text::{KvCache, TextModel};
use crate::vision::{VisionTower, index_tensor};

/// Qwen2.5-VL for conditional generation.
#[derive(Module, Debug)]
pub struct QwenVl<B: Backend> {
    /// The vision tower (`visual.*`).
    pub visual: VisionTower<B>,
    /// The language model (`model.*`, `lm_head`).
    pub text: TextModel<B>,
    /// Architecture.
    #[module(skip)]
    pub config: QwenVlConfig,
}

/// Image features computed by the vision tower, ready to be scattered into a prompt.
#[derive(Debug, Clone)]
pub struct ImageFeatures<B: Backend> {
    /// `[tokens of all images, hidden]`, in prompt order.
    pub embeds: Tensor<B, 2>,
    /// Each image's `(t, h, w)` in patches.
    pub grids: Vec<[usize; 3]>,
}

/// The result of a prefill.
#[derive(Debug, Clone)]
pub struct Prefill<B: Backend> {
    /// Final-normed hidden states of every prompt position, `[1, seq, hidden]`.
    pub hidden: Tensor<B, 3>,
    /// Positions of the prompt.
    pub positions: MropePositions,
}

impl<B: Backend> QwenVl<B> {
    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache<B> {
        KvCache::new(self.config.text.num_hidden_layers)
    }

    /// Runs the vision tower over all images of one prompt.
    pub fn encode_images(
        &self,
        images: &[PixelValues],
        device: &B::Device,
    ) -> Result<Option<ImageFeatures<B>>> {
        if images.is_empty() {
            return Ok(None);
        }
        let dim = self.config.vision.patch_dim();
        let mut rows = Vec::with_capacity(images.iter().map(|i| i.data.len()).sum());
        for (i, image) in images.iter().enumerate() {
            if image.patch_dim != dim || image.data.len() != image.num_patches() * dim {
                return Err(ModelError::Input(format!(
                    "image {i}: {} values for grid {:?} and patch width {}, the model needs patch width {dim}",
                    image.data.len(),
                    image.grid_thw,
                    image.patch_dim
                )));
            }
            rows.extend_from_slice(&image.data);
        }
        let n = rows.len() / dim;
        let _span = tracing::debug_span!("vision", patches = n, images = images.len()).entered();
        let patches = Tensor::<B, 2>::from_data(TensorData::new(rows, [n, dim]), device);
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid_thw).collect();
        Ok(Some(ImageFeatures {
            embeds: self.visual.forward(patches, &grids),
            grids,
        }))
    }

    /// Prefill from raw images: vision tower, then [`Self::prefill_with_features`].
    pub fn prefill(
        &self,
        ids: &[u32],
        images: &[PixelValues],
        cache: &mut KvCache<B>,
        device: &B::Device,
    ) -> Result<Prefill<B>> {
        let features = self.encode_images(images, device)?;
        self.prefill_with_features(ids, features.as_ref(), cache, device)
    }

    /// Prefill with image features computed beforehand: embeds the prompt, scatters the image features into the
    /// `<|image_pad|>` slots, computes M-RoPE positions, runs the decoder and fills `cache`.
    pub fn prefill_with_features(
        &self,
        ids: &[u32],
        features: Option<&ImageFeatures<B>>,
        cache: &mut KvCache<B>,
        device: &B::Device,
    ) -> Result<Prefill<B>> {
        if ids.is_empty() {
            return Err(ModelError::Input("empty prompt".into()));
        }
        if !cache.is_empty() {
            return Err(ModelError::Input(format!(
                "prefill needs an empty cache, this one holds {} tokens",
                cache.len()
            )));
        }
        self.check_ids(ids)?;
        let grids = features.map(|f| f.grids.as_slice()).unwrap_or(&[]);
        let positions = mrope_positions(
            ids,
            grids,
            &self.config.tokens,
            self.config.vision.spatial_merge_size,
        )?;
        let l = ids.len();
        let embeds = self
            .text
            .embed(ids_tensor::<B>(ids, device))
            .reshape([l, self.config.text.hidden_size]);
        let embeds = match features {
            None => embeds,
            Some(f) => {
                // One gather over [text rows; image rows]: image-pad slot k takes image row k.
                let mut k = 0;
                let index: Vec<usize> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| {
                        if t == self.config.tokens.image {
                            k += 1;
                            l + k - 1
                        } else {
                            i
                        }
                    })
                    .collect();
                let rows = f.embeds.dims()[0];
                if k != rows {
                    return Err(ModelError::Input(format!(
                        "prompt has {k} <|image_pad|> tokens but the images give {rows} features"
                    )));
                }
                Tensor::cat(vec![embeds, f.embeds.clone()], 0)
                    .select(0, index_tensor::<B>(&index, device))
            }
        };
        let hidden = self.run_decoder(embeds.unsqueeze_dim::<3>(0), &positions, cache, device);
        Ok(Prefill { hidden, positions })
    }

    /// Decodes new tokens after a prefill: token `i` of the whole sequence sits at position `i + rope_delta`
    /// on all three axes. Returns the final-normed hidden states `[1, new, hidden]`.
    pub fn decode(
        &self,
        ids: &[u32],
        rope_delta: i64,
        cache: &mut KvCache<B>,
        device: &B::Device,
    ) -> Result<Tensor<B, 3>> {
        self.check_ids(ids)?;
        let start = cache.len() as i64 + rope_delta;
        let positions = MropePositions::text(start, ids.len());
        let embeds = self.text.embed(ids_tensor::<B>(ids, device));
        Ok(self.run_decoder(embeds, &positions, cache, device))
    }

    /// Vocabulary logits of hidden states.
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        self.text.logits(hidden)
    }

    fn run_decoder(
        &self,
        embeds: Tensor<B, 3>,
        positions: &MropePositions,
        cache: &mut KvCache<B>,
        device: &B::Device,
    ) -> Tensor<B, 3> {
        let _span = tracing::debug_span!("decoder", tokens = positions.len(), cached = cache.len())
            .entered();
        let (cos, sin) = text_rope(&self.config.text, positions).to_device::<B>(device);
        self.text.forward(embeds, cos, sin, cache)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.config.text.vocab_size;
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(ModelError::Input(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }
}

/// `[1, n]` Int tensor of token ids.
fn ids_tensor<B: Backend>(ids: &[u32], device: &B::Device) -> Tensor<B, 2, Int> {
    let data: Vec<i64> = ids.iter().map(|&t| i64::from(t)).collect();
    Tensor::from_data(TensorData::new(data, [1, ids.len()]), device)
}
