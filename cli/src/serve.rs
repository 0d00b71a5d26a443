//! `ferroq serve`: an OpenAI-compatible HTTP server (llama.cpp's `llama-server` flags).

use std::path::PathBuf;
use std::time::Duration;

use ferroq::internals::model::KvType;
use ferroq::server::{self, ServerConfig};
use ferroq::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Model file (.fqm).
    #[arg(short, long)]
    pub model: PathBuf,
    /// Model name clients use in `model` (default: the file name without `.fqm`).
    #[arg(short = 'a', long)]
    pub alias: Option<String>,
    /// Address to listen on. The default is loopback only; use 0.0.0.0 to accept other hosts
    /// (then also set --api-key).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Slots: requests decoded together in one batch; more wait in the queue.
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 1)]
    pub parallel: usize,
    /// Context per slot in tokens (0 = min(4096, the model's maximum)).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx: usize,
    /// Most tokens per forward pass (prompt chunks and decode rows together).
    #[arg(short = 'b', long = "batch-size", default_value_t = ferroq::internals::engine::DEFAULT_BATCH)]
    pub batch: usize,
    /// Threads (0 = all cores).
    #[arg(short = 't', long, default_value_t = 0)]
    pub threads: usize,
    /// KV cache type: f32, f16, q8 or q4 (default: f16 for quantized models, f32 otherwise).
    #[arg(long = "kv-type", alias = "kv")]
    pub kv: Option<String>,
    /// Require `Authorization: Bearer KEY` (also read from $FERROQ_API_KEY).
    #[arg(long = "api-key")]
    pub api_key: Option<String>,
    /// Requests that may wait for a free slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Largest request body in bytes.
    #[arg(long = "max-body", default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Seconds a request may take from arrival to its last token (then 504).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

pub fn run(a: Args) -> Result<()> {
    let kv = match a.kv.as_deref() {
        None => None,
        Some(s) => Some(KvType::parse(s).ok_or_else(|| {
            Error::config("kv-type", format!("{s:?}: use one of {}", KvType::NAMES))
        })?),
    };
    let api_key = a.api_key.or_else(|| {
        std::env::var("FERROQ_API_KEY")
            .ok()
            .filter(|k| !k.is_empty())
    });
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(Error::config("api-key", "the API key is empty"));
    }
    let cfg = ServerConfig {
        model: a.model,
        alias: a.alias,
        host: a.host,
        port: a.port,
        parallel: a.parallel,
        ctx: a.ctx,
        batch: a.batch,
        threads: a.threads,
        kv,
        api_key,
        max_body: a.max_body,
        queue: a.queue,
        timeout: Duration::from_secs(a.timeout.max(1)),
    };
    let running = server::start(&cfg)?;
    let ip = running.addr.ip();
    eprintln!(
        "ferroq: listening on http://{} ({} slot{}, context {} per slot{}){}",
        running.addr,
        cfg.parallel,
        if cfg.parallel == 1 { "" } else { "s" },
        running.ctx,
        if cfg.api_key.is_some() {
            ", API key required"
        } else {
            ""
        },
        if ip.is_loopback() {
            ""
        } else {
            "\nferroq: warning: listening beyond loopback"
        }
    );
    running.wait()
}
