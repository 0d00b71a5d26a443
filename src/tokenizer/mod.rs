//! Tokenizers exact with Hugging Face `tokenizers`: byte-level BPE (Llama 3, Llama 4, SmolLM2,
//! ...) and SentencePiece-style BPE / Unigram (Llama 2, Mistral, TinyLlama, ...).
//!
//! Loads a Hugging Face `tokenizer.json` ([`Tokenizer::from_hf_json`], either kind), Meta's
//! tiktoken-format Llama 4 `tokenizer.model` ([`Tokenizer::from_tiktoken`]) or a SentencePiece
//! `tokenizer.model` ([`Tokenizer::from_sentencepiece`]). Encoding: added/special tokens are
//! cut out of the text first (as HF does), the rest is pre-tokenized with the model's regexes
//! and byte-pair merged (byte-level), or normalized (`▁` for spaces) and merged by the
//! SentencePiece rules. Decoding concatenates the tokens' bytes (`▁` as a space, `<0xXX>` as its
//! byte, SentencePiece's dummy-prefix space stripped); [`StreamDecoder`] does it incrementally
//! without ever emitting half a UTF-8 character.

mod added;
mod bpe;
mod bytelevel;
mod hash;
mod hf;
mod pretok;
mod spm;
mod spm_json;
mod tiktoken;

use std::path::Path;

use added::{AddedToken, AddedVocab, Seg};
use bpe::{Bpe, Scratch};
use hash::{fx_map, FxMap};
use pretok::{PreTokenizer, SplitScratch};

pub use pretok::{GPT2_PATTERN, LLAMA3_PATTERN, O200K_PATTERN};
pub use tiktoken::llama4_special_tokens;

use crate::{Error, Result};

/// Which file format a tokenizer comes from (see [`Tokenizer::from_bytes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Hugging Face `tokenizer.json`.
    HfJson,
    /// Meta's tiktoken-format `tokenizer.model` (Llama 4).
    Tiktoken,
    /// A SentencePiece `tokenizer.model` (the `ModelProto` protobuf: Llama 2, Mistral, ...).
    SentencePiece,
}

impl TokenizerKind {
    /// Guess from a file name, then from the content (`{` starts a JSON file; a SentencePiece
    /// model starts with the protobuf key of its first piece, byte 0x0A, which no tiktoken file
    /// (base64 text) does).
    pub fn detect(path: Option<&Path>, bytes: &[u8]) -> TokenizerKind {
        let proto = bytes.first() == Some(&0x0a);
        if let Some(ext) = path.and_then(|p| p.extension()).and_then(|e| e.to_str()) {
            match ext {
                "json" => return TokenizerKind::HfJson,
                "model" if proto => return TokenizerKind::SentencePiece,
                "model" | "tiktoken" => return TokenizerKind::Tiktoken,
                _ => {}
            }
        }
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'{') => TokenizerKind::HfJson,
            _ if proto => TokenizerKind::SentencePiece,
            _ => TokenizerKind::Tiktoken,
        }
    }

    /// The `.fqm` metadata name (`tokenizer.kind`) and the blob holding the file.
    pub fn fqm_name(self) -> (&'static str, &'static str) {
        match self {
            TokenizerKind::HfJson => ("hf_json", "blob.tokenizer.json"),
            TokenizerKind::Tiktoken => ("tiktoken", "blob.tokenizer.model"),
            TokenizerKind::SentencePiece => ("sentencepiece", "blob.tokenizer.model"),
        }
    }
}

/// The model behind a tokenizer.
pub(crate) enum Core {
    /// Byte-level BPE (`tokenizer.json` with a ByteLevel pre-tokenizer, tiktoken).
    ByteLevel { bpe: Box<Bpe>, pretok: PreTokenizer },
    /// A SentencePiece `tokenizer.model`.
    Spm(Box<spm::SpModel>),
    /// A SentencePiece-style `tokenizer.json` (Metaspace / normalizers, BPE or Unigram).
    SpmJson(Box<spm_json::SpmJson>),
}

/// A tokenizer. Immutable after loading; `Send + Sync`.
pub struct Tokenizer {
    core: Core,
    added: AddedVocab,
    /// Leading spaces the decoder strips (SentencePiece's dummy prefix; HF's `Strip` decoder).
    strip_lead: usize,
    /// Token as HF writes it (byte-level alphabet; added tokens as their content).
    id_strs: Vec<Option<Box<str>>>,
    /// Raw bytes each id decodes to.
    id_bytes: Vec<Option<Box<[u8]>>>,
    special: Vec<bool>,
    str_to_id: FxMap<Box<str>, u32>,
    bos: Option<u32>,
}

