//! The converter: every fixture at every quant type, checkpoint layouts (multimodal prefix,
//! per-expert, sharded, f32/f16 sources), tokenizer metadata, config normalization, and error
//! cases that must leave no file behind.

use ferroq::internals::format::{DType, FqmFile, EXPERT_ALIGN};
use ferroq::internals::kernels::WeightType;
use ferroq::internals::model::{tensor_table, Arch, ModelConfig, Role, RopeStyle};
use ferroq_convert::convert::{convert, ConvertOptions, ProgressEvent, Quant};
use ferroq_convert::hf::{model_config_from_hf, open_hf_dir};
use ferroq_convert::safetensors::SafetensorsSource;
use ferroq_convert::source::TensorSource;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Relative RMS error budget of `q8x8` weights (`‖w − ŵ‖ / ‖w‖` per tensor).
const Q8_REL_RMS_BUDGET: f64 = 0.008;
/// Relative RMS error budget of `q6x8` weights (the 4-bit recipes' embedding and output
/// tables). Measured up to 0.0199 on the fixtures (0.0055 for q8x8: two bits fewer, ~4×).
const Q6_REL_RMS_BUDGET: f64 = 0.03;
/// Relative RMS error budget of `q4x8` weights.
const Q4_REL_RMS_BUDGET: f64 = 0.09;
/// Relative RMS error budget of `q4lx8` weights (linear grid; measured up to 0.0854 on the
/// fixtures' random weights, whose Gaussian-like blocks favour the codebook).
const Q4L_REL_RMS_BUDGET: f64 = 0.10;

