//! JSON Schema (the subset that real clients send) compiled to a graph of [`Node`]s that the
//! byte-level matcher (`matcher.rs`) walks.
//!
//! Schemas are read with their key order kept ([`Json`]), because object properties are
//! generated in the order the schema declares them (as OpenAI's structured outputs do).

use std::collections::HashMap;
use std::fmt::Write as _;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::{Error, Result};

/// A JSON value that keeps the order of object keys (serde_json's `Value` sorts them).
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(serde_json::Number),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(m) => m.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Compact JSON text (the bytes a `const`/`enum` value is generated as).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        self.write(&mut s);
        s
    }

    fn write(&self, out: &mut String) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Json::Str(s) => out.push_str(&quote(s)),
            Json::Arr(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    v.write(out);
                }
                out.push(']');
            }
            Json::Obj(m) => {
                out.push('{');
                for (i, (k, v)) in m.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&quote(k));
                    out.push(':');
                    v.write(out);
                }
                out.push('}');
            }
        }
    }
}

/// `s` as a JSON string literal (quotes included).
fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

impl From<&serde_json::Value> for Json {
    fn from(v: &serde_json::Value) -> Json {
        use serde_json::Value as V;
        match v {
            V::Null => Json::Null,
            V::Bool(b) => Json::Bool(*b),
            V::Number(n) => Json::Num(n.clone()),
            V::String(s) => Json::Str(s.clone()),
            V::Array(a) => Json::Arr(a.iter().map(Json::from).collect()),
            V::Object(m) => Json::Obj(m.iter().map(|(k, v)| (k.clone(), Json::from(v))).collect()),
        }
    }
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_unit<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_none<E>(self) -> std::result::Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> std::result::Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_u64<E>(self, n: u64) -> std::result::Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_i64<E>(self, n: i64) -> std::result::Result<Json, E> {
                Ok(Json::Num(n.into()))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> std::result::Result<Json, E> {
                serde_json::Number::from_f64(n)
                    .map(Json::Num)
                    .ok_or_else(|| E::custom("non-finite number"))
            }
            fn visit_str<E>(self, s: &str) -> std::result::Result<Json, E> {
                Ok(Json::Str(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> std::result::Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> std::result::Result<Json, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Json::Arr(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> std::result::Result<Json, A::Error> {
                let mut m: Vec<(String, Json)> = Vec::new();
                while let Some((k, v)) = a.next_entry::<String, Json>()? {
                    // a repeated key: the last one wins, as in serde_json
                    if let Some(slot) = m.iter_mut().find(|(x, _)| *x == k) {
                        slot.1 = v;
                    } else {
                        m.push((k, v));
                    }
                }
                Ok(Json::Obj(m))
            }
        }
        d.deserialize_any(V)
    }
}

pub(crate) type NodeId = u32;

/// "No upper bound" for lengths and counts.
pub(crate) const UNBOUNDED: u32 = u32::MAX;

/// One declared property of an object.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Prop {
    /// The key as JSON text, quotes included (`"name"`).
    pub key: Box<[u8]>,
    pub node: NodeId,
    pub required: bool,
}

/// A node of the compiled grammar.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Node {
    /// Any one of these (after [`finish`], never another union).
    Union(Vec<NodeId>),
    /// Exactly one of these texts (sorted, deduplicated): `const`, `enum`, `true`, `null`...
    Literals(Vec<Box<[u8]>>),
    /// A string of `min..=max` characters (code points).
    String {
        min: u32,
        max: u32,
    },
    Number {
        integer: bool,
    },
    Array {
        items: NodeId,
        min: u32,
        max: u32,
    },
    /// Declared properties, generated in this order; `req_from[i]` is the index of the first
    /// required property at or after `i` (`props.len()` when none), one more entry than props.
    Object {
        props: Vec<Prop>,
        req_from: Vec<u32>,
    },
    /// Any keys, values of one node.
    Map {
        values: NodeId,
    },
}

/// Limits on what a schema may cost.
const MAX_NODES: usize = 100_000;
const MAX_SCHEMA_DEPTH: usize = 200;

/// Keywords this compiler handles. Any other keyword not in [`UNSUPPORTED`] (annotations such
/// as `title`, `description`, `default`, `examples`, `format`, `$defs`) is ignored, as JSON
/// Schema ignores unknown keywords.
const SUPPORTED: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "minItems",
    "maxItems",
    "minLength",
    "maxLength",
    "nullable",
    "uniqueItems",
];

