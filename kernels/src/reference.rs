//! Plain host implementations of what the kernels compute, for tests and for the CPU path.

use medvl_nf4::Nf4Tensor;

use crate::sample::RowSampling;

/// `y[b, n] = sum_k x[b, k] * W[n, k]` with `W` the dequantized NF4 matrix (`[rows, cols]`), accumulated in f64.
/// `x` is `[batch, cols]` row-major; the result is `[batch, rows]`.
pub fn nf4_gemv(x: &[f32], batch: usize, weight: &Nf4Tensor) -> Vec<f32> {
    let (rows, cols) = (weight.shape[0], weight.shape[1]);
    assert_eq!(x.len(), batch * cols, "x must be [batch, cols]");
    let w = weight.dequantize();
    let mut y = vec![0.0f32; batch * rows];
    for b in 0..batch {
        let xb = &x[b * cols..(b + 1) * cols];
        for n in 0..rows {
            let wn = &w[n * cols..(n + 1) * cols];
            let dot: f64 = xb
                .iter()
                .zip(wn)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            y[b * rows + n] = dot as f32;
        }
    }
    y
}

/// Picks the next token from one row of `logits` as transformers' logits processors do: repetition penalty on
/// `history`'s tokens (`logits` is modified in place) -> temperature -> top-k -> softmax -> top-p -> the token at
/// which the running probability, in order of logit (ties by id), passes `draw` (uniform in [0, 1); unused when
/// greedy). What [`crate::sample::sample_advance`] computes on the device.
pub fn sample(logits: &mut [f32], row: &RowSampling, history: &[u32], draw: f64) -> u32 {
    if row.repetition_penalty != 1.0 {
        let mut seen = history.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for &t in &seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l < 0.0 {
                    *l * row.repetition_penalty
                } else {
                    *l / row.repetition_penalty
                };
            }
        }
    }
    if !row.draws() {
        return argmax(logits);
    }
    // Candidates sorted by logit, highest first (ties by id, so the order is deterministic).
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if row.top_k > 0 {
        order.truncate(row.top_k);
    }
    let t = row.temperature;
    let max = logits[order[0]] / t;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| f64::from(logits[i] / t - max).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if row.top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (always at least one token).
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|&q| {
                mass += q;
                mass >= f64::from(row.top_p)
            })
            .map_or(probs.len(), |i| i + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut acc = 0.0;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if draw < acc {
            return order[i] as u32;
        }
    }
    order[probs.len() - 1] as u32
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// `out[i, h] = softmax_j(q[i, h] . k[j, h] * scale) v[j, h]` over the rows `j` of row `i`'s segment (non-causal,
/// segments from the cumulative boundaries `cu_seqlens`), in f64: what [`crate::segments::segment_attention`]
/// computes. `q`, `k`, `v` and the result are `[seq, heads, head_dim]`.
pub fn segment_attention(
    (q, k, v): (&[f32], &[f32], &[f32]),
    cu_seqlens: &[usize],
    heads: usize,
    head_dim: usize,
    scale: f32,
) -> Vec<f32> {
    let seq = cu_seqlens.last().copied().unwrap_or(0);
    let width = heads * head_dim;
    assert_eq!(q.len(), seq * width, "q must be [seq, heads, head_dim]");
    let mut out = vec![0.0f32; seq * width];
    let at = |row: usize, h: usize| row * width + h * head_dim;
    for pair in cu_seqlens.windows(2) {
        let rows = pair[0]..pair[1];
        for i in rows.clone() {
            for h in 0..heads {
                let scores: Vec<f64> = rows
                    .clone()
                    .map(|j| {
                        (0..head_dim)
                            .map(|e| f64::from(q[at(i, h) + e]) * f64::from(k[at(j, h) + e]))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let top = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - top).exp()).collect();
                let total: f64 = weights.iter().sum();
                for e in 0..head_dim {
                    let value: f64 = rows
                        .clone()
                        .zip(&weights)
                        .map(|(j, w)| w * f64::from(v[at(j, h) + e]))
                        .sum();
                    out[at(i, h) + e] = (value / total) as f32;
                }
            }
        }
    }
    out
}
