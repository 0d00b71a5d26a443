//! Synthetic model tool (`ferroq synth`): writes a random-weight Hugging Face checkpoint of a
//! named shape, so speed numbers can be reproduced without downloading a model.
//!
//! Output: `config.json` (transformers 5.x layout, real `Llama4ForCausalLM` /
//! `LlamaForCausalLM` field names), bf16 safetensors with the real Hugging Face tensor names and
//! layouts, sharded like `save_pretrained` (`model-0000i-of-0000n.safetensors` plus
//! `model.safetensors.index.json`; a single shard is written as `model.safetensors`).
//!
//! Weights come from a seeded splitmix64 stream, Gaussian-ish (sum of four 16-bit uniforms,
//! std 0.02; norm weights 1.0 ± 0.02). Every block of [`BLOCK`] values of every tensor has its own
//! seed derived from (seed, tensor name, block index), so output is bit-identical whatever the
//! number of threads generating it. Tensors are generated and written streaming through a fixed
//! buffer: memory stays bounded whatever the model size. Files are written under temporary names
//! and renamed when everything is complete.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::{json, Value};

use super::safetensors_write::{SafetensorsWriter, StTensor};
use ferroq::{Error, Result};

/// Values per independently seeded block.
pub const BLOCK: usize = 1 << 16;
/// Values generated per write (bounded memory: 2 bytes each).
const BUF_VALUES: usize = 64 * BLOCK;

/// Model family of a synthetic shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `Llama4ForCausalLM` (`model_type: llama4_text`).
    Llama4,
    /// `LlamaForCausalLM` (`model_type: llama`).
    Llama,
}

/// A model shape: everything needed to write `config.json` and the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Dense MLP width (Llama: `intermediate_size`; Llama 4: `intermediate_size_mlp`).
    pub mlp_width: usize,
    /// Routed and shared expert width (Llama 4 `intermediate_size`).
    pub expert_width: usize,
    pub num_experts: usize,
    pub top_k: usize,
    /// Llama 4 `interleave_moe_layer_step` (1 = every layer MoE).
    pub moe_step: usize,
    pub qk_norm: bool,
    /// Llama 4 `no_rope_layer_interval` (every n-th layer is NoPE and full attention).
    pub nope_interval: usize,
    pub chunk_size: usize,
    pub tie_embeddings: bool,
    pub rope_theta: f64,
    /// Llama 3 style scaling `(factor, low_freq_factor, high_freq_factor, original_max)`.
    pub rope_llama3: Option<(f64, f64, f64, usize)>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub bos_token_id: usize,
    pub eos_token_id: usize,
    pub pad_token_id: Option<usize>,
    pub floor_scale: usize,
}

/// Names accepted by [`Shape::preset`].
pub const PRESETS: &[&str] = &["l4-mini", "l4-mini-128e", "l4-tiny", "smollm2-135m"];

