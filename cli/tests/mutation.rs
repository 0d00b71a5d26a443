//! Seeded mutation test (stable Rust, runs in CI every time): thousands of mutants of every kind
//! of untrusted input — `.fqm` model files (opened and run), safetensors files, `config.json`,
//! GGUF files (parsed and converted), `tokenizer.json`, chat templates, and the settings a
//! front end passes to the engine — from a fixed seed. Each case must end in `Ok` or in an
//! error with a message (naming the file for file inputs), and never:
//!
//! - panic (caught per case and reported with its kind and index),
//! - abort on allocation (the global allocator below refuses any single request above
//!   [`ALLOC_LIMIT`]: fallible allocations see an error, an unchecked one aborts the test),
//! - hang (each case has a deadline, [`DEADLINE`]; the cases run on a worker thread watched by
//!   the test thread).
//!
//! `FERROQ_MUTANTS=N` changes the number of mutants per kind (default [`DEFAULT_MUTANTS`]);
//! `FERROQ_MUTATION_SEED=S` the seed; `FERROQ_MUTATION_VERBOSE=1` prints each case before it
//! runs (to find an abort). The cases that broke earlier versions (issue 15) are in
//! `cli/tests/crashers.rs`.

mod support;

use ferroq::internals::chat::{ChatTemplate, Message};
use ferroq::internals::engine::{Engine, GenOptions, Session, SessionOptions};
use ferroq::internals::format::{xxh64, FqmFile};
use ferroq::internals::model::{KvType, Logits, Model, State};
use ferroq::internals::sampling::SamplerConfig;
use ferroq::internals::tokenizer::{Tokenizer, TokenizerKind};
use ferroq_convert::convert::{convert, ConvertOptions, ProgressEvent, Quant};
use ferroq_convert::source::TensorSource;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::{GgufWriter, Meta};

// ---------------------------------------------------------------------------------------------
// bounded allocations

/// Largest single allocation any case may request (the real inputs need < 10 MiB).
const ALLOC_LIMIT: usize = 1 << 30;
static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

struct Capped;

// SAFETY: forwards to the system allocator; refusing (returning null) is allowed by the
// GlobalAlloc contract.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if l.size() > LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from System with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > LIMIT.load(Ordering::Relaxed) {
            return std::ptr::null_mut();
        }
        // SAFETY: as above.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

// ---------------------------------------------------------------------------------------------
// the harness

const DEFAULT_MUTANTS: usize = 2000;
const DEADLINE: Duration = Duration::from_secs(20);

fn mutants() -> usize {
    std::env::var("FERROQ_MUTANTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_MUTANTS)
}

fn seed() -> u64 {
    std::env::var("FERROQ_MUTATION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d)
}

/// xorshift64*: a fixed, dependency-free generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }
}

/// Values that break size arithmetic.
const INTERESTING: [u64; 16] = [
    0,
    1,
    2,
    7,
    31,
    32,
    63,
    64,
    4096,
    1 << 24,
    (1 << 31) - 1,
    1 << 31,
    u32::MAX as u64,
    1 << 32,
    1 << 62,
    u64::MAX,
];

/// Generic byte-level mutation: 1 to 4 of bit flips, interesting bytes / u16 / u32 / u64 at
/// random (often aligned) offsets, truncation, deletion, duplication of a chunk.
fn mutate_bytes(r: &mut Rng, b: &mut Vec<u8>) {
    for _ in 0..1 + r.below(4) {
        if b.is_empty() {
            b.push(r.next() as u8);
            continue;
        }
        let at = if r.chance(2) {
            r.below(b.len()) & !7
        } else {
            r.below(b.len())
        };
        match r.below(9) {
            0 | 1 => b[at] ^= 1 << r.below(8),
            2 => b[at] = [0, 0xff, 0x7f, 0x80, 1][r.below(5)],
            3..=5 => {
                let v = INTERESTING[r.below(INTERESTING.len())];
                let v = if r.chance(4) { v.wrapping_neg() } else { v };
                let w = [2usize, 4, 8][r.below(3)];
                let bytes = v.to_le_bytes();
                for i in 0..w {
                    if at + i < b.len() {
                        b[at + i] = bytes[i];
                    }
                }
            }
            6 => b.truncate(at),
            7 => {
                let end = (at + 1 + r.below(64)).min(b.len());
                b.drain(at..end);
            }
            _ => {
                let end = (at + 1 + r.below(64)).min(b.len());
                let chunk = b[at..end].to_vec();
                let to = r.below(b.len());
                b.splice(to..to, chunk);
            }
        }
    }
}

/// A random node of `v` (a random walk down from the root).
fn pick<'a>(r: &mut Rng, v: &'a mut serde_json::Value) -> &'a mut serde_json::Value {
    use serde_json::Value;
    let deeper = r.below(3) != 0;
    let len = match &*v {
        Value::Object(m) => m.len(),
        Value::Array(a) => a.len(),
        _ => 0,
    };
    if !deeper || len == 0 {
        return v;
    }
    let i = r.below(len);
    match v {
        Value::Object(m) => {
            let k = m.keys().nth(i).cloned().unwrap_or_default();
            pick(r, m.get_mut(&k).expect("key exists"))
        }
        Value::Array(a) => pick(r, &mut a[i]),
        other => other,
    }
}

