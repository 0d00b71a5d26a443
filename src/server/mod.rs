//! `ferroq serve`: an OpenAI-compatible HTTP server (feature `server`).
//!
//! The HTTP side runs on a single-threaded tokio runtime with axum (request parsing, SSE
//! streaming, limits); all model work runs on the [`scheduler`] thread, which batches the
//! decode steps of every active request into one forward pass. The two talk through channels:
//! a handler queues a [`scheduler::Job`] and reads its [`scheduler::Event`]s.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions` (both with SSE streaming),
//! `GET /v1/models`, `GET /health`, `POST /tokenize`, `POST /detokenize`, `GET /metrics`.
//! See `docs/server.md`.

pub mod api;
pub mod metrics;
pub mod scheduler;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::engine::Engine;
use crate::model::KvType;
use crate::{Error, Result};
use api::{ApiError, Endpoint, GenRequest, Prompt};
use metrics::Metrics;
use scheduler::{Event, Finish, Job, SchedConfig, Scheduler, TokenLogprob};

/// Server settings (the `ferroq serve` flags).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model: PathBuf,
    /// Name reported by `/v1/models` and accepted in `model` (default: the file stem).
    pub alias: Option<String>,
    pub host: String,
    /// 0 = any free port (printed on stderr).
    pub port: u16,
    /// Slots: requests decoded at the same time.
    pub parallel: usize,
    /// Context per slot (0 = min(4096, the model's maximum)).
    pub ctx: usize,
    /// Most tokens per forward pass (prompt chunk and decode rows together).
    pub batch: usize,
    pub threads: usize,
    pub kv: Option<KvType>,
    pub api_key: Option<String>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Requests waiting for a slot before 503.
    pub queue: usize,
    /// Per request, from arrival to the last token.
    pub timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model: PathBuf::new(),
            alias: None,
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 1,
            ctx: 0,
            batch: crate::engine::DEFAULT_BATCH,
            threads: 0,
            kv: None,
            api_key: None,
            max_body: 4 << 20,
            queue: 64,
            timeout: Duration::from_secs(600),
        }
    }
}

