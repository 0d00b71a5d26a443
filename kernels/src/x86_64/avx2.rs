//! x86-64 AVX2 + FMA + F16C tier (Haswell and later, Zen 1 and later).
//!
//! # Math
//! `y[t][r] = Σ_b (d_w[b][r] · d_a[t][b]) · isum[t][b][r]`, `isum` exact in i32. The float steps
//! are `s = dw·da; p = s·(f32)isum; acc = acc + p` (no FMA), the order of the scalar twin, so the
//! quantized products match it bit for bit.
//!
//! # Layout and lane plan (one 8-row group, one 32-column block)
//! A 32-byte chunk `c` of `BlockQ4x8::qs` holds in i32 lane `r` the 4 nibble bytes of row `r`:
//! low nibbles = columns `4c..4c+4` (activation quad `c`), high nibbles = columns `16+4c..`
//! (activation quad `4 + c`). Nibbles → levels with one `vpshufb` against `KVALUES` (the table
//! fits a 16-byte lane). `vpmaddubsw` wants unsigned × signed, so the sign trick:
//! `maddubs(|w|, sign(a, w))` = `w·a` pairs (|pair| ≤ 2·127·127 = 32258 < 2^15: no saturation),
//! then `vpmaddwd` by ones folds the 4 products of each row into its i32 lane. The quad of
//! activation bytes is a 32-bit broadcast. So per (block, token): 8 × (broadcast, `vpsignb`,
//! `vpmaddubsw`, `vpmaddwd`, `vpaddd`), one `vcvtdq2ps`, two `vmulps`, one `vaddps`; no
//! horizontal sum anywhere: lane `r` is row `r`.
//!
//! The weight unpack (and, `vpshufb`, `vpabsb`) is done once per block and reused for the `NY`
//! tokens of the tile. `NYMAX = 8` although only `NY = 4` fits the 16 ymm registers (4 i32 +
//! 4 f32 accumulators + 4 weight vectors): the spilled accumulators cost less than unpacking
//! each weight block twice as often. Measured (`cargo bench --bench kernels -- q4_gemm64/avx2`,
//! Zen 3, 1 thread): NY 4 → 97, 6 → 107, 8 → 114 Gelem/s at 2048 × 5120 × 64 tokens. The first
//! chunk of a block initializes the i32 sums (no zeroing, one `vpaddd` less per token): +2.5 %.
//!
//! # Where the time goes (Zen 3, measured)
//! The tile runs at the instruction-issue limit, not at the multiplier limit: replacing the
//! 3 multiplier-port ops of a (token, quad) by 2 multiplier ops + 1 `vpaddb` (same count) changed
//! nothing, dropping one op per (token, quad) gained 10 %. So only the instruction count per
//! MAC matters. Per (block, token) at NY = 8: 8 × 5 core ops (broadcast, `vpsignb`,
//! `vpmaddubsw`, `vpmaddwd`, `vpaddd`), 5 epilogue ops (broadcast `d_a`, `vmulps`,
//! `vcvtdq2ps`, `vmulps`, `vaddps`; removing them: +12 %) and 28 / NY unpack ops (removing
//! them: +5 %). The core is minimal for exact full-range inputs: no pair of `vpmaddubsw`
//! results can be summed in i16 (2 × 32258 > 2^15) and every weight vector needs its own
//! activation broadcast while lane `r` is row `r`. The epilogue is fixed by the twin's float
//! order. Decode (NY = 1) is compute-bound too on this machine (21 GB/s of weights on one core,
//! ~80 instructions per block), so [`q4_tile1x2`] / [`q8_tile1x2`] run two groups against one
//! activation row and broadcast each quad once for both; the driver pairs gate with up, or
//! group `g` with `g + groups / 2` (two sequential weight streams: pairing `g` with `g + 1`
//! was 15-25 % slower out of cache). Matvec, 1 thread, min of N runs: 1536 × 576 20.5 → 21.8,
//! 49152 × 576 19.3 → 21.4, 16384 × 5120 (out of cache) 12.6 → 17.5 GB/s; q8 1536 × 576
//! 44.3 → 47.1 GB/s.
//!
//! Tried and dropped (min of N runs, 1536 × 576 × 64 tokens, 1 thread, ~55 GMAC/s base):
//! `vpsignb` → `vpxor` + `vpsubb` with a sign mask from `vpcmpgtb` (1 op → 2 light ops): slower;
//! one set of token pointers + fully unrolled chunks: ±0 (more spills); software prefetch of
//! the activations 4/8/16 blocks ahead: −2..−4 %; `TOK_CHUNK` 32 instead of 64: ±0.
//! Format changes (measured, not adopted): activations limited to |a| ≤ 64 and stored with a
//! +64 offset (`vpmaddubsw(a + 64, w)` is exact, the offset undone with the block's Σw):
//! +10 % (the offset added in the kernel instead: ±0); |a| ≤ 32 (two `vpmaddubsw` summed by
//! `vpaddw` before one `vpmaddwd`): +41 % prefill, +37 % decode, before its correction term.
//!
//! Rejected: the +128 offset trick with `vpmaddubsw` (unsigned `w + 128` up to 241 makes a pair
//! up to 61214, which saturates i16; only `vpdpbusd`, which has no i16 stage, can use it).

use core::arch::x86_64::*;

use crate::block::{BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8A, BlockQ8x8, KVALUES, QK, ROWS};
use crate::driver::{Tier, Tile};
use crate::scalar;

/// Proof that the CPU has AVX2, FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2(()))
    }
}

impl Tier for Avx2 {
    unsafe fn assume() -> Self {
        Avx2(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(Avx2, "avx2,fma,f16c");

/// The `Tile` impl of one block type from its kernels: `$tile` (`NY` tokens) and `$tile1x2`
/// (two groups, one token); SiLU through the vector polynomial of `silu_mul_rows`.
macro_rules! avx2_tile {
    ($block:ty, $nymax:expr, $tile:ident, $tile1x2:ident) => {
        impl Tile<$block> for Avx2 {
            const NYMAX: usize = $nymax;
            #[inline]
            fn tile<const NY: usize>(
                self,
                w: &[$block],
                x: &[&[BlockQ8A]; NY],
                out: &mut [[f32; ROWS]; NY],
            ) {
                assert!(x.iter().all(|xt| xt.len() >= w.len()));
                // SAFETY: `self` proves AVX2+FMA+F16C (Avx2::detect); every x[t] holds
                // w.len() blocks.
                unsafe { $tile::<NY>(w, x, out) }
            }

            #[inline]
            fn tile1x2(
                self,
                w0: &[$block],
                w1: &[$block],
                x: &[BlockQ8A],
                out0: &mut [f32; ROWS],
                out1: &mut [f32; ROWS],
            ) {
                assert!(w1.len() == w0.len() && x.len() >= w0.len());
                // SAFETY: as above; w1 and x hold at least w0.len() blocks.
                unsafe { $tile1x2(w0, w1, x, out0, out1) }
            }

            #[inline]
            fn silu_mul<const NY: usize>(self, g: &mut [[f32; ROWS]; NY], u: &[[f32; ROWS]; NY]) {
                // SAFETY: `self` proves AVX2+FMA (Avx2::detect).
                unsafe { silu_mul_rows::<NY>(g, u) }
            }
        }
    };
}

avx2_tile!(BlockQ4x8, 8, q4_tile, q4_tile1x2);
// Q4Lx8: 4 tokens: 4 i16 + 4 f32 accumulators + 2 weight vectors + 2 constants fit the 16 ymm
// registers. Measured (`q4l_gemm64/avx2`, 2048 × 5120 × 64, 1 thread, alternating):
// NY 3 → 161, 4 → 163, 5 → 141, 6 → 143, 8 → 147–152 Gelem/s (spills from 5 on).
avx2_tile!(BlockQ4Lx8, 4, q4l_tile, q4l_tile1x2);
avx2_tile!(BlockQ8x8, 8, q8_tile, q8_tile1x2);
// Q6x8: 4 tokens, as Q4Lx8 (4 i32 sums + 2 unpacked chunks + 3 constants).
avx2_tile!(BlockQ6x8, 4, q6_tile, q6_tile1x2);

/// The 16 levels in both 128-bit lanes (vpshufb looks up within each lane).
static KV32: [i8; 32] = {
    let mut t = [0i8; 32];
    let mut i = 0;
    while i < 32 {
        t[i] = KVALUES[i % 16];
        i += 1;
    }
    t
};

/// Quad `i` (4 activation bytes) of a block broadcast to all 8 lanes.
#[inline(always)]
unsafe fn quad(a: &BlockQ8A, i: usize) -> __m256i {
    let p = a.qs.as_ptr().add(i * 4) as *const i32;
    _mm256_set1_epi32(p.read_unaligned())
}

/// The 8 row scales of a block as f32.
#[inline(always)]
unsafe fn scales(d: &[u16; ROWS]) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i))
}

