//! The one table of tensors a model file holds: typed keys (whose `Display` is the name in the
//! file), shapes and roles. The converter writes exactly these tensors and the loader checks
//! exactly these (gemma.cpp `ForEachTensor`); model families map their checkpoints' names to
//! these keys (`convert/src/family/`).

use super::config::ModelConfig;
use std::fmt;

/// What a tensor is for (the converter's quantization recipe is keyed on this).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Token embedding table `[V, H]`.
    Embedding,
    /// Output projection `[V, H]`.
    Output,
    /// RMSNorm weight `[H]` (always f32).
    Norm,
    /// Attention projection.
    Attention,
    /// MoE router `[E, H]` (always f32).
    Router,
    /// Dense MLP or shared-expert projection.
    Ffn,
    /// Routed expert projection (each expert's first tensor starts on a page).
    Expert,
}

/// One of the three projections of a SwiGLU (`down(silu(gate(x)) * up(x))`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    Gate,
    Up,
    Down,
}

impl Proj {
    /// All three, in file order.
    pub const ALL: [Proj; 3] = [Proj::Gate, Proj::Up, Proj::Down];

    /// `gate`, `up` or `down`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::Gate => "gate",
            Proj::Up => "up",
            Proj::Down => "down",
        }
    }
}

/// A tensor of one decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerTensor {
    AttnNorm,
    Wq,
    Wk,
    Wv,
    Wo,
    FfnNorm,
    /// A projection of the dense MLP (`ffn_gate`, `ffn_up`, `ffn_down`).
    Ffn(Proj),
    /// The MoE router `[E, H]`.
    Router,
    /// A projection of the shared expert (`shared_gate`, ...).
    Shared(Proj),
    /// A projection of routed expert `e` (`experts.{e}.gate`, ...).
    Expert(usize, Proj),
}

/// A tensor of a model file, typed. `Display` writes its name in the file
/// (`tok_embeddings`, `layers.3.wq`, `layers.0.experts.7.down`, ...); `parse` reads it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorKey {
    TokEmbeddings,
    Layer(usize, LayerTensor),
    OutputNorm,
    Output,
}

impl TensorKey {
    /// What the tensor is for.
    pub fn role(self) -> Role {
        use LayerTensor as L;
        match self {
            TensorKey::TokEmbeddings => Role::Embedding,
            TensorKey::Output => Role::Output,
            TensorKey::OutputNorm => Role::Norm,
            TensorKey::Layer(_, t) => match t {
                L::AttnNorm | L::FfnNorm => Role::Norm,
                L::Wq | L::Wk | L::Wv | L::Wo => Role::Attention,
                L::Router => Role::Router,
                L::Ffn(_) | L::Shared(_) => Role::Ffn,
                L::Expert(..) => Role::Expert,
            },
        }
    }

    /// The layer's tensor, if this is one.
    pub fn layer(self) -> Option<(usize, LayerTensor)> {
        match self {
            TensorKey::Layer(i, t) => Some((i, t)),
            _ => None,
        }
    }

    /// The SwiGLU projection this is (dense, shared or routed expert), if any.
    pub fn proj(self) -> Option<Proj> {
        match self.layer()?.1 {
            LayerTensor::Ffn(p) | LayerTensor::Shared(p) | LayerTensor::Expert(_, p) => Some(p),
            _ => None,
        }
    }

    /// Parse a file name (`None` for a name that is not a model tensor, e.g. `blob.*`).
    pub fn parse(name: &str) -> Option<TensorKey> {
        use LayerTensor as L;
        match name {
            "tok_embeddings" => return Some(TensorKey::TokEmbeddings),
            "output_norm" => return Some(TensorKey::OutputNorm),
            "output" => return Some(TensorKey::Output),
            _ => {}
        }
        let rest = name.strip_prefix("layers.")?;
        let (i, rest) = rest.split_once('.')?;
        let i = parse_index(i)?;
        let proj = |s: &str| Proj::ALL.into_iter().find(|p| p.name() == s);
        let t = match rest {
            "attn_norm" => L::AttnNorm,
            "wq" => L::Wq,
            "wk" => L::Wk,
            "wv" => L::Wv,
            "wo" => L::Wo,
            "ffn_norm" => L::FfnNorm,
            "router" => L::Router,
            _ => {
                if let Some(p) = rest.strip_prefix("ffn_") {
                    L::Ffn(proj(p)?)
                } else if let Some(p) = rest.strip_prefix("shared_") {
                    L::Shared(proj(p)?)
                } else {
                    let (e, p) = rest.strip_prefix("experts.")?.split_once('.')?;
                    L::Expert(parse_index(e)?, proj(p)?)
                }
            }
        };
        Some(TensorKey::Layer(i, t))
    }
}

/// A decimal index without sign or leading zeros.
fn parse_index(s: &str) -> Option<usize> {
    let ok =
        !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    ok.then(|| s.parse().ok()).flatten()
}

