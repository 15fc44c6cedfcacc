//! The decode step as a fixed plan of medvl's own CubeCL kernels (`medvl-kernels`), launched in a fixed order on
//! buffers allocated once: per decoder layer
//!
//! residual add + RMSNorm; one GEMV for q, k and v (dense or NF4, the three weights stacked into one matrix);
//! bias + rotary + KV-cache append; attention of the new token over its cache (split, then combined); o GEMV;
//! residual add + RMSNorm; one GEMV for gate and up (stacked); SiLU-gated product; down GEMV (10 launches; past 8
//! sequences the products run as tensor-core GEMMs where the device has them);
//!
//! then the final norm, the lm_head GEMV and the argmax, which also moves every sequence's length on. Inside a
//! step nothing is allocated, no burn op runs, and the host reads back only the sampled token ids.
//!
//! The prefill (burn, [`medvl_model::QwenVl::prefill`]) fills a [`medvl_model::KvCache`]; [`Prefilled`] takes
//! its keys and values and [`DecodePlan::admit`] writes them into the plan's cache slot of a sequence. Sequences
//! of different lengths decode together, one token each per step.

use cubecl::prelude::{ComputeClient, Runtime};
use medvl_kernels::decode::{
    self, ArgmaxScratch, AttentionScratch, AttentionShape, DenseMatrix, LoraPart, LoraUp,
    MAX_DENSE_BATCH, NewToken,
};
use medvl_kernels::nf4::{self, Activation, MAX_BATCH, Nf4Matrix};
use medvl_kernels::probe::CopyProbe;
use medvl_kernels::sample::{self, RowSampling, Sampling};
use medvl_kernels::{Buffer, KernelError};
use medvl_kernels::{dequant, gemm, mma};
use medvl_model::layers::{Linear, LinearWeight, Nf4Scales, Nf4Weight};
use medvl_model::text::DecoderLayer;
use medvl_model::{KvCache, QwenVl, TextConfig};
use medvl_nf4::{Absmax, DYNAMIC_MAP, NESTED_BLOCKSIZE, Nf4Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use burn::prelude::{Backend, Tensor};

use crate::error::{EngineError, Result};
use crate::sampling::Sampler;

/// Most sequences one plan decodes together.
pub const MAX_PLAN_BATCH: usize = 32;

/// Rows one GEMV launch takes; larger batches run in groups of this many.
const GEMV_GROUP: usize = if MAX_BATCH < MAX_DENSE_BATCH {
    MAX_BATCH
} else {
    MAX_DENSE_BATCH
};

/// The sizes a plan is built for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanConfig {
    /// Hidden size.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Rotary base.
    pub rope_theta: f64,
    /// Sequences decoded together.
    pub batch: usize,
    /// Cache slots per sequence (prompt plus generated tokens).
    pub capacity: usize,
}

impl PlanConfig {
    /// The decoder of `text`, for `batch` sequences of up to `capacity` tokens.
    pub fn new(text: &TextConfig, batch: usize, capacity: usize) -> Self {
        Self {
            hidden: text.hidden_size,
            intermediate: text.intermediate_size,
            layers: text.num_hidden_layers,
            heads: text.num_attention_heads,
            kv_heads: text.num_key_value_heads,
            head_dim: text.head_dim(),
            vocab: text.vocab_size,
            eps: text.rms_norm_eps as f32,
            rope_theta: text.rope_theta,
            batch,
            capacity,
        }
    }

    /// Widths of the query and of the key (or value) projections.
    fn qkv_widths(&self) -> (usize, usize) {
        (self.heads * self.head_dim, self.kv_heads * self.head_dim)
    }

    fn attention(&self) -> AttentionShape {
        AttentionShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
            batch: self.batch,
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        if !(1..=MAX_PLAN_BATCH).contains(&self.batch) {
            return Err(EngineError::Plan(format!(
                "batch {}: a plan decodes 1 to {MAX_PLAN_BATCH} sequences",
                self.batch
            )));
        }
        if self.capacity == 0 || self.heads * self.head_dim == 0 || self.layers == 0 {
            return Err(EngineError::Plan(format!("empty shapes in {self:?}")));
        }
        Ok(())
    }
}

/// A linear weight on the host, on its way into a plan.
#[derive(Debug, Clone)]
pub enum HostMatrix {
    /// Row-major `[rows, cols]` values.
    Dense {
        /// The values.
        values: Vec<f32>,
        /// Output features.
        rows: usize,
        /// Input features.
        cols: usize,
    },
    /// An NF4 tensor `[rows, cols]` in the bitsandbytes layout.
    Nf4(Nf4Tensor),
}

/// One decoder layer's weights on the host.
#[derive(Debug, Clone)]
pub struct HostLayer {
    /// `[hidden]`.
    pub input_norm: Vec<f32>,
    /// `[heads * head_dim, hidden]`.
    pub q: HostMatrix,
    /// `[kv_heads * head_dim, hidden]`.
    pub k: HostMatrix,
    /// `[kv_heads * head_dim, hidden]`.
    pub v: HostMatrix,
    /// `[heads * head_dim]`.
    pub q_bias: Vec<f32>,
    /// `[kv_heads * head_dim]`.
    pub k_bias: Vec<f32>,
    /// `[kv_heads * head_dim]`.
    pub v_bias: Vec<f32>,
    /// `[hidden, heads * head_dim]`.
    pub o: HostMatrix,
    /// `[hidden]`.
    pub post_norm: Vec<f32>,
    /// `[intermediate, hidden]`.
    pub gate: HostMatrix,
    /// `[intermediate, hidden]`.
    pub up: HostMatrix,
    /// `[hidden, intermediate]`.
    pub down: HostMatrix,
    /// LoRA adapters on the projections (none by default).
    pub lora: LayerLora,
}

/// A LoRA adapter of one projection on the host: adds `(x A^T) B^T * scale`.
#[derive(Debug, Clone)]
pub struct HostLora {
    /// `A`, row-major `[rank, in_features]`.
    pub a: Vec<f32>,
    /// `B`, row-major `[out_features, rank]`.
    pub b: Vec<f32>,
    /// The rank.
    pub rank: usize,
    /// `alpha / rank` (rsLoRA: `alpha / sqrt(rank)`).
    pub scale: f32,
}

impl HostLora {
    /// The adapter of a linear layer of a loaded model, copied to the host; `None` without one.
    pub fn from_linear<B: Backend>(linear: &Linear<B>) -> Result<Option<Self>> {
        let Some(lora) = &linear.lora else {
            return Ok(None);
        };
        let rank = lora.a.val().dims()[0];
        Ok(Some(Self {
            a: host_values(lora.a.val())?,
            b: host_values(lora.b.val())?,
            rank,
            scale: lora.scale as f32,
        }))
    }

    /// A random adapter of rank `rank` for a `[rows, cols]` projection (benchmarks).
    pub fn random(rng: &mut ChaCha8Rng, rows: usize, cols: usize, rank: usize) -> Self {
        Self {
            a: random_values(rng, rank * cols, 0.02),
            b: random_values(rng, rows * rank, 0.02),
            rank,
            scale: 2.0,
        }
    }
}

/// The LoRA adapters of one decoder layer's projections, each optional.
#[derive(Debug, Clone, Default)]
pub struct LayerLora {
    /// On q_proj.
    pub q: Option<HostLora>,
    /// On k_proj.
    pub k: Option<HostLora>,
    /// On v_proj.
    pub v: Option<HostLora>,
    /// On o_proj.
    pub o: Option<HostLora>,
    /// On gate_proj.
    pub gate: Option<HostLora>,
    /// On up_proj.
    pub up: Option<HostLora>,
    /// On down_proj.
    pub down: Option<HostLora>,
}

impl LayerLora {
    /// The adapters of a loaded model's decoder layer (none where a projection has none).
    pub fn from_model<B: Backend>(layer: &DecoderLayer<B>) -> Result<Self> {
        let attn = &layer.self_attn;
        Ok(Self {
            q: HostLora::from_linear(&attn.q_proj)?,
            k: HostLora::from_linear(&attn.k_proj)?,
            v: HostLora::from_linear(&attn.v_proj)?,
            o: HostLora::from_linear(&attn.o_proj)?,
            gate: HostLora::from_linear(&layer.mlp.gate_proj)?,
            up: HostLora::from_linear(&layer.mlp.up_proj)?,
            down: HostLora::from_linear(&layer.mlp.down_proj)?,
        })
    }

    /// Random adapters of rank `rank` on all seven projections of a layer of `config`'s sizes, as PEFT's
    /// `target_modules="all-linear"` puts them (benchmarks).
    pub fn random(config: &PlanConfig, rank: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (h, i) = (config.hidden, config.intermediate);
        let (qd, kvd) = config.qkv_widths();
        let mut make = |rows, cols| Some(HostLora::random(&mut rng, rows, cols, rank));
        Self {
            q: make(qd, h),
            k: make(kvd, h),
            v: make(kvd, h),
            o: make(h, qd),
            gate: make(i, h),
            up: make(i, h),
            down: make(h, i),
        }
    }
}

