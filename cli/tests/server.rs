//! `ferroq serve` end to end: the real binary on a loopback port, driven with plain HTTP from
//! Rust and with the official `openai` Python client. The model is `llama3-tiny` (random
//! weights) converted with a byte-level tokenizer and a ChatML template, so every test takes
//! seconds; greedy output over HTTP must equal `ferroq run`'s for the same prompt.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferroq"))
}

/// GPT-2's byte-to-character map of byte-level BPE.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(b) {
        return char::from(b);
    }
    let n = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

const TEMPLATE: &str =
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n\
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// llama3-tiny (vocabulary 384) with a tokenizer of the 256 bytes, some merges, and three
/// special tokens, converted once per test binary.
fn tiny_model() -> PathBuf {
    static LOCK: Mutex<Option<PathBuf>> = Mutex::new(None);
    let mut g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = g.as_ref() {
        return p.clone();
    }
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("server-{}", std::process::id()));
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(support::fixture("models/llama3-tiny").join(f), hf.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for b in 0..=255u8 {
        vocab.insert(byte_char(b).to_string(), json!(b));
    }
    // a few merges so words take fewer tokens than bytes
    let pairs = [
        ("e", " "),
        ("t", "h"),
        ("th", "e"),
        ("Ġ", "t"),
        ("a", "n"),
        ("i", "n"),
    ];
    let mut merges = Vec::new();
    let mut next = 259;
    for (a, b) in pairs {
        let m = format!("{a}{b}");
        if !vocab.contains_key(&m) && vocab.contains_key(a) && vocab.contains_key(b) {
            vocab.insert(m, json!(next));
            merges.push(format!("{a} {b}"));
            next += 1;
        }
    }
    let added: Vec<Value> = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": 256 + i, "content": t, "special": true,
                              "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false})
        })
        .collect();
    for (i, t) in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
        .iter()
        .enumerate()
    {
        vocab.insert(t.to_string(), json!(256 + i));
    }
    let tok = json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                          "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                    "use_regex": true},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges, "dropout": null,
                  "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false},
    });
    std::fs::write(hf.join("tokenizer.json"), serde_json::to_vec(&tok).unwrap()).unwrap();
    std::fs::write(
        hf.join("tokenizer_config.json"),
        serde_json::to_vec(&json!({
            "eos_token": "<|im_end|>", "bos_token": null, "add_bos_token": false,
            "chat_template": TEMPLATE,
        }))
        .unwrap(),
    )
    .unwrap();
    let out = dir.join("tiny.fqm");
    let st = Command::new(bin())
        .args([
            "convert",
            hf.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--quant",
            "q8",
        ])
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "convert: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    *g = Some(out.clone());
    out
}

