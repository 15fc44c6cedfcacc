//! The Qwen2.5-VL language model: token embedding, pre-norm decoder layers (GQA attention with q/k/v bias and
//! M-RoPE, SwiGLU MLP), final RMSNorm and the untied `lm_head`; with a KV cache for incremental decoding.
//!
//! Reference: transformers v5.17 `Qwen2_5_VLTextModel`, `Qwen2_5_VLDecoderLayer`, `Qwen2_5_VLAttention`.

use burn::prelude::*;
use burn::tensor::Int;

use crate::attention::causal_attention;
use crate::config::TextConfig;
use crate::layers::{Linear, LinearWeight, Mlp, RmsNorm};
use crate::rope::apply_rope;

/// Keys and values of every layer for the tokens seen so far, in buffers of a fixed capacity (a multiple of
/// [`KvCache::BLOCK`] tokens) so that every decode step has the same tensor shapes: backends that compile or
/// autotune kernels per shape (CubeCL) then do it once per capacity, not once per token.
///
/// # Shapes
/// Each layer holds `k`, `v`: `[batch, kv_heads, capacity, head_dim]`; slots `len..capacity` are unused.
#[derive(Debug, Clone)]
pub struct KvCache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> KvCache<B> {
    /// Capacity grows in blocks of this many tokens.
    pub const BLOCK: usize = 256;

    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Keys and values of layer `i` for the cached tokens, `[batch, kv_heads, len, head_dim]` each; `None` before
    /// the layer's first write.
    pub fn layer(&self, i: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let (k, v) = self.layers.get(i)?.as_ref()?;
        Some((
            k.clone().narrow(2, 0, self.len),
            v.clone().narrow(2, 0, self.len),
        ))
    }

    /// The whole buffers of layer `i`, `[batch, kv_heads, capacity, head_dim]` each (contiguous; tokens
    /// `0..len()` are cached, the rest is room); `None` before the layer's first write.
    pub fn buffers(&self, i: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        self.layers.get(i)?.clone()
    }

    /// Writes `new` tokens' keys/values of layer `i` after the cached ones, growing the buffers by whole blocks
    /// when needed; returns the buffers (`[batch, kv_heads, capacity, head_dim]`).
    fn write(
        &mut self,
        i: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, kvh, new, d] = k.dims();
        let end = self.len + new;
        let capacity = end.div_ceil(Self::BLOCK) * Self::BLOCK;
        let device = k.device();
        // Buffers are never empty tensors: the first write allocates whole blocks, later ones grow by whole blocks.
        let (kb, vb) = match self.layers[i].take() {
            Some((kb, vb)) if kb.dims()[2] >= end => (kb, vb),
            Some((kb, vb)) => {
                let zeros = Tensor::zeros([b, kvh, capacity - kb.dims()[2], d], &device);
                (
                    Tensor::cat(vec![kb, zeros.clone()], 2),
                    Tensor::cat(vec![vb, zeros], 2),
                )
            }
            None => (
                Tensor::zeros([b, kvh, capacity, d], &device),
                Tensor::zeros([b, kvh, capacity, d], &device),
            ),
        };
        let kb = kb.slice_assign(s![.., .., self.len..end], k);
        let vb = vb.slice_assign(s![.., .., self.len..end], v);
        self.layers[i] = Some((kb.clone(), vb.clone()));
        (kb, vb)
    }

    /// Marks `new` tokens as cached once every layer has written them.
    fn advance(&mut self, new: usize) {
        self.len += new;
    }
}

/// Grouped-query self-attention of one decoder layer.
#[derive(Module, Debug)]
pub struct TextAttention<B: Backend> {
    /// `[heads * head_dim, hidden]` with bias.
    pub q_proj: Linear<B>,
    /// `[kv_heads * head_dim, hidden]` with bias.
    pub k_proj: Linear<B>,
    /// `[kv_heads * head_dim, hidden]` with bias.
    pub v_proj: Linear<B>,
    /// `[hidden, heads * head_dim]`, no bias.
    pub o_proj: Linear<B>,
    /// Query heads.
    #[module(skip)]
    pub num_heads: usize,
    /// Key/value heads.
    #[module(skip)]
    pub num_kv_heads: usize,
}

