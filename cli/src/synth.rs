//! `ferroq synth`: write a random-weight Hugging Face checkpoint of a named shape.

use std::path::PathBuf;

use ferroq::Result;
use ferroq_convert::synth::{parse_size, write_checkpoint, Shape, SynthOptions};

#[derive(clap::Args)]
pub struct Args {
    /// Shape: l4-mini (3.5 B Llama 4 MoE, 16 experts), l4-mini-128e (128 smaller experts, same
    /// size), smollm2-135m, l4-tiny.
    #[arg(long)]
    preset: String,
    /// Output directory (created if missing).
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Seed of the weights (same seed, same bytes).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Maximum shard size (decimal units like Hugging Face: 2GB, 500MB; or GiB, MiB).
    #[arg(long, default_value = "2GB")]
    shard_size: String,
}

pub fn run(a: Args) -> Result<()> {
    let shape = Shape::preset(&a.preset)?;
    let opts = SynthOptions {
        seed: a.seed,
        shard_size: parse_size(&a.shard_size)?,
        label: a.preset.clone(),
    };
    let n_params = shape.n_params();
    eprintln!(
        "synth {}: {:.3} B parameters, {:.2} GB of bf16, seed {} -> {}",
        a.preset,
        n_params as f64 / 1e9,
        2.0 * n_params as f64 / 1e9,
        a.seed,
        a.output.display()
    );
    let bar = indicatif::ProgressBar::new(2 * n_params);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = std::time::Instant::now();
    let summary = write_checkpoint(&shape, &a.output, &opts, &mut |p| {
        bar.set_position(p.done);
        bar.set_message(p.tensor.to_string());
    })?;
    bar.finish_and_clear();
    eprintln!(
        "wrote {} files, {:.2} GB in {:.1} s",
        summary.files.len(),
        summary.n_bytes as f64 / 1e9,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
