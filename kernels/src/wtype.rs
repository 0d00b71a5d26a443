//! The weight-type registry: what the runtime, the tiers, the tests and `check-kernels` need of
//! each quantized weight type, checked by the compiler (ggml's `type_traits`, as a trait).
//!
//! [`weight_types!`] is the list, one line per type. Everything that must cover every type is
//! generated from it or iterates it: the per-type products of a kernel table
//! ([`QuantProducts`], filled for every tier by the same generic entries), the quantized
//! matrix the runtime dispatches on ([`QMat`], [`with_qmat!`]), the `check-kernels` wrappers and
//! the tier tests ([`for_each_weight_type!`]). A type's own file (block layout, scalar twins,
//! its [`WeightType`] impl, its tiles) plus its line here is what a new type takes in this
//! crate; see `docs/adding-kernels.md`.

use crate::{GateUpQ4Fn, GemmQ4Fn, Kernels};

/// The registry: `field Variant Block gate_up|plain` per quantized weight type, where
/// `field` names its [`Products`] in [`QuantProducts`], `Variant` its [`QMat`] variant, and
/// `gate_up` says the type provides the fused expert gate/up product (with a scalar twin).
/// `weight_types!(m)` calls `m!` with the list; `weight_types!(m, args)` with `args` first.
#[macro_export]
macro_rules! weight_types {
    ($m:ident $(, $arg:tt)*) => {
        $crate::$m! { $($arg)* [
            q4x8 Q4x8 $crate::block::BlockQ4x8 => gate_up,
            q4lx8 Q4Lx8 $crate::block::BlockQ4Lx8 => gate_up,
            q6x8 Q6x8 $crate::block::BlockQ6x8 => plain,
            q8x8 Q8x8 $crate::block::BlockQ8x8 => gate_up,
        ] }
    };
}

/// `$m!(Block)` for every registered weight type.
#[macro_export]
macro_rules! for_each_weight_type {
    ($m:ident) => {
        $crate::weight_types!(__each_type, $m);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __each_type {
    ($m:ident [$($f:ident $v:ident $b:ty => $g:ident,)*]) => {
        $($m!($b);)*
    };
}

/// The products a kernel table provides for weight type `B`.
#[derive(Debug)]
pub struct Products<B: 'static> {
    /// Plain product (`GemmQ4Fn` shape: weights, rows, k, activations, tokens, out, ld).
    pub gemm: GemmQ4Fn<B>,
    /// Fused expert gate/up with SiLU, where the type has it.
    pub gate_up: Option<GateUpQ4Fn<B>>,
}

impl<B> Clone for Products<B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B> Copy for Products<B> {}

/// One quantized weight type: a block of 8 rows × 32 columns (`crate::block`), its scalar
/// twins and its products in a kernel table (through the registry).
pub trait WeightType:
    Registered + bytemuck::Pod + Send + Sync + core::fmt::Debug + 'static
{
    /// The `.fqm` dtype name (`q4x8`, ...).
    const NAME: &'static str;
    /// Bits per weight, scales included.
    const BITS_PER_WEIGHT: f64;
    /// The scalar twin of the plain product.
    const GEMM_TWIN: GemmQ4Fn<Self>;
    /// The scalar twin of the fused gate/up product, if the type provides one.
    const GATE_UP_TWIN: Option<GateUpQ4Fn<Self>>;
    /// Quantize `w [rows, cols]` into `row_groups(rows) * cols / 32` blocks (scalar twin).
    fn quantize(w: &[f32], rows: usize, cols: usize, out: &mut [Self]);
    /// Row `row` of the matrix as f32 (scalar twin).
    fn dequantize_row(w: &[Self], row: usize, cols: usize, out: &mut [f32]);
    /// The plain product of table `k`.
    fn gemm(k: &Kernels) -> GemmQ4Fn<Self> {
        Self::products(k).gemm
    }
    /// Its scalar twin.
    fn gemm_twin() -> GemmQ4Fn<Self> {
        Self::GEMM_TWIN
    }
    /// The fused expert gate/up product of table `k`, if the type provides one.
    fn gate_up(k: &Kernels) -> Option<GateUpQ4Fn<Self>> {
        Self::products(k).gate_up
    }
    /// Its scalar twin.
    fn gate_up_twin() -> Option<GateUpQ4Fn<Self>> {
        Self::GATE_UP_TWIN
    }
}

/// What the file format needs of a registered weight type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TypeInfo {
    /// The `.fqm` dtype name.
    pub name: &'static str,
    /// Bits per weight, scales included.
    pub bits_per_weight: f64,
    /// Bytes of one block (8 rows × 32 columns).
    pub block_bytes: usize,
    /// Whether the type has the fused expert gate/up product (else it is a plain-product type,
    /// for the embedding and output tables).
    pub gate_up: bool,
}