struct App {
    engine: Arc<Engine>,
    sched: Scheduler,
    metrics: Arc<Metrics>,
    model_id: String,
    api_key: Option<Vec<u8>>,
    max_body: usize,
    timeout: Duration,
    created: u64,
    next_id: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Compare in time that depends only on the lengths, not on where the bytes differ.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= (x ^ y) as u64;
    }
    std::hint::black_box(diff) == 0
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (status, axum::Json(e.body())).into_response();
    if e.status == 503 {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if e.status == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

impl App {
    fn fail(&self, e: ApiError) -> Response {
        self.metrics.errors.fetch_add(1, Relaxed);
        error_response(&e)
    }

    fn auth(&self, headers: &HeaderMap) -> std::result::Result<(), ApiError> {
        let Some(key) = &self.api_key else {
            return Ok(());
        };
        let got = headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer ".as_slice()))
            .unwrap_or(b"");
        if ct_eq(got.trim_ascii(), key) {
            Ok(())
        } else {
            Err(ApiError::new(
                401,
                "authentication_error",
                "invalid or missing API key: send `Authorization: Bearer <key>` with the key \
                 given to `ferroq serve --api-key`",
            )
            .with_code("invalid_api_key"))
        }
    }

    fn check_model(&self, model: Option<&str>) -> std::result::Result<(), ApiError> {
        match model {
            None | Some("") => Ok(()),
            Some(m) if m == self.model_id => Ok(()),
            Some(m) => Err(ApiError {
                param: Some("model".into()),
                ..ApiError::new(
                    404,
                    "invalid_request_error",
                    format!(
                        "the model `{m}` does not exist; this server serves `{}` (GET /v1/models)",
                        self.model_id
                    ),
                )
            }
            .with_code("model_not_found")),
        }
    }

    /// The body, at most `max_body` bytes.
    async fn body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> std::result::Result<Vec<u8>, ApiError> {
        let too_big = || {
            ApiError::new(
                413,
                "invalid_request_error",
                format!(
                    "the request body is larger than the server's limit of {} bytes",
                    self.max_body
                ),
            )
            .with_code("request_too_large")
        };
        if let Some(n) = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            if n > self.max_body as u64 {
                return Err(too_big());
            }
        }
        match axum::body::to_bytes(body, self.max_body).await {
            Ok(b) => Ok(b.to_vec()),
            Err(_) => Err(too_big()),
        }
    }

    fn new_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }

    /// The prompt ids of a request.
    fn prompt_ids(&self, ep: Endpoint, r: &GenRequest) -> std::result::Result<Vec<u32>, ApiError> {
        let vocab = self.engine.model().config.vocab_size;
        let ids_of = |v: &[i64]| -> std::result::Result<Vec<u32>, ApiError> {
            v.iter()
                .map(|&t| {
                    u32::try_from(t)
                        .ok()
                        .filter(|&t| (t as usize) < vocab)
                        .ok_or_else(|| {
                            ApiError::param(
                                "prompt",
                                format!("token id {t} is out of range (vocabulary {vocab})"),
                            )
                        })
                })
                .collect()
        };
        let one = || {
            ApiError::param(
                "prompt",
                "only one prompt per request is supported; send one request per prompt",
            )
        };
        let ids = match ep {
            Endpoint::Chat => {
                let msgs = api::normalize_messages(r.messages.as_deref().unwrap_or(&[]))?;
                let t = self.engine.template().ok_or_else(|| {
                    ApiError::invalid(
                        "this model has no chat template; use /v1/completions with a prompt",
                    )
                })?;
                let tools = r.tools.as_ref().map(|t| Value::Array(t.clone()));
                let text = t
                    .render_json(&msgs, tools.as_ref(), true)
                    .map_err(|e| ApiError::param("messages", e.to_string()))?;
                self.engine.tokenizer().encode(&text, false)
            }
            Endpoint::Completion => match r.prompt.as_ref().expect("checked") {
                Prompt::Text(s) => self.engine.encode_prompt(s),
                Prompt::Texts(v) if v.len() == 1 => self.engine.encode_prompt(&v[0]),
                Prompt::Texts(_) => return Err(one()),
                Prompt::Ids(v) => ids_of(v)?,
                Prompt::IdLists(v) if v.len() == 1 => ids_of(&v[0])?,
                Prompt::IdLists(_) => return Err(one()),
            },
        };
        if ids.is_empty() {
            return Err(ApiError::param("prompt", "the prompt is empty"));
        }
        Ok(ids)
    }
}

/// Format one request's events as OpenAI objects.
struct Formatter {
    ep: Endpoint,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    engine: Arc<Engine>,
    /// Completions' `text_offset` bookkeeping.
    offset: usize,
}

