//! The weight-type registry: what the runtime, the tests and `check-kernels` need of each
//! quantized weight type, checked by the compiler (ggml's `type_traits`, as a trait).
//!
//! [`for_each_weight_type!`] is the list: code that must cover every type (the tier tests,
//! `check-kernels`) iterates it instead of naming the types, so a type added to the list is
//! picked up there by itself. See `docs/adding-kernels.md` for what else a new type takes today.

use crate::block::{BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8x8};
use crate::{scalar, GateUpQ4Fn, GemmQ4Fn, Kernels};

/// One quantized weight type: a block of 8 rows × 32 columns (`crate::block`), its scalar
/// twins and the products a kernel table provides for it.
pub trait WeightType: bytemuck::Pod + Send + Sync + core::fmt::Debug + 'static {
    /// The `.fqm` dtype name (`q4x8`, ...).
    const NAME: &'static str;
    /// Bits per weight, scales included.
    const BITS_PER_WEIGHT: f64;
    /// Quantize `w [rows, cols]` into `row_groups(rows) * cols / 32` blocks (scalar twin).
    fn quantize(w: &[f32], rows: usize, cols: usize, out: &mut [Self]);
    /// Row `row` of the matrix as f32 (scalar twin).
    fn dequantize_row(w: &[Self], row: usize, cols: usize, out: &mut [f32]);
    /// The plain product of table `k`.
    fn gemm(k: &Kernels) -> GemmQ4Fn<Self>;
    /// Its scalar twin.
    fn gemm_twin() -> GemmQ4Fn<Self>;
    /// The fused expert gate/up product of table `k`, if the type provides one.
    fn gate_up(k: &Kernels) -> Option<GateUpQ4Fn<Self>>;
    /// Its scalar twin.
    fn gate_up_twin() -> Option<GateUpQ4Fn<Self>>;
}

/// `$m!(Block)` for every registered weight type (the registry: one line per type).
#[macro_export]
macro_rules! for_each_weight_type {
    ($m:ident) => {
        $m!($crate::block::BlockQ4x8);
        $m!($crate::block::BlockQ4Lx8);
        $m!($crate::block::BlockQ6x8);
        $m!($crate::block::BlockQ8x8);
    };
}

macro_rules! weight_type {
    ($block:ty, $name:literal, $bpw:expr, $quant:expr, $deq:expr, $gemm:ident, $twin:expr,
     $gate_up:expr, $gate_up_twin:expr) => {
        impl WeightType for $block {
            const NAME: &'static str = $name;
            const BITS_PER_WEIGHT: f64 = $bpw;
            fn quantize(w: &[f32], rows: usize, cols: usize, out: &mut [Self]) {
                $quant(w, rows, cols, out)
            }
            fn dequantize_row(w: &[Self], row: usize, cols: usize, out: &mut [f32]) {
                $deq(w, row, cols, out)
            }
            fn gemm(k: &Kernels) -> GemmQ4Fn<Self> {
                k.$gemm
            }
            fn gemm_twin() -> GemmQ4Fn<Self> {
                $twin
            }
            #[allow(clippy::redundant_closure_call)]
            fn gate_up(k: &Kernels) -> Option<GateUpQ4Fn<Self>> {
                ($gate_up)(k)
            }
            fn gate_up_twin() -> Option<GateUpQ4Fn<Self>> {
                $gate_up_twin
            }
        }
    };
}

weight_type!(
    BlockQ4x8,
    "q4x8",
    4.5,
    scalar::quantize_q4x8::<BlockQ4x8>,
    scalar::dequantize_row_q4x8::<BlockQ4x8>,
    gemm_q4x8,
    scalar::gemm_q4x8::<BlockQ4x8>,
    |k: &Kernels| Some(k.ffn_gate_up_q4x8),
    Some(scalar::ffn_gate_up_q4x8::<BlockQ4x8>)
);
weight_type!(
    BlockQ4Lx8,
    "q4lx8",
    4.5,
    scalar::quantize_q4x8::<BlockQ4Lx8>,
    scalar::dequantize_row_q4x8::<BlockQ4Lx8>,
    gemm_q4lx8,
    scalar::gemm_q4x8::<BlockQ4Lx8>,
    |k: &Kernels| Some(k.ffn_gate_up_q4lx8),
    Some(scalar::ffn_gate_up_q4x8::<BlockQ4Lx8>)
);
weight_type!(
    BlockQ6x8,
    "q6x8",
    6.5,
    scalar::quantize_q6x8,
    scalar::dequantize_row_q6x8,
    gemm_q6x8,
    scalar::gemm_q6x8,
    |_: &Kernels| None,
    None
);
weight_type!(
    BlockQ8x8,
    "q8x8",
    8.5,
    scalar::quantize_q8x8,
    scalar::dequantize_row_q8x8,
    gemm_q8x8,
    scalar::gemm_q8x8,
    |k: &Kernels| Some(k.ffn_gate_up_q8x8),
    Some(scalar::ffn_gate_up_q8x8)
);
