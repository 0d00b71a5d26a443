//! Tokenizer encoding speed on the test corpus (tests/fixtures/tokenizers/corpus.txt.gz).
//! Compare with Hugging Face `tokenizers` using benches/hf_tokenizer_bench.py (same corpus).
//!
//!     cargo bench --bench tokenizer

use std::io::Read;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferroq::internals::tokenizer::Tokenizer;

fn fixture(path: &str) -> Vec<u8> {
    let full = format!(
        "{}/tests/fixtures/tokenizers/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    let raw = std::fs::read(&full).unwrap();
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&raw[..])
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn raw(path: &str) -> Vec<u8> {
    let full = format!(
        "{}/tests/fixtures/tokenizers/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(full).unwrap()
}

fn bench(c: &mut Criterion) {
    let corpus = String::from_utf8(fixture("corpus.txt.gz")).unwrap();
    let mut g = c.benchmark_group("encode_corpus");
    g.throughput(Throughput::Bytes(corpus.len() as u64));
    for (name, tok) in [
        (
            "smollm2",
            Tokenizer::from_hf_json(&fixture("smollm2/tokenizer.json.gz")),
        ),
        (
            "llama3",
            Tokenizer::from_hf_json(&fixture("llama3/tokenizer.json.gz")),
        ),
        (
            "llama4",
            Tokenizer::from_hf_json(&fixture("llama4/tokenizer.json.gz")),
        ),
        (
            "llama4_model",
            Tokenizer::from_tiktoken(&fixture("llama4/tokenizer.model.gz")),
        ),
        // SentencePiece: Mistral 7B's tokenizer.model and its legacy tokenizer.json (no
        // pre-tokenizer: each line is one word for the merges), a small Unigram model.
        (
            "mistral_model",
            Tokenizer::from_sentencepiece(&fixture("spm-mistral/tokenizer.model.gz")),
        ),
        (
            "mistral_json",
            Tokenizer::from_hf_json(&fixture("spm-mistral/tokenizer.json.gz")),
        ),
        (
            "unigram_model",
            Tokenizer::from_sentencepiece(&raw("spm-unigram/tokenizer.model")),
        ),
    ] {
        let tok = tok.unwrap();
        g.bench_function(name, |b| {
            b.iter(|| tok.encode(std::hint::black_box(&corpus), false))
        });
    }
    g.finish();
    let tok = Tokenizer::from_hf_json(&fixture("llama4/tokenizer.json.gz")).unwrap();
    let ids = tok.encode(&corpus, false);
    c.bench_function("decode_corpus/llama4", |b| {
        b.iter(|| tok.decode(std::hint::black_box(&ids), false))
    });
    let mut g = c.benchmark_group("load");
    g.sample_size(10);
    let j = fixture("llama4/tokenizer.json.gz");
    g.bench_function("llama4_tokenizer_json", |b| {
        b.iter(|| Tokenizer::from_hf_json(&j).unwrap())
    });
    let m = fixture("llama4/tokenizer.model.gz");
    g.bench_function("llama4_tokenizer_model", |b| {
        b.iter(|| Tokenizer::from_tiktoken(&m).unwrap())
    });
    let m = fixture("spm-mistral/tokenizer.model.gz");
    g.bench_function("mistral_tokenizer_model", |b| {
        b.iter(|| Tokenizer::from_sentencepiece(&m).unwrap())
    });
    let j = fixture("spm-mistral/tokenizer.json.gz");
    g.bench_function("mistral_tokenizer_json", |b| {
        b.iter(|| Tokenizer::from_hf_json(&j).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