/// Assertion keywords of JSON Schema that this compiler cannot enforce: a schema using one is
/// refused (naming it) rather than generating output that might not validate.
const UNSUPPORTED: &[&str] = &[
    "pattern",
    "patternProperties",
    "propertyNames",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "not",
    "if",
    "then",
    "else",
    "dependentRequired",
    "dependentSchemas",
    "dependencies",
    "contains",
    "minContains",
    "maxContains",
    "prefixItems",
    "additionalItems",
    "unevaluatedItems",
    "minProperties",
    "maxProperties",
    "$dynamicRef",
    "$recursiveRef",
    "contentEncoding",
    "contentSchema",
];

/// The compiled graph: nodes and the root.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Graph {
    pub nodes: Vec<Node>,
    pub root: NodeId,
    /// The node of a string with no limits (keys of [`Node::Map`]).
    pub string: NodeId,
}

fn err(path: &str, msg: impl std::fmt::Display) -> Error {
    let at = path.trim_start_matches('#');
    Error::Input(format!("JSON schema at `#{at}`: {msg}"))
}

struct Compiler<'a> {
    root: &'a Json,
    nodes: Vec<Node>,
    refs: HashMap<String, NodeId>,
    any: Option<NodeId>,
    string: NodeId,
}

const TYPES: [&str; 7] = [
    "null", "boolean", "object", "array", "string", "number", "integer",
];

/// The graph of "any JSON object" (`response_format: {"type": "json_object"}`).
pub(crate) fn any_object() -> Graph {
    let mut c = Compiler::new(&Json::Null);
    let any = c.any();
    let root = c.push(Node::Map { values: any });
    finish(c.nodes, root, c.string, "#").expect("the any-object graph is productive")
}

/// Compile a schema (the whole document: `$ref`s point into it).
pub(crate) fn compile(schema: &Json) -> Result<Graph> {
    let mut c = Compiler::new(schema);
    let root = c.schema(schema, "", 0)?;
    finish(c.nodes, root, c.string, "#")
}

