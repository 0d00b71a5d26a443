//! Scalar reference kernels: the specification every SIMD tier is tested against.
//!
//! Written as plain loops with one comment per step. Never delete a twin: the converter quantizes
//! with these functions and every tier's tests compare against them.

use crate::block::{
    q4_pos, q6_get, q6_pos, q8_pos, BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, KVALUES, QK, ROWS,
};
use half::{bf16, f16};

// ---------------------------------------------------------------------------------------------
// Activation quantization
// ---------------------------------------------------------------------------------------------

/// Quantize `x` (length a multiple of 32) into int8 blocks.
///
/// `d = amax / 127`, `q = round_ties_even(x * 127 / amax)`; an all-zero block gets `d = 0`.
pub fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    assert_eq!(x.len() % QK, 0);
    assert!(out.len() >= x.len() / QK);
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        // 1. absolute maximum of the block
        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        // 2. scale and its inverse
        let d = amax / 127.0;
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        // 3. round each value to the nearest int8 and keep the sum
        let mut sum = 0i32;
        for (q, &v) in ob.qs.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even() as i32;
            *q = r.clamp(-127, 127) as i8;
            sum += *q as i32;
        }
        ob.d = d;
        ob.sum8 = 8 * sum;
    }
}

// ---------------------------------------------------------------------------------------------
// Weight quantization (converter side)
// ---------------------------------------------------------------------------------------------

/// `v.round_ties_even()` without the call to libm's `rintf` that baseline x86-64 (no SSE4.1)
/// compiles it to: adding and subtracting 2²³ (with the sign of `v`) rounds to the nearest
/// integer, ties to even, for `|v| < 2²³`; larger values are integers already (and infinities
/// and NaN pass through). The same value, except that it may return `+0.0` where
/// `round_ties_even` returns `−0.0`. Branch-free, so loops of it vectorize.
#[inline(always)]
pub fn rint(v: f32) -> f32 {
    let m = 8_388_608.0f32.copysign(v);
    let r = (v + m) - m;
    if v.abs() < 8_388_608.0 {
        r
    } else {
        v
    }
}

/// Midpoints between consecutive levels: level `i` is nearest for values in
/// `(mid[i-1], mid[i]]`.
const fn mids(levels: &[i8; 16]) -> [f32; 15] {
    let mut m = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        m[i] = (levels[i] as f32 + levels[i + 1] as f32) * 0.5;
        i += 1;
    }
    m
}

/// Index of the level of `levels` nearest to `v` (in level units); ties go to the lower
/// level. The reference [`LevelSearch::nearest`] is tested against.
pub fn nearest_level(levels: &[i8; 16], v: f32) -> usize {
    mids(levels).partition_point(|&m| m < v)
}

/// Quantize 32 weights to the 4-bit codebook with the scale that minimises the squared error.
/// Returns `(d, q)` with `d` already rounded to f16. Same as [`quantize_block_q4_weighted`]
/// with every weight of importance 1.
pub fn quantize_block_q4(x: &[f32]) -> (f16, [u8; QK]) {
    quantize_block_q4_weighted(x, &[1.0; QK])
}

/// Quantize 32 weights to the 4-bit codebook minimising the importance-weighted squared error
/// `Σ w[k] (x[k] − d·KVALUES[q[k]])²` (`w[k] ≥ 0`; all zero means uniform).
///
/// The scale search is [`LevelSearch::quantize`]'s (a window of candidate scales around the
/// one that puts the block's extreme on the outermost level, each scored with its
/// least-squares scale); [`quantize_block_levels_exhaustive`] is the exhaustive search it is
/// measured against.
pub fn quantize_block_q4_weighted(x: &[f32], w: &[f32]) -> (f16, [u8; QK]) {
    quantize_block_levels(&KVALUES, x, w)
}

/// The window of inverse scales [`LevelSearch::quantize`] searches, relative to `t_edge` (the
/// inverse scale at which the first of the block's two extremes reaches its outermost level).
/// Measured on SmolLM2-135M's matrices (`convert/benches/quant_search.rs`, `docs/quantization.md`):
/// the total weighted error is 1.00003× the exhaustive search's with (0.7, 1.3), 1.00035×
/// with (0.8, 1.2) (codebook; linear 1.000004× and 1.00015×).
pub const SCALE_WINDOW: (f32, f32) = (0.70, 1.30);
/// Candidate inverse scales per sign in [`SCALE_WINDOW`] (evenly spaced).
pub const SCALE_CANDIDATES: usize = 32;

/// [`quantize_block_q4_weighted`] for any 16 levels (level 8 the one nearest zero): the
/// quantizer of every [`Q4Block`] type. [`LevelSearch::quantize`] with the levels prepared
/// for one block; to quantize many blocks, prepare them once.
pub fn quantize_block_levels(levels: &[i8; 16], x: &[f32], w: &[f32]) -> (f16, [u8; QK]) {
    LevelSearch::new(levels).quantize(x, w)
}

/// `v ∈ [(i − LUT_OFF)/2, (i − LUT_OFF + 1)/2)` reads its nearest level at `lut[i]`.
const LUT_OFF: usize = 2 * 128 + 4;
const LUT_LEN: usize = 2 * LUT_OFF;

/// The 4-bit scale search of one set of 16 levels, prepared once for many blocks: the
/// levels and their squares as f32, their midpoints, the change of both at each midpoint, and
/// a table of the nearest level per half unit.
#[derive(Clone, Debug)]
pub struct LevelSearch {
    mid: [f32; 15],
    lv: [f32; 16],
    /// `lv[j + 1] − lv[j]` and `lv[j + 1]² − lv[j]²`: the change crossing `mid[j]` upwards.
    dl: [f32; 15],
    dl2: [f32; 15],
    top: f32,
    bottom: f32,
    lut: [u8; LUT_LEN],
}

impl LevelSearch {
    /// Prepare the search for `levels` (increasing; level 8 the one nearest zero).
    pub fn new(levels: &[i8; 16]) -> LevelSearch {
        let mid = mids(levels);
        let lv = levels.map(|l| l as f32);
        let mut dl = [0.0f32; 15];
        let mut dl2 = [0.0f32; 15];
        for j in 0..15 {
            dl[j] = lv[j + 1] - lv[j];
            dl2[j] = lv[j + 1] * lv[j + 1] - lv[j] * lv[j];
        }
        // the midpoints of integer levels are multiples of 1/2: a half-unit cell never
        // straddles one, so its level is that of its lower end (a tie goes up, not down)
        let mut lut = [0u8; LUT_LEN];
        for (i, l) in lut.iter_mut().enumerate() {
            let v = (i as f32 - LUT_OFF as f32) * 0.5;
            *l = mid.iter().filter(|&&m| m <= v).count() as u8;
        }
        LevelSearch {
            mid,
            lv,
            dl,
            dl2,
            top: lv[15],
            bottom: -lv[0],
            lut,
        }
    }

