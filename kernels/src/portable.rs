//! Portable tier on `wide` (SSE2 on any x86-64, NEON on any aarch64, scalar elsewhere).
//!
//! # Math
//! `y[t][r] = Σ_b (d_w[b][r] · d_a[t][b]) · isum[t][b][r]`, `isum = Σ_{k<32} q_w[r][k] · q_a[t][k]`
//! (exact in i32), floats in the order of the scalar twin, so outputs match it bit for bit.
//!
//! # Layout and lane plan
//! A weight block is first unpacked to 256 interleaved int8 (`wq[c*32 + r*4 + j]` = row `r`,
//! column `4c + j`; for `Q4x8` through a 256-entry byte → two-levels table, for `Q8x8` it is the
//! block itself), then widened to 32 `i16x8` vectors: vector `4c + h` holds rows `2h`, `2h+1`
//! × the 4 columns of quad `c`. The activation quad `c` is broadcast as `i16x8 [a0..a3, a0..a3]`
//! and `i16x8::dot` (`pmaddwd`) yields `i32x4 [r2h a01, r2h a23, r2h+1 a01, r2h+1 a23]`. Four
//! `i32x4` accumulators per token hold the block; one pairwise fold at the end gives 8 row sums.
//! The unpack is shared by the `NY` tokens of the tile.
//!
//! Rejected: a per-row scalar dequantisation to f32 (4× the bytes touched per block).

use crate::block::{BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, QK, ROWS};
use crate::driver::{Tier, Tile};
use crate::{CpuLevel, Kernels};
use half::{bf16, f16};
use wide::{f32x8, i16x8, i32x4};

/// The portable tier needs nothing beyond the baseline of the target.
#[derive(Clone, Copy)]
pub(crate) struct Portable(());