impl<'a> Compiler<'a> {
    fn new(root: &'a Json) -> Compiler<'a> {
        let mut c = Compiler {
            root,
            nodes: Vec::new(),
            refs: HashMap::new(),
            any: None,
            string: 0,
        };
        c.string = c.push(Node::String {
            min: 0,
            max: UNBOUNDED,
        });
        c
    }

    fn push(&mut self, n: Node) -> NodeId {
        self.nodes.push(n);
        (self.nodes.len() - 1) as NodeId
    }

    fn check_size(&self, path: &str) -> Result<()> {
        if self.nodes.len() > MAX_NODES {
            return Err(err(
                path,
                format!("the schema is too large (more than {MAX_NODES} nodes)"),
            ));
        }
        Ok(())
    }

    /// Any JSON value.
    fn any(&mut self) -> NodeId {
        if let Some(a) = self.any {
            return a;
        }
        let id = self.push(Node::Union(Vec::new()));
        self.any = Some(id);
        let alts = vec![
            self.push(Node::Map { values: id }),
            self.push(Node::Array {
                items: id,
                min: 0,
                max: UNBOUNDED,
            }),
            self.string,
            self.push(Node::Number { integer: false }),
            self.push(literals(&["true", "false", "null"])),
        ];
        self.nodes[id as usize] = Node::Union(alts);
        id
    }

    fn schema(&mut self, s: &Json, path: &str, depth: usize) -> Result<NodeId> {
        self.check_size(path)?;
        if depth > MAX_SCHEMA_DEPTH {
            return Err(err(path, "the schema nests too deeply"));
        }
        let m = match s {
            Json::Bool(true) => return Ok(self.any()),
            Json::Bool(false) => {
                return Err(err(path, "the schema `false` admits no value"));
            }
            Json::Obj(m) => m,
            _ => return Err(err(path, "a schema must be an object or a boolean")),
        };
        for (k, _) in m {
            if UNSUPPORTED.contains(&k.as_str()) {
                return Err(err(
                    path,
                    format!("the keyword `{k}` is not supported in structured output"),
                ));
            }
        }
        if let Some(Json::Bool(true)) = s.get("uniqueItems") {
            return Err(err(
                path,
                "the keyword `uniqueItems` is not supported in structured output",
            ));
        }
        let assertions: Vec<&str> = m
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| SUPPORTED.contains(k) && *k != "uniqueItems")
            .collect();
        let only = |allowed: &[&str]| assertions.iter().all(|k| allowed.contains(k));

        if let Some(r) = s.get("$ref") {
            if !only(&["$ref"]) {
                return Err(err(
                    path,
                    "`$ref` next to other constraints is not supported (wrap them in `allOf`?)",
                ));
            }
            let r = r
                .as_str()
                .ok_or_else(|| err(path, "`$ref` must be a string"))?;
            return self.reference(r, path, depth);
        }
        for kw in ["anyOf", "oneOf", "allOf"] {
            let Some(list) = s.get(kw) else { continue };
            let sub = format!("{path}/{kw}");
            if !only(&[kw, "nullable"]) {
                return Err(err(
                    path,
                    format!("`{kw}` next to other constraints is not supported"),
                ));
            }
            let Json::Arr(list) = list else {
                return Err(err(&sub, "must be a list of schemas"));
            };
            if list.is_empty() {
                return Err(err(&sub, "must not be empty"));
            }
            if kw == "allOf" && list.len() > 1 {
                return Err(err(
                    &sub,
                    "`allOf` with more than one schema is not supported",
                ));
            }
            let mut alts = Vec::with_capacity(list.len() + 1);
            for (i, x) in list.iter().enumerate() {
                alts.push(self.schema(x, &format!("{sub}/{i}"), depth + 1)?);
            }
            if nullable(s, path)? {
                alts.push(self.push(literals(&["null"])));
            }
            return Ok(self.push(Node::Union(alts)));
        }

        if let Some(c) = s.get("const") {
            return self.literal_set(s, std::slice::from_ref(c), path);
        }
        if let Some(e) = s.get("enum") {
            let Json::Arr(list) = e else {
                return Err(err(&format!("{path}/enum"), "must be a list"));
            };
            return self.literal_set(s, list, path);
        }

        let types = types_of(s, path)?;
        let mut alts = Vec::new();
        for t in &types {
            alts.push(self.typed(t, s, path, depth)?);
        }
        if nullable(s, path)? && !types.contains(&"null") {
            alts.push(self.push(literals(&["null"])));
        }
        Ok(if alts.len() == 1 {
            alts[0]
        } else {
            self.push(Node::Union(alts))
        })
    }

    fn reference(&mut self, r: &str, path: &str, depth: usize) -> Result<NodeId> {
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = resolve(self.root, r).ok_or_else(|| {
            err(
                path,
                format!(
                    "`$ref` {r:?} does not point into this schema (only `#`, `#/$defs/...` \
                     and `#/definitions/...` are supported)"
                ),
            )
        })?;
        let id = self.push(Node::Union(Vec::new()));
        self.refs.insert(r.to_string(), id);
        let body = self.schema(target, r.trim_start_matches('#'), depth + 1)?;
        self.nodes[id as usize] = Node::Union(vec![body]);
        Ok(id)
    }

    fn literal_set(&mut self, s: &Json, values: &[Json], path: &str) -> Result<NodeId> {
        let types = match s.get("type") {
            Some(_) => Some(types_of(s, path)?),
            None => None,
        };
        let mut lits = Vec::new();
        for v in values {
            let ok = match &types {
                None => true,
                Some(ts) => ts.iter().any(|t| type_matches(t, v)),
            };
            if ok && length_ok(s, v) {
                lits.push(v.to_text().into_bytes().into_boxed_slice());
            }
        }
        if nullable(s, path)? {
            lits.push(b"null".to_vec().into_boxed_slice());
        }
        if lits.is_empty() {
            return Err(err(path, "no `enum`/`const` value matches the schema"));
        }
        lits.sort();
        lits.dedup();
        Ok(self.push(Node::Literals(lits)))
    }

