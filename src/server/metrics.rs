//! Counters for `GET /metrics` (Prometheus text exposition format 0.0.4).

use std::fmt::Write;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;

/// Upper bounds (seconds) of the time-to-first-token histogram buckets.
const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A histogram with fixed buckets, lock-free.
pub struct Histogram {
    counts: [AtomicU64; TTFT_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, secs: f64) {
        for (b, c) in TTFT_BUCKETS.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }
}

/// Everything `/metrics` reports.
pub struct Metrics {
    pub requests_chat: AtomicU64,
    pub requests_completion: AtomicU64,
    pub requests_other: AtomicU64,
    /// Requests answered with an error status.
    pub errors: AtomicU64,
    /// Refused because the queue was full (503).
    pub rejected: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub timeouts: AtomicU64,
    /// Prompt tokens run through the model (cached ones not counted).
    pub prompt_tokens: AtomicU64,
    pub gen_tokens: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub queue_depth: AtomicU64,
    pub slots_busy: AtomicU64,
    pub ttft: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let z = || AtomicU64::new(0);
        Metrics {
            requests_chat: z(),
            requests_completion: z(),
            requests_other: z(),
            errors: z(),
            rejected: z(),
            completed: z(),
            cancelled: z(),
            timeouts: z(),
            prompt_tokens: z(),
            gen_tokens: z(),
            cache_hits: z(),
            cached_tokens: z(),
            queue_depth: z(),
            slots_busy: z(),
            ttft: Histogram::new(),
        }
    }
}

impl Metrics {
    /// The Prometheus text of all metrics; `slots` is the number of slots.
    pub fn render(&self, slots: usize) -> String {
        let mut s = String::with_capacity(4096);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP ferroq_{name} {help}");
            let _ = writeln!(s, "# TYPE ferroq_{name} {kind}");
            let _ = writeln!(s, "ferroq_{name} {v}");
        };
        one(
            "requests_errors_total",
            "counter",
            "Requests answered with an error status.",
            self.errors.load(Relaxed),
        );
        one(
            "requests_rejected_total",
            "counter",
            "Requests refused with 503 because the queue was full.",
            self.rejected.load(Relaxed),
        );
        one(
            "requests_completed_total",
            "counter",
            "Generations that ran to their end.",
            self.completed.load(Relaxed),
        );
        one(
            "requests_cancelled_total",
            "counter",
            "Generations stopped because the client disconnected.",
            self.cancelled.load(Relaxed),
        );
        one(
            "requests_timeout_total",
            "counter",
            "Generations stopped by the request timeout.",
            self.timeouts.load(Relaxed),
        );
        one(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens run through the model (prompt-cache hits not counted).",
            self.prompt_tokens.load(Relaxed),
        );
        one(
            "generated_tokens_total",
            "counter",
            "Tokens generated.",
            self.gen_tokens.load(Relaxed),
        );
        one(
            "prompt_cache_hits_total",
            "counter",
            "Requests that reused a cached prefix of a slot's KV cache.",
            self.cache_hits.load(Relaxed),
        );
        one(
            "prompt_cache_tokens_total",
            "counter",
            "Prompt tokens taken from the prompt cache.",
            self.cached_tokens.load(Relaxed),
        );
        one(
            "queue_depth",
            "gauge",
            "Requests waiting for a free slot.",
            self.queue_depth.load(Relaxed),
        );
        one(
            "slots_busy",
            "gauge",
            "Slots running a request.",
            self.slots_busy.load(Relaxed),
        );
        one("slots", "gauge", "Slots (--parallel).", slots as u64);
        let _ = writeln!(s, "# HELP ferroq_requests_total HTTP requests by endpoint.");
        let _ = writeln!(s, "# TYPE ferroq_requests_total counter");
        for (e, c) in [
            ("chat_completions", &self.requests_chat),
            ("completions", &self.requests_completion),
            ("other", &self.requests_other),
        ] {
            let _ = writeln!(
                s,
                "ferroq_requests_total{{endpoint=\"{e}\"}} {}",
                c.load(Relaxed)
            );
        }
        let h = &self.ttft;
        let name = "ferroq_time_to_first_token_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Time from a request taking a slot to its first generated token."
        );
        let _ = writeln!(s, "# TYPE {name} histogram");
        for (b, c) in TTFT_BUCKETS.iter().zip(&h.counts) {
            let _ = writeln!(s, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Relaxed));
        }
        let n = h.count.load(Relaxed);
        let _ = writeln!(s, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(s, "{name}_sum {}", h.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(s, "{name}_count {n}");
        s
    }
}
