//! Hugging Face model directories: `config.json` → [`ModelConfig`], tokenizer files, and the
//! safetensors weights as a [`Checkpoint`].
//!
//! Field semantics follow `docs/llama4-spec.md` §1 (transformers 5.24 `Llama4TextConfig` and
//! `LlamaConfig`). Every value is read from the file; defaults are the transformers defaults.

use super::safetensors::SafetensorsSource;
use super::source::Checkpoint;
use ferroq::internals::model::{Arch, LayerSpec, Llama3Scaling, ModelConfig, RopeStyle, Router};
use ferroq::{Error, Result};
use serde_json::Value;
use std::path::Path;

fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    match read_opt(path)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}"))),
    }
}

/// Open a Hugging Face model directory as downloaded: `config.json` (required), the
/// safetensors weights, and whichever of `tokenizer.json`, `tokenizer.model`,
/// `tokenizer_config.json`, `chat_template.jinja`, `generation_config.json` exist.
pub fn open_hf_dir(dir: impl AsRef<Path>) -> Result<Checkpoint> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::Input(format!(
            "{}: not a Hugging Face model directory",
            dir.display()
        )));
    }
    let cfg_path = dir.join("config.json");
    let config = read_json_opt(&cfg_path)?
        .ok_or_else(|| Error::format(&cfg_path, "missing (a model directory needs config.json)"))?;
    if !config.is_object() {
        return Err(Error::format(&cfg_path, "not a JSON object"));
    }
    let generation_config = read_json_opt(&dir.join("generation_config.json"))?;
    let tokenizer_config = read_json_opt(&dir.join("tokenizer_config.json"))?;
    let tokenizer_json = read_opt(&dir.join("tokenizer.json"))?;
    if let Some(b) = &tokenizer_json {
        // validate now so a broken tokenizer is reported by the converter, not at load time
        serde_json::from_slice::<Value>(b).map_err(|e| {
            Error::format(dir.join("tokenizer.json"), format!("not valid JSON: {e}"))
        })?;
    }
    let tokenizer_model = read_opt(&dir.join("tokenizer.model"))?;
    let tpl_path = dir.join("chat_template.jinja");
    let chat_template = match read_opt(&tpl_path)? {
        Some(b) => Some(String::from_utf8(b).map_err(|_| Error::format(&tpl_path, "not UTF-8"))?),
        None => tokenizer_config
            .as_ref()
            .and_then(template_from_tokenizer_config),
    };
    let source = SafetensorsSource::open_dir(dir)?;
    Ok(Checkpoint {
        origin: dir.display().to_string(),
        config,
        generation_config,
        tokenizer_config,
        tokenizer_json,
        tokenizer_model,
        chat_template,
        rope_freq_factors: None,
        source: Box::new(source),
    })
}

/// `chat_template` of a `tokenizer_config.json`: a string, or a list of `{name, template}`
/// (the one named `default`, else the first).
fn template_from_tokenizer_config(tc: &Value) -> Option<String> {
    match tc.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())?;
            pick.get("template")?.as_str().map(str::to_string)
        }
        _ => None,
    }
}

/// Supported `architectures[0]` values.
pub const ARCHITECTURES: [&str; 5] = [
    "Llama4ForCausalLM",
    "Llama4ForConditionalGeneration",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
];

/// The architecture string of a config (`architectures[0]`, else derived from `model_type`).
pub fn architecture(v: &Value) -> Result<String> {
    if let Some(a) = v.get("architectures").and_then(|a| a.as_array()) {
        return match a.first().and_then(|s| s.as_str()) {
            Some(s) => Ok(s.to_string()),
            None => Err(Error::config(
                "architectures",
                "empty or not a list of strings",
            )),
        };
    }
    match v.get("model_type").and_then(|m| m.as_str()) {
        Some("llama") => Ok("LlamaForCausalLM".into()),
        Some("llama4_text") => Ok("Llama4ForCausalLM".into()),
        Some("llama4") => Ok("Llama4ForConditionalGeneration".into()),
        Some("mistral") => Ok("MistralForCausalLM".into()),
        Some("mixtral") => Ok("MixtralForCausalLM".into()),
        _ => Err(Error::config(
            "architectures",
            "missing, and `model_type` is not llama/llama4/llama4_text/mistral/mixtral",
        )),
    }
}

/// Typed access to the text config (`text_config` of a multimodal config, else the top level).
struct Fields<'a> {
    text: &'a Value,
    top: &'a Value,
}

