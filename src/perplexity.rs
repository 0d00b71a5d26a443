//! Perplexity and KL divergence of a model on a text, computed like llama.cpp's
//! `llama-perplexity` so that numbers compare one to one:
//!
//! - the text is tokenized once (BOS first when the model adds one) and cut into
//!   `n_ctx`-token chunks (`tokens / n_ctx` of them, at least 2 × `n_ctx` tokens needed);
//! - each chunk runs from an empty cache, its first token replaced by BOS when the model adds
//!   one;
//! - only the second half is scored: the logits at positions `n_ctx/2 .. n_ctx-1` predict the
//!   tokens after them (`n_ctx - 1 - n_ctx/2` tokens per chunk);
//! - PPL = exp(mean NLL), ± PPL · sqrt(var(NLL) / (count − 1)).
//!
//! KL divergence compares a model with the log-probabilities of a reference model saved by
//! [`KldWriter`] in llama.cpp's `--kl-divergence-base` file format (so files interchange):
//!
//! ```text
//! "_logits_"                       8 bytes
//! n_ctx  u32, n_vocab i32, n_chunk i32   (little endian)
//! tokens i32 × n_chunk·n_ctx       the evaluated tokens (before the BOS substitution)
//! per chunk, per scored position (n_ctx − 1 − n_ctx/2 of them), nv = 2·⌈n_vocab/2⌉ + 4 u16:
//!   f32 scale, f32 min_log_prob    (the first 4 u16)
//!   u16 q[n_vocab] (+1 pad if odd)  log p[i] ≈ scale · q[i] + min_log_prob
//! ```
//!
//! The log-probabilities are kept within 16 nats of the top one (lower ones are stored as that
//! floor), quantized to 16 bits over that range: an error of at most 16/65535/2 ≈ 1.2e-4 nats.
//! The file takes `2 · nv` bytes per scored token: 100 KB for a 49k vocabulary, 400 KB for
//! Llama 4's 202k (20 chunks of 512: 0.5 GB and 2 GB).

use std::io::{Read, Write};
use std::path::Path;

use crate::model::{KvType, Logits, Model, State};
use crate::{Error, Result};

/// The magic of a log-probability file.
pub const KLD_MAGIC: &[u8; 8] = b"_logits_";

/// Floor of the stored log-probabilities below the top one (llama.cpp's 16 nats).
const LOG_PROB_RANGE: f32 = 16.0;

/// How a text is cut into chunks and scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    /// Tokens per chunk.
    pub n_ctx: usize,
    /// Chunks evaluated.
    pub n_chunk: usize,
}

impl ChunkPlan {
    /// The plan of `n_tokens` tokens in chunks of `n_ctx`, at most `max_chunks` of them.
    /// Like llama.cpp, at least `2 · n_ctx` tokens are needed.
    pub fn new(n_tokens: usize, n_ctx: usize, max_chunks: Option<usize>) -> Result<ChunkPlan> {
        if n_ctx < 4 {
            return Err(Error::Input(format!(
                "context {n_ctx} is too small to score half a chunk (at least 4)"
            )));
        }
        if n_tokens < 2 * n_ctx {
            return Err(Error::Input(format!(
                "the text tokenizes to {n_tokens} tokens; a context of {n_ctx} needs at least {} \
                 (use a longer text or a smaller -c)",
                2 * n_ctx
            )));
        }
        let n_chunk = (n_tokens / n_ctx).min(max_chunks.unwrap_or(usize::MAX));
        if n_chunk == 0 {
            return Err(Error::Input("--chunks 0 evaluates nothing".into()));
        }
        Ok(ChunkPlan { n_ctx, n_chunk })
    }

    /// The first scored position of a chunk (its logits predict the token after it).
    pub fn first(&self) -> usize {
        self.n_ctx / 2
    }

    /// Scored tokens per chunk.
    pub fn scored(&self) -> usize {
        self.n_ctx - 1 - self.first()
    }
}

/// Sums of the negative log-likelihoods of scored tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NllStats {
    pub sum: f64,
    pub sum2: f64,
    pub count: usize,
}

impl NllStats {
    pub fn add(&mut self, nll: f64) {
        self.sum += nll;
        self.sum2 += nll * nll;
        self.count += 1;
    }

    /// exp(mean NLL).
    pub fn ppl(&self) -> f64 {
        (self.sum / self.count.max(1) as f64).exp()
    }

    /// The ± of llama.cpp's final estimate: PPL · sqrt(var / (count − 1)), `None` when the
    /// variance is not positive.
    pub fn ppl_err(&self) -> Option<f64> {
        let n = self.count as f64;
        let mean = self.sum / n;
        let var = self.sum2 / n - mean * mean;
        (var > 0.0 && self.count > 1).then(|| (var / (n - 1.0)).sqrt() * self.ppl())
    }
}

