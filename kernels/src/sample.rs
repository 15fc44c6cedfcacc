//! Sampling on the device: each row of a batch of logits picks its next token as the engine's host sampler
//! does (transformers' order: repetition penalty -> temperature -> top-k -> softmax -> top-p -> draw), with the
//! uniform draw supplied by the host, so that only token ids cross back.
//!
//! The host sampler sorts the vocabulary; the kernels do not. They walk the same sorted order (logit descending,
//! ties by ascending id) through selections: a set "the first tokens of the sorted order" is a cut `(key, end)`
//! (tokens whose order key is above `key`, and those equal to it with an id below `end`), and a selection finds
//! the cut at which a running count or probability mass first reaches a target: a search over the key 4 bits per
//! pass (16 running sums at once), then a prefix sum over the tokens that share the key found. Top-k is a
//! selection by count, top-p one by mass, and the draw one by mass at `u x total`. Each pass spreads a row over
//! many cubes (partial sums per group of the vocabulary) and a one-cube launch per row combines them, so a pick
//! is a few dozen short launches rather than one long one on a single multiprocessor.
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
    /// Per row, the selection under way (`STATE` words of each kind).
    state_u: Buffer<u32>,
    state_f: Buffer<f32>,
    /// Per row and group, a pass's partial sums (`MAX_GROUPS x DIGITS`) and tied ids (`MAX_GROUPS`).
    partials: Buffer<f32>,
    partial_ids: Buffer<u32>,
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
            state_u: Buffer::from_slice(client, &vec![0; n * STATE]),
            state_f: Buffer::from_slice(client, &vec![0.0; n * STATE]),
            partials: Buffer::empty(client, n * MAX_GROUPS * DIGITS),
            partial_ids: Buffer::empty(client, n * MAX_GROUPS),
        })
    }

    /// Rows it holds.
    pub fn rows(&self) -> usize {
        self.params.len() / PARAMS
    }
}

