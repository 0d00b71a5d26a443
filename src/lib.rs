//! ferroq: a pure-Rust CPU inference runtime for 4-bit quantized Llama 4 (MoE) and Llama models.
//!
//! The public surface is this root: [`Engine`] (a `.fqm` model with its tokenizer and chat
//! template, `Send + Sync`) shared by [`Session`]s (one conversation and KV cache each), the
//! lower-level [`Model`] and [`State`] (logits for token ids), the format reader [`FqmFile`],
//! [`Grammar`] (structured output) and [`Error`]; plus `server` (the OpenAI-compatible HTTP server, cargo feature `server`) and
//! the C ABI (`include/ferroq.h`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ferroq::{Engine, GenOptions, Session, SessionOptions};
//! let engine = Arc::new(Engine::open("smollm2.fqm")?);
//! let mut s = Session::new(engine, &SessionOptions::default())?;
//! let g = s.chat("Hello!", &GenOptions::default(), &mut |_, piece| {
//!     print!("{piece}");
//!     true // false cancels
//! })?;
//! eprintln!("\n{} tokens, {:?}", g.ids.len(), g.stop);
//! # Ok::<(), ferroq::Error>(())
//! ```
//!
//! Layers (one way): engine → model → ops → `ferroq_kernels`. The converter is the
//! `ferroq-convert` crate (`convert/`) and the `ferroq` binary the `ferroq-cli` crate (`cli/`):
//! both depend on this library, never the other way. They, the tests and the benches reach the
//! layers through the hidden `internals` module. See `ARCHITECTURE.md`.

#[doc(hidden)]
pub mod internals;
#[cfg(feature = "server")]
pub mod server;

// the layers under their old names inside the crate (`crate::model::...`)
pub(crate) use internals::{
    atomic, chat, engine, error, format, grammar, model, ops, pool, sampling, state_file, tokenizer,
};

pub use engine::{
    Engine, EngineOptions, GenOptions, Generation, MemBudget, Session, SessionOptions, StopReason,
    Timings,
};
pub use error::{Error, Result};
pub use format::FqmFile;
pub use grammar::Grammar;
pub use model::{KvType, Logits, Model, ModelConfig, State};
pub use sampling::SamplerConfig;