/// max, index of the first max, and ln Σ exp(x − max) (f32 exponentials summed in f64, as
/// llama.cpp does).
fn max_lse(logits: &[f32]) -> (f32, usize, f64) {
    let mut max = logits[0];
    let mut imax = 0;
    for (i, &x) in logits.iter().enumerate().skip(1) {
        if x > max {
            max = x;
            imax = i;
        }
    }
    let sum: f64 = logits.iter().map(|&x| (x - max).exp() as f64).sum();
    (max, imax, sum.ln())
}

/// −log softmax(logits)[tok].
pub fn nll(logits: &[f32], tok: usize) -> f64 {
    let (max, _, lse) = max_lse(logits);
    max as f64 + lse - logits[tok] as f64
}

/// Values per stored row of a log-probability file (u16 units).
pub fn row_len(n_vocab: usize) -> usize {
    2 * n_vocab.div_ceil(2) + 4
}

/// Quantize the log-softmax of `logits` into `row` ([`row_len`] u16) as llama.cpp does; returns
/// the NLL of `tok`.
pub fn encode_log_probs(logits: &[f32], tok: usize, row: &mut [u16]) -> f64 {
    let n = logits.len();
    let (max, _, lse) = max_lse(logits);
    let min = logits
        .iter()
        .fold(logits[0], |m, &x| m.min(x))
        .max(max - LOG_PROB_RANGE);
    let lse32 = lse as f32;
    let min_log_prob = min - max - lse32;
    let scale = (max - min) / 65535.0;
    row[0..2].copy_from_slice(&u16_pair(scale));
    row[2..4].copy_from_slice(&u16_pair(min_log_prob));
    let q = &mut row[4..4 + n];
    if scale > 0.0 {
        let inv = 1.0 / scale;
        for (o, &x) in q.iter_mut().zip(logits) {
            *o = if x > min {
                (inv * (x - min)).round_ties_even().clamp(0.0, 65535.0) as u16
            } else {
                0
            };
        }
    } else {
        q.fill(0);
    }
    row[4 + n..].fill(0);
    (max + lse32 - logits[tok]) as f64
}

fn u16_pair(x: f32) -> [u16; 2] {
    let b = x.to_le_bytes();
    [
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    ]
}

fn f32_of(p: &[u16]) -> f32 {
    let (a, b) = (p[0].to_le_bytes(), p[1].to_le_bytes());
    f32::from_le_bytes([a[0], a[1], b[0], b[1]])
}

/// Decoded log-probability `i` of a stored row.
pub fn decode_log_prob(row: &[u16], i: usize) -> f32 {
    f32_of(&row[0..2]) * row[4 + i] as f32 + f32_of(&row[2..4])
}

/// Running sums of a KL-divergence evaluation (llama.cpp's `kl_divergence_result`).
#[derive(Clone, Debug, Default)]
pub struct KldStats {
    pub nll: NllStats,
    pub nll_base: NllStats,
    pub sum_nll_nll_base: f64,
    pub sum_kld: f64,
    pub sum_kld2: f64,
    pub sum_p_diff: f64,
    pub sum_p_diff2: f64,
    pub sum_p_diff4: f64,
    pub max_p_diff: f32,
    pub n_same_top: usize,
    /// KL divergence of every scored token.
    pub kld_values: Vec<f32>,
    /// p(token) − p_base(token) of every scored token.
    pub p_diff_values: Vec<f32>,
}

impl KldStats {
    /// Add one scored position: the model's `logits`, the reference's stored `base` row, the
    /// actual next token `tok`. Returns (KL(base ‖ model), Δp).
    pub fn add(&mut self, logits: &[f32], base: &[u16], tok: usize) -> (f64, f32) {
        let (max, imax, lse) = max_lse(logits);
        let lse = lse as f32;
        let scale = f32_of(&base[0..2]);
        let min_log_prob = f32_of(&base[2..4]);
        let q = &base[4..4 + logits.len()];
        let nll = max + lse - logits[tok];
        let nll_base = -(scale * q[tok] as f32 + min_log_prob);
        self.nll.add(nll as f64);
        self.nll_base.add(nll_base as f64);
        self.sum_nll_nll_base += nll as f64 * nll_base as f64;
        let top = max + lse;
        let mut kld = 0f64;
        let mut imax_base = 0;
        let mut best = f32::NEG_INFINITY;
        for (i, (&qi, &x)) in q.iter().zip(logits).enumerate() {
            let lp_base = scale * qi as f32 + min_log_prob;
            if i == 0 || lp_base > best {
                best = lp_base;
                imax_base = i;
            }
            if lp_base > -LOG_PROB_RANGE {
                kld += (lp_base.exp() * (lp_base - x + top)) as f64;
            }
        }
        self.sum_kld += kld;
        self.sum_kld2 += kld * kld;
        if imax == imax_base {
            self.n_same_top += 1;
        }
        let p_diff = (-nll).exp() - (-nll_base).exp();
        self.sum_p_diff += p_diff as f64;
        let d2 = p_diff as f64 * p_diff as f64;
        self.sum_p_diff2 += d2;
        self.sum_p_diff4 += d2 * d2;
        self.max_p_diff = self.max_p_diff.max(p_diff.abs());
        self.kld_values.push(kld as f32);
        self.p_diff_values.push(p_diff);
        (kld, p_diff)
    }