/// JSON-aware mutation: change one node (numbers to interesting or huge values, strings to
/// odd ones, arrays and objects shrunk or grown), keeping the document parseable.
fn mutate_json(r: &mut Rng, v: &mut serde_json::Value) {
    use serde_json::Value;
    let node = pick(r, v);
    let numbers = [
        serde_json::json!(0),
        serde_json::json!(-1),
        serde_json::json!(1),
        serde_json::json!(3),
        serde_json::json!(1u64 << 31),
        serde_json::json!(u64::MAX),
        serde_json::json!(100_000_000),
        serde_json::json!(1_000_000_000_000u64),
        serde_json::json!(1e308),
        serde_json::json!(-1e308),
        serde_json::json!(1e-45),
        serde_json::json!(0.5),
        serde_json::json!(null),
        serde_json::json!(true),
        serde_json::json!("x"),
        serde_json::json!([]),
    ];
    match node {
        Value::Object(m) if r.chance(2) && !m.is_empty() => {
            let k = m.keys().nth(r.below(m.len())).cloned().unwrap_or_default();
            m.remove(&k);
        }
        Value::Array(a) if !a.is_empty() && r.chance(2) => {
            let i = r.below(a.len());
            if r.chance(2) {
                a.remove(i);
            } else {
                let x = a[i].clone();
                for _ in 0..1 + r.below(3) {
                    a.push(x.clone());
                }
            }
        }
        Value::String(s) if r.chance(2) => {
            *s = match r.below(5) {
                0 => String::new(),
                1 => s.repeat(1 + r.below(4)),
                2 => format!("{s}\u{0}\u{fffd}"),
                3 => "é".repeat(r.below(300)),
                _ => s.chars().rev().collect(),
            }
        }
        n => *n = numbers[r.below(numbers.len())].clone(),
    }
}

/// Result of one case: `Ok` or an error message.
type Outcome = std::result::Result<(), String>;

