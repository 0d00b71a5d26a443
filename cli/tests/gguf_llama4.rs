//! Llama 4 GGUF import (`convert/src/gguf_llama4.rs`): GGUF files built here, in Rust, from the tiny
//! transformers fixtures (`tests/fixtures/models/llama4-{scout,maverick}-tiny`) with mainline
//! llama.cpp's names, shapes and metadata keys (`convert_hf_to_gguf.py` `Llama4Model`,
//! `gguf-py` `MODEL_ARCH.LLAMA4`), converted to f32 `.fqm` and run: logits against
//! transformers' at the parity tests' tolerance, and against the same fixture converted from
//! Hugging Face safetensors. Also the Llama 4 tokenizer from `tokenizer.ggml.*`, the values
//! llama.cpp hardcodes, and broken files.

mod support;

use std::collections::BTreeMap;

use ferroq::internals::model::{Logits, Model, State};
use ferroq_convert::convert::{convert, ConvertOptions, Quant};
use ferroq_convert::gguf::{self, GgufFile};
use ferroq_convert::source::Checkpoint;
use serde_json::Value;
use support::{fixture, read_gz, read_safetensors, trim_tokenizer, GgufWriter, Meta, StTensor};

/// cli/tests/parity.rs: unquantized paths reproduce transformers' logits to this.
const MAX_ABS_LOGIT_DIFF: f32 = 1e-3;
/// cli/tests/parity.rs: mean per-position cosine of q8 logits.
const MIN_COSINE_Q8: f64 = 0.99;

// ggml type ids
const Q8_0: u32 = 8;
const Q8_1: u32 = 9;
const BF16: u32 = 30;

struct Fixture {
    name: &'static str,
    cfg: Value,
    t: BTreeMap<String, StTensor>,
}

fn load(name: &'static str) -> Fixture {
    let dir = fixture("models").join(name);
    let cfg = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let (t, _) = read_safetensors(&std::fs::read(dir.join("model.safetensors")).unwrap());
    Fixture { name, cfg, t }
}

fn u16s(t: &StTensor) -> Vec<u16> {
    assert_eq!(t.dtype, "BF16");
    t.data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect()
}

fn bytes16(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// ggml's `quantize_row_q8_0_ref`: per 32 values d = max|x| / 127, q = round(x / d).
fn q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
        out.extend(b.iter().map(|v| ((v * id).round() as i8) as u8));
    }
    out
}

/// The GGUF token list of a Hugging Face `tokenizer.json`, as mainline's
/// `TextModel.get_vocab_base` builds it: ids `0..n`, `[PAD{i}]` (UNUSED) for holes, added
/// tokens CONTROL when special else USER_DEFINED, the rest NORMAL; merges as "a b".
fn gguf_vocab(tj: &Value, n: usize) -> (Vec<String>, Vec<i32>, Vec<String>) {
    let mut toks: Vec<Option<String>> = vec![None; n];
    let mut types = vec![5i32; n];
    for (t, id) in tj["model"]["vocab"].as_object().unwrap() {
        let i = id.as_u64().unwrap() as usize;
        if i < n {
            toks[i] = Some(t.clone());
            types[i] = 1;
        }
    }
    for a in tj["added_tokens"].as_array().unwrap() {
        let i = a["id"].as_u64().unwrap() as usize;
        if i < n {
            toks[i] = Some(a["content"].as_str().unwrap().to_string());
            types[i] = if a["special"].as_bool().unwrap() {
                3
            } else {
                4
            };
        }
    }
    let toks = toks
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| match m {
            Value::String(s) => s.clone(),
            a => format!("{} {}", a[0].as_str().unwrap(), a[1].as_str().unwrap()),
        })
        .collect();
    (toks, types, merges)
}

fn llama4_tokenizer_json() -> Vec<u8> {
    read_gz("tokenizers/llama4/tokenizer.json.gz")
}

