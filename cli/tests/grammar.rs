//! Structured output (`ferroq::internals::grammar`) on real tokenizers: token masks equal a brute-force
//! check of every token of the vocabulary, and random generations under many schemas always
//! parse and validate (or, cut by the token budget, are a valid prefix).

mod support;

use std::sync::Arc;

use ferroq::internals::grammar::{validate, Grammar, GrammarMatcher, Json, TokenIndex};
use ferroq::internals::sampling::{Rng, Sampler, SamplerConfig};
use ferroq::internals::tokenizer::Tokenizer;

fn tokenizer(name: &str) -> Tokenizer {
    Tokenizer::from_hf_json(&support::read_gz(&format!(
        "tokenizers/{name}/tokenizer.json.gz"
    )))
    .unwrap()
}

fn stop_ids(t: &Tokenizer) -> Vec<u32> {
    [
        "<|im_end|>",
        "<|endoftext|>",
        "<|eot_id|>",
        "<|end_of_text|>",
    ]
    .iter()
    .filter_map(|s| t.token_to_id(s))
    .collect()
}

/// Schemas real clients send: nested objects, arrays, enums, unions, refs, lengths.
const SCHEMAS: &[&str] = &[
    r#"{"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
        "email": {"type": "string", "format": "email"}}, "required": ["name", "age"],
        "additionalProperties": false}"#,
    r#"{"type": "object", "properties": {"city": {"type": "string", "description": "City"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}}, "required": ["city", "unit", "days"],
        "additionalProperties": false}"#,
    r#"{"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"},
        "done": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 12}},
        "required": ["id", "done", "note"], "additionalProperties": false},
        "minItems": 1, "maxItems": 3}"#,
    r##"{"$defs": {"step": {"type": "object", "properties": {"explanation": {"type": "string",
        "maxLength": 30}, "output": {"type": "string", "maxLength": 10}},
        "required": ["explanation", "output"], "additionalProperties": false}},
        "type": "object", "properties": {"steps": {"type": "array", "items": {"$ref": "#/$defs/step"},
        "maxItems": 3}, "final_answer": {"type": "string", "maxLength": 20}},
        "required": ["steps", "final_answer"], "additionalProperties": false}"##,
    r##"{"definitions": {"node": {"type": "object", "properties": {"v": {"type": "number"},
        "kids": {"type": "array", "items": {"$ref": "#/definitions/node"}, "maxItems": 2}},
        "required": ["v", "kids"], "additionalProperties": false}}, "$ref": "#/definitions/node"}"##,
    r#"{"anyOf": [{"type": "object", "properties": {"type": {"const": "circle"},
        "r": {"type": "number"}}, "required": ["type", "r"], "additionalProperties": false},
        {"type": "object", "properties": {"type": {"const": "rect"}, "w": {"type": "number"},
        "h": {"type": "number"}}, "required": ["type", "w", "h"], "additionalProperties": false}]}"#,
    r#"{"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
        "minLength": 1, "maxLength": 8}, "minItems": 2, "maxItems": 4},
        "score": {"type": "number"}, "flag": {"type": "boolean"}, "nothing": {"type": "null"}},
        "required": ["tags"], "additionalProperties": false}"#,
    r#"{"type": "object", "additionalProperties": {"type": "integer"}}"#,
    r#"{"type": "object", "properties": {"answer": {"enum": ["yes", "no", 1, 2.5, null, true,
        {"k": [1, "x"]}]}, "why": {"const": "because"}}, "required": ["answer", "why"],
        "additionalProperties": false}"#,
    r#"{"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type":
        "object", "properties": {"c": {"type": "array", "items": {"type": "array", "items":
        {"type": "integer"}, "maxItems": 3}, "maxItems": 3}}, "required": ["c"],
        "additionalProperties": false}}, "required": ["b"], "additionalProperties": false}},
        "required": ["a"], "additionalProperties": false}"#,
    r#"{"type": "object", "properties": {"x": {"type": "string", "minLength": 3, "maxLength": 3},
        "y": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 4}]}},
        "required": ["x", "y"], "additionalProperties": false}"#,
    r#"{"type": "object", "properties": {"id": {"type": "string"}, "meta": {"type": "object"}},
        "required": ["id", "meta"]}"#,
    r#"{"type": "object"}"#,
];

