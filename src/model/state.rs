//! The state of one session: the position, the KV cache and every scratch buffer of the
//! forward pass, sized once from the model's configuration (no allocation per token).

use super::attention;
use super::kv::{zeroed, KvCache, KvType};
use super::weights::Model;
use crate::ops::SCRATCH_LEN;
use crate::pool::ThreadPool;
use crate::{Error, Result};
use ferroq_kernels::{BlockQ8A, QK};
use std::sync::Mutex;

/// Which logits a forward call computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position's (generation).
    Last,
    /// Every position's (`ferroq logits`, perplexity).
    All,
    /// None (prefill of a prompt whose logits are not needed).
    None,
}

/// Per-session state: the KV cache, the position, and every scratch buffer of the forward pass.
pub struct State {
    /// Tokens already in the KV cache (the position of the next token).
    pub pos: usize,
    pub(super) max_ctx: usize,
    pub(super) max_batch: usize,
    pub(super) kv: KvCache,
    pub(super) h: Vec<f32>,           // (B, H) residual stream
    pub(super) xn: Vec<f32>,          // (B, max(H, n_h*D)) normed input of a block
    pub(super) q8: Vec<BlockQ8A>,     // (B * k_exp, max_k / 32) quantized activations
    pub(super) q8_mid: Vec<BlockQ8A>, // (B, I_max / 32) one expert's quantized intermediates
    pub(super) q: Vec<f32>,           // (B, n_h * D)
    pub(super) k: Vec<f32>,           // (B, n_kv * D)
    pub(super) v: Vec<f32>,           // (B, n_kv * D)
    pub(super) att: Vec<f32>,         // (B, n_h * D) attention output
    pub(super) cos: Vec<f32>,         // (B, D/2)
    pub(super) sin: Vec<f32>,         // (B, D/2)
    pub(super) gate: Vec<f32>,        // (B * k_exp, I_max)
    pub(super) up: Vec<f32>,          // (B * k_exp, I_max)
    pub(super) y: Vec<f32>,           // (B, H) FFN / attention projection output
    // MoE routing
    pub(super) router: Vec<f32>,    // (B, E)
    pub(super) top_idx: Vec<u32>,   // (B * k_exp,)
    pub(super) top_val: Vec<f32>,   // (B * k_exp,)
    pub(super) counts: Vec<u32>,    // (E,)
    pub(super) predicted: Vec<u32>, // (E,) next MoE layer's predicted picks (paged decode)
    pub(super) pred_idx: Vec<u32>,  // (k_exp,)
    pub(super) pred_val: Vec<f32>,  // (k_exp,)
    pub(super) offsets: Vec<u32>,   // (E + 1,)
    pub(super) perm: Vec<u32>,      // (B * k_exp,) pair index at each position in expert order
    pub(super) inv: Vec<u32>,       // (B * k_exp,) position in expert order of each pair
    pub(super) iota: Vec<u32>,      // 0, 1, .. (B * k_exp) (row indices of a plain product)
    pub(super) xs: Vec<f32>,        // (B * k_exp, H) routed, score-scaled expert inputs
    pub(super) ys: Vec<f32>,        // (B * k_exp, H) expert outputs
    pub(super) logits: Vec<f32>,    // (B or 1, V)
    pub(super) n_logits: usize,
    // threads: a pool for this session and one scratch buffer per pool thread
    pub(super) pool: Option<ThreadPool>,
    pub(super) scratch: Vec<Mutex<Vec<f32>>>, // (threads,) × max(SCRATCH_LEN, attention::scratch_len(config))
}

impl State {
    /// A session state for up to `max_ctx` tokens, processing up to `max_batch` tokens per
    /// forward call. With `all_logits`, the logits buffer holds `max_batch` rows.
    /// One thread, exact f32 KV cache (the reference configuration).
    pub fn new(model: &Model, max_ctx: usize, max_batch: usize, all_logits: bool) -> State {
        Self::with_kv(model, max_ctx, max_batch, all_logits, 1, KvType::F32)
    }