/// Run `n` cases of `kind` (case `i` runs `case(i, &mut rng)`) on a worker thread with a
/// per-case deadline and the allocation cap; panics on a hang, a panic or an empty error.
fn run_cases(
    kind: &'static str,
    n: usize,
    case: impl Fn(usize, &mut Rng) -> Outcome + Send + 'static,
) -> (usize, usize) {
    let (tx, rx) = std::sync::mpsc::channel::<(usize, std::result::Result<Outcome, String>)>();
    let verbose = std::env::var_os("FERROQ_MUTATION_VERBOSE").is_some();
    let seed = seed();
    std::thread::Builder::new()
        .name(format!("mutation-{kind}"))
        .spawn(move || {
            let mut r = Rng::new(seed ^ xxh64(kind.as_bytes()));
            for i in 0..n {
                if verbose {
                    eprintln!("mutation {kind} #{i}");
                }
                LIMIT.store(ALLOC_LIMIT, Ordering::Relaxed);
                let out =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(i, &mut r)));
                LIMIT.store(usize::MAX, Ordering::Relaxed);
                let out = out.map_err(|p| {
                    p.downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into())
                });
                if tx.send((i, out)).is_err() {
                    return;
                }
            }
        })
        .expect("spawn");
    let (mut ok, mut errs) = (0, 0);
    for want in 0..n {
        match rx.recv_timeout(DEADLINE) {
            Ok((i, Ok(Ok(())))) => {
                assert_eq!(i, want);
                ok += 1;
            }
            Ok((i, Ok(Err(msg)))) => {
                assert!(
                    !msg.trim().is_empty(),
                    "{kind} #{i}: an empty error message"
                );
                errs += 1;
            }
            Ok((i, Err(p))) => panic!("{kind} mutant #{i} (seed {seed}) panicked: {p}"),
            Err(_) => panic!(
                "{kind} mutant #{want} (seed {seed}) did not finish within {DEADLINE:?} (hang)"
            ),
        }
    }
    eprintln!("mutation {kind}: {n} mutants, {ok} accepted, {errs} refused with an error");
    (ok, errs)
}

fn tmp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mutation-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(p: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .join("tests/fixtures")
        .join(p)
}

fn quiet(_: ProgressEvent) {}

fn msg(e: ferroq::Error) -> String {
    e.to_string()
}

// ---------------------------------------------------------------------------------------------
// seeds

