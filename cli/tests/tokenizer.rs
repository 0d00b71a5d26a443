//! Tokenizer exactness against Hugging Face `tokenizers` goldens (see tests/fixtures/SOURCES.md).

use std::io::Read;
use std::sync::OnceLock;

use ferroq::internals::tokenizer::{Tokenizer, TokenizerKind};

fn fixture(path: &str) -> Vec<u8> {
    let full = format!(
        "{}/tests/fixtures/tokenizers/{path}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/..")
    );
    let raw = std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    if full.ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        raw
    }
}

fn golden(model: &str) -> Vec<(String, Vec<u32>)> {
    let text = String::from_utf8(fixture(&format!("{model}/golden.jsonl.gz"))).unwrap();
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let ids = v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            (v["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

fn hf(model: &str) -> &'static Tokenizer {
    static L4: OnceLock<Tokenizer> = OnceLock::new();
    static L3: OnceLock<Tokenizer> = OnceLock::new();
    static SM: OnceLock<Tokenizer> = OnceLock::new();
    let cell = match model {
        "llama4" => &L4,
        "llama3" => &L3,
        _ => &SM,
    };
    cell.get_or_init(|| {
        Tokenizer::from_hf_json(&fixture(&format!("{model}/tokenizer.json.gz"))).unwrap()
    })
}

fn llama4_model() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_tiktoken(&fixture("llama4/tokenizer.model.gz")).unwrap())
}

fn check_golden(tok: &Tokenizer, model: &str) {
    let g = golden(model);
    assert!(g.len() > 1000);
    let mut bad = 0;
    for (i, (text, ids)) in g.iter().enumerate() {
        let got = tok.encode(text, false);
        if &got != ids {
            bad += 1;
            if bad < 5 {
                eprintln!(
                    "{model} line {}: {text:?}\n  want {ids:?}\n  got  {got:?}",
                    i + 1
                );
            }
        }
    }
    assert_eq!(bad, 0, "{model}: {bad} of {} golden lines differ", g.len());
}

#[test]
fn golden_llama4_tokenizer_json() {
    check_golden(hf("llama4"), "llama4");
}

#[test]
fn golden_llama4_tokenizer_model() {
    check_golden(llama4_model(), "llama4");
}

#[test]
fn golden_llama3_tokenizer_json() {
    check_golden(hf("llama3"), "llama3");
}

#[test]
fn golden_smollm2_tokenizer_json() {
    check_golden(hf("smollm2"), "smollm2");
}

#[test]
fn spec_test_vectors_llama4() {
    let cases: &[(&str, &[u32])] = &[
        ("Hello, world!", &[19873, 24, 3817, 13]),
        (" Hello world", &[39715, 3817]),
        ("The capital of France is", &[954, 7963, 323, 11698, 373]),
        ("I'm   fine.\n\nThanks", &[23752, 256, 11518, 1574, 29852]),
        (
            "12345 + 678 = 13023",
            &[7235, 2127, 584, 220, 36077, 319, 220, 8552, 1504],
        ),
        ("naïve café 東京 🙂", &[1499, 164301, 49652, 124590, 72951]),
        (
            "HTTPServer isn't JSONParser's",
            &[19117, 7317, 16893, 8899, 11130, 948],
        ),
        ("What is 2+2?", &[3668, 373, 220, 30, 23, 30, 43]),
    ];
    for tok in [hf("llama4"), llama4_model()] {
        for (text, ids) in cases {
            assert_eq!(&tok.encode(text, false), ids, "{text:?}");
            assert_eq!(&tok.decode(ids, false), text);
        }
        assert_eq!(tok.bos_id(), Some(200000));
        assert_eq!(tok.encode("Hi", true)[0], 200000);
        assert_eq!(tok.vocab_size(), 202048);
    }
}

