//! Loading a Hugging Face `tokenizer.json`: byte-level BPE here, SentencePiece-style models
//! (Metaspace / normalizers, byte fallback, Unigram) through [`super::spm_json`].

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;

use super::added::AddedToken;
use super::bpe::Bpe;
use super::bytelevel;
use super::hash::fx_map;
use super::pretok::{Behavior, PieceRegex, PreTokenizer, SplitStep, GPT2_PATTERN};
use super::spm::parse_byte_piece;
use super::spm_json::{self, JsonModel, SpmJson};
use super::{Core, Parts, Tokenizer};
use crate::{Error, Result};

const FILE: &str = "tokenizer.json";

fn err(msg: impl Into<String>) -> Error {
    Error::format(FILE, msg)
}

#[derive(Deserialize)]
struct TokJson {
    #[serde(default)]
    added_tokens: Vec<AddedJson>,
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    post_processor: Option<Value>,
    #[serde(default)]
    decoder: Option<Value>,
    model: ModelJson,
}

#[derive(Deserialize)]
struct AddedJson {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default = "yes")]
    normalized: bool,
    #[serde(default)]
    special: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
struct ModelJson {
    #[serde(rename = "type", default)]
    ty: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    fuse_unk: bool,
    #[serde(default)]
    unk_id: Option<u32>,
    vocab: Vocab,
    #[serde(default)]
    merges: Vec<Merge>,
}

/// `{"piece": id, ...}` (BPE) or `[["piece", score], ...]` (Unigram).
enum Vocab {
    Map(HashMap<String, u32>),
    List(Vec<(String, f64)>),
}

impl<'de> Deserialize<'de> for Vocab {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vocab;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a vocabulary: {\"piece\": id} or [[\"piece\", score]]")
            }
            fn visit_map<A: de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Vocab, A::Error> {
                let mut m = HashMap::with_capacity(map.size_hint().unwrap_or(0).min(1 << 20));
                while let Some((k, v)) = map.next_entry::<String, u32>()? {
                    m.insert(k, v);
                }
                Ok(Vocab::Map(m))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Vocab, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(x) = seq.next_element::<(String, f64)>()? {
                    v.push(x);
                }
                Ok(Vocab::List(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A merge, written either `"a b"` (older files) or `["a", "b"]`.
struct Merge(String, String);

impl<'de> Deserialize<'de> for Merge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Merge;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a merge: \"a b\" or [\"a\", \"b\"]")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Merge, E> {
                let mut it = s.split(' ');
                match (it.next(), it.next(), it.next()) {
                    (Some(a), Some(b), None) => Ok(Merge(a.to_string(), b.to_string())),
                    _ => Err(E::custom(format!("merge {s:?} is not two tokens"))),
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Merge, A::Error> {
                let a: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("merge pair is empty"))?;
                let b: String = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("merge pair has one token"))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("merge pair has more than two tokens"));
                }
                Ok(Merge(a, b))
            }
        }
        d.deserialize_any(V)
    }
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("?")
}

/// Translate the pre-tokenizer into split steps. Returns whether a ByteLevel step was seen.
fn parse_pretok(v: &Value, steps: &mut Vec<SplitStep>, prefix_space: &mut bool) -> Result<bool> {
    match type_of(v) {
        "Sequence" => {
            let list = v
                .get("pretokenizers")
                .and_then(Value::as_array)
                .ok_or_else(|| err("pre_tokenizer Sequence without `pretokenizers`"))?;
            let mut byte_level = false;
            for p in list {
                byte_level |= parse_pretok(p, steps, prefix_space)?;
            }
            Ok(byte_level)
        }
        "Split" => {
            let pat = v
                .get("pattern")
                .ok_or_else(|| err("Split without `pattern`"))?;
            let re = if let Some(r) = pat.get("Regex").and_then(Value::as_str) {
                PieceRegex::new(r)?
            } else if let Some(s) = pat.get("String").and_then(Value::as_str) {
                PieceRegex::exact(&fancy_regex::escape(s))?
            } else {
                return Err(err("Split `pattern` is neither Regex nor String"));
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
            Ok(false)
        }
        "ByteLevel" => {
            if v.get("add_prefix_space")
                .and_then(Value::as_bool)
                .unwrap_or(true)
            {
                if !steps.is_empty() {
                    return Err(err(
                        "ByteLevel with add_prefix_space after another pre-tokenizer is not supported",
                    ));
                }
                *prefix_space = true;
            }
            if v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) {
                steps.push(SplitStep {
                    re: PieceRegex::new(GPT2_PATTERN)?,
                    behavior: Behavior::Isolated,
                    invert: false,
                });
            }
            Ok(true)
        }
        "Digits" => {
            let individual = v
                .get("individual_digits")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            steps.push(SplitStep {
                re: PieceRegex::exact(if individual { r"\p{N}" } else { r"\p{N}+" })?,
                behavior: Behavior::Isolated,
                invert: false,
            });
            Ok(false)
        }
        other => Err(err(format!("unsupported pre_tokenizer type {other:?}"))),
    }
}

