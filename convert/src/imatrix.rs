//! Importance matrices (`ferroq imatrix`, `ferroq convert --imatrix`): per input column of every
//! matrix product, the mean of the squared activations over a calibration text.
//!
//! Minimising `Σ_t ‖(W − Ŵ) x_t‖²` over a text is, with the activations' cross terms dropped,
//! minimising `Σ_c E[x_c²] Σ_r (w_rc − ŵ_rc)²`: each column's error weighs by the mean square
//! of the input it multiplies. That is what llama.cpp's `llama-imatrix` collects and what its
//! quantizers weigh by; the statistics here are the same (routed experts counted per expert
//! over the tokens routed to them, Llama 4's inputs already scaled by the router's sigmoid).
//!
//! The collector is a [`Probe`] on the forward pass: without it nothing is gathered.
//!
//! # File format (`imatrix.bin`, little-endian)
//! ```text
//! magic      8 bytes  "FQIMAT\0\x01"
//! n_entries  u32
//! n_chunks   u32      chunks of the calibration text
//! n_ctx      u32      tokens per chunk
//! dataset    u32 length + UTF-8 bytes (≤ 4096): the calibration text's file name
//! model      u32 length + UTF-8 bytes (≤ 4096): what it was collected on (architecture, shape)
//! entry × n_entries:
//!   n_names  u16 (1 ..= 16), then each name: u16 length (1 ..= 256) + UTF-8 bytes:
//!            the .fqm tensors that read this input (e.g. layers.0.wq, layers.0.wk, layers.0.wv)
//!   n_cols   u32 (1 ..= 2^24)
//!   rows     u64      activation rows seen (tokens, or tokens routed to the expert)
//!   values   f32 × n_cols: mean of x² per column (finite, ≥ 0)
//! checksum   u64      xxh64 (seed 0) of every byte before it
//! ```
//! An input seen by no token (an expert never routed to) has no entry: the converter quantizes
//! its tensors without weighting.

use ferroq::internals::format::xxh64;
use ferroq::internals::model::probe::{Input, Point, Probe};
use ferroq::internals::model::tensors::{LayerTensor, Proj, TensorKey};
use ferroq::internals::model::{tensor_table, Logits, Model, ModelConfig};
use ferroq::internals::perplexity::{for_each_batch, nll, ChunkPlan, NllStats, RunOptions};
use ferroq::{Error, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The magic bytes of an imatrix file (version 1).
pub const MAGIC: &[u8; 8] = b"FQIMAT\0\x01";
const MAX_NAMES: usize = 16;
const MAX_NAME: usize = 256;
const MAX_TEXT: usize = 4096;
const MAX_COLS: usize = 1 << 24;

/// The statistics of one matrix input.
#[derive(Clone, PartialEq)]
pub struct Entry {
    /// The tensors (file names) that multiply this input.
    pub tensors: Vec<String>,
    /// Activation rows seen.
    pub rows: u64,
    /// Mean of x² per column.
    pub values: Vec<f32>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("tensors", &self.tensors)
            .field("rows", &self.rows)
            .field("cols", &self.values.len())
            .finish()
    }
}

/// An importance matrix.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Imatrix {
    pub entries: Vec<Entry>,
    pub n_chunks: u32,
    pub n_ctx: u32,
    /// The calibration text's name.
    pub dataset: String,
    /// What it was collected on.
    pub model: String,
}

fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let b = &s.as_bytes()[..s.len().min(max)];
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// A bounds-checked reader of the file's bytes.
struct Cur<'a> {
    b: &'a [u8],
    at: usize,
    path: &'a Path,
}

impl<'a> Cur<'a> {
    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(self.path, format!("imatrix file, byte {}: {msg}", self.at))
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            return Err(self.err(format!(
                "truncated ({what} needs {n} bytes, {} left)",
                self.b.len() - self.at
            )));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        let s = self.take(2, what)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        let s = self.take(4, what)?;
        Ok(u32::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        let s = self.take(8, what)?;
        Ok(u64::from_le_bytes(s.try_into().unwrap_or_default()))
    }
    fn str(&mut self, n: usize, what: &str) -> Result<String> {
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }
}

