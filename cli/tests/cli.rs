//! `ferroq run` and `ferroq chat` on the real SmolLM2-135M-Instruct model, and their error
//! messages. The model is converted once per quantization into `CARGO_TARGET_TMPDIR`.

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferroq"))
}

fn model(test: &str, quant: &str) -> Option<PathBuf> {
    support::smollm2_fqm(test, bin(), Path::new(env!("CARGO_TARGET_TMPDIR")), quant)
}

fn ferroq(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferroq");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn ok(args: &[&str], stdin: &[u8]) -> (String, String) {
    let out = ferroq(args, stdin);
    let (so, se) = (
        String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "ferroq {args:?} failed ({}):\nstdout:\n{so}\nstderr:\n{se}",
        out.status
    );
    (so, se)
}

/// The command fails with a message containing `want`, and does not panic.
fn fails(args: &[&str], stdin: &[u8], want: &str) {
    let out = ferroq(args, stdin);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ferroq {args:?} succeeded");
    assert!(
        !se.contains("panicked") && out.status.code().is_some(),
        "ferroq {args:?} panicked:\n{se}"
    );
    assert!(
        se.to_lowercase().contains(&want.to_lowercase()),
        "ferroq {args:?}: stderr does not mention {want:?}:\n{se}"
    );
}

#[test]
fn run_chat_answers_paris() {
    let q = "What is the capital of France?";
    let mut report = Vec::new();
    for quant in ["q4", "bf16", "q8"] {
        let Some(m) = model("run_chat_answers_paris", quant) else {
            return;
        };
        let m = m.to_str().unwrap();
        let (answer, err) = ok(
            &[
                "run", "-m", m, "--chat", "--temp", "0", "-n", "48", "-t", "2", "-p", q,
            ],
            b"",
        );
        eprintln!("SmolLM2 {quant}: {answer:?}\n{err}");
        for line in [
            "load time",
            "prompt eval time",
            "eval time",
            "tokens per second",
        ] {
            assert!(err.contains(line), "timings on stderr: no {line:?}:\n{err}");
        }
        report.push((quant, answer.contains("Paris")));
    }
    eprintln!("answer contains \"Paris\": {report:?}");
    // bf16 is (almost) the f32 model, which matches transformers (cli/tests/smollm2.rs) and answers
    // "The capital of France is Paris.". The quantized models are only reported: the f32
    // model's first answer token is a near tie ("The" 25.33 vs "L" 25.24), which quantization
    // error of this small, already-4-bit (Q4_1 GGUF) model flips; see the closing notes.
    for (quant, paris) in report {
        if quant == "bf16" {
            assert!(paris, "SmolLM2 {quant}: no \"Paris\" in the answer");
        }
    }
}

#[test]
fn run_json_seed_and_stop_strings() {
    let Some(m) = model("run_json_seed_and_stop_strings", "q8") else {
        return;
    };
    let m = m.to_str().unwrap();
    let base = ["run", "-m", m, "-t", "1", "-n", "20", "--json"];
    let json = |extra: &[&str], stdin: &[u8]| -> serde_json::Value {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let (so, _) = ok(&args, stdin);
        serde_json::from_str(so.trim()).unwrap_or_else(|e| panic!("{e}: {so}"))
    };
    // prompt from stdin (`-p -`); ids decode to the text (tokenize -t model.fqm --decode)
    let v = json(
        &["--temp", "0", "-p", "-"],
        b"The three primary colors are\n",
    );
    let ids = v["ids"].to_string();
    let text = v["text"].as_str().unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 20);
    let (decoded, _) = ok(
        &["tokenize", "-t", m, "--decode", "--skip-special"],
        ids.as_bytes(),
    );
    assert_eq!(decoded, text);
    // no -p at all also reads stdin
    let v2 = json(&["--temp", "0"], b"The three primary colors are");
    assert_eq!(v2, v);

    // seeded sampling: same seed, same output; another seed, (almost surely) another
    let s = |seed: &str| {
        json(
            &["--temp", "1.0", "--seed", seed, "-p", "Once upon a time"],
            b"",
        )
    };
    let a = s("42");
    assert_eq!(a, s("42"));
    assert!(["1", "2", "3"].iter().any(|x| s(x)["ids"] != a["ids"]));

    // stop strings cut the text before the first occurrence
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[2];
    let cut = &text[..text.find(stop).unwrap()];
    let v = json(
        &[
            "--temp",
            "0",
            "--stop",
            stop,
            "--stop",
            "@@never@@",
            "-p",
            "-",
        ],
        b"The three primary colors are",
    );
    assert_eq!(v["text"].as_str().unwrap(), cut, "stop {stop:?}");

    // streaming output equals the --json text
    let (streamed, _) = ok(
        &[
            "run",
            "-m",
            m,
            "-t",
            "1",
            "-n",
            "20",
            "--temp",
            "0",
            "-p",
            "The three primary colors are",
        ],
        b"",
    );
    assert_eq!(streamed.strip_suffix('\n').unwrap(), text);
}

