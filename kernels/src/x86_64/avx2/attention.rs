//! AVX2 attention: decode scores and values over f32 / f16 / i8 / q4 caches, the prefill tile
//! (transposed keys, online softmax), and the cache transposes.

use super::*;

// ---------------------------------------------------------------------------------------------
// Attention: scores of one query against 4 keys at a time (4 FMA chains, one `vhaddps`
// transpose-reduce for the 4 sums), and the value sum with the output row held in registers
// (per element the twin's order: `o = o + p·v` for keys in order, so it is bit-identical).
// ---------------------------------------------------------------------------------------------

/// A KV-cache element: f32 or f16 bits.
trait Kv: Copy {
    /// 8 elements at `p` as f32.
    ///
    /// # Safety
    /// AVX2 + F16C available; `p..p + 8` readable.
    unsafe fn load8(p: *const Self) -> __m256;
    fn f32(self) -> f32;
}

impl Kv for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
}

impl Kv for u16 {
    #[inline(always)]
    unsafe fn load8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

impl Kv for i8 {
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)))
    }
    #[inline(always)]
    fn f32(self) -> f32 {
        self as f32
    }
}

pub(crate) fn attn_scores_i8(q: &[f32], k: &[i8], ld_k: usize, scale: f32, s: &mut [f32]) {
    attn_scores_t(q, k, ld_k, scale, s)
}

pub(crate) fn attn_values_i8(p: &[f32], v: &[i8], ld_v: usize, o: &mut [f32]) {
    attn_values_t(p, v, ld_v, o)
}

/// The 32 values of one full 4-bit KV block at `p` (16 bytes), codes minus 8, as f32:
/// elements 0..8, 8..16 (low nibbles), 16..24, 24..32 (high nibbles).
///
/// # Safety
/// AVX2 available; `p..p + 16` readable.
#[inline(always)]
unsafe fn kv_q4_block(p: *const u8) -> [__m256; 4] {
    let x = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(15);
    let lo = _mm_and_si128(x, m);
    let hi = _mm_and_si128(_mm_srli_epi16(x, 4), m);
    // (no closure here: its body would be compiled without the caller's target features)
    [
        kv_q4_codes8(lo),
        kv_q4_codes8(_mm_srli_si128(lo, 8)),
        kv_q4_codes8(hi),
        kv_q4_codes8(_mm_srli_si128(hi, 8)),
    ]
}

/// The low 8 bytes of `v` (codes 0..15) minus 8, as f32.
///
/// # Safety
/// AVX2 available.
#[inline(always)]
unsafe fn kv_q4_codes8(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_sub_epi32(
        _mm256_cvtepu8_epi32(v),
        _mm256_set1_epi32(8),
    ))
}

/// Bounds of a 4-bit KV call: `n` rows of `d` values, row `j` at `x[j * ld ..]` (16 bytes per
/// block) with its scales at `xs[j * ld_s ..]`.
fn q4_rows_fit(x: &[u8], xs: &[u16], ld: usize, ld_s: usize, d: usize, n: usize) -> bool {
    let nb = d.div_ceil(scalar::KV_Q4_BLOCK);
    n == 0
        || ((n - 1)
            .checked_mul(ld)
            .and_then(|o| o.checked_add(nb * scalar::KV_Q4_BYTES))
            .is_some_and(|e| e <= x.len())
            && (n - 1)
                .checked_mul(ld_s)
                .and_then(|o| o.checked_add(nb))
                .is_some_and(|e| e <= xs.len()))
}

