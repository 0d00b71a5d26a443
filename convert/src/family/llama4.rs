//! Llama 4 (`Llama4ForCausalLM`, `Llama4ForConditionalGeneration`): dense and MoE layers under
//! `feed_forward.`, a router, a shared expert, and routed experts either fused
//! (`experts.gate_up_proj [E, H, 2I]`, `experts.down_proj [E, I, H]`, the Hub layout) or one
//! `nn.Linear` per expert.

use super::{ExpertPart, Src};
use crate::source::TensorSource;
use ferroq::internals::model::tensors::{LayerTensor, Proj};

/// The FFN tensors of layer prefix `l` (`model.layers.{i}.`).
pub fn layer_source(l: &str, t: LayerTensor, src: &dyn TensorSource) -> Option<Src> {
    let f = format!("{l}feed_forward.");
    let plain = |s: String| Some(Src::Plain(s));
    match t {
        LayerTensor::Ffn(p) => plain(format!("{f}{}_proj.weight", p.name())),
        LayerTensor::Router => plain(format!("{f}router.weight")),
        LayerTensor::Shared(p) => plain(format!("{f}shared_expert.{}_proj.weight", p.name())),
        LayerTensor::Expert(e, p) => {
            let fused_gu = format!("{f}experts.gate_up_proj");
            if src.find(&fused_gu).is_some() {
                let (name, part) = match p {
                    Proj::Gate => (fused_gu, ExpertPart::Gate),
                    Proj::Up => (fused_gu, ExpertPart::Up),
                    Proj::Down => (format!("{f}experts.down_proj"), ExpertPart::Down),
                };
                Some(Src::Fused { name, e, part })
            } else {
                plain(format!("{f}experts.{e}.{}_proj.weight", p.name()))
            }
        }
        _ => None,
    }
}
