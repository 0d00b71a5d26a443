//! Everything behind the facade: the layers the converter (`ferroq-convert`), the CLI
//! (`ferroq-cli`), the tests, benches and fuzz targets build on. Hidden from the docs and not a
//! stable interface: an embedder uses the crate root ([`crate::Engine`], [`crate::Session`],
//! [`crate::Model`], [`crate::State`], [`crate::FqmFile`], [`crate::Error`]) or the C ABI
//! (`include/ferroq.h`).
//!
//! The modules are declared here (files in `src/`, paths relative to it) and imported into the
//! crate root, so inside the library they are still `crate::model`, `crate::format`, ...

#[path = "atomic.rs"]
pub mod atomic;
#[path = "capi.rs"]
pub mod capi;
#[path = "chat/mod.rs"]
pub mod chat;
#[path = "engine.rs"]
pub mod engine;
#[path = "error.rs"]
pub mod error;
#[path = "format/mod.rs"]
pub mod format;
#[path = "grammar/mod.rs"]
pub mod grammar;
#[path = "model/mod.rs"]
pub mod model;
#[path = "ops.rs"]
pub mod ops;
#[path = "perplexity.rs"]
pub mod perplexity;
#[path = "pool.rs"]
pub mod pool;
#[path = "sampling.rs"]
pub mod sampling;
#[path = "state_file.rs"]
pub mod state_file;
#[path = "tokenizer/mod.rs"]
pub mod tokenizer;

pub use ferroq_kernels as kernels;
