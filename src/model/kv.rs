//! The KV cache: its element types, its size, and appending a batch of keys and values.
//!
//! One [`KvCache`] per session holds, for every layer, `[max_ctx, n_kv * head_dim]` keys (after
//! RoPE / QK norm) and values, position-major. The attention reads a layer through a borrowed
//! [`KvLayer`]; nothing else looks inside. The layout (position `p`, KV head `h`: elements
//! `p * kvd + h * d .. + d`, q8 scales at `p * n_kv + h`) is what the attention kernels take.

use crate::ops::{self, Par};
use crate::{Error, Result};

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

    /// Bytes per cached element (the q8 scales not counted).
    pub fn elem_bytes(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
            KvType::Q8 => 1,
        }
    }
}

/// Per layer: `[max_ctx, n_kv * head_dim]` keys and values.
enum Store {
    F32(Vec<Vec<f32>>, Vec<Vec<f32>>),
    F16(Vec<Vec<u16>>, Vec<Vec<u16>>),
    /// int8 keys, values, and their scales `[max_ctx, n_kv]`.
    Q8(Q8Store),
}

struct Q8Store {
    k: Vec<Vec<i8>>,
    v: Vec<Vec<i8>>,
    ks: Vec<Vec<f32>>,
    vs: Vec<Vec<f32>>,
}

/// The KV cache of one session: every layer's keys and values for `max_ctx` positions.
pub struct KvCache {
    store: Store,
    n_kv: usize,
    head_dim: usize,
}

/// One layer's cache, borrowed: `(keys, values)` rows of `n_kv * head_dim` per position (q8:
/// plus the key and value scales, one per (position, KV head)).
#[derive(Clone, Copy)]
pub enum KvLayer<'a> {
    F32(&'a [f32], &'a [f32]),
    F16(&'a [u16], &'a [u16]),
    Q8(&'a [i8], &'a [i8], &'a [f32], &'a [f32]),
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

/// [`zeroed`] once per layer.
fn layered<T: bytemuck::Zeroable>(
    layers: usize,
    n: Option<usize>,
    err: &dyn Fn() -> Error,
) -> Result<Vec<Vec<T>>> {
    (0..layers).map(|_| zeroed(n, err)).collect()
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
    /// Bytes a cache of `max_ctx` positions takes (K and V of every layer, q8 scales not
    /// counted), as a float so that absurd contexts do not overflow.
    pub fn bytes(kv: KvType, layers: usize, max_ctx: usize, n_kv: usize, head_dim: usize) -> f64 {
        (max_ctx as f64) * ((n_kv * head_dim) as f64) * (2 * layers * kv.elem_bytes()) as f64
    }

    /// A zeroed cache (`calloc`: the pages of positions never reached are never made resident).
    /// A size that overflows or cannot be allocated is an error naming the field `ctx`.
    pub fn new(
        kv: KvType,
        layers: usize,
        max_ctx: usize,
        n_kv: usize,
        head_dim: usize,
    ) -> Result<KvCache> {
        let kvd = n_kv * head_dim;
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
        let per_ctx = |per_token: usize| -> Option<usize> { max_ctx.checked_mul(per_token) };
        let store = match kv {
            KvType::F32 => Store::F32(
                layered(layers, per_ctx(kvd), &err)?,
                layered(layers, per_ctx(kvd), &err)?,
            ),
            KvType::F16 => Store::F16(
                layered(layers, per_ctx(kvd), &err)?,
                layered(layers, per_ctx(kvd), &err)?,
            ),
            KvType::Q8 => Store::Q8(Q8Store {
                k: layered(layers, per_ctx(kvd), &err)?,
                v: layered(layers, per_ctx(kvd), &err)?,
                ks: layered(layers, per_ctx(n_kv), &err)?,
                vs: layered(layers, per_ctx(n_kv), &err)?,
            }),
        };
        Ok(KvCache {
            store,
            n_kv,
            head_dim,
        })
    }

    /// The element type.
    pub fn kv_type(&self) -> KvType {
        match self.store {
            Store::F32(..) => KvType::F32,
            Store::F16(..) => KvType::F16,
            Store::Q8(..) => KvType::Q8,
        }
    }

    /// Layer `li`, borrowed for the attention.
    pub fn layer(&self, li: usize) -> KvLayer<'_> {
        match &self.store {
            Store::F32(k, v) => KvLayer::F32(&k[li], &v[li]),
            Store::F16(k, v) => KvLayer::F16(&k[li], &v[li]),
            Store::Q8(q) => KvLayer::Q8(&q.k[li], &q.v[li], &q.ks[li], &q.vs[li]),
        }
    }

    /// Store the keys and values `k`, `v` (`n` rows of `n_kv * head_dim`) of layer `li` at
    /// positions `pos0 .. pos0 + n` (the caller checked they fit), converted to the cache type
    /// (f16: per row on the pool for a long batch; q8: one scale per position and KV head).
    pub fn append(&mut self, par: &Par, li: usize, pos0: usize, n: usize, k: &[f32], v: &[f32]) {
        let (nkv, d) = (self.n_kv, self.head_dim);
        let kvd = nkv * d;
        let cache_rows = pos0 * kvd..(pos0 + n) * kvd;
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
                    let p = pos0 + t;
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
        }
    }
}
