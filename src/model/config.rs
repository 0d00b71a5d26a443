//! The model configuration ferroq runs from: normalized from a Hugging Face `config.json` (or
//! GGUF metadata) by the converter and stored as JSON inside the `.fqm` file.
//!
//! Every per-layer decision of the forward pass is resolved here once ([`LayerSpec`]), so the
//! forward pass never re-derives `no_rope_layers`/`moe_layers` semantics.

use serde::{Deserialize, Serialize};

/// Model family (decides the RoPE pairing convention and the FFN kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// Llama 4 text model (`Llama4ForCausalLM`, `Llama4ForConditionalGeneration`).
    Llama4,
    /// Dense Llama (`LlamaForCausalLM`; Llama 2/3, SmolLM2, ...; `MistralForCausalLM`).
    Llama,
    /// Mixtral-style sparse MoE (`MixtralForCausalLM`): every layer MoE, softmax top-k routing
    /// weighing the experts' outputs, no shared expert.
    Mixtral,
}

/// Which pairs RoPE rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// `(x[2j], x[2j+1])`: Llama 4 in HF layout (weights not permuted).
    Interleaved,
    /// `(x[j], x[j + D/2])`: HF Llama `rotate_half`.
    Half,
}

/// Llama 3 style frequency scaling (`rope_type: "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3Scaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: f32,
}

/// How an MoE layer chooses and weighs its experts (the forward pass: `model/moe.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Router {
    /// Llama 4: top-k of the raw router logits; `sigmoid(logit)` of each chosen expert scales
    /// that expert's INPUT, and the expert outputs are summed unweighted. (The default: files
    /// written before the field existed are Llama 4.)
    #[default]
    SigmoidInput,
    /// Mixtral: softmax over all experts' logits, top-k, optionally renormalised to sum 1; each
    /// chosen expert's OUTPUT is scaled by its weight.
    SoftmaxTopK { renormalize: bool },
}

/// Per-layer switches, fully resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// RoPE on q and k (false = NoPE layer).
    pub rope: bool,
    /// Weightless RMS norm of q and k per head, after RoPE.
    pub qk_norm: bool,
    /// Chunked attention (keys of the same `attention_chunk_size` chunk only).
    pub chunked: bool,
    /// Llama 4 query temperature tuning (NoPE layers).
    pub temp_tune: bool,
    /// Mixture-of-experts FFN (else dense SwiGLU of `intermediate_size`).
    pub moe: bool,
}

/// Everything the forward pass needs to know about a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Width of the dense SwiGLU MLP (Llama 4: `intermediate_size_mlp`).
    pub intermediate_size: usize,
    /// Width of each routed expert and of the shared expert (Llama 4: `intermediate_size`).
    pub moe_intermediate_size: usize,
    pub num_experts: usize,
    pub num_experts_per_tok: usize,
    pub shared_expert: bool,
    /// Routing of the MoE layers.
    #[serde(default)]
    pub router: Router,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: Option<Llama3Scaling>,
    pub rope_style: RopeStyle,
    /// Round the RoPE inverse frequencies to bf16, reproducing a transformers model that was
    /// cast with `model.to(torch.bfloat16)` (which rounds the `inv_freq` buffer; `from_pretrained`
    /// keeps it in f32). Off by default: f32 frequencies are what the model was trained with.
    #[serde(default)]
    pub rope_freq_bf16: bool,
    /// Per-frequency divisors of the RoPE inverse frequencies (`head_dim / 2` values), as a
    /// GGUF file's `rope_freqs.weight` stores Llama 3 style scaling: `inv_freq[j] =
    /// theta^(-2j/d) / factors[j]` (llama.cpp's `ggml_rope_ext` freq_factors). Absent for
    /// Hugging Face checkpoints (they give `rope_scaling` instead); never both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_freq_factors: Option<Vec<f32>>,
    pub attention_chunk_size: Option<usize>,
    pub floor_scale: f32,
    pub attn_scale: f32,
    pub tie_word_embeddings: bool,
    /// Context length the model was trained for (the default context of a session).
    pub max_position_embeddings: usize,
    pub layers: Vec<LayerSpec>,
}