/// `acc + (dw · da) · (f32)isum`: a block's contribution, in the twin's float order (no FMA).
#[inline(always)]
unsafe fn acc_block(acc: __m256, dw: __m256, da: __m256, isum: __m256i) -> __m256 {
    _mm256_add_ps(
        acc,
        _mm256_mul_ps(_mm256_mul_ps(dw, da), _mm256_cvtepi32_ps(isum)),
    )
}

/// `Σ_4 w·a` per i32 lane, with `wabs = |w|`.
#[inline(always)]
unsafe fn dot4(wabs: __m256i, w: __m256i, a: __m256i, ones: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, _mm256_sign_epi8(a, w)), ones)
}

/// # Safety
/// * The CPU supports AVX2, FMA and F16C.
/// * `x[t].len() >= w.len()` for every `t`.
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // the indexed loop compiles 2.5 % faster than iter_mut at NY = 8
unsafe fn q4_tile<const NY: usize>(
    w: &[BlockQ4x8],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let tbl = _mm256_loadu_si256(KV32.as_ptr() as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        // chunk c's 16 products of token t: low nibbles × quad c, high nibbles × quad 4 + c
        let unpack = |c: usize| {
            let raw = _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
            let lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(raw, m4));
            let hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
            (lo, hi, _mm256_abs_epi8(lo), _mm256_abs_epi8(hi))
        };
        let chunk =
            |c: usize, t: usize, (lo, hi, lo_abs, hi_abs): (__m256i, __m256i, __m256i, __m256i)| {
                let a = x[t].get_unchecked(b);
                _mm256_add_epi32(
                    dot4(lo_abs, lo, quad(a, c), ones),
                    dot4(hi_abs, hi, quad(a, 4 + c), ones),
                )
            };
        // chunk 0 initializes the sums (no zeroing, one add less per token)
        let u = unpack(0);
        let mut isum: [__m256i; NY] = core::array::from_fn(|t| chunk(0, t, u));
        for c in 1..4 {
            let u = unpack(c);
            for t in 0..NY {
                isum[t] = _mm256_add_epi32(isum[t], chunk(c, t, u));
            }
        }
        let dw = scales(&blk.d);
        for t in 0..NY {
            let da = _mm256_set1_ps(x[t].get_unchecked(b).d);
            acc[t] = acc_block(acc[t], dw, da, isum[t]);
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// Two Q4x8 groups against one activation row: `q4_tile::<1>` for each group, with each
/// activation quad broadcast once for both (8 of the ~80 instructions per group and block).
///
/// # Safety
/// * The CPU supports AVX2, FMA and F16C.
/// * `w1.len() == w0.len()` and `x.len() >= w0.len()`.
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_tile1x2(
    w0: &[BlockQ4x8],
    w1: &[BlockQ4x8],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let tbl = _mm256_loadu_si256(KV32.as_ptr() as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (b, (k0, k1)) in w0.iter().zip(w1).enumerate() {
        let a = x.get_unchecked(b);
        let unpack = |blk: &BlockQ4x8, c: usize| {
            let raw = _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
            let lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(raw, m4));
            let hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
            (lo, hi)
        };
        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for c in 0..4 {
            let (qa, qb) = (quad(a, c), quad(a, 4 + c));
            let (lo, hi) = unpack(k0, c);
            let p0 = _mm256_add_epi32(
                dot4(_mm256_abs_epi8(lo), lo, qa, ones),
                dot4(_mm256_abs_epi8(hi), hi, qb, ones),
            );
            let (lo, hi) = unpack(k1, c);
            let p1 = _mm256_add_epi32(
                dot4(_mm256_abs_epi8(lo), lo, qa, ones),
                dot4(_mm256_abs_epi8(hi), hi, qb, ones),
            );
            (s0, s1) = if c == 0 {
                (p0, p1)
            } else {
                (_mm256_add_epi32(s0, p0), _mm256_add_epi32(s1, p1))
            };
        }
        let da = _mm256_set1_ps(a.d);
        acc0 = acc_block(acc0, scales(&k0.d), da, s0);
        acc1 = acc_block(acc1, scales(&k1.d), da, s1);
    }
    _mm256_storeu_ps(out0.as_mut_ptr(), acc0);
    _mm256_storeu_ps(out1.as_mut_ptr(), acc1);
}

/// `Σ_4 q·a` per i16 pair of a chunk: unsigned nibbles × signed activations. A pair is at most
/// 2 · 15 · 128 = 3840, so eight of them (a whole block) sum in i16 without saturation.
#[inline(always)]
unsafe fn dot4l(q: __m256i, a: __m256i) -> __m256i {
    _mm256_maddubs_epi16(q, a)
}

/// `isum = Σ q·a − 8 · Σa` = `Σ (q − 8)·a`, exactly the twin's `Σ LVALUES[q]·a`: the i16 pair
/// sums of the block widened once (`vpmaddwd` by ones), minus the offset term.
#[inline(always)]
unsafe fn finish_l(s16: __m256i, a: &BlockQ8A, ones: __m256i) -> __m256i {
    _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(a.sum8))
}

/// Linear 4-bit tile (`Q4Lx8`): the nibbles are the unsigned `vpmaddubsw` operand as they are.
/// Per (block, token): 8 × (broadcast, `vpmaddubsw`), 7 `vpaddw`, one `vpmaddwd`, the offset
/// (broadcast of `BlockQ8A::sum8`, `vpsubd`) and the float epilogue: ~29 instructions instead
/// of ~45 for `Q4x8`. Measured (`q4l_gemm64/avx2` vs `q4_gemm64/avx2`, 2048 × 5120 × 64
/// tokens, 1 thread): 174 vs 114 Gelem/s (1.5×); in-cache matvec (`q4l_matvec`, 1536 × 576)
/// 34 vs 20 GB/s. The offset stored ready as `8 · Σa` (one broadcast from memory instead of
/// load, shift, `vmovd`, `vpbroadcastd` per block and token): 163–165 → 173–175 Gelem/s,
/// alternating. Tried and slower (standalone copies of this loop, 2048 × 5120 × 64, 1 thread):
/// two groups × 2 tokens sharing each broadcast 79 vs 90 GMAC/s (spills); activations stored
/// pre-broadcast (a plain 32-byte load per quad) 47, with k-blocking to keep them in L1 64;
/// NY 5 153–165 vs 178 Gelem/s.
///
/// # Safety
/// Same as [`q4_tile`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // as in q4_tile
unsafe fn q4l_tile<const NY: usize>(
    w: &[BlockQ4Lx8],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        let unpack = |c: usize| {
            let raw = _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
            (
                _mm256_and_si256(raw, m4),
                _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
            )
        };
        let chunk = |c: usize, t: usize, (lo, hi): (__m256i, __m256i)| {
            let a = x[t].get_unchecked(b);
            _mm256_add_epi16(dot4l(lo, quad(a, c)), dot4l(hi, quad(a, 4 + c)))
        };
        let u = unpack(0);
        let mut s16: [__m256i; NY] = core::array::from_fn(|t| chunk(0, t, u));
        for c in 1..4 {
            let u = unpack(c);
            for t in 0..NY {
                s16[t] = _mm256_add_epi16(s16[t], chunk(c, t, u));
            }
        }
        let dw = scales(&blk.d);
        for t in 0..NY {
            let a = x[t].get_unchecked(b);
            let isum = finish_l(s16[t], a, ones);
            acc[t] = acc_block(acc[t], dw, _mm256_set1_ps(a.d), isum);
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// Two `Q4Lx8` groups against one activation row (the decode case of [`q4l_tile`]).
///
/// # Safety
/// Same as [`q4_tile1x2`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4l_tile1x2(
    w0: &[BlockQ4Lx8],
    w1: &[BlockQ4Lx8],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (b, (k0, k1)) in w0.iter().zip(w1).enumerate() {
        let a = x.get_unchecked(b);
        let part = |blk: &BlockQ4Lx8, c: usize, qa: __m256i, qb: __m256i| {
            let raw = _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
            let lo = _mm256_and_si256(raw, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            _mm256_add_epi16(dot4l(lo, qa), dot4l(hi, qb))
        };
        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for c in 0..4 {
            let (qa, qb) = (quad(a, c), quad(a, 4 + c));
            let (p0, p1) = (part(k0, c, qa, qb), part(k1, c, qa, qb));
            (s0, s1) = if c == 0 {
                (p0, p1)
            } else {
                (_mm256_add_epi16(s0, p0), _mm256_add_epi16(s1, p1))
            };
        }
        let da = _mm256_set1_ps(a.d);
        acc0 = acc_block(acc0, scales(&k0.d), da, finish_l(s0, a, ones));
        acc1 = acc_block(acc1, scales(&k1.d), da, finish_l(s1, a, ones));
    }
    _mm256_storeu_ps(out0.as_mut_ptr(), acc0);
    _mm256_storeu_ps(out1.as_mut_ptr(), acc1);
}

/// # Safety
/// Same as [`q4_tile`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_tile<const NY: usize>(
    w: &[BlockQ8x8],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        let load = |c: usize| _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
        // |-128| = 0x80 is 128 as the unsigned operand: still exact
        let (w0, w1) = (load(0), load(1));
        let (a0, a1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
        // chunks 0 and 1 initialize the sums (no zeroing, one add less per token)
        let mut isum: [__m256i; NY] = core::array::from_fn(|t| {
            let a = x[t].get_unchecked(b);
            _mm256_add_epi32(
                dot4(a0, w0, quad(a, 0), ones),
                dot4(a1, w1, quad(a, 1), ones),
            )
        });
        for c in 2..8 {
            let wv = load(c);
            let wabs = _mm256_abs_epi8(wv);
            for t in 0..NY {
                let d = dot4(wabs, wv, quad(x[t].get_unchecked(b), c), ones);
                isum[t] = _mm256_add_epi32(isum[t], d);
            }
        }
        let dw = scales(&blk.d);
        for t in 0..NY {
            let da = _mm256_set1_ps(x[t].get_unchecked(b).d);
            acc[t] = acc_block(acc[t], dw, da, isum[t]);
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// Two Q8x8 groups against one activation row, each quad broadcast once for both.
///
/// # Safety
/// Same as [`q4_tile1x2`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_tile1x2(
    w0: &[BlockQ8x8],
    w1: &[BlockQ8x8],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (b, (k0, k1)) in w0.iter().zip(w1).enumerate() {
        let a = x.get_unchecked(b);
        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for c in 0..8 {
            let qa = quad(a, c);
            let v0 = _mm256_loadu_si256(k0.qs.as_ptr().add(c * 32) as *const __m256i);
            let v1 = _mm256_loadu_si256(k1.qs.as_ptr().add(c * 32) as *const __m256i);
            let p0 = dot4(_mm256_abs_epi8(v0), v0, qa, ones);
            let p1 = dot4(_mm256_abs_epi8(v1), v1, qa, ones);
            (s0, s1) = if c == 0 {
                (p0, p1)
            } else {
                (_mm256_add_epi32(s0, p0), _mm256_add_epi32(s1, p1))
            };
        }
        let da = _mm256_set1_ps(a.d);
        acc0 = acc_block(acc0, scales(&k0.d), da, s0);
        acc1 = acc_block(acc1, scales(&k1.d), da, s1);
    }
    _mm256_storeu_ps(out0.as_mut_ptr(), acc0);
    _mm256_storeu_ps(out1.as_mut_ptr(), acc1);
}

/// The unsigned 6-bit values `u` (0..64) of chunks `2p` and `2p + 1` of a `Q6x8` block, lane
/// `r` = row `r`: the low 4 bits are the nibbles of `ql` chunks `2p % 4`, `(2p + 1) % 4` (low
/// nibbles for `p < 2`, high for `p ≥ 2`), the high 2 bits are bits `2p..2p+2` of `qh` chunks 0
/// and 1 moved to bits 4–5 (a 16-bit shift, then the mask drops what crossed a byte).
#[inline(always)]
pub(crate) unsafe fn q6_pair(
    blk: &BlockQ6x8,
    p: usize,
    m4: __m256i,
    m30: __m256i,
) -> (__m256i, __m256i) {
    // no closures here: this function has no target features of its own, and a closure body
    // would be compiled without them (the intrinsics become calls; measured 3x slower)
    let ql = blk.ql.as_ptr();
    let l0 = _mm256_loadu_si256(ql.add((2 * p % 4) * 32) as *const __m256i);
    let l1 = _mm256_loadu_si256(ql.add(((2 * p + 1) % 4) * 32) as *const __m256i);
    let (l0, l1) = if p < 2 {
        (l0, l1)
    } else {
        (_mm256_srli_epi16(l0, 4), _mm256_srli_epi16(l1, 4))
    };
    let h0 = _mm256_loadu_si256(blk.qh.as_ptr() as *const __m256i);
    let h1 = _mm256_loadu_si256(blk.qh.as_ptr().add(32) as *const __m256i);
    let (h0, h1) = match p {
        0 => (_mm256_slli_epi16(h0, 4), _mm256_slli_epi16(h1, 4)),
        1 => (_mm256_slli_epi16(h0, 2), _mm256_slli_epi16(h1, 2)),
        2 => (h0, h1),
        _ => (_mm256_srli_epi16(h0, 2), _mm256_srli_epi16(h1, 2)),
    };
    (
        _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(h0, m30)),
        _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(h1, m30)),
    )
}

/// `Σ u·a` of chunks `2p`, `2p + 1` per i32 lane: two `vpmaddubsw` (unsigned `u` ≤ 63 ×
/// signed `a`: a pair is at most 2 · 63 · 128 = 16128, so two pairs sum in i16 without
/// saturation), one `vpaddw`, one `vpmaddwd`.
#[inline(always)]
unsafe fn dot8_q6(u: (__m256i, __m256i), qa: __m256i, qb: __m256i, ones: __m256i) -> __m256i {
    let s16 = _mm256_add_epi16(_mm256_maddubs_epi16(u.0, qa), _mm256_maddubs_epi16(u.1, qb));
    _mm256_madd_epi16(s16, ones)
}

/// `isum = Σ u·a − 32 · Σa` = `Σ (u − 32)·a`, the twin's integer sum (`32 Σa = 4 · sum8`).
#[inline(always)]
unsafe fn finish_q6(s32: __m256i, a: &BlockQ8A) -> __m256i {
    _mm256_sub_epi32(s32, _mm256_set1_epi32(a.sum8 << 2))
}

/// 6-bit tile (`Q6x8`): per block, four chunk pairs unpacked once ([`q6_pair`], ~9
/// instructions each) and shared by the `NY` tokens; per (block, token) 8 broadcasts,
/// 8 `vpmaddubsw`, 4 `vpaddw`, 4 `vpmaddwd`, 3 `vpaddd`, the offset and the float epilogue.
///
/// # Safety
/// Same as [`q4_tile`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::needless_range_loop)] // as in q4_tile
unsafe fn q6_tile<const NY: usize>(
    w: &[BlockQ6x8],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        let part = |p: usize, t: usize, u: (__m256i, __m256i)| {
            let a = x[t].get_unchecked(b);
            dot8_q6(u, quad(a, 2 * p), quad(a, 2 * p + 1), ones)
        };
        let u = q6_pair(blk, 0, m4, m30);
        let mut s32: [__m256i; NY] = core::array::from_fn(|t| part(0, t, u));
        for p in 1..4 {
            let u = q6_pair(blk, p, m4, m30);
            for t in 0..NY {
                s32[t] = _mm256_add_epi32(s32[t], part(p, t, u));
            }
        }
        let dw = scales(&blk.d);
        for t in 0..NY {
            let a = x[t].get_unchecked(b);
            acc[t] = acc_block(acc[t], dw, _mm256_set1_ps(a.d), finish_q6(s32[t], a));
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// Two `Q6x8` groups against one activation row (the decode case of [`q6_tile`]), each quad
/// broadcast once for both.
///
/// # Safety
/// Same as [`q4_tile1x2`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_tile1x2(
    w0: &[BlockQ6x8],
    w1: &[BlockQ6x8],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let ones = _mm256_set1_epi16(1);
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (b, (k0, k1)) in w0.iter().zip(w1).enumerate() {
        let a = x.get_unchecked(b);
        let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for p in 0..4 {
            let (qa, qb) = (quad(a, 2 * p), quad(a, 2 * p + 1));
            let p0 = dot8_q6(q6_pair(k0, p, m4, m30), qa, qb, ones);
            let p1 = dot8_q6(q6_pair(k1, p, m4, m30), qa, qb, ones);
            (s0, s1) = if p == 0 {
                (p0, p1)
            } else {
                (_mm256_add_epi32(s0, p0), _mm256_add_epi32(s1, p1))
            };
        }
        let da = _mm256_set1_ps(a.d);
        acc0 = acc_block(acc0, scales(&k0.d), da, finish_q6(s0, a));
        acc1 = acc_block(acc1, scales(&k1.d), da, finish_q6(s1, a));
    }
    _mm256_storeu_ps(out0.as_mut_ptr(), acc0);
    _mm256_storeu_ps(out1.as_mut_ptr(), acc1);
}

// ---------------------------------------------------------------------------------------------
// Activation quantization: amax by vmaxps, q = cvtps2dq(round_even(x · 127/amax)), packed to
// int8 with saturation and a final max(-127); identical to the twin for finite inputs.
// ---------------------------------------------------------------------------------------------

pub(crate) fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    assert_eq!(x.len() % QK, 0);
    assert!(out.len() >= x.len() / QK);
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // lengths checked above.
    unsafe { quantize_q8a_impl(x, out) }
}

/// # Safety
/// * AVX2 + FMA + F16C available.
/// * `x.len() % 32 == 0`, `out.len() >= x.len() / 32`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8a_impl(x: &[f32], out: &mut [BlockQ8A]) {
    let absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], absm), _mm256_and_ps(v[1], absm)),
            _mm256_max_ps(_mm256_and_ps(v[2], absm), _mm256_and_ps(v[3], absm)),
        );
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
        let amax = _mm_cvtss_f32(m1);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        const RN: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        // NaN → 0 and ±inf → ±127 like the twin's `as i32` + clamp (amax subnormal makes
        // id = inf); then the clamp keeps cvtps2dq in range.
        let (lo, hi) = (_mm256_set1_ps(-127.0), _mm256_set1_ps(127.0));
        let q: [__m256i; 4] = core::array::from_fn(|i| {
            let r = _mm256_round_ps::<RN>(_mm256_mul_ps(v[i], id));
            let r = _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r));
            _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi))
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b00_00_00_01));
        let p16a = _mm256_packs_epi32(q[0], q[1]);
        let p16b = _mm256_packs_epi32(q[2], q[3]);
        let p8 = _mm256_packs_epi16(p16a, p16b);
        let p8 = _mm256_permutevar8x32_epi32(p8, perm);
        let p8 = _mm256_max_epi8(p8, _mm256_set1_epi8(-127));
        _mm256_storeu_si256(ob.qs.as_mut_ptr() as *mut __m256i, p8);
        ob.d = d;
        ob.sum8 = 8 * _mm_cvtsi128_si32(s1);
    }
}

