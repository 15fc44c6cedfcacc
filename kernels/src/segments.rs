//! Attention within the segments of a packed sequence, non-causal: the vision tower's windows and whole images
//! (transformers' `cu_seqlens`), read straight from the packed `[seq, heads, head_dim]` rows without padding the
//! segments to a common length or masking.
//!
//! One cube takes up to `planes x ATTENTION_ROWS` consecutive queries of one segment and one head; it goes over the
//! segment's keys a tile of one plane width at a time (keys and values copied to shared memory in f32), each lane
//! scoring one key of the tile against each of its plane's queries, with an online softmax (running maximum and
//! sum per query) so that a segment of any length takes one pass. Scores, softmax and outputs are f32; the output
//! is rounded to `F` once.

use cubecl::prelude::*;

use crate::nf4::Activation;
use crate::{Buffer, KernelError, plane_size};

/// Queries per plane.
const ATTENTION_ROWS: usize = 8;

/// Planes per cube.
const ATTENTION_PLANES: usize = 4;

/// Largest head dimension [`segment_attention`] takes.
pub const MAX_HEAD_DIM: usize = 256;

/// Query tiles of a packed sequence for [`segment_attention`]: four numbers per tile (first query, queries, first
/// row of its segment, the segment's length), built once per layout from the segments' cumulative boundaries
/// `[0, e1, e2, ..., seq]` (empty segments allowed); a tile never spans two segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTiles {
    tiles: Vec<u32>,
    seq: usize,
}

impl QueryTiles {
    /// Tiles of at most [`QUERIES_PER_CUBE`] queries over the segments `cu_seqlens` describes.
    ///
    /// # Errors
    /// Boundaries that decrease, do not start at 0, or pass `u32`.
    pub fn new(cu_seqlens: &[usize]) -> Result<Self, KernelError> {
        if cu_seqlens.first().is_some_and(|&first| first != 0) {
            return Err(KernelError::Unsupported(format!(
                "segment boundaries start at {}, not 0",
                cu_seqlens[0]
            )));
        }
        let seq = cu_seqlens.last().copied().unwrap_or(0);
        if u32::try_from(seq).is_err() {
            return Err(KernelError::Unsupported(format!(
                "{seq} rows: more than u32 indexes"
            )));
        }
        let mut tiles = Vec::new();
        for pair in cu_seqlens.windows(2) {
            let (start, end) = (pair[0], pair[1]);
            if end < start {
                return Err(KernelError::Unsupported(format!(
                    "segment boundaries decrease ({start} then {end})"
                )));
            }
            for first in (start..end).step_by(QUERIES_PER_CUBE) {
                let count = QUERIES_PER_CUBE.min(end - first);
                tiles.extend([first, count, start, end - start].map(|n| n as u32));
            }
        }
        Ok(Self { tiles, seq })
    }

    /// The table, four numbers per tile.
    pub fn table(&self) -> &[u32] {
        &self.tiles
    }

    /// Rows of the packed sequence.
    pub fn seq(&self) -> usize {
        self.seq
    }

    /// Tiles (cubes per head).
    pub fn len(&self) -> usize {
        self.tiles.len() / 4
    }

    /// No tiles (an empty sequence).
    pub fn is_empty(&self) -> bool {
        self.tiles.is_empty()
    }
}

/// Queries per cube: every tile of a [`QueryTiles`] handed to [`segment_attention`] holds at most this many.
pub const QUERIES_PER_CUBE: usize = ATTENTION_PLANES * ATTENTION_ROWS;

/// Values per shared-memory read of a query row.
fn query_vector(head_dim: usize) -> usize {
    [4, 2]
        .into_iter()
        .find(|&n| head_dim.is_multiple_of(n))
        .unwrap_or(1)
}

