//! The decode-step kernels against plain host computations, at sizes the tiny model's prompts do not reach:
//! attention over caches longer than one split (several splits combined), sequences of different lengths in one
//! launch, the residual add and RMSNorm over rows wider than a cube, the dense GEMV with and without 16-byte
//! loads, LoRA up-projections added to parts of a stacked output, argmax ties, and a prefill's cache (with room
//! after its tokens) copied into a slot of the plan's.
//!
//! Runs through wgpu (CI: lavapipe, f32) and, `--ignored`, on CUDA in f32 and bf16.
#![allow(clippy::unwrap_used, missing_docs)]

use cubecl::prelude::*;
use medvl_kernels::Buffer;
use medvl_kernels::decode::{self, AttentionScratch, AttentionShape, DenseMatrix, NewToken};
use medvl_kernels::nf4::Activation;
use medvl_kernels::reference;
use medvl_kernels::sample::{self, RowSampling, Sampling};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// In `F` and back.
fn round<F: Activation>(value: f32) -> f32 {
    F::from_host(value).to_host()
}

/// Values as stored in `F` and back.
fn stored<F: Activation>(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| round::<F>(v)).collect()
}

fn upload<R: Runtime, F: Activation>(client: &ComputeClient<R>, values: &[f32]) -> Buffer<F> {
    let converted: Vec<F> = values.iter().map(|&v| F::from_host(v)).collect();
    Buffer::from_slice(client, &converted)
}

fn read<R: Runtime, F: Activation>(client: &ComputeClient<R>, buffer: &Buffer<F>) -> Vec<f32> {
    buffer
        .read(client)
        .unwrap()
        .into_iter()
        .map(F::to_host)
        .collect()
}

/// `(x1 cos - x2 sin, x2 cos + x1 sin)` with every product and sum rounded to `F`, as the kernel computes it.
fn rotate<F: Activation>(x1: f32, x2: f32, cos: f32, sin: f32) -> (f32, f32) {
    let r = round::<F>;
    (r(r(x1 * cos) - r(x2 * sin)), r(r(x2 * cos) + r(x1 * sin)))
}