pub(crate) fn attn_scores_q4(
    q: &[f32],
    k: &[u8],
    ks: &[u16],
    ld_k: usize,
    ld_s: usize,
    scale: f32,
    s: &mut [f32],
) {
    assert!(
        q4_rows_fit(k, ks, ld_k, ld_s, q.len(), s.len()),
        "attn_scores_q4: keys too short"
    );
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`); key row
    // j < s.len() spans k[j * ld_k ..][..nb * 16] and ks[j * ld_s ..][..nb], inside the
    // slices by the assertion.
    unsafe { attn_scores_q4_impl(q, k, ks, ld_k, ld_s, scale, s) }
}

/// # Safety
/// AVX2 + FMA + F16C available; the rows fit ([`q4_rows_fit`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_scores_q4_impl(
    q: &[f32],
    k: &[u8],
    ks: &[u16],
    ld_k: usize,
    ld_s: usize,
    scale: f32,
    s: &mut [f32],
) {
    let d = q.len();
    let full = d / scalar::KV_Q4_BLOCK;
    let qp = q.as_ptr();
    for (j, sj) in s.iter_mut().enumerate() {
        let kr = k.as_ptr().add(j * ld_k);
        let sr = ks.as_ptr().add(j * ld_s);
        let mut acc = 0.0f32;
        for b in 0..full {
            let v = kv_q4_block(kr.add(b * scalar::KV_Q4_BYTES));
            let qb = qp.add(b * scalar::KV_Q4_BLOCK);
            let a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb), v[0], _mm256_setzero_ps());
            let a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(8)), v[1], _mm256_setzero_ps());
            let a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(16)), v[2], a0);
            let a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb.add(24)), v[3], a1);
            acc += hsum(_mm256_add_ps(a0, a1)) * half::f16::from_bits(*sr.add(b)).to_f32();
        }
        if full * scalar::KV_Q4_BLOCK < d {
            let blk = core::slice::from_raw_parts(
                kr.add(full * scalar::KV_Q4_BYTES),
                scalar::KV_Q4_BYTES,
            );
            let mut sb = 0.0f32;
            for (c, &x) in q[full * scalar::KV_Q4_BLOCK..].iter().enumerate() {
                sb += x * (scalar::kv_q4_code(blk, c) as i32 - 8) as f32;
            }
            acc += sb * half::f16::from_bits(*sr.add(full)).to_f32();
        }
        *sj = acc * scale;
    }
}

pub(crate) fn attn_values_q4(
    p: &[f32],
    v: &[u8],
    vs: &[u16],
    ld_v: usize,
    ld_s: usize,
    o: &mut [f32],
) {
    assert!(
        q4_rows_fit(v, vs, ld_v, ld_s, o.len(), p.len()),
        "attn_values_q4: values too short"
    );
    // SAFETY: AVX2 proven (only the AVX2 table reaches this); value row j < p.len() spans
    // v[j * ld_v ..][..nb * 16] and vs[j * ld_s ..][..nb], inside the slices by the assertion.
    unsafe { attn_values_q4_impl(p, v, vs, ld_v, ld_s, o) }
}

/// # Safety
/// AVX2 + F16C available; the rows fit ([`q4_rows_fit`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_values_q4_impl(
    p: &[f32],
    v: &[u8],
    vs: &[u16],
    ld_v: usize,
    ld_s: usize,
    o: &mut [f32],
) {
    let d = o.len();
    let full = d / scalar::KV_Q4_BLOCK;
    let op = o.as_mut_ptr();
    // per full block: its 32 outputs in 4 registers across all keys (per element the twin's
    // order: `o = o + w·x` for keys in order, no fused multiply-add)
    for b in 0..full {
        let ob = op.add(b * scalar::KV_Q4_BLOCK);
        let mut acc: [__m256; 4] = core::array::from_fn(|u| _mm256_loadu_ps(ob.add(8 * u)));
        for (j, &pj) in p.iter().enumerate() {
            let w = pj * half::f16::from_bits(*vs.as_ptr().add(j * ld_s + b)).to_f32();
            let wv = _mm256_set1_ps(w);
            let x = kv_q4_block(v.as_ptr().add(j * ld_v + b * scalar::KV_Q4_BYTES));
            for (a, x) in acc.iter_mut().zip(x) {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(wv, x));
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(ob.add(8 * u), *a);
        }
    }
    if full * scalar::KV_Q4_BLOCK < d {
        let tail = &mut o[full * scalar::KV_Q4_BLOCK..];
        for (j, &pj) in p.iter().enumerate() {
            let w = pj * half::f16::from_bits(vs[j * ld_s + full]).to_f32();
            let at = j * ld_v + full * scalar::KV_Q4_BYTES;
            let blk = &v[at..at + scalar::KV_Q4_BYTES];
            for (c, oc) in tail.iter_mut().enumerate() {
                *oc += w * (scalar::kv_q4_code(blk, c) as i32 - 8) as f32;
            }
        }
    }
}

pub(crate) fn attn_scores_f16(q: &[f32], k: &[u16], ld_k: usize, scale: f32, s: &mut [f32]) {
    attn_scores_t(q, k, ld_k, scale, s)
}

pub(crate) fn attn_values_f16(p: &[f32], v: &[u16], ld_v: usize, o: &mut [f32]) {
    attn_values_t(p, v, ld_v, o)
}

pub(crate) fn attn_scores(q: &[f32], k: &[f32], ld_k: usize, scale: f32, s: &mut [f32]) {
    attn_scores_t(q, k, ld_k, scale, s)
}

fn attn_scores_t<E: Kv>(q: &[f32], k: &[E], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    if let Some(n) = s.len().checked_sub(1) {
        assert!(k.len() >= n * ld_k + d, "attn_scores: keys too short");
    }
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // key row j < s.len() spans k[j * ld_k .. j * ld_k + d],
    // inside `k` by the assertion.
    unsafe { attn_scores_impl(q, k, ld_k, scale, s) }
}

/// # Safety
/// AVX2 + FMA available; `k.len() >= (s.len() - 1) * ld_k + q.len()` when `s` is not empty.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_scores_impl<E: Kv>(q: &[f32], k: &[E], ld_k: usize, scale: f32, s: &mut [f32]) {
    let d = q.len();
    let d8 = d - d % 8;
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let n = s.len();
    let mut j = 0;
    while j + 4 <= n {
        let kr: [*const E; 4] = core::array::from_fn(|u| kp.add((j + u) * ld_k));
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        while c < d8 {
            let qv = _mm256_loadu_ps(qp.add(c));
            for u in 0..4 {
                acc[u] = _mm256_fmadd_ps(qv, E::load8(kr[u].add(c)), acc[u]);
            }
            c += 8;
        }
        let h01 = _mm256_hadd_ps(acc[0], acc[1]);
        let h23 = _mm256_hadd_ps(acc[2], acc[3]);
        let h = _mm256_hadd_ps(h01, h23);
        let mut r = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        if d8 < d {
            let mut t = [0.0f32; 4];
            for (u, tu) in t.iter_mut().enumerate() {
                for cc in d8..d {
                    *tu += *qp.add(cc) * (*kr[u].add(cc)).f32();
                }
            }
            r = _mm_add_ps(r, _mm_loadu_ps(t.as_ptr()));
        }
        _mm_storeu_ps(s.as_mut_ptr().add(j), _mm_mul_ps(r, _mm_set1_ps(scale)));
        j += 4;
    }
    while j < n {
        let kr = kp.add(j * ld_k);
        let mut acc = _mm256_setzero_ps();
        let mut c = 0;
        while c < d8 {
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), E::load8(kr.add(c)), acc);
            c += 8;
        }
        let mut t = hsum(acc);
        for cc in d8..d {
            t += *qp.add(cc) * (*kr.add(cc)).f32();
        }
        s[j] = t * scale;
        j += 1;
    }
}

pub(crate) fn attn_values(p: &[f32], v: &[f32], ld_v: usize, o: &mut [f32]) {
    attn_values_t(p, v, ld_v, o)
}

fn attn_values_t<E: Kv>(p: &[f32], v: &[E], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    if let Some(n) = p.len().checked_sub(1) {
        assert!(v.len() >= n * ld_v + d, "attn_values: values too short");
    }
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // value row j < p.len() spans v[j * ld_v .. j * ld_v + d],
    // inside `v` by the assertion.
    unsafe { attn_values_impl(p, v, ld_v, o) }
}

/// # Safety
/// AVX2 available; `v.len() >= (p.len() - 1) * ld_v + o.len()` when `p` is not empty.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attn_values_impl<E: Kv>(p: &[f32], v: &[E], ld_v: usize, o: &mut [f32]) {
    let d = o.len();
    let (vp, op) = (v.as_ptr(), o.as_mut_ptr());
    let mut c = 0;
    // 64 columns in 8 registers, then 8 at a time, then scalar
    while c + 64 <= d {
        let mut acc: [__m256; 8] = core::array::from_fn(|u| _mm256_loadu_ps(op.add(c + 8 * u)));
        for (j, &pj) in p.iter().enumerate() {
            let pv = _mm256_set1_ps(pj);
            let row = vp.add(j * ld_v + c);
            for (u, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(*a, _mm256_mul_ps(pv, E::load8(row.add(8 * u))));
            }
        }
        for (u, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(op.add(c + 8 * u), *a);
        }
        c += 64;
    }
    while c + 8 <= d {
        let mut a = _mm256_loadu_ps(op.add(c));
        for (j, &pj) in p.iter().enumerate() {
            let x = E::load8(vp.add(j * ld_v + c));
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(pj), x));
        }
        _mm256_storeu_ps(op.add(c), a);
        c += 8;
    }
    for cc in c..d {
        let mut a = *op.add(cc);
        for (j, &pj) in p.iter().enumerate() {
            a += pj * (*vp.add(j * ld_v + cc)).f32();
        }
        *op.add(cc) = a;
    }
}

// ---------------------------------------------------------------------------------------------
// Prefill attention: scores of a block of query rows against a tile of keys stored transposed
// (`kt[c * n + j]`), 4 rows × 16 keys per register block (8 FMA chains, a broadcast query
// element times two key vectors: no horizontal sum), and the online-softmax step with a
// polynomial exp.
// ---------------------------------------------------------------------------------------------

pub(crate) fn attn_scores_kt(q: &[f32], kt: &[f32], d: usize, n: usize, scale: f32, s: &mut [f32]) {
    if d == 0 || n == 0 {
        return crate::scalar::attn_scores_kt(q, kt, d, n, scale, s);
    }
    let rows = q.len() / d;
    assert!(kt.len() >= d * n, "attn_scores_kt: keys too short");
    assert!(s.len() >= rows * n, "attn_scores_kt: scores too short");
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // rows read q[..rows * d], keys kt[..d * n], scores are
    // written in s[..rows * n], all inside the slices by the assertions.
    unsafe { attn_scores_kt_impl(q.as_ptr(), rows, kt.as_ptr(), d, n, scale, s.as_mut_ptr()) }
}

/// # Safety
/// AVX2 + FMA available; `q` has `rows * d` readable floats, `kt` `d * n`, `s` `rows * n`
/// writable.
#[target_feature(enable = "avx2,fma")]
unsafe fn attn_scores_kt_impl(
    q: *const f32,
    rows: usize,
    kt: *const f32,
    d: usize,
    n: usize,
    scale: f32,
    s: *mut f32,
) {
    let mut r = 0;
    while r + 4 <= rows {
        scores_kt_rows::<4>(q.add(r * d), kt, d, n, scale, s.add(r * n));
        r += 4;
    }
    while r < rows {
        scores_kt_rows::<1>(q.add(r * d), kt, d, n, scale, s.add(r * n));
        r += 1;
    }
}

/// `R` rows of [`attn_scores_kt_impl`].
#[inline(always)]
unsafe fn scores_kt_rows<const R: usize>(
    q: *const f32,
    kt: *const f32,
    d: usize,
    n: usize,
    scale: f32,
    s: *mut f32,
) {
    let vs = _mm256_set1_ps(scale);
    let mut j = 0;
    while j + 16 <= n {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for c in 0..d {
            let k0 = _mm256_loadu_ps(kt.add(c * n + j));
            let k1 = _mm256_loadu_ps(kt.add(c * n + j + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm256_broadcast_ss(&*q.add(r * d + c));
                a[0] = _mm256_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm256_fmadd_ps(qv, k1, a[1]);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * n + j), _mm256_mul_ps(a[0], vs));
            _mm256_storeu_ps(s.add(r * n + j + 8), _mm256_mul_ps(a[1], vs));
        }
        j += 16;
    }
    if j + 8 <= n {
        let mut acc = [_mm256_setzero_ps(); R];
        for c in 0..d {
            let k0 = _mm256_loadu_ps(kt.add(c * n + j));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(_mm256_broadcast_ss(&*q.add(r * d + c)), k0, *a);
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(s.add(r * n + j), _mm256_mul_ps(*a, vs));
        }
        j += 8;
    }
    for jj in j..n {
        for r in 0..R {
            let mut t = 0.0f32;
            for c in 0..d {
                t += *q.add(r * d + c) * *kt.add(c * n + jj);
            }
            *s.add(r * n + jj) = t * scale;
        }
    }
}

pub(crate) fn attn_values_rows(
    p: &[f32],
    n: usize,
    v: &[f32],
    ld_v: usize,
    d: usize,
    o: &mut [f32],
) {
    if d == 0 || n == 0 {
        return;
    }
    let rows = o.len() / d;
    assert!(p.len() >= rows * n, "attn_values_rows: weights too short");
    assert!(
        v.len() >= (n - 1) * ld_v + d,
        "attn_values_rows: values too short"
    );
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // row r reads p[r * n..][..n] and writes o[r * d..][..d],
    // value row j < n spans v[j * ld_v..][..d]: inside the slices by the assertions.
    unsafe { attn_values_rows_impl(p.as_ptr(), n, v.as_ptr(), ld_v, d, o.as_mut_ptr(), rows) }
}

/// # Safety
/// AVX2 available; `p` has `rows * n` readable floats, `v` `(n - 1) * ld_v + d`, `o`
/// `rows * d` writable.
#[target_feature(enable = "avx2,fma")]
unsafe fn attn_values_rows_impl(
    p: *const f32,
    n: usize,
    v: *const f32,
    ld_v: usize,
    d: usize,
    o: *mut f32,
    rows: usize,
) {
    let mut r = 0;
    while r + 4 <= rows {
        values_rows::<4>(p.add(r * n), n, v, ld_v, d, o.add(r * d));
        r += 4;
    }
    while r < rows {
        values_rows::<1>(p.add(r * n), n, v, ld_v, d, o.add(r * d));
        r += 1;
    }
}

/// `R` rows of [`attn_values_rows_impl`], 16 columns at a time (2 value vectors per key shared
/// by the `R` rows), per element `o = o + p·v` in key order like the twin.
#[inline(always)]
unsafe fn values_rows<const R: usize>(
    p: *const f32,
    n: usize,
    v: *const f32,
    ld_v: usize,
    d: usize,
    o: *mut f32,
) {
    let mut c = 0;
    while c + 16 <= d {
        let mut acc: [[__m256; 2]; R] = core::array::from_fn(|r| {
            [
                _mm256_loadu_ps(o.add(r * d + c)),
                _mm256_loadu_ps(o.add(r * d + c + 8)),
            ]
        });
        for j in 0..n {
            let v0 = _mm256_loadu_ps(v.add(j * ld_v + c));
            let v1 = _mm256_loadu_ps(v.add(j * ld_v + c + 8));
            for (r, a) in acc.iter_mut().enumerate() {
                let pv = _mm256_broadcast_ss(&*p.add(r * n + j));
                a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(pv, v0));
                a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(pv, v1));
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(r * d + c), a[0]);
            _mm256_storeu_ps(o.add(r * d + c + 8), a[1]);
        }
        c += 16;
    }
    if c + 8 <= d {
        let mut acc: [__m256; R] = core::array::from_fn(|r| _mm256_loadu_ps(o.add(r * d + c)));
        for j in 0..n {
            let v0 = _mm256_loadu_ps(v.add(j * ld_v + c));
            for (r, a) in acc.iter_mut().enumerate() {
                *a = _mm256_add_ps(
                    *a,
                    _mm256_mul_ps(_mm256_broadcast_ss(&*p.add(r * n + j)), v0),
                );
            }
        }
        for (r, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.add(r * d + c), *a);
        }
        c += 8;
    }
    for cc in c..d {
        for r in 0..R {
            let mut a = *o.add(r * d + cc);
            for j in 0..n {
                a += *p.add(r * n + j) * *v.add(j * ld_v + cc);
            }
            *o.add(r * d + cc) = a;
        }
    }
}

pub(crate) fn kv_transpose_f32(k: &[f32], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    kv_transpose_t(k, ld, d, n, kt)
}

pub(crate) fn kv_transpose_f16(k: &[u16], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    kv_transpose_t(k, ld, d, n, kt)
}

fn kv_transpose_t<E: Kv>(k: &[E], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    if d == 0 || n == 0 {
        return;
    }
    assert!(k.len() >= (n - 1) * ld + d, "kv_transpose: keys too short");
    assert!(kt.len() >= d * n, "kv_transpose: output too short");
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // key row j < n spans k[j * ld..][..d], the output
    // kt[..d * n]: inside the slices by the assertions.
    unsafe { kv_transpose_impl(k.as_ptr(), ld, d, n, kt.as_mut_ptr()) }
}

/// 8 keys × 8 columns at a time: 8 row loads (converted), an 8×8 transpose in registers
/// (unpack, shuffle, lane permute), 8 stores into 8 rows of `kt`.
///
/// # Safety
/// AVX2 + F16C available; `k` has `(n - 1) * ld + d` readable elements, `kt` `d * n` writable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kv_transpose_impl<E: Kv>(k: *const E, ld: usize, d: usize, n: usize, kt: *mut f32) {
    let (n8, d8) = (n - n % 8, d - d % 8);
    let mut j = 0;
    while j < n8 {
        let mut c = 0;
        while c < d8 {
            let r: [__m256; 8] = core::array::from_fn(|u| E::load8(k.add((j + u) * ld + c)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps(t0, t2, 0x44);
            let u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
            let u2 = _mm256_shuffle_ps(t1, t3, 0x44);
            let u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
            let u4 = _mm256_shuffle_ps(t4, t6, 0x44);
            let u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
            let u6 = _mm256_shuffle_ps(t5, t7, 0x44);
            let u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            let o = [
                _mm256_permute2f128_ps(u0, u4, 0x20),
                _mm256_permute2f128_ps(u1, u5, 0x20),
                _mm256_permute2f128_ps(u2, u6, 0x20),
                _mm256_permute2f128_ps(u3, u7, 0x20),
                _mm256_permute2f128_ps(u0, u4, 0x31),
                _mm256_permute2f128_ps(u1, u5, 0x31),
                _mm256_permute2f128_ps(u2, u6, 0x31),
                _mm256_permute2f128_ps(u3, u7, 0x31),
            ];
            for (u, ov) in o.iter().enumerate() {
                _mm256_storeu_ps(kt.add((c + u) * n + j), *ov);
            }
            c += 8;
        }
        for cc in d8..d {
            for u in 0..8 {
                *kt.add(cc * n + j + u) = (*k.add((j + u) * ld + cc)).f32();
            }
        }
        j += 8;
    }
    for jj in n8..n {
        for c in 0..d {
            *kt.add(c * n + jj) = (*k.add(jj * ld + c)).f32();
        }
    }
}

pub(crate) fn kv_rows_f16(v: &[u16], ld: usize, d: usize, n: usize, vf: &mut [f32]) {
    if d == 0 || n == 0 {
        return;
    }
    assert!(v.len() >= (n - 1) * ld + d, "kv_rows_f16: values too short");
    assert!(vf.len() >= d * n, "kv_rows_f16: output too short");
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`);
    // bounds by the assertions.
    unsafe { kv_rows_f16_impl(v.as_ptr(), ld, d, n, vf.as_mut_ptr()) }
}