// ---------------------------------------------------------------------------------------------
// Float vector ops: 4 × 8 lanes with FMA, lanes summed at the end (tolerance tests: the sum is
// reassociated relative to the twin). axpy is multiply-then-add (bit-identical to the twin).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// Dot product where `load(i)` gives 8 weights at element `i` as f32.
#[inline(always)]
unsafe fn dot_with(n: usize, load: impl Fn(usize) -> __m256, b: *const f32) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(load(i + 8 * u), _mm256_loadu_ps(b.add(i + 8 * u)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(b.add(i)), acc[0]);
        i += 8;
    }
    _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))
}

/// Which 16-bit float the weights hold.
#[derive(Clone, Copy, PartialEq)]
enum H16 {
    Bf16,
    F16,
}

#[allow(clippy::too_many_arguments)]
fn gemm_w(
    kind: Option<H16>,
    w32: &[f32],
    w16: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    match kind {
        None => assert!(w32.len() >= n_rows * k),
        Some(_) => assert!(w16.len() >= n_rows * k),
    }
    assert!(x.len() >= n_tok * k);
    if n_tok > 0 {
        assert!(y.len() >= (n_tok - 1) * ld_y + n_rows);
    }
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`); lengths asserted.
    unsafe { gemm_w_impl(kind, w32, w16, n_rows, k, x, n_tok, y, ld_y) }
}

/// Rows outer (a weight row is read from memory once), tokens inner.
///
/// # Safety
/// * AVX2 + FMA + F16C available.
/// * The weights hold `n_rows * k` values of the kind selected, `x` holds `n_tok * k`,
///   `y` holds `(n_tok - 1) * ld_y + n_rows`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_w_impl(
    kind: Option<H16>,
    w32: &[f32],
    w16: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    let tail = k - k % 8;
    for r in 0..n_rows {
        for t in 0..n_tok {
            let xp = x.as_ptr().add(t * k);
            let v = match kind {
                None => {
                    let p = w32.as_ptr().add(r * k);
                    dot_with(k, |i| _mm256_loadu_ps(p.add(i)), xp)
                }
                Some(H16::Bf16) => {
                    let p = w16.as_ptr().add(r * k);
                    dot_with(
                        k,
                        |i| {
                            let h = _mm_loadu_si128(p.add(i) as *const __m128i);
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                        },
                        xp,
                    )
                }
                Some(H16::F16) => {
                    let p = w16.as_ptr().add(r * k);
                    dot_with(
                        k,
                        |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i)),
                        xp,
                    )
                }
            };
            let mut s = hsum(v);
            for j in tail..k {
                let wj = match kind {
                    None => w32[r * k + j],
                    Some(H16::Bf16) => half::bf16::from_bits(w16[r * k + j]).to_f32(),
                    Some(H16::F16) => half::f16::from_bits(w16[r * k + j]).to_f32(),
                };
                s += wj * x[t * k + j];
            }
            y[t * ld_y + r] = s;
        }
    }
}

pub(crate) fn gemm_f32(
    w: &[f32],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_w(None, w, &[], n_rows, k, x, n_tok, y, ld_y);
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
    gemm_w(Some(H16::Bf16), &[], w, n_rows, k, x, n_tok, y, ld_y);
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
    gemm_w(Some(H16::F16), &[], w, n_rows, k, x, n_tok, y, ld_y);
}

// ---------------------------------------------------------------------------------------------
// Attention: scores of one query against 4 keys at a time (4 FMA chains, one `vhaddps`
// transpose-reduce for the 4 sums), and the value sum with the output row held in registers
// (per element the twin's order: `o = o + p·v` for keys in order, so it is bit-identical).
// ---------------------------------------------------------------------------------------------

/// A KV-cache element: f32 or f16 bits.
trait Kv: Copy {
    /// 8 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX2 + F16C available; `p..p + 8` readable.
    unsafe fn load8(p: *const Self) -> __m256;
    fn f32(self) -> f32;
}

impl Kv for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Kv for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

impl Kv for i8 {
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self as f32
    }
}

pub(crate) fn attn_scores_i8(q: &[f32], k: &[i8], ld_k: usize, scale: f32, s: &mut [f32]) {
    attn_scores_t(q, k, ld_k, scale, s)
}

pub(crate) fn attn_values_i8(p: &[f32], v: &[i8], ld_v: usize, o: &mut [f32]) {
    attn_values_t(p, v, ld_v, o)
}

/// The 32 values of one full 4-bit KV block at `p` (16 bytes), codes minus 8, as f32:
/// elements 0..8, 8..16 (low nibbles), 16..24, 24..32 (high nibbles).
///
/// # Safety
/// AVX2 available; `p..p + 16` readable.
#[inline(always)]
unsafe fn kv_q4_block(p: *const u8) -> [__m256; 4] {
    let x = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(15);
    let lo = _mm_and_si128(x, m);
    let hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    // (no closure here: its body would be compiled without the caller's target features)
    [
        kv_q4_codes8(lo),
        kv_q4_codes8(_mm_srli_si128(lo, 8)),
        kv_q4_codes8(hi),
        kv_q4_codes8(_mm_srli_si128(hi, 8)),
    ]
}

/// The low 8 bytes of `v` (codes 0..15) minus 8, as f32.
///
/// # Safety
/// AVX2 available.
#[inline(always)]
unsafe fn kv_q4_codes8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_sub_epi32(
        _mm256_cvtepu8_epi32(v),
        _mm256_set1_epi32(8),
    ))
}

/// Bounds of a 4-bit KV call: `n` rows of `d` values, row `j` at `x[j * ld ..]` (16 bytes per
/// block) with its scales at `xs[j * ld_s ..]`.
fn q4_rows_fit(x: &[u8], xs: &[u16], ld: usize, ld_s: usize, d: usize, n: usize) -> bool {
    let nb = d.div_ceil(scalar::KV_Q4_BLOCK);
    n == 0
        || ((n - 1)
            .checked_mul(ld)
            .and_then(|o| o.checked_add(nb * scalar::KV_Q4_BYTES))
            .is_some_and(|e| e <= x.len())
            && (n - 1)
                .checked_mul(ld_s)
                .and_then(|o| o.checked_add(nb))
                .is_some_and(|e| e <= xs.len()))
}

pub(crate) fn attn_scores_q4(
    q: &[f32],
    k: &[u8],
    ks: &[u16],
    ld_k: usize,
    ld_s: usize,
    scale: f32,
    s: &mut [f32],
) {
    assert!(
        q4_rows_fit(k, ks, ld_k, ld_s, q.len(), s.len()),
        "attn_scores_q4: keys too short"
    );
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`); key row
    // j < s.len() spans k[j * ld_k ..][..nb * 16] and ks[j * ld_s ..][..nb], inside the
    // slices by the assertion.
    unsafe { attn_scores_q4_impl(q, k, ks, ld_k, ld_s, scale, s) }
}

