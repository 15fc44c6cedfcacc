//! Scaled dot-product attention in the two forms the model needs: causal over a KV cache (decoder), and
//! non-causal within segments of a packed sequence (vision windows and whole images, transformers' `cu_seqlens`).
//! Both go through burn's `attention` op: flash attention on the CubeCL backends, or, with `MEDVL_ATTENTION=naive`,
//! burn's plain softmax(QK^T / sqrt(d)) V (selected by passing the scale explicitly), for diagnosis.

use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int};

/// Options for burn's attention op; the scale is given explicitly (which makes the CubeCL backends take the plain
/// path instead of flash attention) when `MEDVL_ATTENTION=naive`.
fn options(is_causal: bool, head_dim: usize) -> AttentionModuleOptions {
    static NAIVE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let naive = *NAIVE.get_or_init(|| std::env::var("MEDVL_ATTENTION").is_ok_and(|v| v == "naive"));
    AttentionModuleOptions {
        scale: naive.then(|| 1.0 / (head_dim as f64).sqrt()),
        softcap: None,
        is_causal,
    }
}

/// Repeats each key/value head `groups` times (grouped-query attention).
///
/// # Shapes
/// - `x`: `[batch, kv_heads, seq, head_dim]` -> `[batch, kv_heads * groups, seq, head_dim]`
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, groups: usize) -> Tensor<B, 4> {
    if groups == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    // [b, kvh, 1, s, d] -> [b, kvh, groups, s, d] -> [b, kvh * groups, s, d]
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, groups)
        .reshape([b, kvh * groups, s, d])
}

/// Causal attention of `L` new queries that follow `past` cached tokens, over a key/value buffer of `S >= past + L`
/// slots (slots from `past + L` on are unused and masked). Query `i` sits at position `past + i` and sees keys
/// `0..=past + i`.
///
/// # Shapes
/// - `q`: `[batch, heads, L, head_dim]`
/// - `k`, `v`: `[batch, kv_heads, S, head_dim]`
/// - returns `[batch, heads, L, head_dim]`
pub fn causal_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    past: usize,
) -> Tensor<B, 4> {
    let [b, h, l, _] = q.dims();
    let kvh = k.dims()[1];
    let s = k.dims()[2];
    assert!(
        past + l <= s,
        "attention over {s} key slots for {past} cached + {l} new tokens"
    );
    let d = q.dims()[3];
    let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
    if past == 0 && l == s {
        return attention(q, k, v, None, None, options(true, d));
    }
    let mask: Vec<bool> = (0..l)
        .flat_map(|i| (0..s).map(move |j| j > past + i))
        .collect();
    let mask = Tensor::<B, 2, Bool>::from_data(TensorData::new(mask, [l, s]), &q.device())
        .reshape([1, 1, l, s])
        .expand([b, h, l, s]);
    attention(q, k, v, Some(mask), None, options(false, d))
}

/// Which attention within segments runs medvl's kernel (`medvl_kernels::segments`) on burn's CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SegmentKernel {
    /// Every segment layout (the default).
    All = 0,
    /// Layouts of several segments (the vision tower's windows); one segment over the whole sequence (a single
    /// image's full-attention blocks) through burn's attention op.
    Windows = 1,
    /// None: burn's attention op everywhere.
    Off = 2,
}

