//! Operations the forward pass is written in: matrix products over any weight type, norms,
//! RoPE, attention, SwiGLU. No knowledge of Llama 4; everything heavy goes through the
//! `Kernels` table of `ferroq_kernels` (detected once, stored in the model).

use crate::pool::{SharedOut, ThreadPool, Tile};
use ferroq_kernels::wtype::Registered;
use ferroq_kernels::{with_qmat, BlockQ8A, Kernels, QMat, WeightType, QK, ROWS};
use std::sync::Mutex;

/// A weight matrix `[rows, cols]` (nn.Linear layout), borrowed from the mapped model file.
#[derive(Clone, Copy, Debug)]
pub enum Mat<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
    F16(&'a [u16]),
    /// Quantized, of a registered weight type (`ferroq_kernels::wtype`): its products come
    /// from the type's entries of the kernel table.
    Q(QMat<'a>),
}

impl Mat<'_> {
    /// Whether products with this matrix use 8-bit quantized activations.
    pub fn wants_q8(&self) -> bool {
        matches!(self, Mat::Q(_))
    }
}

/// The plain product of quantized weights `w` through their type's table entry.
#[allow(clippy::too_many_arguments)]
fn gemm_q<B: WeightType>(
    kern: &Kernels,
    w: &[B],
    rows: usize,
    k: usize,
    q8: &[BlockQ8A],
    n: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    (B::gemm(kern))(w, rows, k, q8, n, y, ld_y)
}

/// The fused gate/up product of `g` and `u` (of `g`'s type: checked by the caller).
#[allow(clippy::too_many_arguments)]
fn gate_up_q<B: WeightType>(
    kern: &Kernels,
    g: &[B],
    u: QMat,
    n_rows: usize,
    k: usize,
    x_all: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    let (Some(f), Some(u)) = (B::gate_up(kern), B::of(u)) else {
        unreachable!("gate_up_serial: checked by the caller")
    };
    f(g, u, n_rows, k, x_all, rows, y, ld_y)
}

