//! Operations the forward pass is written in: matrix products over any weight type, norms,
//! RoPE, attention, SwiGLU. No knowledge of Llama 4; everything heavy goes through the
//! `Kernels` table of `ferroq_kernels` (detected once, stored in the model).

use ferroq_kernels::{BlockQ4x8, BlockQ8A, BlockQ8x8, Kernels, QK};

/// A weight matrix `[rows, cols]` (nn.Linear layout), borrowed from the mapped model file.
#[derive(Clone, Copy, Debug)]
pub enum Mat<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    Q4(&'a [BlockQ4x8]),
    Q8(&'a [BlockQ8x8]),
}

impl Mat<'_> {
    /// Whether products with this matrix use 8-bit quantized activations.
    pub fn wants_q8(&self) -> bool {
        matches!(self, Mat::Q4(_) | Mat::Q8(_))
    }
}

/// Activations `[n_tok, k]` in f32, plus their 8-bit quantization when a quantized matrix
/// needs it (computed once and shared by every product with the same input, e.g. q/k/v).
pub struct Act<'a> {
    pub x: &'a [f32],
    pub k: usize,
    pub n_tok: usize,
    pub q8: &'a [BlockQ8A],
}

/// Quantize `x [n_tok, k]` into `q8` (`n_tok * k / 32` blocks) if any of `mats` needs it.
pub fn quantize_for<'a>(
    kern: &Kernels,
    x: &[f32],
    k: usize,
    n_tok: usize,
    q8: &'a mut [BlockQ8A],
    mats: &[Mat],
) -> &'a [BlockQ8A] {
    if k % QK == 0 && mats.iter().any(|m| m.wants_q8()) {
        let nb = k / QK;
        (kern.quantize_q8a)(&x[..n_tok * k], &mut q8[..n_tok * nb]);
        &q8[..n_tok * nb]
    } else {
        &q8[..0]
    }
}

/// `y[t * ld_y + r] = Σ_k W[r][k] · x[t][k]` for `r < rows`.
pub fn matmul(kern: &Kernels, w: Mat, rows: usize, a: &Act, y: &mut [f32], ld_y: usize) {
    let (k, n) = (a.k, a.n_tok);
    match w {
        Mat::F32(w) => (kern.gemm_f32)(w, rows, k, &a.x[..n * k], n, y, ld_y),
        Mat::Bf16(w) => (kern.gemm_bf16)(w, rows, k, &a.x[..n * k], n, y, ld_y),
        Mat::F16(w) => (kern.gemm_f16)(w, rows, k, &a.x[..n * k], n, y, ld_y),
        Mat::Q4(w) => {
            assert_eq!(a.q8.len(), n * k / QK, "activations not quantized");
            (kern.gemm_q4x8)(w, rows, k, a.q8, n, y, ld_y)
        }
        Mat::Q8(w) => {
            assert_eq!(a.q8.len(), n * k / QK, "activations not quantized");
            (kern.gemm_q8x8)(w, rows, k, a.q8, n, y, ld_y)
        }
    }
}

/// Row `row` of `w` (`cols` wide) as f32 (embedding lookup).
pub fn mat_row(w: Mat, row: usize, cols: usize, out: &mut [f32]) {
    use ferroq_kernels::scalar;
    match w {
        Mat::F32(w) => out[..cols].copy_from_slice(&w[row * cols..(row + 1) * cols]),
        Mat::Bf16(w) => scalar::bf16_to_f32(&w[row * cols..(row + 1) * cols], &mut out[..cols]),
        Mat::F16(w) => scalar::f16_to_f32(&w[row * cols..(row + 1) * cols], &mut out[..cols]),
        Mat::Q4(w) => scalar::dequantize_row_q4x8(w, row, cols, out),
        Mat::Q8(w) => scalar::dequantize_row_q8x8(w, row, cols, out),
    }
}

/// RMSNorm of each of the `n` rows of `x` (width `w.len()`) into `out`.
pub fn rmsnorm_rows(
    kern: &Kernels,
    x: &[f32],
    w: Option<&[f32]>,
    eps: f32,
    width: usize,
    n: usize,
    out: &mut [f32],
) {
    for t in 0..n {
        (kern.rmsnorm)(
            &x[t * width..(t + 1) * width],
            w,
            eps,
            &mut out[t * width..(t + 1) * width],
        );
    }
}

/// Inverse RoPE frequencies, with optional Llama 3 scaling (HF `_compute_llama3_parameters`,
/// written as if/elif/else so `low_freq_factor == high_freq_factor` cannot divide by zero).
pub fn rope_inv_freq(theta: f32, dim: usize, llama3: Option<(f32, f32, f32, f32)>) -> Vec<f32> {
    let half = dim / 2;
    let mut inv: Vec<f32> = (0..half)
        .map(|j| {
            // HF: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), computed in f32
            let e = (2 * j) as f32 / dim as f32;
            1.0 / theta.powf(e)
        })
        .collect();
    if let Some((factor, lf, hf, old)) = llama3 {
        let low_wl = old / lf;
        let high_wl = old / hf;
        for f in inv.iter_mut() {
            let wl = 2.0 * std::f32::consts::PI / *f;
            if wl < high_wl {
                // high frequency: unchanged
            } else if wl > low_wl {
                *f /= factor;
            } else {
                let s = (old / wl - lf) / (hf - lf);
                *f = (1.0 - s) * *f / factor + s * *f;
            }
        }
    }
    inv
}

/// cos/sin of `pos * inv_freq[j]` (angle formed as an f32 product, like HF).
pub fn rope_cos_sin(inv_freq: &[f32], pos: usize, cos: &mut [f32], sin: &mut [f32]) {
    let p = pos as f32;
    for (j, &f) in inv_freq.iter().enumerate() {
        let a = p * f;
        cos[j] = a.cos();
        sin[j] = a.sin();
    }
}
