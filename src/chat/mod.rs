//! Chat templates: render a model's Jinja chat template as transformers' `apply_chat_template`
//! does (same Jinja settings: `trim_blocks`, `lstrip_blocks`, loop controls; the globals
//! `raise_exception` and `strftime_now`; the special-token variables; common Python string and
//! dict methods such as `.strip()` and `.items()`).
//!
//! The rendered prompt already contains the BOS token when the template writes `bos_token`, so
//! it must be tokenized without adding another one: use [`encode_chat`].

mod guard;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::machinery::{make_string_output, CompiledTemplate, TemplateConfig, Vm};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, ErrorKind, State};
use serde::Serialize;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";

/// Work one render may do, in minijinja instructions ("fuel"). Real chat templates use a few
/// dozen per message (a 1,000-message conversation with the Llama 4 template: well under 10^5);
/// a template looping `range(100000)` inside `range(100000)` runs out after a fraction of a
/// second instead of hanging.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Most bytes a render may produce: 1 MiB plus 8 × the conversation's text (a template
/// writes each message once or twice, plus its markup).
pub fn template_output_cap(messages: &[Message]) -> usize {
    let text: usize = messages
        .iter()
        .map(|m| m.content.len() + m.role.len())
        .sum();
    output_cap_for(text)
}

/// The output cap for a conversation of `text` bytes: 1 MiB + 8 × the text.
fn output_cap_for(text: usize) -> usize {
    text.saturating_mul(8).saturating_add(1 << 20)
}

/// Bytes all the values one render builds may take together: 512 MiB + 64 × the output cap
/// (no single value may exceed the output cap; see `guard`). Every value built is counted,
/// also the ones dropped since: a template that accumulates the whole conversation in a
/// variable (`{% set ns.s = ns.s + m.content %}`) builds a quadratic number of bytes, and is
/// refused past some thousands of messages (real templates write each message out instead).
fn work_bytes_for(cap: usize) -> usize {
    cap.saturating_mul(64).saturating_add(512 << 20)
}

/// How the template is compiled: transformers' Jinja settings.
fn template_config() -> TemplateConfig {
    TemplateConfig {
        syntax_config: Default::default(),
        ws_config: minijinja::machinery::WhitespaceConfig {
            keep_trailing_newline: false,
            lstrip_blocks: true,
            trim_blocks: true,
        },
        default_auto_escape: Arc::new(|_: &str| AutoEscape::None),
    }
}

/// Compile `source` with the growing operators replaced by checked calls (`guard::patch`);
/// also returns the longest raw text piece.
fn compile(source: &str) -> Result<(CompiledTemplate<'_>, usize)> {
    let bad = |m: String| Error::config("chat_template", format!("chat template: {m}"));
    let config = template_config();
    let tree =
        minijinja::machinery::parse(source, NAME, config.syntax_config.clone(), config.ws_config)
            .map_err(template_err)?;
    guard::check_constants(&tree).map_err(bad)?;
    let mut t = CompiledTemplate::new(NAME, source, &config).map_err(template_err)?;
    let mut longest = guard::patch(&mut t.instructions).map_err(bad)?;
    for code in t.blocks.values_mut() {
        longest = longest.max(guard::patch(code).map_err(bad)?);
    }
    Ok((t, longest))
}

/// A chat template with the model's special tokens. It is compiled for every render (tens of
/// microseconds for a real template), into instructions that check the size of the values the
/// template builds (`guard`): the template is untrusted, it comes with the model file.
pub struct ChatTemplate {
    source: String,
    /// minijinja without the checks, where the checked operators perform the real ones.
    ops: Arc<Environment<'static>>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Fixed "now" (Unix seconds) for `strftime_now`; `None` = the clock.
    now: Option<i64>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    let mut msg = format!("chat template: {e}");
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::config("chat_template", msg)
}

/// The error for models that ship no chat template.
pub fn no_template_error() -> Error {
    Error::config(
        "chat_template",
        "this model has no chat template (none in tokenizer_config.json, chat_template.jinja \
         or the model file); use a plain prompt instead of chat mode",
    )
}

