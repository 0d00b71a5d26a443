//! The mixture-of-experts FFN block: router → top-k → group (token, slot) pairs by expert →
//! per chosen expert gate/up/SiLU/down on its rows → weighted scatter-add back to the tokens,
//! plus the shared expert (Llama 4) on every token.
//!
//! Two router kinds ([`Router`]): Llama 4's sigmoid of the chosen raw logits scaling the
//! expert's input, and Mixtral's softmax top-k (renormalised) scaling the expert's output. Only
//! the chosen experts' weights are read, and each expert is handled in one step (its rows'
//! gate/up, then their down projection), so a pager can bring in one expert at a time.

use super::config::Router;
use super::ffn::{swiglu, SwigluBufs};
use super::probe::{see, Input, Point, ProbeOpt};
use super::state::State;
use super::weights::{Model, W};
use crate::ops::{self, matmul, quantize_for, Act, Mat, Par};

/// The weights of one MoE layer.
pub(super) struct MoeLayer<'w> {
    pub router: W,
    pub shared: Option<&'w [W; 3]>,
    pub experts: &'w [[W; 3]],
}

/// Turn the top-k router logits of one token (`val`, chosen from `logits`) into the weights
/// the router kind applies: Llama 4 keeps the logits (the sigmoid is applied to the input
/// rows); softmax top-k computes `softmax(logits)[chosen]`, renormalised to sum 1 if asked.
fn route_weights(router: Router, logits: &[f32], val: &mut [f32]) {
    match router {
        Router::SigmoidInput => {}
        Router::SoftmaxTopK { renormalize } => {
            let m = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let z: f32 = logits.iter().map(|&v| (v - m).exp()).sum();
            val.iter_mut().for_each(|v| *v = (*v - m).exp() / z);
            if renormalize {
                let s: f32 = val.iter().sum();
                val.iter_mut().for_each(|v| *v /= s);
            }
        }
    }
}

impl Model {
    /// The router of the first MoE layer after decoder layer `li`.
    fn next_router(&self, li: usize) -> Option<W> {
        self.layers.iter().skip(li + 1).find_map(|l| match &l.ffn {
            super::weights::FfnWeights::Moe { router, .. } => Some(*router),
            _ => None,
        })
    }

