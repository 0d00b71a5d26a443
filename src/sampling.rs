//! Token sampling and stop conditions.
//!
//! [`Sampler::sample`] applies, in the order of transformers' `generate`: repetition penalty,
//! presence/frequency penalties, temperature, top-k, top-p, min-p, then draws from the result
//! with a small seeded PRNG (same seed, same output). Temperature 0 means greedy (arg-max, first
//! index on ties). All buffers are allocated in [`Sampler::new`]; `sample` does not allocate.

use crate::{Error, Result};

/// Sampling settings. The defaults are greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or less) = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p; 1.0 = off.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times the best one's; 0 = off.
    pub min_p: f32,
    /// CTRL-style repetition penalty (HF): logits of seen tokens divided (if > 0) or multiplied
    /// (if < 0) by this; 1.0 = off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every seen token; 0 = off.
    pub presence_penalty: f32,
    /// Subtracted from a seen token's logit once per occurrence; 0 = off.
    pub frequency_penalty: f32,
    /// Penalties look at the last this-many tokens of the history; 0 = all of it.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 0,
            seed: 0,
        }
    }
}

impl SamplerConfig {
    /// Reject values that make no sense (NaN, negative temperature, top_p outside (0, 1], ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, m: &str| Err(Error::config(f, m.to_string()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", "must be a finite number > 0");
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return bad("presence_penalty", "must be finite");
        }
        Ok(())
    }
}

/// xoshiro256** seeded with splitmix64: small, fast, reproducible.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler for one generation stream.
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    vocab: usize,
    idx: Vec<u32>,
    probs: Vec<f32>,
    counts: Vec<u32>,
}

impl Sampler {
    /// Preallocate for `vocab_size` logits.
    pub fn new(cfg: SamplerConfig, vocab_size: usize) -> Sampler {
        Sampler {
            rng: Rng::new(cfg.seed),
            cfg,
            vocab: vocab_size,
            idx: Vec::with_capacity(vocab_size),
            probs: Vec::with_capacity(vocab_size),
            counts: vec![0; vocab_size],
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Restart the random stream from the configured seed.
    pub fn reseed(&mut self, seed: u64) {
        self.cfg.seed = seed;
        self.rng = Rng::new(seed);
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let c = &self.cfg;
        if c.repetition_penalty == 1.0 && c.presence_penalty == 0.0 && c.frequency_penalty == 0.0 {
            return;
        }
        let window = if c.penalty_last_n == 0 || c.penalty_last_n >= history.len() {
            history
        } else {
            &history[history.len() - c.penalty_last_n..]
        };
        let n = logits.len().min(self.counts.len());
        for &t in window {
            if (t as usize) < n {
                self.counts[t as usize] += 1;
            }
        }
        for &t in window {
            let t = t as usize;
            if t >= n || self.counts[t] == 0 {
                continue;
            }
            let cnt = self.counts[t];
            self.counts[t] = 0; // each token once
            let mut l = logits[t];
            if c.repetition_penalty != 1.0 {
                l = if l > 0.0 {
                    l / c.repetition_penalty
                } else {
                    l * c.repetition_penalty
                };
            }
            l -= c.presence_penalty + c.frequency_penalty * cnt as f32;
            logits[t] = l;
        }
    }

    /// [`Sampler::sample`] with only the ids of `mask` allowed (one bit per id, bit `id % 64`
    /// of word `id / 64`; see [`apply_mask`]), e.g. the mask of a structured-output grammar.
    /// `None` costs nothing.
    pub fn sample_masked(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
        mask: Option<&[u64]>,
    ) -> u32 {
        if let Some(m) = mask {
            apply_mask(logits, m);
        }
        self.sample(logits, history)
    }

    /// Pick the next token. `logits` (one per vocabulary entry) is modified in place;
    /// `history` is the ids so far (prompt and generated), used by the penalties.
    /// NaN logits are never picked unless every logit is NaN (then id 0).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let n = logits.len().min(self.vocab.max(1));
        if n == 0 {
            return 0;
        }
        let logits = &mut logits[..n];
        self.apply_penalties(logits, history);
        if self.cfg.temperature <= 0.0 || self.cfg.top_k == 1 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.cfg.temperature;
        let idx = &mut self.idx;
        idx.clear();
        idx.extend((0..n as u32).filter(|&i| !logits[i as usize].is_nan()));
        if idx.is_empty() {
            return 0;
        }
        let desc = |a: &u32, b: &u32| {
            logits[*b as usize]
                .partial_cmp(&logits[*a as usize])
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.cmp(b))
        };
        let k = self.cfg.top_k;
        let mut sorted = false;
        if k > 0 && k < idx.len() {
            idx.select_nth_unstable_by(k - 1, desc);
            idx.truncate(k);
            idx.sort_unstable_by(desc);
            sorted = true;
        }
        if self.cfg.top_p < 1.0 && !sorted {
            idx.sort_unstable_by(desc);
            sorted = true;
        }
        let mut max = f32::NEG_INFINITY;
        for &i in idx.iter() {
            max = max.max(logits[i as usize]);
        }
        if max == f32::NEG_INFINITY {
            return idx[0];
        }
        let probs = &mut self.probs;
        probs.clear();
        let mut sum = 0.0f64;
        for &i in idx.iter() {
            let p = ((logits[i as usize] - max) * inv_t).exp();
            probs.push(p);
            sum += p as f64;
        }
        let mut m = idx.len();
        if self.cfg.top_p < 1.0 && sorted {
            // Smallest prefix whose mass reaches top_p (at least one token).
            let target = self.cfg.top_p as f64 * sum;
            let mut acc = 0.0f64;
            for (j, &p) in probs.iter().enumerate() {
                acc += p as f64;
                if acc >= target {
                    m = j + 1;
                    break;
                }
            }
        }
        let mut total = 0.0f64;
        // min-p relative to the best kept token (probability 1 before normalisation).
        let floor = self.cfg.min_p;
        for p in probs[..m].iter_mut() {
            if *p < floor {
                *p = 0.0;
            }
            total += *p as f64;
        }
        if total <= 0.0 {
            return idx[0];
        }
        let mut r = self.rng.next_f64() * total;
        for (j, &p) in probs[..m].iter().enumerate() {
            r -= p as f64;
            if r < 0.0 && p > 0.0 {
                return idx[j];
            }
        }
        // Rounding: the last token with non-zero probability.
        probs[..m]
            .iter()
            .rposition(|&p| p > 0.0)
            .map_or(idx[0], |j| idx[j])
    }
}