/// A tiny Llama GGUF (f32 tensors, a byte-level BPE vocabulary, a chat template).
fn seed_gguf() -> Vec<u8> {
    const H: usize = 32;
    const FFN: usize = 64;
    const LAYERS: usize = 2;
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    let mut types = vec![3, 3, 3];
    for t in ["a", "b", "c", "Ġ", "ab", "Ġa", "abc", "h", "i", "hi", "Ġhi"] {
        tokens.push(t.into());
        types.push(1);
    }
    let merges = vec![
        "a b".to_string(),
        "Ġ a".into(),
        "ab c".into(),
        "h i".into(),
        "Ġ hi".into(),
    ];
    let vocab = tokens.len();
    let seq = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + s) * 0.37).sin() * 0.3)
            .collect()
    };
    let mut w = GgufWriter::new(3);
    w.kv("general.architecture", Meta::s("llama"))
        .kv("general.alignment", Meta::U32(32))
        .kv("llama.block_count", Meta::U32(LAYERS as u32))
        .kv("llama.context_length", Meta::U32(64))
        .kv("llama.embedding_length", Meta::U32(H as u32))
        .kv("llama.feed_forward_length", Meta::U32(FFN as u32))
        .kv("llama.attention.head_count", Meta::U32(4))
        .kv("llama.attention.head_count_kv", Meta::U32(2))
        .kv("llama.rope.freq_base", Meta::F32(10000.0))
        .kv("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5))
        .kv("llama.vocab_size", Meta::U32(vocab as u32))
        .kv("llama.rope.dimension_count", Meta::U32(8))
        .kv("tokenizer.ggml.model", Meta::s("gpt2"))
        .kv("tokenizer.ggml.pre", Meta::s("smollm"))
        .kv("tokenizer.ggml.tokens", Meta::ArrStr(tokens))
        .kv("tokenizer.ggml.token_type", Meta::ArrI32(types))
        .kv("tokenizer.ggml.merges", Meta::ArrStr(merges))
        .kv("tokenizer.ggml.bos_token_id", Meta::U32(1))
        .kv("tokenizer.ggml.eos_token_id", Meta::U32(2))
        .kv("tokenizer.ggml.add_bos_token", Meta::Bool(false))
        .kv(
            "tokenizer.chat_template",
            Meta::s("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
        );
    let h = H as u64;
    w.tensor_f32(
        "token_embd.weight",
        &[h, vocab as u64],
        &seq(H * vocab, 0.0),
    );
    for l in 0..LAYERS {
        let f = l as f32;
        w.tensor_f32(&format!("blk.{l}.attn_norm.weight"), &[h], &[1.0; H]);
        w.tensor_f32(
            &format!("blk.{l}.attn_q.weight"),
            &[h, h],
            &seq(H * H, 10.0 + f),
        );
        w.tensor_f32(
            &format!("blk.{l}.attn_k.weight"),
            &[h, 16],
            &seq(16 * H, 20.0 + f),
        );
        w.tensor_f32(
            &format!("blk.{l}.attn_v.weight"),
            &[h, 16],
            &seq(16 * H, 30.0 + f),
        );
        w.tensor_f32(
            &format!("blk.{l}.attn_output.weight"),
            &[h, h],
            &seq(H * H, 40.0 + f),
        );
        w.tensor_f32(&format!("blk.{l}.ffn_norm.weight"), &[h], &[0.5; H]);
        w.tensor_f32(
            &format!("blk.{l}.ffn_gate.weight"),
            &[h, FFN as u64],
            &seq(FFN * H, 50.0 + f),
        );
        w.tensor_f32(
            &format!("blk.{l}.ffn_up.weight"),
            &[h, FFN as u64],
            &seq(FFN * H, 60.0 + f),
        );
        w.tensor_f32(
            &format!("blk.{l}.ffn_down.weight"),
            &[FFN as u64, h],
            &seq(FFN * H, 70.0 + f),
        );
    }
    w.tensor_f32("output_norm.weight", &[h], &[1.0; H]);
    w.build()
}

/// The tiny GGUF converted (f32, with its tokenizer and template) and the Llama 4 Scout tiny
/// MoE fixture converted to q4: the `.fqm` seeds.
fn seed_models(dir: &Path) -> (PathBuf, PathBuf) {
    let g = dir.join("seed.gguf");
    std::fs::write(&g, seed_gguf()).unwrap();
    let ck = ferroq_convert::gguf::open(&g).unwrap();
    let dense = dir.join("dense.fqm");
    let o = ConvertOptions {
        quant: Quant::F32,
        ..Default::default()
    };
    convert(&ck, &dense, &o, &quiet).unwrap();
    let ck = ferroq_convert::hf::open_hf_dir(fixture("models/llama4-scout-tiny")).unwrap();
    let moe = dir.join("moe.fqm");
    convert(&ck, &moe, &ConvertOptions::default(), &quiet).unwrap();
    (dense, moe)
}

/// Recompute the version 2 checksums of the metadata and directory of a mutated `.fqm`, so
/// that mutants reach the parser behind them (when the header still points inside the file).
fn fix_checksums(b: &mut [u8]) {
    if b.len() < 64 {
        return;
    }
    let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let (mo, ml, d_o, dl) = (u(16), u(24), u(32), u(40));
    let (Some(me), Some(de)) = (mo.checked_add(ml), d_o.checked_add(dl)) else {
        return;
    };
    if me > b.len() || de > b.len() || dl < 16 {
        return;
    }
    let mh = xxh64(&b[mo..me]);
    b[de - 16..de - 8].copy_from_slice(&mh.to_le_bytes());
    let dh = xxh64(&b[d_o..de - 8]);
    b[de - 8..de].copy_from_slice(&dh.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// the targets

/// Open a mutated model and, when it opens, run a short prefill and two decode steps, and the
/// full checksum verification.
fn fqm_case(path: &Path, base: &[u8], r: &mut Rng) -> Outcome {
    let mut b = base.to_vec();
    // mostly small edits; directory/metadata mutants get their checksums fixed half the time
    mutate_bytes(r, &mut b);
    if r.chance(2) {
        fix_checksums(&mut b);
    }
    std::fs::write(path, &b).unwrap();
    let name = path.display().to_string();
    let named = |e: ferroq::Error| {
        let m = e.to_string();
        if m.contains(&name) || m.contains("tensor `") || m.contains("config field") {
            m
        } else {
            format!("(error names neither the file nor a tensor/field) {m}")
        }
    };
    let model = Model::open(path).map_err(named)?;
    let _ = model.file.verify(&|_, _| {});
    let v = model.config.vocab_size as u32;
    let mut st = State::try_with_kv(&model, 8, 4, true, 1, KvType::F32).map_err(msg)?;
    let ids = [0, 1 % v, 2 % v];
    model.forward(&mut st, &ids, Logits::All).map_err(msg)?;
    model
        .forward(&mut st, &ids[..1], Logits::Last)
        .map_err(msg)?;
    let _ = Engine::from_model(model);
    Ok(())
}

#[test]
fn mutants_of_fqm_models_open_and_run_or_fail_cleanly() {
    let dir = tmp_dir("fqm");
    let (dense, moe) = seed_models(&dir);
    let n = mutants();
    for (tag, seed) in [("fqm-dense", dense), ("fqm-moe", moe)] {
        let base = std::fs::read(&seed).unwrap();
        let path = dir.join(format!("{tag}-mutant.fqm"));
        let (ok, errs) = run_cases(tag, n / 2, move |_, r| fqm_case(&path, &base, r));
        assert!(ok > 0 && errs > 0, "{tag}: {ok} ok, {errs} errors");
    }
}

#[test]
fn mutants_of_safetensors_files_read_or_fail_cleanly() {
    let dir = tmp_dir("st");
    let base = std::fs::read(fixture("models/llama3-tiny/model.safetensors")).unwrap();
    let path = dir.join("m.safetensors");
    run_cases("safetensors", mutants(), move |_, r| {
        let mut b = base.clone();
        // the header is the interesting part: mutate within it most of the time
        if r.chance(4) {
            mutate_bytes(r, &mut b);
        } else {
            let hl = (u64::from_le_bytes(b[..8].try_into().unwrap()) as usize + 8).min(b.len());
            let mut h = b[..hl].to_vec();
            mutate_bytes(r, &mut h);
            h.extend_from_slice(&b[hl..]);
            b = h;
        }
        std::fs::write(&path, &b).unwrap();
        let s = ferroq_convert::safetensors::SafetensorsSource::open_file(&path).map_err(msg)?;
        let mut out = Vec::new();
        for t in s.tensors().to_vec() {
            s.read_f32(&t.name, &mut out).map_err(msg)?;
            if t.shape.len() >= 2 {
                s.read_f32_outer(&t.name, 0, &mut out).map_err(msg)?;
            }
        }
        Ok(())
    });
}

#[test]
fn mutants_of_config_json_parse_or_fail_cleanly() {
    let seeds: Vec<serde_json::Value> = [
        "models/llama3-tiny/config.json",
        "models/llama4-scout-tiny/config.json",
        "models/llama4-maverick-tiny/config.json",
    ]
    .iter()
    .map(|p| serde_json::from_slice(&std::fs::read(fixture(p)).unwrap()).unwrap())
    .collect();
    run_cases("config.json", mutants(), move |_, r| {
        let mut v = seeds[r.below(seeds.len())].clone();
        for _ in 0..1 + r.below(3) {
            mutate_json(r, &mut v);
        }
        let cfg = ferroq_convert::hf::model_config_from_hf(&v).map_err(|e| {
            let m = e.to_string();
            assert!(
                m.starts_with("config field `"),
                "error without a field: {m}"
            );
            m
        })?;
        // what the loader does with a config: the tensor table
        let _ = ferroq::internals::model::tensor_table(&cfg);
        Ok(())
    });
}

#[test]
fn mutants_of_gguf_files_parse_convert_or_fail_cleanly() {
    let dir = tmp_dir("gguf");
    let base = seed_gguf();
    let out = dir.join("out.fqm");
    run_cases("gguf", mutants(), move |i, r| {
        let mut b = base.clone();
        mutate_bytes(r, &mut b);
        let f = ferroq_convert::gguf::GgufFile::from_bytes("mutant.gguf", b).map_err(msg)?;
        let ck = ferroq_convert::gguf::checkpoint(f).map_err(msg)?;
        // converting every parsed mutant costs little (a 30 KB model); every 4th is enough
        if i % 4 == 0 {
            let o = ConvertOptions {
                quant: if i % 8 == 0 { Quant::Q8 } else { Quant::F32 },
                ..Default::default()
            };
            convert(&ck, &out, &o, &quiet).map_err(msg)?;
        }
        Ok(())
    });
}

#[test]
fn mutants_of_tokenizer_json_load_or_fail_cleanly() {
    let dir = tmp_dir("tok");
    let g = dir.join("seed.gguf");
    std::fs::write(&g, seed_gguf()).unwrap();
    let ck = ferroq_convert::gguf::open(&g).unwrap();
    let base: serde_json::Value =
        serde_json::from_slice(ck.tokenizer_json.as_ref().unwrap()).unwrap();
    run_cases("tokenizer.json", mutants(), move |i, r| {
        let bytes = if i % 3 == 0 {
            let mut b = serde_json::to_vec(&base).unwrap();
            mutate_bytes(r, &mut b);
            b
        } else {
            let mut v = base.clone();
            for _ in 0..1 + r.below(3) {
                mutate_json(r, &mut v);
            }
            serde_json::to_vec(&v).unwrap()
        };
        let t = Tokenizer::from_bytes(&bytes, TokenizerKind::HfJson).map_err(msg)?;
        let ids = t.encode("hi abc <|im_start|>a\u{e9}", true);
        let _ = t.decode(&ids, false);
        Ok(())
    });
}

#[test]
fn mutants_of_chat_templates_render_or_fail_cleanly() {
    let cfg: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("tokenizers/llama3/tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    let seeds = [
        cfg["chat_template"].as_str().unwrap().to_string(),
        std::fs::read_to_string(fixture("smollm2-chat_template.jinja")).unwrap(),
    ];
    // snippets that make templates expensive or odd
    const SNIPPETS: [&str; 10] = [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{{ 'x' * 100000000 }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{% for i in range(100000) %}{{ messages }}{% endfor %}",
        "{{ raise_exception('no') }}",
        "{% set x = 'ab' %}{% for i in range(40) %}{% set x = x ~ x %}{% endfor %}",
        "{{ messages[1000000] }}",
        "{% for m in messages %}{{ m.content | tojson }}{% endfor %}",
        "{{ strftime_now('%Y-%m-%d %H %Q') }}",
        "{{ (messages | length) / 0 }}",
    ];
    let msgs = [
        Message::new("system", "be brief"),
        Message::new("user", "hi é"),
        Message::new("assistant", "hello"),
        Message::new("user", "again"),
    ];
    run_cases("chat template", mutants(), move |_, r| {
        let mut t = seeds[r.below(seeds.len())].clone().into_bytes();
        if r.chance(3) {
            let s = SNIPPETS[r.below(SNIPPETS.len())].as_bytes();
            let at = r.below(t.len());
            t.splice(at..at, s.iter().copied());
        } else {
            mutate_bytes(r, &mut t);
        }
        let t = String::from_utf8_lossy(&t).into_owned();
        let tmpl = ChatTemplate::new(&t, Some("<s>".into()), Some("</s>".into())).map_err(msg)?;
        let n = 1 + r.below(msgs.len());
        tmpl.render(&msgs[..n], r.chance(2)).map_err(msg)?;
        Ok(())
    });
}

/// The values a front end (CLI flags, C ABI parameters, server requests) hands to the engine:
/// context, batch, threads, KV type, sampling settings, stop strings, prompts.
#[test]
fn engine_settings_from_front_ends_run_or_fail_cleanly() {
    let dir = tmp_dir("engine");
    let (dense, _) = seed_models(&dir);
    let engine = std::sync::Arc::new(Engine::open(&dense).unwrap());
    let floats = [
        0.0f32,
        -1.0,
        1.0,
        0.5,
        2.0,
        f32::NAN,
        f32::INFINITY,
        -0.0,
        1e-30,
        1e30,
    ];
    let sizes = [
        0usize,
        1,
        2,
        3,
        8,
        64,
        65,
        1000,
        1 << 20,
        1 << 40,
        usize::MAX,
    ];
    run_cases("engine settings", mutants() / 4, move |i, r| {
        // each setting is odd one time in five, so that most cases get past the checks
        let pick_f = |r: &mut Rng| {
            if r.chance(5) {
                floats[r.below(floats.len())]
            } else {
                [0.0, 0.5, 0.9, 1.0][r.below(4)]
            }
        };
        let pick_s = |r: &mut Rng| {
            if r.chance(5) {
                sizes[r.below(sizes.len())]
            } else {
                [0, 1, 8, 40][r.below(4)]
            }
        };
        let opts = SessionOptions {
            ctx: pick_s(r),
            batch: pick_s(r),
            threads: [0, 1, 2, 3, 513, 1 << 40][r.below(6)],
            kv: [
                None,
                Some(KvType::F32),
                Some(KvType::F16),
                Some(KvType::Q8),
                Some(KvType::Q4),
            ][r.below(5)],
        };
        let mut s = Session::new(std::sync::Arc::clone(&engine), &opts).map_err(msg)?;
        let g = GenOptions {
            max_tokens: [0, 1, 5, 100][r.below(4)],
            sampler: SamplerConfig {
                temperature: pick_f(r),
                top_k: pick_s(r),
                top_p: pick_f(r),
                min_p: pick_f(r),
                repetition_penalty: pick_f(r),
                presence_penalty: pick_f(r),
                frequency_penalty: pick_f(r),
                penalty_last_n: pick_s(r),
                seed: r.next(),
            },
            stop_strings: (0..r.below(3))
                .map(|_| ["", "a", "\u{0}", "é", "abcabc"][r.below(5)].to_string())
                .collect(),
        };
        let prompts = [
            "",
            "hi",
            "a b c abc",
            "<|im_start|>user\nhi<|im_end|>",
            "é\u{0}",
        ];
        let prompt = prompts[r.below(prompts.len())];
        let mut on = |_: Option<u32>, _: &str| r.below(8) != 0 || i % 2 == 0;
        if i % 2 == 0 {
            s.chat(prompt, &g, &mut on).map_err(msg)?;
        } else {
            let ids = engine.encode_prompt(prompt);
            s.generate(&ids, &g, &mut on).map_err(msg)?;
        }
        Ok(())
    });
}

/// A flipped byte in a tensor passes open (instant) and fails `verify`, naming the tensor.
#[test]
fn fqm_checksum_detects_flipped_tensor_bytes() {
    let dir = tmp_dir("sum");
    let (dense, _) = seed_models(&dir);
    let f = FqmFile::open(&dense).unwrap();
    assert_eq!(f.version(), 2);
    f.verify(&|_, _| {}).unwrap();
    let t = f.tensors()[3].clone();
    drop(f);
    let mut b = std::fs::read(&dense).unwrap();
    b[t.offset + 5] ^= 0x10;
    let p = dir.join("flipped.fqm");
    std::fs::write(&p, &b).unwrap();
    let f = FqmFile::open(&p).unwrap(); // opening stays instant: tensors are not read
    let e = f.verify(&|_, _| {}).unwrap_err().to_string();
    assert!(
        e.contains(&format!("tensor `{}`", t.name)) && e.contains("checksum"),
        "{e}"
    );
}