/// Picks allowed tokens at random, structure favoured so that values finish. `sampler`:
/// through [`Sampler`] with random logits and the mask applied (`apply_mask`), as a
/// generation does; otherwise straight from the mask's bits (faster).
struct Walker {
    rng: Rng,
    sampler: Option<Sampler>,
    logits: Vec<f32>,
    structural: Vec<bool>,
}

impl Walker {
    fn new(ix: &TokenIndex, seed: u64, sampler: bool) -> Walker {
        let structural = (0..ix.vocab() as u32)
            .map(|id| {
                let b = ix.token_bytes(id);
                !b.is_empty()
                    && b.iter()
                        .all(|c| b"{}[]\",:0123456789 ".contains(c) || c.is_ascii_lowercase())
                    && b.iter().any(|c| b"}]\",".contains(c))
            })
            .collect();
        Walker {
            rng: Rng::new(seed),
            sampler: sampler.then(|| {
                Sampler::new(
                    SamplerConfig {
                        temperature: 1.0,
                        seed,
                        ..SamplerConfig::default()
                    },
                    ix.vocab(),
                )
            }),
            logits: vec![0.0; ix.vocab()],
            structural,
        }
    }

    fn next(&mut self, m: &mut GrammarMatcher) -> Option<u32> {
        if !m.any_allowed() {
            return None;
        }
        let stops = m.index().stop_ids().to_vec();
        if let Some(sampler) = self.sampler.as_mut() {
            for (i, l) in self.logits.iter_mut().enumerate() {
                let u = self.rng.next_f64() as f32;
                *l = 2.0 * u + if self.structural[i] { 5.0 } else { 0.0 };
            }
            for &s in &stops {
                self.logits[s as usize] += 12.0;
            }
            return Some(sampler.sample_masked(&mut self.logits, &[], Some(m.mask())));
        }
        let mask = m.mask();
        let weight = |id: u32| {
            if stops.contains(&id) {
                1e9
            } else if self.structural[id as usize] {
                150.0
            } else {
                1.0
            }
        };
        let ids = || {
            mask.iter().enumerate().flat_map(|(w, &bits)| {
                (0..64u32)
                    .filter(move |j| bits >> j & 1 == 1)
                    .map(move |j| w as u32 * 64 + j)
            })
        };
        let total: f64 = ids().map(weight).sum();
        let mut r = self.rng.next_f64() * total;
        let mut last = None;
        for id in ids() {
            last = Some(id);
            r -= weight(id);
            if r < 0.0 {
                break;
            }
        }
        last
    }
}

/// Generate up to `budget` tokens under `g`; returns the text and whether it completed.
/// Every `check_every` steps (0 = never) the mask is compared with brute force.
fn walk(
    g: &Arc<Grammar>,
    ix: &Arc<TokenIndex>,
    tok: &Tokenizer,
    seed: u64,
    budget: usize,
    check_every: usize,
    sampler: bool,
) -> (String, bool) {
    let mut m = GrammarMatcher::new(g.clone(), ix.clone());
    let mut w = Walker::new(ix, seed, sampler);
    let mut ids = Vec::new();
    let mut complete = false;
    for step in 0..budget {
        if check_every > 0 && step % check_every == 0 {
            brute_force_check(&mut m, ix, tok);
        }
        let Some(id) = w.next(&mut m) else {
            panic!("dead end after {:?}", tok.decode(&ids, true));
        };
        assert!(m.mask()[id as usize / 64] >> (id % 64) & 1 == 1);
        m.accept_token(id).unwrap();
        if ix.stop_ids().contains(&id) {
            complete = true;
            break;
        }
        ids.push(id);
    }
    (tok.decode(&ids, true), complete)
}