    pub fn count(&self) -> usize {
        self.nll.count
    }

    /// The summary llama.cpp prints at the end.
    pub fn report(&self) -> KldReport {
        let n = self.count();
        let (lp, lp_err) = mean_and_uncertainty(self.nll.sum, self.nll.sum2, n);
        let (lb, lb_err) = mean_and_uncertainty(self.nll_base.sum, self.nll_base.sum2, n);
        let cov = covariance(self.nll.sum, self.nll_base.sum, self.sum_nll_nll_base, n);
        let (ppl, ppl_base) = (lp.exp(), lb.exp());
        let (ppl_err, ppl_base_err) = (ppl * lp_err, ppl_base * lb_err);
        let ratio_ln = lp - lb;
        let ratio_ln_err = (lp_err * lp_err + lb_err * lb_err - 2.0 * cov)
            .max(0.0)
            .sqrt();
        let ppl_cov = ppl * ppl_base * cov;
        let (kld, kld_err) = mean_and_uncertainty(self.sum_kld, self.sum_kld2, n);
        let (dp, dp_err) = mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, n);
        let (mse, mse_err) = mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, n);
        let rms = mse.sqrt();
        let same = self.n_same_top as f64 / n.max(1) as f64;
        let mut kv = self.kld_values.clone();
        let mut pv = self.p_diff_values.clone();
        kv.sort_by(f32::total_cmp);
        pv.sort_by(f32::total_cmp);
        KldReport {
            count: n,
            ppl: (ppl, ppl_err),
            ppl_base: (ppl_base, ppl_base_err),
            cor: if lp_err > 0.0 && lb_err > 0.0 {
                cov / (lp_err * lb_err)
            } else {
                0.0
            },
            ln_ratio: (ratio_ln, ratio_ln_err),
            ratio: (ratio_ln.exp(), ratio_ln.exp() * ratio_ln_err),
            diff: (
                ppl - ppl_base,
                (ppl_err * ppl_err + ppl_base_err * ppl_base_err - 2.0 * ppl_cov)
                    .max(0.0)
                    .sqrt(),
            ),
            kld: (kld, kld_err),
            kld_pct: KLD_PCTS.map(|f| (f, percentile(&kv, f))),
            kld_median: median(&kv),
            p_diff: (dp, dp_err),
            p_diff_pct: DP_PCTS.map(|f| (f, percentile(&pv, f))),
            p_diff_median: median(&pv),
            p_diff_rms: (rms, if rms > 0.0 { 0.5 / rms * mse_err } else { 0.0 }),
            same_top: (
                same,
                if n > 1 {
                    (same * (1.0 - same) / (n - 1) as f64).sqrt()
                } else {
                    0.0
                },
            ),
        }
    }
}

/// Percentiles of the KL divergence in the report (with the median separately).
pub const KLD_PCTS: [f32; 10] = [1.0, 0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001, 0.0];
/// Percentiles of Δp in the report.
pub const DP_PCTS: [f32; 12] = [
    1.0, 0.999, 0.99, 0.95, 0.90, 0.75, 0.25, 0.10, 0.05, 0.01, 0.001, 0.0,
];

/// The final statistics of a KL-divergence run; pairs are (value, uncertainty).
#[derive(Clone, Debug, PartialEq)]
pub struct KldReport {
    pub count: usize,
    pub ppl: (f64, f64),
    pub ppl_base: (f64, f64),
    /// Correlation of ln PPL(Q) and ln PPL(base).
    pub cor: f64,
    pub ln_ratio: (f64, f64),
    pub ratio: (f64, f64),
    pub diff: (f64, f64),
    pub kld: (f64, f64),
    pub kld_pct: [(f32, f32); 10],
    pub kld_median: f32,
    pub p_diff: (f64, f64),
    pub p_diff_pct: [(f32, f32); 12],
    pub p_diff_median: f32,
    pub p_diff_rms: (f64, f64),
    pub same_top: (f64, f64),
}

