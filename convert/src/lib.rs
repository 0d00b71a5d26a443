//! ferroq-convert: the model converter (`ferroq convert`, `synth`, `imatrix`) and its input
//! readers, as a crate of its own so that the runtime library (and its `cdylib` / `staticlib`)
//! does not carry it.
//!
//! Dependency direction: ferroq-convert → ferroq (format, model, tokenizer) → ferroq-kernels (the
//! converter quantizes with the kernels crate's scalar twins, the same code the runtime's tests
//! trust). Nothing in the runtime depends on this crate; the `ferroq` binary (`cli/`) does.

pub mod convert;
pub mod family;
pub mod gguf;
pub mod gguf_llama4;
pub mod hf;
pub mod imatrix;
pub mod imatrix_llama;
pub mod safetensors;
pub mod safetensors_write;
pub mod source;
pub mod synth;
