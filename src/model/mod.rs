//! Models: configuration, weights (views into the mapped `.fqm`), and the forward pass.

pub mod config;
pub mod tensors;

pub use config::{Arch, LayerSpec, Llama3Scaling, ModelConfig, RopeStyle};
pub use tensors::{tensor_table, Role, TensorSpec};
pub mod batch;
pub mod forward;
pub mod kvmem;
pub mod residency;
pub mod weights;

pub use batch::{BatchSeg, MultiState};
pub use forward::{KvType, Logits, State};
pub use kvmem::{kv_bytes, KvBytes};
pub use weights::Model;
