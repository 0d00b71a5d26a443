//! What every input reader (Hugging Face safetensors directory, GGUF file) produces: a
//! [`Checkpoint`], i.e. a Hugging Face style `config.json`, tokenizer files, and a
//! [`TensorSource`] that yields tensors by their Hugging Face names.

use ferroq::Result;

/// One tensor of an input checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrcTensor {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Shape as stored by Hugging Face (nn.Linear `[out, in]`; Llama 4 experts `[E, in, out]`).
    pub shape: Vec<usize>,
    /// Source element type, for messages and the recipe (`"bf16"`, `"f32"`, `"q4_1"`, ...).
    pub dtype: String,
}

/// Random access to the tensors of a checkpoint. Implementations are memory-mapped and stream:
/// [`TensorSource::read_f32`] materializes one tensor at a time.
pub trait TensorSource: Send + Sync {
    /// All tensors, by Hugging Face name.
    fn tensors(&self) -> &[SrcTensor];

    /// Read tensor `name` as f32 in its stored shape, row-major, into `out` (resized).
    fn read_f32(&self, name: &str, out: &mut Vec<f32>) -> Result<()>;

    /// Read slice `index` along dimension 0 of tensor `name` (e.g. one expert of a fused
    /// `[E, in, out]` tensor) as f32, row-major, into `out` (resized). The default reads the
    /// whole tensor and copies the slice; memory-mapped readers override it to read only the
    /// slice, so peak memory stays at one expert.
    fn read_f32_outer(&self, name: &str, index: usize, out: &mut Vec<f32>) -> Result<()> {
        let t = self
            .find(name)
            .ok_or_else(|| ferroq::Error::tensor(name, "missing from the checkpoint"))?;
        let outer = *t.shape.first().unwrap_or(&1);
        if index >= outer || t.shape.is_empty() {
            return Err(ferroq::Error::tensor(
                name,
                format!("slice {index} requested of shape {:?}", t.shape),
            ));
        }
        let inner: usize = t.shape[1..].iter().product();
        let mut all = Vec::new();
        self.read_f32(name, &mut all)?;
        out.clear();
        out.extend_from_slice(&all[index * inner..(index + 1) * inner]);
        Ok(())
    }

    /// Look up a tensor's description.
    fn find(&self, name: &str) -> Option<&SrcTensor> {
        self.tensors().iter().find(|t| t.name == name)
    }
}

/// An input model as the converter sees it, whatever file format it came from.
pub struct Checkpoint {
    /// Where it came from (a directory or a `.gguf` path), for provenance and messages.
    pub origin: String,
    /// Hugging Face style `config.json` (for GGUF: synthesized from the metadata).
    pub config: serde_json::Value,
    /// `generation_config.json`, if any.
    pub generation_config: Option<serde_json::Value>,
    /// `tokenizer_config.json`, if any.
    pub tokenizer_config: Option<serde_json::Value>,
    /// `tokenizer.json` bytes, if any (for GGUF: synthesized from the metadata).
    pub tokenizer_json: Option<Vec<u8>>,
    /// tiktoken-format `tokenizer.model` bytes, if any (Llama 4 original release).
    pub tokenizer_model: Option<Vec<u8>>,
    /// The chat template (from `chat_template.jinja`, `tokenizer_config.json` or GGUF).
    pub chat_template: Option<String>,
    /// RoPE frequency divisors that `config` cannot express (a GGUF file's `rope_freqs.weight`,
    /// Llama 3 scaling already evaluated); they become `ModelConfig::rope_freq_factors`.
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The tensors.
    pub source: Box<dyn TensorSource>,
}
