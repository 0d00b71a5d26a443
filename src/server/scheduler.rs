//! The scheduler: one thread that owns the model's working state and `N` slots (sequences, each
//! with its own KV cache), admits queued requests into free slots, and runs steps. One step is
//! the next token of every decoding slot plus a chunk of the prompt of
//! slots still reading theirs (chunked prefill: a long prompt never stalls the others for more
//! than one chunk), handed to [`MultiState::forward`] as one forward pass (the weights are read
//! once per step for all slots; see `docs/server.md`).
//!
//! A request talks to its HTTP handler through an unbounded channel of [`Event`]s. When the
//! handler goes away (the client disconnected), the channel closes and the slot is freed before
//! the next step. A free slot keeps its KV cache and the ids in it: the next request picks the
//! free slot with the longest common prefix and only runs the rest (prompt caching).

use std::collections::VecDeque;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::engine::Engine;
use crate::grammar::{Grammar, GrammarMatcher};
use crate::model::{BatchSeg, KvType, MultiState};
use crate::sampling::{Sampler, SamplerConfig, Stop, StopCondition};
use crate::Result;

/// One generation request, ready to run: ids and settings already validated.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    pub stop_strings: Vec<String>,
    /// `Some(k)`: report the log-probability of each generated token and its `k` best
    /// alternatives.
    pub logprobs: Option<usize>,
    /// Structured output (`response_format`): the output is kept a valid prefix of a value of
    /// this grammar, and ends with a stop token only where the value is complete.
    pub grammar: Option<Arc<Grammar>>,
    /// When the request arrived (time to first token counts from here).
    pub received: Instant,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
}

/// A log-probability (natural log, of the model's distribution before sampling settings).
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The `k` most likely tokens, best first.
    pub top: Vec<(u32, f32)>,
}

/// Why a generation ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Stop token or stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the scheduler tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// One generated token (`id` is `None` for text held back until the end) and the text it
    /// completes (possibly empty).
    Token {
        id: Option<u32>,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// The generation ended.
    Done {
        finish: Finish,
        prompt_tokens: usize,
        cached_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed (timeout, internal error): HTTP status and message.
    Error { status: u16, message: String },
}

/// Scheduler settings.
#[derive(Clone, Debug)]
pub struct SchedConfig {
    pub slots: usize,
    /// Context per slot in tokens.
    pub ctx: usize,
    /// Most rows (tokens of all sequences) one forward pass takes.
    pub batch: usize,
    pub threads: usize,
    pub kv: Option<KvType>,
    /// Most requests waiting for a slot; more are refused (503).
    pub queue: usize,
}

struct Queue {
    jobs: VecDeque<Job>,
    shutdown: bool,
}

struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
}

/// The handle the HTTP side holds.
pub struct Scheduler {
    shared: Arc<Shared>,
    queue_max: usize,
    metrics: Arc<Metrics>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub ctx: usize,
    pub slots: usize,
    /// Bytes of KV cache per slot.
    pub slot_bytes: usize,
}

/// The queue is full: try again later.
#[derive(Debug)]
pub struct Busy;

impl Scheduler {
    /// Allocate the slots and start the scheduler thread.
    pub fn start(engine: Arc<Engine>, cfg: &SchedConfig, metrics: Arc<Metrics>) -> Result<Self> {
        let slots = cfg.slots.max(1);
        let ms = MultiState::new(
            engine.model(),
            slots,
            cfg.ctx,
            cfg.batch,
            cfg.threads,
            cfg.kv.unwrap_or(engine.model().default_kv()),
        )?;
        let slot_bytes = ms.kv_bytes_per_seq();
        let shared = Arc::new(Shared {
            q: Mutex::new(Queue {
                jobs: VecDeque::new(),
                shutdown: false,
            }),
            cv: Condvar::new(),
        });
        let vocab = engine.model().config.vocab_size;
        let mut worker = Worker {
            slots: (0..slots).map(|_| Slot::new(cfg.ctx)).collect(),
            engine,
            ms,
            shared: shared.clone(),
            metrics: metrics.clone(),
            batch: cfg.batch.max(1),
            tokens: Vec::with_capacity(cfg.batch.max(1)),
            segs: Vec::with_capacity(slots),
            seg_slot: Vec::with_capacity(slots),
            order: Vec::with_capacity(slots),
            logits: vec![0.0; vocab],
            raw: vec![0.0; vocab],
            clock: 0,
        };
        let thread = std::thread::Builder::new()
            .name("ferroq-scheduler".into())
            .spawn(move || worker.run())
            .map_err(|e| crate::Error::Other(format!("starting the scheduler thread: {e}")))?;
        Ok(Scheduler {
            shared,
            queue_max: cfg.queue,
            metrics,
            thread: Mutex::new(Some(thread)),
            ctx: cfg.ctx,
            slots,
            slot_bytes,
        })
    }