/// # Safety
/// AVX2 + FMA + F16C available; the rows fit ([`q4_rows_fit`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_scores_q4_impl(
    q: &[f32],
    k: &[u8],
    ks: &[u16],
    ld_k: usize,
    ld_s: usize,
    scale: f32,
    s: &mut [f32],
) {
    let d = q.len();
    let full = d / scalar::KV_Q4_BLOCK;
    let qp = q.as_ptr();
    for (j, sj) in s.iter_mut().enumerate() {
        let kr = k.as_ptr().add(j * ld_k);
        let sr = ks.as_ptr().add(j * ld_s);
        let mut acc = 0.0f32;
        for b in 0..full {
            let v = kv_q4_block(kr.add(b * scalar::KV_Q4_BYTES));
            let qb = qp.add(b * scalar::KV_Q4_BLOCK);
            let a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb), v[0], _mm256_setzero_ps());
            let a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(8)), v[1], _mm256_setzero_ps());
            let a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(16)), v[2], a0);
            let a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(24)), v[3], a1);
            acc += hsum(_mm256_add_ps(a0, a1)) * half::f16::from_bits(*sr.add(b)).to_f32();
        }
        if full * scalar::KV_Q4_BLOCK < d {
            let blk = core::slice::from_raw_parts(
                kr.add(full * scalar::KV_Q4_BYTES),
                scalar::KV_Q4_BYTES,
            );
            let mut sb = 0.0f32;
            for (c, &x) in q[full * scalar::KV_Q4_BLOCK..].iter().enumerate() {
                sb += x * (scalar::kv_q4_code(blk, c) as i32 - 8) as f32;
            }
            acc += sb * half::f16::from_bits(*sr.add(full)).to_f32();
        }
        *sj = acc * scale;
    }
}

