//! The inference thread pool: every task runs exactly once, results do not depend on the thread
//! count, misuse is rejected, panics propagate without deadlock, and Drop joins the workers.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::time::Duration;

use ferroq::internals::pool::{measure_read_bandwidth, ThreadPool, MAX_THREADS};

/// Counts heap allocations made by threads that opted in (`COUNT_ALLOCS`), to check that a
/// `run` allocates nothing.
struct CountingAlloc;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNT_ALLOCS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

// SAFETY: forwards to the system allocator unchanged; only bumps a counter.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if COUNT_ALLOCS.with(|c| c.get()) {
            ALLOCS.fetch_add(1, Relaxed);
        }
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn pools() -> Vec<ThreadPool> {
    let mut v: Vec<ThreadPool> = (1..=4).map(ThreadPool::new).collect();
    // Spin 0: threads sleep at once, exercising the park / wake paths.
    v.extend((2..=3).map(|n| ThreadPool::try_new(n, Duration::ZERO).unwrap()));
    v
}

fn check_once(pool: &ThreadPool, n: usize) {
    let hits: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
    let bad_thread = AtomicU32::new(0);
    pool.run(n, &|task, thread| {
        hits[task].fetch_add(1, Relaxed);
        if thread >= pool.n_threads() {
            bad_thread.fetch_add(1, Relaxed);
        }
    });
    assert!(hits.iter().all(|h| h.load(Relaxed) == 1), "n = {n}");
    assert_eq!(bad_thread.load(Relaxed), 0);
}

#[test]
fn every_task_runs_exactly_once() {
    for pool in pools() {
        for n in [0, 1, 2, 3, 4, 7, 64, 1000, 100_000] {
            check_once(&pool, n);
        }
    }
}

/// Every thread that runs a task starts counting its allocations (workers included).
#[test]
fn run_does_not_allocate() {
    for pool in pools() {
        pool.run(8, &|_, _| {}); // warm up (first use of thread locals etc.)
        let mut y = vec![0.0f32; 4 * 64];
        COUNT_ALLOCS.with(|c| c.set(true));
        let before = ALLOCS.load(Relaxed);
        for _ in 0..1000 {
            pool.run(8, &|_, _| COUNT_ALLOCS.with(|c| c.set(true)));
            pool.run_tiles(&mut y, 4, 64, 16, 2, &|mut tile, _| {
                let t = tile.toks().start;
                tile.out(t)[0] = 1.0;
            });
        }
        let n = ALLOCS.load(Relaxed) - before;
        COUNT_ALLOCS.with(|c| c.set(false));
        assert_eq!(n, 0, "{} threads: {n} allocations", pool.n_threads());
    }
}

#[test]
fn many_calls_in_a_row() {
    for pool in pools() {
        let total = AtomicUsize::new(0);
        for i in 0..5000 {
            let n = 1 + i % 9;
            pool.run(n, &|task, _| {
                total.fetch_add(task + 1, Relaxed);
            });
        }
        let expect: usize = (0..5000).map(|i| (1 + i % 9) * (2 + i % 9) / 2).sum();
        assert_eq!(total.load(Relaxed), expect, "{} threads", pool.n_threads());
    }
}

#[test]
fn uneven_tasks_let_the_caller_sleep() {
    for pool in pools() {
        let sum = AtomicUsize::new(0);
        for _ in 0..5 {
            pool.run(8, &|task, _| {
                if task % 3 == 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                sum.fetch_add(1, Relaxed);
            });
        }
        assert_eq!(sum.load(Relaxed), 40);
    }
}

/// y[t][r] = sum_k w[r][k] * x[t][k], row-parallel over tiles: bit-identical for every thread
/// count and tiling.
#[test]
fn tiled_matmul_is_identical_for_any_thread_count() {
    let (rows, cols, n_tok) = (203, 37, 5);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..n_tok * cols)
        .map(|i| ((i * 104729) % 1000) as f32 / 991.0 - 0.5)
        .collect();
    let mut reference: Option<Vec<f32>> = None;
    for pool in pools() {
        for (row_block, tok_block) in [(16, 5), (32, 1), (1, 2), (1000, 1000)] {
            let mut y = vec![f32::NAN; n_tok * rows];
            pool.run_tiles(&mut y, n_tok, rows, row_block, tok_block, &|mut tile, _| {
                for t in tile.toks() {
                    let r0 = tile.rows().start;
                    for (i, o) in tile.out(t).iter_mut().enumerate() {
                        let wr = &w[(r0 + i) * cols..(r0 + i + 1) * cols];
                        let xt = &x[t * cols..(t + 1) * cols];
                        *o = wr.iter().zip(xt).map(|(a, b)| a * b).sum();
                    }
                }
            });
            assert!(y.iter().all(|v| !v.is_nan()), "every element written");
            match &reference {
                None => reference = Some(y),
                Some(r) => assert!(
                    r.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{} threads, tiles {row_block}x{tok_block}",
                    pool.n_threads()
                ),
            }
        }
    }
}

