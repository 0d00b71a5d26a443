//! `ferroq run`: one prompt in, the model's answer streamed out (llama.cpp's `llama-cli -p`).
//! Timings go to stderr after the answer.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use ferroq::chat::Message;
use ferroq::engine::{Engine, GenOptions, Generation, Session, SessionOptions};
use ferroq::sampling::SamplerConfig;
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
    #[arg(short = 'b', long = "batch-size", default_value_t = ferroq::engine::DEFAULT_BATCH)]
    pub batch: usize,
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
    #[command(flatten)]
    pub sampling: SamplingArgs,
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

/// Open the engine (checking every tensor's checksum first with `verify`).
pub fn open_engine(path: &std::path::Path, verify: bool) -> Result<Arc<Engine>> {
    let opts = ferroq::engine::EngineOptions { verify };
    Ok(Arc::new(Engine::open_with(path, &opts)?))
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

pub fn run(a: Args) -> Result<()> {
    let (sampler, seed) = a.sampling.config()?;
    let prompt = read_prompt(a.prompt)?;
    let engine = open_engine(&a.model.model, a.model.verify)?;
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
    if ids.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt is {} tokens but the context holds {ctx} (including at least one \
             generated token); use a larger context (-c) or a shorter prompt",
            ids.len()
        )));
    }
    // the cache needs no more than the prompt and the answer
    let opts = SessionOptions {
        ctx: ctx.min(ids.len().saturating_add(a.n_predict.max(1))),
        batch: a.model.batch,
        threads: a.model.threads,
        kv: None,
    };
    let mut session = Session::new(engine.clone(), &opts)?;
    let gen = GenOptions {
        max_tokens: a.n_predict,
        sampler,
        stop_strings: a.sampling.stop.clone(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut io_err = None;
    let g = if a.json {
        session.generate(&ids, &gen, &mut |_, _| true)?
    } else {
        session.generate(&ids, &gen, &mut |_, piece| {
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
    if a.json {
        let v = serde_json::json!({"ids": g.ids, "text": g.text});
        writeln!(out, "{v}").map_err(out_err)?;
    } else {
        writeln!(out).map_err(out_err)?;
    }
    out.flush().map_err(out_err)?;
    if g.stop == ferroq::engine::StopReason::ContextFull {
        eprintln!("ferroq: the context ({} tokens) is full", session.ctx());
    }
    print_timings(&engine, &g);
    if a.sampling.seed.is_none() && gen.sampler.temperature > 0.0 {
        eprintln!("ferroq: seed = {seed}");
    }
    Ok(())
}
