//! x86-64 tiers. The float vector ops of the AVX-512 tier are the AVX2 ones (they are
//! bandwidth-bound; 512-bit versions would not change their speed).

pub(crate) mod avx2;
pub(crate) mod avx512;

use crate::block::{BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8x8};
use crate::driver;
use crate::{portable, CpuLevel, Kernels};
use avx2::Avx2;
use avx512::Avx512Vnni;

/// AVX2 + FMA + F16C (Haswell / Zen 1 and later).
pub(crate) const AVX2: Kernels = Kernels {
    level: CpuLevel::Avx2,
    quantize_q8a: avx2::quantize_q8a,
    gemm_q4x8: driver::gemm_q::<BlockQ4x8, Avx2>,
    gemm_q4lx8: driver::gemm_q::<BlockQ4Lx8, Avx2>,
    gemm_q8x8: driver::gemm_q::<BlockQ8x8, Avx2>,
    gemm_q6x8: driver::gemm_q::<BlockQ6x8, Avx2>,
    gemm_f32: avx2::gemm_f32,
    gemm_bf16: avx2::gemm_bf16,
    gemm_f16: avx2::gemm_f16,
    dot_f32: avx2::dot_f32,
    axpy_f32: avx2::axpy_f32,
    rmsnorm: portable::rmsnorm,
    softmax: portable::softmax,
    silu_mul: portable::silu_mul,
    gemm_q4x8_gather: driver::gather_q::<BlockQ4x8, Avx2>,
    gemm_q4lx8_gather: driver::gather_q::<BlockQ4Lx8, Avx2>,
    gemm_q8x8_gather: driver::gather_q::<BlockQ8x8, Avx2>,
    ffn_gate_up_q4x8: driver::gate_up_q::<BlockQ4x8, Avx2>,
    ffn_gate_up_q4lx8: driver::gate_up_q::<BlockQ4Lx8, Avx2>,
    ffn_gate_up_q8x8: driver::gate_up_q::<BlockQ8x8, Avx2>,
    scatter_add: avx2::scatter_add,
    topk: crate::scalar::topk,
    group_by_expert: crate::routing::group_by_expert,
    attn_scores: avx2::attn_scores,
    attn_values: avx2::attn_values,
    attn_scores_f16: avx2::attn_scores_f16,
    attn_values_f16: avx2::attn_values_f16,
    attn_scores_i8: avx2::attn_scores_i8,
    attn_values_i8: avx2::attn_values_i8,
    attn_scores_kt: avx2::attn_scores_kt,
    softmax_tile: avx2::softmax_tile,
    attn_values_rows: avx2::attn_values_rows,
    kv_transpose_f32: avx2::kv_transpose_f32,
    kv_transpose_f16: avx2::kv_transpose_f16,
    kv_rows_f16: avx2::kv_rows_f16,
};

/// AVX-512 F/BW/VL + VNNI (Cascade Lake, Ice Lake, Sapphire Rapids, Zen 4 and later).
pub(crate) const AVX512VNNI: Kernels = Kernels {
    level: CpuLevel::Avx512Vnni,
    gemm_q4x8: driver::gemm_q::<BlockQ4x8, Avx512Vnni>,
    gemm_q4lx8: driver::gemm_q::<BlockQ4Lx8, Avx512Vnni>,
    gemm_q8x8: driver::gemm_q::<BlockQ8x8, Avx512Vnni>,
    gemm_q6x8: driver::gemm_q::<BlockQ6x8, Avx512Vnni>,
    gemm_q4x8_gather: driver::gather_q::<BlockQ4x8, Avx512Vnni>,
    gemm_q4lx8_gather: driver::gather_q::<BlockQ4Lx8, Avx512Vnni>,
    gemm_q8x8_gather: driver::gather_q::<BlockQ8x8, Avx512Vnni>,
    ffn_gate_up_q4x8: driver::gate_up_q::<BlockQ4x8, Avx512Vnni>,
    ffn_gate_up_q4lx8: driver::gate_up_q::<BlockQ4Lx8, Avx512Vnni>,
    ffn_gate_up_q8x8: driver::gate_up_q::<BlockQ8x8, Avx512Vnni>,
    ..AVX2
};