/// The mask from the trie equals the brute-force one: each token's bytes fed to the matcher.
fn brute_force_check(m: &mut GrammarMatcher, ix: &TokenIndex, tok: &Tokenizer) {
    let mask = m.mask().to_vec();
    let end = m.can_end();
    for id in 0..ix.vocab() as u32 {
        let want = if ix.stop_ids().contains(&id) {
            end
        } else {
            let b = ix.token_bytes(id);
            !b.is_empty() && !tok.is_special(id) && m.allows_bytes(b)
        };
        let got = mask[id as usize / 64] >> (id % 64) & 1 == 1;
        assert_eq!(
            got,
            want,
            "token {id} {:?}",
            String::from_utf8_lossy(ix.token_bytes(id))
        );
    }
}

#[test]
fn random_generations_parse_and_validate() {
    let tok = tokenizer("smollm2");
    let ix = Arc::new(TokenIndex::new(&tok, &stop_ids(&tok)));
    let (mut done, mut total) = (0, 0);
    for (si, s) in SCHEMAS.iter().enumerate() {
        let schema: Json = serde_json::from_str(s).unwrap();
        let g = Arc::new(Grammar::from_schema_str(s).unwrap());
        for seed in 0..6u64 {
            let (text, complete) = walk(&g, &ix, &tok, seed * 31 + si as u64, 300, 0, false);
            if seed == 0 {
                eprintln!("schema {si}: {text}");
            }
            total += 1;
            if complete {
                done += 1;
                let v: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("schema {si}: {e}: {text}"));
                validate(&schema, &v).unwrap_or_else(|e| panic!("schema {si}: {e}: {text}"));
            } else {
                // cut by the budget: still a prefix of some valid value
                let mut m = GrammarMatcher::new(g.clone(), ix.clone());
                assert!(m.allows_bytes(text.as_bytes()), "{text}");
            }
        }
    }
    eprintln!("{done} of {total} generations finished within the budget");
    assert!(done * 4 >= total * 3, "only {done} of {total} finished");
}

#[test]
fn json_object_generations_parse() {
    let tok = tokenizer("smollm2");
    let ix = Arc::new(TokenIndex::new(&tok, &stop_ids(&tok)));
    let g = Arc::new(Grammar::json_object());
    let mut done = 0;
    for seed in 0..8 {
        let (text, complete) = walk(&g, &ix, &tok, 1000 + seed, 300, 0, true);
        if complete {
            done += 1;
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(v.is_object(), "{text}");
        }
    }
    assert!(done >= 4, "{done} of 8 finished");
}

