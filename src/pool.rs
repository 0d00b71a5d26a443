//! A thread pool made for inference: persistent workers, a parallel-for whose caller takes part,
//! spin-then-park waiting, and no allocation or thread spawn per call.
//!
//! ```
//! use ferroq::internals::pool::ThreadPool;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! let pool = ThreadPool::new(2);
//! let sum = AtomicUsize::new(0);
//! pool.run(100, &|task, _thread| {
//!     sum.fetch_add(task, Ordering::Relaxed);
//! });
//! assert_eq!(sum.into_inner(), 4950);
//! ```
//!
//! # How a call runs
//! [`ThreadPool::run`] publishes the job (a pointer to the caller's closure and the task count)
//! under a new epoch in one 64-bit `ticket` word (`epoch << 24 | next task`). Workers, spinning
//! or parked, see the new epoch and claim task indices with a compare-and-swap on the ticket;
//! the calling thread claims tasks the same way, so a job whose workers are still asleep is
//! simply finished by the caller. Each task index runs exactly once. The caller then waits (spin,
//! then sleep on a condition variable) until all claimed tasks have finished, and closes the
//! epoch so that a late worker can never claim a task of a finished job. Waiting threads spin
//! (a few µs of `pause`, then `yield_now`, which matters on an oversubscribed machine) for up
//! to [`DEFAULT_SPIN`] after their last job (ops of one token follow each other within
//! microseconds), then park on a condition variable; waking parked workers costs one futex
//! call. Everything shared lives in a few cache-line-padded words allocated once in `new`.
//!
//! # Choosing `n_tasks`
//! A task claimed by a thread that then gets descheduled delays the whole call, so prefer a few
//! tasks per thread (e.g. 4 × `n_threads()` row blocks of a decode matmul, each a few µs of
//! work) over exactly one per thread; tiny jobs (< ~1 µs of total work) are faster inline.
//!
//! # Determinism
//! The pool decides only *which thread* runs a task, never *what* a task computes: every task
//! index in `0..n_tasks` runs exactly once. Results are therefore bit-identical whatever the
//! number of threads **provided that** the caller's decomposition into tasks does not depend on
//! the thread count, and each output element is computed by one task in a fixed order (no
//! cross-task reductions whose order depends on scheduling). The `thread` argument is meant for
//! per-thread scratch buffers only; results must not depend on it.
//!
//! # Misuse
//! `run` is not reentrant: calling `run` (or [`ThreadPool::run_tiles`]) on a pool from inside
//! one of its own tasks, or from two threads at once, panics with a message (the panic of a task
//! propagates to the outer caller like any other task panic). A panic in a task is caught, the
//! remaining unclaimed tasks are skipped, all threads finish, and the first panic is resumed
//! on the calling thread; the pool stays usable.

use std::any::Any;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The closure type a job runs: `f(task, thread)`.
pub type TaskFn<'a> = dyn Fn(usize, usize) + Sync + 'a;

const IDX_BITS: u32 = 24;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
/// Largest task count of one internal round (larger jobs are run in several rounds).
const ROUND: usize = (IDX_MASK - 1) as usize;
/// How long an idle worker (or a waiting caller) spins before sleeping.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(100);

/// Keeps a value on its own cache lines (128 bytes: adjacent-line prefetch pairs lines).
#[repr(align(128))]
struct Pad<T>(T);

impl<T> std::ops::Deref for Pad<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// What a job is: written by the caller, then read and claimed by all threads. One cache line,
/// so publishing a job moves a single line to each worker.
struct JobLine {
    /// `epoch << IDX_BITS | next task index`. Index `IDX_MASK` = epoch closed.
    ticket: AtomicU64,
    /// Points at a `&TaskFn` on the caller's stack; valid while the current epoch is open and
    /// has unfinished tasks.
    job: AtomicPtr<()>,
    n_tasks: AtomicUsize,
}

struct Shared {
    j: Pad<JobLine>,
    /// Tasks of the current job that have finished (or were skipped after a panic).
    done: Pad<AtomicUsize>,
    /// A `run` is in progress (reentrancy and concurrent-use guard). Caller-only line.
    busy: Pad<AtomicBool>,
    // Read-mostly below.
    panicked: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    shutdown: AtomicBool,
    /// Workers parked (or about to park) on `wake_cv`.
    sleepers: AtomicUsize,
    wake_lock: Mutex<()>,
    wake_cv: Condvar,
    /// The caller sleeps on `done_cv`.
    caller_waiting: AtomicBool,
    done_lock: Mutex<()>,
    done_cv: Condvar,
    spin: Duration,
}

fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Claim and run tasks of `epoch` until none are left; returns how many this thread ran.
    fn work(&self, epoch: u64, thread: usize) -> usize {
        let job = self.j.job.load(Acquire);
        let n = self.j.n_tasks.load(Acquire) as u64;
        let mut cur = self.j.ticket.load(Acquire);
        let mut ran = 0;
        while cur >> IDX_BITS == epoch && (cur & IDX_MASK) < n {
            match self
                .j
                .ticket
                .compare_exchange_weak(cur, cur + 1, AcqRel, Acquire)
            {
                Ok(_) => {
                    // SAFETY: the CAS succeeded on an open epoch with task `cur & IDX_MASK`
                    // unclaimed, so the caller of `run` is still inside `run` (it waits for
                    // this task to finish) and `job`, read after observing this epoch and before
                    // the caller could publish another one (the epoch is closed before `job` is
                    // rewritten), points at its live `&TaskFn`.
                    let f: &TaskFn<'_> = unsafe { *(job as *const &TaskFn<'_>) };
                    self.run_task(f, (cur & IDX_MASK) as usize, thread);
                    ran += 1;
                    cur = self.j.ticket.load(Acquire);
                }
                Err(now) => cur = now,
            }
        }
        ran
    }

    fn run_task(&self, f: &TaskFn<'_>, task: usize, thread: usize) {
        if self.panicked.load(Relaxed) {
            return; // a task panicked: skip the rest, the caller will resume the panic
        }
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(task, thread))) {
            self.panicked.store(true, Release);
            let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
            if slot.is_none() {
                *slot = Some(p);
            }
        }
    }

    /// Add `ran` finished tasks; wake the caller if that completed the job.
    fn finish(&self, ran: usize) {
        if ran == 0 {
            return;
        }
        let n = self.j.n_tasks.load(Acquire);
        if self.done.fetch_add(ran, SeqCst) + ran == n && self.caller_waiting.load(SeqCst) {
            let _g = lock(&self.done_lock);
            self.done_cv.notify_all();
        }
    }

    /// Worker: wait for an epoch other than `seen`; `None` on shutdown.
    fn wait_job(&self, seen: u64) -> Option<u64> {
        let mut backoff = Backoff::new(self.spin);
        loop {
            let e = self.j.ticket.load(Acquire) >> IDX_BITS;
            if e != seen {
                return Some(e);
            }
            if self.shutdown.load(Relaxed) {
                return None;
            }
            if !backoff.snooze() {
                break;
            }
        }
        let mut g = lock(&self.wake_lock);
        self.sleepers.fetch_add(1, SeqCst);
        let r = loop {
            let e = self.j.ticket.load(SeqCst) >> IDX_BITS;
            if e != seen {
                break Some(e);
            }
            if self.shutdown.load(SeqCst) {
                break None;
            }
            g = self.wake_cv.wait(g).unwrap_or_else(PoisonError::into_inner);
        };
        self.sleepers.fetch_sub(1, SeqCst);
        r
    }

    /// Caller: wait until `n` tasks are done.
    fn wait_done(&self, n: usize) {
        let mut backoff = Backoff::new(self.spin);
        while self.done.load(Acquire) != n {
            if !backoff.snooze() {
                let mut g = lock(&self.done_lock);
                self.caller_waiting.store(true, SeqCst);
                while self.done.load(SeqCst) != n {
                    g = self.done_cv.wait(g).unwrap_or_else(PoisonError::into_inner);
                }
                self.caller_waiting.store(false, SeqCst);
                return;
            }
        }
    }
}

/// Busy-wait policy: pure spinning first (a few µs: the other thread is running and about to
/// answer), then spinning with `yield_now` (on an oversubscribed machine the thread we wait for
/// may be waiting for our core), until `limit` has passed; then the caller sleeps.
struct Backoff {
    start: Instant,
    limit: Duration,
    spins: u32,
}

/// Pure spin iterations before yielding (about 2-5 µs).
const PURE_SPINS: u32 = 2048;

