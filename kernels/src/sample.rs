//! Sampling on the device: each row of a batch of logits picks its next token as the engine's host sampler
//! does (transformers' order: repetition penalty -> temperature -> top-k -> softmax -> top-p -> draw), with the
//! uniform draw supplied by the host, so that only token ids cross back.
//!
//! The host sampler sorts the vocabulary; the kernel does not. It walks the same sorted order (logit descending,
//! ties by ascending id) through selections: a set "the first tokens of the sorted order" is a cut `(key, end)`
//! (tokens whose order key is above `key`, and those equal to it with an id below `end`), and a selection finds
//! the cut at which a running count or probability mass first reaches a target, by a binary search over the
//! key's bits (one pass over the row per bit) and a prefix scan over the tokens that share the last key. One
//! cube per row: top-k is a selection by count, top-p one by mass, and the draw one by mass at `u x total`.
//! Probabilities are computed in f32 (the host uses f64), so a draw within about 1e-7 of a boundary between two
//! tokens may pick the neighbour.

// Inside kernels, `u32::max_value()` and `f32::min_value()` are CubeCL's `Numeric` methods.
#![allow(clippy::legacy_numeric_constants)]

use cubecl::prelude::*;

use crate::nf4::Activation;
use crate::{Buffer, KernelError, plane_cube};

/// How one row picks its token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSampling {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1: all).
    pub top_p: f32,
    /// Divides positive logits and multiplies negative ones of tokens already seen (1: off).
    pub repetition_penalty: f32,
}

impl RowSampling {
    /// The most likely token (after the repetition penalty).
    pub const GREEDY: Self = Self {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
    };

    /// True when the row needs no draw and no penalty: an argmax of the raw logits.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature == 0.0 && self.repetition_penalty == 1.0
    }

    /// True when the row consumes a uniform draw per token.
    pub fn draws(&self) -> bool {
        self.temperature > 0.0
    }

    /// Checks the ranges; the error names the parameter.
    pub fn check(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// The row as the kernel reads it: greedy is top-1 at temperature 1 (any draw picks the one token).
    fn params(&self) -> [f32; PARAMS] {
        let (temperature, top_k) = if self.draws() {
            (self.temperature, self.top_k)
        } else {
            (1.0, 1)
        };
        [
            temperature,
            top_k as f32,
            self.top_p,
            self.repetition_penalty,
        ]
    }
}

/// Values per row of the kernel's parameter buffer.
const PARAMS: usize = 4;

/// The sampling state of a batch of rows on the device: per row its parameters, a uniform draw per cache
/// position (the draw for a token is read at the position of the step's input token, so a row's draws are
/// consumed in order as its sequence grows) and a bit per vocabulary entry for the tokens it has seen.
pub struct Sampling {
    params: Buffer<f32>,
    draws: Buffer<f32>,
    seen: Buffer<u32>,
    capacity: usize,
    vocab: usize,
    top_k: bool,
    top_p: bool,
    penalty: bool,
}

impl Sampling {
    /// Words of seen-token bits per row.
    pub fn words(vocab: usize) -> usize {
        vocab.div_ceil(32)
    }

    /// Uploads `rows` (one per row of the batch), `draws` (`[rows, capacity]`: the uniform for the token that
    /// follows position `p` at `[row, p]`) and `seen` (`[rows, words(vocab)]`: bit `t % 32` of word `t / 32` set
    /// when token `t` counts for the repetition penalty).
    pub fn new<R: Runtime>(
        client: &ComputeClient<R>,
        rows: &[RowSampling],
        draws: &[f32],
        capacity: usize,
        seen: &[u32],
        vocab: usize,
    ) -> Result<Self, KernelError> {
        let n = rows.len();
        if draws.len() != n * capacity || seen.len() != n * Self::words(vocab) {
            return Err(KernelError::Unsupported(format!(
                "{n} rows need {} draws and {} seen words, got {} and {}",
                n * capacity,
                n * Self::words(vocab),
                draws.len(),
                seen.len()
            )));
        }
        if vocab >= 1 << 24 {
            return Err(KernelError::Unsupported(format!(
                "a vocabulary of {vocab}: counts are kept in f32, exact below 2^24"
            )));
        }
        for (i, row) in rows.iter().enumerate() {
            row.check()
                .map_err(|what| KernelError::Unsupported(format!("sampling row {i}: {what}")))?;
        }
        let params: Vec<f32> = rows.iter().flat_map(RowSampling::params).collect();
        Ok(Self {
            params: Buffer::from_slice(client, &params),
            draws: Buffer::from_slice(client, draws),
            seen: Buffer::from_slice(client, seen),
            capacity,
            vocab,
            // Greedy rows run as top-1.
            top_k: rows.iter().any(|r| r.top_k > 0 || !r.draws()),
            top_p: rows.iter().any(|r| r.draws() && r.top_p < 1.0),
            penalty: rows.iter().any(|r| r.repetition_penalty != 1.0),
        })
    }

