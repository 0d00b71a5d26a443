//! The model: a validated `.fqm` mapping plus handles to every tensor of the tensor table.
//! Weights are never copied: a handle is an index into the file's directory, resolved to a
//! typed slice of the mapping when used.

use super::config::ModelConfig;
use super::tensors::{tensor_table, LayerTensor, Proj, Role, TensorKey};
use crate::format::{DType, FqmFile};
use crate::ops::Mat;
use crate::{Error, Result};
use ferroq_kernels::{Kernels, QMat};
use std::path::Path;

/// A tensor of the model: index into the file's directory (validated at load).
#[derive(Clone, Copy, Debug)]
pub struct W(usize);

impl W {
    /// The index of the tensor in the file's directory.
    pub fn index(self) -> usize {
        self.0
    }
}

/// Weights of one decoder layer.
#[derive(Debug)]
pub struct LayerWeights {
    pub attn_norm: W,
    pub wq: W,
    pub wk: W,
    pub wv: W,
    pub wo: W,
    pub ffn_norm: W,
    pub ffn: FfnWeights,
}

/// The FFN of a layer.
#[derive(Debug)]
pub enum FfnWeights {
    Dense {
        gate: W,
        up: W,
        down: W,
    },
    Moe {
        router: W,
        shared: Option<[W; 3]>,
        experts: Vec<[W; 3]>,
    },
}

/// A loaded model. `Send + Sync`: share it (e.g. in an `Arc`) between many sessions.
#[derive(Debug)]
pub struct Model {
    pub file: FqmFile,
    pub config: ModelConfig,
    pub kernels: Kernels,
    pub tok_embeddings: W,
    pub layers: Vec<LayerWeights>,
    pub output_norm: W,
    /// The output projection (`tok_embeddings` when tied).
    pub output: W,
    /// RoPE inverse frequencies `[head_dim / 2]`.
    pub inv_freq: Vec<f32>,
    /// Most positions a session may hold: `max_position_embeddings`, unless raised with
    /// [`Model::allow_any_context`] (`--ctx-override`).
    pub ctx_limit: usize,
    /// Expert-aware residency under a memory budget ([`Model::enable_paging`]); `None`: the
    /// page cache decides (the model fits).
    pub residency: Option<super::residency::Residency>,
}

/// Whether products with a matrix of this type use 8-bit quantized activations.
fn quantized(d: DType) -> bool {
    d.quantized().is_some()
}

