//! Tier-independent drivers around the per-ISA micro-kernels.
//!
//! Every tier implements one micro-kernel per weight type, [`Tile::tile`]: one 8-row weight group
//! (all `k / 32` blocks) against `NY` activation rows, where `NY` is a compile-time constant, so
//! each weight block is loaded and unpacked once and reused for `NY` activation rows. The drivers
//! here cut a whole product into such tiles:
//!
//! ```text
//! for each chunk of TOK_CHUNK output rows           (activations of the chunk stay in L2)
//!   for each 8-row weight group g                   (matrix × vector: weights streamed once)
//!     split the chunk into ceil(n / NYMAX) tiles of nearly equal size (never a 1-row leftover)
//!     tile::<NY>(w[g], [x rows of the tile], out)  (NY = 1..=8, picked by a match)
//! ```
//!
//! A chunk of one row (decode) goes through [`Tile::tile1x2`] instead: two groups per call
//! (gate and up of a group for the fused product, groups `g` and `g + groups / 2` otherwise:
//! two sequential weight streams), so a tier
//! can load each activation quad once for both.
//!
//! The activation row of output row `i` is `i` for a plain product or `rows[i]` for the
//! expert-gather product: the micro-kernel receives slices into `x`, nothing is copied.

use crate::block::{BlockQ8A, QK, ROWS};

/// One micro-kernel: an 8-row weight group against `NY` activation rows.
///
/// `w` holds the `k / 32` blocks of the group, each `x[t]` at least `w.len()` activation blocks.
/// `out[t][r]` receives `Σ_b (d_w[r] · d_a[t][b]) · isum[t][b][r]`, summed over blocks in order,
/// with the float operations in exactly the order of the scalar twin.
pub(crate) trait Tile<B>: Copy {
    /// Largest `NY` worth using (register budget of the tier), at most 8.
    const NYMAX: usize;
    fn tile<const NY: usize>(self, w: &[B], x: &[&[BlockQ8A]; NY], out: &mut [[f32; ROWS]; NY]);

    /// Two weight groups (`w0.len() == w1.len()`) against one activation row: the single-token
    /// (decode) case, where a tier can load each activation quad once for both groups. The
    /// default runs `tile::<1>` twice.
    #[inline]
    fn tile1x2(
        self,
        w0: &[B],
        w1: &[B],
        x: &[BlockQ8A],
        out0: &mut [f32; ROWS],
        out1: &mut [f32; ROWS],
    ) {
        let mut o = [[0.0f32; ROWS]; 1];
        self.tile::<1>(w0, &[x], &mut o);
        *out0 = o[0];
        self.tile::<1>(w1, &[x], &mut o);
        *out1 = o[0];
    }

    /// `g[i][r] = silu(g[i][r]) · u[i][r]` (the SwiGLU step of the fused gate/up), bit-identical
    /// to [`crate::scalar::silu`]; a tier may override it with a vector version. Inlined into
    /// the tier's feature context by [`tier_entries!`] either way.
    #[inline(always)]
    fn silu_mul<const NY: usize>(self, g: &mut [[f32; ROWS]; NY], u: &[[f32; ROWS]; NY]) {
        for (o, u) in g.iter_mut().zip(u) {
            for (ov, &uv) in o.iter_mut().zip(u) {
                *ov = crate::scalar::silu(*ov) * uv;
            }
        }
    }
}

/// Output rows per chunk: 64 rows × 160 blocks × 40 B = 410 KiB of activations at k = 5120.
const TOK_CHUNK: usize = 64;

/// `y[i * ld_y + r] = Σ_k W[r][k] · x[row(i)][k]` for `i < n_out`, `r < n_rows`, where
/// `row(i) = rows[i]` if `rows` is given, else `i`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn gemm<B, T: Tile<B>>(
    t: T,
    w: &[B],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    rows: Option<&[u32]>,
    n_out: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    run(t, w, None, n_rows, k, x, rows, n_out, y, ld_y);
}

/// Fused gate/up: `y[i * ld_y + r] = silu(G x_i)[r] · (U x_i)[r]`. Both weight groups are
/// multiplied against the same activation tile while it is in L1.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn gate_up<B, T: Tile<B>>(
    t: T,
    w_gate: &[B],
    w_up: &[B],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld_y: usize,
) {
    run(
        t,
        w_gate,
        Some(w_up),
        n_rows,
        k,
        x,
        Some(rows),
        rows.len(),
        y,
        ld_y,
    );
}