    /// [`State::new`] running the heavy ops on `threads` threads (0 = all cores; more than
    /// [`crate::pool::MAX_THREADS`] are capped to it). Results are
    /// identical whatever the thread count. The KV cache is exact f32 (what `ferroq logits` and
    /// the parity tests need); generation front ends should use [`State::with_kv`] with
    /// [`KvType::default`] (f16: half the cache memory and bandwidth, logit error ~1e-2 on
    /// SmolLM2 at f32 weights, far below the error of 4- or 8-bit weights).
    pub fn with_threads(
        model: &Model,
        max_ctx: usize,
        max_batch: usize,
        all_logits: bool,
        threads: usize,
    ) -> State {
        Self::with_kv(model, max_ctx, max_batch, all_logits, threads, KvType::F32)
    }

    /// [`State::with_threads`] with a chosen KV cache type. Panics where [`State::try_with_kv`]
    /// fails (buffers larger than memory); front ends taking `max_ctx` or `max_batch` from a
    /// user call that instead.
    pub fn with_kv(
        model: &Model,
        max_ctx: usize,
        max_batch: usize,
        all_logits: bool,
        threads: usize,
        kv: KvType,
    ) -> State {
        Self::try_with_kv(model, max_ctx, max_batch, all_logits, threads, kv)
            .unwrap_or_else(|e| panic!("ferroq: {e}"))
    }

    /// [`State::with_kv`], with a named error (field `ctx` or `batch`) instead of an abort when a
    /// buffer's size overflows or its allocation fails: a context of 10^11 tokens asks for
    /// terabytes of KV cache. The buffers are zeroed by the allocator (`calloc`), so the pages
    /// of the cache the session never reaches are never made resident. Thread counts above
    /// [`crate::pool::MAX_THREADS`] are an error too.
    pub fn try_with_kv(
        model: &Model,
        max_ctx: usize,
        max_batch: usize,
        all_logits: bool,
        threads: usize,
        kv: KvType,
    ) -> Result<State> {
        super::kvmem::check_context(&model.config, max_ctx, model.ctx_limit)?;
        let cache = KvCache::for_model(kv, &model.config, max_ctx)?;
        let logit_rows = if all_logits { max_batch.max(1) } else { 1 };
        Self::build(model, cache, max_ctx, max_batch, logit_rows, threads)
    }

    /// The work buffers of a forward pass over up to `max_batch` rows with `logit_rows` rows of
    /// logits, and an empty KV cache: the shared working state of a
    /// [`MultiState`](super::batch::MultiState), whose sequences keep their own caches.
    pub(super) fn work(
        model: &Model,
        max_batch: usize,
        logit_rows: usize,
        threads: usize,
        kv: KvType,
    ) -> Result<State> {
        let cache = KvCache::for_model(kv, &model.config, 0)?;
        Self::build(model, cache, 0, max_batch, logit_rows, threads)
    }

