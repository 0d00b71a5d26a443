//! x86-64 AVX-512 VNNI tier (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later).
//!
//! # Math
//! `vpdpbusd` multiplies unsigned by signed bytes and adds groups of 4 into i32 without an i16
//! stage, so the +128 offset trick is exact: the nibble lookup returns `u = w + 128` (1..=241)
//! and `Σ u·a = Σ w·a + 128·Σ a`; the i32 accumulator starts at `-128 · Σ a = -16 · BlockQ8A::sum8`, which
//! leaves exactly `Σ w·a`. For `Q8x8`, `u = w ^ 0x80 = w + 128`. Floats as in the AVX2 tier
//! (`s = dw·da; p = s·isum; acc + p`, no FMA), so results equal the scalar twin bit for bit.
//!
//! # Layout and lane plan
//! 256-bit (AVX-512VL) ops: chunk `c` of `qs` → low nibbles (quad `c`) and high nibbles
//! (quad `4 + c`), one `vpshufb` each against the levels + 128 (`KVALUES` for `Q4x8`,
//! `LVALUES` for `Q4Lx8`); per (block, token):
//! 8 × `vpdpbusd ymm` with the 4 activation bytes broadcast, lane `r` = row `r`.
//! `NYMAX = 8`: 8 i32 + 8 f32 accumulators + unpacked weights fit the 32 ymm registers.
//! Decode (one token) goes through the `*_tile1x2` functions: two weight groups (two
//! sequential streams) against one activation row, as in the AVX2 tier; without them the
//! tier's decode ran `tile::<1>` twice and lost to AVX2.
//!
//! Measured (2026-12-02, AMD EPYC with AVX-512, 2 vCPUs; docs/performance.md): prefill
//! 1.3–1.6× the AVX2 tier, decode at parity, so the tier is chosen automatically.
//! Not done yet: 512-bit `vpdpbusd` with the weights of two chunks permuted once per block
//! (lanes 2r / 2r+1 = quads c / c+1) so that a `vpbroadcastq` of two activation quads feeds 16
//! lanes; it halves the dot instructions per (block, token) on CPUs with two 512-bit VNNI ports
//! (not on Zen 4, which splits 512-bit ops into two 256-bit halves).

use core::arch::x86_64::*;

use crate::block::{BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, ROWS};
use crate::driver::{Tier, Tile};

/// Proof that the CPU has AVX-512 F/BW/VL/VNNI (and AVX2, FMA, F16C).
#[derive(Clone, Copy)]
pub(crate) struct Avx512Vnni(());