/// `batch` sequences: 3 take one query head per cube, 45 (45 x 2 key/value heads x 3 splits >= 256 cubes) the
/// whole GQA group of 3. The new token comes straight from a fused q/k/v projection: the kernel adds the bias,
/// rotates, appends the key and value to the cache and attends; checked against the same steps on the host.
/// The longest sequence spans `splits` splits (more than the combine's 16 per round of loads: several rounds).
fn attention_over_long_caches<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    tolerance: f32,
    batch: usize,
    splits: usize,
) {
    let chunk = decode::attention_chunk(client);
    let shape = AttentionShape {
        heads: 6,
        kv_heads: 2,
        head_dim: 32,
        capacity: splits * chunk + 20,
        batch,
    };
    // Cached tokens before this step (the new one goes to slot `len`): `splits - 0.4` splits, less than one,
    // exactly one (the new token the first of the second split), none.
    let lens: Vec<usize> = [(splits - 1) * chunk + chunk / 2 + 6, 4, chunk, 0]
        .into_iter()
        .cycle()
        .take(batch)
        .collect();
    let deltas: Vec<i32> = [0, 7, -3].into_iter().cycle().take(batch).collect();
    let (h, kvh, d, cap) = (shape.heads, shape.kv_heads, shape.head_dim, shape.capacity);
    let width = (h + 2 * kvh) * d;
    let qkv = stored::<F>(&random(batch * width, 1));
    let bias = stored::<F>(&random(width, 4));
    let inv_freq: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32))
        .collect();
    let mut k = stored::<F>(&random(shape.cache_len(), 2));
    let mut v = stored::<F>(&random(shape.cache_len(), 3));
    let (k_cache, v_cache) = (upload::<R, F>(client, &k), upload::<R, F>(client, &v));
    let scratch = AttentionScratch::new(client, shape);
    let out = Buffer::<F>::empty(client, shape.batch * h * d);
    let lens_buffer =
        Buffer::from_slice(client, &lens.iter().map(|&l| l as u32).collect::<Vec<_>>());
    let (qkv_buffer, bias_buffer) = (upload::<R, F>(client, &qkv), upload::<R, F>(client, &bias));
    let (inv_freq_buffer, deltas_buffer) = (
        Buffer::from_slice(client, &inv_freq),
        Buffer::from_slice(client, &deltas),
    );
    let new = NewToken {
        qkv: &qkv_buffer,
        bias: &bias_buffer,
        inv_freq: &inv_freq_buffer,
        deltas: &deltas_buffer,
    };
    let longest = lens.iter().max().unwrap() + 1;
    decode::attend(
        client,
        shape,
        new,
        (&k_cache, &v_cache),
        &lens_buffer,
        longest,
        &scratch,
        &out,
    )
    .unwrap();
    let got = read(client, &out);
    let slot = |b: usize, kv: usize, t: usize| ((b * kvh + kv) * cap + t) * d;
    // The host's steps: bias, rotation of queries and the new keys, the new key and value into their slot.
    let mut q = vec![0.0; batch * h * d];
    for (b, &len) in lens.iter().enumerate() {
        let position = (len as i32 + deltas[b]) as f32;
        let x = |col: usize| round::<F>(qkv[b * width + col] + bias[col]);
        for head in 0..h + kvh {
            for i in 0..d / 2 {
                let angle = position * inv_freq[i];
                let (cos, sin) = (round::<F>(angle.cos()), round::<F>(angle.sin()));
                let (r1, r2) = rotate::<F>(x(head * d + i), x(head * d + i + d / 2), cos, sin);
                let at = if head < h {
                    (b * h + head) * d
                } else {
                    slot(b, head - h, len)
                };
                let target = if head < h { &mut q } else { &mut k };
                target[at + i] = r1;
                target[at + i + d / 2] = r2;
            }
        }
        for kv in 0..kvh {
            for i in 0..d {
                v[slot(b, kv, len) + i] = x((h + kvh + kv) * d + i);
            }
        }
    }
    // The caches: the new slots as the host computed them (to `F`'s rounding of the rotation), the rest as they
    // were.
    for (name, cache, expected) in [("key", &k_cache, &k), ("value", &v_cache, &v)] {
        let actual = read(client, cache);
        for (i, (a, e)) in actual.iter().zip(expected.iter()).enumerate() {
            assert!(
                (a - e).abs() <= tolerance,
                "{name} cache value {i}: {a} vs {e}"
            );
        }
    }
    let scale = 1.0 / (d as f32).sqrt();
    for (b, &len) in lens.iter().enumerate() {
        for head in 0..h {
            let kv = head / (h / kvh);
            let qrow = &q[(b * h + head) * d..][..d];
            let scores: Vec<f32> = (0..=len)
                .map(|t| {
                    (0..d)
                        .map(|i| qrow[i] * scale * k[slot(b, kv, t) + i])
                        .sum::<f32>()
                })
                .collect();
            let max = scores.iter().fold(f32::MIN, |m, &s| m.max(s));
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f32 = weights.iter().sum();
            for i in 0..d {
                let expected: f32 = (0..=len)
                    .map(|t| weights[t] * v[slot(b, kv, t) + i])
                    .sum::<f32>()
                    / total;
                let actual = got[(b * h + head) * d + i];
                assert!(
                    (actual - expected).abs() <= tolerance,
                    "sequence {b} head {head} dim {i}: {actual} vs {expected}"
                );
            }
        }
    }
    // More tokens than the cache holds is refused.
    assert!(
        decode::attend(
            client,
            shape,
            new,
            (&k_cache, &v_cache),
            &lens_buffer,
            cap + 1,
            &scratch,
            &out,
        )
        .is_err()
    );
}