/// How [`DecodePlan::random`] stores each kind of weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RandomFormats {
    /// The decoder layers' projections.
    pub layers: RandomFormat,
    /// The lm_head (bitsandbytes keeps it dense).
    pub lm_head: RandomFormat,
    /// The token embedding (transformers keeps it dense).
    pub embedding: RandomFormat,
}

/// How [`HostLayer::random`] stores its projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomFormat {
    /// Dense values.
    Dense,
    /// NF4, blocksize 64, double-quantized scales (the bitsandbytes default).
    Nf4,
}

/// `n` values in `-scale..scale`: a walk through a small random pool from a random start (a 7B model's worth
/// of independent draws would take minutes; a benchmark's speed does not depend on them).
fn random_values(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    const POOL: usize = 1 << 16;
    let pool: Vec<f32> = (0..POOL).map(|_| rng.random_range(-scale..scale)).collect();
    let start = rng.random_range(0..POOL);
    (0..n)
        .map(|i| pool[(start + i * 7 + i / POOL) % POOL])
        .collect()
}

/// A random NF4 matrix `[rows, cols]`, blocksize 64, double-quantized scales (random codes: speed does not depend
/// on the values, so nothing is quantized).
pub fn random_nf4(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Nf4Tensor {
    let n = rows * cols;
    let blocks = n.div_ceil(64);
    let mut packed = vec![0u8; n.div_ceil(2)];
    rng.fill(&mut packed[..]);
    let mut codes = vec![0u8; blocks];
    rng.fill(&mut codes[..]);
    Nf4Tensor {
        packed,
        absmax: Absmax::Double {
            codes,
            nested_absmax: (0..blocks.div_ceil(NESTED_BLOCKSIZE))
                .map(|_| rng.random_range(0.01..0.03))
                .collect(),
            nested_code: DYNAMIC_MAP.to_vec(),
            offset: 0.02,
        },
        blocksize: 64,
        shape: vec![rows, cols],
    }
}

fn random_matrix(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    format: RandomFormat,
) -> HostMatrix {
    let n = rows * cols;
    match format {
        RandomFormat::Dense => HostMatrix::Dense {
            values: random_values(rng, n, 0.02),
            rows,
            cols,
        },
        RandomFormat::Nf4 => HostMatrix::Nf4(random_nf4(rng, rows, cols)),
    }
}

impl HostLayer {
    /// Random weights of `config`'s sizes (for benchmarks at real size without a checkpoint).
    pub fn random(config: &PlanConfig, format: RandomFormat, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (h, i) = (config.hidden, config.intermediate);
        let (qd, kvd) = config.qkv_widths();
        let mut vector = |n: usize, around: f32| -> Vec<f32> {
            (0..n)
                .map(|_| around + rng.random_range(-0.01..0.01))
                .collect()
        };
        let (input_norm, post_norm) = (vector(h, 1.0), vector(h, 1.0));
        let (q_bias, k_bias, v_bias) = (vector(qd, 0.0), vector(kvd, 0.0), vector(kvd, 0.0));
        Self {
            input_norm,
            q: random_matrix(&mut rng, qd, h, format),
            k: random_matrix(&mut rng, kvd, h, format),
            v: random_matrix(&mut rng, kvd, h, format),
            q_bias,
            k_bias,
            v_bias,
            o: random_matrix(&mut rng, h, qd, format),
            post_norm,
            gate: random_matrix(&mut rng, i, h, format),
            up: random_matrix(&mut rng, i, h, format),
            down: random_matrix(&mut rng, h, i, format),
            lora: LayerLora::default(),
        }
    }

    /// A decoder layer of a loaded model, copied to the host.
    pub fn from_model<B: Backend>(layer: &DecoderLayer<B>) -> Result<Self> {
        let attn = &layer.self_attn;
        let small = LayerSmall::from_model(layer)?;
        Ok(Self {
            input_norm: small.input_norm,
            q: HostMatrix::from_linear(&attn.q_proj)?,
            k: HostMatrix::from_linear(&attn.k_proj)?,
            v: HostMatrix::from_linear(&attn.v_proj)?,
            q_bias: small.q_bias,
            k_bias: small.k_bias,
            v_bias: small.v_bias,
            o: HostMatrix::from_linear(&attn.o_proj)?,
            post_norm: small.post_norm,
            gate: HostMatrix::from_linear(&layer.mlp.gate_proj)?,
            up: HostMatrix::from_linear(&layer.mlp.up_proj)?,
            down: HostMatrix::from_linear(&layer.mlp.down_proj)?,
            lora: LayerLora::from_model(layer)?,
        })
    }

    fn small(&self) -> LayerSmall {
        LayerSmall {
            input_norm: self.input_norm.clone(),
            post_norm: self.post_norm.clone(),
            q_bias: self.q_bias.clone(),
            k_bias: self.k_bias.clone(),
            v_bias: self.v_bias.clone(),
        }
    }
}

/// A decoder layer's norms and q/k/v biases on the host.
pub(crate) struct LayerSmall {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    q_bias: Vec<f32>,
    k_bias: Vec<f32>,
    v_bias: Vec<f32>,
}

impl LayerSmall {
    /// A loaded decoder layer's norms and biases (zeros where a projection has no bias).
    pub(crate) fn from_model<B: Backend>(layer: &DecoderLayer<B>) -> Result<Self> {
        let attn = &layer.self_attn;
        let bias = |l: &Linear<B>| -> Result<Vec<f32>> {
            match &l.bias {
                Some(b) => host_values(b.val()),
                None => Ok(vec![0.0; l.shape()[0]]),
            }
        };
        Ok(Self {
            input_norm: host_values(layer.input_layernorm.weight.val())?,
            post_norm: host_values(layer.post_attention_layernorm.weight.val())?,
            q_bias: bias(&attn.q_proj)?,
            k_bias: bias(&attn.k_proj)?,
            v_bias: bias(&attn.v_proj)?,
        })
    }
}

pub(crate) fn host_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Result<Vec<f32>> {
    tensor
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| EngineError::Plan(format!("reading a weight: {e:?}")))
}

/// The block scales of a model's NF4 weight on the host: double-quantized as on the device when the weight has
/// one offset (as bitsandbytes stores it), else resolved to one f32 per block.
fn host_absmax<B: Backend>(w: &Nf4Weight<B>) -> Result<Absmax> {
    let blocks = w.blocks();
    if let Nf4Scales::Double(d) = &w.scales {
        let offsets = host_values(d.offsets.clone())?;
        if let Some(&offset) = offsets.first()
            && offsets.iter().all(|&o| o == offset)
        {
            let codes = d.code_bytes(blocks)?;
            return Ok(Absmax::Double {
                codes,
                nested_absmax: host_values(d.nested.clone())?,
                nested_code: host_values(d.map.clone())?,
                offset,
            });
        }
    }
    Ok(Absmax::Plain(host_values(w.scales.resolve(blocks))?))
}

impl HostMatrix {
    fn shape(&self) -> [usize; 2] {
        match self {
            Self::Dense { rows, cols, .. } => [*rows, *cols],
            Self::Nf4(t) => [t.shape[0], t.shape.get(1).copied().unwrap_or(0)],
        }
    }

    /// A linear layer's weight (dense, or NF4 with its scales already resolved), copied to the host; its LoRA
    /// adapter, if any, is [`HostLora::from_linear`]'s.
    pub fn from_linear<B: Backend>(linear: &Linear<B>) -> Result<Self> {
        Self::from_weight(&linear.weight, linear.shape())
    }

    /// A `[rows, cols]` weight (a linear layer's or the token embedding), copied to the host.
    pub fn from_weight<B: Backend>(
        weight: &LinearWeight<B>,
        [rows, cols]: [usize; 2],
    ) -> Result<Self> {
        Ok(match weight {
            LinearWeight::Dense(w) => Self::Dense {
                values: host_values(w.val())?,
                rows,
                cols,
            },
            LinearWeight::Nf4(w) => Self::Nf4(Nf4Tensor {
                packed: w.packed_bytes()?,
                absmax: host_absmax(w)?,
                blocksize: w.blocksize,
                shape: vec![rows, cols],
            }),
        })
    }
}

/// A matrix on the device, dense or NF4. A clone reads the same device memory.
#[derive(Clone)]
pub(crate) enum Matrix<F> {
    Dense(DenseMatrix<F>),
    Nf4(Box<Nf4Matrix>),
}

