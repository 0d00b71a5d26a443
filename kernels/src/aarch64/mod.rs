//! aarch64 tiers. The float vector ops other than dot/axpy are the portable ones: `wide` is
//! compiled with NEON on aarch64 (baseline feature), so they are NEON code already.

/// `Tile<$block>` for `$tier`, a block type read without levels (`Q8x8`, `Q6x8`; block kind
/// `$mode` of the tiers' `q_tile` loops): `$one` runs a single token, `$many` more (the same
/// function except on i8mm, whose `smmla` needs token pairs).
macro_rules! fixed_tile {
    ($tier:ty, $block:ty, $mode:expr, $($one:ident)::+, $($many:ident)::+) => {
        impl Tile<$block> for $tier {
            const NYMAX: usize = 4;
            #[inline]
            fn tile<const NY: usize>(
                self,
                w: &[$block],
                x: &[&[BlockQ8A]; NY],
                out: &mut [[f32; ROWS]; NY],
            ) {
                assert!(x.iter().all(|xt| xt.len() >= w.len()));
                let (p, stride) = (w.as_ptr() as *const u8, core::mem::size_of::<$block>());
                // SAFETY: `self` proves the tier's CPU features (its `detect`); `w` holds
                // `w.len()` blocks of `stride` bytes and every x[t] at least as many (asserted).
                unsafe {
                    if NY == 1 {
                        $($one)::+::<NY, { $mode }>(&KVALUES, p, stride, w.len(), x, out)
                    } else {
                        $($many)::+::<NY, { $mode }>(&KVALUES, p, stride, w.len(), x, out)
                    }
                }
            }
        }
    };
}

pub(crate) mod dotprod;
pub(crate) mod i8mm;
pub(crate) mod neon;

use crate::{finish, portable, CpuLevel, Kernels, TierTable};
use dotprod::NeonDot;
use i8mm::NeonI8mm;
use neon::Neon;

/// Advanced SIMD (every aarch64 CPU: Cortex-A53/A72, Graviton 1, ...).
pub(crate) const NEON: Kernels = Kernels {
    level: CpuLevel::Neon,
    quantize_q8a: neon::quantize_q8a,
    q: crate::tier_products!(neon),
    gemm_f32: portable::gemm_f32,
    gemm_bf16: portable::gemm_bf16,
    gemm_f16: portable::gemm_f16,
    rmsnorm: portable::rmsnorm,
    topk: crate::scalar::topk,
    group_by_expert: crate::routing::group_by_expert,
    attn_scores: portable::attn_scores,
    attn_values: portable::attn_values,
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

/// NEON + dotprod (Cortex-A55/A76 and later, Neoverse N1, Apple M1, Graviton 2).
pub(crate) const NEON_DOT: Kernels = Kernels {
    level: CpuLevel::NeonDot,
    q: crate::tier_products!(dotprod),
    ..NEON
};

/// NEON + dotprod + i8mm (Cortex-A510/A710/X2, Neoverse V1/N2, Graviton 3, Apple M2).
pub(crate) const NEON_I8MM: Kernels = Kernels {
    level: CpuLevel::NeonI8mm,
    q: crate::tier_products!(i8mm),
    ..NEON_DOT
};

pub(crate) struct NeonT;
impl TierTable for NeonT {
    const K: Kernels = NEON;
}

/// The Neon table, if this CPU has the tier's features (its proof token is obtained here, once).
pub(crate) fn neon_table() -> Option<Kernels> {
    Neon::detect().map(|_| finish::<NeonT>())
}

pub(crate) struct NeonDotT;
impl TierTable for NeonDotT {
    const K: Kernels = NEON_DOT;
}

/// The NeonDot table, if this CPU has the tier's features (its proof token is obtained here, once).
pub(crate) fn neon_dot_table() -> Option<Kernels> {
    NeonDot::detect().map(|_| finish::<NeonDotT>())
}

pub(crate) struct NeonI8mmT;
impl TierTable for NeonI8mmT {
    const K: Kernels = NEON_I8MM;
}

/// The NeonI8mm table, if this CPU has the tier's features (its proof token is obtained here, once).
pub(crate) fn neon_i8mm_table() -> Option<Kernels> {
    NeonI8mm::detect().map(|_| finish::<NeonI8mmT>())
}
