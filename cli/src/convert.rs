//! `ferroq convert <HF_DIR | FILE.gguf> -o OUT.fqm [--quant q4|q4m|q4l|q8|bf16|f32]
//! [--output-tensor-type T] [--token-embedding-type T] [--imatrix FILE]`.

use ferroq::Result;
use ferroq_convert::convert::{
    convert, format_size_table, parse_matrix_type, recipe_sizes, ConvertOptions, ProgressEvent,
    Quant,
};
use ferroq_convert::source::Checkpoint;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// Hugging Face model directory (config.json, *.safetensors, tokenizer files) or a .gguf file.
    pub input: PathBuf,
    /// Output .fqm file (written to a temporary name and renamed when complete).
    #[arg(short, long)]
    pub output: PathBuf,
    /// Weight precision: q4 (4-bit codebook matrices, 6-bit embedding/output), q4m (q4 with
    /// 8-bit value and down projections), q4l or q4_0 (q4 on the linear 4-bit grid of Q4_0:
    /// faster kernels, less accurate; exact for a Q4_0 source), q8, bf16 or f32; mixes by role
    /// and layer: q4-m (like Q4_K_M: value and down projections 6-bit in the first and last
    /// eighth of the layers and every third between), q4-l (q4-m with an 8-bit output), q4-ud
    /// (like Unsloth's dynamic quants: routed experts 4-bit, attention, shared expert and the
    /// first and last layer higher). The size table is printed before converting.
    #[arg(long, default_value = "q4")]
    pub quant: String,
    /// RoPE frequency precision: f32 (what `from_pretrained` uses) or bf16 (reproduces a
    /// transformers model cast with `model.to(torch.bfloat16)`).
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub rope_freq: String,
    /// Type of the output projection (q4, q4l, q6, q8, bf16, f32), overriding the recipe; with
    /// tied embeddings it is also the embedding table's type. The 4-bit recipes use q6 (6.5 bits
    /// per weight); q8 is more accurate, q4 reads fewer bytes per generated token at a cost in
    /// accuracy.
    #[arg(long, value_name = "TYPE")]
    pub output_tensor_type: Option<String>,
    /// Type of the token embedding table (q4, q4l, q6, q8, bf16, f32), overriding the recipe.
    #[arg(long, value_name = "TYPE")]
    pub token_embedding_type: Option<String>,
    /// Importance matrix from `ferroq imatrix` (collected on an f32 or q8 conversion of the same
    /// source) or from llama.cpp's `llama-imatrix` (GGUF or legacy .dat, for the same model):
    /// its per-column activation statistics weigh the 4-bit scale search.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// How the imatrix weighs a weight's error: multiply (activation mean square times
    /// sqrt(sigma^2 + x^2), the default) or replace (the activation mean square alone).
    #[arg(long, default_value = "multiply", value_parser = ["multiply", "replace"])]
    pub imatrix_weighting: String,
    /// Print the size table of the recipe (every recipe with `--quant all`) from the
    /// config.json alone (INPUT: a directory or the config.json file; no weights needed) and
    /// write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--dry-run`: the size tables from the config alone.
fn dry_run(args: &Args) -> Result<()> {
    let p = if args.input.is_dir() {
        args.input.join("config.json")
    } else {
        args.input.clone()
    };
    let text = std::fs::read_to_string(&p).map_err(|e| ferroq::Error::io(&p, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| ferroq::Error::format(&p, e.to_string()))?;
    let cfg = ferroq_convert::hf::model_config_from_hf(&json)?;
    let quants: Vec<Quant> = if args.quant == "all" {
        Quant::ALL.to_vec()
    } else {
        vec![args.quant.parse()?]
    };
    for q in quants {
        let opts = ConvertOptions {
            quant: q,
            ..options(args, q)?
        };
        println!("recipe {}:", q.name());
        print!("{}", format_size_table(&recipe_sizes(&cfg, &opts)));
        println!();
    }
    Ok(())
}

fn options(args: &Args, quant: Quant) -> Result<ConvertOptions> {
    Ok(ConvertOptions {
        quant,
        rope_freq_bf16: args.rope_freq == "bf16",
        output_type: args
            .output_tensor_type
            .as_deref()
            .map(parse_matrix_type)
            .transpose()?,
        embedding_type: args
            .token_embedding_type
            .as_deref()
            .map(parse_matrix_type)
            .transpose()?,
        imatrix: args.imatrix.clone(),
        imatrix_weighting: args.imatrix_weighting.parse()?,
    })
}

fn open_input(p: &Path) -> Result<Checkpoint> {
    if p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return ferroq_convert::gguf::open(p);
    }
    ferroq_convert::hf::open_hf_dir(p)
}

pub fn run(args: Args) -> Result<()> {
    if args.dry_run {
        return dry_run(&args);
    }
    let quant: Quant = args.quant.parse()?;
    let ck = open_input(&args.input)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {bytes}/{total_bytes} tensor {msg} (ETA {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // on a terminal: a progress bar; otherwise (logs, CI): a line every few seconds
    let tty = std::io::stderr().is_terminal();
    let last_line = std::cell::Cell::new(std::time::Instant::now());
    let t0 = std::time::Instant::now();
    let progress = |ev: ProgressEvent| match ev {
        ProgressEvent::Start { bytes, sizes, .. } => {
            let t = format!("recipe {}:\n{}", quant.name(), format_size_table(&sizes));
            if tty {
                bar.println(t.trim_end());
            } else {
                eprint!("{t}");
            }
            bar.set_length(bytes)
        }
        ProgressEvent::Tensor {
            index,
            total,
            name,
            bytes_done,
            ..
        } => {
            bar.set_position(bytes_done);
            bar.set_message(format!("{index}/{total} {name}"));
            if !tty && (last_line.get().elapsed().as_secs() >= 5 || index == total) {
                last_line.set(std::time::Instant::now());
                eprintln!(
                    "convert: tensor {index}/{total} ({name}), {:.0} MiB written, {:.0} s",
                    bytes_done as f64 / (1 << 20) as f64,
                    t0.elapsed().as_secs_f64()
                );
            }
        }
        ProgressEvent::Note(n) => {
            if tty {
                bar.println(format!("note: {n}"))
            } else {
                eprintln!("note: {n}")
            }
        }
        ProgressEvent::Done { .. } => bar.finish_and_clear(),
    };
    let report = convert(&ck, &args.output, &options(&args, quant)?, &progress)?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} tensors, {:.1} MiB, quant {}) in {:.2} s",
        report.path.display(),
        report.tensors,
        report.file_bytes as f64 / (1 << 20) as f64,
        quant.name(),
        report.elapsed.as_secs_f64()
    );
    Ok(())
}
