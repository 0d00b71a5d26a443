//! AVX2 float products (f32 / bf16 / f16 weights) and vector math (`exp8`, the SiLU step of
//! the fused gate/up).

use super::*;

// ---------------------------------------------------------------------------------------------
// Float vector ops: 4 × 8 lanes with FMA, lanes summed at the end (tolerance tests: the sum is
// reassociated relative to the twin). axpy is multiply-then-add (bit-identical to the twin).
// ---------------------------------------------------------------------------------------------

#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

/// Dot product where `load(i)` gives 8 weights at element `i` as f32.
#[inline(always)]
unsafe fn dot_with(n: usize, load: impl Fn(usize) -> __m256, b: *const f32) -> __m256 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(load(i + 8 * u), _mm256_loadu_ps(b.add(i + 8 * u)), *a);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(load(i), _mm256_loadu_ps(b.add(i)), acc[0]);
        i += 8;
    }
    _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]))
}

/// Which 16-bit float the weights hold.
#[derive(Clone, Copy, PartialEq)]
enum H16 {
    Bf16,
    F16,
}

#[allow(clippy::too_many_arguments)]
fn gemm_w(
    kind: Option<H16>,
    w32: &[f32],
    w16: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    match kind {
        None => assert!(w32.len() >= n_rows * k),
        Some(_) => assert!(w16.len() >= n_rows * k),
    }
    assert!(x.len() >= n_tok * k);
    if n_tok > 0 {
        assert!(y.len() >= (n_tok - 1) * ld_y + n_rows);
    }
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`); lengths asserted.
    unsafe { gemm_w_impl(kind, w32, w16, n_rows, k, x, n_tok, y, ld_y) }
}

/// Rows outer (a weight row is read from memory once), tokens inner.
///
/// # Safety
/// * AVX2 + FMA + F16C available.
/// * The weights hold `n_rows * k` values of the kind selected, `x` holds `n_tok * k`,
///   `y` holds `(n_tok - 1) * ld_y + n_rows`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_w_impl(
    kind: Option<H16>,
    w32: &[f32],
    w16: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    let tail = k - k % 8;
    for r in 0..n_rows {
        for t in 0..n_tok {
            let xp = x.as_ptr().add(t * k);
            let v = match kind {
                None => {
                    let p = w32.as_ptr().add(r * k);
                    dot_with(k, |i| _mm256_loadu_ps(p.add(i)), xp)
                }
                Some(H16::Bf16) => {
                    let p = w16.as_ptr().add(r * k);
                    dot_with(
                        k,
                        |i| {
                            let h = _mm_loadu_si128(p.add(i) as *const __m128i);
                            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                        },
                        xp,
                    )
                }
                Some(H16::F16) => {
                    let p = w16.as_ptr().add(r * k);
                    dot_with(
                        k,
                        |i| _mm256_cvtph_ps(_mm_loadu_si128(p.add(i) as *const __m128i)),
                        xp,
                    )
                }
            };
            let mut s = hsum(v);
            for j in tail..k {
                let wj = match kind {
                    None => w32[r * k + j],
                    Some(H16::Bf16) => half::bf16::from_bits(w16[r * k + j]).to_f32(),
                    Some(H16::F16) => half::f16::from_bits(w16[r * k + j]).to_f32(),
                };
                s += wj * x[t * k + j];
            }
            y[t * ld_y + r] = s;
        }
    }
}

pub(crate) fn gemm_f32(
    w: &[f32],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_w(None, w, &[], n_rows, k, x, n_tok, y, ld_y);
}

pub(crate) fn gemm_bf16(
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_w(Some(H16::Bf16), &[], w, n_rows, k, x, n_tok, y, ld_y);
}

pub(crate) fn gemm_f16(
    w: &[u16],
    n_rows: usize,
    k: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
    ld_y: usize,
) {
    gemm_w(Some(H16::F16), &[], w, n_rows, k, x, n_tok, y, ld_y);
}

/// `exp(x)` for 8 lanes: `x = n·ln2 + r` with `n = round(x·log2 e)` (Cody–Waite split of ln2),
/// Cephes' degree-7 polynomial for `e^r` on `|r| ≤ ln2/2` (about 1 ulp), `2^n` built in the
/// exponent bits. Lanes below −87.34 (results under `f32::MIN_POSITIVE`, and −∞) give 0; NaN
/// stays NaN; lanes above 88 are clamped to 88 (callers pass `x ≤ 0`). Same steps and constants
/// as [`crate::scalar::exp_poly`], its bit-exact scalar twin.
///
/// # Safety
/// AVX2 + FMA available.
#[inline(always)]
pub(super) unsafe fn exp8(x: __m256) -> __m256 {
    use crate::scalar::{EXP_CLAMP, EXP_LN2_HI, EXP_LN2_LO, EXP_POLY, EXP_UNDER};
    let under = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_UNDER), _CMP_LT_OQ);
    // clamp first operand, x second: vminps/vmaxps return the second operand for NaN
    let x = _mm256_min_ps(_mm256_set1_ps(EXP_CLAMP), x);
    let x = _mm256_max_ps(_mm256_set1_ps(-EXP_CLAMP), x);
    let nf = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(EXP_LN2_HI), x);
    let r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(EXP_LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    let p = _mm256_add_ps(p, _mm256_set1_ps(1.0));
    // n ≥ −127 here (x ≥ −88); n = −127 only for lanes masked to 0 below
    let e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(nf), _mm256_set1_epi32(127)),
        23,
    );
    _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)))
}

/// `g = silu(g) · u` for `NY` rows of 8: `g / (1 + exp8(−g)) · u`, the steps of
/// [`crate::scalar::silu`] (bit-identical: `exp8` mirrors `scalar::exp_poly`).
///
/// # Safety
/// AVX2 + FMA available.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn silu_mul_rows<const NY: usize>(
    g: &mut [[f32; ROWS]; NY],
    u: &[[f32; ROWS]; NY],
) {
    let one = _mm256_set1_ps(1.0);
    let neg = _mm256_set1_ps(-0.0);
    for (o, u) in g.iter_mut().zip(u) {
        let z = _mm256_loadu_ps(o.as_ptr());
        let e = exp8(_mm256_xor_ps(z, neg));
        let s = _mm256_div_ps(z, _mm256_add_ps(one, e));
        _mm256_storeu_ps(
            o.as_mut_ptr(),
            _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())),
        );
    }
}
