//! Structured output: JSON and JSON Schema enforced while sampling.
//!
//! A [`Grammar`] is compiled once from a schema (or "any JSON object") into a graph that a
//! byte-level pushdown recognizer walks. A [`TokenIndex`] is built once per tokenizer (a trie
//! of the tokens' bytes). A [`GrammarMatcher`] follows one generation: before each token it
//! gives the mask of ids that keep the output valid (computed by one walk of the trie against
//! the recognizer, cached per state), and the end of generation is allowed only where the
//! value is complete. The output therefore always parses and matches the schema; a
//! generation cut by `max_tokens` is incomplete (OpenAI's `finish_reason: "length"`).
//!
//! ```
//! use std::sync::Arc;
//! use ferroq::internals::grammar::{Grammar, GrammarMatcher, TokenIndex};
//! let g = Grammar::from_schema_str(r#"{"type": "object", "properties":
//!     {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": false}"#)?;
//! let vocab: Vec<&[u8]> = vec![b"{", b"\"ok\"", b":", b"true", b"}", b" ", b"x"];
//! let ix = Arc::new(TokenIndex::from_bytes(&vocab, &[]));
//! let mut m = GrammarMatcher::new(Arc::new(g), ix);
//! assert_eq!(m.mask()[0], 0b1); // only `{`
//! for id in [0, 1, 2, 5, 3, 4] {
//!     m.accept_token(id)?;
//! }
//! assert!(m.can_end());
//! # Ok::<(), ferroq::Error>(())
//! ```
//!
//! Supported schema subset: `type` (`object`, `array`, `string`, `number`, `integer`,
//! `boolean`, `null`, and lists of them), `properties`, `required`, `additionalProperties`,
//! `items`, `enum`, `const`, `anyOf`, `oneOf` (generated as `anyOf`), `allOf` with one schema,
//! `$ref` to `#`, `#/$defs/...`, `#/definitions/...` (recursion allowed), `minItems`,
//! `maxItems`, `minLength`, `maxLength`, `nullable`. Annotations (`title`, `description`,
//! `default`, `format`, ...) are ignored. Other assertions (`pattern`, `minimum`, ...) are
//! refused with an error naming the keyword. See `docs/structured-output.md`.

mod matcher;
mod schema;
mod tokens;
mod validate;

pub use crate::sampling::apply_mask;
pub use schema::Json;
pub use tokens::{GrammarMatcher, TokenIndex};
pub use validate::validate;

use crate::{Error, Result};

/// Limits of generated JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrammarOptions {
    /// Most whitespace bytes in a row between the tokens of objects and arrays (0 = compact
    /// JSON). Bounded so that a model cannot loop on spaces.
    pub max_whitespace: u8,
    /// Deepest nesting of objects and arrays (free-form values and recursive schemas).
    pub max_depth: u32,
}

impl Default for GrammarOptions {
    fn default() -> Self {
        GrammarOptions {
            max_whitespace: 20,
            max_depth: 32,
        }
    }
}

/// A compiled JSON grammar. Immutable; share it in an `Arc`.
#[derive(Clone, Debug, PartialEq)]
pub struct Grammar {
    graph: schema::Graph,
    limits: matcher::Limits,
}

impl Grammar {
    fn new(graph: schema::Graph, o: &GrammarOptions) -> Grammar {
        Grammar {
            graph,
            limits: matcher::Limits {
                max_ws: o.max_whitespace,
                max_depth: o.max_depth.max(1),
            },
        }
    }

    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object() -> Grammar {
        Self::json_object_with(&GrammarOptions::default())
    }

    pub fn json_object_with(o: &GrammarOptions) -> Grammar {
        Grammar::new(schema::any_object(), o)
    }

    /// Compile a JSON Schema given as text (property order kept).
    pub fn from_schema_str(schema: &str) -> Result<Grammar> {
        let j: Json = serde_json::from_str(schema)
            .map_err(|e| Error::Input(format!("JSON schema: invalid JSON: {e}")))?;
        Self::from_schema(&j, &GrammarOptions::default())
    }

    /// Compile a JSON Schema.
    pub fn from_schema(schema: &Json, o: &GrammarOptions) -> Result<Grammar> {
        Ok(Grammar::new(schema::compile(schema)?, o))
    }

    /// Compile a schema from a `serde_json::Value` (whose objects may have lost the key order:
    /// properties are then generated in that value's order).
    pub fn from_schema_value(schema: &serde_json::Value) -> Result<Grammar> {
        Self::from_schema(&Json::from(schema), &GrammarOptions::default())
    }

    /// The grammar of an OpenAI `response_format` value: `{"type": "text"}` → `None`,
    /// `{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"name": ...,
    /// "schema": {...}, "strict": ...}}`. Errors name the field.
    pub fn from_response_format(rf: &Json, o: &GrammarOptions) -> Result<Option<Grammar>> {
        let bad = |m: &str| Error::Input(format!("`response_format`: {m}"));
        if !matches!(rf, Json::Obj(_)) {
            return Err(bad("must be an object"));
        }
        match rf.get("type") {
            Some(Json::Str(t)) if t == "text" => Ok(None),
            Some(Json::Str(t)) if t == "json_object" => Ok(Some(Self::json_object_with(o))),
            Some(Json::Str(t)) if t == "json_schema" => {
                let js = rf
                    .get("json_schema")
                    .ok_or_else(|| bad("`json_schema` is missing"))?;
                if !matches!(js, Json::Obj(_)) {
                    return Err(bad("`json_schema` must be an object"));
                }
                match js.get("name") {
                    None | Some(Json::Str(_)) => {}
                    Some(_) => return Err(bad("`json_schema.name` must be a string")),
                }
                match js.get("strict") {
                    None | Some(Json::Bool(_)) | Some(Json::Null) => {}
                    Some(_) => return Err(bad("`json_schema.strict` must be a boolean")),
                }
                // OpenAI: a missing schema means any JSON object
                match js.get("schema") {
                    None | Some(Json::Null) => Ok(Some(Self::json_object_with(o))),
                    Some(s) => Ok(Some(Self::from_schema(s, o)?)),
                }
            }
            Some(Json::Str(t)) => Err(bad(&format!(
                "unknown type {t:?} (expected \"text\", \"json_object\" or \"json_schema\")"
            ))),
            _ => Err(bad("`type` is missing")),
        }
    }

    /// The `response_format` of a request body (JSON text), order of the schema kept.
    /// `Ok(None)` when there is none or it is `{"type": "text"}`.
    pub fn from_request_body(body: &[u8], o: &GrammarOptions) -> Result<Option<Grammar>> {
        #[derive(serde::Deserialize)]
        struct Body {
            response_format: Option<Json>,
        }
        let b: Body = serde_json::from_slice(body)
            .map_err(|e| Error::Input(format!("invalid request body: {e}")))?;
        match b.response_format {
            None | Some(Json::Null) => Ok(None),
            Some(rf) => Self::from_response_format(&rf, o),
        }
    }
}

#[cfg(test)]
mod tests;
