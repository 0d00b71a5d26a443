//! Text in, text out: an [`Engine`] (model + tokenizer + chat template + stop tokens, loaded
//! from one `.fqm` file) shared by any number of [`Session`]s (one conversation each, with its
//! own KV cache).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ferroq::{Engine, GenOptions, Session, SessionOptions};
//! let engine = Arc::new(Engine::open("smollm2.fqm")?);
//! let mut s = Session::new(engine.clone(), &SessionOptions::default())?;
//! let g = s.chat("What is the capital of France?", &GenOptions::default(), &mut |_, piece| {
//!     print!("{piece}");
//!     true // false cancels
//! })?;
//! eprintln!("{:.1} tokens/s", g.timings.gen_tokens_per_s());
//! # Ok::<(), ferroq::Error>(())
//! ```
//!
//! A session keeps the ids whose keys/values are in its cache. Each generation call compares
//! the new prompt with them and only runs the tokens after the first difference, so a
//! multi-turn chat processes only the new turn (and falls back to re-processing from the first
//! differing token when the rendered conversation does not extend the previous one).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::chat::{no_template_error, ChatTemplate, Message};
use crate::format::{DType, FqmFile};
use crate::grammar::{Grammar, GrammarMatcher, TokenIndex};
use crate::model::{KvType, Logits, Model, State};
use crate::sampling::{Sampler, SamplerConfig, Stop, StopCondition};
use crate::tokenizer::{Tokenizer, TokenizerKind};
use crate::{Error, Result};

/// Default context when none is asked for (capped by the model's maximum).
pub const DEFAULT_CTX: usize = 4096;
/// Default number of prompt tokens per forward call.
pub const DEFAULT_BATCH: usize = 64;

/// A model ready for text: weights, tokenizer, chat template and stop ids. Immutable after
/// [`Engine::open`]; `Send + Sync`, share it in an `Arc` between sessions and threads.
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    stop_ids: Vec<u32>,
    add_bos: bool,
    load_ms: f64,
    /// The tokenizer's trie for structured output, built on first use.
    token_index: OnceLock<Arc<TokenIndex>>,
    /// The model file's fingerprint for session state files, computed on first use.
    fingerprint: OnceLock<[u8; 16]>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model.file.path())
            .field("vocab", &self.tokenizer.vocab_size())
            .field("template", &self.template)
            .field("stop_ids", &self.stop_ids)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

fn meta_str(meta: &serde_json::Value, key: &str) -> Option<String> {
    meta.get(key)?.as_str().map(str::to_string)
}

fn meta_id(file: &FqmFile, key: &str) -> Result<Option<u32>> {
    match file.meta().get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .map(Some)
            .ok_or_else(|| Error::format(file.path(), format!("metadata `{key}` is not an id"))),
    }
}

fn blob<'a>(file: &'a FqmFile, name: &str) -> Result<&'a [u8]> {
    let t = file
        .get(name)
        .ok_or_else(|| Error::format(file.path(), format!("`{name}` is missing")))?;
    if t.info.dtype != DType::U8 {
        return Err(Error::format(
            file.path(),
            format!("`{name}` has type {}, expected u8", t.info.dtype.name()),
        ));
    }
    Ok(t.data)
}

/// The tokenizer stored in a `.fqm` file (its `tokenizer.kind` blob), with the BOS id of the
/// metadata when it names one.
pub fn tokenizer_from_fqm(file: &FqmFile) -> Result<Tokenizer> {
    let kind = file
        .meta()
        .get("tokenizer")
        .and_then(|t| t.get("kind"))
        .and_then(|k| k.as_str());
    const KINDS: [TokenizerKind; 3] = [
        TokenizerKind::HfJson,
        TokenizerKind::Tiktoken,
        TokenizerKind::SentencePiece,
    ];
    let (name, kind) = match kind {
        Some(k) => match KINDS.iter().find(|x| x.fqm_name().0 == k) {
            Some(&x) => (x.fqm_name().1, x),
            None => {
                return Err(Error::format(
                    file.path(),
                    format!(
                        "metadata `tokenizer.kind` is {k:?}, expected \"hf_json\", \"tiktoken\" \
                         or \"sentencepiece\""
                    ),
                ))
            }
        },
        None => {
            return Err(Error::format(
                file.path(),
                "this model has no tokenizer (metadata `tokenizer.kind` is null); \
                 it can only be run from token ids (`ferroq generate --ids`)",
            ))
        }
    };
    let bytes = blob(file, name)?;
    let mut tok = Tokenizer::from_bytes(bytes, kind)
        .map_err(|e| Error::format(file.path(), format!("`{name}`: {}", e)))?;
    if let Some(b) = meta_id(file, "bos_token_id")? {
        if tok.id_to_bytes(b).is_some() {
            tok.set_bos_id(Some(b));
        }
    }
    Ok(tok)
}

