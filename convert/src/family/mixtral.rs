//! Mixtral (`MixtralForCausalLM`): every layer a sparse MoE block under `block_sparse_moe.`
//! (the Hub layout, which transformers 5 also writes): a router `gate [E, H]` and per expert
//! `w1` (gate), `w3` (up), `w2` (down); softmax top-k routing renormalised over the chosen
//! experts, which weighs the experts' outputs (`Router::SoftmaxTopK`); no shared expert.

use super::Src;
use ferroq::internals::model::tensors::{LayerTensor, Proj};

/// The FFN tensors of layer prefix `l` (`model.layers.{i}.`).
pub fn layer_source(l: &str, t: LayerTensor) -> Option<Src> {
    let b = format!("{l}block_sparse_moe.");
    match t {
        LayerTensor::Router => Some(Src::Plain(format!("{b}gate.weight"))),
        LayerTensor::Expert(e, p) => {
            let w = match p {
                Proj::Gate => "w1",
                Proj::Down => "w2",
                Proj::Up => "w3",
            };
            Some(Src::Plain(format!("{b}experts.{e}.{w}.weight")))
        }
        _ => None,
    }
}
