//! Plain host implementations of what the kernels compute, for tests and for the CPU path.

use medvl_nf4::Nf4Tensor;

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