impl Imatrix {
    /// The file's bytes (see the module documentation).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.n_chunks.to_le_bytes());
        out.extend_from_slice(&self.n_ctx.to_le_bytes());
        put_str(&mut out, &self.dataset, MAX_TEXT);
        put_str(&mut out, &self.model, MAX_TEXT);
        for e in &self.entries {
            out.extend_from_slice(&(e.tensors.len() as u16).to_le_bytes());
            for n in &e.tensors {
                out.extend_from_slice(&(n.len() as u16).to_le_bytes());
                out.extend_from_slice(n.as_bytes());
            }
            out.extend_from_slice(&(e.values.len() as u32).to_le_bytes());
            out.extend_from_slice(&e.rows.to_le_bytes());
            for v in &e.values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let h = xxh64(&out);
        out.extend_from_slice(&h.to_le_bytes());
        out
    }

    /// Parse a file's bytes; `path` names it in errors. Never panics on bad input.
    pub fn from_bytes(b: &[u8], path: &Path) -> Result<Imatrix> {
        if b.len() < MAGIC.len() + 8 || &b[..MAGIC.len()] != MAGIC {
            return Err(Error::format(
                path,
                "not a ferroq imatrix file (no FQIMAT magic; make one with `ferroq imatrix`)",
            ));
        }
        let (body, sum) = b.split_at(b.len() - 8);
        let want = u64::from_le_bytes(sum.try_into().unwrap_or_default());
        if xxh64(body) != want {
            return Err(Error::format(
                path,
                "imatrix checksum mismatch (the file is damaged or truncated)",
            ));
        }
        let mut c = Cur {
            b: body,
            at: MAGIC.len(),
            path,
        };
        let n = c.u32("n_entries")? as usize;
        let n_chunks = c.u32("n_chunks")?;
        let n_ctx = c.u32("n_ctx")?;
        let text = |c: &mut Cur, what: &str| -> Result<String> {
            let n = c.u32(what)? as usize;
            if n > MAX_TEXT {
                return Err(c.err(format!("{what} is {n} bytes long (at most {MAX_TEXT})")));
            }
            c.str(n, what)
        };
        let dataset = text(&mut c, "dataset")?;
        let model = text(&mut c, "model")?;
        // each entry takes at least 2 + 3 + 4 + 8 + 4 bytes: bounds the allocation
        if n > (body.len() - c.at) / 21 {
            return Err(c.err(format!("{n} entries cannot fit in the file")));
        }
        let mut entries = Vec::with_capacity(n);
        let mut seen = std::collections::HashSet::new();
        for i in 0..n {
            let nn = c.u16("n_names")? as usize;
            if nn == 0 || nn > MAX_NAMES {
                return Err(c.err(format!("entry {i} names {nn} tensors (1 ..= {MAX_NAMES})")));
            }
            let mut tensors = Vec::with_capacity(nn);
            for _ in 0..nn {
                let l = c.u16("name length")? as usize;
                if l == 0 || l > MAX_NAME {
                    return Err(c.err(format!(
                        "entry {i}: a tensor name of {l} bytes (1 ..= {MAX_NAME})"
                    )));
                }
                let name = c.str(l, "tensor name")?;
                if !seen.insert(name.clone()) {
                    return Err(c.err(format!("tensor `{name}` appears twice")));
                }
                tensors.push(name);
            }
            let cols = c.u32("n_cols")? as usize;
            if cols == 0 || cols > MAX_COLS {
                return Err(c.err(format!(
                    "`{}` has {cols} columns (1 ..= {MAX_COLS})",
                    tensors[0]
                )));
            }
            let rows = c.u64("rows")?;
            let raw = c.take(cols * 4, "values")?;
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|v| f32::from_le_bytes([v[0], v[1], v[2], v[3]]))
                .collect();
            if let Some(bad) = values.iter().find(|v| !v.is_finite() || **v < 0.0) {
                return Err(c.err(format!(
                    "`{}` has the value {bad} (mean squares are finite and ≥ 0)",
                    tensors[0]
                )));
            }
            entries.push(Entry {
                tensors,
                rows,
                values,
            });
        }
        if c.at != body.len() {
            return Err(c.err(format!("{} bytes after the last entry", body.len() - c.at)));
        }
        Ok(Imatrix {
            entries,
            n_chunks,
            n_ctx,
            dataset,
            model,
        })
    }

    /// Read an imatrix file.
    pub fn read(path: &Path) -> Result<Imatrix> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Imatrix::from_bytes(&b, path)
    }

    /// Read an imatrix file of ferroq's format or of llama.cpp's (`llama-imatrix`: GGUF or the
    /// legacy `.dat`, [`super::imatrix_llama`]) for a model with `n_experts` routed experts per
    /// MoE layer.
    pub fn read_any(path: &Path, n_experts: usize) -> Result<Imatrix> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if !b.starts_with(MAGIC) && super::imatrix_llama::is_llama(&b) {
            return super::imatrix_llama::read(b, n_experts, path);
        }
        Imatrix::from_bytes(&b, path)
    }

    /// Write to `path` (a temporary name, renamed when complete).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, self.to_bytes()).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// The column statistics of each tensor, checked against the model's tensor table: every
    /// tensor the file names must be a matrix of the model with as many columns. `path` names
    /// the file in errors.
    pub fn for_model(&self, cfg: &ModelConfig, path: &Path) -> Result<HashMap<String, &Entry>> {
        let shapes: HashMap<String, Vec<usize>> = tensor_table(cfg)
            .into_iter()
            .map(|s| (s.name, s.shape))
            .collect();
        let mut out = HashMap::new();
        for e in &self.entries {
            for t in &e.tensors {
                let what = |msg: String| {
                    Error::tensor(
                        t.as_str(),
                        format!(
                            "{msg} (imatrix {}, collected on {}: made for another model?)",
                            path.display(),
                            if self.model.is_empty() {
                                "?"
                            } else {
                                &self.model
                            }
                        ),
                    )
                };
                match shapes.get(t) {
                    None => return Err(what("is in the imatrix but not in this model".into())),
                    Some(s) if s.len() != 2 => {
                        return Err(what(format!("is not a matrix in this model ({s:?})")))
                    }
                    Some(s) if s[1] != e.values.len() => {
                        return Err(what(format!(
                            "has {} columns in the imatrix but {} in this model",
                            e.values.len(),
                            s[1]
                        )))
                    }
                    Some(_) => {}
                }
                if e.rows > 0 {
                    out.insert(t.clone(), e);
                }
            }
        }
        Ok(out)
    }
}

