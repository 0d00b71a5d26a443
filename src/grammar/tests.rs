use std::sync::Arc;

use super::*;

fn matcher(g: Grammar) -> GrammarMatcher {
    // a byte vocabulary: id = byte
    let bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
    let refs: Vec<&[u8]> = bytes.iter().map(|b| &b[..]).collect();
    GrammarMatcher::new(Arc::new(g), Arc::new(TokenIndex::from_bytes(&refs, &[])))
}

/// Whether `text` is a complete value of the grammar.
fn complete(g: &Grammar, text: &str) -> bool {
    let mut m = matcher(g.clone());
    m.accept_bytes(text.as_bytes()) && m.can_end()
}

/// Whether `text` can be continued into a value.
fn prefix(g: &Grammar, text: &str) -> bool {
    matcher(g.clone()).accept_bytes(text.as_bytes())
}

fn schema(s: &str) -> Grammar {
    Grammar::from_schema_str(s).unwrap()
}

#[test]
fn any_object() {
    let g = Grammar::json_object();
    for ok in [
        "{}",
        r#"{"a":1}"#,
        r#"{ "a" : 1 }"#.replace(" :", ":").as_str(),
        r#"{"a": [1, -2.5e+3, "x\n\u00e9\"", true, null, {"b": {}}], "c": false}"#,
        "{\n  \"k\": \"\u{1F600} ok\"\n}",
        r#"{"":0,"":-0}"#,
    ] {
        assert!(complete(&g, ok), "{ok}");
    }
    for bad in [
        "[]",
        "1",
        " {}",
        "{}x",
        r#"{"a"}"#,
        r#"{"a":01}"#,
        r#"{"a":1,}"#,
        r#"{"a":.5}"#,
        r#"{"a":"\x"}"#,
        "{\"a\":\"\u{1}\"}",
        r#"{"a":"\ud800"}"#,
        r#"{"a":tru}"#,
        r#"{"a":1.}"#,
        r#"{"a":1e}"#,
    ] {
        assert!(!complete(&g, bad), "{bad}");
    }
    // prefixes
    assert!(prefix(&g, r#"{"a": [1, 2"#));
    assert!(!complete(&g, r#"{"a": [1, 2"#));
    // invalid UTF-8 never gets in: overlong, surrogate, truncated
    for b in [
        &b"{\"a\":\"\xC0\xAF\"}"[..],
        b"{\"a\":\"\xED\xA0\x80\"}",
        b"{\"a\":\"\xF5",
    ] {
        let mut m = matcher(g.clone());
        assert!(!(m.accept_bytes(b) && m.can_end()), "{b:?}");
    }
}

#[test]
fn whitespace_is_bounded() {
    let g = Grammar::json_object_with(&GrammarOptions {
        max_whitespace: 3,
        ..GrammarOptions::default()
    });
    assert!(complete(&g, "{   }"));
    assert!(!prefix(&g, "{    "));
    assert!(complete(&g, "{\"a\":   1   ,   \"b\":2}"));
    let compact = Grammar::json_object_with(&GrammarOptions {
        max_whitespace: 0,
        ..GrammarOptions::default()
    });
    assert!(!prefix(&compact, "{ "));
    assert!(complete(&compact, r#"{"a":[1,{"b":null}]}"#));
}

#[test]
fn depth_is_bounded() {
    let g = Grammar::json_object_with(&GrammarOptions {
        max_depth: 3,
        ..GrammarOptions::default()
    });
    assert!(complete(&g, r#"{"a":[{"b":1}]}"#));
    assert!(!prefix(&g, r#"{"a":[{"b":["#));
}

#[test]
fn objects_in_declared_order() {
    let g = schema(
        r#"{"type": "object", "properties": {"name": {"type": "string"},
            "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["name", "tags"], "additionalProperties": false}"#,
    );
    assert!(complete(&g, r#"{"name":"a","age":3,"tags":[]}"#));
    assert!(complete(&g, r#"{"name": "a", "tags": ["x", "y"]}"#));
    assert!(!complete(&g, r#"{"name":"a"}"#)); // tags required
    assert!(!prefix(&g, r#"{"age":3"#)); // name first
    assert!(!prefix(&g, r#"{"name":"a","name""#)); // no repeats
    assert!(!prefix(&g, r#"{"name":"a","x""#)); // no other keys
    assert!(!prefix(&g, r#"{"name":"a","age":3.5"#)); // integer
    assert!(!prefix(&g, r#"{"name":1"#));
    // keys sharing a prefix
    let g = schema(
        r#"{"properties": {"ab": {"const": 1}, "a": {"const": 2}, "abc": {"const": 3}},
            "additionalProperties": false}"#,
    );
    for ok in [
        r#"{"ab":1,"a":2,"abc":3}"#,
        r#"{"a":2}"#,
        r#"{"abc":3}"#,
        "{}",
    ] {
        assert!(complete(&g, ok), "{ok}");
    }
    assert!(!prefix(&g, r#"{"a":1"#));
}

#[test]
fn literals_and_unions() {
    let g = schema(r#"{"enum": ["red", "green", 1, 12, 1.5, null, {"a": [true]}]}"#);
    for ok in [
        r#""red""#,
        r#""green""#,
        "1",
        "12",
        "1.5",
        "null",
        r#"{"a":[true]}"#,
    ] {
        assert!(complete(&g, ok), "{ok}");
    }
    for bad in [r#""blue""#, "2", "123", "1.", "true"] {
        assert!(!complete(&g, bad), "{bad}");
    }
    let g = schema(
        r#"{"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "maxLength": 2},
            {"type": "integer"}, {"type": "array", "items": {"type": "null"}, "maxItems": 2}]}},
            "required": ["v"], "additionalProperties": false}"#,
    );
    for ok in [
        r#"{"v":"ab"}"#,
        r#"{"v":-12}"#,
        r#"{"v":[null,null]}"#,
        r#"{"v":[]}"#,
    ] {
        assert!(complete(&g, ok), "{ok}");
    }
    for bad in [
        r#"{"v":"abc"}"#,
        r#"{"v":1.5}"#,
        r#"{"v":[null,null,null]}"#,
        r#"{"v":true}"#,
    ] {
        assert!(!complete(&g, bad), "{bad}");
    }
    // two object alternatives, told apart late
    let g = schema(
        r#"{"oneOf": [
            {"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer"}},
             "required": ["kind", "lives"], "additionalProperties": false},
            {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}},
             "required": ["kind", "good"], "additionalProperties": false}]}"#,
    );
    assert!(complete(&g, r#"{"kind":"cat","lives":9}"#));
    assert!(complete(&g, r#"{"kind":"dog","good":true}"#));
    assert!(!complete(&g, r#"{"kind":"cat","good":true}"#));
    let g = schema(r#"{"type": ["string", "null"], "minLength": 1}"#);
    assert!(complete(&g, "null") && complete(&g, r#""x""#) && !complete(&g, r#""""#));
}

#[test]
fn lengths_count_characters() {
    let g = schema(r#"{"type": "string", "minLength": 2, "maxLength": 3}"#);
    for ok in [r#""ab""#, r#""abc""#, "\"é\u{1F600}\"", r#""\n\u0041""#] {
        assert!(complete(&g, ok), "{ok}");
    }
    for bad in [r#""a""#, r#""abcd""#, r#""\u00e9""#, "\"é\u{1F600}xy\""] {
        assert!(!complete(&g, bad), "{bad}");
    }
    let g = schema(r#"{"type": "array", "minItems": 2, "items": {"type": "boolean"}}"#);
    assert!(!complete(&g, "[true]") && complete(&g, "[true,false]"));
    assert!(complete(&g, "[true,false,true,true]"));
}

#[test]
fn recursive_refs() {
    let g = schema(
        r##"{"$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["value", "children"], "additionalProperties": false}},
            "$ref": "#/$defs/node"}"##,
    );
    assert!(complete(
        &g,
        r#"{"value":1,"children":[{"value":2,"children":[]},{"value":3,"children":[{"value":4,"children":[]}]}]}"#
    ));
    assert!(!complete(&g, r#"{"value":1,"children":[{"value":2}]}"#));
    let g = schema(
        r##"{"definitions": {"list": {"anyOf": [{"type": "null"}, {"type": "object",
            "properties": {"head": {"type": "number"}, "tail": {"$ref": "#/definitions/list"}},
            "required": ["head", "tail"], "additionalProperties": false}]}},
            "$ref": "#/definitions/list"}"##,
    );
    assert!(complete(&g, r#"{"head":1,"tail":{"head":2,"tail":null}}"#));
}

#[test]
fn top_level_numbers_end_where_complete() {
    let g = schema(r#"{"type": "number"}"#);
    let mut m = matcher(g);
    assert!(m.accept_bytes(b"-1"));
    assert!(m.can_end());
    assert!(m.accept_bytes(b".5e"));
    assert!(!m.can_end());
    assert!(m.accept_bytes(b"3"));
    assert!(m.can_end());
    // once a string is complete nothing more is allowed
    let mut m = matcher(schema(r#"{"type": "string"}"#));
    assert!(m.accept_bytes(b"\"x\""));
    assert!(m.is_done() && m.can_end() && !m.accept_bytes(b" "));
}

#[test]
fn response_format() {
    let o = GrammarOptions::default();
    let f = |s: &str| Grammar::from_request_body(s.as_bytes(), &o);
    assert!(f(r#"{"model": "x"}"#).unwrap().is_none());
    assert!(f(r#"{"response_format": {"type": "text"}}"#)
        .unwrap()
        .is_none());
    assert_eq!(
        f(r#"{"response_format": {"type": "json_object"}}"#).unwrap(),
        Some(Grammar::json_object())
    );
    let g = f(
        r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "x",
        "strict": true, "schema": {"type": "object", "properties": {"b": {"type": "null"},
        "a": {"type": "null"}}, "required": ["b", "a"], "additionalProperties": false}}}}"#,
    )
    .unwrap()
    .unwrap();
    // the schema's order, not alphabetical
    assert!(complete(&g, r#"{"b":null,"a":null}"#));
    for (body, what) in [
        (r#"{"response_format": {"type": "xml"}}"#, "unknown type"),
        (
            r#"{"response_format": {"type": "json_schema"}}"#,
            "`json_schema` is missing",
        ),
        (
            r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "a"}}}}"#,
            "`pattern`",
        ),
        (r#"{"response_format": 3}"#, "must be an object"),
    ] {
        let e = f(body).unwrap_err().to_string();
        assert!(e.contains(what), "{body}: {e}");
    }
}

#[test]
fn validator_agrees_on_examples() {
    let s: Json = serde_json::from_str(
        r##"{"$defs": {"p": {"type": "object", "properties": {"n": {"type": "string", "maxLength": 3}},
        "required": ["n"], "additionalProperties": false}},
        "type": "array", "items": {"$ref": "#/$defs/p"}, "minItems": 1}"##,
    )
    .unwrap();
    let v = |t: &str| validate(&s, &serde_json::from_str(t).unwrap());
    assert!(v(r#"[{"n": "abc"}]"#).is_ok());
    assert!(v(r#"[]"#).is_err());
    assert!(v(r#"[{"n": "abcd"}]"#).is_err());
    assert!(v(r#"[{"n": "a", "m": 1}]"#).is_err());
    assert!(v(r#"[{}]"#).is_err());
}
