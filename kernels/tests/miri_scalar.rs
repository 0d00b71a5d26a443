//! Small-size tests of the scalar twins and of the scalar/portable dispatch tables, sized to
//! run under Miri (`cargo +nightly miri test -p ferroq-kernels --test miri_scalar`), which
//! checks them for undefined behaviour (out-of-bounds, uninitialized reads, bad casts). The
//! full tier tests (`tiers.rs`) cover the same kernels at realistic sizes natively.

use ferroq_kernels::{scalar, BlockQ4x8, BlockQ6x8, BlockQ8A, BlockQ8x8, Kernels, QK};

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

const ROWS: usize = 11; // not a multiple of 8: exercises the padded row group
const K: usize = 64;
const TOK: usize = 3;

#[test]
fn quantized_products_and_roundtrip() {
    let w = data(ROWS * K, 1);
    let x = data(TOK * K, 2);
    let mut q4 = vec![
        BlockQ4x8 {
            d: [0; 8],
            qs: [0; 128]
        };
        ROWS.div_ceil(8) * K / QK
    ];
    let mut q8 = vec![
        BlockQ8x8 {
            d: [0; 8],
            qs: [0; 256]
        };
        ROWS.div_ceil(8) * K / QK
    ];
    let mut q6 = vec![
        BlockQ6x8 {
            d: [0; 8],
            ql: [0; 128],
            qh: [0; 64]
        };
        ROWS.div_ceil(8) * K / QK
    ];
    scalar::quantize_q4x8(&w, ROWS, K, &mut q4);
    scalar::quantize_q8x8(&w, ROWS, K, &mut q8);
    scalar::quantize_q6x8(&w, ROWS, K, &mut q6);
    let mut xa = vec![
        BlockQ8A {
            d: 0.0,
            sum8: 0,
            qs: [0; QK]
        };
        TOK * K / QK
    ];
    scalar::quantize_q8a(&x, &mut xa);
    let mut row = vec![0f32; K];
    for r in 0..ROWS {
        scalar::dequantize_row_q4x8(&q4, r, K, &mut row);
        scalar::dequantize_row_q8x8(&q8, r, K, &mut row);
        scalar::dequantize_row_q6x8(&q6, r, K, &mut row);
    }
    for kern in [
        Kernels::scalar(),
        Kernels::for_level(ferroq_kernels::CpuLevel::Portable).unwrap(),
    ] {
        let mut y4 = vec![f32::NAN; TOK * ROWS];
        let mut y8 = vec![f32::NAN; TOK * ROWS];
        (kern.q.q4x8.gemm)(&q4, ROWS, K, &xa, TOK, &mut y4, ROWS);
        (kern.q.q8x8.gemm)(&q8, ROWS, K, &xa, TOK, &mut y8, ROWS);
        let mut y6 = vec![f32::NAN; TOK * ROWS];
        (kern.q.q6x8.gemm)(&q6, ROWS, K, &xa, TOK, &mut y6, ROWS);
        assert!(y4.iter().chain(&y8).chain(&y6).all(|v| v.is_finite()));
        let mut yf = vec![f32::NAN; TOK * ROWS];
        (kern.gemm_f32)(&w, ROWS, K, &x, TOK, &mut yf, ROWS);
        // q8 weights × q8 activations stay close to the float product
        for (a, b) in y8.iter().zip(&yf) {
            assert!((a - b).abs() < 0.05 * (1.0 + b.abs()), "{a} vs {b}");
        }
        for (a, b) in y6.iter().zip(&yf) {
            assert!((a - b).abs() < 0.1 * (1.0 + b.abs()), "q6: {a} vs {b}");
        }
    }
}

#[test]
fn routing_and_vector_ops() {
    let logits = data(4 * 6, 3);
    let (n_tok, k, e) = (4, 2, 6);
    let mut idx = vec![0u32; n_tok * k];
    let mut val = vec![0f32; n_tok * k];
    for t in 0..n_tok {
        scalar::topk(
            &logits[t * e..(t + 1) * e],
            k,
            &mut idx[t * k..(t + 1) * k],
            &mut val[t * k..(t + 1) * k],
        );
    }
    let (mut counts, mut offsets) = (vec![0u32; e], vec![0u32; e + 1]);
    let (mut perm, mut inv) = (vec![0u32; n_tok * k], vec![0u32; n_tok * k]);
    scalar::group_by_expert(&idx, e, &mut counts, &mut offsets, &mut perm, &mut inv);
    for (i, &p) in inv.iter().enumerate() {
        assert_eq!(perm[p as usize] as usize, i);
    }
    let mut x = data(32, 4);
    let w = data(32, 5);
    let mut out = vec![0f32; 32];
    scalar::rmsnorm(&x, Some(&w), 1e-5, &mut out);
    let (cos, sin) = (data(16, 6), data(16, 7));
    scalar::rope_interleaved(&mut x, &cos, &sin);
    scalar::rope_half(&mut x, &cos, &sin);
    scalar::softmax(&mut x);
    assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-5);
}
