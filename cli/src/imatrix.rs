//! `ferroq imatrix -m M.fqm -f CALIB.txt -o imatrix.bin [-c 512] [--chunks N]`: the per-column
//! mean squared activations of every matrix input over a calibration text, for
//! `ferroq convert --imatrix` (see `ferroq_convert::imatrix`).

use super::perplexity::{bar, bos_of, read_ids};
use ferroq::internals::engine::tokenizer_from_fqm;
use ferroq::internals::model::Model;
use ferroq::internals::perplexity::{ChunkPlan, RunOptions};
use ferroq::{Error, Result};
use ferroq_convert::imatrix::collect;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm) to collect on: an f32, bf16 or q8 conversion of the source that will be
    /// quantized (collecting on a 4-bit file measures its errors, not the model).
    #[arg(short, long)]
    model: PathBuf,
    /// Calibration text (never the text you evaluate on).
    #[arg(short = 'f', long, required_unless_present = "tokens")]
    file: Option<PathBuf>,
    /// Token ids instead of a text (ids separated by commas, spaces or newlines; used as they
    /// are).
    #[arg(long, conflicts_with = "file")]
    tokens: Option<PathBuf>,
    /// Output imatrix file.
    #[arg(short, long, default_value = "imatrix.bin")]
    output: PathBuf,
    /// Tokens per chunk (each chunk runs from an empty cache, like llama-imatrix's -c).
    #[arg(short = 'c', long, default_value_t = 512)]
    ctx: usize,
    /// Use at most this many chunks (default: all that fit).
    #[arg(long)]
    chunks: Option<usize>,
    /// Tokens per forward call (default: the context).
    #[arg(short = 'b', long)]
    batch: Option<usize>,
    /// Threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
}

pub fn run(a: Args) -> Result<()> {
    let model = Model::open(&a.model)?;
    let bos = bos_of(&model);
    let (tokens, source) = match (&a.file, &a.tokens) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            let tok = tokenizer_from_fqm(&model.file)?;
            (tok.encode(&text, bos.is_some()), f)
        }
        (None, Some(t)) => (read_ids(t)?, t),
        (None, None) => {
            return Err(Error::Input(
                "give a calibration text with -f FILE (or token ids with --tokens FILE)".into(),
            ))
        }
    };
    let plan = ChunkPlan::new(tokens.len(), a.ctx, a.chunks)?;
    let opt = RunOptions {
        batch: a.batch.unwrap_or(plan.n_ctx),
        threads: a.threads,
        kv: model.default_kv(),
        bos,
    };
    eprintln!(
        "imatrix: {} tokens, {} chunks of {}",
        tokens.len(),
        plan.n_chunk,
        plan.n_ctx
    );
    let t0 = Instant::now();
    let pb = bar(plan.n_chunk, "imatrix");
    let mut im = collect(&model, &tokens, &plan, &opt, |_, ppl| {
        pb.set_message(format!("PPL {ppl:.4}"));
        pb.inc(1);
    })?;
    pb.finish_and_clear();
    im.dataset = source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    im.write(&a.output)?;
    let experts = model.config.num_experts * model.config.layers.iter().filter(|l| l.moe).count();
    let seen = im
        .entries
        .iter()
        .filter(|e| e.tensors[0].contains(".experts.") && e.tensors[0].ends_with(".gate"))
        .count();
    let mut line = format!(
        "wrote {} ({} inputs, {} chunks of {}) in {:.1} s",
        a.output.display(),
        im.entries.len(),
        plan.n_chunk,
        plan.n_ctx,
        t0.elapsed().as_secs_f64()
    );
    if experts > 0 {
        line += &format!("; {seen} of {experts} routed experts seen");
    }
    println!("{line}");
    if experts > seen {
        eprintln!(
            "note: {} routed experts got no token of the text; convert quantizes them without \
             weighting (a longer text covers more)",
            experts - seen
        );
    }
    Ok(())
}