/// Picks `ids[b]` for each of the first `batch` rows of `logits` (`[batch, vocab]`) as `sampling` says, marks it
/// seen, and moves `lens[b]` one on (the step's input token is now cached).
///
/// Each row is spread over many cubes: a pass over the row writes per-group partial sums, and a small launch per
/// row (one cube) combines them and moves the row's selection on. A selection takes a pass per 4 bits of the key
/// (16 running sums at once, one per value of the next 4 bits), then one pass over the tokens tied at the key
/// found and one cube that scans the group where the target is reached. About 24 launches for temperature +
/// top-p on bf16 logits (40 with f32 logits or a penalty), plus 11 (19) for top-k.
pub fn sample_advance<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    logits: &Buffer<F>,
    batch: usize,
    sampling: &Sampling,
    ids: &Buffer<u32>,
    lens: &Buffer<u32>,
) -> Result<(), KernelError> {
    let s = sampling;
    let vocab = s.vocab;
    logits.check("logits", batch * vocab)?;
    ids.check("ids", batch)?;
    lens.check("lens", batch)?;
    s.params.check("sampling rows", batch * PARAMS)?;
    s.draws.check("draws", batch * s.capacity)?;
    s.seen
        .check("seen tokens", batch * Sampling::words(vocab))?;
    if batch == 0 {
        return Ok(());
    }
    // Without a penalty a bf16 logit's f32 bits below the top 16 are zero: the search skips them.
    let key_bits: u32 = if F::PAIR_TABLE == Some(0) && !s.penalty {
        16
    } else {
        32
    };
    let mask = key_mask(key_bits);
    // Enough cubes to fill the device whatever the batch; each group a contiguous range of the vocabulary.
    let groups = (WIDE_CUBES / batch).clamp(1, MAX_GROUPS);
    let range = vocab.div_ceil(groups);
    let (wide_dim, wide_planes) = plane_cube(client, 256);
    let (decide_dim, decide_planes) = plane_cube(client, MAX_GROUPS as u32);
    let (walk_dim, walk_planes) = plane_cube(client, 1024);
    let wide = CubeCount::Static(groups as u32, batch as u32, 1);
    let rows = CubeCount::Static(batch as u32, 1, 1);
    let words = Sampling::words(vocab) as u32;
    let penalty = s.penalty;
    // SAFETY: every index is below `batch * vocab` (logits), `batch * PARAMS` (params), `batch * capacity`
    // (draws: the kernels clamp the position), `batch * words` (seen), `batch * STATE` (state) or
    // `batch * MAX_GROUPS * DIGITS` (partials), checked above or allocated so.
    #[allow(unsafe_code)]
    unsafe {
        let row_args = || {
            (
                logits.array_arg(),
                s.seen.array_arg(),
                s.params.array_arg(),
                s.state_u.array_arg(),
                s.state_f.array_arg(),
            )
        };
        // The largest pass reads no selection state.
        let (l, seen, params, _, sf) = row_args();
        largest_kernel::launch_unchecked::<F, R>(
            client,
            wide.clone(),
            wide_dim,
            l,
            seen,
            params,
            sf,
            s.partials.array_arg(),
            vocab as u32,
            words,
            range as u32,
            penalty,
            wide_planes as usize,
        );
        begin_kernel::launch_unchecked::<R>(
            client,
            rows.clone(),
            decide_dim,
            s.params.array_arg(),
            s.partials.array_arg(),
            s.state_u.array_arg(),
            s.state_f.array_arg(),
            vocab as u32,
            groups as u32,
            decide_planes as usize,
        );
        let stages = [
            (Stage::TopK, s.top_k),
            (Stage::TopP, s.top_p),
            (Stage::Draw, true),
        ];
        for (stage, _) in stages.into_iter().filter(|(_, on)| *on) {
            let mass = stage != Stage::TopK;
            for pass in 0..key_bits / 4 {
                let shift = 28 - 4 * pass;
                // Keys whose bits above the 4 in question are the key's so far.
                let interval = if pass == 0 {
                    0
                } else {
                    u32::MAX << (shift + 4)
                };
                let (l, seen, params, su, sf) = row_args();
                digits_kernel::launch_unchecked::<F, R>(
                    client,
                    wide.clone(),
                    wide_dim,
                    l,
                    seen,
                    params,
                    su,
                    sf,
                    s.partials.array_arg(),
                    vocab as u32,
                    words,
                    range as u32,
                    shift,
                    interval,
                    u32::from(pass == 0),
                    mass,
                    penalty,
                    mask,
                    wide_planes as usize,
                );
                decide_kernel::launch_unchecked::<R>(
                    client,
                    rows.clone(),
                    decide_dim,
                    s.params.array_arg(),
                    s.draws.array_arg(),
                    lens.array_arg(),
                    s.partials.array_arg(),
                    s.state_u.array_arg(),
                    s.state_f.array_arg(),
                    vocab as u32,
                    s.capacity as u32,
                    groups as u32,
                    shift,
                    u32::from(pass == 0),
                    stage as u32,
                );
            }
            let (l, seen, params, su, sf) = row_args();
            ties_kernel::launch_unchecked::<F, R>(
                client,
                wide.clone(),
                wide_dim,
                l,
                seen,
                params,
                su,
                sf,
                s.partials.array_arg(),
                s.partial_ids.array_arg(),
                vocab as u32,
                words,
                range as u32,
                mass,
                penalty,
                mask,
                wide_planes as usize,
            );
            groups_kernel::launch_unchecked::<R>(
                client,
                rows.clone(),
                decide_dim,
                s.partials.array_arg(),
                s.partial_ids.array_arg(),
                s.state_u.array_arg(),
                s.state_f.array_arg(),
                groups as u32,
                decide_planes as usize,
            );
            let (l, seen, params, su, sf) = row_args();
            walk_kernel::launch_unchecked::<F, R>(
                client,
                rows.clone(),
                walk_dim,
                l,
                seen,
                params,
                su,
                sf,
                ids.array_arg(),
                lens.array_arg(),
                vocab as u32,
                words,
                range as u32,
                mass,
                stage == Stage::Draw,
                penalty,
                mask,
                walk_planes as usize,
            );
        }
    }
    Ok(())
}

