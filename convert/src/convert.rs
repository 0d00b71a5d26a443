//! The converter: a [`Checkpoint`] (Hugging Face directory or GGUF file) → a `.fqm` model.
//!
//! 1. Normalize the config ([`model_config_from_hf`]) and build our tensor table
//!    ([`tensor_table`]).
//! 2. Map every table entry to its source tensor (plain, multimodal `language_model.` prefix,
//!    fused transposed experts `[E, in, out]`, or per-expert layout) and check names, shapes and
//!    dtypes of all of them **before** writing anything.
//! 3. Stream: read one tensor (or one expert slice) as f32, transpose if needed, convert to
//!    the recipe's type (quantization runs on all cores, one rayon task per 8-row group), append
//!    to the writer. Peak memory is about one source tensor in f32 plus its output.
//! 4. Metadata (config, tokenizer, stop tokens, provenance, recipe) and raw tokenizer files go
//!    in last; the writer renames the temporary file only when everything succeeded.
//!
//! # Recipe (type per tensor role)
//! | quant | attention / FFN / experts | embedding / output | norms / router |
//! |---|---|---|---|
//! | `f32`  | f32  | f32  | f32 |
//! | `bf16` | bf16 | bf16 | f32 |
//! | `q8`   | q8x8 | q8x8 | f32 |
//! | `q4`   | q4x8 | **q6x8** | f32 |
//! | `q4m`  | q4x8 (value, FFN down: q8x8) | **q6x8** | f32 |
//! | `q4l`  | q4lx8 | **q6x8** | f32 |
//!
//! `q4l` (alias `q4_0`) stores the same 4.5 bits per weight on the linear grid `q − 8`
//! (ggml's `Q4_0` levels, our scale search): less accurate than the `q4` codebook (weights'
//! relative RMS error ~1.2× on SmolLM2; mean KL vs transformers 0.97 against 0.29), but its
//! AVX2 kernels run about 1.4× faster at prefill and 1.7× faster at in-cache decode (see
//! `kernels/src/x86_64/avx2/quant.rs`), and a `Q4_0` source converts to it exactly.
//!
//! With the 4-bit recipes the embedding and output tables are 6-bit (`q6x8`, 6.5 bits per
//! weight, like llama.cpp's `Q6_K` output for its 4-bit types): the output projection's error
//! goes straight into the logits, and it is read for every generated token (SmolLM2: 30 of its
//! 90 MB per token at 8 bits; l4-mini: 440 of 682 MB). Unlike `Q6_K` (super-blocks of 256
//! columns) it blocks SmolLM2's 576 columns, where llama.cpp falls back to `Q8_0`. A matrix
//! whose column count is not a multiple of 32 cannot be blocked and falls back to bf16; each
//! fallback is listed in the recipe.
//!
//! `output_type` / `embedding_type` (CLI `--output-tensor-type`, `--token-embedding-type`, as in
//! llama.cpp) override the embedding/output rows of the table. Measured on SmolLM2
//! re-quantized from its Q4_1 GGUF (`q4`, mean KL vs transformers): q8 output 0.292, q6 (the
//! default) 0.290, q4 0.372 (an earlier build: 0.275 → 0.372); bytes per generated token
//! 89.9 / 82.9 / 75.8 MB.

use super::family::{self, ExpertPart, Src};
use super::hf::{architecture, model_config_from_hf};
use super::imatrix::Imatrix;
use super::source::{Checkpoint, TensorSource};
use ferroq::internals::format::{DType, FqmWriter, EXPERT_ALIGN, TENSOR_ALIGN};
use ferroq::internals::model::tensors::{LayerTensor, Proj, TensorKey};
use ferroq::internals::model::{tensor_table, ModelConfig, Role, TensorSpec};
use ferroq::{Error, Result};
use ferroq_kernels::block::{row_groups, BlockQ4Lx8, BlockQ4x8, BlockQ6x8, BlockQ8x8, QK, ROWS};
use ferroq_kernels::scalar::{
    quantize_q4x8_importance, quantize_q4x8_weighted, quantize_q6x8, quantize_q8x8,
};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Requested weight precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Q4,
    /// q4 with the value and FFN down projections at q8x8 (≈5.6 bits per weight on SmolLM2).
    Q4m,
    /// Linear 4-bit (`q4lx8`) for the matrices q4 stores as `q4x8`.
    Q4l,
    Q8,
    Bf16,
    F32,
    /// Like llama.cpp's `Q4_K_M`: q4 with the value and every down projection (dense, shared,
    /// routed) at q8x8 in the first and last eighth of the layers and every third between
    /// (llama.cpp uses 6 bits there; the runtime has q6x8 products for the embedding and
    /// output tables only).
    MixM,
    /// `MixM` with the output (and a tied embedding) at q8x8, like the `_L` files.
    MixL,
    /// Like Unsloth's dynamic quants: routed experts lowest (q4; their down projection q8 in
    /// the first and last layer), attention q8 except wq/wk (q4) in the middle layers, shared
    /// expert q8, dense FFN q4 with its down projection q8, every other matrix of the first
    /// and last layer q8, output q8.
    MixUd,
}