impl Tier for Portable {
    unsafe fn assume() -> Self {
        Portable(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(Portable);

/// Byte → (level of the low nibble, level of the high nibble) of a 4-bit block type.
struct Pairs<B>(core::marker::PhantomData<B>);

impl<B: Q4Block> Pairs<B> {
    const T: [[i8; 2]; 256] = {
        let mut t = [[0i8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [B::LEVELS[i & 15], B::LEVELS[i >> 4]];
            i += 1;
        }
        t
    };
}

#[inline(always)]
fn unpack_q4<B: Q4Block>(pairs: &[[i8; 2]; 256], blk: &B, wq: &mut [i8; 256]) {
    // chunk c low nibbles are quad c, high nibbles quad 4 + c (same row/column slot)
    for c in 0..4 {
        for i in 0..32 {
            let [lo, hi] = pairs[blk.qs()[c * 32 + i] as usize];
            wq[c * 32 + i] = lo;
            wq[(c + 4) * 32 + i] = hi;
        }
    }
}

#[inline(always)]
fn scales(d: &[u16; ROWS]) -> f32x8 {
    f32x8::new(core::array::from_fn(|r| f16::from_bits(d[r]).to_f32()))
}

/// One block of interleaved int8 weights against `NY` tokens, accumulated into `acc`.
#[inline(always)]
fn block_i8<const NY: usize>(
    wq: &[i8; 256],
    dw: f32x8,
    x: &[&[BlockQ8A]; NY],
    b: usize,
    acc: &mut [f32x8; NY],
) {
    let wv: [i16x8; 32] = core::array::from_fn(|v| {
        let (c, h) = (v / 4, v % 4);
        let s = &wq[c * 32 + h * 8..c * 32 + h * 8 + 8];
        i16x8::new(core::array::from_fn(|i| s[i] as i16))
    });
    for t in 0..NY {
        let a = &x[t][b];
        let mut ia = [i32x4::ZERO; 4];
        for c in 0..8 {
            let q = &a.qs[c * 4..c * 4 + 4];
            let aq = i16x8::new(core::array::from_fn(|i| q[i % 4] as i16));
            for h in 0..4 {
                ia[h] += wv[c * 4 + h].dot(aq);
            }
        }
        let isum: [f32; ROWS] = core::array::from_fn(|r| {
            let v = ia[r / 2].to_array();
            let o = (r % 2) * 2;
            (v[o] + v[o + 1]) as f32
        });
        acc[t] += (dw * f32x8::splat(a.d)) * f32x8::new(isum);
    }
}

/// Both 4-bit types: only the level table differs.
#[inline(always)]
fn q4_tile<B: Q4Block, const NY: usize>(
    w: &[B],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let pairs = Pairs::<B>::T;
    let mut acc = [f32x8::ZERO; NY];
    let mut wq = [0i8; 256];
    for (b, blk) in w.iter().enumerate() {
        unpack_q4(&pairs, blk, &mut wq);
        block_i8(&wq, scales(blk.d()), x, b, &mut acc);
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = a.to_array();
    }
}

/// Both 4-bit types (`Q4x8`, `Q4Lx8`): the same layout, read through the type's levels.
impl<B: Q4Block> Tile<B> for Portable {
    const NYMAX: usize = 4;
    fn tile<const NY: usize>(self, w: &[B], x: &[&[BlockQ8A]; NY], out: &mut [[f32; ROWS]; NY]) {
        q4_tile(w, x, out)
    }
}

impl Tile<BlockQ8x8> for Portable {
    const NYMAX: usize = 4;
    fn tile<const NY: usize>(
        self,
        w: &[BlockQ8x8],
        x: &[&[BlockQ8A]; NY],
        out: &mut [[f32; ROWS]; NY],
    ) {
        let mut acc = [f32x8::ZERO; NY];
        for (b, blk) in w.iter().enumerate() {
            block_i8(&blk.qs, scales(&blk.d), x, b, &mut acc);
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a.to_array();
        }
    }
}

/// `Q6x8` → interleaved int8 `u − 32` (chunk `c`: low or high nibbles of `ql` chunk `c % 4`,
/// the 2 high bits from `qh` chunk `c % 2` at shift `2·(c / 2)`).
#[inline(always)]
fn unpack_q6(blk: &BlockQ6x8, wq: &mut [i8; 256]) {
    for c in 0..8 {
        let (l, h, sh) = (
            &blk.ql[(c % 4) * 32..],
            &blk.qh[(c % 2) * 32..],
            2 * (c / 2),
        );
        for i in 0..32 {
            let lo = if c < 4 { l[i] & 15 } else { l[i] >> 4 };
            let u = lo | ((h[i] >> sh) & 3) << 4;
            wq[c * 32 + i] = u as i8 - 32;
        }
    }
}

impl Tile<BlockQ6x8> for Portable {
    const NYMAX: usize = 4;
    fn tile<const NY: usize>(
        self,
        w: &[BlockQ6x8],
        x: &[&[BlockQ8A]; NY],
        out: &mut [[f32; ROWS]; NY],
    ) {
        let mut acc = [f32x8::ZERO; NY];
        let mut wq = [0i8; 256];
        for (b, blk) in w.iter().enumerate() {
            unpack_q6(blk, &mut wq);
            block_i8(&wq, scales(&blk.d), x, b, &mut acc);
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a.to_array();
        }
    }
}

/// `round_ties_even` for `|v| < 2^22` by the 1.5·2^23 magic constant (exact in the default
/// rounding mode), so the portable tier matches `f32::round_ties_even` bit for bit.
const MAGIC: f32 = 12_582_912.0;

pub(crate) fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    assert_eq!(x.len() % QK, 0);
    assert!(out.len() >= x.len() / QK);
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let v: [f32x8; 4] =
            core::array::from_fn(|i| f32x8::new(xb[i * 8..i * 8 + 8].try_into().unwrap()));
        let m = v[0].abs().max(v[1].abs()).max(v[2].abs().max(v[3].abs()));
        let amax = m.to_array().iter().fold(0.0f32, |a, &b| a.max(b));
        let d = amax / 127.0;
        let id = f32x8::splat(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let mut sum = 0i32;
        for (i, vi) in v.iter().enumerate() {
            let r = ((*vi * id + f32x8::splat(MAGIC)) - f32x8::splat(MAGIC)).to_array();
            for (j, &rj) in r.iter().enumerate() {
                let q = (rj as i32).clamp(-127, 127);
                ob.qs[i * 8 + j] = q as i8;
                sum += q;
            }
        }
        ob.d = d;
        ob.sum8 = 8 * sum;
    }
}

/// `Σ a[i] · b[i]` in 4 × 8 lanes, then the lanes, then the scalar tail.
pub(crate) fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [f32x8::ZERO; 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, acc_u) in acc.iter_mut().enumerate() {
            let o = i + u * 8;
            let va = f32x8::new(a[o..o + 8].try_into().unwrap());
            let vb = f32x8::new(b[o..o + 8].try_into().unwrap());
            *acc_u = va.mul_add(vb, *acc_u);
        }
        i += 32;
    }
    while i + 8 <= n {
        let va = f32x8::new(a[i..i + 8].try_into().unwrap());
        let vb = f32x8::new(b[i..i + 8].try_into().unwrap());
        acc[0] = va.mul_add(vb, acc[0]);
        i += 8;
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])).reduce_add();
    for j in i..n {
        s += a[j] * b[j];
    }
    s
}

/// `y += a · x`, multiply then add (bit-identical to the twin).
pub(crate) fn axpy_f32(a: f32, x: &[f32], y: &mut [f32]) {
    let n = x.len().min(y.len());
    let va = f32x8::splat(a);
    let mut yc = y[..n].chunks_exact_mut(8);
    let mut xc = x[..n].chunks_exact(8);
    for (yv, xv) in (&mut yc).zip(&mut xc) {
        let r = f32x8::new((*yv).try_into().unwrap()) + va * f32x8::new(xv.try_into().unwrap());
        yv.copy_from_slice(&r.to_array());
    }
    for (yi, xi) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *yi += a * xi;
    }
}