const FIXTURES: [&str; 3] = ["llama3-tiny", "llama4-scout-tiny", "llama4-maverick-tiny"];

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .join("tests/fixtures/models")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferroq-convert-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn files_in(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn quiet(_: ProgressEvent) {}

fn run(dir: &Path, out: &Path, quant: Quant) -> ferroq::Result<ferroq_convert::convert::Report> {
    let ck = open_hf_dir(dir)?;
    convert(
        &ck,
        out,
        &ConvertOptions {
            quant,
            ..Default::default()
        },
        &quiet,
    )
}

/// A source tensor for [`write_st`]: name, safetensors dtype, shape, little-endian bytes.
type StTensor = (String, &'static str, Vec<usize>, Vec<u8>);

/// Write a safetensors file.
fn write_st(path: &Path, tensors: &[StTensor]) {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for (n, dt, shape, b) in tensors {
        header.insert(
            n.clone(),
            json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + b.len()]}),
        );
        off += b.len();
    }
    let h = serde_json::to_vec(&Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    for (_, _, _, b) in tensors {
        out.extend_from_slice(b);
    }
    std::fs::write(path, out).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// All tensors of a fixture as f32, by HF name, with shapes.
fn read_all(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let s = SafetensorsSource::open_dir(dir).unwrap();
    s.tensors()
        .iter()
        .map(|t| {
            let mut v = Vec::new();
            s.read_f32(&t.name, &mut v).unwrap();
            (t.name.clone(), (t.shape.clone(), v))
        })
        .collect()
}

/// The expected f32 values of our tensor `name`, computed from the HF tensors (fused experts
/// unfused and transposed by explicit indexing).
fn expected(
    src: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    cfg: &ModelConfig,
    name: &str,
) -> Vec<f32> {
    let get = |n: &str| &src.get(n).unwrap_or_else(|| panic!("{n} missing")).1;
    let parts: Vec<&str> = name.split('.').collect();
    let ffn = if cfg.arch == Arch::Llama {
        "mlp"
    } else {
        "feed_forward"
    };
    let plain = |n: String| get(&n).clone();
    match parts.as_slice() {
        ["tok_embeddings"] => plain("model.embed_tokens.weight".into()),
        ["output_norm"] => plain("model.norm.weight".into()),
        ["output"] => plain("lm_head.weight".into()),
        ["layers", i, rest @ ..] => {
            let l = format!("model.layers.{i}.");
            match rest {
                ["attn_norm"] => plain(format!("{l}input_layernorm.weight")),
                ["ffn_norm"] => plain(format!("{l}post_attention_layernorm.weight")),
                ["wq"] => plain(format!("{l}self_attn.q_proj.weight")),
                ["wk"] => plain(format!("{l}self_attn.k_proj.weight")),
                ["wv"] => plain(format!("{l}self_attn.v_proj.weight")),
                ["wo"] => plain(format!("{l}self_attn.o_proj.weight")),
                ["ffn_gate"] => plain(format!("{l}{ffn}.gate_proj.weight")),
                ["ffn_up"] => plain(format!("{l}{ffn}.up_proj.weight")),
                ["ffn_down"] => plain(format!("{l}{ffn}.down_proj.weight")),
                ["router"] => plain(format!("{l}feed_forward.router.weight")),
                ["shared_gate"] => plain(format!("{l}feed_forward.shared_expert.gate_proj.weight")),
                ["shared_up"] => plain(format!("{l}feed_forward.shared_expert.up_proj.weight")),
                ["shared_down"] => plain(format!("{l}feed_forward.shared_expert.down_proj.weight")),
                ["experts", e, p] => {
                    let e: usize = e.parse().unwrap();
                    let (h, im) = (cfg.hidden_size, cfg.moe_intermediate_size);
                    let mut out = Vec::new();
                    if *p == "down" {
                        // down_proj [E, I, H] → ours [H, I]
                        let w = get(&format!("{l}feed_forward.experts.down_proj"));
                        for hh in 0..h {
                            for ii in 0..im {
                                out.push(w[e * im * h + ii * h + hh]);
                            }
                        }
                    } else {
                        // gate_up_proj [E, H, 2I]; gate = [..., :I], up = [..., I:] → ours [I, H]
                        let w = get(&format!("{l}feed_forward.experts.gate_up_proj"));
                        let c0 = if *p == "gate" { 0 } else { im };
                        for ii in 0..im {
                            for hh in 0..h {
                                out.push(w[e * h * 2 * im + hh * 2 * im + c0 + ii]);
                            }
                        }
                    }
                    out
                }
                _ => panic!("{name}"),
            }
        }
        _ => panic!("{name}"),
    }
}

fn expected_dtype(q: Quant, role: Role) -> DType {
    match (q, role) {
        (Quant::F32, _) | (_, Role::Norm | Role::Router) => DType::F32,
        (Quant::Bf16, _) => DType::Bf16,
        (Quant::Q8, _) => DType::Q8x8,
        (Quant::Q4 | Quant::Q4m | Quant::Q4l, Role::Embedding | Role::Output) => DType::Q6x8,
        (Quant::Q4 | Quant::Q4m, _) => DType::Q4x8,
        (Quant::Q4l, _) => DType::Q4Lx8,
        (Quant::MixM | Quant::MixL | Quant::MixUd, _) => {
            panic!("the mixed recipes are tested in cli/tests/recipes.rs")
        }
    }
}

/// Decode one of our tensors back to f32.
fn decode(f: &FqmFile, name: &str) -> Vec<f32> {
    let v = f.tensor(name).unwrap();
    let shape = &v.info.shape;
    match v.info.dtype {
        DType::F32 => v.f32s().unwrap().to_vec(),
        DType::Bf16 => v
            .u16s()
            .unwrap()
            .iter()
            .map(|&b| half::bf16::from_bits(b).to_f32())
            .collect(),
        DType::F16 => v
            .u16s()
            .unwrap()
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect(),
        DType::U8 => panic!("u8"),
        _ => {
            let (rows, cols) = (shape[0], shape[1]);
            let q = v.qmat().unwrap();
            let mut out = vec![0.0; rows * cols];
            for r in 0..rows {
                let row = &mut out[r * cols..(r + 1) * cols];
                ferroq::internals::kernels::with_qmat!(q, w => WeightType::dequantize_row(w, r, cols, row));
            }
            out
        }
    }
}

fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (x as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

#[test]
fn every_fixture_at_every_quant() {
    let d = scratch("all");
    for fx in FIXTURES {
        let dir = fixture(fx);
        let cfg_json: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let cfg = model_config_from_hf(&cfg_json).unwrap();
        let src = read_all(&dir);
        let table = tensor_table(&cfg);
        for q in [Quant::F32, Quant::Bf16, Quant::Q8, Quant::Q4, Quant::Q4l] {
            let out = d.join(format!("{fx}-{}.fqm", q.name()));
            let rep = run(&dir, &out, q).unwrap();
            assert_eq!(rep.tensors, table.len());
            let f = FqmFile::open(&out).unwrap();
            // tensor table: exactly ours, in order (no tokenizer files in these fixtures)
            let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
            let want: Vec<&str> = table.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, want, "{fx} {q:?}");
            let (mut worst, mut worst6, mut worst8) = (0.0f64, 0.0f64, 0.0f64);
            for spec in &table {
                let v = f.tensor(&spec.name).unwrap();
                assert_eq!(v.info.shape, spec.shape, "{fx} {}", spec.name);
                assert_eq!(
                    v.info.dtype,
                    expected_dtype(q, spec.role),
                    "{fx} {}",
                    spec.name
                );
                if spec.expert.is_some() && spec.name.ends_with(".gate") {
                    assert_eq!(v.info.offset as u64 % EXPERT_ALIGN, 0, "{}", spec.name);
                }
                let want = expected(&src, &cfg, &spec.name);
                let got = decode(&f, &spec.name);
                assert_eq!(got.len(), want.len());
                match v.info.dtype {
                    // f32 and bf16 from a bf16 source are exact
                    DType::F32 | DType::Bf16 => {
                        assert!(
                            got == want,
                            "{fx} {q:?} {} differs from the source",
                            spec.name
                        )
                    }
                    DType::Q8x8 | DType::Q6x8 | DType::Q4x8 | DType::Q4Lx8 => {
                        let e = rel_rms(&want, &got);
                        let budget = match v.info.dtype {
                            DType::Q8x8 => Q8_REL_RMS_BUDGET,
                            DType::Q6x8 => Q6_REL_RMS_BUDGET,
                            DType::Q4x8 => Q4_REL_RMS_BUDGET,
                            _ => Q4L_REL_RMS_BUDGET,
                        };
                        assert!(
                            e <= budget,
                            "{fx} {q:?} {}: rel rms {e} > {budget}",
                            spec.name
                        );
                        match v.info.dtype {
                            DType::Q8x8 => worst8 = worst8.max(e),
                            DType::Q6x8 => worst6 = worst6.max(e),
                            _ => worst = worst.max(e),
                        }
                    }
                    _ => unreachable!(),
                }
            }
            if q != Quant::F32 && q != Quant::Bf16 {
                eprintln!(
                    "{fx} {q:?}: worst relative RMS error 4-bit {worst:.4}, q6x8 {worst6:.5}, \
                     q8x8 {worst8:.5}"
                );
            }
            // metadata
            let m = f.meta();
            assert_eq!(m["ferroq_format"], ferroq::internals::format::VERSION);
            let stored: ModelConfig = serde_json::from_value(m["config"].clone()).unwrap();
            assert_eq!(stored, cfg);
            assert_eq!(m["tokenizer"]["kind"], Value::Null);
            assert_eq!(m["chat_template"], Value::Null);
            assert_eq!(m["bos_token_id"], 1);
            assert_eq!(m["stop_token_ids"], json!([2]));
            assert_eq!(m["add_bos"], false);
            let prov = &m["provenance"];
            assert_eq!(prov["architecture"], cfg_json["architectures"][0]);
            assert_eq!(prov["quant"], q.name());
            assert_eq!(
                prov["converter"],
                format!("ferroq {}", env!("CARGO_PKG_VERSION"))
            );
            assert!(prov["source"].as_str().unwrap().ends_with(fx));
            assert!(prov["source_dtypes"]["bf16"].as_u64().unwrap() > 0);
            assert_eq!(m["recipe"]["quant"], q.name());
            assert_eq!(m["recipe"]["fallbacks"], json!([]));
            assert_eq!(
                m["recipe"]["roles"]["expert"],
                expected_dtype(q, Role::Expert).name()
            );
            assert_eq!(m["recipe"]["roles"]["norm"], "f32");
            std::fs::remove_file(&out).unwrap();
        }
    }
    assert!(files_in(&d).is_empty());
    std::fs::remove_dir_all(&d).unwrap();
}

/// Copy a fixture into `dst` with every tensor renamed/relaid by `f` (which returns the
/// tensors to write for one source tensor) and the config edited by `cfg`.
fn rewrite(
    fx: &str,
    dst: &Path,
    cfg: impl Fn(&mut Value),
    f: impl Fn(&str, &[usize], &[f32]) -> Vec<StTensor>,
) {
    std::fs::create_dir_all(dst).unwrap();
    let mut c: Value =
        serde_json::from_slice(&std::fs::read(fixture(fx).join("config.json")).unwrap()).unwrap();
    cfg(&mut c);
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_vec_pretty(&c).unwrap(),
    )
    .unwrap();
    let mut ts = Vec::new();
    for (n, (shape, v)) in read_all(&fixture(fx)) {
        ts.extend(f(&n, &shape, &v));
    }
    write_st(&dst.join("model.safetensors"), &ts);
}