impl<F: Activation> Matrix<F> {
    fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        host: &HostMatrix,
        what: &str,
        expected: [usize; 2],
    ) -> Result<Self> {
        Self::stack(client, &[(host, expected)], what)
    }

    /// One matrix of `parts` stacked along their rows (each with the shape it must have), so that one launch
    /// computes all their products: NF4 stays NF4 ([`Nf4Matrix::stack`]); dense stays dense; a mix is
    /// dequantized to dense.
    pub(crate) fn stack<R: Runtime>(
        client: &ComputeClient<R>,
        parts: &[(&HostMatrix, [usize; 2])],
        what: &str,
    ) -> Result<Self> {
        for &(host, expected) in parts {
            if host.shape() != expected {
                return Err(EngineError::Plan(format!(
                    "{what}: shape {:?}, the plan needs {expected:?}",
                    host.shape()
                )));
            }
        }
        let nf4: Vec<&Nf4Tensor> = parts
            .iter()
            .filter_map(|(host, _)| match host {
                HostMatrix::Nf4(t) => Some(t),
                HostMatrix::Dense { .. } => None,
            })
            .collect();
        if nf4.len() == parts.len() {
            let matrix = Nf4Matrix::stack(client, &nf4)
                .map_err(|e| EngineError::Plan(format!("{what}: {e}")))?;
            return Ok(Self::Nf4(Box::new(matrix)));
        }
        let mut values = Vec::new();
        for (host, _) in parts {
            match host {
                HostMatrix::Dense { values: v, .. } => values.extend(F::from_host_slice(v)),
                HostMatrix::Nf4(t) => values.extend(F::from_host_slice(&t.dequantize())),
            }
        }
        let rows = parts.iter().map(|(_, [r, _])| r).sum();
        let cols = parts[0].1[1];
        Ok(Self::Dense(DenseMatrix::upload(
            client, &values, rows, cols,
        )?))
    }

    /// `y = x W^T` for `batch` rows. NF4 weights go through the tensor-core GEMV ([`mma::gemv_mma`], launches of
    /// up to 16 rows) where `kernels` allows it and it takes the shape; otherwise, past the GEMV's rows, one
    /// tensor-core GEMM where the device has them and the width is a multiple of 32; otherwise GEMVs of up to
    /// [`GEMV_GROUP`] rows each.
    fn apply<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        x: &Buffer<F>,
        batch: usize,
        y: &Buffer<F>,
        kernels: Kernels,
    ) -> Result<(), KernelError> {
        let [rows, cols] = self.shape();
        if let Self::Nf4(m) = self
            && kernels.nf4_mma(m, batch)
        {
            // Launches of at most `PREFERRED_MAX` rows: faster than one of 32 (measured).
            return in_row_groups(
                x,
                y,
                batch,
                mma::PREFERRED_MAX,
                [rows, cols],
                |xs, n, ys| mma::gemv_mma(client, xs, n, m, ys),
            );
        }
        if let Self::Dense(m) = self
            && batch > GEMV_GROUP
            && let Some(most) = kernels.dense_mma
            && mma::takes_dense(m, batch)
        {
            return in_row_groups(x, y, batch, most, [rows, cols], |xs, n, ys| {
                mma::gemv_mma_dense(client, xs, n, m, ys)
            });
        }
        if batch > GEMV_GROUP && kernels.tensor_cores && cols.is_multiple_of(32) {
            return match self {
                Self::Dense(m) => gemm::gemm_dense(client, x, batch, m, y),
                Self::Nf4(m) => gemm::gemm_nf4(client, x, batch, m, y),
            };
        }
        in_row_groups(
            x,
            y,
            batch,
            GEMV_GROUP,
            [rows, cols],
            |xs, n, ys| match self {
                Self::Dense(m) => decode::gemv_dense(client, xs, n, m, ys),
                Self::Nf4(m) => nf4::gemv(client, xs, n, m, ys),
            },
        )
    }

    /// The NF4 matrix when [`Self::apply`] for `batch` rows runs it through the NF4 GEMV in one launch (not a
    /// tensor-core product, not the dense GEMV), which can also apply a gated unit ([`nf4::gemv_glu`]) to a
    /// stacked gate/up matrix.
    fn gated_gemv(&self, batch: usize, kernels: Kernels) -> Option<&Nf4Matrix> {
        match self {
            Self::Nf4(m)
                if batch <= GEMV_GROUP && !kernels.nf4_mma(m, batch) && nf4::takes_glu(m) =>
            {
                Some(m)
            }
            _ => None,
        }
    }

    fn shape(&self) -> [usize; 2] {
        match self {
            Self::Dense(m) => [m.rows(), m.cols()],
            Self::Nf4(m) => [m.rows(), m.cols()],
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Self::Dense(m) => m.weight_bytes(),
            Self::Nf4(m) => m.weight_bytes(),
        }
    }
}

/// Runs `product` over groups of at most `group` rows of `x` (`[batch, cols]`) and `y` (`[batch, rows]`): on the
/// buffers themselves when one group holds the whole batch, on views of their rows otherwise.
fn in_row_groups<F: Activation>(
    x: &Buffer<F>,
    y: &Buffer<F>,
    batch: usize,
    group: usize,
    [rows, cols]: [usize; 2],
    mut product: impl FnMut(&Buffer<F>, usize, &Buffer<F>) -> Result<(), KernelError>,
) -> Result<(), KernelError> {
    if batch <= group {
        return product(x, batch, y);
    }
    for first in (0..batch).step_by(group) {
        let n = group.min(batch - first);
        product(
            &x.slice(first * cols, n * cols)?,
            n,
            &y.slice(first * rows, n * rows)?,
        )?;
    }
    Ok(())
}

/// The LoRA adapters of one (stacked) product on the device: the parts' `A`s stacked into one matrix (one
/// product gives every part's `z = x A^T`), and their `B`s, each over its own rows of the output.
struct Adapter<F> {
    a: Matrix<F>,
    up: LoraUp<F>,
}

impl<F: Activation> Adapter<F> {
    /// `parts`: each part of the product in output order, with its rows and its adapter if it has one. `None`
    /// when no part has an adapter.
    fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        parts: &[(Option<&HostLora>, usize)],
        cols: usize,
        what: &str,
    ) -> Result<Option<Self>> {
        let mut a = Vec::new();
        let mut ups = Vec::new();
        let mut row_start = 0;
        for &(lora, rows) in parts {
            if let Some(l) = lora {
                if l.a.len() != l.rank * cols || l.b.len() != rows * l.rank {
                    return Err(EngineError::Plan(format!(
                        "{what}: a LoRA adapter of rank {} with {} + {} values for a {rows}x{cols} product",
                        l.rank,
                        l.a.len(),
                        l.b.len()
                    )));
                }
                a.extend(F::from_host_slice(&l.a));
                ups.push(LoraPart {
                    row_start,
                    rows,
                    rank: l.rank,
                    scale: l.scale,
                    b: l.b.clone(),
                });
            }
            row_start += rows;
        }
        if ups.is_empty() {
            return Ok(None);
        }
        let rank: usize = ups.iter().map(|p| p.rank).sum();
        let plan_err = |e: KernelError| EngineError::Plan(format!("{what} adapter: {e}"));
        Ok(Some(Self {
            a: Matrix::Dense(DenseMatrix::upload(client, &a, rank, cols).map_err(plan_err)?),
            up: LoraUp::upload(client, row_start, &ups).map_err(plan_err)?,
        }))
    }

    /// `y += LoRA(x)` for `batch` rows, through the scratch `z`.
    fn apply<R: Runtime>(
        &self,
        client: &ComputeClient<R>,
        x: &Buffer<F>,
        batch: usize,
        z: &Buffer<F>,
        y: &Buffer<F>,
        kernels: Kernels,
    ) -> Result<(), KernelError> {
        self.a.apply(client, x, batch, z, kernels)?;
        decode::lora_add(client, z, batch, &self.up, y)
    }

    fn weight_bytes(&self) -> usize {
        self.a.weight_bytes() + self.up.weight_bytes()
    }
}

fn to_f<F: Activation>(values: &[f32]) -> Vec<F> {
    F::from_host_slice(values)
}

/// One decoder layer on the device; q/k/v and gate/up are stacked into one matrix each (one launch).
pub(crate) struct Layer<F> {
    input_norm: Buffer<F>,
    /// `[q; k; v]`: `[heads * head_dim + 2 * kv_heads * head_dim, hidden]`.
    qkv: Matrix<F>,
    /// `[q_bias, k_bias, v_bias]`.
    qkv_bias: Buffer<F>,
    o: Matrix<F>,
    post_norm: Buffer<F>,
    /// `[gate; up]`: `[2 * intermediate, hidden]`.
    gate_up: Matrix<F>,
    down: Matrix<F>,
    /// LoRA adapters of the four products (q/k/v, o, gate/up, down), where loaded.
    adapters: [Option<Adapter<F>>; 4],
    k_cache: Buffer<F>,
    v_cache: Buffer<F>,
}

impl<F: Activation> Layer<F> {
    fn upload<R: Runtime>(
        client: &ComputeClient<R>,
        config: &PlanConfig,
        host: &HostLayer,
        index: usize,
    ) -> Result<Self> {
        let (h, i) = (config.hidden, config.intermediate);
        let (qd, kvd) = config.qkv_widths();
        let name = |what: &str| format!("layer {index} {what}");
        let matrices = [
            Matrix::stack(
                client,
                &[(&host.q, [qd, h]), (&host.k, [kvd, h]), (&host.v, [kvd, h])],
                &name("q/k/v_proj"),
            )?,
            Matrix::upload(client, &host.o, &name("o_proj"), [h, qd])?,
            Matrix::stack(
                client,
                &[(&host.gate, [i, h]), (&host.up, [i, h])],
                &name("gate/up_proj"),
            )?,
            Matrix::upload(client, &host.down, &name("down_proj"), [h, i])?,
        ];
        Self::assemble(client, config, &host.small(), &host.lora, matrices, index)
    }

