//! `check-kernels`: every dispatched call also runs the scalar twin and asserts closeness
//! (rav1e's `check_asm`). Quantized products and `quantize_q8a` must match exactly (the tiers
//! reproduce the twin's integer sums and float order); float reductions within
//! [`CHECK_REL_TOL`] of the sum of absolute terms.

use crate::{scalar, BlockQ8A, Kernels, TierTable, WeightType};

/// Relative tolerance for reassociated f32 sums: `n · ε` bound for `n` up to ~2^13 terms,
/// taken as 1e-3 of `Σ|terms|` (loose on purpose: this guards against wrong kernels, the unit
/// tests pin the exact budgets).
pub const CHECK_REL_TOL: f32 = 1e-3;

fn close(what: &str, got: &[f32], want: &[f32], scale: f32) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || (g - w).abs() <= CHECK_REL_TOL * (scale + w.abs());
        assert!(ok, "check-kernels: {what}[{i}] = {g}, scalar twin {w}");
    }
}

fn exact(what: &str, got: &[f32], want: &[f32]) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "check-kernels: {what}[{i}] = {g}, scalar twin {w} (must be identical)"
        );
    }
}

fn quantize_q8a<T: TierTable>(x: &[f32], out: &mut [BlockQ8A]) {
    (T::K.quantize_q8a)(x, out);
    let mut r = out[..x.len() / 32].to_vec();
    scalar::quantize_q8a(x, &mut r);
    assert!(
        r[..] == out[..x.len() / 32],
        "check-kernels: quantize_q8a differs from its twin"
    );
}

fn gemm_q<T: TierTable, B: WeightType>(
    w: &[B],
    n: usize,
    k: usize,
    x: &[BlockQ8A],
    t: usize,
    y: &mut [f32],
    ld: usize,
) {
    (B::gemm(&T::K))(w, n, k, x, t, y, ld);
    let mut r = y.to_vec();
    (B::gemm_twin())(w, n, k, x, t, &mut r, ld);
    exact(&format!("gemm {}", B::NAME), y, &r);
}

#[allow(clippy::too_many_arguments)]
fn gate_up_q<T: TierTable, B: WeightType>(
    g: &[B],
    u: &[B],
    n: usize,
    k: usize,
    x: &[BlockQ8A],
    rows: &[u32],
    y: &mut [f32],
    ld: usize,
) {
    let (Some(f), Some(twin)) = (B::gate_up(&T::K), B::gate_up_twin()) else {
        unreachable!("{} has no fused gate/up entry", B::NAME)
    };
    f(g, u, n, k, x, rows, y, ld);
    let mut r = y.to_vec();
    twin(g, u, n, k, x, rows, &mut r, ld);
    exact(&format!("ffn_gate_up {}", B::NAME), y, &r);
}

fn dot_scale(w: &[f32], x: &[f32]) -> f32 {
    w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum()
}

fn gemm_f32<T: TierTable>(
    w: &[f32],
    n: usize,
    k: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
    ld: usize,
) {
    (T::K.gemm_f32)(w, n, k, x, t, y, ld);
    let mut r = y.to_vec();
    scalar::gemm_f32(w, n, k, x, t, &mut r, ld);
    let s = (0..n)
        .map(|i| dot_scale(&w[i * k..(i + 1) * k], &x[..k]))
        .fold(0.0f32, f32::max);
    close("gemm_f32", y, &r, s);
}

fn gemm_bf16<T: TierTable>(
    w: &[u16],
    n: usize,
    k: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
    ld: usize,
) {
    (T::K.gemm_bf16)(w, n, k, x, t, y, ld);
    let mut r = y.to_vec();
    scalar::gemm_bf16(w, n, k, x, t, &mut r, ld);
    let s = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    close("gemm_bf16", y, &r, s);
}

fn gemm_f16<T: TierTable>(
    w: &[u16],
    n: usize,
    k: usize,
    x: &[f32],
    t: usize,
    y: &mut [f32],
    ld: usize,
) {
    (T::K.gemm_f16)(w, n, k, x, t, y, ld);
    let mut r = y.to_vec();
    scalar::gemm_f16(w, n, k, x, t, &mut r, ld);
    let s = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    close("gemm_f16", y, &r, s);
}

fn attn_scores<T: TierTable>(q: &[f32], k: &[f32], ld_k: usize, scale: f32, s: &mut [f32]) {
    (T::K.attn_scores)(q, k, ld_k, scale, s);
    let mut r = s.to_vec();
    scalar::attn_scores(q, k, ld_k, scale, &mut r);
    let d = q.len();
    for (j, (g, w)) in s.iter().zip(&r).enumerate() {
        let sc = dot_scale(q, &k[j * ld_k..j * ld_k + d]) * scale.abs();
        close("attn_scores", &[*g], &[*w], sc);
    }
}