/// The residual add and RMSNorm over rows wider than the cube (several values per unit, a width that is not a
/// multiple of the cube's units), with and without the add, against the host: `r = F(residual + delta)`,
/// `out = F(F(r * rsqrt(mean(r^2) + eps)) * weight)`.
fn add_rms_norm_as_the_host<R: Runtime, F: Activation>(client: &ComputeClient<R>, tolerance: f32) {
    let (batch, hidden, eps) = (3, 3000, 1e-6f32);
    let residual = stored::<F>(&random(batch * hidden, 7));
    let delta = stored::<F>(&random(batch * hidden, 8));
    let weight = stored::<F>(&random(hidden, 9));
    for add in [false, true] {
        let residual_buffer = upload::<R, F>(client, &residual);
        let (delta_buffer, weight_buffer) = (
            upload::<R, F>(client, &delta),
            upload::<R, F>(client, &weight),
        );
        let out = Buffer::<F>::empty(client, batch * hidden);
        decode::add_rms_norm(
            client,
            &residual_buffer,
            add.then_some(&delta_buffer),
            &weight_buffer,
            batch,
            eps,
            &out,
        )
        .unwrap();
        let (got_residual, got) = (read(client, &residual_buffer), read(client, &out));
        for b in 0..batch {
            let row: Vec<f32> = (0..hidden)
                .map(|i| {
                    let at = b * hidden + i;
                    if add {
                        round::<F>(residual[at] + delta[at])
                    } else {
                        residual[at]
                    }
                })
                .collect();
            let mean = row.iter().map(|v| v * v).sum::<f32>() / hidden as f32;
            let inv = 1.0 / (mean + eps).sqrt();
            for i in 0..hidden {
                let expected = round::<F>(round::<F>(row[i] * inv) * weight[i]);
                let actual = got[b * hidden + i];
                assert!(
                    (actual - expected).abs() <= tolerance * expected.abs().max(1.0),
                    "add {add}, row {b}, value {i}: {actual} vs {expected}"
                );
                assert_eq!(got_residual[b * hidden + i], row[i], "residual {b},{i}");
            }
        }
    }
}

fn dense_gemv<R: Runtime, F: Activation>(client: &ComputeClient<R>, tolerance: f32) {
    // 96 columns take 16-byte loads, 99 do not.
    for (rows, cols, batch) in [(37, 96, 1), (5, 99, 3), (130, 64, 8)] {
        let w = stored::<F>(&random(rows * cols, 4));
        let x = stored::<F>(&random(batch * cols, 5));
        let matrix = DenseMatrix::upload(
            client,
            &w.iter().map(|&v| F::from_host(v)).collect::<Vec<_>>(),
            rows,
            cols,
        )
        .unwrap();
        let y = Buffer::<F>::empty(client, batch * rows);
        decode::gemv_dense(client, &upload::<R, F>(client, &x), batch, &matrix, &y).unwrap();
        let got = read(client, &y);
        for b in 0..batch {
            for r in 0..rows {
                let expected: f32 = (0..cols).map(|c| x[b * cols + c] * w[r * cols + c]).sum();
                let actual = got[b * rows + r];
                assert!(
                    (actual - expected).abs() <= tolerance * (1.0 + expected.abs()),
                    "{rows}x{cols} batch {b} row {r}: {actual} vs {expected}"
                );
            }
        }
        assert!(decode::gemv_dense(client, &y, 9, &matrix, &y).is_err());
    }
}

/// The dense tensor-core GEMV (bf16/f16 only) against f32 sums of the same values: rows that end mid-tile,
/// widths of one and of many sub-blocks, 1-32 activation rows (partial 8-row tiles); a width that is not a
/// multiple of 64 and 33 rows are refused.
#[cfg(feature = "cuda")]
fn dense_mma_gemv<R: Runtime, F: Activation>(client: &ComputeClient<R>, tolerance: f32) {
    use medvl_kernels::mma;
    assert!(mma::supported::<R, F>(client));
    for (rows, cols, batch) in [
        (37, 64, 1),
        (130, 640, 9),
        (16, 3584, 16),
        (300, 1280, 17),
        (48, 512, 32),
    ] {
        let w = stored::<F>(&random(rows * cols, 6));
        let x = stored::<F>(&random(batch * cols, 7));
        let matrix = DenseMatrix::upload(
            client,
            &w.iter().map(|&v| F::from_host(v)).collect::<Vec<_>>(),
            rows,
            cols,
        )
        .unwrap();
        let y = Buffer::<F>::empty(client, batch * rows);
        mma::gemv_mma_dense(client, &upload::<R, F>(client, &x), batch, &matrix, &y).unwrap();
        let got = read(client, &y);
        for b in 0..batch {
            for r in 0..rows {
                let expected: f32 = (0..cols).map(|c| x[b * cols + c] * w[r * cols + c]).sum();
                let actual = got[b * rows + r];
                assert!(
                    (actual - expected).abs() <= tolerance * (1.0 + expected.abs()),
                    "{rows}x{cols} batch {b} row {r}: {actual} vs {expected}"
                );
            }
        }
    }
    let odd = DenseMatrix::upload(client, &[F::from_host(0.0); 2 * 96], 2, 96).unwrap();
    let y = Buffer::<F>::empty(client, 64 * 96);
    assert!(mma::gemv_mma_dense(client, &y, 1, &odd, &y).is_err());
    let square = DenseMatrix::upload(client, &[F::from_host(0.0); 64 * 64], 64, 64).unwrap();
    assert!(mma::gemv_mma_dense(client, &y, 33, &square, &y).is_err());
}

