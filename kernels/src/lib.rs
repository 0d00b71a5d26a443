//! ferroq kernels: quantized matrix products, expert routing and vector ops for every CPU tier,
//! chosen at run time. This crate knows nothing about models.
//!
//! * [`block`]: the weight and activation block layouts (frozen with the `.fqm` format).
//! * [`scalar`]: the reference twins (the spec).
//! * [`Kernels`]: a table of function pointers for one [`CpuLevel`], built once by
//!   [`Kernels::detect`] and stored by the caller (no global state).

pub mod block;
mod driver;
mod portable;
pub mod routing;
pub mod scalar;
pub mod wtype;

// The only places where the target architecture is selected (style rule 2).
#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(feature = "check-kernels")]
mod check;
#[cfg(target_arch = "x86_64")]
mod x86_64;

pub use block::{
    BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8A, BlockQ8x8, Q4Block, KVALUES, LVALUES, QK, ROWS,
};
pub use wtype::{Products, QMat, QuantProducts, WeightType};

/// A CPU tier. Ordered: a level can always be lowered to any earlier level of its architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CpuLevel {
    /// Plain Rust loops. Always available.
    Scalar,
    /// `wide` vectors (SSE2 / NEON baseline).
    Portable,
    /// x86-64 AVX2 + FMA (Haswell and later, Zen 1 and later).
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (Cascade Lake, Ice Lake and later, Zen 4 and later).
    Avx512Vnni,
    /// aarch64 Advanced SIMD (every aarch64 CPU).
    Neon,
    /// aarch64 NEON + dot product `sdot` (Cortex-A55/A76 and later, Apple M1 and later).
    NeonDot,
    /// aarch64 NEON + dotprod + int8 matrix multiply `smmla` (Cortex-A510/X2, Neoverse V1/N2).
    NeonI8mm,
}

/// One CPU tier of the registry [`TIERS`]: its level, the names `FERROQ_CPU` accepts, whether it
/// is chosen automatically, and its table.
pub struct TierDesc {
    pub level: CpuLevel,
    /// Accepted names, the first one canonical (logs, `ferroq bench`).
    pub names: &'static [&'static str],
    /// Whether the tier is chosen automatically when the CPU has it (see [`TIERS`]).
    pub auto: bool,
    /// The tier's table if this CPU has the tier's features, else `None`. The detection here is
    /// the only one: its proof token builds the table, and the table's entries rely on it.
    table: fn() -> Option<Kernels>,
}

/// `$path` on target architecture `$arch`, elsewhere a table function that finds nothing.
macro_rules! on_arch {
    ($arch:literal, $($path:ident)::+) => {{
        #[cfg(target_arch = $arch)]
        let f: fn() -> Option<Kernels> = $($path)::+;
        #[cfg(not(target_arch = $arch))]
        let f: fn() -> Option<Kernels> = || None;
        f
    }};
}

/// The tier registry, lowest first within each architecture. Adding a tier is one file (its
/// tiles, its `TierTable` and its table function) plus one entry here and its [`CpuLevel`]
/// variant.
///
/// The AVX-512 VNNI tier is chosen automatically where the CPU has it: measured against the
/// AVX2 tier on an AMD EPYC with AVX-512 (2026-12-02, docs/performance.md) it ran prefill
/// 1.3–1.6× faster and decode at parity or better once it had its own two-stream decode tiles.
/// `FERROQ_CPU=avx2` goes back to the AVX2 tier.
pub static TIERS: [TierDesc; 7] = [
    TierDesc {
        level: CpuLevel::Scalar,
        names: &["scalar", "generic", "none"],
        auto: true,
        table: || Some(finish::<ScalarT>()),
    },
    TierDesc {
        level: CpuLevel::Portable,
        names: &["portable", "wide"],
        auto: true,
        table: || Some(finish::<PortableT>()),
    },
    TierDesc {
        level: CpuLevel::Avx2,
        names: &["avx2"],
        auto: true,
        table: on_arch!("x86_64", x86_64::avx2_table),
    },
    TierDesc {
        level: CpuLevel::Avx512Vnni,
        names: &["avx512vnni", "avx512", "avx512-vnni", "vnni"],
        auto: true,
        table: on_arch!("x86_64", x86_64::avx512vnni_table),
    },
    TierDesc {
        level: CpuLevel::Neon,
        names: &["neon"],
        auto: true,
        table: on_arch!("aarch64", aarch64::neon_table),
    },
    TierDesc {
        level: CpuLevel::NeonDot,
        names: &["neon-dotprod", "dotprod", "neondot"],
        auto: true,
        table: on_arch!("aarch64", aarch64::neon_dot_table),
    },
    TierDesc {
        level: CpuLevel::NeonI8mm,
        names: &["neon-i8mm", "i8mm"],
        auto: true,
        table: on_arch!("aarch64", aarch64::neon_i8mm_table),
    },
];