fn attn_values<T: TierTable>(p: &[f32], v: &[f32], ld_v: usize, o: &mut [f32]) {
    let mut r = o.to_vec();
    (T::K.attn_values)(p, v, ld_v, o);
    scalar::attn_values(p, v, ld_v, &mut r);
    exact("attn_values", o, &r);
}

fn attn_scores_f16<T: TierTable>(q: &[f32], k: &[u16], ld_k: usize, scale: f32, s: &mut [f32]) {
    (T::K.attn_scores_f16)(q, k, ld_k, scale, s);
    let mut r = s.to_vec();
    scalar::attn_scores_f16(q, k, ld_k, scale, &mut r);
    let d = q.len();
    for (j, (g, w)) in s.iter().zip(&r).enumerate() {
        let kf: Vec<f32> = k[j * ld_k..j * ld_k + d]
            .iter()
            .map(|&h| half::f16::from_bits(h).to_f32())
            .collect();
        close(
            "attn_scores_f16",
            &[*g],
            &[*w],
            dot_scale(q, &kf) * scale.abs(),
        );
    }
}

fn attn_values_f16<T: TierTable>(p: &[f32], v: &[u16], ld_v: usize, o: &mut [f32]) {
    let mut r = o.to_vec();
    (T::K.attn_values_f16)(p, v, ld_v, o);
    scalar::attn_values_f16(p, v, ld_v, &mut r);
    exact("attn_values_f16", o, &r);
}

fn attn_scores_i8<T: TierTable>(q: &[f32], k: &[i8], ld_k: usize, scale: f32, s: &mut [f32]) {
    (T::K.attn_scores_i8)(q, k, ld_k, scale, s);
    let mut r = s.to_vec();
    scalar::attn_scores_i8(q, k, ld_k, scale, &mut r);
    let d = q.len();
    for (j, (g, w)) in s.iter().zip(&r).enumerate() {
        let kf: Vec<f32> = k[j * ld_k..j * ld_k + d]
            .iter()
            .map(|&x| x as f32)
            .collect();
        close(
            "attn_scores_i8",
            &[*g],
            &[*w],
            dot_scale(q, &kf) * scale.abs(),
        );
    }
}

fn attn_values_i8<T: TierTable>(p: &[f32], v: &[i8], ld_v: usize, o: &mut [f32]) {
    let mut r = o.to_vec();
    (T::K.attn_values_i8)(p, v, ld_v, o);
    scalar::attn_values_i8(p, v, ld_v, &mut r);
    exact("attn_values_i8", o, &r);
}

#[allow(clippy::too_many_arguments)]
fn attn_scores_q4<T: TierTable>(
    q: &[f32],
    k: &[u8],
    ks: &[u16],
    ld_k: usize,
    ld_s: usize,
    scale: f32,
    s: &mut [f32],
) {
    (T::K.attn_scores_q4)(q, k, ks, ld_k, ld_s, scale, s);
    let mut r = s.to_vec();
    scalar::attn_scores_q4(q, k, ks, ld_k, ld_s, scale, &mut r);
    let d = q.len();
    let nb = d.div_ceil(scalar::KV_Q4_BLOCK);
    for (j, (g, w)) in s.iter().zip(&r).enumerate() {
        let mut kf = vec![0.0f32; d];
        scalar::dequantize_kv_q4(&k[j * ld_k..], &ks[j * ld_s..j * ld_s + nb], &mut kf);
        close(
            "attn_scores_q4",
            &[*g],
            &[*w],
            dot_scale(q, &kf) * scale.abs(),
        );
    }
}

fn attn_values_q4<T: TierTable>(
    p: &[f32],
    v: &[u8],
    vs: &[u16],
    ld_v: usize,
    ld_s: usize,
    o: &mut [f32],
) {
    let mut r = o.to_vec();
    (T::K.attn_values_q4)(p, v, vs, ld_v, ld_s, o);
    scalar::attn_values_q4(p, v, vs, ld_v, ld_s, &mut r);
    exact("attn_values_q4", o, &r);
}

fn attn_scores_kt<T: TierTable>(
    q: &[f32],
    kt: &[f32],
    d: usize,
    n: usize,
    scale: f32,
    s: &mut [f32],
) {
    (T::K.attn_scores_kt)(q, kt, d, n, scale, s);
    let mut r = s.to_vec();
    scalar::attn_scores_kt(q, kt, d, n, scale, &mut r);
    for (i, (g, w)) in s.iter().zip(&r).enumerate().take(q.len() / d.max(1) * n) {
        let (row, j) = (i / n, i % n);
        let sa: f32 = (0..d).map(|c| (q[row * d + c] * kt[c * n + j]).abs()).sum();
        close("attn_scores_kt", &[*g], &[*w], sa * scale.abs());
    }
}

fn attn_values_rows<T: TierTable>(
    p: &[f32],
    n: usize,
    v: &[f32],
    ld_v: usize,
    d: usize,
    o: &mut [f32],
) {
    let mut r = o.to_vec();
    (T::K.attn_values_rows)(p, n, v, ld_v, d, o);
    scalar::attn_values_rows(p, n, v, ld_v, d, &mut r);
    exact("attn_values_rows", o, &r);
}

