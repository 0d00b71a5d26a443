//! `ferroq verify M.fqm`: check every tensor of a model against the checksums its file records
//! (format version 2), plus the directory and metadata checks every open does.

use ferroq::internals::format::FqmFile;
use ferroq::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Model file(s) (.fqm).
    #[arg(required = true)]
    models: Vec<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    for path in &a.models {
        let f = FqmFile::open(path)?;
        let r = f.verify(&|_, _| {})?;
        println!(
            "{}: OK ({} tensors, {:.1} MiB checked in {:.2} s, {:.2} GB/s)",
            path.display(),
            r.tensors,
            r.bytes as f64 / (1 << 20) as f64,
            r.seconds,
            r.bytes as f64 / r.seconds.max(1e-9) / 1e9
        );
    }
    Ok(())
}
