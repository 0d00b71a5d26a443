//! `ferroq perplexity -m M.fqm -f TEXT [-c 512] [--chunks N] [-b B] [--json]
//! [--kld-base FILE | --kld FILE]`: perplexity and KL divergence computed like
//! `llama-perplexity` (see `ferroq::internals::perplexity`).

use ferroq::internals::engine::tokenizer_from_fqm;
use ferroq::internals::model::{KvType, Model};
use ferroq::internals::perplexity::{
    perplexity, row_len, run_chunks, ChunkPlan, KldReader, KldStats, KldWriter, NllStats,
    RunOptions,
};
use ferroq::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    model: PathBuf,
    /// Text file to evaluate (tokenized with the model's tokenizer, BOS first when the model
    /// adds one). Not needed with --kld (the tokens come from the file).
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Token ids to evaluate instead of a text: a file of ids separated by commas, spaces or
    /// newlines (a JSON array works). Used as they are (no BOS added in front).
    #[arg(long, conflicts_with = "file")]
    tokens: Option<PathBuf>,
    /// Tokens per chunk (llama.cpp's -c).
    #[arg(short = 'c', long, default_value_t = 512)]
    ctx: usize,
    /// Evaluate at most this many chunks (default: all that fit).
    #[arg(long)]
    chunks: Option<usize>,
    /// Tokens per forward call (default: the context). Results hardly depend on it.
    #[arg(short = 'b', long)]
    batch: Option<usize>,
    /// Threads (0 = all cores). Results do not depend on it.
    #[arg(short = 't', long, default_value_t = 0)]
    threads: usize,
    /// KV cache type: f32, f16, q8 or q4 (default: f32 for unquantized models, f16 for quantized
    /// ones).
    #[arg(long, value_parser = super::logits::parse_kv)]
    kv: Option<KvType>,
    /// Save the model's log-probabilities of the scored tokens to FILE (llama.cpp's
    /// --kl-divergence-base format), for later `--kld FILE` runs of other models.
    #[arg(long, value_name = "FILE", conflicts_with = "kld")]
    kld_base: Option<PathBuf>,
    /// Compare with the log-probabilities saved in FILE: KL divergence, top-1 agreement, Δp.
    #[arg(long, value_name = "FILE")]
    kld: Option<PathBuf>,
    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// The model's BOS when it adds one at the start of a text.
pub(crate) fn bos_of(model: &Model) -> Option<u32> {
    let m = model.file.meta();
    let add = m.get("add_bos").and_then(|v| v.as_bool()).unwrap_or(false);
    let id = m
        .get("bos_token_id")
        .and_then(|v| v.as_u64())
        .and_then(|x| u32::try_from(x).ok());
    id.filter(|&b| add && (b as usize) < model.config.vocab_size)
}

