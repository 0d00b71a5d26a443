//! Expert-aware residency: running a mixture-of-experts model whose file is larger than the
//! memory it may use.
//!
//! The mapped file is split into the **dense part** (attention, norms, routers, shared experts,
//! output table: read for every token) and the **routed experts** (each starts on its own page
//! in `.fqm`, SPEC.md). Under a memory budget:
//!
//! - the dense part is asked in (`madvise(WILLNEED)`) at open and optionally locked (`mlock`);
//! - right after a layer's router picks, the picked experts that are not resident are asked in
//!   with `madvise(WILLNEED)` (the kernel submits the reads at once, in large requests, and the
//!   shared expert's product runs while they are in flight), one request per expert and batch:
//!   a prefill batch loads each expert it needs once;
//! - an [`ExpertCache`] keeps the experts under the budget, replacing the one with the lowest
//!   frequency score (per-expert use counts decayed with a half-life, so frequency and recency
//!   both count) with `madvise(DONTNEED)` + `posix_fadvise(DONTNEED)`, which drops its pages
//!   from the page cache: the kernel never has to choose, so it never evicts the dense part.
//!   The drops run on a worker thread ([`BackgroundDrops`]), the reads on the caller;
//! - page faults in the embedding table and the experts read only the faulting page
//!   (`madvise(RANDOM)`): no read-around window of pages nobody accounted for;
//! - a prefill batch (at least as many (token, expert) pairs as experts) also reads the next
//!   MoE layer's experts ahead, as far as the budget allows without dropping anything worth
//!   more ([`ExpertCache::prefetch`]), on the worker behind the drops: their reads overlap
//!   this layer's experts and the next attention instead of waiting for the next router.
//!   In decode, [`PagingOptions::predict`] applies the next MoE layer's router to this
//!   layer's input and reads ahead the experts it picks (off by default: see
//!   `docs/performance.md` for what it gave).
//!
//! Without a budget (the model fits) nothing here runs: the mapping behaves as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{Error, Result};

/// Bytes of a page (the `.fqm` expert alignment).
pub const PAGE: usize = 4096;

/// Counters of the expert cache since the model was opened (or [`Residency::reset_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Expert uses whose expert was resident (counted once per expert and forward call).
    pub hits: u64,
    /// Expert uses that had to be read from the file.
    pub misses: u64,
    /// Experts dropped to stay under the budget.
    pub evictions: u64,
    /// Bytes asked from the file for missing experts (and experts read ahead).
    pub bytes_requested: u64,
    /// Experts read ahead of their layer ([`ExpertCache::prefetch`]).
    pub prefetched: u64,
    /// Of those, the ones their layer then used (counted among the hits).
    pub prefetch_hits: u64,
}