impl KldReport {
    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let pair = |p: (f64, f64)| serde_json::json!({"value": p.0, "err": p.1});
        let pcts = |v: &[(f32, f32)]| {
            serde_json::Value::Object(
                v.iter()
                    .map(|&(f, x)| (format!("{:.1}", f * 100.0), serde_json::json!(x)))
                    .collect(),
            )
        };
        serde_json::json!({
            "count": self.count,
            "ppl": pair(self.ppl),
            "ppl_base": pair(self.ppl_base),
            "cor_ln_ppl": self.cor,
            "ln_ppl_ratio": pair(self.ln_ratio),
            "ppl_ratio": pair(self.ratio),
            "ppl_diff": pair(self.diff),
            "kld": pair(self.kld),
            "kld_median": self.kld_median,
            "kld_percentiles": pcts(&self.kld_pct),
            "p_diff": pair(self.p_diff),
            "p_diff_median": self.p_diff_median,
            "p_diff_percentiles": pcts(&self.p_diff_pct),
            "p_diff_rms": pair(self.p_diff_rms),
            "same_top": pair(self.same_top),
        })
    }

    /// The report as text, laid out like llama.cpp's.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "====== Perplexity statistics ======");
        let _ = writeln!(
            s,
            "Mean PPL(Q)                   : {:10.6} ± {:10.6}",
            self.ppl.0, self.ppl.1
        );
        let _ = writeln!(
            s,
            "Mean PPL(base)                : {:10.6} ± {:10.6}",
            self.ppl_base.0, self.ppl_base.1
        );
        let _ = writeln!(
            s,
            "Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%",
            100.0 * self.cor
        );
        let _ = writeln!(
            s,
            "Mean ln(PPL(Q)/PPL(base))     : {:10.6} ± {:10.6}",
            self.ln_ratio.0, self.ln_ratio.1
        );
        let _ = writeln!(
            s,
            "Mean PPL(Q)/PPL(base)         : {:10.6} ± {:10.6}",
            self.ratio.0, self.ratio.1
        );
        let _ = writeln!(
            s,
            "Mean PPL(Q)-PPL(base)         : {:10.6} ± {:10.6}",
            self.diff.0, self.diff.1
        );
        let _ = writeln!(s, "\n====== KL divergence statistics ======");
        let _ = writeln!(s, "Mean    KLD: {:10.6} ± {:10.6}", self.kld.0, self.kld.1);
        for &(f, x) in &self.kld_pct {
            let _ = writeln!(s, "{}KLD: {x:10.6}", pct_label(f));
            if f == 0.90 {
                let _ = writeln!(s, "Median  KLD: {:10.6}", self.kld_median);
            }
        }
        let _ = writeln!(s, "\n====== Token probability statistics ======");
        let _ = writeln!(
            s,
            "Mean    Δp: {:6.3} ± {:5.3} %",
            100.0 * self.p_diff.0,
            100.0 * self.p_diff.1
        );
        for &(f, x) in &self.p_diff_pct {
            let _ = writeln!(s, "{}Δp: {:6.3}%", pct_label(f), 100.0 * x);
            if f == 0.75 {
                let _ = writeln!(s, "Median  Δp: {:6.3}%", 100.0 * self.p_diff_median);
            }
        }
        let _ = writeln!(
            s,
            "RMS Δp    : {:6.3} ± {:5.3} %",
            100.0 * self.p_diff_rms.0,
            100.0 * self.p_diff_rms.1
        );
        let _ = writeln!(
            s,
            "Same top p: {:6.3} ± {:5.3} %",
            100.0 * self.same_top.0,
            100.0 * self.same_top.1
        );
        s
    }
}

fn pct_label(f: f32) -> String {
    match f {
        1.0 => "Maximum ".into(),
        0.0 => "Minimum ".into(),
        _ => format!("{:4.1}%   ", f * 100.0),
    }
}

/// (mean, uncertainty of the mean) as llama.cpp computes them (0 uncertainty for ≤ 10 values).
pub fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    if count < 1 {
        return (0.0, 0.0);
    }
    let n = count as f64;
    let f = sum / n;
    let df = sum2 / n - f * f;
    (
        f,
        if df > 0.0 && count > 10 {
            (df / (n - 1.0)).sqrt()
        } else {
            0.0
        },
    )
}

/// Covariance of the means of two series from their sums (0 for fewer than 10 values).
pub fn covariance(suma: f64, sumb: f64, sumab: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sumab / n - (suma / n) * (sumb / n)) / (n - 1.0)
}

/// Linear-interpolated percentile of sorted values (llama.cpp's).
pub fn percentile(sorted: &[f32], fraction: f32) -> f32 {
    if sorted.is_empty() {
        return f32::NAN;
    }
    if fraction <= 0.0 {
        return sorted[0];
    }
    if fraction >= 1.0 {
        return sorted[sorted.len() - 1];
    }
    let p = fraction * (sorted.len() - 1) as f32;
    let ip = p as usize;
    let p = p - ip as f32;
    (1.0 - p) * sorted[ip] + p * sorted[(ip + 1).min(sorted.len() - 1)]
}

