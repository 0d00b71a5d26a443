//! GGUF files of architecture `llama4` (Llama 4 Scout / Maverick text models), as mainline
//! llama.cpp's `convert_hf_to_gguf.py` (class `Llama4Model`) writes them and `llama-quantize`
//! quantizes them, presented as the Hugging Face checkpoint they came from: a synthesized
//! `Llama4ForCausalLM` `config.json` (read by `convert/src/hf.rs` exactly like a Hub one), HF tensor
//! names, and the stacked expert tensors sliced into one `nn.Linear` per expert.
//!
//! What the file says and where (llama.cpp `src/llama-model.cpp`, `LLM_ARCH_LLAMA4` in
//! `load_hparams` / `load_tensors`; `src/models/llama-iswa.cpp`, the graph):
//!
//! | GGUF | Hugging Face |
//! |---|---|
//! | `llama4.feed_forward_length` | `intermediate_size_mlp` (dense layers) |
//! | `llama4.expert_feed_forward_length` | `intermediate_size` (experts, shared expert) |
//! | `llama4.interleave_moe_layer_step` | `interleave_moe_layer_step`: layer `i` is MoE when `(i + 1) % step == 0` |
//! | `llama4.expert_count`, `llama4.expert_used_count` | `num_local_experts`, `num_experts_per_tok` |
//! | `llama4.rope.freq_base` | `rope_theta` |
//! | `rope_freqs.weight` `[head_dim / 2]` | llama3 `rope_scaling`, already evaluated into per-frequency divisors |
//! | no `output.weight` | `tie_word_embeddings` |
//! | `blk.N.ffn_gate_inp` `[H, E]` | `feed_forward.router` |
//! | `blk.N.ffn_{gate,up}_exps` `[H, I, E]`, `ffn_down_exps` `[I, H, E]` (ggml dims, innermost first) | `feed_forward.experts.gate_up_proj` `[E, H, 2I]` split and transposed, `down_proj` `[E, I, H]` transposed: expert `e` is the contiguous slice `e`, an `nn.Linear` `[I, H]` / `[H, I]` |
//! | `blk.N.ffn_{gate,up,down}_shexp` | `feed_forward.shared_expert.*` |
//!
//! Q and K are stored unpermuted (`Llama4Model.undo_permute = False`: Hugging Face Llama 4 already
//! uses the interleaved RoPE pairing llama.cpp's `LLAMA_ROPE_TYPE_NORM` rotates).
//!
//! What the file does not say, and llama.cpp's runtime hardcodes for `llama4` (used here when
//! the file lacks the key that Ollama's Llama 4 runtime, `model/models/llama4`, reads for it):
//!
//! | value | llama.cpp | optional key (Ollama) |
//! |---|---|---|
//! | chunked attention on layers with `(i + 1) % 4 != 0`, chunk 8192 | `n_swa = 8192`, `set_swa_pattern(4)` | `llama4.attention.chunk_size` |
//! | NoPE on layers with `(i + 1) % 4 == 0` | `n_no_rope_layer_step = 4` | `llama4.no_rope_interval` |
//! | QK norm (weightless RMS, RoPE layers) unless 128 experts | `use_kq_norm = type != 17B_128E` | `llama4.use_qk_norm` |
//! | query temperature on NoPE layers, floor 8192, scale 0.1 | `n_attn_temp_floor_scale = 8192`, `f_attn_temp_scale = 0.1` | `llama4.attention.temperature_tuning`, `llama4.attention.floor_scale` |
//!
//! `llama4.attention.sliding_window = 0` (written by mainline for configs whose `layer_types` are
//! all `full_attention`, MobileLLM) turns chunking off and RoPE on for every layer, as llama.cpp
//! does ("always use rope").

use std::collections::HashSet;

use serde_json::json;

use super::gguf::{finish, Common, GgufFile, Parts, SIZE_CAP};
use super::source::{Checkpoint, SrcTensor};
use ferroq::{Error, Result};

const ARCH: &str = "llama4";