impl fmt::Display for TensorKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LayerTensor as L;
        match self {
            TensorKey::TokEmbeddings => f.write_str("tok_embeddings"),
            TensorKey::OutputNorm => f.write_str("output_norm"),
            TensorKey::Output => f.write_str("output"),
            TensorKey::Layer(i, t) => {
                write!(f, "layers.{i}.")?;
                match t {
                    L::AttnNorm => f.write_str("attn_norm"),
                    L::Wq => f.write_str("wq"),
                    L::Wk => f.write_str("wk"),
                    L::Wv => f.write_str("wv"),
                    L::Wo => f.write_str("wo"),
                    L::FfnNorm => f.write_str("ffn_norm"),
                    L::Ffn(p) => write!(f, "ffn_{}", p.name()),
                    L::Router => f.write_str("router"),
                    L::Shared(p) => write!(f, "shared_{}", p.name()),
                    L::Expert(e, p) => write!(f, "experts.{e}.{}", p.name()),
                }
            }
        }
    }
}

/// One tensor of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub key: TensorKey,
    /// `key.to_string()`, the name in the file.
    pub name: String,
    /// `[rows, cols]` for matrices (nn.Linear layout, `y = W x`), `[n]` for vectors.
    pub shape: Vec<usize>,
    pub role: Role,
    /// For experts: (layer, expert); the first tensor of each expert is page-aligned.
    pub expert: Option<(usize, usize)>,
}

impl TensorSpec {
    fn new(key: TensorKey, shape: Vec<usize>) -> TensorSpec {
        TensorSpec {
            key,
            name: key.to_string(),
            shape,
            role: key.role(),
            expert: match key {
                TensorKey::Layer(i, LayerTensor::Expert(e, _)) => Some((i, e)),
                _ => None,
            },
        }
    }
}

/// The shape of a SwiGLU projection of width `inter` in a model of width `h`.
fn proj_shape(p: Proj, h: usize, inter: usize) -> Vec<usize> {
    match p {
        Proj::Gate | Proj::Up => vec![inter, h],
        Proj::Down => vec![h, inter],
    }
}

/// The tensors of a model with this configuration, in file order.
pub fn tensor_table(c: &ModelConfig) -> Vec<TensorSpec> {
    use LayerTensor as L;
    let (h, v, d) = (c.hidden_size, c.vocab_size, c.head_dim);
    let mut out = vec![TensorSpec::new(TensorKey::TokEmbeddings, vec![v, h])];
    for (i, l) in c.layers.iter().enumerate() {
        let mut t = |t: LayerTensor, shape: Vec<usize>| {
            out.push(TensorSpec::new(TensorKey::Layer(i, t), shape))
        };
        t(L::AttnNorm, vec![h]);
        t(L::Wq, vec![c.num_heads * d, h]);
        t(L::Wk, vec![c.num_kv_heads * d, h]);
        t(L::Wv, vec![c.num_kv_heads * d, h]);
        t(L::Wo, vec![h, c.num_heads * d]);
        t(L::FfnNorm, vec![h]);
        if l.moe {
            let im = c.moe_intermediate_size;
            t(L::Router, vec![c.num_experts, h]);
            if c.shared_expert {
                for p in Proj::ALL {
                    t(L::Shared(p), proj_shape(p, h, im));
                }
            }
            for e in 0..c.num_experts {
                for p in Proj::ALL {
                    t(L::Expert(e, p), proj_shape(p, h, im));
                }
            }
        } else {
            for p in Proj::ALL {
                t(L::Ffn(p), proj_shape(p, h, c.intermediate_size));
            }
        }
    }
    out.push(TensorSpec::new(TensorKey::OutputNorm, vec![h]));
    if !c.tie_word_embeddings {
        out.push(TensorSpec::new(TensorKey::Output, vec![v, h]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_names() {
        use LayerTensor as L;
        let mut keys = vec![
            TensorKey::TokEmbeddings,
            TensorKey::OutputNorm,
            TensorKey::Output,
        ];
        for t in [
            L::AttnNorm,
            L::Wq,
            L::Wk,
            L::Wv,
            L::Wo,
            L::FfnNorm,
            L::Router,
        ] {
            keys.push(TensorKey::Layer(12, t));
        }
        for p in Proj::ALL {
            keys.extend([
                TensorKey::Layer(0, L::Ffn(p)),
                TensorKey::Layer(3, L::Shared(p)),
                TensorKey::Layer(47, L::Expert(127, p)),
            ]);
        }
        for k in keys {
            assert_eq!(TensorKey::parse(&k.to_string()), Some(k), "{k}");
        }
        assert_eq!(
            TensorKey::Layer(2, L::Expert(5, Proj::Down)).to_string(),
            "layers.2.experts.5.down"
        );
        for bad in [
            "layers.01.wq",
            "layers.x.wq",
            "layers.1.ffn_left",
            "layers.1",
            "blob.tokenizer.json",
            "layers.1.experts.2",
        ] {
            assert_eq!(TensorKey::parse(bad), None, "{bad}");
        }
    }
}