/// The first special token of a `TemplateProcessing` single template, if it comes before `$A`.
fn bos_from_post(v: &Value) -> Option<u32> {
    match type_of(v) {
        "Sequence" => v
            .get("processors")?
            .as_array()?
            .iter()
            .find_map(bos_from_post),
        "TemplateProcessing" => {
            let first = v.get("single")?.as_array()?.first()?;
            let name = first.get("SpecialToken")?.get("id")?.as_str()?;
            let ids = v.get("special_tokens")?.get(name)?.get("ids")?.as_array()?;
            ids.first()?.as_u64().and_then(|x| u32::try_from(x).ok())
        }
        _ => None,
    }
}

fn has_byte_level(v: &Value) -> bool {
    match type_of(v) {
        "ByteLevel" => true,
        "Sequence" => v
            .get("pretokenizers")
            .and_then(Value::as_array)
            .is_some_and(|l| l.iter().any(has_byte_level)),
        _ => false,
    }
}

/// The number of ids: highest id + 1 (vocabulary and added tokens), bounded.
fn id_count(max_vocab: Option<u32>, added: &[AddedJson]) -> Result<usize> {
    let max_added = added.iter().map(|a| a.id).max();
    match max_vocab.max(max_added) {
        Some(x) if x < (1 << 28) => Ok(x as usize + 1),
        Some(x) => Err(err(format!("token id {x} is too large"))),
        None => Err(err("empty vocabulary")),
    }
}

