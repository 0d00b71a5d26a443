//! SentencePiece tokenizers (`tokenizer.model` and SentencePiece-style `tokenizer.json`) against
//! goldens from the `sentencepiece` library and Hugging Face `tokenizers`
//! (tests/fixtures/tokenizers/spm-*/, made by spm-bpe/gen.py; see tests/fixtures/SOURCES.md).

use std::io::Read;

use ferroq::internals::tokenizer::{Tokenizer, TokenizerKind};
use serde_json::Value;

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

fn model_bytes(name: &str) -> Vec<u8> {
    let dir = format!(
        "{}/tests/fixtures/tokenizers/spm-{name}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/..")
    );
    if std::path::Path::new(&format!("{dir}/tokenizer.model")).exists() {
        fixture(&format!("spm-{name}/tokenizer.model"))
    } else {
        fixture(&format!("spm-{name}/tokenizer.model.gz"))
    }
}

fn golden(name: &str) -> Vec<Value> {
    String::from_utf8(fixture(&format!("spm-{name}/golden.jsonl.gz")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Encode every golden text with `tok`, compare with `key`; decode and compare with `key_dec`
/// (when given). Returns the number of lines and ids compared.
fn check(tok: &Tokenizer, rows: &[Value], key: &str, dec_key: Option<&str>, what: &str) -> usize {
    let mut bad = Vec::new();
    let mut n_ids = 0;
    for r in rows {
        let text = r["text"].as_str().unwrap();
        let want = ids(&r[key]);
        n_ids += want.len();
        let got = tok.encode(text, false);
        if got != want {
            bad.push(format!("encode {text:?}:\n   got {got:?}\n  want {want:?}"));
            continue;
        }
        if let Some(dk) = dec_key {
            let want_text = r[dk].as_str().unwrap();
            let got_text = tok.decode(&want, false);
            if got_text != want_text {
                bad.push(format!(
                    "decode {want:?}:\n   got {got_text:?}\n  want {want_text:?}"
                ));
            }
        }
        // Streaming gives the same text as decoding at once.
        let mut dec = tok.stream_decoder(false);
        let mut s = String::new();
        for &id in &want {
            dec.push_into(id, &mut s);
        }
        if let Some(t) = dec.flush() {
            s.push_str(&t);
        }
        assert_eq!(
            s,
            tok.decode(&want, false),
            "{what}: stream decode of {text:?}"
        );
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} lines differ:\n{}",
        bad.len(),
        rows.len(),
        bad[..bad.len().min(8)].join("\n")
    );
    eprintln!("{what}: {} lines, {n_ids} ids exact", rows.len());
    n_ids
}

fn json_tok(name: &str, stem: &str) -> Tokenizer {
    Tokenizer::from_hf_json(&fixture(&format!("spm-{name}/{stem}.json.gz")))
        .unwrap_or_else(|e| panic!("spm-{name}/{stem}.json: {e}"))
}

#[test]
fn model_files_encode_like_sentencepiece() {
    for name in ["mistral", "bpe", "unigram"] {
        let bytes = model_bytes(name);
        assert_eq!(
            TokenizerKind::detect(Some("tokenizer.model".as_ref()), &bytes),
            TokenizerKind::SentencePiece
        );
        let tok = Tokenizer::from_sentencepiece(&bytes).unwrap();
        let rows = golden(name);
        // sentencepiece itself on every line (control pieces cut out first, as HF's slow
        // LlamaTokenizer does; lines without them are plain `sp.encode`).
        check(
            &tok,
            &rows,
            "sp_added",
            None,
            &format!("spm-{name}/tokenizer.model"),
        );
        // Decoding like HF where HF's legacy json gives the same ids.
        let dec_key = if name == "unigram" {
            "tokenizer-spm"
        } else {
            "tokenizer"
        };
        let same: Vec<Value> = rows
            .iter()
            .filter(|r| r[dec_key] == r["sp_added"])
            .cloned()
            .collect();
        for r in &same {
            let want = r[format!("{dec_key}_dec")].as_str().unwrap();
            assert_eq!(tok.decode(&ids(&r["sp_added"]), false), want, "{name}");
        }
        assert!(same.len() > rows.len() - 10, "{name}: {}", same.len());
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.encode("Hi", true)[0], 1);
    }
}

#[test]
fn legacy_json_encodes_like_tokenizers() {
    // The form of Llama 2 / Mistral Hugging Face files (normalizer Prepend + Replace).
    for name in ["mistral", "bpe"] {
        let tok = json_tok(name, "tokenizer");
        check(
            &tok,
            &golden(name),
            "tokenizer",
            Some("tokenizer_dec"),
            &format!("spm-{name}/tokenizer.json"),
        );
        assert_eq!(tok.bos_id(), Some(1));
    }
}

#[test]
fn metaspace_json_encodes_like_tokenizers() {
    // transformers 5 LlamaTokenizer: Metaspace with prepend_scheme "first".
    for name in ["mistral", "bpe"] {
        check(
            &json_tok(name, "tokenizer-metaspace"),
            &golden(name),
            "tokenizer-metaspace",
            Some("tokenizer-metaspace_dec"),
            &format!("spm-{name}/tokenizer-metaspace.json"),
        );
    }
}

#[test]
fn converter_json_encodes_like_tokenizers() {
    // transformers' SpmConverter.build_tokenizer_from_spm_proto: regex Replace normalizers,
    // Metaspace + Split, BPE with ignore_merges, and a Unigram model.
    for name in ["bpe", "unigram"] {
        check(
            &json_tok(name, "tokenizer-spm"),
            &golden(name),
            "tokenizer-spm",
            Some("tokenizer-spm_dec"),
            &format!("spm-{name}/tokenizer-spm.json"),
        );
    }
}

#[test]
fn round_trip_and_specials() {
    let tok = Tokenizer::from_sentencepiece(&model_bytes("mistral")).unwrap();
    for r in golden("mistral") {
        let text = r["text"].as_str().unwrap();
        if r["sp"] != r["sp_added"] || text.contains('\u{2581}') {
            continue; // control pieces written in the text; `▁` decodes as a space
        }
        assert_eq!(tok.decode(&tok.encode(text, false), false), text);
    }
    // BOS/EOS written in text are their ids; decoding skips them on request.
    let ids = tok.encode("<s>Hello</s>", false);
    assert_eq!(ids, [1, 22557, 2]);
    assert_eq!(tok.decode(&ids, true), "Hello");
    assert_eq!(tok.decode(&ids, false), "<s> Hello</s>");
    assert!(tok.is_special(1) && tok.is_special(2) && tok.is_special(0));
    assert_eq!(tok.id_to_token(13), Some("<0x0A>"));
    assert_eq!(tok.id_to_bytes(13), Some(&b"\n"[..]));
    assert_eq!(tok.id_to_bytes(22557), Some(&b" Hello"[..]));
    // The dummy-prefix space is stripped at the start of a stream only.
    let mut d = tok.stream_decoder(true);
    let got: String = tok
        .encode("Hello world", true)
        .iter()
        .filter_map(|&i| d.push(i))
        .collect();
    assert_eq!(got, "Hello world");
}

// ---------------------------------------------------------------------------------------------
// Hostile files
// ---------------------------------------------------------------------------------------------

fn varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn field(num: u64, wire: u64, out: &mut Vec<u8>) {
    varint((num << 3) | wire, out);
}

fn piece(s: &[u8], score: f32, ty: u64) -> Vec<u8> {
    let mut p = Vec::new();
    field(1, 2, &mut p);
    varint(s.len() as u64, &mut p);
    p.extend_from_slice(s);
    field(2, 5, &mut p);
    p.extend_from_slice(&score.to_le_bytes());
    field(3, 0, &mut p);
    varint(ty, &mut p);
    let mut out = Vec::new();
    field(1, 2, &mut out);
    varint(p.len() as u64, &mut out);
    out.extend(p);
    out
}

fn trainer(model_type: u64, byte_fallback: bool) -> Vec<u8> {
    let mut t = Vec::new();
    field(3, 0, &mut t);
    varint(model_type, &mut t);
    field(35, 0, &mut t);
    varint(byte_fallback as u64, &mut t);
    let mut out = Vec::new();
    field(2, 2, &mut out);
    varint(t.len() as u64, &mut out);
    out.extend(t);
    out
}

fn tiny(pieces: &[(&[u8], f32, u64)], model_type: u64, byte_fallback: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (s, score, ty) in pieces {
        out.extend(piece(s, *score, *ty));
    }
    out.extend(trainer(model_type, byte_fallback));
    out
}

#[test]
fn a_hand_made_model_works() {
    let m = tiny(
        &[
            (b"<unk>", 0.0, 2),
            (b"<s>", 0.0, 3),
            (b"\xe2\x96\x81a", -1.0, 1),
            (b"b", -2.0, 1),
            (b"a", -3.0, 1),
            (b"\xe2\x96\x81", -4.0, 1),
        ],
        2,
        false,
    );
    let tok = Tokenizer::from_sentencepiece(&m).unwrap();
    assert_eq!(tok.encode("ab a", true), [1, 2, 3, 2]);
    assert_eq!(tok.encode("xy", false), [5, 0]); // one <unk> for the run
    assert_eq!(tok.decode(&[2, 3, 2], false), "ab a");
    let u = Tokenizer::from_sentencepiece(&tiny(
        &[
            (b"<unk>", 0.0, 2),
            (b"\xe2\x96\x81ab", -1.0, 1),
            (b"\xe2\x96\x81", -2.0, 1),
            (b"a", -2.0, 1),
            (b"b", -2.0, 1),
        ],
        1,
        false,
    ))
    .unwrap();
    assert_eq!(u.encode("ab", false), [1]);
    assert_eq!(u.encode("ba", false), [2, 4, 3]);
}

#[test]
fn hostile_model_files_are_errors_not_panics() {
    let good = tiny(
        &[(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"a", -1.0, 1)],
        2,
        false,
    );
    assert!(Tokenizer::from_sentencepiece(&good).is_ok());
    let mut cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "no pieces"),
        (vec![0x0a], "truncated"),
        (
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f],
            "truncated",
        ),
        (
            vec![
                0x0a, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
            ],
            "truncated",
        ),
        (vec![0x0b, 0x00], "wire type"),
        (vec![0x00, 0x00], "truncated"),
        (tiny(&[(b"a", 0.0, 1)], 2, false), "no unknown piece"),
        (
            tiny(
                &[(b"<unk>", 0.0, 2), (b"a", 0.0, 1), (b"a", 0.0, 1)],
                2,
                false,
            ),
            "defined twice",
        ),
        (
            tiny(&[(b"<unk>", 0.0, 2), (b"<unk2>", 0.0, 2)], 2, false),
            "second unknown",
        ),
        (
            tiny(&[(b"<unk>", 0.0, 2), (b"\xff\xfe", 0.0, 1)], 2, false),
            "UTF-8",
        ),
        (
            tiny(&[(b"<unk>", 0.0, 2), (b"", 0.0, 1)], 2, false),
            "empty",
        ),
        (
            tiny(&[(b"<unk>", 0.0, 2), (b"a", 0.0, 9)], 2, false),
            "unknown type",
        ),
        (
            tiny(&[(b"<unk>", 0.0, 2), (b"<0x41>", 0.0, 6)], 2, false),
            "byte_fallback is false",
        ),
        (
            tiny(&[(b"<unk>", 0.0, 2), (b"<0x4>", 0.0, 6)], 2, true),
            "not <0xXX>",
        ),
        (tiny(&[(b"<unk>", 0.0, 2)], 2, true), "missing"),
        (tiny(&[(b"<unk>", 0.0, 2)], 3, false), "WORD/CHAR"),
        (tiny(&[(b"<unk>", 0.0, 2)], 77, false), "unknown"),
    ];
    // A precompiled character map (nmt_nfkc) is refused by name.
    let mut nfkc = good.clone();
    let mut spec = Vec::new();
    field(1, 2, &mut spec);
    varint(8, &mut spec);
    spec.extend_from_slice(b"nmt_nfkc");
    field(2, 2, &mut spec);
    varint(3, &mut spec);
    spec.extend_from_slice(b"xyz");
    field(3, 2, &mut nfkc);
    varint(spec.len() as u64, &mut nfkc);
    nfkc.extend(spec);
    cases.push((nfkc, "nmt_nfkc"));
    for (bytes, want) in &cases {
        let e = Tokenizer::from_sentencepiece(bytes)
            .err()
            .unwrap_or_else(|| panic!("{want}: loaded"));
        let msg = e.to_string();
        assert!(msg.contains("tokenizer.model"), "{msg}");
        assert!(msg.contains(want), "{want}: {msg}");
    }
    // Every truncation of a real file, and random corruption: an error or a tokenizer, never a
    // panic (and encoding with whatever loads does not panic either).
    let real = model_bytes("bpe");
    for cut in (0..real.len()).step_by(97) {
        let _ = Tokenizer::from_sentencepiece(&real[..cut]);
    }
    let mut seed = 0x9e3779b97f4a7c15u64;
    for _ in 0..200 {
        let mut b = real.clone();
        for _ in 0..4 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (seed >> 33) as usize % b.len();
            b[at] = (seed >> 13) as u8;
        }
        if let Ok(t) = Tokenizer::from_sentencepiece(&b) {
            let _ = t.encode("Hello  world\n<s> é 東京 🙂", true);
        }
    }
}