    /// A layer of its four products (q/k/v, o, gate/up, down, already on the device) and its small tensors and
    /// adapters (uploaded here), with an empty KV cache.
    pub(crate) fn assemble<R: Runtime>(
        client: &ComputeClient<R>,
        config: &PlanConfig,
        small: &LayerSmall,
        lora: &LayerLora,
        [qkv, o, gate_up, down]: [Matrix<F>; 4],
        index: usize,
    ) -> Result<Self> {
        let (h, i) = (config.hidden, config.intermediate);
        let (qd, kvd) = config.qkv_widths();
        let name = |what: &str| format!("layer {index} {what}");
        let expected = [
            (&qkv, [qd + 2 * kvd, h], "q/k/v_proj"),
            (&o, [h, qd], "o_proj"),
            (&gate_up, [2 * i, h], "gate/up_proj"),
            (&down, [h, i], "down_proj"),
        ];
        for (matrix, shape, what) in expected {
            if matrix.shape() != shape {
                return Err(EngineError::Plan(format!(
                    "{}: shape {:?}, the plan needs {shape:?}",
                    name(what),
                    matrix.shape()
                )));
            }
        }
        let vector = |values: &[f32], what: &str, n: usize| -> Result<Vec<F>> {
            if values.len() != n {
                return Err(EngineError::Plan(format!(
                    "layer {index} {what}: {} values, the plan needs {n}",
                    values.len()
                )));
            }
            Ok(to_f::<F>(values))
        };
        let mut qkv_bias = vector(&small.q_bias, "q bias", qd)?;
        qkv_bias.extend(vector(&small.k_bias, "k bias", kvd)?);
        qkv_bias.extend(vector(&small.v_bias, "v bias", kvd)?);
        let cache = config.attention().cache_len();
        let adapters = [
            Adapter::upload(
                client,
                &[
                    (lora.q.as_ref(), qd),
                    (lora.k.as_ref(), kvd),
                    (lora.v.as_ref(), kvd),
                ],
                h,
                &name("q/k/v_proj"),
            )?,
            Adapter::upload(client, &[(lora.o.as_ref(), h)], qd, &name("o_proj"))?,
            Adapter::upload(
                client,
                &[(lora.gate.as_ref(), i), (lora.up.as_ref(), i)],
                h,
                &name("gate/up_proj"),
            )?,
            Adapter::upload(client, &[(lora.down.as_ref(), h)], i, &name("down_proj"))?,
        ];
        Ok(Self {
            input_norm: Buffer::from_slice(client, &vector(&small.input_norm, "input norm", h)?),
            qkv,
            qkv_bias: Buffer::from_slice(client, &qkv_bias),
            o,
            post_norm: Buffer::from_slice(
                client,
                &vector(&small.post_norm, "post-attention norm", h)?,
            ),
            gate_up,
            down,
            adapters,
            k_cache: Buffer::from_slice(client, &vec![F::from_host(0.0); cache]),
            v_cache: Buffer::from_slice(client, &vec![F::from_host(0.0); cache]),
        })
    }

    fn weight_bytes(&self) -> usize {
        let vectors = self.input_norm.len() + self.post_norm.len() + self.qkv_bias.len();
        [&self.qkv, &self.o, &self.gate_up, &self.down]
            .iter()
            .map(|m| m.weight_bytes())
            .sum::<usize>()
            + self.adapter_bytes()
            + vectors * size_of::<F>()
    }

    fn adapter_bytes(&self) -> usize {
        self.adapters
            .iter()
            .flatten()
            .map(Adapter::weight_bytes)
            .sum()
    }

    /// The widest adapter activation `z` of the layer (0 without adapters).
    fn lora_width(&self) -> usize {
        self.adapters
            .iter()
            .flatten()
            .map(|a| a.up.z_width())
            .max()
            .unwrap_or(0)
    }
}

/// Activations of one step, `[batch, width]` each.
struct Activations<F> {
    residual: Buffer<F>,
    normed: Buffer<F>,
    /// `[batch, q | k | v]`.
    qkv: Buffer<F>,
    attn: Buffer<F>,
    o: Buffer<F>,
    /// `[batch, gate | up]`.
    gate_up: Buffer<F>,
    act: Buffer<F>,
    down: Buffer<F>,
    logits: Buffer<F>,
    /// `[batch, widest adapter rank sum]`: the adapters' `x A^T` (one element when there are none).
    lora_z: Buffer<F>,
}

/// Per layer, keys and values `[kv_heads, len, head_dim]` on the host.
pub type HostKv = Vec<(Vec<f32>, Vec<f32>)>;

/// Reads a prefill's keys and values to the host (for a plan that cannot take them on the device).
type ReadKv = Box<dyn Fn() -> Result<HostKv> + Send>;

/// A prefill's keys and values: on the host, or the prefill's own cache buffers.
enum PrefilledKv {
    /// Per layer `[kv_heads, len, head_dim]`.
    Host(HostKv),
    /// The cache's buffers as burn tensors (`Vec<(Tensor<B, 4>, Tensor<B, 4>)>` of the model's backend, type
    /// erased), `[1, kv_heads, slots, head_dim]` each: a plan on the same device copies them there
    /// ([`DecodePlan::hand_over_on_device`]); any other plan reads them through `host`.
    Device {
        layers: Box<dyn std::any::Any + Send>,
        slots: usize,
        host: ReadKv,
    },
}

/// A sequence after its prefill, ready to be admitted into a plan.
pub struct Prefilled {
    kv: PrefilledKv,
    /// Tokens in the cache.
    pub len: usize,
    /// M-RoPE offset of the sequence (position of token `i` is `i + rope_delta`).
    pub rope_delta: i64,
    /// The token the prefill chose, to be fed at the first step.
    pub next_token: u32,
}

impl std::fmt::Debug for Prefilled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefilled")
            .field(
                "kv",
                &match self.kv {
                    PrefilledKv::Host(_) => "host",
                    PrefilledKv::Device { .. } => "device",
                },
            )
            .field("len", &self.len)
            .field("rope_delta", &self.rope_delta)
            .field("next_token", &self.next_token)
            .finish()
    }
}

impl Prefilled {
    /// A sequence whose keys and values are on the host: per layer `[kv_heads, len, head_dim]`.
    pub fn from_host(kv: HostKv, len: usize, rope_delta: i64, next_token: u32) -> Self {
        Self {
            kv: PrefilledKv::Host(kv),
            len,
            rope_delta,
            next_token,
        }
    }

    /// Takes the keys and values of a single-sequence cache filled by [`QwenVl::prefill`]: its buffers as they
    /// are (handles, no copy), so that a plan on the same device copies them there; read to the host only when
    /// the plan is elsewhere.
    pub fn from_cache<B: Backend>(
        cache: &KvCache<B>,
        rope_delta: i64,
        next_token: u32,
    ) -> Result<Self> {
        let len = cache.len();
        let layers = (0..cache.num_layers())
            .map(|i| {
                let (k, v) = cache.buffers(i).ok_or_else(|| {
                    EngineError::Plan(format!("layer {i} of the cache was never written"))
                })?;
                if k.dims()[0] != 1 {
                    return Err(EngineError::Plan(format!(
                        "a cache of {} sequences; one sequence is admitted at a time",
                        k.dims()[0]
                    )));
                }
                Ok((k, v))
            })
            .collect::<Result<Vec<(Tensor<B, 4>, Tensor<B, 4>)>>>()?;
        let slots = layers.first().map_or(len, |(k, _)| k.dims()[2]);
        let on_host = layers.clone();
        let host: ReadKv = Box::new(move || {
            on_host
                .iter()
                .map(|(k, v)| {
                    Ok((
                        host_values(k.clone().narrow(2, 0, len))?,
                        host_values(v.clone().narrow(2, 0, len))?,
                    ))
                })
                .collect()
        });
        Ok(Self {
            kv: PrefilledKv::Device {
                layers: Box::new(layers),
                slots,
                host,
            },
            len,
            rope_delta,
            next_token,
        })
    }

    /// The keys and values on the host, per layer `[kv_heads, len, head_dim]` (read from the device when they
    /// are there).
    pub fn host_kv(&self) -> Result<HostKv> {
        match &self.kv {
            PrefilledKv::Host(kv) => Ok(kv.clone()),
            PrefilledKv::Device { host, .. } => host(),
        }
    }
}

/// Per layer, the keys' and values' device buffers of a prefill's cache.
pub(crate) type KvBuffers<F> = Vec<(Buffer<F>, Buffer<F>)>;

/// The device buffers of a prefill's cache (`layers` of [`PrefilledKv::Device`]) when they are on the plan's
/// device in its activation type; None otherwise.
pub(crate) type DeviceKv<F> = fn(&(dyn std::any::Any + Send)) -> Option<Result<KvBuffers<F>>>;