/// [`SegmentKernel`] as a number, process-wide.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
static SEGMENT_KERNEL: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Sets where the segment attention kernel runs, for the whole process (see [`Segments::attend`]); for
/// comparisons (`medvl-bench page --compare-vision-attention`).
pub fn set_segment_attention_kernel(which: SegmentKernel) {
    SEGMENT_KERNEL.store(which as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The [`SegmentKernel`] last set.
#[cfg(feature = "cuda")]
fn segment_kernel() -> SegmentKernel {
    match SEGMENT_KERNEL.load(std::sync::atomic::Ordering::Relaxed) {
        0 => SegmentKernel::All,
        1 => SegmentKernel::Windows,
        _ => SegmentKernel::Off,
    }
}

/// Non-causal attention restricted to segments of a packed sequence, precomputed once per batch of images and
/// reused by every block. On burn's CUDA backend one kernel reads the segments from the packed rows
/// (`medvl_kernels::segments`). Elsewhere (and under autodiff) through burn's attention op: one segment covering
/// the whole sequence runs as plain attention; otherwise the segments are gathered into a padded batch
/// `[segments, heads, max_len, head_dim]` with padding keys masked.
#[derive(Debug, Clone)]
pub struct Segments<B: Backend> {
    len: usize,
    padded: Option<PaddedSegments<B>>,
    /// The kernel's query tiles (`medvl_kernels::segments::QueryTiles`), on the device.
    #[cfg(feature = "cuda")]
    tiles: Option<Tensor<B, 1, Int>>,
}

#[derive(Debug, Clone)]
struct PaddedSegments<B: Backend> {
    count: usize,
    max_len: usize,
    /// `[count * max_len]`: source row of each padded slot (0 for padding).
    gather: Tensor<B, 1, Int>,
    /// `[len]`: padded slot of each source row.
    scatter: Tensor<B, 1, Int>,
    /// `[count, heads, max_len, max_len]`: true where the key is padding.
    mask: Tensor<B, 4, Bool>,
}

impl<B: Backend> Segments<B> {
    /// From cumulative boundaries `[0, e1, e2, ..., len]` (empty segments allowed, as transformers' windows).
    pub fn new(cu_seqlens: &[usize], heads: usize, device: &B::Device) -> Self {
        let len = *cu_seqlens.last().unwrap_or(&0);
        // Boundaries the kernel refuses (not from 0, decreasing) leave it to burn's op.
        #[cfg(feature = "cuda")]
        let tiles = medvl_kernels::segments::QueryTiles::new(cu_seqlens)
            .ok()
            .map(|tiles| {
                let table: Vec<i64> = tiles.table().iter().map(|&n| i64::from(n)).collect();
                let len = table.len();
                Tensor::<B, 1, Int>::from_data(TensorData::new(table, [len]), device)
            });
        let bounds: Vec<(usize, usize)> = cu_seqlens
            .windows(2)
            .filter(|w| w[1] > w[0])
            .map(|w| (w[0], w[1] - w[0]))
            .collect();
        if bounds.len() <= 1 {
            return Self {
                len,
                padded: None,
                #[cfg(feature = "cuda")]
                tiles,
            };
        }
        let count = bounds.len();
        let max_len = bounds.iter().map(|&(_, l)| l).max().unwrap_or(0);
        let mut gather = vec![0i64; count * max_len];
        let mut scatter = vec![0i64; len];
        let mut mask = vec![false; count * max_len * max_len];
        for (seg, &(start, seg_len)) in bounds.iter().enumerate() {
            for i in 0..max_len {
                let slot = seg * max_len + i;
                if i < seg_len {
                    gather[slot] = (start + i) as i64;
                    scatter[start + i] = slot as i64;
                }
                for key in seg_len..max_len {
                    mask[(slot) * max_len + key] = true;
                }
            }
        }
        let mask = Tensor::<B, 3, Bool>::from_data(
            TensorData::new(mask, [count, max_len, max_len]),
            device,
        )
        .unsqueeze_dim::<4>(1)
        .expand([count, heads, max_len, max_len]);
        let ints = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [len]), device)
        };
        Self {
            len,
            padded: Some(PaddedSegments {
                count,
                max_len,
                gather: ints(gather),
                scatter: ints(scatter),
                mask,
            }),
            #[cfg(feature = "cuda")]
            tiles,
        }
    }

    /// # Shapes
    /// - `q`, `k`, `v`: `[seq, heads, head_dim]` (the packed sequence)
    /// - returns `[seq, heads, head_dim]`
    pub fn attend(&self, q: Tensor<B, 3>, k: Tensor<B, 3>, v: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, h, d] = q.dims();
        debug_assert_eq!(n, self.len);
        let options = options(false, d);
        #[cfg(feature = "cuda")]
        if let Some(tiles) = &self.tiles
            && options.scale.is_none()
            && match segment_kernel() {
                SegmentKernel::All => true,
                SegmentKernel::Windows => self.padded.is_some(),
                SegmentKernel::Off => false,
            }
        {
            match crate::fused::segment_attention(&q, &k, &v, tiles) {
                Some(Ok(out)) => return out,
                Some(Err(e)) => {
                    tracing::warn!(
                        "the segment attention kernel failed ({e}); using burn's attention"
                    )
                }
                None => {}
            }
        }
        let Some(p) = &self.padded else {
            // [1, heads, seq, head_dim]
            let to_heads = |x: Tensor<B, 3>| x.swap_dims(0, 1).unsqueeze_dim::<4>(0);
            let out = attention(to_heads(q), to_heads(k), to_heads(v), None, None, options);
            return out.squeeze_dim::<3>(0).swap_dims(0, 1);
        };
        // [count * max_len, heads, d] -> [count, max_len, heads, d] -> [count, heads, max_len, d]
        let to_padded = |x: Tensor<B, 3>| {
            x.select(0, p.gather.clone())
                .reshape([p.count, p.max_len, h, d])
                .swap_dims(1, 2)
        };
        let out = attention(
            to_padded(q),
            to_padded(k),
            to_padded(v),
            Some(p.mask.clone()),
            None,
            options,
        );
        // [count, heads, max_len, d] -> [count * max_len, heads, d] -> [seq, heads, d]
        out.swap_dims(1, 2)
            .reshape([p.count * p.max_len, h, d])
            .select(0, p.scatter.clone())
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use super::*;
    use burn::backend::NdArray;
    use burn::tensor::Distribution;

    type B = NdArray<f32>;

    #[test]
    fn segmented_attention_equals_attention_per_segment() {
        let device = Default::default();
        let (n, h, d) = (11, 2, 4);
        let q = Tensor::<B, 3>::random([n, h, d], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 3>::random([n, h, d], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 3>::random([n, h, d], Distribution::Normal(0.0, 1.0), &device);
        // Segments of 4, 0 (empty), 5 and 2 rows.
        let cu = [0, 4, 4, 9, 11];
        let packed = Segments::<B>::new(&cu, h, &device).attend(q.clone(), k.clone(), v.clone());
        for w in cu.windows(2).filter(|w| w[1] > w[0]) {
            let r = w[0]..w[1];
            let one = Segments::<B>::new(&[0, w[1] - w[0]], h, &device).attend(
                q.clone().slice(r.clone()),
                k.clone().slice(r.clone()),
                v.clone().slice(r.clone()),
            );
            packed
                .clone()
                .slice(r)
                .into_data()
                .assert_approx_eq::<f32>(&one.into_data(), Default::default());
        }
    }

    #[test]
    fn cached_causal_attention_equals_full_causal_rows() {
        let device = Default::default();
        let q = Tensor::<B, 4>::random([1, 4, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let k = Tensor::<B, 4>::random([1, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<B, 4>::random([1, 2, 6, 8], Distribution::Normal(0.0, 1.0), &device);
        let full = causal_attention(q.clone(), k.clone(), v.clone(), 0);
        let rows = |x: Tensor<B, 4>, r: std::ops::Range<usize>| x.slice(s![.., .., r]).into_data();
        // The last 2 queries after 4 cached tokens, and the last query alone.
        let tail = causal_attention(q.clone().slice(s![.., .., 4..6]), k.clone(), v.clone(), 4);
        rows(full.clone(), 4..6).assert_approx_eq::<f32>(&tail.into_data(), Default::default());
        // With 3 unused slots of garbage after the keys (a fixed-capacity cache): they must be masked out.
        let pad =
            |x: Tensor<B, 4>| Tensor::cat(vec![x, Tensor::ones([1, 2, 3, 8], &device) * 100.0], 2);
        let last = causal_attention(q.slice(s![.., .., 5..6]), pad(k), pad(v), 5);
        rows(full, 5..6).assert_approx_eq::<f32>(&last.into_data(), Default::default());
    }
}