impl CacheStats {
    /// Share of expert uses that were hits (0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 {
            0.0
        } else {
            self.hits as f64 / n as f64
        }
    }

    /// The counters accumulated since `before`.
    pub fn since(&self, before: &CacheStats) -> CacheStats {
        CacheStats {
            hits: self.hits - before.hits,
            misses: self.misses - before.misses,
            evictions: self.evictions - before.evictions,
            bytes_requested: self.bytes_requested - before.bytes_requested,
            prefetched: self.prefetched - before.prefetched,
            prefetch_hits: self.prefetch_hits - before.prefetch_hits,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    bytes: u64,
    resident: bool,
    /// Decayed use count at tick `last`.
    freq: f64,
    last: u64,
    /// Read ahead ([`ExpertCache::prefetch`]) and not used since.
    prefetched: bool,
    /// The tick of the last read-ahead (not dropped in that tick to make room for another).
    pinned: u64,
}

/// The replacement policy (no I/O): which experts to load and which to drop so that the
/// resident experts stay within `budget` bytes. Experts are numbered `layer * n_experts + e`
/// (`layer` counts MoE layers). The score of an expert is its use count decayed by half every
/// `half_life` ticks (one tick per [`ExpertCache::access`], i.e. per MoE layer and forward
/// call); the resident expert with the lowest score goes first, the score weighed down by up to
/// half the more layers run before the expert's layer comes again (layers run in order: an
/// expert of the layer that just ran is needed again last, so when uses about tie, as in a
/// prefill batch that touches every expert, the cache keeps the experts of the layers coming
/// next instead of cycling through all of them with no hit); the experts of the current
/// access are never dropped.
#[derive(Clone, Debug)]
pub struct ExpertCache {
    slots: Vec<Slot>,
    n_experts: usize,
    budget: u64,
    used: u64,
    tick: u64,
    half_life: f64,
    stats: CacheStats,
}

impl ExpertCache {
    /// A cache of experts of the given sizes (bytes; `layers × n_experts` of them), nothing
    /// resident yet.
    pub fn new(sizes: &[u64], n_experts: usize, budget: u64, half_life: u64) -> ExpertCache {
        ExpertCache {
            slots: sizes
                .iter()
                .map(|&bytes| Slot {
                    bytes,
                    resident: false,
                    freq: 0.0,
                    last: 0,
                    prefetched: false,
                    pinned: u64::MAX,
                })
                .collect(),
            n_experts: n_experts.max(1),
            budget,
            used: 0,
            tick: 0,
            half_life: half_life.max(1) as f64,
            stats: CacheStats::default(),
        }
    }

    fn score(&self, s: &Slot) -> f64 {
        s.freq * (-((self.tick - s.last) as f64) / self.half_life).exp2()
    }

    /// Bytes of the resident experts.
    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Whether expert `e` of MoE layer `layer` is resident.
    pub fn is_resident(&self, layer: usize, e: usize) -> bool {
        self.slots
            .get(layer * self.n_experts + e)
            .is_some_and(|s| s.resident)
    }

    /// Mark an expert resident without counting a use (the experts present at start).
    pub fn preload(&mut self, layer: usize, e: usize) -> bool {
        let id = layer * self.n_experts + e;
        match self.slots.get_mut(id) {
            Some(s) if !s.resident && self.used + s.bytes <= self.budget => {
                s.resident = true;
                self.used += s.bytes;
                true
            }
            _ => false,
        }
    }

    /// MoE layer `layer` runs the experts `picked` (each once; ids out of range are ignored):
    /// count the uses, push the ids (`layer * n_experts + e`) that must be read into `load` and
    /// those to drop into `evict` (both cleared first).
    pub fn access(
        &mut self,
        layer: usize,
        picked: &[usize],
        load: &mut Vec<usize>,
        evict: &mut Vec<usize>,
    ) {
        load.clear();
        evict.clear();
        self.tick += 1;
        let base = layer * self.n_experts;
        for &e in picked {
            if e >= self.n_experts || base + e >= self.slots.len() {
                continue;
            }
            let id = base + e;
            let cur = self.score(&self.slots[id]);
            let s = &mut self.slots[id];
            s.freq = cur + 1.0;
            s.last = self.tick;
            if s.resident {
                self.stats.hits += 1;
                if s.prefetched {
                    // read ahead: the caller asks for it again, which costs nothing where the
                    // read-ahead has run and brings it in now where it has not yet
                    s.prefetched = false;
                    self.stats.prefetch_hits += 1;
                    load.push(id);
                }
            } else {
                s.resident = true;
                self.used += s.bytes;
                self.stats.misses += 1;
                self.stats.bytes_requested += s.bytes;
                load.push(id);
            }
        }
        // drop the resident experts (not the ones of this access) that are worth least while
        // over budget
        while self.used > self.budget {
            let Some((id, _)) = self.victim(layer) else {
                break;
            };
            self.evict(id, evict);
        }
    }

    /// The resident expert worth least, not one of the current access (nor read ahead in
    /// it), with its weighed score: the use score, weighed down (by up to half) the more
    /// layers must run before the expert's layer comes again (layers run in order, every
    /// token or batch), so that of two about equally used experts the one of the layer that
    /// just ran (needed again last) goes first, while a clearly more used expert still stays.
    fn victim(&self, layer: usize) -> Option<(usize, f64)> {
        let layers = (self.slots.len() / self.n_experts).max(1);
        let cur = layer % layers;
        let mut victim: Option<(usize, f64)> = None;
        for (id, s) in self.slots.iter().enumerate() {
            if !s.resident || s.last == self.tick || s.pinned == self.tick {
                continue;
            }
            // layers until this expert's layer runs again: 1 (the next) ..= layers (this one)
            let dist = (id / self.n_experts % layers + layers - cur - 1) % layers + 1;
            let sc = self.score(s) * (1.0 - 0.5 * (dist - 1) as f64 / layers as f64);
            if victim.is_none_or(|(_, b)| sc < b) {
                victim = Some((id, sc));
            }
        }
        victim
    }

    fn evict(&mut self, id: usize, evict: &mut Vec<usize>) {
        let s = &mut self.slots[id];
        s.resident = false;
        s.prefetched = false;
        self.used -= s.bytes;
        self.stats.evictions += 1;
        evict.push(id);
    }

    /// Read ahead the experts `candidates` of MoE layer `layer` (the layer after the current
    /// access, whose router has not run yet), in order, as far as the budget allows: room is
    /// made by dropping experts worth less than the one read would be (its score plus the
    /// use it is expected to get), never the current access's nor ones read ahead in this
    /// call. Counts no use; the layer's own access then counts a hit for each one it uses.
    /// `load` and `evict` as in [`ExpertCache::access`] (cleared first).
    pub fn prefetch(
        &mut self,
        layer: usize,
        candidates: &[usize],
        load: &mut Vec<usize>,
        evict: &mut Vec<usize>,
    ) {
        load.clear();
        evict.clear();
        let base = layer * self.n_experts;
        for &e in candidates {
            let id = base + e;
            if e >= self.n_experts || id >= self.slots.len() || self.slots[id].resident {
                continue;
            }
            let (bytes, worth) = (self.slots[id].bytes, self.score(&self.slots[id]) + 1.0);
            while self.used + bytes > self.budget {
                match self.victim(layer.wrapping_sub(1)) {
                    Some((v, sc)) if sc < worth => self.evict(v, evict),
                    _ => return,
                }
            }
            let s = &mut self.slots[id];
            s.resident = true;
            s.prefetched = true;
            s.pinned = self.tick;
            self.used += bytes;
            self.stats.prefetched += 1;
            self.stats.bytes_requested += bytes;
            load.push(id);
        }
    }
}

/// A page-aligned byte range of the mapped file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: usize,
    pub len: usize,
}

impl Range {
    /// The pages covering `offset .. offset + len`.
    pub fn pages(offset: usize, len: usize) -> Range {
        let start = offset / PAGE * PAGE;
        let end = (offset + len).div_ceil(PAGE) * PAGE;
        Range {
            offset: start,
            len: end - start,
        }
    }
}

/// What [`Residency`] does with the mapping.
pub trait Pager: Send + Sync {
    /// Ask the pages of `r` in, without waiting (`madvise(WILLNEED)`).
    fn will_need(&self, r: Range);
    /// Drop the pages of `r` from this process and the page cache.
    fn drop_pages(&self, r: Range);
    /// How many pages of `r` are in memory now (the page cache), where the system says.
    fn resident_pages(&self, _r: Range) -> Option<usize> {
        None
    }
    /// Pages of `r` are read in by [`Pager::will_need`] or one at a time: a page fault there
    /// reads only that page, not the kernel's read-around window (`madvise(RANDOM)`).
    fn no_read_around(&self, _r: Range) {}
    /// Ask the pages of `r` in ahead of their use, off the caller where the pager can
    /// ([`BackgroundDrops`] queues it behind the drops): the caller goes on computing.
    fn prefetch(&self, r: Range) {
        self.will_need(r)
    }
}

/// Experts under a memory budget: the policy behind a lock, the experts' file ranges, and the
/// pager that applies the policy's decisions.
pub struct Residency {
    cache: Mutex<Plan>,
    ranges: Vec<Range>,
    n_experts: usize,
    pager: Box<dyn Pager>,
    /// Bytes of the dense part (everything but the routed experts and the embedding table).
    pub dense_bytes: u64,
    /// Memory budget in bytes (dense part + experts + margin).
    pub budget: u64,
    /// Nanoseconds spent in [`Residency::prepare`] (policy and I/O submission).
    prepare_ns: AtomicU64,
    /// Per decoder layer: its MoE layer number (`usize::MAX` for dense layers).
    pub slot_of: Vec<usize>,
    /// Read the next MoE layer's experts ahead in prefill ([`Residency::prefetch_after`]).
    pub prefetch: bool,
    /// In decode, predict the next MoE layer's picks (its router on this layer's input) and
    /// read them ahead.
    pub predict: bool,
}

