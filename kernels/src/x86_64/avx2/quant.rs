//! AVX2 quantized products: the `Tile` of every weight type (decode pairs included) and the
//! activation quantization. The math and lane plan are in the tier's module docs.

use super::*;

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