/// The routed experts of a layer share one quantization of their inputs (the forward pass
/// quantizes the activations of all routed pairs once, for the types of the first expert), so
/// every expert's `gate` and `up` must be all quantized or all float, and so must every `down`.
/// A file mixing them (e.g. one expert's `gate` stored as f32 beside q4 `up`) is refused here
/// instead of failing mid-forward.
fn check_expert_types(
    file: &FqmFile,
    config: &ModelConfig,
    get: &dyn Fn(TensorKey) -> W,
) -> Result<()> {
    let key = |i: usize, e: usize, p: Proj| TensorKey::Layer(i, LayerTensor::Expert(e, p));
    let dtype = |k: TensorKey| file.tensors()[get(k).0].dtype;
    for (i, l) in config.layers.iter().enumerate() {
        if !l.moe || config.num_experts == 0 {
            continue;
        }
        let first = [
            quantized(dtype(key(i, 0, Proj::Gate))),
            quantized(dtype(key(i, 0, Proj::Down))),
        ];
        for e in 0..config.num_experts {
            for (p, want) in [
                (Proj::Gate, first[0]),
                (Proj::Up, first[0]),
                (Proj::Down, first[1]),
            ] {
                let name = key(i, e, p);
                let d = dtype(name);
                if quantized(d) != want {
                    let first_name = if p == Proj::Down { "down" } else { "gate" };
                    return Err(Error::format(
                        file.path(),
                        format!(
                            "tensor `{name}` has type {}, but `layers.{i}.experts.0.{first_name}` \
                             is {}: the routed experts of a layer must be all quantized or all \
                             float in their gate/up and in their down projections (reconvert \
                             the model)",
                            d.name(),
                            if want { "quantized" } else { "float" }
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Model {
    /// Open and validate a `.fqm` model: every tensor of the table must be present with its
    /// shape and an allowed type. Takes milliseconds: nothing is read but the directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Model> {
        Self::open_with(path, Kernels::detect())
    }

    /// Like [`Model::open`] with an explicit kernel table (tests pin a CPU level).
    pub fn open_with(path: impl AsRef<Path>, kernels: Kernels) -> Result<Model> {
        let file = FqmFile::open(path.as_ref())?;
        let cfg_v = file
            .meta()
            .get("config")
            .ok_or_else(|| Error::format(file.path(), "metadata has no `config`"))?;
        let config: ModelConfig = serde_json::from_value(cfg_v.clone())
            .map_err(|e| Error::format(file.path(), format!("metadata `config`: {e}")))?;
        config.validate()?;
        // check the whole table first, so a bad file fails at open, not mid-forward
        let mut ids = std::collections::HashMap::new();
        for spec in tensor_table(&config) {
            let idx = file.index_of(&spec.name).ok_or_else(|| {
                Error::format(file.path(), format!("tensor `{}` is missing", spec.name))
            })?;
            let info = &file.tensors()[idx];
            if info.shape != spec.shape {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "tensor `{}` has shape {:?}, the config implies {:?}",
                        spec.name, info.shape, spec.shape
                    ),
                ));
            }
            let ok = match spec.role {
                Role::Norm | Role::Router => info.dtype == DType::F32,
                // a plain-product type (6-bit: no fused gate/up) for the tables only
                Role::Embedding | Role::Output if quantized(info.dtype) => true,
                _ => {
                    matches!(info.dtype, DType::F32 | DType::F16 | DType::Bf16)
                        || info.dtype.quantized().is_some_and(|t| t.gate_up)
                }
            };
            if !ok {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "tensor `{}` has type {}, not allowed for its role",
                        spec.name,
                        info.dtype.name()
                    ),
                ));
            }
            ids.insert(spec.key, W(idx));
        }
        let get = |k: TensorKey| ids[&k];
        check_expert_types(&file, &config, &get)?;
        let mut layers = Vec::with_capacity(config.num_layers);
        for (i, l) in config.layers.iter().enumerate() {
            let p = |t: LayerTensor| get(TensorKey::Layer(i, t));
            let ffn = if l.moe {
                FfnWeights::Moe {
                    router: p(LayerTensor::Router),
                    shared: config
                        .shared_expert
                        .then(|| Proj::ALL.map(|q| p(LayerTensor::Shared(q)))),
                    experts: (0..config.num_experts)
                        .map(|e| Proj::ALL.map(|q| p(LayerTensor::Expert(e, q))))
                        .collect(),
                }
            } else {
                let [gate, up, down] = Proj::ALL.map(|q| p(LayerTensor::Ffn(q)));
                FfnWeights::Dense { gate, up, down }
            };
            layers.push(LayerWeights {
                attn_norm: p(LayerTensor::AttnNorm),
                wq: p(LayerTensor::Wq),
                wk: p(LayerTensor::Wk),
                wv: p(LayerTensor::Wv),
                wo: p(LayerTensor::Wo),
                ffn_norm: p(LayerTensor::FfnNorm),
                ffn,
            });
        }
        let tok_embeddings = get(TensorKey::TokEmbeddings);
        let output = if config.tie_word_embeddings {
            tok_embeddings
        } else {
            get(TensorKey::Output)
        };
        let scaling = config.rope_scaling.map(|s| {
            (
                s.factor,
                s.low_freq_factor,
                s.high_freq_factor,
                s.original_max_position_embeddings,
            )
        });
        let mut inv_freq = crate::ops::rope_inv_freq(config.rope_theta, config.head_dim, scaling);
        if let Some(factors) = &config.rope_freq_factors {
            // (validated: head_dim / 2 finite positive values)
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        if config.rope_freq_bf16 {
            inv_freq
                .iter_mut()
                .for_each(|f| *f = half::bf16::from_f32(*f).to_f32());
        }
        Ok(Model {
            ctx_limit: config.max_position_embeddings,
            residency: None,
            output_norm: get(TensorKey::OutputNorm),
            file,
            config,
            kernels,
            tok_embeddings,
            layers,
            output,
            inv_freq,
        })
    }

    /// Let sessions hold more positions than `max_position_embeddings` (the model was not
    /// trained for them: RoPE extrapolates, quality drops). Call before sharing the model.
    pub fn allow_any_context(&mut self) {
        self.ctx_limit = usize::MAX;
    }

    /// A matrix view (type checked at open).
    pub fn mat(&self, w: W) -> Mat<'_> {
        let info = &self.file.tensors()[w.0];
        let bytes = &self.file.bytes()[info.offset..info.offset + info.nbytes];
        // The casts cannot fail: offsets are 64-byte aligned into a page-aligned mapping and
        // sizes were checked against the shape at open.
        match info.dtype {
            DType::F32 => Mat::F32(bytemuck::cast_slice(bytes)),
            DType::Bf16 => Mat::Bf16(bytemuck::cast_slice(bytes)),
            DType::F16 => Mat::F16(bytemuck::cast_slice(bytes)),
            DType::U8 => unreachable!("U8 tensors are rejected for matrix roles at open"),
            d => Mat::Q(QMat::cast(d.name(), bytes).expect("a registered type, checked at open")),
        }
    }

    /// An f32 vector (norm weights, router), type checked at open.
    pub fn vec(&self, w: W) -> &[f32] {
        let info = &self.file.tensors()[w.0];
        bytemuck::cast_slice(&self.file.bytes()[info.offset..info.offset + info.nbytes])
    }

    /// Whether the attention/FFN matrices are quantized (Q4x8/Q8x8) rather than float.
    pub fn is_quantized(&self) -> bool {
        self.layers
            .iter()
            .any(|l| quantized(self.file.tensors()[l.wq.0].dtype))
    }

    /// The KV cache type to use when the user does not choose: f32 for unquantized models
    /// (their logits are compared with transformers to 1e-3, and an f16 cache alone moves them
    /// by up to ~1e-3 on the fixtures), f16 for quantized models (half the cache traffic; its
    /// error is far below the weights' quantization error).
    pub fn default_kv(&self) -> super::kv::KvType {
        if self.is_quantized() {
            super::kv::KvType::F16
        } else {
            super::kv::KvType::F32
        }
    }

    /// An embedded raw file (`blob.tokenizer.json`, ...).
    pub fn blob(&self, name: &str) -> Option<&[u8]> {
        self.file
            .get(name)
            .filter(|t| t.info.dtype == DType::U8)
            .map(|t| t.data)
    }
}
