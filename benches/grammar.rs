//! Structured output: the cost of a token mask (`ferroq::internals::grammar`) on real vocabularies.
//!
//!     cargo bench --bench grammar
//!
//! `walk/*`: one mask computed from scratch (the trie walk) in a given state; `cached`: the
//! same state again (a cache hit); `per_token/*`: a whole JSON answer replayed token by token
//! as a generation would (mask, apply to the logits, accept the token), the cost per token.
//! `index/*`: building the per-tokenizer trie (once per engine).

use std::io::Read;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferroq::internals::grammar::{apply_mask, Grammar, GrammarMatcher, TokenIndex};
use ferroq::internals::tokenizer::Tokenizer;

fn tokenizer(name: &str) -> Tokenizer {
    let full = format!(
        "{}/tests/fixtures/tokenizers/{name}/tokenizer.json.gz",
        env!("CARGO_MANIFEST_DIR")
    );
    let raw = std::fs::read(&full).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .unwrap();
    Tokenizer::from_hf_json(&out).unwrap()
}

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "nick": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]}},
    "address": {"type": "object", "properties": {"street": {"type": "string"},
        "zip": {"type": ["string", "null"]}}, "required": ["street", "zip"],
        "additionalProperties": false}},
    "required": ["name", "age", "nick", "tags", "address"], "additionalProperties": false}"#;

const ANSWER: &str = r#"{"name": "Ada Lovelace, Countess of Lovelace", "age": 36, "nick": "the enchantress of numbers", "tags": ["a", "ccc"], "address": {"street": "12 St James's Square, London", "zip": null}}"#;

fn bench(c: &mut Criterion) {
    for name in ["smollm2", "llama3"] {
        let tok = tokenizer(name);
        let stops: Vec<u32> = ["<|im_end|>", "<|eot_id|>", "<|endoftext|>"]
            .iter()
            .filter_map(|s| tok.token_to_id(s))
            .collect();
        c.bench_function(&format!("index/{name}"), |b| {
            b.iter(|| TokenIndex::new(&tok, &stops))
        });
        let ix = Arc::new(TokenIndex::new(&tok, &stops));
        let g = Arc::new(Grammar::from_schema_str(SCHEMA).unwrap());
        for (state, text) in [
            ("start", ""),
            ("after_colon", r#"{"name": "#),
            ("in_string", r#"{"name": "Ada Lo"#),
            (
                "in_string_maxlength",
                r#"{"name": "Ada", "age": 36, "nick": "the"#,
            ),
            ("after_number", r#"{"name": "Ada", "age": 36"#),
            (
                "in_enum",
                r#"{"name": "Ada", "age": 36, "nick": "x", "tags": ["#,
            ),
        ] {
            let mut m = GrammarMatcher::new(g.clone(), ix.clone());
            assert!(m.accept_bytes(text.as_bytes()), "{text}");
            c.bench_function(&format!("walk/{name}/{state}"), |b| {
                b.iter(|| {
                    m.clear_cache();
                    m.mask()[0]
                })
            });
        }
        let mut m = GrammarMatcher::new(g.clone(), ix.clone());
        m.accept_bytes(br#"{"name": "Ada Lo"#);
        m.mask();
        c.bench_function(&format!("cached/{name}"), |b| {
            b.iter(|| {
                m.accept_bytes(b"");
                m.mask()[0]
            })
        });
        let ids = tok.encode(ANSWER, false);
        let mut logits = vec![0.0f32; ix.vocab()];
        let mut group = c.benchmark_group(format!("per_token/{name}"));
        group.throughput(Throughput::Elements(ids.len() as u64));
        group.bench_function("answer", |b| {
            b.iter(|| {
                let mut m = GrammarMatcher::new(g.clone(), ix.clone());
                for &id in &ids {
                    apply_mask(&mut logits, m.mask());
                    m.accept_token(id).unwrap();
                }
                m.can_end()
            })
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