fn usage(prompt: usize, cached: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

impl Formatter {
    fn token_text(&self, id: u32) -> (String, Vec<u8>) {
        let b = self
            .engine
            .tokenizer()
            .id_to_bytes(id)
            .unwrap_or(&[])
            .to_vec();
        (String::from_utf8_lossy(&b).into_owned(), b)
    }

    /// Chat's `logprobs.content` entries.
    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> Value {
        let entry = |id: u32, lp: f32| {
            let (t, b) = self.token_text(id);
            json!({"token": t, "logprob": lp, "bytes": b})
        };
        let content: Vec<Value> = lps
            .iter()
            .map(|l| {
                let mut e = entry(l.id, l.logprob);
                e["top_logprobs"] = Value::Array(l.top.iter().map(|&(i, p)| entry(i, p)).collect());
                e
            })
            .collect();
        json!({"content": content})
    }

    /// Completions' `logprobs` object; advances the text offset.
    fn completion_logprobs(&mut self, lps: &[TokenLogprob]) -> Value {
        let (mut tokens, mut tlp, mut top, mut off) = (vec![], vec![], vec![], vec![]);
        for l in lps {
            let (t, _) = self.token_text(l.id);
            off.push(self.offset);
            self.offset += t.len();
            tokens.push(Value::String(t));
            tlp.push(json!(l.logprob));
            let mut m = serde_json::Map::new();
            for &(i, p) in &l.top {
                m.insert(self.token_text(i).0, json!(p));
            }
            top.push(Value::Object(m));
        }
        json!({"tokens": tokens, "token_logprobs": tlp, "top_logprobs": top, "text_offset": off})
    }

    fn chunk(
        &mut self,
        text: Option<&str>,
        role: bool,
        lps: &[TokenLogprob],
        finish: Option<Finish>,
    ) -> Value {
        let finish = finish.map(|f| f.as_str());
        let mut v = match self.ep {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                let logprobs = if lps.is_empty() {
                    Value::Null
                } else {
                    self.chat_logprobs(lps)
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": "ferroq",
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish}],
                })
            }
            Endpoint::Completion => {
                let logprobs = if lps.is_empty() {
                    Value::Null
                } else {
                    self.completion_logprobs(lps)
                };
                json!({
                    "id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.model, "system_fingerprint": "ferroq",
                    "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": logprobs,
                                 "finish_reason": finish}],
                })
            }
        };
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn usage_chunk(&self, u: Value) -> Value {
        let object = match self.ep {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completion => "text_completion",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model,
               "system_fingerprint": "ferroq", "choices": [], "usage": u})
    }

    fn full(
        &mut self,
        text: &str,
        lps: Option<&[TokenLogprob]>,
        finish: Finish,
        u: Value,
    ) -> Value {
        match self.ep {
            Endpoint::Chat => {
                let logprobs = lps.map_or(Value::Null, |l| self.chat_logprobs(l));
                json!({
                    "id": self.id, "object": "chat.completion", "created": self.created,
                    "model": self.model, "system_fingerprint": "ferroq",
                    "choices": [{"index": 0,
                                 "message": {"role": "assistant", "content": text},
                                 "logprobs": logprobs, "finish_reason": finish.as_str()}],
                    "usage": u,
                })
            }
            Endpoint::Completion => {
                let logprobs = lps.map_or(Value::Null, |l| self.completion_logprobs(l));
                json!({
                    "id": self.id, "object": "text_completion", "created": self.created,
                    "model": self.model, "system_fingerprint": "ferroq",
                    "choices": [{"index": 0, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish.as_str()}],
                    "usage": u,
                })
            }
        }
    }
}

/// The SSE body of a streaming request.
struct EventStream {
    rx: UnboundedReceiver<Event>,
    fmt: Formatter,
    pending: VecDeque<SseEvent>,
    done: bool,
    logprobs: bool,
}