impl Backoff {
    fn new(limit: Duration) -> Backoff {
        Backoff {
            start: Instant::now(),
            limit,
            spins: 0,
        }
    }

    /// Wait a little; `false` once the spin time is over (time to sleep).
    #[inline]
    fn snooze(&mut self) -> bool {
        self.spins = self.spins.wrapping_add(1);
        if self.spins < PURE_SPINS {
            std::hint::spin_loop();
            !self.spins.is_multiple_of(256) || self.start.elapsed() <= self.limit
        } else {
            std::thread::yield_now();
            self.start.elapsed() <= self.limit
        }
    }
}

fn worker(s: Arc<Shared>, thread: usize) {
    let mut seen = s.j.ticket.load(Acquire) >> IDX_BITS;
    while let Some(epoch) = s.wait_job(seen) {
        seen = epoch;
        let ran = s.work(epoch, thread);
        s.finish(ran);
    }
}

/// Resets the busy flag when `run` returns or unwinds.
struct Busy<'a>(&'a AtomicBool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.store(false, Release);
    }
}

/// Most threads a pool, a session or a CLI command accepts (llama.cpp's limit too). Far more
/// threads than cores only slow inference down, and an absurd count (`-t 100000`) would exhaust
/// the process's memory for thread stacks.
pub const MAX_THREADS: usize = 512;

/// `Ok` for a thread count a pool accepts (`0` = all cores, else at most [`MAX_THREADS`]); the
/// error names the `threads` setting.
pub fn check_threads(n_threads: usize) -> crate::Result<()> {
    if n_threads > MAX_THREADS {
        return Err(crate::Error::config(
            "threads",
            format!("{n_threads} threads requested; at most {MAX_THREADS}"),
        ));
    }
    Ok(())
}

/// A pool of `n_threads - 1` persistent workers plus the calling thread. See the module docs.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
}

impl ThreadPool {
    /// A pool running jobs on `n_threads` threads (the caller plus `n_threads - 1` workers).
    /// `0` means the machine's available parallelism; more than [`MAX_THREADS`] are capped to
    /// it. Panics if the OS refuses to start threads (see [`ThreadPool::try_new`], which reports
    /// both as errors).
    pub fn new(n_threads: usize) -> ThreadPool {
        Self::try_new(n_threads.min(MAX_THREADS), DEFAULT_SPIN)
            .expect("ferroq: cannot start pool threads")
    }