impl Avx512Vnni {
    pub(crate) fn detect() -> Option<Self> {
        (super::avx2::Avx2::detect().is_some()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni"))
        .then_some(Avx512Vnni(()))
    }
}

impl Tier for Avx512Vnni {
    unsafe fn assume() -> Self {
        Avx512Vnni(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(
    Avx512Vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// Both 4-bit types (`Q4x8`, `Q4Lx8`): the same layout, read through the type's levels.
impl<B: Q4Block> Tile<B> for Avx512Vnni {
    const NYMAX: usize = 8;
    #[inline]
    fn tile<const NY: usize>(self, w: &[B], x: &[&[BlockQ8A]; NY], out: &mut [[f32; ROWS]; NY]) {
        assert!(x.iter().all(|xt| xt.len() >= w.len()));
        // SAFETY: `self` proves the features (Avx512Vnni::detect); x[t] hold w.len() blocks.
        unsafe { q4_tile::<B, NY>(w, x, out) }
    }

    #[inline]
    fn tile1x2(
        self,
        w0: &[B],
        w1: &[B],
        x: &[BlockQ8A],
        out0: &mut [f32; ROWS],
        out1: &mut [f32; ROWS],
    ) {
        assert!(w0.len() == w1.len() && x.len() >= w0.len());
        // SAFETY: `self` proves the features (Avx512Vnni::detect); x holds w0.len() blocks.
        unsafe { q4_tile1x2::<B>(w0, w1, x, out0, out1) }
    }

    #[inline(always)]
    fn silu_mul<const NY: usize>(self, g: &mut [[f32; ROWS]; NY], u: &[[f32; ROWS]; NY]) {
        // SAFETY: `self` proves AVX2 + FMA (a subset of this tier's features).
        unsafe { super::avx2::silu_mul_rows::<NY>(g, u) }
    }
}

/// `Tile<$block>` from the tile function `$tile` of a block type without levels.
macro_rules! vnni_tile {
    ($block:ty, $tile:ident, $tile1x2:ident) => {
        impl Tile<$block> for Avx512Vnni {
            const NYMAX: usize = 8;
            #[inline]
            fn tile<const NY: usize>(
                self,
                w: &[$block],
                x: &[&[BlockQ8A]; NY],
                out: &mut [[f32; ROWS]; NY],
            ) {
                assert!(x.iter().all(|xt| xt.len() >= w.len()));
                // SAFETY: `self` proves the features (Avx512Vnni::detect); every x[t] holds
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
                assert!(w0.len() == w1.len() && x.len() >= w0.len());
                // SAFETY: `self` proves the features (Avx512Vnni::detect); x holds w0.len()
                // blocks.
                unsafe { $tile1x2(w0, w1, x, out0, out1) }
            }

            #[inline(always)]
            fn silu_mul<const NY: usize>(self, g: &mut [[f32; ROWS]; NY], u: &[[f32; ROWS]; NY]) {
                // SAFETY: `self` proves AVX2 + FMA (a subset of this tier's features).
                unsafe { super::avx2::silu_mul_rows::<NY>(g, u) }
            }
        }
    };
}
vnni_tile!(BlockQ8x8, q8_tile, q8_tile1x2);
vnni_tile!(BlockQ6x8, q6_tile, q6_tile1x2);

/// The 8 row scales of a block (f16) as f32.
#[inline(always)]
unsafe fn scales(d: &[u16; ROWS]) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i))
}

#[inline(always)]
unsafe fn quad(a: &BlockQ8A, i: usize) -> __m256i {
    let p = a.qs.as_ptr().add(i * 4) as *const i32;
    _mm256_set1_epi32(p.read_unaligned())
}

/// # Safety
/// * The CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
/// * `x[t].len() >= w.len()` for every `t`.
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_tile<B: Q4Block, const NY: usize>(
    w: &[B],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    // the block type's levels + 128 as unsigned bytes, in both 128-bit lanes
    let kvu: [u8; 32] = core::array::from_fn(|i| (B::LEVELS[i % 16] as i16 + 128) as u8);
    let tbl = _mm256_loadu_si256(kvu.as_ptr() as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        let mut isum: [__m256i; NY] =
            core::array::from_fn(|t| _mm256_set1_epi32(-16 * x[t].get_unchecked(b).sum8));
        for c in 0..4 {
            let raw = _mm256_loadu_si256(blk.qs().as_ptr().add(c * 32) as *const __m256i);
            let lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(raw, m4));
            let hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
            for t in 0..NY {
                let a = x[t].get_unchecked(b);
                isum[t] = _mm256_dpbusd_epi32(isum[t], lo, quad(a, c));
                isum[t] = _mm256_dpbusd_epi32(isum[t], hi, quad(a, 4 + c));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.d().as_ptr() as *const __m128i));
        for t in 0..NY {
            let s = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].get_unchecked(b).d));
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(s, _mm256_cvtepi32_ps(isum[t])));
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// The body of a `*_tile1x2` function: two weight groups `w0`, `w1` against one activation
/// row `x`, block by block; `part(blk, init, a)` is the block's i32 sum as the type's tile
/// computes it for one token (started at `init(a)`), `d(blk)` its row scales as f32; the float steps
/// are the tile's.
macro_rules! two_groups {
    ($w0:ident, $w1:ident, $x:ident, $out0:ident, $out1:ident, $init:expr, $part:expr, $d:expr) => {{
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (b, (k0, k1)) in $w0.iter().zip($w1).enumerate() {
            let a = $x.get_unchecked(b);
            let init = _mm256_set1_epi32($init(a));
            let (s0, s1) = ($part(k0, init, a), $part(k1, init, a));
            let da = _mm256_set1_ps(a.d);
            let (p0, p1) = (_mm256_mul_ps($d(k0), da), _mm256_mul_ps($d(k1), da));
            acc0 = _mm256_add_ps(acc0, _mm256_mul_ps(p0, _mm256_cvtepi32_ps(s0)));
            acc1 = _mm256_add_ps(acc1, _mm256_mul_ps(p1, _mm256_cvtepi32_ps(s1)));
        }
        _mm256_storeu_ps($out0.as_mut_ptr(), acc0);
        _mm256_storeu_ps($out1.as_mut_ptr(), acc1);
    }};
}

/// Two 4-bit groups against one activation row (the decode case of [`q4_tile`]: two weight
/// streams), the same arithmetic per group. (Loading each activation quad once for both groups
/// instead, as the AVX2 tile does, was no faster: SmolLM2 q4 tg128 0.94–1.02× in 3 paired
/// rounds; `vpdpbusd` takes it as a broadcast memory operand.)
///
/// # Safety
/// * The CPU supports AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI.
/// * `w1.len() >= w0.len()` and `x.len() >= w0.len()`.
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4_tile1x2<B: Q4Block>(
    w0: &[B],
    w1: &[B],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let kvu: [u8; 32] = core::array::from_fn(|i| (B::LEVELS[i % 16] as i16 + 128) as u8);
    let tbl = _mm256_loadu_si256(kvu.as_ptr() as *const __m256i);
    let m4 = _mm256_set1_epi8(0x0F);
    let part = |blk: &B, mut s: __m256i, a: &BlockQ8A| {
        for c in 0..4 {
            let raw = _mm256_loadu_si256(blk.qs().as_ptr().add(c * 32) as *const __m256i);
            let lo = _mm256_shuffle_epi8(tbl, _mm256_and_si256(raw, m4));
            let hi = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
            s = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(s, lo, quad(a, c)), hi, quad(a, 4 + c));
        }
        s
    };
    two_groups!(
        w0,
        w1,
        x,
        out0,
        out1,
        |a: &BlockQ8A| -16 * a.sum8,
        part,
        |b: &B| scales(b.d())
    )
}

