//! Attention within the segments of a packed sequence (the vision tower's windows and whole images) against the
//! host reference: segments shorter than a key tile, empty ones, one longer than several query and key tiles, a
//! head dimension that is not a multiple of the plane width (the vision tower's 80); the tile table worked by
//! hand; the launch's refusals.
//!
//! Runs through wgpu (CI: lavapipe, f32) and, `--ignored`, on CUDA in f32 and bf16.
#![allow(clippy::unwrap_used, missing_docs)]

use cubecl::prelude::*;
use medvl_kernels::nf4::Activation;
use medvl_kernels::segments::{self, QUERIES_PER_CUBE, QueryTiles};
use medvl_kernels::{Buffer, reference};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Values in `[-range, range)`, as stored in `F`.
fn random<F: Activation>(n: usize, range: f32, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| F::from_host(rng.random_range(-range..range)).to_host())
        .collect()
}

fn upload<R: Runtime, F: Activation>(client: &ComputeClient<R>, values: &[f32]) -> Buffer<F> {
    let converted: Vec<F> = values.iter().map(|&v| F::from_host(v)).collect();
    Buffer::from_slice(client, &converted)
}

/// Segments of 5, 0, 64 (a full vision window), 33, 1 and 300 rows (10 key tiles, 10 query tiles); every output
/// within `tolerance` of the f64 reference. Queries and keys up to 2 in magnitude make the scores span a few
/// units, so that the softmax is far from uniform.
fn segments_as_the_host<R: Runtime, F: Activation>(
    client: &ComputeClient<R>,
    heads: usize,
    head_dim: usize,
    tolerance: f32,
) {
    let cu = [0, 5, 5, 69, 102, 103, 403];
    let seq = *cu.last().unwrap();
    let n = seq * heads * head_dim;
    let (q, k, v) = (
        random::<F>(n, 2.0, 1),
        random::<F>(n, 2.0, 2),
        random::<F>(n, 1.0, 3),
    );
    let scale = 1.0 / (head_dim as f32).sqrt();
    let expected = reference::segment_attention((&q, &k, &v), &cu, heads, head_dim, scale);
    let tiles = QueryTiles::new(&cu).unwrap();
    assert_eq!(tiles.seq(), seq);
    let table = Buffer::from_slice(client, tiles.table());
    let out = Buffer::<F>::empty(client, n);
    segments::segment_attention(
        client,
        (
            &upload::<R, F>(client, &q),
            &upload::<R, F>(client, &k),
            &upload::<R, F>(client, &v),
        ),
        &table,
        seq,
        heads,
        head_dim,
        scale,
        &out,
    )
    .unwrap();
    let got: Vec<f32> = out
        .read(client)
        .unwrap()
        .into_iter()
        .map(F::to_host)
        .collect();
    let mut worst = (0.0f32, 0);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        let err = (g - e).abs();
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tolerance,
        "{heads} heads of {head_dim}: value {} is {} against {} (error {})",
        worst.1,
        got[worst.1],
        expected[worst.1],
        worst.0
    );
}

/// The launch refuses an odd head dimension, buffers smaller than the sequence and a table that is not whole tiles.
fn refusals<R: Runtime>(client: &ComputeClient<R>) {
    let tiles = Buffer::from_slice(client, QueryTiles::new(&[0, 4]).unwrap().table());
    let x = Buffer::<f32>::empty(client, 4 * 2 * 6);
    let run = |head_dim: usize, seq: usize, tiles: &Buffer<u32>| {
        segments::segment_attention(client, (&x, &x, &x), tiles, seq, 2, head_dim, 1.0, &x)
            .err()
            .unwrap()
            .to_string()
    };
    assert!(run(3, 4, &tiles).contains("head dimension 3"));
    assert!(run(6, 5, &tiles).contains("the launch needs 60"));
    let ragged = Buffer::from_slice(client, &[0u32, 4, 0]);
    assert!(run(6, 4, &ragged).contains("four per tile"));
}

#[test]
fn query_tiles_worked_by_hand() {
    // Segments of 3, 0 and QUERIES_PER_CUBE + 2 rows: one tile, none, two.
    let q = QUERIES_PER_CUBE as u32;
    let tiles = QueryTiles::new(&[0, 3, 3, 3 + QUERIES_PER_CUBE + 2]).unwrap();
    assert_eq!(
        tiles.table(),
        &[0, 3, 0, 3, 3, q, 3, q + 2, 3 + q, 2, 3, q + 2]
    );
    assert_eq!(tiles.len(), 3);
    assert_eq!(tiles.seq(), 5 + QUERIES_PER_CUBE);
    assert!(QueryTiles::new(&[]).unwrap().is_empty());
    let err = QueryTiles::new(&[0, 5, 4]).unwrap_err().to_string();
    assert!(err.contains("decrease (5 then 4)"), "{err}");
    let err = QueryTiles::new(&[1, 5]).unwrap_err().to_string();
    assert!(err.contains("start at 1"), "{err}");
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    fn client() -> ComputeClient<WgpuRuntime> {
        WgpuRuntime::client(&WgpuDevice::default())
    }

    #[test]
    fn segments_as_the_host_f32() {
        let c = client();
        // The vision tower's head dimension, and one of exactly a plane width.
        segments_as_the_host::<WgpuRuntime, f32>(&c, 3, 80, 1e-5);
        segments_as_the_host::<WgpuRuntime, f32>(&c, 2, 32, 1e-5);
        refusals(&c);
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use cubecl::cuda::{CudaDevice, CudaRuntime};
    use half::bf16;

    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn segments_on_cuda() {
        let c = CudaRuntime::client(&CudaDevice::default());
        segments_as_the_host::<CudaRuntime, f32>(&c, 3, 80, 1e-5);
        segments_as_the_host::<CudaRuntime, f32>(&c, 2, 32, 1e-5);
        // One bf16 rounding of an output below 1 in magnitude.
        segments_as_the_host::<CudaRuntime, bf16>(&c, 16, 80, 1.0 / 128.0);
        refusals(&c);
    }
}
