//! `ferroq imatrix` and `ferroq convert --imatrix`: the file round trip and its refusal of bad
//! bytes, the statistics against a direct computation, experts counted per expert, the refusal
//! of an imatrix made for another model, and a conversion with an imatrix that differs from
//! one without and is not worse where the imatrix says it matters.

use ferroq::internals::format::DType;
use ferroq::internals::model::{tensor_table, KvType, Logits, Model, State};
use ferroq::internals::perplexity::{ChunkPlan, RunOptions};
use ferroq_convert::imatrix::{collect, Entry, Imatrix};

mod support;
use std::path::{Path, PathBuf};
use std::process::Command;

const N_CTX: usize = 16;
const N_CHUNK: usize = 6;

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroq-imatrix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(tag)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .join("tests/fixtures/models")
        .join(name)
}

fn ferroq(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn convert(name: &str, quant: &str, extra: &[&str], tag: &str) -> PathBuf {
    let out = tmp(&format!("{name}-{quant}{tag}.fqm"));
    let src = fixture(name);
    let mut args = vec![
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quant",
        quant,
    ];
    args.extend_from_slice(extra);
    ok(ferroq(&args));
    out
}

/// A deterministic id sequence over `3..vocab` (`seed` picks the stride).
fn ids(vocab: usize, n: usize, seed: usize) -> Vec<u32> {
    let mut x = seed as u64 * 0x9E37_79B9 + 1;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as usize % (vocab - 3) + 3) as u32
        })
        .collect()
}

fn write_ids(path: &Path, ids: &[u32]) {
    let s: Vec<String> = ids.iter().map(u32::to_string).collect();
    std::fs::write(path, s.join(" ")).unwrap();
}

/// The CLI's imatrix of fixture `name` (collected on its f32 conversion), in files of the
/// calling test's own (`tag`): tests run in parallel and must not write one path.
fn make_imatrix(name: &str, tag: &str) -> (PathBuf, PathBuf) {
    let f32m = convert(name, "f32", &[], tag);
    let vocab = Model::open(&f32m).unwrap().config.vocab_size;
    let toks = tmp(&format!("{name}{tag}-calib.txt"));
    write_ids(&toks, &ids(vocab, N_CTX * N_CHUNK, 1));
    let im = tmp(&format!("{name}{tag}.imatrix"));
    let c = N_CTX.to_string();
    let out = ok(ferroq(&[
        "imatrix",
        "-m",
        f32m.to_str().unwrap(),
        "--tokens",
        toks.to_str().unwrap(),
        "-o",
        im.to_str().unwrap(),
        "-c",
        &c,
    ]));
    assert!(out.contains("wrote"), "{out}");
    (f32m, im)
}