#[test]
fn llama4_specials_match_tokenizer_json() {
    let a = hf("llama4");
    let b = llama4_model();
    for id in 200000..202048u32 {
        assert_eq!(a.id_to_token(id), b.id_to_token(id), "id {id}");
        assert!(b.is_special(id));
    }
    assert_eq!(b.token_to_id("<|eot|>"), Some(200008));
    assert_eq!(b.token_to_id("<|patch|>"), Some(200092));
    assert_eq!(
        b.token_to_id("<|reserved_special_token_903|>"),
        Some(202047)
    );
    // Same token strings for the base vocabulary too.
    for id in (0..200000u32).step_by(997) {
        assert_eq!(a.id_to_token(id), b.id_to_token(id), "id {id}");
    }
}

#[test]
fn decode_roundtrip_and_skip_special() {
    for m in ["llama4", "llama3", "smollm2"] {
        let tok = hf(m);
        for (text, ids) in golden(m).iter().take(200) {
            assert_eq!(&tok.decode(ids, false), text, "{m}");
        }
    }
    let tok = hf("llama4");
    let ids = tok.encode("<|begin_of_text|>Hi<|eot|>", false);
    assert_eq!(ids, vec![200000, 25181, 200008]);
    assert_eq!(tok.decode(&ids, true), "Hi");
    assert_eq!(tok.decode(&ids, false), "<|begin_of_text|>Hi<|eot|>");
    assert_eq!(tok.id_to_token(3817), Some("Ġworld"));
    assert_eq!(tok.token_to_id("Ġworld"), Some(3817));
    assert_eq!(tok.id_to_bytes(3817), Some(&b" world"[..]));
}

#[test]
fn smollm2_has_no_bos() {
    let tok = hf("smollm2");
    assert_eq!(tok.bos_id(), None);
    assert_eq!(tok.encode("Hi", true), tok.encode("Hi", false));
    assert_eq!(hf("llama3").bos_id(), Some(128000));
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let tok = hf("llama4");
    let text = "naïve café 東京 🙂 👩‍👩‍👧 Ünïcödé ∑∫ 𝔘𝔫𝔦";
    // Byte tokens force characters to be split across ids.
    let mut ids = Vec::new();
    for b in text.bytes() {
        // The single-byte token for b.
        let id = (0..200000u32)
            .find(|&i| tok.id_to_bytes(i) == Some(&[b][..]))
            .unwrap();
        ids.push(id);
    }
    let mut dec = tok.stream_decoder(false);
    let mut out = String::new();
    for &id in &ids {
        if let Some(s) = dec.push(id) {
            // Every chunk is whole characters: it is a valid &str by construction, and it
            // must be a prefix of what is left.
            out.push_str(&s);
            assert!(text.starts_with(&out));
        }
    }
    assert!(dec.flush().is_none());
    assert_eq!(out, text);
    // Normal tokens too.
    let ids = tok.encode(text, false);
    let mut dec = tok.stream_decoder(true);
    let got: String = ids.iter().filter_map(|&i| dec.push(i)).collect();
    assert_eq!(got, text);
    // An incomplete character at the end is flushed as U+FFFD, like lossy decode.
    let e_acute_first = (0..200000u32)
        .find(|&i| tok.id_to_bytes(i) == Some(&[0xC3][..]))
        .unwrap();
    let mut dec = tok.stream_decoder(false);
    assert_eq!(dec.push(e_acute_first), None);
    assert_eq!(dec.flush().as_deref(), Some("\u{FFFD}"));
    assert_eq!(tok.decode(&[e_acute_first], false), "\u{FFFD}");
}

