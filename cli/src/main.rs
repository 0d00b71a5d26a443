//! The `ferroq` command-line tool (package `ferroq-cli`). Each subcommand lives in
//! `cli/src/<name>.rs` with its own clap `Args` struct and a `run` function.

use clap::{Parser, Subcommand};

mod bench;
mod chat;
mod convert;
mod generate;
mod imatrix;
mod inspect;
mod logits;
mod perplexity;
mod run;
#[cfg(feature = "server")]
mod serve;
mod synth;
mod tokenize;
mod verify;

#[derive(Parser)]
#[command(
    name = "ferroq",
    version,
    about = "Fast CPU inference for 4-bit Llama 4 (MoE) and Llama models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Prompt processing and generation speed (like llama-bench).
    Bench(bench::Args),
    /// Convert a Hugging Face checkpoint directory or a GGUF file to a .fqm model.
    Convert(convert::Args),
    /// Collect an importance matrix (activation statistics) for `convert --imatrix`.
    Imatrix(imatrix::Args),
    /// Print a model's architecture, config and tensor table.
    Inspect(inspect::Args),
    /// Compute logits for a list of token ids and write them to a safetensors file.
    Logits(logits::Args),
    /// Greedy generation from token ids; prints the generated ids as JSON.
    Generate(generate::Args),
    /// Write a random-weight Hugging Face checkpoint of a named shape (for speed tests).
    Synth(synth::Args),
    /// Text to token ids (one JSON string per line with --jsonl), or ids to text (--decode).
    Tokenize(tokenize::Args),
    /// Perplexity of a text and KL divergence from a reference (like llama-perplexity).
    Perplexity(perplexity::Args),
    /// Generate text from a prompt, streamed as it comes (timings on stderr).
    Run(run::Args),
    /// Interactive multi-turn chat (one message per stdin line), keeping the KV cache.
    Chat(chat::Args),
    /// Check a model file's tensors against the checksums it records.
    Verify(verify::Args),
    /// OpenAI-compatible HTTP server (chat/completions, completions, streaming, batching).
    #[cfg(feature = "server")]
    Serve(serve::Args),
}

fn main() {
    // an interrupted convert / logits -o leaves no temporary file behind
    ferroq::internals::atomic::remove_temp_files_on_signal();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Bench(a) => bench::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Imatrix(a) => imatrix::run(a),
        Cmd::Inspect(a) => inspect::run(a),
        Cmd::Logits(a) => logits::run(a),
        Cmd::Generate(a) => generate::run(a),
        Cmd::Synth(a) => synth::run(a),
        Cmd::Tokenize(a) => tokenize::run(a),
        Cmd::Perplexity(a) => perplexity::run(a),
        Cmd::Run(a) => run::run(a),
        Cmd::Chat(a) => chat::run(a),
        Cmd::Verify(a) => verify::run(a),
        #[cfg(feature = "server")]
        Cmd::Serve(a) => serve::run(a),
    };
    if let Err(e) = r {
        eprintln!("ferroq: error: {e}");
        std::process::exit(1);
    }
}
