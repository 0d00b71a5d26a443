//! Criterion benches of the runtime pieces around the kernels:
//!
//! * `pool/round/<threads>x<tasks>`: one `ThreadPool::run` round of empty tasks (the per-op
//!   scheduling overhead a decode step pays ~5 times per layer).
//! * `attention/<kv>/d<D>/ctx<N>`: one query head against `N` cached keys and values (scores,
//!   online-softmax exponentials, weighted value sum), the inner loop of flash attention.
//! * `attention_block/f16/d<D>/ctx<N>`: the prefill form, 48 query rows (16 tokens × 3 heads of
//!   a GQA group) against `N` keys: per 64-key tile the K tile transposed and the V tile
//!   converted to f32 once, scores of all rows, one softmax step per row, value sums of all rows
//!   (throughput in query-key pairs).
//!
//! The MoE routing path (top-k, grouping, gather gate/up, scatter-add) is in `benches/kernels.rs`
//! (`moe/...`). Run: `cargo bench -j2 --bench speed`.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferroq::internals::kernels::Kernels;
use ferroq::internals::pool::ThreadPool;
use std::hint::black_box;

fn pool(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    for threads in [1usize, 2] {
        let p = ThreadPool::new(threads);
        for tasks in [2usize, 8, 64] {
            g.bench_function(
                BenchmarkId::new("round", format!("{threads}x{tasks}")),
                |b| {
                    b.iter(|| {
                        p.run(tasks, &|t, _| {
                            black_box(t);
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

fn attention(c: &mut Criterion) {
    let k = Kernels::detect();
    let mut g = c.benchmark_group("attention");
    for d in [64usize, 128] {
        for ctx in [128usize, 512, 2048] {
            let ld = 3 * d; // three KV heads interleaved, as in the cache
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.37).sin()).collect();
            let kv: Vec<f32> = (0..ctx * ld).map(|i| (i as f32 * 0.11).cos()).collect();
            let kvh: Vec<u16> = kv
                .iter()
                .map(|&x| half::f16::from_f32(x).to_bits())
                .collect();
            let mut s = vec![0.0f32; 64];
            let mut o = vec![0.0f32; d];
            g.throughput(Throughput::Elements(ctx as u64));
            g.bench_function(BenchmarkId::new(format!("f32/d{d}"), ctx), |b| {
                b.iter(|| {
                    for j0 in (0..ctx).step_by(64) {
                        (k.attn_scores)(&q, &kv[j0 * ld..], ld, 0.125, &mut s);
                        (k.softmax_tile)(&mut s, 0.0);
                        (k.attn_values)(&s, &kv[j0 * ld..], ld, &mut o);
                    }
                    black_box(&o);
                })
            });
            g.bench_function(BenchmarkId::new(format!("f16/d{d}"), ctx), |b| {
                b.iter(|| {
                    for j0 in (0..ctx).step_by(64) {
                        (k.attn_scores_f16)(&q, &kvh[j0 * ld..], ld, 0.125, &mut s);
                        (k.softmax_tile)(&mut s, 0.0);
                        (k.attn_values_f16)(&s, &kvh[j0 * ld..], ld, &mut o);
                    }
                    black_box(&o);
                })
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("attention_block");
    let rows = 48usize;
    for d in [64usize, 128] {
        for ctx in [128usize, 512, 2048] {
            let ld = 3 * d;
            let q: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.37).sin()).collect();
            let kvh: Vec<u16> = (0..ctx * ld)
                .map(|i| half::f16::from_f32((i as f32 * 0.11).cos()).to_bits())
                .collect();
            let (mut kt, mut vf) = (vec![0.0f32; 64 * d], vec![0.0f32; 64 * d]);
            let mut s = vec![0.0f32; rows * 64];
            let mut o = vec![0.0f32; rows * d];
            g.throughput(Throughput::Elements((ctx * rows) as u64));
            g.bench_function(BenchmarkId::new(format!("f16/d{d}"), ctx), |b| {
                b.iter(|| {
                    for j0 in (0..ctx).step_by(64) {
                        let nk = (ctx - j0).min(64);
                        (k.kv_transpose_f16)(&kvh[j0 * ld..], ld, d, nk, &mut kt);
                        (k.kv_rows_f16)(&kvh[j0 * ld..], ld, d, nk, &mut vf);
                        let s = &mut s[..rows * nk];
                        (k.attn_scores_kt)(&q, &kt[..d * nk], d, nk, 0.125, s);
                        for sr in s.chunks_exact_mut(nk) {
                            (k.softmax_tile)(sr, 0.0);
                        }
                        (k.attn_values_rows)(s, nk, &vf, d, d, &mut o);
                    }
                    black_box(&o);
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, pool, attention);
criterion_main!(benches);