/// Shape checks shared by every quantized product (done once per call, not in the hot loop).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn check_shapes<B>(
    w: &[B],
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    rows: Option<&[u32]>,
    n_out: usize,
    y: &[f32],
    ld_y: usize,
) {
    assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
    let nb = k / QK;
    assert!(
        w.len() >= n_rows.div_ceil(ROWS) * nb,
        "weights hold {} blocks, need {}",
        w.len(),
        n_rows.div_ceil(ROWS) * nb
    );
    assert!(
        ld_y >= n_rows || n_out <= 1,
        "ld_y = {ld_y} < n_rows = {n_rows}"
    );
    if n_out > 0 {
        assert!(y.len() >= (n_out - 1) * ld_y + n_rows, "y too short");
    }
    match rows {
        Some(rows) => {
            assert!(rows.len() >= n_out);
            let n_x = x.len().checked_div(nb).unwrap_or(usize::MAX);
            assert!(
                rows[..n_out].iter().all(|&r| (r as usize) < n_x),
                "row index out of range"
            );
        }
        None => assert!(x.len() >= n_out * nb, "activations too short"),
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn run<B, T: Tile<B>>(
    t: T,
    w: &[B],
    w_up: Option<&[B]>,
    n_rows: usize,
    k: usize,
    x: &[BlockQ8A],
    rows: Option<&[u32]>,
    n_out: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    check_shapes(w, n_rows, k, x, rows, n_out, y, ld_y);
    if let Some(u) = w_up {
        check_shapes(u, n_rows, k, x, rows, n_out, y, ld_y);
    }
    let nb = k / QK;
    let groups = n_rows.div_ceil(ROWS);
    let nymax = T::NYMAX.clamp(1, 8);
    let mut c0 = 0;
    while c0 < n_out {
        let c1 = (c0 + TOK_CHUNK).min(n_out);
        if c1 - c0 == 1 {
            single(t, w, w_up, n_rows, nb, x, rows, c0, y, ld_y);
            c0 = c1;
            continue;
        }
        for g in 0..groups {
            let wg = &w[g * nb..(g + 1) * nb];
            let ug = w_up.map(|u| &u[g * nb..(g + 1) * nb]);
            // even split of the chunk into tiles of at most nymax rows
            let n = c1 - c0;
            let n_tiles = n.div_ceil(nymax);
            let (base, extra) = (n / n_tiles, n % n_tiles);
            let mut s = c0;
            for i in 0..n_tiles {
                let ny = base + usize::from(i < extra);
                let a = Args {
                    wg,
                    ug,
                    g,
                    n_rows,
                    nb,
                    x,
                    rows,
                    s,
                    y: &mut *y,
                    ld_y,
                };
                match ny {
                    1 => one::<B, T, 1>(t, a),
                    2 => one::<B, T, 2>(t, a),
                    3 => one::<B, T, 3>(t, a),
                    4 => one::<B, T, 4>(t, a),
                    5 => one::<B, T, 5>(t, a),
                    6 => one::<B, T, 6>(t, a),
                    7 => one::<B, T, 7>(t, a),
                    _ => one::<B, T, 8>(t, a),
                }
                s += ny;
            }
        }
        c0 = c1;
    }
}

/// One activation row against all groups: gate and up of a group share the activation loads
/// ([`Tile::tile1x2`]); a plain product takes groups `g` and `g + groups / 2` together.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn single<B, T: Tile<B>>(
    t: T,
    w: &[B],
    w_up: Option<&[B]>,
    n_rows: usize,
    nb: usize,
    x: &[BlockQ8A],
    rows: Option<&[u32]>,
    s: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    let row = rows.map_or(s, |r| r[s] as usize);
    let xs = &x[row * nb..(row + 1) * nb];
    let yrow = &mut y[s * ld_y..];
    let groups = n_rows.div_ceil(ROWS);
    let wg = |g: usize| &w[g * nb..(g + 1) * nb];
    let mut put = |g: usize, o: &[f32; ROWS]| {
        let r0 = g * ROWS;
        let nr = ROWS.min(n_rows - r0);
        yrow[r0..r0 + nr].copy_from_slice(&o[..nr]);
    };
    let (mut o0, mut o1) = ([0.0f32; ROWS], [0.0f32; ROWS]);
    match w_up {
        Some(u) => {
            for g in 0..groups {
                t.tile1x2(wg(g), &u[g * nb..(g + 1) * nb], xs, &mut o0, &mut o1);
                let mut g0 = [o0];
                t.silu_mul::<1>(&mut g0, &[o1]);
                put(g, &g0[0]);
            }
        }
        None => {
            // groups g and g + half: two sequential weight streams (pairing g with g + 1 makes
            // both streams jump at every pair; measured 15-25 % slower at 49152 x 576 out of
            // cache, where the prefetcher keeps retraining)
            let half = groups / 2;
            for g in 0..half {
                t.tile1x2(wg(g), wg(g + half), xs, &mut o0, &mut o1);
                put(g, &o0);
                put(g + half, &o1);
            }
            if groups % 2 == 1 {
                let mut o = [[0.0f32; ROWS]; 1];
                t.tile::<1>(wg(groups - 1), &[xs], &mut o);
                put(groups - 1, &o[0]);
            }
        }
    }
}

struct Args<'a, B> {
    wg: &'a [B],
    ug: Option<&'a [B]>,
    g: usize,
    n_rows: usize,
    nb: usize,
    x: &'a [BlockQ8A],
    rows: Option<&'a [u32]>,
    s: usize,
    y: &'a mut [f32],
    ld_y: usize,
}

