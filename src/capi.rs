//! C ABI for embedding ferroq (header: `include/ferroq.h`, which documents every function).
//!
//! - Handles: `ferroq_engine` (a shared, immutable model; thread-safe) and `ferroq_session`
//!   (one conversation; use it from one thread at a time). A session keeps its engine alive,
//!   so the engine may be freed before its sessions.
//! - Errors: functions return NULL / a negative number and set a per-thread error message
//!   read with [`ferroq_last_error`] (valid until the next ferroq call on that thread).
//! - No panic crosses the boundary: every entry point runs under `catch_unwind`, and a panic
//!   becomes an error. Null pointers are checked.
//! - Strings are UTF-8. Strings returned by ferroq are freed with [`ferroq_string_free`].

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::engine::{Engine, GenOptions, Session, SessionOptions};
use crate::sampling::SamplerConfig;
use crate::{Error, Result};

/// Opaque engine handle (`ferroq_engine*`).
pub struct FerroqEngine(Arc<Engine>);

/// Opaque session handle (`ferroq_session*`).
pub struct FerroqSession(Session);

/// Session settings (`ferroq_session_params`). Zero fields mean "default".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerroqSessionParams {
    /// Context size in tokens (0 = min(4096, the model's maximum)).
    pub ctx: usize,
    /// Prompt tokens per forward pass (0 = default).
    pub batch: usize,
    /// Threads (0 = all cores; at most 512).
    pub threads: usize,
    /// KV cache type: 0 = default (f32 for unquantized models, f16 for quantized ones),
    /// 1 = f32, 2 = f16, 3 = q8.
    pub kv: c_int,
}

/// Engine settings (`ferroq_engine_params`) of [`ferroq_engine_open_ex`]. Zero fields mean
/// "default".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct FerroqEngineParams {
    /// Non-zero: sessions may hold more positions than the model's `max_position_embeddings`
    /// (refused by default).
    pub ctx_override: c_int,
    /// Memory budget in bytes for the model: 0 = what the machine (or the process's memory
    /// cgroup) has free; `u64::MAX` = never page (the page cache decides). A MoE model whose
    /// file does not fit pages its routed experts (expert-aware residency).
    pub mem_budget: u64,
    /// Non-zero: lock the resident weights in memory (`mlock`).
    pub mlock: c_int,
    /// Non-zero: check every tensor's checksum while opening (reads the whole file once, like
    /// `ferroq verify`); a mismatch fails the open with an error naming the tensor.
    pub verify: c_int,
}

/// The KV type of a C `kv` field.
fn kv_of(kv: c_int) -> Result<Option<crate::model::KvType>> {
    use crate::model::KvType;
    Ok(match kv {
        0 => None,
        1 => Some(KvType::F32),
        2 => Some(KvType::F16),
        3 => Some(KvType::Q8),
        4 => Some(KvType::Q4),
        _ => {
            return Err(Error::config(
                "kv",
                format!("{kv} is not a KV cache type (0 default, 1 f32, 2 f16, 3 q8, 4 q4)"),
            ))
        }
    })
}

/// Generation settings (`ferroq_gen_params`); get defaults from [`ferroq_gen_params_default`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FerroqGenParams {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
    /// Non-zero: the prompt is the next user message of the session's conversation, rendered
    /// with the model's chat template (multi-turn, the cache is reused). Zero: a raw prompt.
    pub chat: c_int,
    /// `n_stop` NUL-terminated stop strings (may be NULL when `n_stop` is 0).
    pub stop: *const *const c_char,
    pub n_stop: usize,
}

/// Token callback: `(user, id, piece, len)`; `id` is -1 for text released at the end.
/// `piece` is NOT NUL-terminated. Return 0 to continue, non-zero to stop.
pub type FerroqTokenCb =
    Option<unsafe extern "C" fn(*mut c_void, i64, *const c_char, usize) -> c_int>;

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(msg: String) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(c));
}

fn clear_error() {
    LAST_ERROR.with(|e| *e.borrow_mut() = None);
}

