//! Dense Llama (`LlamaForCausalLM`: Llama 2 and 3, SmolLM2; `MistralForCausalLM`): SwiGLU MLP
//! under `mlp.`, RoPE on every layer (`rotate_half` pairing).

use super::Src;
use ferroq::internals::model::tensors::LayerTensor;

/// The FFN tensors of layer prefix `l` (`model.layers.{i}.`).
pub fn layer_source(l: &str, t: LayerTensor) -> Option<Src> {
    match t {
        LayerTensor::Ffn(p) => Some(Src::Plain(format!("{l}mlp.{}_proj.weight", p.name()))),
        _ => None,
    }
}
