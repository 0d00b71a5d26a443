//! `ferroq logits`: logits of every position for a list of token ids, written as safetensors.

use ferroq::internals::model::{KvType, Logits, Model, State};
use ferroq::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    model: PathBuf,
    /// Check every tensor against the file's checksums before running (reads the whole model).
    #[arg(long)]
    verify: bool,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Threads (0 = all cores). Results do not depend on it.
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// KV cache type: f32, f16, q8 or q4 (default: f32 for unquantized models, f16 for quantized
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
    // refuse a bad output path before any work (an existing directory, the model itself)
    ferroq::internals::atomic::check_output(&a.output, &[&a.model])?;
    let mut model = Model::open(&a.model)?;
    if a.verify {
        model.file.verify(&|_, _| {})?;
    }
    if a.ctx_override {
        model.allow_any_context();
    }
    let c = &model.config;
    let (t, v, hs, nl) = (a.ids.len(), c.vocab_size, c.hidden_size, c.num_layers);
    let batch = if a.decode { 1 } else { t };
    // the buffers below hold t × vocab (and (L + 1) × t × hidden) floats: sizes checked and
    // allocated fallibly, so 10^4 ids on a 49k vocabulary is an error naming `ids`, not an abort
    let buf = |what: &str, n: Option<usize>| -> Result<Vec<f32>> {
        n.and_then(|n| bytemuck::allocation::try_zeroed_vec(n).ok())
            .ok_or_else(|| {
                Error::config(
                    "ids",
                    format!(
                        "{t} ids need a {what} buffer of {:.1} GiB, which cannot be allocated; \
                         pass fewer ids",
                        n.map_or(f64::INFINITY, |n| n as f64 * 4.0 / (1u64 << 30) as f64)
                    ),
                )
            })
    };
    let mut logits = buf("logits", t.checked_mul(v))?;
    let mut hidden = if a.hidden {
        buf(
            "hidden-state",
            t.checked_mul(hs).and_then(|x| x.checked_mul(nl + 1)),
        )?
    } else {
        vec![]
    };
    let mut st = State::try_with_kv(
        &model,
        t,
        batch,
        true,
        a.threads,
        a.kv.unwrap_or(model.default_kv()),
    )
    .map_err(|e| match e {
        // the state's logits rows scale with the number of ids here
        Error::Config { field, msg } if field == "batch" => Error::config(
            "ids",
            format!("{t} ids at once: {msg}; pass fewer ids (or --decode)"),
        ),
        e => e,
    })?;
    for (step, chunk) in a.ids.chunks(batch).enumerate() {
        let t0 = step * batch;
        let mut obs = |layer: usize, _name: &str, h: &[f32]| {
            for (i, row) in h.chunks(hs).enumerate() {
                let at = (layer * t + t0 + i) * hs;
                hidden[at..at + hs].copy_from_slice(row);
            }
        };
        let o: Option<ferroq::internals::model::forward::Observer> =
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

/// Write f32 tensors as a safetensors file (through [`ferroq::internals::atomic::AtomicFile`]: a
/// temporary name in the same directory, renamed when complete, removed on error).
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
    let mut f = ferroq::internals::atomic::AtomicFile::create(path, &[])?;
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for (_, _, data) in tensors {
        f.write_all(bytemuck::cast_slice(data))?;
    }
    f.commit()
}

/// Parse `--kv`.
pub fn parse_kv(s: &str) -> std::result::Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type `{s}` ({})", KvType::NAMES))
}