/// llama.cpp's `use_more_bits(i, n)`: the first and last eighth of the layers and every third
/// layer between them.
pub fn more_bits(i: usize, n: usize) -> bool {
    // (the subtraction runs only when i >= n / 8)
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl Quant {
    /// Every recipe, for help texts and size tables.
    pub const ALL: [Quant; 9] = [
        Quant::F32,
        Quant::Bf16,
        Quant::Q8,
        Quant::Q4m,
        Quant::MixL,
        Quant::MixUd,
        Quant::MixM,
        Quant::Q4,
        Quant::Q4l,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Quant::Q4 => "q4",
            Quant::Q4m => "q4m",
            Quant::Q4l => "q4l",
            Quant::Q8 => "q8",
            Quant::Bf16 => "bf16",
            Quant::F32 => "f32",
            Quant::MixM => "q4-m",
            Quant::MixL => "q4-l",
            Quant::MixUd => "q4-ud",
        }
    }

    /// The stored type of tensor `key` (of `role`) in a model of `cfg` before the
    /// column-count fallback and the embedding/output overrides: the role's type, changed by
    /// layer and projection in the mixed recipes.
    pub fn dtype_for_tensor(self, key: TensorKey, role: Role, cfg: &ModelConfig) -> DType {
        use LayerTensor as L;
        let base = self.dtype_for(role);
        if base != DType::Q4x8 {
            return base;
        }
        let Some((i, t)) = key.layer() else {
            return base;
        };
        let n = cfg.num_layers;
        let down = key.proj() == Some(Proj::Down);
        match self {
            // the two most sensitive matrices per layer (measured on SmolLM2) stay at 8 bits
            Quant::Q4m if t == L::Wv || down => DType::Q8x8,
            Quant::MixM | Quant::MixL if (t == L::Wv || down) && more_bits(i, n) => DType::Q8x8,
            Quant::MixUd => {
                let edge = i == 0 || i + 1 == n;
                match t {
                    L::Expert(_, Proj::Down) if edge => DType::Q8x8,
                    L::Expert(..) => DType::Q4x8,
                    _ if edge => DType::Q8x8,
                    L::Wv | L::Wo | L::Shared(_) => DType::Q8x8,
                    L::Ffn(Proj::Down) => DType::Q8x8,
                    _ => DType::Q4x8,
                }
            }
            _ => base,
        }
    }

    /// The stored type for a tensor of `role` (before the column-count fallback).
    pub fn dtype_for(self, role: Role) -> DType {
        match (self, role) {
            (Quant::F32, _) | (_, Role::Norm) | (_, Role::Router) => DType::F32,
            (Quant::Bf16, _) => DType::Bf16,
            (Quant::Q8, _) => DType::Q8x8,
            (Quant::MixL | Quant::MixUd, Role::Output) => DType::Q8x8,
            (Quant::MixL, Role::Embedding) => DType::Q8x8,
            (_, Role::Embedding | Role::Output) => DType::Q6x8,
            (Quant::Q4 | Quant::Q4m | Quant::MixM | Quant::MixL | Quant::MixUd, _) => DType::Q4x8,
            (Quant::Q4l, _) => DType::Q4Lx8,
        }
    }
}

impl std::str::FromStr for Quant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Quant> {
        match s.to_ascii_lowercase().as_str() {
            "q4" => Ok(Quant::Q4),
            "q4m" => Ok(Quant::Q4m),
            "q4l" | "q4_0" => Ok(Quant::Q4l),
            "q8" => Ok(Quant::Q8),
            "bf16" => Ok(Quant::Bf16),
            "f32" => Ok(Quant::F32),
            "q4-m" | "q4_k_m" => Ok(Quant::MixM),
            "q4-l" | "q4_k_l" => Ok(Quant::MixL),
            "q4-ud" | "ud" => Ok(Quant::MixUd),
            _ => Err(Error::config(
                "--quant",
                format!(
                    "`{s}` is not one of q4, q4m, q4l (q4_0), q4-m (q4_k_m), q4-l (q4_k_l), \
                     q4-ud, q8, bf16, f32"
                ),
            )),
        }
    }
}

/// Converter options.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub quant: Quant,
    /// Round RoPE frequencies to bf16 like a transformers model cast with
    /// `model.to(torch.bfloat16)` (see `ModelConfig::rope_freq_bf16`). Off by default.
    pub rope_freq_bf16: bool,
    /// Type of the output projection, overriding the recipe (`q4`, `q4l`, `q6`, `q8`, `bf16` or `f32`; like
    /// llama.cpp's `--output-tensor-type`). With tied embeddings the shared table is the output
    /// projection and this type wins over `embedding_type`.
    pub output_type: Option<DType>,
    /// Type of the token embedding table, overriding the recipe (`--token-embedding-type`).
    pub embedding_type: Option<DType>,
    /// An importance matrix (`ferroq imatrix`) whose per-column activation statistics weigh
    /// the 4-bit scale search (`--imatrix FILE`).
    pub imatrix: Option<PathBuf>,
    /// How the imatrix enters the 4-bit weights.
    pub imatrix_weighting: ImatrixWeighting,
}

/// How an imatrix's mean squared activation `a_c` of column `c` weighs a block's errors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImatrixWeighting {
    /// `a_c · sqrt(σ² + x²)` (ggml's choice: the imatrix multiplies the weight-magnitude term).
    #[default]
    Multiply,
    /// `a_c` alone.
    Replace,
}

impl std::str::FromStr for ImatrixWeighting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "multiply" => Ok(ImatrixWeighting::Multiply),
            "replace" => Ok(ImatrixWeighting::Replace),
            _ => Err(Error::config(
                "--imatrix-weighting",
                format!("`{s}` is not one of multiply, replace"),
            )),
        }
    }
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            quant: Quant::Q4,
            rope_freq_bf16: false,
            output_type: None,
            embedding_type: None,
            imatrix: None,
            imatrix_weighting: ImatrixWeighting::Multiply,
        }
    }
}

impl ConvertOptions {
    /// The type of a tensor of `role`: the recipe's, or an override for the embedding and
    /// output tables.
    pub fn dtype_for(&self, role: Role, tied: bool) -> DType {
        let over = match role {
            Role::Output => self.output_type,
            Role::Embedding if tied => self.output_type.or(self.embedding_type),
            Role::Embedding => self.embedding_type,
            _ => None,
        };
        over.unwrap_or_else(|| self.quant.dtype_for(role))
    }