/// `out[i, h] = softmax(q[i, h] . k[j, h] * scale) v[j, h]` over the rows `j` of row `i`'s segment, for every
/// row `i` of a packed sequence of `seq` rows and every head `h`: `q`, `k`, `v` and `out` are `[seq, heads,
/// head_dim]`; `tiles` is a [`QueryTiles`] table uploaded to the device (`tiles.len() / 4` tiles of at most
/// [`QUERIES_PER_CUBE`] queries each, covering the sequence).
#[allow(clippy::too_many_arguments)]
pub fn segment_attention<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    (q, k, v): (&Buffer<F>, &Buffer<F>, &Buffer<F>),
    tiles: &Buffer<u32>,
    seq: usize,
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &Buffer<F>,
) -> Result<(), KernelError> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) || head_dim > MAX_HEAD_DIM {
        return Err(KernelError::Unsupported(format!(
            "head dimension {head_dim} (even, at most {MAX_HEAD_DIM})"
        )));
    }
    if heads == 0 || heads > u16::MAX as usize {
        return Err(KernelError::Unsupported(format!("{heads} heads")));
    }
    let values = seq * heads * head_dim;
    q.check("q", values)?;
    k.check("k", values)?;
    v.check("v", values)?;
    out.check("out", values)?;
    if !tiles.len().is_multiple_of(4) {
        return Err(KernelError::Unsupported(format!(
            "a tile table of {} numbers: four per tile",
            tiles.len()
        )));
    }
    let count = tiles.len() / 4;
    if count == 0 {
        return Ok(());
    }
    let plane_width = plane_size(client) as usize;
    // SAFETY: q, k, v and out hold `seq * heads * head_dim` values (checked above); the kernel reads rows the
    // tiles name, which `QueryTiles` keeps below `seq` for a table built over this sequence (the caller's
    // contract), and reads and writes only columns of head `CUBE_POS_Y < heads`.
    #[allow(unsafe_code)]
    unsafe {
        segment_attention_kernel::launch_unchecked::<F, R>(
            client,
            CubeCount::Static(count as u32, heads as u32, 1),
            CubeDim::new_2d(plane_width as u32, ATTENTION_PLANES as u32),
            query_vector(head_dim),
            q.array_arg(),
            k.array_arg(),
            v.array_arg(),
            tiles.array_arg(),
            out.array_arg(),
            scale,
            head_dim,
            ATTENTION_ROWS,
            ATTENTION_PLANES,
            plane_width,
            head_dim.div_ceil(plane_width),
        );
    }
    Ok(())
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn segment_attention_kernel<F: Float, NQ: Size>(
    q: &Array<F>,
    k: &Array<F>,
    v: &Array<F>,
    tiles: &Array<u32>,
    out: &mut Array<F>,
    scale: f32,
    #[comptime] head_dim: usize,
    #[comptime] rows: usize,
    #[comptime] planes: usize,
    #[comptime] plane_width: usize,
    #[comptime] lane_dims: usize,
) {
    // Cube `(tile, h)`: queries `first .. first + count` of head `h`, in a segment of `seg_len` rows from
    // `seg_first`. Plane `p` holds queries `p * rows ..`; in the value pass lane `l` accumulates dimensions
    // `l, l + plane_width, ...` of each of them.
    let tile = CUBE_POS_X;
    let h = CUBE_POS_Y;
    let heads = CUBE_COUNT_Y;
    let lane = UNIT_POS_X;
    let plane = UNIT_POS_Y;
    let first = tiles[(tile * 4) as usize];
    let count = tiles[(tile * 4 + 1) as usize];
    let seg_first = tiles[(tile * 4 + 2) as usize];
    let seg_len = tiles[(tile * 4 + 3) as usize];
    let stride = heads * comptime!(head_dim as u32);
    let col = h * comptime!(head_dim as u32);
    let nq = NQ::value();
    let q_vectors = comptime!(head_dim / nq);
    let tile_rows = comptime!(planes * rows);

    // The cube's queries, scaled, in f32 (rows past `count` repeat the first query and are not written).
    let mut qs = SharedMemory::<Vector<f32, NQ>>::new(comptime!(tile_rows * q_vectors));
    for i in range_stepped(
        UNIT_POS,
        comptime!((tile_rows * q_vectors) as u32),
        CUBE_DIM,
    ) {
        let r = i / comptime!(q_vectors as u32);
        let c = i % comptime!(q_vectors as u32);
        let row = first + select(r < count, r, 0);
        let base = row * stride + col + c * comptime!(nq as u32);
        let mut vq = Vector::<f32, NQ>::empty();
        #[unroll]
        for e in 0..nq {
            vq[e] = f32::cast_from(q[(base + comptime!(e as u32)) as usize]) * scale;
        }
        qs[i as usize] = vq;
    }
    // A tile of keys, rows `head_dim + 1` apart (an odd stride: lane `j` reading row `j` hits its own bank), and
    // of values; the plane's softmax weights.
    let key_stride = comptime!(head_dim + 1);
    let mut ks = SharedMemory::<f32>::new(comptime!(plane_width * (head_dim + 1)));
    let mut vs = SharedMemory::<f32>::new(comptime!(plane_width * head_dim));
    let mut ps = SharedMemory::<f32>::new(comptime!(tile_rows * plane_width));

    let mut maxima = Array::<f32>::new(rows);
    let mut sums = Array::<f32>::new(rows);
    let mut acc = Array::<f32>::new(comptime!(rows * lane_dims));
    #[unroll]
    for r in 0..rows {
        maxima[r] = f32::min_value();
        sums[r] = 0.0;
    }
    #[unroll]
    for i in 0..comptime!(rows * lane_dims) {
        acc[i] = 0.0;
    }

    let key_tiles = seg_len.div_ceil(comptime!(plane_width as u32));
    for t in 0..key_tiles {
        let k0 = t * comptime!(plane_width as u32);
        // Every plane is done with the previous tile (and, the first time, the queries are in place).
        sync_cube();
        for i in range_stepped(
            UNIT_POS,
            comptime!((plane_width * head_dim) as u32),
            CUBE_DIM,
        ) {
            let j = i / comptime!(head_dim as u32);
            let e = i % comptime!(head_dim as u32);
            let key = k0 + j;
            // Keys past the segment: its first row again, weighed 0 below.
            let row = seg_first + select(key < seg_len, key, 0);
            let at = (row * stride + col + e) as usize;
            ks[(j * comptime!(key_stride as u32) + e) as usize] = f32::cast_from(k[at]);
            vs[i as usize] = f32::cast_from(v[at]);
        }
        sync_cube();

        // Lane `lane` scores key `k0 + lane` against each of the plane's queries.
        let valid = k0 + lane < seg_len;
        let mut scores = Array::<f32>::new(rows);
        #[unroll]
        for r in 0..rows {
            scores[r] = 0.0;
        }
        #[unroll]
        for c in 0..q_vectors {
            let mut key = Vector::<f32, NQ>::empty();
            #[unroll]
            for e in 0..nq {
                key[e] = ks[lane as usize * key_stride + c * nq + e];
            }
            #[unroll]
            for r in 0..rows {
                let query = qs[(plane as usize * rows + r) * q_vectors + c];
                #[unroll]
                for e in 0..nq {
                    scores[r] += query[e] * key[e];
                }
            }
        }
        #[unroll]
        for r in 0..rows {
            let score = select(valid, scores[r], f32::min_value());
            let top = f32::max(maxima[r], plane_max(score));
            let weight = select(valid, f32::exp(score - top), 0.0);
            let rescale = f32::exp(maxima[r] - top);
            sums[r] = sums[r] * rescale + plane_sum(weight);
            maxima[r] = top;
            #[unroll]
            for d in 0..lane_dims {
                acc[r * lane_dims + d] *= rescale;
            }
            ps[(plane as usize * rows + r) * plane_width + lane as usize] = weight;
        }
        sync_cube();

        // Lane `lane` adds each key's value, weighed, to its dimensions of every query.
        for j in 0..comptime!(plane_width as u32) {
            let mut values = Array::<f32>::new(lane_dims);
            #[unroll]
            for d in 0..lane_dims {
                let dim = lane + comptime!((d * plane_width) as u32);
                values[d] = vs[(j * comptime!(head_dim as u32)
                    + select(dim < comptime!(head_dim as u32), dim, 0))
                    as usize];
            }
            #[unroll]
            for r in 0..rows {
                let weight = ps[(plane as usize * rows + r) * plane_width + j as usize];
                #[unroll]
                for d in 0..lane_dims {
                    acc[r * lane_dims + d] += weight * values[d];
                }
            }
        }
    }

    #[unroll]
    for r in 0..rows {
        let query = plane * comptime!(rows as u32) + comptime!(r as u32);
        if query < count {
            let row = first + query;
            let inverse = 1.0f32 / sums[r];
            #[unroll]
            for d in 0..lane_dims {
                let dim = lane + comptime!((d * plane_width) as u32);
                if dim < comptime!(head_dim as u32) {
                    out[(row * stride + col + dim) as usize] =
                        F::cast_from(acc[r * lane_dims + d] * inverse);
                }
            }
        }
    }
}