    /// The index of the level nearest to `v` (in level units): [`nearest_level`] but for
    /// exact ties, which may go up; NaN gives level 0.
    #[inline(always)]
    pub fn nearest(&self, v: f32) -> usize {
        // floor(2v) + LUT_OFF as round(2v + LUT_OFF − 1/2) (they differ only where 2v is an
        // integer: a cell boundary, where both cells hold the same level or v is a tie), by
        // adding 2²³ (cheaper than a saturating float-to-int conversion); clamped first, so
        // NaN and far values land on the table's ends (`max` first: it maps NaN to 0)
        let i = (2.0 * v + (LUT_OFF as f32 - 0.5))
            .max(0.0)
            .min((LUT_LEN - 1) as f32);
        self.lut[((i + 8_388_608.0).to_bits() & 0x7F_FFFF) as usize] as usize
    }

    /// Quantize 32 weights minimising `Σ w[k] (x[k] − d·L[q[k]])²` (`w[k] ≥ 0`; all zero
    /// means uniform) over [`SCALE_CANDIDATES`] inverse scales `t` per sign of `d`, evenly
    /// spaced in `[SCALE_WINDOW.0, SCALE_WINDOW.1] · t_edge` (`t_edge` puts the first of the
    /// block's two extremes on its outermost level), each assignment (the nearest level of
    /// every `x[k]·t`) scored with its least-squares scale. The best scale is rounded to f16
    /// and the levels reassigned with that exact scale.
    ///
    /// Only the first assignment of a window is computed from scratch: as `t` grows, the
    /// level of `x[k]·t` changes only where it crosses a midpoint, at `t = mid / x[k]`; each
    /// crossing inside the window adds its change of `Σwxv` and `Σwv²` to the candidate at or
    /// after it (a counting sort, about one crossing per weight), and one pass over the
    /// candidates scores them. Measured against [`quantize_block_levels_exhaustive`] (the sweep
    /// over every crossing of every scale) in `docs/quantization.md`.
    pub fn quantize(&self, x: &[f32], w: &[f32]) -> (f16, [u8; QK]) {
        self.quantize_grid(x, w, SCALE_WINDOW, SCALE_CANDIDATES)
    }

    /// [`LevelSearch::quantize`] with its window and candidate count as parameters (for
    /// measuring them; `2 ≤ g ≤ 256`).
    pub fn quantize_grid(
        &self,
        x: &[f32],
        w: &[f32],
        window: (f32, f32),
        g: usize,
    ) -> (f16, [u8; QK]) {
        let x: &[f32; QK] = x.try_into().expect("a block is 32 values");
        let w: &[f32; QK] = w.try_into().expect("a block has 32 weights");
        let g = g.clamp(2, 256);
        // 1. degenerate blocks
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 || !amax.is_finite() {
            return (f16::ZERO, [8; QK]);
        }
        let w = if w.iter().any(|&v| v > 0.0) {
            w
        } else {
            &[1.0; QK]
        };
        let (pmax, nmax) = x
            .iter()
            .fold((0.0f32, 0.0f32), |(p, n), &v| (p.max(v), n.max(-v)));
        let mut best = (f32::NEG_INFINITY, 0.0f32);
        let (mut dxv, mut dvv) = ([0.0f32; 256], [0.0f32; 256]);
        let edge_of = |s: f32| {
            let (p, n) = if s > 0.0 { (pmax, nmax) } else { (nmax, pmax) };
            let tp = if p > 0.0 { self.top / p } else { f32::INFINITY };
            let tn = if n > 0.0 {
                self.bottom / n
            } else {
                f32::INFINITY
            };
            tp.min(tn)
        };
        for s in [1.0f32, -1.0] {
            // 2. the window of this sign
            let edge = edge_of(s);
            let (t0, t1) = (window.0 * edge, window.1 * edge);
            let istep = (g - 1) as f32 / (t1 - t0);
            // 3. the sums at t0 (eight lanes, so they vectorize), and each crossing's change
            //    added to the first candidate after it: candidate c is t0 + c·(t1 − t0)/(g − 1)
            let mut y = [0.0f32; QK];
            let (mut la, mut lb) = ([0u8; QK], [0u8; QK]);
            for k in 0..QK {
                y[k] = s * x[k];
                la[k] = self.nearest(y[k] * t0) as u8;
                lb[k] = self.nearest(y[k] * t1) as u8;
            }
            let (mut axv, mut avv) = ([0.0f32; 8], [0.0f32; 8]);
            for k in 0..QK {
                let v = self.lv[la[k] as usize];
                axv[k % 8] += w[k] * y[k] * v;
                avv[k % 8] += w[k] * v * v;
            }
            dxv[..g].fill(0.0);
            dvv[..g].fill(0.0);
            let gmax = (g - 1) as f32;
            for k in 0..QK {
                let (a, b) = (la[k] as usize, lb[k] as usize);
                if a == b {
                    continue;
                }
                let iy = istep / y[k];
                let c0 = t0 * istep;
                let (wy, wk) = (w[k] * y[k], w[k]);
                let (lo, hi, sign) = if b > a { (a, b, 1.0) } else { (b, a, -1.0) };
                let (wy, wk) = (sign * wy, sign * wk);
                for j in lo..hi {
                    let f = (self.mid[j] * iy - c0).max(0.0).min(gmax);
                    // round(f + 1/2): the candidate at or after the crossing
                    let c = (((f + 0.5 + 8_388_608.0).to_bits() & 0x7F_FFFF) as usize).min(g - 1);
                    dxv[c] += wy * self.dl[j];
                    dvv[c] += wk * self.dl2[j];
                }
            }
            let mut sxv = axv.iter().sum::<f32>();
            let mut svv = avv.iter().sum::<f32>();
            // 4. score every candidate with its least-squares scale: the error is
            //    Σwx² − sxv²/svv, so the best has the largest sxv²/svv (compared without
            //    dividing: sxv²·svv_best > sxv_best²·svv)
            let (mut bn, mut bd, mut bx) = (0.0f32, 1.0f32, 0.0f32);
            for c in 0..g {
                sxv += dxv[c];
                svv += dvv[c];
                if svv > 0.0 && sxv * sxv * bd > bn * svv {
                    (bn, bd, bx) = (sxv * sxv, svv, sxv);
                }
            }
            if bn > 0.0 && bn / bd > best.0 {
                best = (bn / bd, s * bx / bd);
            }
        }
        self.finish(x, best.1)
    }

    /// Round the chosen scale to f16 and assign the final levels with that exact scale.
    #[inline(always)]
    fn finish(&self, x: &[f32; QK], scale: f32) -> (f16, [u8; QK]) {
        let d = f16::from_f32(scale);
        let df = d.to_f32();
        if df == 0.0 || !df.is_finite() {
            return (f16::ZERO, [8; QK]);
        }
        let id = 1.0 / df;
        let mut q = [8u8; QK];
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = self.nearest(v * id) as u8;
        }
        (d, q)
    }
}