    /// The type of tensor `spec` of a model of `cfg` (before the column-count fallback).
    pub fn dtype_for_tensor(&self, spec: &TensorSpec, cfg: &ModelConfig) -> DType {
        match spec.role {
            Role::Embedding | Role::Output => self.dtype_for(spec.role, cfg.tie_word_embeddings),
            r => self.quant.dtype_for_tensor(spec.key, r, cfg),
        }
    }
}

/// Parse a matrix type name for `--output-tensor-type` / `--token-embedding-type`.
pub fn parse_matrix_type(s: &str) -> Result<DType> {
    match s.to_ascii_lowercase().as_str() {
        "q4" => Ok(DType::Q4x8),
        "q4l" | "q4_0" => Ok(DType::Q4Lx8),
        // q6_k: what llama.cpp users ask for; ours blocks by 32 columns, not 256
        "q6" | "q6_k" => Ok(DType::Q6x8),
        "q8" | "q8_0" => Ok(DType::Q8x8),
        "bf16" => Ok(DType::Bf16),
        "f32" => Ok(DType::F32),
        _ => Err(Error::config(
            "--output-tensor-type / --token-embedding-type",
            format!("`{s}` is not one of q4, q4l (q4_0), q6 (q6_k), q8 (q8_0), bf16, f32"),
        )),
    }
}

/// Progress of a conversion, for a progress bar or a log.
#[derive(Clone, Debug)]
pub enum ProgressEvent {
    /// Planning done: `tensors` tensors, `bytes` bytes of tensor data will be written, in the
    /// types of `sizes` (the recipe's size table).
    Start {
        tensors: usize,
        bytes: u64,
        sizes: Vec<SizeRow>,
    },
    /// Tensor `index` (1-based) of `total` written; `bytes_done` of `bytes_total`.
    Tensor {
        index: usize,
        total: usize,
        name: String,
        bytes_done: u64,
        bytes_total: u64,
        elapsed: Duration,
        eta: Option<Duration>,
    },
    /// Something worth telling the user (skipped tensors, fallbacks).
    Note(String),
    /// The file is complete and renamed.
    Done {
        path: PathBuf,
        bytes: u64,
        elapsed: Duration,
    },
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct Report {
    pub path: PathBuf,
    /// Model tensors written (not counting embedded files).
    pub tensors: usize,
    /// Size of the output file.
    pub file_bytes: u64,
    pub elapsed: Duration,
    pub notes: Vec<String>,
    /// The recipe as stored in the metadata.
    pub recipe: Value,
}

/// The class of a tensor for size tables, from its file name.
pub fn tensor_class(name: &str) -> &'static str {
    let last = name.rsplit('.').next().unwrap_or(name);
    if name == "tok_embeddings" {
        "embedding"
    } else if name == "output" {
        "output"
    } else if name.contains(".experts.") {
        "routed experts"
    } else if last.starts_with("shared_") {
        "shared expert"
    } else if matches!(last, "ffn_gate" | "ffn_up" | "ffn_down") {
        "dense FFN"
    } else if matches!(last, "wq" | "wk" | "wv" | "wo") {
        "attention"
    } else {
        "norms, router"
    }
}

/// One row of a size table: the tensors of a class stored in one type.
#[derive(Clone, Debug, PartialEq)]
pub struct SizeRow {
    pub class: &'static str,
    pub dtype: DType,
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

const CLASS_ORDER: [&str; 7] = [
    "embedding",
    "attention",
    "dense FFN",
    "shared expert",
    "routed experts",
    "output",
    "norms, router",
];

/// The size table of `(name, dtype, element count, bytes)` items, by class then type.
pub fn size_table<'a>(items: impl IntoIterator<Item = (&'a str, DType, u64, u64)>) -> Vec<SizeRow> {
    let mut rows: Vec<SizeRow> = Vec::new();
    for (name, dtype, params, bytes) in items {
        let class = tensor_class(name);
        match rows
            .iter_mut()
            .find(|r| r.class == class && r.dtype == dtype)
        {
            Some(r) => {
                r.tensors += 1;
                r.params += params;
                r.bytes += bytes;
            }
            None => rows.push(SizeRow {
                class,
                dtype,
                tensors: 1,
                params,
                bytes,
            }),
        }
    }
    let rank = |c: &str| CLASS_ORDER.iter().position(|&x| x == c).unwrap_or(99);
    rows.sort_by(|a, b| (rank(a.class), a.dtype.name()).cmp(&(rank(b.class), b.dtype.name())));
    rows
}

/// A size table as text: one line per row, then the total with its bits per weight.
pub fn format_size_table(rows: &[SizeRow]) -> String {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let gb = |b: u64| b as f64 / 1e9;
    let mut o = format!(
        "{:<15} {:>5} {:>7} {:>16} {:>11} {:>11} {:>6}\n",
        "class", "type", "tensors", "weights", "GB", "GiB", "bpw"
    );
    let (mut p, mut b) = (0u64, 0u64);
    for r in rows {
        o += &format!(
            "{:<15} {:>5} {:>7} {:>16} {:>11.4} {:>11.4} {:>6.3}\n",
            r.class,
            r.dtype.name(),
            r.tensors,
            r.params,
            gb(r.bytes),
            gib(r.bytes),
            r.bytes as f64 * 8.0 / r.params.max(1) as f64
        );
        p += r.params;
        b += r.bytes;
    }
    o += &format!(
        "{:<15} {:>5} {:>7} {:>16} {:>11.4} {:>11.4} {:>6.3}\n",
        "total",
        "",
        rows.iter().map(|r| r.tensors).sum::<usize>(),
        p,
        gb(b),
        gib(b),
        b as f64 * 8.0 / p.max(1) as f64
    );
    o
}