/// The selections of a pick, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The first `top_k` tokens, by count.
    TopK = 0,
    /// The first tokens whose probability reaches `top_p`.
    TopP = 1,
    /// The token at which the running probability passes the draw.
    Draw = 2,
}

/// Groups (cubes) the wide passes aim at over the whole batch (an H100 has 132 SMs).
const WIDE_CUBES: usize = 264;
/// Most groups per row.
const MAX_GROUPS: usize = 64;
/// Running sums per group in a key pass: one per value of the next 4 bits.
const DIGITS: usize = 16;
/// Per-row state words: `u32` and `f32` (see the `SU_*` and `SF_*` indices).
const STATE: usize = 8;
/// Where word `field` of row `b`'s selection state lies in `state_u` or `state_f` (`STATE` words per row).
#[cube]
fn state(b: u32, #[comptime] field: u32) -> usize {
    (b * comptime!(STATE as u32) + field) as usize
}

const SU_CUT_KEY: u32 = 0;
const SU_CUT_END: u32 = 1;
const SU_KEY: u32 = 2;
const SU_ACTIVE: u32 = 3;
const SU_GROUP: u32 = 4;
const SU_LAST: u32 = 5;
const SU_STRICT: u32 = 6;
const SF_TOP: u32 = 0;
const SF_TARGET: u32 = 1;
const SF_ABOVE: u32 = 2;
const SF_BASE: u32 = 3;

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

/// True when a running sum has reached the target (`>` when `strict`, `>=` otherwise).
#[cube]
fn reached(sum: f32, target: f32, strict: bool) -> bool {
    select(strict, sum > target, sum >= target)
}

/// The row's constants as the passes read them.
#[cube]
fn load_row(params: &Array<f32>, state_f: &Array<f32>, b: u32, vocab: u32, words: u32) -> Row {
    Row {
        base: b * vocab,
        seen_base: b * words,
        temperature: params[(b * 4) as usize],
        top: state_f[state(b, SF_TOP)],
        penalty: params[(b * 4 + 3) as usize],
    }
}

/// The row's current cut.
#[cube]
fn load_cut(state_u: &Array<u32>, b: u32) -> Cut {
    Cut {
        key: state_u[state(b, SU_CUT_KEY)],
        end: state_u[state(b, SU_CUT_END)],
    }
}

/// Per group: the largest value of its range.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn largest_kernel<F: Float>(
    logits: &Array<F>,
    seen: &Array<u32>,
    params: &Array<f32>,
    state_f: &Array<f32>,
    partials: &mut Array<f32>,
    vocab: u32,
    words: u32,
    range: u32,
    #[comptime] penalty: bool,
    #[comptime] planes: usize,
) {
    let (g, b) = (CUBE_POS_X, CUBE_POS_Y);
    let row = load_row(params, state_f, b, vocab, words);
    let start = g * range;
    let end = u32::min(start + range, vocab);
    let mut largest = f32::min_value();
    for i in range_stepped(start + UNIT_POS, end, CUBE_DIM) {
        largest = f32::max(largest, value(logits, seen, row, i, penalty));
    }
    let top = cube_largest(largest, planes);
    if UNIT_POS == 0 {
        partials[((b * CUBE_COUNT_X + g) * 16) as usize] = top;
    }
}

