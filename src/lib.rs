//! ferroq: a pure-Rust CPU inference runtime for 4-bit quantized Llama 4 (MoE) and Llama models.
//!
//! Layers (one way): [`engine`] → [`model`] → [`ops`] → `ferroq_kernels`. The converter is the
//! `ferroq-convert` crate (`convert/`) and the `ferroq` binary the `ferroq-cli` crate (`cli/`):
//! both depend on this library, never the other way. See `ARCHITECTURE.md`.

pub mod atomic;
pub mod capi;
pub mod chat;
pub mod engine;
pub mod error;
pub mod format;
pub mod grammar;
pub mod model;
pub mod ops;
pub mod perplexity;
pub mod pool;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod state_file;
pub mod tokenizer;

pub use error::{Error, Result};
pub use ferroq_kernels as kernels;
