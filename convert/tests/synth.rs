//! `ferroq synth`: the l4-tiny checkpoint parses, its shapes match its config, output is
//! deterministic per seed, and sharding does not change the bytes of any tensor.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ferroq_convert::synth::{parse_size, write_checkpoint, Shape, SynthOptions};
use serde_json::Value;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ferroq-synth-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// name -> (shape, raw bytes), read from every safetensors file in `dir`.
fn read_all(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|s| s.to_str()) != Some("safetensors") {
            continue;
        }
        let bytes = std::fs::read(&p).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded to 8 bytes");
        let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let data = &bytes[8 + n..];
        let mut ends = vec![];
        for (name, t) in header.as_object().unwrap() {
            if name == "__metadata__" {
                continue;
            }
            assert_eq!(t["dtype"], "BF16");
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
            let off: Vec<usize> = serde_json::from_value(t["data_offsets"].clone()).unwrap();
            assert_eq!(
                off[1] - off[0],
                2 * shape.iter().product::<usize>(),
                "{name}"
            );
            ends.push((off[0], off[1]));
            let prev = out.insert(name.clone(), (shape, data[off[0]..off[1]].to_vec()));
            assert!(prev.is_none(), "{name} in two shards");
        }
        ends.sort();
        let mut at = 0;
        for (a, b) in ends {
            assert_eq!(a, at, "contiguous data in {}", p.display());
            at = b;
        }
        assert_eq!(at, data.len(), "no trailing bytes in {}", p.display());
    }
    out
}

fn bf16s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16))
        .collect()
}

