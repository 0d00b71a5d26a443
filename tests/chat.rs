//! Chat templates render exactly as transformers' `apply_chat_template` (expected strings and ids
//! generated once by tests/fixtures/chat/gen_expected.py).

use std::io::Read;

use ferroq::internals::chat::{encode_chat, strftime, ChatTemplate, Message};
use ferroq::internals::tokenizer::Tokenizer;

fn fixture(path: &str) -> Vec<u8> {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
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

fn expected() -> serde_json::Value {
    serde_json::from_slice(&fixture("chat/expected.json")).unwrap()
}

fn check(model: &str, tmpl: &ChatTemplate, tok: &Tokenizer) {
    let exp = expected();
    let cases = exp[model]["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let text = tmpl.render(&msgs, agp).unwrap();
        assert_eq!(text, c["text"].as_str().unwrap(), "{model} {msgs:?} {agp}");
        let ids: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            encode_chat(tok, tmpl, &msgs, agp).unwrap(),
            ids,
            "{model} {msgs:?}"
        );
    }
}

#[test]
fn smollm2_template_matches_transformers() {
    let jinja = String::from_utf8(fixture("tokenizers/smollm2/chat_template.jinja")).unwrap();
    let tmpl = ChatTemplate::from_tokenizer_config(
        &fixture("tokenizers/smollm2/tokenizer_config.json"),
        Some(&jinja),
    )
    .unwrap();
    assert_eq!(tmpl.bos_token(), Some("<|im_start|>"));
    let tok = Tokenizer::from_hf_json(&fixture("tokenizers/smollm2/tokenizer.json.gz")).unwrap();
    check("smollm2", &tmpl, &tok);
}

#[test]
fn llama4_template_matches_transformers_and_spec() {
    let tmpl = ChatTemplate::from_tokenizer_config(
        &fixture("tokenizers/llama4/tokenizer_config.json"),
        None,
    )
    .unwrap();
    for tok in [
        Tokenizer::from_hf_json(&fixture("tokenizers/llama4/tokenizer.json.gz")).unwrap(),
        Tokenizer::from_tiktoken(&fixture("tokenizers/llama4/tokenizer.model.gz")).unwrap(),
    ] {
        check("llama4", &tmpl, &tok);
        // Spec §8 example, and no double BOS.
        let msgs = [
            Message::new("system", "You are a helpful assistant"),
            Message::new("user", "What is 2+2?"),
        ];
        let ids = encode_chat(&tok, &tmpl, &msgs, true).unwrap();
        assert_eq!(
            ids,
            vec![
                200000, 200005, 15651, 200006, 368, 4662, 583, 262, 19933, 43910, 200008, 200005,
                1556, 200006, 368, 3668, 373, 220, 30, 23, 30, 43, 200008, 200005, 140680, 200006,
                368
            ]
        );
        assert_eq!(ids.iter().filter(|&&i| i == 200000).count(), 1);
    }
}

#[test]
fn missing_template_is_a_clear_error() {
    let e = ChatTemplate::from_tokenizer_config(br#"{"bos_token": "<s>"}"#, None).unwrap_err();
    assert!(e.to_string().contains("no chat template"), "{e}");
    assert!(ChatTemplate::new("", None, None).is_err());
    assert!(ChatTemplate::from_tokenizer_config(b"not json", None).is_err());
    // Syntax errors are errors, not panics.
    assert!(ChatTemplate::new("{% for %}", None, None).is_err());
}

#[test]
fn python_helpers() {
    let t = ChatTemplate::new(
        "{% if messages|length == 0 %}{{ raise_exception('empty!') }}{% endif %}\
         {% for m in messages %}[{{ m['content'].strip() }}|{{ m.content.lstrip('x') }}|\
         {{ m.role.upper() }}|{{ m.content.startswith('  a') }}|{{ m.content.split()|length }}]\
         {% endfor %}{{ strftime_now('%d %b %Y') }}|{{ bos_token }}",
        Some("<s>".into()),
        None,
    )
    .unwrap();
    let mut t = t;
    t.set_now(Some(1_700_000_000)); // 2023-11-14T22:13:20Z
    let out = t
        .render(&[Message::new("user", "  a b \n")], false)
        .unwrap();
    assert_eq!(out, "[a b|  a b \n|USER|True|2]14 Nov 2023|<s>");
    let e = t.render(&[], false).unwrap_err();
    assert!(e.to_string().contains("empty!"), "{e}");
}

#[test]
fn strftime_directives() {
    assert_eq!(
        strftime("%Y-%m-%d %H:%M:%S %A %j", 0),
        "1970-01-01 00:00:00 Thursday 001"
    );
    assert_eq!(strftime("%d %B %Y %a", 951_782_400), "29 February 2000 Tue");
    assert_eq!(strftime("%j %%", 1_703_980_800), "365 %"); // 2023-12-31
}

#[test]
fn tojson_is_pythons_json_dumps() {
    // Expected strings from Python: json.dumps(messages, ensure_ascii=False) and indent=2.
    let t = ChatTemplate::new(
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ [] | tojson }}",
        None,
        None,
    )
    .unwrap();
    let out = t
        .render(&[Message::new("user", "a<b & 'c' é\t\u{1}")], false)
        .unwrap();
    assert_eq!(
        out,
        "[{\"role\": \"user\", \"content\": \"a<b & 'c' é\\t\\u0001\"}]|{\n  \"role\": \"user\",\n  \"content\": \"a<b & 'c' é\\t\\u0001\"\n}|[]"
    );
}