/// The exhaustive scale search (the converter's until the windowed [`LevelSearch`]): as the
/// inverse scale `t` grows from 0 (for each sign of `d`), the nearest-level assignment of
/// `x[k]·t` only changes where `x[k]·t` crosses one of the 15 midpoints. Those at most
/// 2 × 32 × 8 crossings are sorted and swept, updating `Σwxv` and `Σwv²` by one level at a
/// time, and every assignment is scored with its least-squares scale (`d = Σwxv / Σwv²`,
/// error `Σwx² − (Σwxv)²/Σwv²`). The best scale is rounded to f16 and the levels reassigned
/// with that exact scale. About 7× slower than [`LevelSearch::quantize`] for a weighted error
/// a few parts in 10⁵ (SmolLM2) to 10⁴ (Gaussian) lower: the reference it is measured against
/// (`convert/benches/quant_search.rs`, `kernels/tests/quant_search.rs`).
pub fn quantize_block_levels_exhaustive(
    levels: &[i8; 16],
    x: &[f32],
    w: &[f32],
) -> (f16, [u8; QK]) {
    debug_assert_eq!(x.len(), QK);
    debug_assert_eq!(w.len(), QK);
    // 1. degenerate blocks
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 || !amax.is_finite() {
        return (f16::ZERO, [8; QK]);
    }
    let mid = mids(levels);
    let uniform = [1.0f32; QK];
    let w = if w.iter().any(|&v| v > 0.0) {
        w
    } else {
        &uniform[..]
    };
    // 2. sweep the crossings of each sign; an event key is (t as f32 bits, k, up) packed in a
    //    u64 (t > 0, so its bits sort like the value)
    let mut best = (f32::NEG_INFINITY, 0.0f32);
    let mut ev = [0u64; QK * 8];
    for s in [1.0f32, -1.0] {
        let mut n = 0;
        let (mut sxv, mut svv) = (0.0f32, 0.0f32);
        let mut lv = [8u8; QK];
        let l0 = levels[8] as f32;
        for k in 0..QK {
            let y = s * x[k];
            sxv += w[k] * y * l0;
            svv += w[k] * l0 * l0;
            // crossings outward from level 8: up through mid[8..15] or down through mid[0..8]
            let (mids, up) = if y > 0.0 {
                (&mid[8..15], 1u64)
            } else if y < 0.0 {
                (&mid[0..8], 0u64)
            } else {
                continue;
            };
            let iy = 1.0 / y;
            for &m in mids {
                ev[n] = ((m * iy).to_bits() as u64) << 32 | (k as u64) << 1 | up;
                n += 1;
            }
        }
        let ev = &mut ev[..n];
        ev.sort_unstable();
        for (j, &e) in ev.iter().enumerate() {
            let k = ((e >> 1) & 0xFF) as usize;
            let y = s * x[k];
            let old = levels[lv[k] as usize] as f32;
            lv[k] = if e & 1 == 1 { lv[k] + 1 } else { lv[k] - 1 };
            let new = levels[lv[k] as usize] as f32;
            sxv += w[k] * y * (new - old);
            svv += w[k] * (new * new - old * old);
            // score once all crossings at the same t are applied
            if j + 1 < ev.len() && ev[j + 1] >> 32 == e >> 32 {
                continue;
            }
            if svv > 0.0 && sxv * sxv / svv > best.0 {
                best = (sxv * sxv / svv, s * sxv / svv);
            }
        }
    }
    // 3. round the scale to f16 and assign the final levels with that exact scale
    let d = f16::from_f32(best.1);
    let df = d.to_f32();
    if df == 0.0 || !df.is_finite() {
        return (f16::ZERO, [8; QK]);
    }
    let id = 1.0 / df;
    let mut q = [8u8; QK];
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = mid.partition_point(|&m| m < v * id) as u8;
    }
    (d, q)
}

/// Quantize a row-major `rows × cols` f32 matrix into `Q4x8` blocks (`cols % 32 == 0`).
/// `out` must hold `row_groups(rows) * cols / 32` blocks. Rows past `rows` get zero scales.
/// Also for the linear type: any [`Q4Block`] (its levels decide the grid).
pub fn quantize_q4x8<B: Q4Block>(w: &[f32], rows: usize, cols: usize, out: &mut [B]) {
    quantize_q4x8_weighted(w, rows, cols, None, out)
}

/// [`quantize_q4x8`] minimising the error weighted by a per-column importance `col_w[cols]`
/// (e.g. the expected square of each input activation); `None` is uniform.
pub fn quantize_q4x8_weighted<B: Q4Block>(
    w: &[f32],
    rows: usize,
    cols: usize,
    col_w: Option<&[f32]>,
    out: &mut [B],
) {
    quantize_q4x8_by(w, rows, cols, col_w, out, |_, c, ww| ww.copy_from_slice(c))
}

/// The converter's 4-bit quantizer: [`quantize_q4x8`] minimising `Σ w_k (x_k − d·L[q_k])²`
/// with `w_k = a_k · sqrt(σ² + x_k²)`, `σ²` the block's mean square and `a_k` the column's
/// importance `col_w` (an imatrix's mean squared activation; `None` = 1). The `sqrt(σ² + x²)`
/// factor (ggml's) favours the large weights a little; measured on SmolLM2 `q4l` (see
/// `docs/quantization.md`) it is as good as uniform weights without an imatrix, and both beat
/// an activation-free column proxy and round-to-nearest.
pub fn quantize_q4x8_importance<B: Q4Block>(
    w: &[f32],
    rows: usize,
    cols: usize,
    col_w: Option<&[f32]>,
    out: &mut [B],
) {
    quantize_q4x8_by(w, rows, cols, col_w, out, |x, a, ww| {
        let s2 = x.iter().map(|v| v * v).sum::<f32>() / QK as f32;
        for ((o, &v), &ak) in ww.iter_mut().zip(x).zip(a) {
            *o = ak * (s2 + v * v).sqrt();
        }
    })
}

/// The row-group loop of the 4-bit quantizers; `weights(x, col_w, w)` fills the 32 weights of
/// a block from its values and its columns' importance.
fn quantize_q4x8_by<B: Q4Block>(
    w: &[f32],
    rows: usize,
    cols: usize,
    col_w: Option<&[f32]>,
    out: &mut [B],
    weights: impl Fn(&[f32], &[f32], &mut [f32; QK]),
) {
    assert_eq!(cols % QK, 0);
    assert_eq!(w.len(), rows * cols);
    if let Some(cw) = col_w {
        assert_eq!(cw.len(), cols);
    }
    let nb = cols / QK;
    assert!(out.len() >= rows.div_ceil(ROWS) * nb);
    let uniform = [1.0f32; QK];
    let mut ww = [0f32; QK];
    let search = LevelSearch::new(&B::LEVELS);
    for (g, group) in out.chunks_mut(nb).take(rows.div_ceil(ROWS)).enumerate() {
        for (b, blk) in group.iter_mut().enumerate() {
            let (mut bd, mut bqs) = ([0u16; ROWS], [0x88u8; 128]);
            let cw = col_w.map_or(&uniform[..], |c| &c[b * QK..(b + 1) * QK]);
            for (r, bd_r) in bd.iter_mut().enumerate() {
                let row = g * ROWS + r;
                if row >= rows {
                    continue;
                }
                let x = &w[row * cols + b * QK..row * cols + (b + 1) * QK];
                weights(x, cw, &mut ww);
                let (d, q) = search.quantize(x, &ww);
                *bd_r = d.to_bits();
                for (k, &qk) in q.iter().enumerate() {
                    let (i, hi) = q4_pos(r, k);
                    if hi {
                        bqs[i] = (bqs[i] & 0x0F) | (qk << 4);
                    } else {
                        bqs[i] = (bqs[i] & 0xF0) | qk;
                    }
                }
            }
            *blk = B::from_parts(bd, bqs);
        }
    }
}

