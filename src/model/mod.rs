//! Models: configuration, the tensor table, weights (views into the mapped `.fqm`), and the
//! forward pass (`forward`, over the session `state`: the `kv` cache, `attention`, the dense
//! `ffn` and the `moe` block, with named observation points in `probe`).

pub mod config;
pub mod tensors;

pub use config::{Arch, LayerSpec, Llama3Scaling, ModelConfig, RopeStyle, Router};
pub use tensors::{tensor_table, LayerTensor, Proj, Role, TensorKey, TensorSpec};
pub mod attention;
pub mod batch;
mod ffn;
pub mod forward;
pub mod kv;
pub mod kvmem;
pub mod moe;
pub mod probe;
pub mod residency;
pub mod state;
pub mod weights;

pub use batch::{BatchSeg, MultiState};
pub use kv::KvType;
pub use kvmem::{kv_bytes, KvBytes};
pub use probe::{Input, Point, Probe};
pub use state::{Logits, State};
pub use weights::Model;
