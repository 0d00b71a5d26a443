//! Shared by the targets: a per-process scratch file for inputs that are read from a path.

use std::path::PathBuf;

/// Write `data` to this process's scratch file with extension `ext` and return its path.
pub fn scratch(ext: &str, data: &[u8]) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ferroq-fuzz-{}.{ext}", std::process::id()));
    std::fs::write(&p, data).expect("write the scratch file");
    p
}
