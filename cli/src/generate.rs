//! `ferroq generate`: greedy continuation of token ids (KV cache, no stop tokens), printed as a
//! JSON array.

use ferroq::internals::model::{KvType, Logits, Model, State};
use ferroq::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    model: PathBuf,
    /// Check every tensor against the file's checksums before running (reads the whole model).
    #[arg(long)]
    verify: bool,
    /// Comma-separated prompt token ids.
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
    /// Number of tokens to generate.
    #[arg(short = 'n', long, default_value_t = 16)]
    n_predict: usize,
}

pub fn run(a: Args) -> Result<()> {
    let mut model = Model::open(&a.model)?;
    if a.verify {
        model.file.verify(&|_, _| {})?;
    }
    if a.ctx_override {
        model.allow_any_context();
    }
    let ctx = a.ids.len().saturating_add(a.n_predict);
    let mut st = State::try_with_kv(
        &model,
        ctx,
        a.ids.len().max(1),
        false,
        a.threads,
        a.kv.unwrap_or(model.default_kv()),
    )?;
    model.forward(&mut st, &a.ids, Logits::Last)?;
    let mut out = Vec::with_capacity(a.n_predict);
    for i in 0..a.n_predict {
        let next = argmax(st.logits());
        out.push(next);
        if i + 1 < a.n_predict {
            model.forward(&mut st, &[next], Logits::Last)?;
        }
    }
    println!("{}", serde_json::to_string(&out).expect("ids serialize"));
    Ok(())
}

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Parse `--kv`.
pub fn parse_kv(s: &str) -> std::result::Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| format!("unknown KV cache type `{s}` ({})", KvType::NAMES))
}