/// Quantize a row-major `rows × cols` f32 matrix into `Q8x8` blocks (`cols % 32 == 0`).
pub fn quantize_q8x8(w: &[f32], rows: usize, cols: usize, out: &mut [BlockQ8x8]) {
    assert_eq!(cols % QK, 0);
    assert_eq!(w.len(), rows * cols);
    let nb = cols / QK;
    assert!(out.len() >= rows.div_ceil(ROWS) * nb);
    for (g, group) in out.chunks_mut(nb).take(rows.div_ceil(ROWS)).enumerate() {
        for (b, blk) in group.iter_mut().enumerate() {
            *blk = BlockQ8x8 {
                d: [0; ROWS],
                qs: [0; 256],
            };
            for r in 0..ROWS {
                let row = g * ROWS + r;
                if row >= rows {
                    continue;
                }
                let x = &w[row * cols + b * QK..row * cols + (b + 1) * QK];
                // 1. scale from the absolute maximum, rounded to f16
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = f16::from_f32(amax / 127.0);
                let df = d.to_f32();
                blk.d[r] = d.to_bits();
                if df == 0.0 || !df.is_finite() {
                    blk.d[r] = 0;
                    continue;
                }
                // 2. round with the stored scale
                for (k, &v) in x.iter().enumerate() {
                    blk.qs[q8_pos(r, k)] = rint(v / df).clamp(-127.0, 127.0) as i8;
                }
            }
        }
    }
}

/// Quantize 32 weights to the 64 linear levels `q ∈ −32..=31` of `Q6x8`, minimising the
/// squared error `Σ (x[k] − d·q[k])²`. Returns `(d, u)` with `u = q + 32` and `d` rounded to
/// f16. (No importance weighting: the 6-bit type holds the output and embedding tables, where
/// weighting by the final norm was measured no better, see `docs/performance.md`.)
///
/// A short scale search: inverse scales that put the largest-magnitude value `m` at
/// `−(32 + i/10)` or `+(31 + i/10)` for `i ∈ −6..=6`; each rounding is scored with its
/// least-squares scale (`Σxq / Σq²`, error `Σx² − (Σxq)²/Σq²`). The best scale is rounded to
/// f16 and the values are rounded again with that exact scale.
pub fn quantize_block_q6(x: &[f32]) -> (f16, [u8; QK]) {
    debug_assert_eq!(x.len(), QK);
    // 1. degenerate blocks
    let m = x
        .iter()
        .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if m == 0.0 || !m.is_finite() || x.iter().any(|v| !v.is_finite()) {
        return (f16::ZERO, [32; QK]);
    }
    // 2. candidate inverse scales, each scored with its least-squares scale
    let mut best = (f32::NEG_INFINITY, 0.0f32);
    for base in [-32.0f32, 31.0] {
        for i in -6..=6 {
            let t = (base + base.signum() * i as f32 * 0.1) / m;
            // eight lanes of partial sums, so the loop vectorizes
            let (mut axq, mut aqq) = ([0.0f32; 8], [0.0f32; 8]);
            for xs in x.chunks_exact(8) {
                for ((&v, a), b) in xs.iter().zip(&mut axq).zip(&mut aqq) {
                    let q = rint(v * t).clamp(-32.0, 31.0);
                    *a += v * q;
                    *b += q * q;
                }
            }
            let (sxq, sqq) = (axq.iter().sum::<f32>(), aqq.iter().sum::<f32>());
            if sqq > 0.0 && sxq * sxq / sqq > best.0 {
                best = (sxq * sxq / sqq, sxq / sqq);
            }
        }
    }
    // 3. round the scale to f16 and the values with that exact scale
    let d = f16::from_f32(best.1);
    let df = d.to_f32();
    if df == 0.0 || !df.is_finite() {
        return (f16::ZERO, [32; QK]);
    }
    let mut u = [32u8; QK];
    for (ui, &v) in u.iter_mut().zip(x) {
        *ui = (rint(v / df).clamp(-32.0, 31.0) + 32.0) as u8;
    }
    (d, u)
}

/// Quantize a row-major `rows × cols` f32 matrix into `Q6x8` blocks (`cols % 32 == 0`).
/// `out` must hold `row_groups(rows) * cols / 32` blocks. Rows past `rows` get zero scales.
pub fn quantize_q6x8(w: &[f32], rows: usize, cols: usize, out: &mut [BlockQ6x8]) {
    assert_eq!(cols % QK, 0);
    assert_eq!(w.len(), rows * cols);
    let nb = cols / QK;
    assert!(out.len() >= rows.div_ceil(ROWS) * nb);
    for (g, group) in out.chunks_mut(nb).take(rows.div_ceil(ROWS)).enumerate() {
        for (b, blk) in group.iter_mut().enumerate() {
            // padding rows: zero scale, u = 32 (weight 0)
            *blk = BlockQ6x8 {
                d: [0; ROWS],
                ql: [0; 128],
                qh: [0xAA; 64],
            };
            for r in 0..ROWS {
                let row = g * ROWS + r;
                if row >= rows {
                    continue;
                }
                let x = &w[row * cols + b * QK..row * cols + (b + 1) * QK];
                let (d, u) = quantize_block_q6(x);
                blk.d[r] = d.to_bits();
                for (k, &uk) in u.iter().enumerate() {
                    let (il, hi, ih, sh) = q6_pos(r, k);
                    if hi {
                        blk.ql[il] = (blk.ql[il] & 0x0F) | (uk & 15) << 4;
                    } else {
                        blk.ql[il] = (blk.ql[il] & 0xF0) | (uk & 15);
                    }
                    blk.qh[ih] = (blk.qh[ih] & !(3 << sh)) | (uk >> 4) << sh;
                }
            }
        }
    }
}

/// Dequantize row `row` of a `Q6x8` matrix with `cols` columns into `out[..cols]`.
pub fn dequantize_row_q6x8(w: &[BlockQ6x8], row: usize, cols: usize, out: &mut [f32]) {
    let nb = cols / QK;
    let (g, r) = (row / ROWS, row % ROWS);
    for b in 0..nb {
        let blk = &w[g * nb + b];
        let d = f16::from_bits(blk.d[r]).to_f32();
        for k in 0..QK {
            out[b * QK + k] = d * (q6_get(blk, r, k) as i32 - 32) as f32;
        }
    }
}

/// Dequantize row `row` of a `Q4x8` matrix with `cols` columns into `out[..cols]`.
/// Any [`Q4Block`] type.
pub fn dequantize_row_q4x8<B: Q4Block>(w: &[B], row: usize, cols: usize, out: &mut [f32]) {
    let nb = cols / QK;
    let (g, r) = (row / ROWS, row % ROWS);
    for b in 0..nb {
        let blk = &w[g * nb + b];
        let d = f16::from_bits(blk.d()[r]).to_f32();
        for k in 0..QK {
            let (i, hi) = q4_pos(r, k);
            let nib = if hi {
                blk.qs()[i] >> 4
            } else {
                blk.qs()[i] & 0x0F
            };
            out[b * QK + k] = d * B::LEVELS[nib as usize] as f32;
        }
    }
}

