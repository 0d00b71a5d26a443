//! `ferroq run`: one prompt in, the model's answer streamed out (llama.cpp's `llama-cli -p`).
//! Timings go to stderr after the answer.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use ferroq::internals::chat::Message;
use ferroq::internals::engine::{Engine, GenOptions, Generation, Session, SessionOptions};
use ferroq::internals::sampling::SamplerConfig;
use ferroq::{Error, Result};

/// Sampling flags shared by `run` and `chat` (llama.cpp names and defaults).
#[derive(clap::Args, Clone, Debug)]
pub struct SamplingArgs {
    // (negative numbers parse as values, e.g. `--temp -1`, so the sampler's range check can
    // name the field instead of clap reporting an unknown flag)
    /// Temperature; 0 = greedy.
    #[arg(long = "temp", default_value_t = 0.8, allow_negative_numbers = true)]
    pub temp: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling threshold (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens below this fraction of the best one's probability (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Repetition penalty (1.0 = off).
    #[arg(
        long = "repeat-penalty",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    pub repeat_penalty: f32,
    /// Penalties look at the last N tokens (0 = all).
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Presence penalty (0 = off).
    #[arg(
        long = "presence-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub presence_penalty: f32,
    /// Frequency penalty (0 = off).
    #[arg(
        long = "frequency-penalty",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub frequency_penalty: f32,
    /// Random seed (default: from the clock, printed to stderr).
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
    /// Stop when this string appears (repeatable).
    #[arg(long = "stop", value_name = "STR")]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampler settings and the seed used.
    pub fn config(&self) -> Result<(SamplerConfig, u64)> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
                .unwrap_or(0)
        });
        let c = SamplerConfig {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repetition_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            penalty_last_n: self.repeat_last_n,
            seed,
        };
        c.validate()?;
        Ok((c, seed))
    }
}

/// Model and session flags shared by `run` and `chat`.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model file (.fqm).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Check every tensor against the file's checksums before running (reads the whole model).
    #[arg(long)]
    pub verify: bool,
    /// Threads (0 = all cores; at most 512).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// Context size in tokens (0 = min(4096, the model's maximum)).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx: usize,
    /// Prompt tokens per forward pass.
    #[arg(short = 'b', long = "batch-size", default_value_t = ferroq::internals::engine::DEFAULT_BATCH)]
    pub batch: usize,
    /// KV cache type: f32, f16, q8 or q4 (default: f32 for unquantized models, f16 for quantized).
    #[arg(long, value_parser = super::generate::parse_kv)]
    pub kv: Option<ferroq::internals::model::KvType>,
    /// Allow a context (-c) beyond the model's max_position_embeddings.
    #[arg(long)]
    pub ctx_override: bool,
    /// Memory for the model: `auto` (what is free), `off` (never page experts) or a size
    /// (12G, 800M). MoE models larger than it page their routed experts.
    #[arg(long, default_value = "auto", value_parser = parse_mem)]
    pub mem: ferroq::internals::engine::MemBudget,
    /// Lock the resident weights in memory (the dense part when experts are paged).
    #[arg(long)]
    pub mlock: bool,
    /// Print the expert cache's hits and misses and the bytes read from disk per token.
    #[arg(long)]
    pub verbose: bool,
}

/// Parse `--mem`.
pub fn parse_mem(s: &str) -> std::result::Result<ferroq::internals::engine::MemBudget, String> {
    ferroq::internals::engine::MemBudget::parse(s).map_err(|e| e.to_string())
}

impl ModelArgs {
    /// Open the engine with these flags.
    pub fn open_engine(&self) -> Result<Arc<Engine>> {
        let opts = ferroq::internals::engine::EngineOptions {
            ctx_override: self.ctx_override,
            mem: self.mem,
            mlock: self.mlock,
            verify: self.verify,
        };
        let e = Arc::new(Engine::open_with(&self.model, &opts)?);
        print_paging(e.model());
        Ok(e)
    }
}