/// The logit-mask hook: set the logits of ids whose bit in `mask` is clear (bit `id % 64` of
/// word `id / 64`; ids past the mask too) to minus infinity, so that no sampling setting can
/// pick them. Costs one pass over the logits (whole words of allowed ids skipped).
pub fn apply_mask(logits: &mut [f32], mask: &[u64]) {
    for (chunk, &m) in logits.chunks_mut(64).zip(mask) {
        if m == u64::MAX {
            continue;
        }
        for (j, l) in chunk.iter_mut().enumerate() {
            if (m >> j) & 1 == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
    let covered = mask.len() * 64;
    if logits.len() > covered {
        logits[covered..].fill(f32::NEG_INFINITY);
    }
}

/// Index of the largest logit (first on ties; NaN ignored).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv || (!found && !v.is_nan()) {
            best = i;
            bv = v;
            found = true;
        }
    }
    best as u32
}

/// Stop ids from a `generation_config.json` (`eos_token_id`: a number or a list).
pub fn stop_ids_from_generation_config(json: &[u8]) -> Result<Vec<u32>> {
    let v: serde_json::Value = serde_json::from_slice(json)
        .map_err(|e| Error::format("generation_config.json", format!("invalid JSON: {e}")))?;
    let bad = || {
        Error::format(
            "generation_config.json",
            "`eos_token_id` is not an id or a list of ids",
        )
    };
    let one = |x: &serde_json::Value| x.as_u64().and_then(|x| u32::try_from(x).ok());
    match v.get("eos_token_id") {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(a)) => a.iter().map(|x| one(x).ok_or_else(bad)).collect(),
        Some(x) => Ok(vec![one(x).ok_or_else(bad)?]),
    }
}

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Keep going.
    No,
    /// A stop token was generated (it is not part of the text).
    Token,
    /// A user stop string appeared (the text up to it has been emitted).
    String,
}

/// Stop conditions for streaming generation: stop token ids and user stop strings. Text that
/// could be the start of a stop string is held back until it is clear that it is not.
#[derive(Clone, Debug, Default)]
pub struct StopCondition {
    stop_ids: Vec<u32>,
    stop_strings: Vec<String>,
    pending: String,
}

impl StopCondition {
    pub fn new(stop_ids: Vec<u32>, stop_strings: Vec<String>) -> StopCondition {
        let max = stop_strings.iter().map(String::len).max().unwrap_or(0);
        StopCondition {
            stop_ids,
            stop_strings: stop_strings.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::with_capacity(max * 2 + 16),
        }
    }

    pub fn add_stop_id(&mut self, id: u32) {
        if !self.stop_ids.contains(&id) {
            self.stop_ids.push(id);
        }
    }

    pub fn is_stop_id(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// Feed newly decoded text; append what is safe to show to `out`. Returns
    /// [`Stop::String`] when a stop string is complete (text before it is emitted, the stop
    /// string itself is not).
    pub fn push_text(&mut self, text: &str, out: &mut String) -> Stop {
        if self.stop_strings.is_empty() {
            out.push_str(text);
            return Stop::No;
        }
        self.pending.push_str(text);
        let first = self
            .stop_strings
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = first {
            out.push_str(&self.pending[..pos]);
            self.pending.clear();
            return Stop::String;
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut keep = 0;
        for s in &self.stop_strings {
            let max = s.len().min(self.pending.len());
            for l in (1..=max).rev() {
                let start = self.pending.len() - l;
                if self.pending.is_char_boundary(start)
                    && s.as_bytes().starts_with(&self.pending.as_bytes()[start..])
                {
                    keep = keep.max(l);
                    break;
                }
            }
        }
        let cut = self.pending.len() - keep;
        out.push_str(&self.pending[..cut]);
        self.pending.drain(..cut);
        Stop::No
    }

    /// Check a generated id, then its text (pass the decoded text of `id`, possibly empty).
    pub fn push(&mut self, id: u32, text: &str, out: &mut String) -> Stop {
        if self.is_stop_id(id) {
            return Stop::Token;
        }
        self.push_text(text, out)
    }

    /// End of generation (length limit or stop token): release held-back text.
    pub fn finish(&mut self, out: &mut String) {
        out.push_str(&self.pending);
        self.pending.clear();
    }
}