/// One operation of the decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Embed,
    InputNorm,
    Qkv,
    /// Bias, rotation and cache append of the new token, and its attention.
    Attention,
    O,
    PostNorm,
    GateUp,
    SiluMul,
    Down,
    FinalNorm,
    LmHead,
    /// The argmax, or the sampling kernel when a slot samples.
    Pick,
}

impl Op {
    /// A decoder layer's operations, in order.
    const LAYER: &'static [Op] = &[
        Op::InputNorm,
        Op::Qkv,
        Op::Attention,
        Op::O,
        Op::PostNorm,
        Op::GateUp,
        Op::SiluMul,
        Op::Down,
    ];
    /// After the layers.
    const HEAD: &'static [Op] = &[Op::FinalNorm, Op::LmHead, Op::Pick];

    fn name(self) -> &'static str {
        match self {
            Op::Embed => "embed",
            Op::InputNorm => "input add+norm",
            Op::Qkv => "q/k/v_proj",
            Op::Attention => "rope+append+attention",
            Op::O => "o_proj",
            Op::PostNorm => "post add+norm",
            Op::GateUp => "gate/up_proj",
            Op::SiluMul => "silu*up",
            Op::Down => "down_proj",
            Op::FinalNorm => "final add+norm",
            Op::LmHead => "lm_head",
            Op::Pick => "argmax",
        }
    }
}

/// One weight product of the step: its matrix, input, output and LoRA adapter.
struct Product<'a, F> {
    matrix: &'a Matrix<F>,
    x: &'a Buffer<F>,
    y: &'a Buffer<F>,
    adapter: Option<&'a Adapter<F>>,
}

/// The time of one operation of the step ([`DecodePlan::profile`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct OpTime {
    /// Which operation.
    pub op: &'static str,
    /// Microseconds per launch, launched back to back from the host (bounded below by the host's launch cost).
    pub us: f64,
    /// Microseconds of GPU time per launch: launches queued behind a long copy, so that the GPU runs them back to
    /// back without waiting for the host.
    pub gpu_us: f64,
    /// Launches per step.
    pub per_step: usize,
    /// Weight bytes one launch reads (0 for operations without weights).
    pub weight_bytes: usize,
}

/// Host-side state of one sequence slot.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    len: usize,
    delta: i32,
    token: u32,
    active: bool,
}

/// The decode step of one model for a fixed batch of sequence slots, on one device.
pub struct DecodePlan<R: Runtime, F: Activation> {
    client: ComputeClient<R>,
    config: PlanConfig,
    /// `[vocab, hidden]`, dense or NF4 (rows dequantized as they are looked up).
    embed: Matrix<F>,
    layers: Vec<Layer<F>>,
    norm: Buffer<F>,
    lm_head: Matrix<F>,
    inv_freq: Buffer<f32>,
    scratch: AttentionScratch,
    argmax: ArgmaxScratch,
    act: Activations<F>,
    lens: Buffer<u32>,
    deltas: Buffer<i32>,
    ids: Buffer<u32>,
    slots: Vec<Slot>,
    kernels: Kernels,
    /// Takes a prefill's cache buffers on the device (set by [`DecodePlan::hand_over_on_device`]).
    device_kv: Option<DeviceKv<F>>,
    /// How each slot picks its tokens when some slot samples ([`DecodePlan::sample_with`]); `None`: all greedy.
    sampling: Option<SlotSampling>,
}

/// The slots' sampling: host copies of what the sampling kernel reads, uploaded again when a slot changes.
struct SlotSampling {
    rows: Vec<RowSampling>,
    /// `[batch, capacity]`: the uniform for the token after position `p` of slot `s` at `[s, p]`.
    draws: Vec<f32>,
    /// `[batch, words]`: tokens counted by a slot's repetition penalty, one bit each.
    seen: Vec<u32>,
    /// The device copy, `None` until uploaded after a change.
    device: Option<Sampling>,
}

impl SlotSampling {
    fn new(batch: usize, capacity: usize, vocab: usize) -> Self {
        Self {
            rows: vec![RowSampling::GREEDY; batch],
            draws: vec![0.0; batch * capacity],
            seen: vec![0; batch * Sampling::words(vocab)],
            device: None,
        }
    }

    /// Sets `slot` greedy (admitted or released). The device copy is uploaded again only when the slot sampled:
    /// a greedy slot's draws and seen bits are never read.
    fn reset(&mut self, slot: usize) {
        if self.rows[slot] != RowSampling::GREEDY {
            self.rows[slot] = RowSampling::GREEDY;
            self.device = None;
        }
    }

    /// Moves slot `from`'s sampling to slot `to` and sets `from` greedy.
    fn move_slot(&mut self, from: usize, to: usize, capacity: usize) {
        let words = self.seen.len() / self.rows.len();
        self.rows[to] = self.rows[from];
        self.draws
            .copy_within(from * capacity..(from + 1) * capacity, to * capacity);
        self.seen
            .copy_within(from * words..(from + 1) * words, to * words);
        self.rows[from] = RowSampling::GREEDY;
        self.device = None;
    }

    /// True when some of the first `b` slots needs more than an argmax of its logits.
    fn needed(&self, b: usize) -> bool {
        self.rows[..b].iter().any(|r| !r.is_plain_greedy())
    }
}

/// Which product kernels a plan may use on its device.
#[derive(Debug, Clone, Copy)]
struct Kernels {
    /// Products of more than [`GEMV_GROUP`] rows as tensor-core GEMMs ([`gemm::supported`]).
    tensor_cores: bool,
    /// NF4 products of this many rows and more (up to 32) as tensor-core GEMVs ([`mma::supported`];
    /// [`DecodePlan::set_nf4_products`]).
    mma_from: Option<usize>,
    /// Dense products of more than [`GEMV_GROUP`] rows as tensor-core GEMVs of at most this many rows per launch
    /// ([`mma::gemv_mma_dense`]; [`DecodePlan::set_dense_products`]); `None`: the GEMM.
    dense_mma: Option<usize>,
}

impl Kernels {
    /// Whether the NF4 product of `m` for `batch` rows runs on the tensor-core GEMV.
    fn nf4_mma(&self, m: &Nf4Matrix, batch: usize) -> bool {
        self.mma_from.is_some_and(|rows| batch >= rows) && mma::takes(m, batch)
    }
}

/// Which kernel multiplies a plan's dense weights past [`GEMV_GROUP`] rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenseProducts {
    /// The tensor-core GEMV ([`mma::gemv_mma_dense`]) in launches of at most [`mma::PREFERRED_MAX`] rows where the
    /// device has it, else the tensor-core GEMM (or GEMVs of 8 rows).
    Auto,
    /// The tensor-core GEMV, up to 32 rows in one launch (to compare).
    Mma32,
    /// The tensor-core GEMM ([`gemm::gemm_dense`]; to compare).
    Gemm,
}

/// The most rows per launch of the dense tensor-core GEMV for `products` on this device (`None`: not used).
fn dense_mma<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    products: DenseProducts,
) -> Option<usize> {
    let supported = mma::supported::<R, F>(client);
    match products {
        DenseProducts::Auto => supported.then_some(mma::PREFERRED_MAX),
        DenseProducts::Mma32 => supported.then_some(mma::MAX_ROWS),
        DenseProducts::Gemm => None,
    }
}

/// Which kernel multiplies a plan's NF4 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nf4Products {
    /// The tensor-core GEMV ([`mma::gemv_mma`]) from [`mma::PREFERRED_FROM`] rows up where the device has it; the
    /// plain GEMV below (faster there on an H100) and past 32 rows the GEMM.
    Auto,
    /// The plain GEMV (up to 8 rows) and the tensor-core GEMM past that (to compare).
    Gemv,
    /// The tensor-core GEMV for every batch of 1-32 rows where the device has it (to compare).
    Mma,
}

/// The smallest batch whose NF4 products run on the tensor-core GEMV for `products` on this device (`None`:
/// never).
fn mma_from<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    products: Nf4Products,
) -> Option<usize> {
    let supported = mma::supported::<R, F>(client);
    match products {
        Nf4Products::Auto => supported.then_some(mma::PREFERRED_FROM),
        Nf4Products::Gemv => None,
        Nf4Products::Mma => supported.then_some(1),
    }
}