/// The type of each tensor of `cfg` under `opts` (the column-count fallback applied), without
/// a checkpoint: what a conversion would store, for size tables of models not at hand.
pub fn planned_types(cfg: &ModelConfig, opts: &ConvertOptions) -> Vec<(TensorSpec, DType)> {
    tensor_table(cfg)
        .into_iter()
        .map(|spec| {
            let (d, _) = final_dtype(opts, &spec, cfg);
            (spec, d)
        })
        .collect()
}

/// The recipe's type of `spec`, and the reason when a matrix falls back to bf16.
fn final_dtype(
    opts: &ConvertOptions,
    spec: &TensorSpec,
    cfg: &ModelConfig,
) -> (DType, Option<String>) {
    let dtype = opts.dtype_for_tensor(spec, cfg);
    if dtype.quantized().is_some() && spec.shape.len() == 2 && !spec.shape[1].is_multiple_of(QK) {
        let why = format!("{} columns is not a multiple of {QK}", spec.shape[1]);
        return (DType::Bf16, Some(why));
    }
    (dtype, None)
}

/// The size table of a model of `cfg` converted with `opts`.
pub fn recipe_sizes(cfg: &ModelConfig, opts: &ConvertOptions) -> Vec<SizeRow> {
    let planned = planned_types(cfg, opts);
    size_table(planned.iter().map(|(s, d)| {
        let n = s.shape.iter().product::<usize>() as u64;
        let b = d.nbytes(&s.shape).unwrap_or(0) as u64;
        (s.name.as_str(), *d, n, b)
    }))
}

/// The first tensor of a routed expert (it starts on a page).
fn spec_is_expert_gate(key: TensorKey) -> bool {
    matches!(key, TensorKey::Layer(_, LayerTensor::Expert(_, Proj::Gate)))
}

struct Planned {
    spec: TensorSpec,
    src: Src,
    dtype: DType,
    nbytes: usize,
}

/// HF name prefix of the text model: `""` (`Llama4ForCausalLM`, `LlamaForCausalLM`) or
/// `"language_model."` (`Llama4ForConditionalGeneration`).
fn text_prefix(src: &dyn TensorSource) -> Result<&'static str> {
    for p in ["", "language_model."] {
        if src.find(&format!("{p}model.embed_tokens.weight")).is_some() {
            return Ok(p);
        }
    }
    Err(Error::tensor(
        "model.embed_tokens.weight",
        "missing from the checkpoint (also looked for language_model.model.embed_tokens.weight)",
    ))
}

fn need<'a>(src: &'a dyn TensorSource, name: &str) -> Result<&'a super::source::SrcTensor> {
    src.find(name)
        .ok_or_else(|| Error::tensor(name, "missing from the checkpoint"))
}

fn check_shape(name: &str, got: &[usize], want: &[usize], ours: &str) -> Result<()> {
    if got != want {
        return Err(Error::tensor(
            name,
            format!("shape {got:?}, but the config implies {want:?} (for `{ours}`)"),
        ));
    }
    Ok(())
}

fn check_dtype(t: &super::source::SrcTensor) -> Result<()> {
    match t.dtype.as_str() {
        // float types from safetensors; GGUF block types that convert/src/gguf.rs dequantizes exactly
        "f32" | "f16" | "bf16" | "q4_0" | "q4_1" | "q5_0" | "q5_1" | "q8_0" | "q4_k" | "q6_k" => Ok(()),
        d => Err(Error::tensor(
            &t.name,
            format!("unsupported dtype {d} (the converter reads f32, f16, bf16 and the GGUF types q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q6_k)"),
        )),
    }
}

/// Map our table to source tensors and check every name, shape and dtype.
fn plan(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    opts: &ConvertOptions,
    notes: &mut Vec<String>,
    fallbacks: &mut Vec<Value>,
) -> Result<(Vec<Planned>, &'static str)> {
    let p = text_prefix(src)?;
    let mut out = Vec::new();
    for spec in tensor_table(cfg) {
        let n = spec.name.as_str();
        let s = family::hf_source(cfg, spec.key, p, src)
            .ok_or_else(|| Error::Other(format!("internal: unmapped tensor {n}")))?;
        // check the source
        match &s {
            Src::Plain(name) => {
                let t = need(src, name)?;
                check_shape(name, &t.shape, &spec.shape, n)?;
                check_dtype(t)?;
            }
            Src::Fused { name, part, .. } => {
                let t = need(src, name)?;
                let (e, h, i) = (cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size);
                let want = if *part == ExpertPart::Down {
                    vec![e, i, h]
                } else {
                    vec![e, h, 2 * i]
                };
                check_shape(name, &t.shape, &want, n)?;
                check_dtype(t)?;
            }
        }
        let (dtype, fallback) = final_dtype(opts, &spec, cfg);
        if let Some(reason) = fallback {
            fallbacks.push(json!({
                "tensor": n,
                "type": "bf16",
                "reason": reason,
            }));
        }
        let nbytes = dtype
            .nbytes(&spec.shape)
            .ok_or_else(|| Error::tensor(n, format!("shape {:?} overflows", spec.shape)))?;
        out.push(Planned {
            spec,
            src: s,
            dtype,
            nbytes,
        });
    }
    if !fallbacks.is_empty() {
        notes.push(format!(
            "{} matrices have a column count that is not a multiple of {QK} and are stored as bf16",
            fallbacks.len()
        ));
    }
    // tensors we do not use
    let mut used: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for pl in &out {
        match &pl.src {
            Src::Plain(n) | Src::Fused { name: n, .. } => {
                used.insert(n.as_str());
            }
        }
    }
    let (mut vision, mut other) = (0usize, Vec::new());
    for t in src.tensors() {
        if used.contains(t.name.as_str()) {
            continue;
        }
        if t.name.starts_with("vision_model.") || t.name.starts_with("multi_modal_projector.") {
            vision += 1;
        } else {
            other.push(t.name.clone());
        }
    }
    if vision > 0 {
        notes.push(format!(
            "skipped {vision} vision tensors (vision_model.*, multi_modal_projector.*): ferroq runs the text model"
        ));
    }
    if !other.is_empty() {
        let shown: Vec<&str> = other.iter().take(5).map(String::as_str).collect();
        notes.push(format!(
            "ignored {} unused tensors: {}{}",
            other.len(),
            shown.join(", "),
            if other.len() > 5 { ", ..." } else { "" }
        ));
    }
    Ok((out, p))
}