    fn typed(&mut self, t: &str, s: &Json, path: &str, depth: usize) -> Result<NodeId> {
        Ok(match t {
            "null" => self.push(literals(&["null"])),
            "boolean" => self.push(literals(&["true", "false"])),
            "number" => self.push(Node::Number { integer: false }),
            "integer" => self.push(Node::Number { integer: true }),
            "string" => {
                let min = count(s, "minLength", path)?.unwrap_or(0);
                let max = count(s, "maxLength", path)?.unwrap_or(UNBOUNDED);
                if min == 0 && max == UNBOUNDED {
                    self.string
                } else {
                    self.push(Node::String { min, max })
                }
            }
            "array" => {
                let min = count(s, "minItems", path)?.unwrap_or(0);
                let max = count(s, "maxItems", path)?.unwrap_or(UNBOUNDED);
                let items = match s.get("items") {
                    None => self.any(),
                    Some(Json::Arr(_)) => {
                        return Err(err(
                            &format!("{path}/items"),
                            "a list of item schemas (tuple validation) is not supported",
                        ))
                    }
                    Some(x) => self.schema(x, &format!("{path}/items"), depth + 1)?,
                };
                self.push(Node::Array { items, min, max })
            }
            "object" => self.object(s, path, depth)?,
            _ => unreachable!("types_of checks the names"),
        })
    }

    fn object(&mut self, s: &Json, path: &str, depth: usize) -> Result<NodeId> {
        let mut required: Vec<&str> = Vec::new();
        match s.get("required") {
            None => {}
            Some(Json::Arr(a)) => {
                for x in a {
                    let k = x.as_str().ok_or_else(|| {
                        err(&format!("{path}/required"), "must be a list of strings")
                    })?;
                    if !required.contains(&k) {
                        required.push(k);
                    }
                }
            }
            Some(_) => {
                return Err(err(
                    &format!("{path}/required"),
                    "must be a list of strings",
                ))
            }
        }
        let props = match s.get("properties") {
            None => &[][..],
            Some(Json::Obj(m)) => &m[..],
            Some(_) => {
                return Err(err(
                    &format!("{path}/properties"),
                    "must be an object of schemas",
                ))
            }
        };
        let extra = s
            .get("additionalProperties")
            .or(s.get("unevaluatedProperties"));
        let closed = matches!(extra, Some(Json::Bool(false)));
        if props.is_empty() && required.is_empty() && !closed {
            // free-form object: any keys, values of `additionalProperties` (or anything)
            let values = match extra {
                None | Some(Json::Bool(true)) => self.any(),
                Some(x) => self.schema(x, &format!("{path}/additionalProperties"), depth + 1)?,
            };
            return Ok(self.push(Node::Map { values }));
        }
        let mut out = Vec::with_capacity(props.len() + required.len());
        for (k, v) in props {
            let node = self.schema(v, &format!("{path}/properties/{k}"), depth + 1)?;
            out.push(Prop {
                key: quote(k).into_bytes().into_boxed_slice(),
                node,
                required: required.contains(&k.as_str()),
            });
        }
        for r in &required {
            if props.iter().any(|(k, _)| k == r) {
                continue;
            }
            if closed {
                return Err(err(
                    path,
                    format!(
                        "`{r}` is required but not in `properties` and \
                         `additionalProperties` is false"
                    ),
                ));
            }
            let node = match extra {
                None | Some(Json::Bool(true)) => self.any(),
                Some(x) => self.schema(x, &format!("{path}/additionalProperties"), depth + 1)?,
            };
            out.push(Prop {
                key: quote(r).into_bytes().into_boxed_slice(),
                node,
                required: true,
            });
        }
        Ok(self.push(object(out)))
    }
}

fn object(props: Vec<Prop>) -> Node {
    let n = props.len();
    let mut req_from = vec![n as u32; n + 1];
    for i in (0..n).rev() {
        req_from[i] = if props[i].required {
            i as u32
        } else {
            req_from[i + 1]
        };
    }
    Node::Object { props, req_from }
}

fn literals(texts: &[&str]) -> Node {
    let mut v: Vec<Box<[u8]>> = texts
        .iter()
        .map(|t| t.as_bytes().to_vec().into_boxed_slice())
        .collect();
    v.sort();
    Node::Literals(v)
}

fn nullable(s: &Json, path: &str) -> Result<bool> {
    match s.get("nullable") {
        None => Ok(false),
        Some(Json::Bool(b)) => Ok(*b),
        Some(_) => Err(err(&format!("{path}/nullable"), "must be true or false")),
    }
}

