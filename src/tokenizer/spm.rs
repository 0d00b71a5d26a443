//! SentencePiece `tokenizer.model` (Llama 2, Mistral, TinyLlama, ...): the `ModelProto`
//! protobuf read by hand, and encoding exactly as the `sentencepiece` library does it.
//!
//! - Normalization (`NormalizerSpec`): identity only (the rule Llama 2 / Mistral use; a
//!   precompiled character map is refused), `add_dummy_prefix`, `remove_extra_whitespaces`
//!   (spaces only), `escape_whitespaces` (space to `▁`), user-defined pieces kept whole.
//! - BPE (`bpe_model.cc`): start from characters (user-defined pieces whole and frozen),
//!   repeatedly merge the adjacent pair whose concatenation is the piece with the highest score
//!   (leftmost on ties), re-split `UNUSED` pieces into what they were merged from.
//! - Unigram (`unigram_model.cc`, `EncodeOptimized`): best-scoring segmentation (f32 scores, as
//!   the library adds them), unknown characters at `min score - 10`, user-defined pieces
//!   favoured.
//! - Unknown pieces become `<0xXX>` byte pieces with `byte_fallback`, else one `<unk>` for each
//!   run of unknown pieces.
//!
//! Control and unknown pieces written in the text (`<s>`, `</s>`, `<unk>`, Mistral's `[INST]`)
//! are cut out first and become their ids, as Hugging Face's `LlamaTokenizer` does (the plain
//! library would encode them as text); each stretch of text between them is encoded on its own.

use std::collections::BinaryHeap;

use super::added::{AddedToken, Trie};
use super::hash::{fx_map, FxMap};
use super::{Core, Parts, Tokenizer};
use crate::{Error, Result};

const FILE: &str = "tokenizer.model";

fn err(msg: impl Into<String>) -> Error {
    Error::format(FILE, msg)
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    fn from_proto(v: u64) -> Option<PieceType> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ModelType {
    Unigram,
    Bpe,
}

/// What `tokenizer.model` says, before building the tokenizer.
pub(crate) struct Proto {
    pub(crate) pieces: Vec<(String, f32, PieceType)>,
    model_type: u64,
    byte_fallback: bool,
    treat_whitespace_as_suffix: bool,
    bos_id: Option<i64>,
    normalizer_name: String,
    charsmap_len: usize,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// Most pieces a file may declare (the largest real vocabularies hold ~256 k).
const MAX_PIECES: usize = 1 << 22;

// ---------------------------------------------------------------------------------------------
// Protobuf wire format (only what ModelProto needs)
// ---------------------------------------------------------------------------------------------

enum Val<'a> {
    Varint(u64),
    Fixed32(u32),
    Len(&'a [u8]),
    Fixed64,
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, pos: 0, what }
    }

    fn truncated(&self) -> Error {
        err(format!(
            "truncated or corrupt protobuf in `{}` at byte {} of {} (is this a SentencePiece model?)",
            self.what,
            self.pos,
            self.b.len()
        ))
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let Some(&byte) = self.b.get(self.pos) else {
                return Err(self.truncated());
            };
            self.pos += 1;
            v |= ((byte & 0x7f) as u64) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.truncated())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.b.len() => {
                let s = &self.b[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(self.truncated()),
        }
    }

    /// The next field, or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Val<'a>)>> {
        if self.pos >= self.b.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let field = key >> 3;
        let val = match key & 7 {
            0 => Val::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Val::Fixed64
            }
            2 => {
                let n = self.varint()?;
                let n = usize::try_from(n).map_err(|_| self.truncated())?;
                Val::Len(self.take(n)?)
            }
            5 => {
                let s = self.take(4)?;
                Val::Fixed32(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            }
            w => {
                return Err(err(format!(
                    "unsupported protobuf wire type {w} in `{}` at byte {} (is this a SentencePiece model?)",
                    self.what, self.pos
                )))
            }
        };
        if field == 0 {
            return Err(self.truncated());
        }
        Ok(Some((field, val)))
    }
}

fn utf8<'a>(b: &'a [u8], what: &str) -> Result<&'a str> {
    std::str::from_utf8(b).map_err(|_| err(format!("{what} is not valid UTF-8")))
}

fn as_bool(v: &Val, what: &str) -> Result<bool> {
    match v {
        Val::Varint(x) => Ok(*x != 0),
        _ => Err(err(format!("`{what}` has the wrong protobuf type"))),
    }
}

fn as_int(v: &Val, what: &str) -> Result<i64> {
    match v {
        Val::Varint(x) => Ok(*x as i64),
        _ => Err(err(format!("`{what}` has the wrong protobuf type"))),
    }
}