#[test]
fn long_inputs_are_fast_enough_and_exact() {
    // Long runs hit the heap merge path and the look-ahead fix-up.
    let tok = hf("smollm2");
    let s = "x".repeat(5000) + &" ".repeat(3000) + "y" + &"-=".repeat(4000);
    let ids = tok.encode(&s, false);
    assert_eq!(tok.decode(&ids, false), s);
    let tok4 = hf("llama4");
    let ids = tok4.encode(&s, false);
    assert_eq!(tok4.decode(&ids, false), s);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    for bad in [
        &b""[..],
        b"{",
        b"{}",
        b"{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}",
        b"{\"model\": {\"type\": \"Unigram\", \"vocab\": {\"a\": 0}}}",
        b"{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}, \"pre_tokenizer\": {\"type\": \"ByteLevel\"}}",
    ] {
        assert!(Tokenizer::from_hf_json(bad).is_err());
    }
    for bad in [
        &b""[..],
        b"!!!! 0\n",
        b"YQ== x\n",
        b"YQ== 0\nYQ== 1\n",
        b"YQ== 0\n",
    ] {
        assert!(Tokenizer::from_tiktoken(bad).is_err());
    }
    assert_eq!(
        TokenizerKind::detect(None, b"  {\"a\":1}"),
        TokenizerKind::HfJson
    );
    let e = Tokenizer::from_file("/nonexistent/tokenizer.json")
        .err()
        .unwrap();
    assert!(e.to_string().contains("/nonexistent/tokenizer.json"));
}

fn run_cli(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferroq"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let o = child.wait_with_output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn cli_tokenize_jsonl_roundtrip_and_errors() {
    let dir = env!("CARGO_TARGET_TMPDIR");
    let path = format!("{dir}/smollm2-tokenizer.json");
    std::fs::write(&path, fixture("smollm2/tokenizer.json.gz")).unwrap();
    let g = golden("smollm2");
    let mut input = String::new();
    let mut want = String::new();
    for (text, ids) in g.iter().take(50) {
        input.push_str(&serde_json::to_string(text).unwrap());
        input.push('\n');
        want.push_str(&serde_json::to_string(ids).unwrap());
        want.push('\n');
    }
    let (ok, out, err) = run_cli(&["tokenize", "-t", &path, "--jsonl"], input.as_bytes());
    assert!(ok, "{err}");
    assert_eq!(out, want);
    let (ok, back, err) = run_cli(
        &["tokenize", "-t", &path, "--jsonl", "--decode"],
        out.as_bytes(),
    );
    assert!(ok, "{err}");
    assert_eq!(back, input);
    // Llama 4 from tokenizer.model, with BOS.
    let mpath = format!("{dir}/llama4-tokenizer.model");
    std::fs::write(&mpath, fixture("llama4/tokenizer.model.gz")).unwrap();
    let (ok, out, err) = run_cli(
        &["tokenize", "-t", &mpath, "--jsonl", "--bos"],
        b"\"Hello, world!\"\n",
    );
    assert!(ok, "{err}");
    assert_eq!(out, "[200000,19873,24,3817,13]\n");
    // Errors: invalid JSON, invalid UTF-8, bad ids, .fqm not wired, missing file.
    for (args, input, needle) in [
        (
            vec!["tokenize", "-t", &path, "--jsonl"],
            &b"\"ok\"\nnot json\n"[..],
            "line 2",
        ),
        (
            vec!["tokenize", "-t", &path, "--jsonl"],
            b"\"\xff\"\n",
            "UTF-8",
        ),
        (
            vec!["tokenize", "-t", &path, "--jsonl", "--decode"],
            b"[1, 99999999]\n",
            "99999999",
        ),
        (vec!["tokenize", "-t", "model.fqm", "--jsonl"], b"", "fqm"),
        (
            vec!["tokenize", "-t", "/nonexistent.json", "--jsonl"],
            b"",
            "nonexistent",
        ),
    ] {
        let (ok, _, err) = run_cli(&args, input);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn golden_added_token_flags_and_split_behaviors() {
    // Small tokenizer trained with HF `tokenizers` (fixtures/tokenizers/flags/gen.py): added
    // tokens with lstrip/rstrip/single_word/normalized, Split with Isolated and
    // MergedWithPrevious, ByteLevel with its own regex, merges without ignore_merges.
    let tok = Tokenizer::from_hf_json(&fixture("flags/tokenizer.json.gz")).unwrap();
    let text = String::from_utf8(fixture("flags/golden.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let s = v["text"].as_str().unwrap();
        let ids: Vec<u32> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(s, false), ids, "{s:?}");
        n += 1;
    }
    assert_eq!(n, 8);
}
