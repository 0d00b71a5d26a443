//! Attention over the KV cache: the per-layer preparation of q and k (RoPE or NoPE, QK norm,
//! temperature tuning, as the layer's [`LayerSpec`] says) and causal or chunked grouped-query
//! attention of a batch of consecutive positions against one layer of a [`KvCache`].
//!
//! Flash style: online softmax over tiles of [`ATT_TILE`] keys, nothing of size `context`
//! allocated. Decode (`group`): one task per (token, KV head) running the `rep` query heads of
//! the group against each K/V tile in place (GQA without repeating K/V). Prefill (`block`,
//! `n >= ATT_MIN_BLOCK_TOKENS`): one task per ([`ATT_TOK_BLOCK`] tokens, KV head). The task
//! partition depends only on `n` and each output is computed by one task in a fixed order: the
//! result does not depend on the thread count.
//!
//! [`KvCache`]: super::kv::KvCache

use super::config::{LayerSpec, ModelConfig, RopeStyle};
use super::kv::KvLayer;
use crate::ops::{self, Par};
use crate::pool::Tile;
use ferroq_kernels::{scalar, Kernels};

/// Keys per attention tile (scores of `rep` heads × this many keys live in the scratch).
pub const ATT_TILE: usize = 64;
/// Query tokens per prefill attention task: the `rep` heads of the GQA group for this many
/// tokens share each K/V tile, converted to f32 (keys transposed) once per task.
pub const ATT_TOK_BLOCK: usize = 16;
/// Calls with fewer tokens than this (decode) use one task per (token, KV head) and read the
/// cache in place.
const ATT_MIN_BLOCK_TOKENS: usize = 4;
/// Attention calls with less work than this (multiply-adds) run on the calling thread.
const MIN_PARALLEL_ATTN: usize = 1 << 17;

/// Scratch floats one attention task needs: decode `(n_heads + 1) × (ATT_TILE + 2)`; prefill
/// blocks of `R = ATT_TOK_BLOCK × rep` rows: queries and outputs `R × d` each, running max/sum
/// `2R`, scores `R × ATT_TILE`, the converted K (transposed) and V tiles `ATT_TILE × d` each.
pub fn scratch_len(nh: usize, nkv: usize, d: usize) -> usize {
    let rr = ATT_TOK_BLOCK * (nh / nkv.max(1)).max(1);
    let block = rr * (2 * d + 2 + ATT_TILE) + 2 * ATT_TILE * d;
    // decode: scores, weights, running max/sum, and one rotated query (4-bit cache)
    block.max((nh + 1) * (ATT_TILE + 2) + d)
}

/// Where a 4-bit KV row lives in a layer of the cache ([`KvLayer::Q4`]).
#[derive(Clone, Copy)]
struct Q4Layout {
    /// Blocks per head row.
    nb: usize,
    /// Bytes of one head row.
    row: usize,
    /// Bytes and scales per position (all KV heads).
    ld: usize,
    ld_s: usize,
}

impl Q4Layout {
    fn new(nkv: usize, d: usize) -> Q4Layout {
        let nb = super::kv::q4_blocks(d);
        let row = nb * scalar::KV_Q4_BYTES;
        Q4Layout {
            nb,
            row,
            ld: nkv * row,
            ld_s: nkv * nb,
        }
    }

    /// Offsets of (slot `j`, KV head `kh`) in the code bytes and in the scales.
    fn off(&self, j: usize, kh: usize) -> (usize, usize) {
        (j * self.ld + kh * self.row, j * self.ld_s + kh * self.nb)
    }
}

/// One online-softmax step of one query row over a key tile: `s` (the row's scores) becomes
/// `exp(s − m_new)`; the running `ml = [max, sum]` and the row's output accumulator `o` are
/// rescaled when the max grew.
fn softmax_step(kern: &Kernels, s: &mut [f32], ml: &mut [f32], o: &mut [f32]) {
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

/// The shape of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    /// Chunked attention: a query at position `p` sees keys `(p / cs) * cs ..= p` only.
    pub chunk: Option<usize>,
}

impl AttnShape {
    /// The shape of layer `spec` of a model.
    pub fn of(c: &ModelConfig, spec: &LayerSpec) -> AttnShape {
        AttnShape {
            n_heads: c.num_heads,
            n_kv: c.num_kv_heads,
            head_dim: c.head_dim,
            chunk: if spec.chunked {
                c.attention_chunk_size
            } else {
                None
            },
        }
    }
}