impl<R: Runtime, F: Activation> DecodePlan<R, F> {
    /// Uploads the weights (`layers` yields them one at a time, so the host never holds them all) and allocates
    /// every buffer a step uses. `embed` and `lm_head` are `[vocab, hidden]`.
    pub fn new(
        client: &ComputeClient<R>,
        config: PlanConfig,
        embed: &HostMatrix,
        final_norm: &[f32],
        lm_head: &HostMatrix,
        layers: impl IntoIterator<Item = Result<HostLayer>>,
    ) -> Result<Self> {
        config.check()?;
        let h = config.hidden;
        if final_norm.len() != h {
            return Err(EngineError::Plan(format!(
                "a final norm of {} values for hidden {h}",
                final_norm.len(),
            )));
        }
        let embed = Matrix::upload(client, embed, "embedding", [config.vocab, h])?;
        let mut uploaded = Vec::with_capacity(config.layers);
        // The runtime keeps each upload's host copy until a later flush: flush per layer so that host memory
        // holds one layer's copies at a time, not the model's.
        let flush = || {
            client
                .flush()
                .map_err(|e| EngineError::Plan(format!("flushing uploads: {e:?}")))
        };
        for (i, layer) in layers.into_iter().enumerate() {
            uploaded.push(Layer::upload(client, &config, &layer?, i)?);
            flush()?;
        }
        let lm_head = Matrix::upload(client, lm_head, "lm_head", [config.vocab, h])?;
        Self::assemble(client, config, embed, final_norm, lm_head, uploaded)
    }

    /// The plan of its weights on the device; allocates the activations, the attention and argmax scratch and
    /// the slot state.
    pub(crate) fn assemble(
        client: &ComputeClient<R>,
        config: PlanConfig,
        embed: Matrix<F>,
        final_norm: &[f32],
        lm_head: Matrix<F>,
        layers: Vec<Layer<F>>,
    ) -> Result<Self> {
        let (b, h) = (config.batch, config.hidden);
        if final_norm.len() != h {
            return Err(EngineError::Plan(format!(
                "a final norm of {} values for hidden {h}",
                final_norm.len(),
            )));
        }
        if layers.len() != config.layers
            || lm_head.shape() != [config.vocab, h]
            || embed.shape() != [config.vocab, h]
        {
            return Err(EngineError::Plan(format!(
                "{} layers, an embedding of {:?} and an lm_head of {:?}: the plan needs {} layers and \
                 {:?} for both",
                layers.len(),
                embed.shape(),
                lm_head.shape(),
                config.layers,
                [config.vocab, h]
            )));
        }
        if matches!(embed, Matrix::Nf4(_)) && !h.is_multiple_of(8) {
            return Err(EngineError::Plan(format!(
                "an NF4 embedding is looked up by whole code words: the hidden size must be a multiple of 8, \
                 not {h}"
            )));
        }
        let inv_freq = medvl_model::rope::inverse_frequencies(config.rope_theta, config.head_dim);
        let (qd, kvd) = config.qkv_widths();
        let lora_width = layers.iter().map(Layer::lora_width).max().unwrap_or(0);
        let empty = |n: usize| Buffer::<F>::empty(client, b * n);
        Ok(Self {
            client: client.clone(),
            embed,
            layers,
            norm: Buffer::from_slice(client, &to_f::<F>(final_norm)),
            lm_head,
            inv_freq: Buffer::from_slice(client, &inv_freq),
            scratch: AttentionScratch::new(client, config.attention()),
            argmax: ArgmaxScratch::new(client, b),
            act: Activations {
                residual: empty(h),
                normed: empty(h),
                qkv: empty(qd + 2 * kvd),
                attn: empty(qd),
                o: empty(h),
                gate_up: empty(2 * config.intermediate),
                act: empty(config.intermediate),
                down: empty(h),
                logits: empty(config.vocab),
                lora_z: empty(lora_width.max(1)),
            },
            lens: Buffer::from_slice(client, &vec![0u32; b]),
            deltas: Buffer::from_slice(client, &vec![0i32; b]),
            ids: Buffer::from_slice(client, &vec![0u32; b]),
            slots: vec![Slot::default(); b],
            kernels: Kernels {
                tensor_cores: gemm::supported::<R, F>(client),
                mma_from: mma_from::<R, F>(client, Nf4Products::Auto),
                dense_mma: dense_mma::<R, F>(client, DenseProducts::Auto),
            },
            device_kv: None,
            sampling: None,
            config,
        })
    }

    /// A plan for the decoder of a loaded model.
    pub fn from_model<B: Backend>(
        client: &ComputeClient<R>,
        model: &QwenVl<B>,
        batch: usize,
        capacity: usize,
    ) -> Result<Self> {
        let text = &model.text;
        let config = PlanConfig::new(&text.config, batch, capacity);
        let embed = HostMatrix::from_weight(&text.embed_tokens, [config.vocab, config.hidden])?;
        let lm_head = match &text.lm_head {
            Some(head) => HostMatrix::from_linear(head)?,
            None => embed.clone(),
        };
        let norm = host_values(text.norm.weight.val())?;
        Self::new(
            client,
            config,
            &embed,
            &norm,
            &lm_head,
            text.layers.iter().map(HostLayer::from_model),
        )
    }

    /// A plan with random weights of `config`'s sizes (benchmarks), each kind of weight in its format of
    /// `formats`; with `lora_rank`, LoRA adapters of that rank on every projection of every layer.
    pub fn random(
        client: &ComputeClient<R>,
        config: PlanConfig,
        formats: RandomFormats,
        lora_rank: Option<usize>,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let embed = random_matrix(&mut rng, config.vocab, config.hidden, formats.embedding);
        let norm = vec![1.0; config.hidden];
        let lm_head = random_matrix(&mut rng, config.vocab, config.hidden, formats.lm_head);
        let format = formats.layers;
        Self::new(
            client,
            config,
            &embed,
            &norm,
            &lm_head,
            (0..config.layers).map(|i| {
                let seed = seed + 1 + i as u64;
                let mut layer = HostLayer::random(&config, format, seed);
                if let Some(rank) = lora_rank {
                    layer.lora = LayerLora::random(&config, rank, seed);
                }
                Ok(layer)
            }),
        )
    }

    /// Which kernels multiply the NF4 weights ([`Nf4Products::Auto`] unless set). Returns the smallest batch the
    /// tensor-core GEMV now takes, `None` when it is not used (not chosen, or the device has no such product).
    pub fn set_nf4_products(&mut self, products: Nf4Products) -> Option<usize> {
        self.kernels.mma_from = mma_from::<R, F>(&self.client, products);
        self.kernels.mma_from
    }

    /// Which kernel multiplies the dense weights past 8 rows ([`DenseProducts::Auto`] unless set). Returns the
    /// most rows per launch of the tensor-core GEMV, `None` when it is not used.
    pub fn set_dense_products(&mut self, products: DenseProducts) -> Option<usize> {
        self.kernels.dense_mma = dense_mma::<R, F>(&self.client, products);
        self.kernels.dense_mma
    }

    /// The sizes the plan was built for.
    pub fn config(&self) -> &PlanConfig {
        &self.config
    }

    /// Bytes of weights on the device (embedding, layers, final norm, lm_head).
    pub fn weight_bytes(&self) -> usize {
        self.embed.weight_bytes()
            + self.norm.len() * size_of::<F>()
            + self.layers.iter().map(Layer::weight_bytes).sum::<usize>()
            + self.lm_head.weight_bytes()
    }

    /// Puts a prefilled sequence into slot `slot`: writes its keys and values into the slot's cache and sets its
    /// length, rotary offset and next input token.
    pub fn admit(&mut self, slot: usize, sequence: &Prefilled) -> Result<()> {
        let shape = self.config.attention();
        if slot >= self.config.batch {
            return Err(EngineError::Plan(format!(
                "slot {slot} of a plan for {} sequences",
                self.config.batch
            )));
        }
        if sequence.len >= self.config.capacity {
            return Err(EngineError::Plan(format!(
                "a prompt of {} tokens leaves no room in a cache of {} slots",
                sequence.len, self.config.capacity
            )));
        }
        // The prefill's cache buffers when the plan can take them on the device, else the host values uploaded.
        let on_device = match (&sequence.kv, self.device_kv) {
            (PrefilledKv::Device { layers, slots, .. }, Some(take)) => take(layers.as_ref())
                .transpose()?
                .map(|buffers| (buffers, *slots)),
            _ => None,
        };
        let (buffers, slots) = match on_device {
            Some(device) => {
                tracing::debug!("keys and values handed over on the device");
                device
            }
            None => (
                self.upload_kv(&sequence.host_kv()?, sequence.len)?,
                sequence.len,
            ),
        };
        if buffers.len() != self.layers.len() {
            return Err(EngineError::Plan(format!(
                "keys and values for {} layers, the model has {}",
                buffers.len(),
                self.layers.len()
            )));
        }
        for ((k, v), layer) in buffers.iter().zip(&self.layers) {
            for (src, cache) in [(k, &layer.k_cache), (v, &layer.v_cache)] {
                decode::write_cache(&self.client, shape, src, slots, slot, sequence.len, cache)?;
            }
        }
        let delta = i32::try_from(sequence.rope_delta)
            .map_err(|_| EngineError::Plan(format!("rope delta {}", sequence.rope_delta)))?;
        self.slots[slot] = Slot {
            len: sequence.len,
            delta,
            token: sequence.next_token,
            active: true,
        };
        if let Some(sampling) = &mut self.sampling {
            sampling.reset(slot);
        }
        self.upload_slots();
        Ok(())
    }