pub(crate) fn read_ids(path: &Path) -> Result<Vec<u32>> {
    let s = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    s.split(|c: char| c == ',' || c == '[' || c == ']' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .map(|w| {
            w.parse::<u32>()
                .map_err(|_| Error::format(path, format!("`{w}` is not a token id")))
        })
        .collect()
}

pub(crate) fn bar(n: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(n as u64);
    b.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:40}} {{pos}}/{{len}} chunks {what} {{msg}} (ETA {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    b
}

pub fn run(a: Args) -> Result<()> {
    let model = Model::open(&a.model)?;
    let v = model.config.vocab_size;
    let bos = bos_of(&model);
    let opt = |n_ctx: usize| RunOptions {
        batch: a.batch.unwrap_or(n_ctx),
        threads: a.threads,
        kv: a.kv.unwrap_or(model.default_kv()),
        bos,
    };
    let t0 = Instant::now();

    if let Some(path) = &a.kld {
        // compare with a saved reference: the tokens and the context come from the file
        let mut r = KldReader::open(path)?;
        if r.n_vocab != v {
            return Err(Error::format(
                path,
                format!(
                    "saved for a vocabulary of {}, but the model has {v}",
                    r.n_vocab
                ),
            ));
        }
        let mut plan = r.plan;
        if let Some(c) = a.chunks {
            plan.n_chunk = plan.n_chunk.min(c.max(1));
        }
        let tokens = std::mem::take(&mut r.tokens);
        let first = plan.first();
        let mut st = KldStats::default();
        let mut row = vec![0u16; row_len(v)];
        let pb = bar(plan.n_chunk, "KLD");
        run_chunks(
            &model,
            &tokens,
            &plan,
            &opt(plan.n_ctx),
            |_, chunk, logits| {
                for (i, l) in logits.chunks_exact(v).enumerate() {
                    r.next_row(&mut row)
                        .map_err(|e| Error::format(path, e.to_string()))?;
                    st.add(l, &row, chunk[first + i + 1] as usize);
                }
                let rep = st.report();
                pb.set_message(format!("PPL {:.4} KLD {:.5}", rep.ppl.0, rep.kld.0));
                pb.inc(1);
                Ok(())
            },
        )?;
        pb.finish_and_clear();
        let rep = st.report();
        if a.json {
            let mut j = rep.to_json();
            j["n_ctx"] = plan.n_ctx.into();
            j["chunks"] = plan.n_chunk.into();
            j["seconds"] = t0.elapsed().as_secs_f64().into();
            println!("{j}");
        } else {
            print!("{}", rep.to_text());
        }
        return Ok(());
    }

    let tokens = match (&a.file, &a.tokens) {
        (Some(f), _) => {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            let tok = tokenizer_from_fqm(&model.file)?;
            tok.encode(&text, bos.is_some())
        }
        (None, Some(t)) => read_ids(t)?,
        (None, None) => {
            return Err(Error::Input(
                "give a text with -f FILE (or token ids with --tokens FILE)".into(),
            ))
        }
    };
    let plan = ChunkPlan::new(tokens.len(), a.ctx, a.chunks)?;
    if !a.json {
        eprintln!(
            "perplexity: {} tokens, {} chunks of {}, batch {}",
            tokens.len(),
            plan.n_chunk,
            plan.n_ctx,
            a.batch.unwrap_or(plan.n_ctx).clamp(1, plan.n_ctx)
        );
    }
    let pb = bar(plan.n_chunk, "PPL");
    let mut running = Vec::new();
    let stats = if let Some(path) = &a.kld_base {
        let tmp = path.with_extension("tmp");
        let f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = KldWriter::new(std::io::BufWriter::new(f), &plan, v, &tokens)?;
        let mut s = NllStats::default();
        let first = plan.first();
        let r = run_chunks(
            &model,
            &tokens,
            &plan,
            &opt(plan.n_ctx),
            |_, chunk, logits| {
                for (i, l) in logits.chunks_exact(v).enumerate() {
                    s.add(w.push(l, chunk[first + i + 1] as usize)?);
                }
                running.push(s.ppl());
                pb.set_message(format!("PPL {:.4}", s.ppl()));
                pb.inc(1);
                Ok(())
            },
        )
        .and_then(|_| w.finish().map(drop));
        if let Err(e) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        s
    } else {
        perplexity(&model, &tokens, &plan, &opt(plan.n_ctx), |_, ppl| {
            running.push(ppl);
            pb.set_message(format!("PPL {ppl:.4}"));
            pb.inc(1);
        })?
    };
    pb.finish_and_clear();
    let err = stats.ppl_err();
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "ppl": stats.ppl(),
                "err": err,
                "count": stats.count,
                "n_ctx": plan.n_ctx,
                "chunks": plan.n_chunk,
                "tokens": tokens.len(),
                "chunk_ppl": running,
                "seconds": t0.elapsed().as_secs_f64(),
            })
        );
    } else {
        let line: Vec<String> = running
            .iter()
            .enumerate()
            .map(|(i, p)| format!("[{}]{p:.4}", i + 1))
            .collect();
        println!("{}", line.join(","));
        match err {
            Some(e) => println!("Final estimate: PPL = {:.4} +/- {e:.5}", stats.ppl()),
            None => println!("Final estimate: PPL = {:.4}", stats.ppl()),
        }
        eprintln!(
            "perplexity: {} tokens scored in {:.1} s",
            stats.count,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