/// A sortable key of a matrix input within its layer (the order of the forward pass).
fn input_rank(i: Input) -> (u8, usize) {
    match i {
        Input::Qkv => (0, 0),
        Input::Wo => (1, 0),
        Input::FfnGateUp => (2, 0),
        Input::FfnDown => (3, 0),
        Input::Moe => (4, 0),
        Input::SharedDown => (5, 0),
        Input::ExpertGateUp(e) => (6, 2 * e),
        Input::ExpertDown(e) => (6, 2 * e + 1),
        Input::Output => (7, 0),
    }
}

/// The tensors of `cfg` that read `input` of `layer`.
pub fn tensors_of(cfg: &ModelConfig, layer: usize, input: Input) -> Vec<TensorKey> {
    use LayerTensor as L;
    let l = |t| TensorKey::Layer(layer, t);
    match input {
        Input::Qkv => vec![l(L::Wq), l(L::Wk), l(L::Wv)],
        Input::Wo => vec![l(L::Wo)],
        Input::FfnGateUp => vec![l(L::Ffn(Proj::Gate)), l(L::Ffn(Proj::Up))],
        Input::FfnDown => vec![l(L::Ffn(Proj::Down))],
        Input::Moe => vec![l(L::Shared(Proj::Gate)), l(L::Shared(Proj::Up))],
        Input::SharedDown => vec![l(L::Shared(Proj::Down))],
        Input::ExpertGateUp(e) => vec![l(L::Expert(e, Proj::Gate)), l(L::Expert(e, Proj::Up))],
        Input::ExpertDown(e) => vec![l(L::Expert(e, Proj::Down))],
        Input::Output if cfg.tie_word_embeddings => vec![TensorKey::TokEmbeddings],
        Input::Output => vec![TensorKey::Output],
    }
}

struct Acc {
    input: Input,
    sum: Vec<f64>,
    rows: u64,
}

/// The probe that sums the squares of every matrix input, per column.
pub struct Collector {
    widths: [usize; 4],
    acc: BTreeMap<(usize, (u8, usize)), Acc>,
}

