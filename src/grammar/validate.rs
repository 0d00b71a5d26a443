//! A validator for the JSON Schema subset the compiler supports: checks that generated output
//! matches its schema (tests, the server's own checks). Independent of the compiler: it
//! reads the schema document directly.

use serde_json::Value;

use super::schema::{resolve, Json};

/// Check `v` against `schema` (the whole document, for `$ref`s). `Err` says where and why.
pub fn validate(schema: &Json, v: &Value) -> Result<(), String> {
    check(schema, schema, v, "$", 0)
}

fn num_eq(a: &serde_json::Number, b: &serde_json::Number) -> bool {
    match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a.as_f64() == b.as_f64(),
    }
}

/// JSON equality (numbers by value: `1` equals `1.0`).
fn eq(s: &Json, v: &Value) -> bool {
    match (s, v) {
        (Json::Null, Value::Null) => true,
        (Json::Bool(a), Value::Bool(b)) => a == b,
        (Json::Num(a), Value::Number(b)) => num_eq(a, b),
        (Json::Str(a), Value::String(b)) => a == b,
        (Json::Arr(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| eq(x, y))
        }
        (Json::Obj(a), Value::Object(b)) => {
            a.len() == b.len() && a.iter().all(|(k, x)| b.get(k).is_some_and(|y| eq(x, y)))
        }
        _ => false,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => match v {
            Value::Number(n) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        },
        _ => false,
    }
}

fn num(s: &Json, k: &str) -> Option<f64> {
    match s.get(k) {
        Some(Json::Num(n)) => n.as_f64(),
        _ => None,
    }
}

fn check(root: &Json, s: &Json, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > 400 {
        return Err(format!("{at}: schema recursion too deep"));
    }
    let fail = |m: String| Err(format!("{at}: {m}"));
    let m = match s {
        Json::Bool(true) => return Ok(()),
        Json::Bool(false) => return fail("the schema `false` admits nothing".into()),
        Json::Obj(m) => m,
        _ => return fail("schema is not an object".into()),
    };
    if let Some(Json::Bool(true)) = s.get("nullable") {
        if v.is_null() {
            return Ok(());
        }
    }
    for (k, x) in m {
        match k.as_str() {
            "$ref" => {
                let Json::Str(r) = x else {
                    return fail("bad $ref".into());
                };
                let t = resolve(root, r).ok_or_else(|| format!("{at}: unresolved {r}"))?;
                check(root, t, v, at, depth + 1)?;
            }
            "type" => {
                let ok = match x {
                    Json::Str(t) => type_ok(t, v),
                    Json::Arr(ts) => ts
                        .iter()
                        .any(|t| matches!(t, Json::Str(t) if type_ok(t, v))),
                    _ => false,
                };
                if !ok {
                    return fail(format!("{v} is not of type {}", x.to_text()));
                }
            }
            "enum" => {
                let Json::Arr(a) = x else {
                    return fail("bad enum".into());
                };
                if !a.iter().any(|e| eq(e, v)) {
                    return fail(format!("{v} is not one of {}", x.to_text()));
                }
            }
            "const" if !eq(x, v) => {
                return fail(format!("{v} is not {}", x.to_text()));
            }
            "anyOf" | "oneOf" | "allOf" => {
                let Json::Arr(a) = x else {
                    return fail(format!("bad {k}"));
                };
                let n = a
                    .iter()
                    .filter(|sub| check(root, sub, v, at, depth + 1).is_ok())
                    .count();
                let ok = match k.as_str() {
                    "anyOf" => n >= 1,
                    "oneOf" => n == 1,
                    _ => n == a.len(),
                };
                if !ok {
                    return fail(format!("{v} matches {n} of the {} schemas of {k}", a.len()));
                }
            }
            _ => {}
        }
    }
    match v {
        Value::String(t) => {
            let n = t.chars().count() as f64;
            if num(s, "minLength").is_some_and(|m| n < m)
                || num(s, "maxLength").is_some_and(|m| n > m)
            {
                return fail(format!(
                    "string of {n} characters is outside minLength/maxLength"
                ));
            }
        }
        Value::Array(a) => {
            let n = a.len() as f64;
            if num(s, "minItems").is_some_and(|m| n < m)
                || num(s, "maxItems").is_some_and(|m| n > m)
            {
                return fail(format!("{n} items is outside minItems/maxItems"));
            }
            if let Some(items) = s.get("items") {
                for (i, x) in a.iter().enumerate() {
                    check(root, items, x, &format!("{at}[{i}]"), depth + 1)?;
                }
            }
        }
        Value::Object(o) => {
            if let Some(Json::Arr(req)) = s.get("required") {
                for r in req {
                    if let Json::Str(r) = r {
                        if !o.contains_key(r) {
                            return fail(format!("required property {r:?} is missing"));
                        }
                    }
                }
            }
            let props = match s.get("properties") {
                Some(Json::Obj(p)) => &p[..],
                _ => &[],
            };
            let extra = s.get("additionalProperties");
            for (k, x) in o {
                let sub = format!("{at}.{k}");
                match props.iter().find(|(p, _)| p == k) {
                    Some((_, ps)) => check(root, ps, x, &sub, depth + 1)?,
                    None => match extra {
                        None | Some(Json::Bool(true)) => {}
                        Some(Json::Bool(false)) => {
                            return fail(format!("property {k:?} is not allowed"));
                        }
                        Some(es) => check(root, es, x, &sub, depth + 1)?,
                    },
                }
            }
        }
        _ => {}
    }
    Ok(())
}