fn lora_adds_to_adapted_rows<R: Runtime, F: Activation>(client: &ComputeClient<R>, tolerance: f32) {
    use decode::{LoraPart, LoraUp};
    // A stacked output of 100 rows (q 60 | k 20 | v 20) with adapters on q (rank 40: more than a plane's lanes)
    // and v (rank 8); k's rows stay as they are.
    let (width, batch) = (100, 3);
    let part = |row_start, rows, rank, scale, seed| LoraPart {
        row_start,
        rows,
        rank,
        scale,
        b: stored::<F>(&random(rows * rank, seed)),
    };
    let parts = [part(0, 60, 40, 2.0, 11), part(80, 20, 8, 0.5, 12)];
    let up = LoraUp::<F>::upload(client, width, &parts).unwrap();
    assert_eq!(up.z_width(), 48);
    let z = stored::<F>(&random(batch * 48, 13));
    let y0 = stored::<F>(&random(batch * width, 14));
    let y = upload::<R, F>(client, &y0);
    decode::lora_add(client, &upload::<R, F>(client, &z), batch, &up, &y).unwrap();
    let got = read(client, &y);
    let round = |v: f32| F::from_host(v).to_host();
    for b in 0..batch {
        for n in 0..width {
            let (mut expected, mut column) = (y0[b * width + n], 0);
            for p in &parts {
                if (p.row_start..p.row_start + p.rows).contains(&n) {
                    let row = &p.b[(n - p.row_start) * p.rank..][..p.rank];
                    let dot: f32 = (0..p.rank).map(|j| row[j] * z[b * 48 + column + j]).sum();
                    expected = round(expected + round(round(dot) * p.scale));
                }
                column += p.rank;
            }
            let actual = got[b * width + n];
            assert!(
                (actual - expected).abs() <= tolerance * (1.0 + expected.abs()),
                "batch {b} row {n}: {actual} vs {expected}"
            );
            if (60..80).contains(&n) {
                assert_eq!(actual, y0[b * width + n], "row {n} has no adapter");
            }
        }
    }
    // Overlapping parts, a B of the wrong size and rows past the output are refused.
    let overlapping = [part(0, 60, 4, 1.0, 1), part(50, 20, 4, 1.0, 2)];
    assert!(LoraUp::<F>::upload(client, width, &overlapping).is_err());
    let mut short = part(0, 10, 4, 1.0, 3);
    short.b.pop();
    assert!(LoraUp::<F>::upload(client, width, &[short]).is_err());
    assert!(LoraUp::<F>::upload(client, width, &[part(90, 20, 4, 1.0, 4)]).is_err());
    // A z shorter than the batch needs is refused.
    assert!(decode::lora_add(client, &upload::<R, F>(client, &z), batch + 1, &up, &y).is_err());
}

fn argmax_takes_the_first_of_ties<R: Runtime, F: Activation>(client: &ComputeClient<R>) {
    let vocab = 5000;
    let mut logits = vec![0.0f32; 2 * vocab];
    // Row 0: the maximum at 4321 and 77 (first wins); row 1: one maximum at the last index.
    logits[4321] = 3.0;
    logits[77] = 3.0;
    logits[vocab + vocab - 1] = 1.0;
    logits[vocab + 12] = -2.0;
    let ids = Buffer::from_slice(client, &[9u32, 9]);
    let lens = Buffer::from_slice(client, &[10u32, 20]);
    let scratch = decode::ArgmaxScratch::new(client, 2);
    decode::argmax_advance(
        client,
        &upload::<R, F>(client, &logits),
        2,
        vocab,
        &scratch,
        &ids,
        &lens,
    )
    .unwrap();
    assert_eq!(ids.read(client).unwrap(), vec![77, vocab as u32 - 1]);
    assert_eq!(lens.read(client).unwrap(), vec![11, 21]);
}