/// The paging line at start (when experts are paged).
pub fn print_paging(model: &ferroq::internals::model::Model) {
    if let Some(r) = &model.residency {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let (_, eb) = r.expert_bytes();
        eprintln!(
            "ferroq: paging {} routed experts: budget {:.0} MiB = dense part {:.0} MiB + expert cache {:.0} MiB + margin",
            r.n_experts_total(),
            mib(r.budget),
            mib(r.dense_bytes),
            mib(eb)
        );
    }
}

/// Bytes this process has caused to be read from storage (`read_bytes` of /proc/self/io: page
/// faults and readahead of the mapping included); 0 where unavailable.
pub fn disk_read_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("read_bytes:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `--verbose` lines: the expert cache's counters since `before`, and disk bytes per token.
pub fn print_cache_stats(
    model: &ferroq::internals::model::Model,
    before: &ferroq::internals::model::residency::CacheStats,
    disk_bytes: u64,
    tokens: usize,
) {
    let per = |b: u64| b as f64 / tokens.max(1) as f64 / 1e6;
    if let Some(r) = &model.residency {
        let s = r.stats().since(before);
        let (used, budget) = r.expert_bytes();
        eprintln!(
            "ferroq: expert cache: {} hits, {} misses ({:.1} % hits), {} evictions, {} read \
             ahead ({} of them used), {:.1} MB asked per token; {:.0} of {:.0} MiB used; \
             {:.2} s choosing and submitting reads",
            s.hits,
            s.misses,
            100.0 * s.hit_rate(),
            s.evictions,
            s.prefetched,
            s.prefetch_hits,
            per(s.bytes_requested),
            used as f64 / (1u64 << 20) as f64,
            budget as f64 / (1u64 << 20) as f64,
            r.prepare_seconds()
        );
    }
    eprintln!(
        "ferroq: read from disk: {:.1} MB per token ({} tokens)",
        per(disk_bytes),
        tokens
    );
}

/// The llama.cpp-style KV cache line (`llama_kv_cache_init`) of a new session, to stderr.
pub fn print_kv(session: &Session) {
    eprintln!("ferroq: {}", session.kv_bytes().describe(session.kv_type()));
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt; `-` or absent: read it from stdin.
    #[arg(short = 'p', long)]
    pub prompt: Option<String>,
    /// Most tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 256)]
    pub n_predict: usize,
    /// Wrap the prompt in the model's chat template (as one user message).
    #[arg(long)]
    pub chat: bool,
    /// System message (implies --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Print `{"ids": [...], "text": "..."}` instead of streaming the text.
    #[arg(long)]
    pub json: bool,
    /// Session state file for the prompt (llama.cpp's `--prompt-cache`): loaded if it exists,
    /// so that only the part of the prompt it lacks is evaluated, and saved with the prompt
    /// (not the answer) before generating. Same model and --kv type; see
    /// docs/session-state.md.
    #[arg(long = "prompt-cache", value_name = "FILE")]
    pub prompt_cache: Option<PathBuf>,
    /// Constrain the output to JSON matching this JSON Schema (the schema's text, as
    /// llama.cpp's `-j`/`--json-schema`); the answer always parses and matches it unless cut
    /// by -n. See docs/structured-output.md for the supported keywords.
    #[arg(short = 'j', long = "json-schema", value_name = "SCHEMA", conflicts_with_all = ["json_schema_file", "json_object"])]
    pub json_schema: Option<String>,
    /// As --json-schema, the schema read from FILE.
    #[arg(
        long = "json-schema-file",
        value_name = "FILE",
        conflicts_with = "json_object"
    )]
    pub json_schema_file: Option<PathBuf>,
    /// Constrain the output to one JSON object (OpenAI's `response_format: json_object`).
    #[arg(long = "json-object")]
    pub json_object: bool,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// The grammar of `--json-schema`, `--json-schema-file` or `--json-object`, if one is given.