fn llama4_chat_template() -> String {
    let p = fixture("tokenizers/llama4/tokenizer_config.json");
    let v: Value = serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap();
    v["chat_template"].as_str().unwrap().to_string()
}

#[derive(Clone, Copy)]
struct Opts {
    /// Routed experts as Q8_0 (as `llama-quantize ... Q8_0` writes them) instead of bf16.
    experts_q8: bool,
    /// Write the keys (read by Ollama's Llama 4 runtime) that say what llama.cpp hardcodes,
    /// with the fixture's values: its chunk (8), floor scale (4) and qk norm differ from
    /// the real models' (8192, 8192, by expert count).
    fixture_keys: bool,
}

/// A llama4 GGUF of fixture `fx`, laid out as mainline llama.cpp writes one.
fn build(fx: &Fixture, o: Opts) -> GgufWriter {
    let c = &fx.cfg;
    let u = |k: &str| c[k].as_u64().unwrap() as u32;
    let (h, layers) = (u("hidden_size") as u64, u("num_hidden_layers") as usize);
    let (n_head, n_kv, hd) = (
        u("num_attention_heads"),
        u("num_key_value_heads"),
        u("head_dim"),
    );
    let (ffe, ffn, e) = (
        u("intermediate_size") as u64,
        u("intermediate_size_mlp"),
        u("num_local_experts") as u64,
    );
    let vocab = u("vocab_size") as usize;
    let rope = &c["rope_parameters"];
    let theta = rope["rope_theta"].as_f64().unwrap() as f32;
    let mut w = GgufWriter::new(3);
    // TextModel.set_gguf_parameters + LlamaModel + Llama4Model.set_gguf_parameters
    w.kv("general.architecture", Meta::s("llama4"))
        .kv("general.file_type", Meta::U32(32)) // MOSTLY_BF16
        .kv("llama4.vocab_size", Meta::U32(vocab as u32))
        .kv("llama4.block_count", Meta::U32(layers as u32))
        .kv(
            "llama4.context_length",
            Meta::U32(u("max_position_embeddings")),
        )
        .kv("llama4.embedding_length", Meta::U32(h as u32))
        .kv("llama4.feed_forward_length", Meta::U32(ffn))
        .kv("llama4.attention.head_count", Meta::U32(n_head))
        .kv("llama4.attention.head_count_kv", Meta::U32(n_kv))
        .kv("llama4.rope.freq_base", Meta::F32(theta))
        .kv(
            "llama4.attention.layer_norm_rms_epsilon",
            Meta::F32(c["rms_norm_eps"].as_f64().unwrap() as f32),
        )
        .kv("llama4.expert_count", Meta::U32(e as u32))
        .kv(
            "llama4.expert_used_count",
            Meta::U32(u("num_experts_per_tok")),
        )
        .kv("llama4.attention.key_length", Meta::U32(hd))
        .kv("llama4.attention.value_length", Meta::U32(hd))
        .kv("llama4.rope.dimension_count", Meta::U32(hd))
        .kv(
            "llama4.interleave_moe_layer_step",
            Meta::U32(u("interleave_moe_layer_step")),
        )
        .kv("llama4.expert_feed_forward_length", Meta::U32(ffe as u32));
    if o.fixture_keys {
        w.kv(
            "llama4.attention.chunk_size",
            Meta::U32(u("attention_chunk_size")),
        )
        .kv(
            "llama4.attention.floor_scale",
            Meta::F32(c["floor_scale"].as_f64().unwrap() as f32),
        )
        .kv(
            "llama4.use_qk_norm",
            Meta::Bool(c["use_qk_norm"].as_bool().unwrap()),
        );
    }
    // _set_vocab_gpt2 (the fixture has no tokenizer: the Llama 4 one cut to its 512 ids)
    let tj: Value =
        serde_json::from_slice(&trim_tokenizer(&llama4_tokenizer_json(), vocab as u64)).unwrap();
    let (toks, types, merges) = gguf_vocab(&tj, vocab);
    w.kv("tokenizer.ggml.model", Meta::s("gpt2"))
        .kv("tokenizer.ggml.pre", Meta::s("llama4"))
        .kv("tokenizer.ggml.tokens", Meta::ArrStr(toks))
        .kv("tokenizer.ggml.token_type", Meta::ArrI32(types))
        .kv("tokenizer.ggml.merges", Meta::ArrStr(merges))
        .kv("tokenizer.ggml.bos_token_id", Meta::U32(u("bos_token_id")))
        .kv("tokenizer.ggml.eos_token_id", Meta::U32(u("eos_token_id")))
        .kv(
            "tokenizer.ggml.padding_token_id",
            Meta::U32(u("pad_token_id")),
        )
        .kv("tokenizer.ggml.add_bos_token", Meta::Bool(true))
        .kv("tokenizer.chat_template", Meta::Str(llama4_chat_template()));

    let t = |n: &str| &fx.t[n];
    let f32s = |n: &str| t(n).f32();
    // 2-D `nn.Linear` [out, in] → ggml dims [in, out], bf16 bits unchanged
    let lin = |w: &mut GgufWriter, g: &str, n: &str| {
        let s = &t(n).shape;
        w.tensor(g, &[s[1] as u64, s[0] as u64], BF16, t(n).data.clone());
    };
    // LlamaModel.generate_extra_tensors: llama3 scaling as per-frequency divisors (f32)
    if rope["rope_type"] == "llama3" {
        let f = |k: &str| rope[k].as_f64().unwrap() as f32;
        let (factor, low, high) = (f("factor"), f("low_freq_factor"), f("high_freq_factor"));
        // (mainline reads original_max_position_embeddings from the top level of the config,
        // default 8192; transformers 5 keeps it in rope_parameters, which the model uses)
        let old = f("original_max_position_embeddings");
        let (low_wl, high_wl) = (old / low, old / high);
        let mut factors = Vec::new();
        for j in 0..hd / 2 {
            let freq = 1.0 / theta.powf((2 * j) as f32 / hd as f32);
            let wl = 2.0 * std::f32::consts::PI / freq;
            factors.push(if wl < high_wl {
                1.0
            } else if wl > low_wl {
                factor
            } else {
                let s = (old / wl - low) / (high - low);
                1.0 / ((1.0 - s) / factor + s)
            });
        }
        w.tensor_f32("rope_freqs.weight", &[hd as u64 / 2], &factors);
    }
    lin(&mut w, "token_embd.weight", "model.embed_tokens.weight");
    w.tensor_f32("output_norm.weight", &[h], &f32s("model.norm.weight"));
    lin(&mut w, "output.weight", "lm_head.weight");
    let moe_layers: Vec<u64> = c["moe_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    for l in 0..layers {
        let p = format!("model.layers.{l}.");
        let b = format!("blk.{l}.");
        let norm = |w: &mut GgufWriter, g: &str, n: &str| {
            w.tensor_f32(&format!("{b}{g}"), &[h], &f32s(&format!("{p}{n}")));
        };
        norm(&mut w, "attn_norm.weight", "input_layernorm.weight");
        for (g, n) in [("q", "q"), ("k", "k"), ("v", "v"), ("output", "o")] {
            // Llama4Model.undo_permute = False: q/k as in the Hugging Face checkpoint
            lin(
                &mut w,
                &format!("{b}attn_{g}.weight"),
                &format!("{p}self_attn.{n}_proj.weight"),
            );
        }
        norm(&mut w, "ffn_norm.weight", "post_attention_layernorm.weight");
        let f = format!("{p}feed_forward.");
        if moe_layers.contains(&(l as u64)) {
            // router kept in f32 (TextModel.prepare_tensors: FFN_GATE_INP stays F32)
            w.tensor_f32(
                &format!("{b}ffn_gate_inp.weight"),
                &[h, e],
                &f32s(&format!("{f}router.weight")),
            );
            // experts.gate_up_proj [E, H, 2I]: gate = [..., :I], up = [..., I:], each
            // transposed to [E, I, H] (ggml dims [H, I, E]); down_proj [E, I, H] → [E, H, I]
            let gu = u16s(t(&format!("{f}experts.gate_up_proj")));
            let dn = u16s(t(&format!("{f}experts.down_proj")));
            let (hh, ii, ee) = (h as usize, ffe as usize, e as usize);
            let mut gate = vec![0u16; ee * ii * hh];
            let mut up = vec![0u16; ee * ii * hh];
            let mut down = vec![0u16; ee * hh * ii];
            for x in 0..ee {
                for r in 0..ii {
                    for col in 0..hh {
                        gate[(x * ii + r) * hh + col] = gu[(x * hh + col) * 2 * ii + r];
                        up[(x * ii + r) * hh + col] = gu[(x * hh + col) * 2 * ii + ii + r];
                    }
                }
                for r in 0..hh {
                    for col in 0..ii {
                        down[(x * hh + r) * ii + col] = dn[(x * ii + col) * hh + r];
                    }
                }
            }
            for (g, v, dims) in [
                ("gate", gate, [h, ffe, e]),
                ("up", up, [h, ffe, e]),
                ("down", down, [ffe, h, e]),
            ] {
                let name = format!("{b}ffn_{g}_exps.weight");
                if o.experts_q8 {
                    let x: Vec<f32> = v
                        .iter()
                        .map(|&b| f32::from_bits((b as u32) << 16))
                        .collect();
                    w.tensor(&name, &dims, Q8_0, q8_0(&x));
                } else {
                    w.tensor(&name, &dims, BF16, bytes16(&v));
                }
            }
            for g in ["gate", "up", "down"] {
                lin(
                    &mut w,
                    &format!("{b}ffn_{g}_shexp.weight"),
                    &format!("{f}shared_expert.{g}_proj.weight"),
                );
            }
        } else {
            for g in ["gate", "up", "down"] {
                lin(
                    &mut w,
                    &format!("{b}ffn_{g}.weight"),
                    &format!("{f}{g}_proj.weight"),
                );
            }
        }
    }
    w
}