pub(crate) fn attn_values_q4(
    p: &[f32],
    v: &[u8],
    vs: &[u16],
    ld_v: usize,
    ld_s: usize,
    o: &mut [f32],
) {
    assert!(
        q4_rows_fit(v, vs, ld_v, ld_s, o.len(), p.len()),
        "attn_values_q4: values too short"
    );
    // SAFETY: AVX2 proven (only the AVX2 table reaches this); value row j < p.len() spans
    // v[j * ld_v ..][..nb * 16] and vs[j * ld_s ..][..nb], inside the slices by the assertion.
    unsafe { attn_values_q4_impl(p, v, vs, ld_v, ld_s, o) }
}

/// # Safety
/// AVX2 + F16C available; the rows fit ([`q4_rows_fit`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_values_q4_impl(
    p: &[f32],
    v: &[u8],
    vs: &[u16],
    ld_v: usize,
    ld_s: usize,
    o: &mut [f32],
) {
    let d = o.len();
    let full = d / scalar::KV_Q4_BLOCK;
    let op = o.as_mut_ptr();
    // per full block: its 32 outputs in 4 registers across all keys (per element the twin's
    // order: `o = o + w·x` for keys in order, no fused multiply-add)
    for b in 0..full {
        let ob = op.add(b * scalar::KV_Q4_BLOCK);
        let mut acc: [__m256; 4] = core::array::from_fn(|u| _mm256_loadu_ps(ob.add(8 * u)));
        for (j, &pj) in p.iter().enumerate() {
            let w = pj * half::f16::from_bits(*vs.as_ptr().add(j * ld_s + b)).to_f32();
            let wv = _mm256_set1_ps(w);
            let x = kv_q4_block(v.as_ptr().add(j * ld_v + b * scalar::KV_Q4_BYTES));
            for (a, x) in acc.iter_mut().zip(x) {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, x));
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(ob.add(8 * u), *a);
        }
    }
    if full * scalar::KV_Q4_BLOCK < d {
        let tail = &mut o[full * scalar::KV_Q4_BLOCK..];
        for (j, &pj) in p.iter().enumerate() {
            let w = pj * half::f16::from_bits(vs[j * ld_s + full]).to_f32();
            let at = j * ld_v + full * scalar::KV_Q4_BYTES;
            let blk = &v[at..at + scalar::KV_Q4_BYTES];
            for (c, oc) in tail.iter_mut().enumerate() {
                *oc += w * (scalar::kv_q4_code(blk, c) as i32 - 8) as f32;
            }
        }
    }
}

