//! Session state files: a session's context (token ids and the KV cache of those positions)
//! saved to disk and restored into a session of the same model, e.g. a system prompt
//! processed once and loaded by every later run (`ferroq run --prompt-cache FILE`).
//!
//! Format (all integers little-endian; `docs/session-state.md` has the details):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `FQSTATE\0` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | KV type: 0 f32, 1 f16, 2 q8, 3 q4 |
//! | 16 | 16 | model fingerprint (file size, header, directory, metadata, samples of every tensor) |
//! | 32 | 4 | layers |
//! | 36 | 4 | tokens `n` |
//! | 40 | 4 | context of the saving session (informative) |
//! | 44 | 4 | vocabulary size |
//! | 48 | 8 | KV bytes `m` |
//! | 56 | 4n | token ids |
//! | 56 + 4n | m | KV: per layer, its K rows, its V rows (f32 or f16 values; q8: int8 values, then the K and the V scales as f32) of slots `0..min(n, slots)` (a chunked-attention layer's ring as it is) |
//! | end − 8 | 8 | checksum of everything before |
//!
//! Files are written to a temporary name and renamed ([`crate::atomic::AtomicFile`]), so a
//! failed save leaves any previous file in place; loading reads the header first, checks every
//! field and the file's size against the model and the session before allocating, and the
//! checksum before touching the session.

use std::io::Read;
use std::path::Path;

use crate::format::FqmFile;
use crate::model::{KvType, Model, State};
use crate::{Error, Result};

pub const MAGIC: &[u8; 8] = b"FQSTATE\0";
pub const VERSION: u32 = 1;
/// Bytes before the token ids.
pub const HEADER: usize = 56;

/// A 64-bit hash of 8-byte words (each step a bijection of the state, so one changed word
/// always changes the result). Detects corruption; not cryptographic.
#[derive(Clone, Copy)]
pub(crate) struct Hash64(u64);

impl Hash64 {
    pub fn new(seed: u64) -> Hash64 {
        Hash64(0xcbf2_9ce4_8422_2325 ^ seed)
    }

    fn word(&mut self, w: u64) {
        self.0 = (self.0 ^ w)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(23);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        let mut chunks = b.chunks_exact(8);
        for c in &mut chunks {
            self.word(u64::from_le_bytes(c.try_into().unwrap()));
        }
        let rest = chunks.remainder();
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        self.word(u64::from_le_bytes(last) ^ ((rest.len() as u64) << 56));
        self.word(b.len() as u64);
    }

    pub fn finish(self) -> u64 {
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^ (x >> 33)
    }
}

/// An identity of the model file: its size, everything before the first tensor (header,
/// metadata with the config and tokenizer, directory), and the first and last 64 bytes of
/// every tensor. Two files with the same fingerprint have the same layout and, with high
/// probability, the same weights; computing it reads a few pages per tensor.
pub fn model_fingerprint(file: &FqmFile) -> [u8; 16] {
    let bytes = file.bytes();
    let data_start = file
        .tensors()
        .iter()
        .map(|t| t.offset)
        .min()
        .unwrap_or(bytes.len())
        .min(bytes.len());
    let mut out = [0u8; 16];
    for (i, seed) in [0x9e37_79b9_7f4a_7c15u64, 0xc2b2_ae3d_27d4_eb4f]
        .into_iter()
        .enumerate()
    {
        let mut h = Hash64::new(seed);
        h.word(bytes.len() as u64);
        h.bytes(&bytes[..data_start]);
        for t in file.tensors() {
            let end = (t.offset + t.nbytes).min(bytes.len());
            let start = t.offset.min(end);
            let d = &bytes[start..end];
            h.bytes(&d[..d.len().min(64)]);
            h.bytes(&d[d.len().saturating_sub(64)..]);
        }
        out[i * 8..i * 8 + 8].copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

fn kv_code(kv: KvType) -> u32 {
    match kv {
        KvType::F32 => 0,
        KvType::F16 => 1,
        KvType::Q8 => 2,
        KvType::Q4 => 3,
    }
}

fn kv_name(code: u32) -> &'static str {
    match code {
        0 => "f32",
        1 => "f16",
        2 => "q8",
        3 => "q4",
        _ => "unknown",
    }
}

/// Serialize the first `n` tokens of a state. `ids.len() == n <= state.pos`.
pub(crate) fn encode(
    model: &Model,
    fingerprint: &[u8; 16],
    state: &State,
    ids: &[u32],
) -> Result<Vec<u8>> {
    let n = ids.len();
    if n > state.pos {
        return Err(Error::Input(format!(
            "cannot save {n} tokens: the cache holds {}",
            state.pos
        )));
    }
    if !state.can_save(n) {
        return Err(Error::Input(format!(
            "cannot save the first {n} of {} cached tokens: the chunked-attention layers keep \
             only the chunk of the last token; save before generating past it (e.g. right \
             after the prompt), or save every cached token",
            state.pos
        )));
    }
    let kv_len = state.kv_bytes(n);
    let u32_of = |x: usize, what: &str| {
        u32::try_from(x).map_err(|_| Error::Other(format!("{what} {x} does not fit a state file")))
    };
    let total = kv_len
        .checked_add(HEADER + 4 * n + 8)
        .ok_or_else(|| Error::Other("the state is too large to save".into()))?;
    let mut out = Vec::new();
    out.try_reserve_exact(total).map_err(|_| {
        Error::Other(format!(
            "{total} bytes for the state file cannot be allocated"
        ))
    })?;
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&kv_code(state.kv_type()).to_le_bytes());
    out.extend_from_slice(fingerprint);
    for v in [
        u32_of(model.config.num_layers, "layers")?,
        u32_of(n, "tokens")?,
        u32_of(state.max_ctx(), "context")?,
        u32_of(model.config.vocab_size, "vocabulary")?,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&(kv_len as u64).to_le_bytes());
    for &id in ids {
        out.extend_from_slice(&id.to_le_bytes());
    }
    state.write_kv(n, &mut out);
    let mut h = Hash64::new(0);
    h.bytes(&out);
    out.extend_from_slice(&h.finish().to_le_bytes());
    debug_assert_eq!(out.len(), total);
    Ok(out)
}