fn open(w: &GgufWriter) -> ferroq::Result<Checkpoint> {
    gguf::checkpoint(GgufFile::from_bytes("tiny-llama4.gguf", w.build())?)
}

fn tmp(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroq-gguf4-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(tag)
}

/// Convert to f32 `.fqm` in-process and open it.
fn to_model(ck: &Checkpoint, tag: &str) -> Model {
    let out = tmp(&format!("{tag}.fqm"));
    let opts = ConvertOptions {
        quant: Quant::F32,
        ..ConvertOptions::default()
    };
    convert(ck, &out, &opts, &|_| {}).unwrap_or_else(|e| panic!("{tag}: convert: {e}"));
    let m = Model::open(&out).unwrap();
    std::fs::remove_file(&out).ok();
    m
}

struct Expected {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

fn expected(name: &str) -> Expected {
    let p = fixture("models").join(name).join("expected.safetensors");
    let (e, _) = read_safetensors(&std::fs::read(p).unwrap());
    Expected {
        ids: e["input_ids"].i64().iter().map(|&v| v as u32).collect(),
        logits: e["logits"].f32(),
    }
}

fn prefill(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = State::new(m, ids.len(), ids.len(), true);
    m.forward(&mut st, ids, Logits::All).unwrap();
    st.logits().to_vec()
}

fn decode(m: &Model, ids: &[u32]) -> Vec<f32> {
    let mut st = State::new(m, ids.len(), 1, false);
    let mut out = Vec::new();
    for &id in ids {
        m.forward(&mut st, &[id], Logits::Last).unwrap();
        out.extend_from_slice(st.logits());
    }
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn mean_cosine(a: &[f32], b: &[f32], v: usize) -> f64 {
    let rows = a.len() / v;
    let mut s = 0.0;
    for r in 0..rows {
        let (x, y) = (&a[r * v..(r + 1) * v], &b[r * v..(r + 1) * v]);
        let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
        let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
        s += dot / (nx * ny);
    }
    s / rows as f64
}

/// The GGUF of `name` converted to f32 reproduces transformers' logits (prefill and decode)
/// and the Hugging Face conversion's; returns (GGUF vs transformers, GGUF vs HF) max |Δ|.
fn parity(name: &'static str) -> (f32, f32) {
    let fx = load(name);
    let ck = open(&build(
        &fx,
        Opts {
            experts_q8: false,
            fixture_keys: true,
        },
    ))
    .unwrap();
    let hf_ck = ferroq_convert::hf::open_hf_dir(fixture("models").join(name)).unwrap();
    let (cfg_g, cfg_h) = (
        ferroq_convert::convert::checkpoint_config(&ck).unwrap(),
        ferroq_convert::convert::checkpoint_config(&hf_ck).unwrap(),
    );
    // the same per-layer switches and sizes as transformers' config says
    assert_eq!(cfg_g.layers, cfg_h.layers, "{name}: LayerSpecs");
    assert_eq!(cfg_g.attention_chunk_size, cfg_h.attention_chunk_size);
    assert_eq!(cfg_g.floor_scale, cfg_h.floor_scale);
    assert_eq!(cfg_g.attn_scale, cfg_h.attn_scale);
    assert_eq!(cfg_g.rope_theta, cfg_h.rope_theta);
    assert_eq!(
        (cfg_g.intermediate_size, cfg_g.moe_intermediate_size),
        (cfg_h.intermediate_size, cfg_h.moe_intermediate_size)
    );
    assert_eq!(
        (cfg_g.num_experts, cfg_g.num_experts_per_tok),
        (cfg_h.num_experts, cfg_h.num_experts_per_tok)
    );
    assert_eq!(cfg_g.tie_word_embeddings, cfg_h.tie_word_embeddings);
    assert!(cfg_g.rope_scaling.is_none());
    assert_eq!(
        cfg_g.rope_freq_factors.is_some(),
        cfg_h.rope_scaling.is_some(),
        "{name}: rope_freqs.weight iff llama3 scaling"
    );
    assert_eq!(ck.chat_template.as_deref(), Some(&*llama4_chat_template()));

    let e = expected(name);
    let g = to_model(&ck, &format!("{name}-gguf"));
    let hm = to_model(&hf_ck, &format!("{name}-hf"));
    let lg = prefill(&g, &e.ids);
    let d_tf = max_abs_diff(&lg, &e.logits);
    let d_dec = max_abs_diff(&decode(&g, &e.ids), &e.logits);
    let d_hf = max_abs_diff(&lg, &prefill(&hm, &e.ids));
    eprintln!(
        "{name}: GGUF f32 vs transformers max|Δ| prefill {d_tf:.3e} decode {d_dec:.3e}; \
         GGUF vs HF-converted max|Δ| {d_hf:.3e}"
    );
    assert!(d_tf <= MAX_ABS_LOGIT_DIFF, "{name}: prefill max|Δ| {d_tf}");
    assert!(d_dec <= MAX_ABS_LOGIT_DIFF, "{name}: decode max|Δ| {d_dec}");
    (d_tf, d_hf)
}

/// Every layer MoE, qk norm, llama3 RoPE scaling (as `rope_freqs.weight`), chunked attention
/// on layers 0-2 and a NoPE layer with temperature tuning (layer 3).
#[test]
fn scout_tiny_gguf_parity() {
    let (_, d_hf) = parity("llama4-scout-tiny");
    // the llama3 factors are divisors here (llama.cpp), a blend in transformers' formula; for
    // this fixture they give the same frequencies to the bit (measured), so the same logits
    assert_eq!(
        d_hf, 0.0,
        "GGUF vs HF-converted logits must be bit-identical"
    );
}

/// Dense and MoE layers interleaved (`interleave_moe_layer_step` 2, 8 experts), no qk norm,
/// default RoPE: the GGUF and the safetensors conversions compute the same bits.
#[test]
fn maverick_tiny_gguf_parity() {
    let (_, d_hf) = parity("llama4-maverick-tiny");
    assert_eq!(
        d_hf, 0.0,
        "GGUF vs HF-converted logits must be bit-identical"
    );
}

/// Routed experts stored as Q8_0 (`llama-quantize`): each expert is dequantized from its own
/// slice of the stacked tensor exactly as ggml does, and the model stays close to transformers.
#[test]
fn scout_tiny_q8_0_experts() {
    let fx = load("llama4-scout-tiny");
    let w = build(
        &fx,
        Opts {
            experts_q8: true,
            fixture_keys: true,
        },
    );
    let ck = open(&w).unwrap();
    let src = &ck.source;
    let (h, i, n_e) = (64usize, 32usize, 4usize);
    let t = src
        .find("model.layers.2.feed_forward.experts.3.down_proj.weight")
        .unwrap();
    assert_eq!(t.shape, [h, i]);
    assert_eq!(t.dtype, "q8_0");
    // reference: the whole stacked tensor dequantized by the reader, then sliced
    let f = GgufFile::from_bytes("x.gguf", w.build()).unwrap();
    for (g, p, per) in [
        ("gate", "gate", i * h),
        ("up", "up", i * h),
        ("down", "down", h * i),
    ] {
        let mut all = Vec::new();
        f.read_f32(&format!("blk.2.ffn_{g}_exps.weight"), &mut all)
            .unwrap();
        assert_eq!(all.len(), n_e * per);
        for e in 0..n_e {
            let mut one = Vec::new();
            src.read_f32(
                &format!("model.layers.2.feed_forward.experts.{e}.{p}_proj.weight"),
                &mut one,
            )
            .unwrap();
            assert_eq!(one, all[e * per..(e + 1) * per], "{g} expert {e}");
        }
    }
    let e = expected(fx.name);
    let m = to_model(&ck, "scout-q8_0");
    let lg = prefill(&m, &e.ids);
    let cos = mean_cosine(&lg, &e.logits, m.config.vocab_size);
    let d = max_abs_diff(&lg, &e.logits);
    eprintln!("scout-tiny Q8_0 experts: mean cosine {cos:.6}, max|Δ| {d:.3e} vs transformers");
    assert!(cos >= MIN_COSINE_Q8, "mean cosine {cos}");
}

/// Without the optional keys, the values llama.cpp hardcodes for llama4: chunk 8192 on three
/// of four layers, NoPE every fourth, floor scale 8192, scale 0.1, qk norm unless 128 experts;
/// `attention.sliding_window = 0` turns chunking off and RoPE on everywhere.
#[test]
fn llama_cpp_defaults() {
    let fx = load("llama4-maverick-tiny");
    let mut w = build(
        &fx,
        Opts {
            experts_q8: false,
            fixture_keys: false,
        },
    );
    let ck = open(&w).unwrap();
    let c = ferroq_convert::convert::checkpoint_config(&ck).unwrap();
    assert_eq!(c.attention_chunk_size, Some(8192));
    assert_eq!((c.floor_scale, c.attn_scale), (8192.0, 0.1));
    let rope: Vec<bool> = c.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rope, [true, true, true, false]);
    let chunked: Vec<bool> = c.layers.iter().map(|l| l.chunked).collect();
    assert_eq!(chunked, [true, true, true, false]);
    let moe: Vec<bool> = c.layers.iter().map(|l| l.moe).collect();
    assert_eq!(moe, [false, true, false, true]);
    // 8 experts: llama.cpp's use_kq_norm = type != LLM_TYPE_17B_128E
    let qk: Vec<bool> = c.layers.iter().map(|l| l.qk_norm).collect();
    assert_eq!(qk, [true, true, true, false]);
    let tt: Vec<bool> = c.layers.iter().map(|l| l.temp_tune).collect();
    assert_eq!(tt, [false, false, false, true]);
    assert_eq!(c.rope_freq_factors, None);
    assert_eq!(ck.config["bos_token_id"], 1);
    assert_eq!(ck.generation_config.as_ref().unwrap()["eos_token_id"], 2);

    w.kv("llama4.attention.sliding_window", Meta::U32(0));
    let c = ferroq_convert::convert::checkpoint_config(&open(&w).unwrap()).unwrap();
    assert_eq!(c.attention_chunk_size, None);
    assert!(c
        .layers
        .iter()
        .all(|l| l.rope && !l.chunked && !l.temp_tune));
}

fn must_fail(w: &GgufWriter, what: &str) -> String {
    match open(w) {
        Ok(_) => panic!("{what}: accepted"),
        Err(e) => e.to_string(),
    }
}

/// Broken files fail with an error naming the key or tensor.
#[test]
fn broken_files_name_what_is_wrong() {
    let fx = load("llama4-maverick-tiny");
    let good = build(
        &fx,
        Opts {
            experts_q8: false,
            fixture_keys: true,
        },
    );
    assert!(open(&good).is_ok());

    for key in [
        "llama4.interleave_moe_layer_step",
        "llama4.expert_feed_forward_length",
        "llama4.embedding_length",
        "llama4.attention.layer_norm_rms_epsilon",
    ] {
        let mut w = good.clone();
        w.kv.retain(|(k, _)| k != key);
        let e = must_fail(&w, key);
        assert!(e.contains(key) && e.contains("missing"), "{key}: {e}");
    }
    for tensor in [
        "blk.1.ffn_gate_exps.weight",
        "blk.3.ffn_gate_inp.weight",
        "blk.0.ffn_down.weight",
        "blk.2.attn_k.weight",
        "output_norm.weight",
        "token_embd.weight",
    ] {
        let mut w = good.clone();
        w.tensors.retain(|t| t.name != tensor);
        let e = must_fail(&w, tensor);
        assert!(e.contains(tensor) && e.contains("missing"), "{tensor}: {e}");
    }
    // a dense tensor in an MoE layer
    let mut w = good.clone();
    let mut t = w
        .tensors
        .iter()
        .find(|t| t.name == "blk.0.ffn_up.weight")
        .unwrap()
        .clone();
    t.name = "blk.1.ffn_up.weight".into();
    w.tensors.push(t);
    let e = must_fail(&w, "dense in MoE");
    assert!(
        e.contains("blk.1.ffn_up.weight") && e.contains("MoE"),
        "{e}"
    );
    // expert count in the dims disagrees with llama4.expert_count
    let mut w = good.clone();
    w.kv.retain(|(k, _)| k != "llama4.expert_count");
    w.kv("llama4.expert_count", Meta::U32(4));
    let e = must_fail(&w, "expert dims");
    assert!(e.contains("blk.1.ffn_gate_inp.weight"), "{e}");
    // a type the reader cannot dequantize: named with its type and what to do
    let mut w = good.clone();
    let t = w
        .tensors
        .iter_mut()
        .find(|t| t.name == "blk.3.ffn_up_exps.weight")
        .unwrap();
    let n = (t.dims.iter().product::<u64>() / 32 * 36) as usize;
    t.ty = Q8_1;
    t.data = vec![0; n];
    let e = must_fail(&w, "q8_1");
    assert!(
        e.contains("blk.3.ffn_up_exps.weight")
            && e.contains("q8_1")
            && e.contains("llama-quantize"),
        "{e}"
    );
    // an unknown tensor
    let mut w = good.clone();
    w.tensor_f32("blk.0.attn_q.bias", &[64], &[0.0; 64]);
    let e = must_fail(&w, "bias");
    assert!(
        e.contains("blk.0.attn_q.bias") && e.contains("unknown"),
        "{e}"
    );
    // rope_freqs of the wrong length, or not positive
    for (v, why) in [(vec![1.0f32; 7], "dims"), (vec![0.0f32; 8], "> 0")] {
        let mut w = good.clone();
        w.tensor_f32("rope_freqs.weight", &[v.len() as u64], &v);
        let e = must_fail(&w, "rope_freqs");
        assert!(e.contains("rope_freqs.weight") && e.contains(why), "{e}");
    }
    // expert_used_count beyond expert_count
    let mut w = good.clone();
    w.kv.retain(|(k, _)| k != "llama4.expert_used_count");
    w.kv("llama4.expert_used_count", Meta::U32(9));
    let e = must_fail(&w, "used");
    assert!(e.contains("llama4.expert_used_count"), "{e}");
    // every truncation of a small valid file fails cleanly (no panic)
    let bytes = good.build();
    for cut in (0..bytes.len()).step_by(bytes.len() / 97 + 1) {
        let r = GgufFile::from_bytes("cut.gguf", bytes[..cut].to_vec()).and_then(gguf::checkpoint);
        assert!(r.is_err(), "cut at {cut} accepted");
    }
}

/// `ferroq convert X.gguf` (the CLI, by file extension) takes a llama4 GGUF; the model loads
/// with the tokenizer and chat template the converter carried over.
#[test]
fn cli_converts_a_llama4_gguf() {
    let fx = load("llama4-maverick-tiny");
    let w = build(
        &fx,
        Opts {
            experts_q8: false,
            fixture_keys: true,
        },
    );
    let src = tmp("maverick-tiny.gguf");
    std::fs::write(&src, w.build()).unwrap();
    let out = support::convert(&src, &tmp("maverick-tiny-cli.fqm"), "q8");
    let engine = ferroq::internals::engine::Engine::open(&out).unwrap();
    let ids = engine.tokenizer().encode("hello world", false);
    assert!(!ids.is_empty());
    std::fs::remove_file(&src).ok();
    std::fs::remove_file(&out).ok();
}

/// The full Llama 4 vocabulary as mainline writes it (`tokenizer.ggml.pre` = `llama4`) becomes a
/// tokenizer that encodes every golden line as Hugging Face `tokenizers` does.
#[test]
fn llama4_tokenizer_from_gguf_matches_hf() {
    let tj: Value = serde_json::from_slice(&llama4_tokenizer_json()).unwrap();
    let n = 202048; // Llama 4 Scout/Maverick vocab_size
    let (toks, types, merges) = gguf_vocab(&tj, n);
    let mut w = GgufWriter::new(3);
    w.kv("general.architecture", Meta::s("llama4"))
        .kv("tokenizer.ggml.model", Meta::s("gpt2"))
        .kv("tokenizer.ggml.pre", Meta::s("llama4"))
        .kv("tokenizer.ggml.tokens", Meta::ArrStr(toks))
        .kv("tokenizer.ggml.token_type", Meta::ArrI32(types))
        .kv("tokenizer.ggml.merges", Meta::ArrStr(merges))
        .kv("tokenizer.ggml.bos_token_id", Meta::U32(200000))
        .kv("tokenizer.ggml.eos_token_id", Meta::U32(200008))
        .kv("tokenizer.ggml.add_bos_token", Meta::Bool(true));
    let f = GgufFile::from_bytes("tok.gguf", w.build()).unwrap();
    let json = gguf::tokenizer_json(&f).unwrap().unwrap();
    let tok = ferroq::internals::tokenizer::Tokenizer::from_hf_json(&json).unwrap();
    let golden = String::from_utf8(read_gz("tokenizers/llama4/golden.jsonl.gz")).unwrap();
    let mut lines = 0;
    for l in golden.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let want: Vec<u32> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let text = v["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false), want, "{text:?}");
        lines += 1;
    }
    assert!(lines > 1000);
    // special tokens are cut out whole, and BOS is added
    let hf =
        ferroq::internals::tokenizer::Tokenizer::from_hf_json(&llama4_tokenizer_json()).unwrap();
    let s = "<|header_start|>user<|header_end|>\n\nhi there<|eot|>";
    assert_eq!(tok.encode(s, false), hf.encode(s, false));
    assert_eq!(tok.encode(s, true)[0], 200000);
}