/// Per row: the largest value over the groups, divided by the temperature; the cut is the whole row.
#[cube(launch_unchecked)]
fn begin_kernel(
    params: &Array<f32>,
    partials: &Array<f32>,
    state_u: &mut Array<u32>,
    state_f: &mut Array<f32>,
    vocab: u32,
    groups: u32,
    #[comptime] planes: usize,
) {
    let b = CUBE_POS_X;
    let mut largest = f32::min_value();
    for g in range_stepped(UNIT_POS, groups, CUBE_DIM) {
        largest = f32::max(largest, partials[((b * groups + g) * 16) as usize]);
    }
    let top = cube_largest(largest, planes);
    if UNIT_POS == 0 {
        state_f[state(b, SF_TOP)] = top / params[(b * 4) as usize];
        state_u[state(b, SU_CUT_KEY)] = 0;
        state_u[state(b, SU_CUT_END)] = vocab;
    }
}

/// Per group, for the tokens inside the cut whose key has the bits above `shift + 4` of the key found so far
/// (`interval`: those bits): 16 running weights, `[d]` over the tokens whose next 4 bits are `d` or more.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn digits_kernel<F: Float>(
    logits: &Array<F>,
    seen: &Array<u32>,
    params: &Array<f32>,
    state_u: &Array<u32>,
    state_f: &Array<f32>,
    partials: &mut Array<f32>,
    vocab: u32,
    words: u32,
    range: u32,
    shift: u32,
    interval: u32,
    first: u32,
    #[comptime] mass: bool,
    #[comptime] penalty: bool,
    #[comptime] mask: u32,
    #[comptime] planes: usize,
) {
    let (g, b) = (CUBE_POS_X, CUBE_POS_Y);
    let row = load_row(params, state_f, b, vocab, words);
    let cut = load_cut(state_u, b);
    let key = state_u[state(b, SU_KEY)] & interval;
    // The first pass of a stage totals the cut for every row (the decision whether the row takes part follows).
    let active = first == 1 || state_u[state(b, SU_ACTIVE)] == 1;
    let start = g * range;
    let end = select(active, u32::min(start + range, vocab), start);
    let mut sums = Array::<f32>::new(16usize);
    #[unroll]
    for d in 0..16usize {
        sums[d] = 0.0;
    }
    for i in range_stepped(start + UNIT_POS, end, CUBE_DIM) {
        let v = value(logits, seen, row, i, penalty);
        let k = order_key(v, mask);
        if (k & interval) == key && inside(k, i, cut) {
            let w = weight(v, row, mass);
            let digit = (k >> shift) & 15;
            #[unroll]
            for d in 0..16u32 {
                sums[d as usize] += select(digit >= d, w, 0.0);
            }
        }
    }
    let mut shared = SharedMemory::<f32>::new(comptime!(planes * 16));
    #[unroll]
    for d in 0..16usize {
        let partial = plane_sum(sums[d]);
        if UNIT_POS_X == 0 {
            shared[UNIT_POS_Y as usize * 16 + d] = partial;
        }
    }
    sync_cube();
    if UNIT_POS < 16 {
        let mut total = 0.0f32;
        #[unroll]
        for p in 0..planes {
            total += shared[p * 16 + UNIT_POS as usize];
        }
        partials[((b * CUBE_COUNT_X + g) * 16 + UNIT_POS) as usize] = total;
    }
}