thread_local! {
    /// Depth of ferroq C calls on this thread (their panics are not printed).
    static IN_CALL: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Keep caught panics off the host's stderr: a panic inside a ferroq C call (or on one of
/// ferroq's pool threads, whose panics are resumed on the caller) becomes an error message, so
/// printing it would only clutter the host's output. The process's panic hook is wrapped once,
/// on the first C call; panics elsewhere still go to the previous hook.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_call = IN_CALL.try_with(|c| c.get() > 0).unwrap_or(false);
            let pool = std::thread::current()
                .name()
                .is_some_and(|n| n.starts_with("ferroq-pool"));
            if !(in_call || pool) {
                prev(info)
            }
        }));
    });
}

/// Run `f`, turning errors and panics into the thread's last error and `fail`.
fn guard<T>(fail: T, f: impl FnOnce() -> Result<T>) -> T {
    guard_or(fail, f, || {})
}

/// [`guard`], running `on_panic` after a caught panic (sessions rebuild their state there).
fn guard_or<T>(fail: T, f: impl FnOnce() -> Result<T>, on_panic: impl FnOnce()) -> T {
    clear_error();
    quiet_panics();
    IN_CALL.with(|c| c.set(c.get() + 1));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_CALL.with(|c| c.set(c.get().saturating_sub(1)));
    if r.is_err() {
        let _ = catch_unwind(AssertUnwindSafe(on_panic));
    }
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            set_error(e.to_string());
            fail
        }
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_error(format!("internal error (panic): {msg}"));
            fail
        }
    }
}

fn null(what: &str) -> Error {
    Error::Input(format!("{what} is NULL"))
}

/// # Safety
/// `p` is NULL or a NUL-terminated string valid for reads.
unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(null(what));
    }
    // SAFETY: non-null, and the caller guarantees a NUL-terminated readable string.
    unsafe { CStr::from_ptr(p) }
        .to_str()
        .map_err(|e| Error::Input(format!("{what} is not valid UTF-8: {e}")))
}

/// The last error of this thread, or NULL. Owned by ferroq; valid until the next ferroq call
/// on this thread.
#[no_mangle]
pub extern "C" fn ferroq_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}

/// Open a `.fqm` model. NULL on error. Free with [`ferroq_engine_free`].
///
/// # Safety
/// `path` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn ferroq_engine_open(path: *const c_char) -> *mut FerroqEngine {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded caller contract.
        let p = unsafe { c_str(path, "path") }?;
        let e = Engine::open(p)?;
        Ok(Box::into_raw(Box::new(FerroqEngine(Arc::new(e)))))
    })
}

/// Default engine settings (all zero).
#[no_mangle]
pub extern "C" fn ferroq_engine_params_default() -> FerroqEngineParams {
    FerroqEngineParams::default()
}

/// [`ferroq_engine_open`] with settings (`params` may be NULL for defaults).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `params` is NULL or points to a valid struct.
#[no_mangle]
pub unsafe extern "C" fn ferroq_engine_open_ex(
    path: *const c_char,
    params: *const FerroqEngineParams,
) -> *mut FerroqEngine {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded caller contract.
        let p = unsafe { c_str(path, "path") }?;
        // SAFETY: caller contract: NULL or valid.
        let ep = unsafe { params.as_ref() }.copied().unwrap_or_default();
        let opts = crate::engine::EngineOptions {
            ctx_override: ep.ctx_override != 0,
            mem: match ep.mem_budget {
                0 => crate::engine::MemBudget::Auto,
                u64::MAX => crate::engine::MemBudget::Off,
                b => crate::engine::MemBudget::Bytes(b),
            },
            mlock: ep.mlock != 0,
            verify: ep.verify != 0,
        };
        let e = Engine::open_with(p, &opts)?;
        Ok(Box::into_raw(Box::new(FerroqEngine(Arc::new(e)))))
    })
}

/// Free an engine (NULL is allowed). Sessions created from it stay valid.
///
/// # Safety
/// `engine` is NULL or a pointer from [`ferroq_engine_open`] not freed before.
#[no_mangle]
pub unsafe extern "C" fn ferroq_engine_free(engine: *mut FerroqEngine) {
    guard((), || {
        if !engine.is_null() {
            // SAFETY: the pointer came from Box::into_raw and is freed once (caller contract).
            drop(unsafe { Box::from_raw(engine) });
        }
        Ok(())
    })
}