    /// Rows it holds.
    pub fn rows(&self) -> usize {
        self.params.len() / PARAMS
    }
}

/// Picks `ids[b]` for each of the first `batch` rows of `logits` (`[batch, vocab]`) as `sampling` says, marks it
/// seen, and moves `lens[b]` one on (the step's input token is now cached). One cube per row.
pub fn sample_advance<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    logits: &Buffer<F>,
    batch: usize,
    sampling: &Sampling,
    ids: &Buffer<u32>,
    lens: &Buffer<u32>,
) -> Result<(), KernelError> {
    let vocab = sampling.vocab;
    logits.check("logits", batch * vocab)?;
    ids.check("ids", batch)?;
    lens.check("lens", batch)?;
    sampling.params.check("sampling rows", batch * PARAMS)?;
    sampling.draws.check("draws", batch * sampling.capacity)?;
    sampling
        .seen
        .check("seen tokens", batch * Sampling::words(vocab))?;
    if batch == 0 {
        return Ok(());
    }
    // Without a penalty a bf16 logit's f32 bits below the top 16 are zero: the search skips them.
    let key_bits = if F::PAIR_TABLE == Some(0) && !sampling.penalty {
        16
    } else {
        32
    };
    let (dim, planes) = plane_cube(client, 1024);
    // SAFETY: every index is below `batch * vocab`, `batch * PARAMS`, `batch * capacity` (the kernel reads the
    // draw at `lens[b]`, which the plan keeps below its capacity) or `batch * words`, checked above.
    #[allow(unsafe_code)]
    unsafe {
        sample_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(batch as u32, 1, 1),
            dim,
            logits.array_arg(),
            sampling.params.array_arg(),
            sampling.draws.array_arg(),
            sampling.seen.array_arg(),
            ids.array_arg(),
            lens.array_arg(),
            vocab as u32,
            sampling.capacity as u32,
            Sampling::words(vocab) as u32,
            sampling.top_k,
            sampling.top_p,
            sampling.penalty,
            key_mask(key_bits),
            planes as usize,
        );
    }
    Ok(())
}

/// The first tokens of a row's sorted order: those whose key is above `key`, and those whose key equals it with
/// an id below `end`.
#[derive(CubeType, Clone, Copy)]
struct Cut {
    key: u32,
    end: u32,
}

/// One row of logits as the selections read it.
#[derive(CubeType, Clone, Copy)]
struct Row {
    /// Offset of the row's logits.
    base: u32,
    /// Offset of the row's seen-token words.
    seen_base: u32,
    vocab: u32,
    temperature: f32,
    /// The largest value divided by the temperature.
    top: f32,
    penalty: f32,
}

/// The row's logit `i` after the repetition penalty.
#[cube]
fn value<F: Float>(
    logits: &Array<F>,
    seen: &Array<u32>,
    row: Row,
    i: u32,
    #[comptime] penalty: bool,
) -> f32 {
    let mut v = f32::cast_from(logits[(row.base + i) as usize]);
    if comptime!(penalty) {
        let word = seen[(row.seen_base + i / 32) as usize];
        if (word >> (i % 32)) & 1 == 1 {
            v = select(v < 0.0, v * row.penalty, v / row.penalty);
        }
    }
    v
}

/// A key whose unsigned order is the float order of `v` (-0 below +0), the bits outside `mask` cleared.
#[cube]
fn order_key(v: f32, #[comptime] mask: u32) -> u32 {
    let bits = u32::reinterpret(v);
    let key = select(bits >> 31u32 == 1u32, !bits, bits | 0x8000_0000u32);
    key & mask
}

/// The mask of the top `bits` bits of a key.
fn key_mask(bits: u32) -> u32 {
    if bits >= 32 {
        u32::MAX
    } else {
        !((1u32 << (32 - bits)) - 1)
    }
}

/// True when the token `(key, id)` is inside `cut`.
#[cube]
fn inside(key: u32, id: u32, cut: Cut) -> bool {
    key > cut.key || (key == cut.key && id < cut.end)
}

/// The shorter of two cuts (the first tokens of the order are nested: the shorter one is their intersection).
#[cube]
fn narrower(a: Cut, b: Cut) -> Cut {
    let a_first = a.key > b.key || (a.key == b.key && a.end <= b.end);
    Cut {
        key: select(a_first, a.key, b.key),
        end: select(a_first, a.end, b.end),
    }
}

/// A token's weight: its unnormalised probability, or 1 to count.
#[cube]
fn weight(v: f32, row: Row, mass: bool) -> f32 {
    let mut w = 1.0f32;
    if mass {
        w = f32::exp(v / row.temperature - row.top);
    }
    w
}