/// Per row: adds the groups' running weights and keeps the largest 4-bit value at which the weight above the
/// interval plus the running weight still reaches the target. The first pass of a stage also sets the target
/// from the cut's total (and whether the row takes part).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn decide_kernel(
    params: &Array<f32>,
    draws: &Array<f32>,
    lens: &Array<u32>,
    partials: &Array<f32>,
    state_u: &mut Array<u32>,
    state_f: &mut Array<f32>,
    vocab: u32,
    capacity: u32,
    groups: u32,
    shift: u32,
    first: u32,
    stage: u32,
) {
    let b = CUBE_POS_X;
    let mut sums = SharedMemory::<f32>::new(16usize);
    if UNIT_POS < 16 {
        let mut total = 0.0f32;
        for g in 0..groups {
            total += partials[((b * groups + g) * 16 + UNIT_POS) as usize];
        }
        sums[UNIT_POS as usize] = total;
    }
    sync_cube();
    if UNIT_POS == 0 {
        let su = state(b, 0u32);
        let sf = state(b, 0u32);
        if first == 1 {
            let total = sums[0];
            let every = f32::cast_from(vocab);
            let mut active = 1u32;
            let mut target = total;
            let mut strict = 0u32;
            if stage == 0 {
                let k = params[(b * 4 + 1) as usize];
                active = u32::cast_from(k > 0.0 && k < every);
                target = k;
            } else if stage == 1 {
                let p = params[(b * 4 + 2) as usize];
                active = u32::cast_from(p < 1.0);
                target = p * total;
            } else {
                let len = u32::min(lens[b as usize], capacity - 1);
                let t = draws[(b * capacity + len) as usize] * total;
                // A draw that rounds up to the total takes the last token with weight.
                if t < total {
                    strict = 1;
                    target = t;
                }
            }
            state_u[su + SU_ACTIVE as usize] = active;
            state_u[su + SU_KEY as usize] = 0;
            state_u[su + SU_STRICT as usize] = strict;
            state_f[sf + SF_TARGET as usize] = target;
            state_f[sf + SF_ABOVE as usize] = 0.0;
        }
        if state_u[su + SU_ACTIVE as usize] == 1 {
            let above = state_f[sf + SF_ABOVE as usize];
            let target = state_f[sf + SF_TARGET as usize];
            let strict = state_u[su + SU_STRICT as usize] == 1;
            let mut digit = 0u32;
            for d in 1..16u32 {
                if reached(above + sums[d as usize], target, strict) {
                    digit = d;
                }
            }
            let mut more = 0.0f32;
            if digit < 15 {
                more = sums[(digit + 1) as usize];
            }
            state_f[sf + SF_ABOVE as usize] = above + more;
            state_u[su + SU_KEY as usize] = state_u[su + SU_KEY as usize] | (digit << shift);
        }
    }
}

/// Per group: the weight of the tokens inside the cut whose key is the one found, and one past the last of
/// them.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn ties_kernel<F: Float>(
    logits: &Array<F>,
    seen: &Array<u32>,
    params: &Array<f32>,
    state_u: &Array<u32>,
    state_f: &Array<f32>,
    partials: &mut Array<f32>,
    partial_ids: &mut Array<u32>,
    vocab: u32,
    words: u32,
    range: u32,
    #[comptime] mass: bool,
    #[comptime] penalty: bool,
    #[comptime] mask: u32,
    #[comptime] planes: usize,
) {
    let (g, b) = (CUBE_POS_X, CUBE_POS_Y);
    let row = load_row(params, state_f, b, vocab, words);
    let cut = load_cut(state_u, b);
    let key = state_u[state(b, SU_KEY)];
    let active = state_u[state(b, SU_ACTIVE)] == 1;
    let start = g * range;
    let end = select(active, u32::min(start + range, vocab), start);
    let mut sum = 0.0f32;
    let mut last = 0u32;
    for i in range_stepped(start + UNIT_POS, end, CUBE_DIM) {
        let v = value(logits, seen, row, i, penalty);
        let k = order_key(v, mask);
        if k == key && inside(k, i, cut) {
            sum += weight(v, row, mass);
            last = u32::max(last, i + 1);
        }
    }
    let total = cube_total(sum, planes);
    let ends = cube_min_max(0, last, planes);
    if UNIT_POS == 0 {
        partials[((b * CUBE_COUNT_X + g) * 16) as usize] = total;
        partial_ids[(b * CUBE_COUNT_X + g) as usize] = ends.end;
    }
}

