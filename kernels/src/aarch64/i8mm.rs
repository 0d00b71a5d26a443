//! aarch64 NEON + dotprod + int8 matrix multiply tier (`smmla`; Cortex-A510/A710/X2,
//! Neoverse V1/N2, Apple M2 and later).
//!
//! # Math
//! As the NEON tier: exact i32 block sums, the twin's float order, bit-identical outputs.
//!
//! # Layout and lane plan (two activation rows at a time)
//! `smmla vd.4s, vn.16b, vm.16b` treats `vn` and `vm` as 2×8 int8 matrices and adds
//! `vn · vmᵀ` (2×2 i32) to `vd`: `[n0·m0, n0·m1, n1·m0, n1·m1]`. It needs 8 *contiguous*
//! columns per row, while a weight chunk has 4 (one quad per i32 lane). Zipping the 32-bit
//! lanes of quads `2g` and `2g+1` (`zip1`/`zip2`) gives rows (0,1) and (2,3) × columns
//! `8g..8g+8`; the same on the rows 4–7 halves gives rows (4,5), (6,7). This is done once per
//! block and reused by every token pair. The activation side is `[x_t0[8g..8g+8],
//! x_t1[8g..8g+8]]`, a 64-bit `zip1`/`zip2` of the two rows' 16-byte halves.
//! Per (block, token pair): 16 `smmla` (vs 32 `sdot` for two tokens) into 4 accumulators
//! (one per row pair); `uzp1`/`uzp2` of the (0,1)/(2,3) accumulators give rows 0–3 of token 0 /
//! token 1, likewise rows 4–7. An odd last token is paired with itself. One token (matrix ×
//! vector) uses the dotprod tile: `smmla` has no advantage without a second activation row.
//! `smmla` is unstable as an intrinsic on stable Rust (1.95), hence `asm!`.

use core::arch::aarch64::*;
use core::arch::asm;

use super::neon::{accumulate, load_q8, scales, unpack_q4, unpack_q6, Q4, Q6, Q8};
use crate::block::{BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, KVALUES, ROWS};
use crate::driver::{Tier, Tile};

/// Proof that the CPU has NEON, dotprod and i8mm.
#[derive(Clone, Copy)]
pub(crate) struct NeonI8mm(());

impl NeonI8mm {
    pub(crate) fn detect() -> Option<Self> {
        (super::dotprod::NeonDot::detect().is_some()
            && std::arch::is_aarch64_feature_detected!("i8mm"))
        .then_some(NeonI8mm(()))
    }
}

