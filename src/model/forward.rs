//! The forward pass: one function that reads top to bottom like the data-flow diagram in
//! `ARCHITECTURE.md` (llama2.c `forward`), over buffers preallocated in a [`State`] (one per
//! session), with no allocation per token. The steps live in their own modules: the KV cache
//! in [`kv`](super::kv), attention in [`attention`](super::attention), the FFNs in
//! `ffn` and [`moe`](super::moe); the observation points in [`probe`](super::probe).

use super::attention::{self, AttnShape};
use super::config::LayerSpec;
use super::ffn::{swiglu, SwigluBufs};
use super::kv::KvCache;
use super::moe::MoeLayer;
use super::probe::ProbeOpt;
use super::probe::{see, HiddenOnly, Input, Point, Probe};
use super::weights::{FfnWeights, LayerWeights, Model};
use crate::ops::{self, matmul, quantize_for, Act, Par};
use crate::{Error, Result};

pub use super::kv::KvType;
pub use super::state::{Logits, State};

/// Rows `start .. start + len` of a [`Model::forward_runs`] call: tokens of sequence `seq` at
/// positions `pos0 ..`.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub start: usize,
    pub len: usize,
    pub pos0: usize,
    pub seq: usize,
}

/// The cache of sequence `seq`: `caches[seq]`, or the state's own cache `own` when the call has
/// one sequence (`caches` is `None`).
fn seq_kv<'a>(caches: Option<&'a [KvCache]>, own: &'a KvCache, seq: usize) -> &'a KvCache {
    match caches {
        Some(caches) => &caches[seq],
        None => own,
    }
}

/// The rows whose logits a [`Model::forward_runs`] call computes, in this order.
pub(super) enum OutRows<'a> {
    Range(std::ops::Range<usize>),
    Rows(&'a [u32]),
}

/// Observer of the residual stream (tests compare it with a reference file): called with
/// `(layer, "hidden", rows)`. The default forward passes `None`, which costs nothing.
pub type Observer<'a> = &'a mut dyn FnMut(usize, &str, &[f32]);

impl Model {
    /// Run `tokens` (at positions `state.pos ..`) through the model, append them to the KV
    /// cache, and compute the requested logits (read them with [`State::logits`]).
    pub fn forward(&self, state: &mut State, tokens: &[u32], want: Logits) -> Result<()> {
        self.forward_probed(state, tokens, want, None)
    }

    /// [`Model::forward`] with an observer that sees `("hidden", layer)` after the embedding
    /// (layer 0) and after each layer (layer i + 1), for `tokens.len() × hidden_size`.
    pub fn forward_observed(
        &self,
        st: &mut State,
        tokens: &[u32],
        want: Logits,
        obs: Option<Observer>,
    ) -> Result<()> {
        match obs {
            Some(f) => self.forward_probed(st, tokens, want, Some(&mut HiddenOnly(f))),
            None => self.forward_probed(st, tokens, want, None),
        }
    }

