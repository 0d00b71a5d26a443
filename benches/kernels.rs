//! Kernel benchmarks: per kernel × tier × real model shape (single thread).
//!
//! * `membw/read_1GiB`: plain read of a 1 GiB buffer (much larger than any cache): the
//!   machine's single-thread read bandwidth, the ceiling for matrix × vector.
//! * `q4_matvec/<tier>/<shape>`, `q8_matvec/...`: one token, `Throughput::Bytes` = weight bytes
//!   streamed. Compare with `membw` for the shapes larger than the L3 cache.
//! * `q4_gemm64/<tier>/<shape>`: 64 activation rows, `Throughput::Elements` = int8 multiply-adds
//!   × 2 (integer ops), to compare with the tier's peak.
//! * `q4l_matvec/...`, `q4l_gemm64/...`: the same for the linear 4-bit type `Q4Lx8`.
//! * `lm_head_matvec/{q6,q8}/<tier>/<shape>`: one token through the output-table shapes in the
//!   6-bit type `Q6x8` and in `Q8x8`, side by side (bytes streamed per second; the 6-bit table
//!   is 208/272 of the bytes).
//! * `f32_matvec`, `bf16_matvec`: float weights.
//! * `moe/<tier>/<E>x<tokens>`: routing path (top-1 of E router logits, grouping, fused
//!   gate/up on the expert's rows, down product, weighted scatter-add) with reduced expert sizes
//!   (hidden 512, ff 1024) so that 128 experts fit in memory.
//!
//! Run one group: `cargo bench -j2 --bench kernels -- q4_matvec`.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferroq_kernels::block::{
    row_groups, BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8A, BlockQ8x8, QK,
};
use ferroq_kernels::{scalar, CpuLevel, GemmQ4Fn, Kernels, Q4Block};
use std::hint::black_box;
use std::time::Duration;

fn tiers(with_scalar: bool) -> Vec<Kernels> {
    CpuLevel::available()
        .into_iter()
        .filter(|&l| with_scalar || l != CpuLevel::Scalar)
        .filter_map(Kernels::for_level)
        .collect()
}

/// Deterministic pseudo-random bytes (the kernels' speed does not depend on the values).
fn fill_bytes(buf: &mut [u8], mut s: u64) {
    for b in buf.iter_mut() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *b = (s >> 33) as u8;
    }
}

fn q4_weights(rows: usize, k: usize) -> Vec<BlockQ4x8> {
    let n = row_groups(rows) * k / QK;
    let mut v = vec![
        BlockQ4x8 {
            d: [0x2000; 8],
            qs: [0; 128]
        };
        n
    ];
    fill_bytes(bytemuck::cast_slice_mut(&mut v), 1);
    v.iter_mut().for_each(|b| b.d = [0x2000; 8]);
    v
}

/// The same random bytes read as linear 4-bit blocks.
fn q4l_weights(rows: usize, k: usize) -> Vec<BlockQ4Lx8> {
    q4_weights(rows, k)
        .iter()
        .map(|b| BlockQ4Lx8 { d: b.d, qs: b.qs })
        .collect()
}

fn q8_weights(rows: usize, k: usize) -> Vec<BlockQ8x8> {
    let n = row_groups(rows) * k / QK;
    let mut v = vec![
        BlockQ8x8 {
            d: [0x2000; 8],
            qs: [0; 256]
        };
        n
    ];
    fill_bytes(bytemuck::cast_slice_mut(&mut v), 2);
    v.iter_mut().for_each(|b| b.d = [0x2000; 8]);
    v
}

fn q6_weights(rows: usize, k: usize) -> Vec<BlockQ6x8> {
    let n = row_groups(rows) * k / QK;
    let mut v = vec![
        BlockQ6x8 {
            d: [0x2000; 8],
            ql: [0; 128],
            qh: [0; 64]
        };
        n
    ];
    fill_bytes(bytemuck::cast_slice_mut(&mut v), 3);
    v.iter_mut().for_each(|b| b.d = [0x2000; 8]);
    v
}

fn acts(n_tok: usize, k: usize) -> Vec<BlockQ8A> {
    let x: Vec<f32> = (0..n_tok * k)
        .map(|i| ((i * 7919) % 255) as f32 - 127.0)
        .collect();
    let mut a = vec![
        BlockQ8A {
            d: 0.0,
            sum8: 0,
            qs: [0; 32]
        };
        n_tok * k / QK
    ];
    scalar::quantize_q8a(&x, &mut a);
    a
}