/// Milliseconds the engine took to load.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[no_mangle]
pub unsafe extern "C" fn ferroq_engine_load_ms(engine: *const FerroqEngine) -> f64 {
    guard(-1.0, || {
        // SAFETY: caller contract: NULL or live.
        let e = unsafe { engine.as_ref() }.ok_or_else(|| null("engine"))?;
        Ok(e.0.load_ms())
    })
}

/// Default session settings (all zero: defaults).
#[no_mangle]
pub extern "C" fn ferroq_session_params_default() -> FerroqSessionParams {
    FerroqSessionParams {
        ctx: 0,
        batch: 0,
        threads: 0,
        kv: 0,
    }
}

/// Default generation settings: greedy, 256 tokens, no stop strings, raw prompt.
#[no_mangle]
pub extern "C" fn ferroq_gen_params_default() -> FerroqGenParams {
    let s = SamplerConfig::default();
    FerroqGenParams {
        max_tokens: 256,
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        chat: 0,
        stop: std::ptr::null(),
        n_stop: 0,
    }
}

/// A new session on `engine` (`params` may be NULL for defaults). NULL on error. Free with
/// [`ferroq_session_free`].
///
/// # Safety
/// `engine` is NULL or a live engine; `params` is NULL or points to a valid struct.
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_new(
    engine: *const FerroqEngine,
    params: *const FerroqSessionParams,
) -> *mut FerroqSession {
    guard(std::ptr::null_mut(), || {
        // SAFETY: caller contract: NULL or live / valid.
        let e = unsafe { engine.as_ref() }.ok_or_else(|| null("engine"))?;
        // SAFETY: as above.
        let p = unsafe { params.as_ref() }
            .copied()
            .unwrap_or_else(|| ferroq_session_params_default());
        let s = Session::new(
            Arc::clone(&e.0),
            &SessionOptions {
                ctx: p.ctx,
                batch: p.batch,
                threads: p.threads,
                kv: kv_of(p.kv)?,
            },
        )?;
        Ok(Box::into_raw(Box::new(FerroqSession(s))))
    })
}

/// Free a session (NULL is allowed).
///
/// # Safety
/// `session` is NULL or a pointer from [`ferroq_session_new`] not freed before.
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_free(session: *mut FerroqSession) {
    guard((), || {
        if !session.is_null() {
            // SAFETY: from Box::into_raw, freed once (caller contract).
            drop(unsafe { Box::from_raw(session) });
        }
        Ok(())
    })
}

/// Forget the session's conversation and cache. Returns 0, or -1 on error.
///
/// # Safety
/// `session` is NULL or a live session not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_reset(session: *mut FerroqSession) -> c_int {
    guard(-1, || {
        // SAFETY: caller contract.
        let s = unsafe { session.as_mut() }.ok_or_else(|| null("session"))?;
        s.0.try_reset()?;
        Ok(0)
    })
}