impl Collector {
    pub fn new(cfg: &ModelConfig) -> Collector {
        Collector {
            widths: [
                cfg.hidden_size,
                cfg.num_heads * cfg.head_dim,
                cfg.intermediate_size,
                cfg.moe_intermediate_size,
            ],
            acc: BTreeMap::new(),
        }
    }

    /// The width of the rows of `input`.
    fn width(&self, input: Input) -> usize {
        let [h, q, i, m] = self.widths;
        match input {
            Input::Qkv | Input::FfnGateUp | Input::Moe | Input::ExpertGateUp(_) | Input::Output => {
                h
            }
            Input::Wo => q,
            Input::FfnDown => i,
            Input::SharedDown | Input::ExpertDown(_) => m,
        }
    }

    /// The statistics gathered so far, as an imatrix over the tensors of `cfg` (entries of the
    /// tensors the model has, in the order of the forward pass).
    pub fn finish(&self, cfg: &ModelConfig) -> Imatrix {
        let names: std::collections::HashSet<String> =
            tensor_table(cfg).into_iter().map(|s| s.name).collect();
        let mut entries = Vec::new();
        for (&(layer, _), a) in &self.acc {
            let tensors: Vec<String> = tensors_of(cfg, layer, a.input)
                .into_iter()
                .map(|k| k.to_string())
                .filter(|n| names.contains(n))
                .collect();
            if tensors.is_empty() || a.rows == 0 {
                continue;
            }
            let r = a.rows as f64;
            entries.push(Entry {
                tensors,
                rows: a.rows,
                values: a.sum.iter().map(|&s| (s / r) as f32).collect(),
            });
        }
        Imatrix {
            entries,
            ..Imatrix::default()
        }
    }
}

impl Probe for Collector {
    fn wants(&self, point: Point) -> bool {
        matches!(point, Point::MatInput(_))
    }
    fn observe(&mut self, layer: usize, point: Point, data: &[f32]) {
        let Point::MatInput(input) = point else {
            return;
        };
        let w = self.width(input);
        if w == 0 || data.is_empty() {
            return;
        }
        let a = self
            .acc
            .entry((layer, input_rank(input)))
            .or_insert_with(|| Acc {
                input,
                sum: vec![0.0; w],
                rows: 0,
            });
        for row in data.chunks_exact(w) {
            for (s, &x) in a.sum.iter_mut().zip(row) {
                *s += (x as f64) * (x as f64);
            }
            a.rows += 1;
        }
    }
}

/// A short description of the model an imatrix is collected on.
pub fn describe(model: &Model) -> String {
    let c = &model.config;
    format!(
        "{} layers, hidden {}, vocab {}, {} experts",
        c.num_layers, c.hidden_size, c.vocab_size, c.num_experts
    )
}

/// Collect an imatrix over the chunks of `plan` (each from an empty cache, its first token
/// replaced by `opt.bos` as `ferroq perplexity` does); `progress(chunk, ppl)` after each chunk
/// with the perplexity of the second halves so far (a sanity check of the model).
pub fn collect(
    model: &Model,
    tokens: &[u32],
    plan: &ChunkPlan,
    opt: &RunOptions,
    mut progress: impl FnMut(usize, f64),
) -> Result<Imatrix> {
    let (n_ctx, first, v) = (plan.n_ctx, plan.first(), model.config.vocab_size);
    let mut col = Collector::new(&model.config);
    let mut s = NllStats::default();
    for_each_batch(model, tokens, plan, opt, |st, b| {
        // all logits: the output projection's input is observed for every row
        model.forward_probed(st, b.input, Logits::All, Some(&mut col))?;
        let out = st.logits();
        let p1 = b.p0 + b.input.len();
        for p in b.p0.max(first)..p1.min(n_ctx - 1) {
            let r = p - b.p0;
            s.add(nll(&out[r * v..(r + 1) * v], b.tokens[p + 1] as usize));
        }
        if b.last {
            progress(b.chunk, s.ppl());
        }
        Ok(())
    })?;
    let mut im = col.finish(&model.config);
    im.n_chunks = plan.n_chunk as u32;
    im.n_ctx = n_ctx as u32;
    im.model = describe(model);
    Ok(im)
}
