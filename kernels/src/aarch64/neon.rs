//! aarch64 Advanced SIMD tier (every aarch64 CPU), no dot-product instructions.
//!
//! # Math
//! `y[t][r] = Σ_b (d_w[b][r] · d_a[t][b]) · isum[t][b][r]`, `isum` exact in i32, floats in the
//! twin's order (`vmulq`, `vmulq`, `vaddq`; no `vfmaq`), so outputs equal the twin bit for bit.
//!
//! # Layout and lane plan
//! A 32-byte chunk `c` of a weight block is two `int8x16`: rows 0–3 and rows 4–7, each i32 lane
//! = 4 consecutive columns of one row. `Q4x8`: `vandq`/`vshrq` split the nibbles, `vqtbl1q_s8`
//! maps them through the block type's levels (`KVALUES` for `Q4x8`, `LVALUES` for `Q4Lx8`;
//! low nibbles → quad `c`, high → quad `4 + c`).
//! Per quad and token: the 4 activation bytes are duplicated into every i32 lane;
//! `vmull_s8` (low 8 bytes: rows 0,1) and `vmull_high_s8` (rows 2,3) give exact i16 products
//! (|p| ≤ 128·128), `vpadalq_s16` adds pairs into `[r0 c01, r0 c23, r1 c01, r1 c23]`.
//! After the block, `vpaddq_s32` of the (r0,r1) and (r2,r3) accumulators gives `[r0..r3]`.
//! Scales: f16 → f32 with integer ops (bits << 13, × 2^112, inf/NaN patched), exact for
//! normals and subnormals, because `vcvt_f32_f16` needs the unstable `f16` type.
//!
//! The float vector ops of this tier are the portable ones: on aarch64 `wide` is compiled with
//! NEON (a baseline feature of the target), so they already are NEON code.

use core::arch::aarch64::*;

use crate::block::{BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, KVALUES, QK, ROWS};
use crate::driver::{Tier, Tile};

/// Proof that the CPU has Advanced SIMD.
#[derive(Clone, Copy)]
pub(crate) struct Neon(());

impl Neon {
    pub(crate) fn detect() -> Option<Self> {
        std::arch::is_aarch64_feature_detected!("neon").then_some(Neon(()))
    }
}