/// Prepare the `n` query rows `q` (`n_heads * head_dim` each) and key rows `k` (`n_kv *
/// head_dim`) of positions `pos0 ..` in place, per the layer's spec: RoPE with the batch's
/// angles `cos`/`sin` (`head_dim / 2` per token) or none (NoPE), then the weightless QK RMS
/// norm, then (queries only) Llama 4 temperature tuning. Per row, on the pool for a long batch.
#[allow(clippy::too_many_arguments)]
pub fn prepare_qk(
    kern: &Kernels,
    par: &Par,
    c: &ModelConfig,
    spec: &LayerSpec,
    cos: &[f32],
    sin: &[f32],
    pos0: usize,
    n: usize,
    q: &mut [f32],
    k: &mut [f32],
) {
    let d = c.head_dim;
    let half = d / 2;
    let (qd, kvd) = (c.num_heads * d, c.num_kv_heads * d);
    let rope = match c.rope_style {
        RopeStyle::Interleaved => kern.rope_interleaved,
        RopeStyle::Half => kern.rope_half,
    };
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
                let ss: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
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
    ops::par_rows(par, &mut q[..n * qd], qd, 1, &|r, q| {
        r.zip(q.chunks_exact_mut(qd))
            .for_each(|(t, x)| prep(t, x, true))
    });
    ops::par_rows(par, &mut k[..n * kvd], kvd, 1, &|r, k| {
        r.zip(k.chunks_exact_mut(kvd))
            .for_each(|(t, x)| prep(t, x, false))
    });
}

/// Causal (or chunked) GQA attention of the `n` query rows `qb` at positions `pos0 .. pos0 + n`
/// against `kvl`, which holds the keys and values of the positions the queries see (the
/// batch's own included), position `j` at row `j - base` (`base` 0 for a layer that keeps the
/// whole context; the chunk start for a chunk ring, the positions then all in that chunk).
/// Writes `n` rows of `n_heads * head_dim` into `out` (the per-thread scratch of `par` must
/// hold [`scratch_len`] floats).
#[allow(clippy::too_many_arguments)]
pub fn attend(
    kern: &Kernels,
    par: &Par,
    shape: AttnShape,
    kvl: KvLayer,
    base: usize,
    qb: &[f32],
    pos0: usize,
    n: usize,
    out: &mut [f32],
) {
    let job = AttnJob {
        kvl,
        base,
        tok0: 0,
        pos0,
        n,
    };
    attend_jobs(kern, par, shape, 1, &|_| job, qb, n, out);
}

/// One stretch of a batch for [`attend_jobs`]: query and output rows `tok0 .. tok0 + n` of the
/// batch, at positions `pos0 .. pos0 + n`, against `kvl` (position `j` at row `j - base`), as
/// in [`attend`].
#[derive(Clone, Copy)]
pub struct AttnJob<'a> {
    pub kvl: KvLayer<'a>,
    pub base: usize,
    pub tok0: usize,
    pub pos0: usize,
    pub n: usize,
}

