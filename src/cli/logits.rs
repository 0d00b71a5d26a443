//! `ferroq logits`: logits of every position for a list of token ids, written as safetensors.

use ferroq::model::{KvType, Logits, Model, State};
use ferroq::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    model: PathBuf,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Threads (0 = all cores). Results do not depend on it.
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// KV cache type: f32, f16 or q8 (default: f32 for unquantized models, f16 for quantized
    /// ones).
    #[arg(long, value_parser = parse_kv)]
    kv: Option<KvType>,
    /// Allow more positions than the model's max_position_embeddings.
    #[arg(long)]
    ctx_override: bool,
    /// Output safetensors file (tensor `logits` [T, V] f32).
    #[arg(short, long)]
    output: PathBuf,
    /// Feed the ids one at a time through the KV cache instead of one prefill.
    #[arg(long)]
    decode: bool,
    /// Also write `hidden_states` [L+1, T, H]: the embeddings, then each layer's output.
    #[arg(long)]
    hidden: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut model = Model::open(&a.model)?;
    if a.ctx_override {
        model.allow_any_context();
    }
    let c = &model.config;
    let (t, v, hs, nl) = (a.ids.len(), c.vocab_size, c.hidden_size, c.num_layers);
    let batch = if a.decode { 1 } else { t };
    let mut st = State::try_with_kv(
        &model,
        t,
        batch,
        true,
        a.threads,
        a.kv.unwrap_or(model.default_kv()),
    )?;
    let mut logits = vec![0f32; t * v];
    let mut hidden = if a.hidden {
        vec![0f32; (nl + 1) * t * hs]
    } else {
        vec![]
    };
    for (step, chunk) in a.ids.chunks(batch).enumerate() {
        let t0 = step * batch;
        let mut obs = |layer: usize, _name: &str, h: &[f32]| {
            for (i, row) in h.chunks(hs).enumerate() {
                let at = (layer * t + t0 + i) * hs;
                hidden[at..at + hs].copy_from_slice(row);
            }
        };
        let o: Option<ferroq::model::forward::Observer> =
            if a.hidden { Some(&mut obs) } else { None };
        model.forward_observed(&mut st, chunk, Logits::All, o)?;
        logits[t0 * v..(t0 + chunk.len()) * v].copy_from_slice(st.logits());
    }
    let mut tensors = vec![("logits", vec![t, v], &logits[..])];
    if a.hidden {
        tensors.push(("hidden_states", vec![nl + 1, t, hs], &hidden[..]));
    }
    write_safetensors_f32(&a.output, &tensors)
}

/// Write f32 tensors as a safetensors file (to a temporary name, renamed when complete).
pub fn write_safetensors_f32(
    path: &std::path::Path,
    tensors: &[(&str, Vec<usize>, &[f32])],
) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (name, shape, data) in tensors {
        let n = data.len() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))
        .map_err(|e| Error::Other(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut buf = Vec::with_capacity(8 + h.len() + off);
    buf.extend_from_slice(&(h.len() as u64).to_le_bytes());
    buf.extend_from_slice(&h);
    for (_, _, data) in tensors {
        buf.extend_from_slice(bytemuck::cast_slice(data));
    }
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &buf).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Parse `--kv`.
pub fn parse_kv(s: &str) -> std::result::Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type `{s}` (f32, f16, q8)"))
}