/// A `ferroq serve` process on a free loopback port; killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let m = tiny_model();
        let mut child = Command::new(bin())
            .args(["serve", "-m", m.to_str().unwrap(), "--port", "0", "-t", "1"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ferroq serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let t0 = Instant::now();
        let addr = loop {
            line.clear();
            if err.read_line(&mut line).unwrap() == 0 || t0.elapsed() > Duration::from_secs(60) {
                let _ = child.kill();
                panic!("ferroq serve did not start: {line}");
            }
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // keep draining stderr so the server never blocks on a full pipe
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = err.read_to_end(&mut sink);
        });
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 response.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of an SSE body.
    fn sse(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .unwrap()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

fn send_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> TcpStream {
    let mut s = connect(addr);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

fn read_resp(s: TcpStream) -> Resp {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .expect("status")
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut b = vec![0; n + 2];
            r.read_exact(&mut b).unwrap();
            body.extend_from_slice(&b[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Resp {
    read_resp(send_raw(
        addr,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    ))
}

fn post(addr: SocketAddr, path: &str, v: &Value) -> Resp {
    request(addr, "POST", path, v.to_string().as_bytes())
}

/// `ferroq run --json` greedy: the text and ids.
fn ferroq_run(prompt: &str, chat: bool, n: usize) -> (String, usize) {
    let m = tiny_model();
    let n = n.to_string();
    let mut args = vec![
        "run",
        "-m",
        m.to_str().unwrap(),
        "--temp",
        "0",
        "-n",
        &n,
        "-t",
        "1",
        "--json",
        "-p",
        prompt,
    ];
    if chat {
        args.push("--chat");
    }
    let out = Command::new(bin()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        v["text"].as_str().unwrap().to_string(),
        v["ids"].as_array().unwrap().len(),
    )
}

fn completion(addr: SocketAddr, prompt: &str, n: usize) -> Value {
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": n, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// Streamed completion text (greedy).
fn stream_text(addr: SocketAddr, prompt: &str, n: usize) -> String {
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true}),
    );
    assert_eq!(r.status, 200);
    let ev = r.sse();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    ev[..ev.len() - 1]
        .iter()
        .map(|e| {
            let v: Value = serde_json::from_str(e).unwrap();
            assert!(v.get("error").is_none(), "{v}");
            v["choices"][0]["text"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn greedy_output_over_http_equals_ferroq_run() {
    let s = Server::start(&["--parallel", "2"]);
    for prompt in ["Once upon a time", "the quick brown fox"] {
        let (want, n_ids) = ferroq_run(prompt, false, 20);
        let v = completion(s.addr, prompt, 20);
        assert_eq!(v["choices"][0]["text"], want.as_str(), "{prompt:?}");
        assert_eq!(v["usage"]["completion_tokens"], n_ids);
        assert_eq!(stream_text(s.addr, prompt, 20), want, "streamed {prompt:?}");
    }
    let (want, _) = ferroq_run("Hello there", true, 16);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 16, "temperature": 0}),
    );
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
}

#[test]
fn endpoints_and_bad_input_errors_keep_the_server_serving() {
    let s = Server::start(&["-c", "64", "--max-body", "4096"]);
    let a = s.addr;
    let ok = |a| {
        let r = request(a, "GET", "/health", b"");
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["status"], "ok");
    };
    ok(a);
    let m = request(a, "GET", "/v1/models", b"").json();
    assert_eq!(m["object"], "list");
    let id = m["data"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(id, "tiny");
    // tokenize / detokenize round trip
    let t = post(a, "/tokenize", &json!({"content": "the cat"})).json();
    let ids = t["tokens"].as_array().unwrap().clone();
    assert!(!ids.is_empty());
    let d = post(a, "/detokenize", &json!({"tokens": ids})).json();
    assert_eq!(d["content"], "the cat");
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/completions",
            b"{\"prompt\": ".to_vec(),
            400,
            "not valid JSON",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "bogus": 1}"#.to_vec(),
            400,
            "unknown field `bogus`",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "max_tokens": "many"}"#.to_vec(),
            400,
            "invalid type",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "temperature": -1}"#.to_vec(),
            400,
            "temperature",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "n": 3}"#.to_vec(),
            400,
            "`n` = 1",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "max_tokens": 1000}"#.to_vec(),
            400,
            "context",
        ),
        (
            "/v1/completions",
            b"{\"prompt\": \"\xff\xfe\"}".to_vec(),
            400,
            "UTF-8",
        ),
        (
            "/v1/completions",
            br#"{"prompt": "x", "model": "gpt-9"}"#.to_vec(),
            404,
            "gpt-9",
        ),
        (
            "/v1/completions",
            br#"{"prompt": [999999]}"#.to_vec(),
            400,
            "out of range",
        ),
        ("/v1/completions", br#"[1, 2]"#.to_vec(), 400, "invalid"),
        (
            "/v1/chat/completions",
            br#"{"prompt": "x"}"#.to_vec(),
            400,
            "prompt",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": []}"#.to_vec(),
            400,
            "empty",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages": [{"role": "wizard", "content": "x"}]}"#.to_vec(),
            400,
            "role",
        ),
        ("/v1/completions", vec![b' '; 5000], 413, "limit"),
        ("/v1/nothing", b"{}".to_vec(), 404, "unknown endpoint"),
    ];
    for (path, body, status, want) in cases {
        let r = request(a, "POST", path, &body);
        assert_eq!(
            r.status,
            status,
            "{path} {:?}",
            String::from_utf8_lossy(&body)
        );
        let e = r.json();
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{path}: {msg:?} lacks {want:?}");
        assert!(e["error"]["type"].is_string());
        ok(a);
    }
    let r = request(a, "GET", "/v1/completions", b"");
    assert_eq!(r.status, 405);
    // a request still works after all that
    completion(a, "x", 3);
    let metrics = String::from_utf8(request(a, "GET", "/metrics", b"").body).unwrap();
    assert!(
        metrics.contains("ferroq_requests_errors_total"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ferroq_time_to_first_token_seconds_count 1"),
        "{metrics}"
    );
}