/// Most ids a tokenizer defining `count` tokens may span (highest id + 1): the loaders size
/// their id tables by the highest id, so a file naming a huge id for a handful of tokens is
/// refused before it is allocated for.
pub(crate) fn max_ids(count: usize) -> usize {
    count.saturating_mul(2).saturating_add(1 << 16).min(1 << 28)
}

/// Builder shared by the loaders.
pub(crate) struct Parts {
    id_strs: Vec<Option<Box<str>>>,
    id_bytes: Vec<Option<Box<[u8]>>>,
    special: Vec<bool>,
    str_to_id: FxMap<Box<str>, u32>,
}

impl Parts {
    pub(crate) fn new(n: usize) -> Parts {
        Parts {
            id_strs: vec![None; n],
            id_bytes: vec![None; n],
            special: vec![false; n],
            str_to_id: fx_map(n),
        }
    }

    /// `id` must be below the `n` given to `new` (the loaders size `n` from the max id).
    pub(crate) fn set(&mut self, id: u32, s: &str, bytes: Vec<u8>, special: bool) {
        let i = id as usize;
        if i >= self.id_strs.len() {
            return;
        }
        self.id_strs[i] = Some(s.into());
        self.id_bytes[i] = Some(bytes.into_boxed_slice());
        self.special[i] = special;
        self.str_to_id.insert(s.into(), id);
    }

    pub(crate) fn finish(
        self,
        core: Core,
        added: Vec<AddedToken>,
        bos: Option<u32>,
        strip_lead: usize,
    ) -> Tokenizer {
        let mut t = Tokenizer {
            core,
            added: AddedVocab::new(added),
            strip_lead,
            id_strs: self.id_strs,
            id_bytes: self.id_bytes,
            special: self.special,
            str_to_id: self.str_to_id,
            bos,
        };
        if t.bos.is_none() {
            t.bos = ["<|begin_of_text|>", "<s>", "<bos>"]
                .iter()
                .find_map(|s| t.token_to_id(s));
        }
        t
    }
}

impl Tokenizer {
    /// Load a Hugging Face `tokenizer.json` (byte-level BPE).
    pub fn from_hf_json(bytes: &[u8]) -> Result<Tokenizer> {
        hf::load(bytes)
    }

    /// Load Meta's Llama 4 `tokenizer.model` (tiktoken format): 200,000 base tokens plus
    /// Meta's 2,048 special tokens, O200K pre-tokenization regex.
    pub fn from_tiktoken(bytes: &[u8]) -> Result<Tokenizer> {
        tiktoken::load(bytes)
    }

    /// Load a SentencePiece `tokenizer.model` (Llama 2, Mistral, TinyLlama, ...): BPE or
    /// Unigram, identity normalization, byte fallback. Encodes as the `sentencepiece` library
    /// does, with control pieces written in the text (`<s>`, `</s>`) cut out first, as
    /// Hugging Face's `LlamaTokenizer` does.
    pub fn from_sentencepiece(bytes: &[u8]) -> Result<Tokenizer> {
        spm::load(bytes)
    }

    /// Build a tokenizer from raw file bytes of a known kind. This is the hook for tokenizers
    /// stored inside other containers (e.g. a `.fqm` model file).
    pub fn from_bytes(bytes: &[u8], kind: TokenizerKind) -> Result<Tokenizer> {
        match kind {
            TokenizerKind::HfJson => Self::from_hf_json(bytes),
            TokenizerKind::Tiktoken => Self::from_tiktoken(bytes),
            TokenizerKind::SentencePiece => Self::from_sentencepiece(bytes),
        }
    }