struct Plan {
    cache: ExpertCache,
    load: Vec<usize>,
    evict: Vec<usize>,
    picked: Vec<usize>,
}

impl std::fmt::Debug for Residency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Residency")
            .field("experts", &self.ranges.len())
            .field("budget", &self.budget)
            .field("dense_bytes", &self.dense_bytes)
            .finish_non_exhaustive()
    }
}

impl Residency {
    /// `ranges`: each expert's pages (`layers × n_experts`, MoE layers in order); the experts
    /// get `expert_budget` bytes.
    pub fn new(
        ranges: Vec<Range>,
        n_experts: usize,
        expert_budget: u64,
        dense_bytes: u64,
        budget: u64,
        pager: Box<dyn Pager>,
    ) -> Residency {
        let sizes: Vec<u64> = ranges.iter().map(|r| r.len as u64).collect();
        let layers = ranges.len() / n_experts.max(1);
        // frequencies halve after about 16 tokens' worth of accesses
        let cache = ExpertCache::new(&sizes, n_experts, expert_budget, 16 * layers.max(1) as u64);
        Residency {
            cache: Mutex::new(Plan {
                cache,
                load: Vec::with_capacity(n_experts),
                evict: Vec::with_capacity(ranges.len()),
                picked: Vec::with_capacity(n_experts),
            }),
            ranges,
            n_experts,
            pager,
            dense_bytes,
            budget,
            prepare_ns: AtomicU64::new(0),
            slot_of: Vec::new(),
            prefetch: true,
            predict: false,
        }
    }

    /// MoE layer `layer` is about to run the experts with `counts[e] > 0`: drop what the
    /// policy evicts, then ask in the picked experts that are not resident.
    pub fn prepare(&self, layer: usize, counts: &[u32]) {
        self.apply(Some(counts), false, &|cache, picked, load, evict| {
            cache.access(layer, picked, load, evict)
        });
    }

    /// Run a policy step `op` on the experts `picked` (`counts[e] > 0`; `None`: all of them) and
    /// apply it: drop what it evicts, then ask in what it loads (read-ahead: queued behind the
    /// drops when `ahead`). Timed in [`Residency::prepare_seconds`].
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        counts: Option<&[u32]>,
        ahead: bool,
        op: &dyn Fn(&mut ExpertCache, &[usize], &mut Vec<usize>, &mut Vec<usize>),
    ) {
        let t0 = std::time::Instant::now();
        let mut p = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let Plan {
            cache,
            load,
            evict,
            picked,
        } = &mut *p;
        picked.clear();
        match counts {
            Some(c) => picked.extend(
                c.iter()
                    .take(self.n_experts)
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(e, _)| e),
            ),
            None => picked.extend(0..self.n_experts),
        }
        op(cache, picked, load, evict);
        for &id in evict.iter() {
            self.pager.drop_pages(self.ranges[id]);
        }
        for &id in load.iter() {
            if ahead {
                self.pager.prefetch(self.ranges[id]);
            } else {
                self.pager.will_need(self.ranges[id]);
            }
        }
        drop(p);
        self.prepare_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Take the experts that are already in memory at open into the cache (a model run a moment
    /// ago, a file just copied), instead of assuming none is: an expert with all its pages in
    /// memory ([`Pager::resident_pages`]) counts as resident while the budget holds it,
    /// spread over the layers (expert 0 of every layer, then expert 1, ...: no routing
    /// statistics yet); the partly cached ones and those beyond the budget are dropped, so that
    /// the cache's count matches what is in memory. Where residency cannot be asked, every
    /// expert is dropped (a known start). Returns the experts taken.
    pub fn adopt_resident(&mut self) -> usize {
        let p = self.cache.get_mut().unwrap_or_else(|e| e.into_inner());
        let n = self.n_experts.max(1);
        let layers = self.ranges.len() / n;
        let mut taken = 0;
        for e in 0..n {
            for layer in 0..layers {
                let id = layer * n + e;
                let r = self.ranges[id];
                match self.pager.resident_pages(r) {
                    Some(0) => {}
                    Some(k) if k >= r.len / PAGE && p.cache.preload(layer, e) => taken += 1,
                    _ => self.pager.drop_pages(r),
                }
            }
        }
        taken
    }

    /// After decoder layer `li`'s [`Residency::prepare`]: read ahead experts of the next MoE
    /// layer as far as the budget allows: with `predicted` (per expert, `> 0`: predicted to
    /// be picked), those; without, all of them in expert order (a prefill batch touches
    /// about every expert of a layer: their reads then run while this layer computes,
    /// instead of after the next router). Nothing after the last MoE layer.
    pub fn prefetch_after(&self, li: usize, predicted: Option<&[u32]>) {
        let Some(&slot) = self.slot_of.get(li).filter(|&&s| s != usize::MAX) else {
            return;
        };
        let next = slot + 1;
        if !self.prefetch || (next + 1) * self.n_experts > self.ranges.len() {
            return;
        }
        self.apply(predicted, true, &|cache, picked, load, evict| {
            cache.prefetch(next, picked, load, evict)
        });
    }

    /// [`Residency::prepare`] for decoder layer `li` (nothing for a dense layer).
    pub fn prepare_layer(&self, li: usize, counts: &[u32]) {
        if let Some(&slot) = self.slot_of.get(li).filter(|&&s| s != usize::MAX) {
            self.prepare(slot, counts);
        }
    }

    /// Hits, misses, evictions and bytes asked for since open.
    pub fn stats(&self) -> CacheStats {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .cache
            .stats()
    }

    /// Seconds spent choosing and submitting reads.
    pub fn prepare_seconds(&self) -> f64 {
        self.prepare_ns.load(Ordering::Relaxed) as f64 / 1e9
    }

    /// Bytes of resident experts and the experts' budget.
    pub fn expert_bytes(&self) -> (u64, u64) {
        let p = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        (p.cache.used(), p.cache.budget())
    }

    /// Number of routed experts (all MoE layers).
    pub fn n_experts_total(&self) -> usize {
        self.ranges.len()
    }

    /// Bytes of all routed experts (their pages).
    pub fn total_expert_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.len as u64).sum()
    }
}