/// Most decoder layers a model may have (real models: 16–126).
pub const MAX_LAYERS: usize = 4096;
/// Most routed experts per layer, and per model counted over its MoE layers (Llama 4
/// Maverick: 128 per layer, 3072 in all).
pub const MAX_EXPERTS: usize = 1 << 16;

impl ModelConfig {
    /// Check internal consistency (sizes non-zero, heads divide, layer list length, ...).
    pub fn validate(&self) -> crate::Result<()> {
        let err = |f: &str, m: &str| Err(crate::Error::config(f, m));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
        ] {
            if v == 0 || v > (1 << 24) {
                return err(name, &format!("{v} is out of range"));
            }
        }
        // widths that may be 0 when unused, capped like the sizes above so that a corrupt
        // config is reported by its field, not as a failed allocation later
        for (name, v) in [
            ("intermediate_size", self.intermediate_size),
            ("moe_intermediate_size", self.moe_intermediate_size),
            ("num_experts_per_tok", self.num_experts_per_tok),
        ] {
            if v > (1 << 24) {
                return err(name, &format!("{v} is out of range (at most 2^24)"));
            }
        }
        // caps far above any real model, so that a corrupt config cannot make the loader build
        // a tensor table of billions of entries before it finds the tensors missing
        if self.num_layers > MAX_LAYERS {
            return err(
                "num_hidden_layers",
                &format!("{} exceeds {MAX_LAYERS}", self.num_layers),
            );
        }
        if self.num_experts > MAX_EXPERTS {
            return err(
                "num_local_experts",
                &format!("{} exceeds {MAX_EXPERTS}", self.num_experts),
            );
        }
        let moe_layers = self.layers.iter().filter(|l| l.moe).count();
        if moe_layers * self.num_experts > MAX_EXPERTS {
            return err(
                "num_local_experts",
                &format!(
                    "{moe_layers} MoE layers × {} experts exceeds {MAX_EXPERTS} expert slots",
                    self.num_experts
                ),
            );
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return err("num_key_value_heads", "must divide num_attention_heads");
        }
        if !self.head_dim.is_multiple_of(2) {
            return err("head_dim", "must be even for RoPE");
        }
        if self.layers.len() != self.num_layers {
            return err("layers", "one entry per layer expected");
        }
        if self.layers.iter().any(|l| l.moe) {
            if self.num_experts == 0 || self.moe_intermediate_size == 0 {
                return err("num_local_experts", "MoE layers need experts");
            }
            if self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts {
                return err("num_experts_per_tok", "must be in 1..=num_local_experts");
            }
        }
        if self.layers.iter().any(|l| !l.moe) && self.intermediate_size == 0 {
            return err("intermediate_size", "dense layers need a width");
        }
        if self.layers.iter().any(|l| l.chunked) && self.attention_chunk_size.unwrap_or(0) == 0 {
            return err(
                "attention_chunk_size",
                "chunked layers need a chunk size > 0",
            );
        }
        // (values beyond f32's range are refused where config.json is read, with that reason)
        if !self.rms_norm_eps.is_finite() || self.rms_norm_eps < 0.0 {
            return err(
                "rms_norm_eps",
                &format!("{} must be finite and >= 0", self.rms_norm_eps),
            );
        }
        if !self.rope_theta.is_finite() || self.rope_theta <= 0.0 {
            return err(
                "rope_theta",
                &format!("{} must be finite and > 0", self.rope_theta),
            );
        }
        if self.layers.iter().any(|l| l.temp_tune)
            && (self.floor_scale.is_nan() || self.floor_scale <= 0.0)
        {
            return err("floor_scale", "must be > 0");
        }
        if let Some(f) = &self.rope_freq_factors {
            if self.rope_scaling.is_some() {
                return err(
                    "rope_freq_factors",
                    "given together with rope_scaling (one of them only)",
                );
            }
            if f.len() != self.head_dim / 2 {
                return err(
                    "rope_freq_factors",
                    &format!(
                        "{} values, head_dim / 2 = {} expected",
                        f.len(),
                        self.head_dim / 2
                    ),
                );
            }
            if let Some((j, x)) = f
                .iter()
                .enumerate()
                .find(|(_, x)| !(x.is_finite() && **x > 0.0))
            {
                return err(
                    "rope_freq_factors",
                    &format!("value {j} is {x}: every factor must be finite and > 0"),
                );
            }
        }
        Ok(())
    }
}
