//! Model tools: the converter (`ferroq convert`) and its input readers.
//!
//! Compiled into the library as `ferroq::tools` so the CLI and embedders can convert models.
//! Dependency direction: tools → format/model → kernels (the converter quantizes with the
//! kernels crate's scalar twins, the same code the runtime's tests trust).

pub mod convert;
pub mod family;
pub mod gguf;
pub mod gguf_llama4;
pub mod hf;
pub mod imatrix;
pub mod safetensors;
pub mod safetensors_write;
pub mod source;
pub mod synth;