/// The memory a model may use for its weights ([`EngineOptions::mem`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemBudget {
    /// What the machine (or the process's memory cgroup) has free: experts are paged only when
    /// the model does not fit.
    #[default]
    Auto,
    /// Never page: the page cache decides what stays (as before).
    Off,
    /// This many bytes for weights, KV cache and buffers: experts are paged when the model
    /// file does not fit.
    Bytes(u64),
}

impl MemBudget {
    /// Parse `auto`, `off` or a size (`12G`, `800M`, `1.5GiB`, bytes).
    pub fn parse(s: &str) -> Result<MemBudget> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(MemBudget::Auto),
            "off" | "none" => Ok(MemBudget::Off),
            _ => crate::model::residency::parse_mem(s).map(MemBudget::Bytes),
        }
    }
}

/// How an engine is opened ([`Engine::open_with`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Let sessions hold more positions than the model's `max_position_embeddings` (refused
    /// by default: the model was not trained for them).
    pub ctx_override: bool,
    /// Memory budget: routed experts are paged (expert-aware residency,
    /// [`crate::model::residency`]) when the model does not fit in it.
    pub mem: MemBudget,
    /// Lock the weights that stay resident in memory (`mlock`): the dense part when experts
    /// are paged, else the whole file.
    pub mlock: bool,
    /// Check every tensor against the checksums of the file before use (reads the whole
    /// model once, about as fast as the disk or page cache; see `ferroq verify`). Off by
    /// default: opening stays instant (the directory and metadata are always checked).
    pub verify: bool,
}

impl Engine {
    /// Open a `.fqm` model and load its tokenizer, chat template (if any) and stop ids.
    pub fn open(path: impl AsRef<Path>) -> Result<Engine> {
        Self::open_with(path, &EngineOptions::default())
    }

    /// [`Engine::open`] with options.
    pub fn open_with(path: impl AsRef<Path>, opts: &EngineOptions) -> Result<Engine> {
        let t0 = Instant::now();
        let mut model = Model::open(path)?;
        if opts.verify {
            model.file.verify(&|_, _| {})?;
        }
        if opts.ctx_override {
            model.allow_any_context();
        }
        let budget = match opts.mem {
            MemBudget::Off => None,
            MemBudget::Auto => Some(None),
            MemBudget::Bytes(b) => Some(Some(b)),
        };
        let paged = match budget {
            Some(budget) => model.enable_paging(&crate::model::residency::PagingOptions {
                budget,
                mlock: opts.mlock,
                force: false,
                no_prefetch: false,
                predict: false,
            })?,
            None => false,
        };
        if opts.mlock && !paged {
            model.lock_all()?;
        }
        let mut e = Engine::from_model(model)?;
        e.load_ms = t0.elapsed().as_secs_f64() * 1e3;
        Ok(e)
    }

