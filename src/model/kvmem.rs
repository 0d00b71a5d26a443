//! KV cache memory: how many bytes a session's cache takes for a context, per layer kind and
//! cache type, and the check of a context against the positions the model was trained for.
//!
//! Layers with chunked attention (Llama 4: three of every four) never look further back than
//! the start of the current chunk of `attention_chunk_size` tokens, so they keep a ring of
//! `min(ctx, attention_chunk_size)` slots; global layers (NoPE, and every layer of a model
//! without chunked attention) keep the whole context.

use super::config::ModelConfig;
use super::KvType;
use crate::{Error, Result};

/// Bytes of one cached row (one position, one KV head, K or V) of `head_dim` values.
pub fn row_bytes(kv: KvType, head_dim: usize) -> usize {
    match kv {
        KvType::F32 => 4 * head_dim,
        KvType::F16 => 2 * head_dim,
        // int8 values and one f32 scale
        KvType::Q8 => head_dim + 4,
        // blocks of 32 values: 16 bytes of 4-bit codes and one f16 scale each
        KvType::Q4 => super::kv::q4_blocks(head_dim) * (ferroq_kernels::scalar::KV_Q4_BYTES + 2),
    }
}

/// Memory of a KV cache for one context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvBytes {
    /// Context in tokens.
    pub ctx: usize,
    /// Layers that keep every position.
    pub full_layers: usize,
    /// Layers that keep a ring of `ring_slots` positions (chunked attention).
    pub ring_layers: usize,
    /// Slots of each ring layer: `min(ctx, attention_chunk_size)`.
    pub ring_slots: usize,
    /// Bytes one position takes in one layer (K and V of every KV head).
    pub per_token_layer: u64,
    /// Bytes of the whole cache.
    pub total: u64,
    /// Bytes of the cache if every layer kept the whole context (ferroq before the rings).
    pub total_full: u64,
}

impl KvBytes {
    /// Bytes one more token adds while the context is below the chunk size (every layer).
    pub fn per_token(&self) -> u64 {
        self.per_token_layer * (self.full_layers + self.ring_layers) as u64
    }

    /// The llama.cpp-style line printed when a session starts.
    pub fn describe(&self, kv: KvType) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let mut s = format!(
            "kv cache: {} tokens, {}, {:.1} KiB per token, {:.2} MiB",
            self.ctx,
            format!("{kv:?}").to_lowercase(),
            self.per_token() as f64 / 1024.0,
            mib(self.total)
        );
        if self.ring_layers > 0 {
            s += &format!(
                " ({} full layers; {} chunked layers keep {} tokens)",
                self.full_layers, self.ring_layers, self.ring_slots
            );
        }
        s
    }
}

/// Whether layer `spec` keeps a ring of chunk slots rather than the whole context.
pub fn is_ring(cfg: &ModelConfig, layer: usize) -> bool {
    cfg.layers.get(layer).is_some_and(|l| l.chunked) && cfg.attention_chunk_size.unwrap_or(0) > 0
}

/// Positions kept by layer `layer` for a context of `ctx` tokens.
pub fn layer_slots(cfg: &ModelConfig, layer: usize, ctx: usize) -> usize {
    if is_ring(cfg, layer) {
        ctx.min(cfg.attention_chunk_size.unwrap_or(ctx))
    } else {
        ctx
    }
}

/// The KV cache bytes of `cfg` for a context of `ctx` tokens (u64 arithmetic, saturating: a
/// context of 10^15 tokens gives a number, not an overflow).
pub fn kv_bytes(cfg: &ModelConfig, ctx: usize, kv: KvType) -> KvBytes {
    let per_token_layer = 2 * cfg.num_kv_heads as u64 * row_bytes(kv, cfg.head_dim) as u64;
    let ring_layers = (0..cfg.num_layers).filter(|&l| is_ring(cfg, l)).count();
    let full_layers = cfg.num_layers - ring_layers;
    let ring_slots = if ring_layers > 0 {
        layer_slots(
            cfg,
            cfg.layers.iter().position(|l| l.chunked).unwrap_or(0),
            ctx,
        )
    } else {
        0
    };
    let ctx64 = ctx as u64;
    let total = per_token_layer
        .saturating_mul(ctx64)
        .saturating_mul(full_layers as u64)
        .saturating_add(
            per_token_layer
                .saturating_mul(ring_slots as u64)
                .saturating_mul(ring_layers as u64),
        );
    let total_full = per_token_layer
        .saturating_mul(ctx64)
        .saturating_mul(cfg.num_layers as u64);
    KvBytes {
        ctx,
        full_layers,
        ring_layers,
        ring_slots,
        per_token_layer,
        total,
        total_full,
    }
}

