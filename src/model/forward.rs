//! The forward pass: one function that reads top to bottom (llama2.c `forward`), over buffers
//! preallocated in a [`State`] (one per session), with no allocation per token.

use super::config::RopeStyle;
use super::weights::{FfnWeights, Model, W};
use crate::ops::{self, matmul, quantize_for, Act, Mat, Par, SCRATCH_LEN};
use crate::pool::{ThreadPool, Tile};
use crate::{Error, Result};
use ferroq_kernels::{scalar, BlockQ8A, QK};
use std::sync::Mutex;

/// Keys per attention tile (scores of `rep` heads × this many keys live in the scratch).
const ATT_TILE: usize = 64;
/// Query tokens per prefill attention task: the `rep` heads of the GQA group for this many
/// tokens share each K/V tile, converted to f32 (keys transposed) once per task.
const ATT_TOK_BLOCK: usize = 16;
/// Calls with fewer tokens than this (decode) use one task per (token, KV head) and read the
/// cache in place.
const ATT_MIN_BLOCK_TOKENS: usize = 4;
/// Attention calls with less work than this (multiply-adds) run on the calling thread.
const MIN_PARALLEL_ATTN: usize = 1 << 17;

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    /// 4 bytes per element: exact.
    F32,
    /// 2 bytes per element (IEEE half): the default; keys and values are rounded to f16.
    #[default]
    F16,
    /// 1 byte per element plus one f32 scale per (position, KV head): symmetric int8 rows.
    Q8,
}

impl KvType {
    /// Parse `f32` / `f16` (CLI flags).
    pub fn parse(s: &str) -> Option<KvType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "q8" | "int8" => Some(KvType::Q8),
            _ => None,
        }
    }
}

/// Per layer: `[max_ctx, n_kv * head_dim]` keys (after RoPE / QK norm) and values.
enum KvCache {
    F32(Vec<Vec<f32>>, Vec<Vec<f32>>),
    F16(Vec<Vec<u16>>, Vec<Vec<u16>>),
    /// int8 keys, values, and their scales `[max_ctx, n_kv]`.
    Q8(Q8Cache),
}

struct Q8Cache {
    k: Vec<Vec<i8>>,
    v: Vec<Vec<i8>>,
    ks: Vec<Vec<f32>>,
    vs: Vec<Vec<f32>>,
}

/// Symmetric int8 quantization of one head row: returns the scale.
fn quantize_row_i8(x: &[f32], out: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v * id).round().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// One layer's cache, borrowed.
#[derive(Clone, Copy)]
enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [u16], &'a [u16]),
    Q8(&'a [i8], &'a [i8], &'a [f32], &'a [f32]),
}

/// `n` zeroed elements from the allocator (`calloc`: untouched pages stay unmapped), or `err()`
/// when the size overflowed (`None`) or the allocation failed.
fn zeroed<T: bytemuck::Zeroable>(n: Option<usize>, err: &dyn Fn() -> Error) -> Result<Vec<T>> {
    n.and_then(|n| bytemuck::allocation::try_zeroed_vec(n).ok())
        .ok_or_else(err)
}

/// [`zeroed`] once per layer.
fn layered<T: bytemuck::Zeroable>(
    layers: usize,
    n: Option<usize>,
    err: &dyn Fn() -> Error,
) -> Result<Vec<Vec<T>>> {
    (0..layers).map(|_| zeroed(n, err)).collect()
}

/// Scratch floats one attention task needs: decode `(n_heads + 1) × (ATT_TILE + 2)`; prefill
/// blocks of `R = ATT_TOK_BLOCK × rep` rows: queries and outputs `R × d` each, running max/sum
/// `2R`, scores `R × ATT_TILE`, the converted K (transposed) and V tiles `ATT_TILE × d` each.
fn att_scratch_len(nh: usize, nkv: usize, d: usize) -> usize {
    let rr = ATT_TOK_BLOCK * (nh / nkv.max(1)).max(1);
    let block = rr * (2 * d + 2 + ATT_TILE) + 2 * ATT_TILE * d;
    block.max((nh + 1) * (ATT_TILE + 2))
}

