//! Block layouts shared by the `.fqm` format, the converter and every kernel tier.
//!
//! These layouts are frozen with the `.fqm` format version: a change here is a format change.
//!
//! # Weight blocks: 8 rows interleaved ("R8")
//!
//! A weight matrix `W [rows, cols]` (nn.Linear layout, `y = W x`) is cut into groups of 8 rows
//! and blocks of 32 columns. `cols` must be a multiple of 32; `rows` is padded up to a multiple
//! of 8 with zero-scale rows. Blocks are stored row-group major:
//! `offset(g, b) = (g * (cols / 32) + b) * BLOCK_BYTES`.
//!
//! Within a block, the quants of the 8 rows are interleaved in 4-column groups, so that one
//! 32-byte load holds 4 consecutive columns of all 8 rows. An x86 `vpdpbusd` against the
//! 4 activation bytes broadcast to every lane then accumulates one i32 per row, and an ARM
//! `sdot` by lane does the same on two 16-byte halves (rows 0–3, rows 4–7). No horizontal
//! sum is needed until the 8 row results are stored.
//!
//! ## `Q4x8`: 4.5 bits per weight, non-linear 16-level codebook
//! ```text
//! d:  [f16; 8]     scale of each row's 32 weights            16 bytes
//! qs: [u8; 128]    qs[c*32 + r*4 + j] = q[r][4c+j] | q[r][16+4c+j] << 4    (c<4, r<8, j<4)
//! w[r][k] = d[r] * KVALUES[q[r][k]]
//! ```
//! ## `Q4Lx8`: 4.5 bits per weight, linear 16 levels (ggml's `Q4_0` grid)
//! The `Q4x8` layout with the levels `LVALUES = [-8, -7, …, 7]`:
//! ```text
//! w[r][k] = d[r] * (q[r][k] - 8)
//! ```
//! Less accurate than the codebook on trained weights (~1.2× the relative RMS error), but the
//! nibbles are the unsigned operand of an x86 `vpmaddubsw` as they are (no table lookup, no
//! sign trick), and up to eight of its i16 results can be summed before widening: about 1.5×
//! fewer instructions per multiply-add on AVX2 (see `x86_64/avx2/quant.rs`).
//!
//! ## `Q6x8`: 6.5 bits per weight, linear 64 levels (for the output and embedding tables)
//! ```text
//! d:  [f16; 8]                                               16 bytes
//! ql: [u8; 128]    low 4 bits of u = q + 32, the nibble layout of Q4x8's qs
//! qh: [u8; 64]     high 2 bits: qh[h*32 + r*4 + j] bits 2s..2s+2 = u[r][4c+j] >> 4 for the
//!                  column quad c = 2s + h                    (s<4, h<2, r<8, j<4)
//! w[r][k] = d[r] * (u[r][k] - 32)                            (u in 0..64)
//! ```
//! Chunk `c` (quad `c`, 32 bytes, lane `r` = row `r`) of the unpacked block is `ql[c % 4]`'s
//! low (`c < 4`) or high nibbles OR'ed with `(qh[c % 2] >> 2·(c / 2) & 3) << 4`: a few shifts
//! and masks per 32 weights, shared by every token of a tile. Unlike ggml's `Q6_K` (super-blocks
//! of 256) it blocks any row length that is a multiple of 32 (SmolLM2's 576, for which
//! llama.cpp falls back to `Q8_0`).
//!
//! ## `Q8x8`: 8.5 bits per weight
//! ```text
//! d:  [f16; 8]                                               16 bytes
//! qs: [i8; 256]    qs[c*32 + r*4 + j] = q[r][4c+j]          (c<8, r<8, j<4)
//! w[r][k] = d[r] * q[r][k]
//! ```
//!
//! # Activation block: `BlockQ8A`
//! Activations are quantized on the fly to blocks of 32 int8 with an f32 scale and the sum of
//! the quants (used to undo the +128 offset that unsigned×signed dot products need).

use bytemuck::{Pod, Zeroable};

/// Columns per block (all quantized types).
pub const QK: usize = 32;
/// Rows interleaved per block.
pub const ROWS: usize = 8;

/// The 16 levels of the 4-bit codebook (the non-linear IQ4_NL levels of ggml). Denser near zero,
/// where most weights of a trained matrix are; the error per block is lower than a uniform grid
/// at the same 4.5 bits per weight.
pub const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// One block of 8 rows × 32 columns of 4-bit weights. 144 bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
pub struct BlockQ4x8 {
    /// f16 bits of each row's scale.
    pub d: [u16; ROWS],
    /// Interleaved nibbles, see the module docs.
    pub qs: [u8; 128],
}

/// The 16 levels of the linear 4-bit type `Q4Lx8`: `q - 8`.
pub const LVALUES: [i8; 16] = [-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7];

/// One block of 8 rows × 32 columns of linear 4-bit weights (`Q4Lx8`). 144 bytes, the layout
/// of [`BlockQ4x8`].
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
pub struct BlockQ4Lx8 {
    /// f16 bits of each row's scale.
    pub d: [u16; ROWS],
    /// Interleaved nibbles, as in [`BlockQ4x8`].
    pub qs: [u8; 128],
}