/// Parse a memory size: `12G`, `800M`, `1.5GiB`, `3000000000` (bytes). `K/M/G/T` and
/// `KiB/MiB/GiB/TiB` are powers of 1024 (memory, as `free` and llama.cpp count it), `KB/MB/GB`
/// powers of 1000.
pub fn parse_mem(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .parse()
        .map_err(|_| Error::config("mem", format!("`{s}` is not a size like 12G or 800M")))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "K" | "KIB" => 1024.0,
        "M" | "MIB" => 1024.0 * 1024.0,
        "G" | "GIB" => 1024.0 * 1024.0 * 1024.0,
        "T" | "TIB" => 1024.0f64.powi(4),
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        u => {
            return Err(Error::config(
                "mem",
                format!("unknown unit `{u}` in `{s}` (K, M, G, T, KB, MB, GB, TB)"),
            ))
        }
    };
    let b = v * mult;
    if !(0.0..=1e18).contains(&b) {
        return Err(Error::config("mem", format!("`{s}` is out of range")));
    }
    Ok(b as u64)
}

/// Memory this process may use: the smallest of `MemAvailable` plus this file's pages already
/// in the page cache (`cached`, they count as used but are ours to keep) and the limit of the
/// memory cgroup the process runs in (v1 `memory.limit_in_bytes` or v2 `memory.max`).
/// `None` where neither can be read.
pub fn available_memory(cached: u64) -> Option<u64> {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024 + cached)
    });
    let cg = cgroup_limit();
    match (avail, cg) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
    }
}