impl TypeInfo {
    /// Bytes of a `rows × cols` matrix (`cols % 32 == 0`; rows padded to whole 8-row groups).
    pub const fn nbytes(&self, rows: usize, cols: usize) -> usize {
        crate::block::row_groups(rows) * (cols / crate::QK) * self.block_bytes
    }
}

/// The registered type named `name` (`.fqm` dtype name).
pub fn type_info(name: &str) -> Option<&'static TypeInfo> {
    TYPES.iter().find(|t| t.name == name)
}

/// What the registry line of a type provides (implemented by [`weight_types!`] only).
pub trait Registered: Sized + 'static {
    /// This type's products in table `k`.
    fn products(k: &Kernels) -> &Products<Self>;
    /// The weights of `m` if `m` holds this type.
    fn of<'a>(m: QMat<'a>) -> Option<&'a [Self]>;
    /// Blocks of this type as a [`QMat`].
    fn qmat(w: &[Self]) -> QMat<'_>;
}

#[doc(hidden)]
#[macro_export]
macro_rules! __define_registry {
    ([$($f:ident $v:ident $b:ty => $g:ident,)*]) => {
        /// The quantized products of one kernel table, one [`Products`] per registered type.
        #[derive(Clone, Copy, Debug)]
        pub struct QuantProducts {
            $(pub $f: Products<$b>,)*
        }

        /// A quantized weight matrix: its blocks, typed by its registered weight type.
        #[derive(Clone, Copy, Debug)]
        pub enum QMat<'a> {
            $($v(&'a [$b]),)*
        }

        impl QMat<'_> {
            /// The weight type's `.fqm` name.
            pub fn name(&self) -> &'static str {
                match self {
                    $(QMat::$v(_) => <$b as WeightType>::NAME,)*
                }
            }
            /// Whether `self` and `other` hold the same weight type.
            pub fn same_type(&self, other: &QMat<'_>) -> bool {
                core::mem::discriminant(self) == core::mem::discriminant(other)
            }
        }

        $(
            impl Registered for $b {
                fn products(k: &Kernels) -> &Products<Self> {
                    &k.q.$f
                }
                #[allow(unreachable_patterns)]
                fn of<'a>(m: QMat<'a>) -> Option<&'a [Self]> {
                    match m {
                        QMat::$v(w) => Some(w),
                        _ => None,
                    }
                }
                fn qmat(w: &[Self]) -> QMat<'_> {
                    QMat::$v(w)
                }
            }
        )*

        /// Every registered type's [`TypeInfo`], in registry order.
        pub const TYPES: &[TypeInfo] = &[
            $(TypeInfo {
                name: <$b as WeightType>::NAME,
                bits_per_weight: <$b as WeightType>::BITS_PER_WEIGHT,
                block_bytes: core::mem::size_of::<$b>(),
                gate_up: $crate::__is_gate_up!($g),
            },)*
        ];

        impl<'a> QMat<'a> {
            /// The blocks of a tensor of the registered type named `name` (`.fqm` dtype name)
            /// in `bytes`; `None` for another name, or bytes that are not whole, aligned blocks.
            pub fn cast(name: &str, bytes: &'a [u8]) -> Option<QMat<'a>> {
                $(if name == <$b as WeightType>::NAME {
                    return bytemuck::try_cast_slice(bytes).ok().map(QMat::$v);
                })*
                None
            }
        }

        /// The scalar twins as a table's products.
        pub(crate) const SCALAR_PRODUCTS: QuantProducts = QuantProducts {
            $($f: Products {
                gemm: <$b as WeightType>::GEMM_TWIN,
                gate_up: <$b as WeightType>::GATE_UP_TWIN,
            },)*
        };
    };
}
weight_types!(__define_registry);