/// A cache of 3 sequences, 2 key/value heads of 8 dimensions, 12 slots each.
const SMALL_CACHE: AttentionShape = AttentionShape {
    heads: 4,
    kv_heads: 2,
    head_dim: 8,
    capacity: 12,
    batch: 3,
};

/// Tokens `0..len` of a source with `src_slots` slots per head land in slots `0..len` of sequence 1; the rest
/// of the cache (other sequences, later slots) is untouched; a source shorter than `len` is refused.
fn write_cache_from_a_roomy_source<R: Runtime, F: Activation>(client: &ComputeClient<R>) {
    let shape = SMALL_CACHE;
    let (src_slots, len) = (10, 7);
    let src = stored::<F>(&random(shape.kv_heads * src_slots * shape.head_dim, 5));
    let before = stored::<F>(&random(
        shape.batch * shape.kv_heads * shape.capacity * shape.head_dim,
        6,
    ));
    let cache = upload::<R, F>(client, &before);
    decode::write_cache(
        client,
        shape,
        &upload::<R, F>(client, &src),
        src_slots,
        1,
        len,
        &cache,
    )
    .unwrap();
    let mut expected = before.clone();
    for h in 0..shape.kv_heads {
        for t in 0..len {
            for d in 0..shape.head_dim {
                expected[((shape.kv_heads + h) * shape.capacity + t) * shape.head_dim + d] =
                    src[(h * src_slots + t) * shape.head_dim + d];
            }
        }
    }
    assert_eq!(read::<R, F>(client, &cache), expected);
    let short = upload::<R, F>(client, &src[..shape.kv_heads * 5 * shape.head_dim]);
    assert!(decode::write_cache(client, shape, &short, 5, 1, len, &cache).is_err());
}

/// Tokens `0..len` of sequence 2 land in sequence 0 (both keys' layout), everything else (sequence 0's later
/// slots, sequences 1 and 2) stays; moving onto itself or past the batch is refused.
fn move_cache_between_sequences<R: Runtime, F: Activation>(client: &ComputeClient<R>) {
    let shape = SMALL_CACHE;
    let len = 9;
    let before = stored::<F>(&random(
        shape.batch * shape.kv_heads * shape.capacity * shape.head_dim,
        8,
    ));
    let cache = upload::<R, F>(client, &before);
    decode::move_cache(client, shape, &cache, 2, 0, len).unwrap();
    let mut expected = before.clone();
    let at = |seq: usize, h: usize, t: usize, d: usize| {
        ((seq * shape.kv_heads + h) * shape.capacity + t) * shape.head_dim + d
    };
    for h in 0..shape.kv_heads {
        for t in 0..len {
            for d in 0..shape.head_dim {
                expected[at(0, h, t, d)] = before[at(2, h, t, d)];
            }
        }
    }
    assert_ne!(expected, before);
    assert_eq!(read::<R, F>(client, &cache), expected);
    assert!(decode::move_cache(client, shape, &cache, 1, 1, len).is_err());
    assert!(decode::move_cache(client, shape, &cache, 3, 0, len).is_err());
    assert!(decode::move_cache(client, shape, &cache, 1, 0, 13).is_err());
}