/// # Safety
/// Same as [`q4_tile`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_tile<const NY: usize>(
    w: &[BlockQ8x8],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let flip = _mm256_set1_epi8(-128);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        let mut isum: [__m256i; NY] =
            core::array::from_fn(|t| _mm256_set1_epi32(-16 * x[t].get_unchecked(b).sum8));
        for c in 0..8 {
            let wv = _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
            let u = _mm256_xor_si256(wv, flip);
            for t in 0..NY {
                isum[t] = _mm256_dpbusd_epi32(isum[t], u, quad(x[t].get_unchecked(b), c));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr() as *const __m128i));
        for t in 0..NY {
            let s = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].get_unchecked(b).d));
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(s, _mm256_cvtepi32_ps(isum[t])));
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// `Q6x8`: the unsigned `u` (0..64) of each chunk pair from the AVX2 unpack
/// ([`super::avx2::q6_pair`]) is `vpdpbusd`'s unsigned operand as it is; the i32 sums start at
/// `-32 · Σa = -4 · sum8`, which leaves `Σ (u − 32)·a`.
///
/// # Safety
/// Same as [`q4_tile`].
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_tile<const NY: usize>(
    w: &[BlockQ6x8],
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); NY];
    for (b, blk) in w.iter().enumerate() {
        let mut isum: [__m256i; NY] =
            core::array::from_fn(|t| _mm256_set1_epi32(-4 * x[t].get_unchecked(b).sum8));
        for p in 0..4 {
            let (u0, u1) = super::avx2::q6_pair(blk, p, m4, m30);
            for t in 0..NY {
                let a = x[t].get_unchecked(b);
                isum[t] = _mm256_dpbusd_epi32(isum[t], u0, quad(a, 2 * p));
                isum[t] = _mm256_dpbusd_epi32(isum[t], u1, quad(a, 2 * p + 1));
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr() as *const __m128i));
        for t in 0..NY {
            let s = _mm256_mul_ps(dw, _mm256_set1_ps(x[t].get_unchecked(b).d));
            acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(s, _mm256_cvtepi32_ps(isum[t])));
        }
    }
    for t in 0..NY {
        _mm256_storeu_ps(out[t].as_mut_ptr(), acc[t]);
    }
}

/// Two `Q8x8` groups against one activation row (the decode case of [`q8_tile`]).
///
/// # Safety
/// Same as [`q4_tile1x2`].
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q8_tile1x2(
    w0: &[BlockQ8x8],
    w1: &[BlockQ8x8],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let flip = _mm256_set1_epi8(-128);
    let part = |blk: &BlockQ8x8, mut s: __m256i, a: &BlockQ8A| {
        for c in 0..8 {
            let wv = _mm256_loadu_si256(blk.qs.as_ptr().add(c * 32) as *const __m256i);
            s = _mm256_dpbusd_epi32(s, _mm256_xor_si256(wv, flip), quad(a, c));
        }
        s
    };
    two_groups!(
        w0,
        w1,
        x,
        out0,
        out1,
        |a: &BlockQ8A| -16 * a.sum8,
        part,
        |b: &BlockQ8x8| scales(&b.d)
    )
}

/// Two `Q6x8` groups against one activation row (the decode case of [`q6_tile`]).
///
/// # Safety
/// Same as [`q4_tile1x2`].
#[inline(never)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6_tile1x2(
    w0: &[BlockQ6x8],
    w1: &[BlockQ6x8],
    x: &[BlockQ8A],
    out0: &mut [f32; ROWS],
    out1: &mut [f32; ROWS],
) {
    let (m4, m30) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x30));
    let part = |blk: &BlockQ6x8, mut s: __m256i, a: &BlockQ8A| {
        for p in 0..4 {
            let (u0, u1) = super::avx2::q6_pair(blk, p, m4, m30);
            s = _mm256_dpbusd_epi32(s, u0, quad(a, 2 * p));
            s = _mm256_dpbusd_epi32(s, u1, quad(a, 2 * p + 1));
        }
        s
    };
    two_groups!(
        w0,
        w1,
        x,
        out0,
        out1,
        |a: &BlockQ8A| -4 * a.sum8,
        part,
        |b: &BlockQ6x8| scales(&b.d)
    )
}