/// Reusable buffers: peak memory is one source tensor plus one output tensor.
#[derive(Default)]
struct Bufs {
    src: Vec<f32>,
    /// The expert slice last read: (tensor name, expert) and its data.
    slice_key: Option<(String, usize)>,
    slice: Vec<f32>,
    mat: Vec<f32>,
    out: OutBufs,
}

/// Output buffers of [`encode`].
#[derive(Default)]
struct OutBufs {
    q4: Vec<BlockQ4x8>,
    q4l: Vec<BlockQ4Lx8>,
    q6: Vec<BlockQ6x8>,
    q8: Vec<BlockQ8x8>,
    bytes: Vec<u8>,
}

/// Produce the f32 data of `pl` in our layout (row-major `[out, in]`): in `b.src` when no
/// reshaping is needed (returns false), else in `b.mat` (returns true).
fn load(src: &dyn TensorSource, pl: &Planned, cfg: &ModelConfig, b: &mut Bufs) -> Result<bool> {
    match &pl.src {
        Src::Plain(name) => {
            src.read_f32(name, &mut b.src)?;
            let want: usize = pl.spec.shape.iter().product();
            if b.src.len() != want {
                return Err(Error::tensor(
                    name,
                    format!("read {} values, {want} expected", b.src.len()),
                ));
            }
            Ok(false)
        }
        Src::Fused { name, e, part } => {
            let key = (name.clone(), *e);
            if b.slice_key.as_ref() != Some(&key) {
                b.slice_key = None;
                src.read_f32_outer(name, *e, &mut b.slice)?;
                b.slice_key = Some(key);
            }
            let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
            let (rows, cols) = (pl.spec.shape[0], pl.spec.shape[1]);
            // stored slice: gate_up [H, 2I] (row = input h), down [I, H] (row = input i)
            let (ld, col0) = match part {
                ExpertPart::Gate => (2 * i, 0),
                ExpertPart::Up => (2 * i, i),
                ExpertPart::Down => (h, 0),
            };
            if b.slice.len() != cols * ld {
                return Err(Error::tensor(
                    name,
                    format!(
                        "expert slice has {} values, {} expected",
                        b.slice.len(),
                        cols * ld
                    ),
                ));
            }
            b.mat.clear();
            b.mat.resize(rows * cols, 0.0);
            let slice = &b.slice;
            // transpose: ours[r][c] = stored[c][col0 + r]
            b.mat.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
                for (c, x) in row.iter_mut().enumerate() {
                    *x = slice[c * ld + col0 + r];
                }
            });
            Ok(true)
        }
    }
}

/// Convert `w` (row-major `shape`) to `dtype` bytes.
fn encode<'b>(
    w: &[f32],
    shape: &[usize],
    dtype: DType,
    col_w: Option<&[f32]>,
    weighting: ImatrixWeighting,
    b: &'b mut OutBufs,
) -> &'b [u8] {
    // with an imatrix and `Replace`, the column statistics alone weigh the errors
    let replace = col_w.is_some() && weighting == ImatrixWeighting::Replace;
    match dtype {
        DType::F32 => {
            b.bytes.clear();
            b.bytes.extend_from_slice(bytemuck::cast_slice(w));
            &b.bytes
        }
        DType::Bf16 | DType::F16 => {
            b.bytes.clear();
            b.bytes.resize(w.len() * 2, 0);
            let bf = dtype == DType::Bf16;
            b.bytes
                .par_chunks_mut(1 << 16)
                .zip(w.par_chunks(1 << 15))
                .for_each(|(o, x)| {
                    for (o, &v) in o.chunks_exact_mut(2).zip(x) {
                        let bits = if bf {
                            half::bf16::from_f32(v).to_bits()
                        } else {
                            half::f16::from_f32(v).to_bits()
                        };
                        o.copy_from_slice(&bits.to_le_bytes());
                    }
                });
            &b.bytes
        }
        DType::Q4x8 => bytemuck::cast_slice(encode_blocks(w, shape, &mut b.q4, |x, n, c, o| {
            if replace {
                quantize_q4x8_weighted(x, n, c, col_w, o)
            } else {
                quantize_q4x8_importance(x, n, c, col_w, o)
            }
        })),
        DType::Q4Lx8 => bytemuck::cast_slice(encode_blocks(w, shape, &mut b.q4l, |x, n, c, o| {
            if replace {
                quantize_q4x8_weighted(x, n, c, col_w, o)
            } else {
                quantize_q4x8_importance(x, n, c, col_w, o)
            }
        })),
        DType::Q6x8 => bytemuck::cast_slice(encode_blocks(w, shape, &mut b.q6, quantize_q6x8)),
        DType::Q8x8 => bytemuck::cast_slice(encode_blocks(w, shape, &mut b.q8, quantize_q8x8)),
        DType::U8 => unreachable!("model tensors are never u8"),
    }
}

