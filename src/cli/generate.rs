//! `ferroq generate`.

use ferroq::Result;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    Err(ferroq::Error::Other(
        "`generate` is not implemented yet".into(),
    ))
}