/// Dequantize row `row` of a `Q8x8` matrix with `cols` columns into `out[..cols]`.
pub fn dequantize_row_q8x8(w: &[BlockQ8x8], row: usize, cols: usize, out: &mut [f32]) {
    let nb = cols / QK;
    let (g, r) = (row / ROWS, row % ROWS);
    for b in 0..nb {
        let blk = &w[g * nb + b];
        let d = f16::from_bits(blk.d[r]).to_f32();
        for k in 0..QK {
            out[b * QK + k] = d * blk.qs[q8_pos(r, k)] as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Matrix products: y[t][r] = Σ_k W[r][k] · x[t][k]
// ---------------------------------------------------------------------------------------------

/// Integer dot of one row of a `Q4x8` block with one activation block (the exact i32 that
/// every tier must reproduce).
#[inline]
pub fn dot_block_q4<B: Q4Block>(blk: &B, r: usize, a: &BlockQ8A) -> i32 {
    let mut s = 0i32;
    for k in 0..QK {
        let (i, hi) = q4_pos(r, k);
        let nib = if hi {
            blk.qs()[i] >> 4
        } else {
            blk.qs()[i] & 0x0F
        };
        s += B::LEVELS[nib as usize] as i32 * a.qs[k] as i32;
    }
    s
}

/// Integer dot of one row of a `Q8x8` block with one activation block.
#[inline]
pub fn dot_block_q8(blk: &BlockQ8x8, r: usize, a: &BlockQ8A) -> i32 {
    let mut s = 0i32;
    for k in 0..QK {
        s += blk.qs[q8_pos(r, k)] as i32 * a.qs[k] as i32;
    }
    s
}

/// Integer dot of one row of a `Q6x8` block with one activation block: `Σ (u − 32) · a`.
#[inline]
pub fn dot_block_q6(blk: &BlockQ6x8, r: usize, a: &BlockQ8A) -> i32 {
    let mut s = 0i32;
    for k in 0..QK {
        s += (q6_get(blk, r, k) as i32 - 32) * a.qs[k] as i32;
    }
    s
}

/// The loop of every quantized product twin: per 8-row group and token, the float sum over
/// blocks in order, `acc += (d_w · d_a) · isum` with `isum = dot(block, row, activations)`
/// (the order every tier reproduces bit for bit). `y[t * ld_y + r]` for `r < n_rows`.
#[allow(clippy::too_many_arguments)] // the product's arguments plus the block type's accessors
fn gemm_blocks<B>(
    w: &[B],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
    d: impl Fn(&B) -> &[u16; ROWS],
    dot: impl Fn(&B, usize, &BlockQ8A) -> i32,
) {
    let nb = k / QK;
    for g in 0..n_rows.div_ceil(ROWS) {
        for t in 0..n_tok {
            let mut acc = [0.0f32; ROWS];
            for b in 0..nb {
                let blk = &w[g * nb + b];
                let a = &x[t * nb + b];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let dw = f16::from_bits(d(blk)[r]).to_f32();
                    *acc_r += (dw * a.d) * dot(blk, r, a) as f32;
                }
            }
            for (r, &v) in acc.iter().enumerate() {
                let row = g * ROWS + r;
                if row < n_rows {
                    y[t * ld_y + row] = v;
                }
            }
        }
    }
}

/// `Q4x8` weights × quantized activations.
///
/// * `w`: the blocks of `row_groups(n_rows)` row groups, `k / 32` blocks each.
/// * `x`: `n_tok` activation rows of `k / 32` blocks.
/// * `y`: output, `y[t * ld_y + r]` for `r < n_rows`.
///
/// Per row the float sum runs over blocks in order: `acc += (d_w * d_a) * isum`.
/// Any [`Q4Block`] type (`Q4x8`, `Q4Lx8`).
pub fn gemm_q4x8<B: Q4Block>(
    w: &[B],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_blocks(w, n_rows, k, x, n_tok, y, ld_y, B::d, dot_block_q4::<B>);
}

/// `Q8x8` weights × quantized activations. Same contract as [`gemm_q4x8`].
pub fn gemm_q8x8(
    w: &[BlockQ8x8],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_blocks(
        w,
        n_rows,
        k,
        x,
        n_tok,
        y,
        ld_y,
        |b: &BlockQ8x8| &b.d,
        dot_block_q8,
    );
}

/// `Q6x8` weights × quantized activations. Same contract as [`gemm_q4x8`].
pub fn gemm_q6x8(
    w: &[BlockQ6x8],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_blocks(
        w,
        n_rows,
        k,
        x,
        n_tok,
        y,
        ld_y,
        |b: &BlockQ6x8| &b.d,
        dot_block_q6,
    );
}

/// Float weights (row-major `n_rows × k`) × float activations. `y[t * ld_y + r]`.
pub fn gemm_f32(
    w: &[f32],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    for t in 0..n_tok {
        let xt = &x[t * k..(t + 1) * k];
        for r in 0..n_rows {
            y[t * ld_y + r] = dot_f32(&w[r * k..(r + 1) * k], xt);
        }
    }
}

/// bf16 weights (bits, row-major `n_rows × k`) × float activations.
pub fn gemm_bf16(
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    for t in 0..n_tok {
        let xt = &x[t * k..(t + 1) * k];
        for r in 0..n_rows {
            let wr = &w[r * k..(r + 1) * k];
            let mut s = 0.0f32;
            for (a, b) in wr.iter().zip(xt) {
                s += bf16::from_bits(*a).to_f32() * b;
            }
            y[t * ld_y + r] = s;
        }
    }
}

/// f16 weights (bits, row-major `n_rows × k`) × float activations.
pub fn gemm_f16(
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    for t in 0..n_tok {
        let xt = &x[t * k..(t + 1) * k];
        for r in 0..n_rows {
            let wr = &w[r * k..(r + 1) * k];
            let mut s = 0.0f32;
            for (a, b) in wr.iter().zip(xt) {
                s += f16::from_bits(*a).to_f32() * b;
            }
            y[t * ld_y + r] = s;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Vector ops
// ---------------------------------------------------------------------------------------------

/// `Σ a[i] * b[i]`, summed in order.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut s = 0.0f32;
    for (x, y) in a.iter().zip(b) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
pub fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// Attention scores: `s[j] = dot(q, k[j * ld_k ..][..q.len()]) · scale` for `j < s.len()`
/// (the dot in the order of [`dot_f32`]; SIMD tiers reassociate it: tolerance-tested).
pub fn attn_scores(q: &[f32], k: &[f32], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = dot_f32(q, &k[j * ld_k..j * ld_k + d]) * scale;
    }
}

/// Attention values: `o[c] += p[j] · v[j * ld_v + c]` for `j = 0, 1, ..` in order, `c < o.len()`
/// (each step is [`axpy_f32`]: every tier is bit-identical to this).
pub fn attn_values(p: &[f32], v: &[f32], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    for (j, &pj) in p.iter().enumerate() {
        axpy_f32(pj, &v[j * ld_v..j * ld_v + d], o);
    }
}

/// [`attn_scores`] with f16 keys (bits), each converted to f32 exactly before the product.
pub fn attn_scores_f16(q: &[f32], k: &[u16], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    for (j, sj) in s.iter_mut().enumerate() {
        let row = &k[j * ld_k..j * ld_k + d];
        let mut acc = 0.0f32;
        for (x, &h) in q.iter().zip(row) {
            acc += x * f16::from_bits(h).to_f32();
        }
        *sj = acc * scale;
    }
}

/// [`attn_values`] with f16 values (bits): `o[c] += p[j] · f32(v[j][c])`, keys in order.
pub fn attn_values_f16(p: &[f32], v: &[u16], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    for (j, &pj) in p.iter().enumerate() {
        for (oc, &h) in o.iter_mut().zip(&v[j * ld_v..j * ld_v + d]) {
            *oc += pj * f16::from_bits(h).to_f32();
        }
    }
}

/// [`attn_scores`] with int8 keys (the caller applies each row's scale afterwards).
pub fn attn_scores_i8(q: &[f32], k: &[i8], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    for (j, sj) in s.iter_mut().enumerate() {
        let row = &k[j * ld_k..j * ld_k + d];
        let mut acc = 0.0f32;
        for (x, &v) in q.iter().zip(row) {
            acc += x * v as f32;
        }
        *sj = acc * scale;
    }
}

/// [`attn_values`] with int8 values (`p` already multiplied by each row's scale):
/// `o[c] += p[j] · (v[j][c] as f32)`, keys in order.
pub fn attn_values_i8(p: &[f32], v: &[i8], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    for (j, &pj) in p.iter().enumerate() {
        for (oc, &x) in o.iter_mut().zip(&v[j * ld_v..j * ld_v + d]) {
            *oc += pj * x as f32;
        }
    }
}

/// Elements per 4-bit KV block (one f16 scale each): a head row of `d` values is
/// `d.div_ceil(KV_Q4_BLOCK)` blocks, the last one partial when `d` is not a multiple.
pub const KV_Q4_BLOCK: usize = 32;
/// Bytes of one 4-bit KV block's values (two per byte; a partial block's are zero-padded).
pub const KV_Q4_BYTES: usize = KV_Q4_BLOCK / 2;

/// The 4-bit code of element `c` (`< KV_Q4_BLOCK`) of a block: byte `c % 16`, low nibble for
/// `c < 16`, high nibble otherwise.
#[inline(always)]
pub fn kv_q4_code(blk: &[u8], c: usize) -> u8 {
    let b = blk[c % KV_Q4_BYTES];
    if c < KV_Q4_BYTES {
        b & 15
    } else {
        b >> 4
    }
}

/// Quantize one head row `x` into 4-bit KV blocks (`q`: `x.len().div_ceil(32) * 16` bytes,
/// `scales`: one f16 per block). Per block, like llama.cpp's `Q4_0`: `m` is the value of
/// largest magnitude, `d = f16(m / -8)`, code `n = clamp(round(x / d) + 8, 0, 15)`, so `m`
/// itself is exact (code 0) and the value is `d · (n − 8)`; an all-zero block gets `d = 0`.
pub fn quantize_kv_q4(x: &[f32], q: &mut [u8], scales: &mut [u16]) {
    for (b, xb) in x.chunks(KV_Q4_BLOCK).enumerate() {
        // 1. the value of largest magnitude (its sign kept)
        let m = xb
            .iter()
            .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        // 2. the scale, rounded to f16 first so that the codes use the stored scale
        let d = f16::from_f32(m / -8.0);
        let df = d.to_f32();
        let id = if df != 0.0 { 1.0 / df } else { 0.0 };
        scales[b] = d.to_bits();
        // 3. codes, two per byte
        let blk = &mut q[b * KV_Q4_BYTES..(b + 1) * KV_Q4_BYTES];
        blk.iter_mut().for_each(|v| *v = 0);
        for (c, &v) in xb.iter().enumerate() {
            let n = ((v * id).round() + 8.0).clamp(0.0, 15.0) as u8;
            blk[c % KV_Q4_BYTES] |= if c < KV_Q4_BYTES { n } else { n << 4 };
        }
    }
}

/// The rotation of 4-bit KV rows: an in-place normalized Walsh–Hadamard transform of each
/// block of [`KV_Q4_BLOCK`] values of `x` (a partial last block whose length is not a power
/// of two is left as it is). It is orthogonal and its own inverse, so `dot(Hq, Hk) = dot(q, k)`
/// and `Σ p·Hv = H Σ p·v`; it spreads an outlier channel over its block, whose scale (and so
/// its rounding step) then shrinks by up to `√32`. The cache stores `H k` and `H v`; the
/// attention rotates the queries and rotates its output back.
pub fn kv_q4_rotate(x: &mut [f32]) {
    for b in x.chunks_mut(KV_Q4_BLOCK) {
        let n = b.len();
        if n < 2 || !n.is_power_of_two() {
            continue;
        }
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, c) = (b[j], b[j + h]);
                    b[j] = a + c;
                    b[j + h] = a - c;
                }
            }
            h *= 2;
        }
        let s = 1.0 / (n as f32).sqrt();
        b.iter_mut().for_each(|v| *v *= s);
    }
}

