//! The `ferroq` command-line tool. Each subcommand lives in `src/cli/<name>.rs` with its own
//! clap `Args` struct and a `run` function.

use clap::{Parser, Subcommand};

mod cli;

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
    Bench(cli::bench::Args),
    /// Convert a Hugging Face checkpoint directory or a GGUF file to a .fqm model.
    Convert(cli::convert::Args),
    /// Collect an importance matrix (activation statistics) for `convert --imatrix`.
    Imatrix(cli::imatrix::Args),
    /// Print a model's architecture, config and tensor table.
    Inspect(cli::inspect::Args),
    /// Compute logits for a list of token ids and write them to a safetensors file.
    Logits(cli::logits::Args),
    /// Greedy generation from token ids; prints the generated ids as JSON.
    Generate(cli::generate::Args),
    /// Write a random-weight Hugging Face checkpoint of a named shape (for speed tests).
    Synth(cli::synth::Args),
    /// Text to token ids (one JSON string per line with --jsonl), or ids to text (--decode).
    Tokenize(cli::tokenize::Args),
    /// Perplexity of a text and KL divergence from a reference (like llama-perplexity).
    Perplexity(cli::perplexity::Args),
    /// Generate text from a prompt, streamed as it comes (timings on stderr).
    Run(cli::run::Args),
    /// Interactive multi-turn chat (one message per stdin line), keeping the KV cache.
    Chat(cli::chat::Args),
    /// Check a model file's tensors against the checksums it records.
    Verify(cli::verify::Args),
    /// OpenAI-compatible HTTP server (chat/completions, completions, streaming, batching).
    #[cfg(feature = "server")]
    Serve(cli::serve::Args),
}

fn main() {
    // an interrupted convert / logits -o leaves no temporary file behind
    ferroq::atomic::remove_temp_files_on_signal();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Bench(a) => cli::bench::run(a),
        Cmd::Convert(a) => cli::convert::run(a),
        Cmd::Imatrix(a) => cli::imatrix::run(a),
        Cmd::Inspect(a) => cli::inspect::run(a),
        Cmd::Logits(a) => cli::logits::run(a),
        Cmd::Generate(a) => cli::generate::run(a),
        Cmd::Synth(a) => cli::synth::run(a),
        Cmd::Tokenize(a) => cli::tokenize::run(a),
        Cmd::Perplexity(a) => cli::perplexity::run(a),
        Cmd::Run(a) => cli::run::run(a),
        Cmd::Chat(a) => cli::chat::run(a),
        Cmd::Verify(a) => cli::verify::run(a),
        #[cfg(feature = "server")]
        Cmd::Serve(a) => cli::serve::run(a),
    };
    if let Err(e) = r {
        eprintln!("ferroq: error: {e}");
        std::process::exit(1);
    }
}
