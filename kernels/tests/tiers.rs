//! One shared routine per kernel, run for every level this CPU supports (`CpuLevel::available`,
//! i.e. the detected level and every lower one) against the scalar twin and an f64 reference.
//!
//! Quantized products: every tier reproduces the twin's i32 block sums and its float order
//! (`acc + (dw·da)·isum`, no FMA), so outputs must be **bit-identical** (tolerance 0). The
//! integer sums are additionally checked exactly against an i64 reference with unit scales and
//! `k ≤ 1024`, where every partial sum is an integer below 2^24 and so exact in f32.

use ferroq_kernels::block::{q4_pos, q4x8_bytes, q6_get, q6_pos, q8_pos, row_groups};
use ferroq_kernels::{
    scalar, BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8A, BlockQ8x8, CpuLevel, GemmQ4Fn, Kernels,
    Q4Block, WeightType, KVALUES, QK,
};

// ---------------------------------------------------------------------------------------------
// Budgets (provenance in each comment)
// ---------------------------------------------------------------------------------------------

/// Reassociated f32 sums (dot, float GEMMs): `|got − twin| ≤ F32_SUM_TOL · n · Σ|aᵢbᵢ|`.
/// Both sides have the classical bound `γ_n ≈ n·ε` on `Σ|aᵢbᵢ|` (Higham, recursive summation);
/// their difference is within twice that, taken as `2ε` per term.
const F32_SUM_TOL: f32 = 2.0 * f32::EPSILON;
/// Same against an exact f64 dot: one `γ_n` only.
const F32_VS_F64_TOL: f64 = f32::EPSILON as f64;
/// `softmax_tile`'s SIMD `exp` (Cephes polynomial, `exp8` in the AVX2 tier) against the f64
/// `exp` of the f32 argument, relative: measured max 8.1e-8 (AVX2; libm 6.0e-8) over a dense
/// sweep of [−87.3, 0]; budget 2e-7 (twin vs tier within twice this).
const EXP_TILE_REL_TOL: f64 = 2e-7;
/// RMSNorm: sum of squares reassociated in f32 lanes before the f64 fold: `n·ε` relative on
/// the mean, halved by the square root; 1e-6 covers n ≤ 8192.
const RMSNORM_REL_TOL: f32 = 1e-6;
/// Round-trip RMSE of `quantize_q4x8` on N(0,1) data (fixed seed, 64×4096), relative to the
/// data's std. Measured 0.07387 (IQ4_NL codebook with the scale search of the twin, seed 5);
/// budget +10 %.
const Q4X8_RMSE_MAX: f64 = 0.081;
/// Same for the linear type `Q4Lx8` (levels −8..7, same scale search). Measured 0.08085
/// (seed 5; ggml's round-to-nearest `Q4_0` rule on the same data: 0.08594); budget +10 %.
const Q4LX8_RMSE_MAX: f64 = 0.089;
/// Same for `quantize_q8x8`. Measured 0.005339 (amax/127 steps, f16 scale); budget +10 %.
const Q8X8_RMSE_MAX: f64 = 0.0059;
/// Same for `Q6x8` (64 linear levels, short scale search). Measured 0.01975 (seed 5; the
/// round-to-nearest rule `d = m / −32` on the same data 0.02123); budget +10 %.
const Q6X8_RMSE_MAX: f64 = 0.0218;
/// Quantized dot (weights and activations quantized) against the f64 dot of the unquantized
/// data, relative to `‖w‖·‖x‖`, max over 64 rows × 4 tokens at k = 4096 (seed 4). Measured
/// 0.00294 (Q4) and 0.000342 (Q8), identical on every tier; budget ~2× measured.
const Q4_DOT_REL_ERR: f64 = 0.006;
const Q8_DOT_REL_ERR: f64 = 0.0008;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `n` all-zero blocks.
fn zeroed<B: bytemuck::Zeroable + Clone>(n: usize) -> Vec<B> {
    vec![B::zeroed(); n]
}

fn tables() -> Vec<Kernels> {
    let v: Vec<Kernels> = CpuLevel::available()
        .into_iter()
        .map(|l| Kernels::for_level(l).expect("available level has a table"))
        .collect();
    assert!(v.len() >= 2);
    v
}

/// SplitMix64: fixed-seed, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.unif().max(1e-300), self.unif());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn gauss_vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.gauss()).collect()
    }
}

/// Output buffer for `n_out` rows with stride `ld`, filled with NaN.
fn nan_buf(n_out: usize, ld: usize) -> Vec<f32> {
    vec![f32::NAN; n_out.max(1) * ld]
}

/// Asserts the contract region is bit-identical to `want` and every other slot is still NaN.
fn assert_gemm_out(what: &str, got: &[f32], want: &[f32], n_out: usize, n_rows: usize, ld: usize) {
    for t in 0..n_out {
        for r in 0..ld {
            let (g, w) = (got[t * ld + r], want[t * ld + r]);
            if r < n_rows {
                assert!(!g.is_nan(), "{what}: y[{t}][{r}] not written");
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{what}: y[{t}][{r}] = {g}, twin {w}"
                );
            } else {
                assert!(g.is_nan(), "{what}: y[{t}][{r}] written past n_rows");
            }
        }
    }
}

/// Asserts that `y` (a product with unit scales: `x.len() / nb` tokens, rows of stride `ld`)
/// holds the exact sums `Σ_b Σ_c weight(r, b, c) · x[t][b].qs[c]` for `r < n_rows`, and that the
/// slots past `n_rows` are untouched (NaN).
fn assert_exact_sums(
    what: &str,
    y: &[f32],
    ld: usize,
    n_rows: usize,
    x: &[BlockQ8A],
    nb: usize,
    weight: impl Fn(usize, usize, usize) -> i64,
) {
    for t in 0..x.len() / nb {
        for r in 0..n_rows {
            let mut s = 0i64;
            for b in 0..nb {
                let a = &x[t * nb + b];
                for c in 0..QK {
                    s += weight(r, b, c) * a.qs[c] as i64;
                }
            }
            assert_eq!(y[t * ld + r], s as f32, "{what} t={t} r={r}");
        }
        for r in n_rows..ld {
            assert!(
                y[t * ld + r].is_nan(),
                "{what}: y[{t}][{r}] written past n_rows"
            );
        }
    }
}

/// Row scales of the edge-case tests: 0, smallest and largest f16 subnormal, f16 max, −1,
/// −max, 1, −0.
const EDGE_SCALES: [u16; 8] = [
    0x0000, 0x0001, 0x03FF, 0x7BFF, 0xBC00, 0xFBFF, 0x3C00, 0x8000,
];

/// Three quantized activation rows of `k` with a zero block (d = 0), a tiny one (×1e-30) and a
/// huge one (×1e30).
fn edge_acts(rng: &mut Rng, k: usize) -> Vec<BlockQ8A> {
    let mut xf = rng.gauss_vec(3 * k);
    xf[32..64].iter_mut().for_each(|v| *v = 0.0);
    xf[k..k + 32].iter_mut().for_each(|v| *v *= 1e-30);
    xf[2 * k..2 * k + 32].iter_mut().for_each(|v| *v *= 1e30);
    quant_acts(&xf)
}

/// 8 rows of `w` (`k` wide) against 1..=3 rows of `x` through a tier's product and its twin:
/// bit-identical.
fn assert_edges<B>(
    what: &str,
    w: &[B],
    k: usize,
    x: &[BlockQ8A],
    gemm: GemmQ4Fn<B>,
    twin: GemmQ4Fn<B>,
) {
    for n_tok in 1..=3 {
        let mut y = nan_buf(n_tok, 8);
        let mut r = nan_buf(n_tok, 8);
        gemm(w, 8, k, x, n_tok, &mut y, 8);
        twin(w, 8, k, x, n_tok, &mut r, 8);
        for (a, b) in y.iter().zip(&r) {
            assert!(a.to_bits() == b.to_bits(), "{what} edges: {a} vs {b}");
        }
    }
}

/// The 8 row scales of a random block: 1.0 with `unit`, else N(0, 0.01²) in f16.
fn rand_scales(rng: &mut Rng, unit: bool) -> [u16; 8] {
    std::array::from_fn(|_| {
        if unit {
            0x3C00
        } else {
            half::f16::from_f32(rng.gauss() * 0.01).to_bits()
        }
    })
}