impl Shape {
    /// A named shape: `l4-mini` (issue 5's 3.5 B Llama 4 speed model), `smollm2-135m`
    /// (SmolLM2-135M's shape) or `l4-tiny` (tiny Llama 4 for tests).
    pub fn preset(name: &str) -> Result<Shape> {
        let l4 = Shape {
            family: Family::Llama4,
            vocab_size: 202048,
            hidden_size: 2048,
            num_layers: 12,
            num_heads: 16,
            num_kv_heads: 4,
            head_dim: 128,
            mlp_width: 4096,
            expert_width: 2048,
            num_experts: 16,
            top_k: 1,
            moe_step: 1,
            qk_norm: true,
            nope_interval: 4,
            chunk_size: 8192,
            tie_embeddings: false,
            rope_theta: 500000.0,
            // Llama 3 style scaling. (Scout's own high_freq_factor == low_freq_factor == 1 is a
            // degenerate band that transformers warns about; speed does not depend on it.)
            rope_llama3: Some((16.0, 1.0, 4.0, 8192)),
            max_position_embeddings: 131072,
            rms_norm_eps: 1e-5,
            bos_token_id: 200000,
            eos_token_id: 200008,
            pad_token_id: Some(200018),
            floor_scale: 8192,
        };
        Ok(match name {
            "l4-mini" => l4,
            // the same expert bytes in 128 experts of width 256 (top-1, like Maverick's MoE
            // layers): the expert cache of paging then holds many small experts
            "l4-mini-128e" => Shape {
                expert_width: 256,
                num_experts: 128,
                ..l4
            },
            "l4-tiny" => Shape {
                vocab_size: 512,
                hidden_size: 64,
                num_layers: 4,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                mlp_width: 96,
                expert_width: 32,
                num_experts: 4,
                chunk_size: 8,
                rope_llama3: Some((8.0, 1.0, 4.0, 64)),
                max_position_embeddings: 4096,
                bos_token_id: 1,
                eos_token_id: 2,
                pad_token_id: Some(0),
                floor_scale: 4,
                ..l4
            },
            "smollm2-135m" => Shape {
                family: Family::Llama,
                vocab_size: 49152,
                hidden_size: 576,
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                mlp_width: 1536,
                expert_width: 0,
                num_experts: 0,
                top_k: 0,
                moe_step: 0,
                qk_norm: false,
                nope_interval: 0,
                chunk_size: 0,
                tie_embeddings: true,
                rope_theta: 100000.0,
                rope_llama3: None,
                max_position_embeddings: 8192,
                bos_token_id: 1,
                eos_token_id: 2,
                pad_token_id: Some(2),
                floor_scale: 0,
                ..l4
            },
            _ => {
                return Err(Error::config(
                    "preset",
                    format!("unknown preset `{name}` (known: {})", PRESETS.join(", ")),
                ))
            }
        })
    }

    /// Is layer `i` a MoE layer (transformers: `moe_layers = range(step-1, L, step)`)?
    pub fn is_moe(&self, i: usize) -> bool {
        self.family == Family::Llama4 && self.moe_step > 0 && (i + 1).is_multiple_of(self.moe_step)
    }

    /// Does layer `i` use RoPE (transformers `no_rope_layers[i] == 1`)?
    pub fn uses_rope(&self, i: usize) -> bool {
        self.nope_interval == 0 || !(i + 1).is_multiple_of(self.nope_interval)
    }