    /// Like [`ThreadPool::new`] with a chosen spin time (how long idle threads busy-wait before
    /// sleeping; `Duration::ZERO` sleeps at once), reporting thread start failures.
    pub fn try_new(n_threads: usize, spin: Duration) -> crate::Result<ThreadPool> {
        check_threads(n_threads)?;
        let n_threads = if n_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n_threads
        };
        let shared = Arc::new(Shared {
            j: Pad(JobLine {
                ticket: AtomicU64::new(IDX_MASK), // epoch 0, closed
                job: AtomicPtr::new(std::ptr::null_mut()),
                n_tasks: AtomicUsize::new(0),
            }),
            done: Pad(AtomicUsize::new(0)),
            busy: Pad(AtomicBool::new(false)),
            panicked: AtomicBool::new(false),
            panic: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            wake_lock: Mutex::new(()),
            wake_cv: Condvar::new(),
            caller_waiting: AtomicBool::new(false),
            done_lock: Mutex::new(()),
            done_cv: Condvar::new(),
            spin,
        });
        let mut pool = ThreadPool {
            shared,
            workers: Vec::with_capacity(n_threads - 1),
            n_threads,
        };
        for t in 1..n_threads {
            let s = Arc::clone(&pool.shared);
            let h = std::thread::Builder::new()
                .name(format!("ferroq-pool-{t}"))
                .spawn(move || worker(s, t))
                .map_err(|e| crate::Error::Other(format!("starting pool thread {t}: {e}")))?;
            pool.workers.push(h); // on error, Drop joins the ones already started
        }
        Ok(pool)
    }

    /// Number of threads jobs run on (including the caller); `thread` arguments are below it.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Parallel for: calls `f(task, thread)` exactly once for every `task` in `0..n_tasks`,
    /// spread over the pool's threads (`thread` in `0..n_threads()`, 0 = the caller), and
    /// returns when all calls have returned. Panics if called from inside a task of this pool
    /// or concurrently from another thread; resumes the first panic of a task.
    pub fn run(&self, n_tasks: usize, f: &TaskFn<'_>) {
        let s = &*self.shared;
        if s.busy.swap(true, Acquire) {
            panic!("ThreadPool::run called while the pool is running (nested or concurrent use)");
        }
        let _busy = Busy(&s.busy);
        if self.n_threads == 1 || n_tasks <= 1 {
            for i in 0..n_tasks {
                f(i, 0);
            }
            return;
        }
        let mut base = 0;
        while base < n_tasks {
            let n = (n_tasks - base).min(ROUND);
            if base == 0 && n == n_tasks {
                self.round(n, f);
            } else {
                self.round(n, &|i, t| f(base + i, t));
            }
            base += n;
        }
    }

    fn round(&self, n: usize, f: &TaskFn<'_>) {
        let s = &*self.shared;
        let fref: &TaskFn<'_> = f;
        // 40-bit epoch, wrapping (a worker would have to stall for 2^40 jobs to be confused).
        let epoch = ((s.j.ticket.load(Relaxed) >> IDX_BITS) + 1) & (u64::MAX >> IDX_BITS);
        // Release: a worker that reads these new values also sees the previous epoch closed.
        s.j.job
            .store(&fref as *const &TaskFn<'_> as *mut (), Release);
        s.j.n_tasks.store(n, Release);
        s.done.store(0, Relaxed);
        if s.panicked.load(Relaxed) {
            s.panicked.store(false, Relaxed); // written only after a panic: read-mostly line
        }
        // Publish (SeqCst: pairs with the `sleepers` check below and the workers' park path).
        s.j.ticket.store(epoch << IDX_BITS, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _g = lock(&s.wake_lock);
            s.wake_cv.notify_all();
        }
        let ran = s.work(epoch, 0);
        s.finish(ran);
        s.wait_done(n);
        // Close the epoch before `job`/`n_tasks` can be rewritten: a late worker's CAS on this
        // epoch now fails.
        s.j.ticket.store(epoch << IDX_BITS | IDX_MASK, SeqCst);
        if s.panicked.load(Acquire) {
            let p = s
                .panic
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(p) = p {
                resume_unwind(p);
            }
        }
    }

    /// Tiled parallel for over an output matrix `y` of `n_tok` tokens × `ld` features
    /// (token-major, element `y[t * ld + r]`), for row-parallel matrix products.
    ///
    /// Features `0..ld` are cut into blocks of `row_block`, tokens into blocks of `tok_block`;
    /// each task gets one [`Tile`] (feature block × token block) to itself, so tasks write
    /// disjoint elements by construction. Tasks are numbered feature-block-major (the tiles of
    /// one weight-row block are consecutive). Tiling depends only on the arguments, not on the
    /// thread count. Pick `row_block` as a multiple of 16 to avoid false sharing of cache lines.
    /// Panics if `y.len() < n_tok * ld` or a block size is 0.
    pub fn run_tiles(
        &self,
        y: &mut [f32],
        n_tok: usize,
        ld: usize,
        row_block: usize,
        tok_block: usize,
        f: &(dyn Fn(Tile<'_>, usize) + Sync),
    ) {
        assert!(
            row_block > 0 && tok_block > 0,
            "run_tiles: block sizes must be > 0"
        );
        let out = SharedOut::new(y, n_tok, ld);
        let n_rb = ld.div_ceil(row_block);
        let n_tb = n_tok.div_ceil(tok_block);
        self.run(n_rb * n_tb, &|k, thread| {
            let (rb, tb) = (k / n_tb, k % n_tb);
            let rows = rb * row_block..((rb + 1) * row_block).min(ld);
            let toks = tb * tok_block..((tb + 1) * tok_block).min(n_tok);
            // SAFETY: `run` calls each task index exactly once and returns only after all
            // calls returned; distinct `k` give disjoint (rows × toks) tiles because the blocks
            // partition `0..ld` and `0..n_tok`. The tile cannot outlive the call of `f`.
            let tile = unsafe { out.tile(rows, toks) };
            f(tile, thread)
        });
    }

    /// Parallel for over the rows of `data` (`row_len` elements each; the row count is
    /// `data.len() / row_len`): task `k` gets rows `k * rows_per_task ..` (clipped) as one
    /// contiguous slice, with their row range. For per-row steps (norms, activation
    /// quantization, residual adds) whose result does not depend on how rows are grouped.
    /// Panics if `row_len` or `rows_per_task` is 0.
    pub fn run_rows<T: Send>(
        &self,
        data: &mut [T],
        row_len: usize,
        rows_per_task: usize,
        f: &(dyn Fn(Range<usize>, &mut [T]) + Sync),
    ) {
        assert!(
            row_len > 0 && rows_per_task > 0,
            "run_rows: sizes must be > 0"
        );
        let n_rows = data.len() / row_len;
        let base = RowsPtr(data.as_mut_ptr());
        self.run(n_rows.div_ceil(rows_per_task), &|k, _| {
            let rows = k * rows_per_task..((k + 1) * rows_per_task).min(n_rows);
            let base = &base; // the Sync wrapper, not its (non-Sync) pointer field
                              // SAFETY: `run` calls each task index exactly once and returns only after all calls
                              // returned; distinct `k` give disjoint row ranges inside `data[..n_rows * row_len]`,
                              // which stays exclusively borrowed by this call, so the slices never overlap and
                              // never outlive the borrow.
            let part = unsafe {
                std::slice::from_raw_parts_mut(
                    base.0.add(rows.start * row_len),
                    rows.len() * row_len,
                )
            };
            f(rows, part)
        });
    }
}

/// The base pointer of [`ThreadPool::run_rows`]' buffer, shared by its tasks.
struct RowsPtr<T>(*mut T);
// SAFETY: only used by `run_rows`, whose tasks turn it into disjoint slices of a buffer of
// `T: Send` that the call borrows exclusively (sending the parts to other threads is sound).
unsafe impl<T: Send> Sync for RowsPtr<T> {}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        {
            let _g = lock(&self.shared.wake_lock);
            self.shared.wake_cv.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// An output matrix of `n_tok × ld` f32 (token-major, `y[t * ld + r]`) shared by the tasks of
/// one parallel call, each task writing its own disjoint [`Tile`]. [`ThreadPool::run_tiles`] is
/// the safe way to use it; [`SharedOut::tile`] is the small unsafe core.
pub struct SharedOut<'a> {
    ptr: *mut f32,
    n_tok: usize,
    ld: usize,
    _borrow: PhantomData<&'a mut [f32]>,
}

// SAFETY: `SharedOut` is an exclusive borrow of an f32 slice; threads only reach its elements
// through `tile`, whose contract makes concurrent tiles disjoint. f32 is Send.
unsafe impl Send for SharedOut<'_> {}
// SAFETY: as above: shared use only hands out disjoint tiles.
unsafe impl Sync for SharedOut<'_> {}

impl<'a> SharedOut<'a> {
    /// Borrow `y` (at least `n_tok * ld` elements) for the duration of a parallel call.
    pub fn new(y: &'a mut [f32], n_tok: usize, ld: usize) -> SharedOut<'a> {
        let need = n_tok
            .checked_mul(ld)
            .expect("SharedOut: n_tok * ld overflows");
        assert!(
            y.len() >= need,
            "SharedOut: buffer of {} < {n_tok} x {ld}",
            y.len()
        );
        SharedOut {
            ptr: y.as_mut_ptr(),
            n_tok,
            ld,
            _borrow: PhantomData,
        }
    }

    /// The tile of features `rows` × tokens `toks` (bounds are checked; panics if out of range).
    ///
    /// # Safety
    /// While the returned tile lives, no other live tile of this `SharedOut` may overlap it
    /// (same token and same feature).
    pub unsafe fn tile(&self, rows: Range<usize>, toks: Range<usize>) -> Tile<'_> {
        assert!(
            rows.start <= rows.end && rows.end <= self.ld,
            "tile rows out of range"
        );
        assert!(
            toks.start <= toks.end && toks.end <= self.n_tok,
            "tile tokens out of range"
        );
        Tile {
            ptr: self.ptr,
            ld: self.ld,
            rows,
            toks,
            _borrow: PhantomData,
        }
    }
}

/// One task's part of a [`SharedOut`]: features `rows()` of tokens `toks()`.
pub struct Tile<'s> {
    ptr: *mut f32,
    ld: usize,
    rows: Range<usize>,
    toks: Range<usize>,
    _borrow: PhantomData<&'s mut [f32]>,
}

impl Tile<'_> {
    /// The output features (weight rows) this tile covers.
    pub fn rows(&self) -> Range<usize> {
        self.rows.clone()
    }

    /// The tokens this tile covers.
    pub fn toks(&self) -> Range<usize> {
        self.toks.clone()
    }

    /// Token `t`'s outputs for this tile's features: `y[t * ld + rows.start .. t * ld +
    /// rows.end]`. Panics if `t` is not in `toks()`.
    pub fn out(&mut self, t: usize) -> &mut [f32] {
        assert!(
            self.toks.contains(&t),
            "token {t} not in tile {:?}",
            self.toks
        );
        let start = t * self.ld + self.rows.start;
        // SAFETY: `t < n_tok` and `rows.end <= ld` were checked, so the range lies inside the
        // borrowed buffer; the tile owns these elements exclusively (`SharedOut::tile`
        // contract), and `&mut self` prevents two live slices from one tile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), self.rows.len()) }
    }
}

