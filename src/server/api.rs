//! The OpenAI request bodies the server accepts, their validation, and OpenAI's error shape.
//!
//! Bodies are parsed from bytes by serde with `deny_unknown_fields`, so a misspelt or
//! unsupported field is an error that names it rather than a setting silently ignored.

use serde::Deserialize;
use serde_json::{json, Value};

/// An error answer: HTTP status and OpenAI's `{"error": {...}}` body.
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `server_error`, ...
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_request_error", message)
    }

    /// 400 about one parameter.
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::invalid(message)
        }
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

/// `stop`: one string or a list.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// `prompt` of `/v1/completions`.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<i64>),
    IdLists(Vec<Vec<i64>>),
}

#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// Accepted and ignored (usage is only sent at the end).
    pub continuous_usage_stats: Option<bool>,
}

/// The body of `/v1/chat/completions` and `/v1/completions` (one type: the fields of the
/// other endpoint are refused by [`GenRequest::check_endpoint`]).
#[derive(Deserialize, Debug, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct GenRequest {
    pub model: Option<String>,
    // chat
    pub messages: Option<Vec<Value>>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<Value>,
    pub max_completion_tokens: Option<i64>,
    pub top_logprobs: Option<i64>,
    // completions
    pub prompt: Option<Prompt>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    // both
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub stop: Option<OneOrMany>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    /// chat: a boolean; completions: the number of alternatives (0..=5).
    pub logprobs: Option<Value>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    pub user: Option<String>,
    pub metadata: Option<Value>,
    pub store: Option<bool>,
    pub service_tier: Option<String>,
}

/// Which endpoint a body was sent to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

/// Parse a JSON body with a clear message for each kind of problem.
pub fn parse_body<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, ApiError> {
    if let Err(e) = std::str::from_utf8(bytes) {
        return Err(ApiError::invalid(format!(
            "the request body is not valid UTF-8 (at byte {})",
            e.valid_up_to()
        )));
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::invalid(
            "the request body is empty; send a JSON object",
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let what = match e.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "the request body is not valid JSON"
            }
            _ => "invalid request",
        };
        ApiError::invalid(format!("{what}: {e}"))
    })
}

/// Sampling and length settings common to both endpoints, validated.
#[derive(Clone, Debug)]
pub struct Params {
    pub max_tokens: Option<usize>,
    pub sampler: crate::sampling::SamplerConfig,
    pub stop: Vec<String>,
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
}

/// Most stop strings per request (OpenAI allows 4).
pub const MAX_STOP: usize = 16;

fn finite(name: &str, v: Option<f32>, lo: f32, hi: f32) -> Result<Option<f32>, ApiError> {
    match v {
        Some(x) if !(x.is_finite() && (lo..=hi).contains(&x)) => Err(ApiError::param(
            name,
            format!("`{name}` must be a number in [{lo}, {hi}], got {x}"),
        )),
        v => Ok(v),
    }
}