    fn check(&self) -> Result<()> {
        let bad = |f: &str, m: &str| Err(Error::config(f, m));
        if self.hidden_size == 0 || self.num_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size", "sizes must be > 0");
        }
        if self.num_heads == 0
            || self.num_kv_heads == 0
            || !self.num_heads.is_multiple_of(self.num_kv_heads)
        {
            return bad("num_key_value_heads", "must divide num_attention_heads");
        }
        if self.family == Family::Llama4
            && self.moe_step > 0
            && (self.num_experts == 0 || self.top_k == 0 || self.top_k > self.num_experts)
        {
            return bad("num_experts_per_tok", "must be in 1..=num_local_experts");
        }
        Ok(())
    }

    /// The Hugging Face `config.json` (keys sorted, like `save_pretrained`).
    pub fn config_json(&self) -> Value {
        let mut rope = json!({ "rope_theta": self.rope_theta, "rope_type": "default" });
        if let Some((factor, lo, hi, orig)) = self.rope_llama3 {
            rope = json!({
                "factor": factor,
                "high_freq_factor": hi,
                "low_freq_factor": lo,
                "original_max_position_embeddings": orig,
                "rope_theta": self.rope_theta,
                "rope_type": "llama3",
            });
        }
        let l = self.num_layers;
        match self.family {
            Family::Llama4 => {
                let no_rope: Vec<u8> = (0..l).map(|i| self.uses_rope(i) as u8).collect();
                let types: Vec<&str> = (0..l)
                    .map(|i| {
                        if self.uses_rope(i) {
                            "chunked_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                let moe: Vec<usize> = (0..l).filter(|&i| self.is_moe(i)).collect();
                json!({
                    "architectures": ["Llama4ForCausalLM"],
                    "attention_bias": false,
                    "attention_chunk_size": self.chunk_size,
                    "attention_dropout": 0.0,
                    "attn_scale": 0.1,
                    "attn_temperature_tuning": true,
                    "bos_token_id": self.bos_token_id,
                    "dtype": "bfloat16",
                    "eos_token_id": self.eos_token_id,
                    "floor_scale": self.floor_scale,
                    "head_dim": self.head_dim,
                    "hidden_act": "silu",
                    "hidden_size": self.hidden_size,
                    "initializer_range": 0.02,
                    "interleave_moe_layer_step": self.moe_step,
                    "intermediate_size": self.expert_width,
                    "intermediate_size_mlp": self.mlp_width,
                    "layer_types": types,
                    "max_position_embeddings": self.max_position_embeddings,
                    "model_type": "llama4_text",
                    "moe_layers": moe,
                    "no_rope_layer_interval": self.nope_interval,
                    "no_rope_layers": no_rope,
                    "num_attention_heads": self.num_heads,
                    "num_experts_per_tok": self.top_k,
                    "num_hidden_layers": l,
                    "num_key_value_heads": self.num_kv_heads,
                    "num_local_experts": self.num_experts,
                    "output_router_logits": false,
                    "pad_token_id": self.pad_token_id,
                    "rms_norm_eps": self.rms_norm_eps,
                    "rope_parameters": rope,
                    "router_aux_loss_coef": 0.001,
                    "router_jitter_noise": 0.0,
                    "tie_word_embeddings": self.tie_embeddings,
                    "transformers_version": "5.24.0",
                    "use_cache": true,
                    "use_qk_norm": self.qk_norm,
                    "vocab_size": self.vocab_size,
                })
            }
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"],
                "attention_bias": false,
                "attention_dropout": 0.0,
                "bos_token_id": self.bos_token_id,
                "dtype": "bfloat16",
                "eos_token_id": self.eos_token_id,
                "head_dim": self.head_dim,
                "hidden_act": "silu",
                "hidden_size": self.hidden_size,
                "initializer_range": 0.02,
                "intermediate_size": self.mlp_width,
                "max_position_embeddings": self.max_position_embeddings,
                "mlp_bias": false,
                "model_type": "llama",
                "num_attention_heads": self.num_heads,
                "num_hidden_layers": l,
                "num_key_value_heads": self.num_kv_heads,
                "pad_token_id": self.pad_token_id,
                "pretraining_tp": 1,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_parameters": rope,
                "tie_word_embeddings": self.tie_embeddings,
                "transformers_version": "5.24.0",
                "use_cache": true,
                "vocab_size": self.vocab_size,
            }),
        }
    }

    /// Every tensor with its Hugging Face name and shape, in `state_dict` order.
    pub fn tensors(&self) -> Vec<SynthTensor> {
        let (h, d, v) = (self.hidden_size, self.head_dim, self.vocab_size);
        let w = |name: String, shape: Vec<usize>| SynthTensor {
            name,
            shape,
            init: Init::Normal,
        };
        let norm = |name: String| SynthTensor {
            name,
            shape: vec![h],
            init: Init::Norm,
        };
        let mut out = vec![w("model.embed_tokens.weight".into(), vec![v, h])];
        for i in 0..self.num_layers {
            let p = format!("model.layers.{i}.");
            let a = format!("{p}self_attn.");
            out.push(w(format!("{a}q_proj.weight"), vec![self.num_heads * d, h]));
            out.push(w(
                format!("{a}k_proj.weight"),
                vec![self.num_kv_heads * d, h],
            ));
            out.push(w(
                format!("{a}v_proj.weight"),
                vec![self.num_kv_heads * d, h],
            ));
            out.push(w(format!("{a}o_proj.weight"), vec![h, self.num_heads * d]));
            match self.family {
                Family::Llama4 if self.is_moe(i) => {
                    let (e, x) = (self.num_experts, self.expert_width);
                    let f = format!("{p}feed_forward.");
                    out.push(w(format!("{f}router.weight"), vec![e, h]));
                    out.push(w(format!("{f}experts.gate_up_proj"), vec![e, h, 2 * x]));
                    out.push(w(format!("{f}experts.down_proj"), vec![e, x, h]));
                    out.push(w(format!("{f}shared_expert.gate_proj.weight"), vec![x, h]));
                    out.push(w(format!("{f}shared_expert.up_proj.weight"), vec![x, h]));
                    out.push(w(format!("{f}shared_expert.down_proj.weight"), vec![h, x]));
                }
                _ => {
                    let f = match self.family {
                        Family::Llama4 => format!("{p}feed_forward."),
                        Family::Llama => format!("{p}mlp."),
                    };
                    let m = self.mlp_width;
                    out.push(w(format!("{f}gate_proj.weight"), vec![m, h]));
                    out.push(w(format!("{f}up_proj.weight"), vec![m, h]));
                    out.push(w(format!("{f}down_proj.weight"), vec![h, m]));
                }
            }
            out.push(norm(format!("{p}input_layernorm.weight")));
            out.push(norm(format!("{p}post_attention_layernorm.weight")));
        }
        out.push(norm("model.norm.weight".into()));
        if !self.tie_embeddings {
            out.push(w("lm_head.weight".into(), vec![v, h]));
        }
        out
    }

    /// Number of parameters.
    pub fn n_params(&self) -> u64 {
        self.tensors().iter().map(SynthTensor::numel).sum()
    }
}