/// `with_qmat!(m, w => expr)`: `expr` with `w` bound to the blocks of the [`QMat`] `m`, once
/// per registered type (so `expr` may call generic functions over [`WeightType`]).
#[macro_export]
macro_rules! with_qmat {
    ($m:expr, $w:ident => $body:expr) => {
        $crate::weight_types!(__with_qmat, ($m, $w, $body))
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __with_qmat {
    (($m:expr, $w:ident, $body:expr) [$($f:ident $v:ident $b:ty => $g:ident,)*]) => {
        match $m {
            $($crate::wtype::QMat::$v($w) => $body,)*
        }
    };
}

/// The products of tier module `$tier` (one name: `self`, `avx2`, ...; its `gemm_q` / `gate_up_q` entries from
/// `driver::tier_entries!`) for every registered type.
#[doc(hidden)]
#[macro_export]
macro_rules! tier_products {
    ($tier:ident) => {
        $crate::weight_types!(__tier_products, $tier)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __tier_products {
    ($tier:ident [$($f:ident $v:ident $b:ty => $g:ident,)*]) => {
        $crate::wtype::QuantProducts {
            $($f: $crate::wtype::Products {
                gemm: $tier::gemm_q::<$b>,
                gate_up: $crate::__gate_up_entry!($g, $tier, $b),
            },)*
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __is_gate_up {
    (gate_up) => {
        true
    };
    (plain) => {
        false
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __gate_up_entry {
    (gate_up, $tier:ident, $b:ty) => {
        Some($tier::gate_up_q::<$b>)
    };
    (plain, $tier:ident, $b:ty) => {
        None
    };
}

macro_rules! weight_type {
    ($block:ty, $name:literal, $bpw:expr, $quant:expr, $deq:expr, $twin:expr, $gate_up_twin:expr) => {
        impl WeightType for $block {
            const NAME: &'static str = $name;
            const BITS_PER_WEIGHT: f64 = $bpw;
            const GEMM_TWIN: GemmQ4Fn<Self> = $twin;
            const GATE_UP_TWIN: Option<GateUpQ4Fn<Self>> = $gate_up_twin;
            fn quantize(w: &[f32], rows: usize, cols: usize, out: &mut [Self]) {
                $quant(w, rows, cols, out)
            }
            fn dequantize_row(w: &[Self], row: usize, cols: usize, out: &mut [f32]) {
                $deq(w, row, cols, out)
            }
        }
    };
}

// The types of the first format version (their blocks live in `crate::block`, their twins in
// `crate::scalar`); a new type keeps its `weight_type!` in its own file.
use crate::block::{BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8x8};
use crate::scalar;

weight_type!(
    BlockQ4x8,
    "q4x8",
    4.5,
    scalar::quantize_q4x8::<BlockQ4x8>,
    scalar::dequantize_row_q4x8::<BlockQ4x8>,
    scalar::gemm_q4x8::<BlockQ4x8>,
    Some(scalar::ffn_gate_up_q4x8::<BlockQ4x8>)
);
weight_type!(
    BlockQ4Lx8,
    "q4lx8",
    4.5,
    scalar::quantize_q4x8::<BlockQ4Lx8>,
    scalar::dequantize_row_q4x8::<BlockQ4Lx8>,
    scalar::gemm_q4x8::<BlockQ4Lx8>,
    Some(scalar::ffn_gate_up_q4x8::<BlockQ4Lx8>)
);
weight_type!(
    BlockQ6x8,
    "q6x8",
    6.5,
    scalar::quantize_q6x8,
    scalar::dequantize_row_q6x8,
    scalar::gemm_q6x8,
    None
);
weight_type!(
    BlockQ8x8,
    "q8x8",
    8.5,
    scalar::quantize_q8x8,
    scalar::dequantize_row_q8x8,
    scalar::gemm_q8x8,
    Some(scalar::ffn_gate_up_q8x8)
);