/// [`attend`] for `n_jobs` stretches at once, `job(i)` the `i`-th (rows in increasing order,
/// disjoint): the runs of a batched step, each against its own sequence's cache, in one pool
/// round instead of one (too small to be worth a round) per run. Each job is cut into tasks as
/// [`attend`] cuts it and each output row is computed by one task in a fixed order, so the
/// result equals [`attend`] per job, bit for bit, at any thread count. `qb` and `out` hold the
/// `n_tok` rows of the whole batch.
#[allow(clippy::too_many_arguments)]
pub fn attend_jobs<'c>(
    kern: &Kernels,
    par: &Par,
    shape: AttnShape,
    n_jobs: usize,
    job: &(dyn Fn(usize) -> AttnJob<'c> + Sync),
    qb: &[f32],
    n_tok: usize,
    out: &mut [f32],
) {
    let AttnShape {
        n_heads: nh,
        n_kv: nkv,
        head_dim: d,
        chunk,
    } = shape;
    let (qd, kvd) = (nh * d, nkv * d);
    let scale = 1.0 / (d as f32).sqrt();
    let rep = nh / nkv;
    let q4 = Q4Layout::new(nkv, d);
    let group = |jb: &AttnJob, mut tile: Tile, thread: usize| {
        let (kvl, base) = (jb.kvl, jb.base);
        // the 4-bit cache stores rotated keys and values (`scalar::kv_q4_rotate`)
        let rotated = matches!(kvl, KvLayer::Q4(..));
        let (t, kh) = (tile.toks().start, tile.rows().start / (rep * d));
        let p = jb.pos0 + (t - jb.tok0);
        let start = chunk.map_or(0, |cs| (p / cs) * cs);
        let mut scratch = par.scratch[thread]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let (sc, rest) = scratch.split_at_mut(rep * ATT_TILE);
        let (pw, rest) = rest.split_at_mut(ATT_TILE);
        let (ml, rest) = rest.split_at_mut(2 * rep);
        let qrot = &mut rest[..d];
        let o = tile.out(t);
        o.iter_mut().for_each(|v| *v = 0.0);
        for r in 0..rep {
            (ml[2 * r], ml[2 * r + 1]) = (f32::NEG_INFINITY, 0.0);
        }
        let mut j0 = start;
        while j0 <= p {
            let nk = (p + 1 - j0).min(ATT_TILE);
            let off = (j0 - base) * kvd + kh * d;
            for r in 0..rep {
                let hh = kh * rep + r;
                let mut q = &qb[t * qd + hh * d..t * qd + (hh + 1) * d];
                if rotated {
                    // the 4-bit cache holds rotated keys: score the rotated query
                    qrot.copy_from_slice(q);
                    (kern.kv_q4_rotate)(qrot);
                    q = qrot;
                }
                let s = &mut sc[r * ATT_TILE..r * ATT_TILE + nk];
                match kvl {
                    KvLayer::F32(kc, _) => (kern.attn_scores)(q, &kc[off..], kvd, scale, s),
                    KvLayer::F16(kc, _) => (kern.attn_scores_f16)(q, &kc[off..], kvd, scale, s),
                    KvLayer::Q8(kc, _, ks, _) => {
                        (kern.attn_scores_i8)(q, &kc[off..], kvd, scale, s);
                        for (i, x) in s.iter_mut().enumerate() {
                            *x *= ks[(j0 - base + i) * nkv + kh];
                        }
                    }
                    KvLayer::Q4(kc, _, ks, _) => {
                        let (o4, os4) = q4.off(j0 - base, kh);
                        (kern.attn_scores_q4)(q, &kc[o4..], &ks[os4..], q4.ld, q4.ld_s, scale, s)
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
                            *w = x * vs[(j0 - base + i) * nkv + kh];
                        }
                        (kern.attn_values_i8)(pw, &vc[off..], kvd, or)
                    }
                    KvLayer::Q4(_, vc, _, vs) => {
                        let (o4, os4) = q4.off(j0 - base, kh);
                        (kern.attn_values_q4)(s, &vc[o4..], &vs[os4..], q4.ld, q4.ld_s, or)
                    }
                }
            }
            j0 += nk;
        }
        for r in 0..rep {
            let inv = 1.0 / ml[2 * r + 1];
            o[r * d..(r + 1) * d].iter_mut().for_each(|v| *v *= inv);
            if rotated {
                (kern.kv_q4_rotate)(&mut o[r * d..(r + 1) * d]);
            }
        }
    };
    // prefill: one task per (block of ATT_TOK_BLOCK tokens, KV head); the rows (token
    // major, head minor) share each K/V tile, converted to f32 once (keys transposed so
    // the score kernel needs no horizontal sums). A row sees keys chunk_start(p)..=p;
    // the tile's keys outside that range are left out of its softmax and value sum.
    let block = |jb: &AttnJob, mut tile: Tile, thread: usize| {
        let (kvl, base) = (jb.kvl, jb.base);
        // the 4-bit cache stores rotated keys and values (`scalar::kv_q4_rotate`)
        let rotated = matches!(kvl, KvLayer::Q4(..));
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
        if rotated {
            qs[..rr * d].chunks_exact_mut(d).for_each(kern.kv_q4_rotate);
        }
        os.iter_mut().for_each(|v| *v = 0.0);
        for r in 0..rr {
            (ml[2 * r], ml[2 * r + 1]) = (f32::NEG_INFINITY, 0.0);
        }
        let chunk_start = |p: usize| chunk.map_or(0, |cs| (p / cs) * cs);
        let first = jb.pos0 + (t0 - jb.tok0);
        let last = first + nt - 1;
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
            let off = (j0 - base) * kvd + kh * d;
            let kt = &mut kt[..d * nk];
            match kvl {
                KvLayer::F32(kc, _) => (kern.kv_transpose_f32)(&kc[off..], kvd, d, nk, kt),
                KvLayer::F16(kc, vc) => {
                    (kern.kv_transpose_f16)(&kc[off..], kvd, d, nk, kt);
                    (kern.kv_rows_f16)(&vc[off..], kvd, d, nk, &mut vf[..nk * d]);
                }
                KvLayer::Q8(kc, vc, ks, vs) => {
                    for j in 0..nk {
                        let sj = (j0 - base + j) * nkv + kh;
                        let (ksj, vsj) = (ks[sj], vs[sj]);
                        let r = off + j * kvd..off + j * kvd + d;
                        for (c, &x) in kc[r.clone()].iter().enumerate() {
                            kt[c * nk + j] = x as f32 * ksj;
                        }
                        for (o, &x) in vf[j * d..(j + 1) * d].iter_mut().zip(&vc[r]) {
                            *o = x as f32 * vsj;
                        }
                    }
                }
                KvLayer::Q4(kc, vc, ks, vs) => {
                    // dequantized in f32, keys transposed (the first `d` of `vf` hold one
                    // key row on the way; its value row overwrites it afterwards)
                    for j in 0..nk {
                        let (o4, os4) = q4.off(j0 - base + j, kh);
                        let (kb, sb) = (o4..o4 + q4.row, os4..os4 + q4.nb);
                        let row = &mut vf[j * d..(j + 1) * d];
                        (kern.dequantize_kv_q4)(&kc[kb.clone()], &ks[sb.clone()], row);
                        for (c, &x) in row.iter().enumerate() {
                            kt[c * nk + j] = x;
                        }
                        (kern.dequantize_kv_q4)(&vc[kb], &vs[sb], row);
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
                if rotated {
                    (kern.kv_q4_rotate)(oh);
                }
            }
        }
    };
    // the tasks of a job: (KV head, block of `tb` tokens), head-major as `run_tiles` numbers
    // them; prefill calls use token blocks, decode one token per task
    let tb_of = |n: usize| {
        if n >= ATT_MIN_BLOCK_TOKENS {
            ATT_TOK_BLOCK
        } else {
            1
        }
    };
    let tasks_of = |jb: &AttnJob| jb.n.div_ceil(tb_of(jb.n)) * nkv;
    let (mut n_tasks, mut work, mut end) = (0, 0, 0);
    for i in 0..n_jobs {
        let jb = job(i);
        assert!(
            jb.tok0 >= end && jb.tok0 + jb.n <= n_tok,
            "attend_jobs: job rows must be disjoint, in order and inside the batch"
        );
        end = jb.tok0 + jb.n;
        n_tasks += tasks_of(&jb);
        // the work in multiply-adds; small calls (decode at short context) are not worth a
        // pool round. The tasks are the same either way.
        work += jb.n * (jb.pos0 + jb.n) * qd;
    }
    let out = crate::pool::SharedOut::new(out, n_tok, qd);
    let task = |mut k: usize, thread: usize| {
        let mut i = 0;
        let jb = loop {
            let jb = job(i);
            let c = tasks_of(&jb);
            if k < c {
                break jb;
            }
            k -= c;
            i += 1;
        };
        let tb = tb_of(jb.n);
        let n_tb = jb.n.div_ceil(tb);
        let (kh, bi) = (k / n_tb, k % n_tb);
        let rows = kh * rep * d..(kh + 1) * rep * d;
        let toks = jb.tok0 + bi * tb..jb.tok0 + ((bi + 1) * tb).min(jb.n);
        // SAFETY: every task index is run exactly once (by `pool.run` or the loop below),
        // and distinct indices give disjoint tiles: the jobs' rows are disjoint (asserted
        // above) and within a job (KV head, token block) partitions its rows × features. The
        // tile does not outlive this call.
        let tile = unsafe { out.tile(rows, toks) };
        if tb > 1 {
            block(&jb, tile, thread)
        } else {
            group(&jb, tile, thread)
        }
    };
    match par.pool {
        Some(pool) if work >= MIN_PARALLEL_ATTN => pool.run(n_tasks, &task),
        _ => (0..n_tasks).for_each(|k| task(k, 0)),
    }
}