#[test]
fn chat_two_turns_reuse_the_cache() {
    let Some(m) = model("chat_two_turns_reuse_the_cache", "q8") else {
        return;
    };
    let m = m.to_str().unwrap();
    let (so, se) = ok(
        &[
            "chat",
            "-m",
            m,
            "-t",
            "1",
            "--temp",
            "0",
            "-n",
            "40",
            "--system",
            "You are a helpful assistant.",
        ],
        b"What is 2 + 2?\n\nAnd what is 3 + 3?\n",
    );
    eprintln!("{so}\n{se}");
    let turns: Vec<(usize, usize)> = se
        .lines()
        .filter(|l| l.starts_with("[turn "))
        .map(|l| {
            let num = |after: &str| -> usize {
                let i = l.find(after).unwrap_or_else(|| panic!("{after:?} in {l}"));
                l[..i].rsplit(' ').next().unwrap().parse().unwrap()
            };
            (num(" cached tokens reused"), num(" new prompt tokens"))
        })
        .collect();
    assert_eq!(
        turns.len(),
        2,
        "two turns (the empty line is skipped):\n{se}"
    );
    let (r1, p1) = turns[0];
    let (r2, p2) = turns[1];
    assert_eq!(r1, 0);
    assert!(
        r2 >= p1,
        "turn 2 reused {r2} tokens, turn 1's prompt was {p1}"
    );
    assert!(
        p2 < 25,
        "turn 2 processed {p2} prompt tokens: only the new turn"
    );
    assert!(so.lines().filter(|l| !l.is_empty()).count() >= 2, "{so}");
}

/// llama3-tiny (no tokenizer) and llama3-tiny + the SmolLM2 tokenizer.json (no chat
/// template), converted to f32.
fn tiny_models(dir: &Path) -> (PathBuf, PathBuf) {
    let src = support::fixture("models/llama3-tiny");
    let plain = dir.join("plain");
    let with_tok = dir.join("tok");
    for d in [&plain, &with_tok] {
        std::fs::create_dir_all(d).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), d.join(f)).unwrap();
        }
    }
    // the SmolLM2 tokenizer cut to the model's 384 ids
    std::fs::write(
        with_tok.join("tokenizer.json"),
        support::trim_tokenizer(&support::read_gz("smollm2-tokenizer.json.gz"), 384),
    )
    .unwrap();
    let mut out = Vec::new();
    for d in [&plain, &with_tok] {
        let o = d.with_extension("fqm");
        ok(
            &[
                "convert",
                d.to_str().unwrap(),
                "-o",
                o.to_str().unwrap(),
                "--quant",
                "f32",
            ],
            b"",
        );
        out.push(o);
    }
    (out[0].clone(), out[1].clone())
}