/// Median of sorted values.
pub fn median(sorted: &[f32]) -> f32 {
    let n = sorted.len();
    match n {
        0 => f32::NAN,
        _ if n.is_multiple_of(2) => 0.5 * (sorted[n / 2] + sorted[n / 2 - 1]),
        _ => sorted[n / 2],
    }
}

/// How to run the chunks.
#[derive(Clone, Copy, Debug)]
pub struct RunOptions {
    /// Tokens per forward call (1 ..= n_ctx).
    pub batch: usize,
    /// Threads (0 = all cores).
    pub threads: usize,
    /// KV cache type.
    pub kv: KvType,
    /// The token that replaces each chunk's first one (the model's BOS when it adds one).
    pub bos: Option<u32>,
}

/// Run every chunk of `plan` over `tokens` and call `each(chunk, chunk_tokens, logits)` with the
/// chunk's tokens (as in the text) and the logits of its scored positions
/// (`plan.scored() × vocab`, row `r` predicts `chunk_tokens[first + r + 1]`).
pub fn run_chunks(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    opt: &RunOptions,
    mut each: impl FnMut(usize, &[u32], &[f32]) -> Result<()>,
) -> Result<()> {
    let (first, v) = (plan.first(), model.config.vocab_size);
    let rows = plan.scored();
    let mut logits = Vec::new();
    logits
        .try_reserve_exact(rows * v)
        .map_err(|_| Error::Input(format!("cannot allocate {rows} × {v} logits")))?;
    logits.resize(rows * v, 0f32);
    for_each_batch(model, tokens, plan, opt, |st, b| {
        let p1 = b.p0 + b.input.len();
        // positions first .. n_ctx - 2 are scored; batches wholly before them need no logits
        let want = if p1 <= first {
            Logits::None
        } else {
            Logits::All
        };
        model.forward(st, b.input, want)?;
        if want == Logits::All {
            let out = st.logits();
            for p in b.p0.max(first)..p1.min(first + rows) {
                let r = p - first;
                logits[r * v..(r + 1) * v]
                    .copy_from_slice(&out[(p - b.p0) * v..(p - b.p0 + 1) * v]);
            }
        }
        if b.last {
            each(b.chunk, b.tokens, &logits)?;
        }
        Ok(())
    })
}

/// One forward batch of a chunk, as [`for_each_batch`] hands them out.
pub struct Batch<'a> {
    /// Index of the chunk.
    pub chunk: usize,
    /// The chunk's tokens (as in the text: the first is not replaced by the BOS).
    pub tokens: &'a [u32],
    /// Position of the batch's first token in the chunk.
    pub p0: usize,
    /// The batch's input ids (the chunk's first one replaced by `opt.bos`).
    pub input: &'a [u32],
    /// Whether this batch ends the chunk.
    pub last: bool,
}

/// Feed the chunks of `plan` to `step` in batches of `opt.batch` tokens, as llama-perplexity
/// does: each chunk from an empty cache, its first token replaced by `opt.bos`. `step` runs
/// the forward pass of the batch on the state it is given (with the logits and probe it needs).
pub fn for_each_batch(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    opt: &RunOptions,
    mut step: impl FnMut(&mut State, Batch<'_>) -> Result<()>,
) -> Result<()> {
    let n_ctx = plan.n_ctx;
    if tokens.len() < plan.n_chunk * n_ctx {
        return Err(Error::Input(format!(
            "{} tokens are fewer than {} chunks of {n_ctx}",
            tokens.len(),
            plan.n_chunk
        )));
    }
    let batch = opt.batch.clamp(1, n_ctx);
    let mut st = State::try_with_kv(model, n_ctx, batch, true, opt.threads, opt.kv)?;
    let mut input = vec![0u32; batch];
    for c in 0..plan.n_chunk {
        let chunk = &tokens[c * n_ctx..(c + 1) * n_ctx];
        st.truncate(0);
        let mut p0 = 0;
        while p0 < n_ctx {
            let p1 = (p0 + batch).min(n_ctx);
            let inp = &mut input[..p1 - p0];
            inp.copy_from_slice(&chunk[p0..p1]);
            if p0 == 0 {
                if let Some(b) = opt.bos {
                    inp[0] = b;
                }
            }
            let b = Batch {
                chunk: c,
                tokens: chunk,
                p0,
                input: inp,
                last: p1 == n_ctx,
            };
            step(&mut st, b)?;
            p0 = p1;
        }
    }
    Ok(())
}

/// Perplexity of `tokens`; `progress(chunk, running PPL)` after each chunk.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    opt: &RunOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<NllStats> {
    let v = model.config.vocab_size;
    let first = plan.first();
    let mut s = NllStats::default();
    run_chunks(model, tokens, plan, opt, |c, chunk, logits| {
        for (r, row) in logits.chunks_exact(v).enumerate() {
            s.add(nll(row, chunk[first + r + 1] as usize));
        }
        progress(c, s.ppl());
        Ok(())
    })?;
    Ok(s)
}