/// Measure the machine's memory read bandwidth in GB/s (1e9 bytes/s): `threads` threads of a
/// [`ThreadPool`] sum a buffer of `bytes` bytes (choose it much larger than the caches, e.g.
/// 1 GiB), best of 5 passes after a warm-up pass. Allocates and touches the buffer first.
/// A buffer larger than half the memory the OS reports available (`MemAvailable`, where known)
/// or one the allocator refuses is an error naming `bw-bytes`, as is a bad thread count.
pub fn measure_read_bandwidth(bytes: usize, threads: usize) -> crate::Result<f64> {
    check_bandwidth_buffer(bytes)?;
    let n = (bytes / 8).max(1 << 16);
    let too_big = |why: String| crate::Error::config("bw-bytes", format!("{bytes} bytes: {why}"));
    let mut buf: Vec<u64> = Vec::new();
    buf.try_reserve_exact(n)
        .map_err(|e| too_big(format!("cannot allocate ({e})")))?;
    // touch every page: zero pages would all map to one cached page
    buf.extend((0..n).map(|i| i as u64));
    let pool = ThreadPool::try_new(threads.max(1), DEFAULT_SPIN)?;
    let chunk = 1 << 18; // 2 MiB per task
    let n_tasks = n.div_ceil(chunk);
    let sink = AtomicU64::new(0);
    let mut best = f64::INFINITY;
    for pass in 0..6 {
        let t0 = Instant::now();
        pool.run(n_tasks, &|k, _| {
            let part = &buf[k * chunk..((k + 1) * chunk).min(n)];
            sink.fetch_xor(sum_u64(part), Relaxed);
        });
        let dt = t0.elapsed().as_secs_f64();
        if pass > 0 {
            best = best.min(dt);
        }
    }
    std::hint::black_box(sink.load(Relaxed));
    Ok((n * 8) as f64 / best / 1e9)
}