fn random_q4(rng: &mut Rng, n_rows: usize, k: usize, unit_scale: bool) -> Vec<BlockQ4x8> {
    let n = row_groups(n_rows) * k / QK;
    (0..n)
        .map(|_| BlockQ4x8 {
            d: rand_scales(rng, unit_scale),
            qs: std::array::from_fn(|_| rng.next() as u8),
        })
        .collect()
}

fn random_q8(rng: &mut Rng, n_rows: usize, k: usize, unit_scale: bool) -> Vec<BlockQ8x8> {
    let n = row_groups(n_rows) * k / QK;
    (0..n)
        .map(|_| BlockQ8x8 {
            d: rand_scales(rng, unit_scale),
            // the full i8 range including -128 (not produced by the converter, still exact)
            qs: std::array::from_fn(|_| rng.next() as i8),
        })
        .collect()
}

/// Activation blocks with unit scale and random quants in [-127, 127].
fn unit_acts(rng: &mut Rng, n: usize) -> Vec<BlockQ8A> {
    (0..n)
        .map(|_| {
            let qs: [i8; 32] = std::array::from_fn(|_| (rng.below(255) as i32 - 127) as i8);
            BlockQ8A {
                d: 1.0,
                sum8: 8 * qs.iter().map(|&q| q as i32).sum::<i32>(),
                qs,
            }
        })
        .collect()
}

fn quant_acts(x: &[f32]) -> Vec<BlockQ8A> {
    let mut a = vec![
        BlockQ8A {
            d: 0.0,
            sum8: 0,
            qs: [0; 32]
        };
        x.len() / QK
    ];
    scalar::quantize_q8a(x, &mut a);
    a
}

fn q4_weight(b: &BlockQ4x8, r: usize, k: usize) -> i64 {
    let (i, hi) = q4_pos(r, k);
    let nib = if hi { b.qs[i] >> 4 } else { b.qs[i] & 15 };
    KVALUES[nib as usize] as i64
}

const ROW_COUNTS: [usize; 7] = [1, 3, 7, 8, 9, 17, 24];
const KS: [usize; 4] = [32, 64, 96, 1024];

// ---------------------------------------------------------------------------------------------
// Quantized products
// ---------------------------------------------------------------------------------------------

/// Exact integer sums: unit scales, k ≤ 1024 (|partial sums| ≤ 127·127·1024 < 2^24).
#[test]
fn q_gemm_integer_sums_exact() {
    let mut rng = Rng(1);
    for kt in tables() {
        for &n_rows in &ROW_COUNTS {
            for &k in &KS {
                let nb = k / QK;
                let w4 = random_q4(&mut rng, n_rows, k, true);
                let w8 = random_q8(&mut rng, n_rows, k, true);
                for n_tok in 1..=9 {
                    let x = unit_acts(&mut rng, n_tok * nb);
                    let ld = n_rows + 3;
                    let mut y4 = nan_buf(n_tok, ld);
                    let mut y8 = nan_buf(n_tok, ld);
                    (kt.q.q4x8.gemm)(&w4, n_rows, k, &x, n_tok, &mut y4, ld);
                    (kt.q.q8x8.gemm)(&w8, n_rows, k, &x, n_tok, &mut y8, ld);
                    let what = format!("{} n={n_rows} k={k}", kt.level.name());
                    assert_exact_sums(&format!("{what} q4"), &y4, ld, n_rows, &x, nb, |r, b, c| {
                        q4_weight(&w4[r / 8 * nb + b], r % 8, c)
                    });
                    assert_exact_sums(&format!("{what} q8"), &y8, ld, n_rows, &x, nb, |r, b, c| {
                        w8[r / 8 * nb + b].qs[q8_pos(r % 8, c)] as i64
                    });
                }
            }
        }
    }
}

/// Real scales and quantized activations against the twin, tolerance 0 (same float order).
#[test]
fn q_gemm_matches_twin_bitwise() {
    let mut rng = Rng(2);
    for kt in tables() {
        for &n_rows in &ROW_COUNTS {
            for &k in &[32, 96, 4096] {
                let nb = k / QK;
                let w4 = random_q4(&mut rng, n_rows, k, false);
                let w8 = random_q8(&mut rng, n_rows, k, false);
                for n_tok in [1, 2, 3, 4, 5, 8, 9, 13, 70] {
                    let x = quant_acts(&rng.gauss_vec(n_tok * k));
                    let ld = n_rows + 1;
                    let lv = kt.level.name();
                    let mut y = nan_buf(n_tok, ld);
                    let mut r = nan_buf(n_tok, ld);
                    (kt.q.q4x8.gemm)(&w4, n_rows, k, &x, n_tok, &mut y, ld);
                    scalar::gemm_q4x8(&w4, n_rows, k, &x, n_tok, &mut r, ld);
                    assert_gemm_out(
                        &format!("{lv} q4 n={n_rows} k={k}"),
                        &y,
                        &r,
                        n_tok,
                        n_rows,
                        ld,
                    );
                    let mut y = nan_buf(n_tok, ld);
                    let mut r = nan_buf(n_tok, ld);
                    (kt.q.q8x8.gemm)(&w8, n_rows, k, &x, n_tok, &mut y, ld);
                    scalar::gemm_q8x8(&w8, n_rows, k, &x, n_tok, &mut r, ld);
                    assert_gemm_out(
                        &format!("{lv} q8 n={n_rows} k={k}"),
                        &y,
                        &r,
                        n_tok,
                        n_rows,
                        ld,
                    );
                    let _ = nb;
                }
            }
        }
    }
}

/// Scale edge cases: 0, smallest f16 subnormal, largest subnormal, f16 max, negative,
/// negative max, and an all-zero activation block (d = 0).
#[test]
fn q_gemm_scale_edges() {
    let mut rng = Rng(3);
    for kt in tables() {
        let (lv, k) = (kt.level.name(), 128);
        let mut w4 = random_q4(&mut rng, 8, k, true);
        let mut w8 = random_q8(&mut rng, 8, k, true);
        w4.iter_mut().for_each(|b| b.d = EDGE_SCALES);
        w8.iter_mut().for_each(|b| b.d = EDGE_SCALES);
        let x = edge_acts(&mut rng, k);
        let (q4, q8) = (format!("{lv} q4"), format!("{lv} q8"));
        assert_edges(&q4, &w4, k, &x, kt.q.q4x8.gemm, scalar::gemm_q4x8);
        assert_edges(&q8, &w8, k, &x, kt.q.q8x8.gemm, scalar::gemm_q8x8);
    }
}

/// All 256 packed-nibble bytes at every (row, byte) slot: one-hot activations pick single
/// weights out of the product, compared with the byte's two levels and the twin's
/// dequantisation.
fn all_nibble_bytes<B: Q4Block>(gemm: fn(&Kernels) -> GemmQ4Fn<B>) {
    // block 0: qs[i] = i, block 1: qs[i] = 128 + i → every byte value appears in the row group
    let w = [
        B::from_parts([0x3C00; 8], std::array::from_fn(|i| i as u8)),
        B::from_parts([0x3C00; 8], std::array::from_fn(|i| 128 + i as u8)),
    ];
    let k = 64;
    let mut deq = vec![0.0f32; k];
    for kt in tables() {
        // one token per column: x[t] = e_t
        let n_tok = k;
        let mut x = vec![
            BlockQ8A {
                d: 1.0,
                sum8: 0,
                qs: [0; 32]
            };
            n_tok * 2
        ];
        for t in 0..n_tok {
            x[t * 2 + t / 32].qs[t % 32] = 1;
            x[t * 2 + t / 32].sum8 = 8;
        }
        let mut y = nan_buf(n_tok, 8);
        gemm(&kt)(&w, 8, k, &x, n_tok, &mut y, 8);
        for r in 0..8 {
            scalar::dequantize_row_q4x8(&w, r, k, &mut deq);
            for col in 0..k {
                let (i, hi) = q4_pos(r, col % 32);
                let byte = w[col / 32].qs()[i];
                let lvl = B::LEVELS[if hi { byte >> 4 } else { byte & 15 } as usize] as f32;
                let what = format!("{} {} byte {byte:#04x}", kt.level.name(), B::NAME);
                assert_eq!(y[col * 8 + r], lvl, "{what}");
                assert_eq!(deq[col], lvl, "{what}");
            }
        }
    }
}