impl ChatTemplate {
    /// Compile `template`. `bos_token`/`eos_token` are the strings the template sees.
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        if template.trim().is_empty() {
            return Err(no_template_error());
        }
        compile(template)?;
        Ok(ChatTemplate {
            source: template.to_string(),
            ops: Arc::new(guard::ops_env()),
            bos_token,
            eos_token,
            now: None,
        })
    }

    /// Build from a `tokenizer_config.json` (its `chat_template`, `bos_token`, `eos_token`).
    /// A separate `chat_template.jinja`, if given, takes precedence, as in transformers.
    pub fn from_tokenizer_config(config: &[u8], jinja: Option<&str>) -> Result<ChatTemplate> {
        let v: serde_json::Value = serde_json::from_slice(config)
            .map_err(|e| Error::format("tokenizer_config.json", format!("invalid JSON: {e}")))?;
        let tok = |k: &str| -> Option<String> {
            match v.get(k)? {
                serde_json::Value::String(s) => Some(s.clone()),
                o => o.get("content")?.as_str().map(str::to_string),
            }
        };
        let from_cfg = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
            _ => None,
        };
        let template = match jinja {
            Some(j) => j.to_string(),
            None => from_cfg.ok_or_else(no_template_error)?,
        };
        ChatTemplate::new(&template, tok("bos_token"), tok("eos_token"))
    }

    /// Fix the time `strftime_now` sees (Unix seconds), for reproducible prompts.
    pub fn set_now(&mut self, unix_seconds: Option<i64>) {
        self.now = unix_seconds;
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Render the conversation, as `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(
            Value::from_serialize(messages),
            Value::from(()),
            add_generation_prompt,
            template_output_cap(messages),
        )
    }

    /// [`ChatTemplate::render`] of messages given as JSON (OpenAI shape: `tool_calls`,
    /// `tool_call_id`, ... are passed to the template as they are) and the tool definitions
    /// (`tools`, `None` = no tools), as `apply_chat_template(messages, tools=tools)`.
    pub fn render_json(
        &self,
        messages: &serde_json::Value,
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        // The cap counts the JSON text of the messages and tools (keys and quotes included).
        let text = messages.to_string().len() + tools.map_or(0, |t| t.to_string().len());
        let tools = tools.map_or(Value::from(()), Value::from_serialize);
        self.render_with(
            Value::from_serialize(messages),
            tools,
            add_generation_prompt,
            output_cap_for(text),
        )
    }

    fn render_with(
        &self,
        messages: Value,
        tools: Value,
        add_generation_prompt: bool,
        cap: usize,
    ) -> Result<String> {
        let (tmpl, longest_raw) = compile(&self.source)?;
        let fuel = guard::fuel_for(TEMPLATE_FUEL, longest_raw);
        let budget = guard::Budget::new(cap, work_bytes_for(cap));
        let mut env = Environment::new();
        {
            let b = budget.clone();
            env.set_unknown_method_callback(move |st, v, m, a| {
                guard::charge_method(&b, v, m, a)?;
                py_method(st, v, m, a)
            });
        }
        env.set_fuel(Some(fuel));
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        {
            let b = budget.clone();
            env.add_filter("tojson", move |v: &Value, args: Kwargs| {
                let r = tojson(v, args, cap)?;
                b.charge(r.as_str().map_or(0, str::len), "the filter `tojson`")?;
                Ok(r)
            });
        }
        guard::install(&mut env, &budget, &self.ops);
        let now = self.now.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0)
        });
        let b = budget.clone();
        let strftime_now = Value::from_function(
            move |fmt: String| -> std::result::Result<String, minijinja::Error> {
                // every directive expands to at most 9 bytes
                b.charge(fmt.len().saturating_mul(5), "`strftime_now`")?;
                Ok(strftime(&fmt, now))
            },
        );
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
            tools => tools,
            documents => Value::from(()),
            strftime_now => strftime_now,
        };
        let mut out = String::new();
        let r = Vm::new(&env).eval(
            &tmpl.instructions,
            ctx,
            &tmpl.blocks,
            &mut make_string_output(&mut out),
            AutoEscape::None,
        );
        let over_cap = || {
            Error::config(
                "chat_template",
                format!(
                    "chat template: output exceeds {cap} bytes (1 MiB + 8 × the \
                     conversation's text), so it is refused"
                ),
            )
        };
        match r {
            Ok(_) if out.len() > cap => Err(over_cap()),
            Ok(_) => Ok(out),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::config(
                "chat_template",
                format!(
                    "chat template: gave up after {fuel} steps (a chat template needs \
                     far fewer; this one loops too much, so it is refused)"
                ),
            )),
            Err(e) if budget.tripped() => Err(Error::config(
                "chat_template",
                format!(
                    "chat template: {}: it builds values larger than a chat template needs \
                     (at most {cap} bytes each), so it is refused",
                    e.detail().unwrap_or("too large")
                ),
            )),
            Err(e) => Err(template_err(e)),
        }
    }
}

/// Render and tokenize a conversation as transformers' `apply_chat_template(tokenize=True)`:
/// the template writes the BOS itself, so no BOS is added again (no double BOS).
pub fn encode_chat(
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    add_generation_prompt: bool,
) -> Result<Vec<u32>> {
    let text = template.render(messages, add_generation_prompt)?;
    Ok(tokenizer.encode(&text, false))
}

type JResult = std::result::Result<Value, minijinja::Error>;

fn bad(msg: impl Into<String>) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, msg.into())
}

fn arg_str(args: &[Value], i: usize) -> std::result::Result<Option<String>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v
            .as_str()
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| bad("expected a string argument")),
    }
}

fn py_strip<'a>(s: &'a str, chars: Option<&str>, left: bool, right: bool) -> &'a str {
    let f = |c: char| match chars {
        Some(set) => set.contains(c),
        None => c.is_whitespace(),
    };
    let mut r = s;
    if left {
        r = r.trim_start_matches(f);
    }
    if right {
        r = r.trim_end_matches(f);
    }
    r
}

/// Python methods that chat templates call on strings, dicts and lists.
fn py_method(state: &State, value: &Value, method: &str, args: &[Value]) -> JResult {
    // Keyword arguments arrive as a trailing Kwargs value; none of these methods need them.
    let args: Vec<Value> = args
        .iter()
        .filter(|a| Kwargs::try_from((*a).clone()).is_err())
        .cloned()
        .collect();
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or("");
            match method {
                "strip" => Ok(Value::from(py_strip(
                    s,
                    arg_str(&args, 0)?.as_deref(),
                    true,
                    true,
                ))),
                "lstrip" => Ok(Value::from(py_strip(
                    s,
                    arg_str(&args, 0)?.as_deref(),
                    true,
                    false,
                ))),
                "rstrip" => Ok(Value::from(py_strip(
                    s,
                    arg_str(&args, 0)?.as_deref(),
                    false,
                    true,
                ))),
                "upper" => Ok(Value::from(s.to_uppercase())),
                "lower" => Ok(Value::from(s.to_lowercase())),
                "title" => state.apply_filter("title", std::slice::from_ref(value)),
                "capitalize" => state.apply_filter("capitalize", std::slice::from_ref(value)),
                "startswith" | "endswith" => {
                    let test = |p: &str| {
                        if method == "startswith" {
                            s.starts_with(p)
                        } else {
                            s.ends_with(p)
                        }
                    };
                    let a = args.first().ok_or_else(|| bad("missing argument"))?;
                    if let Some(p) = a.as_str() {
                        return Ok(Value::from(test(p)));
                    }
                    // A tuple of prefixes.
                    for p in a.try_iter()? {
                        if p.as_str().is_some_and(test) {
                            return Ok(Value::from(true));
                        }
                    }
                    Ok(Value::from(false))
                }
                "replace" => {
                    let old = arg_str(&args, 0)?.ok_or_else(|| bad("replace: missing argument"))?;
                    let new = arg_str(&args, 1)?.ok_or_else(|| bad("replace: missing argument"))?;
                    Ok(Value::from(s.replace(&old, &new)))
                }
                "split" | "rsplit" => {
                    let sep = arg_str(&args, 0)?;
                    let parts: Vec<Value> = match sep {
                        Some(sep) if !sep.is_empty() => {
                            s.split(sep.as_str()).map(Value::from).collect()
                        }
                        Some(_) => return Err(bad("split: empty separator")),
                        None => s.split_whitespace().map(Value::from).collect(),
                    };
                    Ok(Value::from(parts))
                }
                "find" => {
                    let sub = arg_str(&args, 0)?.ok_or_else(|| bad("find: missing argument"))?;
                    Ok(Value::from(
                        s.find(&sub).map_or(-1, |b| s[..b].chars().count() as i64),
                    ))
                }
                "count" => {
                    let sub = arg_str(&args, 0)?.ok_or_else(|| bad("count: missing argument"))?;
                    Ok(Value::from(if sub.is_empty() {
                        s.chars().count() + 1
                    } else {
                        s.matches(&sub).count()
                    }))
                }
                "join" => {
                    let items = args.first().ok_or_else(|| bad("join: missing argument"))?;
                    let mut out = String::new();
                    for (i, it) in items.try_iter()?.enumerate() {
                        if i > 0 {
                            out.push_str(s);
                        }
                        out.push_str(&it.to_string());
                    }
                    Ok(Value::from(out))
                }
                "isdigit" => Ok(Value::from(
                    !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()),
                )),
                "isspace" => Ok(Value::from(
                    !s.is_empty() && s.chars().all(char::is_whitespace),
                )),
                _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
            }
        }
        ValueKind::Map => match method {
            "items" => state.apply_filter("items", std::slice::from_ref(value)),
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut v = Vec::new();
                for k in value.try_iter()? {
                    v.push(value.get_item(&k)?);
                }
                Ok(Value::from(v))
            }
            "get" => {
                let k = args.first().ok_or_else(|| bad("get: missing argument"))?;
                let v = value.get_item(k)?;
                if v.is_undefined() {
                    Ok(args.get(1).cloned().unwrap_or(Value::from(())))
                } else {
                    Ok(v)
                }
            }
            _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
        },
        _ => Err(minijinja::Error::from(ErrorKind::UnknownMethod)),
    }
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False,
/// indent=indent, separators=separators, sort_keys=sort_keys)` (no HTML escaping).
fn tojson(value: &Value, args: Kwargs, cap: usize) -> JResult {
    let indent: Option<usize> = args.get("indent")?;
    let sort_keys: Option<bool> = args.get("sort_keys")?;
    let ensure_ascii: Option<bool> = args.get("ensure_ascii")?;
    let separators: Option<Value> = args.get("separators")?;
    args.assert_all_used()?;
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() => {
            let a = v.get_item_by_index(0)?;
            let b = v.get_item_by_index(1)?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(": ").to_string(),
            )
        }
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let opts = JsonOpts {
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
        item_sep,
        key_sep,
        cap,
    };
    let mut out = String::new();
    write_json(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<usize>,
    sort_keys: bool,
    ensure_ascii: bool,
    item_sep: String,
    key_sep: String,
    /// Most bytes the result may have.
    cap: usize,
}

fn json_str(s: &str, ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ascii && (c as u32) > 0x7e) => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline(
    o: &JsonOpts,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if let Some(n) = o.indent {
        let width = n.saturating_mul(level);
        if out.len().saturating_add(width) > o.cap {
            return Err(bad(format!(
                "tojson: the result exceeds {} bytes (1 MiB + 8 × the conversation's text)",
                o.cap
            )));
        }
        out.push('\n');
        out.extend(std::iter::repeat_n(' ', width));
    }
    Ok(())
}

fn write_json(
    v: &Value,
    o: &JsonOpts,
    level: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if level > 64 {
        return Err(bad("tojson: nesting too deep"));
    }
    if out.len() > o.cap {
        return Err(bad(format!(
            "tojson: the result exceeds {} bytes (1 MiB + 8 × the conversation's text)",
            o.cap
        )));
    }
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                out.push_str(&i.to_string());
            } else if let Ok(f) = f64::try_from(v.clone()) {
                if f.is_finite() {
                    out.push_str(&format!("{f:?}"));
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                }
            } else {
                out.push_str(&v.to_string());
            }
        }
        ValueKind::String => json_str(v.as_str().unwrap_or(""), o.ensure_ascii, out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if o.sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(o, level + 1, out)?;
                match k.as_str() {
                    Some(s) => json_str(s, o.ensure_ascii, out),
                    None => json_str(&k.to_string(), o.ensure_ascii, out),
                }
                out.push_str(&o.key_sep);
                write_json(&v.get_item(k)?, o, level + 1, out)?;
            }
            newline(o, level, out)?;
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, it) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&o.item_sep);
                }
                newline(o, level + 1, out)?;
                write_json(it, o, level + 1, out)?;
            }
            newline(o, level, out)?;
            out.push(']');
        }
        _ => json_str(&v.to_string(), o.ensure_ascii, out),
    }
    Ok(())
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31) (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Python's `datetime.now().strftime(fmt)` for the common directives (UTC).
pub fn strftime(fmt: &str, unix_seconds: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let doy = days - days_from_civil(y, 1, 1) + 1;
    let mut out = String::new();
    let mut it = fmt.chars();
    while let Some(c) = it.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{:03}", doy)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}
