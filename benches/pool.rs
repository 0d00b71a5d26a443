//! Thread pool benches: per-call overhead of an empty parallel-for (ferroq pool vs rayon) and a
//! parallel memory read showing bandwidth scaling with threads.
//!
//! `cargo bench -j2 --bench pool`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferroq::internals::pool::ThreadPool;
use rayon::prelude::*;

fn empty_run(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_empty_run");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads);
        let rp = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for tasks in [2usize, 16] {
            let id = format!("{threads}t_{tasks}tasks");
            g.bench_function(BenchmarkId::new("ferroq", &id), |b| {
                b.iter(|| {
                    pool.run(tasks, &|t, _| {
                        black_box(t);
                    })
                })
            });
            g.bench_function(BenchmarkId::new("rayon_par_iter", &id), |b| {
                // Measured from inside the rayon pool (its best case: no injection).
                rp.install(|| {
                    b.iter(|| {
                        (0..tasks).into_par_iter().for_each(|t| {
                            black_box(t);
                        })
                    })
                })
            });
        }
    }
    g.finish();
}

/// About `iters * 4` cycles of dependent float work.
fn spin_work(iters: usize) -> f32 {
    let mut x = black_box(1.0f32);
    for _ in 0..iters {
        x = x * 1.000_000_1 + 1e-7;
    }
    x
}

/// Decode-sized work: 10 µs-ish of compute split into 2 or 8 tasks. Shows whether a second
/// thread pays off at this granularity (ideal: half the 1-thread time).
fn small_work(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool_work_6000iters");
    g.sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    const TOTAL: usize = 6000;
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads);
        let rp = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        for tasks in [2usize, 8] {
            let id = format!("{threads}t_{tasks}tasks");
            g.bench_function(BenchmarkId::new("ferroq", &id), |b| {
                b.iter(|| {
                    pool.run(tasks, &|_, _| {
                        black_box(spin_work(TOTAL / tasks));
                    })
                })
            });
            g.bench_function(BenchmarkId::new("rayon_par_iter", &id), |b| {
                rp.install(|| {
                    b.iter(|| {
                        (0..tasks).into_par_iter().for_each(|_| {
                            black_box(spin_work(TOTAL / tasks));
                        })
                    })
                })
            });
        }
    }
    g.finish();
}

fn sum_u64(x: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] = acc[j].wrapping_add(c[j]);
        }
    }
    acc.iter()
        .chain(it.remainder())
        .fold(0, |a, &b| a.wrapping_add(b))
}

fn parallel_read(c: &mut Criterion) {
    const BYTES: usize = 256 << 20;
    const CHUNK: usize = 1 << 18; // u64s per task (2 MiB)
    let n = BYTES / 8;
    let buf: Vec<u64> = (0..n as u64).collect(); // touched: no shared zero pages
    let mut g = c.benchmark_group("pool_read_256MiB");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Bytes(BYTES as u64));
    for threads in [1, 2] {
        let pool = ThreadPool::new(threads);
        g.bench_function(BenchmarkId::new("ferroq", threads), |b| {
            let sink = AtomicU64::new(0);
            b.iter(|| {
                pool.run(n.div_ceil(CHUNK), &|k, _| {
                    let part = &buf[k * CHUNK..((k + 1) * CHUNK).min(n)];
                    sink.fetch_xor(sum_u64(part), Relaxed);
                })
            });
            black_box(sink.load(Relaxed));
        });
    }
    g.finish();
}

criterion_group!(benches, empty_run, small_work, parallel_read);
criterion_main!(benches);