/// Rows with every kind of sampling (greedy with ties, temperature, top-k, top-p, both, repetition penalty,
/// top-k past the vocabulary), `steps` launches in a row: each row's token equals the host sampler's
/// (`reference::sample`, a sort of the whole row) given the same uniform draw, lengths move on, and a penalised
/// row's sampled tokens count as seen at the next step. (Boundaries that real sums hit exactly, like a top-p
/// that equal probabilities reach on the dot, are avoided: there the two may differ by one token.)
fn sampling_as_the_host<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    vocab: usize,
    steps: usize,
) {
    let row = |temperature, top_k, top_p, repetition_penalty| RowSampling {
        temperature,
        top_k,
        top_p,
        repetition_penalty,
    };
    let rows = [
        RowSampling::GREEDY,
        row(1.0, 0, 1.0, 1.0),
        row(0.7, 5, 1.0, 1.0),
        row(1.3, 0, 0.9, 1.0),
        // 50 tokens tie at the top of the stepped rows: top-p 0.8 would end exactly on a boundary (40 x 0.02),
        // where f32 (device) and f64 (host) sums may disagree by a token; 0.83 does not.
        row(0.8, 50, 0.83, 1.0),
        row(0.0, 0, 1.0, 1.5),
        row(1.0, 0, 0.95, 1.3),
        row(1.0, 1, 1.0, 1.0),
        row(1.0, vocab + 7, 1.0, 1.0),
        row(0.5, 0, 0.3, 1.0),
        row(2.0, 3, 0.5, 0.7),
    ];
    let n = rows.len();
    let capacity = steps + 9;
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    // Every other row in steps of 1/4: many ties, also at the top.
    let logits: Vec<f32> = (0..n * vocab)
        .map(|i| {
            let v: f32 = rng.random_range(-4.0..4.0);
            if (i / vocab).is_multiple_of(2) {
                (v * 4.0).round() / 4.0
            } else {
                v
            }
        })
        .collect();
    let logits = stored::<F>(&logits);
    let draws: Vec<f32> = (0..n * capacity).map(|_| rng.random()).collect();
    let lens: Vec<u32> = (0..n).map(|_| rng.random_range(0..8)).collect();
    let mut histories: Vec<Vec<u32>> = (0..n)
        .map(|_| (0..6).map(|_| rng.random_range(0..vocab as u32)).collect())
        .collect();
    // Row 5's history holds its most likely tokens, so that the penalty changes its greedy pick.
    let best = reference::argmax(&logits[5 * vocab..6 * vocab]);
    histories[5].push(best);
    let words = Sampling::words(vocab);
    let mut seen = vec![0u32; n * words];
    for (r, history) in histories.iter().enumerate() {
        for &t in history {
            seen[r * words + t as usize / 32] |= 1 << (t % 32);
        }
    }
    let sampling = Sampling::new(client, &rows, &draws, capacity, &seen, vocab).unwrap();
    assert_eq!(sampling.rows(), n);
    let logits_buffer = upload::<R, F>(client, &logits);
    let ids = Buffer::from_slice(client, &vec![0u32; n]);
    let lens_buffer = Buffer::from_slice(client, &lens);
    let mut picked = vec![Vec::new(); n];
    for step in 0..steps {
        sample::sample_advance(client, &logits_buffer, n, &sampling, &ids, &lens_buffer).unwrap();
        let got = ids.read(client).unwrap();
        for (r, sampling) in rows.iter().enumerate() {
            let draw = draws[r * capacity + lens[r] as usize + step];
            let mut row_logits = logits[r * vocab..(r + 1) * vocab].to_vec();
            let want = reference::sample(&mut row_logits, sampling, &histories[r], f64::from(draw));
            assert_eq!(
                got[r], want,
                "row {r} {sampling:?}, step {step}, draw {draw}"
            );
            histories[r].push(want);
            picked[r].push(want);
        }
    }
    let moved: Vec<u32> = lens.iter().map(|l| l + steps as u32).collect();
    assert_eq!(lens_buffer.read(client).unwrap(), moved);
    // Greedy and top-1 rows repeat their token; the row over a flat top (temperature 1, all tokens) does not.
    assert!(picked[0].iter().all(|&t| t == picked[0][0]));
    assert!(picked[7].iter().all(|&t| t == picked[7][0]));
    assert_ne!(
        picked[5][0], best,
        "the penalty moves row 5 off its best token"
    );
    if steps > 2 {
        assert!(
            picked[1].iter().any(|&t| t != picked[1][0]),
            "{:?}",
            picked[1]
        );
    }
    eprintln!("sampled: {picked:?}");
}