/// Write `bytes` to `path` atomically ([`crate::atomic::AtomicFile`]): on error `path` is
/// untouched and no temporary file stays behind.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = crate::atomic::AtomicFile::create(path, &[])?;
    f.write_all(bytes)?;
    f.commit()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// A state file checked against a model and a session.
pub(crate) struct Decoded {
    pub ids: Vec<u32>,
    /// The whole file; the KV bytes are `bytes[kv]`.
    bytes: Vec<u8>,
    kv: std::ops::Range<usize>,
}

impl Decoded {
    /// The KV bytes (`State::read_kv`).
    pub fn kv(&self) -> &[u8] {
        &self.bytes[self.kv.clone()]
    }
}

/// Read the state file at `path` and check it against `model` (fingerprint `fp`) and `state`
/// (KV type, context): the header first, then the file's size against what the header's
/// fields imply (before reading the rest), then the checksum and the ids. Nothing is
/// modified. Errors name the file and the field.
pub(crate) fn read(path: &Path, model: &Model, fp: &[u8; 16], state: &State) -> Result<Decoded> {
    let bad =
        |field: &str, m: String| Error::format(path, format!("session state field `{field}`: {m}"));
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < (HEADER + 8) as u64 {
        return Err(Error::format(
            path,
            format!(
                "not a ferroq session state file: {len} bytes is too short (at least {})",
                HEADER + 8
            ),
        ));
    }
    let mut head = [0u8; HEADER];
    f.read_exact(&mut head).map_err(|e| Error::io(path, e))?;
    if &head[..8] != MAGIC {
        return Err(bad(
            "magic",
            format!(
                "{:?} is not {:?}: not a ferroq session state file",
                String::from_utf8_lossy(&head[..8]),
                String::from_utf8_lossy(MAGIC)
            ),
        ));
    }
    let version = u32_at(&head, 8);
    if version != VERSION {
        return Err(bad(
            "version",
            format!(
                "{version}, but this ferroq reads version {VERSION}; save the state again with \
                 this version"
            ),
        ));
    }
    if &head[16..32] != fp {
        return Err(bad(
            "model_fingerprint",
            format!(
                "the state was saved from a different model than {}; delete it or save it \
                 again with this model",
                model.file.path().display()
            ),
        ));
    }
    let kv = u32_at(&head, 12);
    let want = kv_code(state.kv_type());
    if kv != want {
        return Err(bad(
            "kv_type",
            format!(
                "the saved KV cache is {}, the session's is {} (use the same --kv type)",
                kv_name(kv),
                kv_name(want)
            ),
        ));
    }
    let (layers, n, vocab) = (
        u32_at(&head, 32) as usize,
        u32_at(&head, 36) as usize,
        u32_at(&head, 44) as usize,
    );
    if layers != model.config.num_layers {
        return Err(bad(
            "layers",
            format!("{layers}, but the model has {}", model.config.num_layers),
        ));
    }
    if vocab != model.config.vocab_size {
        return Err(bad(
            "vocab_size",
            format!("{vocab}, but the model has {}", model.config.vocab_size),
        ));
    }
    if n >= state.max_ctx() {
        return Err(bad(
            "tokens",
            format!(
                "{n} tokens, but the session's context is {} (the saved tokens and at least one \
                 more must fit); use a larger context (-c)",
                state.max_ctx()
            ),
        ));
    }
    let kv_len = u64::from_le_bytes(head[48..56].try_into().unwrap());
    let want_kv = state.kv_bytes(n);
    if kv_len != want_kv as u64 {
        return Err(bad(
            "kv_bytes",
            format!("{kv_len}, but {n} tokens of this model's cache take {want_kv}"),
        ));
    }
    let total = HEADER + 4 * n + want_kv + 8;
    if len != total as u64 {
        return Err(Error::format(
            path,
            format!(
                "the file is {len} bytes, but its header ({n} tokens, {want_kv} KV bytes) makes \
                 it {total}: it is truncated or has trailing data"
            ),
        ));
    }
    // the size now matches the model and the session: read the rest
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(total)
        .map_err(|_| Error::format(path, format!("{total} bytes cannot be allocated")))?;
    bytes.extend_from_slice(&head);
    f.take((total - HEADER) as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() != total {
        return Err(Error::format(path, "the file changed while it was read"));
    }
    let stored = u64::from_le_bytes(bytes[total - 8..].try_into().unwrap());
    if checksum(&bytes[..total - 8]) != stored {
        return Err(bad(
            "checksum",
            "mismatch: the file is corrupted (or was changed after it was saved)".into(),
        ));
    }
    let ids: Vec<u32> = (0..n).map(|i| u32_at(&bytes, HEADER + 4 * i)).collect();
    if let Some(&t) = ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(bad(
            "ids",
            format!("token id {t} is out of range (vocabulary {vocab})"),
        ));
    }
    Ok(Decoded {
        ids,
        kv: HEADER + 4 * n..total - 8,
        bytes,
    })
}

/// The checksum a state file ends with, of the bytes before it.
pub fn checksum(body: &[u8]) -> u64 {
    let mut h = Hash64::new(0);
    h.bytes(body);
    h.finish()
}