pub(crate) fn attn_scores_f16(q: &[f32], k: &[u16], ld_k: usize, scale: f32, s: &mut [f32]) {
    attn_scores_t(q, k, ld_k, scale, s)
}

pub(crate) fn attn_values_f16(p: &[f32], v: &[u16], ld_v: usize, o: &mut [f32]) {
    attn_values_t(p, v, ld_v, o)
}

pub(crate) fn attn_scores(q: &[f32], k: &[f32], ld_k: usize, scale: f32, s: &mut [f32]) {
    attn_scores_t(q, k, ld_k, scale, s)
}

fn attn_scores_t<E: Kv>(q: &[f32], k: &[E], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    if let Some(n) = s.len().checked_sub(1) {
        assert!(k.len() >= n * ld_k + d, "attn_scores: keys too short");
    }
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // key row j < s.len() spans k[j * ld_k .. j * ld_k + d],
    // inside `k` by the assertion.
    unsafe { attn_scores_impl(q, k, ld_k, scale, s) }
}

/// # Safety
/// AVX2 + FMA available; `k.len() >= (s.len() - 1) * ld_k + q.len()` when `s` is not empty.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_scores_impl<E: Kv>(q: &[f32], k: &[E], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    let d8 = d - d % 8;
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let n = s.len();
    let mut j = 0;
    while j + 4 <= n {
        let kr: [*const E; 4] = core::array::from_fn(|u| kp.add((j + u) * ld_k));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < d8 {
            let qv = _mm256_loadu_ps(qp.add(c));
            for u in 0..4 {
                acc[u] = _mm256_fmadd_ps(qv, E::load8(kr[u].add(c)), acc[u]);
            }
            c += 8;
        }
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h = _mm256_hadd_ps(h01, h23);
        let mut r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if d8 < d {
            let mut t = [0.0f32; 4];
            for (u, tu) in t.iter_mut().enumerate() {
                for cc in d8..d {
                    *tu += *qp.add(cc) * (*kr[u].add(cc)).f32();
                }
            }
            r = _mm_add_ps(r, _mm_loadu_ps(t.as_ptr()));
        }
        _mm_storeu_ps(s.as_mut_ptr().add(j), _mm_mul_ps(r, _mm_set1_ps(scale)));
        j += 4;
    }
    while j < n {
        let kr = kp.add(j * ld_k);
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < d8 {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), E::load8(kr.add(c)), acc);
            c += 8;
        }
        let mut t = hsum(acc);
        for cc in d8..d {
            t += *qp.add(cc) * (*kr.add(cc)).f32();
        }
        s[j] = t * scale;
        j += 1;
    }
}

pub(crate) fn attn_values(p: &[f32], v: &[f32], ld_v: usize, o: &mut [f32]) {
    attn_values_t(p, v, ld_v, o)
}

fn attn_values_t<E: Kv>(p: &[f32], v: &[E], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    if let Some(n) = p.len().checked_sub(1) {
        assert!(v.len() >= n * ld_v + d, "attn_values: values too short");
    }
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // value row j < p.len() spans v[j * ld_v .. j * ld_v + d],
    // inside `v` by the assertion.
    unsafe { attn_values_impl(p, v, ld_v, o) }
}

