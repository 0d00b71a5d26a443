/* Smoke test of the C API: open a model, tokenize/detokenize, generate with a callback,
 * save and load session state, check error reporting. Usage: smoke MODEL.fqm STATE_PATH.
 * Prints the answer; exit 0 on success. */
#include <stdio.h>
#include <string.h>
#include "ferroq.h"

static int on_token(void *user, int64_t id, const char *piece, size_t len) {
    (void)id;
    size_t *total = (size_t *)user;
    *total += len;
    fwrite(piece, 1, len, stdout);
    return 0;
}

#define CHECK(c, what) do { if (!(c)) { \
    fprintf(stderr, "FAIL %s: %s\n", what, ferroq_last_error() ? ferroq_last_error() : "(no error)"); \
    return 1; } } while (0)

int main(int argc, char **argv) {
    CHECK(argc == 3, "usage");
    /* errors: no panic, a message */
    CHECK(ferroq_engine_open("/nonexistent.fqm") == NULL, "open missing");
    CHECK(ferroq_last_error() != NULL, "error message");
    CHECK(ferroq_engine_open(NULL) == NULL, "open NULL");
    CHECK(ferroq_session_new(NULL, NULL) == NULL, "session NULL");
    ferroq_engine_free(NULL);
    ferroq_session_free(NULL);

    ferroq_engine *e = ferroq_engine_open(argv[1]);
    CHECK(e != NULL, "open");
    uint32_t ids[64];
    int64_t n = ferroq_tokenize(e, "Hello world", 0, ids, 64);
    CHECK(n > 0 && n <= 64, "tokenize");
    char buf[64];
    int64_t len = ferroq_detokenize(e, ids, (size_t)n, 1, buf, sizeof buf);
    CHECK(len == 11 && strcmp(buf, "Hello world") == 0, "detokenize");

    ferroq_session_params sp = ferroq_session_params_default();
    sp.ctx = 256;
    sp.threads = 1;
    ferroq_session *s = ferroq_session_new(e, &sp);
    CHECK(s != NULL, "session");
    ferroq_session *s2 = ferroq_session_new(e, &sp);
    CHECK(s2 != NULL, "second session");
    ferroq_engine_free(e); /* the sessions keep the engine alive */

    ferroq_gen_params gp = ferroq_gen_params_default();
    gp.max_tokens = 16;
    gp.chat = 1;
    size_t total = 0;
    char *text = NULL;
    int64_t got = ferroq_generate(s, "What is the capital of France?", &gp, on_token, &total, &text);
    CHECK(got > 0 && text != NULL, "generate");
    printf("\n");
    CHECK(strlen(text) == total, "streamed length");
    ferroq_string_free(text);

    /* session state: save, refuse bad calls without changing anything, load elsewhere */
    int64_t cached = ferroq_session_n_cached(s);
    CHECK(cached > 0, "n_cached");
    CHECK(ferroq_session_n_cached(NULL) == -1, "n_cached NULL");
    CHECK(ferroq_session_save(s, argv[2]) == cached, "save");
    CHECK(ferroq_session_save(NULL, argv[2]) == -1, "save NULL session");
    CHECK(ferroq_session_save(s, NULL) == -1, "save NULL path");
    CHECK(ferroq_session_load(s2, "/nonexistent.state") == -1, "load missing");
    CHECK(ferroq_last_error() != NULL, "load missing message");
    CHECK(ferroq_session_n_cached(s2) == 0, "failed load leaves the session empty");
    CHECK(ferroq_session_load(s2, argv[2]) == cached, "load");
    CHECK(ferroq_session_n_cached(s2) == cached, "n_cached after load");
    CHECK(ferroq_session_save_prefix(s, argv[2], 1) == 1, "save prefix");
    CHECK(ferroq_session_load(s2, argv[2]) == 1, "load prefix");
    got = ferroq_generate(s2, "What is the capital of France?", &gp, NULL, NULL, NULL);
    CHECK(got > 0, "generate after load");
    ferroq_session_free(s2);

    CHECK(ferroq_generate(s, "", &gp, NULL, NULL, NULL) == -1, "empty prompt");
    CHECK(strstr(ferroq_last_error(), "empty") != NULL, "empty prompt message");
    CHECK(ferroq_generate(s, NULL, &gp, NULL, NULL, NULL) == -1, "NULL prompt");
    CHECK(ferroq_session_reset(s) == 0, "reset");
    ferroq_session_free(s);
    printf("C API OK\n");
    return 0;
}