impl Tier for NeonI8mm {
    unsafe fn assume() -> Self {
        NeonI8mm(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(NeonI8mm, "neon,dotprod,i8mm");

/// Both 4-bit types (`Q4x8`, `Q4Lx8`): the same layout, read through the type's levels.
impl<B: Q4Block> Tile<B> for NeonI8mm {
    const NYMAX: usize = 4;
    #[inline]
    fn tile<const NY: usize>(self, w: &[B], x: &[&[BlockQ8A]; NY], out: &mut [[f32; ROWS]; NY]) {
        assert!(x.iter().all(|xt| xt.len() >= w.len()));
        let p = w.as_ptr() as *const u8;
        // SAFETY: `self` proves NEON + dotprod + i8mm (NeonI8mm::detect); x[t] hold w.len()
        // blocks.
        unsafe {
            if NY == 1 {
                super::dotprod::q_tile::<NY, Q4>(&B::LEVELS, p, 144, w.len(), x, out)
            } else {
                q_tile::<NY, Q4>(&B::LEVELS, p, 144, w.len(), x, out)
            }
        }
    }
}

fixed_tile!(NeonI8mm, BlockQ8x8, Q8, super::dotprod::q_tile, q_tile);

fixed_tile!(NeonI8mm, BlockQ6x8, Q6, super::dotprod::q_tile, q_tile);

macro_rules! smmla {
    ($acc:expr, $n:expr, $m:expr) => {
        asm!("smmla {acc:v}.4s, {n:v}.16b, {m:v}.16b",
             acc = inout(vreg) $acc, n = in(vreg) $n, m = in(vreg) $m,
             options(pure, nomem, nostack))
    };
}

#[inline(always)]
unsafe fn zip32(a: int8x16_t, b: int8x16_t) -> (int8x16_t, int8x16_t) {
    let (a, b) = (vreinterpretq_s32_s8(a), vreinterpretq_s32_s8(b));
    (
        vreinterpretq_s8_s32(vzip1q_s32(a, b)),
        vreinterpretq_s8_s32(vzip2q_s32(a, b)),
    )
}

#[inline(always)]
unsafe fn zip64(a: int8x16_t, b: int8x16_t) -> (int8x16_t, int8x16_t) {
    let (a, b) = (vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b));
    (
        vreinterpretq_s8_s64(vzip1q_s64(a, b)),
        vreinterpretq_s8_s64(vzip2q_s64(a, b)),
    )
}

/// # Safety
/// * NEON, dotprod and i8mm available.
/// * `w` points to `nb` readable blocks of `stride` bytes (a 4-bit type with these `levels`
///   when `M == Q4`, `BlockQ6x8` when `Q6`, else `BlockQ8x8`); `x[t].len() >= nb`.
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "neon,dotprod,i8mm")]
unsafe fn q_tile<const NY: usize, const M: u8>(
    levels: &[i8; 16],
    w: *const u8,
    stride: usize,
    nb: usize,
    x: &[&[BlockQ8A]; NY],
    out: &mut [[f32; ROWS]; NY],
) {
    let kv = vld1q_s8(levels.as_ptr());
    let mut acc = [(vdupq_n_f32(0.0), vdupq_n_f32(0.0)); NY];
    for b in 0..nb {
        let blk = w.add(b * stride);
        let wv = match M {
            Q4 => unpack_q4(blk.add(16), kv),
            Q6 => unpack_q6(blk.add(16), blk.add(144)),
            _ => load_q8(blk.add(16) as *const i8),
        };
        // wm[g][p]: column group g (8 columns), row pair p (rows 2p, 2p+1)
        let mut wm = [[vdupq_n_s8(0); 4]; 4];
        for g in 0..4 {
            let (p01, p23) = zip32(wv[2 * g][0], wv[2 * g + 1][0]);
            let (p45, p67) = zip32(wv[2 * g][1], wv[2 * g + 1][1]);
            wm[g] = [p01, p23, p45, p67];
        }
        let dw = scales(blk as *const u16);
        let mut t = 0;
        while t < NY {
            let t1 = if t + 1 < NY { t + 1 } else { t };
            let (a, c) = (x[t].get_unchecked(b), x[t1].get_unchecked(b));
            let (a0, a1) = (vld1q_s8(a.qs.as_ptr()), vld1q_s8(a.qs.as_ptr().add(16)));
            let (c0, c1) = (vld1q_s8(c.qs.as_ptr()), vld1q_s8(c.qs.as_ptr().add(16)));
            let (m0, m1) = zip64(a0, c0);
            let (m2, m3) = zip64(a1, c1);
            let m = [m0, m1, m2, m3];
            let mut s = [vdupq_n_s32(0); 4];
            for g in 0..4 {
                for p in 0..4 {
                    smmla!(s[p], wm[g][p], m[g]);
                }
            }
            let rows03 = (vuzp1q_s32(s[0], s[1]), vuzp2q_s32(s[0], s[1]));
            let rows47 = (vuzp1q_s32(s[2], s[3]), vuzp2q_s32(s[2], s[3]));
            accumulate(&mut acc[t], dw, a.d, (rows03.0, rows47.0));
            if t1 != t {
                accumulate(&mut acc[t1], dw, c.d, (rows03.1, rows47.1));
            }
            t += 2;
        }
    }
    for t in 0..NY {
        vst1q_f32(out[t].as_mut_ptr(), acc[t].0);
        vst1q_f32(out[t].as_mut_ptr().add(4), acc[t].1);
    }
}