pub(crate) fn load(bytes: &[u8]) -> Result<Tokenizer> {
    let j: TokJson =
        serde_json::from_slice(bytes).map_err(|e| err(format!("invalid tokenizer.json: {e}")))?;
    let byte_level = j
        .pre_tokenizer
        .as_ref()
        .is_some_and(|p| !p.is_null() && has_byte_level(p));
    let unigram =
        j.model.ty.as_deref() == Some("Unigram") || matches!(j.model.vocab, Vocab::List(_));
    if unigram || j.model.byte_fallback || !byte_level {
        return load_spm(j);
    }
    let m = j.model;
    let Vocab::Map(vocab) = m.vocab else {
        return Err(err(
            "model.vocab of a BPE model must be a map of piece to id",
        ));
    };
    if let Some(t) = m.ty.as_deref() {
        if t != "BPE" {
            return Err(err(format!(
                "model type {t:?} is not supported (only byte-level BPE)"
            )));
        }
    }
    if m.dropout.is_some_and(|d| d > 0.0) {
        return Err(err("BPE dropout is not supported"));
    }
    for (field, v) in [
        ("continuing_subword_prefix", &m.continuing_subword_prefix),
        ("end_of_word_suffix", &m.end_of_word_suffix),
    ] {
        if v.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(err(format!("model.{field} is not supported")));
        }
    }
    if let Some(n) = &j.normalizer {
        if !n.is_null() {
            return Err(err(format!("normalizer {:?} is not supported", type_of(n))));
        }
    }
    let mut steps = Vec::new();
    let mut add_prefix_space = false;
    let byte_level = match &j.pre_tokenizer {
        Some(p) if !p.is_null() => parse_pretok(p, &mut steps, &mut add_prefix_space)?,
        _ => false,
    };
    if !byte_level {
        return Err(err("no ByteLevel pre-tokenizer found"));
    }
    if let Some(d) = &j.decoder {
        let ok = match type_of(d) {
            "ByteLevel" => true,
            "Sequence" => d
                .get("decoders")
                .and_then(Value::as_array)
                .is_some_and(|l| l.iter().all(|x| type_of(x) == "ByteLevel")),
            _ => d.is_null(),
        };
        if !ok {
            return Err(err(format!("decoder {:?} is not supported", type_of(d))));
        }
    }

    let n = id_count(vocab.values().copied().max(), &j.added_tokens)?;
    let mut parts = Parts::new(n);
    let mut bvocab = fx_map(vocab.len());
    for (s, &id) in &vocab {
        let raw = bytelevel::decode_str(s);
        // Tokens outside the byte-level alphabet cannot come out of pre-tokenization.
        if let Some(b) = &raw {
            bvocab.insert(b.clone().into_boxed_slice(), id);
        }
        parts.set(id, s, raw.unwrap_or_else(|| s.as_bytes().to_vec()), false);
    }
    let mut byte_ids = [None; 256];
    for (b, slot) in byte_ids.iter_mut().enumerate() {
        *slot = bvocab.get(&[b as u8][..]).copied();
    }
    let merges = merge_table(&m.merges, &vocab)?;
    let unk_id = match &m.unk_token {
        Some(u) => vocab.get(u).copied(),
        None => None,
    };
    let mut added = Vec::with_capacity(j.added_tokens.len());
    for a in j.added_tokens {
        let raw =
            bytelevel::decode_str(&a.content).unwrap_or_else(|| a.content.as_bytes().to_vec());
        parts.set(a.id, &a.content, raw, a.special);
        added.push(AddedToken {
            content: a.content,
            id: a.id,
            single_word: a.single_word,
            lstrip: a.lstrip,
            rstrip: a.rstrip,
            normalized: a.normalized,
        });
    }
    let bos = j
        .post_processor
        .as_ref()
        .and_then(bos_from_post)
        .filter(|&b| (b as usize) < n);
    let bpe = Bpe {
        vocab: bvocab,
        byte_ids,
        merges,
        ignore_merges: m.ignore_merges,
        unk_id,
    };
    let pretok = PreTokenizer {
        steps,
        add_prefix_space,
    };
    Ok(parts.finish(
        Core::ByteLevel {
            bpe: Box::new(bpe),
            pretok,
        },
        added,
        bos,
        0,
    ))
}

type MergeTable = super::hash::FxMap<u64, (u32, u32)>;

/// (left id, right id) → (rank, merged id).
fn merge_table(merges: &[Merge], vocab: &HashMap<String, u32>) -> Result<MergeTable> {
    let mut table = fx_map(merges.len());
    let mut cat = String::new();
    for (rank, Merge(a, b)) in merges.iter().enumerate() {
        cat.clear();
        cat.push_str(a);
        cat.push_str(b);
        match (vocab.get(a), vocab.get(b), vocab.get(&cat)) {
            (Some(&x), Some(&y), Some(&z)) => {
                table.insert(((x as u64) << 32) | y as u64, (rank as u32, z));
            }
            _ => {
                return Err(err(format!(
                    "merge {rank} ({a:?} {b:?}) uses a token missing from the vocabulary"
                )))
            }
        }
    }
    Ok(table)
}

/// What a SentencePiece-style piece decodes to: `▁` as a space, `<0xXX>` as its byte (with a
/// ByteFallback decoder).
fn spm_piece_bytes(s: &str, byte_decoder: bool) -> Vec<u8> {
    if byte_decoder {
        if let Some(b) = parse_byte_piece(s) {
            return vec![b];
        }
    }
    s.replace('\u{2581}', " ").into_bytes()
}