    /// Load `tokenizer.json` or `tokenizer.model`, chosen by extension, else by content.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Tokenizer> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let kind = TokenizerKind::detect(Some(path), &bytes);
        Self::from_bytes(&bytes, kind).map_err(|e| match e {
            Error::Format { msg, .. } => Error::format(path, msg),
            other => Error::format(path, other.to_string()),
        })
    }

    /// Token ids of `text`. Added/special tokens written in the text become their ids, as HF
    /// does. With `add_bos`, the BOS id (if the tokenizer has one) is put first.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        self.encode_into(text, add_bos, &mut out);
        out
    }

    /// Like [`encode`](Self::encode), appending to `out`.
    pub fn encode_into(&self, text: &str, add_bos: bool, out: &mut Vec<u32>) {
        if add_bos {
            if let Some(b) = self.bos {
                out.push(b);
            }
        }
        let mut segs = Vec::new();
        self.added.split(text, &mut segs);
        match &self.core {
            Core::ByteLevel { bpe, pretok } => {
                let mut bs = Scratch::default();
                let mut ss = SplitScratch::default();
                let mut prefixed = String::new();
                for seg in segs {
                    match seg {
                        Seg::Token(id) => out.push(id),
                        Seg::Text(s, e) => {
                            let mut t = &text[s..e];
                            if pretok.add_prefix_space && !t.starts_with(' ') {
                                prefixed.clear();
                                prefixed.push(' ');
                                prefixed.push_str(t);
                                t = &prefixed;
                            }
                            let bytes = t.as_bytes();
                            pretok.for_each_piece(t, &mut ss, |a, b| {
                                bpe.encode_piece(&bytes[a..b], out, &mut bs)
                            });
                        }
                    }
                }
            }
            Core::Spm(sp) => {
                let mut scratch = spm::SpScratch::default();
                for seg in segs {
                    match seg {
                        Seg::Token(id) => out.push(id),
                        Seg::Text(s, e) => sp.encode(&text[s..e], out, &mut scratch),
                    }
                }
            }
            Core::SpmJson(sj) => {
                let mut scratch = spm_json::JsonScratch::default();
                for seg in segs {
                    match seg {
                        Seg::Token(id) => out.push(id),
                        Seg::Text(s, e) => sj.encode(&text[s..e], s == 0, out, &mut scratch),
                    }
                }
            }
        }
    }

    /// Text of `ids` (invalid UTF-8 becomes U+FFFD; unknown ids are skipped).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    /// Raw bytes of `ids` (for SentencePiece models without the dummy-prefix space that
    /// starts the text, as HF's `Strip` decoder removes it).
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        for &id in ids {
            if skip_special && self.is_special(id) {
                continue;
            }
            if let Some(b) = self.id_to_bytes(id) {
                out.extend_from_slice(b);
            }
        }
        let lead = out
            .iter()
            .take(self.strip_lead)
            .take_while(|&&b| b == b' ')
            .count();
        out.drain(..lead);
        out
    }

    /// Id of a token written as in `tokenizer.json` (byte-level alphabet, e.g. `"Ġthe"`), or of
    /// an added token's content (e.g. `"<|eot|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.str_to_id.get(token).copied()
    }

    /// The token as `tokenizer.json` writes it.
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.id_strs.get(id as usize)?.as_deref()
    }

    /// The raw bytes the token stands for.
    pub fn id_to_bytes(&self, id: u32) -> Option<&[u8]> {
        self.id_bytes.get(id as usize)?.as_deref()
    }

    /// Whether `id` is a special added token (skipped by `decode(.., true)`).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// The BOS id: from the post-processor template, else `<|begin_of_text|>`/`<s>`/`<bos>`.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Override the BOS id (e.g. from a model's config).
    pub fn set_bos_id(&mut self, id: Option<u32>) {
        self.bos = id;
    }

    /// Number of ids (highest id + 1, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.id_strs.len()
    }

    /// A streaming decoder for generated ids.
    pub fn stream_decoder(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            buf: Vec::with_capacity(16),
            skip_special,
            strip: self.strip_lead,
        }
    }
}

/// Turns ids into text as they are generated. Text is released only as complete UTF-8
/// characters; bytes of a character split across tokens are held until it is complete.
/// Invalid sequences become U+FFFD, exactly as `decode` of the whole sequence would give.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    buf: Vec<u8>,
    skip_special: bool,
    /// Leading spaces still to strip (only at the start of the stream).
    strip: usize,
}