impl Proto {
    pub(crate) fn parse(bytes: &[u8]) -> Result<Proto> {
        let mut p = Proto {
            pieces: Vec::new(),
            model_type: 1,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            bos_id: None,
            normalizer_name: String::new(),
            charsmap_len: 0,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let mut r = Reader::new(bytes, "ModelProto");
        while let Some((field, val)) = r.next()? {
            match (field, val) {
                (1, Val::Len(b)) => {
                    if p.pieces.len() >= MAX_PIECES {
                        return Err(err(format!("more than {MAX_PIECES} pieces")));
                    }
                    let i = p.pieces.len();
                    p.pieces.push(parse_piece(b, i)?);
                }
                (2, Val::Len(b)) => p.parse_trainer(b)?,
                (3, Val::Len(b)) => p.parse_normalizer(b)?,
                (1..=3, _) => {
                    return Err(err(format!("ModelProto field {field} is not a message")))
                }
                _ => {} // self_test_data, denormalizer_spec, unknown fields
            }
        }
        Ok(p)
    }

    fn parse_trainer(&mut self, b: &[u8]) -> Result<()> {
        let mut r = Reader::new(b, "trainer_spec");
        while let Some((field, val)) = r.next()? {
            match field {
                3 => self.model_type = as_int(&val, "trainer_spec.model_type")? as u64,
                24 => {
                    self.treat_whitespace_as_suffix =
                        as_bool(&val, "trainer_spec.treat_whitespace_as_suffix")?
                }
                35 => self.byte_fallback = as_bool(&val, "trainer_spec.byte_fallback")?,
                41 => self.bos_id = Some(as_int(&val, "trainer_spec.bos_id")? as i32 as i64),
                _ => {}
            }
        }
        Ok(())
    }

    fn parse_normalizer(&mut self, b: &[u8]) -> Result<()> {
        let mut r = Reader::new(b, "normalizer_spec");
        while let Some((field, val)) = r.next()? {
            match (field, val) {
                (1, Val::Len(s)) => {
                    self.normalizer_name = utf8(s, "normalizer_spec.name")?.to_string()
                }
                (2, Val::Len(s)) => self.charsmap_len = s.len(),
                (3, v) => self.add_dummy_prefix = as_bool(&v, "normalizer_spec.add_dummy_prefix")?,
                (4, v) => {
                    self.remove_extra_whitespaces =
                        as_bool(&v, "normalizer_spec.remove_extra_whitespaces")?
                }
                (5, v) => {
                    self.escape_whitespaces = as_bool(&v, "normalizer_spec.escape_whitespaces")?
                }
                (1 | 2, _) => {
                    return Err(err(format!(
                        "normalizer_spec field {field} has the wrong protobuf type"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn parse_piece(b: &[u8], i: usize) -> Result<(String, f32, PieceType)> {
    let mut r = Reader::new(b, "pieces");
    let mut piece = None;
    let mut score = 0.0f32;
    let mut ty = PieceType::Normal;
    while let Some((field, val)) = r.next()? {
        match (field, val) {
            (1, Val::Len(s)) => piece = Some(utf8(s, &format!("piece {i}"))?.to_string()),
            (2, Val::Fixed32(x)) => score = f32::from_bits(x),
            (3, Val::Varint(x)) => {
                ty = PieceType::from_proto(x)
                    .ok_or_else(|| err(format!("piece {i} has unknown type {x}")))?
            }
            (1..=3, _) => {
                return Err(err(format!(
                    "piece {i}: field {field} has the wrong protobuf type"
                )))
            }
            _ => {}
        }
    }
    let piece = piece.unwrap_or_default();
    if piece.is_empty() {
        return Err(err(format!("piece {i} is empty")));
    }
    Ok((piece, score, ty))
}

/// `<0xAB>` → 0xAB.
pub(crate) fn parse_byte_piece(s: &str) -> Option<u8> {
    let hex = s.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

const SPACE: &str = "\u{2581}";

pub(crate) struct SpModel {
    model: ModelType,
    /// NORMAL, USER_DEFINED and UNUSED pieces (what merges and the lattice may produce).
    pieces: FxMap<Box<str>, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces.
    reserved: FxMap<Box<str>, u32>,
    types: Vec<PieceType>,
    scores: Vec<f32>,
    unk_id: u32,
    byte_ids: Option<[u32; 256]>,
    user: Trie,
    has_user: bool,
    max_piece_bytes: usize,
    min_score: f32,
    max_score: f32,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// Reusable buffers for [`SpModel::encode`].
#[derive(Default)]
pub(crate) struct SpScratch {
    norm: String,
    syms: Vec<Sym>,
    heap: BinaryHeap<(u32, std::cmp::Reverse<u32>, u32, u32)>,
    best: Vec<(f32, u32, u32)>,
    pieces: Vec<(u32, u32, u32)>,
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    end: u32,
    prev: u32,
    next: u32,
    freeze: bool,
}

const NONE: u32 = u32::MAX;

/// f32 → u32 with the same order (for the heap).
#[inline]
fn ord_key(f: f32) -> u32 {
    let b = f.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

impl SpModel {
    fn piece_to_id(&self, s: &str) -> u32 {
        if let Some(&id) = self.reserved.get(s) {
            return id;
        }
        self.pieces.get(s).copied().unwrap_or(self.unk_id)
    }

    fn is_unused(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&PieceType::Unused)
    }

    /// Length of the user-defined piece at `text[i..]`, else of one character.
    #[inline]
    fn prefix_len(&self, text: &str, i: usize) -> (usize, bool) {
        if self.has_user {
            if let Some((end, _)) = self.user.longest_at(text.as_bytes(), i) {
                return (end - i, true);
            }
        }
        let c = text[i..].chars().next().map_or(1, char::len_utf8);
        (c, false)
    }

    /// SentencePiece's `Normalizer::Normalize` with the identity rule.
    fn normalize(&self, text: &str, out: &mut String) {
        out.clear();
        if text.is_empty() {
            return;
        }
        let mut i = 0;
        if self.remove_extra_whitespaces {
            while i < text.len() && text.as_bytes()[i] == b' ' {
                i += 1;
            }
        }
        if i == text.len() {
            return;
        }
        let ws = if self.escape_whitespaces { SPACE } else { " " };
        if self.add_dummy_prefix {
            out.push_str(ws);
        }
        let mut prev_space = self.remove_extra_whitespaces;
        while i < text.len() {
            let (n, _) = self.prefix_len(text, i);
            let mut sp = &text[i..i + n];
            if prev_space {
                sp = sp.trim_start_matches(' ');
            }
            if !sp.is_empty() {
                for c in sp.chars() {
                    if c == ' ' && self.escape_whitespaces {
                        out.push_str(SPACE);
                    } else {
                        out.push(c);
                    }
                }
                prev_space = sp.ends_with(' ');
            }
            i += n;
            if !self.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(ws) {
                out.truncate(out.len() - ws.len());
            }
        }
    }

    /// Encode one stretch of text (no control tokens in it), appending ids to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>, s: &mut SpScratch) {
        let mut norm = std::mem::take(&mut s.norm);
        self.normalize(text, &mut norm);
        if !norm.is_empty() {
            s.pieces.clear();
            match self.model {
                ModelType::Bpe => self.bpe(&norm, s),
                ModelType::Unigram => self.unigram(&norm, s),
            }
            self.emit(&norm, &s.pieces, out);
        }
        s.norm = norm;
    }

    /// Pieces (start, end, id) → ids, with byte fallback or runs of unknowns fused.
    fn emit(&self, norm: &str, pieces: &[(u32, u32, u32)], out: &mut Vec<u32>) {
        let mut prev_unk = false;
        for &(a, b, id) in pieces {
            let is_unk = id == self.unk_id;
            if is_unk {
                if let Some(bytes) = &self.byte_ids {
                    for &byte in &norm.as_bytes()[a as usize..b as usize] {
                        out.push(bytes[byte as usize]);
                    }
                } else if !prev_unk {
                    out.push(id);
                }
            } else {
                out.push(id);
            }
            prev_unk = is_unk;
        }
    }

    fn bpe(&self, norm: &str, s: &mut SpScratch) {
        let syms = &mut s.syms;
        syms.clear();
        let mut i = 0;
        while i < norm.len() {
            let (n, user) = self.prefix_len(norm, i);
            let k = syms.len() as u32;
            syms.push(Sym {
                start: i as u32,
                end: (i + n) as u32,
                prev: if k == 0 { NONE } else { k - 1 },
                next: k + 1,
                freeze: user,
            });
            i += n;
        }
        if let Some(last) = syms.last_mut() {
            last.next = NONE;
        }
        let heap = &mut s.heap;
        heap.clear();
        // Pieces made of UNUSED merges: the two halves they came from (by text).
        let mut rev: FxMap<&str, (&str, &str)> = fx_map(0);
        let mut add = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: u32, r: u32| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (syms[l as usize], syms[r as usize]);
            if a.freeze || b.freeze {
                return;
            }
            let piece = &norm[a.start as usize..b.end as usize];
            if piece.len() > self.max_piece_bytes {
                return;
            }
            if let Some(&id) = self.pieces.get(piece) {
                let score = self.scores[id as usize];
                heap.push((ord_key(score), std::cmp::Reverse(l), r, piece.len() as u32));
                if self.is_unused(id) {
                    rev.insert(
                        piece,
                        (
                            &norm[a.start as usize..a.end as usize],
                            &norm[b.start as usize..b.end as usize],
                        ),
                    );
                }
            }
        };
        for k in 1..syms.len() as u32 {
            add(heap, syms, k - 1, k);
        }
        while let Some((_, std::cmp::Reverse(l), r, size)) = heap.pop() {
            let (a, b) = (syms[l as usize], syms[r as usize]);
            if a.start == a.end || b.start == b.end || (b.end - a.start) != size || a.next != r {
                continue;
            }
            syms[l as usize].end = b.end;
            syms[l as usize].next = b.next;
            if b.next != NONE {
                syms[b.next as usize].prev = l;
            }
            syms[r as usize].start = b.end;
            syms[r as usize].end = b.end;
            let prev = syms[l as usize].prev;
            add(heap, syms, prev, l);
            let next = syms[l as usize].next;
            add(heap, syms, l, next);
        }
        let mut k = if syms.is_empty() { NONE } else { 0 };
        while k != NONE {
            let sym = syms[k as usize];
            self.resegment(
                norm,
                sym.start as usize,
                sym.end as usize,
                &rev,
                &mut s.pieces,
                0,
            );
            k = sym.next;
        }
    }

    fn resegment(
        &self,
        norm: &str,
        a: usize,
        b: usize,
        rev: &FxMap<&str, (&str, &str)>,
        out: &mut Vec<(u32, u32, u32)>,
        depth: usize,
    ) {
        let w = &norm[a..b];
        let id = self.piece_to_id(w);
        if self.is_unused(id) && depth < 64 {
            if let Some(&(l, _)) = rev.get(w) {
                let mid = a + l.len();
                if mid > a && mid < b {
                    self.resegment(norm, a, mid, rev, out, depth + 1);
                    self.resegment(norm, mid, b, rev, out, depth + 1);
                    return;
                }
            }
        }
        out.push((a as u32, b as u32, id));
    }

    fn unigram(&self, norm: &str, s: &mut SpScratch) {
        const UNK_PENALTY: f32 = 10.0;
        let unk_score = self.min_score - UNK_PENALTY;
        let n = norm.len();
        let best = &mut s.best;
        best.clear();
        // (best score, start, id); start NONE = not reached.
        best.resize(n + 1, (0.0, NONE, NONE));
        best[0].1 = 0;
        let mut i = 0;
        while i < n {
            let here = best[i].0;
            let mblen = norm[i..].chars().next().map_or(1, char::len_utf8);
            let mut has_single = false;
            let mut j = i + mblen;
            loop {
                if let Some(&id) = self.pieces.get(&norm[i..j]) {
                    let ty = self.types[id as usize];
                    if ty != PieceType::Unused {
                        let len = (j - i) as f32;
                        let score = if ty == PieceType::UserDefined {
                            len * self.max_score - 0.1
                        } else {
                            self.scores[id as usize]
                        };
                        let cand = score + here;
                        let t = &mut best[j];
                        if t.1 == NONE || cand > t.0 {
                            *t = (cand, i as u32, id);
                        }
                        if j - i == mblen {
                            has_single = true;
                        }
                    }
                }
                if j >= n || j - i >= self.max_piece_bytes {
                    break;
                }
                j += norm[j..].chars().next().map_or(1, char::len_utf8);
            }
            if !has_single {
                let cand = unk_score + here;
                let t = &mut best[i + mblen];
                if t.1 == NONE || cand > t.0 {
                    *t = (cand, i as u32, self.unk_id);
                }
            }
            i += mblen;
        }
        let start = s.pieces.len();
        let mut end = n;
        while end > 0 {
            let (_, st, id) = best[end];
            if st == NONE || st as usize >= end {
                break; // unreachable: every position is reached from the one before
            }
            s.pieces.push((st, end as u32, id));
            end = st as usize;
        }
        s.pieces[start..].reverse();
    }
}

/// Build the tokenizer of a SentencePiece `tokenizer.model`.
pub(crate) fn load(bytes: &[u8]) -> Result<Tokenizer> {
    let p = Proto::parse(bytes)?;
    let model = match p.model_type {
        1 => ModelType::Unigram,
        2 => ModelType::Bpe,
        3 | 4 => {
            return Err(err(format!(
                "trainer_spec.model_type {} (WORD/CHAR) is not supported (only BPE and Unigram)",
                p.model_type
            )))
        }
        t => return Err(err(format!("trainer_spec.model_type {t} is unknown"))),
    };
    if p.charsmap_len > 0 {
        return Err(err(format!(
            "normalizer `{}` uses a precompiled character map, which is not supported \
             (only the identity normalization of Llama 2 / Mistral models)",
            p.normalizer_name
        )));
    }
    if p.treat_whitespace_as_suffix {
        return Err(err(
            "trainer_spec.treat_whitespace_as_suffix is not supported",
        ));
    }
    if p.pieces.is_empty() {
        return Err(err("the model has no pieces"));
    }
    let n = p.pieces.len();
    let mut parts = Parts::new(n);
    let mut pieces = fx_map(n);
    let mut reserved = fx_map(64);
    let mut types = Vec::with_capacity(n);
    let mut scores = Vec::with_capacity(n);
    let mut unk_id = None;
    let mut byte_ids = [NONE; 256];
    let mut added = Vec::new();
    let mut user = Vec::new();
    let mut max_piece_bytes = 1;
    let (mut min_score, mut max_score) = (f32::MAX, f32::MIN_POSITIVE);
    for (i, (s, score, ty)) in p.pieces.iter().enumerate() {
        let id = i as u32;
        let normal = matches!(
            ty,
            PieceType::Normal | PieceType::UserDefined | PieceType::Unused
        );
        let map = if normal { &mut pieces } else { &mut reserved };
        if map.insert(s.as_str().into(), id).is_some() {
            return Err(err(format!("piece {i} ({s:?}) is defined twice")));
        }
        if normal {
            max_piece_bytes = max_piece_bytes.max(s.len());
        }
        let mut special = false;
        let mut raw = s.replace(SPACE, " ").into_bytes();
        match ty {
            PieceType::Unknown => {
                if unk_id.is_some() {
                    return Err(err(format!("piece {i} ({s:?}): a second unknown piece")));
                }
                unk_id = Some(id);
                special = true;
            }
            PieceType::Control => special = true,
            PieceType::Byte => {
                if !p.byte_fallback {
                    return Err(err(format!(
                        "byte piece {i} ({s:?}) although trainer_spec.byte_fallback is false"
                    )));
                }
                let b = parse_byte_piece(s)
                    .ok_or_else(|| err(format!("byte piece {i} ({s:?}) is not <0xXX>")))?;
                byte_ids[b as usize] = id;
                raw = vec![b];
            }
            PieceType::UserDefined => user.push((i, s.as_str())),
            PieceType::Normal => {
                min_score = min_score.min(*score);
                max_score = max_score.max(*score);
            }
            PieceType::Unused => {}
        }
        if matches!(ty, PieceType::Unknown | PieceType::Control) {
            added.push(AddedToken {
                content: s.clone(),
                id,
                single_word: false,
                lstrip: false,
                rstrip: false,
                normalized: false,
            });
        }
        types.push(*ty);
        scores.push(*score);
        parts.set(id, s, raw, special);
    }
    let unk_id = unk_id.ok_or_else(|| err("the model has no unknown piece (type UNKNOWN)"))?;
    if min_score == f32::MAX {
        min_score = 0.0;
    }
    if max_score == f32::MIN_POSITIVE {
        max_score = 0.0;
    }
    let byte_ids = if p.byte_fallback {
        if let Some(b) = byte_ids.iter().position(|&x| x == NONE) {
            return Err(err(format!(
                "trainer_spec.byte_fallback is set but byte piece <0x{b:02X}> is missing"
            )));
        }
        Some(byte_ids)
    } else {
        None
    };
    let has_user = !user.is_empty();
    let sp = SpModel {
        model,
        pieces,
        reserved,
        types,
        scores,
        unk_id,
        byte_ids,
        user: Trie::new(user.into_iter()),
        has_user,
        max_piece_bytes,
        min_score,
        max_score,
        add_dummy_prefix: p.add_dummy_prefix,
        remove_extra_whitespaces: p.remove_extra_whitespaces,
        escape_whitespaces: p.escape_whitespaces,
    };
    let bos = p
        .bos_id
        .and_then(|b| u32::try_from(b).ok())
        .filter(|&b| (b as usize) < n && sp.types[b as usize] == PieceType::Control);
    let strip = if p.add_dummy_prefix { 1 } else { 0 };
    Ok(parts.finish(Core::Spm(Box::new(sp)), added, bos, strip))
}