impl CpuLevel {
    fn desc(self) -> &'static TierDesc {
        TIERS
            .iter()
            .find(|t| t.level == self)
            .expect("every CpuLevel has an entry in TIERS (checked by a test)")
    }

    /// Name used by `FERROQ_CPU` and in logs.
    pub fn name(self) -> &'static str {
        self.desc().names[0]
    }

    /// Parse a `FERROQ_CPU` value.
    pub fn parse(s: &str) -> Option<CpuLevel> {
        let s = s.trim().to_ascii_lowercase();
        TIERS
            .iter()
            .find(|t| t.names.contains(&s.as_str()))
            .map(|t| t.level)
    }

    /// Whether a level is chosen automatically when the CPU has it (see [`TIERS`]).
    pub fn auto_selected(self) -> bool {
        self.desc().auto
    }

    /// The best level this CPU supports that is chosen automatically (see
    /// [`CpuLevel::auto_selected`]).
    pub fn detect() -> CpuLevel {
        Self::available()
            .into_iter()
            .rfind(|l| l.auto_selected())
            .unwrap_or(CpuLevel::Scalar)
    }

    /// Every level this CPU supports, lowest first (always starts with `Scalar`, `Portable`).
    pub fn available() -> Vec<CpuLevel> {
        TIERS
            .iter()
            .filter(|t| (t.table)().is_some())
            .map(|t| t.level)
            .collect()
    }

    /// The level to use: the detected one, lowered (never raised above what the CPU supports)
    /// by the `FERROQ_CPU` environment variable, which can also opt in to a level that is not
    /// chosen automatically. An unknown or unsupported request falls back to the detected level
    /// with a message on stderr.
    pub fn from_env() -> CpuLevel {
        let best = Self::detect();
        match std::env::var("FERROQ_CPU") {
            Ok(s) if !s.is_empty() => match CpuLevel::parse(&s) {
                Some(l) if Self::available().contains(&l) => l,
                Some(l) => {
                    eprintln!(
                        "ferroq: FERROQ_CPU={s}: {} is not supported by this CPU; using {}",
                        l.name(),
                        best.name()
                    );
                    best
                }
                None => {
                    eprintln!(
                        "ferroq: FERROQ_CPU={s}: unknown level; using {}",
                        best.name()
                    );
                    best
                }
            },
            _ => best,
        }
    }
}