/// Dequantize one 4-bit KV head row of `out.len()` values (the inverse of [`quantize_kv_q4`]).
pub fn dequantize_kv_q4(q: &[u8], scales: &[u16], out: &mut [f32]) {
    for (b, ob) in out.chunks_mut(KV_Q4_BLOCK).enumerate() {
        let d = f16::from_bits(scales[b]).to_f32();
        let blk = &q[b * KV_Q4_BYTES..(b + 1) * KV_Q4_BYTES];
        for (c, o) in ob.iter_mut().enumerate() {
            *o = (kv_q4_code(blk, c) as i32 - 8) as f32 * d;
        }
    }
}

/// [`attn_scores`] with 4-bit keys: key `j`'s blocks start at `k[j * ld_k]` (16 bytes each)
/// and its block scales at `ks[j * ld_s]`, `q.len().div_ceil(32)` of them. Per block the dot
/// of `q` with the codes minus 8 in element order, times the block's scale, summed over the
/// blocks in order, times `scale` (SIMD tiers reassociate the block dot: tolerance-tested).
pub fn attn_scores_q4(
    q: &[f32],
    k: &[u8],
    ks: &[u16],
    ld_k: usize,
    ld_s: usize,
    scale: f32,
    s: &mut [f32],
) {
    for (j, sj) in s.iter_mut().enumerate() {
        let mut acc = 0.0f32;
        for (b, qb) in q.chunks(KV_Q4_BLOCK).enumerate() {
            let blk = &k[j * ld_k + b * KV_Q4_BYTES..j * ld_k + (b + 1) * KV_Q4_BYTES];
            let mut sb = 0.0f32;
            for (c, &x) in qb.iter().enumerate() {
                sb += x * (kv_q4_code(blk, c) as i32 - 8) as f32;
            }
            acc += sb * f16::from_bits(ks[j * ld_s + b]).to_f32();
        }
        *sj = acc * scale;
    }
}

/// [`attn_values`] with 4-bit values (layout of [`attn_scores_q4`], `o.len()` values per row):
/// `o[c] += (p[j] · scale_jb) · (code − 8)` for keys `j` in order, `b` the block of `c`
/// (every tier is bit-identical to this).
pub fn attn_values_q4(p: &[f32], v: &[u8], vs: &[u16], ld_v: usize, ld_s: usize, o: &mut [f32]) {
    for (j, &pj) in p.iter().enumerate() {
        for (b, ob) in o.chunks_mut(KV_Q4_BLOCK).enumerate() {
            let w = pj * f16::from_bits(vs[j * ld_s + b]).to_f32();
            let blk = &v[j * ld_v + b * KV_Q4_BYTES..j * ld_v + (b + 1) * KV_Q4_BYTES];
            for (c, oc) in ob.iter_mut().enumerate() {
                *oc += w * (kv_q4_code(blk, c) as i32 - 8) as f32;
            }
        }
    }
}