/// The memory limit of this process's cgroup, if it has one below the machine's memory.
pub fn cgroup_limit() -> Option<u64> {
    let me = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut best: Option<u64> = None;
    for line in me.lines() {
        // v1: "4:memory:/path"; v2: "0::/path"
        let mut f = line.splitn(3, ':');
        let (_, ctrl, path) = (f.next()?, f.next()?, f.next()?);
        let file = if ctrl.split(',').any(|c| c == "memory") {
            format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes")
        } else if ctrl.is_empty() {
            format!("/sys/fs/cgroup{path}/memory.max")
        } else {
            continue;
        };
        if let Some(v) = std::fs::read_to_string(&file)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        {
            // v1 reports "no limit" as a huge number
            if v < (1u64 << 60) {
                best = Some(best.map_or(v, |b| b.min(v)));
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(n_layers: usize, n_experts: usize, bytes: u64, budget: u64) -> ExpertCache {
        ExpertCache::new(&vec![bytes; n_layers * n_experts], n_experts, budget, 8)
    }

    #[test]
    fn hits_after_first_use() {
        let mut c = cache(2, 4, 100, 1000);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        c.access(0, &[1, 3], &mut load, &mut evict);
        assert_eq!((load.clone(), evict.clone()), (vec![1, 3], vec![]));
        c.access(1, &[1], &mut load, &mut evict);
        assert_eq!(load, vec![5]);
        c.access(0, &[3], &mut load, &mut evict);
        assert!(load.is_empty() && evict.is_empty());
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.bytes_requested), (1, 3, 300));
        assert_eq!(c.used(), 300);
        assert!(c.is_resident(0, 3) && c.is_resident(1, 1) && !c.is_resident(1, 3));
    }

    #[test]
    fn stays_under_budget_and_keeps_the_hot_expert() {
        // room for 3 of 8 experts; expert 0 is used every time, the others in turn
        let mut c = cache(1, 8, 100, 300);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        for i in 0..200 {
            let other = 1 + i % 7;
            c.access(0, &[0, other], &mut load, &mut evict);
            assert!(c.used() <= 300, "over budget at {i}: {}", c.used());
            assert!(!evict.contains(&0), "hot expert evicted at {i}");
            assert!(c.is_resident(0, 0) && c.is_resident(0, other));
        }
        let s = c.stats();
        assert_eq!(s.hits + s.misses, 400);
        // expert 0 hits every time after the first
        assert!(s.hits >= 199, "{s:?}");
        assert_eq!(s.misses - s.evictions, 3);
    }

    #[test]
    fn frequency_beats_a_single_recent_use() {
        // room for 2: expert 1 used often, then 2 once, then 3 needs a slot: 2 goes, not 1
        let mut c = cache(1, 4, 10, 20);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            c.access(0, &[1], &mut load, &mut evict);
        }
        c.access(0, &[2], &mut load, &mut evict);
        c.access(0, &[3], &mut load, &mut evict);
        assert_eq!((load.as_slice(), evict.as_slice()), (&[3][..], &[2][..]));
        // ...but an expert unused for many half-lives loses to recent ones
        for _ in 0..100 {
            c.access(0, &[2, 3], &mut load, &mut evict);
        }
        assert!(!c.is_resident(0, 1));
    }

    #[test]
    fn picked_experts_larger_than_the_budget_are_still_loaded() {
        let mut c = cache(1, 4, 100, 50);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        c.access(0, &[0, 1], &mut load, &mut evict);
        assert_eq!(load, vec![0, 1]);
        c.access(0, &[2], &mut load, &mut evict);
        assert_eq!(load, vec![2]);
        assert_eq!(evict.len(), 2);
        assert_eq!(c.used(), 100);
        // out-of-range ids are ignored
        c.access(0, &[99], &mut load, &mut evict);
        assert!(load.is_empty());
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<(bool, Range)>>);
    impl Pager for std::sync::Arc<Log> {
        fn will_need(&self, r: Range) {
            self.0.lock().unwrap().push((true, r));
        }
        fn drop_pages(&self, r: Range) {
            self.0.lock().unwrap().push((false, r));
        }
    }

    /// A pager that says which pages are in memory: `resident[i]` pages of expert range `i`
    /// (`None`: cannot be asked).
    struct Cached {
        log: std::sync::Arc<Log>,
        resident: Option<Vec<usize>>,
    }
    impl Pager for Cached {
        fn will_need(&self, r: Range) {
            self.log.will_need(r)
        }
        fn drop_pages(&self, r: Range) {
            self.log.drop_pages(r)
        }
        fn resident_pages(&self, r: Range) -> Option<usize> {
            Some(self.resident.as_ref()?[r.offset / (2 * PAGE)])
        }
    }

    /// 2 MoE layers × 2 experts of 2 pages each, room for 2 experts.
    fn cached(resident: Option<Vec<usize>>) -> (Residency, std::sync::Arc<Log>) {
        let log = std::sync::Arc::new(Log::default());
        let ranges: Vec<Range> = (0..4)
            .map(|i| Range::pages(i * 2 * PAGE, 2 * PAGE))
            .collect();
        let pager = Cached {
            log: log.clone(),
            resident,
        };
        let r = Residency::new(ranges, 2, 4 * PAGE as u64, 0, 0, Box::new(pager));
        (r, log)
    }

    #[test]
    fn experts_in_memory_at_open_are_resident() {
        // all four fully cached: expert 0 of each layer is taken (spread over the layers),
        // expert 1 of each dropped; then the taken ones hit without a read
        let (mut r, log) = cached(Some(vec![2, 2, 2, 2]));
        assert_eq!(r.adopt_resident(), 2);
        let dropped: Vec<Range> = log.0.lock().unwrap().iter().map(|&(_, x)| x).collect();
        assert_eq!(
            dropped,
            vec![
                Range::pages(2 * PAGE, 2 * PAGE),
                Range::pages(6 * PAGE, 2 * PAGE)
            ]
        );
        assert_eq!(r.expert_bytes().0, 4 * PAGE as u64);
        log.0.lock().unwrap().clear();
        r.prepare(0, &[1, 0]);
        r.prepare(1, &[1, 0]);
        let s = r.stats();
        assert_eq!((s.hits, s.misses), (2, 0));
        assert!(log.0.lock().unwrap().is_empty(), "no read, no drop");

        // one page of expert 1 cached: dropped (partly cached), expert 3 untouched (nothing
        // cached), experts 0 and 2 taken
        let (mut r, log) = cached(Some(vec![2, 1, 2, 0]));
        assert_eq!(r.adopt_resident(), 2);
        let l = log.0.lock().unwrap().clone();
        assert_eq!(l, vec![(false, Range::pages(2 * PAGE, 2 * PAGE))]);

        // residency cannot be asked: every expert dropped, none taken (the old known start)
        let (mut r, log) = cached(None);
        assert_eq!(r.adopt_resident(), 0);
        assert_eq!(log.0.lock().unwrap().len(), 4);
        assert_eq!(r.expert_bytes().0, 0);
        r.prepare(0, &[1, 0]);
        assert_eq!(r.stats().misses, 1);
    }

    #[test]
    fn each_layer_keeps_its_hot_expert_under_budget() {
        // 3 layers × 8 experts, room for 4: each layer uses its expert 0 every token and one
        // of the others in turn; from the third token on the three hot experts never leave
        // (and hit), the budget is kept at every step
        let mut c = cache(3, 8, 100, 400);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        for t in 0..100 {
            for layer in 0..3 {
                let cold = 1 + (t * 3 + layer) % 7;
                c.access(layer, &[0, cold], &mut load, &mut evict);
                assert!(c.used() <= 400, "over budget: {}", c.used());
                // (on the first tokens the counts tie: any expert may go)
                assert!(
                    t < 2 || !evict.iter().any(|&id| id % 8 == 0),
                    "a hot expert evicted at {t}"
                );
            }
        }
        assert!((0..3).all(|l| c.is_resident(l, 0)));
        let s = c.stats();
        assert_eq!(s.hits + s.misses, 600);
        assert!(s.hits >= 3 * 98, "{s:?}");
    }

    #[test]
    fn a_batch_touching_every_expert_still_hits() {
        // prefill: every batch runs all 4 experts of each of 4 layers, in layer order; room for
        // 8 of the 16. Dropping the least recently used would miss all 16 every batch (each
        // layer's experts are gone when it comes again); keeping the layers that come next
        // keeps a layer's worth resident across batches
        let mut c = cache(4, 4, 100, 800);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        let all = [0, 1, 2, 3];
        for batch in 0..20 {
            let before = c.stats();
            for layer in 0..4 {
                c.access(layer, &all, &mut load, &mut evict);
                assert!(c.used() <= 800, "over budget: {}", c.used());
            }
            let s = c.stats().since(&before);
            assert_eq!(s.hits + s.misses, 16);
            if batch > 0 {
                assert!(s.hits >= 4, "batch {batch}: {s:?}");
            }
        }
        // two experts per layer, both used every time, room for half of them: still hits (the
        // least recently used order would never hit)
        let mut c = cache(4, 2, 100, 400);
        for t in 0..50 {
            for layer in 0..4 {
                c.access(layer, &[0, 1], &mut load, &mut evict);
            }
            let s = c.stats();
            if t == 49 {
                assert!(s.hits >= 2 * 48, "{s:?}");
            }
        }
        // a layer number past the last does not panic
        c.access(9, &[0], &mut load, &mut evict);
    }

    #[test]
    fn prefetched_experts_hit_and_stay_under_budget() {
        // 3 layers x 4 experts of 100 bytes, room for 6: a prefill batch uses all 4 experts
        // of each layer; after layer 0's access, layer 1's experts are read ahead as far as
        // the budget allows without dropping layer 0's (in use)
        let mut c = cache(3, 4, 100, 600);
        let (mut load, mut evict) = (Vec::new(), Vec::new());
        let all = [0, 1, 2, 3];
        c.access(0, &all, &mut load, &mut evict);
        assert_eq!(load, vec![0, 1, 2, 3]);
        c.prefetch(1, &all, &mut load, &mut evict);
        assert_eq!(load, vec![4, 5], "as far as the budget allows");
        assert!(evict.is_empty(), "layer 0's experts are in use");
        assert_eq!(c.used(), 600);
        let s = c.stats();
        assert_eq!((s.prefetched, s.misses), (2, 4));
        // layer 1 runs: the two read ahead hit (and are asked again: free where read), the
        // other two are read; layer 0's go to make room
        c.access(1, &all, &mut load, &mut evict);
        assert_eq!(load, vec![4, 5, 6, 7]);
        let s = c.stats();
        assert_eq!((s.hits, s.prefetch_hits, s.misses), (2, 2, 6));
        assert!(c.used() <= 600);
        // reading ahead never drops what is worth more than the expert read: layer 2's
        // candidates (never used) do not push out layer 1's experts (used once, in use)
        c.prefetch(2, &all, &mut load, &mut evict);
        assert!(evict.iter().all(|&id| id < 4), "{evict:?}");
        assert!(c.used() <= 600);
        // out-of-range layers and experts are ignored
        c.prefetch(7, &all, &mut load, &mut evict);
        assert!(load.is_empty() && evict.is_empty());
        c.prefetch(2, &[99], &mut load, &mut evict);
        assert!(load.is_empty());
    }

    #[test]
    fn residency_reads_the_next_layer_ahead() {
        // 2 MoE layers x 2 experts of a page, room for 3 experts
        let log = std::sync::Arc::new(Log::default());
        let ranges: Vec<Range> = (0..4).map(|i| Range::pages(i * PAGE, PAGE)).collect();
        let mut r = Residency::new(ranges, 2, 3 * PAGE as u64, 0, 0, Box::new(log.clone()));
        r.slot_of = vec![0, usize::MAX, 1];
        r.prepare_layer(0, &[1, 1]);
        r.prefetch_after(0, None);
        r.prefetch_after(1, None); // a dense layer: nothing
        r.prefetch_after(2, None); // the last MoE layer: nothing
        let need: Vec<usize> = log
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| *n)
            .map(|(_, r)| r.offset / PAGE)
            .collect();
        assert_eq!(need, vec![0, 1, 2], "layer 0's two, then layer 1's first");
        r.prefetch = false;
        r.prepare_layer(2, &[1, 0]);
        assert_eq!(r.stats().prefetch_hits, 1);
    }

    /// Logs like [`Log`]; a drop of the range at offset 0 waits until `go` says.
    struct Gate {
        log: std::sync::Arc<Log>,
        go: Mutex<std::sync::mpsc::Receiver<()>>,
    }
    impl Pager for Gate {
        fn will_need(&self, r: Range) {
            self.log.will_need(r)
        }
        fn drop_pages(&self, r: Range) {
            if r.offset == 0 {
                let _ = self.go.lock().unwrap().recv();
            }
            self.log.drop_pages(r)
        }
    }

    #[test]
    fn background_drops_run_in_order_and_a_read_cancels_a_queued_drop() {
        let log = std::sync::Arc::new(Log::default());
        let (go, rx) = std::sync::mpsc::channel();
        let gate = Gate {
            log: log.clone(),
            go: Mutex::new(rx),
        };
        let (a, b, c) = (
            Range::pages(0, PAGE),
            Range::pages(PAGE, PAGE),
            Range::pages(2 * PAGE, PAGE),
        );
        {
            let p = BackgroundDrops::new(std::sync::Arc::new(gate));
            p.drop_pages(a); // the worker waits in this one
            p.drop_pages(b);
            p.drop_pages(c);
            p.will_need(b); // asked in again before its drop ran: the drop is cancelled
            assert_eq!(log.0.lock().unwrap().clone(), vec![(true, b)]);
            go.send(()).unwrap();
        } // dropping the pager waits for the queue
        assert_eq!(
            log.0.lock().unwrap().clone(),
            vec![(true, b), (false, a), (false, c)]
        );
    }

    #[test]
    fn background_read_ahead_runs_after_queued_drops_and_before_later_ones() {
        let log = std::sync::Arc::new(Log::default());
        let (go, rx) = std::sync::mpsc::channel();
        let gate = Gate {
            log: log.clone(),
            go: Mutex::new(rx),
        };
        let (a, b) = (Range::pages(0, PAGE), Range::pages(PAGE, PAGE));
        {
            let p = BackgroundDrops::new(std::sync::Arc::new(gate));
            p.drop_pages(a); // the worker waits in this one
            p.drop_pages(b);
            p.prefetch(b); // read ahead again: the queued drop of b is moot
            p.drop_pages(b); // and dropped again after the read
            go.send(()).unwrap();
        }
        assert_eq!(
            log.0.lock().unwrap().clone(),
            vec![(false, a), (true, b), (false, b)]
        );
    }

    #[test]
    fn residency_applies_the_plan() {
        let log = std::sync::Arc::new(Log::default());
        let ranges: Vec<Range> = (0..4).map(|i| Range::pages(i * PAGE, PAGE)).collect();
        let r = Residency::new(ranges, 2, PAGE as u64, 0, 0, Box::new(log.clone()));
        r.prepare(0, &[1, 0]);
        r.prepare(1, &[0, 3]);
        let l = log.0.lock().unwrap().clone();
        assert_eq!(
            l,
            vec![
                (true, Range::pages(0, PAGE)),
                (false, Range::pages(0, PAGE)),
                (true, Range::pages(3 * PAGE, PAGE)),
            ]
        );
        let s = r.stats();
        assert_eq!((s.misses, s.evictions), (2, 1));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_mem("800M").unwrap(), 800 << 20);
        assert_eq!(parse_mem("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_mem("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_mem("4096").unwrap(), 4096);
        assert!(parse_mem("12X").is_err() && parse_mem("").is_err() && parse_mem("1e99").is_err());
        assert_eq!(
            Range::pages(100, 10),
            Range {
                offset: 0,
                len: PAGE
            }
        );
        assert_eq!(
            Range::pages(PAGE - 1, 2),
            Range {
                offset: 0,
                len: 2 * PAGE
            }
        );
    }
}