/// A SentencePiece-style `tokenizer.json` (Llama 2 / Mistral / TinyLlama, transformers'
/// converters): Metaspace or Prepend/Replace normalizers, BPE with byte fallback, or Unigram.
fn load_spm(j: TokJson) -> Result<Tokenizer> {
    let m = j.model;
    if m.dropout.is_some_and(|d| d > 0.0) {
        return Err(err("BPE dropout is not supported"));
    }
    for (field, v) in [
        ("continuing_subword_prefix", &m.continuing_subword_prefix),
        ("end_of_word_suffix", &m.end_of_word_suffix),
    ] {
        if v.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(err(format!("model.{field} is not supported")));
        }
    }
    let (strip, byte_decoder) = spm_json::parse_decoder(j.decoder.as_ref())?;
    let unigram = match m.ty.as_deref() {
        Some("Unigram") => true,
        Some("BPE") | None => false,
        Some(t) => {
            return Err(err(format!(
                "model type {t:?} is not supported (only BPE and Unigram)"
            )))
        }
    };
    let mut strs: super::hash::FxMap<Box<str>, u32>;
    let n;
    let mut parts;
    let model = match (unigram, m.vocab) {
        (false, Vocab::Map(vocab)) => {
            n = id_count(vocab.values().copied().max(), &j.added_tokens)?;
            parts = Parts::new(n);
            strs = fx_map(vocab.len());
            let mut bvocab = fx_map(vocab.len());
            for (s, &id) in &vocab {
                bvocab.insert(s.as_bytes().to_vec().into_boxed_slice(), id);
                strs.insert(s.as_str().into(), id);
                parts.set(id, s, spm_piece_bytes(s, byte_decoder), false);
            }
            let merges = merge_table(&m.merges, &vocab)?;
            let unk_id = m.unk_token.as_ref().and_then(|u| vocab.get(u).copied());
            JsonModel::Bpe {
                bpe: Box::new(Bpe {
                    vocab: bvocab,
                    byte_ids: [None; 256],
                    merges,
                    ignore_merges: m.ignore_merges,
                    unk_id,
                }),
                byte_fallback: m.byte_fallback,
                fuse_unk: m.fuse_unk,
            }
        }
        (true, Vocab::List(list)) => {
            let count = u32::try_from(list.len())
                .ok()
                .filter(|&c| c > 0)
                .ok_or_else(|| err("Unigram vocabulary is empty or too large"))?;
            n = id_count(Some(count - 1), &j.added_tokens)?;
            parts = Parts::new(n);
            strs = fx_map(list.len());
            let mut scores = Vec::with_capacity(list.len());
            let mut min_score = f64::INFINITY;
            let mut max_piece_bytes = 1;
            for (i, (s, score)) in list.iter().enumerate() {
                let id = i as u32;
                if s.is_empty() {
                    return Err(err(format!("Unigram piece {i} is empty")));
                }
                if strs.insert(s.as_str().into(), id).is_some() {
                    return Err(err(format!("Unigram piece {i} ({s:?}) is defined twice")));
                }
                min_score = min_score.min(*score);
                max_piece_bytes = usize::max(max_piece_bytes, s.len());
                scores.push(*score);
                parts.set(id, s, spm_piece_bytes(s, byte_decoder), false);
            }
            if let Some(u) = m.unk_id {
                if u >= count {
                    return Err(err(format!("model.unk_id {u} is outside the vocabulary")));
                }
            }
            JsonModel::Unigram {
                vocab: strs.clone(),
                scores,
                min_score,
                unk_id: m.unk_id,
                byte_fallback: m.byte_fallback,
                max_piece_bytes,
            }
        }
        (true, Vocab::Map(_)) => {
            return Err(err(
                "model.vocab of a Unigram model must be a list of [piece, score]",
            ))
        }
        (false, Vocab::List(_)) => {
            return Err(err(
                "model.vocab of a BPE model must be a map of piece to id",
            ))
        }
    };
    let sj = SpmJson::new(
        j.normalizer.as_ref(),
        j.pre_tokenizer.as_ref(),
        model,
        &strs,
    )?;
    let mut added = Vec::with_capacity(j.added_tokens.len());
    for a in j.added_tokens {
        parts.set(
            a.id,
            &a.content,
            spm_piece_bytes(&a.content, byte_decoder),
            a.special,
        );
        added.push(AddedToken {
            content: a.content,
            id: a.id,
            single_word: a.single_word,
            lstrip: a.lstrip,
            rstrip: a.rstrip,
            normalized: a.normalized,
        });
    }
    let bos = j
        .post_processor
        .as_ref()
        .and_then(bos_from_post)
        .filter(|&b| (b as usize) < n);
    Ok(parts.finish(Core::SpmJson(Box::new(sj)), added, bos, strip))
}