impl GenRequest {
    /// Refuse fields that belong to the other endpoint and settings we do not support.
    pub fn check_endpoint(&self, ep: Endpoint) -> Result<(), ApiError> {
        let wrong = |f: &str, other: &str| {
            Err(ApiError::param(
                f,
                format!("unknown field `{f}` for this endpoint (it belongs to {other})"),
            ))
        };
        match ep {
            Endpoint::Chat => {
                if self.prompt.is_some() {
                    return wrong("prompt", "/v1/completions");
                }
                for (f, set) in [
                    ("echo", self.echo.is_some()),
                    ("suffix", self.suffix.is_some()),
                    ("best_of", self.best_of.is_some()),
                ] {
                    if set {
                        return wrong(f, "/v1/completions");
                    }
                }
                if self.messages.is_none() {
                    return Err(ApiError::param(
                        "messages",
                        "missing field `messages` (a list of {\"role\", \"content\"} objects)",
                    ));
                }
            }
            Endpoint::Completion => {
                for (f, set) in [
                    ("messages", self.messages.is_some()),
                    ("tools", self.tools.is_some()),
                    ("tool_choice", self.tool_choice.is_some()),
                    (
                        "max_completion_tokens",
                        self.max_completion_tokens.is_some(),
                    ),
                    ("top_logprobs", self.top_logprobs.is_some()),
                    ("parallel_tool_calls", self.parallel_tool_calls.is_some()),
                ] {
                    if set {
                        return wrong(f, "/v1/chat/completions");
                    }
                }
                if self.prompt.is_none() {
                    return Err(ApiError::param("prompt", "missing field `prompt`"));
                }
                if self.echo == Some(true) {
                    return Err(ApiError::param("echo", "`echo` is not supported"));
                }
                if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
                    return Err(ApiError::param("suffix", "`suffix` is not supported"));
                }
                if self.best_of.is_some_and(|b| b != 1) {
                    return Err(ApiError::param(
                        "best_of",
                        "only `best_of` = 1 is supported",
                    ));
                }
            }
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::param(
                    "n",
                    format!("only `n` = 1 is supported (got {n}); send one request per choice"),
                ));
            }
        }
        if self.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return Err(ApiError::param(
                "logit_bias",
                "`logit_bias` is not supported",
            ));
        }
        Ok(())
    }

    /// The validated sampling settings. `seed_default` is used when no seed is given.
    pub fn params(&self, ep: Endpoint, seed_default: u64) -> Result<Params, ApiError> {
        let temperature = finite("temperature", self.temperature, 0.0, 2.0)?.unwrap_or(1.0);
        let top_p = finite("top_p", self.top_p, 0.0, 1.0)?.unwrap_or(1.0);
        if top_p <= 0.0 {
            return Err(ApiError::param("top_p", "`top_p` must be > 0"));
        }
        let min_p = finite("min_p", self.min_p, 0.0, 1.0)?.unwrap_or(0.0);
        let presence = finite("presence_penalty", self.presence_penalty, -2.0, 2.0)?;
        let frequency = finite("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?;
        let repetition = finite("repetition_penalty", self.repetition_penalty, 0.01, 100.0)?;
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k < 0 => {
                return Err(ApiError::param("top_k", "`top_k` must be >= 0 (0 = off)"))
            }
            Some(k) => k.min(u32::MAX as i64) as usize,
        };
        let max = match (ep, self.max_completion_tokens, self.max_tokens) {
            (Endpoint::Chat, Some(m), _) => Some(("max_completion_tokens", m)),
            (_, _, Some(m)) => Some(("max_tokens", m)),
            _ => None,
        };
        let max_tokens = match max {
            None => None,
            Some((f, m)) if m < 1 => {
                return Err(ApiError::param(
                    f,
                    format!("`{f}` must be at least 1, got {m}"),
                ))
            }
            Some((_, m)) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::param(
                "stop",
                format!("at most {MAX_STOP} stop strings, got {}", stop.len()),
            ));
        }
        if stop.iter().any(|s| s.len() > 1024) {
            return Err(ApiError::param(
                "stop",
                "a stop string is longer than 1024 bytes",
            ));
        }
        let logprobs = match ep {
            Endpoint::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => {
                        return Err(ApiError::param("logprobs", "`logprobs` must be a boolean"))
                    }
                };
                let k = match self.top_logprobs {
                    None => 0,
                    Some(k) if !(0..=20).contains(&k) => {
                        return Err(ApiError::param(
                            "top_logprobs",
                            "`top_logprobs` must be in [0, 20]",
                        ))
                    }
                    Some(_) if !on => {
                        return Err(ApiError::param(
                            "top_logprobs",
                            "`top_logprobs` needs `logprobs`: true",
                        ))
                    }
                    Some(k) => k as usize,
                };
                on.then_some(k)
            }
            Endpoint::Completion => match &self.logprobs {
                None | Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_u64() {
                    Some(k) if k <= 5 => Some(k as usize),
                    _ => {
                        return Err(ApiError::param(
                            "logprobs",
                            "`logprobs` must be an integer in [0, 5]",
                        ))
                    }
                },
                Some(_) => {
                    return Err(ApiError::param(
                        "logprobs",
                        "`logprobs` must be an integer in [0, 5]",
                    ))
                }
            },
        };
        let stream = self.stream.unwrap_or(false);
        if self.stream_options.is_some() && !stream {
            return Err(ApiError::param(
                "stream_options",
                "`stream_options` is only allowed with `stream`: true",
            ));
        }
        let sampler = crate::sampling::SamplerConfig {
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty: repetition.unwrap_or(1.0),
            presence_penalty: presence.unwrap_or(0.0),
            frequency_penalty: frequency.unwrap_or(0.0),
            penalty_last_n: 0,
            seed: self.seed.map_or(seed_default, |s| s as u64),
        };
        sampler
            .validate()
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(Params {
            max_tokens,
            sampler,
            stop,
            logprobs,
            stream,
            include_usage: self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false),
        })
    }
}

/// The grammar of a request's `response_format` (read again from the body's bytes so that the
/// schema's property order is the order the client wrote). `None` for `{"type": "text"}` or
/// no `response_format`; an unsupported schema keyword is a 400 naming it.
pub fn response_format(
    body: &[u8],
    r: &GenRequest,
) -> Result<Option<std::sync::Arc<crate::grammar::Grammar>>, ApiError> {
    if r.response_format.as_ref().is_none_or(|v| v.is_null()) {
        return Ok(None);
    }
    crate::grammar::Grammar::from_request_body(body, &crate::grammar::GrammarOptions::default())
        .map(|g| g.map(std::sync::Arc::new))
        .map_err(|e| ApiError::param("response_format", e.to_string()))
}