#[test]
fn masks_equal_brute_force_smollm2() {
    let tok = tokenizer("smollm2");
    let ix = Arc::new(TokenIndex::new(&tok, &stop_ids(&tok)));
    for (i, s) in [SCHEMAS[0], SCHEMAS[2], SCHEMAS[5], SCHEMAS[8], SCHEMAS[10]]
        .iter()
        .enumerate()
    {
        let g = Arc::new(Grammar::from_schema_str(s).unwrap());
        walk(&g, &ix, &tok, 7 + i as u64, 40, 3, false);
    }
    walk(
        &Arc::new(Grammar::json_object()),
        &ix,
        &tok,
        3,
        40,
        4,
        false,
    );
    // states chosen by hand: open strings with and without room, escapes, numbers, keys
    for (si, prefix) in [
        (0, r#"{"name": "x"#),
        (0, r#"{"name": "x\"#),
        (0, "{\"name\": \"\u{e9}"),
        (2, r#"[{"id": 1, "done": true, "note": "abcdefghij"#),
        (2, r#"[{"id": 1, "done": true, "note": "abcdefghijkl"#),
        (2, r#"[{"id": 1, "done": true, "note": "#),
        (6, r#"{"tags": [""#),
        (6, r#"{"tags": ["a", "b"], "score": -1.5"#),
        (8, r#"{"answer": "#),
        (0, r#"{"name": "x", "#),
    ] {
        let g = Arc::new(Grammar::from_schema_str(SCHEMAS[si]).unwrap());
        let mut m = GrammarMatcher::new(g, ix.clone());
        assert!(m.accept_bytes(prefix.as_bytes()), "{prefix}");
        brute_force_check(&mut m, &ix, &tok);
    }
}

#[test]
fn masks_equal_brute_force_llama3() {
    let tok = tokenizer("llama3");
    let ix = Arc::new(TokenIndex::new(&tok, &stop_ids(&tok)));
    let g = Arc::new(Grammar::from_schema_str(SCHEMAS[3]).unwrap());
    walk(&g, &ix, &tok, 11, 24, 6, false);
}

#[test]
fn special_and_stop_tokens_only_where_allowed() {
    let tok = tokenizer("smollm2");
    let stops = stop_ids(&tok);
    let ix = Arc::new(TokenIndex::new(&tok, &stops));
    let mut m = GrammarMatcher::new(Arc::new(Grammar::json_object()), ix.clone());
    let bit = |mask: &[u64], id: u32| mask[id as usize / 64] >> (id % 64) & 1 == 1;
    // at the start only tokens beginning with `{`
    let mask = m.mask().to_vec();
    for id in 0..ix.vocab() as u32 {
        if bit(&mask, id) {
            assert!(ix.token_bytes(id).starts_with(b"{"), "{id}");
        }
    }
    assert!(stops.iter().all(|&s| !bit(&mask, s)));
    assert!(m.allows_bytes(b"{\"a\": 1"));
    m.accept_bytes(b"{\"a\": 1}");
    assert!(m.can_end() && m.is_done());
    let mask = m.mask().to_vec();
    let allowed: Vec<u32> = (0..ix.vocab() as u32).filter(|&i| bit(&mask, i)).collect();
    assert_eq!(allowed, {
        let mut s = stops.clone();
        s.sort();
        s
    });
    // a stop token in the middle of a value is refused
    let mut m = GrammarMatcher::new(Arc::new(Grammar::json_object()), ix);
    m.accept_bytes(b"{");
    assert!(m.accept_token(stops[0]).is_err());
}

/// The real SmolLM2-135M-Instruct (q8) answering under a schema: greedy output is a complete,
/// valid value; a budget too small for it ends with `MaxTokens` and a valid prefix.
#[test]
fn model_output_follows_the_schema() {
    use ferroq::internals::chat::Message;
    use ferroq::internals::engine::{Engine, GenOptions, Session, SessionOptions, StopReason};
    let Some(path) = support::smollm2_fqm(
        "model_output_follows_the_schema",
        std::path::Path::new(env!("CARGO_BIN_EXE_ferroq")),
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")),
        "q8",
    ) else {
        return;
    };
    let engine = Arc::new(Engine::open(&path).unwrap());
    let schema_text = r#"{"type": "object", "properties": {"name": {"type": "string",
        "maxLength": 40}, "age": {"type": "integer"}, "hobbies": {"type": "array",
        "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
        "required": ["name", "age", "hobbies"], "additionalProperties": false}"#;
    let schema: Json = serde_json::from_str(schema_text).unwrap();
    let g = Arc::new(Grammar::from_schema_str(schema_text).unwrap());
    let prompt = engine
        .encode_chat(
            &[Message::new(
                "user",
                "Describe a person as JSON with their name, age and hobbies.",
            )],
            true,
        )
        .unwrap();
    let opts = SessionOptions {
        ctx: 512,
        batch: 32,
        threads: 1,
        kv: None,
    };
    let mut s = Session::new(engine.clone(), &opts).unwrap();
    let gen = GenOptions {
        max_tokens: 160,
        ..GenOptions::default()
    };
    let out = s
        .generate_constrained(&prompt, &gen, Some(&g), &mut |_, _| true)
        .unwrap();
    eprintln!("{:?}: {}", out.stop, out.text);
    assert_eq!(out.stop, StopReason::StopToken, "{}", out.text);
    let v: serde_json::Value = serde_json::from_str(&out.text).unwrap();
    validate(&schema, &v).unwrap();
    // cut short: incomplete, but a prefix of a valid value
    let short = GenOptions {
        max_tokens: 5,
        ..GenOptions::default()
    };
    let cut = s
        .generate_constrained(&prompt, &short, Some(&g), &mut |_, _| true)
        .unwrap();
    assert_eq!(cut.stop, StopReason::MaxTokens);
    assert_eq!(cut.ids, out.ids[..5]);
    let mut m = GrammarMatcher::new(g, engine.token_index());
    assert!(m.accept_bytes(cut.text.as_bytes()) && !m.can_end());
}