/// # Safety
/// AVX2 + F16C available; `v` has `(n - 1) * ld + d` readable elements, `vf` `d * n` writable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn kv_rows_f16_impl(v: *const u16, ld: usize, d: usize, n: usize, vf: *mut f32) {
    let d8 = d - d % 8;
    for j in 0..n {
        let (src, dst) = (v.add(j * ld), vf.add(j * d));
        let mut c = 0;
        while c < d8 {
            _mm256_storeu_ps(dst.add(c), u16::load8(src.add(c)));
            c += 8;
        }
        for cc in d8..d {
            *dst.add(cc) = (*src.add(cc)).f32();
        }
    }
}

pub(crate) fn softmax_tile(s: &mut [f32], m_old: f32) -> (f32, f32) {
    // SAFETY: AVX2 proven (only the AVX2 table reaches this, `driver::Tier`).
    unsafe { softmax_tile_impl(s, m_old) }
}

/// # Safety
/// AVX2 + FMA available.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_tile_impl(s: &mut [f32], m_old: f32) -> (f32, f32) {
    let n = s.len();
    let p = s.as_mut_ptr();
    let n8 = n - n % 8;
    // max: `max_ps(x, m)` returns `m` when `x` is NaN, like `f32::max`
    let mut vm = _mm256_set1_ps(m_old);
    let mut i = 0;
    while i < n8 {
        vm = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), vm);
        i += 8;
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    let mut m = _mm_cvtss_f32(h);
    for &v in &s[n8..] {
        m = m.max(v);
    }
    if m == f32::NEG_INFINITY {
        s.iter_mut().for_each(|v| *v = 0.0);
        return (m, 0.0);
    }
    let vm = _mm256_set1_ps(m);
    let mut acc = _mm256_setzero_ps();
    i = 0;
    while i < n8 {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
        _mm256_storeu_ps(p.add(i), e);
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    if n8 < n {
        let mut t = [f32::NEG_INFINITY; 8];
        t[..n - n8].copy_from_slice(&s[n8..]);
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(t.as_ptr()), vm));
        _mm256_storeu_ps(t.as_mut_ptr(), e);
        s[n8..].copy_from_slice(&t[..n - n8]);
        acc = _mm256_add_ps(acc, e);
    }
    (m, hsum(acc))
}