impl<'a> Fields<'a> {
    /// The value of `k`; `None` when absent or null.
    fn get(&self, k: &str) -> Option<&'a Value> {
        self.text.get(k).filter(|v| !v.is_null())
    }
    fn has_key(&self, k: &str) -> bool {
        self.text.get(k).is_some()
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|x| usize::try_from(x).ok())
                .map(Some)
                .ok_or_else(|| Error::config(k, format!("{v} is not a non-negative integer"))),
        }
    }
    fn usize_req(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?
            .ok_or_else(|| Error::config(k, "missing from config.json"))
    }
    fn usize_or(&self, k: &str, d: usize) -> Result<usize> {
        Ok(self.usize_opt(k)?.unwrap_or(d))
    }
    fn f32_opt_in(v: Option<&Value>, k: &str) -> Result<Option<f32>> {
        match v {
            None => Ok(None),
            Some(x) => match x.as_f64() {
                // the runtime computes in f32 (as transformers does for these buffers): a value
                // beyond its range would become infinity and could not be stored in the model
                Some(f) if f.is_finite() && f.abs() > f32::MAX as f64 => Err(Error::config(
                    k,
                    format!(
                        "{x} exceeds the largest f32 ({:e}); ferroq computes in f32, where it \
                         would be infinite (no real model uses such a value)",
                        f32::MAX
                    ),
                )),
                Some(f) if f.is_finite() => Ok(Some(f as f32)),
                _ => Err(Error::config(k, format!("{x} is not a finite number"))),
            },
        }
    }
    fn f32_or(&self, k: &str, d: f32) -> Result<f32> {
        Ok(Self::f32_opt_in(self.get(k), k)?.unwrap_or(d))
    }
    /// A boolean; numbers count as truthy when non-zero (old Hub configs hold
    /// `attn_temperature_tuning: 4`).
    fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(d),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::Number(n)) => Ok(n.as_f64().is_some_and(|f| f != 0.0)),
            Some(v) => Err(Error::config(k, format!("{v} is not a boolean"))),
        }
    }
    /// A list of integers of length `n`, or `None` when absent, null or empty.
    fn int_list(&self, k: &str, n: Option<usize>) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let a = v.as_array().ok_or_else(|| Error::config(k, "not a list"))?;
        if a.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(a.len());
        for x in a {
            let i = match x {
                Value::Bool(b) => *b as usize,
                _ => x
                    .as_u64()
                    .and_then(|x| usize::try_from(x).ok())
                    .ok_or_else(|| Error::config(k, format!("entry {x} is not an integer")))?,
            };
            out.push(i);
        }
        if let Some(n) = n {
            if out.len() != n {
                return Err(Error::config(
                    k,
                    format!("{} entries, num_hidden_layers = {n}", out.len()),
                ));
            }
        }
        Ok(Some(out))
    }
}

/// `rope_theta` and llama3 scaling from `rope_theta` / `rope_parameters` / `rope_scaling`.
fn rope(f: &Fields, default_theta: f32) -> Result<(f32, Option<Llama3Scaling>)> {
    let params = f
        .get("rope_parameters")
        .filter(|p| p.is_object())
        .or_else(|| f.get("rope_scaling").filter(|p| p.is_object()));
    for k in ["rope_parameters", "rope_scaling"] {
        if let Some(v) = f.get(k) {
            if !v.is_object() {
                return Err(Error::config(k, format!("{v} is not an object or null")));
            }
        }
    }
    let theta = match Fields::f32_opt_in(f.get("rope_theta"), "rope_theta")? {
        Some(t) => t,
        None => Fields::f32_opt_in(
            params
                .and_then(|p| p.get("rope_theta"))
                .filter(|v| !v.is_null()),
            "rope_parameters.rope_theta",
        )?
        .unwrap_or(default_theta),
    };
    let Some(p) = params else {
        return Ok((theta, None));
    };
    let ty = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    match ty {
        "default" => Ok((theta, None)),
        "llama3" => {
            let num = |k: &str| -> Result<f32> {
                let name = format!("rope_parameters.{k}");
                Fields::f32_opt_in(p.get(k).filter(|v| !v.is_null()), &name)?
                    .ok_or_else(|| Error::config(name, "missing for rope_type llama3"))
            };
            let s = Llama3Scaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            };
            if !(s.factor > 0.0
                && s.low_freq_factor > 0.0
                && s.high_freq_factor >= s.low_freq_factor
                && s.original_max_position_embeddings > 0.0)
            {
                return Err(Error::config(
                    "rope_parameters",
                    format!("llama3 scaling {s:?} is out of range (need factor > 0, high_freq_factor >= low_freq_factor > 0)"),
                ));
            }
            Ok((theta, Some(s)))
        }
        other => Err(Error::config(
            "rope_parameters.rope_type",
            format!("`{other}` is not supported (default and llama3 are)"),
        )),
    }
}