/// Per row: the first group (in id order) at which the weight above the key plus the tied tokens' running
/// weight reaches the target, and the weight before it; one past the last tied token.
#[cube(launch_unchecked)]
fn groups_kernel(
    partials: &Array<f32>,
    partial_ids: &Array<u32>,
    state_u: &mut Array<u32>,
    state_f: &mut Array<f32>,
    groups: u32,
    #[comptime] planes: usize,
) {
    let b = CUBE_POS_X;
    let g = UNIT_POS;
    let su = state(b, 0u32);
    let sf = state(b, 0u32);
    let mine = g < groups;
    let mut sum = 0.0f32;
    let mut last = 0u32;
    if mine {
        sum = partials[((b * groups + g) * 16) as usize];
        last = partial_ids[(b * groups + g) as usize];
    }
    let above = state_f[sf + SF_ABOVE as usize];
    let target = state_f[sf + SF_TARGET as usize];
    let strict = state_u[su + SU_STRICT as usize] == 1;
    let through = above + cube_inclusive_sum(sum, planes);
    let reaches = mine && reached(through, target, strict);
    let ends = cube_min_max(select(reaches, g, u32::max_value()), last, planes);
    if g == ends.key {
        state_f[sf + SF_BASE as usize] = through - sum;
    }
    if UNIT_POS == 0 {
        state_u[su + SU_GROUP as usize] = ends.key;
        state_u[su + SU_LAST as usize] = ends.end;
    }
}

/// Per row: walks the group found, a cube-wide prefix sum per `CUBE_DIM` tokens, to the token at which the
/// target is reached; the cut ends after it. After the draw it is the row's token.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn walk_kernel<F: Float>(
    logits: &Array<F>,
    seen: &mut Array<u32>,
    params: &Array<f32>,
    state_u: &mut Array<u32>,
    state_f: &Array<f32>,
    ids: &mut Array<u32>,
    lens: &mut Array<u32>,
    vocab: u32,
    words: u32,
    range: u32,
    #[comptime] mass: bool,
    #[comptime] last_stage: bool,
    #[comptime] penalty: bool,
    #[comptime] mask: u32,
    #[comptime] planes: usize,
) {
    let b = CUBE_POS_X;
    let su = state(b, 0u32);
    let row = load_row(params, state_f, b, vocab, words);
    let cut = load_cut(state_u, b);
    let key = state_u[su + SU_KEY as usize];
    let active = state_u[su + SU_ACTIVE as usize] == 1;
    let group = state_u[su + SU_GROUP as usize];
    let target = state_f[state(b, SF_TARGET)];
    let strict = state_u[su + SU_STRICT as usize] == 1;
    let found_group = active && group != u32::max_value();
    let start = select(found_group, group * range, 0);
    let end = select(found_group, u32::min(start + range, vocab), 0);
    let mut running = state_f[state(b, SF_BASE)];
    let mut at = u32::max_value();
    let chunks = range.div_ceil(CUBE_DIM);
    for c in 0..chunks {
        let i = start + c * CUBE_DIM + UNIT_POS;
        let mut w = 0.0f32;
        if i < end {
            let v = value(logits, seen, row, i, penalty);
            let k = order_key(v, mask);
            if k == key && inside(k, i, cut) {
                w = weight(v, row, mass);
            }
        }
        let through = running + cube_inclusive_sum(w, planes);
        let hit = w > 0.0 && reached(through, target, strict);
        let first = cube_min_max(select(hit, i + 1, u32::max_value()), 0, planes);
        at = u32::min(at, first.key);
        running += cube_total(w, planes);
    }
    if UNIT_POS == 0 && active {
        // Rounding can leave the target unreached inside the group: then the last tied token.
        let end_id = select(at == u32::max_value(), state_u[su + SU_LAST as usize], at);
        state_u[su + SU_CUT_KEY as usize] = key;
        state_u[su + SU_CUT_END as usize] = end_id;
        if comptime!(last_stage) {
            let id = end_id - 1;
            ids[b as usize] = id;
            lens[b as usize] += 1;
            if comptime!(penalty) {
                let w = (b * words + id / 32) as usize;
                seen[w] = seen[w] | (1u32 << (id % 32));
            }
        }
    }
}
