//! Loading a Hugging Face `tokenizer.json` (byte-level BPE).

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
use super::{Parts, Tokenizer};
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
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<Merge>,
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

pub(crate) fn load(bytes: &[u8]) -> Result<Tokenizer> {
    let j: TokJson =
        serde_json::from_slice(bytes).map_err(|e| err(format!("invalid tokenizer.json: {e}")))?;
    let m = j.model;
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
        return Err(err(
            "only byte-level BPE is supported (no ByteLevel pre-tokenizer found)",
        ));
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

    let max_vocab = m.vocab.values().copied().max();
    let max_added = j.added_tokens.iter().map(|a| a.id).max();
    // The id tables are sized by the highest id: it must stay near the number of tokens the
    // file defines (ids of real tokenizers are dense), so that a 5 KB file naming id 10^8
    // cannot make us allocate gigabytes.
    let count = m.vocab.len() + j.added_tokens.len();
    let n = match max_vocab.max(max_added) {
        Some(x) if (x as usize) < super::max_ids(count) => x as usize + 1,
        Some(x) => {
            return Err(err(format!(
                "token id {x} is too large for a vocabulary of {count} tokens (ids must be \
                 below {}: 2 × the token count + 65,536)",
                super::max_ids(count)
            )))
        }
        None => return Err(err("empty vocabulary")),
    };
    // one token per id: two vocabulary strings with the same id would make decoding depend
    // on the order of the JSON object
    {
        let mut owner: Vec<Option<&str>> = vec![None; n];
        for (s, &id) in &m.vocab {
            if let Some(prev) = owner[id as usize].replace(s) {
                let (a, b) = if prev < s.as_str() {
                    (prev, s.as_str())
                } else {
                    (s.as_str(), prev)
                };
                return Err(err(format!(
                    "`model.vocab`: id {id} is given to both {a:?} and {b:?}"
                )));
            }
        }
        let mut added_seen: Vec<Option<&str>> = vec![None; n];
        for a in &j.added_tokens {
            let i = a.id as usize;
            if let Some(prev) = added_seen[i].replace(&a.content) {
                if prev != a.content {
                    return Err(err(format!(
                        "`added_tokens`: id {} is given to both {prev:?} and {:?}",
                        a.id, a.content
                    )));
                }
            }
        }
    }
    let mut parts = Parts::new(n);
    let mut vocab = fx_map(m.vocab.len());
    for (s, &id) in &m.vocab {
        let raw = bytelevel::decode_str(s);
        // Tokens outside the byte-level alphabet cannot come out of pre-tokenization.
        if let Some(b) = &raw {
            vocab.insert(b.clone().into_boxed_slice(), id);
        }
        parts.set(id, s, raw.unwrap_or_else(|| s.as_bytes().to_vec()), false);
    }
    let mut byte_ids = [None; 256];
    for (b, slot) in byte_ids.iter_mut().enumerate() {
        *slot = vocab.get(&[b as u8][..]).copied();
    }
    let mut merges = fx_map(m.merges.len());
    let mut cat = String::new();
    for (rank, Merge(a, b)) in m.merges.iter().enumerate() {
        let ia = m.vocab.get(a);
        let ib = m.vocab.get(b);
        cat.clear();
        cat.push_str(a);
        cat.push_str(b);
        let inew = m.vocab.get(&cat);
        match (ia, ib, inew) {
            (Some(&x), Some(&y), Some(&z)) => {
                merges.insert(((x as u64) << 32) | y as u64, (rank as u32, z));
            }
            _ => {
                return Err(err(format!(
                    "merge {rank} ({a:?} {b:?}) uses a token missing from the vocabulary"
                )))
            }
        }
    }
    let unk_id = match &m.unk_token {
        Some(u) => m.vocab.get(u).copied(),
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
        vocab,
        byte_ids,
        merges,
        ignore_merges: m.ignore_merges,
        unk_id,
    };
    let pretok = PreTokenizer {
        steps,
        add_prefix_space,
    };
    Ok(parts.finish(bpe, pretok, added, bos))
}