/// Scores of several query rows against keys stored transposed (`kt` is `d × n`, key `j` in
/// column `j`): `s[r * n + j] = scale · Σ_c q[r * d + c] · kt[c * n + j]` for rows
/// `r < q.len() / d`, `j < n` (`c` in order; SIMD tiers fuse the multiply-adds: tolerance-tested).
pub fn attn_scores_kt(q: &[f32], kt: &[f32], d: usize, n: usize, scale: f32, s: &mut [f32]) {
    if d == 0 || n == 0 {
        s.iter_mut()
            .take(q.len() / d.max(1) * n)
            .for_each(|x| *x = 0.0);
        return;
    }
    // per key `acc = 0; acc += q[c]·kt[c][j]` for c in order, run over all keys at once (the
    // same operations in the same order per key; the loop over `j` vectorizes)
    for (qr, sr) in q.chunks_exact(d).zip(s.chunks_exact_mut(n)) {
        sr.iter_mut().for_each(|x| *x = 0.0);
        for (c, &x) in qr.iter().enumerate() {
            for (sj, &k) in sr.iter_mut().zip(&kt[c * n..(c + 1) * n]) {
                *sj += x * k;
            }
        }
        sr.iter_mut().for_each(|x| *x *= scale);
    }
}

/// [`attn_values`] for several rows sharing the value rows: for each row `r < o.len() / d`,
/// `o[r * d + c] += p[r * n + j] · v[j * ld_v + c]` for `j = 0, 1, .. n` in order (each row
/// is [`attn_values`] of `p[r * n..][..n]`: every tier is bit-identical to this).
pub fn attn_values_rows(p: &[f32], n: usize, v: &[f32], ld_v: usize, d: usize, o: &mut [f32]) {
    if d == 0 {
        return;
    }
    for (r, or) in o.chunks_exact_mut(d).enumerate() {
        attn_values(&p[r * n..(r + 1) * n], v, ld_v, or);
    }
}

/// Transposed key tile: `kt[c * n + j] = k[j * ld + c]` for `j < n`, `c < d` (exact).
pub fn kv_transpose_f32(k: &[f32], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    for j in 0..n {
        for (c, &x) in k[j * ld..j * ld + d].iter().enumerate() {
            kt[c * n + j] = x;
        }
    }
}

/// [`kv_transpose_f32`] from f16 bits: `kt[c * n + j] = f32(k[j * ld + c])` (exact).
pub fn kv_transpose_f16(k: &[u16], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    for j in 0..n {
        for (c, &h) in k[j * ld..j * ld + d].iter().enumerate() {
            kt[c * n + j] = f16::from_bits(h).to_f32();
        }
    }
}

/// Value tile from f16 bits, rows packed: `vf[j * d + c] = f32(v[j * ld + c])` (exact).
pub fn kv_rows_f16(v: &[u16], ld: usize, d: usize, n: usize, vf: &mut [f32]) {
    for j in 0..n {
        for (o, &h) in vf[j * d..(j + 1) * d]
            .iter_mut()
            .zip(&v[j * ld..j * ld + d])
        {
            *o = f16::from_bits(h).to_f32();
        }
    }
}

/// One online-softmax step over a tile of scores: `m = max(m_old, max_j s[j])`, then
/// `s[j] = exp(s[j] − m)`; returns `(m, Σ_j s[j])` (summed in order). When `m` is −∞ (no finite
/// score and `m_old` = −∞) `s` is zeroed and the sum is 0. SIMD tiers use a polynomial `exp`
/// (a few ulp) and lane-wise sums: tolerance-tested.
pub fn softmax_tile(s: &mut [f32], m_old: f32) -> (f32, f32) {
    let m = s.iter().fold(m_old, |m, &v| m.max(v));
    if m == f32::NEG_INFINITY {
        s.iter_mut().for_each(|v| *v = 0.0);
        return (m, 0.0);
    }
    let mut sum = 0.0f32;
    for v in s.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    (m, sum)
}

/// RMSNorm: `out = x / sqrt(mean(x²) + eps) * w` (no weight when `w` is `None`).
pub fn rmsnorm(x: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    // 1. mean of squares, accumulated in f64 for a length-independent error
    let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    // 2. reciprocal root
    let inv = (1.0 / (ss + eps as f64).sqrt()) as f32;
    // 3. scale (and weight)
    match w {
        Some(w) => {
            for ((o, &v), &wi) in out.iter_mut().zip(x).zip(w) {
                *o = (v * inv) * wi;
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = v * inv;
            }
        }
    }
}

/// RoPE on one head, interleaved pairs `(x[2j], x[2j+1])` (Llama 4 / Meta / ggml NORM).
/// `cos`/`sin` have `x.len() / 2` entries.
pub fn rope_interleaved(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (j, pair) in x.chunks_exact_mut(2).enumerate() {
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos[j] - b * sin[j];
        pair[1] = a * sin[j] + b * cos[j];
    }
}

/// RoPE on one head, half-split pairs `(x[j], x[j + D/2])` (HF Llama `rotate_half`, ggml NEOX).
pub fn rope_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    for j in 0..h {
        let (a, b) = (x[j], x[j + h]);
        x[j] = a * cos[j] - b * sin[j];
        x[j + h] = b * cos[j] + a * sin[j];
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if m == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut s = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Constants of [`exp_poly`], shared with the SIMD versions so that both round identically:
/// the underflow threshold, the clamp, the Cody–Waite split of ln 2 and Cephes' polynomial
/// coefficients (highest degree first).
pub(crate) const EXP_UNDER: f32 = -87.336_55;
pub(crate) const EXP_CLAMP: f32 = 88.0;
pub(crate) const EXP_LN2_HI: f32 = 0.693_359_4;
pub(crate) const EXP_LN2_LO: f32 = -2.121_944_4e-4;
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

/// `exp(x)` by the same steps, in the same order, as the AVX2 tier's 8-lane `exp8`, so that both
/// round identically (every step is one IEEE operation; `mul_add` is the fused multiply-add):
/// `x = n·ln2 + r` with `n = round(x·log2 e)` (Cody–Waite split of ln2), Cephes' degree-7
/// polynomial for `e^r` on `|r| ≤ ln2/2` (about 1 ulp), `2^n` built in the exponent bits. Inputs
/// below −87.34 (and −∞) give 0, inputs above 88 are clamped to 88, NaN stays NaN.
#[inline(always)] // inlined into each tier's feature context (fused gate/up epilogue)
pub fn exp_poly(x: f32) -> f32 {
    let under = x < EXP_UNDER;
    // vminps(88, x) / vmaxps(-88, x): the second operand (x) when the comparison is false (NaN)
    let x = if EXP_CLAMP < x { EXP_CLAMP } else { x };
    let x = if -EXP_CLAMP > x { -EXP_CLAMP } else { x };
    let nf = (x * core::f32::consts::LOG2_E).round_ties_even();
    let r = (-nf).mul_add(EXP_LN2_HI, x);
    let r = (-nf).mul_add(EXP_LN2_LO, r);
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p.mul_add(r, c);
    }
    let p = p.mul_add(r * r, r) + 1.0;
    let e = f32::from_bits((((nf as i32) + 127) << 23) as u32);
    if under {
        0.0
    } else {
        p * e
    }
}