    /// Build from an opened model (its file holds the tokenizer and metadata).
    pub fn from_model(model: Model) -> Result<Engine> {
        let t0 = Instant::now();
        let file = &model.file;
        let meta = file.meta();
        let tokenizer = tokenizer_from_fqm(file)?;
        let template = match meta.get("chat_template") {
            Some(serde_json::Value::String(t)) if !t.trim().is_empty() => Some(
                ChatTemplate::new(t, meta_str(meta, "bos_token"), meta_str(meta, "eos_token"))
                    .map_err(|e| Error::format(file.path(), e.to_string()))?,
            ),
            None | Some(serde_json::Value::Null) | Some(serde_json::Value::String(_)) => None,
            Some(_) => {
                return Err(Error::format(
                    file.path(),
                    "metadata `chat_template` is not a string",
                ))
            }
        };
        let mut stop_ids = Vec::new();
        match meta.get("stop_token_ids") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Array(a)) => {
                for v in a {
                    let id = v
                        .as_u64()
                        .and_then(|x| u32::try_from(x).ok())
                        .ok_or_else(|| {
                            Error::format(file.path(), "metadata `stop_token_ids` holds a non-id")
                        })?;
                    stop_ids.push(id);
                }
            }
            Some(_) => {
                return Err(Error::format(
                    file.path(),
                    "metadata `stop_token_ids` is not a list",
                ))
            }
        }
        // the template's end-of-turn token (eos_token) stops generation too
        if let Some(id) = meta_str(meta, "eos_token").and_then(|s| tokenizer.token_to_id(&s)) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let add_bos = meta
            .get("add_bos")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Engine {
            model,
            tokenizer,
            template,
            stop_ids,
            add_bos,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            token_index: OnceLock::new(),
            fingerprint: OnceLock::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, if the model has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Ids that end generation (generation config, template end-of-turn token).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The tokenizer's token trie for structured output (built on the first call, then
    /// shared; stop ids are allowed only where a value is complete).
    pub fn token_index(&self) -> Arc<TokenIndex> {
        self.token_index
            .get_or_init(|| Arc::new(TokenIndex::new(&self.tokenizer, &self.stop_ids)))
            .clone()
    }

    /// The identity of the model file that session state files carry
    /// ([`crate::state_file::model_fingerprint`]), computed on the first call.
    pub fn fingerprint(&self) -> [u8; 16] {
        *self
            .fingerprint
            .get_or_init(|| crate::state_file::model_fingerprint(&self.model.file))
    }

    /// Whether plain prompts get the BOS token (as the Hugging Face tokenizer does).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Milliseconds [`Engine::open`] took (map the file, validate it, build the tokenizer).
    /// Weights are mapped, not read: the first forward pass pages them in.
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// Ids of a plain prompt (BOS first when the model's tokenizer adds one).
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, self.add_bos)
    }

    /// Ids of a conversation rendered with the chat template (no second BOS).
    pub fn encode_chat(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        let t = self.template.as_ref().ok_or_else(no_template_error)?;
        crate::chat::encode_chat(&self.tokenizer, t, messages, add_generation_prompt)
    }

    /// Text of `ids` (special tokens left out when `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.tokenizer.decode(ids, skip_special)
    }

    /// The context a session gets when it asks for `ctx` (0 = default).
    pub fn context_for(&self, ctx: usize) -> usize {
        let max = self.model.config.max_position_embeddings.max(1);
        if ctx == 0 {
            DEFAULT_CTX.min(max)
        } else {
            ctx
        }
    }
}

/// How a session is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOptions {
    /// Context (KV cache) size in tokens; 0 = `min(4096, the model's maximum)`.
    pub ctx: usize,
    /// Prompt tokens per forward call (0 = default).
    pub batch: usize,
    /// Threads of the forward pass (0 = all cores; at most [`crate::pool::MAX_THREADS`] = 512).
    pub threads: usize,
    /// KV cache type (`None`: f32 for unquantized models, f16 for quantized ones).
    pub kv: Option<KvType>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            ctx: 0,
            batch: DEFAULT_BATCH,
            threads: 0,
            kv: None,
        }
    }
}

/// Settings of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenOptions {
    /// Most tokens to generate.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation ends when one of these appears (it is not part of the text).
    pub stop_strings: Vec<String>,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            stop_strings: Vec::new(),
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced a stop token.
    StopToken,
    /// A stop string appeared.
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The callback asked to stop.
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::StopToken => "stop token",
            StopReason::StopString => "stop string",
            StopReason::MaxTokens => "length limit",
            StopReason::ContextFull => "context full",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// Where the time of one generation went.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    /// Prompt tokens whose cache entries were reused from the previous call.
    pub reused_tokens: usize,
    /// Prompt tokens run through the model.
    pub prompt_tokens: usize,
    pub prompt_ms: f64,
    /// Tokens generated (the stop token not counted).
    pub gen_tokens: usize,
    /// Forward passes during generation (usually `gen_tokens - 1`).
    pub gen_forwards: usize,
    /// Time of the generation loop: sampling, decoding and the forward passes.
    pub gen_ms: f64,
}

fn per_s(n: usize, ms: f64) -> f64 {
    if ms > 0.0 {
        n as f64 * 1e3 / ms
    } else {
        0.0
    }
}