    /// Queue a job; [`Busy`] when the queue is full.
    pub fn submit(&self, job: Job) -> std::result::Result<(), Busy> {
        let mut q = self.shared.q.lock().unwrap_or_else(|e| e.into_inner());
        // waiting room: the queue plus the slots that are free right now (jobs not yet taken
        // by the scheduler thread may sit in the queue while slots are free)
        let free = self
            .slots
            .saturating_sub(self.metrics.slots_busy.load(Relaxed) as usize);
        if q.jobs.len() >= self.queue_max + free || q.shutdown {
            return Err(Busy);
        }
        q.jobs.push_back(job);
        self.metrics.queue_depth.store(q.jobs.len() as u64, Relaxed);
        drop(q);
        self.shared.cv.notify_one();
        Ok(())
    }

    /// Stop the thread (requests in flight end).
    pub fn shutdown(&self) {
        self.shared
            .q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .shutdown = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Text decoding of generated ids, owned by a slot (the tokenizer's stream decoder borrows
/// the tokenizer): bytes of a character split over tokens are held until it is complete.
#[derive(Default)]
struct Utf8Stream {
    buf: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8], out: &mut String, last: bool) {
        self.buf.extend_from_slice(bytes);
        crate::tokenizer::drain_utf8(&mut self.buf, out, last);
    }
}

enum Phase {
    Free,
    /// Reading the prompt: `done` of its ids are in the cache.
    Prefill,
    /// Generating: the last sampled id still has to run.
    Decode(u32),
}

struct Active {
    job: Job,
    sampler: Sampler,
    stop: StopCondition,
    dec: Utf8Stream,
    /// The structured-output state of this request (masks the slot's logits before sampling).
    matcher: Option<GrammarMatcher>,
    generated: usize,
    cached_tokens: usize,
    started: Instant,
    first_token: bool,
}

struct Slot {
    phase: Phase,
    /// Ids whose keys/values are in this slot's cache, then the ids still to run
    /// (`ids[..pos]` cached, `ids[pos..]` pending prompt).
    ids: Vec<u32>,
    pos: usize,
    active: Option<Active>,
    /// When the slot was last used (free slots of equal prefix: the least recent is taken).
    used: u64,
}

impl Slot {
    fn new(ctx: usize) -> Slot {
        Slot {
            phase: Phase::Free,
            ids: Vec::with_capacity(ctx),
            pos: 0,
            active: None,
            used: 0,
        }
    }
}

struct Worker {
    engine: Arc<Engine>,
    ms: MultiState,
    slots: Vec<Slot>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    batch: usize,
    // per-step buffers, reused
    tokens: Vec<u32>,
    segs: Vec<BatchSeg>,
    seg_slot: Vec<usize>,
    /// Slots reading their prompts, in arrival order.
    order: Vec<(u64, usize)>,
    logits: Vec<f32>,
    /// The logits before sampling changed them (for log-probabilities).
    raw: Vec<f32>,
    clock: u64,
}

fn send(a: &Active, ev: Event) -> bool {
    a.job.events.send(ev).is_ok()
}

impl Worker {
    fn run(&mut self) {
        loop {
            if !self.admit() {
                return;
            }
            self.reap();
            if let Err(e) = self.step() {
                // an engine error ends every active request; the server keeps serving
                let msg = format!("inference failed: {e}");
                for i in 0..self.slots.len() {
                    self.finish_err(i, 500, &msg);
                    self.slots[i].pos = 0;
                    self.slots[i].ids.clear();
                    self.ms.truncate(i, 0);
                }
            }
        }
    }

    fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.active.is_some()).count()
    }

    /// Move queued jobs into free slots; wait while there is nothing to do. `false` on shutdown.
    fn admit(&mut self) -> bool {
        let shared = self.shared.clone();
        let mut q = shared.q.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if q.shutdown {
                return false;
            }
            while !q.jobs.is_empty() && self.busy() < self.slots.len() {
                let job = q.jobs.pop_front().expect("not empty");
                self.metrics.queue_depth.store(q.jobs.len() as u64, Relaxed);
                if job.events.is_closed() {
                    continue; // the client left while queued
                }
                if Instant::now() >= job.deadline {
                    let _ = job.events.send(Event::Error {
                        status: 504,
                        message: "the request timed out while waiting for a free slot".into(),
                    });
                    continue;
                }
                self.assign(job);
            }
            if self.busy() > 0 {
                return true;
            }
            // idle: wait for work (with a timeout, to notice shutdown in any case)
            q = shared
                .cv
                .wait_timeout(q, Duration::from_millis(500))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Put `job` into the free slot whose cache shares the longest prefix with its prompt.
    fn assign(&mut self, job: Job) {
        let p = &job.prompt;
        let (best, common) = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active.is_none())
            .map(|(i, s)| {
                let c = s.ids[..s.pos]
                    .iter()
                    .zip(p)
                    .take_while(|(a, b)| a == b)
                    .count();
                (i, c, s.used)
            })
            .max_by(|a, b| a.1.cmp(&b.1).then(b.2.cmp(&a.2)))
            .map(|(i, c, _)| (i, c))
            .expect("a free slot");
        // at least one prompt token runs, to produce the logits; a model with chunked attention
        // may keep less than the common prefix (its ring layers hold only the last chunk)
        let keep = self
            .ms
            .truncate(best, common.min(p.len().saturating_sub(1)));
        self.clock += 1;
        let vocab = self.engine.model().config.vocab_size;
        let s = &mut self.slots[best];
        s.used = self.clock;
        s.ids.truncate(keep);
        s.ids.extend_from_slice(&p[keep..]);
        s.pos = keep;
        s.phase = Phase::Prefill;
        if keep > 0 {
            self.metrics.cache_hits.fetch_add(1, Relaxed);
            self.metrics.cached_tokens.fetch_add(keep as u64, Relaxed);
        }
        self.metrics
            .prompt_tokens
            .fetch_add((p.len() - keep) as u64, Relaxed);
        let stop = StopCondition::new(self.engine.stop_ids().to_vec(), job.stop_strings.clone());
        // the token index is built once per engine (on first use) and shared by every slot
        let matcher = job
            .grammar
            .as_ref()
            .map(|g| GrammarMatcher::new(g.clone(), self.engine.token_index()));
        s.active = Some(Active {
            matcher,
            sampler: Sampler::new(job.sampler.clone(), vocab),
            stop,
            dec: Utf8Stream::default(),
            generated: 0,
            cached_tokens: keep,
            started: job.received,
            first_token: true,
            job,
        });
        self.metrics.slots_busy.fetch_add(1, Relaxed);
    }

    /// Free the slot (its cache stays for prompt caching).
    fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if s.active.take().is_some() {
            self.metrics.slots_busy.fetch_sub(1, Relaxed);
        }
        s.phase = Phase::Free;
        s.ids.truncate(s.pos);
    }

    fn finish_err(&mut self, i: usize, status: u16, msg: &str) {
        if let Some(a) = &self.slots[i].active {
            send(
                a,
                Event::Error {
                    status,
                    message: msg.to_string(),
                },
            );
        }
        self.release(i);
    }

    /// Free the slots of requests whose client left or whose time is up.
    fn reap(&mut self) {
        let now = Instant::now();
        for i in 0..self.slots.len() {
            let Some(a) = &self.slots[i].active else {
                continue;
            };
            if a.job.events.is_closed() {
                // the slot first, then the count: a reader that sees the cancellation also
                // sees the slot free
                self.release(i);
                self.metrics.cancelled.fetch_add(1, Relaxed);
            } else if now >= a.job.deadline {
                self.metrics.timeouts.fetch_add(1, Relaxed);
                self.finish_err(i, 504, "the request timed out (server --timeout)");
            }
        }
    }

    /// One forward pass over every active slot, then sampling for those whose logits are ready.
    fn step(&mut self) -> Result<()> {
        self.tokens.clear();
        self.segs.clear();
        self.seg_slot.clear();
        // decode rows first: one token for each generating slot
        for (i, s) in self.slots.iter().enumerate() {
            if let Phase::Decode(id) = s.phase {
                self.segs.push(BatchSeg {
                    seq: i,
                    start: self.tokens.len(),
                    len: 1,
                    logits: true,
                });
                self.tokens.push(id);
                self.seg_slot.push(i);
            }
        }
        // then prompt chunks in the order the slots were assigned, within the row budget
        self.order.clear();
        let prefilling = self.slots.iter().enumerate();
        self.order.extend(
            prefilling
                .filter(|(_, s)| matches!(s.phase, Phase::Prefill))
                .map(|(i, s)| (s.used, i)),
        );
        self.order.sort_unstable();
        for &(_, i) in &self.order {
            let budget = self.batch.saturating_sub(self.tokens.len());
            if budget == 0 {
                break;
            }
            let s = &self.slots[i];
            let rest = &s.ids[s.pos..];
            let n = rest.len().min(budget);
            self.segs.push(BatchSeg {
                seq: i,
                start: self.tokens.len(),
                len: n,
                logits: n == rest.len(),
            });
            self.tokens.extend_from_slice(&rest[..n]);
            self.seg_slot.push(i);
        }
        if self.segs.is_empty() {
            return Ok(());
        }
        self.ms
            .forward(self.engine.model(), &self.tokens, &self.segs)?;
        // sample where logits came out (in segment order: the k-th segment with logits)
        let mut k = 0;
        for j in 0..self.segs.len() {
            let seg = self.segs[j];
            let i = self.seg_slot[j];
            self.slots[i].pos += seg.len;
            if let Phase::Decode(id) = self.slots[i].phase {
                self.slots[i].ids.push(id);
                self.slots[i].pos = self.slots[i].ids.len();
            }
            if !seg.logits {
                continue;
            }
            let l = self.ms.logits(k);
            k += 1;
            let n = l.len().min(self.logits.len());
            self.logits[..n].copy_from_slice(&l[..n]);
            self.sample(i);
        }
        Ok(())
    }

    /// Sample the next token of slot `i` from `self.logits` and tell its client.
    fn sample(&mut self, i: usize) {
        let ctx = self.ms.ctx();
        let engine = self.engine.clone();
        let tok = engine.tokenizer();
        let s = &mut self.slots[i];
        let a = s.active.as_mut().expect("an active slot");
        if a.first_token {
            a.first_token = false;
            self.metrics.ttft.observe(a.started.elapsed().as_secs_f64());
        }
        let want_lp = a.job.logprobs;
        if want_lp.is_some() {
            self.raw.copy_from_slice(&self.logits);
        }
        // no token can continue: complete without a stop id, or a nesting dead end
        let dead_end = a.matcher.as_mut().map(|m| (m.any_allowed(), m.can_end()));
        if let Some((false, complete)) = dead_end {
            let finish = if complete {
                Finish::Stop
            } else {
                Finish::Length
            };
            let mut rest = String::new();
            a.dec.push(&[], &mut rest, true);
            a.stop.finish(&mut rest);
            self.end(i, rest, None, finish);
            return;
        }
        let mask = a.matcher.as_mut().map(|m| m.mask());
        let id = a.sampler.sample_masked(&mut self.logits, &s.ids, mask);
        let lp = want_lp.map(|k| logprob_of(&self.raw, id, k));
        if let Some(m) = a.matcher.as_mut() {
            if let Err(e) = m.accept_token(id) {
                // cannot happen (the id came from the mask); end the request, not the server
                let msg = format!("structured output: {e}");
                self.finish_err(i, 500, &msg);
                return;
            }
        }
        if a.stop.is_stop_id(id) {
            let mut rest = String::new();
            a.dec.push(&[], &mut rest, true);
            a.stop.finish(&mut rest);
            self.end(i, rest, None, Finish::Stop);
            return;
        }
        a.generated += 1;
        self.metrics.gen_tokens.fetch_add(1, Relaxed);
        let mut piece = String::new();
        if !(tok.is_special(id)) {
            if let Some(b) = tok.id_to_bytes(id) {
                a.dec.push(b, &mut piece, false);
            }
        }
        let mut shown = String::with_capacity(piece.len());
        let st = a.stop.push_text(&piece, &mut shown);
        if st == Stop::String {
            self.end(i, String::new(), Some((id, shown, lp)), Finish::Stop);
            return;
        }
        // a complete value that takes no more text ends here (the stop token would be the only
        // choice), even on the last token of the budget
        if a.matcher.as_mut().is_some_and(|m| m.is_done()) {
            let mut rest = String::new();
            a.dec.push(&[], &mut rest, true);
            a.stop.finish(&mut rest);
            self.end(i, rest, Some((id, shown, lp)), Finish::Stop);
            return;
        }
        let full = s.ids.len() >= ctx;
        if a.generated >= a.job.max_tokens || full {
            let mut rest = String::new();
            a.dec.push(&[], &mut rest, true);
            a.stop.finish(&mut rest);
            self.end(i, rest, Some((id, shown, lp)), Finish::Length);
            return;
        }
        if !send(
            a,
            Event::Token {
                id: Some(id),
                text: shown,
                logprob: lp,
            },
        ) {
            self.release(i);
            self.metrics.cancelled.fetch_add(1, Relaxed);
            return;
        }
        s.phase = Phase::Decode(id);
    }

    /// End slot `i`'s generation: the last token (if any), held-back text, then `Done`.
    fn end(
        &mut self,
        i: usize,
        rest: String,
        last: Option<(u32, String, Option<TokenLogprob>)>,
        finish: Finish,
    ) {
        if let Some(a) = &self.slots[i].active {
            if let Some((id, text, logprob)) = last {
                send(
                    a,
                    Event::Token {
                        id: Some(id),
                        text,
                        logprob,
                    },
                );
            }
            if !rest.is_empty() {
                send(
                    a,
                    Event::Token {
                        id: None,
                        text: rest,
                        logprob: None,
                    },
                );
            }
            send(
                a,
                Event::Done {
                    finish,
                    prompt_tokens: a.job.prompt.len(),
                    cached_tokens: a.cached_tokens,
                    completion_tokens: a.generated,
                },
            );
            self.metrics.completed.fetch_add(1, Relaxed);
        }
        self.release(i);
    }
}

/// Log-probability of `id` under `softmax(logits)` and the `k` most likely tokens.
fn logprob_of(logits: &[f32], id: u32, k: usize) -> TokenLogprob {
    let max = logits
        .iter()
        .copied()
        .filter(|x| !x.is_nan())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|x| !x.is_nan())
        .map(|&x| ((x - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    let lp = |x: f32| (x as f64 - lse) as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (j, &x) in logits.iter().enumerate() {
            if x.is_nan() {
                continue;
            }
            if top.len() < k || x > top[top.len() - 1].1 {
                let at = top.partition_point(|&(_, y)| y >= x);
                top.insert(at, (j as u32, x));
                top.truncate(k);
            }
        }
    }
    TokenLogprob {
        id,
        logprob: logits
            .get(id as usize)
            .map_or(f32::NEG_INFINITY, |&x| lp(x)),
        top: top.into_iter().map(|(j, x)| (j, lp(x))).collect(),
    }
}