/// Writes a log-probability file (see the module documentation).
pub struct KldWriter<W: Write> {
    out: W,
    row: Vec<u16>,
    bytes: Vec<u8>,
}

impl<W: Write> KldWriter<W> {
    /// Write the header and the tokens of `plan.n_chunk` chunks.
    pub fn new(mut out: W, plan: &ChunkPlan, n_vocab: usize, tokens: &[u32]) -> Result<Self> {
        let err =
            |e: std::io::Error| Error::Other(format!("writing the log-probability file: {e}"));
        let n_tok = plan.n_chunk * plan.n_ctx;
        let mut h = Vec::with_capacity(20 + 4 * n_tok);
        h.extend_from_slice(KLD_MAGIC);
        h.extend_from_slice(&(plan.n_ctx as u32).to_le_bytes());
        h.extend_from_slice(&(n_vocab as i32).to_le_bytes());
        h.extend_from_slice(&(plan.n_chunk as i32).to_le_bytes());
        for &t in &tokens[..n_tok] {
            h.extend_from_slice(&(t as i32).to_le_bytes());
        }
        out.write_all(&h).map_err(err)?;
        let nv = row_len(n_vocab);
        Ok(KldWriter {
            out,
            row: vec![0; nv],
            bytes: vec![0; 2 * nv],
        })
    }

    /// Append one scored position; returns the NLL of `tok`.
    pub fn push(&mut self, logits: &[f32], tok: usize) -> Result<f64> {
        let nll = encode_log_probs(logits, tok, &mut self.row);
        for (b, q) in self.bytes.chunks_exact_mut(2).zip(&self.row) {
            b.copy_from_slice(&q.to_le_bytes());
        }
        self.out
            .write_all(&self.bytes)
            .map_err(|e| Error::Other(format!("writing the log-probability file: {e}")))?;
        Ok(nll)
    }

    pub fn finish(mut self) -> Result<W> {
        self.out
            .flush()
            .map_err(|e| Error::Other(format!("writing the log-probability file: {e}")))?;
        Ok(self.out)
    }
}

/// A log-probability file opened for reading: header and tokens read, rows streamed.
pub struct KldReader<R: Read> {
    pub plan: ChunkPlan,
    pub n_vocab: usize,
    pub tokens: Vec<u32>,
    input: R,
    bytes: Vec<u8>,
}

impl KldReader<std::io::BufReader<std::fs::File>> {
    /// Open `path`, checking its header and its size before allocating anything.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        KldReader::new(std::io::BufReader::new(f), len)
            .map_err(|e| Error::format(path, e.to_string()))
    }
}

impl<R: Read> KldReader<R> {
    /// Read the header of a file of `len` bytes.
    pub fn new(mut input: R, len: u64) -> Result<Self> {
        let bad = |m: String| Error::Input(m);
        let mut h = [0u8; 20];
        input
            .read_exact(&mut h)
            .map_err(|_| bad("too short for a log-probability file header".into()))?;
        if &h[0..8] != KLD_MAGIC {
            return Err(bad(
                "not a log-probability file (no `_logits_` magic; make one with \
                 `ferroq perplexity --kld-base`)"
                    .into(),
            ));
        }
        let n_ctx = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
        let n_vocab = i32::from_le_bytes(h[12..16].try_into().unwrap());
        let n_chunk = i32::from_le_bytes(h[16..20].try_into().unwrap());
        if n_ctx < 4 || n_vocab < 1 || n_chunk < 1 {
            return Err(bad(format!(
                "header n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk} out of range"
            )));
        }
        let (n_vocab, n_chunk) = (n_vocab as usize, n_chunk as usize);
        let plan = ChunkPlan { n_ctx, n_chunk };
        let nv = row_len(n_vocab) as u128;
        let want = 20
            + 4 * (n_ctx as u128) * (n_chunk as u128)
            + 2 * nv * plan.scored() as u128 * n_chunk as u128;
        if want != len as u128 {
            return Err(bad(format!(
                "{len} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk \
                 {n_chunk}) needs {want}: truncated or not a log-probability file"
            )));
        }
        let n_tok = n_ctx * n_chunk;
        let mut raw = vec![0u8; 4 * n_tok];
        input
            .read_exact(&mut raw)
            .map_err(|e| bad(format!("reading the tokens: {e}")))?;
        let mut tokens = Vec::with_capacity(n_tok);
        for b in raw.chunks_exact(4) {
            let t = i32::from_le_bytes(b.try_into().unwrap());
            if t < 0 || t as usize >= n_vocab {
                return Err(bad(format!(
                    "token {t} outside the vocabulary of {n_vocab}"
                )));
            }
            tokens.push(t as u32);
        }
        Ok(KldReader {
            plan,
            n_vocab,
            tokens,
            input,
            bytes: vec![0; 2 * nv as usize],
        })
    }

