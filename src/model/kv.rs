//! The KV cache: its element types, its size, and appending a batch of keys and values.
//!
//! One [`KvCache`] per session holds, for every layer, `[max_ctx, n_kv * head_dim]` keys (after
//! RoPE / QK norm) and values, position-major. The attention reads a layer through a borrowed
//! [`KvLayer`]; nothing else looks inside. The layout (position `p`, KV head `h`: elements
//! `p * kvd + h * d .. + d`, q8 scales at `p * n_kv + h`) is what the attention kernels take.

use crate::ops::{self, Par};
use crate::{Error, Result};
use ferroq_kernels::Kernels;

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
    /// 4 bits per element plus one f16 scale per block of 32 elements of a head row (4.5 bits
    /// per element; `Q4_0`-style codes, [`ferroq_kernels::scalar::quantize_kv_q4`], of the
    /// block after a Walsh–Hadamard rotation, [`ferroq_kernels::scalar::kv_q4_rotate`]).
    Q4,
}

impl KvType {
    /// Parse `f32` / `f16` / `q8` / `q4` (CLI flags).
    pub fn parse(s: &str) -> Option<KvType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Some(KvType::F32),
            "f16" => Some(KvType::F16),
            "q8" | "int8" => Some(KvType::Q8),
            "q4" | "int4" => Some(KvType::Q4),
            _ => None,
        }
    }

    /// Bytes per cached element, rounded up to a whole byte (the q8 and q4 scales not
    /// counted); [`super::kvmem::row_bytes`] has the exact size of a row.
    pub fn elem_bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
            KvType::Q8 | KvType::Q4 => 1,
        }
    }

    /// The names [`KvType::parse`] takes, for error messages.
    pub const NAMES: &'static str = "f32, f16, q8, q4";
}

/// Per layer: `[max_ctx, n_kv * head_dim]` keys and values.
enum Store {
    F32(Vec<Vec<f32>>, Vec<Vec<f32>>),
    F16(Vec<Vec<u16>>, Vec<Vec<u16>>),
    /// int8 keys, values, and their scales `[max_ctx, n_kv]`.
    Q8(Q8Store),
    /// 4-bit keys and values `[max_ctx, n_kv, nb, 16 bytes]` and their f16 block scales
    /// `[max_ctx, n_kv, nb]`, `nb = head_dim.div_ceil(32)`; each block rotated before it was
    /// quantized (the attention rotates the queries and its output).
    Q4(Q4Store),
}

struct Q4Store {
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    ks: Vec<Vec<u16>>,
    vs: Vec<Vec<u16>>,
}

struct Q8Store {
    k: Vec<Vec<i8>>,
    v: Vec<Vec<i8>>,
    ks: Vec<Vec<f32>>,
    vs: Vec<Vec<f32>>,
}

/// The KV cache of one session: every layer's keys and values. Global layers keep every
/// position of the context; chunked-attention layers keep only the current chunk, in a ring of
/// `min(max_ctx, attention_chunk_size)` slots (position `p` in slot `p % chunk`): a query never
/// looks before the start of its own chunk, so older chunks are never read again.
pub struct KvCache {
    store: Store,
    n_kv: usize,
    head_dim: usize,
    /// Per layer: the chunk size of a ring layer, 0 for a layer that keeps everything.
    ring: Vec<usize>,
}

/// One layer's cache, borrowed: `(keys, values)` rows of `n_kv * head_dim` per position (q8:
/// plus the key and value scales, one per (position, KV head)).
#[derive(Clone, Copy)]
pub enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [u16], &'a [u16]),
    Q8(&'a [i8], &'a [i8], &'a [f32], &'a [f32]),
    /// 4-bit keys and values (per position `n_kv * q4_blocks(head_dim) * 16` bytes) and their
    /// block scales (f16 bits, `n_kv * q4_blocks(head_dim)` per position).
    Q4(&'a [u8], &'a [u8], &'a [u16], &'a [u16]),
}

/// Blocks of 32 values in one 4-bit head row of `head_dim` values.
pub fn q4_blocks(head_dim: usize) -> usize {
    head_dim.div_ceil(ferroq_kernels::scalar::KV_Q4_BLOCK)
}