/// How a tensor is initialized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// Gaussian-ish, mean 0, std 0.02.
    Normal,
    /// RMSNorm weight: 1.0 plus Gaussian-ish noise of std 0.02.
    Norm,
}

/// One tensor of a synthetic checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SynthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl SynthTensor {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// splitmix64 step (Steele, Lea, Flood 2014): the whole PRNG.
#[inline]
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Seed of block `block` of tensor `name` under the user seed.
fn block_seed(seed: u64, name: &str, block: u64) -> u64 {
    // FNV-1a of the name, then mixed with the seed and the block index.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3);
    }
    let mut s = seed ^ h.rotate_left(17);
    let a = splitmix64(&mut s);
    let mut s2 = a ^ block.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    splitmix64(&mut s2)
}

/// Fill `out` (2 bytes per value, bf16 little-endian) with values `first..` of a tensor.
/// `first` must be a multiple of [`BLOCK`].
fn fill_bf16(out: &mut [u8], seed: u64, t: &SynthTensor, first: u64) {
    debug_assert_eq!(first % BLOCK as u64, 0);
    // Sum of four uniform u16: mean 131070, std sqrt((2^32 - 1) / 3).
    const MEAN: f32 = 131070.0;
    const INV_STD: f32 = 1.0 / 37837.23;
    let (bias, std) = match t.init {
        Init::Normal => (0.0f32, 0.02f32),
        Init::Norm => (1.0, 0.02),
    };
    let scale = std * INV_STD;
    out.par_chunks_mut(2 * BLOCK)
        .enumerate()
        .for_each(|(bi, chunk)| {
            let mut s = block_seed(seed, &t.name, first / BLOCK as u64 + bi as u64);
            for v in chunk.chunks_exact_mut(2) {
                let r = splitmix64(&mut s);
                let sum = (r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) + (r >> 48);
                let x = bias + (sum as f32 - MEAN) * scale;
                v.copy_from_slice(&half::bf16::from_f32(x).to_bits().to_le_bytes());
            }
        });
}

/// Options of [`write_checkpoint`].
#[derive(Clone, Debug)]
pub struct SynthOptions {
    pub seed: u64,
    /// Maximum shard size in bytes (a larger single tensor gets a shard of its own).
    pub shard_size: u64,
    /// A label stored in config.json under `ferroq_synth` (e.g. the preset name).
    pub label: String,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            seed: 1,
            shard_size: 2_000_000_000,
            label: String::new(),
        }
    }
}

/// Progress report: bytes of tensor data written so far, total, current tensor.
pub struct Progress<'a> {
    pub done: u64,
    pub total: u64,
    pub tensor: &'a str,
}

/// What was written.
#[derive(Clone, Debug)]
pub struct Summary {
    pub files: Vec<PathBuf>,
    pub n_params: u64,
    pub n_bytes: u64,
}

/// Assign tensors to shards (in order; a new shard when the next tensor would overflow).
pub fn plan_shards(tensors: &[SynthTensor], shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![];
    let mut cur = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let b = 2 * t.numel();
        match shards.last_mut() {
            Some(s) if cur + b <= shard_size || s.is_empty() => {
                s.push(i);
                cur += b;
            }
            _ => {
                shards.push(vec![i]);
                cur = b;
            }
        }
    }
    shards
}