    fn build(
        model: &Model,
        kv: KvCache,
        max_ctx: usize,
        max_batch: usize,
        logit_rows: usize,
        threads: usize,
    ) -> Result<State> {
        let pool = if threads == 1 {
            None
        } else {
            Some(ThreadPool::try_new(threads, crate::pool::DEFAULT_SPIN)?)
        };
        let n_threads = pool.as_ref().map_or(1, |p| p.n_threads());
        let c = &model.config;
        let max_batch = max_batch.max(1);
        let (hd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let i_max = c.intermediate_size.max(c.moe_intermediate_size);
        let kx = c.num_experts_per_tok.max(1);
        let wide = c.hidden_size.max(hd).max(i_max);
        // per-layer KV buffers scale with the context, the work buffers with the batch
        let batch_err = || {
            Error::config(
                "batch",
                format!("buffers for a batch of {max_batch} tokens cannot be allocated"),
            )
        };
        let bk = max_batch.checked_mul(kx).ok_or_else(batch_err)?;
        let nb = |per_token: usize| max_batch.checked_mul(per_token);
        let nk = |per_token: usize| bk.checked_mul(per_token);
        let f = |n: Option<usize>| zeroed::<f32>(n, &batch_err);
        Ok(State {
            pos: 0,
            max_ctx,
            max_batch,
            kv,
            h: f(nb(c.hidden_size))?,
            xn: f(nb(wide))?,
            q8: zeroed::<BlockQ8A>(nk(wide.div_ceil(QK)), &batch_err)?,
            q8_mid: zeroed::<BlockQ8A>(nb(i_max.div_ceil(QK)), &batch_err)?,
            q: f(nb(hd))?,
            k: f(nb(kvd))?,
            v: f(nb(kvd))?,
            att: f(nb(hd))?,
            cos: f(nb(c.head_dim / 2))?,
            sin: f(nb(c.head_dim / 2))?,
            gate: f(nk(i_max))?,
            up: f(nk(i_max))?,
            y: f(nb(c.hidden_size))?,
            router: f(nb(c.num_experts))?,
            top_idx: zeroed(Some(bk), &batch_err)?,
            top_val: f(Some(bk))?,
            counts: vec![0; c.num_experts],
            predicted: vec![0; c.num_experts],
            pred_idx: vec![0; c.num_experts_per_tok],
            pred_val: vec![0.0; c.num_experts_per_tok],
            offsets: vec![0; c.num_experts + 1],
            perm: zeroed(Some(bk), &batch_err)?,
            inv: zeroed(Some(bk), &batch_err)?,
            iota: {
                let mut v: Vec<u32> = zeroed(Some(bk), &batch_err)?;
                v.iter_mut().enumerate().for_each(|(i, x)| *x = i as u32);
                v
            },
            xs: f(nk(c.hidden_size))?,
            ys: f(nk(c.hidden_size))?,
            logits: f(logit_rows.max(1).checked_mul(c.vocab_size))?,
            n_logits: 0,
            pool,
            scratch: (0..n_threads)
                .map(|_| {
                    Mutex::new(vec![
                        0.0;
                        SCRATCH_LEN.max(attention::scratch_len(
                            c.num_heads,
                            c.num_kv_heads,
                            c.head_dim
                        ))
                    ])
                })
                .collect(),
        })
    }

    /// Threads the heavy ops run on.
    pub fn threads(&self) -> usize {
        self.pool.as_ref().map_or(1, |p| p.n_threads())
    }

    /// The KV cache element type.
    pub fn kv_type(&self) -> KvType {
        self.kv.kv_type()
    }

    /// Context capacity in tokens.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Largest batch one forward call takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Whether the state can run a forward call: false after a panic interrupted one (its
    /// thread pool and scratch were moved out for the call and lost). Rebuild it then (e.g.
    /// [`crate::engine::Session::reset`] does).
    pub fn is_usable(&self) -> bool {
        !self.scratch.is_empty()
    }

    /// Forget the cache (start a new conversation).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Rewind the cache to `pos` tokens (keep a shared prefix); returns the position kept,
    /// which is less than `pos` when `pos` lies in an earlier attention chunk than the last
    /// token: chunked layers keep only the current chunk, so the tokens from the start of
    /// `pos`'s chunk must run again ([`KvCache::keepable`]).
    pub fn truncate(&mut self, pos: usize) -> usize {
        self.pos = self.kv.keepable(self.pos, pos);
        self.pos
    }

    /// The logits computed by the last forward call: `rows × vocab`.
    pub fn logits(&self) -> &[f32] {
        &self.logits[..self.n_logits]
    }
}

// Session state files: the cache of the used positions as bytes (see `KvCache::write_kv`).
impl State {
    /// Bytes [`State::write_kv`] writes for the first `n` positions.
    pub fn kv_bytes(&self, n: usize) -> usize {
        self.kv.kv_bytes(n)
    }

    /// Whether the first `n` cached positions can be saved ([`KvCache::can_save`]: with
    /// chunked-attention layers, `n` must be `pos` or lie in the chunk of the last position).
    pub fn can_save(&self, n: usize) -> bool {
        self.kv.can_save(self.pos, n)
    }

    /// Append the cache of positions `0..n` ([`State::can_save`]) as bytes
    /// (`KvCache::write_kv`).
    pub fn write_kv(&self, n: usize, out: &mut Vec<u8>) {
        debug_assert!(self.can_save(n));
        self.kv.write_kv(n.min(self.pos), out)
    }

    /// Restore positions `0..n` from [`State::write_kv`] bytes of the same model and KV type;
    /// the position becomes `n`. On error nothing changes.
    pub fn read_kv(&mut self, n: usize, data: &[u8]) -> crate::Result<()> {
        self.kv.read_kv(n, self.max_ctx, data)?;
        self.pos = n;
        Ok(())
    }
}
