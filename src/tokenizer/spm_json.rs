//! Hugging Face `tokenizer.json` of SentencePiece-style models (Llama 2, Mistral, TinyLlama, and
//! what transformers' converters write): exactly what the `tokenizers` library does with them.
//!
//! - Normalizers: `Prepend`, `Replace` (string or regex), `Strip`, in a `Sequence`.
//! - Pre-tokenizers: `Metaspace` (`prepend_scheme` always / first / never, or the older
//!   `add_prefix_space`; `split`), then `Split` steps.
//! - Models: `BPE` over characters with `byte_fallback` (`<0xXX>` pieces), `fuse_unk`,
//!   `ignore_merges`, merges by rank; `Unigram` (best segmentation, unknowns at min - 10, runs of
//!   unknowns fused, `byte_fallback`).
//! - Decoders: `Replace("▁", " ")`, `ByteFallback`, `Fuse`, `Strip(" ", n, 0)`, `Metaspace`.

use serde_json::Value;

use super::bpe::{Bpe, Scratch};
use super::hash::FxMap;
use super::pretok::{Behavior, PieceRegex, PreTokenizer, SplitScratch, SplitStep};
use crate::{Error, Result};

const FILE: &str = "tokenizer.json";

fn err(msg: impl Into<String>) -> Error {
    Error::format(FILE, msg)
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("?")
}

enum Pattern {
    Str(String),
    Re(fancy_regex::Regex),
}

enum Norm {
    Prepend(String),
    Replace(Pattern, String),
    Strip(bool, bool),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Always,
    First,
    Never,
}

struct Metaspace {
    rep: char,
    scheme: Scheme,
}

pub(crate) enum JsonModel {
    Bpe {
        /// Vocabulary keyed by the pieces' UTF-8; `byte_ids` unused.
        bpe: Box<Bpe>,
        byte_fallback: bool,
        fuse_unk: bool,
    },
    Unigram {
        vocab: FxMap<Box<str>, u32>,
        scores: Vec<f64>,
        min_score: f64,
        unk_id: Option<u32>,
        byte_fallback: bool,
        max_piece_bytes: usize,
    },
}

/// The SentencePiece-style pipeline of a `tokenizer.json`.
pub(crate) struct SpmJson {
    norms: Vec<Norm>,
    metaspace: Option<Metaspace>,
    splits: PreTokenizer,
    pub(crate) model: JsonModel,
    /// Id of each `<0xXX>` piece.
    byte_ids: [Option<u32>; 256],
}

/// Reusable buffers.
#[derive(Default)]
pub(crate) struct JsonScratch {
    a: String,
    b: String,
    split: SplitScratch,
    bpe: Scratch,
    best: Vec<(f64, u32, u32)>,
    strs: Vec<(u32, u32, bool)>,
}

fn parse_pattern(v: Option<&Value>, what: &str) -> Result<Pattern> {
    let v = v.ok_or_else(|| err(format!("{what} without `pattern`")))?;
    if let Some(s) = v.get("String").and_then(Value::as_str) {
        Ok(Pattern::Str(s.to_string()))
    } else if let Some(r) = v.get("Regex").and_then(Value::as_str) {
        fancy_regex::Regex::new(r)
            .map(Pattern::Re)
            .map_err(|e| err(format!("{what}: bad regex {r:?}: {e}")))
    } else {
        Err(err(format!("{what} `pattern` is neither String nor Regex")))
    }
}

fn parse_norm(v: &Value, out: &mut Vec<Norm>, depth: usize) -> Result<()> {
    if depth > 8 {
        return Err(err("normalizer Sequence nested too deeply"));
    }
    match type_of(v) {
        "Sequence" => {
            let list = v
                .get("normalizers")
                .and_then(Value::as_array)
                .ok_or_else(|| err("normalizer Sequence without `normalizers`"))?;
            for n in list {
                parse_norm(n, out, depth + 1)?;
            }
        }
        "Prepend" => out.push(Norm::Prepend(
            v.get("prepend")
                .and_then(Value::as_str)
                .ok_or_else(|| err("Prepend normalizer without `prepend`"))?
                .to_string(),
        )),
        "Replace" => {
            let pat = parse_pattern(v.get("pattern"), "Replace normalizer")?;
            let content = v
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| err("Replace normalizer without `content`"))?;
            out.push(Norm::Replace(pat, content.to_string()));
        }
        "Strip" => out.push(Norm::Strip(
            v.get("strip_left")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            v.get("strip_right")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        )),
        "Precompiled" => {
            let empty = v
                .get("precompiled_charsmap")
                .is_none_or(|c| c.is_null() || c.as_str() == Some(""));
            if !empty {
                return Err(err(
                    "normalizer Precompiled (a SentencePiece character map) is not supported",
                ));
            }
        }
        other => return Err(err(format!("normalizer {other:?} is not supported"))),
    }
    Ok(())
}