/// llama.cpp's hardcoded Llama 4 chunk size (`hparams.n_swa = 8192`).
pub const LLAMA_CPP_CHUNK: u64 = 8192;
/// llama.cpp's hardcoded NoPE layer step (`n_no_rope_layer_step = 4`, also the chunked
/// pattern `set_swa_pattern(4)`).
pub const LLAMA_CPP_NO_ROPE_STEP: u64 = 4;
/// llama.cpp's hardcoded temperature tuning (`n_attn_temp_floor_scale`, `f_attn_temp_scale`).
pub const LLAMA_CPP_FLOOR_SCALE: f64 = 8192.0;
pub const LLAMA_CPP_ATTN_SCALE: f64 = 0.1;

fn k(s: &str) -> String {
    format!("{ARCH}.{s}")
}

/// What a `blk.N.*` tensor is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Part {
    AttnNorm,
    Q,
    K,
    V,
    O,
    FfnNorm,
    /// dense layer FFN: gate, up, down
    Ffn(usize),
    Router,
    /// stacked routed experts: gate, up, down
    Exps(usize),
    /// shared expert: gate, up, down
    Shexp(usize),
}

const PROJ: [&str; 3] = ["gate", "up", "down"];

impl Part {
    fn parse(s: &str) -> Option<Part> {
        Some(match s {
            "attn_norm" => Part::AttnNorm,
            "attn_q" => Part::Q,
            "attn_k" => Part::K,
            "attn_v" => Part::V,
            "attn_output" => Part::O,
            "ffn_norm" => Part::FfnNorm,
            "ffn_gate" => Part::Ffn(0),
            "ffn_up" => Part::Ffn(1),
            "ffn_down" => Part::Ffn(2),
            "ffn_gate_inp" => Part::Router,
            "ffn_gate_exps" => Part::Exps(0),
            "ffn_up_exps" => Part::Exps(1),
            "ffn_down_exps" => Part::Exps(2),
            "ffn_gate_shexp" => Part::Shexp(0),
            "ffn_up_shexp" => Part::Shexp(1),
            "ffn_down_shexp" => Part::Shexp(2),
            _ => return None,
        })
    }
    fn gguf(self) -> String {
        match self {
            Part::AttnNorm => "attn_norm".into(),
            Part::Q => "attn_q".into(),
            Part::K => "attn_k".into(),
            Part::V => "attn_v".into(),
            Part::O => "attn_output".into(),
            Part::FfnNorm => "ffn_norm".into(),
            Part::Ffn(p) => format!("ffn_{}", PROJ[p]),
            Part::Router => "ffn_gate_inp".into(),
            Part::Exps(p) => format!("ffn_{}_exps", PROJ[p]),
            Part::Shexp(p) => format!("ffn_{}_shexp", PROJ[p]),
        }
    }
    /// The Hugging Face name under `model.layers.{i}.` (experts: with `{e}` to fill in).
    fn hf(self) -> String {
        match self {
            Part::AttnNorm => "input_layernorm.weight".into(),
            Part::Q => "self_attn.q_proj.weight".into(),
            Part::K => "self_attn.k_proj.weight".into(),
            Part::V => "self_attn.v_proj.weight".into(),
            Part::O => "self_attn.o_proj.weight".into(),
            Part::FfnNorm => "post_attention_layernorm.weight".into(),
            Part::Ffn(p) => format!("feed_forward.{}_proj.weight", PROJ[p]),
            Part::Router => "feed_forward.router.weight".into(),
            Part::Exps(p) => format!("feed_forward.experts.{{e}}.{}_proj.weight", PROJ[p]),
            Part::Shexp(p) => format!("feed_forward.shared_expert.{}_proj.weight", PROJ[p]),
        }
    }
    /// The parts of a layer of each kind.
    fn of_layer(moe: bool) -> Vec<Part> {
        let mut v = vec![
            Part::AttnNorm,
            Part::Q,
            Part::K,
            Part::V,
            Part::O,
            Part::FfnNorm,
        ];
        if moe {
            v.push(Part::Router);
            v.extend((0..3).map(Part::Exps));
            v.extend((0..3).map(Part::Shexp));
        } else {
            v.extend((0..3).map(Part::Ffn));
        }
        v
    }
}

