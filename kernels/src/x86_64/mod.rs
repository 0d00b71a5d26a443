//! x86-64 tiers. The float vector ops of the AVX-512 tier are the AVX2 ones (they are
//! bandwidth-bound; 512-bit versions would not change their speed).

pub(crate) mod avx2;
pub(crate) mod avx512;

use crate::{finish, portable, CpuLevel, Kernels, TierTable};
use avx2::Avx2;
use avx512::Avx512Vnni;

/// AVX2 + FMA + F16C (Haswell / Zen 1 and later).
pub(crate) const AVX2: Kernels = Kernels {
    level: CpuLevel::Avx2,
    quantize_q8a: avx2::quantize_q8a,
    q: crate::tier_products!(avx2),
    gemm_f32: avx2::gemm_f32,
    gemm_bf16: avx2::gemm_bf16,
    gemm_f16: avx2::gemm_f16,
    rmsnorm: portable::rmsnorm,
    topk: crate::scalar::topk,
    group_by_expert: crate::routing::group_by_expert,
    attn_scores: avx2::attn_scores,
    attn_values: avx2::attn_values,
    attn_scores_f16: avx2::attn_scores_f16,
    attn_values_f16: avx2::attn_values_f16,
    attn_scores_i8: avx2::attn_scores_i8,
    attn_values_i8: avx2::attn_values_i8,
    attn_scores_q4: avx2::attn_scores_q4,
    attn_values_q4: avx2::attn_values_q4,
    attn_scores_kt: avx2::attn_scores_kt,
    softmax_tile: avx2::softmax_tile,
    attn_values_rows: avx2::attn_values_rows,
    kv_transpose_f32: avx2::kv_transpose_f32,
    kv_transpose_f16: avx2::kv_transpose_f16,
    kv_rows_f16: avx2::kv_rows_f16,
    rope_interleaved: crate::scalar::rope_interleaved,
    rope_half: crate::scalar::rope_half,
    quantize_kv_q4: crate::scalar::quantize_kv_q4,
    kv_q4_rotate: crate::scalar::kv_q4_rotate,
    dequantize_kv_q4: crate::scalar::dequantize_kv_q4,
};

/// AVX-512 F/BW/VL + VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later).
pub(crate) const AVX512VNNI: Kernels = Kernels {
    level: CpuLevel::Avx512Vnni,
    q: crate::tier_products!(avx512),
    ..AVX2
};

pub(crate) struct Avx2T;
impl TierTable for Avx2T {
    const K: Kernels = AVX2;
}

/// The Avx2 table, if this CPU has the tier's features (its proof token is obtained here, once).
pub(crate) fn avx2_table() -> Option<Kernels> {
    Avx2::detect().map(|_| finish::<Avx2T>())
}

pub(crate) struct Avx512T;
impl TierTable for Avx512T {
    const K: Kernels = AVX512VNNI;
}

/// The Avx512Vnni table, if this CPU has the tier's features (its proof token is obtained here, once).
pub(crate) fn avx512vnni_table() -> Option<Kernels> {
    Avx512Vnni::detect().map(|_| finish::<Avx512T>())
}