impl Tier for Neon {
    unsafe fn assume() -> Self {
        Neon(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(Neon, "neon");

/// Both 4-bit types (`Q4x8`, `Q4Lx8`): the same layout, read through the type's levels.
impl<B: Q4Block> Tile<B> for Neon {
    const NYMAX: usize = 4;
    #[inline]
    fn tile<const NY: usize>(self, w: &[B], x: &[&[BlockQ8A]; NY], out: &mut [[f32; ROWS]; NY]) {
        assert!(x.iter().all(|xt| xt.len() >= w.len()));
        // SAFETY: `self` proves NEON (Neon::detect); every x[t] holds w.len() blocks.
        unsafe { q_tile::<NY, Q4>(&B::LEVELS, w.as_ptr() as *const u8, 144, w.len(), x, out) }
    }
}

fixed_tile!(Neon, BlockQ8x8, Q8, q_tile, q_tile);

fixed_tile!(Neon, BlockQ6x8, Q6, q_tile, q_tile);

/// The 8 f16 row scales at `d` as two f32x4 (rows 0–3, rows 4–7).
///
/// # Safety
/// NEON available; `d` points to 8 readable u16.
#[inline(always)]
pub(crate) unsafe fn scales(d: *const u16) -> (float32x4_t, float32x4_t) {
    let h = vld1q_u16(d);
    (
        f16x4_to_f32(vmovl_u16(vget_low_u16(h))),
        f16x4_to_f32(vmovl_high_u16(h)),
    )
}

#[inline(always)]
unsafe fn f16x4_to_f32(h: uint32x4_t) -> float32x4_t {
    let sign = vshlq_n_u32::<16>(vandq_u32(h, vdupq_n_u32(0x8000)));
    let em = vandq_u32(h, vdupq_n_u32(0x7fff));
    let shifted = vshlq_n_u32::<13>(em);
    // exponent rebias by multiplication: exact for normals and subnormals
    let f = vmulq_f32(
        vreinterpretq_f32_u32(shifted),
        vdupq_n_f32(f32::from_bits((127 + 112) << 23)),
    );
    let infnan = vorrq_u32(shifted, vdupq_n_u32(0x7f80_0000));
    let bits = vbslq_u32(
        vcgeq_u32(em, vdupq_n_u32(0x7c00)),
        infnan,
        vreinterpretq_u32_f32(f),
    );
    vreinterpretq_f32_u32(vorrq_u32(bits, sign))
}

/// `acc_{lo,hi}[t] += (dw · da) · isum`, the twin's float order.
#[inline(always)]
pub(crate) unsafe fn accumulate(
    acc: &mut (float32x4_t, float32x4_t),
    dw: (float32x4_t, float32x4_t),
    da: f32,
    isum: (int32x4_t, int32x4_t),
) {
    let da = vdupq_n_f32(da);
    acc.0 = vaddq_f32(acc.0, vmulq_f32(vmulq_f32(dw.0, da), vcvtq_f32_s32(isum.0)));
    acc.1 = vaddq_f32(acc.1, vmulq_f32(vmulq_f32(dw.1, da), vcvtq_f32_s32(isum.1)));
}

/// The 4 chunks of a `Q4x8` block as 16 vectors: `[quad q][half h]` (h: rows 0–3 / 4–7).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `c` and `h` compute the load address too
pub(crate) unsafe fn unpack_q4(qs: *const u8, kv: int8x16_t) -> [[int8x16_t; 2]; 8] {
    let m4 = vdupq_n_u8(0x0F);
    let mut w = [[vdupq_n_s8(0); 2]; 8];
    for c in 0..4 {
        for h in 0..2 {
            let raw = vld1q_u8(qs.add(c * 32 + h * 16));
            w[c][h] = vqtbl1q_s8(kv, vandq_u8(raw, m4));
            w[4 + c][h] = vqtbl1q_s8(kv, vshrq_n_u8::<4>(raw));
        }
    }
    w
}

/// Block kinds of the shared tile loops (`q_tile::<NY, M>`): 4-bit through levels, `Q6x8`,
/// `Q8x8`.
pub(crate) const Q4: u8 = 0;
pub(crate) const Q6: u8 = 1;
pub(crate) const Q8: u8 = 2;

/// The 8 chunks of a `Q6x8` block (`ql` at `ql`, `qh` at `qh`) as signed `u − 32`, same shape
/// as [`unpack_q4`]: chunk `c` = nibbles of `ql` chunk `c % 4` (low for `c < 4`) OR'ed with
/// bits `2·(c/2)..` of `qh` chunk `c % 2` moved to bits 4–5.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // `c` and `h` compute the load address too
pub(crate) unsafe fn unpack_q6(ql: *const u8, qh: *const u8) -> [[int8x16_t; 2]; 8] {
    let m4 = vdupq_n_u8(0x0F);
    let m30 = vdupq_n_u8(0x30);
    let off = vdupq_n_u8(32);
    let mut w = [[vdupq_n_s8(0); 2]; 8];
    for h in 0..2 {
        for c in 0..4 {
            let raw = vld1q_u8(ql.add(c * 32 + h * 16));
            w[c][h] = vreinterpretq_s8_u8(vandq_u8(raw, m4));
            w[4 + c][h] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(raw));
        }
        for p in 0..2 {
            let hb = vld1q_u8(qh.add(p * 32 + h * 16));
            // chunk 2s + p takes bits 2s..2s+2 of hb
            let hs = [
                vandq_u8(vshlq_n_u8::<4>(hb), m30),
                vandq_u8(vshlq_n_u8::<2>(hb), m30),
                vandq_u8(hb, m30),
                vandq_u8(vshrq_n_u8::<2>(hb), m30),
            ];
            for (s, hv) in hs.into_iter().enumerate() {
                let c = 2 * s + p;
                let u = vorrq_u8(vreinterpretq_u8_s8(w[c][h]), hv);
                w[c][h] = vreinterpretq_s8_u8(vsubq_u8(u, off));
            }
        }
    }
    w
}

/// The 8 chunks of a `Q8x8` block, same shape as [`unpack_q4`].
#[inline(always)]
pub(crate) unsafe fn load_q8(qs: *const i8) -> [[int8x16_t; 2]; 8] {
    let mut w = [[vdupq_n_s8(0); 2]; 8];
    for (c, wc) in w.iter_mut().enumerate() {
        wc[0] = vld1q_s8(qs.add(c * 32));
        wc[1] = vld1q_s8(qs.add(c * 32 + 16));
    }
    w
}

/// `w` points to `nb` blocks of `stride` bytes (a 4-bit type when `M == Q4`, `BlockQ6x8` when
/// `Q6`, else `BlockQ8x8`).
///
/// # Safety
/// * NEON available.
/// * `w` points to `nb` readable blocks of the given type; `x[t].len() >= nb`.
#[target_feature(enable = "neon")]
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
        // d is the first field of every block type; qs / ql follows at byte 16
        let wv = match M {
            Q4 => unpack_q4(blk.add(16), kv),
            Q6 => unpack_q6(blk.add(16), blk.add(144)),
            _ => load_q8(blk.add(16) as *const i8),
        };
        let dw = scales(blk as *const u16);
        for t in 0..NY {
            let a = x[t].get_unchecked(b);
            let qa = a.qs.as_ptr() as *const i32;
            let mut s = [vdupq_n_s32(0); 4]; // rows (0,1), (2,3), (4,5), (6,7)
            for (q, wq) in wv.iter().enumerate() {
                let av = vreinterpretq_s8_s32(vld1q_dup_s32(qa.add(q)));
                for h in 0..2 {
                    s[2 * h] = vpadalq_s16(s[2 * h], vmull_s8(vget_low_s8(wq[h]), vget_low_s8(av)));
                    s[2 * h + 1] = vpadalq_s16(s[2 * h + 1], vmull_high_s8(wq[h], av));
                }
            }
            let isum = (vpaddq_s32(s[0], s[1]), vpaddq_s32(s[2], s[3]));
            accumulate(&mut acc[t], dw, a.d, isum);
        }
    }
    for t in 0..NY {
        vst1q_f32(out[t].as_mut_ptr(), acc[t].0);
        vst1q_f32(out[t].as_mut_ptr().add(4), acc[t].1);
    }
}