/// Quantize `w [rows, cols]` to a block type with `quantize(rows, n, cols, out)` (one of the
/// scalar quantizers), one task per 8-row group.
fn encode_blocks<'b, B: bytemuck::Pod + Send>(
    w: &[f32],
    shape: &[usize],
    out: &'b mut Vec<B>,
    quantize: impl Fn(&[f32], usize, usize, &mut [B]) + Sync,
) -> &'b [B] {
    let (rows, cols) = (shape[0], shape[1]);
    let nb = cols / QK;
    out.clear();
    out.resize(row_groups(rows) * nb, B::zeroed());
    // rows g*8 .. min(rows, g*8+8)
    out.par_chunks_mut(nb).enumerate().for_each(|(g, o)| {
        let r0 = g * ROWS;
        let n = (rows - r0).min(ROWS);
        quantize(&w[r0 * cols..(r0 + n) * cols], n, cols, o);
    });
    out
}

fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

fn ids(v: Option<&Value>) -> Option<Vec<u64>> {
    match v? {
        Value::Number(n) => n.as_u64().map(|x| vec![x]),
        Value::Array(a) => a.iter().map(|x| x.as_u64()).collect(),
        _ => None,
    }
}

/// Whether the tokenizer.json post-processor prepends a special token (BOS) to a single
/// sequence: a `TemplateProcessing` whose `single` template starts with a `SpecialToken`,
/// possibly inside a `Sequence` of processors.
fn post_processor_adds_bos(pp: &Value) -> Option<bool> {
    match pp.get("type")?.as_str()? {
        "TemplateProcessing" => {
            let first = pp.get("single")?.as_array()?.first()?;
            Some(first.get("SpecialToken").is_some())
        }
        "Sequence" => {
            let mut any = None;
            for p in pp.get("processors")?.as_array()? {
                if let Some(b) = post_processor_adds_bos(p) {
                    any = Some(any.unwrap_or(false) || b);
                }
            }
            any
        }
        "BertProcessing" | "RobertaProcessing" => Some(true),
        _ => Some(false),
    }
}

/// Metadata fields about the tokenizer and stop tokens.
fn tokenizer_meta(ck: &Checkpoint, cfg_json: &Value, notes: &mut Vec<String>) -> Value {
    let text = cfg_json
        .get("text_config")
        .filter(|t| t.is_object())
        .unwrap_or(cfg_json);
    let cfg_get = |k: &str| {
        text.get(k)
            .filter(|v| !v.is_null())
            .or_else(|| cfg_json.get(k))
    };
    let kind = if ck.tokenizer_json.is_some() {
        Value::from("hf_json")
    } else if let Some(m) = &ck.tokenizer_model {
        // Meta's tiktoken file (Llama 4) or a SentencePiece model (Llama 2, Mistral, ...).
        let kind = ferroq::internals::tokenizer::TokenizerKind::detect(None, m);
        Value::from(match kind {
            ferroq::internals::tokenizer::TokenizerKind::SentencePiece => "sentencepiece",
            _ => "tiktoken",
        })
    } else {
        notes.push(
            "no tokenizer.json or tokenizer.model: the model can only run from token ids".into(),
        );
        Value::Null
    };
    let tc = ck.tokenizer_config.as_ref();
    let tok_json: Option<Value> = ck
        .tokenizer_json
        .as_ref()
        .and_then(|b| serde_json::from_slice(b).ok());
    let bos_token = token_str(tc.and_then(|t| t.get("bos_token")));
    let eos_token = token_str(tc.and_then(|t| t.get("eos_token")));
    let gc = ck.generation_config.as_ref();
    let bos_token_id = ids(gc.and_then(|g| g.get("bos_token_id")))
        .or_else(|| ids(cfg_get("bos_token_id")))
        .and_then(|v| v.first().copied());
    let stop: Vec<u64> = ids(gc.and_then(|g| g.get("eos_token_id")))
        .or_else(|| ids(cfg_get("eos_token_id")))
        .unwrap_or_default();
    let add_bos = match tok_json
        .as_ref()
        .and_then(|t| t.get("post_processor"))
        .filter(|p| !p.is_null())
    {
        Some(pp) => post_processor_adds_bos(pp).unwrap_or(false),
        None => match tc
            .and_then(|t| t.get("add_bos_token"))
            .and_then(|b| b.as_bool())
        {
            Some(b) => b,
            // HF builds the Llama 4 tiktoken tokenizer with a BOS-prepending post-processor,
            // and LlamaTokenizer (SentencePiece) defaults to add_bos_token = true
            None => ck.tokenizer_model.is_some(),
        },
    };
    json!({
        "tokenizer": {"kind": kind},
        "chat_template": ck.chat_template,
        "bos_token": bos_token,
        "eos_token": eos_token,
        "bos_token_id": bos_token_id,
        "stop_token_ids": stop,
        "add_bos": add_bos,
    })
}

/// The [`ModelConfig`] of a checkpoint: its `config.json` (read as the Hugging Face path reads
/// it) plus what the JSON cannot say (a GGUF file's RoPE frequency factors).
pub fn checkpoint_config(ck: &Checkpoint) -> Result<ModelConfig> {
    let mut cfg = model_config_from_hf(&ck.config)?;
    if let Some(f) = &ck.rope_freq_factors {
        cfg.rope_freq_factors = Some(f.clone());
        cfg.validate()?;
    }
    Ok(cfg)
}

