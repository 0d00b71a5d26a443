//! Accuracy cost of the f16 and int8 KV caches against transformers (float32), on the parity
//! fixtures converted at f32 (so the cache is the only approximation besides float rounding),
//! plus prefill vs decode and thread-count independence for each cache type.

mod support;

use ferroq::model::{KvType, Logits, Model, State};
use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: [&str; 3] = ["llama3-tiny", "llama4-scout-tiny", "llama4-maverick-tiny"];

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn convert_f32(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroq-kvtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}.fqm"));
    let st = Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .arg("convert")
        .arg(fixture_dir(name))
        .arg("-o")
        .arg(&out)
        .args(["--quant", "f32"])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

/// `input_ids` and `logits` of expected.safetensors.
fn expected(name: &str) -> (Vec<u32>, Vec<f32>) {
    let b = std::fs::read(fixture_dir(name).join("expected.safetensors")).unwrap();
    let (t, _) = support::read_safetensors(&b);
    let ids = t["input_ids"].i64().iter().map(|&v| v as u32).collect();
    (ids, t["logits"].f32())
}

fn run(model: &Model, ids: &[u32], kv: KvType, threads: usize, decode: bool) -> Vec<f32> {
    let v = model.config.vocab_size;
    let mut st = State::with_kv(model, ids.len(), ids.len(), true, threads, kv);
    if decode {
        let mut out = Vec::new();
        for &id in ids {
            model.forward(&mut st, &[id], Logits::All).unwrap();
            out.extend_from_slice(&st.logits()[..v]);
        }
        out
    } else {
        model.forward(&mut st, ids, Logits::All).unwrap();
        st.logits().to_vec()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn kv_cache_accuracy() {
    for name in FIXTURES {
        let path = convert_f32(name);
        let model = Model::open(&path).unwrap();
        let (ids, want) = expected(name);
        for (kv, budget) in [(KvType::F32, 1e-3), (KvType::F16, 2e-3), (KvType::Q8, 5e-2)] {
            let got = run(&model, &ids, kv, 1, false);
            let d = max_abs_diff(&got, &want);
            let dec = run(&model, &ids, kv, 1, true);
            let dd = max_abs_diff(&dec, &got);
            let t2 = run(&model, &ids, kv, 2, false);
            eprintln!("{name} kv {kv:?}: logits max|Δ| vs transformers {d:.3e}; decode vs prefill {dd:.3e}");
            assert!(d <= budget, "{name} kv {kv:?}: max|Δ| {d} > {budget}");
            assert!(dd <= 1e-3, "{name} kv {kv:?}: decode vs prefill {dd}");
            assert_eq!(got, t2, "{name} kv {kv:?}: thread count changed the logits");
        }
        std::fs::remove_file(path).ok();
    }
}

/// Logits of `ids` fed in pieces of the given lengths (one forward call each).
fn run_split(model: &Model, ids: &[u32], kv: KvType, threads: usize, parts: &[usize]) -> Vec<f32> {
    let mut st = State::with_kv(model, ids.len(), ids.len(), true, threads, kv);
    let mut out = Vec::new();
    let mut i = 0;
    for &len in parts {
        model
            .forward(&mut st, &ids[i..i + len], Logits::All)
            .unwrap();
        out.extend_from_slice(st.logits());
        i += len;
    }
    assert_eq!(i, ids.len());
    out
}

/// A prompt long enough for the blocked prefill attention to use several token blocks, several
/// 64-key tiles and (llama4: chunk 8) many chunk crossings, also when prefill starts mid-cache:
/// thread count changes nothing, and decode / split prefill agree with one prefill.
#[test]
fn long_prompt_blocked_attention() {
    for name in FIXTURES {
        let path = convert_f32(name);
        let model = Model::open(&path).unwrap();
        let (ids, _) = expected(name);
        let ids: Vec<u32> = ids.iter().cycle().take(150).copied().collect();
        for kv in [KvType::F32, KvType::F16, KvType::Q8] {
            let got = run(&model, &ids, kv, 1, false);
            let t2 = run(&model, &ids, kv, 2, false);
            assert_eq!(got, t2, "{name} kv {kv:?}: thread count changed the logits");
            let dec = run(&model, &ids, kv, 1, true);
            let dd = max_abs_diff(&dec, &got);
            let split = run_split(&model, &ids, kv, 2, &[37, 3, 70, 40]);
            let ds = max_abs_diff(&split, &got);
            eprintln!("{name} kv {kv:?} 150 tokens: decode vs prefill {dd:.3e}, split {ds:.3e}");
            assert!(dd <= 1e-3, "{name} kv {kv:?}: decode vs prefill {dd}");
            assert!(
                ds <= 1e-3,
                "{name} kv {kv:?}: split prefill vs prefill {ds}"
            );
        }
        std::fs::remove_file(path).ok();
    }
}
