//! The one table of tensors a model file holds: names, shapes and roles. The converter writes
//! exactly these tensors and the loader checks exactly these (gemma.cpp `ForEachTensor`).

use super::config::ModelConfig;

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

/// One tensor of the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    /// `[rows, cols]` for matrices (nn.Linear layout, `y = W x`), `[n]` for vectors.
    pub shape: Vec<usize>,
    pub role: Role,
    /// For experts: (layer, expert); the first tensor of each expert is page-aligned.
    pub expert: Option<(usize, usize)>,
}

fn t(name: String, shape: Vec<usize>, role: Role) -> TensorSpec {
    TensorSpec {
        name,
        shape,
        role,
        expert: None,
    }
}

/// The tensors of a model with this configuration, in file order.
pub fn tensor_table(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, v, d) = (c.hidden_size, c.vocab_size, c.head_dim);
    let mut out = vec![t("tok_embeddings".into(), vec![v, h], Role::Embedding)];
    for (i, l) in c.layers.iter().enumerate() {
        let p = format!("layers.{i}.");
        out.push(t(format!("{p}attn_norm"), vec![h], Role::Norm));
        out.push(t(
            format!("{p}wq"),
            vec![c.num_heads * d, h],
            Role::Attention,
        ));
        out.push(t(
            format!("{p}wk"),
            vec![c.num_kv_heads * d, h],
            Role::Attention,
        ));
        out.push(t(
            format!("{p}wv"),
            vec![c.num_kv_heads * d, h],
            Role::Attention,
        ));
        out.push(t(
            format!("{p}wo"),
            vec![h, c.num_heads * d],
            Role::Attention,
        ));
        out.push(t(format!("{p}ffn_norm"), vec![h], Role::Norm));
        if l.moe {
            let im = c.moe_intermediate_size;
            out.push(t(
                format!("{p}router"),
                vec![c.num_experts, h],
                Role::Router,
            ));
            if c.shared_expert {
                out.push(t(format!("{p}shared_gate"), vec![im, h], Role::Ffn));
                out.push(t(format!("{p}shared_up"), vec![im, h], Role::Ffn));
                out.push(t(format!("{p}shared_down"), vec![h, im], Role::Ffn));
            }
            for e in 0..c.num_experts {
                for (n, shape) in [
                    ("gate", vec![im, h]),
                    ("up", vec![im, h]),
                    ("down", vec![h, im]),
                ] {
                    out.push(TensorSpec {
                        name: format!("{p}experts.{e}.{n}"),
                        shape,
                        role: Role::Expert,
                        expert: Some((i, e)),
                    });
                }
            }
        } else {
            let im = c.intermediate_size;
            out.push(t(format!("{p}ffn_gate"), vec![im, h], Role::Ffn));
            out.push(t(format!("{p}ffn_up"), vec![im, h], Role::Ffn));
            out.push(t(format!("{p}ffn_down"), vec![h, im], Role::Ffn));
        }
    }
    out.push(t("output_norm".into(), vec![h], Role::Norm));
    if !c.tie_word_embeddings {
        out.push(t("output".into(), vec![v, h], Role::Output));
    }
    out
}