/// Normalize a Hugging Face `config.json` into a [`ModelConfig`], reading every field that
/// affects the forward pass.
pub fn model_config_from_hf(v: &Value) -> Result<ModelConfig> {
    if !v.is_object() {
        return Err(Error::config("config.json", "not a JSON object"));
    }
    let arch_name = architecture(v)?;
    let arch = match arch_name.as_str() {
        "LlamaForCausalLM" | "MistralForCausalLM" => Arch::Llama,
        "MixtralForCausalLM" => Arch::Mixtral,
        "Llama4ForCausalLM" | "Llama4ForConditionalGeneration" => Arch::Llama4,
        other => {
            return Err(Error::config(
                "architectures",
                format!(
                    "unknown architecture `{other}` (supported: {})",
                    ARCHITECTURES.join(", ")
                ),
            ))
        }
    };
    let text = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
    let f = Fields { text, top: v };

    if let Some(act) = f.get("hidden_act") {
        if act.as_str() != Some("silu") {
            return Err(Error::config(
                "hidden_act",
                format!("{act} is not supported (silu is)"),
            ));
        }
    }
    for k in ["attention_bias", "mlp_bias"] {
        if f.bool_or(k, false)? {
            return Err(Error::config(k, "biases are not supported"));
        }
    }

    let vocab_size = f.usize_req("vocab_size")?;
    let hidden_size = f.usize_req("hidden_size")?;
    let num_layers = f.usize_req("num_hidden_layers")?;
    // checked before the per-layer lists are built from it (2^31 layers would allocate
    // gigabytes before `validate` ran)
    if num_layers == 0 || num_layers > ferroq::internals::model::config::MAX_LAYERS {
        return Err(Error::config(
            "num_hidden_layers",
            format!(
                "{num_layers} is out of range (1..={})",
                ferroq::internals::model::config::MAX_LAYERS
            ),
        ));
    }
    let num_heads = f.usize_req("num_attention_heads")?;
    if num_heads == 0 {
        return Err(Error::config("num_attention_heads", "must be > 0"));
    }
    let num_kv_heads = f.usize_or("num_key_value_heads", num_heads)?;
    let head_dim = f.usize_or("head_dim", hidden_size / num_heads)?;
    // tie_word_embeddings may sit at the top of a multimodal config
    let tie = match f.get("tie_word_embeddings") {
        Some(_) => f.bool_or("tie_word_embeddings", false)?,
        None => Fields {
            text: f.top,
            top: f.top,
        }
        .bool_or("tie_word_embeddings", false)?,
    };

    let cfg = match arch {
        Arch::Llama | Arch::Mixtral => {
            // Mixtral: the same layer with a sparse MoE block of `intermediate_size` experts
            let moe = arch == Arch::Mixtral;
            let (rope_theta, rope_scaling) = rope(&f, if moe { 1e6 } else { 10000.0 })?;
            let width = f.usize_req("intermediate_size")?;
            // Mistral / Mixtral: a sliding window shorter than the context limits the context
            // to the window (within it, attention is exactly causal)
            let ctx = f.usize_or("max_position_embeddings", 2048)?;
            let ctx = match f.usize_opt("sliding_window")? {
                Some(w) if w > 0 && w < ctx => w,
                _ => ctx,
            };
            ModelConfig {
                rope_freq_bf16: false,
                rope_freq_factors: None,
                arch,
                vocab_size,
                hidden_size,
                num_layers,
                num_heads,
                num_kv_heads,
                head_dim,
                intermediate_size: if moe { 0 } else { width },
                moe_intermediate_size: if moe { width } else { 0 },
                num_experts: if moe {
                    f.usize_or("num_local_experts", 8)?
                } else {
                    0
                },
                num_experts_per_tok: if moe {
                    f.usize_or("num_experts_per_tok", 2)?
                } else {
                    0
                },
                shared_expert: false,
                router: if moe {
                    Router::SoftmaxTopK { renormalize: true }
                } else {
                    Router::default()
                },
                rms_norm_eps: f.f32_or("rms_norm_eps", if moe { 1e-5 } else { 1e-6 })?,
                rope_theta,
                rope_scaling,
                rope_style: RopeStyle::Half,
                attention_chunk_size: None,
                floor_scale: 8192.0,
                attn_scale: 0.1,
                tie_word_embeddings: tie,
                max_position_embeddings: ctx,
                layers: vec![
                    LayerSpec {
                        rope: true,
                        qk_norm: false,
                        chunked: false,
                        temp_tune: false,
                        moe,
                    };
                    num_layers
                ],
            }
        }
        Arch::Llama4 => {
            let (rope_theta, rope_scaling) = rope(&f, 500000.0)?;
            let l = num_layers;
            // no_rope_layers: 1 = this layer USES RoPE; empty/absent → every interval-th is NoPE
            let use_rope: Vec<bool> = match f.int_list("no_rope_layers", Some(l))? {
                Some(list) => {
                    if let Some(x) = list.iter().find(|&&x| x > 1) {
                        return Err(Error::config(
                            "no_rope_layers",
                            format!("entry {x} is not 0 or 1"),
                        ));
                    }
                    list.iter().map(|&x| x == 1).collect()
                }
                None => {
                    let interval = f.usize_or("no_rope_layer_interval", 4)?;
                    if interval == 0 {
                        return Err(Error::config("no_rope_layer_interval", "must be > 0"));
                    }
                    (0..l).map(|i| (i + 1) % interval != 0).collect()
                }
            };
            // moe_layers overrides interleave_moe_layer_step
            let moe: Vec<bool> = match f.int_list("moe_layers", None)? {
                Some(list) => {
                    if let Some(x) = list.iter().find(|&&x| x >= l) {
                        return Err(Error::config(
                            "moe_layers",
                            format!("layer {x} >= num_hidden_layers {l}"),
                        ));
                    }
                    (0..l).map(|i| list.contains(&i)).collect()
                }
                None if f.get("moe_layers").is_some() => {
                    // an explicit empty list: no MoE layers
                    vec![false; l]
                }
                None => {
                    let step = f.usize_or("interleave_moe_layer_step", 1)?;
                    if step == 0 {
                        return Err(Error::config("interleave_moe_layer_step", "must be > 0"));
                    }
                    (0..l)
                        .map(|i| i + 1 >= step && (i + 1 - step) % step == 0)
                        .collect()
                }
            };
            let chunk = if f.has_key("attention_chunk_size") {
                f.usize_opt("attention_chunk_size")?
            } else {
                Some(8192)
            };
            let chunked: Vec<bool> = match f.get("layer_types") {
                Some(lt) => {
                    let a = lt
                        .as_array()
                        .ok_or_else(|| Error::config("layer_types", "not a list"))?;
                    if a.len() != l {
                        return Err(Error::config(
                            "layer_types",
                            format!("{} entries, num_hidden_layers = {l}", a.len()),
                        ));
                    }
                    a.iter()
                        .map(|t| match t.as_str() {
                            Some("chunked_attention") => Ok(true),
                            Some("full_attention") => Ok(false),
                            _ => Err(Error::config(
                                "layer_types",
                                format!("{t} is not chunked_attention or full_attention"),
                            )),
                        })
                        .collect::<Result<_>>()?
                }
                None => use_rope.iter().map(|&r| r && chunk.is_some()).collect(),
            };
            let qk = f.bool_or("use_qk_norm", true)?;
            let tt = f.bool_or("attn_temperature_tuning", true)?;
            let layers = (0..l)
                .map(|i| LayerSpec {
                    rope: use_rope[i],
                    qk_norm: qk && use_rope[i],
                    chunked: chunked[i],
                    temp_tune: tt && !use_rope[i],
                    moe: moe[i],
                })
                .collect();
            ModelConfig {
                rope_freq_bf16: false,
                rope_freq_factors: None,
                arch,
                vocab_size,
                hidden_size,
                num_layers,
                num_heads,
                num_kv_heads,
                head_dim,
                intermediate_size: f.usize_or("intermediate_size_mlp", 16384)?,
                moe_intermediate_size: f.usize_or("intermediate_size", 8192)?,
                num_experts: f.usize_or("num_local_experts", 16)?,
                num_experts_per_tok: f.usize_or("num_experts_per_tok", 1)?,
                shared_expert: true,
                router: Router::SigmoidInput,
                rms_norm_eps: f.f32_or("rms_norm_eps", 1e-5)?,
                rope_theta,
                rope_scaling,
                rope_style: RopeStyle::Interleaved,
                attention_chunk_size: chunk,
                floor_scale: f.f32_or("floor_scale", 8192.0)?,
                attn_scale: f.f32_or("attn_scale", 0.1)?,
                tie_word_embeddings: tie,
                max_position_embeddings: f.usize_or("max_position_embeddings", 131072)?,
                layers,
            }
        }
    };
    cfg.validate()?;
    Ok(cfg)
}
