//! The `.fqm` model file format: reader and writer. The byte layout is specified in `SPEC.md`
//! beside this file; keep the two in step.
//!
//! A file is opened with `memmap2` and used in place: [`FqmFile::tensor`] returns typed views
//! into the mapping. Every offset, size and shape is validated in [`FqmFile::open`] before any
//! view is handed out, so a corrupt or truncated file yields an [`Error`] naming the field or
//! tensor, never a panic or an out-of-bounds read.

mod reader;
mod writer;
mod xxh64;

pub use reader::{FqmFile, TensorInfo, TensorView, VerifyReport, COPY_BELOW};
pub use writer::FqmWriter;
pub use xxh64::xxh64;

use ferroq_kernels::block::QK;

/// File magic: the first 8 bytes.
pub const MAGIC: [u8; 8] = *b"FERROQM\0";
/// Format version this build writes. Bumped on any layout change. Version 2 added checksums
/// (XXH64 per tensor, of the metadata and of the directory); version 1 files still read.
pub const VERSION: u32 = 2;
/// Oldest format version this build reads.
pub const MIN_VERSION: u32 = 1;
/// Size of the fixed header.
pub const HEADER_SIZE: usize = 64;
/// Minimum alignment of tensor data (one AVX-512 vector, one cache line).
pub const TENSOR_ALIGN: u64 = 64;
/// Alignment of the first tensor of each routed expert (a page: experts can be prefetched or
/// dropped one by one with `madvise`).
pub const EXPERT_ALIGN: u64 = 4096;
/// Caps that reject absurd values before any arithmetic on them.
pub const MAX_TENSORS: u64 = 1 << 22;
pub const MAX_NAME_LEN: usize = 1024;
pub const MAX_DIMS: usize = 4;
pub const MAX_META_LEN: u64 = 1 << 30;

/// Element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    Bf16 = 2,
    /// 4-bit codebook weights in 8-row interleaved blocks (`ferroq_kernels::block`).
    Q4x8 = 3,
    /// 8-bit weights in 8-row interleaved blocks.
    Q8x8 = 4,
    /// Raw bytes (embedded files such as `tokenizer.json`).
    U8 = 5,
    /// Linear 4-bit weights (levels `q − 8`, ggml's `Q4_0` grid) in the `Q4x8` block layout.
    Q4Lx8 = 6,
    /// 6-bit weights (levels `u − 32`) in 8-row interleaved blocks: output and embedding tables.
    Q6x8 = 7,
}

impl DType {
    pub fn from_u8(v: u8) -> Option<DType> {
        Some(match v {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Bf16,
            3 => DType::Q4x8,
            4 => DType::Q8x8,
            5 => DType::U8,
            6 => DType::Q4Lx8,
            7 => DType::Q6x8,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::Q4x8 => "q4x8",
            DType::Q8x8 => "q8x8",
            DType::U8 => "u8",
            DType::Q4Lx8 => "q4lx8",
            DType::Q6x8 => "q6x8",
        }
    }

    /// Bytes a tensor of this type and shape occupies, or `None` if the shape is invalid for the
    /// type (quantized types need `[rows, cols]` with `cols % 32 == 0`) or the size overflows.
    pub fn nbytes(self, shape: &[usize]) -> Option<usize> {
        let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        match self {
            DType::F32 => n.checked_mul(4),
            DType::F16 | DType::Bf16 => n.checked_mul(2),
            DType::U8 => Some(n),
            _ => {
                let t = self.quantized()?;
                let [rows, cols] = shape else { return None };
                if cols % QK != 0 || *cols == 0 {
                    return None;
                }
                // n fits, so rows*cols fits; the padded size is at most n * 272/256 + a group
                let padded = rows.div_ceil(8).checked_mul(8)?.checked_mul(*cols)?;
                let _ = padded.checked_mul(2)?;
                Some(t.nbytes(*rows, *cols))
            }
        }
    }

    /// Bits per weight including scales.
    pub fn bits_per_weight(self) -> f64 {
        match self {
            DType::F32 => 32.0,
            DType::F16 | DType::Bf16 => 16.0,
            DType::U8 => 8.0,
            _ => self.quantized().map_or(f64::NAN, |t| t.bits_per_weight),
        }
    }

    /// The registered weight type (`ferroq_kernels::wtype`) of this dtype, if it is quantized.
    pub fn quantized(self) -> Option<&'static ferroq_kernels::wtype::TypeInfo> {
        ferroq_kernels::wtype::type_info(self.name())
    }
}