/// # Safety
/// AVX2 available; `v.len() >= (p.len() - 1) * ld_v + o.len()` when `p` is not empty.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_values_impl<E: Kv>(p: &[f32], v: &[E], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    let (vp, op) = (v.as_ptr(), o.as_mut_ptr());
    let mut c = 0;
    // 64 columns in 8 registers, then 8 at a time, then scalar
    while c + 64 <= d {
        let mut acc: [__m256; 8] = core::array::from_fn(|u| _mm256_loadu_ps(op.add(c + 8 * u)));
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            let row = vp.add(j * ld_v + c);
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, E::load8(row.add(8 * u))));
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(c + 8 * u), *a);
        }
        c += 64;
    }
    while c + 8 <= d {
        let mut a = _mm256_loadu_ps(op.add(c));
        for (j, &pj) in p.iter().enumerate() {
            let x = E::load8(vp.add(j * ld_v + c));
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(pj), x));
        }
        _mm256_storeu_ps(op.add(c), a);
        c += 8;
    }
    for cc in c..d {
        let mut a = *op.add(cc);
        for (j, &pj) in p.iter().enumerate() {
            a += pj * (*vp.add(j * ld_v + cc)).f32();
        }
        *op.add(cc) = a;
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill attention: scores of a block of query rows against a tile of keys stored transposed
// (`kt[c * n + j]`), 4 rows × 16 keys per register block (8 FMA chains, a broadcast query
// element times two key vectors: no horizontal sum), and the online-softmax step with a
// polynomial exp.
// ---------------------------------------------------------------------------------------------

pub(crate) fn attn_scores_kt(q: &[f32], kt: &[f32], d: usize, n: usize, scale: f32, s: &mut [f32]) {
    if d == 0 || n == 0 {
        return crate::scalar::attn_scores_kt(q, kt, d, n, scale, s);
    }
    let rows = q.len() / d;
    assert!(kt.len() >= d * n, "attn_scores_kt: keys too short");
    assert!(s.len() >= rows * n, "attn_scores_kt: scores too short");
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // rows read q[..rows * d], keys kt[..d * n], scores are
    // written in s[..rows * n], all inside the slices by the assertions.
    unsafe { attn_scores_kt_impl(q.as_ptr(), rows, kt.as_ptr(), d, n, scale, s.as_mut_ptr()) }
}

/// # Safety
/// AVX2 + FMA available; `q` has `rows * d` readable floats, `kt` `d * n`, `s` `rows * n`
/// writable.
#[target_feature(enable = "avx2,fma")]
unsafe fn attn_scores_kt_impl(
    q: *const f32,
    rows: usize,
    kt: *const f32,
    d: usize,
    n: usize,
    scale: f32,
    s: *mut f32,
) {
    let mut r = 0;
    while r + 4 <= rows {
        scores_kt_rows::<4>(q.add(r * d), kt, d, n, scale, s.add(r * n));
        r += 4;
    }
    while r < rows {
        scores_kt_rows::<1>(q.add(r * d), kt, d, n, scale, s.add(r * n));
        r += 1;
    }
}

/// `R` rows of [`attn_scores_kt_impl`].
#[inline(always)]
unsafe fn scores_kt_rows<const R: usize>(
    q: *const f32,
    kt: *const f32,
    d: usize,
    n: usize,
    scale: f32,
    s: *mut f32,
) {
    let vs = _mm256_set1_ps(scale);
    let mut j = 0;
    while j + 16 <= n {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..d {
            let k0 = _mm256_loadu_ps(kt.add(c * n + j));
            let k1 = _mm256_loadu_ps(kt.add(c * n + j + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_broadcast_ss(&*q.add(r * d + c));
                a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * n + j), _mm256_mul_ps(a[0], vs));
            _mm256_storeu_ps(s.add(r * n + j + 8), _mm256_mul_ps(a[1], vs));
        }
        j += 16;
    }
    if j + 8 <= n {
        let mut acc = [_mm256_setzero_ps(); R];
        for c in 0..d {
            let k0 = _mm256_loadu_ps(kt.add(c * n + j));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q.add(r * d + c)), k0, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * n + j), _mm256_mul_ps(*a, vs));
        }
        j += 8;
    }
    for jj in j..n {
        for r in 0..R {
            let mut t = 0.0f32;
            for c in 0..d {
                t += *q.add(r * d + c) * *kt.add(c * n + jj);
            }
            *s.add(r * n + jj) = t * scale;
        }
    }
}

pub(crate) fn attn_values_rows(
    p: &[f32],
    n: usize,
    v: &[f32],
    ld_v: usize,
    d: usize,
    o: &mut [f32],
) {
    if d == 0 || n == 0 {
        return;
    }
    let rows = o.len() / d;
    assert!(p.len() >= rows * n, "attn_values_rows: weights too short");
    assert!(
        v.len() >= (n - 1) * ld_v + d,
        "attn_values_rows: values too short"
    );
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // row r reads p[r * n..][..n] and writes o[r * d..][..d],
    // value row j < n spans v[j * ld_v..][..d]: inside the slices by the assertions.
    unsafe { attn_values_rows_impl(p.as_ptr(), n, v.as_ptr(), ld_v, d, o.as_mut_ptr(), rows) }
}

/// # Safety
/// AVX2 available; `p` has `rows * n` readable floats, `v` `(n - 1) * ld_v + d`, `o`
/// `rows * d` writable.
#[target_feature(enable = "avx2,fma")]
unsafe fn attn_values_rows_impl(
    p: *const f32,
    n: usize,
    v: *const f32,
    ld_v: usize,
    d: usize,
    o: *mut f32,
    rows: usize,
) {
    let mut r = 0;
    while r + 4 <= rows {
        values_rows::<4>(p.add(r * n), n, v, ld_v, d, o.add(r * d));
        r += 4;
    }
    while r < rows {
        values_rows::<1>(p.add(r * n), n, v, ld_v, d, o.add(r * d));
        r += 1;
    }
}

/// `R` rows of [`attn_values_rows_impl`], 16 columns at a time (2 value vectors per key shared
/// by the `R` rows), per element `o = o + p·v` in key order like the twin.
#[inline(always)]
unsafe fn values_rows<const R: usize>(
    p: *const f32,
    n: usize,
    v: *const f32,
    ld_v: usize,
    d: usize,
    o: *mut f32,
) {
    let mut c = 0;
    while c + 16 <= d {
        let mut acc: [[__m256; 2]; R] = core::array::from_fn(|r| {
            [
                _mm256_loadu_ps(o.add(r * d + c)),
                _mm256_loadu_ps(o.add(r * d + c + 8)),
            ]
        });
        for j in 0..n {
            let v0 = _mm256_loadu_ps(v.add(j * ld_v + c));
            let v1 = _mm256_loadu_ps(v.add(j * ld_v + c + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let pv = _mm256_broadcast_ss(&*p.add(r * n + j));
                a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(pv, v0));
                a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(pv, v1));
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(r * d + c), a[0]);
            _mm256_storeu_ps(o.add(r * d + c + 8), a[1]);
        }
        c += 16;
    }
    if c + 8 <= d {
        let mut acc: [__m256; R] = core::array::from_fn(|r| _mm256_loadu_ps(o.add(r * d + c)));
        for j in 0..n {
            let v0 = _mm256_loadu_ps(v.add(j * ld_v + c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(
                    *a,
                    _mm256_mul_ps(_mm256_broadcast_ss(&*p.add(r * n + j)), v0),
                );
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(r * d + c), *a);
        }
        c += 8;
    }
    for cc in c..d {
        for r in 0..R {
            let mut a = *o.add(r * d + cc);
            for j in 0..n {
                a += *p.add(r * n + j) * *v.add(j * ld_v + cc);
            }
            *o.add(r * d + cc) = a;
        }
    }
}

pub(crate) fn kv_transpose_f32(k: &[f32], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    kv_transpose_t(k, ld, d, n, kt)
}