/// `n` zeroed elements from the allocator (`calloc`: untouched pages stay unmapped), or `err()`
/// when the size overflowed (`None`) or the allocation failed.
pub(crate) fn zeroed<T: bytemuck::Zeroable>(
    n: Option<usize>,
    err: &dyn Fn() -> Error,
) -> Result<Vec<T>> {
    n.and_then(|n| bytemuck::allocation::try_zeroed_vec(n).ok())
        .ok_or_else(err)
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

impl KvCache {
    /// Bytes a cache of `max_ctx` positions takes if every layer keeps them all (K and V, scales
    /// included), as a float so that absurd contexts do not overflow.
    pub fn bytes(kv: KvType, layers: usize, max_ctx: usize, n_kv: usize, head_dim: usize) -> f64 {
        (max_ctx as f64)
            * (n_kv as f64)
            * super::kvmem::row_bytes(kv, head_dim) as f64
            * (2 * layers) as f64
    }

    /// A zeroed cache in which every layer keeps all `max_ctx` positions (`calloc`: the pages
    /// of positions never reached are never made resident). A size that overflows or cannot be
    /// allocated is an error naming the field `ctx`.
    pub fn new(
        kv: KvType,
        layers: usize,
        max_ctx: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<KvCache> {
        Self::with_rings(kv, &vec![0; layers], max_ctx, n_kv, head_dim)
    }

    /// The cache of a model: chunked-attention layers get rings of their chunk
    /// ([`super::kvmem`]), the others the whole context.
    pub fn for_model(
        kv: KvType,
        c: &super::config::ModelConfig,
        max_ctx: usize,
    ) -> Result<KvCache> {
        let ring: Vec<usize> = (0..c.num_layers)
            .map(|l| {
                if super::kvmem::is_ring(c, l) {
                    c.attention_chunk_size.unwrap_or(0)
                } else {
                    0
                }
            })
            .collect();
        Self::with_rings(kv, &ring, max_ctx, c.num_kv_heads, c.head_dim)
    }

    /// A cache whose layer `l` is a ring of `ring[l]` slots (0: keeps all `max_ctx`).
    pub fn with_rings(
        kv: KvType,
        ring: &[usize],
        max_ctx: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<KvCache> {
        let kvd = n_kv * head_dim;
        let layers = ring.len();
        let err = || {
            let bytes = Self::bytes(kv, layers, max_ctx, n_kv, head_dim);
            Error::config(
                "ctx",
                format!(
                    "a KV cache of {max_ctx} tokens needs {:.1} GiB ({layers} layers × K and V × \
                     {kvd} values per token, {kv:?}); it cannot be allocated",
                    bytes / (1u64 << 30) as f64,
                ),
            )
        };
        let slots = |l: usize| match ring[l] {
            0 => max_ctx,
            cs => cs.min(max_ctx),
        };
        let per = |per_token: usize| -> Vec<Option<usize>> {
            (0..layers)
                .map(|l| slots(l).checked_mul(per_token))
                .collect()
        };
        fn alloc<T: bytemuck::Zeroable>(
            sizes: Vec<Option<usize>>,
            err: &dyn Fn() -> Error,
        ) -> Result<Vec<Vec<T>>> {
            sizes.into_iter().map(|n| zeroed(n, err)).collect()
        }
        let store = match kv {
            KvType::F32 => Store::F32(alloc(per(kvd), &err)?, alloc(per(kvd), &err)?),
            KvType::F16 => Store::F16(alloc(per(kvd), &err)?, alloc(per(kvd), &err)?),
            KvType::Q8 => Store::Q8(Q8Store {
                k: alloc(per(kvd), &err)?,
                v: alloc(per(kvd), &err)?,
                ks: alloc(per(n_kv), &err)?,
                vs: alloc(per(n_kv), &err)?,
            }),
            KvType::Q4 => {
                let nb = n_kv.checked_mul(q4_blocks(head_dim));
                let bytes = nb.and_then(|nb| nb.checked_mul(ferroq_kernels::scalar::KV_Q4_BYTES));
                let sizes = |per_token: Option<usize>| -> Vec<Option<usize>> {
                    (0..layers)
                        .map(|l| per_token.and_then(|p| slots(l).checked_mul(p)))
                        .collect()
                };
                Store::Q4(Q4Store {
                    k: alloc(sizes(bytes), &err)?,
                    v: alloc(sizes(bytes), &err)?,
                    ks: alloc(sizes(nb), &err)?,
                    vs: alloc(sizes(nb), &err)?,
                })
            }
        };
        Ok(KvCache {
            store,
            n_kv,
            head_dim,
            ring: ring.to_vec(),
        })
    }

    /// The chunk of layer `li` if it is a ring.
    fn ring_of(&self, li: usize) -> Option<usize> {
        self.ring.get(li).copied().filter(|&cs| cs > 0)
    }

    /// The slot of position `p` in layer `li`.
    fn slot(&self, li: usize, p: usize) -> usize {
        self.ring_of(li).map_or(p, |cs| p % cs)
    }

    /// The position held in slot 0 of layer `li` while positions around `p` are processed
    /// (the start of `p`'s chunk for a ring layer, 0 otherwise): the attention reads position
    /// `j` at slot `j - base`.
    pub fn base(&self, li: usize, p: usize) -> usize {
        self.ring_of(li).map_or(0, |cs| p / cs * cs)
    }

    /// The end of the run of positions `p .. end` that layer `li` can append and attend in one
    /// go: a ring layer stops at the end of `p`'s chunk (the next chunk overwrites its slots).
    pub fn segment_end(&self, li: usize, p: usize, end: usize) -> usize {
        self.ring_of(li)
            .map_or(end, |cs| end.min((p / cs + 1) * cs))
    }

    /// After a cache that held positions `0 .. held` is rewound to `pos`: the positions that
    /// are still there. A ring keeps the chunk of position `held - 1` only, so rewinding into
    /// an earlier chunk keeps up to that chunk's start (its later positions must be run
    /// again); a model without rings keeps `pos`.
    pub fn keepable(&self, held: usize, pos: usize) -> usize {
        let pos = pos.min(held);
        let Some(cs) = self.ring.iter().copied().filter(|&c| c > 0).min() else {
            return pos;
        };
        if pos == held || pos.is_multiple_of(cs) || (held > 0 && pos / cs == (held - 1) / cs) {
            pos
        } else {
            pos / cs * cs
        }
    }

    /// The element type.
    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32(..) => KvType::F32,
            Store::F16(..) => KvType::F16,
            Store::Q8(..) => KvType::Q8,
            Store::Q4(..) => KvType::Q4,
        }
    }

    /// Layer `li`, borrowed for the attention.
    pub fn layer(&self, li: usize) -> KvLayer<'_> {
        match &self.store {
            Store::F32(k, v) => KvLayer::F32(&k[li], &v[li]),
            Store::F16(k, v) => KvLayer::F16(&k[li], &v[li]),
            Store::Q8(q) => KvLayer::Q8(&q.k[li], &q.v[li], &q.ks[li], &q.vs[li]),
            Store::Q4(q) => KvLayer::Q4(&q.k[li], &q.v[li], &q.ks[li], &q.vs[li]),
        }
    }

    /// Store the keys and values `k`, `v` (`n` rows of `n_kv * head_dim`) of layer `li` at
    /// positions `pos0 .. pos0 + n` (the caller checked they fit, and for a ring layer that they
    /// lie in one chunk: [`KvCache::segment_end`]), converted to the cache type (f16: per row
    /// on the pool for a long batch; q8: one scale per position and KV head).
    #[allow(clippy::too_many_arguments)]
    pub fn append(
        &mut self,
        kern: &Kernels,
        par: &Par,
        li: usize,
        pos0: usize,
        n: usize,
        k: &[f32],
        v: &[f32],
    ) {
        let (nkv, d) = (self.n_kv, self.head_dim);
        let kvd = nkv * d;
        debug_assert!(n == 0 || self.segment_end(li, pos0, pos0 + n) == pos0 + n);
        let s0 = self.slot(li, pos0);
        let cache_rows = s0 * kvd..(s0 + n) * kvd;
        match &mut self.store {
            Store::F32(kc, vc) => {
                kc[li][cache_rows.clone()].copy_from_slice(&k[..n * kvd]);
                vc[li][cache_rows].copy_from_slice(&v[..n * kvd]);
            }
            Store::F16(kc, vc) => {
                for (dst, src) in [(&mut kc[li], k), (&mut vc[li], v)] {
                    ops::par_rows(par, &mut dst[cache_rows.clone()], kvd, 1, &|r, o| {
                        let src = &src[r.start * kvd..r.end * kvd];
                        for (o, x) in o.iter_mut().zip(src) {
                            *o = half::f16::from_f32(*x).to_bits();
                        }
                    });
                }
            }
            Store::Q8(q) => {
                for t in 0..n {
                    let p = s0 + t;
                    let (k, v) = (&k[t * kvd..(t + 1) * kvd], &v[t * kvd..(t + 1) * kvd]);
                    for h in 0..nkv {
                        let r = p * kvd + h * d..p * kvd + (h + 1) * d;
                        q.ks[li][p * nkv + h] =
                            quantize_row_i8(&k[h * d..(h + 1) * d], &mut q.k[li][r.clone()]);
                        q.vs[li][p * nkv + h] =
                            quantize_row_i8(&v[h * d..(h + 1) * d], &mut q.v[li][r]);
                    }
                }
            }
            Store::Q4(q) => {
                use ferroq_kernels::scalar::{KV_Q4_BLOCK, KV_Q4_BYTES};
                let nb = q4_blocks(d);
                let (row, srow) = (nb * KV_Q4_BYTES, nb);
                for t in 0..n {
                    let p = s0 + t;
                    for h in 0..nkv {
                        let x0 = t * kvd + h * d;
                        let (b0, s) = ((p * nkv + h) * row, (p * nkv + h) * srow);
                        // per block: rotated (`kv_q4_rotate`) on the stack, then quantized
                        for (src, codes, scales) in [
                            (k, &mut q.k[li], &mut q.ks[li]),
                            (v, &mut q.v[li], &mut q.vs[li]),
                        ] {
                            for blk in 0..nb {
                                let c0 = blk * KV_Q4_BLOCK;
                                let len = (d - c0).min(KV_Q4_BLOCK);
                                let mut x = [0.0f32; KV_Q4_BLOCK];
                                x[..len].copy_from_slice(&src[x0 + c0..x0 + c0 + len]);
                                (kern.kv_q4_rotate)(&mut x[..len]);
                                let cb = b0 + blk * KV_Q4_BYTES;
                                (kern.quantize_kv_q4)(
                                    &x[..len],
                                    &mut codes[cb..cb + KV_Q4_BYTES],
                                    &mut scales[s + blk..s + blk + 1],
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}

// Session state files (`crate::engine::Session::save`): the cache of the used positions as
// bytes. Kept here, next to the cache layout, so that a layout change stays local.

/// One array of a layer's cache as bytes: its bytes, how many bytes one slot (position) takes,
/// and the size of one element (for the byte order).
type Part<'a> = (&'a [u8], usize, usize);
type PartMut<'a> = (&'a mut [u8], usize, usize);

/// Copy `src` into `dst` as little-endian elements of `elem` bytes (a copy on little-endian
/// machines; each element reversed on big-endian ones).
fn copy_le(dst: &mut [u8], src: &[u8], elem: usize) {
    dst.copy_from_slice(src);
    if cfg!(target_endian = "big") && elem > 1 {
        for e in dst.chunks_exact_mut(elem) {
            e.reverse();
        }
    }
}

impl KvCache {
    /// The arrays of layer `li` as bytes (keys, values, then the scales of a quantized cache).
    fn parts(&self, li: usize) -> Vec<Part<'_>> {
        let (nkv, kvd) = (self.n_kv, self.n_kv * self.head_dim);
        match &self.store {
            Store::F32(k, v) => vec![
                (bytemuck::cast_slice(&k[li]), 4 * kvd, 4),
                (bytemuck::cast_slice(&v[li]), 4 * kvd, 4),
            ],
            Store::F16(k, v) => vec![
                (bytemuck::cast_slice(&k[li]), 2 * kvd, 2),
                (bytemuck::cast_slice(&v[li]), 2 * kvd, 2),
            ],
            Store::Q8(q) => vec![
                (bytemuck::cast_slice(&q.k[li]), kvd, 1),
                (bytemuck::cast_slice(&q.v[li]), kvd, 1),
                (bytemuck::cast_slice(&q.ks[li]), 4 * nkv, 4),
                (bytemuck::cast_slice(&q.vs[li]), 4 * nkv, 4),
            ],
            Store::Q4(q) => {
                let nb = nkv * q4_blocks(self.head_dim);
                let row = nb * ferroq_kernels::scalar::KV_Q4_BYTES;
                vec![
                    (&q.k[li][..], row, 1),
                    (&q.v[li][..], row, 1),
                    (bytemuck::cast_slice(&q.ks[li]), 2 * nb, 2),
                    (bytemuck::cast_slice(&q.vs[li]), 2 * nb, 2),
                ]
            }
        }
    }

    /// [`KvCache::parts`], writable.
    fn parts_mut(&mut self, li: usize) -> Vec<PartMut<'_>> {
        let (nkv, kvd) = (self.n_kv, self.n_kv * self.head_dim);
        match &mut self.store {
            Store::F32(k, v) => vec![
                (bytemuck::cast_slice_mut(&mut k[li]), 4 * kvd, 4),
                (bytemuck::cast_slice_mut(&mut v[li]), 4 * kvd, 4),
            ],
            Store::F16(k, v) => vec![
                (bytemuck::cast_slice_mut(&mut k[li]), 2 * kvd, 2),
                (bytemuck::cast_slice_mut(&mut v[li]), 2 * kvd, 2),
            ],
            Store::Q8(q) => vec![
                (bytemuck::cast_slice_mut(&mut q.k[li]), kvd, 1),
                (bytemuck::cast_slice_mut(&mut q.v[li]), kvd, 1),
                (bytemuck::cast_slice_mut(&mut q.ks[li]), 4 * nkv, 4),
                (bytemuck::cast_slice_mut(&mut q.vs[li]), 4 * nkv, 4),
            ],
            Store::Q4(q) => {
                let nb = nkv * q4_blocks(self.head_dim);
                let row = nb * ferroq_kernels::scalar::KV_Q4_BYTES;
                vec![
                    (&mut q.k[li][..], row, 1),
                    (&mut q.v[li][..], row, 1),
                    (bytemuck::cast_slice_mut(&mut q.ks[li]), 2 * nb, 2),
                    (bytemuck::cast_slice_mut(&mut q.vs[li]), 2 * nb, 2),
                ]
            }
        }
    }

    /// Slots saved for layer `li` when `n` positions are: the first `n` (a ring layer: all of
    /// its slots once `n` reaches them, i.e. the whole chunk ring as it is).
    fn saved_slots(part: &Part<'_>, n: usize) -> usize {
        n.min(part.0.len() / part.1.max(1))
    }

    /// Whether the first `n` of `held` cached positions can be saved: a chunked layer keeps
    /// only the chunk of position `held - 1`, so `n` must be `held` or lie in that chunk (a
    /// restored cache of `n` positions must hold the chunk of position `n - 1`).
    pub fn can_save(&self, held: usize, n: usize) -> bool {
        n == held
            || (n < held
                && self
                    .ring
                    .iter()
                    .filter(|&&c| c > 0)
                    .all(|&cs| n > 0 && (n - 1) / cs == (held - 1) / cs))
    }

    /// Bytes [`KvCache::write_kv`] writes for the first `n` positions.
    pub fn kv_bytes(&self, n: usize) -> usize {
        (0..self.ring.len())
            .flat_map(|l| self.parts(l))
            .map(|p| Self::saved_slots(&p, n) * p.1)
            .sum()
    }

    /// Append the cache of positions `0..n` ([`KvCache::can_save`]), little-endian: per layer,
    /// per array (K, V, then for q8 the K and the V scales), its first `min(n, slots)` slots.
    pub fn write_kv(&self, n: usize, out: &mut Vec<u8>) {
        for l in 0..self.ring.len() {
            for p in self.parts(l) {
                let len = Self::saved_slots(&p, n) * p.1;
                let at = out.len();
                out.resize(at + len, 0);
                copy_le(&mut out[at..], &p.0[..len], p.2);
            }
        }
    }

    /// Restore positions `0..n` from bytes of [`KvCache::write_kv`] (same model and KV
    /// type). `data` must be exactly [`KvCache::kv_bytes`]`(n)` long and `n` below `max_ctx`,
    /// else nothing changes.
    pub fn read_kv(&mut self, n: usize, max_ctx: usize, data: &[u8]) -> Result<()> {
        let want = self.kv_bytes(n);
        if n >= max_ctx || data.len() != want {
            return Err(Error::Input(format!(
                "KV data of {} bytes does not hold {n} positions of this cache ({want} bytes, \
                 context {max_ctx})",
                data.len(),
            )));
        }
        let mut at = 0;
        for l in 0..self.ring.len() {
            for (dst, slot_bytes, elem) in self.parts_mut(l) {
                let len = n.min(dst.len() / slot_bytes.max(1)) * slot_bytes;
                copy_le(&mut dst[..len], &data[at..at + len], elem);
                at += len;
            }
        }
        Ok(())
    }
}