fn structured(a: &Args) -> Result<Option<std::sync::Arc<ferroq::Grammar>>> {
    let g = if let Some(s) = &a.json_schema {
        ferroq::Grammar::from_schema_str(s)
            .map_err(|e| Error::config("--json-schema", e.to_string()))?
    } else if let Some(f) = &a.json_schema_file {
        let s = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
        ferroq::Grammar::from_schema_str(&s)
            .map_err(|e| Error::config("--json-schema-file", format!("{}: {e}", f.display())))?
    } else if a.json_object {
        ferroq::Grammar::json_object()
    } else {
        return Ok(None);
    };
    Ok(Some(std::sync::Arc::new(g)))
}

/// Read the prompt: the argument, or all of stdin for `-` / no argument.
fn read_prompt(p: Option<String>) -> Result<String> {
    let text = match p.as_deref() {
        Some("-") | None => {
            if p.is_none() && std::io::stdin().is_terminal() {
                eprintln!("ferroq: reading the prompt from stdin (end with Ctrl-D)");
            }
            let mut raw = Vec::new();
            std::io::stdin()
                .lock()
                .read_to_end(&mut raw)
                .map_err(|e| Error::io("<stdin>", e))?;
            let mut s = String::from_utf8(raw).map_err(|e| {
                Error::Input(format!("the prompt on stdin is not valid UTF-8: {e}"))
            })?;
            if s.ends_with('\n') {
                s.pop();
                if s.ends_with('\r') {
                    s.pop();
                }
            }
            s
        }
        Some(s) => s.to_string(),
    };
    if text.trim().is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    Ok(text)
}

/// llama.cpp-style timing lines.
pub fn print_timings(engine: &Engine, g: &Generation) {
    let t = &g.timings;
    let ms_per = |ms: f64, n: usize| if n > 0 { ms / n as f64 } else { 0.0 };
    eprintln!();
    eprintln!("ferroq: load time        = {:10.2} ms", engine.load_ms());
    eprintln!(
        "ferroq: prompt eval time = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second){}",
        t.prompt_ms,
        t.prompt_tokens,
        ms_per(t.prompt_ms, t.prompt_tokens),
        t.prompt_tokens_per_s(),
        if t.reused_tokens > 0 {
            format!(", {} cached", t.reused_tokens)
        } else {
            String::new()
        }
    );
    eprintln!(
        "ferroq: eval time        = {:10.2} ms / {:5} tokens ({:8.2} ms per token, {:8.2} tokens per second)",
        t.gen_ms,
        t.gen_tokens,
        ms_per(t.gen_ms, t.gen_tokens),
        t.gen_tokens_per_s()
    );
    eprintln!(
        "ferroq: total time       = {:10.2} ms / {:5} tokens (stopped: {})",
        engine.load_ms() + t.prompt_ms + t.gen_ms,
        t.prompt_tokens + t.gen_tokens,
        g.stop.as_str()
    );
}

fn out_err(e: std::io::Error) -> Error {
    Error::io("<stdout>", e)
}

/// `--prompt-cache FILE`: load the file if it exists, evaluate the part of the prompt the
/// cache lacks, and save the prompt's state (unless the file already held exactly it). The
/// generation that follows runs only the prompt's last token again (for its logits). Returns
/// the timings of the evaluation.
fn prompt_cache(
    session: &mut Session,
    file: &std::path::Path,
    ids: &[u32],
    gen: &GenOptions,
) -> Result<ferroq::internals::engine::Timings> {
    let t0 = std::time::Instant::now();
    let loaded = if file.exists() {
        let n = session.load(file).map_err(|e| {
            Error::Input(format!(
                "--prompt-cache: {e} (delete the file to start a new prompt cache)"
            ))
        })?;
        Some(n)
    } else {
        None
    };
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let same = loaded == Some(ids.len()) && session.cached() == ids;
    let only_prompt = GenOptions {
        max_tokens: 0,
        ..gen.clone()
    };
    let p = session
        .generate(ids, &only_prompt, &mut |_, _| true)?
        .timings;
    match loaded {
        Some(n) => eprintln!(
            "ferroq: prompt cache {}: loaded {n} tokens in {load_ms:.2} ms, reused {} of the \
             prompt's {} tokens ({} evaluated in {:.2} ms)",
            file.display(),
            p.reused_tokens,
            ids.len(),
            p.prompt_tokens,
            p.prompt_ms
        ),
        None => eprintln!(
            "ferroq: prompt cache {}: not found; evaluating all {} prompt tokens",
            file.display(),
            ids.len()
        ),
    }
    if !same {
        let n = session.save(file)?;
        eprintln!("ferroq: prompt cache {}: saved {n} tokens", file.display());
    }
    Ok(p)
}