impl Timings {
    pub fn prompt_tokens_per_s(&self) -> f64 {
        per_s(self.prompt_tokens, self.prompt_ms)
    }
    pub fn gen_tokens_per_s(&self) -> f64 {
        per_s(self.gen_tokens, self.gen_ms)
    }
}

/// The result of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids (without the stop token).
    pub ids: Vec<u32>,
    /// Their text as streamed: special tokens left out, cut before a stop string.
    pub text: String,
    pub stop: StopReason,
    pub timings: Timings,
}

/// One conversation: a KV cache over a shared [`Engine`].
pub struct Session {
    engine: Arc<Engine>,
    state: State,
    batch: usize,
    /// Threads asked for (kept to rebuild the state after an internal error).
    threads: usize,
    /// Ids whose keys/values are in the cache (`cached.len() == state.pos`).
    cached: Vec<u32>,
    logits: Vec<f32>,
    messages: Vec<Message>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("ctx", &self.state.max_ctx())
            .field("cached", &self.cached.len())
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session with its own cache of `opts.ctx` tokens.
    pub fn new(engine: Arc<Engine>, opts: &SessionOptions) -> Result<Session> {
        let ctx = engine.context_for(opts.ctx);
        if ctx < 2 {
            return Err(Error::config(
                "ctx",
                "the context must hold at least 2 tokens",
            ));
        }
        let batch = if opts.batch == 0 {
            DEFAULT_BATCH
        } else {
            opts.batch
        }
        .min(ctx);
        let kv = opts.kv.unwrap_or(engine.model.default_kv());
        let state = State::try_with_kv(&engine.model, ctx, batch, false, opts.threads, kv)?;
        let vocab = engine.model.config.vocab_size;
        let mut cached = Vec::new();
        cached.try_reserve_exact(ctx).map_err(|_| {
            Error::config(
                "ctx",
                format!("a context of {ctx} tokens cannot be allocated"),
            )
        })?;
        Ok(Session {
            state,
            batch,
            threads: opts.threads,
            cached,
            logits: vec![0.0; vocab],
            messages: Vec::new(),
            engine,
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Context size in tokens.
    pub fn ctx(&self) -> usize {
        self.state.max_ctx()
    }

    /// The KV cache element type.
    pub fn kv_type(&self) -> KvType {
        self.state.kv_type()
    }

    /// Memory of this session's KV cache (print [`crate::model::KvBytes::describe`] at start).
    pub fn kv_bytes(&self) -> crate::model::KvBytes {
        crate::model::kv_bytes(
            &self.engine.model.config,
            self.state.max_ctx(),
            self.state.kv_type(),
        )
    }

    /// Ids currently in the KV cache.
    pub fn cached(&self) -> &[u32] {
        &self.cached
    }

    /// The conversation of [`Session::chat`] so far.
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Forget the conversation and the cache. A state left unusable by an internal error
    /// (a caught panic) is rebuilt; if that fails, later calls report it (see
    /// [`Session::try_reset`]).
    pub fn reset(&mut self) {
        let _ = self.try_reset();
    }

    /// [`Session::reset`], with the error when the state had to be rebuilt and could not be.
    pub fn try_reset(&mut self) -> Result<()> {
        self.messages.clear();
        self.cached.clear();
        self.state.reset();
        if !self.state.is_usable() {
            let st = &self.state;
            self.state = State::try_with_kv(
                &self.engine.model,
                st.max_ctx(),
                st.max_batch(),
                false,
                self.threads,
                st.kv_type(),
            )?;
        }
        Ok(())
    }

    /// Set the system message of the conversation (only before the first turn).
    pub fn set_system(&mut self, system: &str) -> Result<()> {
        if !self.messages.iter().all(|m| m.role == "system") {
            return Err(Error::Input(
                "the system message can only be set before the first turn".into(),
            ));
        }
        self.messages.clear();
        self.messages.push(Message::new("system", system));
        Ok(())
    }

    /// Save the session's context (the ids in its cache and their keys and values) to `path`,
    /// atomically (a temporary file renamed over it: a failed save leaves an earlier file
    /// intact). Returns the number of tokens saved. See [`crate::state_file`] for the format.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<usize> {
        self.save_prefix(path, self.cached.len())
    }

    /// [`Session::save`] of the first `n` cached tokens only (e.g. the prompt without the
    /// generated answer; more than are cached saves them all). With chunked-attention layers
    /// (Llama 4) `n` must be every cached token or lie in the attention chunk of the last
    /// one ([`crate::model::State::can_save`]), else it is an error.
    pub fn save_prefix(&self, path: impl AsRef<Path>, n: usize) -> Result<usize> {
        let n = n.min(self.cached.len());
        let bytes = crate::state_file::encode(
            &self.engine.model,
            &self.engine.fingerprint(),
            &self.state,
            &self.cached[..n],
        )?;
        crate::state_file::write_atomic(path.as_ref(), &bytes)?;
        Ok(n)
    }

    /// Replace the session's context with one saved by [`Session::save`] from the same model
    /// with the same KV type (the session keeps its own context size, which must hold the
    /// saved tokens and one more). The next generation reuses the cache of the longest common
    /// prefix of its prompt and the loaded ids. The conversation of [`Session::chat`] is
    /// cleared. Returns the number of tokens loaded. On error the session is unchanged.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<usize> {
        let path = path.as_ref();
        let fp = self.engine.fingerprint();
        let d = crate::state_file::read(path, &self.engine.model, &fp, &self.state)?;
        let n = d.ids.len();
        self.state.read_kv(n, d.kv())?;
        self.cached.clear();
        self.cached.extend_from_slice(&d.ids);
        self.messages.clear();
        Ok(n)
    }

    /// The logits of the last forward pass (after a generation: those of its last step).
    pub fn logits(&self) -> &[f32] {
        self.state.logits()
    }

    /// A new session with the context of a state file ([`Session::new`] + [`Session::load`]).
    pub fn restore(
        engine: Arc<Engine>,
        opts: &SessionOptions,
        path: impl AsRef<Path>,
    ) -> Result<Session> {
        let mut s = Session::new(engine, opts)?;
        s.load(path)?;
        Ok(s)
    }

    /// Run `prompt` (keeping the cache of its longest prefix already there) so that the
    /// logits of its last token are ready. Returns the number of reused tokens.
    fn prefill(&mut self, prompt: &[u32]) -> Result<usize> {
        if prompt.is_empty() {
            return Err(Error::Input("the prompt is empty".into()));
        }
        let ctx = self.state.max_ctx();
        if prompt.len() >= ctx {
            return Err(Error::Input(format!(
                "the prompt is {} tokens but the context holds {ctx} (including at least one \
                 generated token); use a larger context (-c) or a shorter prompt",
                prompt.len()
            )));
        }
        let vocab = self.engine.model.config.vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {bad} is out of range (vocabulary {vocab})"
            )));
        }
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // at least one token must run to produce the logits
        // (a chunk-ring cache may keep fewer: from the start of `keep`'s attention chunk)
        let keep = self.state.truncate(common.min(prompt.len() - 1));
        self.cached.truncate(keep);
        let rest = &prompt[keep..];
        let n_chunks = rest.len().div_ceil(self.batch);
        for (i, chunk) in rest.chunks(self.batch).enumerate() {
            let want = if i + 1 == n_chunks {
                Logits::Last
            } else {
                Logits::None
            };
            if let Err(e) = self.engine.model.forward(&mut self.state, chunk, want) {
                self.cached.truncate(self.state.pos.min(self.cached.len()));
                let kept = self.state.truncate(self.cached.len());
                self.cached.truncate(kept);
                return Err(e);
            }
            self.cached.extend_from_slice(chunk);
        }
        Ok(keep)
    }

    /// Generate a continuation of `prompt` (token ids). `on_token(id, text)` is called for
    /// every generated token with the text it completes (possibly empty: bytes of a character
    /// split over tokens, text that may start a stop string), and once more with `None` if
    /// held-back text remains at the end; it returns `false` to stop.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenOptions,
        on_token: &mut dyn FnMut(Option<u32>, &str) -> bool,
    ) -> Result<Generation> {
        self.generate_constrained(prompt, opts, None, on_token)
    }

    /// [`Session::generate`] with the output constrained to `grammar` (structured output:
    /// see [`crate::grammar`]). The generation ends with [`StopReason::StopToken`] only where
    /// the value is complete (the text then parses and matches the schema);
    /// [`StopReason::MaxTokens`] means it was cut first (OpenAI's `finish_reason: "length"`).
    pub fn generate_constrained(
        &mut self,
        prompt: &[u32],
        opts: &GenOptions,
        grammar: Option<&Arc<Grammar>>,
        on_token: &mut dyn FnMut(Option<u32>, &str) -> bool,
    ) -> Result<Generation> {
        opts.sampler.validate()?;
        let mut matcher =
            grammar.map(|g| GrammarMatcher::new(g.clone(), self.engine.token_index()));
        let t0 = Instant::now();
        let reused = self.prefill(prompt)?;
        let mut timings = Timings {
            reused_tokens: reused,
            prompt_tokens: prompt.len() - reused,
            prompt_ms: t0.elapsed().as_secs_f64() * 1e3,
            ..Timings::default()
        };

        let t1 = Instant::now();
        let engine = Arc::clone(&self.engine);
        let vocab = engine.model.config.vocab_size;
        let mut sampler = Sampler::new(opts.sampler.clone(), vocab);
        let mut dec = engine.tokenizer.stream_decoder(true);
        let mut stop = StopCondition::new(engine.stop_ids.clone(), opts.stop_strings.clone());
        let mut ids = Vec::with_capacity(opts.max_tokens.min(self.state.max_ctx()));
        let mut text = String::new();
        let (mut piece, mut shown) = (String::with_capacity(64), String::with_capacity(64));
        let ctx = self.state.max_ctx();
        let reason = loop {
            if ids.len() >= opts.max_tokens {
                break StopReason::MaxTokens;
            }
            let l = self.state.logits();
            self.logits[..l.len().min(vocab)].copy_from_slice(&l[..l.len().min(vocab)]);
            let mask = match matcher.as_mut() {
                Some(m) => {
                    if !m.any_allowed() {
                        // complete and no stop id, or nesting beyond the grammar's limit
                        break if m.can_end() {
                            StopReason::StopToken
                        } else {
                            StopReason::MaxTokens
                        };
                    }
                    Some(m.mask())
                }
                None => None,
            };
            let id = sampler.sample_masked(&mut self.logits, &self.cached, mask);
            if let Some(m) = matcher.as_mut() {
                m.accept_token(id)?;
            }
            if stop.is_stop_id(id) {
                break StopReason::StopToken;
            }
            ids.push(id);
            piece.clear();
            dec.push_into(id, &mut piece);
            shown.clear();
            let s = stop.push_text(&piece, &mut shown);
            text.push_str(&shown);
            if !on_token(Some(id), &shown) {
                break StopReason::Cancelled;
            }
            if s == Stop::String {
                break StopReason::StopString;
            }
            if ids.len() >= opts.max_tokens {
                break StopReason::MaxTokens;
            }
            if self.state.pos >= ctx {
                break StopReason::ContextFull;
            }
            engine.model.forward(&mut self.state, &[id], Logits::Last)?;
            self.cached.push(id);
            timings.gen_forwards += 1;
        };
        if reason != StopReason::StopString {
            shown.clear();
            if let Some(rest) = dec.flush() {
                let _ = stop.push_text(&rest, &mut shown);
            }
            stop.finish(&mut shown);
            if !shown.is_empty() {
                text.push_str(&shown);
                on_token(None, &shown);
            }
        }
        timings.gen_tokens = ids.len();
        timings.gen_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(Generation {
            ids,
            text,
            stop: reason,
            timings,
        })
    }

    /// One chat turn: add the user message, render the whole conversation with the model's
    /// chat template, generate the answer (reusing the cache of the previous turns) and add it
    /// to the conversation.
    pub fn chat(
        &mut self,
        user: &str,
        opts: &GenOptions,
        on_token: &mut dyn FnMut(Option<u32>, &str) -> bool,
    ) -> Result<Generation> {
        if self.engine.template.is_none() {
            return Err(no_template_error());
        }
        if user.trim().is_empty() {
            return Err(Error::Input("the message is empty".into()));
        }
        self.messages.push(Message::new("user", user));
        let r = self
            .engine
            .encode_chat(&self.messages, true)
            .and_then(|ids| self.generate(&ids, opts, on_token));
        match r {
            Ok(g) => {
                self.messages
                    .push(Message::new("assistant", g.text.clone()));
                Ok(g)
            }
            Err(e) => {
                self.messages.pop();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_is_send_sync() {
        fn ok<T: Send + Sync>() {}
        ok::<super::Engine>();
        fn send<T: Send>() {}
        send::<super::Session>();
    }
}