#[test]
fn api_key_is_required_when_set() {
    let s = Server::start(&["--api-key", "sekret"]);
    let body = json!({"prompt": "x", "max_tokens": 2}).to_string();
    let r = read_resp(send_raw(
        s.addr,
        "POST",
        "/v1/completions",
        &[],
        body.as_bytes(),
    ));
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = read_resp(send_raw(
        s.addr,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sekreT")],
        body.as_bytes(),
    ));
    assert_eq!(r.status, 401);
    let r = read_resp(send_raw(
        s.addr,
        "POST",
        "/v1/completions",
        &[("Authorization", "Bearer sekret")],
        body.as_bytes(),
    ));
    assert_eq!(r.status, 200);
    assert_eq!(request(s.addr, "GET", "/health", b"").status, 200);
}

#[test]
fn eight_clients_on_four_slots_get_their_own_streams() {
    let s = Server::start(&["--parallel", "4"]);
    let prompts: Vec<String> = (0..8).map(|i| format!("prompt number {i} says")).collect();
    let n = 24;
    // one client at a time first: the reference streams
    let want: Vec<String> = prompts.iter().map(|p| stream_text(s.addr, p, n)).collect();
    // a client that leaves mid-stream while the others run
    let addr = s.addr;
    let quitter = std::thread::spawn(move || {
        let body = json!({"prompt": "going away", "max_tokens": 200, "temperature": 0,
                          "stream": true})
        .to_string();
        let st = send_raw(addr, "POST", "/v1/completions", &[], body.as_bytes());
        let mut r = BufReader::new(st);
        let mut line = String::new();
        let mut events = 0;
        while events < 3 && r.read_line(&mut line).unwrap() > 0 {
            if line.starts_with("data: ") {
                events += 1;
            }
            line.clear();
        }
        // dropped here: the connection closes mid-stream
    });
    let handles: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| std::thread::spawn(move || stream_text(addr, &p, n)))
        .collect();
    for (h, w) in handles.into_iter().zip(&want) {
        assert_eq!(
            &h.join().unwrap(),
            w,
            "a stream differs from its single-client run"
        );
    }
    quitter.join().unwrap();
    // the quitter's slot was freed: the metrics count it, and the server still answers
    let t0 = Instant::now();
    loop {
        let m = String::from_utf8(request(addr, "GET", "/metrics", b"").body).unwrap();
        // The other streams' clients can see their last event before the scheduler frees
        // their slots, so wait for both the cancellation and all slots free.
        if m.contains("ferroq_requests_cancelled_total 1") && m.contains("ferroq_slots_busy 0") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no cancellation with all slots free seen:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(stream_text(addr, &prompts[0], n), want[0]);
}

#[test]
fn full_queue_answers_503_with_retry_after() {
    let s = Server::start(&["--parallel", "1", "--queue", "0"]);
    let addr = s.addr;
    let body = json!({"prompt": "long one", "max_tokens": 2000, "temperature": 0,
                      "stream": true, "stop": ["\u{1}never"]})
    .to_string();
    // hold the only slot with a long stream
    let st = send_raw(addr, "POST", "/v1/completions", &[], body.as_bytes());
    let mut r = BufReader::new(st);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        r.read_line(&mut line).unwrap();
    }
    let e = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(e.status, 503);
    assert_eq!(e.header("retry-after"), Some("1"));
    assert_eq!(e.json()["error"]["code"], "server_busy");
    drop(r);
}