/// Sampling state that does not fit its rows is refused with the sizes named.
fn sampling_refuses_bad_state<R: Runtime>(client: &ComputeClient<R>) {
    let rows = [RowSampling::GREEDY; 2];
    let err = Sampling::new(client, &rows, &[0.0; 5], 3, &[0; 8], 256)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("6 draws"), "{err}");
    let bad = RowSampling {
        top_p: 0.0,
        ..RowSampling::GREEDY
    };
    let err = Sampling::new(client, &[bad], &[0.0; 3], 3, &[0; 8], 256)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("top_p"), "{err}");
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    fn client() -> ComputeClient<WgpuRuntime> {
        WgpuRuntime::client(&WgpuDevice::default())
    }

    #[test]
    fn attention_over_long_caches_f32() {
        attention_over_long_caches::<WgpuRuntime, f32>(&client(), 1e-5, 3, 3);
        attention_over_long_caches::<WgpuRuntime, f32>(&client(), 1e-5, 45, 3);
        attention_over_long_caches::<WgpuRuntime, f32>(&client(), 1e-5, 3, 37);
    }

    #[test]
    fn add_rms_norm_as_the_host_f32() {
        add_rms_norm_as_the_host::<WgpuRuntime, f32>(&client(), 1e-5);
    }

    #[test]
    fn dense_gemv_f32() {
        dense_gemv::<WgpuRuntime, f32>(&client(), 1e-5);
    }

    #[test]
    fn lora_adds_to_adapted_rows_f32() {
        lora_adds_to_adapted_rows::<WgpuRuntime, f32>(&client(), 1e-5);
    }

    #[test]
    fn argmax_takes_the_first_of_ties_f32() {
        argmax_takes_the_first_of_ties::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn write_cache_from_a_roomy_source_f32() {
        write_cache_from_a_roomy_source::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn move_cache_between_sequences_f32() {
        move_cache_between_sequences::<WgpuRuntime, f32>(&client());
    }

    #[test]
    fn sampling_as_the_host_f32() {
        sampling_as_the_host::<WgpuRuntime, f32>(&client(), 1003, 6);
        // The 7B's vocabulary (two steps: the host reference sorts it per row and step).
        sampling_as_the_host::<WgpuRuntime, f32>(&client(), 151_936, 4);
        sampling_refuses_bad_state(&client());
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    use half::bf16;

    fn client() -> ComputeClient<CudaRuntime> {
        CudaRuntime::client(&CudaDevice::default())
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn decode_kernels_on_cuda() {
        let c = client();
        for (batch, splits) in [(3, 3), (45, 3), (3, 37)] {
            attention_over_long_caches::<CudaRuntime, f32>(&c, 1e-5, batch, splits);
            // bf16 output rounding of values below 1.
            attention_over_long_caches::<CudaRuntime, bf16>(&c, 1.0 / 128.0, batch, splits);
        }
        add_rms_norm_as_the_host::<CudaRuntime, f32>(&c, 1e-5);
        // One bf16 rounding of a value near a rounding boundary.
        add_rms_norm_as_the_host::<CudaRuntime, bf16>(&c, 1.0 / 128.0);
        dense_gemv::<CudaRuntime, f32>(&c, 1e-5);
        dense_gemv::<CudaRuntime, bf16>(&c, 1.0 / 128.0);
        dense_mma_gemv::<CudaRuntime, bf16>(&c, 1.0 / 128.0);
        dense_mma_gemv::<CudaRuntime, half::f16>(&c, 1.0 / 256.0);
        lora_adds_to_adapted_rows::<CudaRuntime, f32>(&c, 1e-5);
        lora_adds_to_adapted_rows::<CudaRuntime, bf16>(&c, 1.0 / 128.0);
        argmax_takes_the_first_of_ties::<CudaRuntime, f32>(&c);
        argmax_takes_the_first_of_ties::<CudaRuntime, bf16>(&c);
        write_cache_from_a_roomy_source::<CudaRuntime, f32>(&c);
        write_cache_from_a_roomy_source::<CudaRuntime, bf16>(&c);
        move_cache_between_sequences::<CudaRuntime, f32>(&c);
        move_cache_between_sequences::<CudaRuntime, bf16>(&c);
        for vocab in [1003, 151_936] {
            sampling_as_the_host::<CudaRuntime, f32>(&c, vocab, 4);
            sampling_as_the_host::<CudaRuntime, bf16>(&c, vocab, 4);
        }
        sampling_refuses_bad_state(&c);
    }
}
