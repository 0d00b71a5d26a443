//! Model families: how each maps a Hugging Face checkpoint's tensor names to ferroq's table of
//! [`TensorKey`]s (`llama`: Llama 2/3, Mistral, SmolLM2; `llama4`; `mixtral`). The config side
//! of each family (`config.json` → [`ModelConfig`] with its per-layer `LayerSpec`s) is in
//! `hf.rs`, one function per family. `docs/adding-a-family.md` lists what a new family takes.

pub mod llama;
pub mod llama4;
pub mod mixtral;

use super::source::TensorSource;
use ferroq::internals::model::tensors::{LayerTensor, TensorKey};
use ferroq::internals::model::{Arch, ModelConfig};

/// Which projection of a fused expert tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertPart {
    Gate,
    Up,
    Down,
}

/// Where a tensor of ferroq's table comes from in a checkpoint.
#[derive(Clone, Debug)]
pub enum Src {
    /// A 2-D or 1-D tensor stored as we want it.
    Plain(String),
    /// Slice `e` of a fused, transposed expert tensor: `gate_up_proj [E, H, 2I]` (gate = columns
    /// `[:I]`, up = `[I:]`) or `down_proj [E, I, H]`.
    Fused {
        name: String,
        e: usize,
        part: ExpertPart,
    },
}

/// The source of `key` in a checkpoint of a `cfg` model whose text-model tensors start with
/// `p` (`""` or `"language_model."`). `None`: the family has no such tensor.
pub fn hf_source(
    cfg: &ModelConfig,
    key: TensorKey,
    p: &str,
    src: &dyn TensorSource,
) -> Option<Src> {
    let m = format!("{p}model.");
    let plain = |s: String| Some(Src::Plain(s));
    match key {
        TensorKey::TokEmbeddings => plain(format!("{m}embed_tokens.weight")),
        TensorKey::OutputNorm => plain(format!("{m}norm.weight")),
        TensorKey::Output => plain(format!("{p}lm_head.weight")),
        TensorKey::Layer(i, t) => {
            let l = format!("{m}layers.{i}.");
            // the attention block is named alike in every family
            let common = match t {
                LayerTensor::AttnNorm => Some("input_layernorm"),
                LayerTensor::FfnNorm => Some("post_attention_layernorm"),
                LayerTensor::Wq => Some("self_attn.q_proj"),
                LayerTensor::Wk => Some("self_attn.k_proj"),
                LayerTensor::Wv => Some("self_attn.v_proj"),
                LayerTensor::Wo => Some("self_attn.o_proj"),
                _ => None,
            };
            if let Some(c) = common {
                return plain(format!("{l}{c}.weight"));
            }
            match cfg.arch {
                Arch::Llama => llama::layer_source(&l, t),
                Arch::Llama4 => llama4::layer_source(&l, t, src),
                Arch::Mixtral => mixtral::layer_source(&l, t),
            }
        }
    }
}