#[test]
fn repeated_prefix_is_served_from_the_prompt_cache() {
    let s = Server::start(&["--parallel", "2"]);
    let system = "You are a helpful assistant who answers briefly. ".repeat(4);
    let msgs = |q: &str| {
        json!({"messages": [{"role": "system", "content": system},
                            {"role": "user", "content": q}],
               "max_tokens": 8, "temperature": 0})
    };
    let cold = post(s.addr, "/v1/chat/completions", &msgs("first question")).json();
    assert_eq!(cold["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let warm = post(s.addr, "/v1/chat/completions", &msgs("second question")).json();
    let cached = warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= system.len() as u64 / 4, "cached {cached}: {warm}");
    // the cached answer equals a fresh one
    let s2 = Server::start(&[]);
    let fresh = post(s2.addr, "/v1/chat/completions", &msgs("second question")).json();
    assert_eq!(
        warm["choices"][0]["message"]["content"],
        fresh["choices"][0]["message"]["content"]
    );
    let m = String::from_utf8(request(s.addr, "GET", "/metrics", b"").body).unwrap();
    assert!(m.contains("ferroq_prompt_cache_hits_total 1"), "{m}");
}

#[test]
fn logprobs_stop_and_usage_chunks() {
    let s = Server::start(&[]);
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "temperature": 0, "logprobs": true, "top_logprobs": 3}),
    );
    let v = r.json();
    let c = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        c.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    for e in c {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        // greedy: the chosen token is the most likely one
        assert_eq!(top[0]["logprob"], e["logprob"]);
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
    }
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let ev = r.sse();
    assert_eq!(ev.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let first: Value = serde_json::from_str(&ev[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    // a stop string cuts the text
    let full = completion(s.addr, "abc", 12)["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    if let Some(ch) = full.chars().nth(3).filter(|c| !c.is_whitespace()) {
        let stop = ch.to_string();
        let cut = post(
            s.addr,
            "/v1/completions",
            &json!({"prompt": "abc", "max_tokens": 12, "temperature": 0, "stop": stop}),
        )
        .json();
        assert_eq!(cut["choices"][0]["finish_reason"], "stop");
        let want = &full[..full.find(ch).unwrap()];
        assert_eq!(cut["choices"][0]["text"], want);
    }
}

/// The official `openai` Python client against the server.
#[test]
fn openai_python_client() {
    let py = Command::new("python3")
        .args(["-c", "import openai, jsonschema; print(openai.__version__)"])
        .output();
    match py {
        Ok(o) if o.status.success() => {}
        _ => {
            let bar = "!".repeat(78);
            eprintln!(
                "\n{bar}\n!!! SKIPPING openai_python_client: python3 with the `openai` and \
                 `jsonschema` packages is not available\n!!! (CI installs them: .ci/setup runs \
                 `pip install openai jsonschema`)\n{bar}\n"
            );
            return;
        }
    }
    let s = Server::start(&["--parallel", "2"]);
    let (want, _) = ferroq_run("Hello there", true, 12);
    let (want_c, _) = ferroq_run("Once upon a time", false, 12);
    let script = support::fixture("server/openai_client.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}/v1", s.addr))
        .env("WANT_CHAT", &want)
        .env("WANT_COMPLETION", &want_c)
        .env("SCHEMA", BOUNDED_SCHEMA)
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client failed:\n{so}\n{se}");
    assert!(so.contains("ALL OK"), "{so}\n{se}");
}

/// A schema whose every value is bounded (strings, arrays, integers): with whitespace runs of
/// at most 20 bytes, any value it admits is well under 1500 bytes, so a generation with that
/// budget must end complete, whatever the (random) weights pick.
const BOUNDED_SCHEMA: &str = r#"{
  "type": "object",
  "properties": {
    "name": {"type": "string", "maxLength": 6},
    "kind": {"enum": ["cat", "dog", 7, null]},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    "inner": {
      "type": "object",
      "properties": {"n": {"type": "integer"}, "flag": {"type": "boolean"}},
      "required": ["n", "flag"],
      "additionalProperties": false
    }
  },
  "required": ["name", "kind", "tags", "inner"],
  "additionalProperties": false
}"#;

/// Checked by hand (not by the crate's validator): the value has the schema's shape.
fn check_bounded(v: &Value) {
    let o = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"));
    for k in o.keys() {
        assert!(
            ["name", "kind", "ok", "tags", "inner"].contains(&k.as_str()),
            "extra key {k}: {v}"
        );
    }
    assert!(o["name"].as_str().unwrap().chars().count() <= 6, "{v}");
    assert!(
        [json!("cat"), json!("dog"), json!(7), Value::Null].contains(&o["kind"]),
        "{v}"
    );
    if let Some(b) = o.get("ok") {
        assert!(b.is_boolean(), "{v}");
    }
    let tags = o["tags"].as_array().unwrap();
    assert!(
        tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
        "{v}"
    );
    let inner = o["inner"].as_object().unwrap();
    assert_eq!(inner.len(), 2, "{v}");
    assert!(inner["n"].is_i64() || inner["n"].is_u64(), "{v}");
    assert!(inner["flag"].is_boolean(), "{v}");
}

/// A chat request with `response_format` given as JSON text (a `serde_json::Value` would sort
/// the schema's keys, and the properties are generated in the order of the text).
fn chat_json(addr: SocketAddr, rf: &str, seed: u64, max: usize, stream: bool) -> (String, String) {
    let body = format!(
        r#"{{"messages": [{{"role": "user", "content": "Describe a pet as JSON."}}],
            "response_format": {rf}, "max_tokens": {max}, "temperature": 1.0, "seed": {seed},
            "stream": {stream}}}"#
    );
    let r = request(addr, "POST", "/v1/chat/completions", body.as_bytes());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    if !stream {
        let v = r.json();
        let c = &v["choices"][0];
        return (
            c["message"]["content"].as_str().unwrap().to_string(),
            c["finish_reason"].as_str().unwrap().to_string(),
        );
    }
    let ev = r.sse();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let (mut text, mut finish) = (String::new(), String::new());
    for e in &ev[..ev.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("error").is_none(), "{v}");
        let c = &v["choices"][0];
        if let Some(t) = c["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish)
}