/// The bytes of `file` a pager may advise: none when the file was copied into memory at open
/// (files up to [`crate::format::COPY_BELOW`]): `MADV_DONTNEED` on that anonymous copy would
/// zero it, and it is resident anyway. A pager over an empty slice does nothing.
fn pageable(file: &crate::format::FqmFile) -> &[u8] {
    if file.is_copied() {
        &[]
    } else {
        file.bytes()
    }
}

/// The [`Pager`] of a read-only shared file mapping: `madvise` on the mapping, and
/// `posix_fadvise(DONTNEED)` on the file so that dropped pages leave the page cache too.
pub struct MmapPager {
    /// Address of the mapping (kept as an integer: the pager only passes it to the kernel).
    addr: usize,
    len: usize,
    file: std::fs::File,
}

impl MmapPager {
    /// A pager for `map` (a mapping of all of `file`).
    pub fn new(map: &[u8], file: std::fs::File) -> MmapPager {
        MmapPager {
            addr: map.as_ptr() as usize,
            len: map.len(),
            file,
        }
    }

    fn valid(&self, r: Range) -> bool {
        r.offset.is_multiple_of(PAGE) && r.offset.checked_add(r.len).is_some_and(|e| e <= self.len)
    }

    /// `madvise` on `r` if it lies inside the mapping (`false` if not, and nothing is done);
    /// advisory, so the kernel's answer is ignored.
    fn advise(&self, r: Range, advice: Advice) -> bool {
        if !self.valid(r) {
            return false;
        }
        #[cfg(unix)]
        // SAFETY: the range lies inside the live mapping (checked above). WILLNEED and RANDOM
        // only change when and how much the kernel reads. DONTNEED drops the pages: the mapping
        // is a read-only MAP_SHARED mapping of a file that is never modified in place
        // (SPEC.md), so the next read of these addresses faults the same bytes back in from the
        // file, and every slice into the mapping stays valid and keeps its contents.
        unsafe {
            let advice = match advice {
                Advice::WillNeed => libc::MADV_WILLNEED,
                Advice::Random => libc::MADV_RANDOM,
                Advice::DontNeed => libc::MADV_DONTNEED,
            };
            libc::madvise((self.addr + r.offset) as *mut libc::c_void, r.len, advice);
        }
        #[cfg(not(unix))]
        let _ = advice;
        true
    }

