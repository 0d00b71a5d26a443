//! The forward pass: one function that reads top to bottom like the data-flow diagram in
//! `ARCHITECTURE.md` (llama2.c `forward`), over buffers preallocated in a [`State`] (one per
//! session), with no allocation per token. The steps live in their own modules: the KV cache
//! in [`kv`](super::kv), attention in [`attention`](super::attention), the FFNs in
//! `ffn` and [`moe`](super::moe); the observation points in [`probe`](super::probe).

use super::attention::{self, AttnShape};
use super::ffn::{swiglu, SwigluBufs};
use super::moe::MoeLayer;
use super::probe::{see, HiddenOnly, Input, Point, Probe};
use super::weights::{FfnWeights, Model};
use crate::ops::{self, matmul, quantize_for, Act, Par};
use crate::{Error, Result};

pub use super::kv::KvType;
pub use super::state::{Logits, State};

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
        mut probe: Option<&mut dyn Probe>,
    ) -> Result<()> {
        self.check_call(st, tokens, want)?;
        let (c, kern, pr) = (&self.config, &self.kernels, &mut probe);
        let (n, pos0, hs) = (tokens.len(), st.pos, c.hidden_size);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
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
        for t in 0..n {
            let (cos, sin) = (&mut st.cos[t * half..], &mut st.sin[t * half..]);
            ops::rope_cos_sin(&self.inv_freq, pos0 + t, &mut cos[..half], &mut sin[..half]);
        }

        for (li, (lw, spec)) in self.layers.iter().zip(&c.layers).enumerate() {
            // ---- attention block: norm → q/k/v → RoPE/NoPE, QK norm → cache → attend → o ----
            self.pre_norm(&par, st, self.vec(lw.attn_norm), n);
            see(pr, li, Point::MatInput(Input::Qkv), &st.xn[..n * hs]);
            let (wq, wk, wv) = (self.mat(lw.wq), self.mat(lw.wk), self.mat(lw.wv));
            let q8 = quantize_for(kern, &par, &st.xn, hs, n, &mut st.q8, &[wq, wk, wv]);
            let a = Act {
                x: &st.xn,
                k: hs,
                n_tok: n,
                q8,
            };
            let qkv = [&mut st.q[..], &mut st.k[..], &mut st.v[..]];
            ops::matmul_n(kern, &par, [wq, wk, wv], [qd, kvd, kvd], &a, qkv);
            let (cos, sin) = (&st.cos, &st.sin);
            attention::prepare_qk(&par, c, spec, cos, sin, pos0, n, &mut st.q, &mut st.k);
            // append and attend per run of positions the layer's cache holds at once (the
            // whole batch, or for a chunk ring the part of the batch in one chunk)
            let shape = AttnShape::of(c, spec);
            let mut s0 = 0;
            while s0 < n {
                let s1 = st.kv.segment_end(li, pos0 + s0, pos0 + n) - pos0;
                let (k, v) = (&st.k[s0 * kvd..], &st.v[s0 * kvd..]);
                st.kv.append(&par, li, pos0 + s0, s1 - s0, k, v);
                let (kvl, base) = (st.kv.layer(li), st.kv.base(li, pos0 + s0));
                let (q, att) = (&st.q[s0 * qd..], &mut st.att[s0 * qd..s1 * qd]);
                attention::attend(kern, &par, shape, kvl, base, q, pos0 + s0, s1 - s0, att);
                s0 = s1;
            }
            see(pr, li, Point::MatInput(Input::Wo), &st.att[..n * qd]);
            let wo = self.mat(lw.wo);
            let q8 = quantize_for(kern, &par, &st.att, qd, n, &mut st.q8, &[wo]);
            let a = Act {
                x: &st.att,
                k: qd,
                n_tok: n,
                q8,
            };
            matmul(kern, &par, wo, hs, &a, &mut st.y, hs);
            see(pr, li, Point::AttnOut, &st.y[..n * hs]);
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

        // ---- final norm → output projection → logits ----
        st.pos += n;
        let rows = match want {
            Logits::None => 0..0,
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let m = rows.len();
        if m > 0 {
            let norm = Some(self.vec(self.output_norm));
            let (h, eps) = (&st.h[rows.start * hs..], c.rms_norm_eps);
            ops::rmsnorm_rows(kern, &par, h, norm, eps, hs, m, &mut st.xn);
            see(
                pr,
                c.num_layers,
                Point::MatInput(Input::Output),
                &st.xn[..m * hs],
            );
            let out = self.mat(self.output);
            let q8 = quantize_for(kern, &par, &st.xn, hs, m, &mut st.q8, &[out]);
            let a = Act {
                x: &st.xn,
                k: hs,
                n_tok: m,
                q8,
            };
            let v = c.vocab_size;
            matmul(kern, &par, out, v, &a, &mut st.logits, v);
        }
        st.n_logits = m * c.vocab_size;
        (st.pool, st.scratch) = (pool, scratch);
        Ok(())
    }

    /// `xn = rmsnorm(h) · norm` for the first `n` rows (the pre-norm of a block).
    fn pre_norm(&self, par: &Par, st: &mut State, norm: &[f32], n: usize) {
        let c = &self.config;
        let (h, xn) = (&st.h, &mut st.xn);
        let (eps, hs) = (c.rms_norm_eps, c.hidden_size);
        ops::rmsnorm_rows(&self.kernels, par, h, Some(norm), eps, hs, n, xn);
    }
}