#[test]
fn response_format_json_schema_and_json_object() {
    use ferroq::internals::grammar::{Grammar, GrammarMatcher, Json, TokenIndex};
    use std::sync::Arc;
    let s = Server::start(&["--parallel", "2"]);
    let rf = format!(
        r#"{{"type": "json_schema", "json_schema": {{"name": "pet", "schema": {BOUNDED_SCHEMA},
            "strict": true}}}}"#
    );
    let doc: Json = serde_json::from_str(BOUNDED_SCHEMA).unwrap();
    for seed in 0..4 {
        let (text, finish) = chat_json(s.addr, &rf, seed, 1500, false);
        assert_eq!(finish, "stop", "seed {seed}: {text:?}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        check_bounded(&v);
        ferroq::internals::grammar::validate(&doc, &v).unwrap();
        // streamed: the same text for the same seed
        let (st, sf) = chat_json(s.addr, &rf, seed, 1500, true);
        assert_eq!((st.as_str(), sf.as_str()), (text.as_str(), "stop"));
    }
    // properties come in the order the schema declares them
    let (text, _) = chat_json(s.addr, &rf, 9, 1500, false);
    let at = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
    assert!(
        at("name") < at("kind") && at("kind") < at("tags") && at("tags") < at("inner"),
        "{text}"
    );

    // cut by max_tokens: `length`, and the text is a valid prefix that does not parse
    let prefix_ok = |g: Grammar, text: &str| {
        let ix = Arc::new(TokenIndex::from_bytes(&[], &[]));
        GrammarMatcher::new(Arc::new(g), ix).accept_bytes(text.as_bytes())
    };
    let (text, finish) = chat_json(s.addr, &rf, 1, 4, false);
    assert_eq!(finish, "length", "{text:?}");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text:?}");
    assert!(prefix_ok(
        Grammar::from_schema_str(BOUNDED_SCHEMA).unwrap(),
        &text
    ));

    // json_object on /v1/chat/completions and /v1/completions: complete outputs parse as
    // objects; cut ones are valid prefixes
    let obj = r#"{"type": "json_object"}"#;
    for seed in 0..6 {
        let (text, finish) = chat_json(s.addr, obj, seed, 48, seed % 2 == 1);
        if finish == "stop" {
            let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
            assert!(v.is_object(), "{text:?}");
        } else {
            assert_eq!(finish, "length");
            assert!(prefix_ok(Grammar::json_object(), &text), "{text:?}");
        }
        let body = format!(
            r#"{{"prompt": "x", "response_format": {rf}, "max_tokens": 1500, "seed": {seed}}}"#
        );
        let r = request(s.addr, "POST", "/v1/completions", body.as_bytes()).json();
        assert_eq!(r["choices"][0]["finish_reason"], "stop", "{r}");
        let v: Value = serde_json::from_str(r["choices"][0]["text"].as_str().unwrap()).unwrap();
        check_bounded(&v);
    }
    // `text` is plain generation
    let (_, finish) = chat_json(s.addr, r#"{"type": "text"}"#, 0, 5, false);
    assert_eq!(finish, "length");

    // refused schemas and formats: 400 naming the keyword, and the server keeps serving
    for (rf, want) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "z", "schema":
                {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]+$"}}}}}),
            "`pattern`",
        ),
        (
            json!({"type": "json_schema", "json_schema": {"name": "z", "schema":
                {"type": "integer", "minimum": 3}}}),
            "`minimum`",
        ),
        (json!({"type": "xml"}), "xml"),
        (json!({"type": "json_schema"}), "json_schema"),
        (json!("json"), "response_format"),
    ] {
        let r = post(
            s.addr,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "x"}], "response_format": rf}),
        );
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(&r.body));
        let e = r.json();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["param"], "response_format");
        let msg = e["error"]["message"].as_str().unwrap();
        assert!(msg.contains(want), "{msg}");
    }
    assert_eq!(
        completion(s.addr, "abc", 3)["choices"][0]["finish_reason"],
        "length"
    );
}