/// Sum over the cube, in every unit; reusable right away (syncs after reading).
#[cube]
fn cube_total(value: f32, #[comptime] planes: usize) -> f32 {
    let mut shared = SharedMemory::<f32>::new(planes);
    let partial = plane_sum(value);
    if UNIT_POS_X == 0 {
        shared[UNIT_POS_Y as usize] = partial;
    }
    sync_cube();
    let mut total = 0.0f32;
    #[unroll]
    for p in 0..planes {
        total += shared[p];
    }
    sync_cube();
    total
}

/// Largest value over the cube, in every unit.
#[cube]
fn cube_largest(value: f32, #[comptime] planes: usize) -> f32 {
    let mut shared = SharedMemory::<f32>::new(planes);
    let partial = plane_max(value);
    if UNIT_POS_X == 0 {
        shared[UNIT_POS_Y as usize] = partial;
    }
    sync_cube();
    let mut top = shared[0];
    #[unroll]
    for p in 1..planes {
        top = f32::max(top, shared[p]);
    }
    sync_cube();
    top
}

/// Smallest and largest `u32` over the cube, in every unit (`x` minimised, `y` maximised).
#[cube]
fn cube_min_max(low: u32, high: u32, #[comptime] planes: usize) -> Cut {
    let mut lows = SharedMemory::<u32>::new(planes);
    let mut highs = SharedMemory::<u32>::new(planes);
    let plane_low = plane_min(low);
    let plane_high = plane_max(high);
    if UNIT_POS_X == 0 {
        lows[UNIT_POS_Y as usize] = plane_low;
        highs[UNIT_POS_Y as usize] = plane_high;
    }
    sync_cube();
    let mut l = lows[0];
    let mut h = highs[0];
    #[unroll]
    for p in 1..planes {
        l = u32::min(l, lows[p]);
        h = u32::max(h, highs[p]);
    }
    sync_cube();
    Cut { key: l, end: h }
}

/// Inclusive prefix sum of `value` over the units in `UNIT_POS` order.
#[cube]
fn cube_inclusive_sum(value: f32, #[comptime] planes: usize) -> f32 {
    let mut shared = SharedMemory::<f32>::new(planes);
    let within = plane_inclusive_sum(value);
    if UNIT_POS_X == CUBE_DIM_X - 1 {
        shared[UNIT_POS_Y as usize] = within;
    }
    sync_cube();
    let mut before = 0.0f32;
    #[unroll]
    for p in 0..planes {
        before += select((p as u32) < UNIT_POS_Y, shared[p], 0.0);
    }
    sync_cube();
    before + within
}

/// Weight of the tokens inside `cut` (counted, or by probability mass).
#[cube]
fn tally<F: Float>(
    logits: &Array<F>,
    seen: &Array<u32>,
    row: Row,
    cut: Cut,
    mass: bool,
    #[comptime] penalty: bool,
    #[comptime] mask: u32,
    #[comptime] planes: usize,
) -> f32 {
    let mut sum = 0.0f32;
    for i in range_stepped(UNIT_POS, row.vocab, CUBE_DIM) {
        let v = value(logits, seen, row, i, penalty);
        if inside(order_key(v, mask), i, cut) {
            sum += weight(v, row, mass);
        }
    }
    cube_total(sum, planes)
}

/// True when a running sum has reached the target (`>` when `strict`, `>=` otherwise).
#[cube]
fn reached(sum: f32, target: f32, strict: bool) -> bool {
    select(strict, sum > target, sum >= target)
}