#[test]
fn q4_all_nibble_bytes() {
    all_nibble_bytes::<BlockQ4x8>(|k| k.q.q4x8.gemm);
}

/// Quantized products against the f64 dot of the unquantized data (error budget).
#[test]
fn q_gemm_vs_f64_reference() {
    let (n_rows, k, n_tok) = (64, 4096, 4);
    let mut rng = Rng(4);
    let wf = rng.gauss_vec(n_rows * k);
    let xf = rng.gauss_vec(n_tok * k);
    let mut w4 = zeroed::<BlockQ4x8>(q4x8_bytes(n_rows, k) / 144);
    scalar::quantize_q4x8(&wf, n_rows, k, &mut w4);
    let mut w8 = zeroed::<BlockQ8x8>(row_groups(n_rows) * k / QK);
    scalar::quantize_q8x8(&wf, n_rows, k, &mut w8);
    for kt in tables() {
        let mut x = vec![
            BlockQ8A {
                d: 0.0,
                sum8: 0,
                qs: [0; 32]
            };
            n_tok * k / QK
        ];
        (kt.quantize_q8a)(&xf, &mut x);
        let mut y4 = nan_buf(n_tok, n_rows);
        let mut y8 = nan_buf(n_tok, n_rows);
        (kt.q.q4x8.gemm)(&w4, n_rows, k, &x, n_tok, &mut y4, n_rows);
        (kt.q.q8x8.gemm)(&w8, n_rows, k, &x, n_tok, &mut y8, n_rows);
        let (mut e4, mut e8) = (0.0f64, 0.0f64);
        for t in 0..n_tok {
            for r in 0..n_rows {
                let wr = &wf[r * k..(r + 1) * k];
                let xt = &xf[t * k..(t + 1) * k];
                let exact: f64 = wr.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                let nw: f64 = wr.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
                let nx: f64 = xt.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
                e4 = e4.max((y4[t * n_rows + r] as f64 - exact).abs() / (nw * nx));
                e8 = e8.max((y8[t * n_rows + r] as f64 - exact).abs() / (nw * nx));
            }
        }
        eprintln!("{}: q4 dot rel err {e4:.5}, q8 {e8:.6}", kt.level.name());
        assert!(e4 <= Q4_DOT_REL_ERR, "q4 dot error {e4}");
        assert!(e8 <= Q8_DOT_REL_ERR, "q8 dot error {e8}");
    }
}

/// Round-trip RMSE budgets of the weight quantizers (scalar: the converter's code).
#[test]
fn weight_roundtrip_rmse() {
    let (rows, cols) = (64, 4096);
    let mut rng = Rng(5);
    let wf = rng.gauss_vec(rows * cols);
    let mut w4 = zeroed::<BlockQ4x8>(row_groups(rows) * cols / QK);
    let mut w8 = zeroed::<BlockQ8x8>(row_groups(rows) * cols / QK);
    scalar::quantize_q4x8(&wf, rows, cols, &mut w4);
    scalar::quantize_q8x8(&wf, rows, cols, &mut w8);
    let (mut s4, mut s8, mut sx) = (0.0f64, 0.0f64, 0.0f64);
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        let orig = &wf[r * cols..(r + 1) * cols];
        scalar::dequantize_row_q4x8(&w4, r, cols, &mut row);
        s4 += orig
            .iter()
            .zip(&row)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        scalar::dequantize_row_q8x8(&w8, r, cols, &mut row);
        s8 += orig
            .iter()
            .zip(&row)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        sx += orig.iter().map(|&a| (a as f64).powi(2)).sum::<f64>();
    }
    let (r4, r8) = ((s4 / sx).sqrt(), (s8 / sx).sqrt());
    eprintln!("relative RMSE: q4x8 {r4:.5}, q8x8 {r8:.6}");
    assert!(r4 <= Q4X8_RMSE_MAX && r8 <= Q8X8_RMSE_MAX);
}

