//! aarch64 tiers (placeholder until the NEON kernels land).
use crate::Kernels;
pub(crate) const NEON: Kernels = Kernels { level: crate::CpuLevel::Neon, ..crate::portable::KERNELS };
pub(crate) const NEON_DOT: Kernels = Kernels { level: crate::CpuLevel::NeonDot, ..NEON };
pub(crate) const NEON_I8MM: Kernels = Kernels { level: crate::CpuLevel::NeonI8mm, ..NEON };