#[test]
fn errors_are_clear_and_never_panic() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (no_tok, no_template) = tiny_models(&dir);
    let (no_tok, no_template) = (no_tok.to_str().unwrap(), no_template.to_str().unwrap());
    fails(&["run", "-m", no_tok, "-p", "hi"], b"", "no tokenizer");
    fails(
        &["run", "-m", no_template, "--chat", "-p", "hi"],
        b"",
        "no chat template",
    );
    fails(&["chat", "-m", no_template], b"hi\n", "no chat template");
    fails(&["run", "-m", no_template, "-p", ""], b"", "empty");
    fails(&["run", "-m", no_template, "-p", "-"], b"", "empty");
    fails(&["run", "-m", no_template], b"  \n", "empty");
    fails(
        &["run", "-m", no_template, "-p", "-"],
        b"caf\xe9\n",
        "UTF-8",
    );
    fails(&["chat", "-m", no_template, "--bogus"], b"", "--bogus");
    fails(
        &["run", "-m", no_template, "-t", "100000", "-p", "hi"],
        b"",
        "at most 512",
    );
    // a directory where a model file is expected, or as the output
    let d = dir.to_str().unwrap();
    fails(&["inspect", d], b"", "is a directory");
    fails(&["run", "-m", d, "-p", "hi"], b"", "is a directory");
    let src = support::fixture("models/llama3-tiny");
    let src = src.to_str().unwrap();
    fails(&["convert", src, "-o", d], b"", "is a directory");
    let missing = dir.join("no/such/dir/x.fqm");
    fails(
        &["convert", src, "-o", missing.to_str().unwrap()],
        b"",
        "does not exist",
    );
    // a context beyond max_position_embeddings is refused naming the field; with
    // --ctx-override the cache that cannot be allocated is
    fails(
        &["run", "-m", no_template, "-c", "4097", "-p", "hi"],
        b"",
        "max_position_embeddings of 4096",
    );
    fails(
        &[
            "run",
            "-m",
            no_template,
            "-c",
            "100000000000",
            "-n",
            "100000000000",
            "-p",
            "hi",
            "--ctx-override",
        ],
        b"",
        "KV cache",
    );
    fails(
        &[
            "generate",
            "-m",
            no_template,
            "--ids",
            "1",
            "-n",
            "18446744073709551615",
        ],
        b"",
        "max_position_embeddings",
    );
    fails(
        &[
            "generate",
            "-m",
            no_template,
            "--ids",
            "1",
            "-n",
            "18446744073709551615",
            "--ctx-override",
        ],
        b"",
        "KV cache",
    );
    fails(
        &["run", "-m", no_template, "-p", "x", "--temp=-1"],
        b"",
        "temperature",
    );
    fails(
        &["run", "-m", "/nonexistent.fqm", "-p", "x"],
        b"",
        "/nonexistent.fqm",
    );
    fails(
        &[
            "run",
            "-m",
            no_template,
            "-c",
            "8",
            "-p",
            &"word ".repeat(20),
        ],
        b"",
        "context",
    );
    let _ = std::fs::remove_dir_all(&dir);

    if let Some(m) = model("errors_are_clear_and_never_panic", "q8") {
        let m = m.to_str().unwrap();
        fails(
            &["run", "-m", m, "-c", "16", "-p", &"word ".repeat(40)],
            b"",
            "context",
        );
        fails(&["chat", "-m", m], b"caf\xe9\n", "UTF-8");
        // a refused message (too long, invalid UTF-8) is skipped and the chat goes on; the
        // exit status still reports it
        let mut input = "word ".repeat(300).into_bytes();
        input.extend_from_slice(b"\ncaf\xe9\nWhat is the capital of France?\n");
        let out = ferroq(
            &["chat", "-m", m, "-c", "128", "-n", "8", "--temp", "0"],
            &input,
        );
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{se}");
        assert!(!se.contains("panicked"), "{se}");
        assert!(
            se.contains("skipped") && se.contains("2 message(s) were refused"),
            "{se}"
        );
        assert!(
            se.contains("[turn 1:") && !so.trim().is_empty(),
            "{so}\n{se}"
        );
        // -n at its maximum runs until the context is full (the sum overflowed into a context
        // of 1 token and an error)
        let (_, se) = ok(
            &[
                "run",
                "-m",
                m,
                "-n",
                "18446744073709551615",
                "-c",
                "24",
                "-p",
                "hi",
                "--temp",
                "0",
            ],
            b"",
        );
        assert!(se.contains("stopped"), "{se}");
    }
}