fn count(s: &Json, key: &str, path: &str) -> Result<Option<u32>> {
    match s.get(key) {
        None => Ok(None),
        Some(Json::Num(n)) => {
            let v = n
                .as_u64()
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| err(&format!("{path}/{key}"), "must be a whole number >= 0"))?;
            Ok(Some(v.min(UNBOUNDED as u64 - 1) as u32))
        }
        Some(_) => Err(err(&format!("{path}/{key}"), "must be a whole number >= 0")),
    }
}

/// The types a schema admits: its `type` (a name or a list), or what its keywords imply.
fn types_of<'s>(s: &'s Json, path: &str) -> Result<Vec<&'s str>> {
    let bad = || {
        err(
            &format!("{path}/type"),
            "must be one of \"null\", \"boolean\", \"object\", \"array\", \"string\", \
             \"number\", \"integer\", or a list of them",
        )
    };
    let check = |t: &'s Json| -> Result<&'s str> {
        let t = t.as_str().ok_or_else(bad)?;
        if TYPES.contains(&t) {
            Ok(t)
        } else {
            Err(bad())
        }
    };
    let mut v = match s.get("type") {
        Some(Json::Arr(a)) => a.iter().map(check).collect::<Result<Vec<_>>>()?,
        Some(t) => vec![check(t)?],
        None => {
            let has = |ks: &[&str]| ks.iter().any(|k| s.get(k).is_some());
            let mut v = Vec::new();
            if has(&["properties", "required", "additionalProperties"]) {
                v.push("object");
            }
            if has(&["items", "minItems", "maxItems"]) {
                v.push("array");
            }
            if has(&["minLength", "maxLength"]) {
                v.push("string");
            }
            if v.len() != 1 {
                // nothing (or several kinds) implied: every type (each with its own keywords)
                v = vec!["object", "array", "string", "number", "boolean", "null"];
            }
            v
        }
    };
    if v.is_empty() {
        return Err(bad());
    }
    // `integer` is contained in `number`
    if v.contains(&"number") {
        v.retain(|t| *t != "integer");
    }
    v.dedup();
    Ok(v)
}