/// One online-softmax step of one query row over a key tile: `s` (the row's scores) becomes
/// `exp(s − m_new)`; the running `ml = [max, sum]` and the row's output accumulator `o` are
/// rescaled when the max grew.
fn softmax_step(kern: &ferroq_kernels::Kernels, s: &mut [f32], ml: &mut [f32], o: &mut [f32]) {
    let m_old = ml[0];
    let (m_new, sum) = (kern.softmax_tile)(s, m_old);
    if m_old != m_new && m_old != f32::NEG_INFINITY {
        let corr = (m_old - m_new).exp();
        o.iter_mut().for_each(|v| *v *= corr);
        ml[1] *= corr;
    }
    ml[1] += sum;
    ml[0] = m_new;
}

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
    max_ctx: usize,
    max_batch: usize,
    kv: KvCache,
    h: Vec<f32>,       // (B, H) residual stream
    xn: Vec<f32>,      // (B, max(H, n_h*D)) normed input of a block
    q8: Vec<BlockQ8A>, // (B, max_k / 32) quantized activations
    q: Vec<f32>,       // (B, n_h * D)
    k: Vec<f32>,       // (B, n_kv * D)
    v: Vec<f32>,       // (B, n_kv * D)
    att: Vec<f32>,     // (B, n_h * D) attention output
    cos: Vec<f32>,     // (B, D/2)
    sin: Vec<f32>,     // (B, D/2)
    gate: Vec<f32>,    // (B * k_exp, I_max)
    up: Vec<f32>,      // (B * k_exp, I_max)
    y: Vec<f32>,       // (B, H) FFN / attention projection output
    // MoE routing
    router: Vec<f32>,  // (B, E)
    top_idx: Vec<u32>, // (B * k_exp,)
    top_val: Vec<f32>, // (B * k_exp,)
    counts: Vec<u32>,  // (E,)
    offsets: Vec<u32>, // (E + 1,)
    perm: Vec<u32>,    // (B * k_exp,) pair index at each position in expert order
    inv: Vec<u32>,     // (B * k_exp,) position in expert order of each pair
    iota: Vec<u32>,    // 0, 1, .. (B * k_exp) (row indices of a plain product)
    xs: Vec<f32>,      // (B * k_exp, H) routed, score-scaled expert inputs
    ys: Vec<f32>,      // (B * k_exp, H) expert outputs
    logits: Vec<f32>,  // (B or 1, V)
    n_logits: usize,
    // threads: a pool for this session and one scratch buffer per pool thread
    pool: Option<ThreadPool>,
    scratch: Vec<Mutex<Vec<f32>>>, // (threads,) × max(SCRATCH_LEN, att_scratch_len(config))
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
        let kv_elem = match kv {
            KvType::F32 => 4,
            KvType::F16 => 2,
            KvType::Q8 => 1,
        };
        let kv_err = || {
            let bytes = (max_ctx as f64) * (kvd as f64) * (2 * c.num_layers * kv_elem) as f64;
            Error::config(
                "ctx",
                format!(
                    "a KV cache of {max_ctx} tokens needs {:.1} GiB ({} layers × K and V × \
                     {kvd} values per token, {kv:?}); it cannot be allocated",
                    bytes / (1u64 << 30) as f64,
                    c.num_layers
                ),
            )
        };
        let batch_err = || {
            Error::config(
                "batch",
                format!("buffers for a batch of {max_batch} tokens cannot be allocated"),
            )
        };
        let per_ctx = |per_token: usize| -> Option<usize> { max_ctx.checked_mul(per_token) };
        let bk = max_batch.checked_mul(kx).ok_or_else(batch_err)?;
        let nb = |per_token: usize| max_batch.checked_mul(per_token);
        let nk = |per_token: usize| bk.checked_mul(per_token);
        let kv = match kv {
            KvType::F32 => KvCache::F32(
                layered(c.num_layers, per_ctx(kvd), &kv_err)?,
                layered(c.num_layers, per_ctx(kvd), &kv_err)?,
            ),
            KvType::F16 => KvCache::F16(
                layered(c.num_layers, per_ctx(kvd), &kv_err)?,
                layered(c.num_layers, per_ctx(kvd), &kv_err)?,
            ),
            KvType::Q8 => KvCache::Q8(Q8Cache {
                k: layered(c.num_layers, per_ctx(kvd), &kv_err)?,
                v: layered(c.num_layers, per_ctx(kvd), &kv_err)?,
                ks: layered(c.num_layers, per_ctx(c.num_kv_heads), &kv_err)?,
                vs: layered(c.num_layers, per_ctx(c.num_kv_heads), &kv_err)?,
            }),
        };
        let f = |n: Option<usize>| zeroed::<f32>(n, &batch_err);
        Ok(State {
            pos: 0,
            max_ctx,
            max_batch,
            kv,
            h: f(nb(c.hidden_size))?,
            xn: f(nb(wide))?,
            q8: zeroed::<BlockQ8A>(nk(wide.div_ceil(QK)), &batch_err)?,
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
            logits: f(if all_logits {
                nb(c.vocab_size)
            } else {
                Some(c.vocab_size)
            })?,
            n_logits: 0,
            pool,
            scratch: (0..n_threads)
                .map(|_| {
                    Mutex::new(vec![
                        0.0;
                        SCRATCH_LEN.max(att_scratch_len(
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
        match self.kv {
            KvCache::F32(..) => KvType::F32,
            KvCache::F16(..) => KvType::F16,
            KvCache::Q8(..) => KvType::Q8,
        }
    }

    /// Context capacity in tokens.
    pub fn max_ctx(&self) -> usize {
        self.max_ctx
    }

    /// Largest batch one forward call takes.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Forget the cache (start a new conversation).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// Rewind the cache to `pos` tokens (keep a shared prefix).
    pub fn truncate(&mut self, pos: usize) {
        self.pos = self.pos.min(pos);
    }

    /// The logits computed by the last forward call: `rows × vocab`.
    pub fn logits(&self) -> &[f32] {
        &self.logits[..self.n_logits]
    }
}

/// Observer of named intermediates (tests compare them with a reference file). The default
/// forward passes `None`, which costs nothing.
pub type Observer<'a> = &'a mut dyn FnMut(usize, &str, &[f32]);

impl Model {
    /// Run `tokens` (at positions `state.pos ..`) through the model, append them to the KV
    /// cache, and compute the requested logits (read them with [`State::logits`]).
    pub fn forward(&self, state: &mut State, tokens: &[u32], want: Logits) -> Result<()> {
        self.forward_observed(state, tokens, want, None)
    }

    /// [`Model::forward`] with an observer that sees `("hidden", layer)` after the embedding
    /// (layer 0) and after each layer (layer i + 1), for `tokens.len() × hidden_size`.
    pub fn forward_observed(
        &self,
        st: &mut State,
        tokens: &[u32],
        want: Logits,
        mut obs: Option<Observer>,
    ) -> Result<()> {
        let c = &self.config;
        let kern = &self.kernels;
        let n = tokens.len();
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
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range (vocabulary {})",
                c.vocab_size
            )));
        }
        if want == Logits::All && st.logits.len() < n * c.vocab_size {
            return Err(Error::Input("this state keeps only the last logits".into()));
        }
        let (hs, d) = (c.hidden_size, c.head_dim);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let (qd, kvd) = (nh * d, nkv * d);
        let pos0 = st.pos;
        // the pool and scratch are moved out for the call (no allocation) so that `par` can be
        // shared by every op while the buffers of `st` are borrowed mutably
        let (pool, scratch) = (st.pool.take(), std::mem::take(&mut st.scratch));
        let par = Par {
            pool: pool.as_ref(),
            scratch: &scratch,
        };

        // ---- embedding (no scaling) ----
        let emb = self.mat(self.tok_embeddings);
        for (t, &id) in tokens.iter().enumerate() {
            ops::mat_row(emb, id as usize, hs, &mut st.h[t * hs..(t + 1) * hs]);
        }
        if let Some(o) = obs.as_mut() {
            o(0, "hidden", &st.h[..n * hs]);
        }

        // ---- RoPE angles for the positions of this batch ----
        let half = d / 2;
        for t in 0..n {
            ops::rope_cos_sin(
                &self.inv_freq,
                pos0 + t,
                &mut st.cos[t * half..(t + 1) * half],
                &mut st.sin[t * half..(t + 1) * half],
            );
        }

        for (li, (lw, spec)) in self.layers.iter().zip(&c.layers).enumerate() {
            // ---- attention block (pre-norm) ----
            let norm = self.vec(lw.attn_norm);
            self.pre_norm(&par, st, norm, n);
            let (wq, wk, wv) = (self.mat(lw.wq), self.mat(lw.wk), self.mat(lw.wv));
            let q8 = quantize_for(kern, &par, &st.xn, hs, n, &mut st.q8, &[wq, wk, wv]);
            let a = Act {
                x: &st.xn,
                k: hs,
                n_tok: n,
                q8,
            };
            ops::matmul_n(
                kern,
                &par,
                [wq, wk, wv],
                [qd, kvd, kvd],
                &a,
                [&mut st.q, &mut st.k, &mut st.v],
            );

            // RoPE, QK norm and temperature tuning of each token's q and k rows, then the k and v
            // rows appended to the cache; per row, on the pool for a long batch
            let rope = match c.rope_style {
                RopeStyle::Interleaved => scalar::rope_interleaved,
                RopeStyle::Half => scalar::rope_half,
            };
            let (cos, sin) = (&st.cos, &st.sin);
            let prep = |t: usize, x: &mut [f32], is_q: bool| {
                if spec.rope {
                    let (cs, sn) = (
                        &cos[t * half..(t + 1) * half],
                        &sin[t * half..(t + 1) * half],
                    );
                    x.chunks_exact_mut(d).for_each(|x| rope(x, cs, sn));
                }
                if spec.qk_norm {
                    // weightless RMS norm per head, after RoPE (in place through a copy-free
                    // two-pass: rmsnorm reads x before writing each element)
                    for x in x.chunks_exact_mut(d) {
                        let ss: f64 =
                            x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
                        let inv = (1.0 / (ss + c.rms_norm_eps as f64).sqrt()) as f32;
                        x.iter_mut().for_each(|v| *v *= inv);
                    }
                }
                if spec.temp_tune && is_q {
                    // q *= 1 + attn_scale * log1p(floor((p + 1) / floor_scale)), in f32
                    let p = pos0 + t;
                    let s = 1.0 + c.attn_scale * (((p + 1) as f32 / c.floor_scale).floor()).ln_1p();
                    x.iter_mut().for_each(|v| *v *= s);
                }
            };
            ops::par_rows(&par, &mut st.q[..n * qd], qd, 1, &|r, q| {
                r.zip(q.chunks_exact_mut(qd))
                    .for_each(|(t, x)| prep(t, x, true))
            });
            ops::par_rows(&par, &mut st.k[..n * kvd], kvd, 1, &|r, k| {
                r.zip(k.chunks_exact_mut(kvd))
                    .for_each(|(t, x)| prep(t, x, false))
            });
            // append to the cache (rows pos0 .. pos0 + n)
            let cache_rows = pos0 * kvd..(pos0 + n) * kvd;
            match &mut st.kv {
                KvCache::F32(kc, vc) => {
                    kc[li][cache_rows.clone()].copy_from_slice(&st.k[..n * kvd]);
                    vc[li][cache_rows].copy_from_slice(&st.v[..n * kvd]);
                }
                KvCache::F16(kc, vc) => {
                    for (dst, src) in [(&mut kc[li], &st.k), (&mut vc[li], &st.v)] {
                        ops::par_rows(&par, &mut dst[cache_rows.clone()], kvd, 1, &|r, o| {
                            let src = &src[r.start * kvd..r.end * kvd];
                            for (o, x) in o.iter_mut().zip(src) {
                                *o = half::f16::from_f32(*x).to_bits();
                            }
                        });
                    }
                }
                KvCache::Q8(q) => {
                    for t in 0..n {
                        let p = pos0 + t;
                        let (k, v) = (&st.k[t * kvd..(t + 1) * kvd], &st.v[t * kvd..(t + 1) * kvd]);
                        for h in 0..nkv {
                            let r = p * kvd + h * d..p * kvd + (h + 1) * d;
                            q.ks[li][p * nkv + h] =
                                quantize_row_i8(&k[h * d..(h + 1) * d], &mut q.k[li][r.clone()]);
                            q.vs[li][p * nkv + h] =
                                quantize_row_i8(&v[h * d..(h + 1) * d], &mut q.v[li][r]);
                        }
                    }
                }
            }

            // causal attention over the cache (chunked layers: only the current chunk), flash
            // style: online softmax over tiles of ATT_TILE keys. Decode (`group`): one task per
            // (token, KV head) running the `rep` query heads of the group against each K/V tile
            // in place (GQA without repeating K/V). Prefill (`block`, n >= ATT_MIN_BLOCK_TOKENS):
            // one task per (ATT_TOK_BLOCK tokens, KV head). The task partition depends only on
            // `n`, each output is computed by one task in a fixed order: the result does not
            // depend on the thread count.
            let scale = 1.0 / (d as f32).sqrt();
            let rep = nh / nkv;
            let qb = &st.q;
            let kvl = match &st.kv {
                KvCache::F32(k, v) => KvLayer::F32(&k[li], &v[li]),
                KvCache::F16(k, v) => KvLayer::F16(&k[li], &v[li]),
                KvCache::Q8(q) => KvLayer::Q8(&q.k[li], &q.v[li], &q.ks[li], &q.vs[li]),
            };
            let chunk = if spec.chunked {
                c.attention_chunk_size
            } else {
                None
            };
            let group = |mut tile: Tile, thread: usize| {
                let (t, kh) = (tile.toks().start, tile.rows().start / (rep * d));
                let p = pos0 + t;
                let start = chunk.map_or(0, |cs| (p / cs) * cs);
                let mut scratch = par.scratch[thread]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let (sc, rest) = scratch.split_at_mut(rep * ATT_TILE);
                let (pw, ml) = rest.split_at_mut(ATT_TILE);
                let o = tile.out(t);
                o.iter_mut().for_each(|v| *v = 0.0);
                for r in 0..rep {
                    (ml[2 * r], ml[2 * r + 1]) = (f32::NEG_INFINITY, 0.0);
                }
                let mut j0 = start;
                while j0 <= p {
                    let nk = (p + 1 - j0).min(ATT_TILE);
                    let off = j0 * kvd + kh * d;
                    for r in 0..rep {
                        let hh = kh * rep + r;
                        let q = &qb[t * qd + hh * d..t * qd + (hh + 1) * d];
                        let s = &mut sc[r * ATT_TILE..r * ATT_TILE + nk];
                        match kvl {
                            KvLayer::F32(kc, _) => (kern.attn_scores)(q, &kc[off..], kvd, scale, s),
                            KvLayer::F16(kc, _) => {
                                (kern.attn_scores_f16)(q, &kc[off..], kvd, scale, s)
                            }
                            KvLayer::Q8(kc, _, ks, _) => {
                                (kern.attn_scores_i8)(q, &kc[off..], kvd, scale, s);
                                for (i, x) in s.iter_mut().enumerate() {
                                    *x *= ks[(j0 + i) * nkv + kh];
                                }
                            }
                        }
                        let or = &mut o[r * d..(r + 1) * d];
                        softmax_step(kern, s, &mut ml[2 * r..2 * r + 2], or);
                        match kvl {
                            KvLayer::F32(_, vc) => (kern.attn_values)(s, &vc[off..], kvd, or),
                            KvLayer::F16(_, vc) => (kern.attn_values_f16)(s, &vc[off..], kvd, or),
                            KvLayer::Q8(_, vc, _, vs) => {
                                let pw = &mut pw[..nk];
                                for (i, (w, &x)) in pw.iter_mut().zip(s.iter()).enumerate() {
                                    *w = x * vs[(j0 + i) * nkv + kh];
                                }
                                (kern.attn_values_i8)(pw, &vc[off..], kvd, or)
                            }
                        }
                    }
                    j0 += nk;
                }
                for r in 0..rep {
                    let inv = 1.0 / ml[2 * r + 1];
                    o[r * d..(r + 1) * d].iter_mut().for_each(|v| *v *= inv);
                }
            };
            // prefill: one task per (block of ATT_TOK_BLOCK tokens, KV head); the rows (token
            // major, head minor) share each K/V tile, converted to f32 once (keys transposed so
            // the score kernel needs no horizontal sums). A row sees keys chunk_start(p)..=p;
            // the tile's keys outside that range are left out of its softmax and value sum.
            let block = |mut tile: Tile, thread: usize| {
                let (toks, kh) = (tile.toks(), tile.rows().start / (rep * d));
                let (t0, nt) = (toks.start, toks.len());
                let rr = nt * rep;
                let mut scratch = par.scratch[thread]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let (qs, rest) = scratch.split_at_mut(rr * d);
                let (os, rest) = rest.split_at_mut(rr * d);
                let (ml, rest) = rest.split_at_mut(2 * rr);
                let (sc, rest) = rest.split_at_mut(rr * ATT_TILE);
                let (kt, rest) = rest.split_at_mut(ATT_TILE * d);
                let vf = &mut rest[..ATT_TILE * d];
                for i in 0..nt {
                    let src = (t0 + i) * qd + kh * rep * d;
                    qs[i * rep * d..(i + 1) * rep * d].copy_from_slice(&qb[src..src + rep * d]);
                }
                os.iter_mut().for_each(|v| *v = 0.0);
                for r in 0..rr {
                    (ml[2 * r], ml[2 * r + 1]) = (f32::NEG_INFINITY, 0.0);
                }
                let chunk_start = |p: usize| chunk.map_or(0, |cs| (p / cs) * cs);
                let (first, last) = (pos0 + t0, pos0 + t0 + nt - 1);
                let mut j0 = chunk_start(first);
                while j0 <= last {
                    let nk = (last + 1 - j0).min(ATT_TILE);
                    // tokens that see a key of this tile: p >= j0 and chunk_start(p) < j0 + nk
                    let i_lo = j0.saturating_sub(first);
                    let i_hi = match chunk {
                        Some(cs) => ((j0 + nk - 1) / cs + 1) * cs - first,
                        None => nt,
                    }
                    .min(nt);
                    if i_lo >= i_hi {
                        j0 += nk;
                        continue;
                    }
                    let off = j0 * kvd + kh * d;
                    let kt = &mut kt[..d * nk];
                    match kvl {
                        KvLayer::F32(kc, _) => (kern.kv_transpose_f32)(&kc[off..], kvd, d, nk, kt),
                        KvLayer::F16(kc, vc) => {
                            (kern.kv_transpose_f16)(&kc[off..], kvd, d, nk, kt);
                            (kern.kv_rows_f16)(&vc[off..], kvd, d, nk, &mut vf[..nk * d]);
                        }
                        KvLayer::Q8(kc, vc, ks, vs) => {
                            for j in 0..nk {
                                let (ksj, vsj) = (ks[(j0 + j) * nkv + kh], vs[(j0 + j) * nkv + kh]);
                                let r = off + j * kvd..off + j * kvd + d;
                                for (c, &x) in kc[r.clone()].iter().enumerate() {
                                    kt[c * nk + j] = x as f32 * ksj;
                                }
                                for (o, &x) in vf[j * d..(j + 1) * d].iter_mut().zip(&vc[r]) {
                                    *o = x as f32 * vsj;
                                }
                            }
                        }
                    }
                    let (vt, ldv): (&[f32], usize) = match kvl {
                        KvLayer::F32(_, vc) => (&vc[off..], kvd),
                        _ => (&vf[..nk * d], d),
                    };
                    let rows = i_lo * rep..i_hi * rep;
                    let s = &mut sc[..rows.len() * nk];
                    (kern.attn_scores_kt)(&qs[rows.start * d..rows.end * d], kt, d, nk, scale, s);
                    for (sr, r) in s.chunks_exact_mut(nk).zip(rows.clone()) {
                        let p = first + r / rep;
                        // p >= j0 and chunk_start(p) < j0 + nk by the token range: a < b
                        let (a, b) = (chunk_start(p).max(j0) - j0, (p + 1).min(j0 + nk) - j0);
                        // keys outside a..b get weight 0: `o + 0·v` leaves `o` as it is
                        sr[..a].iter_mut().for_each(|x| *x = 0.0);
                        sr[b..].iter_mut().for_each(|x| *x = 0.0);
                        softmax_step(
                            kern,
                            &mut sr[a..b],
                            &mut ml[2 * r..2 * r + 2],
                            &mut os[r * d..(r + 1) * d],
                        );
                    }
                    let o = &mut os[rows.start * d..rows.end * d];
                    (kern.attn_values_rows)(s, nk, vt, ldv, d, o);
                    j0 += nk;
                }
                for i in 0..nt {
                    let o = tile.out(t0 + i);
                    for (h, oh) in o.chunks_exact_mut(d).enumerate() {
                        let r = i * rep + h;
                        let inv = 1.0 / ml[2 * r + 1];
                        for (x, &y) in oh.iter_mut().zip(&os[r * d..(r + 1) * d]) {
                            *x = y * inv;
                        }
                    }
                }
            };
            let tb = if n >= ATT_MIN_BLOCK_TOKENS {
                ATT_TOK_BLOCK
            } else {
                1
            };
            let task = |tile: Tile, thread: usize| {
                if tb > 1 {
                    block(tile, thread)
                } else {
                    group(tile, thread)
                }
            };
            // the work of this call, in multiply-adds; small calls (decode at short context)
            // are not worth a pool round. The tasks are the same either way.
            let work = n * (pos0 + n) * qd;
            match par.pool {
                Some(pool) if work >= MIN_PARALLEL_ATTN => {
                    pool.run_tiles(&mut st.att, n, qd, rep * d, tb, &task)
                }
                _ => {
                    let out = crate::pool::SharedOut::new(&mut st.att, n, qd);
                    for t0 in (0..n).step_by(tb) {
                        for kh in 0..nkv {
                            let rows = kh * rep * d..(kh + 1) * rep * d;
                            // SAFETY: one tile at a time, dropped before the next is made.
                            task(unsafe { out.tile(rows, t0..(t0 + tb).min(n)) }, 0);
                        }
                    }
                }
            }
            let wo = self.mat(lw.wo);
            let q8 = quantize_for(kern, &par, &st.att, qd, n, &mut st.q8, &[wo]);
            let a = Act {
                x: &st.att,
                k: qd,
                n_tok: n,
                q8,
            };
            matmul(kern, &par, wo, hs, &a, &mut st.y, hs);
            ops::add_rows(&par, &mut st.h, &st.y, hs, n);

            // ---- FFN block (pre-norm) ----
            let norm = self.vec(lw.ffn_norm);
            self.pre_norm(&par, st, norm, n);
            match &lw.ffn {
                FfnWeights::Dense { gate, up, down } => {
                    let w = [self.mat(*gate), self.mat(*up), self.mat(*down)];
                    swiglu(
                        kern,
                        &par,
                        w,
                        hs,
                        c.intermediate_size,
                        &st.xn,
                        n,
                        &mut st.q8,
                        &st.iota,
                        &mut st.gate,
                        &mut st.up,
                        &mut st.y,
                    );
                }
                FfnWeights::Moe {
                    router,
                    shared,
                    experts,
                } => {
                    self.moe(st, &par, li, *router, shared.as_ref(), experts, n);
                }
            }
            ops::add_rows(&par, &mut st.h, &st.y, hs, n);
            if let Some(o) = obs.as_mut() {
                o(li + 1, "hidden", &st.h[..n * hs]);
            }
        }

        // ---- final norm and output projection ----
        st.pos += n;
        let rows = match want {
            Logits::None => {
                st.n_logits = 0;
                (st.pool, st.scratch) = (pool, scratch);
                return Ok(());
            }
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let m = rows.len();
        let norm = self.vec(self.output_norm);
        ops::rmsnorm_rows(
            kern,
            &par,
            &st.h[rows.start * hs..],
            Some(norm),
            c.rms_norm_eps,
            hs,
            m,
            &mut st.xn,
        );
        let out = self.mat(self.output);
        let q8 = quantize_for(kern, &par, &st.xn, hs, m, &mut st.q8, &[out]);
        let a = Act {
            x: &st.xn,
            k: hs,
            n_tok: m,
            q8,
        };
        matmul(
            kern,
            &par,
            out,
            c.vocab_size,
            &a,
            &mut st.logits,
            c.vocab_size,
        );
        st.n_logits = m * c.vocab_size;
        (st.pool, st.scratch) = (pool, scratch);
        Ok(())
    }

    /// Llama 4 MoE: top-k on raw router logits, sigmoid of the chosen logits scales the expert
    /// INPUT, only routed experts run (tokens grouped per expert), shared expert always added.
    /// `xn = rmsnorm(h) · norm` for the first `n` rows (the pre-norm of a block).
    fn pre_norm(&self, par: &Par, st: &mut State, norm: &[f32], n: usize) {
        let c = &self.config;
        let (h, xn) = (&st.h, &mut st.xn);
        let (eps, hs) = (c.rms_norm_eps, c.hidden_size);
        ops::rmsnorm_rows(&self.kernels, par, h, Some(norm), eps, hs, n, xn);
    }

    #[allow(clippy::too_many_arguments)]
    fn moe(
        &self,
        st: &mut State,
        par: &Par,
        li: usize,
        router: W,
        shared: Option<&[W; 3]>,
        experts: &[[W; 3]],
        n: usize,
    ) {
        let c = &self.config;
        let kern = &self.kernels;
        let (hs, ne, kx) = (c.hidden_size, c.num_experts, c.num_experts_per_tok);
        // router logits (B, E) in f32
        let a = Act {
            x: &st.xn,
            k: hs,
            n_tok: n,
            q8: &[],
        };
        matmul(
            kern,
            par,
            Mat::F32(self.vec(router)),
            ne,
            &a,
            &mut st.router,
            ne,
        );
        for t in 0..n {
            scalar::topk(
                &st.router[t * ne..(t + 1) * ne],
                kx,
                &mut st.top_idx[t * kx..(t + 1) * kx],
                &mut st.top_val[t * kx..(t + 1) * kx],
            );
        }
        // group (token, slot) pairs by expert: counts, offsets, permutation and its inverse
        let pairs = n * kx;
        ferroq_kernels::routing::group_by_expert(
            &st.top_idx[..pairs],
            ne,
            &mut st.counts,
            &mut st.offsets,
            &mut st.perm,
            &mut st.inv,
        );
        // paged experts: drop cold ones, ask in the picked ones that are not resident; the
        // reads run while the shared expert computes
        if let Some(r) = &self.residency {
            r.prepare_layer(li, &st.counts);
        }
        // shared expert on the unscaled input, into y (or zeros)
        match shared {
            Some(w) => {
                let w = [self.mat(w[0]), self.mat(w[1]), self.mat(w[2])];
                swiglu(
                    kern,
                    par,
                    w,
                    hs,
                    c.moe_intermediate_size,
                    &st.xn,
                    n,
                    &mut st.q8,
                    &st.iota,
                    &mut st.gate,
                    &mut st.up,
                    &mut st.y,
                )
            }
            None => st.y[..n * hs].iter_mut().for_each(|v| *v = 0.0),
        }
        // routed inputs: x[t] * sigmoid(logit), in expert order
        let (perm, top_val, xn) = (&st.perm, &st.top_val, &st.xn);
        ops::par_rows(par, &mut st.xs[..pairs * hs], hs, 1, &|r, xs| {
            for (j, o) in r.zip(xs.chunks_exact_mut(hs)) {
                let pair = perm[j] as usize;
                let t = pair / kx;
                let s = 1.0 / (1.0 + (-top_val[pair]).exp());
                for (o, &x) in o.iter_mut().zip(&xn[t * hs..(t + 1) * hs]) {
                    *o = x * s;
                }
            }
        });
        // routed experts: the inputs of all pairs are quantized once (in expert order), each
        // chosen expert runs fused gate/up+SiLU on its rows, the intermediate activations of all
        // pairs are quantized once, then each expert's down projection. Only the chosen experts'
        // weights are read.
        let Some(first) = experts.first() else {
            return;
        };
        let inter = c.moe_intermediate_size;
        let qa = quantize_for(
            kern,
            par,
            &st.xs,
            hs,
            pairs,
            &mut st.q8,
            &[self.mat(first[0])],
        );
        let xs = Act {
            x: &st.xs[..pairs * hs],
            k: hs,
            n_tok: pairs,
            q8: qa,
        };
        for (e, w) in experts.iter().enumerate() {
            let (o0, o1) = (st.offsets[e] as usize, st.offsets[e + 1] as usize);
            if o0 == o1 {
                continue;
            }
            let a = xs.rows(o0, o1);
            ops::gate_up(
                kern,
                par,
                self.mat(w[0]),
                self.mat(w[1]),
                inter,
                &a,
                &st.iota,
                &mut st.gate[o0 * inter..o1 * inter],
                &mut st.up[o0 * inter..o1 * inter],
            );
        }
        let qg = quantize_for(
            kern,
            par,
            &st.gate,
            inter,
            pairs,
            &mut st.q8,
            &[self.mat(first[2])],
        );
        let gs = Act {
            x: &st.gate[..pairs * inter],
            k: inter,
            n_tok: pairs,
            q8: qg,
        };
        for (e, w) in experts.iter().enumerate() {
            let (o0, o1) = (st.offsets[e] as usize, st.offsets[e + 1] as usize);
            if o0 == o1 {
                continue;
            }
            let a = gs.rows(o0, o1);
            let y = &mut st.ys[o0 * hs..o1 * hs];
            matmul(kern, par, self.mat(w[2]), hs, &a, y, hs);
        }
        // scatter-add back to tokens, by token: a token's pairs are added in expert order
        // (ascending position in `ys`, as the serial loop over pairs did), so the sums do not
        // depend on the split
        let (inv, ys) = (&st.inv, &st.ys);
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
                    for (yv, &v) in yt.iter_mut().zip(&ys[j * hs..(j + 1) * hs]) {
                        *yv += v;
                    }
                }
            }
        });
    }
}

/// SwiGLU FFN `y = down(silu(gate(x)) * up(x))` of `m` rows of `x` (`hs` wide) with
/// intermediate width `inter`. `gate`/`up` are scratch of `m * inter`.
#[allow(clippy::too_many_arguments)]
fn swiglu(
    kern: &ferroq_kernels::Kernels,
    par: &Par,
    w: [Mat; 3],
    hs: usize,
    inter: usize,
    x: &[f32],
    m: usize,
    q8: &mut [BlockQ8A],
    iota: &[u32],
    gate: &mut [f32],
    up: &mut [f32],
    y: &mut [f32],
) {
    let [wg, wu, wd] = w;
    let qa = quantize_for(kern, par, x, hs, m, q8, &[wg, wu]);
    let a = Act {
        x,
        k: hs,
        n_tok: m,
        q8: qa,
    };
    // gate <- silu(gate x) * (up x)
    ops::gate_up(kern, par, wg, wu, inter, &a, iota, gate, up);
    let g = &gate[..m * inter];
    let qa = quantize_for(kern, par, g, inter, m, q8, &[wd]);
    let a = Act {
        x: g,
        k: inter,
        n_tok: m,
        q8: qa,
    };
    matmul(kern, par, wd, hs, &a, y, hs);
}