/// `ferroq bench` on models without a tokenizer (it works on token ids): the JSON object has
/// the fields the README promises, what was skipped or not measured is null, and bad arguments
/// are named errors. No timing is asserted, only that the numbers exist and are sane.
#[test]
fn bench_reports_json_and_rejects_bad_arguments() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let dense = dir.join("dense.fqm");
    let moe = dir.join("moe.fqm");
    for (src, out, quant) in [
        ("models/llama3-tiny", &dense, "q8"),
        ("models/llama4-scout-tiny", &moe, "q4l"),
    ] {
        let src = support::fixture(src);
        ok(
            &[
                "convert",
                src.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--quant",
                quant,
            ],
            b"",
        );
    }
    let json = |args: &[&str]| -> serde_json::Value {
        let (so, _) = ok(args, b"");
        serde_json::from_str(so.trim()).unwrap_or_else(|e| panic!("{e}: {so}"))
    };
    for m in [&dense, &moe] {
        let m = m.to_str().unwrap();
        let base = ["bench", "-m", m, "-r", "1", "-t", "2", "--json"];
        let v = json(&[&base[..], &["-p", "12", "-n", "5", "--bw-bytes", "0"]].concat());
        for f in ["pp_tps", "tg_tps", "load_ms", "peak_rss_mb", "tg_read_gbs"] {
            let x = v[f].as_f64().unwrap_or_else(|| panic!("{m}: `{f}` in {v}"));
            assert!(x.is_finite() && x >= 0.0, "{m}: {f} = {x}");
        }
        assert!(v["pp_tps"].as_f64().unwrap() > 0.0 && v["tg_tps"].as_f64().unwrap() > 0.0);
        assert!(v["peak_rss_mb"].as_f64().unwrap() > 0.0);
        assert!(v["bytes_per_token"].as_u64().unwrap() > 0);
        assert_eq!(
            (v["n_prompt"].as_u64(), v["n_gen"].as_u64()),
            (Some(12), Some(5))
        );
        assert!(v["machine_read_gbs"].is_null() && v["tg_bandwidth_share"].is_null());
        // skipped tests are null; the bandwidth probe, when asked for, is a number
        let v = json(&[&base[..], &["-p", "0", "-n", "3", "--bw-bytes", "67108864"]].concat());
        assert!(
            v["pp_tps"].is_null() && v["tg_tps"].as_f64().unwrap() > 0.0,
            "{v}"
        );
        assert!(v["machine_read_gbs"].as_f64().unwrap() > 0.0, "{v}");
        // the peak RSS is the tests', taken before the probe's 64 MiB buffer
        assert!(v["peak_rss_mb"].as_f64().unwrap() < 48.0, "{v}");
        let v = json(
            &[
                &base[..],
                &["-p", "7", "-b", "3", "-n", "0", "--bw-bytes", "0"],
            ]
            .concat(),
        );
        assert!(
            v["tg_tps"].is_null() && v["pp_tps"].as_f64().unwrap() > 0.0,
            "{v}"
        );
        assert_eq!(v["batch"].as_u64(), Some(3));
        // the table
        let (so, _) = ok(
            &[
                "bench",
                "-m",
                m,
                "-p",
                "6",
                "-n",
                "2",
                "-r",
                "2",
                "--bw-bytes",
                "0",
            ],
            b"",
        );
        assert!(so.contains("| pp6 |") && so.contains("| tg2 |"), "{so}");
        assert!(so.contains("not measured"), "{so}");
        // lists, like llama-bench: one JSON object per test and line, one table row per test
        let (so, _) = ok(
            &[
                "bench",
                "-m",
                m,
                "-r",
                "1",
                "--json",
                "-p",
                "6,9",
                "-n",
                "0,3",
                "-t",
                "1,2",
                "--bw-bytes",
                "0",
            ],
            b"",
        );
        let rows: Vec<serde_json::Value> = so
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        let names: Vec<(String, u64)> = rows
            .iter()
            .map(|v| {
                (
                    v["test"].as_str().unwrap().to_string(),
                    v["threads"].as_u64().unwrap(),
                )
            })
            .collect();
        let want = [
            ("pp6", 1),
            ("pp9", 1),
            ("tg3", 1),
            ("pp6", 2),
            ("pp9", 2),
            ("tg3", 2),
        ];
        assert_eq!(
            names,
            want.map(|(n, t)| (n.to_string(), t as u64)).to_vec(),
            "{so}"
        );
        for v in &rows {
            assert!(v["tps"].as_f64().unwrap() > 0.0, "{v}");
            assert_eq!(v["batch"].is_null(), v["test"] == "tg3", "{v}");
        }
        let (so, _) = ok(
            &[
                "bench",
                "-m",
                m,
                "-p",
                "5",
                "-b",
                "2,5",
                "-n",
                "0",
                "-r",
                "1",
                "--bw-bytes",
                "0",
            ],
            b"",
        );
        assert!(
            so.contains("| pp5 | 2 | 2 |") && so.contains("| pp5 | 2 | 5 |"),
            "{so}"
        );
        fails(&["bench", "-m", m, "-p", "4,x"], b"", "invalid");
        fails(&["bench", "-m", m, "-r", "0"], b"", "--reps");
        fails(&["bench", "-m", m, "-t", "2,100000"], b"", "threads");
        fails(
            &[
                "bench",
                "-m",
                m,
                "-p",
                "4",
                "-n",
                "1",
                "--bw-bytes",
                "18446744073709551615",
            ],
            b"",
            "bw-bytes",
        );
        fails(
            &["generate", "-m", m, "--ids", "1", "-t", "513"],
            b"",
            "threads",
        );
        fails(
            &["logits", "-m", m, "--ids", "1", "-t", "100000"],
            b"",
            "threads",
        );
        fails(&["bench", "-m", m, "--kv", "q3"], b"", "q3");
    }
    fails(
        &["bench", "-m", "/nonexistent.fqm", "-p", "4"],
        b"",
        "/nonexistent.fqm",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `run --prompt-cache FILE` (llama.cpp's flag): the first run saves the prompt's state, the
/// next ones load it and evaluate only what the cache lacks; the answer is the one of a run
/// without the cache; a file of another model or a damaged one is refused and kept.
#[test]
fn run_prompt_cache_reuses_the_saved_prompt() {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-pcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (no_tok, m) = tiny_models(&dir);
    let m = m.to_str().unwrap();
    let cache = dir.join("prompt.fqs");
    let c = cache.to_str().unwrap();
    let system = "the cat sat on the mat and looked at the door of the house";
    let long = format!("{system} and then it slept");
    let base = [
        "run", "-m", m, "--temp", "0", "-n", "6", "-t", "1", "--json",
    ];
    let run = |p: &str, cache: Option<&str>| {
        let mut args = base.to_vec();
        args.extend(["-p", p]);
        if let Some(c) = cache {
            args.extend(["--prompt-cache", c]);
        }
        ok(&args, b"")
    };
    let (want, _) = run(system, None);
    let (want_long, _) = run(&long, None);
    let (got, se) = run(system, Some(c));
    assert_eq!(got, want);
    assert!(se.contains("not found") && se.contains("saved"), "{se}");
    let saved = std::fs::read(&cache).unwrap();
    // the same prompt again: everything but its last token comes from the file; not saved again
    let (got, se) = run(system, Some(c));
    assert_eq!(got, want);
    assert!(se.contains("reused") && !se.contains("saved"), "{se}");
    assert_eq!(std::fs::read(&cache).unwrap(), saved);
    // a longer prompt: the cached part is reused, the file now holds the longer prompt
    let (got, se) = run(&long, Some(c));
    assert_eq!(got, want_long);
    let n_sys = ferroq_tokens(m, system);
    assert!(
        se.contains(&format!("reused {n_sys} of the prompt")),
        "{n_sys}: {se}"
    );
    assert!(se.contains("saved"), "{se}");
    // damaged or foreign files: refused, named, and left as they are
    let mut bad = std::fs::read(&cache).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    std::fs::write(&cache, &bad).unwrap();
    let mut args = base.to_vec();
    args.extend(["-p", system, "--prompt-cache", c]);
    fails(&args, b"", "checksum");
    fails(&args, b"", "prompt.fqs");
    assert_eq!(std::fs::read(&cache).unwrap(), bad);
    std::fs::write(&cache, &saved).unwrap();
    // no tokenizer: refused before the cache is read
    let nt = no_tok.to_str().unwrap();
    fails(
        &["run", "-m", nt, "-p", "x", "--prompt-cache", c],
        b"",
        "tokenizer",
    );
    assert_eq!(std::fs::read(&cache).unwrap(), saved);
}

/// Tokens of a plain prompt.
fn ferroq_tokens(model: &str, text: &str) -> usize {
    ferroq::internals::engine::Engine::open(model)
        .unwrap()
        .encode_prompt(text)
        .len()
}

/// `run --json-schema` / `-j`, `--json-schema-file` and `--json-object` constrain the answer
/// (greedy, SmolLM2): it parses and matches the schema; a bad schema is a clear error naming
/// the flag.
#[test]
fn run_json_schema_output_parses_and_matches() {
    let Some(m) = model("run_json_schema_output_parses_and_matches", "q8") else {
        return;
    };
    let m = m.to_str().unwrap();
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer"}, "pets": {"type": "array", "items": {"enum": ["cat", "dog"]},
        "maxItems": 3}}, "required": ["name", "age", "pets"], "additionalProperties": false}"#;
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut args = vec![
            "run", "-m", m, "-t", "1", "-n", "96", "--temp", "0", "--json",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-p", "Describe a person as JSON:"]);
        let (so, _) = ok(&args, b"");
        let v: serde_json::Value = serde_json::from_str(so.trim()).unwrap();
        let text = v["text"].as_str().unwrap().to_string();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: the answer {text:?}"))
    };
    let check = |v: &serde_json::Value| {
        let o = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"));
        assert_eq!(o.len(), 3, "{v}");
        assert!(
            o["name"].as_str().is_some_and(|s| s.chars().count() <= 20),
            "{v}"
        );
        assert!(o["age"].is_i64() || o["age"].is_u64(), "{v}");
        let pets = o["pets"].as_array().unwrap();
        assert!(
            pets.len() <= 3 && pets.iter().all(|p| p == "cat" || p == "dog"),
            "{v}"
        );
    };
    let a = run(&["-j", schema]);
    check(&a);
    let file = std::env::temp_dir().join(format!("ferroq-schema-{}.json", std::process::id()));
    std::fs::write(&file, schema).unwrap();
    assert_eq!(run(&["--json-schema-file", file.to_str().unwrap()]), a);
    std::fs::remove_file(&file).ok();
    assert!(run(&["--json-object"]).is_object());
    fails(
        &["run", "-m", m, "-j", "{\"type\": 7}", "-p", "hi"],
        b"",
        "--json-schema",
    );
    fails(
        &[
            "run",
            "-m",
            m,
            "--json-schema-file",
            "/nonexistent/s.json",
            "-p",
            "hi",
        ],
        b"",
        "/nonexistent/s.json",
    );
}