/// Whether `g` and `u` have a fused gate/up product: quantized, of one type that has one.
fn fused_gate_up(kern: &Kernels, g: Mat, u: Mat) -> bool {
    fn has<B: WeightType>(kern: &Kernels, _: &[B]) -> bool {
        B::gate_up(kern).is_some()
    }
    match (g, u) {
        (Mat::Q(g), Mat::Q(u)) => g.same_type(&u) && with_qmat!(g, g => has(kern, g)),
        _ => false,
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

impl<'a> Act<'a> {
    /// Rows (tokens) `r0..r1` of these activations, with their quantized blocks if any.
    pub fn rows(&self, r0: usize, r1: usize) -> Act<'a> {
        let nb = self.k / QK;
        Act {
            x: &self.x[r0 * self.k..r1 * self.k],
            k: self.k,
            n_tok: r1 - r0,
            q8: if self.q8.is_empty() {
                self.q8
            } else {
                &self.q8[r0 * nb..r1 * nb]
            },
        }
    }
}

/// Quantize `x [n_tok, k]` into `q8` (`n_tok * k / 32` blocks) if any of `mats` needs it.
pub fn quantize_for<'a>(
    kern: &Kernels,
    par: &Par,
    x: &[f32],
    k: usize,
    n_tok: usize,
    q8: &'a mut [BlockQ8A],
    mats: &[Mat],
) -> &'a [BlockQ8A] {
    if k.is_multiple_of(QK) && mats.iter().any(|m| m.wants_q8()) {
        let nb = k / QK;
        // rows in parallel (each block is quantized on its own: same bytes for any split)
        par_rows(par, &mut q8[..n_tok * nb], nb, QK, &|r, out| {
            (kern.quantize_q8a)(&x[r.start * k..r.end * k], out)
        });
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

/// Per-row steps with fewer elements than this run on the calling thread.
const MIN_PARALLEL_ELEMS: usize = 1 << 14;

/// Run a per-row step over `data` (rows of `row_len`) on the pool, about 4 tasks per thread, or
/// on the calling thread when it is small (`floats_per_item`: the f32 values one element of
/// `data` stands for, e.g. 32 for an activation block). `f(rows, part)` gets the rows `rows` as
/// `part`; the step must not depend on how rows are grouped (then the result is the same for
/// any split).
pub fn par_rows<T: Send>(
    par: &Par,
    data: &mut [T],
    row_len: usize,
    floats_per_item: usize,
    f: &(dyn Fn(std::ops::Range<usize>, &mut [T]) + Sync),
) {
    let n_rows = data.len() / row_len.max(1);
    let threads = par.threads();
    let big = data.len().saturating_mul(floats_per_item) >= MIN_PARALLEL_ELEMS;
    match par.pool {
        Some(pool) if threads > 1 && n_rows >= 2 && big => {
            pool.run_rows(data, row_len, n_rows.div_ceil(threads * 4), f)
        }
        _ => f(0..n_rows, data),
    }
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
#[allow(clippy::too_many_arguments)] // the kernel contract (weights, shape, activations, output) in one call
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
        Mat::Q(w) => {
            assert_eq!(q8.len(), n * k / QK, "activations not quantized");
            with_qmat!(w, w => gemm_q(kern, w, rows, k, q8, n, y, ld_y))
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
        Mat::Q(w) => {
            let (b0, b1) = (r0 / ROWS * nb, r1.div_ceil(ROWS) * nb);
            Mat::Q(with_qmat!(w, w => Registered::qmat(&w[b0..b1])))
        }
    }
}

/// Rows per task: about 4 tasks per thread, a multiple of 16 (whole 8-row groups, and no false
/// sharing of output cache lines), capped by the scratch size.
fn row_block(rows: usize, threads: usize) -> usize {
    rows.div_ceil(threads * 4)
        .next_multiple_of(16)
        .clamp(16, MAX_ROW_BLOCK)
}

fn tok_block(n: usize) -> usize {
    if n == 1 {
        1
    } else {
        TOK_BLOCK
    }
}

/// One task of a tiled product: weight rows `tile.rows()` (clipped to `rows`) × tokens
/// `tile.toks()`. With `up`, the task computes `silu(w x) · (up x)` (fused gate/up).
#[allow(clippy::too_many_arguments)]
fn tile_task(
    kern: &Kernels,
    par: &Par,
    w: Mat,
    up: Option<Mat>,
    iota: &[u32],
    rows: usize,
    a: &Act,
    mut tile: Tile,
    thread: usize,
) {
    let (rr, tt) = (tile.rows(), tile.toks());
    if rr.start >= rows {
        return; // padding columns of y beyond `rows`
    }
    let k = a.k;
    let nb = k / QK;
    let r1 = rr.end.min(rows);
    let m = r1 - rr.start;
    let wt = mat_rows(w, k, rr.start, r1);
    let ut = up.map(|u| mat_rows(u, k, rr.start, r1));
    let (x, q8) = (
        &a.x[tt.start * k..tt.end * k],
        if a.q8.is_empty() {
            a.q8
        } else {
            &a.q8[tt.start * nb..tt.end * nb]
        },
    );
    let run = |out: &mut [f32], ld: usize| match ut {
        None => matmul_serial(kern, wt, m, k, x, q8, tt.len(), out, ld),
        Some(ut) => gate_up_serial(kern, wt, ut, m, k, a.q8, &iota[tt.clone()], out, ld),
    };
    if tt.len() == 1 {
        run(&mut tile.out(tt.start)[..m], m);
    } else {
        let mut s = par.scratch[thread]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        run(&mut s[..tt.len() * m], m);
        for (i, t) in tt.enumerate() {
            tile.out(t)[..m].copy_from_slice(&s[i * m..(i + 1) * m]);
        }
    }
}

/// Fused `y = silu(G x) · (U x)` for quantized G, U (of one type) on activations `x_all` rows
/// `rows` (token indices).
#[allow(clippy::too_many_arguments)]
fn gate_up_serial(
    kern: &Kernels,
    g: Mat,
    u: Mat,
    n_rows: usize,
    k: usize,
    x_all: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    let (Mat::Q(g), Mat::Q(u)) = (g, u) else {
        unreachable!("gate_up_serial: checked by the caller")
    };
    with_qmat!(g, g => gate_up_q(kern, g, u, n_rows, k, x_all, rows, y, ld_y))
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
    pool.run_tiles(
        y,
        n,
        ld_y,
        row_block(rows, threads),
        tok_block(n),
        &|tile: Tile, thread| tile_task(kern, par, w, None, &[], rows, a, tile, thread),
    );
}

/// `N` products of the same activations in ONE pool round (q/k/v): `ys[i][t * rows[i] + r] =
/// Σ_k ws[i][r][k] · x[t][k]`. Same tiling per product as [`matmul`], so the results are
/// identical to `N` calls of it.
pub fn matmul_n<const N: usize>(
    kern: &Kernels,
    par: &Par,
    ws: [Mat; N],
    rows: [usize; N],
    a: &Act,
    ys: [&mut [f32]; N],
) {
    let (k, n) = (a.k, a.n_tok);
    let threads = par.threads();
    let total: usize = rows.iter().sum();
    let pool = match par.pool {
        Some(p) if threads > 1 && total * k >= MIN_PARALLEL_WEIGHTS => p,
        _ => {
            for (i, y) in ys.into_iter().enumerate() {
                matmul_serial(kern, ws[i], rows[i], k, a.x, a.q8, n, y, rows[i]);
            }
            return;
        }
    };
    let tb = tok_block(n);
    let n_tb = n.div_ceil(tb);
    let rbs: [usize; N] = core::array::from_fn(|i| row_block(rows[i], threads));
    let n_rbs: [usize; N] = core::array::from_fn(|i| rows[i].div_ceil(rbs[i]));
    let mut i = 0;
    let outs: [SharedOut; N] = ys.map(|y| {
        i += 1;
        SharedOut::new(y, n, rows[i - 1])
    });
    let n_tasks: usize = n_rbs.iter().map(|b| b * n_tb).sum();
    pool.run(n_tasks, &|mut task, thread| {
        let mut i = 0;
        while task >= n_rbs[i] * n_tb {
            task -= n_rbs[i] * n_tb;
            i += 1;
        }
        let (rb, t) = (task / n_tb, task % n_tb);
        let rr = rb * rbs[i]..((rb + 1) * rbs[i]).min(rows[i]);
        let toks = t * tb..((t + 1) * tb).min(n);
        // SAFETY: each task index runs once; distinct tasks of product i get disjoint
        // (rows × toks) tiles of its own output (the blocks partition rows and tokens).
        let tile = unsafe { outs[i].tile(rr, toks) };
        tile_task(kern, par, ws[i], None, &[], rows[i], a, tile, thread);
    });
}

/// SwiGLU gate/up: `y[t * inter + r] = silu((G x_t)[r]) · (U x_t)[r]`. Quantized G and U of one
/// type use the fused kernel (one pool round, both weight tiles against the activation tile
/// while it is in cache); otherwise two products and a separate SiLU. `iota` holds `0..n`.
/// `up` is scratch for the unfused path.
#[allow(clippy::too_many_arguments)]
pub fn gate_up(
    kern: &Kernels,
    par: &Par,
    wg: Mat,
    wu: Mat,
    inter: usize,
    a: &Act,
    iota: &[u32],
    y: &mut [f32],
    up: &mut [f32],
) {
    let (k, n) = (a.k, a.n_tok);
    let fused = fused_gate_up(kern, wg, wu) && !a.q8.is_empty();
    if !fused {
        matmul_n(kern, par, [wg, wu], [inter, inter], a, [&mut *y, &mut *up]);
        let (g, u) = (&mut y[..n * inter], &up[..n * inter]);
        for (gv, &uv) in g.iter_mut().zip(u) {
            *gv = ferroq_kernels::scalar::silu(*gv) * uv;
        }
        return;
    }
    let threads = par.threads();
    match par.pool {
        Some(pool) if threads > 1 && 2 * inter * k >= MIN_PARALLEL_WEIGHTS && inter >= 32 => pool
            .run_tiles(
                y,
                n,
                inter,
                row_block(inter, threads),
                tok_block(n),
                &|tile: Tile, thread| {
                    tile_task(kern, par, wg, Some(wu), iota, inter, a, tile, thread)
                },
            ),
        _ => gate_up_serial(kern, wg, wu, inter, k, a.q8, &iota[..n], y, inter),
    }
}

/// Row `row` of `w` (`cols` wide) as f32 (embedding lookup).
pub fn mat_row(w: Mat, row: usize, cols: usize, out: &mut [f32]) {
    use ferroq_kernels::scalar;
    match w {
        Mat::F32(w) => out[..cols].copy_from_slice(&w[row * cols..(row + 1) * cols]),
        Mat::Bf16(w) => scalar::bf16_to_f32(&w[row * cols..(row + 1) * cols], &mut out[..cols]),
        Mat::F16(w) => scalar::f16_to_f32(&w[row * cols..(row + 1) * cols], &mut out[..cols]),
        Mat::Q(w) => with_qmat!(w, w => WeightType::dequantize_row(w, row, cols, out)),
    }
}

/// RMSNorm of each of the `n` rows of `x` (width `w.len()`) into `out`.
#[allow(clippy::too_many_arguments)] // the kernel's arguments, plus the threads and the shape
pub fn rmsnorm_rows(
    kern: &Kernels,
    par: &Par,
    x: &[f32],
    w: Option<&[f32]>,
    eps: f32,
    width: usize,
    n: usize,
    out: &mut [f32],
) {
    par_rows(par, &mut out[..n * width], width, 1, &|r, o| {
        for (t, ot) in r.zip(o.chunks_exact_mut(width)) {
            (kern.rmsnorm)(&x[t * width..(t + 1) * width], w, eps, ot);
        }
    });
}

/// `h[i] += y[i]` for the first `n` rows of `width` (residual connections).
pub fn add_rows(par: &Par, h: &mut [f32], y: &[f32], width: usize, n: usize) {
    par_rows(par, &mut h[..n * width], width, 1, &|r, hp| {
        for (hv, &yv) in hp.iter_mut().zip(&y[r.start * width..r.end * width]) {
            *hv += yv;
        }
    });
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
            } else if hf > lf {
                // (with hf == lf, as in the current Llama 4 Scout config, there is no smooth
                // band: this branch is reached only at wl == old / lf exactly; keep it unchanged)
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