    /// The MoE FFN of layer `layer` on the normed rows `st.xn` (`n` tokens), into `st.y`.
    pub(super) fn moe(
        &self,
        st: &mut State,
        par: &Par,
        w: MoeLayer,
        n: usize,
        probe: ProbeOpt,
        layer: usize,
    ) {
        let c = &self.config;
        let kern = &self.kernels;
        let (hs, ne, kx) = (c.hidden_size, c.num_experts, c.num_experts_per_tok);
        see(probe, layer, Point::MatInput(Input::Moe), &st.xn[..n * hs]);
        // router logits (B, E) in f32, top-k per token
        let a = Act {
            x: &st.xn,
            k: hs,
            n_tok: n,
            q8: &[],
        };
        let wr = Mat::F32(self.vec(w.router));
        matmul(kern, par, wr, ne, &a, &mut st.router, ne);
        see(probe, layer, Point::RouterLogits, &st.router[..n * ne]);
        for t in 0..n {
            let logits = &st.router[t * ne..(t + 1) * ne];
            let val = &mut st.top_val[t * kx..(t + 1) * kx];
            (kern.topk)(logits, kx, &mut st.top_idx[t * kx..(t + 1) * kx], val);
            route_weights(c.router, logits, val);
        }
        // group (token, slot) pairs by expert: counts, offsets, permutation and its inverse
        let pairs = n * kx;
        (kern.group_by_expert)(
            &st.top_idx[..pairs],
            ne,
            &mut st.counts,
            &mut st.offsets,
            &mut st.perm,
            &mut st.inv,
        );
        // paged experts: drop cold ones, ask in the picked ones that are not resident; the
        // reads run while the shared expert computes. A batch of at least as many (token,
        // expert) pairs as experts (prefill) also reads the next MoE layer's experts ahead,
        // while this layer and the next attention compute
        if let Some(r) = &self.residency {
            r.prepare_layer(layer, &st.counts);
            if pairs >= ne {
                r.prefetch_after(layer, None);
            } else if let Some(next) = r.predict.then(|| self.next_router(layer)).flatten() {
                // decode (asked for): the next MoE layer's router applied to this layer's
                // input predicts its picks, read ahead while this layer and the next
                // attention compute (the router logits of this layer are used up)
                matmul(
                    kern,
                    par,
                    Mat::F32(self.vec(next)),
                    ne,
                    &a,
                    &mut st.router,
                    ne,
                );
                st.predicted.iter_mut().for_each(|c| *c = 0);
                for t in 0..n {
                    let logits = &st.router[t * ne..(t + 1) * ne];
                    (kern.topk)(logits, kx, &mut st.pred_idx, &mut st.pred_val);
                    for &e in &st.pred_idx {
                        if let Some(c) = st.predicted.get_mut(e as usize) {
                            *c += 1;
                        }
                    }
                }
                r.prefetch_after(layer, Some(&st.predicted));
            }
        }
        // shared expert on the unscaled input, into y (or zeros)
        match w.shared {
            Some(sw) => {
                let sw = [self.mat(sw[0]), self.mat(sw[1]), self.mat(sw[2])];
                let bufs = SwigluBufs {
                    q8: &mut st.q8,
                    iota: &st.iota,
                    gate: &mut st.gate,
                    up: &mut st.up,
                };
                let inter = c.moe_intermediate_size;
                let down_in = Input::SharedDown;
                swiglu(
                    kern, par, sw, hs, inter, &st.xn, n, bufs, &mut st.y, probe, layer, down_in,
                );
            }
            None => st.y[..n * hs].iter_mut().for_each(|v| *v = 0.0),
        }
        // routed inputs in expert order: x[t] * sigmoid(logit) (Llama 4) or x[t]
        let (perm, top_val, xn) = (&st.perm, &st.top_val, &st.xn);
        let scale_input = c.router == Router::SigmoidInput;
        ops::par_rows(par, &mut st.xs[..pairs * hs], hs, 1, &|r, xs| {
            for (j, o) in r.zip(xs.chunks_exact_mut(hs)) {
                let pair = perm[j] as usize;
                let x = &xn[pair / kx * hs..(pair / kx + 1) * hs];
                if scale_input {
                    let s = 1.0 / (1.0 + (-top_val[pair]).exp());
                    o.iter_mut().zip(x).for_each(|(o, &x)| *o = x * s);
                } else {
                    o.copy_from_slice(x);
                }
            }
        });
        // routed experts: the inputs of all pairs are quantized once (in expert order); then
        // per chosen expert, fused gate/up+SiLU on its rows, their intermediate activations
        // quantized, and its down projection
        let Some(first) = w.experts.first() else {
            return;
        };
        let inter = c.moe_intermediate_size;
        let wg0 = self.mat(first[0]);
        let qa = quantize_for(kern, par, &st.xs, hs, pairs, &mut st.q8, &[wg0]);
        let xs = Act {
            x: &st.xs[..pairs * hs],
            k: hs,
            n_tok: pairs,
            q8: qa,
        };
        for (e, ew) in w.experts.iter().enumerate() {
            let (o0, o1) = (st.offsets[e] as usize, st.offsets[e + 1] as usize);
            if o0 == o1 {
                continue;
            }
            let [wg, wu, wd] = [self.mat(ew[0]), self.mat(ew[1]), self.mat(ew[2])];
            let a = xs.rows(o0, o1);
            see(probe, layer, Point::MatInput(Input::ExpertGateUp(e)), a.x);
            let gate = &mut st.gate[o0 * inter..o1 * inter];
            let up = &mut st.up[o0 * inter..o1 * inter];
            ops::gate_up(kern, par, wg, wu, inter, &a, &st.iota, gate, up);
            see(probe, layer, Point::MatInput(Input::ExpertDown(e)), gate);
            let qg = quantize_for(kern, par, gate, inter, o1 - o0, &mut st.q8_mid, &[wd]);
            let g = Act {
                x: gate,
                k: inter,
                n_tok: o1 - o0,
                q8: qg,
            };
            matmul(kern, par, wd, hs, &g, &mut st.ys[o0 * hs..o1 * hs], hs);
        }
        // scatter-add back to tokens, by token: a token's pairs are added in expert order
        // (ascending position in `ys`, as the serial loop over pairs did), so the sums do not
        // depend on the split; softmax routing weighs each expert's output
        let (inv, ys) = (&st.inv, &st.ys);
        let weigh_output = !scale_input;
        ops::par_rows(par, &mut st.y[..n * hs], hs, kx, &|r, y| {
            for (t, yt) in r.zip(y.chunks_exact_mut(hs)) {
                let pos = &inv[t * kx..(t + 1) * kx];
                let mut prev: Option<u32> = None;
                for _ in 0..kx {
                    // the next position (positions of one token are distinct)
                    let Some(j) = pos
                        .iter()
                        .copied()
                        .filter(|&j| prev.is_none_or(|p| j > p))
                        .min()
                    else {
                        break;
                    };
                    prev = Some(j);
                    let j = j as usize;
                    let src = &ys[j * hs..(j + 1) * hs];
                    if weigh_output {
                        let wt = top_val[perm[j] as usize];
                        yt.iter_mut().zip(src).for_each(|(yv, &v)| *yv += wt * v);
                    } else {
                        yt.iter_mut().zip(src).for_each(|(yv, &v)| *yv += v);
                    }
                }
            }
        });
    }
}