/// A 4-bit weight block type: the `Q4x8` layout, read through its 16 levels.
/// Level 8 must be the level nearest to zero (the quantizer's sweep starts there).
pub trait Q4Block: Pod + Send + Sync + core::fmt::Debug + PartialEq + 'static {
    /// The 16 levels a nibble selects.
    const LEVELS: [i8; 16];
    /// Short name, for messages.
    const NAME: &'static str;
    /// f16 bits of the 8 row scales.
    fn d(&self) -> &[u16; ROWS];
    /// Interleaved nibbles.
    fn qs(&self) -> &[u8; 128];
    /// A block from its fields.
    fn from_parts(d: [u16; ROWS], qs: [u8; 128]) -> Self;
}

macro_rules! q4_block {
    ($block:ty, $levels:expr, $name:literal) => {
        impl Q4Block for $block {
            const LEVELS: [i8; 16] = $levels;
            const NAME: &'static str = $name;
            #[inline(always)]
            fn d(&self) -> &[u16; ROWS] {
                &self.d
            }
            #[inline(always)]
            fn qs(&self) -> &[u8; 128] {
                &self.qs
            }
            fn from_parts(d: [u16; ROWS], qs: [u8; 128]) -> Self {
                Self { d, qs }
            }
        }
    };
}
q4_block!(BlockQ4x8, KVALUES, "q4x8");
q4_block!(BlockQ4Lx8, LVALUES, "q4lx8");

/// One block of 8 rows × 32 columns of 8-bit weights. 272 bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
pub struct BlockQ8x8 {
    /// f16 bits of each row's scale.
    pub d: [u16; ROWS],
    /// Interleaved int8 quants, see the module docs.
    pub qs: [i8; 256],
}

/// One block of 8 rows × 32 columns of 6-bit weights (`Q6x8`). 208 bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
pub struct BlockQ6x8 {
    /// f16 bits of each row's scale.
    pub d: [u16; ROWS],
    /// Low 4 bits of `u = q + 32`, in the nibble layout of [`BlockQ4x8::qs`].
    pub ql: [u8; 128],
    /// High 2 bits of `u`, see the module docs and [`q6_pos`].
    pub qh: [u8; 64],
}

/// One block of 32 activations quantized to int8. 40 bytes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq)]
pub struct BlockQ8A {
    /// Scale: `x[k] ≈ d * qs[k]`.
    pub d: f32,
    /// `8 · Σ qs`: the offset term of the linear 4-bit levels `q − 8` (`Σ (q−8)·a = Σ q·a −
    /// sum8`), stored ready so the AVX2 kernel broadcasts it straight from memory.
    pub sum8: i32,
    pub qs: [i8; QK],
}

const _: () = assert!(core::mem::size_of::<BlockQ4x8>() == 144);
const _: () = assert!(core::mem::size_of::<BlockQ4Lx8>() == 144);
const _: () = assert!(core::mem::size_of::<BlockQ8x8>() == 272);
const _: () = assert!(core::mem::size_of::<BlockQ6x8>() == 208);
const _: () = assert!(core::mem::size_of::<BlockQ8A>() == 40);

/// Byte index in `BlockQ4x8::qs` of the nibble for row `r`, column `k` (< 32), and whether it is
/// the high nibble.
#[inline(always)]
pub const fn q4_pos(r: usize, k: usize) -> (usize, bool) {
    let hi = k >= 16;
    let k = k & 15;
    ((k / 4) * 32 + r * 4 + (k % 4), hi)
}

/// Where `BlockQ6x8` keeps `u` of row `r`, column `k` (< 32): the `ql` byte and whether its
/// high nibble (as [`q4_pos`]), and the `qh` byte and the shift of its 2 bits.
#[inline(always)]
pub const fn q6_pos(r: usize, k: usize) -> (usize, bool, usize, u32) {
    let (il, hi) = q4_pos(r, k);
    let c = k / 4;
    (il, hi, (c % 2) * 32 + r * 4 + (k % 4), 2 * (c / 2) as u32)
}

/// The 6-bit value `u` (0..64) of row `r`, column `k` of a `BlockQ6x8`; the weight is
/// `d[r] · (u − 32)`.
#[inline(always)]
pub fn q6_get(b: &BlockQ6x8, r: usize, k: usize) -> u8 {
    let (il, hi, ih, sh) = q6_pos(r, k);
    let lo = if hi { b.ql[il] >> 4 } else { b.ql[il] & 0x0F };
    lo | ((b.qh[ih] >> sh) & 3) << 4
}

/// Index in `BlockQ8x8::qs` of row `r`, column `k` (< 32).
#[inline(always)]
pub const fn q8_pos(r: usize, k: usize) -> usize {
    (k / 4) * 32 + r * 4 + (k % 4)
}

/// Number of 8-row groups for `rows` rows.
#[inline]
pub const fn row_groups(rows: usize) -> usize {
    rows.div_ceil(ROWS)
}

/// Bytes of a `Q4x8` tensor of `rows × cols` (`cols % 32 == 0`).
#[inline]
pub const fn q4x8_bytes(rows: usize, cols: usize) -> usize {
    row_groups(rows) * (cols / QK) * core::mem::size_of::<BlockQ4x8>()
}

/// Bytes of a `Q6x8` tensor of `rows × cols` (`cols % 32 == 0`).
#[inline]
pub const fn q6x8_bytes(rows: usize, cols: usize) -> usize {
    row_groups(rows) * (cols / QK) * core::mem::size_of::<BlockQ6x8>()
}

/// Bytes of a `Q8x8` tensor of `rows × cols` (`cols % 32 == 0`).
#[inline]
pub const fn q8x8_bytes(rows: usize, cols: usize) -> usize {
    row_groups(rows) * (cols / QK) * core::mem::size_of::<BlockQ8x8>()
}