/// Convert `ck` to a `.fqm` file at `out`. Nothing is left at `out` (or beside it) on error.
pub fn convert(
    ck: &Checkpoint,
    out: &Path,
    opts: &ConvertOptions,
    progress: &dyn Fn(ProgressEvent),
) -> Result<Report> {
    if cfg!(target_endian = "big") {
        return Err(Error::Other(
            "the .fqm format is little-endian; converting on a big-endian host is not supported"
                .into(),
        ));
    }
    let t0 = Instant::now();
    // before any work: the output may not overwrite what we read
    let origin = Path::new(&ck.origin);
    ferroq::internals::atomic::check_output(out, &[origin])?;
    let arch_name = architecture(&ck.config)?;
    let mut cfg = checkpoint_config(ck)?;
    cfg.rope_freq_bf16 = opts.rope_freq_bf16;
    let src = ck.source.as_ref();
    let mut notes = Vec::new();
    let mut fallbacks = Vec::new();
    let (planned, prefix) = plan(&cfg, src, opts, &mut notes, &mut fallbacks)?;
    if cfg.tie_word_embeddings && src.find(&format!("{prefix}lm_head.weight")).is_some() {
        notes.push(
            "tie_word_embeddings is set: lm_head.weight is ignored, the output uses tok_embeddings"
                .into(),
        );
    }
    if !matches!(
        opts.quant,
        Quant::Q4l | Quant::Q8 | Quant::Bf16 | Quant::F32
    ) && src.tensors().iter().any(|t| t.dtype == "q4_0")
    {
        notes.push(
            "the source stores Q4_0 weights: --quant q4l keeps them exactly (q4 re-quantizes \
             them to its codebook)"
                .into(),
        );
    }
    // the imatrix, checked against the model's tensors before anything is written
    let imatrix = match &opts.imatrix {
        Some(p) => Some(Imatrix::read_any(p, cfg.num_experts)?),
        None => None,
    };
    let im_cols = match (&imatrix, &opts.imatrix) {
        (Some(im), Some(p)) => im.for_model(&cfg, p)?,
        _ => Default::default(),
    };
    if imatrix.is_some() {
        let is4 = |d: DType| matches!(d, DType::Q4x8 | DType::Q4Lx8);
        let q4: Vec<&Planned> = planned.iter().filter(|p| is4(p.dtype)).collect();
        let missing = q4
            .iter()
            .filter(|p| !im_cols.contains_key(&p.spec.name))
            .count();
        if !q4.is_empty() && missing == q4.len() {
            return Err(Error::Input(format!(
                "the imatrix has statistics for none of the {} 4-bit matrices of this model",
                q4.len()
            )));
        }
        if missing > 0 {
            notes.push(format!(
                "{missing} of {} 4-bit matrices have no imatrix data (experts no calibration \
                 token was routed to?) and are quantized without it",
                q4.len()
            ));
        }
    }
    for n in &notes {
        progress(ProgressEvent::Note(n.clone()));
    }

    // source dtypes of the tensors we read
    let mut source_dtypes: BTreeMap<String, usize> = BTreeMap::new();
    {
        let mut seen = std::collections::HashSet::new();
        for pl in &planned {
            let n = match &pl.src {
                Src::Plain(n) | Src::Fused { name: n, .. } => n,
            };
            if seen.insert(n.clone()) {
                if let Some(t) = src.find(n) {
                    *source_dtypes.entry(t.dtype.clone()).or_default() += 1;
                }
            }
        }
    }

    let total_bytes: u64 = planned.iter().map(|p| p.nbytes as u64).sum();
    let total = planned.len();
    progress(ProgressEvent::Start {
        tensors: total,
        bytes: total_bytes,
        sizes: size_table(planned.iter().map(|p| {
            let n = p.spec.shape.iter().product::<usize>() as u64;
            (p.spec.name.as_str(), p.dtype, n, p.nbytes as u64)
        })),
    });

    let mut w = FqmWriter::create_from(out, &[origin])?;
    let mut bufs = Bufs::default();
    let mut done = 0u64;
    for (i, pl) in planned.iter().enumerate() {
        let in_mat = load(src, pl, &cfg, &mut bufs)?;
        let Bufs {
            src: sbuf,
            mat,
            out: obuf,
            ..
        } = &mut bufs;
        let data: &[f32] = if in_mat { mat } else { sbuf };
        // the imatrix's column statistics, or none: every column equally important (the
        // activation-free norm proxy this replaced made q4l worse than round-to-nearest,
        // docs/quantization.md)
        let col_w = im_cols.get(&pl.spec.name).map(|e| &e.values[..]);
        let bytes = encode(
            data,
            &pl.spec.shape,
            pl.dtype,
            col_w,
            opts.imatrix_weighting,
            obuf,
        );
        let align = match pl.spec.expert {
            // the first tensor of each routed expert starts on a page
            Some(_) if spec_is_expert_gate(pl.spec.key) => EXPERT_ALIGN,
            _ => TENSOR_ALIGN,
        };
        w.add_tensor(&pl.spec.name, pl.dtype, &pl.spec.shape, bytes, align)?;
        done += pl.nbytes as u64;
        let elapsed = t0.elapsed();
        let eta = (done > 0)
            .then(|| elapsed.mul_f64((total_bytes.saturating_sub(done)) as f64 / done as f64));
        progress(ProgressEvent::Tensor {
            index: i + 1,
            total,
            name: pl.spec.name.clone(),
            bytes_done: done,
            bytes_total: total_bytes,
            elapsed,
            eta,
        });
    }
    drop(bufs);

    // embedded files
    let mut blobs: Vec<(&str, Vec<u8>)> = Vec::new();
    if let Some(b) = &ck.tokenizer_json {
        blobs.push(("blob.tokenizer.json", b.clone()));
    }
    if let Some(b) = &ck.tokenizer_model {
        blobs.push(("blob.tokenizer.model", b.clone()));
    }
    if let Some(v) = &ck.tokenizer_config {
        blobs.push((
            "blob.tokenizer_config.json",
            serde_json::to_vec_pretty(v).unwrap_or_default(),
        ));
    }
    if let Some(v) = &ck.generation_config {
        blobs.push((
            "blob.generation_config.json",
            serde_json::to_vec_pretty(v).unwrap_or_default(),
        ));
    }
    for (name, b) in &blobs {
        w.add_tensor(name, DType::U8, &[b.len()], b, TENSOR_ALIGN)?;
    }

    // recipe
    let roles = [
        ("embedding", Role::Embedding),
        ("output", Role::Output),
        ("attention", Role::Attention),
        ("ffn", Role::Ffn),
        ("expert", Role::Expert),
        ("norm", Role::Norm),
        ("router", Role::Router),
    ];
    let mut role_map = serde_json::Map::new();
    for (k, r) in roles {
        role_map.insert(
            k.into(),
            Value::from(opts.dtype_for(r, cfg.tie_word_embeddings).name()),
        );
    }
    let recipe = json!({
        "quant": opts.quant.name(),
        "roles": role_map,
        "output_tensor_type": opts.output_type.map(DType::name),
        "token_embedding_type": opts.embedding_type.map(DType::name),
        "fallbacks": fallbacks,
        "imatrix": imatrix.as_ref().map(|im| json!({
            "dataset": im.dataset,
            "chunks": im.n_chunks,
            "n_ctx": im.n_ctx,
            "tensors": im_cols.len(),
            "weighting": match opts.imatrix_weighting {
                ImatrixWeighting::Multiply => "multiply",
                ImatrixWeighting::Replace => "replace",
            },
        })),
        "notes": match opts.quant {
            Quant::Q4 => "q4x8 for attention, FFN and expert matrices; embedding and output at q6x8 (6.5 bits per weight, 64 linear levels); norms and router f32; 4-bit scales chosen per 32-weight block by a windowed search (32 candidate scales per sign around the edge scale) minimising the squared error weighted by sqrt(sigma^2 + x^2) (ggml's weighting)",
            Quant::Q4m => "as q4, with the value and FFN down projections at q8x8",
            Quant::Q4l => "as q4 with the linear 4-bit grid (q4lx8, levels q - 8, the scale search of q4) instead of the codebook",
            Quant::Q8 => "q8x8 for all matrices; norms and router f32",
            Quant::Bf16 => "bf16 for all matrices; norms and router f32",
            Quant::F32 => "f32 everywhere",
            Quant::MixM => "as q4, with the value and every down projection at q8x8 in the first and last eighth of the layers and every third layer between (llama.cpp's Q4_K_M rule, with 8 bits where it uses 6)",
            Quant::MixL => "as q4-m, with the output (and a tied embedding) at q8x8",
            Quant::MixUd => "dynamic mix: routed experts q4x8 (down q8x8 in the first and last layer), wq and wk q4x8, wv and wo q8x8, shared expert q8x8, dense FFN q4x8 with its down projection q8x8, every matrix of the first and last layer q8x8 except the routed experts' gate/up, embedding q6x8, output q8x8",
        },
        "mix": size_table(planned.iter().map(|p| {
            let n = p.spec.shape.iter().product::<usize>() as u64;
            (p.spec.name.as_str(), p.dtype, n, p.nbytes as u64)
        })).iter().map(|r| json!({
            "class": r.class, "type": r.dtype.name(), "tensors": r.tensors,
            "weights": r.params, "bytes": r.bytes,
        })).collect::<Vec<_>>(),
    });
    let tok = tokenizer_meta(ck, &ck.config, &mut notes);
    let mut meta = json!({
        "ferroq_format": ferroq::internals::format::VERSION,
        "config": serde_json::to_value(&cfg).map_err(|e| Error::Other(format!("config: {e}")))?,
        "provenance": {
            "source": ck.origin,
            "architecture": arch_name,
            "source_dtypes": source_dtypes,
            "converter": format!("ferroq {}", env!("CARGO_PKG_VERSION")),
            "quant": opts.quant.name(),
        },
        "recipe": recipe.clone(),
    });
    if let (Some(m), Some(t)) = (meta.as_object_mut(), tok.as_object()) {
        for (k, v) in t {
            m.insert(k.clone(), v.clone());
        }
    }
    // the model must load as `ferroq run` will load it: directory, config, tensor types,
    // tokenizer and chat template; only then does it get its final name
    w.finish_checked(&meta, |tmp| check_written(tmp, out))?;
    let file_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len();
    let elapsed = t0.elapsed();
    progress(ProgressEvent::Done {
        path: out.to_path_buf(),
        bytes: file_bytes,
        elapsed,
    });
    Ok(Report {
        path: out.to_path_buf(),
        tensors: total,
        file_bytes,
        elapsed,
        notes,
        recipe,
    })
}