/// `y[t * ld_y + r] = Σ_k W[r][k] · x[t][k]` for quantized weights and activations.
/// Arguments: weight blocks, rows, k, activation blocks, tokens, y, ld_y.
/// `B` is the 4-bit block type ([`BlockQ4x8`] or [`BlockQ4Lx8`]).
pub type GemmQ4Fn<B = BlockQ4x8> = fn(&[B], usize, usize, &[BlockQ8A], usize, &mut [f32], usize);
/// Same as [`GemmQ4Fn`] for 8-bit weights.
pub type GemmQ8Fn = fn(&[BlockQ8x8], usize, usize, &[BlockQ8A], usize, &mut [f32], usize);
/// Same as [`GemmQ4Fn`] for 6-bit weights (`Q6x8`).
pub type GemmQ6Fn = fn(&[BlockQ6x8], usize, usize, &[BlockQ8A], usize, &mut [f32], usize);
/// Float-activation product with f32 weights.
pub type GemmF32Fn = fn(&[f32], usize, usize, &[f32], usize, &mut [f32], usize);
/// Float-activation product with 16-bit (bf16 or f16 bits) weights.
pub type GemmH16Fn = fn(&[u16], usize, usize, &[f32], usize, &mut [f32], usize);

/// Fused expert gate/up with SiLU, `ffn_gate_up_q4x8(w_gate, w_up, n_rows, k, x_all, rows, y,
/// ld_y)`: `y[i * ld_y + r] = silu((G x_all[rows[i]])[r]) · (U x_all[rows[i]])[r]`.
/// Twin: [`scalar::ffn_gate_up_q4x8`].
pub type GateUpQ4Fn<B = BlockQ4x8> =
    fn(&[B], &[B], usize, usize, &[BlockQ8A], &[u32], &mut [f32], usize);
/// Same as [`GateUpQ4Fn`] for 8-bit weights. Twin: [`scalar::ffn_gate_up_q8x8`].
pub type GateUpQ8Fn =
    fn(&[BlockQ8x8], &[BlockQ8x8], usize, usize, &[BlockQ8A], &[u32], &mut [f32], usize);
/// Attention scores of one query against `s.len()` key rows, `attn_scores(q, k, ld_k, scale, s)`.
/// Twin: [`scalar::attn_scores`].
pub type AttnScoresFn = fn(&[f32], &[f32], usize, f32, &mut [f32]);
/// Weighted sum of value rows into `o`, `attn_values(p, v, ld_v, o)`. Twin: [`scalar::attn_values`].
pub type AttnValuesFn = fn(&[f32], &[f32], usize, &mut [f32]);
/// [`AttnScoresFn`] with f16 keys (bits). Twin: [`scalar::attn_scores_f16`].
pub type AttnScoresF16Fn = fn(&[f32], &[u16], usize, f32, &mut [f32]);
/// [`AttnValuesFn`] with f16 values (bits). Twin: [`scalar::attn_values_f16`].
pub type AttnValuesF16Fn = fn(&[f32], &[u16], usize, &mut [f32]);
/// [`AttnScoresFn`] with int8 keys. Twin: [`scalar::attn_scores_i8`].
pub type AttnScoresI8Fn = fn(&[f32], &[i8], usize, f32, &mut [f32]);
/// [`AttnValuesFn`] with int8 values. Twin: [`scalar::attn_values_i8`].
pub type AttnValuesI8Fn = fn(&[f32], &[i8], usize, &mut [f32]);
/// Attention scores with 4-bit keys, `attn_scores_q4(q, k, ks, ld_k, ld_s, scale, s)`.
/// Twin: [`scalar::attn_scores_q4`].
pub type AttnScoresQ4Fn = fn(&[f32], &[u8], &[u16], usize, usize, f32, &mut [f32]);
/// Value sum with 4-bit values, `attn_values_q4(p, v, vs, ld_v, ld_s, o)`.
/// Twin: [`scalar::attn_values_q4`].
pub type AttnValuesQ4Fn = fn(&[f32], &[u8], &[u16], usize, usize, &mut [f32]);
/// Scores of query rows against transposed keys, `attn_scores_kt(q, kt, d, n, scale, s)`.
/// Twin: [`scalar::attn_scores_kt`].
pub type AttnScoresKtFn = fn(&[f32], &[f32], usize, usize, f32, &mut [f32]);
/// Value sums of several rows, `attn_values_rows(p, n, v, ld_v, d, o)`.
/// Twin: [`scalar::attn_values_rows`].
pub type AttnValuesRowsFn = fn(&[f32], usize, &[f32], usize, usize, &mut [f32]);
/// Key tile transposed to f32, `kv_transpose_f32(k, ld, d, n, kt)`: `kt[c * n + j] = k[j * ld
/// + c]`. Twin: [`scalar::kv_transpose_f32`].
pub type KvTransposeF32Fn = fn(&[f32], usize, usize, usize, &mut [f32]);
/// [`KvTransposeF32Fn`] from f16 bits. Twin: [`scalar::kv_transpose_f16`].
pub type KvTransposeF16Fn = fn(&[u16], usize, usize, usize, &mut [f32]);
/// Value tile from f16 bits, `kv_rows_f16(v, ld, d, n, vf)`: `vf[j * d + c] = v[j * ld + c]`.
/// Twin: [`scalar::kv_rows_f16`].
pub type KvRowsF16Fn = fn(&[u16], usize, usize, usize, &mut [f32]);
/// Online-softmax step over a tile, `softmax_tile(s, m_old) -> (m_new, sum)`.
/// Twin: [`scalar::softmax_tile`].
pub type SoftmaxTileFn = fn(&mut [f32], f32) -> (f32, f32);
/// Top-k, `topk(logits, k, idx, val)`. Twin: [`scalar::topk`].
pub type TopkFn = fn(&[f32], usize, &mut [u32], &mut [f32]);
/// Grouping by expert, `group_by_expert(expert_of, n_experts, counts, offsets, perm, inv)`.
/// Twin: [`scalar::group_by_expert`].
pub type GroupFn = fn(&[u32], usize, &mut [u32], &mut [u32], &mut [u32], &mut [u32]);