impl<B: Backend> TextAttention<B> {
    /// # Shapes
    /// - `x`: `[batch, seq, hidden]`; `cos`, `sin`: `[1, 1, seq, head_dim]` -> `[batch, seq, hidden]`
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        cache: &mut KvCache<B>,
        layer: usize,
    ) -> Tensor<B, 3> {
        let [b, l, _] = x.dims();
        let d = self.q_proj.shape()[0] / self.num_heads;
        // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
        let heads = |y: Tensor<B, 3>, n: usize| y.reshape([b, l, n, d]).swap_dims(1, 2);
        let q = apply_rope(
            heads(self.q_proj.forward(x.clone()), self.num_heads),
            cos,
            sin,
        );
        let k = apply_rope(
            heads(self.k_proj.forward(x.clone()), self.num_kv_heads),
            cos,
            sin,
        );
        let v = heads(self.v_proj.forward(x), self.num_kv_heads);
        let past = cache.len();
        let (k, v) = cache.write(layer, k, v);
        let out = if past == 0 {
            // Prefill: plain causal attention over the new tokens only.
            causal_attention(q, k.narrow(2, 0, l), v.narrow(2, 0, l), 0)
        } else {
            causal_attention(q, k, v, past)
        };
        // [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
        self.o_proj
            .forward(out.swap_dims(1, 2).reshape([b, l, self.num_heads * d]))
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Self-attention.
    pub self_attn: TextAttention<B>,
    /// Before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
    /// SwiGLU without biases.
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        cache: &mut KvCache<B>,
        layer: usize,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(self.input_layernorm.forward(x), cos, sin, cache, layer);
        h.clone() + self.mlp.forward(self.post_attention_layernorm.forward(h))
    }
}

/// The decoder stack with its embedding and head.
#[derive(Module, Debug)]
pub struct TextModel<B: Backend> {
    /// `[vocab, hidden]`: dense as transformers keeps it, or NF4 ([`crate::QuantizeOptions::with_embedding`]).
    pub embed_tokens: LinearWeight<B>,
    /// The decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
    /// `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
    /// Architecture.
    #[module(skip)]
    pub config: TextConfig,
}

impl<B: Backend> TextModel<B> {
    /// Looks up token embeddings.
    ///
    /// # Shapes
    /// - `ids`: `[batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        match &self.embed_tokens {
            LinearWeight::Dense(table) => burn::tensor::module::embedding(table.val(), ids),
            LinearWeight::Nf4(table) => {
                let [b, s] = ids.dims();
                let h = table.shape[1];
                table
                    .rows(ids.reshape([b * s]), self.norm.weight.val().dtype())
                    .reshape([b, s, h])
            }
        }
    }

    /// Runs the decoder over new tokens' embeddings, appending to `cache`; returns final-normed hidden states.
    ///
    /// # Shapes
    /// - `embeds`: `[batch, seq, hidden]`; `cos`, `sin`: `[seq, head_dim]` (f32) -> `[batch, seq, hidden]`
    pub fn forward(
        &self,
        embeds: Tensor<B, 3>,
        cos: Tensor<B, 2>,
        sin: Tensor<B, 2>,
        cache: &mut KvCache<B>,
    ) -> Tensor<B, 3> {
        let [s, d] = cos.dims();
        // [seq, head_dim] -> [1, 1, seq, head_dim], broadcast over batch and heads.
        let (cos, sin) = (cos.reshape([1, 1, s, d]), sin.reshape([1, 1, s, d]));
        let mut x = embeds;
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x, &cos, &sin, cache, i);
        }
        cache.advance(s);
        self.norm.forward(x)
    }

    /// Projects hidden states to vocabulary logits.
    ///
    /// # Shapes
    /// - `hidden`: `[..., hidden]` -> `[..., vocab]`
    pub fn logits<const D: usize>(&self, hidden: Tensor<B, D>) -> Tensor<B, D> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let table = match &self.embed_tokens {
                    LinearWeight::Dense(table) => table.val(),
                    LinearWeight::Nf4(table) => table.dense(hidden.dtype()),
                };
                burn::tensor::module::linear(hidden, table.transpose(), None)
            }
        }
    }
}