/// Open the model just written at `tmp` (to be renamed to `out`) as the runtime will: the
/// directory and tensor types, then the tokenizer and chat template it embeds, whose ids must
/// fit the model's vocabulary. Errors name `out`, not the temporary file.
fn check_written(tmp: &Path, out: &Path) -> Result<()> {
    let rename = |e: Error| {
        let msg = e
            .to_string()
            .replace(&tmp.display().to_string(), &out.display().to_string());
        Error::Other(format!(
            "{}: the converted model does not load, so it was not written: {msg}",
            out.display()
        ))
    };
    let model = ferroq::internals::model::Model::open(tmp).map_err(rename)?;
    let has_tokenizer = model
        .file
        .meta()
        .get("tokenizer")
        .and_then(|t| t.get("kind"))
        .is_some_and(|k| !k.is_null());
    if !has_tokenizer {
        return Ok(());
    }
    let vocab = model.config.vocab_size;
    let engine = ferroq::internals::engine::Engine::from_model(model).map_err(rename)?;
    let n = engine.tokenizer().vocab_size();
    if n > vocab {
        return Err(rename(Error::config(
            "vocab_size",
            format!(
                "the tokenizer defines ids up to {} but the model has only {vocab} embedding \
                 rows (the tokenizer does not belong to this model?)",
                n - 1
            ),
        )));
    }
    Ok(())
}