// ---------------------------------------------------------------------------------------------
// Activation quantization: amax by vmaxnm (ignores NaN like f32::max), vcvtnq_s32_f32 rounds to
// nearest even and saturates (inf → i32::MAX, NaN → 0, as Rust's `as i32`), then the clamp.
// ---------------------------------------------------------------------------------------------

pub(crate) fn quantize_q8a(x: &[f32], out: &mut [BlockQ8A]) {
    assert_eq!(x.len() % QK, 0);
    assert!(out.len() >= x.len() / QK);
    // SAFETY: NEON proven (reachable only through the NEON tables, see `driver::Tier`);
    // lengths asserted.
    unsafe { quantize_q8a_impl(x, out) }
}

/// # Safety
/// NEON available; `x.len() % 32 == 0`, `out.len() >= x.len() / 32`.
#[target_feature(enable = "neon")]
unsafe fn quantize_q8a_impl(x: &[f32], out: &mut [BlockQ8A]) {
    for (xb, ob) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let p = xb.as_ptr();
        let v: [float32x4_t; 8] = core::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
        let mut m = vabsq_f32(v[0]);
        for vi in &v[1..] {
            m = vmaxnmq_f32(m, vabsq_f32(*vi));
        }
        let amax = vmaxnmvq_f32(m);
        let d = amax / 127.0;
        let id = vdupq_n_f32(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        let q: [int32x4_t; 8] = core::array::from_fn(|i| {
            let r = vcvtnq_s32_f32(vmulq_f32(v[i], id));
            vminq_s32(vmaxq_s32(r, vdupq_n_s32(-127)), vdupq_n_s32(127))
        });
        let mut s = vdupq_n_s32(0);
        for qi in &q {
            s = vaddq_s32(s, *qi);
        }
        let h: [int16x8_t; 4] =
            core::array::from_fn(|i| vcombine_s16(vqmovn_s32(q[2 * i]), vqmovn_s32(q[2 * i + 1])));
        let b0 = vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1]));
        let b1 = vcombine_s8(vqmovn_s16(h[2]), vqmovn_s16(h[3]));
        vst1q_s8(ob.qs.as_mut_ptr(), b0);
        vst1q_s8(ob.qs.as_mut_ptr().add(16), b1);
        ob.d = d;
        ob.sum8 = 8 * vaddvq_s32(s);
    }
}