#[test]
fn file_round_trip_and_bad_bytes() {
    let im = Imatrix {
        entries: vec![
            Entry {
                tensors: vec!["layers.0.wq".into(), "layers.0.wk".into()],
                rows: 12,
                values: vec![0.5, 1.25, 0.0, 3.0],
            },
            Entry {
                tensors: vec!["layers.0.experts.3.down".into()],
                rows: u64::MAX,
                values: vec![f32::MIN_POSITIVE, 7.0],
            },
        ],
        n_chunks: 3,
        n_ctx: 512,
        dataset: "emma.txt".into(),
        model: "tiny".into(),
    };
    let p = tmp("roundtrip.imatrix");
    im.write(&p).unwrap();
    assert_eq!(Imatrix::read(&p).unwrap(), im);
    let b = im.to_bytes();
    // every truncation and every single flipped bit of a few bytes is refused, never a panic
    for n in 0..b.len() {
        assert!(
            Imatrix::from_bytes(&b[..n], &p).is_err(),
            "truncated to {n}"
        );
    }
    for i in 0..b.len() {
        let mut c = b.clone();
        c[i] ^= 1 << (i % 8);
        assert!(Imatrix::from_bytes(&c, &p).is_err(), "byte {i} flipped");
    }
    let e = Imatrix::from_bytes(b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0", &p).unwrap_err();
    assert!(e.to_string().contains("not a ferroq imatrix"), "{e}");
}

#[test]
fn statistics_match_a_direct_computation_and_experts_count_per_expert() {
    let f32m = convert("llama4-scout-tiny", "f32", &[], "-lib");
    let model = Model::open(&f32m).unwrap();
    let c = model.config.clone();
    let toks = ids(c.vocab_size, N_CTX * N_CHUNK, 1);
    let plan = ChunkPlan::new(toks.len(), N_CTX, None).unwrap();
    let opt = RunOptions {
        batch: 5,
        threads: 1,
        kv: KvType::F32,
        bos: Some(1),
    };
    let mut chunks = 0;
    let im = collect(&model, &toks, &plan, &opt, |_, _| chunks += 1).unwrap();
    assert_eq!(chunks, N_CHUNK);
    let n = (N_CTX * N_CHUNK) as u64;
    let find = |t: &str| im.entries.iter().find(|e| e.tensors[0] == t);
    // layer 0's attention input: rmsnorm(embedding) · γ, computed here directly
    let q = find("layers.0.wq").expect("layers.0.wq");
    assert_eq!(q.tensors, ["layers.0.wq", "layers.0.wk", "layers.0.wv"]);
    assert_eq!(q.rows, n);
    let emb = model.file.tensor("tok_embeddings").unwrap().f32s().unwrap();
    let g = model
        .file
        .tensor("layers.0.attn_norm")
        .unwrap()
        .f32s()
        .unwrap();
    let h = c.hidden_size;
    let mut want = vec![0f64; h];
    for (i, &t) in toks.iter().enumerate() {
        let t = if i % N_CTX == 0 { 1 } else { t as usize };
        let x = &emb[t * h..(t + 1) * h];
        let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / h as f64;
        let r = 1.0 / (ms + c.rms_norm_eps as f64).sqrt();
        for (w, (&v, &gk)) in want.iter_mut().zip(x.iter().zip(g)) {
            *w += (v as f64 * r * gk as f64).powi(2) / n as f64;
        }
    }
    for (col, (&got, &w)) in q.values.iter().zip(&want).enumerate() {
        assert!(
            (got as f64 - w).abs() <= 1e-4 * w.max(1e-6),
            "column {col}: {got} vs {w}"
        );
    }
    // every layer: attention, shared expert, routed experts counted over their tokens
    for l in 0..c.num_layers {
        for t in ["wq", "wo", "shared_gate", "shared_down"] {
            assert_eq!(find(&format!("layers.{l}.{t}")).unwrap().rows, n, "{l} {t}");
        }
        let mut routed = (0, 0);
        for e in 0..c.num_experts {
            let gu = find(&format!("layers.{l}.experts.{e}.gate"));
            let d = find(&format!("layers.{l}.experts.{e}.down"));
            if let Some(gu) = gu {
                assert_eq!(
                    gu.tensors,
                    [
                        format!("layers.{l}.experts.{e}.gate"),
                        format!("layers.{l}.experts.{e}.up")
                    ]
                );
                routed.0 += gu.rows;
                assert_eq!(gu.values.len(), h);
            }
            routed.1 += d.map_or(0, |d| d.rows);
        }
        let pairs = n * c.num_experts_per_tok as u64;
        assert_eq!(routed, (pairs, pairs), "layer {l}");
    }
    assert_eq!(find("output").unwrap().rows, n);
    // and the file round trip of a collected one
    let p = tmp("collected.imatrix");
    im.write(&p).unwrap();
    assert_eq!(Imatrix::read(&p).unwrap(), im);
}

#[test]
fn imatrix_of_another_model_is_refused_naming_the_tensor() {
    let (_, im) = make_imatrix("llama4-scout-tiny", "-refused");
    let src = fixture("llama3-tiny");
    let out = tmp("refused.fqm");
    let r = ferroq(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--imatrix",
        im.to_str().unwrap(),
    ]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("layers.0.") && err.contains("imatrix"),
        "{err}"
    );
    assert!(!out.exists());
    // same tensor names, wrong column count
    let bad = Imatrix {
        entries: vec![Entry {
            tensors: vec!["layers.1.wo".into()],
            rows: 10,
            values: vec![1.0; 32],
        }],
        ..Imatrix::default()
    };
    let p = tmp("wrong-cols.imatrix");
    bad.write(&p).unwrap();
    let r = ferroq(&[
        "convert",
        src.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--imatrix",
        p.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("layers.1.wo") && err.contains("32 columns"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Σ over the 4-bit matrices of Σ_c a_c Σ_r (w − ŵ)²: the output error the imatrix predicts.
fn weighted_error(q: &Model, f: &Model, im: &Imatrix) -> f64 {
    let mut s = 0.0;
    for spec in tensor_table(&q.config) {
        let Some(e) = im.entries.iter().find(|e| e.tensors.contains(&spec.name)) else {
            continue;
        };
        let t = q.file.tensor(&spec.name).unwrap();
        let (rows, cols) = (spec.shape[0], spec.shape[1]);
        let w = f.file.tensor(&spec.name).unwrap().f32s().unwrap();
        let mut row = vec![0f32; cols];
        for r in 0..rows {
            match t.info.dtype {
                DType::Q4x8 => ferroq::internals::kernels::scalar::dequantize_row_q4x8(
                    t.q4x8().unwrap(),
                    r,
                    cols,
                    &mut row,
                ),
                _ => continue,
            }
            for c in 0..cols {
                s += e.values[c] as f64 * ((row[c] - w[r * cols + c]) as f64).powi(2);
            }
        }
    }
    s
}

/// Mean KL(f32 ‖ q) of the next-token distributions over `toks` (chunks of N_CTX).
fn mean_kl(f: &Model, q: &Model, toks: &[u32]) -> f64 {
    let v = f.config.vocab_size;
    let (mut sf, mut sq) = (
        State::new(f, N_CTX, N_CTX, true),
        State::new(q, N_CTX, N_CTX, true),
    );
    let (mut kl, mut n) = (0.0, 0);
    for chunk in toks.chunks_exact(N_CTX) {
        sf.truncate(0);
        sq.truncate(0);
        f.forward(&mut sf, chunk, Logits::All).unwrap();
        q.forward(&mut sq, chunk, Logits::All).unwrap();
        for (a, b) in sf.logits().chunks_exact(v).zip(sq.logits().chunks_exact(v)) {
            let lse = |x: &[f32]| {
                let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
            };
            let (la, lb) = (lse(a), lse(b));
            kl += a
                .iter()
                .zip(b)
                .map(|(&x, &y)| {
                    let pa = x as f64 - la;
                    pa.exp() * (pa - (y as f64 - lb))
                })
                .sum::<f64>();
            n += 1;
        }
    }
    kl / n as f64
}

#[test]
fn conversion_with_an_imatrix_differs_and_is_not_worse() {
    let name = "llama4-scout-tiny";
    let (f32m, im) = make_imatrix(name, "-differs");
    let plain = convert(name, "q4", &[], "-plain");
    let with = convert(name, "q4", &["--imatrix", im.to_str().unwrap()], "-im");
    assert_ne!(
        std::fs::read(&plain).unwrap(),
        std::fs::read(&with).unwrap()
    );
    let (f, p, w) = (
        Model::open(&f32m).unwrap(),
        Model::open(&plain).unwrap(),
        Model::open(&with).unwrap(),
    );
    let recipe = &w.file.meta()["recipe"]["imatrix"];
    assert_eq!(recipe["chunks"], N_CHUNK, "{recipe}");
    let imx = Imatrix::read(&im).unwrap();
    // the error the imatrix weighs drops: it is what the weighted scale search minimises
    let (ep, ew) = (weighted_error(&p, &f, &imx), weighted_error(&w, &f, &imx));
    assert!(
        ew < ep,
        "activation-weighted error {ew} with the imatrix, {ep} without"
    );
    // and the model's output on other tokens is not worse
    let held_out = ids(f.config.vocab_size, N_CTX * 8, 2);
    let (kp, kw) = (mean_kl(&f, &p, &held_out), mean_kl(&f, &w, &held_out));
    eprintln!("weighted error {ep:.4e} → {ew:.4e}; mean KL {kp:.5} → {kw:.5}");
    assert!(
        kw <= kp * 1.02,
        "mean KL {kw} with the imatrix, {kp} without"
    );
}

/// The GGUF name of `.fqm` matrix `name` and, for a routed expert, its expert index.
fn gguf_of(name: &str) -> (String, Option<usize>) {
    use ferroq::internals::model::tensors::{LayerTensor as L, TensorKey};
    let k = TensorKey::parse(name).unwrap_or_else(|| panic!("{name}"));
    let (layer, t) = match k {
        TensorKey::Output => return ("output.weight".into(), None),
        TensorKey::Layer(l, t) => (l, t),
        _ => panic!("{name} is not a matrix"),
    };
    let (part, e) = match t {
        L::Wq => ("attn_q".to_string(), None),
        L::Wk => ("attn_k".into(), None),
        L::Wv => ("attn_v".into(), None),
        L::Wo => ("attn_output".into(), None),
        L::Ffn(p) => (format!("ffn_{}", p.name()), None),
        L::Shared(p) => (format!("ffn_{}_shexp", p.name()), None),
        L::Expert(e, p) => (format!("ffn_{}_exps", p.name()), Some(e)),
        _ => panic!("{name} has no imatrix"),
    };
    (format!("blk.{layer}.{part}.weight"), e)
}

/// llama.cpp's imatrix files (`llama-imatrix`: GGUF and the legacy `.dat`) holding the same
/// statistics as one of ours give the same quantized weights: each tensor's bytes identical.
/// The statistics are stored so that llama.cpp's division gives them back exactly (counts and
/// ncall 1); stacked experts a routed expert never saw keep count 0 (GGUF) and are left out.
#[test]
fn llama_cpp_imatrix_files_weigh_like_ours() {
    let name = "llama4-scout-tiny";
    let (f32m, ours) = make_imatrix(name, "-llama");
    let n_exp = Model::open(&f32m).unwrap().config.num_experts;
    let im = Imatrix::read(&ours).unwrap();
    // GGUF name -> (cols, per matrix: values or None)
    type PerMatrix = (usize, Vec<Option<Vec<f32>>>);
    let mut mats: std::collections::BTreeMap<String, PerMatrix> = Default::default();
    for e in &im.entries {
        for t in &e.tensors {
            let (g, ex) = gguf_of(t);
            let n_mat = if ex.is_some() { n_exp } else { 1 };
            let m = mats
                .entry(g)
                .or_insert_with(|| (e.values.len(), vec![None; n_mat]));
            m.1[ex.unwrap_or(0)] = Some(e.values.clone());
        }
    }
    assert!(
        mats.keys().any(|k| k.contains("_exps")),
        "{:?}",
        mats.keys()
    );
    // GGUF: in_sum2 [cols, n_mat] and counts [n_mat]
    let mut w = support::GgufWriter::new(3);
    w.kv("general.type", support::Meta::s("imatrix"));
    for (g, (cols, per)) in &mats {
        let mut sums = Vec::new();
        for v in per {
            sums.extend(v.clone().unwrap_or_else(|| vec![0.0; *cols]));
        }
        let counts: Vec<f32> = per.iter().map(|v| v.is_some() as u8 as f32).collect();
        w.tensor_f32(
            &format!("{g}.in_sum2"),
            &[*cols as u64, per.len() as u64],
            &sums,
        );
        w.tensor_f32(&format!("{g}.counts"), &[per.len() as u64], &counts);
    }
    let gguf = tmp("llama-imatrix.gguf");
    std::fs::write(&gguf, w.build()).unwrap();
    // legacy: i32 n, then name, ncall, nval, values (mean * ncall); experts one after another.
    // A stacked tensor must hold every expert: the fixture's calibration routes to all of them
    let mut dat = Vec::new();
    dat.extend_from_slice(&(mats.len() as i32).to_le_bytes());
    for (g, (cols, per)) in &mats {
        dat.extend_from_slice(&(g.len() as i32).to_le_bytes());
        dat.extend_from_slice(g.as_bytes());
        dat.extend_from_slice(&1i32.to_le_bytes());
        dat.extend_from_slice(&((cols * per.len()) as i32).to_le_bytes());
        for v in per {
            let v = v
                .clone()
                .expect("every expert routed to in the calibration ids");
            dat.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        }
    }
    dat.extend_from_slice(&(N_CHUNK as i32).to_le_bytes());
    let legacy = tmp("llama-imatrix.dat");
    std::fs::write(&legacy, &dat).unwrap();

    let tensors = |p: &Path| -> Vec<(String, Vec<u8>)> {
        let f = ferroq::FqmFile::open(p).unwrap();
        let mut v: Vec<(String, Vec<u8>)> = f
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), f.tensor(&t.name).unwrap().data.to_vec()))
            .collect();
        v.sort();
        v
    };
    let with = |im: &Path, tag: &str| {
        let q = convert(name, "q4", &["--imatrix", im.to_str().unwrap()], tag);
        tensors(&q)
    };
    let want = with(&ours, "-ours");
    let plain = tensors(&convert(name, "q4", &[], "-none"));
    assert_ne!(want, plain, "the imatrix changes the weights");
    assert!(want == with(&gguf, "-gguf"), "GGUF imatrix: other weights");
    assert!(
        want == with(&legacy, "-dat"),
        "legacy imatrix: other weights"
    );
    // a damaged llama.cpp file is refused naming it
    let bad = tmp("llama-imatrix-bad.dat");
    std::fs::write(&bad, &dat[..dat.len() / 2]).unwrap();
    let out = ferroq(&[
        "convert",
        fixture(name).to_str().unwrap(),
        "-o",
        tmp("bad.fqm").to_str().unwrap(),
        "--quant",
        "q4",
        "--imatrix",
        bad.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("llama-imatrix-bad.dat"),
        "{err}"
    );
}