/// Generate an answer to `prompt`. Calls `cb` (may be NULL) with each piece of text as it is
/// generated. With `text_out` non-NULL, stores the whole answer there as a NUL-terminated
/// string owned by the caller (free with [`ferroq_string_free`]; interior NULs are dropped).
/// `params` may be NULL for defaults. Returns the number of generated tokens, or -1 on error.
///
/// # Safety
/// `session` is NULL or a live session used by no other thread during the call; `prompt` is
/// NULL or NUL-terminated; `params` NULL or valid (its `stop` array holds `n_stop` valid
/// strings); `text_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ferroq_generate(
    session: *mut FerroqSession,
    prompt: *const c_char,
    params: *const FerroqGenParams,
    cb: FerroqTokenCb,
    user: *mut c_void,
    text_out: *mut *mut c_char,
) -> i64 {
    // after an internal error (a caught panic) the conversation is dropped and the state
    // rebuilt, so the session stays usable
    let recover = || {
        // SAFETY: caller contract (the closure that borrowed it has returned).
        if let Some(s) = unsafe { session.as_mut() } {
            s.0.reset();
        }
    };
    guard_or(
        -1,
        || {
            if !text_out.is_null() {
                // SAFETY: caller contract: writable.
                unsafe { *text_out = std::ptr::null_mut() };
            }
            // SAFETY: caller contract.
            let s = unsafe { session.as_mut() }.ok_or_else(|| null("session"))?;
            // SAFETY: caller contract.
            let prompt = unsafe { c_str(prompt, "prompt") }?;
            // SAFETY: caller contract.
            let p = unsafe { params.as_ref() }
                .copied()
                .unwrap_or_else(|| ferroq_gen_params_default());
            let mut stop_strings = Vec::with_capacity(p.n_stop);
            if p.n_stop > 0 {
                if p.stop.is_null() {
                    return Err(null("params.stop"));
                }
                // SAFETY: caller contract: `stop` points to `n_stop` pointers.
                let list = unsafe { std::slice::from_raw_parts(p.stop, p.n_stop) };
                for (i, &sp) in list.iter().enumerate() {
                    // SAFETY: caller contract: each is a NUL-terminated string.
                    stop_strings
                        .push(unsafe { c_str(sp, &format!("params.stop[{i}]")) }?.to_string());
                }
            }
            let opts = GenOptions {
                max_tokens: p.max_tokens,
                sampler: SamplerConfig {
                    temperature: p.temperature,
                    top_k: p.top_k,
                    top_p: p.top_p,
                    min_p: p.min_p,
                    repetition_penalty: p.repeat_penalty,
                    presence_penalty: p.presence_penalty,
                    frequency_penalty: p.frequency_penalty,
                    penalty_last_n: 0,
                    seed: p.seed,
                },
                stop_strings,
            };
            let mut on_token = |id: Option<u32>, piece: &str| -> bool {
                match cb {
                    // SAFETY: the caller supplied a valid function; it gets a pointer/length pair
                    // valid for the duration of the call.
                    Some(f) => unsafe {
                        f(
                            user,
                            id.map_or(-1, i64::from),
                            piece.as_ptr().cast(),
                            piece.len(),
                        ) == 0
                    },
                    None => true,
                }
            };
            let g = if p.chat != 0 {
                s.0.chat(prompt, &opts, &mut on_token)?
            } else {
                if prompt.is_empty() {
                    return Err(Error::Input("the prompt is empty".into()));
                }
                let ids = s.0.engine().encode_prompt(prompt);
                s.0.generate(&ids, &opts, &mut on_token)?
            };
            if !text_out.is_null() {
                let c = CString::new(g.text.replace('\0', "")).unwrap_or_default();
                // SAFETY: caller contract: writable.
                unsafe { *text_out = c.into_raw() };
            }
            Ok(g.ids.len() as i64)
        },
        recover,
    )
}

/// Save the session's context (its cached token ids and their keys and values) to the file
/// `path`, atomically: on error an earlier file at `path` is left intact. Returns the number
/// of tokens saved, or -1 on error. Format: `docs/session-state.md`.
///
/// # Safety
/// `session` is NULL or a live session not used concurrently; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_save(
    session: *const FerroqSession,
    path: *const c_char,
) -> i64 {
    // SAFETY: caller contract (forwarded).
    unsafe { ferroq_session_save_prefix(session, path, usize::MAX) }
}

/// [`ferroq_session_save`] of the first `n` cached tokens only (all of them if `n` is larger;
/// with chunked attention, `n` must lie in the last token's attention chunk). Returns the
/// number of tokens saved, or -1 on error.
///
/// # Safety
/// As [`ferroq_session_save`].
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_save_prefix(
    session: *const FerroqSession,
    path: *const c_char,
    n: usize,
) -> i64 {
    guard(-1, || {
        // SAFETY: caller contract.
        let s = unsafe { session.as_ref() }.ok_or_else(|| null("session"))?;
        // SAFETY: caller contract.
        let p = unsafe { c_str(path, "path") }?;
        Ok(s.0.save_prefix(p, n)? as i64)
    })
}

/// Replace the session's context with a state file saved from the same model with the same KV
/// type (the next [`ferroq_generate`] reuses its longest common prefix with the prompt).
/// Returns the number of tokens loaded, or -1 on error (missing, corrupted or truncated file,
/// another model, KV type or version, too small a context: the message names the file and
/// the field); on error the session is unchanged.
///
/// # Safety
/// `session` is NULL or a live session not used concurrently; `path` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_load(
    session: *mut FerroqSession,
    path: *const c_char,
) -> i64 {
    guard(-1, || {
        // SAFETY: caller contract.
        let s = unsafe { session.as_mut() }.ok_or_else(|| null("session"))?;
        // SAFETY: caller contract.
        let p = unsafe { c_str(path, "path") }?;
        Ok(s.0.load(p)? as i64)
    })
}