#[inline(always)]
fn one<B, T: Tile<B>, const NY: usize>(t: T, a: Args<'_, B>) {
    let nb = a.nb;
    let xs: [&[BlockQ8A]; NY] = core::array::from_fn(|i| {
        let row = a.rows.map_or(a.s + i, |r| r[a.s + i] as usize);
        &a.x[row * nb..(row + 1) * nb]
    });
    let mut out = [[0.0f32; ROWS]; NY];
    t.tile::<NY>(a.wg, &xs, &mut out);
    if let Some(ug) = a.ug {
        let mut up = [[0.0f32; ROWS]; NY];
        t.tile::<NY>(ug, &xs, &mut up);
        t.silu_mul::<NY>(&mut out, &up);
    }
    let r0 = a.g * ROWS;
    let nr = ROWS.min(a.n_rows - r0);
    for (i, o) in out.iter().enumerate() {
        let base = (a.s + i) * a.ld_y + r0;
        a.y[base..base + nr].copy_from_slice(&o[..nr]);
    }
}

/// A tier's proof token: a value exists only once the CPU is known to have the tier's features.
/// The token is obtained once, by the tier's detection in [`crate::TIERS`], which then builds
/// the tier's table; the table's entries ([`tier_entries!`]) are reachable only through that
/// table, so they re-create the token without detecting again.
/// (That the tier has a [`Tile`] for every registered weight type is checked where its table
/// is built: `tier_products!` names each type's entries.)
pub(crate) trait Tier: Copy {
    /// # Safety
    /// The CPU has the tier's features (call only from code reachable through the tier's table).
    unsafe fn assume() -> Self;
}

/// The quantized-product table entries of one tier, defined in the invoking module for every
/// block type the tier has a [`Tile`] for: `gemm_q::<B>` ([`crate::GemmQ4Fn`] and its 6- and
/// 8-bit twins) and `gate_up_q::<B>` ([`crate::GateUpQ4Fn`]).
///
/// Each entry compiles the whole driver (chunking, tiles, the fused gate/up epilogue, the
/// stores) inside `#[target_feature(enable = $features)]`: every driver function is
/// `#[inline(always)]`, so no part of a tier's product runs as code compiled for the baseline
/// target (the AVX-512 tier's SiLU epilogue once did, calling libm `fmaf`/`rintf` per element:
/// 30 % of its prefill). `tools/check-tier-code.sh` checks the built code for it.
macro_rules! tier_entries {
    ($tier:ty $(, $features:literal)?) => {
        /// Plain product (`GemmQ4Fn`), compiled in this tier's feature context.
        pub(crate) fn gemm_q<B>(
            w: &[B],
            n_rows: usize,
            k: usize,
            x: &[$crate::block::BlockQ8A],
            n_tok: usize,
            y: &mut [f32],
            ld_y: usize,
        ) where
            $tier: $crate::driver::Tile<B>,
        {
            $(#[target_feature(enable = $features)])?
            #[allow(clippy::too_many_arguments)]
            fn inner<B>(
                t: $tier,
                w: &[B],
                n_rows: usize,
                k: usize,
                x: &[$crate::block::BlockQ8A],
                n_tok: usize,
                y: &mut [f32],
                ld_y: usize,
            ) where
                $tier: $crate::driver::Tile<B>,
            {
                $crate::driver::gemm(t, w, n_rows, k, x, None, n_tok, y, ld_y)
            }
            // SAFETY: this entry is reachable only through the tier's table, built after its
            // detection succeeded (`Tier::assume`); that also provides `$features`.
            unsafe {
                inner(
                    <$tier as $crate::driver::Tier>::assume(),
                    w,
                    n_rows,
                    k,
                    x,
                    n_tok,
                    y,
                    ld_y,
                )
            }
        }

        /// Fused gate/up with SiLU (`GateUpQ4Fn`), epilogue included, compiled in this tier's
        /// feature context.
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn gate_up_q<B>(
            w_gate: &[B],
            w_up: &[B],
            n_rows: usize,
            k: usize,
            x_all: &[$crate::block::BlockQ8A],
            rows: &[u32],
            y: &mut [f32],
            ld_y: usize,
        ) where
            $tier: $crate::driver::Tile<B>,
        {
            $(#[target_feature(enable = $features)])?
            #[allow(clippy::too_many_arguments)]
            fn inner<B>(
                t: $tier,
                w_gate: &[B],
                w_up: &[B],
                n_rows: usize,
                k: usize,
                x_all: &[$crate::block::BlockQ8A],
                rows: &[u32],
                y: &mut [f32],
                ld_y: usize,
            ) where
                $tier: $crate::driver::Tile<B>,
            {
                $crate::driver::gate_up(t, w_gate, w_up, n_rows, k, x_all, rows, y, ld_y)
            }
            // SAFETY: as in `gemm_q`.
            unsafe {
                inner(
                    <$tier as $crate::driver::Tier>::assume(),
                    w_gate,
                    w_up,
                    n_rows,
                    k,
                    x_all,
                    rows,
                    y,
                    ld_y,
                )
            }
        }
    };
}
pub(crate) use tier_entries;