pub(crate) fn kv_transpose_f16(k: &[u16], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    kv_transpose_t(k, ld, d, n, kt)
}

fn kv_transpose_t<E: Kv>(k: &[E], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    if d == 0 || n == 0 {
        return;
    }
    assert!(k.len() >= (n - 1) * ld + d, "kv_transpose: keys too short");
    assert!(kt.len() >= d * n, "kv_transpose: output too short");
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // key row j < n spans k[j * ld..][..d], the output
    // kt[..d * n]: inside the slices by the assertions.
    unsafe { kv_transpose_impl(k.as_ptr(), ld, d, n, kt.as_mut_ptr()) }
}

/// 8 keys × 8 columns at a time: 8 row loads (converted), an 8×8 transpose in registers
/// (unpack, shuffle, lane permute), 8 stores into 8 rows of `kt`.
///
/// # Safety
/// AVX2 + F16C available; `k` has `(n - 1) * ld + d` readable elements, `kt` `d * n` writable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kv_transpose_impl<E: Kv>(k: *const E, ld: usize, d: usize, n: usize, kt: *mut f32) {
    let (n8, d8) = (n - n % 8, d - d % 8);
    let mut j = 0;
    while j < n8 {
        let mut c = 0;
        while c < d8 {
            let r: [__m256; 8] = core::array::from_fn(|u| E::load8(k.add((j + u) * ld + c)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
            let u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
            let u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
            let u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
            let u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            let o = [
                _mm256_permute2f128_ps(u0, u4, 0x20),
                _mm256_permute2f128_ps(u1, u5, 0x20),
                _mm256_permute2f128_ps(u2, u6, 0x20),
                _mm256_permute2f128_ps(u3, u7, 0x20),
                _mm256_permute2f128_ps(u0, u4, 0x31),
                _mm256_permute2f128_ps(u1, u5, 0x31),
                _mm256_permute2f128_ps(u2, u6, 0x31),
                _mm256_permute2f128_ps(u3, u7, 0x31),
            ];
            for (u, ov) in o.iter().enumerate() {
                _mm256_storeu_ps(kt.add((c + u) * n + j), *ov);
            }
            c += 8;
        }
        for cc in d8..d {
            for u in 0..8 {
                *kt.add(cc * n + j + u) = (*k.add((j + u) * ld + cc)).f32();
            }
        }
        j += 8;
    }
    for jj in n8..n {
        for c in 0..d {
            *kt.add(c * n + jj) = (*k.add(jj * ld + c)).f32();
        }
    }
}

pub(crate) fn kv_rows_f16(v: &[u16], ld: usize, d: usize, n: usize, vf: &mut [f32]) {
    if d == 0 || n == 0 {
        return;
    }
    assert!(v.len() >= (n - 1) * ld + d, "kv_rows_f16: values too short");
    assert!(vf.len() >= d * n, "kv_rows_f16: output too short");
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // bounds by the assertions.
    unsafe { kv_rows_f16_impl(v.as_ptr(), ld, d, n, vf.as_mut_ptr()) }
}

/// # Safety
/// AVX2 + F16C available; `v` has `(n - 1) * ld + d` readable elements, `vf` `d * n` writable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kv_rows_f16_impl(v: *const u16, ld: usize, d: usize, n: usize, vf: *mut f32) {
    let d8 = d - d % 8;
    for j in 0..n {
        let (src, dst) = (v.add(j * ld), vf.add(j * d));
        let mut c = 0;
        while c < d8 {
            _mm256_storeu_ps(dst.add(c), u16::load8(src.add(c)));
            c += 8;
        }
        for cc in d8..d {
            *dst.add(cc) = (*src.add(cc)).f32();
        }
    }
}

pub(crate) fn softmax_tile(s: &mut [f32], m_old: f32) -> (f32, f32) {
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`).
    unsafe { softmax_tile_impl(s, m_old) }
}

/// `exp(x)` for 8 lanes: `x = n·ln2 + r` with `n = round(x·log2 e)` (Cody–Waite split of ln2),
/// Cephes' degree-7 polynomial for `e^r` on `|r| ≤ ln2/2` (about 1 ulp), `2^n` built in the
/// exponent bits. Lanes below −87.34 (results under `f32::MIN_POSITIVE`, and −∞) give 0; NaN
/// stays NaN; lanes above 88 are clamped to 88 (callers pass `x ≤ 0`). Same steps and constants
/// as [`crate::scalar::exp_poly`], its bit-exact scalar twin.
///
/// # Safety
/// AVX2 + FMA available.
#[inline(always)]
unsafe fn exp8(x: __m256) -> __m256 {
    use crate::scalar::{EXP_CLAMP, EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_UNDER};
    let under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_UNDER), _CMP_LT_OQ);
    // clamp first operand, x second: vminps/vmaxps return the second operand for NaN
    let x = _mm256_min_ps(_mm256_set1_ps(EXP_CLAMP), x);
    let x = _mm256_max_ps(_mm256_set1_ps(-EXP_CLAMP), x);
    let nf = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(EXP_LN2_HI), x);
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    let p = _mm256_add_ps(p, _mm256_set1_ps(1.0));
    // n ≥ −127 here (x ≥ −88); n = −127 only for lanes masked to 0 below
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))
}

/// `g = silu(g) · u` for `NY` rows of 8: `g / (1 + exp8(−g)) · u`, the steps of
/// [`crate::scalar::silu`] (bit-identical: `exp8` mirrors `scalar::exp_poly`).
///
/// # Safety
/// AVX2 + FMA available.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul_rows<const NY: usize>(
    g: &mut [[f32; ROWS]; NY],
    u: &[[f32; ROWS]; NY],
) {
    let one = _mm256_set1_ps(1.0);
    let neg = _mm256_set1_ps(-0.0);
    for (o, u) in g.iter_mut().zip(u) {
        let z = _mm256_loadu_ps(o.as_ptr());
        let e = exp8(_mm256_xor_ps(z, neg));
        let s = _mm256_div_ps(z, _mm256_add_ps(one, e));
        _mm256_storeu_ps(
            o.as_mut_ptr(),
            _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
        );
    }
}

/// # Safety
/// AVX2 + FMA available.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_tile_impl(s: &mut [f32], m_old: f32) -> (f32, f32) {
    let n = s.len();
    let p = s.as_mut_ptr();
    let n8 = n - n % 8;
    // max: `max_ps(x, m)` returns `m` when `x` is NaN, like `f32::max`
    let mut vm = _mm256_set1_ps(m_old);
    let mut i = 0;
    while i < n8 {
        vm = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), vm);
        i += 8;
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    let mut m = _mm_cvtss_f32(h);
    for &v in &s[n8..] {
        m = m.max(v);
    }
    if m == f32::NEG_INFINITY {
        s.iter_mut().for_each(|v| *v = 0.0);
        return (m, 0.0);
    }
    let vm = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    i = 0;
    while i < n8 {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    if n8 < n {
        let mut t = [f32::NEG_INFINITY; 8];
        t[..n - n8].copy_from_slice(&s[n8..]);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), vm));
        _mm256_storeu_ps(t.as_mut_ptr(), e);
        s[n8..].copy_from_slice(&t[..n - n8]);
        acc = _mm256_add_ps(acc, e);
    }
    (m, hsum(acc))
}