/// The first tokens of `within`'s order up to and including the one at which the running weight reaches
/// `target`. The caller makes sure the whole of `within` reaches it.
#[cube]
#[allow(clippy::too_many_arguments)]
fn select_cut<F: Float>(
    logits: &Array<F>,
    seen: &Array<u32>,
    row: Row,
    within: Cut,
    target: f32,
    mass: bool,
    strict: bool,
    #[comptime] penalty: bool,
    #[comptime] mask: u32,
    #[comptime] planes: usize,
) -> Cut {
    // The largest key whose tokens and those above it reach the target: the key of the token sought.
    let mut key = 0u32;
    let bits = comptime!(mask.count_ones());
    for j in 0u32..bits {
        let candidate = key | (1u32 << (31 - j));
        let cut = narrower(
            within,
            Cut {
                key: candidate,
                end: row.vocab,
            },
        );
        if reached(
            tally(logits, seen, row, cut, mass, penalty, mask, planes),
            target,
            strict,
        ) {
            key = candidate;
        }
    }
    // Among the tokens of that key (by id), the one at which the running weight reaches the target: each unit
    // sums a contiguous range of ids, a prefix sum over the units finds the range, its unit walks it.
    let above = narrower(within, Cut { key, end: 0 });
    let before = tally(logits, seen, row, above, mass, penalty, mask, planes);
    let tied = narrower(
        within,
        Cut {
            key,
            end: row.vocab,
        },
    );
    let chunk = row.vocab.div_ceil(CUBE_DIM);
    let start = UNIT_POS * chunk;
    let end = u32::min(start + chunk, row.vocab);
    let mut sum = 0.0f32;
    let mut last = 0u32;
    for i in start..end {
        let v = value(logits, seen, row, i, penalty);
        let k = order_key(v, mask);
        if k == key && inside(k, i, tied) {
            sum += weight(v, row, mass);
            last = i + 1;
        }
    }
    let through = before + cube_inclusive_sum(sum, planes);
    let reaches = reached(through, target, strict);
    // The first unit whose range reaches the target, and one past the last tied token (in case rounding lets
    // none reach it).
    let ends = cube_min_max(select(reaches, UNIT_POS, u32::max_value()), last, planes);
    let mut found = SharedMemory::<u32>::new(1usize);
    if UNIT_POS == ends.key {
        let mut running = through - sum;
        let mut at = u32::max_value();
        let mut mine = 0u32;
        for i in start..end {
            let v = value(logits, seen, row, i, penalty);
            let k = order_key(v, mask);
            if k == key && inside(k, i, tied) {
                running += weight(v, row, mass);
                mine = i + 1;
                if at == u32::max_value() && reached(running, target, strict) {
                    at = i + 1;
                }
            }
        }
        found[0usize] = select(at == u32::max_value(), mine, at);
    }
    sync_cube();
    let end = select(ends.key == u32::max_value(), ends.end, found[0usize]);
    sync_cube();
    Cut { key, end }
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn sample_kernel<F: Float>(
    logits: &Array<F>,
    params: &Array<f32>,
    draws: &Array<f32>,
    seen: &mut Array<u32>,
    ids: &mut Array<u32>,
    lens: &mut Array<u32>,
    vocab: u32,
    capacity: u32,
    words: u32,
    #[comptime] top_k: bool,
    #[comptime] top_p: bool,
    #[comptime] penalty: bool,
    #[comptime] mask: u32,
    #[comptime] planes: usize,
) {
    let b = CUBE_POS_X;
    let p = (b * 4) as usize;
    let temperature = params[p];
    let k = params[p + 1];
    let keep = params[p + 2];
    let mut row = Row {
        base: b * vocab,
        seen_base: b * words,
        vocab,
        temperature,
        top: 0.0,
        penalty: params[p + 3],
    };
    let mut largest = f32::min_value();
    for i in range_stepped(UNIT_POS, vocab, CUBE_DIM) {
        largest = f32::max(largest, value(logits, seen, row, i, penalty));
    }
    row.top = cube_largest(largest, planes) / temperature;
    let every = f32::cast_from(vocab);
    // The cut so far, as two variables (a struct cannot be reassigned).
    let mut cut_key = 0u32;
    let mut cut_end = vocab;
    if comptime!(top_k) {
        let count = select(k > 0.0 && k < every, k, every);
        let all = Cut {
            key: cut_key,
            end: cut_end,
        };
        let cut = select_cut(
            logits, seen, row, all, count, false, false, penalty, mask, planes,
        );
        cut_key = cut.key;
        cut_end = cut.end;
    }
    if comptime!(top_p) {
        // Rows that keep everything select the whole cut by count.
        let cut_mass = keep < 1.0;
        let within = Cut {
            key: cut_key,
            end: cut_end,
        };
        let total = tally(logits, seen, row, within, cut_mass, penalty, mask, planes);
        let target = select(cut_mass, keep * total, total);
        let cut = select_cut(
            logits, seen, row, within, target, cut_mass, false, penalty, mask, planes,
        );
        cut_key = cut.key;
        cut_end = cut.end;
    }
    let cut = Cut {
        key: cut_key,
        end: cut_end,
    };
    let total = tally(logits, seen, row, cut, true, penalty, mask, planes);
    let len = lens[b as usize];
    // (Past the capacity only when a profile launches it over and over: the last draw then.)
    let target = draws[(b * capacity + u32::min(len, capacity - 1)) as usize] * total;
    // A draw that rounds up to the total takes the last token, as the host does.
    let by_mass = target < total;
    let goal = select(
        by_mass,
        target,
        tally(logits, seen, row, cut, false, penalty, mask, planes),
    );
    let chosen = select_cut(
        logits, seen, row, cut, goal, by_mass, by_mass, penalty, mask, planes,
    );
    if UNIT_POS == 0 {
        let id = chosen.end - 1;
        ids[b as usize] = id;
        lens[b as usize] = len + 1;
        if comptime!(penalty) {
            let w = (b * words + id / 32) as usize;
            seen[w] = seen[w] | (1u32 << (id % 32));
        }
    }
}