impl StreamDecoder<'_> {
    /// Feed one id; the text that became complete, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        let mut s = String::new();
        self.push_into(id, &mut s);
        if s.is_empty() {
            None
        } else {
            Some(s)
        }
    }

    /// Feed one id, appending complete text to `out` (no allocation once `out` has room).
    /// Returns whether anything was appended.
    pub fn push_into(&mut self, id: u32, out: &mut String) -> bool {
        if self.skip_special && self.tok.is_special(id) {
            return false;
        }
        if let Some(mut b) = self.tok.id_to_bytes(id) {
            while self.strip > 0 && !b.is_empty() {
                if b[0] == b' ' {
                    b = &b[1..];
                    self.strip -= 1;
                } else {
                    self.strip = 0;
                }
            }
            self.buf.extend_from_slice(b);
        }
        let before = out.len();
        self.drain(out, false);
        out.len() > before
    }

    /// End of stream: whatever is held back (an incomplete character) as U+FFFD.
    pub fn flush(&mut self) -> Option<String> {
        let mut s = String::new();
        self.drain(&mut s, true);
        if s.is_empty() {
            None
        } else {
            Some(s)
        }
    }

    /// Forget held-back bytes (and start again as at the beginning of a text).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.strip = self.tok.strip_lead;
    }

    fn drain(&mut self, out: &mut String, last: bool) {
        drain_utf8(&mut self.buf, out, last);
    }
}

/// Move the complete UTF-8 text at the front of `buf` to `out` (invalid bytes become U+FFFD)
/// and keep an incomplete character's bytes for the next call; `last` flushes them as U+FFFD.
pub(crate) fn drain_utf8(buf: &mut Vec<u8>, out: &mut String, last: bool) {
    let mut start = 0;
    loop {
        match std::str::from_utf8(&buf[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = buf.len();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                if let Ok(s) = std::str::from_utf8(&buf[start..start + valid]) {
                    out.push_str(s);
                }
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start += valid + n;
                    }
                    None => {
                        start += valid;
                        if last {
                            out.push('\u{FFFD}');
                            start = buf.len();
                        }
                        break;
                    }
                }
            }
        }
    }
    buf.drain(..start);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(tiktoken::base64_decode(b"SGVsbG8=").unwrap(), b"Hello");
        assert_eq!(tiktoken::base64_decode(b"SGVsbG8").unwrap(), b"Hello");
        assert_eq!(tiktoken::base64_decode(b"IQ==").unwrap(), b"!");
        assert!(tiktoken::base64_decode(b"S=GV").is_none());
        assert!(tiktoken::base64_decode(b"S").is_none());
    }

    #[test]
    fn send_sync() {
        fn ok<T: Send + Sync>() {}
        ok::<Tokenizer>();
    }

    #[test]
    fn bytelevel_roundtrip() {
        for b in 0..=255u8 {
            let c = bytelevel::BYTE_TO_CHAR[b as usize];
            assert_eq!(bytelevel::char_to_byte(c), Some(b));
        }
        assert_eq!(bytelevel::BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(bytelevel::BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
    }

    #[test]
    fn scan_and_heap_merge_agree() {
        // A toy vocabulary where merge order matters.
        let mut vocab = fx_map(16);
        let toks: [&[u8]; 8] = [b"a", b"b", b"c", b"ab", b"bc", b"abc", b"aa", b"aaa"];
        for (i, t) in toks.iter().enumerate() {
            vocab.insert(t.to_vec().into_boxed_slice(), i as u32);
        }
        let mut merges = fx_map(8);
        let id = |s: &[u8]| toks.iter().position(|t| *t == s).unwrap() as u32;
        let m = [
            (&b"b"[..], &b"c"[..]),
            (b"a", b"b"),
            (b"a", b"bc"),
            (b"a", b"a"),
            (b"aa", b"a"),
        ];
        for (r, (l, rr)) in m.iter().enumerate() {
            let cat = [*l, *rr].concat();
            merges.insert(((id(l) as u64) << 32) | id(rr) as u64, (r as u32, id(&cat)));
        }
        let mut byte_ids = [None; 256];
        for b in [b'a', b'b', b'c'] {
            byte_ids[b as usize] = Some(id(&[b]));
        }
        let bpe = Bpe {
            vocab,
            byte_ids,
            merges,
            ignore_merges: false,
            unk_id: None,
        };
        let mut seed = 12345u64;
        for len in 1..200 {
            let w: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    b"abcx"[(seed >> 60) as usize % 4]
                })
                .collect();
            assert_eq!(
                bpe.encode_forced(&w, false),
                bpe.encode_forced(&w, true),
                "{w:?}"
            );
        }
    }
}