fn parse_scheme(v: &Value) -> Result<Scheme> {
    if let Some(s) = v.get("prepend_scheme").and_then(Value::as_str) {
        return match s {
            "always" => Ok(Scheme::Always),
            "first" => Ok(Scheme::First),
            "never" => Ok(Scheme::Never),
            o => Err(err(format!("Metaspace prepend_scheme {o:?} is unknown"))),
        };
    }
    Ok(match v.get("add_prefix_space").and_then(Value::as_bool) {
        Some(false) => Scheme::Never,
        _ => Scheme::Always,
    })
}

fn parse_rep(v: &Value) -> Result<char> {
    let s = v
        .get("replacement")
        .and_then(Value::as_str)
        .unwrap_or("\u{2581}");
    let mut it = s.chars();
    match (it.next(), it.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(err(format!(
            "Metaspace replacement {s:?} is not one character"
        ))),
    }
}

fn parse_pretok(
    v: &Value,
    meta: &mut Option<Metaspace>,
    steps: &mut Vec<SplitStep>,
    depth: usize,
) -> Result<()> {
    if depth > 8 {
        return Err(err("pre_tokenizer Sequence nested too deeply"));
    }
    match type_of(v) {
        "Sequence" => {
            let list = v
                .get("pretokenizers")
                .and_then(Value::as_array)
                .ok_or_else(|| err("pre_tokenizer Sequence without `pretokenizers`"))?;
            for p in list {
                parse_pretok(p, meta, steps, depth + 1)?;
            }
        }
        "Metaspace" => {
            if meta.is_some() || !steps.is_empty() {
                return Err(err(
                    "a Metaspace pre-tokenizer after another pre-tokenizer is not supported",
                ));
            }
            let rep = parse_rep(v)?;
            let scheme = parse_scheme(v)?;
            *meta = Some(Metaspace { rep, scheme });
            if v.get("split").and_then(Value::as_bool).unwrap_or(true) {
                let mut buf = [0u8; 4];
                steps.push(SplitStep {
                    re: PieceRegex::exact(&fancy_regex::escape(rep.encode_utf8(&mut buf)))?,
                    behavior: Behavior::MergedWithNext,
                    invert: false,
                });
            }
        }
        "Split" => {
            let re = match parse_pattern(v.get("pattern"), "Split pre-tokenizer")? {
                Pattern::Str(s) => PieceRegex::exact(&fancy_regex::escape(&s))?,
                Pattern::Re(r) => PieceRegex::exact(r.as_str())?,
            };
            let behavior = Behavior::parse(
                v.get("behavior")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("Split without `behavior`"))?,
            )?;
            let invert = v.get("invert").and_then(Value::as_bool).unwrap_or(false);
            steps.push(SplitStep {
                re,
                behavior,
                invert,
            });
        }
        other => {
            return Err(err(format!(
                "pre_tokenizer {other:?} is not supported with a SentencePiece-style model"
            )))
        }
    }
    Ok(())
}

