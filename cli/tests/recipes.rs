//! `--quant` recipes that mix types by tensor role and layer (`q4-m`, `q4-l`, `q4-ud`): the
//! types each tensor gets, the size table printed at convert time and by `ferroq inspect`, and
//! the dry run from a config alone.

use ferroq::internals::format::DType;
use ferroq::internals::model::Model;
use ferroq_convert::convert::{more_bits, recipe_sizes, ConvertOptions, Quant};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroq-recipes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(tag)
}

fn ferroq(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .args(args)
        .output()
        .unwrap();
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{e}");
    (o, e)
}

fn fixture(name: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .join("tests/fixtures/models")
        .join(name)
}

#[test]
fn names_parse_and_more_bits_is_llama_cpps_rule() {
    for q in Quant::ALL {
        assert_eq!(q.name().parse::<Quant>().unwrap(), q);
    }
    assert_eq!("Q4_K_M".parse::<Quant>().unwrap(), Quant::MixM);
    // llama.cpp's use_more_bits for 32 layers: 0..4, 28..32 and 6, 9, ..., 27
    let got: Vec<usize> = (0..32).filter(|&i| more_bits(i, 32)).collect();
    let want: Vec<usize> = (0..4).chain((6..28).step_by(3)).chain(28..32).collect();
    assert_eq!(got, want);
}

#[test]
fn mixed_recipes_store_the_types_of_their_rules() {
    let src = fixture("llama4-scout-tiny");
    for (q, checks) in [
        (
            "q4-ud",
            &[
                ("layers.0.wq", DType::Q8x8),
                ("layers.1.wq", DType::Q4x8),
                ("layers.1.wv", DType::Q8x8),
                ("layers.1.shared_gate", DType::Q8x8),
                ("layers.1.experts.0.gate", DType::Q4x8),
                ("layers.1.experts.2.down", DType::Q4x8),
                ("layers.0.experts.2.down", DType::Q8x8),
                ("layers.3.experts.1.up", DType::Q4x8),
                ("layers.3.wo", DType::Q8x8),
                ("output", DType::Q8x8),
                ("tok_embeddings", DType::Q6x8),
            ][..],
        ),
        (
            // 4 layers: n/8 = 0, so more_bits holds for layer 3 (the last eighth) and layer 2
            // ((i - 0) % 3 == 2)
            "q4-m",
            &[
                ("layers.0.wq", DType::Q4x8),
                ("layers.2.wv", DType::Q8x8),
                ("layers.2.experts.1.down", DType::Q8x8),
                ("layers.2.shared_down", DType::Q8x8),
                ("layers.1.wv", DType::Q4x8),
                ("layers.1.experts.1.down", DType::Q4x8),
                ("layers.3.wv", DType::Q8x8),
                ("output", DType::Q6x8),
            ][..],
        ),
        (
            "q4-l",
            &[("output", DType::Q8x8), ("layers.2.wv", DType::Q8x8)][..],
        ),
    ] {
        let out = tmp(&format!("scout-{q}.fqm"));
        let (_, err) = ferroq(&[
            "convert",
            src.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quant",
            q,
        ]);
        assert!(
            err.contains(&format!("recipe {q}:")) && err.contains("routed experts"),
            "{err}"
        );
        let m = Model::open(&out).unwrap();
        for (name, want) in checks {
            let t = m.file.tensor(name).unwrap();
            assert_eq!(t.info.dtype, *want, "{q}: {name}");
        }
        // the size table is the file's: by inspect, and summed over the file's tensors
        let (o, _) = ferroq(&["inspect", out.to_str().unwrap()]);
        let mix = o.split("\nmix:\n").nth(1).expect("inspect prints the mix");
        let total: u64 = m
            .file
            .tensors()
            .iter()
            .filter(|t| t.dtype != DType::U8)
            .map(|t| t.nbytes as u64)
            .sum();
        let planned: u64 = recipe_sizes(
            &m.config,
            &ConvertOptions {
                quant: q.parse().unwrap(),
                ..Default::default()
            },
        )
        .iter()
        .map(|r| r.bytes)
        .sum();
        assert_eq!(planned, total, "{q}");
        assert!(
            mix.contains("total") && mix.contains("routed experts   q4x8"),
            "{mix}"
        );
        assert_eq!(m.file.meta()["recipe"]["quant"], *q);
    }
}

#[test]
fn dry_run_prints_every_recipe_from_the_config_alone() {
    let cfg = fixture("llama4-scout-tiny").join("config.json");
    let (o, _) = ferroq(&[
        "convert",
        cfg.to_str().unwrap(),
        "-o",
        "/nonexistent/never-written.fqm",
        "--dry-run",
        "--quant",
        "all",
    ]);
    for q in Quant::ALL {
        assert!(o.contains(&format!("recipe {}:", q.name())), "{o}");
    }
}