fn type_matches(t: &str, v: &Json) -> bool {
    match (t, v) {
        ("null", Json::Null) | ("boolean", Json::Bool(_)) => true,
        ("number", Json::Num(_)) | ("string", Json::Str(_)) => true,
        ("array", Json::Arr(_)) | ("object", Json::Obj(_)) => true,
        ("integer", Json::Num(n)) => {
            n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        _ => false,
    }
}

fn length_ok(s: &Json, v: &Json) -> bool {
    let n = |k: &str| match s.get(k) {
        Some(Json::Num(n)) => n.as_f64(),
        _ => None,
    };
    let len = match v {
        Json::Str(x) => x.chars().count() as f64,
        _ => return true,
    };
    n("minLength").is_none_or(|m| len >= m) && n("maxLength").is_none_or(|m| len <= m)
}

/// The schema `r` points to (`#`, `#/$defs/X`, `#/definitions/X`, or any JSON pointer).
pub(crate) fn resolve<'j>(root: &'j Json, r: &str) -> Option<&'j Json> {
    let p = r.strip_prefix('#')?;
    if p.is_empty() {
        return Some(root);
    }
    let mut cur = root;
    for part in p.strip_prefix('/')?.split('/') {
        let part = part.replace("~1", "/").replace("~0", "~");
        cur = match cur {
            Json::Obj(_) => cur.get(&part)?,
            Json::Arr(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

/// Flatten unions (no union lists a union; cycles through unions alone dropped) and prune
/// what can produce no finite value, so that every path the matcher can take can be finished.
fn finish(mut nodes: Vec<Node>, root: NodeId, string: NodeId, path: &str) -> Result<Graph> {
    let n = nodes.len();
    // 1. epsilon closure of unions
    let mut flat: Vec<Option<Vec<NodeId>>> = vec![None; n];
    for u in 0..n {
        if !matches!(nodes[u], Node::Union(_)) {
            continue;
        }
        let mut seen = vec![false; n];
        let mut out = Vec::new();
        let mut todo = vec![u as NodeId];
        seen[u] = true;
        while let Some(x) = todo.pop() {
            match &nodes[x as usize] {
                Node::Union(alts) => {
                    for &a in alts.iter().rev() {
                        if !seen[a as usize] {
                            seen[a as usize] = true;
                            todo.push(a);
                        }
                    }
                }
                _ => out.push(x),
            }
        }
        flat[u] = Some(out);
    }
    for (u, f) in flat.into_iter().enumerate() {
        if let Some(f) = f {
            nodes[u] = Node::Union(f);
        }
    }
    // 2. productive nodes (a finite value exists), by fixpoint
    let mut prod = vec![false; n];
    loop {
        let mut changed = false;
        for i in 0..n {
            if prod[i] {
                continue;
            }
            let p = match &nodes[i] {
                Node::Union(a) => a.iter().any(|&x| prod[x as usize]),
                Node::Literals(l) => !l.is_empty(),
                Node::String { min, max } => min <= max,
                Node::Number { .. } | Node::Map { .. } => true,
                Node::Array { items, min, max } => {
                    min <= max && (*min == 0 || prod[*items as usize])
                }
                Node::Object { props, .. } => {
                    props.iter().all(|p| !p.required || prod[p.node as usize])
                }
            };
            if p {
                prod[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    if !prod[root as usize] {
        return Err(err(
            path,
            "the schema admits no finite value (check `required`, `minItems`/`maxItems`, \
             `minLength`/`maxLength` and recursive `$ref`s)",
        ));
    }
    // 3. prune choices that lead nowhere
    for node in nodes.iter_mut() {
        let replace = match node {
            Node::Union(a) => {
                a.retain(|&x| prod[x as usize]);
                None
            }
            Node::Array { items, max, .. } if !prod[*items as usize] => {
                *max = 0;
                None
            }
            Node::Object { props, .. } if props.iter().any(|p| !prod[p.node as usize]) => {
                let kept: Vec<Prop> = std::mem::take(props)
                    .into_iter()
                    .filter(|p| prod[p.node as usize])
                    .collect();
                Some(object(kept))
            }
            Node::Map { values } if !prod[*values as usize] => Some(object(Vec::new())),
            _ => None,
        };
        if let Some(r) = replace {
            *node = r;
        }
    }
    Ok(Graph {
        nodes,
        root,
        string,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Json {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn keeps_key_order() {
        let j = parse(r#"{"b": 1, "a": [true, null, "x"], "c": {"z": 1.5, "y": -2}}"#);
        assert_eq!(
            j.to_text(),
            r#"{"b":1,"a":[true,null,"x"],"c":{"z":1.5,"y":-2}}"#
        );
    }

    #[test]
    fn unsupported_keywords_are_named() {
        for (s, kw) in [
            (r#"{"type": "string", "pattern": "^a+$"}"#, "pattern"),
            (r#"{"type": "integer", "minimum": 0}"#, "minimum"),
            (
                r#"{"type": "object", "properties": {"a": {"not": {}}}}"#,
                "not",
            ),
            (r#"{"type": "array", "uniqueItems": true}"#, "uniqueItems"),
        ] {
            let e = compile(&parse(s)).unwrap_err().to_string();
            assert!(e.contains(&format!("`{kw}`")), "{s}: {e}");
        }
        let e = compile(&parse(r#"{"properties": {"a": {"pattern": "x"}}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("#/properties/a"), "{e}");
    }

    #[test]
    fn impossible_schemas_are_refused() {
        for s in [
            r#"{"type": "string", "minLength": 5, "maxLength": 2}"#,
            r#"{"type": "array", "minItems": 3, "maxItems": 1}"#,
            r##"{"$ref": "#"}"##,
            r##"{"$defs": {"a": {"type": "object", "properties": {"x": {"$ref": "#/$defs/a"}},
                "required": ["x"]}}, "$ref": "#/$defs/a"}"##,
            r#"{"type": "string", "enum": [1, 2]}"#,
            r##"{"$ref": "#/$defs/missing"}"##,
            r#"{"type": "strin"}"#,
            r#"false"#,
        ] {
            assert!(compile(&parse(s)).is_err(), "{s}");
        }
    }

    #[test]
    fn unions_are_flat() {
        let g = compile(&parse(
            r##"{"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "string"},
                {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/a"}]}]}}, "$ref": "#/$defs/a"}"##,
        ))
        .unwrap();
        for n in &g.nodes {
            if let Node::Union(a) = n {
                for &x in a {
                    assert!(!matches!(g.nodes[x as usize], Node::Union(_)));
                }
            }
        }
    }
}