pub fn run(a: Args) -> Result<()> {
    let (sampler, seed) = a.sampling.config()?;
    let grammar = structured(&a)?;
    let prompt = read_prompt(a.prompt)?;
    let engine = a.model.open_engine()?;
    let chat = a.chat || a.system.is_some();
    let ids = if chat {
        let mut msgs = Vec::new();
        if let Some(s) = &a.system {
            msgs.push(Message::new("system", s.as_str()));
        }
        msgs.push(Message::new("user", prompt.as_str()));
        engine.encode_chat(&msgs, true)?
    } else {
        engine.encode_prompt(&prompt)
    };
    let ctx = engine.context_for(a.model.ctx);
    ferroq::internals::model::kvmem::check_context(
        &engine.model().config,
        ctx,
        engine.model().ctx_limit,
    )?;
    if ids.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt is {} tokens but the context holds {ctx} (including at least one \
             generated token); use a larger context (-c) or a shorter prompt",
            ids.len()
        )));
    }
    // the cache needs no more than the prompt and the answer (a prompt cache file may hold
    // more: then the whole context, whose pages are only touched where used)
    let opts = SessionOptions {
        ctx: if a.prompt_cache.is_some() {
            ctx
        } else {
            ctx.min(ids.len().saturating_add(a.n_predict.max(1)))
        },
        batch: a.model.batch,
        threads: a.model.threads,
        kv: a.model.kv,
    };
    let mut session = Session::new(engine.clone(), &opts)?;
    print_kv(&session);
    let gen = GenOptions {
        max_tokens: a.n_predict,
        sampler,
        stop_strings: a.sampling.stop.clone(),
    };
    let stats0 = engine
        .model()
        .residency
        .as_ref()
        .map(|r| r.stats())
        .unwrap_or_default();
    let disk0 = disk_read_bytes();
    let pre = match &a.prompt_cache {
        Some(file) => Some(prompt_cache(&mut session, file, &ids, &gen)?),
        None => None,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut io_err = None;
    let grammar = grammar.as_ref();
    let mut g = if a.json {
        session.generate_constrained(&ids, &gen, grammar, &mut |_, _| true)?
    } else {
        session.generate_constrained(&ids, &gen, grammar, &mut |_, piece| {
            if piece.is_empty() {
                return true;
            }
            match out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    io_err = Some(e);
                    false
                }
            }
        })?
    };
    if let Some(e) = io_err {
        return Err(out_err(e));
    }
    if let Some(p) = pre {
        // the prompt was evaluated before the generation (to save it): count it there
        g.timings.prompt_ms += p.prompt_ms;
        g.timings.prompt_tokens += p.prompt_tokens;
        g.timings.reused_tokens = p.reused_tokens;
    }
    if a.json {
        let v = serde_json::json!({"ids": g.ids, "text": g.text});
        writeln!(out, "{v}").map_err(out_err)?;
    } else {
        writeln!(out).map_err(out_err)?;
    }
    out.flush().map_err(out_err)?;
    if g.stop == ferroq::internals::engine::StopReason::ContextFull {
        eprintln!("ferroq: the context ({} tokens) is full", session.ctx());
    }
    print_timings(&engine, &g);
    if a.model.verbose {
        let toks = g.timings.prompt_tokens + g.timings.gen_tokens;
        print_cache_stats(engine.model(), &stats0, disk_read_bytes() - disk0, toks);
    }
    if a.sampling.seed.is_none() && gen.sampler.temperature > 0.0 {
        eprintln!("ferroq: seed = {seed}");
    }
    Ok(())
}