    /// Makes the admitted slot `slot` pick its tokens with `sampler` on the device (greedy otherwise): the
    /// sampler's draws for the tokens the slot may still reach are taken now, so that the slot's tokens are those
    /// `sampler` would pick from the same logits; `history` (prompt and tokens so far) seeds the repetition
    /// penalty.
    pub fn sample_with(
        &mut self,
        slot: usize,
        sampler: &mut Sampler,
        history: &[u32],
    ) -> Result<()> {
        let (capacity, vocab) = (self.config.capacity, self.config.vocab);
        let len = match self.slots.get(slot) {
            Some(s) if s.active => s.len,
            _ => {
                return Err(EngineError::Plan(format!(
                    "slot {slot} holds no sequence to sample for"
                )));
            }
        };
        if let Some(&t) = history.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::Plan(format!(
                "token {t} in the history is outside the vocabulary of {vocab}"
            )));
        }
        let state = self
            .sampling
            .get_or_insert_with(|| SlotSampling::new(self.config.batch, capacity, vocab));
        state.rows[slot] = sampler.params().row();
        let draws = &mut state.draws[slot * capacity..(slot + 1) * capacity];
        draws.fill(0.0);
        for (d, u) in draws[len..]
            .iter_mut()
            .zip(sampler.take_draws(capacity - len))
        {
            *d = u as f32;
        }
        let words = Sampling::words(vocab);
        let seen = &mut state.seen[slot * words..(slot + 1) * words];
        seen.fill(0);
        for &t in history {
            seen[t as usize / 32] |= 1 << (t % 32);
        }
        state.device = None;
        Ok(())
    }

    /// Uploads the sampling state if a slot changed since the last upload.
    fn upload_sampling(&mut self) -> Result<()> {
        if let Some(state) = self.sampling.as_mut().filter(|s| s.device.is_none()) {
            state.device = Some(
                Sampling::new(
                    &self.client,
                    &state.rows,
                    &state.draws,
                    self.config.capacity,
                    &state.seen,
                    self.config.vocab,
                )
                .map_err(|e| EngineError::Plan(e.to_string()))?,
            );
        }
        Ok(())
    }

    /// The sampling state a step of the first `b` slots launches with (uploaded by [`Self::upload_sampling`]);
    /// `None` when they are all greedy (the argmax kernel serves them).
    fn sampling(&self, b: usize) -> Option<&Sampling> {
        self.sampling
            .as_ref()
            .filter(|s| s.needed(b))
            .and_then(|s| s.device.as_ref())
    }

    /// Host keys and values (per layer `[kv_heads, len, head_dim]`) uploaded in the plan's activation type.
    fn upload_kv(&self, kv: &HostKv, len: usize) -> Result<KvBuffers<F>> {
        let per_layer = self.config.kv_heads * len * self.config.head_dim;
        kv.iter()
            .enumerate()
            .map(|(i, (k, v))| {
                if k.len() != per_layer || v.len() != per_layer {
                    return Err(EngineError::Plan(format!(
                        "layer {i}: {} keys and {} values, {per_layer} expected",
                        k.len(),
                        v.len()
                    )));
                }
                let upload = |values: &[f32]| Buffer::from_slice(&self.client, &to_f::<F>(values));
                Ok((upload(k), upload(v)))
            })
            .collect()
    }

    /// Admits later prefills by copying their cache buffers on the device when they are there (see
    /// [`Prefilled::from_cache`]), through `take`; [`DecodePlan::hand_over_through_host`] undoes it.
    pub(crate) fn set_device_kv(&mut self, take: DeviceKv<F>) {
        self.device_kv = Some(take);
    }

    /// Admits every later prefill through host memory (the keys and values read back and uploaded), as a plan
    /// on another device must: the baseline of the on-device handover.
    pub fn hand_over_through_host(&mut self) {
        self.device_kv = None;
    }

    /// Frees slot `slot` (its sequence is done).
    pub fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = Slot::default();
            if let Some(sampling) = &mut self.sampling {
                sampling.reset(slot);
            }
        }
    }

    /// Moves the sequence of slot `from` to the free slot `to` (its keys and values copied on the device, its
    /// length, position, next token and sampling with it) and frees `from`: a step decodes slots `0..n`, so when
    /// a sequence ends, the batch's last one takes its place.
    pub fn move_slot(&mut self, from: usize, to: usize) -> Result<()> {
        let batch = self.config.batch;
        match (self.slots.get(from), self.slots.get(to)) {
            (Some(f), Some(t)) if f.active && !t.active => {}
            _ => {
                return Err(EngineError::Plan(format!(
                    "moving slot {from} to slot {to} of {batch}: the first must hold a sequence, the second must be free"
                )));
            }
        }
        let len = self.slots[from].len;
        let shape = self.config.attention();
        for layer in &self.layers {
            for cache in [&layer.k_cache, &layer.v_cache] {
                decode::move_cache(&self.client, shape, cache, from, to, len)?;
            }
        }
        self.slots[to] = std::mem::take(&mut self.slots[from]);
        if let Some(sampling) = &mut self.sampling {
            sampling.move_slot(from, to, self.config.capacity);
        }
        self.upload_slots();
        Ok(())
    }

    fn upload_slots(&mut self) {
        let lens: Vec<u32> = self.slots.iter().map(|s| s.len as u32).collect();
        let deltas: Vec<i32> = self.slots.iter().map(|s| s.delta).collect();
        let ids: Vec<u32> = self.slots.iter().map(|s| s.token).collect();
        self.lens = Buffer::from_slice(&self.client, &lens);
        self.deltas = Buffer::from_slice(&self.client, &deltas);
        self.ids = Buffer::from_slice(&self.client, &ids);
    }

    /// Sequences a step decodes: the admitted slots, which must be the first ones.
    fn active(&self) -> Result<usize> {
        let n = self.slots.iter().take_while(|s| s.active).count();
        if n == 0 {
            return Err(EngineError::Plan("no sequence admitted".into()));
        }
        if let Some(i) = self.slots[n..].iter().position(|s| s.active) {
            return Err(EngineError::Plan(format!(
                "slot {} holds a sequence but slot {n} is free: a step decodes slots 0..n",
                n + i
            )));
        }
        Ok(n)
    }

    /// Tokens cached by the longest of the first `b` sequences.
    fn longest(&self, b: usize) -> usize {
        self.slots[..b].iter().map(|s| s.len).max().unwrap_or(0)
    }

    /// The weight product an operation runs, with its input and output and its LoRA adapter, for decoder layer
    /// `layer`; `None` for operations without weights.
    fn gemv(&self, op: Op, layer: usize) -> Option<Product<'_, F>> {
        let (a, l) = (&self.act, &self.layers[layer]);
        let (matrix, x, y, adapter) = match op {
            Op::Qkv => (&l.qkv, &a.normed, &a.qkv, 0),
            Op::O => (&l.o, &a.attn, &a.o, 1),
            Op::GateUp => (&l.gate_up, &a.normed, &a.gate_up, 2),
            Op::Down => (&l.down, &a.act, &a.down, 3),
            Op::LmHead => {
                return Some(Product {
                    matrix: &self.lm_head,
                    x: &a.normed,
                    y: &a.logits,
                    adapter: None,
                });
            }
            _ => return None,
        };
        Some(Product {
            matrix,
            x,
            y,
            adapter: l.adapters[adapter].as_ref(),
        })
    }

    /// The gate/up matrix of decoder layer `layer` when its product for `b` rows also applies the SiLU gate
    /// ([`nf4::gemv_glu`], one launch instead of two): NF4 weights through the GEMV, no LoRA adapter (whose
    /// update must reach gate and up before the gate).
    fn fused_gate(&self, layer: usize, b: usize) -> Option<&Nf4Matrix> {
        let l = &self.layers[layer];
        if l.adapters[2].is_some() {
            return None;
        }
        l.gate_up.gated_gemv(b, self.kernels)
    }

    /// Launches one step for the admitted slots without waiting for it; the ids are read by
    /// [`Self::finish_step`]. Steps may be launched back to back: each takes its input tokens from the previous
    /// step's argmax on the device.
    pub fn launch_step(&mut self) -> Result<()> {
        let b = self.active()?;
        let longest = self.longest(b);
        if longest + 1 > self.config.capacity {
            return Err(EngineError::Plan(format!(
                "a sequence reached the cache capacity of {} tokens",
                self.config.capacity
            )));
        }
        self.upload_sampling()?;
        self.launch_op(Op::Embed, 0, b, longest)?;
        for layer in 0..self.layers.len() {
            for &op in Op::LAYER {
                self.launch_op(op, layer, b, longest)?;
            }
        }
        for &op in Op::HEAD {
            self.launch_op(op, 0, b, longest)?;
        }
        for slot in &mut self.slots[..b] {
            slot.len += 1;
        }
        Ok(())
    }

    /// Launches one operation of the step (of decoder layer `layer` where it belongs to one) for `b` sequences
    /// of which the longest holds `longest` tokens before this step.
    fn launch_op(&self, op: Op, layer: usize, b: usize, longest: usize) -> Result<()> {
        let c = &self.client;
        if op == Op::GateUp
            && let Some(m) = self.fused_gate(layer, b)
        {
            nf4::gemv_glu(c, &self.act.normed, b, m, &self.act.act)?;
            return Ok(());
        }
        if let Some(p) = self.gemv(op, layer) {
            p.matrix.apply(c, p.x, b, p.y, self.kernels)?;
            if let Some(adapter) = p.adapter {
                adapter.apply(c, p.x, b, &self.act.lora_z, p.y, self.kernels)?;
            }
            return Ok(());
        }
        let a = &self.act;
        let l = &self.layers[layer];
        let shape = AttentionShape {
            batch: b,
            ..self.config.attention()
        };
        let eps = self.config.eps;
        let delta = (layer > 0).then_some(&a.down);
        match op {
            Op::Embed => match &self.embed {
                Matrix::Dense(table) => decode::embed(
                    c,
                    table.weight(),
                    &self.ids,
                    b,
                    self.config.hidden,
                    &a.residual,
                )?,
                Matrix::Nf4(table) => {
                    dequant::dequantize_rows(c, table, &self.ids, b, &a.residual)?
                }
            },
            Op::InputNorm => {
                decode::add_rms_norm(c, &a.residual, delta, &l.input_norm, b, eps, &a.normed)?
            }
            Op::Attention => decode::attend(
                c,
                shape,
                NewToken {
                    qkv: &a.qkv,
                    bias: &l.qkv_bias,
                    inv_freq: &self.inv_freq,
                    deltas: &self.deltas,
                },
                (&l.k_cache, &l.v_cache),
                &self.lens,
                longest + 1,
                &self.scratch,
                &a.attn,
            )?,
            Op::PostNorm => {
                decode::add_rms_norm(c, &a.residual, Some(&a.o), &l.post_norm, b, eps, &a.normed)?
            }
            // Done by the gate/up product where it can.
            Op::SiluMul if self.fused_gate(layer, b).is_some() => {}
            Op::SiluMul => decode::silu_mul(c, &a.gate_up, b, self.config.intermediate, &a.act)?,
            Op::FinalNorm => {
                decode::add_rms_norm(c, &a.residual, Some(&a.down), &self.norm, b, eps, &a.normed)?
            }
            Op::Pick => match self.sampling(b) {
                Some(sampling) => {
                    sample::sample_advance(c, &a.logits, b, sampling, &self.ids, &self.lens)?
                }
                None => decode::argmax_advance(
                    c,
                    &a.logits,
                    b,
                    self.config.vocab,
                    &self.argmax,
                    &self.ids,
                    &self.lens,
                )?,
            },
            // The weight products, launched above.
            Op::Qkv | Op::O | Op::GateUp | Op::Down | Op::LmHead => {}
        }
        Ok(())
    }

    /// Times each operation of a step for the admitted sequences, two ways ([`CopyProbe::time`]): `reps`
    /// launches back to back between two device syncs (a kernel shorter than the host's launch cost shows the
    /// launch cost), and the GPU's own time per launch (launches queued behind two 512 MiB copies, minus the
    /// copies' time; median of 5). Returns, per operation, its name, both times, launches per step, and the
    /// weight bytes it reads (0 for operations without weights). Leaves the sequences' state as it was; holds
    /// 1 GiB of scratch while it runs.
    pub fn profile(&mut self, reps: usize) -> Result<Vec<OpTime>> {
        let b = self.active()?;
        let longest = self.longest(b);
        self.upload_sampling()?;
        let probe = CopyProbe::measure(&self.client, 0.5)?;
        let mut times = Vec::new();
        let layers = self.layers.len();
        // Layer 1 where there is one, so that the norm adds a residual as most layers do.
        let layer = 1.min(layers - 1);
        let ops = std::iter::once((Op::Embed, 1))
            .chain(Op::LAYER.iter().map(|&op| (op, layers)))
            .chain(Op::HEAD.iter().map(|&op| (op, 1)));
        let fused = self.fused_gate(layer, b).is_some();
        for (op, per_step) in ops {
            if op == Op::SiluMul && fused {
                continue;
            }
            let (gpu_s, launch_s) =
                probe.time(&self.client, reps, || self.launch_op(op, layer, b, longest))?;
            let weight_bytes = self.gemv(op, layer).map_or(0, |p| {
                p.matrix.weight_bytes() + p.adapter.map_or(0, Adapter::weight_bytes)
            });
            let sampled = op == Op::Pick && self.sampling(b).is_some();
            times.push(OpTime {
                op: match op {
                    Op::Pick if sampled => "sample",
                    Op::GateUp if fused => "gate/up_proj+silu",
                    _ => op.name(),
                },
                us: launch_s * 1e6,
                gpu_us: gpu_s * 1e6,
                per_step,
                weight_bytes,
            });
        }
        // The argmax moved the device lengths on: put back the host's.
        self.upload_slots();
        Ok(times)
    }

    /// Waits for the steps launched by [`Self::launch_step`] and returns each admitted slot's next token.
    pub fn finish_step(&mut self) -> Result<Vec<u32>> {
        let b = self.active()?;
        let mut ids = self.ids.read(&self.client)?;
        ids.truncate(b);
        for (slot, &id) in self.slots.iter_mut().zip(&ids) {
            slot.token = id;
        }
        // The kernel marked sampled tokens seen on the device; the host copy follows.
        if let Some(state) = self.sampling.as_mut().filter(|s| s.needed(b)) {
            let words = Sampling::words(self.config.vocab);
            for (slot, &id) in ids.iter().enumerate() {
                if state.rows[slot].repetition_penalty != 1.0 {
                    state.seen[slot * words + id as usize / 32] |= 1 << (id % 32);
                }
            }
        }
        Ok(ids)
    }

    /// One step: feeds each slot's last token, appends it to the cache, and returns each slot's next token
    /// (greedy, or sampled on the device for slots given a sampler by [`Self::sample_with`]).
    pub fn step(&mut self) -> Result<Vec<u32>> {
        self.launch_step()?;
        self.finish_step()
    }

    /// Puts a sequence of `len` tokens into slot `slot` without writing its cache (the slots keep whatever they
    /// hold): for benchmarks, whose speed does not depend on the cached values.
    pub fn admit_unfilled(&mut self, slot: usize, len: usize, token: u32) -> Result<()> {
        if slot >= self.config.batch || len >= self.config.capacity {
            return Err(EngineError::Plan(format!(
                "slot {slot} with {len} tokens in a plan for {} sequences of {} slots",
                self.config.batch, self.config.capacity
            )));
        }
        self.slots[slot] = Slot {
            len,
            delta: 0,
            token,
            active: true,
        };
        if let Some(sampling) = &mut self.sampling {
            sampling.reset(slot);
        }
        self.upload_slots();
        Ok(())
    }

    /// The logits of the last step, `[batch, vocab]` row-major (rows of admitted slots).
    pub fn logits(&self) -> Result<Vec<f32>> {
        let values = self.act.logits.read(&self.client)?;
        Ok(values.into_iter().map(Activation::to_host).collect())
    }

    /// Tokens in each slot's cache.
    pub fn lens(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.len).collect()
    }

    /// The compute client the plan launches on.
    pub fn client(&self) -> &ComputeClient<R> {
        &self.client
    }
}

