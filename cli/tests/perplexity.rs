//! `ferroq perplexity` against transformers: the tiny fixture models' perplexity computed the
//! llama-perplexity way by `tests/fixtures/perplexity/gen.py` (transformers 5.24.0, float32),
//! and the KL-divergence file round trip through the CLI.

mod support;

use ferroq::internals::model::{KvType, Model};
use ferroq::internals::perplexity::{perplexity, ChunkPlan, RunOptions};
use std::path::PathBuf;
use std::process::Command;

/// (fixture, PPL, ± of the final estimate) from gen.py: chunks of 16, 4 chunks, BOS = 1.
const REFERENCE: [(&str, f64, f64); 2] = [
    ("llama3-tiny", 374.20253423405256, 46.33501066494757),
    ("llama4-scout-tiny", 514.0583168780129, 53.63082197859922),
];
const N_CTX: usize = 16;
const N_CHUNK: usize = 4;
/// Relative agreement of the f32 conversion with transformers (logits agree to ~4e-4).
const MAX_REL_PPL_DIFF: f64 = 2e-4;

/// The ids of gen.py.
fn ids(vocab: usize, n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 37 + 11) % (vocab - 3) + 3) as u32)
        .collect()
}

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroq-ppl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(tag)
}

fn convert(name: &str, quant: &str) -> PathBuf {
    let out = tmp(&format!("{name}-{quant}.fqm"));
    support::convert(&support::fixture("models").join(name), &out, quant)
}

#[test]
fn perplexity_matches_transformers() {
    for (name, ppl_ref, err_ref) in REFERENCE {
        let model = Model::open(convert(name, "f32")).unwrap();
        let toks = ids(model.config.vocab_size, N_CTX * N_CHUNK + 5);
        let plan = ChunkPlan::new(toks.len(), N_CTX, None).unwrap();
        assert_eq!(plan.n_chunk, N_CHUNK);
        for batch in [N_CTX, 5] {
            let opt = RunOptions {
                batch,
                threads: 1,
                kv: KvType::F32,
                bos: Some(1),
            };
            let mut seen = 0;
            let s = perplexity(&model, &toks, &plan, &opt, |_, _| seen += 1).unwrap();
            assert_eq!((s.count, seen), (28, N_CHUNK));
            let (ppl, err) = (s.ppl(), s.ppl_err().unwrap());
            assert!(
                ((ppl - ppl_ref) / ppl_ref).abs() < MAX_REL_PPL_DIFF,
                "{name} batch {batch}: PPL {ppl} vs transformers {ppl_ref}"
            );
            assert!(((err - err_ref) / err_ref).abs() < 2.0 * MAX_REL_PPL_DIFF);
        }
    }
}

fn ferroq(args: &[&str]) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn cli_perplexity_and_kl_divergence() {
    let f32m = convert("llama3-tiny", "f32");
    let q4 = convert("llama3-tiny", "q4");
    let ids_file = tmp("ids.txt");
    // 12 chunks of 16: 84 scored tokens, enough for llama.cpp's uncertainties (> 10 values)
    let toks = ids(384, 16 * 12);
    std::fs::write(&ids_file, format!("{toks:?}")).unwrap();
    let base = tmp("base.kld");
    let (m, i, b) = (
        f32m.to_str().unwrap(),
        ids_file.to_str().unwrap(),
        base.to_str().unwrap(),
    );
    let p = ferroq(&["perplexity", "-m", m, "--tokens", i, "-c", "16", "--json"]);
    let saved = ferroq(&[
        "perplexity",
        "-m",
        m,
        "--tokens",
        i,
        "-c",
        "16",
        "--json",
        "--kld-base",
        b,
    ]);
    // the saving path sums the f32 NLLs of llama.cpp's file writer: equal up to rounding
    let (p0, p1) = (p["ppl"].as_f64().unwrap(), saved["ppl"].as_f64().unwrap());
    assert!(((p0 - p1) / p0).abs() < 1e-5, "{p0} vs {p1}");
    assert_eq!(
        (p["count"].as_u64(), p["chunks"].as_u64()),
        (Some(84), Some(12))
    );
    let nv = 384 + 4;
    assert_eq!(
        std::fs::metadata(&base).unwrap().len(),
        20 + 4 * 16 * 12 + 2 * nv * 7 * 12
    );
    // the same model against its own log-probabilities: KL ~ quantization of the file only
    let same = ferroq(&["perplexity", "-m", m, "--kld", b, "--json"]);
    assert!(same["kld"]["value"].as_f64().unwrap() < 1e-6, "{same}");
    assert_eq!(same["same_top"]["value"].as_f64(), Some(1.0));
    let rel = |a: f64, b: f64| ((a - b) / b).abs();
    let (pq, pb) = (
        same["ppl"]["value"].as_f64().unwrap(),
        same["ppl_base"]["value"].as_f64().unwrap(),
    );
    assert!(rel(pq, p0) < 1e-5 && rel(pb, pq) < 1e-4);
    // a 4-bit model differs measurably, and --chunks limits the comparison
    let q = ferroq(&[
        "perplexity",
        "-m",
        q4.to_str().unwrap(),
        "--kld",
        b,
        "--json",
    ]);
    let kl = q["kld"]["value"].as_f64().unwrap();
    assert!(kl > 1e-4 && kl < 1.0, "{q}");
    let q2 = ferroq(&[
        "perplexity",
        "-m",
        q4.to_str().unwrap(),
        "--kld",
        b,
        "--json",
        "--chunks",
        "2",
    ]);
    assert_eq!(q2["count"].as_u64(), Some(14));
    // a broken reference file is refused with its name
    std::fs::write(&ids_file, b"_logits_garbage").unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .args(["perplexity", "-m", m, "--kld", i])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ids.txt"));
}