/// Refuse a context longer than the model's `max_position_embeddings` (the positions it was
/// trained for; RoPE beyond them produces text the model never saw) unless `limit` was raised
/// (`--ctx-override`, [`crate::model::Model::allow_any_context`]).
pub fn check_context(cfg: &ModelConfig, ctx: usize, limit: usize) -> Result<()> {
    if ctx > limit {
        return Err(Error::config(
            "max_position_embeddings",
            format!(
                "a context of {ctx} tokens exceeds the model's max_position_embeddings of {} \
                 (the positions it was trained for); use -c {} or less, or --ctx-override to run \
                 beyond it anyway",
                cfg.max_position_embeddings, limit
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{Arch, LayerSpec, RopeStyle};

    /// Llama-4-Scout-17B-16E's attention: 48 layers, 8 KV heads of 128, chunk 8192, every
    /// fourth layer NoPE (global).
    pub(crate) fn scout() -> ModelConfig {
        let layers = (0..48)
            .map(|i| {
                let nope = (i + 1) % 4 == 0;
                LayerSpec {
                    rope: !nope,
                    qk_norm: !nope,
                    chunked: !nope,
                    temp_tune: nope,
                    moe: true,
                }
            })
            .collect();
        ModelConfig {
            arch: Arch::Llama4,
            vocab_size: 202048,
            hidden_size: 5120,
            num_layers: 48,
            num_heads: 40,
            num_kv_heads: 8,
            head_dim: 128,
            intermediate_size: 16384,
            moe_intermediate_size: 8192,
            num_experts: 16,
            num_experts_per_tok: 1,
            shared_expert: true,
            router: crate::model::Router::SigmoidInput,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            rope_style: RopeStyle::Interleaved,
            rope_freq_bf16: false,
            rope_freq_factors: None,
            attention_chunk_size: Some(8192),
            floor_scale: 8192.0,
            attn_scale: 0.1,
            tie_word_embeddings: false,
            max_position_embeddings: 10485760,
            layers,
        }
    }

    #[test]
    fn scout_kv_bytes_before_and_after() {
        let c = scout();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        println!(
            "| context | KV type | every layer full (before) | rings (after) | after/before |"
        );
        println!("|---|---|---|---|---|");
        for ctx in [8192usize, 131072, 1 << 20] {
            for kv in [KvType::F16, KvType::Q8, KvType::Q4] {
                let b = kv_bytes(&c, ctx, kv);
                println!(
                    "| {ctx} | {kv:?} | {:.3} GiB | {:.3} GiB | {:.1} % |",
                    gib(b.total_full),
                    gib(b.total),
                    100.0 * b.total as f64 / b.total_full as f64
                );
            }
        }
        // f16 at 128K: 48 layers x 131072 x 2 x 8 x 128 x 2 bytes = 24 GiB before; 12 global
        // layers at 128K + 36 rings of 8192 after = 6 + 1.125 GiB
        let b = kv_bytes(&c, 131072, KvType::F16);
        assert_eq!(b.total_full, 24 << 30);
        assert_eq!(b.total, (6 << 30) + (9 << 27));
        assert!(b.total * 10 <= b.total_full * 3, "at most 30 % of before");
        assert_eq!((b.full_layers, b.ring_layers, b.ring_slots), (12, 36, 8192));
        // below the chunk size the rings hold every position
        let s = kv_bytes(&c, 100, KvType::F16);
        assert_eq!(s.total, s.total_full);
        assert_eq!(s.per_token(), 48 * 4096);
        // q4: 4 blocks of 32 per 128-value head row, 16 bytes + an f16 scale each: 72 bytes,
        // 9/32 of f16
        assert_eq!(row_bytes(KvType::Q4, 128), 72);
        assert_eq!(row_bytes(KvType::Q4, 16), 18);
        let q = kv_bytes(&c, 131072, KvType::Q4);
        assert_eq!(q.total * 32, b.total * 9);
    }

    #[test]
    fn context_limit() {
        let mut c = scout();
        c.max_position_embeddings = 4096;
        assert!(check_context(&c, 4096, 4096).is_ok());
        let e = check_context(&c, 4097, 4096).unwrap_err().to_string();
        assert!(
            e.contains("max_position_embeddings") && e.contains("4096"),
            "{e}"
        );
        assert!(check_context(&c, 1 << 40, usize::MAX).is_ok());
    }
}