#[test]
fn l4_tiny_checkpoint_matches_its_config() {
    let dir = tmpdir("tiny");
    let shape = Shape::preset("l4-tiny").unwrap();
    let opts = SynthOptions {
        seed: 7,
        ..Default::default()
    };
    let mut last = 0;
    let s = write_checkpoint(&shape, &dir, &opts, &mut |p| last = p.done).unwrap();
    assert_eq!(last, s.n_bytes);
    assert!(dir.join("model.safetensors").exists());
    assert!(!dir.join("model.safetensors.index.json").exists());

    let cfg: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Llama4ForCausalLM");
    assert_eq!(cfg["model_type"], "llama4_text");
    let g = |k: &str| cfg[k].as_u64().unwrap() as usize;
    let (h, l, v, d) = (
        g("hidden_size"),
        g("num_hidden_layers"),
        g("vocab_size"),
        g("head_dim"),
    );
    let (nh, nkv, e, x) = (
        g("num_attention_heads"),
        g("num_key_value_heads"),
        g("num_local_experts"),
        g("intermediate_size"),
    );
    assert_eq!(cfg["moe_layers"].as_array().unwrap().len(), l);
    assert_eq!(cfg["no_rope_layers"], serde_json::json!([1, 1, 1, 0]));
    assert_eq!(
        cfg["layer_types"][3], "full_attention",
        "NoPE layers use full attention"
    );

    let t = read_all(&dir);
    let shape_of = |n: &str| t.get(n).unwrap_or_else(|| panic!("missing {n}")).0.clone();
    assert_eq!(shape_of("model.embed_tokens.weight"), [v, h]);
    assert_eq!(shape_of("lm_head.weight"), [v, h]);
    assert_eq!(shape_of("model.norm.weight"), [h]);
    for i in 0..l {
        let p = format!("model.layers.{i}.");
        assert_eq!(
            shape_of(&format!("{p}self_attn.q_proj.weight")),
            [nh * d, h]
        );
        assert_eq!(
            shape_of(&format!("{p}self_attn.k_proj.weight")),
            [nkv * d, h]
        );
        assert_eq!(
            shape_of(&format!("{p}self_attn.v_proj.weight")),
            [nkv * d, h]
        );
        assert_eq!(
            shape_of(&format!("{p}self_attn.o_proj.weight")),
            [h, nh * d]
        );
        let f = format!("{p}feed_forward.");
        assert_eq!(shape_of(&format!("{f}router.weight")), [e, h]);
        assert_eq!(shape_of(&format!("{f}experts.gate_up_proj")), [e, h, 2 * x]);
        assert_eq!(shape_of(&format!("{f}experts.down_proj")), [e, x, h]);
        assert_eq!(
            shape_of(&format!("{f}shared_expert.gate_proj.weight")),
            [x, h]
        );
        assert_eq!(
            shape_of(&format!("{f}shared_expert.up_proj.weight")),
            [x, h]
        );
        assert_eq!(
            shape_of(&format!("{f}shared_expert.down_proj.weight")),
            [h, x]
        );
        assert_eq!(shape_of(&format!("{p}input_layernorm.weight")), [h]);
        assert_eq!(
            shape_of(&format!("{p}post_attention_layernorm.weight")),
            [h]
        );
    }
    assert_eq!(t.len(), 3 + 12 * l);
    let total: u64 = t.values().map(|(_, b)| b.len() as u64).sum();
    assert_eq!(total, s.n_bytes);

    // Value statistics: weights ~ N(0, 0.02), norms ~ 1.
    let w = bf16s(&t["model.embed_tokens.weight"].1);
    let mean = w.iter().sum::<f32>() / w.len() as f32;
    let std = (w.iter().map(|a| (a - mean) * (a - mean)).sum::<f32>() / w.len() as f32).sqrt();
    assert!(
        mean.abs() < 1e-3 && (std - 0.02).abs() < 1e-3,
        "{mean} {std}"
    );
    let n = bf16s(&t["model.norm.weight"].1);
    assert!(n.iter().all(|&a| (a - 1.0).abs() < 0.1));

    // Same seed, sharded: identical tensors; other seed: different.
    let dir2 = tmpdir("tiny-sharded");
    let opts2 = SynthOptions {
        shard_size: 100_000,
        ..opts.clone()
    };
    write_checkpoint(&shape, &dir2, &opts2, &mut |_| {}).unwrap();
    let index: Value =
        serde_json::from_slice(&std::fs::read(dir2.join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(s.n_bytes));
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), t.len());
    for f in map.values() {
        assert!(dir2.join(f.as_str().unwrap()).exists());
    }
    assert_eq!(read_all(&dir2), t, "sharding changes no bytes");

    let dir3 = tmpdir("tiny-seed8");
    let opts3 = SynthOptions { seed: 8, ..opts };
    write_checkpoint(&shape, &dir3, &opts3, &mut |_| {}).unwrap();
    let t3 = read_all(&dir3);
    assert_ne!(t3["lm_head.weight"].1, t["lm_head.weight"].1);
    // No temporary files left behind.
    for d in [&dir, &dir2, &dir3] {
        for e in std::fs::read_dir(d).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains("synth-tmp"), "{name}");
        }
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn dense_layers_and_llama_names() {
    // Llama 4 with interleaved MoE: odd layers are MoE, even layers dense.
    let shape = Shape {
        moe_step: 2,
        ..Shape::preset("l4-tiny").unwrap()
    };
    let names: Vec<String> = shape.tensors().into_iter().map(|t| t.name).collect();
    assert!(names.contains(&"model.layers.0.feed_forward.gate_proj.weight".to_string()));
    assert!(names.contains(&"model.layers.1.feed_forward.experts.down_proj".to_string()));
    assert!(!names.contains(&"model.layers.0.feed_forward.router.weight".to_string()));
    assert_eq!(shape.config_json()["moe_layers"], serde_json::json!([1, 3]));

    let s = Shape::preset("smollm2-135m").unwrap();
    assert_eq!(s.n_params(), 134_515_008);
    let t = s.tensors();
    assert!(t.iter().all(|t| t.name != "lm_head.weight"), "tied");
    let up = t
        .iter()
        .find(|t| t.name == "model.layers.29.mlp.up_proj.weight")
        .unwrap();
    assert_eq!(up.shape, [1536, 576]);
    let c = s.config_json();
    assert_eq!(c["architectures"][0], "LlamaForCausalLM");
    assert_eq!(c["rope_parameters"]["rope_theta"], 100000.0);

    let m = Shape::preset("l4-mini").unwrap();
    let p = m.n_params();
    assert!((3_400_000_000..3_600_000_000).contains(&p), "{p}");
    assert!(Shape::preset("nope").is_err());
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
    assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
    assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
    assert_eq!(parse_size("4096").unwrap(), 4096);
    assert!(parse_size("2XB").is_err());
    assert!(parse_size("").is_err());
    assert!(parse_size("0").is_err());
}
