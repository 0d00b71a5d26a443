//! The `ferroq` command-line tool.

fn main() {
    eprintln!("ferroq: not yet");
    std::process::exit(2);
}