/// `silu(z) = z * sigmoid(z) = z / (1 + exp(−z))`, with [`exp_poly`] (what the fused gate/up
/// kernels of every tier compute, bit for bit).
#[inline(always)] // inlined into each tier's feature context (fused gate/up epilogue)
pub fn silu(z: f32) -> f32 {
    z / (1.0 + exp_poly(-z))
}

/// `out = silu(gate) * up`.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}

/// bf16 bits to f32.
pub fn bf16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16::from_bits(s).to_f32();
    }
}

/// f16 bits to f32.
pub fn f16_to_f32(src: &[u16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_bits(s).to_f32();
    }
}

/// f32 to f16 bits (round to nearest even).
pub fn f32_to_f16(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(s).to_bits();
    }
}

// ---------------------------------------------------------------------------------------------
// Expert routing
// ---------------------------------------------------------------------------------------------

/// Top-k of `logits`: indices and values, largest first; ties go to the lower index
/// (as `torch.topk` on CPU). NaN logits are never chosen before finite ones.
pub fn topk(logits: &[f32], k: usize, idx: &mut [u32], val: &mut [f32]) {
    let k = k.min(logits.len());
    for slot in 0..k {
        let mut best: Option<usize> = None;
        for (i, &v) in logits.iter().enumerate() {
            if idx[..slot].contains(&(i as u32)) {
                continue;
            }
            best = match best {
                None => Some(i),
                Some(b) if v > logits[b] || (logits[b].is_nan() && !v.is_nan()) => Some(i),
                keep => keep,
            };
        }
        let b = best.unwrap_or(0);
        idx[slot] = b as u32;
        val[slot] = logits[b];
    }
}

/// Group routed (token, slot) pairs by expert.
///
/// * `expert_of[i]`: the expert of pair `i` (pair `i` = token `i / k`, slot `i % k`).
/// * `counts[e]`: pairs routed to `e`; `offsets[e]`: start of `e`'s run in `perm`
///   (`offsets` has `n_experts + 1` entries).
/// * `perm[j]`: the pair at position `j` of the expert-sorted order (stable: by token within
///   an expert); `inv[i]`: the position of pair `i` in that order.
pub fn group_by_expert(
    expert_of: &[u32],
    n_experts: usize,
    counts: &mut [u32],
    offsets: &mut [u32],
    perm: &mut [u32],
    inv: &mut [u32],
) {
    counts[..n_experts].iter_mut().for_each(|c| *c = 0);
    for &e in expert_of {
        counts[e as usize] += 1;
    }
    offsets[0] = 0;
    for e in 0..n_experts {
        offsets[e + 1] = offsets[e] + counts[e];
    }
    let mut fill = [0u32; 0].to_vec(); // scratch only in the reference twin
    fill.extend_from_slice(&offsets[..n_experts]);
    for (i, &e) in expert_of.iter().enumerate() {
        let pos = fill[e as usize];
        perm[pos as usize] = i as u32;
        inv[i] = pos;
        fill[e as usize] += 1;
    }
}

/// `Q4x8` weights × the activation rows listed in `rows` (expert gather, nothing copied):
/// `y[i * ld_y + r] = Σ_k W[r][k] · x_all[rows[i]][k]` for `i < rows.len()`, `r < n_rows`.
/// `x_all` holds whole activation rows of `k / 32` blocks.
pub fn gemm_q4x8_gather<B: Q4Block>(
    w: &[B],
    n_rows: usize,
    k: usize,
    x_all: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    let nb = k / QK;
    for (i, &row) in rows.iter().enumerate() {
        // 1. the activation row in place
        let xr = &x_all[row as usize * nb..(row as usize + 1) * nb];
        // 2. a one-token product into output row i
        gemm_q4x8(w, n_rows, k, xr, 1, &mut y[i * ld_y..], ld_y);
    }
}

/// `Q8x8` version of [`gemm_q4x8_gather`].
pub fn gemm_q8x8_gather(
    w: &[BlockQ8x8],
    n_rows: usize,
    k: usize,
    x_all: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    let nb = k / QK;
    for (i, &row) in rows.iter().enumerate() {
        let xr = &x_all[row as usize * nb..(row as usize + 1) * nb];
        gemm_q8x8(w, n_rows, k, xr, 1, &mut y[i * ld_y..], ld_y);
    }
}

/// Fused expert gate/up projection with SiLU, `Q4x8` weights:
/// `y[i * ld_y + r] = silu((G x_all[rows[i]])[r]) · (U x_all[rows[i]])[r]` for `r < n_rows`.
/// `w_gate` and `w_up` are both `n_rows × k`.
#[allow(clippy::too_many_arguments)]
pub fn ffn_gate_up_q4x8<B: Q4Block>(
    w_gate: &[B],
    w_up: &[B],
    n_rows: usize,
    k: usize,
    x_all: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    let mut g = vec![0.0f32; n_rows]; // scratch only in the reference twin
    let mut u = vec![0.0f32; n_rows];
    for (i, &row) in rows.iter().enumerate() {
        let one = [row];
        // 1. gate and up projections of this row
        gemm_q4x8_gather(w_gate, n_rows, k, x_all, &one, &mut g, n_rows);
        gemm_q4x8_gather(w_up, n_rows, k, x_all, &one, &mut u, n_rows);
        // 2. silu(gate) * up
        silu_mul(&g, &u, &mut y[i * ld_y..i * ld_y + n_rows]);
    }
}

/// `Q8x8` version of [`ffn_gate_up_q4x8`].
#[allow(clippy::too_many_arguments)]
pub fn ffn_gate_up_q8x8(
    w_gate: &[BlockQ8x8],
    w_up: &[BlockQ8x8],
    n_rows: usize,
    k: usize,
    x_all: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    let mut g = vec![0.0f32; n_rows];
    let mut u = vec![0.0f32; n_rows];
    for (i, &row) in rows.iter().enumerate() {
        let one = [row];
        gemm_q8x8_gather(w_gate, n_rows, k, x_all, &one, &mut g, n_rows);
        gemm_q8x8_gather(w_up, n_rows, k, x_all, &one, &mut u, n_rows);
        silu_mul(&g, &u, &mut y[i * ld_y..i * ld_y + n_rows]);
    }
}

/// Weighted scatter-add of expert outputs back to their tokens:
/// `dst[rows[i] * ld_dst + j] += weights[i] * src[i * ld_src + j]` for `i < rows.len()`, `j < n`,
/// in order of `i` (each element is `y + a * x`, multiply then add, no fused multiply-add).
pub fn scatter_add(
    src: &[f32],
    ld_src: usize,
    n: usize,
    rows: &[u32],
    weights: &[f32],
    dst: &mut [f32],
    ld_dst: usize,
) {
    for (i, (&row, &wt)) in rows.iter().zip(weights).enumerate() {
        let d = &mut dst[row as usize * ld_dst..row as usize * ld_dst + n];
        axpy_f32(wt, &src[i * ld_src..i * ld_src + n], d);
    }
}