/// RoPE on one head, `rope(x, cos, sin)`. Twins: [`scalar::rope_interleaved`],
/// [`scalar::rope_half`].
pub type RopeFn = fn(&mut [f32], &[f32], &[f32]);
/// The 4-bit KV cache's steps: quantize a rotated block `(x, codes, scales)`, the rotation
/// (in place) and dequantization `(codes, scales, out)`. Twins: [`scalar::quantize_kv_q4`],
/// [`scalar::kv_q4_rotate`], [`scalar::dequantize_kv_q4`].
pub type KvQ4QuantFn = fn(&[f32], &mut [u8], &mut [u16]);
/// See [`KvQ4QuantFn`].
pub type KvQ4RotateFn = fn(&mut [f32]);
/// See [`KvQ4QuantFn`].
pub type KvQ4DequantFn = fn(&[u8], &[u16], &mut [f32]);

/// RMSNorm, `rmsnorm(x, weight, eps, out)`. Twin: [`scalar::rmsnorm`].
pub type RmsNormFn = fn(&[f32], Option<&[f32]>, f32, &mut [f32]);

/// The kernel table of one CPU level. Build it once ([`Kernels::detect`]) and keep it.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    pub level: CpuLevel,
    pub quantize_q8a: fn(&[f32], &mut [BlockQ8A]),
    /// The quantized products, per registered weight type ([`wtype`]).
    pub q: QuantProducts,
    pub gemm_f32: GemmF32Fn,
    pub gemm_bf16: GemmH16Fn,
    pub gemm_f16: GemmH16Fn,
    pub rmsnorm: RmsNormFn,
    // Expert routing.
    pub topk: TopkFn,
    pub group_by_expert: GroupFn,
    // Attention.
    pub attn_scores: AttnScoresFn,
    pub attn_values: AttnValuesFn,
    pub attn_scores_f16: AttnScoresF16Fn,
    pub attn_values_f16: AttnValuesF16Fn,
    pub attn_scores_i8: AttnScoresI8Fn,
    pub attn_values_i8: AttnValuesI8Fn,
    pub attn_scores_q4: AttnScoresQ4Fn,
    pub attn_values_q4: AttnValuesQ4Fn,
    pub attn_scores_kt: AttnScoresKtFn,
    pub softmax_tile: SoftmaxTileFn,
    pub attn_values_rows: AttnValuesRowsFn,
    pub kv_transpose_f32: KvTransposeF32Fn,
    pub kv_transpose_f16: KvTransposeF16Fn,
    pub kv_rows_f16: KvRowsF16Fn,
    // RoPE and the 4-bit KV cache (scalar in every tier today: a small share of the time).
    pub rope_interleaved: RopeFn,
    pub rope_half: RopeFn,
    pub quantize_kv_q4: KvQ4QuantFn,
    pub kv_q4_rotate: KvQ4RotateFn,
    pub dequantize_kv_q4: KvQ4DequantFn,
}