fn sse_json(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

impl EventStream {
    fn push(&mut self, ev: Event) {
        match ev {
            Event::Token { text, logprob, .. } => {
                if text.is_empty() && (logprob.is_none() || !self.logprobs) {
                    return;
                }
                let lps: Vec<TokenLogprob> = logprob.into_iter().collect();
                let c = self.fmt.chunk(Some(&text), false, &lps, None);
                self.pending.push_back(sse_json(&c));
            }
            Event::Done {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            } => {
                let c = match self.fmt.ep {
                    Endpoint::Chat => self.fmt.chunk(None, false, &[], Some(finish)),
                    Endpoint::Completion => self.fmt.chunk(Some(""), false, &[], Some(finish)),
                };
                self.pending.push_back(sse_json(&c));
                if self.fmt.include_usage {
                    let u = usage(prompt_tokens, cached_tokens, completion_tokens);
                    self.pending.push_back(sse_json(&self.fmt.usage_chunk(u)));
                }
                self.pending.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
            Event::Error { status, message } => {
                let e = ApiError::new(status, "server_error", message);
                self.pending.push_back(sse_json(&e.body()));
                self.pending.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
        }
    }
}

impl futures_core::Stream for EventStream {
    type Item = std::result::Result<SseEvent, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(e)));
            }
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(ev)) => self.push(ev),
                Poll::Ready(None) => {
                    // the scheduler dropped the job without a word (shutdown)
                    self.push(Event::Error {
                        status: 503,
                        message: "the server is shutting down".into(),
                    });
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

async fn generate(app: Arc<App>, ep: Endpoint, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    match ep {
        Endpoint::Chat => app.metrics.requests_chat.fetch_add(1, Relaxed),
        Endpoint::Completion => app.metrics.requests_completion.fetch_add(1, Relaxed),
    };
    if let Err(e) = app.auth(&headers) {
        return app.fail(e);
    }
    let bytes = match app.body(&headers, body).await {
        Ok(b) => b,
        Err(e) => return app.fail(e),
    };
    let r: GenRequest = match api::parse_body(&bytes) {
        Ok(r) => r,
        Err(e) => return app.fail(e),
    };
    let seed = (SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64))
        ^ app
            .next_id
            .load(Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let prepared = r
        .check_endpoint(ep)
        .and_then(|_| app.check_model(r.model.as_deref()))
        .and_then(|_| r.params(ep, seed))
        .and_then(|p| app.prompt_ids(ep, &r).map(|ids| (p, ids)));
    let prepared =
        prepared.and_then(|(p, ids)| api::response_format(&bytes, &r).map(|g| (p, ids, g)));
    let (p, prompt, grammar) = match prepared {
        Ok(x) => x,
        Err(e) => return app.fail(e),
    };
    let ctx = app.sched.ctx;
    let field = match ep {
        Endpoint::Chat if r.max_completion_tokens.is_some() => "max_completion_tokens",
        _ => "max_tokens",
    };
    if prompt.len() >= ctx {
        return app.fail(
            ApiError::param(
                "messages",
                format!(
                    "this server's context is {ctx} tokens per request, but the prompt is {} \
                     tokens (at least one more is needed for the answer); shorten the prompt \
                     or start the server with a larger -c",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"),
        );
    }
    let room = ctx - prompt.len();
    let max_tokens = match p.max_tokens {
        Some(m) if m > room => {
            return app.fail(
                ApiError::param(
                    field,
                    format!(
                        "this server's context is {ctx} tokens per request; you requested {} \
                         tokens ({} in the prompt, {m} in the completion); ask for at most \
                         {room} completion tokens",
                        prompt.len() + m,
                        prompt.len()
                    ),
                )
                .with_code("context_length_exceeded"),
            )
        }
        Some(m) => m,
        None => room,
    };
    let (tx, mut rx) = unbounded_channel();
    let n_prompt = prompt.len();
    let job = Job {
        prompt,
        max_tokens,
        sampler: p.sampler.clone(),
        stop_strings: p.stop.clone(),
        logprobs: p.logprobs,
        grammar,
        received,
        deadline: received + app.timeout,
        events: tx,
    };
    if app.sched.submit(job).is_err() {
        app.metrics.rejected.fetch_add(1, Relaxed);
        return app.fail(
            ApiError::new(
                503,
                "server_error",
                "the server is busy (every slot is running and the queue is full); retry later",
            )
            .with_code("server_busy"),
        );
    }
    let mut fmt = Formatter {
        ep,
        id: app.new_id(match ep {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        }),
        created: unix_now(),
        model: app.model_id.clone(),
        include_usage: p.include_usage,
        engine: app.engine.clone(),
        offset: 0,
    };
    if p.stream {
        let mut pending = VecDeque::new();
        if ep == Endpoint::Chat {
            pending.push_back(sse_json(&fmt.chunk(Some(""), true, &[], None)));
        }
        let s = EventStream {
            rx,
            fmt,
            pending,
            done: false,
            logprobs: p.logprobs.is_some(),
        };
        return Sse::new(s).into_response();
    }
    let mut text = String::new();
    let mut lps = Vec::new();
    loop {
        match rx.recv().await {
            Some(Event::Token {
                text: t, logprob, ..
            }) => {
                text.push_str(&t);
                lps.extend(logprob);
            }
            Some(Event::Done {
                finish,
                prompt_tokens,
                cached_tokens,
                completion_tokens,
            }) => {
                let u = usage(prompt_tokens, cached_tokens, completion_tokens);
                let lp = p.logprobs.map(|_| lps.as_slice());
                return axum::Json(fmt.full(&text, lp, finish, u)).into_response();
            }
            Some(Event::Error { status, message }) => {
                return app.fail(ApiError::new(status, "server_error", message));
            }
            None => {
                let _ = n_prompt;
                return app.fail(ApiError::new(
                    503,
                    "server_error",
                    "the server is shutting down",
                ));
            }
        }
    }
}

async fn chat(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, Endpoint::Chat, headers, body).await
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    generate(app, Endpoint::Completion, headers, body).await
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    app.metrics.requests_other.fetch_add(1, Relaxed);
    if let Err(e) = app.auth(&headers) {
        return app.fail(e);
    }
    let c = &app.engine.model().config;
    axum::Json(json!({"object": "list", "data": [{
        "id": app.model_id, "object": "model", "created": app.created, "owned_by": "ferroq",
        "meta": {"n_ctx": app.sched.ctx, "n_slots": app.sched.slots, "n_vocab": c.vocab_size,
                 "n_layers": c.num_layers, "kv_bytes_per_slot": app.sched.slot_bytes},
    }]}))
    .into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    app.metrics.requests_other.fetch_add(1, Relaxed);
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn get_metrics(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    app.metrics.requests_other.fetch_add(1, Relaxed);
    if let Err(e) = app.auth(&headers) {
        return app.fail(e);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(app.sched.slots),
    )
        .into_response()
}

async fn tokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    app.metrics.requests_other.fetch_add(1, Relaxed);
    if let Err(e) = app.auth(&headers) {
        return app.fail(e);
    }
    let r = match app.body(&headers, body).await {
        Ok(b) => api::parse_body::<api::TokenizeRequest>(&b),
        Err(e) => Err(e),
    }
    .and_then(|r| app.check_model(r.model.as_deref()).map(|_| r));
    let r = match r {
        Ok(r) => r,
        Err(e) => return app.fail(e),
    };
    let tok = app.engine.tokenizer();
    let add = r.add_special.unwrap_or(true) && app.engine.add_bos();
    let ids = tok.encode(&r.content, add);
    if r.with_pieces == Some(true) {
        let t: Vec<Value> = ids
            .iter()
            .map(|&id| {
                let b = tok.id_to_bytes(id).unwrap_or(&[]);
                match std::str::from_utf8(b) {
                    Ok(s) => json!({"id": id, "piece": s}),
                    Err(_) => json!({"id": id, "piece": b}),
                }
            })
            .collect();
        return axum::Json(json!({"tokens": t})).into_response();
    }
    axum::Json(json!({"tokens": ids})).into_response()
}

async fn detokenize(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    app.metrics.requests_other.fetch_add(1, Relaxed);
    if let Err(e) = app.auth(&headers) {
        return app.fail(e);
    }
    let r = match app.body(&headers, body).await {
        Ok(b) => api::parse_body::<api::DetokenizeRequest>(&b),
        Err(e) => Err(e),
    }
    .and_then(|r| app.check_model(r.model.as_deref()).map(|_| r));
    let r = match r {
        Ok(r) => r,
        Err(e) => return app.fail(e),
    };
    let vocab = app.engine.tokenizer().vocab_size();
    let mut ids = Vec::with_capacity(r.tokens.len());
    for &t in &r.tokens {
        match u32::try_from(t).ok().filter(|&t| (t as usize) < vocab) {
            Some(t) => ids.push(t),
            None => {
                return app.fail(ApiError::param(
                    "tokens",
                    format!("token id {t} is out of range (vocabulary {vocab})"),
                ))
            }
        }
    }
    let text = app.engine.decode(&ids, false);
    axum::Json(json!({"content": text})).into_response()
}

async fn not_found(State(app): State<Arc<App>>, method: Method, uri: Uri) -> Response {
    app.fail(ApiError::new(
        404,
        "invalid_request_error",
        format!("unknown endpoint: {method} {}", uri.path()),
    ))
}

async fn bad_method(State(app): State<Arc<App>>, method: Method, uri: Uri) -> Response {
    app.fail(ApiError::new(
        405,
        "invalid_request_error",
        format!("method {method} is not allowed on {}", uri.path()),
    ))
}

/// A started server: the address it listens on and a handle to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Context per slot.
    pub ctx: usize,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Running {
    /// Stop accepting, finish, and join.
    pub fn stop(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Other("the server thread panicked".into()))),
            None => Ok(()),
        }
    }

    /// Serve until the process ends (or the server fails).
    pub fn wait(mut self) -> Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Other("the server thread panicked".into()))),
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Open the model, start the scheduler and listen; returns once the socket is bound.
pub fn start(cfg: &ServerConfig) -> Result<Running> {
    let engine = Arc::new(Engine::open(&cfg.model)?);
    start_with(engine, cfg)
}