/// (name, rows, k): Llama 4 Scout and SmolLM2 shapes. `lm_head` slices: 16384 of 202048 rows
/// (Scout, 47 MB at 4.5 bpw: larger than a 32 MiB L3) and the whole 49152×576 (SmolLM2).
const MATVEC_SHAPES: &[(&str, usize, usize)] = &[
    ("scout_attn_q_5120x5120", 5120, 5120),
    ("scout_attn_kv_1024x5120", 1024, 5120),
    ("scout_ffn_up_8192x5120", 8192, 5120),
    ("scout_ffn_down_5120x8192", 5120, 8192),
    ("scout_lm_head_slice_16384x5120", 16384, 5120),
    ("smol_576x576", 576, 576),
    ("smol_up_1536x576", 1536, 576),
    ("smol_down_576x1536", 576, 1536),
    ("smol_lm_head_49152x576", 49152, 576),
];

fn membw(c: &mut Criterion) {
    let n = 1usize << 30;
    let mut buf = vec![0u64; n / 8];
    // touch every page so the bench measures reads, not page faults
    buf.iter_mut().enumerate().for_each(|(i, v)| *v = i as u64);
    let mut g = c.benchmark_group("membw");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    g.throughput(Throughput::Bytes(n as u64));
    g.bench_function("read_1GiB", |b| {
        b.iter(|| {
            // 8 independent accumulators: the loop is load-bound, not add-bound
            let mut s = [0u64; 8];
            for ch in buf.chunks_exact(8) {
                for i in 0..8 {
                    s[i] = s[i].wrapping_add(ch[i]);
                }
            }
            black_box(s)
        })
    });
    g.finish();
}

/// A 4-bit block type's product at `n_tok` tokens over `shapes`: one token reports the weight
/// bytes streamed per second (scalar only on small shapes), more tokens the int8 multiply-adds
/// × 2 per second.
fn q4_group<B: Q4Block>(
    c: &mut Criterion,
    group: &str,
    shapes: &[(&str, usize, usize)],
    n_tok: usize,
    weights: fn(usize, usize) -> Vec<B>,
    gemm: fn(&Kernels) -> GemmQ4Fn<B>,
) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10)
        .measurement_time(Duration::from_secs(if n_tok == 1 { 1 } else { 2 }))
        .warm_up_time(Duration::from_millis(300));
    for &(name, rows, k) in shapes {
        let w = weights(rows, k);
        let x = acts(n_tok, k);
        let mut y = vec![0.0f32; rows * n_tok];
        g.throughput(if n_tok == 1 {
            Throughput::Bytes(std::mem::size_of_val(&w[..]) as u64)
        } else {
            Throughput::Elements((2 * rows * k * n_tok) as u64)
        });
        for kt in tiers(n_tok == 1 && rows * k <= 1536 * 576) {
            let f = gemm(&kt);
            g.bench_with_input(BenchmarkId::new(kt.level.name(), name), &(), |b, _| {
                b.iter(|| f(black_box(&w), rows, k, &x, n_tok, &mut y, rows))
            });
        }
    }
    g.finish();
}

/// The shapes of the 64-token products.
const GEMM64_SHAPES: &[(&str, usize, usize)] = &[
    ("scout_2048x5120", 2048, 5120),
    ("smol_1536x576", 1536, 576),
];

