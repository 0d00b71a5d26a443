/*
 * ferroq.h: C API of ferroq (pure-Rust CPU inference for Llama models). Link with the static
 * library `libferroq.a` (plus -lpthread -ldl -lm) or the shared `libferroq.so`.
 *
 * Ownership and threads:
 *   - ferroq_engine: a loaded model (weights, tokenizer, chat template). Immutable and
 *     thread-safe: any number of threads and sessions may use one engine at once.
 *     Free with ferroq_engine_free. A session keeps its engine alive, so the engine may be
 *     freed before its sessions.
 *   - ferroq_session: one conversation with its own KV cache. Use a session from one thread
 *     at a time. Free with ferroq_session_free.
 *   - Strings returned through `char **` out-parameters belong to the caller: free them with
 *     ferroq_string_free. Strings passed in are only read during the call.
 *   - All strings are UTF-8.
 *
 * Errors: functions return NULL or a negative number and set a per-thread message read with
 * ferroq_last_error(). No Rust panic crosses this boundary (it becomes an error and is not
 * printed on stderr; a session whose generation hit one drops its conversation and stays
 * usable). NULL pointers are reported as errors, never dereferenced.
 */
#ifndef FERROQ_H
#define FERROQ_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct FerroqEngine ferroq_engine;
typedef struct FerroqSession ferroq_session;

typedef struct ferroq_session_params {
    size_t ctx;     /* context in tokens; 0 = min(4096, the model's maximum) */
    size_t batch;   /* prompt tokens per forward pass; 0 = default */
    size_t threads; /* 0 = all cores; at most 512 */
    int kv;         /* KV cache type: 0 = default (f32 unquantized, f16 quantized models),
                       1 = f32, 2 = f16, 3 = q8, 4 = q4 */
} ferroq_session_params;

typedef struct ferroq_engine_params {
    int ctx_override;    /* non-zero: contexts beyond max_position_embeddings are allowed
                            (refused by default with an error naming the limit) */
    uint64_t mem_budget; /* bytes for the model; 0 = what is free (machine or memory cgroup),
                            UINT64_MAX = never page. A MoE model whose file does not fit pages
                            its routed experts (expert-aware residency). */
    int mlock;           /* non-zero: lock the resident weights in memory */
    int verify;          /* non-zero: check every tensor's checksum while opening (reads the
                            file once, like `ferroq verify`); a mismatch fails the open with
                            an error naming the tensor */
} ferroq_engine_params;

typedef struct ferroq_gen_params {
    size_t max_tokens;
    float temperature; /* 0 = greedy */
    size_t top_k;      /* 0 = off */
    float top_p;       /* 1 = off */
    float min_p;       /* 0 = off */
    float repeat_penalty;   /* 1 = off */
    float presence_penalty; /* 0 = off */
    float frequency_penalty;/* 0 = off */
    uint64_t seed;
    int chat;          /* non-zero: prompt is the next user message of the session's chat */
    const char *const *stop; /* n_stop stop strings (NULL if n_stop == 0) */
    size_t n_stop;
} ferroq_gen_params;

/* Called for each generated token with the text it completes (`piece`, `len` bytes, NOT
 * NUL-terminated, possibly empty) and once with id -1 for text released at the end.
 * Return 0 to continue, non-zero to stop. */
typedef int (*ferroq_token_cb)(void *user, int64_t id, const char *piece, size_t len);

/* The last error of the calling thread, or NULL. Valid until the next ferroq call on it. */
const char *ferroq_last_error(void);

/* Open a .fqm model. NULL on error. */
ferroq_engine *ferroq_engine_open(const char *path);
ferroq_engine_params ferroq_engine_params_default(void); /* all zero */
/* ferroq_engine_open with settings; params may be NULL (defaults). NULL on error. */
ferroq_engine *ferroq_engine_open_ex(const char *path, const ferroq_engine_params *params);
void ferroq_engine_free(ferroq_engine *engine); /* NULL allowed */
double ferroq_engine_load_ms(const ferroq_engine *engine);

ferroq_session_params ferroq_session_params_default(void);
/* greedy, 256 tokens, raw prompt, no stop strings */
ferroq_gen_params ferroq_gen_params_default(void);

/* params may be NULL (defaults). NULL on error. */
ferroq_session *ferroq_session_new(const ferroq_engine *engine,
                                   const ferroq_session_params *params);
void ferroq_session_free(ferroq_session *session); /* NULL allowed */
/* Forget the conversation and the cache. 0, or -1 on error. */
int ferroq_session_reset(ferroq_session *session);

/* Generate an answer to `prompt`. params may be NULL (defaults); cb may be NULL. If text_out
 * is not NULL it receives the whole answer (free with ferroq_string_free). The cache of the
 * longest common prefix with the previous call is reused. Returns the number of generated
 * tokens, or -1 on error (empty prompt, prompt longer than the context, no chat template
 * with chat != 0, ...). */
int64_t ferroq_generate(ferroq_session *session, const char *prompt,
                        const ferroq_gen_params *params, ferroq_token_cb cb, void *user,
                        char **text_out);

void ferroq_string_free(char *s); /* NULL allowed */

/* Session state files (docs/session-state.md): a session's cached token ids and their keys and
 * values, e.g. a system prompt processed once and loaded by later runs. */
/* Save the whole context to `path` (written to a temporary file, then renamed: on error an
 * earlier file at `path` is intact). Returns the tokens saved, or -1 on error. */
int64_t ferroq_session_save(const ferroq_session *session, const char *path);
/* Save only the first n cached tokens (all if n is larger; with Llama 4's chunked attention, n
 * must lie in the attention chunk of the last cached token). Tokens saved, or -1. */
int64_t ferroq_session_save_prefix(const ferroq_session *session, const char *path, size_t n);
/* Replace the context with a file saved from the same model and KV type; the next
 * ferroq_generate reuses its longest common prefix with the prompt. Returns the tokens
 * loaded, or -1 (missing, corrupted, truncated, other model / KV type / version, context too
 * small; the message names the file and the field); on error the session is unchanged. */
int64_t ferroq_session_load(ferroq_session *session, const char *path);
/* Token ids in the session's cache, or -1 if session is NULL. */
int64_t ferroq_session_n_cached(const ferroq_session *session);

/* Token ids of `text`; writes up to `cap` of them to `out` and returns the total count
 * (retry with a larger buffer if it exceeds cap), or -1 on error. */
int64_t ferroq_tokenize(const ferroq_engine *engine, const char *text, int add_bos,
                        uint32_t *out, size_t cap);

/* Text of `n` ids; writes up to cap-1 bytes and a NUL to `out` (never cutting a UTF-8
 * character: fewer bytes when one would not fit) and returns the full length in bytes (retry
 * with a larger buffer if it is >= cap), or -1 on error. */
int64_t ferroq_detokenize(const ferroq_engine *engine, const uint32_t *ids, size_t n,
                          int skip_special, char *out, size_t cap);

#ifdef __cplusplus
}
#endif

#endif /* FERROQ_H */