/// A decode plan as the engine holds it: runtime and activation type erased.
pub trait Decoder: Send {
    /// Puts a prefilled sequence into slot `slot` ([`DecodePlan::admit`]).
    fn admit(&mut self, slot: usize, sequence: &Prefilled) -> Result<()>;
    /// Makes slot `slot` sample with `sampler` ([`DecodePlan::sample_with`]).
    fn sample_with(&mut self, slot: usize, sampler: &mut Sampler, history: &[u32]) -> Result<()>;
    /// One step for the admitted slots ([`DecodePlan::step`]).
    fn step(&mut self) -> Result<Vec<u32>>;
    /// Frees slot `slot`.
    fn release(&mut self, slot: usize);
    /// Moves the sequence in slot `from` to the free slot `to` ([`DecodePlan::move_slot`]).
    fn move_slot(&mut self, from: usize, to: usize) -> Result<()>;
    /// Tokens a sequence may reach (prompt plus generated).
    fn capacity(&self) -> usize;
    /// Sequences one step decodes at most.
    fn batch(&self) -> usize;
}

impl<R: Runtime, F: Activation> Decoder for DecodePlan<R, F> {
    fn admit(&mut self, slot: usize, sequence: &Prefilled) -> Result<()> {
        DecodePlan::admit(self, slot, sequence)
    }

    fn sample_with(&mut self, slot: usize, sampler: &mut Sampler, history: &[u32]) -> Result<()> {
        DecodePlan::sample_with(self, slot, sampler, history)
    }

    fn step(&mut self) -> Result<Vec<u32>> {
        DecodePlan::step(self)
    }

    fn release(&mut self, slot: usize) {
        DecodePlan::release(self, slot);
    }

    fn move_slot(&mut self, from: usize, to: usize) -> Result<()> {
        DecodePlan::move_slot(self, from, to)
    }

    fn capacity(&self) -> usize {
        self.config.capacity
    }

    fn batch(&self) -> usize {
        self.config.batch
    }
}