/// The decoder: how many leading spaces to strip from the text, and whether `<0xXX>` pieces
/// decode to their byte.
pub(crate) fn parse_decoder(d: Option<&Value>) -> Result<(usize, bool)> {
    let Some(d) = d.filter(|d| !d.is_null()) else {
        return Ok((0, false));
    };
    let list: Vec<&Value> = match type_of(d) {
        "Sequence" => d
            .get("decoders")
            .and_then(Value::as_array)
            .ok_or_else(|| err("decoder Sequence without `decoders`"))?
            .iter()
            .collect(),
        _ => vec![d],
    };
    let (mut strip, mut bytes, mut fused, mut replaced) = (0, false, false, false);
    for (i, x) in list.iter().enumerate() {
        match type_of(x) {
            "Replace" => {
                let from = x.get("pattern").and_then(|p| p.get("String"));
                let to = x.get("content").and_then(Value::as_str);
                if from.and_then(Value::as_str) != Some("\u{2581}") || to != Some(" ") {
                    return Err(err("only the decoder Replace(\"▁\", \" \") is supported"));
                }
                replaced = true;
            }
            "ByteFallback" => bytes = true,
            "Fuse" => fused = true,
            "Strip" => {
                let content = x.get("content").and_then(Value::as_str);
                let start = x.get("start").and_then(Value::as_u64).unwrap_or(0);
                let stop = x.get("stop").and_then(Value::as_u64).unwrap_or(0);
                if content != Some(" ") || stop != 0 || (!fused && start > 0) {
                    return Err(err(
                        "only the decoder Strip(\" \", start, 0) after Fuse is supported",
                    ));
                }
                strip = start.min(64) as usize;
            }
            "Metaspace" if i == 0 || replaced => {
                if parse_rep(x)? != '\u{2581}' {
                    return Err(err("only the Metaspace decoder with \"▁\" is supported"));
                }
                replaced = true;
                if parse_scheme(x)? != Scheme::Never {
                    strip = 1;
                }
            }
            other => return Err(err(format!("decoder {other:?} is not supported"))),
        }
    }
    if !replaced {
        return Err(err("the decoder does not turn \"▁\" back into spaces"));
    }
    Ok((strip, bytes))
}