/// `blk.{layer}.{part}.weight` → (layer, part).
fn parse_layer_name(name: &str) -> Option<(u64, Part)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    if layer.is_empty()
        || layer.len() > 9
        || !layer.bytes().all(|c| c.is_ascii_digit())
        || (layer.len() > 1 && layer.starts_with('0'))
    {
        return None;
    }
    let part = Part::parse(rest.strip_suffix(".weight")?)?;
    Some((layer.parse().ok()?, part))
}

/// Build a [`Checkpoint`] from a parsed `llama4` GGUF file.
pub fn checkpoint(file: GgufFile) -> Result<Checkpoint> {
    let origin = file.origin().to_string();
    let common = file.common(ARCH)?;
    let Common {
        hidden,
        n_layers,
        n_head,
        n_kv,
        head_dim,
        ctx,
        ..
    } = common;
    // keys llama.cpp requires for llama4
    let ffn_exp = file.req_u64(&k("expert_feed_forward_length"))?;
    let step = file.req_u64(&k("interleave_moe_layer_step"))?;
    if step == 0 {
        return Err(file.meta_err(
            &k("interleave_moe_layer_step"),
            "must be > 0 (llama.cpp: \"Llama 4 requires n_moe_layer_step > 0\")",
        ));
    }
    let n_expert = file.opt_u64(&k("expert_count"))?.unwrap_or(0);
    let n_used = file.opt_u64(&k("expert_used_count"))?.unwrap_or(0);
    let ffn = file.opt_u64(&k("feed_forward_length"))?;
    for (key, v) in [
        ("expert_feed_forward_length", Some(ffn_exp)),
        ("expert_count", Some(n_expert)),
        ("expert_used_count", Some(n_used)),
        ("feed_forward_length", ffn),
        ("interleave_moe_layer_step", Some(step)),
    ] {
        if v.is_some_and(|v| v > SIZE_CAP) {
            return Err(file.meta_err(&k(key), format!("{v:?} exceeds {SIZE_CAP}")));
        }
    }
    // MoE layers: llama.cpp's `is_moe_layer = (i + 1) % n_moe_layer_step == 0`; a file without
    // experts (MobileLLM) is dense throughout
    let moe: Vec<bool> = (0..n_layers)
        .map(|i| n_expert > 0 && (i + 1) % step == 0)
        .collect();
    let any_moe = moe.iter().any(|&m| m);
    let any_dense = moe.iter().any(|&m| !m);
    if any_moe {
        if ffn_exp == 0 {
            return Err(file.meta_err(&k("expert_feed_forward_length"), "must be > 0"));
        }
        if n_used == 0 || n_used > n_expert {
            return Err(file.meta_err(
                &k("expert_used_count"),
                format!("{n_used} is not in 1..={n_expert} (llama4.expert_count)"),
            ));
        }
    }
    let ffn = match ffn {
        Some(0) | None if any_dense => {
            return Err(file.meta_err(
                &k("feed_forward_length"),
                "missing or 0, but the model has dense layers",
            ))
        }
        f => f.unwrap_or(0),
    };

    // Attention pattern.
    let all_full = file.opt_u64(&k("attention.sliding_window"))? == Some(0);
    let chunk = file
        .opt_u64(&k("attention.chunk_size"))?
        .unwrap_or(LLAMA_CPP_CHUNK);
    if chunk == 0 || chunk > 1 << 32 {
        return Err(file.meta_err(
            &k("attention.chunk_size"),
            format!("{chunk} out of range 1..=2^32"),
        ));
    }
    let interval = file
        .opt_u64(&k("no_rope_interval"))?
        .unwrap_or(LLAMA_CPP_NO_ROPE_STEP);
    if interval == 0 {
        return Err(file.meta_err(&k("no_rope_interval"), "must be > 0"));
    }
    // (llama.cpp with sliding_window 0 sets n_no_rope_layer_step = n_layer, commented "always
    // use rope"; every layer ropes here, as the Hugging Face config of such a model says)
    let use_rope: Vec<bool> = (0..n_layers)
        .map(|i| all_full || (i + 1) % interval != 0)
        .collect();
    let chunked: Vec<bool> = (0..n_layers)
        .map(|i| !all_full && (i + 1) % interval != 0)
        .collect();
    let qk_norm = file.opt_bool(&k("use_qk_norm"))?.unwrap_or(n_expert != 128);
    let temp_tune = file
        .opt_bool(&k("attention.temperature_tuning"))?
        .unwrap_or(true);
    let floor_scale = file
        .opt_f64(&k("attention.floor_scale"))?
        .unwrap_or(LLAMA_CPP_FLOOR_SCALE);
    if floor_scale <= 0.0 || floor_scale > f32::MAX as f64 {
        return Err(file.meta_err(
            &k("attention.floor_scale"),
            format!("{floor_scale} must be > 0"),
        ));
    }
    // llama.cpp's default when the key is absent
    let theta = file.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0);
    if let Some(s) = file.rope_scaling(ARCH)? {
        return Err(file.meta_err(
            &k("rope.scaling.type"),
            format!(
                "{} scaling is not supported for llama4 (Llama 3 style scaling comes as the \
                 rope_freqs.weight tensor)",
                s["rope_type"]
            ),
        ));
    }
    let rope_freq_factors = file.rope_freqs(head_dim)?;

    // Tensors: every one checked against the dims llama.cpp's loader creates it with.
    for name in ["token_embd.weight", "output_norm.weight"] {
        if file.tensor(name).is_none() {
            return Err(Error::tensor(name, format!("{origin}: missing")));
        }
    }
    let (q_rows, kv_rows) = (n_head * head_dim, n_kv * head_dim);
    let vocab_rows = file
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1).copied());
    let want_dims = |p: Part| -> Vec<u64> {
        match p {
            Part::AttnNorm | Part::FfnNorm => vec![hidden],
            Part::Q => vec![hidden, q_rows],
            Part::K | Part::V => vec![hidden, kv_rows],
            Part::O => vec![q_rows, hidden],
            Part::Ffn(2) => vec![ffn, hidden],
            Part::Ffn(_) => vec![hidden, ffn],
            Part::Router => vec![hidden, n_expert],
            Part::Exps(2) => vec![ffn_exp, hidden, n_expert],
            Part::Exps(_) => vec![hidden, ffn_exp, n_expert],
            Part::Shexp(2) => vec![ffn_exp, hidden],
            Part::Shexp(_) => vec![hidden, ffn_exp],
        }
    };
    let mut tensors = Vec::new();
    let mut map = Vec::new();
    let mut seen: HashSet<(u64, Part)> = HashSet::new();
    for (gi, t) in file.tensors.iter().enumerate() {
        let dims_err = |want: &[u64], why: &str| {
            Error::tensor(
                &t.name,
                format!(
                    "{origin}: ggml dims {:?}, but {want:?} expected {why}",
                    t.dims
                ),
            )
        };
        let (hf, dims_want): (String, Option<Vec<u64>>) = match t.name.as_str() {
            "rope_freqs.weight" => continue, // read above
            "token_embd.weight" => ("model.embed_tokens.weight".into(), None),
            "output_norm.weight" => ("model.norm.weight".into(), Some(vec![hidden])),
            "output.weight" => (
                "lm_head.weight".into(),
                Some(vec![hidden, vocab_rows.unwrap_or(0)]),
            ),
            name => {
                let Some((l, part)) = parse_layer_name(name) else {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "{origin}: unknown tensor for architecture `llama4` (a text model \
                             of mainline llama.cpp's Llama4Model has token_embd, output_norm, \
                             output, rope_freqs and blk.N.{{attn_norm, attn_q, attn_k, attn_v, \
                             attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down, ffn_gate_inp, \
                             ffn_*_exps, ffn_*_shexp}}.weight)"
                        ),
                    ));
                };
                if l >= n_layers {
                    return Err(Error::tensor(
                        name,
                        format!("{origin}: layer {l} beyond block_count {n_layers}"),
                    ));
                }
                let is_moe = moe[l as usize];
                if !Part::of_layer(is_moe).contains(&part) {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "{origin}: layer {l} is a {} layer (llama4.interleave_moe_layer_step \
                             = {step}, llama4.expert_count = {n_expert}): it has no {}",
                            if is_moe { "MoE" } else { "dense" },
                            part.gguf()
                        ),
                    ));
                }
                seen.insert((l, part));
                let want = want_dims(part);
                if t.dims != want {
                    return Err(dims_err(&want, "from the metadata"));
                }
                if !t.ty.can_dequantize() {
                    return Err(file.unsupported_type(t));
                }
                if let Part::Exps(_) = part {
                    // one `nn.Linear` [out, in] per expert: slice e of ggml dims [in, out, E]
                    let shape = vec![t.dims[1] as usize, t.dims[0] as usize];
                    for e in 0..n_expert as usize {
                        let name = part.hf().replace("{e}", &e.to_string());
                        tensors.push(SrcTensor {
                            name: format!("model.layers.{l}.{name}"),
                            shape: shape.clone(),
                            dtype: t.ty.name().to_string(),
                        });
                        map.push((gi, None, Some(e)));
                    }
                    continue;
                }
                (format!("model.layers.{l}.{}", part.hf()), None)
            }
        };
        if let Some(want) = dims_want {
            if t.dims != want {
                return Err(dims_err(&want, "from the metadata and token_embd.weight"));
            }
        }
        if !t.ty.can_dequantize() {
            return Err(file.unsupported_type(t));
        }
        tensors.push(SrcTensor {
            name: hf,
            shape: t.dims.iter().rev().map(|&d| d as usize).collect(),
            dtype: t.ty.name().to_string(),
        });
        map.push((gi, None, None));
    }
    // every layer tensor llama.cpp requires, named as in the file
    for (l, &is_moe) in moe.iter().enumerate() {
        for part in Part::of_layer(is_moe) {
            if !seen.contains(&(l as u64, part)) {
                return Err(Error::tensor(
                    format!("blk.{l}.{}.weight", part.gguf()),
                    format!(
                        "{origin}: missing (layer {l} is a {} layer: \
                         llama4.interleave_moe_layer_step = {step}, llama4.expert_count = \
                         {n_expert})",
                        if is_moe { "MoE" } else { "dense" }
                    ),
                ));
            }
        }
    }

    let n = n_layers as usize;
    let mut cfg = common.config("Llama4ForCausalLM", "llama4_text", theta);
    cfg.insert("intermediate_size".into(), json!(ffn_exp));
    cfg.insert("intermediate_size_mlp".into(), json!(ffn));
    cfg.insert("num_local_experts".into(), json!(n_expert));
    cfg.insert("num_experts_per_tok".into(), json!(n_used));
    cfg.insert("interleave_moe_layer_step".into(), json!(step));
    let moe_layers: Vec<usize> = (0..n).filter(|&i| moe[i]).collect();
    cfg.insert("moe_layers".into(), json!(moe_layers));
    let no_rope: Vec<u8> = use_rope.iter().map(|&r| r as u8).collect();
    cfg.insert("no_rope_layers".into(), json!(no_rope));
    cfg.insert("no_rope_layer_interval".into(), json!(interval));
    let types: Vec<&str> = chunked
        .iter()
        .map(|&c| {
            if c {
                "chunked_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    cfg.insert("layer_types".into(), json!(types));
    cfg.insert(
        "attention_chunk_size".into(),
        if all_full { json!(null) } else { json!(chunk) },
    );
    cfg.insert("use_qk_norm".into(), json!(qk_norm));
    cfg.insert("attn_temperature_tuning".into(), json!(temp_tune));
    cfg.insert("floor_scale".into(), json!(floor_scale));
    cfg.insert("attn_scale".into(), json!(LLAMA_CPP_ATTN_SCALE));
    cfg.insert("rope_scaling".into(), json!(null));
    finish(
        file,
        Parts {
            arch: ARCH.into(),
            cfg,
            ctx,
            hidden,
            tensors,
            map,
            rope_freq_factors,
        },
    )
}