#[test]
fn tile_rejects_foreign_tokens() {
    let pool = ThreadPool::new(2);
    let mut y = vec![0.0f32; 4 * 8];
    let r = catch_unwind(AssertUnwindSafe(|| {
        pool.run_tiles(&mut y, 4, 8, 8, 1, &|mut tile, _| {
            let t = tile.toks().start;
            let _ = tile.out((t + 1) % 4); // another task's token
        })
    }));
    assert!(r.is_err());
    check_once(&pool, 10);
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

#[test]
fn task_panic_propagates_and_pool_survives() {
    for pool in pools() {
        for round in 0..50 {
            let ran = AtomicUsize::new(0);
            let r = catch_unwind(AssertUnwindSafe(|| {
                pool.run(100, &|task, _| {
                    if task == 37 + round % 5 {
                        panic!("task {task} failed");
                    }
                    ran.fetch_add(1, Relaxed);
                })
            }));
            let msg = panic_message(r.expect_err("panic must propagate"));
            assert!(
                msg.starts_with("task ") && msg.ends_with(" failed"),
                "{msg}"
            );
            assert!(ran.load(Relaxed) < 100);
            check_once(&pool, 50);
        }
    }
}

#[test]
fn nested_run_is_rejected() {
    for pool in pools() {
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(4, &|_, _| pool.run(2, &|_, _| {}));
        }));
        let msg = panic_message(r.expect_err("nested run must panic"));
        assert!(msg.contains("nested or concurrent"), "{msg}");
        check_once(&pool, 20);
    }
}

#[test]
fn concurrent_run_from_another_thread_is_rejected() {
    let pool = ThreadPool::new(2);
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let (tried_tx, tried_rx) = mpsc::channel::<bool>();
    let started_tx = std::sync::Mutex::new(started_tx);
    let tried_rx = std::sync::Mutex::new(tried_rx);
    std::thread::scope(|sc| {
        sc.spawn(|| {
            pool.run(1, &|_, _| {
                started_tx.lock().unwrap().send(()).unwrap();
                // Stay inside the job until the other thread has tried.
                assert!(tried_rx.lock().unwrap().recv().unwrap());
            });
        });
        started_rx.recv().unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(2, &|_, _| {})));
        tried_tx.send(r.is_err()).unwrap();
    });
    check_once(&pool, 10);
}

#[test]
fn drop_joins_workers() {
    for i in 0..50 {
        let spin = if i % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::from_micros(50)
        };
        let pool = ThreadPool::try_new(1 + i % 4, spin).unwrap();
        if i % 3 != 0 {
            check_once(&pool, 5);
        }
        drop(pool);
    }
    assert!(ThreadPool::new(0).n_threads() >= 1);
}

#[test]
fn bandwidth_probe_returns_a_rate() {
    // Small buffer: only checks that it runs and returns something finite and positive.
    let gbs = measure_read_bandwidth(4 << 20, 2).unwrap();
    assert!(gbs.is_finite() && gbs > 0.0, "{gbs}");
    // a buffer beyond the machine is a named error, not an abort
    for bytes in [usize::MAX, usize::MAX / 2, 1 << 60] {
        let e = measure_read_bandwidth(bytes, 2).unwrap_err();
        assert!(e.to_string().contains("bw-bytes"), "{e}");
    }
}

/// Not a check: prints the machine's read bandwidth (what `ferroq bench` will report).
/// `cargo test -j2 --test pool -- --ignored --nocapture read_bandwidth_report`
#[test]
#[ignore]
fn read_bandwidth_report() {
    for threads in [1, 2] {
        let gbs = measure_read_bandwidth(1 << 30, threads).unwrap();
        println!("read bandwidth, 1 GiB, {threads} thread(s): {gbs:.1} GB/s");
    }
}

/// `run_rows` hands every whole row to exactly one task, as the slice of its row range, for any
/// rows-per-task (dividing or not); elements past the last whole row are left alone.
#[test]
fn run_rows_covers_each_row_once() {
    let (row_len, n_rows) = (5, 23);
    for pool in pools() {
        for rows_per_task in [1, 3, 7, 23, 100] {
            let mut data = vec![0u32; n_rows * row_len + 2];
            pool.run_rows(&mut data, row_len, rows_per_task, &|r, part| {
                assert_eq!(part.len(), r.len() * row_len);
                assert!(r.len() <= rows_per_task && r.start % rows_per_task == 0);
                for (t, row) in r.zip(part.chunks_exact_mut(row_len)) {
                    row.iter_mut().for_each(|v| *v += t as u32 + 1);
                }
            });
            for t in 0..n_rows {
                let row = &data[t * row_len..(t + 1) * row_len];
                assert!(
                    row.iter().all(|&v| v == t as u32 + 1),
                    "row {t}, {rows_per_task}"
                );
            }
            assert_eq!(&data[n_rows * row_len..], &[0, 0]);
        }
    }
}

/// An absurd thread count is a named error from `try_new` (it used to spawn threads until the
/// OS ran out of memory for their stacks, and panic); `new` caps it.
#[test]
fn absurd_thread_counts_are_errors_or_capped() {
    let e = ThreadPool::try_new(100_000, Duration::ZERO)
        .err()
        .expect("100000 threads must be refused");
    assert!(e.to_string().contains("threads"), "{e}");
    assert!(ThreadPool::try_new(MAX_THREADS + 1, Duration::ZERO).is_err());
    assert!(ferroq::internals::pool::check_threads(MAX_THREADS).is_ok());
    assert!(ferroq::internals::pool::check_threads(0).is_ok());
    let p = ThreadPool::new(MAX_THREADS + 10);
    assert_eq!(p.n_threads(), MAX_THREADS);
    check_once(&p, 2 * MAX_THREADS + 3);
}
