//! Operations the forward pass is written in: matrix products over any weight type, norms,
//! RoPE, attention, SwiGLU. No knowledge of Llama 4; everything heavy goes through the
//! `Kernels` table of `ferroq_kernels` (detected once, stored in the model).

use crate::pool::{ThreadPool, Tile};
use ferroq_kernels::{BlockQ4x8, BlockQ8A, BlockQ8x8, Kernels, QK, ROWS};
use std::sync::Mutex;

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

/// Threads for the heavy ops: a pool (shared by one session's calls) and one scratch buffer per
/// pool thread. `Par::serial()` runs everything on the calling thread.
pub struct Par<'a> {
    pub pool: Option<&'a ThreadPool>,
    /// Per-thread scratch of at least [`SCRATCH_LEN`] floats.
    pub scratch: &'a [Mutex<Vec<f32>>],
}

/// Rows per task are capped so a task's output tile fits the scratch with [`TOK_BLOCK`] tokens.
pub const MAX_ROW_BLOCK: usize = 512;
/// Tokens per task in a batched product.
pub const TOK_BLOCK: usize = 64;
/// Scratch floats per thread.
pub const SCRATCH_LEN: usize = MAX_ROW_BLOCK * TOK_BLOCK;
/// Products with fewer weights than this run on the calling thread (a job costs ~µs).
const MIN_PARALLEL_WEIGHTS: usize = 1 << 15;

impl Par<'_> {
    pub fn serial() -> Par<'static> {
        Par {
            pool: None,
            scratch: &[],
        }
    }
    fn threads(&self) -> usize {
        self.pool.map_or(1, |p| p.n_threads())
    }
}

/// `y[t * ld_y + r] = Σ_k W[r][k] · x[t][k]` for `r < rows`, on one thread.
fn matmul_serial(
    kern: &Kernels,
    w: Mat,
    rows: usize,
    k: usize,
    x: &[f32],
    q8: &[BlockQ8A],
    n: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    match w {
        Mat::F32(w) => (kern.gemm_f32)(w, rows, k, &x[..n * k], n, y, ld_y),
        Mat::Bf16(w) => (kern.gemm_bf16)(w, rows, k, &x[..n * k], n, y, ld_y),
        Mat::F16(w) => (kern.gemm_f16)(w, rows, k, &x[..n * k], n, y, ld_y),
        Mat::Q4(w) => {
            assert_eq!(q8.len(), n * k / QK, "activations not quantized");
            (kern.gemm_q4x8)(w, rows, k, q8, n, y, ld_y)
        }
        Mat::Q8(w) => {
            assert_eq!(q8.len(), n * k / QK, "activations not quantized");
            (kern.gemm_q8x8)(w, rows, k, q8, n, y, ld_y)
        }
    }
}

/// Rows `r0..r1` of `w` (`k` wide); `r0` must be a multiple of 8 for the quantized types.
fn mat_rows(w: Mat<'_>, k: usize, r0: usize, r1: usize) -> Mat<'_> {
    let nb = k / QK;
    match w {
        Mat::F32(w) => Mat::F32(&w[r0 * k..r1 * k]),
        Mat::Bf16(w) => Mat::Bf16(&w[r0 * k..r1 * k]),
        Mat::F16(w) => Mat::F16(&w[r0 * k..r1 * k]),
        Mat::Q4(w) => Mat::Q4(&w[r0 / ROWS * nb..r1.div_ceil(ROWS) * nb]),
        Mat::Q8(w) => Mat::Q8(&w[r0 / ROWS * nb..r1.div_ceil(ROWS) * nb]),
    }
}

/// `y[t * ld_y + r] = Σ_k W[r][k] · x[t][k]` for `r < rows`.
///
/// With a pool, the output is cut into tiles of weight rows × tokens, one task each. Every
/// output element is computed by one kernel call in the same order whatever the tiling, so the
/// result does not depend on the thread count.
pub fn matmul(kern: &Kernels, par: &Par, w: Mat, rows: usize, a: &Act, y: &mut [f32], ld_y: usize) {
    let (k, n) = (a.k, a.n_tok);
    let threads = par.threads();
    let pool = match par.pool {
        Some(p) if threads > 1 && rows * k >= MIN_PARALLEL_WEIGHTS && rows >= 32 => p,
        _ => return matmul_serial(kern, w, rows, k, a.x, a.q8, n, y, ld_y),
    };
    // rows per task: about 4 tasks per thread, a multiple of 16 (whole 8-row groups, and no
    // false sharing of output cache lines), capped by the scratch size
    let row_block = rows
        .div_ceil(threads * 4)
        .next_multiple_of(16)
        .clamp(16, MAX_ROW_BLOCK);
    let tok_block = if n == 1 { 1 } else { TOK_BLOCK };
    let nb = k / QK;
    pool.run_tiles(
        y,
        n,
        ld_y,
        row_block,
        tok_block,
        &|mut tile: Tile, thread| {
            let (rr, tt) = (tile.rows(), tile.toks());
            if rr.start >= rows {
                return; // padding columns of y beyond `rows`
            }
            let r1 = rr.end.min(rows);
            let m = r1 - rr.start;
            let wt = mat_rows(w, k, rr.start, r1);
            let (x, q8) = (
                &a.x[tt.start * k..tt.end * k],
                if a.q8.is_empty() {
                    a.q8
                } else {
                    &a.q8[tt.start * nb..tt.end * nb]
                },
            );
            if tt.len() == 1 {
                let out = tile.out(tt.start);
                matmul_serial(kern, wt, m, k, x, q8, 1, &mut out[..m], m);
            } else {
                let mut s = par.scratch[thread]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                matmul_serial(kern, wt, m, k, x, q8, tt.len(), &mut s[..tt.len() * m], m);
                for (i, t) in tt.enumerate() {
                    tile.out(t)[..m].copy_from_slice(&s[i * m..(i + 1) * m]);
                }
            }
        },
    );
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