/// `Ok` if [`measure_read_bandwidth`] may allocate `bytes`: at most half the memory the OS
/// reports available (where it does), so a typo cannot swap the machine out. Lets a front end
/// refuse the setting before running anything.
pub fn check_bandwidth_buffer(bytes: usize) -> crate::Result<()> {
    if let Some(avail) = mem_available() {
        if (bytes as u64).max(8 << 16) > avail / 2 {
            return Err(crate::Error::config(
                "bw-bytes",
                format!(
                    "{bytes} bytes: more than half the available memory ({} MiB)",
                    avail >> 20
                ),
            ));
        }
    }
    Ok(())
}

/// The bandwidth probe's default buffer: 512 MiB (far beyond any cache), or a quarter of the
/// available memory on a small machine.
pub fn default_bandwidth_buffer() -> usize {
    let want: u64 = 512 << 20;
    mem_available().map_or(want, |avail| want.min(avail / 4)) as usize
}

/// `MemAvailable` of /proc/meminfo in bytes (Linux); `None` elsewhere.
fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Sum with 8 independent accumulators (vectorizes; the loop is load bound).
fn sum_u64(x: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for j in 0..8 {
            acc[j] = acc[j].wrapping_add(c[j]);
        }
    }
    let tail: u64 = it.remainder().iter().fold(0, |a, &b| a.wrapping_add(b));
    acc.iter().fold(tail, |a, &b| a.wrapping_add(b))
}
