//! `ferroq inspect <M.fqm>`: architecture, config, tokenizer, provenance, recipe, tensor table.

use ferroq::internals::format::{DType, FqmFile};
use ferroq::Result;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The .fqm model file.
    pub model: PathBuf,
}

fn show(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// `writeln!` into a String (cannot fail).
macro_rules! wln {
    ($o:expr) => { let _ = writeln!($o); };
    ($o:expr, $($t:tt)*) => { let _ = writeln!($o, $($t)*); };
}

pub fn run(args: Args) -> Result<()> {
    let f = FqmFile::open(&args.model)?;
    let mut o = String::new();
    let m = f.meta();
    let null = serde_json::Value::Null;
    let get = |k: &str| m.get(k).unwrap_or(&null);
    let cfg = get("config");
    wln!(o, "file:          {}", args.model.display());
    wln!(
        o,
        "format:        fqm v{}",
        ferroq::internals::format::VERSION
    );
    wln!(
        o,
        "architecture:  {} (family {})",
        get("provenance").get("architecture").unwrap_or(&null),
        cfg.get("arch").unwrap_or(&null)
    );

    // the config without the per-layer list, then one line per layer
    let mut flat = cfg.clone();
    if let Some(obj) = flat.as_object_mut() {
        obj.remove("layers");
    }
    wln!(o, "config:        {}", show(&flat));
    if let Some(layers) = cfg.get("layers").and_then(|l| l.as_array()) {
        wln!(o, "layers:        rope qk_norm chunked temp_tune moe");
        for (i, l) in layers.iter().enumerate() {
            let flag = |k: &str| {
                if l.get(k).and_then(|b| b.as_bool()) == Some(true) {
                    "x"
                } else {
                    "."
                }
            };
            wln!(
                o,
                "  {i:>4}          {}      {}       {}        {}      {}",
                flag("rope"),
                flag("qk_norm"),
                flag("chunked"),
                flag("temp_tune"),
                flag("moe")
            );
        }
    }
    wln!(o, "tokenizer:     {}", get("tokenizer"));
    wln!(
        o,
        "chat template: {}",
        match get("chat_template").as_str() {
            Some(t) => format!("{} chars", t.len()),
            None => "none".into(),
        }
    );
    for k in [
        "bos_token",
        "eos_token",
        "bos_token_id",
        "stop_token_ids",
        "add_bos",
    ] {
        wln!(o, "{:<14} {}", format!("{k}:"), get(k));
    }
    wln!(o, "provenance:    {}", show(get("provenance")));
    wln!(o, "recipe:        {}", show(get("recipe")));
    wln!(o);
    wln!(
        o,
        "{:<40} {:>6} {:>18} {:>14}",
        "tensor",
        "type",
        "shape",
        "bytes"
    );
    let (mut total, mut mat_bytes, mut mat_weights) = (0u64, 0u64, 0u64);
    for t in f.tensors() {
        let shape = format!("{:?}", t.shape);
        wln!(
            o,
            "{:<40} {:>6} {:>18} {:>14}",
            t.name,
            t.dtype.name(),
            shape,
            t.nbytes
        );
        total += t.nbytes as u64;
        if t.shape.len() == 2 && t.dtype != DType::U8 {
            mat_bytes += t.nbytes as u64;
            mat_weights += t.shape.iter().product::<usize>() as u64;
        }
    }
    wln!(o);
    wln!(
        o,
        "{} tensors, {} bytes of tensor data ({:.2} MiB); file {} bytes",
        f.tensors().len(),
        total,
        total as f64 / (1 << 20) as f64,
        f.bytes().len()
    );
    if mat_weights > 0 {
        wln!(
            o,
            "matrices: {} weights, {} bytes, {:.3} bits per weight",
            mat_weights,
            mat_bytes,
            mat_bytes as f64 * 8.0 / mat_weights as f64
        );
    }
    // the mix of types by tensor class
    let rows = ferroq_convert::convert::size_table(
        f.tensors()
            .iter()
            .filter(|t| t.dtype != DType::U8)
            .map(|t| {
                let n = t.shape.iter().product::<usize>() as u64;
                (t.name.as_str(), t.dtype, n, t.nbytes as u64)
            }),
    );
    wln!(o);
    wln!(o, "mix:");
    o += &ferroq_convert::convert::format_size_table(&rows);
    // a closed pipe (`ferroq inspect m.fqm | head`) is not an error
    match std::io::stdout().lock().write_all(o.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(ferroq::Error::io("<stdout>", e))
        }
        _ => Ok(()),
    }
}