/// The scalar reference table.
pub(crate) const SCALAR: Kernels = Kernels {
    level: CpuLevel::Scalar,
    quantize_q8a: scalar::quantize_q8a,
    q: wtype::SCALAR_PRODUCTS,
    gemm_f32: scalar::gemm_f32,
    gemm_bf16: scalar::gemm_bf16,
    gemm_f16: scalar::gemm_f16,
    rmsnorm: scalar::rmsnorm,
    topk: scalar::topk,
    group_by_expert: scalar::group_by_expert,
    attn_scores: scalar::attn_scores,
    attn_values: scalar::attn_values,
    attn_scores_f16: scalar::attn_scores_f16,
    attn_values_f16: scalar::attn_values_f16,
    attn_scores_i8: scalar::attn_scores_i8,
    attn_values_i8: scalar::attn_values_i8,
    attn_scores_q4: scalar::attn_scores_q4,
    attn_values_q4: scalar::attn_values_q4,
    attn_scores_kt: scalar::attn_scores_kt,
    softmax_tile: scalar::softmax_tile,
    attn_values_rows: scalar::attn_values_rows,
    kv_transpose_f32: scalar::kv_transpose_f32,
    kv_transpose_f16: scalar::kv_transpose_f16,
    kv_rows_f16: scalar::kv_rows_f16,
    rope_interleaved: scalar::rope_interleaved,
    rope_half: scalar::rope_half,
    quantize_kv_q4: scalar::quantize_kv_q4,
    kv_q4_rotate: scalar::kv_q4_rotate,
    dequantize_kv_q4: scalar::dequantize_kv_q4,
};

/// A tier's table as a type, so that `check-kernels` can wrap it in generic (capture-free)
/// functions.
pub(crate) trait TierTable {
    const K: Kernels;
}

macro_rules! tier_table {
    ($name:ident, $table:expr) => {
        pub(crate) struct $name;
        impl TierTable for $name {
            const K: Kernels = $table;
        }
    };
}
tier_table!(ScalarT, SCALAR);
tier_table!(PortableT, portable::KERNELS);

/// The table of tier `T` (wrapped by the scalar twins with `check-kernels`). Called only by the
/// tiers' table functions in [`TIERS`], after their detection.
pub(crate) fn finish<T: TierTable>() -> Kernels {
    #[cfg(feature = "check-kernels")]
    {
        check::wrap::<T>()
    }
    #[cfg(not(feature = "check-kernels"))]
    {
        T::K
    }
}

impl Kernels {
    /// The scalar reference table.
    pub fn scalar() -> Kernels {
        SCALAR
    }

    /// The table for `level`. Returns `None` if this CPU does not support it.
    pub fn for_level(level: CpuLevel) -> Option<Kernels> {
        (level.desc().table)()
    }

    /// Detect the CPU once (honouring `FERROQ_CPU`), log the choice on stderr and build its table.
    pub fn detect() -> Kernels {
        let level = CpuLevel::from_env();
        let k = Kernels::for_level(level).unwrap_or_else(Kernels::scalar);
        eprintln!("ferroq: kernels: {}", k.level.name());
        k
    }
}
