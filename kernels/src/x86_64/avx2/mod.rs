//! x86-64 AVX2 + FMA + F16C tier (Haswell and later, Zen 1 and later).
//!
//! # Math
//! `y[t][r] = Σ_b (d_w[b][r] · d_a[t][b]) · isum[t][b][r]`, `isum` exact in i32. The float steps
//! are `s = dw·da; p = s·(f32)isum; acc = acc + p` (no FMA), the order of the scalar twin, so the
//! quantized products match it bit for bit.
//!
//! # Layout and lane plan (one 8-row group, one 32-column block)
//! A 32-byte chunk `c` of `BlockQ4x8::qs` holds in i32 lane `r` the 4 nibble bytes of row `r`:
//! low nibbles = columns `4c..4c+4` (activation quad `c`), high nibbles = columns `16+4c..`
//! (activation quad `4 + c`). Nibbles → levels with one `vpshufb` against `KVALUES` (the table
//! fits a 16-byte lane). `vpmaddubsw` wants unsigned × signed, so the sign trick:
//! `maddubs(|w|, sign(a, w))` = `w·a` pairs (|pair| ≤ 2·127·127 = 32258 < 2^15: no saturation),
//! then `vpmaddwd` by ones folds the 4 products of each row into its i32 lane. The quad of
//! activation bytes is a 32-bit broadcast. So per (block, token): 8 × (broadcast, `vpsignb`,
//! `vpmaddubsw`, `vpmaddwd`, `vpaddd`), one `vcvtdq2ps`, two `vmulps`, one `vaddps`; no
//! horizontal sum anywhere: lane `r` is row `r`.
//!
//! The weight unpack (and, `vpshufb`, `vpabsb`) is done once per block and reused for the `NY`
//! tokens of the tile. `NYMAX = 8` although only `NY = 4` fits the 16 ymm registers (4 i32 +
//! 4 f32 accumulators + 4 weight vectors): the spilled accumulators cost less than unpacking
//! each weight block twice as often. Measured (`cargo bench --bench kernels -- q4_gemm64/avx2`,
//! Zen 3, 1 thread): NY 4 → 97, 6 → 107, 8 → 114 Gelem/s at 2048 × 5120 × 64 tokens. The first
//! chunk of a block initializes the i32 sums (no zeroing, one `vpaddd` less per token): +2.5 %.
//!
//! # Where the time goes (Zen 3, measured)
//! The tile runs at the instruction-issue limit, not at the multiplier limit: replacing the
//! 3 multiplier-port ops of a (token, quad) by 2 multiplier ops + 1 `vpaddb` (same count) changed
//! nothing, dropping one op per (token, quad) gained 10 %. So only the instruction count per
//! MAC matters. Per (block, token) at NY = 8: 8 × 5 core ops (broadcast, `vpsignb`,
//! `vpmaddubsw`, `vpmaddwd`, `vpaddd`), 5 epilogue ops (broadcast `d_a`, `vmulps`,
//! `vcvtdq2ps`, `vmulps`, `vaddps`; removing them: +12 %) and 28 / NY unpack ops (removing
//! them: +5 %). The core is minimal for exact full-range inputs: no pair of `vpmaddubsw`
//! results can be summed in i16 (2 × 32258 > 2^15) and every weight vector needs its own
//! activation broadcast while lane `r` is row `r`. The epilogue is fixed by the twin's float
//! order. Decode (NY = 1) is compute-bound too on this machine (21 GB/s of weights on one core,
//! ~80 instructions per block), so [`q4_tile1x2`] / [`q8_tile1x2`] run two groups against one
//! activation row and broadcast each quad once for both; the driver pairs gate with up, or
//! group `g` with `g + groups / 2` (two sequential weight streams: pairing `g` with `g + 1`
//! was 15-25 % slower out of cache). Matvec, 1 thread, min of N runs: 1536 × 576 20.5 → 21.8,
//! 49152 × 576 19.3 → 21.4, 16384 × 5120 (out of cache) 12.6 → 17.5 GB/s; q8 1536 × 576
//! 44.3 → 47.1 GB/s.
//!
//! Tried and dropped (min of N runs, 1536 × 576 × 64 tokens, 1 thread, ~55 GMAC/s base):
//! `vpsignb` → `vpxor` + `vpsubb` with a sign mask from `vpcmpgtb` (1 op → 2 light ops): slower;
//! one set of token pointers + fully unrolled chunks: ±0 (more spills); software prefetch of
//! the activations 4/8/16 blocks ahead: −2..−4 %; `TOK_CHUNK` 32 instead of 64: ±0.
//! Format changes (measured, not adopted): activations limited to |a| ≤ 64 and stored with a
//! +64 offset (`vpmaddubsw(a + 64, w)` is exact, the offset undone with the block's Σw):
//! +10 % (the offset added in the kernel instead: ±0); |a| ≤ 32 (two `vpmaddubsw` summed by
//! `vpaddw` before one `vpmaddwd`): +41 % prefill, +37 % decode, before its correction term.
//!
//! Rejected: the +128 offset trick with `vpmaddubsw` (unsigned `w + 128` up to 241 makes a pair
//! up to 61214, which saturates i16; only `vpdpbusd`, which has no i16 stage, can use it).

use core::arch::x86_64::*;

use crate::block::{BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8A, BlockQ8x8, KVALUES, QK, ROWS};
use crate::driver::{Tier, Tile};
use crate::scalar;

/// Proof that the CPU has AVX2, FMA and F16C.
#[derive(Clone, Copy)]
pub(crate) struct Avx2(());

impl Avx2 {
    pub(crate) fn detect() -> Option<Self> {
        (is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c"))
        .then_some(Avx2(()))
    }
}

impl Tier for Avx2 {
    unsafe fn assume() -> Self {
        Avx2(())
    }
}

// The quantized-product entries of this tier's table, compiled with its features.
crate::driver::tier_entries!(Avx2, "avx2,fma,f16c");

// The tier's kernels by product kind.
mod attention;
mod float;
mod quant;

pub(crate) use attention::*;
pub(crate) use float::*;
pub(crate) use quant::*;