impl SpmJson {
    /// Build the pipeline (the model is added by the caller).
    pub(crate) fn new(
        normalizer: Option<&Value>,
        pre: Option<&Value>,
        model: JsonModel,
        vocab: &FxMap<Box<str>, u32>,
    ) -> Result<SpmJson> {
        let mut norms = Vec::new();
        if let Some(n) = normalizer.filter(|n| !n.is_null()) {
            parse_norm(n, &mut norms, 0)?;
        }
        let mut meta = None;
        let mut steps = Vec::new();
        if let Some(p) = pre.filter(|p| !p.is_null()) {
            parse_pretok(p, &mut meta, &mut steps, 0)?;
        }
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = vocab.get(format!("<0x{b:02X}>").as_str()).copied();
        }
        Ok(SpmJson {
            norms,
            metaspace: meta,
            splits: PreTokenizer {
                steps,
                add_prefix_space: false,
            },
            model,
            byte_ids,
        })
    }

    /// Encode one stretch of text between added tokens; `first` when it starts the input.
    pub(crate) fn encode(&self, text: &str, first: bool, out: &mut Vec<u32>, s: &mut JsonScratch) {
        let mut a = std::mem::take(&mut s.a);
        let mut b = std::mem::take(&mut s.b);
        a.clear();
        a.push_str(text);
        for n in &self.norms {
            if a.is_empty() {
                break;
            }
            b.clear();
            match n {
                Norm::Prepend(p) => {
                    b.push_str(p);
                    b.push_str(&a);
                }
                Norm::Replace(Pattern::Str(p), c) => {
                    if p.is_empty() {
                        continue;
                    }
                    let mut last = 0;
                    for (i, _) in a.match_indices(p.as_str()) {
                        b.push_str(&a[last..i]);
                        b.push_str(c);
                        last = i + p.len();
                    }
                    b.push_str(&a[last..]);
                }
                Norm::Replace(Pattern::Re(re), c) => {
                    let mut last = 0;
                    for m in re.find_iter(&a) {
                        let Ok(m) = m else {
                            break; // backtrack limit: leave the rest as is
                        };
                        b.push_str(&a[last..m.start()]);
                        b.push_str(c);
                        last = m.end();
                    }
                    b.push_str(&a[last..]);
                }
                Norm::Strip(l, r) => {
                    let mut t = a.as_str();
                    if *l {
                        t = t.trim_start();
                    }
                    if *r {
                        t = t.trim_end();
                    }
                    b.push_str(t);
                }
            }
            std::mem::swap(&mut a, &mut b);
        }
        if let Some(m) = &self.metaspace {
            // Spaces become the replacement first, then the prefix goes before text that does
            // not start with one.
            b.clear();
            let prepend = match m.scheme {
                Scheme::Always => true,
                Scheme::First => first,
                Scheme::Never => false,
            };
            if prepend && !a.is_empty() && !a.starts_with([' ', m.rep]) {
                b.push(m.rep);
            }
            for c in a.chars() {
                b.push(if c == ' ' { m.rep } else { c });
            }
            std::mem::swap(&mut a, &mut b);
        }
        let mut split = std::mem::take(&mut s.split);
        self.splits
            .for_each_piece(&a, &mut split, |x, y| self.encode_piece(&a[x..y], out, s));
        s.split = split;
        s.a = a;
        s.b = b;
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>, s: &mut JsonScratch) {
        match &self.model {
            JsonModel::Bpe {
                bpe,
                byte_fallback,
                fuse_unk,
            } => {
                if bpe.ignore_merges {
                    if let Some(&id) = bpe.vocab.get(piece.as_bytes()) {
                        out.push(id);
                        return;
                    }
                }
                let ids = &mut s.bpe.ids;
                ids.clear();
                let mut unk: Option<u32> = None;
                for (i, c) in piece.char_indices() {
                    let cs = &piece[i..i + c.len_utf8()];
                    if let Some(&id) = bpe.vocab.get(cs.as_bytes()) {
                        if let Some(u) = unk.take() {
                            ids.push(u);
                        }
                        ids.push(id);
                        continue;
                    }
                    if *byte_fallback {
                        let all = cs.bytes().all(|b| self.byte_ids[b as usize].is_some());
                        if all {
                            ids.extend(cs.bytes().filter_map(|b| self.byte_ids[b as usize]));
                            continue;
                        }
                    }
                    if let Some(u) = bpe.unk_id {
                        match unk {
                            Some(_) if *fuse_unk => {}
                            Some(prev) => {
                                ids.push(prev);
                            }
                            None => unk = Some(u),
                        }
                    }
                }
                if let Some(u) = unk {
                    ids.push(u);
                }
                bpe.merge_ids(&mut s.bpe, out);
            }
            JsonModel::Unigram { .. } => self.unigram(piece, out, s),
        }
    }

    fn unigram(&self, text: &str, out: &mut Vec<u32>, s: &mut JsonScratch) {
        let JsonModel::Unigram {
            vocab,
            scores,
            min_score,
            unk_id,
            byte_fallback,
            max_piece_bytes,
        } = &self.model
        else {
            return;
        };
        let unk_score = min_score - 10.0;
        let n = text.len();
        let best = &mut s.best;
        best.clear();
        best.resize(n + 1, (0.0, u32::MAX, u32::MAX));
        best[0].1 = 0;
        let mut i = 0;
        while i < n {
            let here = best[i].0;
            let mblen = text[i..].chars().next().map_or(1, char::len_utf8);
            let mut has_single = false;
            let mut j = i + mblen;
            loop {
                if let Some(&id) = vocab.get(&text[i..j]) {
                    let cand = scores[id as usize] + here;
                    let t = &mut best[j];
                    if t.1 == u32::MAX || cand > t.0 {
                        *t = (cand, i as u32, id);
                    }
                    if j - i == mblen {
                        has_single = true;
                    }
                }
                if j >= n || j - i >= *max_piece_bytes {
                    break;
                }
                j += text[j..].chars().next().map_or(1, char::len_utf8);
            }
            if !has_single {
                let cand = unk_score + here;
                let t = &mut best[i + mblen];
                if t.1 == u32::MAX || cand > t.0 {
                    // u32::MAX - 1: an unknown node.
                    *t = (cand, i as u32, u32::MAX - 1);
                }
            }
            i += mblen;
        }
        // Back from the end: (start, end, is_unknown), unknown runs fused (HF `fuse_unk`).
        let strs = &mut s.strs;
        strs.clear();
        let mut end = n;
        while end > 0 {
            let (_, st, id) = best[end];
            if st == u32::MAX || st as usize >= end {
                break;
            }
            let is_unk = id == u32::MAX - 1 || Some(id) == *unk_id;
            match strs.last_mut() {
                Some(last) if is_unk && last.2 && unk_id.is_some() => last.0 = st,
                _ => strs.push((st, end as u32, is_unk)),
            }
            end = st as usize;
        }
        for &(a, b, _) in strs.iter().rev() {
            let w = &text[a as usize..b as usize];
            if let Some(&id) = vocab.get(w) {
                out.push(id);
                continue;
            }
            if *byte_fallback && w.bytes().all(|x| self.byte_ids[x as usize].is_some()) {
                out.extend(w.bytes().filter_map(|x| self.byte_ids[x as usize]));
                continue;
            }
            if let Some(u) = unk_id {
                out.push(*u);
            }
        }
    }
}