/// The messages of a chat request as the template sees them: `content` made a string (a list
/// of text parts is joined), roles checked, `developer` read as `system`.
pub fn normalize_messages(messages: &[Value]) -> Result<Value, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::param("messages", "`messages` is empty"));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let p = format!("messages[{i}]");
        let Some(obj) = m.as_object() else {
            return Err(ApiError::param(&p, format!("`{p}` is not an object")));
        };
        let role = match obj.get("role").and_then(|r| r.as_str()) {
            Some(r @ ("system" | "user" | "assistant" | "tool" | "ipython")) => r,
            Some("developer") => "system",
            Some(r) => {
                return Err(ApiError::param(
                    &format!("{p}.role"),
                    format!(
                        "`{p}.role` is {r:?}; expected \"system\", \"developer\", \"user\", \
                         \"assistant\" or \"tool\""
                    ),
                ))
            }
            None => {
                return Err(ApiError::param(
                    &format!("{p}.role"),
                    format!("`{p}.role` is missing or not a string"),
                ))
            }
        };
        let mut o = serde_json::Map::new();
        for (k, v) in obj {
            match k.as_str() {
                "role" => {}
                "content" => {
                    let text = match v {
                        Value::Null => String::new(),
                        Value::String(s) => s.clone(),
                        Value::Array(parts) => {
                            let mut t = String::new();
                            for (j, part) in parts.iter().enumerate() {
                                match (
                                    part.get("type").and_then(|x| x.as_str()),
                                    part.get("text").and_then(|x| x.as_str()),
                                ) {
                                    (Some("text"), Some(s)) => t.push_str(s),
                                    _ => {
                                        return Err(ApiError::param(
                                            &format!("{p}.content[{j}]"),
                                            "only text content parts ({\"type\": \"text\", \
                                             \"text\": ...}) are supported",
                                        ))
                                    }
                                }
                            }
                            t
                        }
                        _ => {
                            return Err(ApiError::param(
                                &format!("{p}.content"),
                                format!("`{p}.content` must be a string or a list of text parts"),
                            ))
                        }
                    };
                    o.insert("content".into(), Value::String(text));
                }
                "name" | "tool_calls" | "tool_call_id" | "refusal" => {
                    o.insert(k.clone(), v.clone());
                }
                other => {
                    return Err(ApiError::param(
                        &format!("{p}.{other}"),
                        format!("unknown field `{other}` in `{p}`"),
                    ))
                }
            }
        }
        o.insert("role".into(), Value::String(role.to_string()));
        o.entry("content")
            .or_insert_with(|| Value::String(String::new()));
        out.push(Value::Object(o));
    }
    Ok(Value::Array(out))
}

/// `/tokenize` (llama-server's shape).
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    pub content: String,
    /// Add the BOS token as plain prompts get it (default true, as llama-server).
    pub add_special: Option<bool>,
    /// Also return each token's text.
    pub with_pieces: Option<bool>,
    pub model: Option<String>,
}

/// `/detokenize`.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub tokens: Vec<i64>,
    pub model: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_or_name_the_problem() {
        let r: GenRequest =
            parse_body(br#"{"model":"m","prompt":"hi","max_tokens":3,"stop":"x"}"#).unwrap();
        assert!(matches!(r.prompt, Some(Prompt::Text(_))));
        let e = parse_body::<GenRequest>(br#"{"prompt":"hi","bogus":1}"#).unwrap_err();
        assert!(e.message.contains("unknown field `bogus`"), "{}", e.message);
        let e = parse_body::<GenRequest>(br#"{"prompt":"hi","max_tokens":"x"}"#).unwrap_err();
        assert!(e.message.contains("invalid type"), "{}", e.message);
        let e = parse_body::<GenRequest>(b"{\"prompt\":").unwrap_err();
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        let e = parse_body::<GenRequest>(b"{\"prompt\":\"\xff\"}").unwrap_err();
        assert!(e.message.contains("UTF-8"), "{}", e.message);
        assert_eq!(e.status, 400);
    }

    #[test]
    fn params_are_checked() {
        let r = GenRequest {
            prompt: Some(Prompt::Text("x".into())),
            temperature: Some(f32::NAN),
            ..GenRequest::default()
        };
        assert!(r.params(Endpoint::Completion, 0).is_err());
        let r = GenRequest {
            n: Some(2),
            prompt: Some(Prompt::Text("x".into())),
            ..GenRequest::default()
        };
        assert_eq!(
            r.check_endpoint(Endpoint::Completion).unwrap_err().status,
            400
        );
        let m = normalize_messages(&[json!({"role": "developer", "content": [
            {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]})])
        .unwrap();
        assert_eq!(m[0]["role"], "system");
        assert_eq!(m[0]["content"], "ab");
        assert!(normalize_messages(&[json!({"role": "wizard", "content": "x"})]).is_err());
    }
}
