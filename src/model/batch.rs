//! Several sequences in one forward pass (a server's slots): each sequence has its own KV cache
//! and position; a call takes a list of segments (consecutive tokens of one sequence each) and
//! computes the logits of the last token of the segments that ask for them.
//!
//! For now each sequence is a [`State`] of its own and the segments run one after the other;
//! the one-pass version (matrix products over the rows of all segments, attention per segment)
//! keeps this API.

use super::kv::KvType;
use super::state::{Logits, State};
use super::weights::Model;
use crate::{Error, Result};

/// One segment of a [`MultiState::forward`] call: `len` tokens of sequence `seq`, taken from
/// `tokens[start..start + len]`, appended at the sequence's position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSeg {
    pub seq: usize,
    pub start: usize,
    pub len: usize,
    /// Compute the logits of the segment's last token.
    pub logits: bool,
}

/// The KV caches of `n` sequences and the work buffers of a forward pass over tokens of any of
/// them.
pub struct MultiState {
    seqs: Vec<State>,
    ctx: usize,
    batch: usize,
    vocab: usize,
    logits: Vec<f32>,
    n_logits: usize,
    kv_bytes: usize,
}

/// Bytes of KV cache one sequence of `ctx` tokens takes.
pub fn kv_bytes(model: &Model, ctx: usize, kv: KvType) -> usize {
    let c = &model.config;
    let kvd = c.num_kv_heads * c.head_dim;
    let per_token = match kv {
        KvType::F32 => 4 * kvd,
        KvType::F16 => 2 * kvd,
        KvType::Q8 => kvd + 4 * c.num_kv_heads,
        KvType::Q4 => c.num_kv_heads * super::kvmem::row_bytes(kv, c.head_dim),
    };
    ctx.saturating_mul(per_token)
        .saturating_mul(2 * c.num_layers)
}

impl MultiState {
    /// `n_seqs` sequences of up to `ctx` tokens each; up to `batch` tokens per call.
    pub fn new(
        model: &Model,
        n_seqs: usize,
        ctx: usize,
        batch: usize,
        threads: usize,
        kv: KvType,
    ) -> Result<MultiState> {
        if n_seqs == 0 {
            return Err(Error::config("parallel", "at least one sequence"));
        }
        if ctx < 2 {
            return Err(Error::config(
                "ctx",
                "the context must hold at least 2 tokens",
            ));
        }
        let batch = batch.clamp(1, ctx);
        let seqs = (0..n_seqs)
            .map(|_| State::try_with_kv(model, ctx, batch, false, threads, kv))
            .collect::<Result<Vec<_>>>()?;
        let vocab = model.config.vocab_size;
        Ok(MultiState {
            seqs,
            ctx,
            batch,
            vocab,
            logits: vec![0.0; n_seqs * vocab],
            n_logits: 0,
            kv_bytes: kv_bytes(model, ctx, kv),
        })
    }

    pub fn n_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Context per sequence.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Most tokens one call takes.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Bytes of KV cache per sequence.
    pub fn kv_bytes_per_seq(&self) -> usize {
        self.kv_bytes
    }

    /// Tokens in sequence `seq`'s cache.
    pub fn pos(&self, seq: usize) -> usize {
        self.seqs[seq].pos
    }

    /// Rewind sequence `seq` to `pos` tokens.
    pub fn truncate(&mut self, seq: usize, pos: usize) {
        self.seqs[seq].truncate(pos);
    }

    /// Run the segments (at most one per sequence, at most `batch` tokens in all) and compute
    /// the logits of those that ask for them: [`MultiState::logits`]`(k)` is the `k`-th of them,
    /// in segment order.
    pub fn forward(&mut self, model: &Model, tokens: &[u32], segs: &[BatchSeg]) -> Result<()> {
        let total: usize = segs.iter().map(|s| s.len).sum();
        if total > self.batch {
            return Err(Error::Input(format!(
                "{total} tokens exceed the batch size {}",
                self.batch
            )));
        }
        for (j, s) in segs.iter().enumerate() {
            if s.seq >= self.seqs.len() {
                return Err(Error::Input(format!("sequence {} does not exist", s.seq)));
            }
            if s.len == 0 || s.start.checked_add(s.len).is_none_or(|e| e > tokens.len()) {
                return Err(Error::Input(format!("segment {j} is outside the tokens")));
            }
            if segs[..j].iter().any(|o| o.seq == s.seq) {
                return Err(Error::Input(format!("sequence {} appears twice", s.seq)));
            }
        }
        self.n_logits = 0;
        for s in segs {
            let want = if s.logits { Logits::Last } else { Logits::None };
            let st = &mut self.seqs[s.seq];
            model.forward(st, &tokens[s.start..s.start + s.len], want)?;
            if s.logits {
                let k = self.n_logits;
                let l = st.logits();
                self.logits[k * self.vocab..(k + 1) * self.vocab].copy_from_slice(&l[..self.vocab]);
                self.n_logits += 1;
            }
        }
        Ok(())
    }

    /// The logits of the `k`-th segment that asked for them in the last call.
    pub fn logits(&self, k: usize) -> &[f32] {
        assert!(k < self.n_logits, "logits row {k} of {}", self.n_logits);
        &self.logits[k * self.vocab..(k + 1) * self.vocab]
    }
}
