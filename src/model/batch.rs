//! Several sequences in one forward pass (a server's slots): each sequence has its own KV cache
//! and position; a call takes a list of segments (consecutive tokens of one sequence each) and
//! computes the logits of the last token of the segments that ask for them.
//!
//! One pass: the rows of all segments go through every matrix product together (the weights are
//! read once per step, not once per sequence; MoE rows are grouped per expert across the
//! sequences as in a prefill), while RoPE, the cache append and the attention run per segment
//! at its sequence's positions against its own cache ([`Model::forward_runs`]). One set of work
//! buffers and one thread pool serve all sequences; each extra sequence costs only its cache.
//! Every row's result is the same as in a call with that segment alone (the products compute
//! each output element in the same order whatever the number of rows).

use super::forward::{OutRows, Run};
use super::kv::{KvCache, KvType};
use super::state::State;
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
    /// The work buffers, thread pool and logits (its own cache is empty).
    work: State,
    caches: Vec<KvCache>,
    pos: Vec<usize>,
    ctx: usize,
    batch: usize,
    vocab: usize,
    // per-call lists, sized at construction (one entry per sequence at most)
    runs: Vec<Run>,
    out_rows: Vec<u32>,
    ids: Vec<u32>,
    kv_bytes: usize,
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
        super::kvmem::check_context(&model.config, ctx, model.ctx_limit)?;
        let batch = batch.clamp(1, ctx);
        let caches = (0..n_seqs)
            .map(|_| KvCache::for_model(kv, &model.config, ctx))
            .collect::<Result<Vec<_>>>()?;
        // one logits row per segment, at most one segment per sequence
        let work = State::work(model, batch, n_seqs, threads, kv)?;
        Ok(MultiState {
            work,
            caches,
            pos: vec![0; n_seqs],
            ctx,
            batch,
            vocab: model.config.vocab_size,
            runs: Vec::with_capacity(n_seqs),
            out_rows: Vec::with_capacity(n_seqs),
            ids: Vec::with_capacity(batch),
            kv_bytes: usize::try_from(super::kvmem::kv_bytes(&model.config, ctx, kv).total)
                .unwrap_or(usize::MAX),
        })
    }

    pub fn n_seqs(&self) -> usize {
        self.caches.len()
    }

    /// Context per sequence.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Most tokens one call takes.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Threads the heavy ops run on.
    pub fn threads(&self) -> usize {
        self.work.threads()
    }

    /// Bytes of KV cache per sequence.
    pub fn kv_bytes_per_seq(&self) -> usize {
        self.kv_bytes
    }

    /// Tokens in sequence `seq`'s cache.
    pub fn pos(&self, seq: usize) -> usize {
        self.pos[seq]
    }

    /// Rewind sequence `seq` to `pos` tokens (keep a shared prefix); returns the position kept,
    /// which is less than `pos` when `pos` lies in an earlier attention chunk than the
    /// sequence's last token ([`State::truncate`]).
    pub fn truncate(&mut self, seq: usize, pos: usize) -> usize {
        self.pos[seq] = self.caches[seq].keepable(self.pos[seq], pos);
        self.pos[seq]
    }

    /// Run the segments (at most one per sequence, at most `batch` tokens in all) in one
    /// forward pass and compute the logits of those that ask for them:
    /// [`MultiState::logits`]`(k)` is the `k`-th of them, in segment order. On an error nothing
    /// has changed.
    pub fn forward(&mut self, model: &Model, tokens: &[u32], segs: &[BatchSeg]) -> Result<()> {
        let total: usize = segs.iter().map(|s| s.len).sum();
        if total > self.batch {
            return Err(Error::Input(format!(
                "{total} tokens exceed the batch size {}",
                self.batch
            )));
        }
        if !self.work.is_usable() {
            return Err(Error::Input(
                "the batch state was left unusable by an internal error in an earlier call; \
                 make a new one"
                    .into(),
            ));
        }
        let vocab = model.config.vocab_size;
        if vocab != self.vocab {
            return Err(Error::Input("this state was made for another model".into()));
        }
        for (j, s) in segs.iter().enumerate() {
            if s.seq >= self.caches.len() {
                return Err(Error::Input(format!("sequence {} does not exist", s.seq)));
            }
            if s.len == 0 || s.start.checked_add(s.len).is_none_or(|e| e > tokens.len()) {
                return Err(Error::Input(format!("segment {j} is outside the tokens")));
            }
            if segs[..j].iter().any(|o| o.seq == s.seq) {
                return Err(Error::Input(format!("sequence {} appears twice", s.seq)));
            }
            if self.pos[s.seq] + s.len > self.ctx {
                return Err(Error::Input(format!(
                    "context full: sequence {} has {} tokens in the cache + {} new, more than \
                     the context of {}",
                    s.seq, self.pos[s.seq], s.len, self.ctx
                )));
            }
            let ids = &tokens[s.start..s.start + s.len];
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(Error::Input(format!(
                    "token id {bad} is out of range (vocabulary {vocab})"
                )));
            }
        }
        if segs.is_empty() {
            self.work.n_logits = 0;
            return Ok(());
        }
        // the rows of the pass: the segments' tokens back to back, in segment order
        self.runs.clear();
        self.out_rows.clear();
        self.ids.clear();
        for s in segs {
            let start = self.ids.len();
            self.ids
                .extend_from_slice(&tokens[s.start..s.start + s.len]);
            self.runs.push(Run {
                start,
                len: s.len,
                pos0: self.pos[s.seq],
                seq: s.seq,
            });
            if s.logits {
                self.out_rows.push((start + s.len - 1) as u32);
            }
        }
        let out = OutRows::Rows(&self.out_rows);
        let (work, caches) = (&mut self.work, &mut self.caches[..]);
        model.forward_runs(work, Some(caches), &self.ids, &self.runs, out, None);
        for s in segs {
            self.pos[s.seq] += s.len;
        }
        Ok(())
    }

    /// The logits of the `k`-th segment that asked for them in the last call.
    pub fn logits(&self, k: usize) -> &[f32] {
        let l = self.work.logits();
        assert!(
            (k + 1) * self.vocab <= l.len(),
            "logits row {k} of {}",
            l.len() / self.vocab
        );
        &l[k * self.vocab..(k + 1) * self.vocab]
    }
}
