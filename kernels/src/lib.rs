//! ferroq kernels: quantized matrix products, expert routing and vector ops for every CPU tier,
//! chosen at run time. This crate knows nothing about models.
//!
//! * [`block`]: the weight and activation block layouts (frozen with the `.fqm` format).
//! * [`scalar`]: the reference twins (the spec).
//! * [`Kernels`]: a table of function pointers for one [`CpuLevel`], built once by
//!   [`Kernels::detect`] and stored by the caller (no global state).

pub mod block;
pub mod scalar;

pub use block::{BlockQ4x8, BlockQ8A, BlockQ8x8, KVALUES, QK, ROWS};

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

impl CpuLevel {
    /// Name used by `FERROQ_CPU` and in logs.
    pub fn name(self) -> &'static str {
        match self {
            CpuLevel::Scalar => "scalar",
            CpuLevel::Portable => "portable",
            CpuLevel::Avx2 => "avx2",
            CpuLevel::Avx512Vnni => "avx512vnni",
            CpuLevel::Neon => "neon",
            CpuLevel::NeonDot => "neon-dotprod",
            CpuLevel::NeonI8mm => "neon-i8mm",
        }
    }

    /// Parse a `FERROQ_CPU` value.
    pub fn parse(s: &str) -> Option<CpuLevel> {
        Some(match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "generic" | "none" => CpuLevel::Scalar,
            "portable" | "wide" => CpuLevel::Portable,
            "avx2" => CpuLevel::Avx2,
            "avx512" | "avx512vnni" | "avx512-vnni" | "vnni" => CpuLevel::Avx512Vnni,
            "neon" => CpuLevel::Neon,
            "dotprod" | "neon-dotprod" | "neondot" => CpuLevel::NeonDot,
            "i8mm" | "neon-i8mm" => CpuLevel::NeonI8mm,
            _ => return None,
        })
    }

    /// The best level this CPU supports.
    pub fn detect() -> CpuLevel {
        *Self::available().last().unwrap_or(&CpuLevel::Scalar)
    }

    /// Every level this CPU supports, lowest first (always starts with `Scalar`, `Portable`).
    pub fn available() -> Vec<CpuLevel> {
        let mut v = vec![CpuLevel::Scalar, CpuLevel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                v.push(CpuLevel::Avx2);
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512vnni")
                {
                    v.push(CpuLevel::Avx512Vnni);
                }
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(CpuLevel::Neon);
                if std::arch::is_aarch64_feature_detected!("dotprod") {
                    v.push(CpuLevel::NeonDot);
                    if std::arch::is_aarch64_feature_detected!("i8mm") {
                        v.push(CpuLevel::NeonI8mm);
                    }
                }
            }
        }
        v
    }

    /// The level to use: the detected one, lowered (never raised) by the `FERROQ_CPU`
    /// environment variable. An unknown or unsupported request falls back to the detected level
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
pub type GemmQ4Fn = fn(&[BlockQ4x8], usize, usize, &[BlockQ8A], usize, &mut [f32], usize);
/// Same as [`GemmQ4Fn`] for 8-bit weights.
pub type GemmQ8Fn = fn(&[BlockQ8x8], usize, usize, &[BlockQ8A], usize, &mut [f32], usize);
/// Float-activation product with f32 weights.
pub type GemmF32Fn = fn(&[f32], usize, usize, &[f32], usize, &mut [f32], usize);
/// Float-activation product with 16-bit (bf16 or f16 bits) weights.
pub type GemmH16Fn = fn(&[u16], usize, usize, &[f32], usize, &mut [f32], usize);

/// The kernel table of one CPU level. Build it once ([`Kernels::detect`]) and keep it.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    pub level: CpuLevel,
    pub quantize_q8a: fn(&[f32], &mut [BlockQ8A]),
    pub gemm_q4x8: GemmQ4Fn,
    pub gemm_q8x8: GemmQ8Fn,
    pub gemm_f32: GemmF32Fn,
    pub gemm_bf16: GemmH16Fn,
    pub gemm_f16: GemmH16Fn,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub axpy_f32: fn(f32, &[f32], &mut [f32]),
    pub rmsnorm: fn(&[f32], Option<&[f32]>, f32, &mut [f32]),
    pub softmax: fn(&mut [f32]),
    pub silu_mul: fn(&[f32], &[f32], &mut [f32]),
}

impl Kernels {
    /// The scalar reference table.
    pub fn scalar() -> Kernels {
        Kernels {
            level: CpuLevel::Scalar,
            quantize_q8a: scalar::quantize_q8a,
            gemm_q4x8: scalar::gemm_q4x8,
            gemm_q8x8: scalar::gemm_q8x8,
            gemm_f32: scalar::gemm_f32,
            gemm_bf16: scalar::gemm_bf16,
            gemm_f16: scalar::gemm_f16,
            dot_f32: scalar::dot_f32,
            axpy_f32: scalar::axpy_f32,
            rmsnorm: scalar::rmsnorm,
            softmax: scalar::softmax,
            silu_mul: scalar::silu_mul,
        }
    }

    /// The table for `level`. Returns `None` if this CPU does not support it.
    pub fn for_level(level: CpuLevel) -> Option<Kernels> {
        if !CpuLevel::available().contains(&level) {
            return None;
        }
        // SIMD tiers fill in their entries here; until a tier has a kernel, the scalar twin serves.
        let k = Kernels::scalar();
        Some(Kernels { level, ..k })
    }

    /// Detect the CPU once (honouring `FERROQ_CPU`) and build its table.
    pub fn detect() -> Kernels {
        let level = CpuLevel::from_env();
        Kernels::for_level(level).unwrap_or_else(Kernels::scalar)
    }
}