#[test]
fn quantize_q8a_bit_identical() {
    let mut rng = Rng(6);
    for kt in tables() {
        for nblk in [1, 2, 3, 7, 33] {
            let mut x = rng.gauss_vec(nblk * QK);
            // ties: amax 127 → id = 1, so v.5 values round to even
            x[..8].copy_from_slice(&[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]);
            if nblk > 1 {
                x[32..64].iter_mut().for_each(|v| *v = 0.0);
            }
            if nblk > 2 {
                x[64..96]
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i as f32 - 16.0) * 1e-38);
            }
            if nblk > 3 {
                x[96..128].iter_mut().for_each(|v| *v *= 3e37);
            }
            let mut a = vec![
                BlockQ8A {
                    d: -1.0,
                    sum8: 99,
                    qs: [99; 32]
                };
                nblk
            ];
            let mut b = a.clone();
            (kt.quantize_q8a)(&x, &mut a);
            scalar::quantize_q8a(&x, &mut b);
            assert_eq!(a, b, "{}", kt.level.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Linear 4-bit weights (Q4Lx8): its own AVX2 kernels (unsigned nibbles, i16 block sums)
// ---------------------------------------------------------------------------------------------

fn to_q4l(w: &[BlockQ4x8]) -> Vec<BlockQ4Lx8> {
    w.iter().map(|b| BlockQ4Lx8 { d: b.d, qs: b.qs }).collect()
}

/// Exact integer sums with unit scales, including the extremes of both operands (nibbles all 0
/// or all 15 against activations all ±127): the i16 block sums of the AVX2 kernel never
/// saturate, and the −8 offset is undone exactly.
#[test]
fn q4l_integer_sums_exact() {
    let mut rng = Rng(11);
    for kt in tables() {
        for &n_rows in &ROW_COUNTS {
            for &k in &KS {
                let nb = k / QK;
                let mut w = to_q4l(&random_q4(&mut rng, n_rows, k, true));
                for n_tok in 1..=9 {
                    let mut x = unit_acts(&mut rng, n_tok * nb);
                    if n_tok == 3 {
                        // extremes: every weight −8 or +7, every activation ±127
                        for (i, b) in w.iter_mut().enumerate() {
                            b.qs = [if i % 2 == 0 { 0x00 } else { 0xFF }; 128];
                        }
                        for (i, a) in x.iter_mut().enumerate() {
                            let v = if i % 3 == 0 { 127 } else { -127 };
                            a.qs = [v; 32];
                            a.sum8 = 256 * v as i32;
                        }
                    }
                    let ld = n_rows + 3;
                    let mut y = nan_buf(n_tok, ld);
                    (kt.q.q4lx8.gemm)(&w, n_rows, k, &x, n_tok, &mut y, ld);
                    let what = format!("{} q4l n={n_rows} k={k}", kt.level.name());
                    assert_exact_sums(&what, &y, ld, n_rows, &x, nb, |r, b, c| {
                        let blk = &w[r / 8 * nb + b];
                        let (i, hi) = q4_pos(r % 8, c);
                        let nib = if hi { blk.qs[i] >> 4 } else { blk.qs[i] & 15 };
                        nib as i64 - 8
                    });
                }
            }
        }
    }
}

/// Real scales, quantized activations, every tile size, plain and expert products: bit-identical
/// to the twin.
#[test]
fn q4l_matches_twin_bitwise() {
    let mut rng = Rng(12);
    for kt in tables() {
        let lv = kt.level.name();
        for &n_rows in &ROW_COUNTS {
            for &k in &[32, 96, 4096] {
                let w = to_q4l(&random_q4(&mut rng, n_rows, k, false));
                for n_tok in [1, 2, 3, 5, 8, 9, 13, 70] {
                    let x = quant_acts(&rng.gauss_vec(n_tok * k));
                    let ld = n_rows + 1;
                    let mut y = nan_buf(n_tok, ld);
                    let mut r = nan_buf(n_tok, ld);
                    (kt.q.q4lx8.gemm)(&w, n_rows, k, &x, n_tok, &mut y, ld);
                    scalar::gemm_q4x8(&w, n_rows, k, &x, n_tok, &mut r, ld);
                    let what = format!("{lv} q4l n={n_rows} k={k}");
                    assert_gemm_out(&what, &y, &r, n_tok, n_rows, ld);
                }
            }
        }
        // scale edge cases (subnormal, max, negative, zero) and zero / tiny / huge activations
        let k = 128;
        let mut w = to_q4l(&random_q4(&mut rng, 8, k, true));
        w.iter_mut().for_each(|b| b.d = EDGE_SCALES);
        let x = edge_acts(&mut rng, k);
        let what = format!("{lv} q4l");
        assert_edges(&what, &w, k, &x, kt.q.q4lx8.gemm, scalar::gemm_q4x8);
        // fused gate/up over gathered rows, repeated and out-of-order rows
        for &(n_rows, k) in &[(9usize, 64usize), (24, 96), (40, 1024)] {
            let n_x = 13;
            let x = quant_acts(&rng.gauss_vec(n_x * k));
            let g = to_q4l(&random_q4(&mut rng, n_rows, k, false));
            let u = to_q4l(&random_q4(&mut rng, n_rows, k, false));
            for n_sel in [1, 2, 5, 9, 12] {
                let rows: Vec<u32> = (0..n_sel).map(|_| rng.below(n_x as u64) as u32).collect();
                let ld = n_rows + 2;
                let mut y = nan_buf(n_sel, ld);
                let mut r = nan_buf(n_sel, ld);
                (kt.q.q4lx8.gate_up.unwrap())(&g, &u, n_rows, k, &x, &rows, &mut y, ld);
                scalar::ffn_gate_up_q4x8(&g, &u, n_rows, k, &x, &rows, &mut r, ld);
                assert_gemm_out(&format!("{lv} gate_up q4l"), &y, &r, n_sel, n_rows, ld);
            }
        }
    }
}

/// Every packed byte reads as `q − 8`, through the product and the twin's dequantisation.
#[test]
fn q4l_all_nibble_bytes() {
    all_nibble_bytes::<BlockQ4Lx8>(|k| k.q.q4lx8.gemm);
}

/// Round-trip error of the linear quantizer (same scale search as the codebook) within budget,
/// and each row's reconstruction no worse than ggml's round-to-nearest `Q4_0` rule.
#[test]
fn q4l_roundtrip_rmse() {
    let (rows, cols) = (64, 4096);
    let mut rng = Rng(5);
    let wf = rng.gauss_vec(rows * cols);
    let mut w = zeroed::<BlockQ4Lx8>(row_groups(rows) * cols / QK);
    scalar::quantize_q4x8(&wf, rows, cols, &mut w);
    let (mut se, mut se_rtn, mut ss) = (0.0f64, 0.0f64, 0.0f64);
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        scalar::dequantize_row_q4x8(&w, r, cols, &mut row);
        for (b, xb) in wf[r * cols..(r + 1) * cols].chunks_exact(QK).enumerate() {
            // ggml Q4_0: d = max / −8 (max = the value of largest magnitude), round to nearest
            let mx = xb
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = half::f16::from_f32(mx / -8.0).to_f32();
            for (j, &v) in xb.iter().enumerate() {
                let q = if d == 0.0 {
                    0.0
                } else {
                    (v / d).round().clamp(-8.0, 7.0)
                };
                se_rtn += ((v - q * d) as f64).powi(2);
                se += ((v - row[b * QK + j]) as f64).powi(2);
                ss += (v as f64).powi(2);
            }
        }
    }
    let (e, e_rtn) = ((se / ss).sqrt(), (se_rtn / ss).sqrt());
    eprintln!("relative RMSE: q4lx8 {e:.5}, ggml Q4_0 rule {e_rtn:.5}");
    assert!(e <= Q4LX8_RMSE_MAX, "q4lx8 RMSE {e}");
    assert!(e < e_rtn, "the scale search must beat round-to-nearest");
}

/// Weights already on a `Q4_0` grid (a ggml Q4_0 GGUF dequantized: `d · (q − 8)`, f16 `d`)
/// come back exactly: converting such a file with `--quant q4l` loses nothing.
#[test]
fn q4l_reproduces_q4_0_grid() {
    let (rows, cols) = (24, 256);
    let mut rng = Rng(13);
    let mut wf = vec![0.0f32; rows * cols];
    for blk in wf.chunks_exact_mut(QK) {
        let d = half::f16::from_f32(rng.gauss() * 0.02).to_f32();
        for v in blk.iter_mut() {
            *v = d * (rng.below(16) as f32 - 8.0);
        }
    }
    let mut w = zeroed::<BlockQ4Lx8>(row_groups(rows) * cols / QK);
    scalar::quantize_q4x8(&wf, rows, cols, &mut w);
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        scalar::dequantize_row_q4x8(&w, r, cols, &mut row);
        assert_eq!(&row[..], &wf[r * cols..(r + 1) * cols], "row {r}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6-bit weights (Q6x8): output and embedding tables
// ---------------------------------------------------------------------------------------------

fn random_q6(rng: &mut Rng, n_rows: usize, k: usize, unit_scale: bool) -> Vec<BlockQ6x8> {
    let n = row_groups(n_rows) * k / QK;
    (0..n)
        .map(|_| BlockQ6x8 {
            d: rand_scales(rng, unit_scale),
            // every byte is a valid packing
            ql: std::array::from_fn(|_| rng.next() as u8),
            qh: std::array::from_fn(|_| rng.next() as u8),
        })
        .collect()
}

/// Exact integer sums with unit scales against an i64 reference, including the extremes (every
/// `u` 0 or 63 against activations all 127, −127 or −128): the i16 pair sums of the AVX2
/// kernel never saturate and the −32 offset is undone exactly.
#[test]
fn q6_integer_sums_exact() {
    let mut rng = Rng(21);
    for kt in tables() {
        for &n_rows in &ROW_COUNTS {
            for &k in &KS {
                let nb = k / QK;
                let mut w = random_q6(&mut rng, n_rows, k, true);
                for n_tok in 1..=9 {
                    let mut x = unit_acts(&mut rng, n_tok * nb);
                    if n_tok == 3 {
                        for (i, b) in w.iter_mut().enumerate() {
                            let v = if i % 2 == 0 { 0x00 } else { 0xFF };
                            (b.ql, b.qh) = ([v; 128], [v; 64]);
                        }
                        for (i, a) in x.iter_mut().enumerate() {
                            let v: i8 = [127, -127, -128][i % 3];
                            a.qs = [v; 32];
                            a.sum8 = 256 * v as i32;
                        }
                    }
                    let ld = n_rows + 3;
                    let mut y = nan_buf(n_tok, ld);
                    (kt.q.q6x8.gemm)(&w, n_rows, k, &x, n_tok, &mut y, ld);
                    let what = format!("{} q6 n={n_rows} k={k}", kt.level.name());
                    assert_exact_sums(&what, &y, ld, n_rows, &x, nb, |r, b, c| {
                        q6_get(&w[r / 8 * nb + b], r % 8, c) as i64 - 32
                    });
                }
            }
        }
    }
}

/// Real scales, quantized activations, every tile size, scale edge cases: bit-identical to the
/// twin.
#[test]
fn q6_matches_twin_bitwise() {
    let mut rng = Rng(22);
    for kt in tables() {
        let lv = kt.level.name();
        for &n_rows in &ROW_COUNTS {
            for &k in &[32, 96, 576, 4096] {
                let w = random_q6(&mut rng, n_rows, k, false);
                for n_tok in [1, 2, 3, 4, 5, 8, 9, 13, 70] {
                    let x = quant_acts(&rng.gauss_vec(n_tok * k));
                    let ld = n_rows + 1;
                    let mut y = nan_buf(n_tok, ld);
                    let mut r = nan_buf(n_tok, ld);
                    (kt.q.q6x8.gemm)(&w, n_rows, k, &x, n_tok, &mut y, ld);
                    scalar::gemm_q6x8(&w, n_rows, k, &x, n_tok, &mut r, ld);
                    let what = format!("{lv} q6 n={n_rows} k={k}");
                    assert_gemm_out(&what, &y, &r, n_tok, n_rows, ld);
                }
            }
        }
        let k = 128;
        let mut w = random_q6(&mut rng, 8, k, true);
        w.iter_mut().for_each(|b| b.d = EDGE_SCALES);
        let x = edge_acts(&mut rng, k);
        assert_edges(
            &format!("{lv} q6"),
            &w,
            k,
            &x,
            kt.q.q6x8.gemm,
            scalar::gemm_q6x8,
        );
    }
}

/// Every value `u` at every (row, column) slot: one-hot activations pick single weights out of
/// the product, compared with `d · (u − 32)` and the twin's dequantisation.
#[test]
fn q6_all_values_every_slot() {
    let k = 64;
    // block b, row r, column c holds u = (b * 8 * 32 + r * 32 + c) % 64 (each value 8 times
    // per block, in every position over the two blocks' rows)
    let u_of = |b: usize, r: usize, c: usize| ((b * 256 + r * 37 + c * 5) % 64) as u8;
    let mut wf = vec![0.0f32; 8 * k];
    for r in 0..8 {
        for b in 0..2 {
            for c in 0..QK {
                wf[r * k + b * QK + c] = u_of(b, r, c) as f32 - 32.0;
            }
        }
        // pin the scale to 1: the block's extremes must be −32 and 31
        for b in 0..2 {
            wf[r * k + b * QK + 30] = -32.0;
            wf[r * k + b * QK + 31] = 31.0;
        }
    }
    let mut w = zeroed::<BlockQ6x8>(2);
    scalar::quantize_q6x8(&wf, 8, k, &mut w);
    let mut row = vec![0.0f32; k];
    for r in 0..8 {
        scalar::dequantize_row_q6x8(&w, r, k, &mut row);
        assert_eq!(&row[..], &wf[r * k..(r + 1) * k], "row {r}");
        for b in 0..2 {
            for c in 0..QK {
                let (il, hi, ih, sh) = q6_pos(r, c);
                assert!(il < 128 && ih < 64 && sh <= 6 && (hi == (c >= 16)));
                assert_eq!(q6_get(&w[b], r, c) as f32 - 32.0, wf[r * k + b * QK + c]);
            }
        }
    }
    for kt in tables() {
        for col in 0..k {
            let mut xf = vec![0.0f32; k];
            xf[col] = 1.0;
            let x = quant_acts(&xf);
            let mut y = vec![f32::NAN; 8];
            (kt.q.q6x8.gemm)(&w, 8, k, &x, 1, &mut y, 8);
            for r in 0..8 {
                assert_eq!(
                    y[r],
                    x[col / QK].d * (wf[r * k + col] * 127.0),
                    "{} q6 col {col} row {r}",
                    kt.level.name()
                );
            }
        }
    }
}

/// Round-trip error of the 6-bit quantizer within budget and below round-to-nearest.
#[test]
fn q6_roundtrip_rmse() {
    let (rows, cols) = (64, 4096);
    let mut rng = Rng(5);
    let wf = rng.gauss_vec(rows * cols);
    let mut w = zeroed::<BlockQ6x8>(row_groups(rows) * cols / QK);
    scalar::quantize_q6x8(&wf, rows, cols, &mut w);
    let (mut se, mut se_rtn, mut ss) = (0.0f64, 0.0f64, 0.0f64);
    let mut row = vec![0.0f32; cols];
    for r in 0..rows {
        scalar::dequantize_row_q6x8(&w, r, cols, &mut row);
        for (b, xb) in wf[r * cols..(r + 1) * cols].chunks_exact(QK).enumerate() {
            let mx = xb
                .iter()
                .fold(0.0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = half::f16::from_f32(mx / -32.0).to_f32();
            for (j, &v) in xb.iter().enumerate() {
                let q = (v / d).round().clamp(-32.0, 31.0);
                se_rtn += ((v - q * d) as f64).powi(2);
                se += ((v - row[b * QK + j]) as f64).powi(2);
                ss += (v as f64).powi(2);
            }
        }
    }
    let (e, e_rtn) = ((se / ss).sqrt(), (se_rtn / ss).sqrt());
    eprintln!("relative RMSE: q6x8 {e:.5}, round-to-nearest {e_rtn:.5}");
    assert!(e <= Q6X8_RMSE_MAX, "q6x8 RMSE {e}");
    assert!(e < e_rtn, "the scale search must beat round-to-nearest");
    // non-finite and all-zero rows quantize to zero scales, not garbage
    let mut bad = vec![1.0f32; 2 * QK];
    bad[3] = f32::NAN;
    bad[QK..].iter_mut().for_each(|v| *v = 0.0);
    let mut wb = zeroed::<BlockQ6x8>(2);
    scalar::quantize_q6x8(&bad, 1, 2 * QK, &mut wb);
    scalar::dequantize_row_q6x8(&wb, 0, 2 * QK, &mut row);
    assert!(row[..2 * QK].iter().all(|&v| v == 0.0));
}

// ---------------------------------------------------------------------------------------------
// Expert routing
// ---------------------------------------------------------------------------------------------

#[test]
fn routing_kernels_match_twins() {
    let mut rng = Rng(7);
    for kt in tables() {
        let lv = kt.level.name();
        for &(n_rows, k) in &[(9usize, 64usize), (24, 96), (40, 1024)] {
            let n_x = 13;
            let x = quant_acts(&rng.gauss_vec(n_x * k));
            let g4 = random_q4(&mut rng, n_rows, k, false);
            let u4 = random_q4(&mut rng, n_rows, k, false);
            let g8 = random_q8(&mut rng, n_rows, k, false);
            let u8_ = random_q8(&mut rng, n_rows, k, false);
            for n_sel in [1, 2, 5, 9, 12] {
                // repeated and out-of-order rows
                let rows: Vec<u32> = (0..n_sel).map(|_| rng.below(n_x as u64) as u32).collect();
                let ld = n_rows + 2;
                macro_rules! cmp {
                    ($name:literal, $call:expr, $twin:expr) => {{
                        let mut y = nan_buf(n_sel, ld);
                        let mut r = nan_buf(n_sel, ld);
                        $call(&mut y);
                        $twin(&mut r);
                        assert_gemm_out(
                            &format!("{lv} {} n={n_rows}", $name),
                            &y,
                            &r,
                            n_sel,
                            n_rows,
                            ld,
                        );
                    }};
                }
                cmp!(
                    "gate_up q4",
                    |y: &mut [f32]| (kt.q.q4x8.gate_up.unwrap())(
                        &g4, &u4, n_rows, k, &x, &rows, y, ld
                    ),
                    |y: &mut [f32]| scalar::ffn_gate_up_q4x8(&g4, &u4, n_rows, k, &x, &rows, y, ld)
                );
                cmp!(
                    "gate_up q8",
                    |y: &mut [f32]| (kt.q.q8x8.gate_up.unwrap())(
                        &g8, &u8_, n_rows, k, &x, &rows, y, ld
                    ),
                    |y: &mut [f32]| scalar::ffn_gate_up_q8x8(
                        &g8, &u8_, n_rows, k, &x, &rows, y, ld
                    )
                );
            }
        }
        // top-k and grouping
        for n_exp in [16usize, 128] {
            let n_tok = 37;
            let top = 2;
            let mut expert_of = vec![0u32; n_tok * top];
            for t in 0..n_tok {
                let logits = rng.gauss_vec(n_exp);
                let (mut i1, mut v1, mut i2, mut v2) =
                    (vec![0; top], vec![0.0; top], vec![0; top], vec![0.0; top]);
                (kt.topk)(&logits, top, &mut i1, &mut v1);
                scalar::topk(&logits, top, &mut i2, &mut v2);
                assert_eq!((i1.clone(), v1), (i2, v2));
                expert_of[t * top..(t + 1) * top].copy_from_slice(&i1);
            }
            let m = expert_of.len();
            let (mut c1, mut o1, mut p1, mut v1) =
                (vec![0; n_exp], vec![0; n_exp + 1], vec![0; m], vec![0; m]);
            let (mut c2, mut o2, mut p2, mut v2) =
                (vec![0; n_exp], vec![0; n_exp + 1], vec![0; m], vec![0; m]);
            (kt.group_by_expert)(&expert_of, n_exp, &mut c1, &mut o1, &mut p1, &mut v1);
            scalar::group_by_expert(&expert_of, n_exp, &mut c2, &mut o2, &mut p2, &mut v2);
            assert_eq!((c1, o1, p1, v1), (c2, o2, p2, v2), "{lv} group_by_expert");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Float kernels
// ---------------------------------------------------------------------------------------------

fn sum_abs(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 * *y as f64).abs())
        .sum()
}

#[test]
fn float_gemms() {
    let mut rng = Rng(9);
    for kt in tables() {
        let lv = kt.level.name();
        for k in [1usize, 7, 8, 9, 31, 64, 70, 577] {
            for n_rows in [1usize, 3, 8, 9] {
                for n_tok in [1usize, 2, 5, 9] {
                    let wf = rng.gauss_vec(n_rows * k);
                    let x = rng.gauss_vec(n_tok * k);
                    let wb: Vec<u16> = wf
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_bits())
                        .collect();
                    let wh: Vec<u16> = wf
                        .iter()
                        .map(|&v| half::f16::from_f32(v).to_bits())
                        .collect();
                    let ld = n_rows + 2;
                    let run = |name: &str, f: &dyn Fn(&mut [f32]), twin: &dyn Fn(&mut [f32])| {
                        let mut y = nan_buf(n_tok, ld);
                        let mut r = nan_buf(n_tok, ld);
                        f(&mut y);
                        twin(&mut r);
                        for t in 0..n_tok {
                            for row in 0..ld {
                                let (g, w) = (y[t * ld + row], r[t * ld + row]);
                                if row >= n_rows {
                                    assert!(g.is_nan(), "{lv} {name}: wrote past n_rows");
                                    continue;
                                }
                                let s =
                                    sum_abs(&wf[row * k..(row + 1) * k], &x[t * k..(t + 1) * k])
                                        * 1.01;
                                let tol = F32_SUM_TOL as f64 * k as f64 * s + 1e-30;
                                assert!(
                                    ((g - w).abs() as f64) <= tol,
                                    "{lv} {name} k={k}: {g} vs {w}"
                                );
                            }
                        }
                    };
                    run(
                        "gemm_f32",
                        &|y| (kt.gemm_f32)(&wf, n_rows, k, &x, n_tok, y, ld),
                        &|y| scalar::gemm_f32(&wf, n_rows, k, &x, n_tok, y, ld),
                    );
                    run(
                        "gemm_bf16",
                        &|y| (kt.gemm_bf16)(&wb, n_rows, k, &x, n_tok, y, ld),
                        &|y| scalar::gemm_bf16(&wb, n_rows, k, &x, n_tok, y, ld),
                    );
                    run(
                        "gemm_f16",
                        &|y| (kt.gemm_f16)(&wh, n_rows, k, &x, n_tok, y, ld),
                        &|y| scalar::gemm_f16(&wh, n_rows, k, &x, n_tok, y, ld),
                    );
                }
            }
        }
    }
}

#[test]
fn float_elementwise() {
    let mut rng = Rng(10);
    for kt in tables() {
        let lv = kt.level.name();
        for n in [1usize, 7, 8, 9, 33, 576, 5120] {
            let x: Vec<f32> = rng.gauss_vec(n).iter().map(|v| v * 4.0).collect();
            let w = rng.gauss_vec(n);
            for wopt in [None, Some(&w[..])] {
                let mut a = vec![f32::NAN; n];
                let mut b = vec![f32::NAN; n];
                (kt.rmsnorm)(&x, wopt, 1e-5, &mut a);
                scalar::rmsnorm(&x, wopt, 1e-5, &mut b);
                for (p, q) in a.iter().zip(&b) {
                    assert!(
                        (p - q).abs() <= RMSNORM_REL_TOL * q.abs().max(1e-30),
                        "{lv} rmsnorm {p} {q}"
                    );
                }
            }
        }
    }
}

#[test]
fn levels_and_env_lowering() {
    let avail = CpuLevel::available();
    assert_eq!(avail[0], CpuLevel::Scalar);
    for l in &avail {
        assert_eq!(Kernels::for_level(*l).unwrap().level, *l);
        assert_eq!(CpuLevel::parse(l.name()), Some(*l));
    }
    // the tier registry: every level has one entry, every name parses back to it
    for t in &ferroq_kernels::TIERS {
        for n in t.names {
            assert_eq!(CpuLevel::parse(n), Some(t.level), "{n}");
        }
        assert_eq!(t.level.name(), t.names[0]);
    }
    println!("levels on this machine: {:?}", avail);
}

#[test]
fn attention_kernels() {
    let mut rng = Rng(10);
    for kt in tables() {
        let lv = kt.level.name();
        for d in [1usize, 7, 8, 64, 72, 128, 130] {
            for n in [0usize, 1, 3, 4, 5, 9, 33] {
                let ld = d + 5;
                let q = rng.gauss_vec(d);
                let k = rng.gauss_vec(n * ld + d);
                let mut s1 = vec![0.0f32; n];
                let mut s2 = vec![0.0f32; n];
                (kt.attn_scores)(&q, &k, ld, 0.125, &mut s1);
                scalar::attn_scores(&q, &k, ld, 0.125, &mut s2);
                for j in 0..n {
                    let sa = sum_abs(&q, &k[j * ld..j * ld + d]) * 0.125;
                    assert!(
                        ((s1[j] - s2[j]).abs() as f64)
                            <= F32_SUM_TOL as f64 * d as f64 * sa + 1e-30,
                        "{lv} attn_scores d={d} n={n} j={j}"
                    );
                }
                let p = rng.gauss_vec(n);
                let mut o1 = rng.gauss_vec(d);
                let mut o2 = o1.clone();
                (kt.attn_values)(&p, &k, ld, &mut o1);
                scalar::attn_values(&p, &k, ld, &mut o2);
                assert_eq!(o1, o2, "{lv} attn_values d={d} n={n}");
                // f16 keys/values: the same against the f16 twins
                let kh: Vec<u16> = k
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                let kf: Vec<f32> = kh
                    .iter()
                    .map(|&h| half::f16::from_bits(h).to_f32())
                    .collect();
                (kt.attn_scores_f16)(&q, &kh, ld, 0.125, &mut s1);
                scalar::attn_scores_f16(&q, &kh, ld, 0.125, &mut s2);
                for j in 0..n {
                    let sa = sum_abs(&q, &kf[j * ld..j * ld + d]) * 0.125;
                    assert!(
                        ((s1[j] - s2[j]).abs() as f64)
                            <= F32_SUM_TOL as f64 * d as f64 * sa + 1e-30,
                        "{lv} attn_scores_f16 d={d} n={n} j={j}"
                    );
                }
                let mut o1 = rng.gauss_vec(d);
                let mut o2 = o1.clone();
                (kt.attn_values_f16)(&p, &kh, ld, &mut o1);
                scalar::attn_values_f16(&p, &kh, ld, &mut o2);
                assert_eq!(o1, o2, "{lv} attn_values_f16 d={d} n={n}");
                // int8 keys/values
                let k8: Vec<i8> = k
                    .iter()
                    .map(|&x| (x * 40.0).clamp(-127.0, 127.0) as i8)
                    .collect();
                let k8f: Vec<f32> = k8.iter().map(|&x| x as f32).collect();
                (kt.attn_scores_i8)(&q, &k8, ld, 0.125, &mut s1);
                scalar::attn_scores_i8(&q, &k8, ld, 0.125, &mut s2);
                for j in 0..n {
                    let sa = sum_abs(&q, &k8f[j * ld..j * ld + d]) * 0.125;
                    assert!(
                        ((s1[j] - s2[j]).abs() as f64)
                            <= F32_SUM_TOL as f64 * d as f64 * sa + 1e-30,
                        "{lv} attn_scores_i8 d={d} n={n} j={j}"
                    );
                }
                let mut o1 = rng.gauss_vec(d);
                let mut o2 = o1.clone();
                (kt.attn_values_i8)(&p, &k8, ld, &mut o1);
                scalar::attn_values_i8(&p, &k8, ld, &mut o2);
                assert_eq!(o1, o2, "{lv} attn_values_i8 d={d} n={n}");
                // 4-bit keys/values: rows of `d` values in blocks of 32 with f16 scales, a
                // row stride with padding, the last block partial when 32 ∤ d
                let nb = d.div_ceil(scalar::KV_Q4_BLOCK);
                let (ld4, lds) = (nb * scalar::KV_Q4_BYTES + 16, nb + 3);
                let mut k4 = vec![0u8; n * ld4];
                let mut k4s = vec![0u16; n * lds];
                let mut k4f = vec![0.0f32; n * d];
                for j in 0..n {
                    scalar::quantize_kv_q4(
                        &k[j * ld..j * ld + d],
                        &mut k4[j * ld4..(j + 1) * ld4],
                        &mut k4s[j * lds..j * lds + nb],
                    );
                    scalar::dequantize_kv_q4(
                        &k4[j * ld4..],
                        &k4s[j * lds..j * lds + nb],
                        &mut k4f[j * d..(j + 1) * d],
                    );
                }
                (kt.attn_scores_q4)(&q, &k4, &k4s, ld4, lds, 0.125, &mut s1);
                scalar::attn_scores_q4(&q, &k4, &k4s, ld4, lds, 0.125, &mut s2);
                for j in 0..n {
                    let sa = sum_abs(&q, &k4f[j * d..(j + 1) * d]) * 0.125;
                    assert!(
                        ((s1[j] - s2[j]).abs() as f64)
                            <= F32_SUM_TOL as f64 * d as f64 * sa + 1e-30,
                        "{lv} attn_scores_q4 d={d} n={n} j={j}"
                    );
                    // the twin is the dot with the dequantized row (up to reassociation)
                    let want: f32 = q
                        .iter()
                        .zip(&k4f[j * d..(j + 1) * d])
                        .map(|(a, b)| a * b)
                        .sum();
                    assert!(
                        ((s2[j] - want * 0.125).abs() as f64)
                            <= F32_SUM_TOL as f64 * d as f64 * sa + 1e-30,
                        "{lv} attn_scores_q4 twin vs dequantized d={d} n={n} j={j}"
                    );
                }
                let mut o1 = rng.gauss_vec(d);
                let mut o2 = o1.clone();
                (kt.attn_values_q4)(&p, &k4, &k4s, ld4, lds, &mut o1);
                scalar::attn_values_q4(&p, &k4, &k4s, ld4, lds, &mut o2);
                assert_eq!(o1, o2, "{lv} attn_values_q4 d={d} n={n}");
            }
        }
    }
}

#[test]
fn attention_tile_kernels() {
    let mut rng = Rng(11);
    for kt in tables() {
        let lv = kt.level.name();
        // exp accuracy over a dense sweep, against f64
        let mut worst = 0.0f64;
        let xs: Vec<f32> = (0..=200_000)
            .map(|i| -87.3 * i as f32 / 200_000.0)
            .collect();
        for chunk in xs.chunks(61) {
            let mut a = chunk.to_vec();
            let (m, _) = (kt.softmax_tile)(&mut a, 0.0);
            assert_eq!(m, 0.0);
            for (g, &x) in a.iter().zip(chunk) {
                let w = (x as f64).exp();
                worst = worst.max((*g as f64 - w).abs() / w);
            }
        }
        println!("{lv} softmax_tile exp: max rel err vs f64 {worst:.3e}");
        assert!(worst <= EXP_TILE_REL_TOL, "{lv} softmax_tile exp {worst}");
        for n in [0usize, 1, 7, 8, 9, 16, 33, 64, 100] {
            for m_old in [f32::NEG_INFINITY, -3.0, 0.5, 30.0] {
                let mut x: Vec<f32> = rng.gauss_vec(n).iter().map(|v| v * 6.0).collect();
                // masked keys, deep underflow and the subnormal range
                for (i, v) in x.iter_mut().enumerate() {
                    match i % 11 {
                        3 => *v = f32::NEG_INFINITY,
                        5 => *v = -95.0,
                        7 => *v = -87.0,
                        _ => {}
                    }
                }
                let (mut a, mut b) = (x.clone(), x.clone());
                let (m1, s1) = (kt.softmax_tile)(&mut a, m_old);
                let (m2, s2) = scalar::softmax_tile(&mut b, m_old);
                assert_eq!(m1.to_bits(), m2.to_bits(), "{lv} softmax_tile max n={n}");
                let mut sum64 = 0.0f64;
                for (i, ((g, w), &xi)) in a.iter().zip(&b).zip(&x).enumerate() {
                    let e = if m1 == f32::NEG_INFINITY {
                        0.0
                    } else {
                        ((xi - m1) as f64).exp()
                    };
                    sum64 += *g as f64;
                    let tol = EXP_TILE_REL_TOL * e + f32::MIN_POSITIVE as f64;
                    assert!(
                        ((*g as f64) - e).abs() <= tol,
                        "{lv} softmax_tile n={n} i={i}: {g} vs f64 {e}"
                    );
                    assert!(
                        ((*g - *w) as f64).abs() <= 2.0 * tol,
                        "{lv} softmax_tile n={n} i={i}: {g} vs twin {w}"
                    );
                }
                // the sum of the returned terms, reassociated: n·ε relative
                let st = F32_SUM_TOL as f64 * n as f64 * sum64 + 1e-30;
                assert!(((s1 as f64) - sum64).abs() <= st, "{lv} softmax_tile sum");
                assert!(
                    ((s1 - s2) as f64).abs() <= st + 2.0 * EXP_TILE_REL_TOL * sum64,
                    "{lv} softmax_tile sum vs twin {s1} {s2}"
                );
            }
        }
        // value sums of several rows: bit-identical to the twin
        for d in [1usize, 7, 8, 16, 24, 64, 72, 128] {
            for n in [0usize, 1, 5, 17, 64] {
                for rows in [1usize, 3, 4, 5, 12] {
                    let ld = d + 3;
                    let p = rng.gauss_vec(rows * n);
                    let v = rng.gauss_vec(n * ld + d);
                    let mut o1 = rng.gauss_vec(rows * d);
                    let mut o2 = o1.clone();
                    (kt.attn_values_rows)(&p, n, &v, ld, d, &mut o1);
                    scalar::attn_values_rows(&p, n, &v, ld, d, &mut o2);
                    assert_eq!(o1, o2, "{lv} attn_values_rows d={d} n={n} rows={rows}");
                }
            }
        }
        // K/V tile conversions (exact)
        for d in [1usize, 7, 8, 16, 64, 72, 128] {
            for n in [0usize, 1, 7, 8, 9, 17, 64] {
                let ld = d + 5;
                let k = rng.gauss_vec(n * ld + d);
                let kh: Vec<u16> = k
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                let (mut a, mut b) = (vec![f32::NAN; d * n], vec![f32::NAN; d * n]);
                (kt.kv_transpose_f32)(&k, ld, d, n, &mut a);
                scalar::kv_transpose_f32(&k, ld, d, n, &mut b);
                assert_eq!(a, b, "{lv} kv_transpose_f32 d={d} n={n}");
                for j in 0..n {
                    for c in 0..d {
                        assert_eq!(a[c * n + j], k[j * ld + c], "{lv} kv_transpose_f32");
                    }
                }
                (kt.kv_transpose_f16)(&kh, ld, d, n, &mut a);
                scalar::kv_transpose_f16(&kh, ld, d, n, &mut b);
                assert_eq!(a, b, "{lv} kv_transpose_f16 d={d} n={n}");
                (kt.kv_rows_f16)(&kh, ld, d, n, &mut a);
                scalar::kv_rows_f16(&kh, ld, d, n, &mut b);
                assert_eq!(a, b, "{lv} kv_rows_f16 d={d} n={n}");
                for j in 0..n {
                    for c in 0..d {
                        let w = half::f16::from_bits(kh[j * ld + c]).to_f32();
                        assert_eq!(a[j * d + c], w, "{lv} kv_rows_f16");
                    }
                }
            }
        }
        // scores against transposed keys
        for d in [1usize, 7, 64, 128] {
            for n in [0usize, 1, 5, 8, 15, 16, 17, 40, 64] {
                for rows in [1usize, 3, 4, 5, 12] {
                    let q = rng.gauss_vec(rows * d);
                    let k = rng.gauss_vec(d * n);
                    let mut s1 = vec![f32::NAN; rows * n];
                    let mut s2 = vec![f32::NAN; rows * n];
                    (kt.attn_scores_kt)(&q, &k, d, n, 0.125, &mut s1);
                    scalar::attn_scores_kt(&q, &k, d, n, 0.125, &mut s2);
                    for r in 0..rows {
                        for j in 0..n {
                            let (mut sa, mut ex) = (0.0f64, 0.0f64);
                            for c in 0..d {
                                let t = q[r * d + c] as f64 * k[c * n + j] as f64;
                                sa += t.abs();
                                ex += t;
                            }
                            let (sa, ex) = (sa * 0.125, ex * 0.125);
                            let (g, w) = (s1[r * n + j] as f64, s2[r * n + j] as f64);
                            assert!(
                                (g - w).abs() <= F32_SUM_TOL as f64 * d as f64 * sa + 1e-30,
                                "{lv} attn_scores_kt d={d} n={n} rows={rows} r={r} j={j}"
                            );
                            assert!(
                                (g - ex).abs() <= F32_VS_F64_TOL * d as f64 * sa + 1e-30,
                                "{lv} attn_scores_kt vs f64 d={d} n={n} r={r} j={j}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The polynomial exp behind SiLU (scalar twin of the AVX2 `exp8`): close to f64 `exp` over the
/// whole f32 range it covers, 0 below it, and SiLU's limits.
#[test]
fn exp_poly_and_silu() {
    let mut worst = 0.0f64;
    let mut x = -87.3f32;
    while x < 88.0 {
        let got = scalar::exp_poly(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max(((got - want) / want).abs());
        x += 0.0137;
    }
    assert!(worst < 2e-7, "exp_poly worst relative error {worst:e}");
    assert_eq!(scalar::exp_poly(0.0), 1.0);
    assert_eq!(scalar::exp_poly(-88.0), 0.0);
    assert_eq!(scalar::exp_poly(f32::NEG_INFINITY), 0.0);
    assert!(scalar::exp_poly(f32::NAN).is_nan());
    assert_eq!(scalar::exp_poly(1000.0), scalar::exp_poly(88.0));
    for z in [-30.0f32, -5.0, -1.0, -0.1, 0.0, 0.1, 1.0, 5.0, 30.0] {
        let want = z as f64 / (1.0 + (-(z as f64)).exp());
        let got = scalar::silu(z) as f64;
        assert!(
            (got - want).abs() <= 3e-7 * want.abs().max(1e-30),
            "silu({z}) = {got}, want {want}"
        );
    }
    assert_eq!(scalar::silu(100.0), 100.0);
    assert!(scalar::silu(-100.0).abs() < 1e-30);
    assert!(scalar::silu(f32::NAN).is_nan());
}

// ---------------------------------------------------------------------------------------------
// Every registered weight type (`for_each_weight_type!`), without naming it: a type added to the
// registry is tested here by itself.
// ---------------------------------------------------------------------------------------------

fn registered_type_matches_twins<B: WeightType>() {
    let mut rng = Rng(21);
    // 8 rows × 32 columns per block, so the block size fixes the bits per weight
    assert_eq!(
        std::mem::size_of::<B>() as f64 * 8.0 / 256.0,
        B::BITS_PER_WEIGHT,
        "{}",
        B::NAME
    );
    for &(n_rows, k) in &[(8usize, 32usize), (13, 96), (40, 256)] {
        let wf: Vec<f32> = rng.gauss_vec(n_rows * k);
        let mut w: Vec<B> = zeroed(row_groups(n_rows) * k / QK);
        B::quantize(&wf, n_rows, k, &mut w);
        // the dequantized rows are close to the floats (8 rows per group, padding excluded)
        let mut row = vec![0.0f32; k];
        for r in 0..n_rows {
            B::dequantize_row(&w, r, k, &mut row);
            let amax = wf[r * k..(r + 1) * k]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in row.iter().zip(&wf[r * k..(r + 1) * k]) {
                assert!(
                    (a - b).abs() <= 0.2 * amax,
                    "{} dequantize {a} {b}",
                    B::NAME
                );
            }
        }
        for kt in tables() {
            let lv = kt.level.name();
            for n_tok in [1, 2, 5, 9, 64] {
                let x = quant_acts(&rng.gauss_vec(n_tok * k));
                let ld = n_rows + 1;
                let (mut y, mut r) = (nan_buf(n_tok, ld), nan_buf(n_tok, ld));
                (B::gemm(&kt))(&w, n_rows, k, &x, n_tok, &mut y, ld);
                (B::gemm_twin())(&w, n_rows, k, &x, n_tok, &mut r, ld);
                let what = format!("{lv} {} gemm n={n_rows} k={k}", B::NAME);
                assert_gemm_out(&what, &y, &r, n_tok, n_rows, ld);
            }
            if let (Some(f), Some(twin)) = (B::gate_up(&kt), B::gate_up_twin()) {
                let mut u: Vec<B> = zeroed(w.len());
                B::quantize(&rng.gauss_vec(n_rows * k), n_rows, k, &mut u);
                let n_x = 11;
                let x = quant_acts(&rng.gauss_vec(n_x * k));
                for n_sel in [1, 3, 10] {
                    let rows: Vec<u32> = (0..n_sel).map(|_| rng.below(n_x as u64) as u32).collect();
                    let ld = n_rows + 2;
                    let (mut y, mut r) = (nan_buf(n_sel, ld), nan_buf(n_sel, ld));
                    f(&w, &u, n_rows, k, &x, &rows, &mut y, ld);
                    twin(&w, &u, n_rows, k, &x, &rows, &mut r, ld);
                    let what = format!("{lv} {} gate_up n={n_rows} k={k}", B::NAME);
                    assert_gemm_out(&what, &y, &r, n_sel, n_rows, ld);
                }
            }
        }
    }
}

#[test]
fn every_registered_weight_type() {
    macro_rules! run {
        ($b:ty) => {
            registered_type_matches_twins::<$b>()
        };
    }
    ferroq_kernels::for_each_weight_type!(run);
}

/// The 4-bit KV codes: the rotation is orthogonal and its own inverse; quantization rounds
/// each value to the nearest of its block's 16 levels `d·(−8..=7)` (error ≤ half a step inside
/// them; a value beyond `7|d|` on the far side from the largest one is clamped, ≤ one step),
/// keeps the value of largest magnitude exact up to the f16 scale, and maps a zero block to
/// zeros.
#[test]
fn kv_q4_codes() {
    let mut rng = Rng(12);
    for d in [1usize, 7, 16, 32, 40, 64, 128] {
        let x = rng.gauss_vec(d);
        let mut r = x.clone();
        scalar::kv_q4_rotate(&mut r);
        let n0: f32 = x.iter().map(|v| v * v).sum();
        let n1: f32 = r.iter().map(|v| v * v).sum();
        assert!(
            (n0 - n1).abs() <= 1e-5 * n0.max(1.0),
            "d={d}: norm {n0} -> {n1}"
        );
        scalar::kv_q4_rotate(&mut r);
        for (a, b) in x.iter().zip(&r) {
            assert!((a - b).abs() <= 1e-5, "d={d}: rotation twice {a} -> {b}");
        }
        let nb = d.div_ceil(scalar::KV_Q4_BLOCK);
        let (mut q, mut sc) = (vec![0u8; nb * scalar::KV_Q4_BYTES], vec![0u16; nb]);
        scalar::quantize_kv_q4(&x, &mut q, &mut sc);
        let mut y = vec![0.0f32; d];
        scalar::dequantize_kv_q4(&q, &sc, &mut y);
        for (b, (xb, yb)) in x
            .chunks(scalar::KV_Q4_BLOCK)
            .zip(y.chunks(scalar::KV_Q4_BLOCK))
            .enumerate()
        {
            let step = half::f16::from_bits(sc[b]).to_f32().abs();
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (a, b) in xb.iter().zip(yb) {
                let bound = if a.abs() <= 7.0 * step {
                    0.5 * step
                } else {
                    step
                };
                assert!(
                    (a - b).abs() <= bound + 1e-3 * amax,
                    "d={d}: {a} -> {b} (step {step})"
                );
            }
            let ymax = yb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!(
                (ymax - amax).abs() <= 1e-3 * amax,
                "d={d}: max {amax} -> {ymax}"
            );
        }
        let zero = vec![0.0f32; d];
        scalar::quantize_kv_q4(&zero, &mut q, &mut sc);
        scalar::dequantize_kv_q4(&q, &sc, &mut y);
        assert!(y.iter().all(|&v| v == 0.0), "d={d}: zero block");
    }
}