/// Token ids in the session's cache, or -1 when `session` is NULL.
///
/// # Safety
/// `session` is NULL or a live session not used concurrently.
#[no_mangle]
pub unsafe extern "C" fn ferroq_session_n_cached(session: *const FerroqSession) -> i64 {
    guard(-1, || {
        // SAFETY: caller contract.
        let s = unsafe { session.as_ref() }.ok_or_else(|| null("session"))?;
        Ok(s.0.cached().len() as i64)
    })
}

/// Free a string returned by ferroq (NULL is allowed).
///
/// # Safety
/// `s` is NULL or a string from ferroq not freed before.
#[no_mangle]
pub unsafe extern "C" fn ferroq_string_free(s: *mut c_char) {
    guard((), || {
        if !s.is_null() {
            // SAFETY: from CString::into_raw, freed once (caller contract).
            drop(unsafe { CString::from_raw(s) });
        }
        Ok(())
    })
}

/// Tokenize `text` (with the BOS id first if `add_bos`). Writes up to `cap` ids to `out` (may
/// be NULL when `cap` is 0) and returns the total number of ids (call again with a larger
/// buffer if it exceeds `cap`), or -1 on error.
///
/// # Safety
/// `engine` NULL or live; `text` NULL or NUL-terminated; `out` NULL or writable for `cap` ids.
#[no_mangle]
pub unsafe extern "C" fn ferroq_tokenize(
    engine: *const FerroqEngine,
    text: *const c_char,
    add_bos: c_int,
    out: *mut u32,
    cap: usize,
) -> i64 {
    guard(-1, || {
        // SAFETY: caller contract.
        let e = unsafe { engine.as_ref() }.ok_or_else(|| null("engine"))?;
        // SAFETY: caller contract.
        let t = unsafe { c_str(text, "text") }?;
        let ids = e.0.tokenizer().encode(t, add_bos != 0);
        if cap > 0 {
            if out.is_null() {
                return Err(null("out"));
            }
            let n = ids.len().min(cap);
            // SAFETY: `out` is writable for `cap >= n` ids (caller contract).
            unsafe { std::ptr::copy_nonoverlapping(ids.as_ptr(), out, n) };
        }
        Ok(ids.len() as i64)
    })
}

/// Text of `n` ids (special tokens left out if `skip_special`). Writes up to `cap - 1` bytes
/// and a NUL to `out` (may be NULL when `cap` is 0) and returns the full length in bytes
/// (without the NUL; call again with a larger buffer if it is >= `cap`), or -1 on error (an
/// id outside the vocabulary is an error).
///
/// # Safety
/// `engine` NULL or live; `ids` NULL or readable for `n` ids; `out` NULL or writable for
/// `cap` bytes.
#[no_mangle]
pub unsafe extern "C" fn ferroq_detokenize(
    engine: *const FerroqEngine,
    ids: *const u32,
    n: usize,
    skip_special: c_int,
    out: *mut c_char,
    cap: usize,
) -> i64 {
    guard(-1, || {
        // SAFETY: caller contract.
        let e = unsafe { engine.as_ref() }.ok_or_else(|| null("engine"))?;
        let ids: &[u32] = if n == 0 {
            &[]
        } else if ids.is_null() {
            return Err(null("ids"));
        } else {
            // SAFETY: readable for `n` ids (caller contract).
            unsafe { std::slice::from_raw_parts(ids, n) }
        };
        let tok = e.0.tokenizer();
        if let Some(&bad) = ids.iter().find(|&&i| tok.id_to_bytes(i).is_none()) {
            return Err(Error::Input(format!(
                "token id {bad} is not in the vocabulary (size {})",
                tok.vocab_size()
            )));
        }
        let text = tok.decode(ids, skip_special != 0);
        if cap > 0 {
            if out.is_null() {
                return Err(null("out"));
            }
            // never cut a UTF-8 character: stop at the last boundary that fits
            let mut k = text.len().min(cap - 1);
            while !text.is_char_boundary(k) {
                k -= 1;
            }
            // SAFETY: `out` is writable for `cap > k` bytes (caller contract).
            unsafe {
                std::ptr::copy_nonoverlapping(text.as_ptr(), out.cast::<u8>(), k);
                *out.add(k) = 0;
            }
        }
        Ok(text.len() as i64)
    })
}
