//! The numeric kernels of the forward pass. Each output row depends only on its own input
//! row, in a fixed order of operations, so a token's result does not depend on which other
//! tokens share its batch: the property that makes a disaggregated run bit-exact with a
//! colocated one.

use crate::weights::Matrix;

/// `x · wᵀ` for `m` rows of `x` (`m × w.cols`), giving `m × w.rows`.
pub fn linear(x: &[f32], m: usize, w: &Matrix) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * w.cols);
    let mut out = vec![0.0f32; m * w.rows];
    if m == 0 {
        return out;
    }
    // SAFETY: x holds m × cols floats (row stride cols), w.data holds rows × cols floats read
    // as its transpose (row stride 1, column stride cols), and out holds m × rows floats;
    // all three live across the call and out does not alias the inputs.
    unsafe {
        matrixmultiply::sgemm(
            m,
            w.cols,
            w.rows,
            1.0,
            x.as_ptr(),
            w.cols as isize,
            1,
            w.data.as_ptr(),
            1,
            w.cols as isize,
            0.0,
            out.as_mut_ptr(),
            w.rows as isize,
            1,
        );
    }
    out
}

/// RMSNorm of each row of `x`, scaled by `weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for (row, out_row) in x
        .chunks_exact(weight.len())
        .zip(out.chunks_exact_mut(weight.len()))
    {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, v), w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    }
    out
}

/// SwiGLU: `silu(gate) * up`, in place in `gate`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Dot product with eight independent accumulators (vectorizes; the order is fixed).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, a_tail) = a.split_at(a.len() / 8 * 8);
    let (b8, b_tail) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// `acc += weight * v`.
pub fn axpy(acc: &mut [f32], weight: f32, v: &[f32]) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a += weight * x;
    }
}

/// Index of the largest value; the first one on ties (greedy sampling).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn linear_rows_do_not_depend_on_the_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let w = Matrix {
            rows: 96,
            cols: 600,
            data: random(96 * 600, &mut rng),
        };
        for m in [2, 3, 17, 64, 130] {
            let x = random(m * w.cols, &mut rng);
            let batched = linear(&x, m, &w);
            for (row, expected) in x.chunks_exact(w.cols).zip(batched.chunks_exact(w.rows)) {
                assert_eq!(linear(row, 1, &w), expected, "m = {m}");
            }
        }
    }

    #[test]
    fn linear_matches_a_naive_product() {
        let w = Matrix {
            rows: 2,
            cols: 3,
            data: vec![1.0, 2.0, 3.0, -1.0, 0.5, 0.0],
        };
        assert_eq!(linear(&[1.0, 1.0, 2.0], 1, &w), vec![9.0, -0.5]);
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, -1.0]), 1);
    }
}
