//! aarch64 NEON + dot product tier (`sdot`; Cortex-A55/A76 and later, Apple M1 and later,
//! Neoverse N1 and later).
//!
//! # Math
//! As the NEON tier: exact i32 block sums, the twin's float order, bit-identical outputs.
//!
//! # Layout and lane plan
//! `sdot vd.4s, vn.16b, vm.4b[i]` adds to each i32 lane of `vd` the dot of the 4 bytes of that
//! lane of `vn` with the 4 bytes of element `i` of `vm`. A weight half-chunk (rows 0–3 or 4–7)
//! has one row per i32 lane, 4 consecutive columns (quad `q`); the activation block is two
//! `int8x16` (quads 0–3, quads 4–7), so quad `q` is element `q % 4` of vector `q / 4`.
//! Per (block, token): 16 `sdot` into two accumulators (rows 0–3, rows 4–7), lane `r` = row
//! `r`, no horizontal sums. `sdot` is unstable as an intrinsic on stable Rust (1.95), hence
//! `asm!` inside the `#[target_feature(enable = "neon,dotprod")]` function.

use core::arch::aarch64::*;
use core::arch::asm;

use super::neon::{accumulate, load_q8, scales, unpack_q4, unpack_q6, Q4, Q6, Q8};
use crate::block::{BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, KVALUES, ROWS};
use crate::driver::{Tier, Tile};

/// Proof that the CPU has NEON and the dot-product extension.
#[derive(Clone, Copy)]
pub(crate) struct NeonDot(());

impl NeonDot {
    pub(crate) fn detect() -> Option<Self> {
        (std::arch::is_aarch64_feature_detected!("neon")
            && std::arch::is_aarch64_feature_detected!("dotprod"))
        .then_some(NeonDot(()))
    }
}

impl Tier for NeonDot {
    unsafe fn assume() -> Self {
        NeonDot(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(NeonDot, "neon,dotprod");

/// Both 4-bit types (`Q4x8`, `Q4Lx8`): the same layout, read through the type's levels.
impl<B: Q4Block> Tile<B> for NeonDot {
    const NYMAX: usize = 4;
    #[inline]
    fn tile<const NY: usize>(self, w: &[B], x: &[&[BlockQ8A]; NY], out: &mut [[f32; ROWS]; NY]) {
        assert!(x.iter().all(|xt| xt.len() >= w.len()));
        // SAFETY: `self` proves NEON + dotprod (NeonDot::detect); x[t] hold w.len() blocks.
        unsafe { q_tile::<NY, Q4>(&B::LEVELS, w.as_ptr() as *const u8, 144, w.len(), x, out) }
    }
}

fixed_tile!(NeonDot, BlockQ8x8, Q8, q_tile, q_tile);

fixed_tile!(NeonDot, BlockQ6x8, Q6, q_tile, q_tile);

/// `acc += dot(w lanes, element L of a)` (`sdot` by element).
macro_rules! sdot_lane {
    ($acc:expr, $w:expr, $a:expr, $l:literal) => {
        asm!("sdot {acc:v}.4s, {w:v}.16b, {a:v}.4b[{l}]",
             acc = inout(vreg) $acc, w = in(vreg) $w, a = in(vreg) $a, l = const $l,
             options(pure, nomem, nostack))
    };
}

/// # Safety
/// * NEON and dotprod available.
/// * `w` points to `nb` readable blocks of `stride` bytes (a 4-bit type with these `levels`
///   when `M == Q4`, `BlockQ6x8` when `Q6`, else `BlockQ8x8`); `x[t].len() >= nb`.
// out of line, as before the entries were compiled with the same features (measured:
// inlined into the driver, q4l_gemm64 ran slower)
#[inline(never)]
#[target_feature(enable = "neon,dotprod")]
pub(crate) unsafe fn q_tile<const NY: usize, const M: u8>(
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
        let dw = scales(blk as *const u16);
        for t in 0..NY {
            let a = x[t].get_unchecked(b);
            let a0 = vld1q_s8(a.qs.as_ptr());
            let a1 = vld1q_s8(a.qs.as_ptr().add(16));
            let (mut s0, mut s1) = (vdupq_n_s32(0), vdupq_n_s32(0));
            sdot_lane!(s0, wv[0][0], a0, 0);
            sdot_lane!(s1, wv[0][1], a0, 0);
            sdot_lane!(s0, wv[1][0], a0, 1);
            sdot_lane!(s1, wv[1][1], a0, 1);
            sdot_lane!(s0, wv[2][0], a0, 2);
            sdot_lane!(s1, wv[2][1], a0, 2);
            sdot_lane!(s0, wv[3][0], a0, 3);
            sdot_lane!(s1, wv[3][1], a0, 3);
            sdot_lane!(s0, wv[4][0], a1, 0);
            sdot_lane!(s1, wv[4][1], a1, 0);
            sdot_lane!(s0, wv[5][0], a1, 1);
            sdot_lane!(s1, wv[5][1], a1, 1);
            sdot_lane!(s0, wv[6][0], a1, 2);
            sdot_lane!(s1, wv[6][1], a1, 2);
            sdot_lane!(s0, wv[7][0], a1, 3);
            sdot_lane!(s1, wv[7][1], a1, 3);
            accumulate(&mut acc[t], dw, a.d, (s0, s1));
        }
    }
    for t in 0..NY {
        vst1q_f32(out[t].as_mut_ptr(), acc[t].0);
        vst1q_f32(out[t].as_mut_ptr().add(4), acc[t].1);
    }
}