/// [`start`] with an opened engine.
pub fn start_with(engine: Arc<Engine>, cfg: &ServerConfig) -> Result<Running> {
    if cfg.parallel == 0 || cfg.parallel > 256 {
        return Err(Error::config("parallel", "must be in 1..=256"));
    }
    let ctx = engine.context_for(cfg.ctx);
    let metrics = Arc::new(Metrics::default());
    let sched = Scheduler::start(
        engine.clone(),
        &SchedConfig {
            slots: cfg.parallel,
            ctx,
            batch: cfg.batch.max(1),
            threads: cfg.threads,
            kv: cfg.kv,
            queue: cfg.queue,
        },
        metrics.clone(),
    )?;
    let model_id = cfg.alias.clone().unwrap_or_else(|| {
        cfg.model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let app = Arc::new(App {
        engine,
        sched,
        metrics,
        model_id,
        api_key: cfg.api_key.as_ref().map(|k| k.as_bytes().to_vec()),
        max_body: cfg.max_body,
        timeout: cfg.timeout,
        created: unix_now(),
        next_id: AtomicU64::new(0),
    });
    let addr_s = format!("{}:{}", cfg.host, cfg.port);
    let std_listener = std::net::TcpListener::bind(
        std::net::ToSocketAddrs::to_socket_addrs(&addr_s)
            .map_err(|e| Error::config("host", format!("{addr_s}: {e}")))?
            .next()
            .ok_or_else(|| Error::config("host", format!("{addr_s} resolves to no address")))?,
    )
    .map_err(|e| Error::config("port", format!("cannot listen on {addr_s}: {e}")))?;
    std_listener
        .set_nonblocking(true)
        .map_err(|e| Error::Other(format!("socket: {e}")))?;
    let addr = std_listener
        .local_addr()
        .map_err(|e| Error::Other(format!("socket: {e}")))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = Router::new()
        .route("/v1/chat/completions", post(chat).fallback(bad_method))
        .route("/v1/completions", post(completions).fallback(bad_method))
        .route("/v1/models", get(models).fallback(bad_method))
        .route("/health", get(health).fallback(bad_method))
        .route("/metrics", get(get_metrics).fallback(bad_method))
        .route("/tokenize", post(tokenize).fallback(bad_method))
        .route("/detokenize", post(detokenize).fallback(bad_method))
        .fallback(not_found)
        .with_state(app.clone());
    let thread = std::thread::Builder::new()
        .name("ferroq-http".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .enable_time()
                .build()
                .map_err(|e| Error::Other(format!("starting the async runtime: {e}")))?;
            let r = rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener)
                    .map_err(|e| Error::Other(format!("socket: {e}")))?;
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| Error::Other(format!("server: {e}")))
            });
            app.sched.shutdown();
            r
        })
        .map_err(|e| Error::Other(format!("starting the server thread: {e}")))?;
    Ok(Running {
        addr,
        ctx,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}