    /// Lock the pages of `r` in memory. The error says what to do when the limit refuses it.
    pub fn lock(&self, r: Range) -> Result<()> {
        if !self.valid(r) {
            return Ok(());
        }
        #[cfg(unix)]
        {
            // SAFETY: the range lies inside the live mapping (checked above); mlock only pins
            // its pages.
            let rc = unsafe { libc::mlock((self.addr + r.offset) as *const libc::c_void, r.len) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::config(
                    "mlock",
                    format!(
                        "locking {:.1} MiB of weights in memory was refused ({e}); raise the \
                         limit (`ulimit -l`, RLIMIT_MEMLOCK, or CAP_IPC_LOCK) or run without \
                         --mlock",
                        r.len as f64 / (1u64 << 20) as f64
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The `madvise` calls [`MmapPager`] makes.
#[derive(Clone, Copy)]
enum Advice {
    /// Read the range in now (asynchronously).
    WillNeed,
    /// A fault reads only its own page (no read-around).
    Random,
    /// Drop the range's pages (they fault back in from the file).
    DontNeed,
}

impl Pager for MmapPager {
    fn will_need(&self, r: Range) {
        self.advise(r, Advice::WillNeed);
    }

    fn no_read_around(&self, r: Range) {
        self.advise(r, Advice::Random);
    }

    #[cfg(unix)]
    fn resident_pages(&self, r: Range) -> Option<usize> {
        if !self.valid(r) || r.len == 0 {
            return None;
        }
        let pages = r.len / PAGE;
        // one byte per page; small (an expert is a few MiB: a few thousand pages), made at open
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside the live mapping and starts on a page (checked above);
        // `vec` has one byte per page of it, which is what mincore writes.
        let rc = unsafe {
            libc::mincore(
                (self.addr + r.offset) as *mut libc::c_void,
                r.len,
                vec.as_mut_ptr() as *mut _,
            )
        };
        (rc == 0).then(|| vec.iter().filter(|&&b| b & 1 != 0).count())
    }

    fn drop_pages(&self, r: Range) {
        if !self.advise(r, Advice::DontNeed) {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: advisory call on an open file descriptor owned by `self.file`.
            unsafe {
                libc::posix_fadvise(
                    self.file.as_raw_fd(),
                    r.offset as libc::off_t,
                    r.len as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = &self.file;
    }
}

/// A pager whose drops run on a worker thread: the forward pass does not wait while the kernel
/// unmaps and invalidates evicted experts. Reads asked with [`Pager::will_need`] stay on the
/// caller (they are needed at once, and a read asked of the kernel late would turn into one
/// page fault per page); read-aheads ([`Pager::prefetch`]) are queued behind the drops, so the
/// memory they need is freed first. A drop still queued when its range is asked in again is
/// cancelled, so a range asked for is never dropped behind the caller's back; of several drops
/// of a range queued around a read-ahead, only the last one runs, after the read. Jobs of a
/// dropped pager's queue finish before it is gone.
pub struct BackgroundDrops {
    inner: std::sync::Arc<dyn Pager>,
    /// Ranges (by offset) whose drop is queued and not cancelled: the number of the last
    /// drop queued.
    pending: std::sync::Arc<Mutex<Pending>>,
    tx: Mutex<Option<std::sync::mpsc::Sender<Job>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Default)]
struct Pending {
    last: std::collections::HashMap<usize, u64>,
    seq: u64,
}

/// A job of the [`BackgroundDrops`] worker: a drop (with its number) or a read-ahead.
enum Job {
    Drop(Range, u64),
    Need(Range),
}

impl BackgroundDrops {
    /// Wrap `inner`; where no thread can be started, drops and read-aheads run on the caller.
    pub fn new(inner: std::sync::Arc<dyn Pager>) -> BackgroundDrops {
        let pending = std::sync::Arc::new(Mutex::new(Pending::default()));
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let (p, i) = (pending.clone(), inner.clone());
        let worker = std::thread::Builder::new()
            .name("ferroq-pager".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Drop(r, n) => {
                            let mut pend = p.lock().unwrap_or_else(|e| e.into_inner());
                            // run only the last drop queued for r, unless cancelled since
                            let run = pend.last.get(&r.offset) == Some(&n);
                            if run {
                                pend.last.remove(&r.offset);
                            }
                            drop(pend);
                            if run {
                                i.drop_pages(r);
                            }
                        }
                        Job::Need(r) => i.will_need(r),
                    }
                }
            })
            .ok();
        let tx = worker.as_ref().map(|_| tx);
        BackgroundDrops {
            inner,
            pending,
            tx: Mutex::new(tx),
            worker: Mutex::new(worker),
        }
    }

    /// Queue `job`; false where there is no worker (the caller then does it).
    fn send(&self, job: Job) -> bool {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.as_ref().is_some_and(|tx| tx.send(job).is_ok())
    }

    /// Cancel the queued drops of `r`.
    fn cancel(&self, r: Range) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.last.remove(&r.offset);
    }
}

impl Pager for BackgroundDrops {
    fn will_need(&self, r: Range) {
        self.cancel(r);
        self.inner.will_need(r)
    }
    fn prefetch(&self, r: Range) {
        self.cancel(r);
        if !self.send(Job::Need(r)) {
            self.inner.will_need(r)
        }
    }
    fn drop_pages(&self, r: Range) {
        let n = {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.seq += 1;
            let n = p.seq;
            p.last.insert(r.offset, n);
            n
        };
        if self.send(Job::Drop(r, n)) {
            return;
        }
        self.cancel(r);
        self.inner.drop_pages(r)
    }
    fn resident_pages(&self, r: Range) -> Option<usize> {
        self.inner.resident_pages(r)
    }
    fn no_read_around(&self, r: Range) {
        self.inner.no_read_around(r)
    }
}

impl Drop for BackgroundDrops {
    fn drop(&mut self) {
        // closing the channel ends the worker once it has applied the queued drops
        self.tx.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = self
            .worker
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let _ = w.join();
        }
    }
}

/// How [`Model::enable_paging`] sets up residency.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PagingOptions {
    /// Memory budget in bytes (`None`: what the machine, or the process's cgroup, has free).
    pub budget: Option<u64>,
    /// Lock the dense part in memory (`mlock`).
    pub mlock: bool,
    /// Page the experts even when the whole file fits in the budget.
    pub force: bool,
    /// Do not read the next MoE layer's experts ahead in prefill (to measure what it gives).
    pub no_prefetch: bool,
    /// In decode, read ahead the next MoE layer's experts that its router, applied early to
    /// this layer's input, predicts (off by default: it pays only where the prediction is
    /// good, which depends on the model).
    pub predict: bool,
}

/// Bytes kept free of weights within a budget for the KV cache, scratch buffers and the
/// program itself: 64 MiB plus 1/32 of the budget.
pub fn margin(budget: u64) -> u64 {
    (64 << 20) + budget / 32
}

use super::weights::{FfnWeights, Model};

impl Model {
    /// Routed experts' page ranges (MoE layers in order, `num_experts` each) and, per layer,
    /// its MoE layer number (`usize::MAX` for dense layers).
    fn expert_ranges(&self) -> (Vec<Range>, Vec<usize>) {
        let t = self.file.tensors();
        let (mut ranges, mut slot_of) = (Vec::new(), Vec::new());
        for lw in &self.layers {
            match &lw.ffn {
                FfnWeights::Moe { experts, .. } => {
                    slot_of.push(ranges.len() / self.config.num_experts.max(1));
                    for e in experts {
                        let (a, b) = (&t[e[0].index()], &t[e[2].index()]);
                        let lo = a.offset.min(b.offset);
                        let hi = e
                            .iter()
                            .map(|w| t[w.index()].offset + t[w.index()].nbytes)
                            .max()
                            .unwrap_or(lo);
                        ranges.push(Range::pages(lo, hi - lo));
                    }
                }
                FfnWeights::Dense { .. } => slot_of.push(usize::MAX),
            }
        }
        (ranges, slot_of)
    }

    /// Lock the whole mapped file in memory (`--mlock` when experts are not paged).
    pub fn lock_all(&self) -> Result<()> {
        let file =
            std::fs::File::open(self.file.path()).map_err(|e| Error::io(self.file.path(), e))?;
        let b = self.file.bytes();
        MmapPager::new(pageable(&self.file), file).lock(Range::pages(0, b.len() / PAGE * PAGE))
    }

    /// Page the routed experts under a memory budget (see the module docs). Returns whether
    /// paging is on: not for dense models, nor when the file fits in the budget (unless
    /// `force`). Errors when the dense part does not fit, or `mlock` is refused. Call before
    /// sharing the model.
    pub fn enable_paging(&mut self, opts: &PagingOptions) -> Result<bool> {
        if !self.config.layers.iter().any(|l| l.moe) {
            return Ok(false);
        }
        let file_len = self.file.bytes().len() as u64;
        let Some(budget) = opts.budget.or_else(|| available_memory(0)) else {
            return Ok(false);
        };
        let (ranges, slot_of) = self.expert_ranges();
        let experts: u64 = ranges.iter().map(|r| r.len as u64).sum();
        let emb = &self.file.tensors()[self.tok_embeddings.index()];
        let emb_bytes = if self.config.tie_word_embeddings {
            0
        } else {
            emb.nbytes as u64
        };
        let dense = file_len.saturating_sub(experts + emb_bytes);
        let m = margin(budget);
        if file_len + m <= budget && !opts.force {
            return Ok(false);
        }
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        if dense + m > budget {
            return Err(Error::config(
                "mem",
                format!(
                    "the dense part of {} ({:.0} MiB: attention, norms, routers, shared experts, \
                     output table) and a working margin of {:.0} MiB do not fit in the memory \
                     budget of {:.0} MiB; give it more memory (--mem, or a larger cgroup limit) \
                     or use a smaller model",
                    self.file.path().display(),
                    mib(dense),
                    mib(m),
                    mib(budget)
                ),
            ));
        }
        let file =
            std::fs::File::open(self.file.path()).map_err(|e| Error::io(self.file.path(), e))?;
        let pager = MmapPager::new(pageable(&self.file), file);
        // No read-around where pages come one by one or by our own requests: a fault in the
        // embedding table (a row per token) would otherwise read the kernel's whole window
        // (`read_ahead_kb`, 8 MiB on some disks: 8 MiB per new token, none of it accounted,
        // pushing the cgroup to its limit and the kernel to evict), and one in an expert would
        // read its neighbours. The experts are read whole by `will_need`.
        if !self.config.tie_word_embeddings {
            pager.no_read_around(Range::pages(emb.offset, emb.nbytes));
        }
        for &r in &ranges {
            pager.no_read_around(r);
        }
        // the dense part: every tensor outside the experts and the embedding table
        let mut is_expert = vec![false; self.file.tensors().len()];
        for lw in &self.layers {
            if let FfnWeights::Moe { experts, .. } = &lw.ffn {
                for w in experts.iter().flatten() {
                    is_expert[w.index()] = true;
                }
            }
        }
        if !self.config.tie_word_embeddings {
            is_expert[self.tok_embeddings.index()] = true;
        }
        for (i, t) in self.file.tensors().iter().enumerate() {
            if is_expert[i] || t.nbytes == 0 {
                continue;
            }
            let r = Range::pages(t.offset, t.nbytes);
            pager.will_need(r);
            if opts.mlock {
                pager.lock(r)?;
            }
        }
        let n_experts = self.config.num_experts;
        let pager: Box<dyn Pager> = Box::new(BackgroundDrops::new(std::sync::Arc::new(pager)));
        let mut res = Residency::new(ranges, n_experts, budget - dense - m, dense, budget, pager);
        res.slot_of = slot_of;
        res.prefetch = !opts.no_prefetch;
        res.predict = opts.predict;
        // the experts already in memory stay (a known start: the others are dropped)
        res.adopt_resident();
        self.residency = Some(res);
        Ok(true)
    }
}