#[test]
fn hostile_json_is_an_error_not_a_panic() {
    for (bad, want) in [
        (
            r#"{"model": {"type": "Unigram", "vocab": {"a": 0}}}"#,
            "list of [piece, score]",
        ),
        (r#"{"model": {"type": "Unigram", "vocab": []}}"#, "empty"),
        (
            r#"{"model": {"type": "Unigram", "unk_id": 5, "vocab": [["a", 0.0]]}, "decoder": {"type": "Metaspace"}}"#,
            "unk_id",
        ),
        (
            r#"{"model": {"type": "Unigram", "vocab": [["a", 0.0], ["a", 1.0]]}, "decoder": {"type": "Metaspace"}}"#,
            "twice",
        ),
        (
            r#"{"model": {"type": "BPE", "byte_fallback": true, "vocab": {"a": 0}}, "decoder": {"type": "ByteLevel"}}"#,
            "decoder",
        ),
        (
            r#"{"model": {"type": "BPE", "byte_fallback": true, "vocab": {"a": 0}}, "normalizer": {"type": "NFKC"}, "decoder": {"type": "Metaspace"}}"#,
            "NFKC",
        ),
        (
            r#"{"model": {"type": "BPE", "byte_fallback": true, "vocab": {"a": 0}}, "normalizer": {"type": "Replace", "pattern": {"Regex": "("}, "content": ""}, "decoder": {"type": "Metaspace"}}"#,
            "regex",
        ),
        (
            r#"{"model": {"type": "WordPiece", "vocab": {"a": 0}}}"#,
            "WordPiece",
        ),
    ] {
        let e = Tokenizer::from_hf_json(bad.as_bytes())
            .err()
            .unwrap_or_else(|| panic!("{want}: loaded"));
        assert!(e.to_string().contains(want), "{want}: {e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Wiring: chat template, CLI, converter and Engine
// ---------------------------------------------------------------------------------------------

#[test]
fn llama2_chat_template_renders_like_transformers() {
    use ferroq::internals::chat::{encode_chat, ChatTemplate, Message};
    let tmpl =
        ChatTemplate::from_tokenizer_config(&fixture("spm-mistral/tokenizer_config.json"), None)
            .unwrap();
    let exp: Value = serde_json::from_slice(&fixture("spm-mistral/chat_expected.json")).unwrap();
    let cases = exp["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for tok in [
        json_tok("mistral", "tokenizer"),
        Tokenizer::from_sentencepiece(&model_bytes("mistral")).unwrap(),
    ] {
        for c in cases {
            let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
            assert_eq!(
                tmpl.render(&msgs, true).unwrap(),
                c["text"].as_str().unwrap(),
                "{msgs:?}"
            );
            assert_eq!(
                encode_chat(&tok, &tmpl, &msgs, true).unwrap(),
                ids(&c["ids"]),
                "{msgs:?}"
            );
        }
    }
    // Roles must alternate: the template's raise_exception is an error.
    let bad = [Message::new("user", "a"), Message::new("user", "b")];
    assert!(tmpl.render(&bad, true).is_err());
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("ferroq-spm-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn ferroq(args: &[&str], stdin: &[u8]) -> (bool, String, String) {
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
fn convert_embeds_it_and_engine_and_cli_load_it() {
    let d = scratch("wire");
    let hf = d.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    let models = format!(
        "{}/tests/fixtures/models",
        concat!(env!("CARGO_MANIFEST_DIR"), "/..")
    );
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(format!("{models}/llama3-tiny/{f}"), hf.join(f)).unwrap();
    }
    // A byte-fallback BPE small enough for the fixture's 384 embedding rows (the converter
    // refuses a tokenizer with more ids than the model has rows).
    let bytes: Vec<Vec<u8>> = (0..=255u8)
        .map(|b| format!("<0x{b:02X}>").into_bytes())
        .collect();
    let letters: Vec<Vec<u8>> = (b'a'..=b'z').chain(b'A'..=b'Z').map(|c| vec![c]).collect();
    let mut pieces: Vec<(&[u8], f32, u64)> =
        vec![(b"<unk>", 0.0, 2), (b"<s>", 0.0, 3), (b"</s>", 0.0, 3)];
    pieces.extend(bytes.iter().map(|b| (b.as_slice(), 0.0, 6)));
    pieces.push(("\u{2581}".as_bytes(), -1.0, 1));
    pieces.push(("\u{2581}w".as_bytes(), -2.0, 1));
    pieces.extend(
        letters
            .iter()
            .enumerate()
            .map(|(i, c)| (c.as_slice(), -3.0 - i as f32, 1)),
    );
    assert!(pieces.len() <= 384);
    let model = tiny(&pieces, 2, true);
    std::fs::write(hf.join("tokenizer.model"), &model).unwrap();
    std::fs::write(
        hf.join("tokenizer_config.json"),
        fixture("spm-mistral/tokenizer_config.json"),
    )
    .unwrap();
    let want = Tokenizer::from_sentencepiece(&model).unwrap();
    let text = "Hello  world\n<s>[INST] é 東京 🙂 [/INST]";
    let want_ids = want.encode(text, true);

    // `ferroq tokenize -t tokenizer.model`
    let tm = hf.join("tokenizer.model");
    let (ok, out, err) = ferroq(
        &["tokenize", "-t", tm.to_str().unwrap(), "--bos", "--jsonl"],
        format!("{}\n", serde_json::to_string(text).unwrap()).as_bytes(),
    );
    assert!(ok, "{err}");
    let got: Vec<u32> = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(got, want_ids);

    // convert: the SentencePiece file travels in the .fqm and Engine::open loads it
    let fqm = d.join("m.fqm");
    let (ok, _, err) = ferroq(
        &["convert", hf.to_str().unwrap(), "-o", fqm.to_str().unwrap()],
        b"",
    );
    assert!(ok, "{err}");
    let f = ferroq::internals::format::FqmFile::open(&fqm).unwrap();
    assert_eq!(f.meta()["tokenizer"]["kind"], "sentencepiece");
    assert_eq!(f.meta()["add_bos"], true);
    drop(f);
    let engine = ferroq::internals::engine::Engine::open(&fqm).unwrap();
    assert_eq!(engine.tokenizer().encode(text, true), want_ids);
    assert_eq!(
        engine.tokenizer().decode(&want_ids, false),
        want.decode(&want_ids, false)
    );
    let (ok, out, err) = ferroq(
        &["tokenize", "-t", fqm.to_str().unwrap(), "--bos"],
        text.as_bytes(),
    );
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<Vec<u32>>(out.trim()).unwrap(),
        want_ids
    );
    std::fs::remove_dir_all(&d).unwrap();
}