/// Float GEMM: rows outer (each weight row read once from memory), tokens inner.
pub(crate) fn gemm_f32(
    w: &[f32],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    for r in 0..n_rows {
        let wr = &w[r * k..(r + 1) * k];
        for t in 0..n_tok {
            y[t * ld_y + r] = dot_f32(wr, &x[t * k..(t + 1) * k]);
        }
    }
}

/// 16-bit weights: rows converted 256 at a time into a stack buffer, then [`dot_f32`] pieces.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_h16(
    conv: fn(u16) -> f32,
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    const CH: usize = 256;
    let mut buf = [0.0f32; CH];
    let mut acc = [0.0f32; 8];
    for r in 0..n_rows {
        for t0 in (0..n_tok).step_by(8) {
            let nt = (n_tok - t0).min(8);
            acc[..nt].iter_mut().for_each(|a| *a = 0.0);
            for c0 in (0..k).step_by(CH) {
                let n = (k - c0).min(CH);
                for (bv, &h) in buf[..n].iter_mut().zip(&w[r * k + c0..r * k + c0 + n]) {
                    *bv = conv(h);
                }
                for (t, a) in acc[..nt].iter_mut().enumerate() {
                    let xo = (t0 + t) * k + c0;
                    *a += dot_f32(&buf[..n], &x[xo..xo + n]);
                }
            }
            for (t, a) in acc[..nt].iter().enumerate() {
                y[(t0 + t) * ld_y + r] = *a;
            }
        }
    }
}

pub(crate) fn gemm_bf16(
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_h16(
        |h| bf16::from_bits(h).to_f32(),
        w,
        n_rows,
        k,
        x,
        n_tok,
        y,
        ld_y,
    );
}

pub(crate) fn gemm_f16(
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_h16(
        |h| f16::from_bits(h).to_f32(),
        w,
        n_rows,
        k,
        x,
        n_tok,
        y,
        ld_y,
    );
}

pub(crate) fn rmsnorm(x: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    // 1. mean of squares: f32 lanes per 8, each 8-lane partial folded into f64
    let mut ss = 0.0f64;
    let mut xc = x.chunks_exact(8);
    for c in &mut xc {
        let v = f32x8::new(c.try_into().unwrap());
        ss += (v * v).reduce_add() as f64;
    }
    for &v in xc.remainder() {
        ss += (v as f64) * (v as f64);
    }
    let inv = (1.0 / (ss / x.len() as f64 + eps as f64).sqrt()) as f32;
    // 2. scale (and weight), same per-element order as the twin
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

/// Attention scores with this tier's dot product.
pub(crate) fn attn_scores(q: &[f32], k: &[f32], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = dot_f32(q, &k[j * ld_k..j * ld_k + d]) * scale;
    }
}

/// Attention values with this tier's axpy (bit-identical to the twin).
pub(crate) fn attn_values(p: &[f32], v: &[f32], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    for (j, &pj) in p.iter().enumerate() {
        axpy_f32(pj, &v[j * ld_v..j * ld_v + d], o);
    }
}

pub(crate) const KERNELS: Kernels = Kernels {
    level: CpuLevel::Portable,
    quantize_q8a,
    q: crate::tier_products!(self),
    gemm_f32,
    gemm_bf16,
    gemm_f16,
    rmsnorm,
    topk: crate::scalar::topk,
    group_by_expert: crate::routing::group_by_expert,
    attn_scores,
    attn_values,
    attn_scores_f16: crate::scalar::attn_scores_f16,
    attn_values_f16: crate::scalar::attn_values_f16,
    attn_scores_i8: crate::scalar::attn_scores_i8,
    attn_values_i8: crate::scalar::attn_values_i8,
    attn_scores_q4: crate::scalar::attn_scores_q4,
    attn_values_q4: crate::scalar::attn_values_q4,
    attn_scores_kt: crate::scalar::attn_scores_kt,
    softmax_tile: crate::scalar::softmax_tile,
    attn_values_rows: crate::scalar::attn_values_rows,
    kv_transpose_f32: crate::scalar::kv_transpose_f32,
    kv_transpose_f16: crate::scalar::kv_transpose_f16,
    kv_rows_f16: crate::scalar::kv_rows_f16,
    rope_interleaved: crate::scalar::rope_interleaved,
    rope_half: crate::scalar::rope_half,
    quantize_kv_q4: crate::scalar::quantize_kv_q4,
    kv_q4_rotate: crate::scalar::kv_q4_rotate,
    dequantize_kv_q4: crate::scalar::dequantize_kv_q4,
};