fn kv_transpose_f32<T: TierTable>(k: &[f32], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    (T::K.kv_transpose_f32)(k, ld, d, n, kt);
    let mut r = kt.to_vec();
    scalar::kv_transpose_f32(k, ld, d, n, &mut r);
    exact("kv_transpose_f32", kt, &r);
}

fn kv_transpose_f16<T: TierTable>(k: &[u16], ld: usize, d: usize, n: usize, kt: &mut [f32]) {
    (T::K.kv_transpose_f16)(k, ld, d, n, kt);
    let mut r = kt.to_vec();
    scalar::kv_transpose_f16(k, ld, d, n, &mut r);
    exact("kv_transpose_f16", kt, &r);
}

fn kv_rows_f16<T: TierTable>(v: &[u16], ld: usize, d: usize, n: usize, vf: &mut [f32]) {
    (T::K.kv_rows_f16)(v, ld, d, n, vf);
    let mut r = vf.to_vec();
    scalar::kv_rows_f16(v, ld, d, n, &mut r);
    exact("kv_rows_f16", vf, &r);
}

fn softmax_tile<T: TierTable>(s: &mut [f32], m_old: f32) -> (f32, f32) {
    let mut r = s.to_vec();
    let (m, sum) = (T::K.softmax_tile)(s, m_old);
    let (m2, sum2) = scalar::softmax_tile(&mut r, m_old);
    exact("softmax_tile max", &[m], &[m2]);
    // below f32::MIN_POSITIVE the SIMD exp may flush to 0
    close("softmax_tile", s, &r, f32::MIN_POSITIVE / CHECK_REL_TOL);
    close("softmax_tile sum", &[sum], &[sum2], 0.0);
    (m, sum)
}

fn rmsnorm<T: TierTable>(x: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    (T::K.rmsnorm)(x, w, eps, out);
    let mut r = out.to_vec();
    scalar::rmsnorm(x, w, eps, &mut r);
    close("rmsnorm", out, &r, 0.0);
}

fn group_by_expert<T: TierTable>(
    e: &[u32],
    n: usize,
    c: &mut [u32],
    o: &mut [u32],
    p: &mut [u32],
    i: &mut [u32],
) {
    (T::K.group_by_expert)(e, n, c, o, p, i);
    let (mut c2, mut o2, mut p2, mut i2) = (c.to_vec(), o.to_vec(), p.to_vec(), i.to_vec());
    scalar::group_by_expert(e, n, &mut c2, &mut o2, &mut p2, &mut i2);
    assert!(
        c == &c2[..] && o == &o2[..] && p == &p2[..] && i == &i2[..],
        "check-kernels: group_by_expert"
    );
}

/// The checking products of tier `T` for every registered type: each entry the tier has,
/// wrapped.
#[doc(hidden)]
#[macro_export]
macro_rules! __check_products {
    ($t:ident [$($f:ident $v:ident $b:ty => $g:ident,)*]) => {
        $crate::QuantProducts {
            $($f: $crate::Products {
                gemm: gemm_q::<$t, $b>,
                gate_up: match $t::K.q.$f.gate_up {
                    Some(_) => Some(gate_up_q::<$t, $b>),
                    None => None,
                },
            },)*
        }
    };
}

/// The checking table of tier `T`.
pub(crate) fn wrap<T: TierTable>() -> Kernels {
    Kernels {
        level: T::K.level,
        quantize_q8a: quantize_q8a::<T>,
        q: crate::weight_types!(__check_products, T),
        gemm_f32: gemm_f32::<T>,
        gemm_bf16: gemm_bf16::<T>,
        gemm_f16: gemm_f16::<T>,
        rmsnorm: rmsnorm::<T>,
        topk: T::K.topk,
        group_by_expert: group_by_expert::<T>,
        attn_scores: attn_scores::<T>,
        attn_values: attn_values::<T>,
        attn_scores_f16: attn_scores_f16::<T>,
        attn_values_f16: attn_values_f16::<T>,
        attn_scores_i8: attn_scores_i8::<T>,
        attn_values_i8: attn_values_i8::<T>,
        attn_scores_q4: attn_scores_q4::<T>,
        attn_values_q4: attn_values_q4::<T>,
        attn_scores_kt: attn_scores_kt::<T>,
        softmax_tile: softmax_tile::<T>,
        attn_values_rows: attn_values_rows::<T>,
        kv_transpose_f32: kv_transpose_f32::<T>,
        kv_transpose_f16: kv_transpose_f16::<T>,
        kv_rows_f16: kv_rows_f16::<T>,
        rope_interleaved: T::K.rope_interleaved,
        rope_half: T::K.rope_half,
        quantize_kv_q4: T::K.quantize_kv_q4,
        kv_q4_rotate: T::K.kv_q4_rotate,
        dequantize_kv_q4: T::K.dequantize_kv_q4,
    }
}