    /// Read the next stored row into `row` ([`row_len`] u16).
    pub fn next_row(&mut self, row: &mut [u16]) -> Result<()> {
        self.input
            .read_exact(&mut self.bytes)
            .map_err(|e| Error::Input(format!("reading log-probabilities: {e}")))?;
        for (q, b) in row.iter_mut().zip(self.bytes.chunks_exact(2)) {
            *q = u16::from_le_bytes([b[0], b[1]]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward f64 reference of −log softmax.
    fn nll_ref(x: &[f32], tok: usize) -> f64 {
        let m = x.iter().map(|&v| v as f64).fold(f64::MIN, f64::max);
        let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        m + s.ln() - x[tok] as f64
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn plan_matches_llama_cpp() {
        let p = ChunkPlan::new(1100, 512, None).unwrap();
        assert_eq!((p.n_chunk, p.first(), p.scored()), (2, 256, 255));
        assert_eq!(ChunkPlan::new(5000, 512, Some(3)).unwrap().n_chunk, 3);
        assert_eq!(ChunkPlan::new(5000, 512, None).unwrap().n_chunk, 9);
        assert!(ChunkPlan::new(1023, 512, None).is_err());
        assert!(ChunkPlan::new(100, 2, None).is_err());
        assert!(ChunkPlan::new(100, 8, Some(0)).is_err());
        // odd context: first = 3, scored = 3 (positions 3, 4, 5 predict 4, 5, 6)
        let p = ChunkPlan::new(14, 7, None).unwrap();
        assert_eq!((p.first(), p.scored()), (3, 3));
    }

    #[test]
    fn nll_and_ppl_error() {
        let mut seed = 7;
        let x: Vec<f32> = (0..1000).map(|_| 8.0 * lcg(&mut seed)).collect();
        for tok in [0, 17, 999] {
            assert!((nll(&x, tok) - nll_ref(&x, tok)).abs() < 1e-5);
        }
        // NLLs 1, 2, 3, 4: mean 2.5, population var 1.25, err = e^2.5 · sqrt(1.25 / 3)
        let mut s = NllStats::default();
        for v in [1.0, 2.0, 3.0, 4.0] {
            s.add(v);
        }
        assert!((s.ppl() - 12.182493960703473).abs() < 1e-12);
        let err = 12.182493960703473 * (1.25f64 / 3.0).sqrt();
        assert!((s.ppl_err().unwrap() - err).abs() < 1e-12);
        let mut one = NllStats::default();
        one.add(2.0);
        assert_eq!(one.ppl_err(), None);
    }

    #[test]
    fn log_prob_rows_round_trip() {
        let mut seed = 3;
        for n in [5usize, 6, 333] {
            let x: Vec<f32> = (0..n).map(|_| 10.0 * lcg(&mut seed)).collect();
            let mut row = vec![0u16; row_len(n)];
            assert_eq!(row.len(), 2 * n.div_ceil(2) + 4);
            let v = encode_log_probs(&x, 1, &mut row);
            assert!((v - nll_ref(&x, 1)).abs() < 1e-5);
            let top = x.iter().cloned().fold(f32::MIN, f32::max);
            for i in 0..n {
                let exact = -nll_ref(&x, i) as f32;
                let floor = -16.0 - (nll_ref(&x, 0) as f32 - (top - x[0]));
                let got = decode_log_prob(&row, i);
                if x[i] > top - 16.0 {
                    // quantization step 16/65535 at most: half of it, plus f32 rounding
                    assert!((got - exact).abs() < 1.5e-4, "{n} {i}: {got} vs {exact}");
                } else {
                    assert!((got - floor).abs() < 1e-3, "{got} vs floor {floor}");
                }
            }
        }
        // constant logits: scale 0, every log-prob ln(1/n)
        let mut row = vec![0u16; row_len(4)];
        encode_log_probs(&[2.0; 4], 0, &mut row);
        assert!((decode_log_prob(&row, 3) + 4f32.ln()).abs() < 1e-6);
    }

    /// KL, Δp and top-1 against a direct f64 computation on the same (quantized) base.
    #[test]
    fn kld_against_direct_computation() {
        let mut seed = 11;
        let n = 50;
        let mut st = KldStats::default();
        let (mut kl_sum, mut same) = (0f64, 0);
        let rows = 40;
        for r in 0..rows {
            let base: Vec<f32> = (0..n).map(|_| 3.0 * lcg(&mut seed)).collect();
            let q: Vec<f32> = base.iter().map(|&b| b + 0.3 * lcg(&mut seed)).collect();
            let tok = r % n;
            let mut row = vec![0u16; row_len(n)];
            encode_log_probs(&base, tok, &mut row);
            let (kl, dp) = st.add(&q, &row, tok);
            // reference: exact log-softmax of both in f64
            let lp: Vec<f64> = (0..n).map(|i| -nll_ref(&base, i)).collect();
            let lq: Vec<f64> = (0..n).map(|i| -nll_ref(&q, i)).collect();
            let kl_ref: f64 = (0..n).map(|i| lp[i].exp() * (lp[i] - lq[i])).sum();
            assert!((kl - kl_ref).abs() < 2e-4, "{kl} vs {kl_ref}");
            let dp_ref = lq[tok].exp() - lp[tok].exp();
            assert!((dp as f64 - dp_ref).abs() < 1e-4);
            let am = |v: &[f64]| (0..n).fold(0, |b, i| if v[i] > v[b] { i } else { b });
            same += (am(&lp) == am(&lq)) as usize;
            kl_sum += kl_ref;
        }
        let rep = st.report();
        assert_eq!(rep.count, rows);
        assert!((rep.kld.0 - kl_sum / rows as f64).abs() < 2e-4);
        assert!((rep.same_top.0 - same as f64 / rows as f64).abs() < 1e-12);
        assert_eq!(
            rep.kld_pct[0].1,
            *st.kld_values.iter().max_by(|a, b| a.total_cmp(b)).unwrap()
        );
        assert!(rep.to_text().contains("Mean    KLD"));
        assert_eq!(rep.to_json()["count"], rows);
    }

    #[test]
    fn percentiles_and_uncertainty() {
        // numpy.percentile(v, q, method="linear") of v = [1, 2, 4, 8, 16]
        let v = [1.0f32, 2.0, 4.0, 8.0, 16.0];
        assert_eq!(percentile(&v, 0.5), 4.0);
        assert!((percentile(&v, 0.9) - 12.8).abs() < 1e-5);
        assert!((percentile(&v, 0.1) - 1.4).abs() < 1e-6);
        assert_eq!(percentile(&v, 1.0), 16.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(median(&v), 4.0);
        assert_eq!(median(&v[..4]), 3.0);
        // 11 values 0..=10: mean 5, var 10, err sqrt(10 / 10) = 1
        let (s, s2) = (0..=10).fold((0.0, 0.0), |(a, b), x| (a + x as f64, b + (x * x) as f64));
        let (m, e) = mean_and_uncertainty(s, s2, 11);
        assert!((m - 5.0).abs() < 1e-12 && (e - 1.0).abs() < 1e-12);
        assert_eq!(mean_and_uncertainty(s, s2, 0), (0.0, 0.0));
    }

    #[test]
    fn file_round_trip_and_bad_files() {
        let plan = ChunkPlan {
            n_ctx: 8,
            n_chunk: 2,
        };
        let n_vocab = 5;
        let tokens: Vec<u32> = (0..16).map(|i| i % 5).collect();
        let mut w = KldWriter::new(Vec::new(), &plan, n_vocab, &tokens).unwrap();
        let mut rows = Vec::new();
        let mut seed = 5;
        for _ in 0..plan.n_chunk * plan.scored() {
            let x: Vec<f32> = (0..n_vocab).map(|_| lcg(&mut seed)).collect();
            let mut row = vec![0u16; row_len(n_vocab)];
            encode_log_probs(&x, 2, &mut row);
            w.push(&x, 2).unwrap();
            rows.push(row);
        }
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len(), 20 + 4 * 16 + 2 * 10 * 2 * 3);
        let mut r = KldReader::new(&bytes[..], bytes.len() as u64).unwrap();
        assert_eq!((r.plan, r.n_vocab), (plan, n_vocab));
        assert_eq!(r.tokens, tokens);
        let mut row = vec![0u16; row_len(n_vocab)];
        for want in &rows {
            r.next_row(&mut row).unwrap();
            assert_eq!(&row, want);
        }
        // truncated, wrong magic, bad header, token outside the vocabulary
        assert!(KldReader::new(&bytes[..30], 30).is_err());
        assert!(KldReader::new(&bytes[..], bytes.len() as u64 - 1).is_err());
        let mut b = bytes.clone();
        b[0] = b'x';
        assert!(KldReader::new(&b[..], b.len() as u64).is_err());
        let mut b = bytes.clone();
        b[16..20].copy_from_slice(&(-1i32).to_le_bytes());
        assert!(KldReader::new(&b[..], b.len() as u64).is_err());
        let mut b = bytes.clone();
        b[20..24].copy_from_slice(&9i32.to_le_bytes());
        assert!(KldReader::new(&b[..], b.len() as u64).is_err());
        // huge header values do not allocate: the size check refuses first
        let mut b = bytes.clone();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(KldReader::new(&b[..], b.len() as u64).is_err());
    }
}