fn same_tensors(a: &Path, b: &Path) {
    let (fa, fb) = (FqmFile::open(a).unwrap(), FqmFile::open(b).unwrap());
    assert_eq!(fa.tensors().len(), fb.tensors().len());
    for t in fa.tensors() {
        let (x, y) = (fa.tensor(&t.name).unwrap(), fb.tensor(&t.name).unwrap());
        assert_eq!(x.info.shape, y.info.shape, "{}", t.name);
        assert_eq!(x.info.dtype, y.info.dtype, "{}", t.name);
        assert!(x.data == y.data, "{} differs", t.name);
    }
    assert_eq!(fa.meta()["config"], fb.meta()["config"]);
}

#[test]
fn multimodal_prefix_per_expert_layout_and_f32_source_match_the_plain_layout() {
    let d = scratch("layouts");
    let base = d.join("base.fqm");
    run(&fixture("llama4-scout-tiny"), &base, Quant::Q4).unwrap();

    // Llama4ForConditionalGeneration: text under `language_model.`, config under text_config,
    // plus vision tensors that must be skipped; stored as f32.
    let mm = d.join("mm");
    rewrite(
        "llama4-scout-tiny",
        &mm,
        |c| {
            let text = c.clone();
            *c = json!({
                "architectures": ["Llama4ForConditionalGeneration"],
                "model_type": "llama4",
                "text_config": text,
                "vision_config": {"hidden_size": 8},
            });
        },
        |n, shape, v| {
            let mut out = vec![(
                format!("language_model.{n}"),
                "F32",
                shape.to_vec(),
                f32_bytes(v),
            )];
            if n == "model.norm.weight" {
                out.push((
                    "vision_model.patch_embedding.weight".into(),
                    "F32",
                    vec![2],
                    f32_bytes(&[1.0, 2.0]),
                ));
                out.push((
                    "multi_modal_projector.linear_1.weight".into(),
                    "BF16",
                    vec![1],
                    vec![0, 0],
                ));
            }
            out
        },
    );
    let notes = RefCell::new(Vec::new());
    let ck = open_hf_dir(&mm).unwrap();
    let mm_out = d.join("mm.fqm");
    convert(
        &ck,
        &mm_out,
        &ConvertOptions {
            quant: Quant::Q4,
            ..Default::default()
        },
        &|ev| {
            if let ProgressEvent::Note(n) = ev {
                notes.borrow_mut().push(n)
            }
        },
    )
    .unwrap();
    assert!(
        notes
            .borrow()
            .iter()
            .any(|n| n.contains("skipped 2 vision tensors")),
        "{:?}",
        notes.borrow()
    );
    same_tensors(&base, &mm_out);
    let m = FqmFile::open(&mm_out).unwrap();
    assert_eq!(
        m.meta()["provenance"]["architecture"],
        "Llama4ForConditionalGeneration"
    );
    assert_eq!(m.meta()["provenance"]["source_dtypes"], json!({"f32": 51}));

    // per-expert (quantization-friendly) layout: experts.{e}.{gate,up,down}_proj.weight [out, in]
    let pe = d.join("pe");
    rewrite(
        "llama4-scout-tiny",
        &pe,
        |_| {},
        |n, shape, v| {
            let bf = |x: &[f32]| -> Vec<u8> {
                x.iter()
                    .flat_map(|&y| half::bf16::from_f32(y).to_bits().to_le_bytes())
                    .collect()
            };
            if let Some(l) = n.strip_suffix("feed_forward.experts.gate_up_proj") {
                let (e, h, i2) = (shape[0], shape[1], shape[2]);
                let im = i2 / 2;
                let mut out = Vec::new();
                for ex in 0..e {
                    for (pn, c0) in [("gate_proj", 0), ("up_proj", im)] {
                        let mut w = Vec::new();
                        for ii in 0..im {
                            for hh in 0..h {
                                w.push(v[ex * h * i2 + hh * i2 + c0 + ii]);
                            }
                        }
                        out.push((
                            format!("{l}feed_forward.experts.{ex}.{pn}.weight"),
                            "BF16",
                            vec![im, h],
                            bf(&w),
                        ));
                    }
                }
                out
            } else if let Some(l) = n.strip_suffix("feed_forward.experts.down_proj") {
                let (e, im, h) = (shape[0], shape[1], shape[2]);
                (0..e)
                    .map(|ex| {
                        let mut w = Vec::new();
                        for hh in 0..h {
                            for ii in 0..im {
                                w.push(v[ex * im * h + ii * h + hh]);
                            }
                        }
                        (
                            format!("{l}feed_forward.experts.{ex}.down_proj.weight"),
                            "BF16",
                            vec![h, im],
                            bf(&w),
                        )
                    })
                    .collect()
            } else {
                vec![(n.to_string(), "BF16", shape.to_vec(), bf(v))]
            }
        },
    );
    let pe_out = d.join("pe.fqm");
    run(&pe, &pe_out, Quant::Q4).unwrap();
    same_tensors(&base, &pe_out);
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn sharded_checkpoint_matches_single_file() {
    let d = scratch("sharded");
    let fx = fixture("llama4-maverick-tiny");
    let base = d.join("base.fqm");
    run(&fx, &base, Quant::Bf16).unwrap();
    let sh = d.join("sh");
    std::fs::create_dir_all(&sh).unwrap();
    std::fs::copy(fx.join("config.json"), sh.join("config.json")).unwrap();
    let all = read_all(&fx);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut map = serde_json::Map::new();
    for (i, (n, (shape, v))) in all.iter().enumerate() {
        let bytes: Vec<u8> = v
            .iter()
            .flat_map(|&y| half::bf16::from_f32(y).to_bits().to_le_bytes())
            .collect();
        let (file, list) = if i % 2 == 0 {
            ("model-00001-of-00002.safetensors", &mut a)
        } else {
            ("model-00002-of-00002.safetensors", &mut b)
        };
        list.push((n.clone(), "BF16", shape.clone(), bytes));
        map.insert(n.clone(), json!(file));
    }
    write_st(&sh.join("model-00001-of-00002.safetensors"), &a);
    write_st(&sh.join("model-00002-of-00002.safetensors"), &b);
    std::fs::write(
        sh.join("model.safetensors.index.json"),
        serde_json::to_vec(&json!({"metadata": {}, "weight_map": map})).unwrap(),
    )
    .unwrap();
    let out = d.join("sh.fqm");
    run(&sh, &out, Quant::Bf16).unwrap();
    same_tensors(&base, &out);

    // an index naming a file outside the directory is refused
    map.insert("x".into(), json!("../evil.safetensors"));
    std::fs::write(
        sh.join("model.safetensors.index.json"),
        serde_json::to_vec(&json!({"weight_map": map})).unwrap(),
    )
    .unwrap();
    let e = open_hf_dir(&sh).err().expect("refused").to_string();
    assert!(e.contains("plain file name"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn tokenizer_files_and_stop_tokens_travel_in_the_file() {
    let d = scratch("tok");
    let hf = d.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture("llama3-tiny").join(f), hf.join(f)).unwrap();
    }
    let tok = json!({
        "version": "1.0",
        "added_tokens": [{"id": 1, "content": "<s>", "special": true}],
        // a tokenizer the runtime can load: the converter re-opens what it wrote
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel"},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]}
        ]},
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}
    });
    let tok_bytes = serde_json::to_vec_pretty(&tok).unwrap();
    std::fs::write(hf.join("tokenizer.json"), &tok_bytes).unwrap();
    std::fs::write(hf.join("tokenizer.model"), b"YQ== 0\n").unwrap();
    std::fs::write(
        hf.join("tokenizer_config.json"),
        serde_json::to_vec(&json!({
            "bos_token": {"content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "chat_template": "from tokenizer_config"
        }))
        .unwrap(),
    )
    .unwrap();
    std::fs::write(
        hf.join("chat_template.jinja"),
        "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    std::fs::write(
        hf.join("generation_config.json"),
        serde_json::to_vec(&json!({"bos_token_id": 1, "eos_token_id": [2, 7, 8]})).unwrap(),
    )
    .unwrap();
    let out = d.join("m.fqm");
    run(&hf, &out, Quant::Q8).unwrap();
    let f = FqmFile::open(&out).unwrap();
    let m = f.meta();
    assert_eq!(m["tokenizer"]["kind"], "hf_json");
    assert_eq!(
        m["chat_template"], "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}",
        ".jinja file wins"
    );
    assert_eq!(m["bos_token"], "<s>");
    assert_eq!(m["eos_token"], "</s>");
    assert_eq!(m["bos_token_id"], 1);
    assert_eq!(m["stop_token_ids"], json!([2, 7, 8]));
    assert_eq!(m["add_bos"], true);
    let blob = f.tensor("blob.tokenizer.json").unwrap();
    assert_eq!(blob.info.dtype, DType::U8);
    assert_eq!(blob.data, &tok_bytes[..]);
    assert_eq!(f.tensor("blob.tokenizer.model").unwrap().data, b"YQ== 0\n");
    let gc: Value =
        serde_json::from_slice(f.tensor("blob.generation_config.json").unwrap().data).unwrap();
    assert_eq!(gc["eos_token_id"], json!([2, 7, 8]));
    let tc: Value =
        serde_json::from_slice(f.tensor("blob.tokenizer_config.json").unwrap().data).unwrap();
    assert_eq!(tc["eos_token"], "</s>");
    // tied embeddings: no `output` tensor
    assert!(f.get("output").is_none());

    // tiktoken only: this one-rank tokenizer.model is not a Llama 4 vocabulary, so the
    // converter (which loads what it embeds) refuses it, and the earlier output stays intact
    std::fs::remove_file(hf.join("tokenizer.json")).unwrap();
    std::fs::remove_file(hf.join("chat_template.jinja")).unwrap();
    std::fs::remove_file(hf.join("generation_config.json")).unwrap();
    let e = run(&hf, &out, Quant::Q8).unwrap_err().to_string();
    assert!(
        e.contains("tokenizer.model") && e.contains("not written"),
        "{e}"
    );
    let f = FqmFile::open(&out).unwrap();
    assert_eq!(f.meta()["tokenizer"]["kind"], "hf_json");
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn columns_not_multiple_of_32_fall_back_to_bf16() {
    // llama3-tiny with an MLP width of 144 (down_proj has 144 columns)
    let d = scratch("fallback");
    let hf = d.join("hf");
    rewrite(
        "llama3-tiny",
        &hf,
        |c| c["intermediate_size"] = json!(144),
        |n, shape, v| {
            let (shape, v) = if n.ends_with("mlp.down_proj.weight") {
                let (r, c) = (shape[0], shape[1]);
                let w: Vec<f32> = (0..r)
                    .flat_map(|i| v[i * c..i * c + 144].to_vec())
                    .collect();
                (vec![r, 144], w)
            } else if n.ends_with("gate_proj.weight") || n.ends_with("up_proj.weight") {
                (vec![144, shape[1]], v[..144 * shape[1]].to_vec())
            } else {
                (shape.to_vec(), v.to_vec())
            };
            vec![(n.to_string(), "F32", shape, f32_bytes(&v))]
        },
    );
    let out = d.join("m.fqm");
    run(&hf, &out, Quant::Q4).unwrap();
    let f = FqmFile::open(&out).unwrap();
    assert_eq!(
        f.tensor("layers.0.ffn_down").unwrap().info.dtype,
        DType::Bf16
    );
    assert_eq!(
        f.tensor("layers.0.ffn_gate").unwrap().info.dtype,
        DType::Q4x8
    );
    let fb = f.meta()["recipe"]["fallbacks"].as_array().unwrap().clone();
    assert_eq!(fb.len(), 3);
    assert_eq!(fb[0]["tensor"], "layers.0.ffn_down");
    assert_eq!(fb[0]["type"], "bf16");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Each broken input: conversion fails with an error naming the problem, and the output folder
/// stays empty (no .fqm, no temporary file).
#[test]
fn errors_name_the_problem_and_leave_no_file() {
    let d = scratch("errors");
    let out_dir = d.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("m.fqm");
    let check = |dir: &Path, want: &str| {
        let r =
            open_hf_dir(dir).and_then(|ck| convert(&ck, &out, &ConvertOptions::default(), &quiet));
        let e = r
            .err()
            .unwrap_or_else(|| panic!("{} converted, expected `{want}`", dir.display()));
        assert!(
            e.to_string().contains(want),
            "error `{e}` does not mention `{want}`"
        );
        assert!(
            files_in(&out_dir).is_empty(),
            "left behind: {:?}",
            files_in(&out_dir)
        );
    };
    let fx = "llama4-maverick-tiny";
    let same =
        |n: &str, s: &[usize], v: &[f32]| vec![(n.to_string(), "F32", s.to_vec(), f32_bytes(v))];

    let case = d.join("arch");
    rewrite(
        fx,
        &case,
        |c| c["architectures"] = json!(["GPT2LMHeadModel"]),
        same,
    );
    check(&case, "unknown architecture `GPT2LMHeadModel`");

    let case = d.join("missing");
    rewrite(
        fx,
        &case,
        |_| {},
        |n, s, v| {
            if n == "model.layers.2.self_attn.v_proj.weight" {
                vec![]
            } else {
                same(n, s, v)
            }
        },
    );
    check(&case, "model.layers.2.self_attn.v_proj.weight");

    let case = d.join("missing_lm_head");
    rewrite(
        fx,
        &case,
        |_| {},
        |n, s, v| {
            if n == "lm_head.weight" {
                vec![]
            } else {
                same(n, s, v)
            }
        },
    );
    check(&case, "lm_head.weight");

    let case = d.join("shape");
    rewrite(
        fx,
        &case,
        |_| {},
        |n, s, v| {
            if n == "model.layers.1.feed_forward.experts.down_proj" {
                vec![(n.to_string(), "F32", vec![s[0], s[2], s[1]], f32_bytes(v))]
            } else {
                same(n, s, v)
            }
        },
    );
    check(&case, "model.layers.1.feed_forward.experts.down_proj");

    let case = d.join("dtype");
    rewrite(
        fx,
        &case,
        |_| {},
        |n, s, v| {
            if n == "model.norm.weight" {
                vec![(n.to_string(), "I32", s.to_vec(), f32_bytes(v))]
            } else {
                same(n, s, v)
            }
        },
    );
    check(&case, "unsupported dtype i32");

    let case = d.join("config");
    rewrite(fx, &case, |c| c["no_rope_layers"] = json!([1, 1, 0]), same);
    check(&case, "no_rope_layers");

    let case = d.join("config2");
    rewrite(fx, &case, |c| c["hidden_size"] = json!("64"), same);
    check(&case, "hidden_size");

    let case = d.join("rope");
    rewrite(
        fx,
        &case,
        |c| c["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0}),
        same,
    );
    check(&case, "yarn");

    let case = d.join("noconfig");
    rewrite(fx, &case, |_| {}, same);
    std::fs::remove_file(case.join("config.json")).unwrap();
    check(&case, "config.json");

    let case = d.join("corrupt");
    rewrite(fx, &case, |_| {}, same);
    let p = case.join("model.safetensors");
    let mut b = std::fs::read(&p).unwrap();
    b.truncate(b.len() - 1);
    std::fs::write(&p, b).unwrap();
    check(&case, "model.safetensors");

    // the output path's folder does not exist
    let r = run(&fixture(fx), &d.join("no/such/dir/m.fqm"), Quant::F32);
    assert!(r.is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn safetensors_reader_rejects_every_truncation_and_reads_f16() {
    let d = scratch("st");
    let p = d.join("x.safetensors");
    let h: Vec<u8> = [1.0f32, -2.5, 0.5]
        .iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect();
    write_st(
        &p,
        &[
            ("h".into(), "F16", vec![3], h),
            (
                "e".into(),
                "F32",
                vec![2, 2],
                f32_bytes(&[1.0, 2.0, 3.0, 4.0]),
            ),
            ("i".into(), "I64", vec![1], vec![0; 8]),
        ],
    );
    let s = SafetensorsSource::open_file(&p).unwrap();
    let mut v = Vec::new();
    s.read_f32("h", &mut v).unwrap();
    assert_eq!(v, [1.0, -2.5, 0.5]);
    s.read_f32_outer("e", 1, &mut v).unwrap();
    assert_eq!(v, [3.0, 4.0]);
    assert!(s.read_f32_outer("e", 2, &mut v).is_err());
    assert!(s
        .read_f32("i", &mut v)
        .unwrap_err()
        .to_string()
        .contains("i64"));
    assert!(s.read_f32("nope", &mut v).is_err());
    let full = std::fs::read(&p).unwrap();
    let tp = d.join("t.safetensors");
    for n in 0..full.len() {
        std::fs::write(&tp, &full[..n]).unwrap();
        assert!(
            SafetensorsSource::open_file(&tp).is_err(),
            "truncated at {n} accepted"
        );
    }
    // header fields
    let bad = |hdr: Value| {
        let h = serde_json::to_vec(&hdr).unwrap();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(&h);
        b.extend_from_slice(&[0; 16]);
        std::fs::write(&tp, b).unwrap();
        SafetensorsSource::open_file(&tp)
            .expect_err("accepted")
            .to_string()
    };
    assert!(
        bad(json!({"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}})).contains("`a`")
    );
    assert!(
        bad(json!({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}))
            .contains("outside")
    );
    assert!(
        bad(json!({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}))
            .contains("shape")
    );
    assert!(
        bad(json!({"a": {"dtype": "F32", "shape": [u64::MAX, 4], "data_offsets": [0, 16]}}))
            .contains("overflow")
    );
    assert!(bad(json!({"a": {"shape": [4], "data_offsets": [0, 16]}})).contains("dtype"));
    assert!(bad(json!([1, 2])).contains("object"));
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&tp, b).unwrap();
    assert!(SafetensorsSource::open_file(&tp).is_err());
    std::fs::remove_dir_all(&d).unwrap();
}

fn base_llama4() -> Value {
    json!({
        "architectures": ["Llama4ForCausalLM"],
        "vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 8,
        "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 32, "intermediate_size_mlp": 96,
        "num_local_experts": 4, "num_experts_per_tok": 2
    })
}

#[test]
fn config_semantics() {
    // defaults: no_rope_layers absent → NoPE every 4th; moe step 1; chunked on RoPE layers;
    // qk norm on RoPE layers; temperature tuning on NoPE layers; head_dim = H / heads
    let c = model_config_from_hf(&base_llama4()).unwrap();
    assert_eq!(c.arch, Arch::Llama4);
    assert_eq!(c.rope_style, RopeStyle::Interleaved);
    assert_eq!(c.head_dim, 16);
    assert_eq!(c.attention_chunk_size, Some(8192));
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.intermediate_size, 96);
    assert_eq!(c.moe_intermediate_size, 32);
    assert_eq!(c.num_experts_per_tok, 2);
    assert!(c.shared_expert);
    let rope: Vec<bool> = c.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rope, [true, true, true, false, true, true, true, false]);
    for l in &c.layers {
        assert_eq!(l.qk_norm, l.rope);
        assert_eq!(l.chunked, l.rope);
        assert_eq!(l.temp_tune, !l.rope);
        assert!(l.moe);
    }

    // empty no_rope_layers → interval default; interval 3; moe step 2; no chunking; qk off;
    // int-valued attn_temperature_tuning; rope_theta at top level, legacy rope_scaling
    let mut v = base_llama4();
    v["no_rope_layers"] = json!([]);
    v["no_rope_layer_interval"] = json!(3);
    v["interleave_moe_layer_step"] = json!(2);
    v["attention_chunk_size"] = Value::Null;
    v["use_qk_norm"] = json!(false);
    v["attn_temperature_tuning"] = json!(4);
    v["rope_theta"] = json!(1000.0);
    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    v["head_dim"] = json!(32);
    let c = model_config_from_hf(&v).unwrap();
    let rope: Vec<bool> = c.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rope, [true, true, false, true, true, false, true, true]);
    let moe: Vec<bool> = c.layers.iter().map(|l| l.moe).collect();
    assert_eq!(moe, [false, true, false, true, false, true, false, true]);
    assert!(c.layers.iter().all(|l| !l.chunked && !l.qk_norm));
    assert!(c.layers[2].temp_tune && !c.layers[0].temp_tune);
    assert_eq!(c.attention_chunk_size, None);
    assert_eq!(c.rope_theta, 1000.0);
    assert_eq!(c.rope_scaling.unwrap().factor, 16.0);
    assert_eq!(c.head_dim, 32);

    // explicit lists win; layer_types honoured; rope_parameters carries theta;
    // text_config nesting for the multimodal class
    let mut t = base_llama4();
    t["no_rope_layers"] = json!([0, 1, 1, 1, 0, 1, 1, 1]);
    t["moe_layers"] = json!([5]);
    t["interleave_moe_layer_step"] = json!(2);
    t["attention_chunk_size"] = json!(16);
    t["layer_types"] = json!([
        "full_attention",
        "full_attention",
        "chunked_attention",
        "chunked_attention",
        "full_attention",
        "chunked_attention",
        "chunked_attention",
        "chunked_attention"
    ]);
    t["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 250000.0});
    t["tie_word_embeddings"] = json!(true);
    let mm = json!({"architectures": ["Llama4ForConditionalGeneration"], "text_config": t});
    let c = model_config_from_hf(&mm).unwrap();
    let rope: Vec<bool> = c.layers.iter().map(|l| l.rope).collect();
    assert_eq!(rope, [false, true, true, true, false, true, true, true]);
    let moe: Vec<usize> = (0..8).filter(|&i| c.layers[i].moe).collect();
    assert_eq!(moe, [5]);
    assert!(!c.layers[1].chunked && c.layers[2].chunked);
    assert_eq!(c.attention_chunk_size, Some(16));
    assert_eq!(c.rope_theta, 250000.0);
    assert!(c.rope_scaling.is_none());
    assert!(c.tie_word_embeddings);

    // dense Llama: rotate-half RoPE, every layer dense with RoPE, defaults from LlamaConfig
    let l = model_config_from_hf(&json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128
    }))
    .unwrap();
    assert_eq!(l.arch, Arch::Llama);
    assert_eq!(l.rope_style, RopeStyle::Half);
    assert_eq!(l.num_kv_heads, 4);
    assert_eq!(l.rope_theta, 10000.0);
    assert_eq!(l.rms_norm_eps, 1e-6);
    assert!(l
        .layers
        .iter()
        .all(|s| s.rope && !s.moe && !s.chunked && !s.qk_norm && !s.temp_tune));

    // bad fields are named
    let err = |f: &dyn Fn(&mut Value), want: &str| {
        let mut v = base_llama4();
        f(&mut v);
        let e = model_config_from_hf(&v).expect_err("accepted").to_string();
        assert!(e.contains(want), "`{e}` does not mention `{want}`");
    };
    err(&|v| v["moe_layers"] = json!([8]), "moe_layers");
    err(
        &|v| v["no_rope_layers"] = json!([1, 2, 1, 1, 1, 1, 1, 1]),
        "no_rope_layers",
    );
    err(
        &|v| v["layer_types"] = json!(vec!["sliding"; 8]),
        "layer_types",
    );
    err(
        &|v| v["num_key_value_heads"] = json!(3),
        "num_key_value_heads",
    );
    err(
        &|v| v["num_experts_per_tok"] = json!(5),
        "num_experts_per_tok",
    );
    err(&|v| v["vocab_size"] = json!(-1), "vocab_size");
    err(
        &|v| {
            v.as_object_mut().unwrap().remove("hidden_size");
        },
        "hidden_size",
    );
    err(
        &|v| v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0}),
        "low_freq_factor",
    );
    err(&|v| v["hidden_act"] = json!("gelu"), "hidden_act");
    err(&|v| v["architectures"] = json!([]), "architectures");
}

#[test]
fn cli_convert_and_inspect() {
    let d = scratch("cli");
    let out = d.join("m.fqm");
    let exe = env!("CARGO_BIN_EXE_ferroq");
    let o = std::process::Command::new(exe)
        .args([
            "convert",
            fixture("llama4-maverick-tiny").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = std::process::Command::new(exe)
        .args(["inspect", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success());
    let s = String::from_utf8(o.stdout).unwrap();
    for want in [
        "Llama4ForCausalLM",
        "layers.1.experts.7.down",
        "q4x8",
        "bits per weight",
        "\"quant\": \"q4\"",
    ] {
        assert!(s.contains(want), "inspect output lacks `{want}`:\n{s}");
    }
    // a .gguf path goes to the GGUF reader; bad --quant is a clear error
    let o = std::process::Command::new(exe)
        .args([
            "convert",
            "x.gguf",
            "-o",
            out.to_str().unwrap(),
            "--quant",
            "q4",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let o = std::process::Command::new(exe)
        .args([
            "convert",
            fixture("llama3-tiny").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quant",
            "q3",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--quant"));
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn output_and_embedding_type_overrides() {
    let d = scratch("override");
    let convert_with = |fx: &str, out: &Path, output: Option<DType>, emb: Option<DType>| {
        let ck = open_hf_dir(fixture(fx)).unwrap();
        convert(
            &ck,
            out,
            &ConvertOptions {
                quant: Quant::Q4,
                output_type: output,
                embedding_type: emb,
                ..Default::default()
            },
            &quiet,
        )
        .unwrap();
        FqmFile::open(out).unwrap()
    };
    // untied: each table takes its own override
    let f = convert_with(
        "llama4-scout-tiny",
        &d.join("scout.fqm"),
        Some(DType::Q4x8),
        Some(DType::Bf16),
    );
    assert_eq!(f.tensor("output").unwrap().info.dtype, DType::Q4x8);
    assert_eq!(f.tensor("tok_embeddings").unwrap().info.dtype, DType::Bf16);
    assert_eq!(f.tensor("layers.0.wq").unwrap().info.dtype, DType::Q4x8);
    let recipe = &f.meta()["recipe"];
    assert_eq!(recipe["roles"]["output"], "q4x8");
    assert_eq!(recipe["roles"]["embedding"], "bf16");
    assert_eq!(recipe["output_tensor_type"], "q4x8");
    // the q4 output stays within the q4 error budget of its source
    let src = read_all(&fixture("llama4-scout-tiny"));
    let got = decode(&f, "output");
    let e = rel_rms(&got, &src["lm_head.weight"].1);
    assert!(e < Q4_REL_RMS_BUDGET, "q4 output rel rms {e}");
    // tied: the shared table is the output projection, so the output type wins
    let f = convert_with(
        "llama3-tiny",
        &d.join("llama3.fqm"),
        Some(DType::Q4x8),
        Some(DType::F32),
    );
    assert_eq!(f.tensor("tok_embeddings").unwrap().info.dtype, DType::Q4x8);
    assert!(f.tensor("output").is_err());
    // the model runs on it
    let m = ferroq::internals::model::Model::open(d.join("llama3.fqm")).unwrap();
    let mut st = ferroq::internals::model::State::new(&m, 8, 8, false);
    m.forward(&mut st, &[1, 2, 3], ferroq::internals::model::Logits::Last)
        .unwrap();
    assert!(st.logits().iter().all(|x| x.is_finite()));
    // every accepted name, llama.cpp's spellings included
    for (name, want) in [
        ("q4", DType::Q4x8),
        ("q4l", DType::Q4Lx8),
        ("Q4_0", DType::Q4Lx8),
        ("q6", DType::Q6x8),
        ("q6_k", DType::Q6x8),
        ("q8", DType::Q8x8),
        ("q8_0", DType::Q8x8),
        ("bf16", DType::Bf16),
        ("f32", DType::F32),
    ] {
        let got = ferroq_convert::convert::parse_matrix_type(name).unwrap();
        assert_eq!(got, want, "{name}");
    }
    // bad names are refused with the flag named
    let e = ferroq_convert::convert::parse_matrix_type("q5")
        .unwrap_err()
        .to_string();
    assert!(e.contains("output-tensor-type") && e.contains("q5"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}