    /// Check a forward call's arguments against the state before anything is touched.
    fn check_call(&self, st: &State, tokens: &[u32], want: Logits) -> Result<()> {
        let (n, vocab) = (tokens.len(), self.config.vocab_size);
        if n == 0 {
            return Err(Error::Input("no tokens to process".into()));
        }
        if !st.is_usable() {
            return Err(Error::Input(
                "this session's state was left unusable by an internal error in an earlier \
                 call; reset the session (or make a new state)"
                    .into(),
            ));
        }
        if n > st.max_batch {
            return Err(Error::Input(format!(
                "{n} tokens exceed the batch size {}",
                st.max_batch
            )));
        }
        if st.pos + n > st.max_ctx {
            return Err(Error::Input(format!(
                "context full: {} tokens in the cache + {n} new exceed the context of {}",
                st.pos, st.max_ctx
            )));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range (vocabulary {vocab})"
            )));
        }
        if want == Logits::All && st.logits.len() < n * vocab {
            return Err(Error::Input("this state keeps only the last logits".into()));
        }
        Ok(())
    }

    /// [`Model::forward`] with a [`Probe`] that sees the named intermediates it wants
    /// ([`Point`]: hidden states, attention and FFN outputs, router logits, the input rows of
    /// every matrix product). The logits are the same with or without a probe.
    pub fn forward_probed(
        &self,
        st: &mut State,
        tokens: &[u32],
        want: Logits,
        probe: Option<&mut dyn Probe>,
    ) -> Result<()> {
        self.check_call(st, tokens, want)?;
        let n = tokens.len();
        let out = match want {
            Logits::None => OutRows::Range(0..0),
            Logits::Last => OutRows::Range(n - 1..n),
            Logits::All => OutRows::Range(0..n),
        };
        let run = Run {
            start: 0,
            len: n,
            pos0: st.pos,
            seq: 0,
        };
        self.forward_runs(st, None, tokens, &[run], out, probe);
        st.pos += n;
        Ok(())
    }

    /// The forward pass over `tokens`, whose rows are cut into `runs` (consecutive rows of one
    /// sequence each, at that sequence's positions): every matrix product runs once over all
    /// rows (MoE rows grouped per expert across the runs); RoPE, the cache append and the
    /// attention run per run, against the run's own cache (`caches[run.seq]`, or the state's
    /// own cache when `caches` is `None`: one sequence). Computes the logits of the rows `out`
    /// into `st.logits`. The callers checked the arguments (sizes, ids, context); positions are
    /// not advanced here.
    pub(super) fn forward_runs(
        &self,
        st: &mut State,
        mut caches: Option<&mut [KvCache]>,
        tokens: &[u32],
        runs: &[Run],
        out: OutRows,
        mut probe: Option<&mut dyn Probe>,
    ) {
        let (c, kern, pr) = (&self.config, &self.kernels, &mut probe);
        let (n, hs) = (tokens.len(), c.hidden_size);
        // the pool and scratch are moved out for the call (no allocation) so that `par` can be
        // shared by every op while the buffers of `st` are borrowed mutably
        let (pool, scratch) = (st.pool.take(), std::mem::take(&mut st.scratch));
        let par = Par {
            pool: pool.as_ref(),
            scratch: &scratch,
        };

        // ---- embedding (no scaling); RoPE angles for the positions of this batch ----
        let emb = self.mat(self.tok_embeddings);
        for (t, &id) in tokens.iter().enumerate() {
            ops::mat_row(emb, id as usize, hs, &mut st.h[t * hs..(t + 1) * hs]);
        }
        see(pr, 0, Point::Hidden, &st.h[..n * hs]);
        let half = c.head_dim / 2;
        for r in runs {
            for t in r.start..r.start + r.len {
                let (cos, sin) = (&mut st.cos[t * half..], &mut st.sin[t * half..]);
                let p = r.pos0 + t - r.start;
                ops::rope_cos_sin(&self.inv_freq, p, &mut cos[..half], &mut sin[..half]);
            }
        }

        for (li, (lw, spec)) in self.layers.iter().zip(&c.layers).enumerate() {
            // ---- attention block: norm → q/k/v → RoPE/NoPE, QK norm → cache → attend → o ----
            self.attention_block(st, &par, caches.as_deref_mut(), runs, li, lw, spec, pr);
            ops::add_rows(&par, &mut st.h, &st.y, hs, n);

            // ---- FFN block: norm → dense SwiGLU | MoE ----
            self.pre_norm(&par, st, self.vec(lw.ffn_norm), n);
            match &lw.ffn {
                FfnWeights::Dense { gate, up, down } => {
                    see(pr, li, Point::MatInput(Input::FfnGateUp), &st.xn[..n * hs]);
                    let w = [self.mat(*gate), self.mat(*up), self.mat(*down)];
                    let bufs = SwigluBufs {
                        q8: &mut st.q8,
                        iota: &st.iota,
                        gate: &mut st.gate,
                        up: &mut st.up,
                    };
                    let (inter, down_in) = (c.intermediate_size, Input::FfnDown);
                    swiglu(
                        kern, &par, w, hs, inter, &st.xn, n, bufs, &mut st.y, pr, li, down_in,
                    );
                }
                FfnWeights::Moe {
                    router,
                    shared,
                    experts,
                } => {
                    let (router, shared) = (*router, shared.as_ref());
                    let w = MoeLayer {
                        router,
                        shared,
                        experts,
                    };
                    self.moe(st, &par, w, n, pr, li);
                }
            }
            see(pr, li, Point::FfnOut, &st.y[..n * hs]);
            ops::add_rows(&par, &mut st.h, &st.y, hs, n);
            see(pr, li + 1, Point::Hidden, &st.h[..n * hs]);
        }

        // ---- final norm → output projection → logits (of the rows asked for) ----
        let m = self.logits_of(st, &par, out, pr);
        st.n_logits = m * c.vocab_size;
        (st.pool, st.scratch) = (pool, scratch);
    }

    /// The attention block of layer `li` for the rows of `runs` (normed input `st.xn` from
    /// `st.h`, output projection into `st.y`): q/k/v, RoPE or NoPE and QK norm per run, the
    /// cache append, attention (several runs of one decode step in one pool round), `wo`.
    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        st: &mut State,
        par: &Par,
        mut caches: Option<&mut [KvCache]>,
        runs: &[Run],
        li: usize,
        lw: &LayerWeights,
        spec: &LayerSpec,
        pr: ProbeOpt,
    ) {
        let (c, kern) = (&self.config, &self.kernels);
        // the rows of the call: the runs cover them in order
        let n = runs.iter().map(|r| r.start + r.len).max().unwrap_or(0);
        let hs = c.hidden_size;
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let half = c.head_dim / 2;
        self.pre_norm(par, st, self.vec(lw.attn_norm), n);
        see(pr, li, Point::MatInput(Input::Qkv), &st.xn[..n * hs]);
        let (wq, wk, wv) = (self.mat(lw.wq), self.mat(lw.wk), self.mat(lw.wv));
        let q8 = quantize_for(kern, par, &st.xn, hs, n, &mut st.q8, &[wq, wk, wv]);
        let a = Act {
            x: &st.xn,
            k: hs,
            n_tok: n,
            q8,
        };
        let qkv = [&mut st.q[..], &mut st.k[..], &mut st.v[..]];
        ops::matmul_n(kern, par, [wq, wk, wv], [qd, kvd, kvd], &a, qkv);
        let shape = AttnShape::of(c, spec);
        // several runs whose positions each fit the layer's cache at once (a batched decode
        // step): append them all, then attend them all in one pool round
        let one_stretch = |r: &Run| {
            let kv = seq_kv(caches.as_deref(), &st.kv, r.seq);
            kv.segment_end(li, r.pos0, r.pos0 + r.len) == r.pos0 + r.len
        };
        let batched = runs.len() > 1 && runs.iter().all(one_stretch);
        for r in runs {
            let (a, m, pos0) = (r.start, r.len, r.pos0);
            let (cos, sin) = (&st.cos[a * half..], &st.sin[a * half..]);
            let (q, k) = (&mut st.q[a * qd..], &mut st.k[a * kvd..]);
            attention::prepare_qk(kern, par, c, spec, cos, sin, pos0, m, q, k);
            let kv = match caches.as_deref_mut() {
                Some(caches) => &mut caches[r.seq],
                None => &mut st.kv,
            };
            // append and attend per stretch of positions the layer's cache holds at once
            // (the whole run, or for a chunk ring the part of the run in one chunk)
            let mut s0 = 0;
            while s0 < m {
                let s1 = kv.segment_end(li, pos0 + s0, pos0 + m) - pos0;
                let (k, v) = (&st.k[(a + s0) * kvd..], &st.v[(a + s0) * kvd..]);
                kv.append(kern, par, li, pos0 + s0, s1 - s0, k, v);
                if !batched {
                    let (kvl, base) = (kv.layer(li), kv.base(li, pos0 + s0));
                    let q = &st.q[(a + s0) * qd..];
                    let att = &mut st.att[(a + s0) * qd..(a + s1) * qd];
                    attention::attend(kern, par, shape, kvl, base, q, pos0 + s0, s1 - s0, att);
                }
                s0 = s1;
            }
        }
        if batched {
            let (caches, st_kv) = (caches.as_deref(), &st.kv);
            let job = |i: usize| {
                let r = &runs[i];
                let kv = seq_kv(caches, st_kv, r.seq);
                attention::AttnJob {
                    kvl: kv.layer(li),
                    base: kv.base(li, r.pos0),
                    tok0: r.start,
                    pos0: r.pos0,
                    n: r.len,
                }
            };
            let (q, att) = (&st.q[..], &mut st.att[..n * qd]);
            attention::attend_jobs(kern, par, shape, runs.len(), &job, q, n, att);
        }
        see(pr, li, Point::MatInput(Input::Wo), &st.att[..n * qd]);
        let wo = self.mat(lw.wo);
        let q8 = quantize_for(kern, par, &st.att, qd, n, &mut st.q8, &[wo]);
        let a = Act {
            x: &st.att,
            k: qd,
            n_tok: n,
            q8,
        };
        matmul(kern, par, wo, hs, &a, &mut st.y, hs);
        see(pr, li, Point::AttnOut, &st.y[..n * hs]);
    }

    /// The final norm and output projection of the rows `out` into `st.logits`; returns the
    /// number of rows.
    fn logits_of(&self, st: &mut State, par: &Par, out: OutRows, pr: ProbeOpt) -> usize {
        let (c, kern, hs) = (&self.config, &self.kernels, self.config.hidden_size);
        let m = match out {
            OutRows::Range(ref r) => r.len(),
            OutRows::Rows(r) => r.len(),
        };
        if m > 0 {
            let norm = Some(self.vec(self.output_norm));
            let eps = c.rms_norm_eps;
            match out {
                OutRows::Range(r) => {
                    let h = &st.h[r.start * hs..];
                    ops::rmsnorm_rows(kern, par, h, norm, eps, hs, m, &mut st.xn);
                }
                OutRows::Rows(rows) => {
                    for (i, &t) in rows.iter().enumerate() {
                        let (t, o) = (t as usize, &mut st.xn[i * hs..(i + 1) * hs]);
                        (kern.rmsnorm)(&st.h[t * hs..(t + 1) * hs], norm, eps, o);
                    }
                }
            }
            see(
                pr,
                c.num_layers,
                Point::MatInput(Input::Output),
                &st.xn[..m * hs],
            );
            let out = self.mat(self.output);
            let q8 = quantize_for(kern, par, &st.xn, hs, m, &mut st.q8, &[out]);
            let a = Act {
                x: &st.xn,
                k: hs,
                n_tok: m,
                q8,
            };
            let v = c.vocab_size;
            matmul(kern, par, out, v, &a, &mut st.logits, v);
        }
        m
    }

    /// `xn = rmsnorm(h) · norm` for the first `n` rows (the pre-norm of a block).
    fn pre_norm(&self, par: &Par, st: &mut State, norm: &[f32], n: usize) {
        let c = &self.config;
        let (h, xn) = (&st.h, &mut st.xn);
        let (eps, hs) = (c.rms_norm_eps, c.hidden_size);
        ops::rmsnorm_rows(&self.kernels, par, h, Some(norm), eps, hs, n, xn);
    }
}