fn matvec(c: &mut Criterion) {
    q4_group(c, "q4_matvec", MATVEC_SHAPES, 1, q4_weights, |k| {
        k.q.q4x8.gemm
    });
    q4_group(c, "q4l_matvec", MATVEC_SHAPES, 1, q4l_weights, |k| {
        k.q.q4lx8.gemm
    });
    let mut g = c.benchmark_group("q8_matvec");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    for &(name, rows, k) in &MATVEC_SHAPES[..5] {
        let w = q8_weights(rows, k);
        let x = acts(1, k);
        let mut y = vec![0.0f32; rows];
        g.throughput(Throughput::Bytes(std::mem::size_of_val(&w[..]) as u64));
        for kt in tiers(false) {
            g.bench_with_input(BenchmarkId::new(kt.level.name(), name), &(), |b, _| {
                b.iter(|| (kt.q.q8x8.gemm)(black_box(&w), rows, k, &x, 1, &mut y, rows))
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("lm_head_matvec");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    for &(name, rows, k) in &[
        ("smol_576x576", 576usize, 576usize),
        ("smol_lm_head_49152x576", 49152, 576),
        ("scout_lm_head_slice_16384x5120", 16384, 5120),
    ] {
        let (w6, w8) = (q6_weights(rows, k), q8_weights(rows, k));
        let x = acts(1, k);
        let mut y = vec![0.0f32; rows];
        for kt in tiers(false) {
            let lv = kt.level.name();
            g.throughput(Throughput::Bytes(std::mem::size_of_val(&w6[..]) as u64));
            g.bench_with_input(BenchmarkId::new(format!("q6/{lv}"), name), &(), |b, _| {
                b.iter(|| (kt.q.q6x8.gemm)(black_box(&w6), rows, k, &x, 1, &mut y, rows))
            });
            g.throughput(Throughput::Bytes(std::mem::size_of_val(&w8[..]) as u64));
            g.bench_with_input(BenchmarkId::new(format!("q8/{lv}"), name), &(), |b, _| {
                b.iter(|| (kt.q.q8x8.gemm)(black_box(&w8), rows, k, &x, 1, &mut y, rows))
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("f32_matvec");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    for &(name, rows, k) in &[
        ("smol_1536x576", 1536usize, 576usize),
        ("scout_1024x5120", 1024, 5120),
    ] {
        let w: Vec<f32> = (0..rows * k).map(|i| (i % 13) as f32).collect();
        let wb: Vec<u16> = w
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_bits())
            .collect();
        let x = vec![0.5f32; k];
        let mut y = vec![0.0f32; rows];
        for kt in tiers(false) {
            g.throughput(Throughput::Bytes((rows * k * 4) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("f32/{}", kt.level.name()), name),
                &(),
                |b, _| b.iter(|| (kt.gemm_f32)(black_box(&w), rows, k, &x, 1, &mut y, rows)),
            );
            g.throughput(Throughput::Bytes((rows * k * 2) as u64));
            g.bench_with_input(
                BenchmarkId::new(format!("bf16/{}", kt.level.name()), name),
                &(),
                |b, _| b.iter(|| (kt.gemm_bf16)(black_box(&wb), rows, k, &x, 1, &mut y, rows)),
            );
        }
    }
    g.finish();
}

fn gemm64(c: &mut Criterion) {
    q4_group(c, "q4_gemm64", GEMM64_SHAPES, 64, q4_weights, |k| {
        k.q.q4x8.gemm
    });
    q4_group(c, "q4l_gemm64", GEMM64_SHAPES, 64, q4l_weights, |k| {
        k.q.q4lx8.gemm
    });
}

fn moe(c: &mut Criterion) {
    let (hidden, ff) = (512usize, 1024usize);
    let mut g = c.benchmark_group("moe");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(1))
        .warm_up_time(Duration::from_millis(300));
    for &n_exp in &[16usize, 128] {
        let gate: Vec<Vec<BlockQ4x8>> = (0..n_exp).map(|_| q4_weights(ff, hidden)).collect();
        let up: Vec<Vec<BlockQ4x8>> = (0..n_exp).map(|_| q4_weights(ff, hidden)).collect();
        let down: Vec<Vec<BlockQ4x8>> = (0..n_exp).map(|_| q4_weights(hidden, ff)).collect();
        for &n_tok in &[1usize, 512] {
            let x = acts(n_tok, hidden);
            let logits: Vec<f32> = (0..n_tok * n_exp)
                .map(|i| ((i * 2654435761) % 1000) as f32)
                .collect();
            let mut out = vec![0.0f32; n_tok * hidden];
            let (mut idx, mut val) = (vec![0u32; n_tok], vec![0.0f32; n_tok]);
            let (mut cnt, mut off) = (vec![0u32; n_exp], vec![0u32; n_exp + 1]);
            let (mut perm, mut inv) = (vec![0u32; n_tok], vec![0u32; n_tok]);
            let mut h = vec![0.0f32; n_tok * ff];
            let mut hq = vec![
                BlockQ8A {
                    d: 0.0,
                    sum8: 0,
                    qs: [0; 32]
                };
                n_tok * ff / QK
            ];
            let mut o = vec![0.0f32; n_tok * hidden];
            for kt in tiers(false) {
                g.bench_with_input(
                    BenchmarkId::new(kt.level.name(), format!("{n_exp}x{n_tok}")),
                    &(),
                    |b, _| {
                        b.iter(|| {
                            for t in 0..n_tok {
                                (kt.topk)(
                                    &logits[t * n_exp..(t + 1) * n_exp],
                                    1,
                                    &mut idx[t..t + 1],
                                    &mut val[t..t + 1],
                                );
                            }
                            (kt.group_by_expert)(
                                &idx, n_exp, &mut cnt, &mut off, &mut perm, &mut inv,
                            );
                            for e in 0..n_exp {
                                let (s, n) = (off[e] as usize, cnt[e] as usize);
                                if n == 0 {
                                    continue;
                                }
                                let rows = &perm[s..s + n];
                                (kt.q.q4x8.gate_up.unwrap())(
                                    &gate[e], &up[e], ff, hidden, &x, rows, &mut h, ff,
                                );
                                (kt.quantize_q8a)(&h[..n * ff], &mut hq[..n * ff / QK]);
                                (kt.q.q4x8.gemm)(
                                    &down[e],
                                    hidden,
                                    ff,
                                    &hq[..n * ff / QK],
                                    n,
                                    &mut o,
                                    hidden,
                                );
                                scalar::scatter_add(
                                    &o,
                                    hidden,
                                    hidden,
                                    rows,
                                    &val[s..s + n],
                                    &mut out,
                                    hidden,
                                );
                            }
                            black_box(&out);
                        })
                    },
                );
            }
        }
    }
    g.finish();
}

criterion_group!(benches, membw, matvec, gemm64, moe);
criterion_main!(benches);