/// Parse a size like `2GB`, `500MB`, `1GiB`, `4096` (bytes; decimal units like Hugging Face's
/// `max_shard_size`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" | "K" => 1_000,
        "MB" | "M" => 1_000_000,
        "GB" | "G" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => return Err(Error::config("shard-size", format!("bad unit in `{s}`"))),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| Error::config("shard-size", format!("bad number in `{s}`")))?;
    let v = n * mult as f64;
    if !(1.0..1e18).contains(&v) {
        return Err(Error::config(
            "shard-size",
            format!("`{s}` is out of range"),
        ));
    }
    Ok(v as u64)
}

/// Write a random-weight checkpoint of `shape` into directory `dir` (created if missing).
/// Calls `progress` after each written buffer.
pub fn write_checkpoint(
    shape: &Shape,
    dir: &Path,
    opts: &SynthOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Summary> {
    shape.check()?;
    if opts.shard_size == 0 {
        return Err(Error::config("shard-size", "must be > 0"));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tensors = shape.tensors();
    let shards = plan_shards(&tensors, opts.shard_size);
    let n = shards.len();
    let names: Vec<String> = if n == 1 {
        vec!["model.safetensors".into()]
    } else {
        (1..=n)
            .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
            .collect()
    };
    let total: u64 = tensors.iter().map(|t| 2 * t.numel()).sum();
    let tmp = |name: &str| dir.join(format!(".{name}.synth-tmp"));
    let mut renames: Vec<(PathBuf, PathBuf)> = vec![];
    let result = (|| {
        let mut buf = vec![0u8; 2 * BUF_VALUES];
        let mut done = 0u64;
        for (shard, fname) in shards.iter().zip(&names) {
            let st: Vec<StTensor> = shard
                .iter()
                .map(|&i| StTensor {
                    name: tensors[i].name.clone(),
                    dtype: "BF16",
                    shape: tensors[i].shape.clone(),
                })
                .collect();
            let path = tmp(fname);
            renames.push((path.clone(), dir.join(fname)));
            let mut w = SafetensorsWriter::create(&path, &st, &[("format", "pt")])?;
            for &i in shard {
                let t = &tensors[i];
                let numel = t.numel();
                let mut first = 0u64;
                while first < numel {
                    let len = (numel - first).min(BUF_VALUES as u64) as usize;
                    let out = &mut buf[..2 * len];
                    fill_bf16(out, opts.seed, t, first);
                    w.write(out)?;
                    first += len as u64;
                    done += 2 * len as u64;
                    progress(Progress {
                        done,
                        total,
                        tensor: &t.name,
                    });
                }
            }
            w.finish()?;
        }
        if n > 1 {
            let mut map = serde_json::Map::new();
            for (shard, fname) in shards.iter().zip(&names) {
                for &i in shard {
                    map.insert(tensors[i].name.clone(), Value::from(fname.as_str()));
                }
            }
            let index = json!({
                "metadata": { "total_parameters": total / 2, "total_size": total },
                "weight_map": map,
            });
            let name = "model.safetensors.index.json";
            write_json(&tmp(name), &index)?;
            renames.push((tmp(name), dir.join(name)));
        }
        let mut config = shape.config_json();
        config["ferroq_synth"] = json!({ "preset": opts.label, "seed": opts.seed });
        write_json(&tmp("config.json"), &config)?;
        renames.push((tmp("config.json"), dir.join("config.json")));
        for (from, to) in &renames {
            std::fs::rename(from, to).map_err(|e| Error::io(to, e))?;
        }
        Ok(())
    })();
    if result.is_err() {
        for (from, _) in &renames {
            let _ = std::fs::remove_file(from);
        }
    }
    result?;
    Ok(Summary {
        files: renames.into_iter().map(|(_, to)| to).collect(),
        n_params: total / 2,
        n_bytes: total,
    })
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v)
        .map_err(|e| Error::Other(format!("{}: {e}", path.display())))?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::io(path, e))
}
