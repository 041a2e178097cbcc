/* Embedding libdijiang in C: open an export, stream a reply, save the conversation.
 *
 *   embed_c EXPORT_DIR "prompt" [STATE_FILE]
 *
 * With STATE_FILE present the conversation continues from it (the state is the
 * whole history, at a fixed size); afterwards it is saved there. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dijiang.h"

static int print_piece(void* user, dj_token token, const char* text, size_t len) {
    (void)user;
    (void)token;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0; /* nonzero would stop generation */
}

static int fail(const char* what, dj_status status) {
    fprintf(stderr, "embed_c: %s: %s (%s)\n", what, dj_last_error(), dj_status_name(status));
    return 1;
}

int main(int argc, char** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: embed_c EXPORT_DIR PROMPT [STATE_FILE]\n");
        return 2;
    }
    dj_model* model = NULL;
    dj_session* session = NULL;
    dj_status st = dj_model_open(argv[1], NULL, &model);
    if (st != DJ_OK) return fail("open", st);
    if ((st = dj_session_create(model, &session)) != DJ_OK) return fail("session", st);

    FILE* existing = argc > 3 ? fopen(argv[3], "rb") : NULL;
    if (existing) {
        fclose(existing);
        if ((st = dj_session_load(session, argv[3])) != DJ_OK) return fail("load", st);
        fprintf(stderr, "[resumed %lld tokens of history]\n", (long long)dj_session_position(session));
    }

    dj_generate_options opts;
    dj_generate_options_init(&opts);
    opts.max_new_tokens = 48;
    opts.sampling.temperature = 0.7;
    opts.sampling.top_p = 0.9;
    opts.sampling.has_seed = 1;
    opts.sampling.seed = 1234;

    dj_generation result;
    if (dj_model_has_chat_format(model))
        st = dj_session_chat(session, "user", argv[2], &opts, print_piece, NULL, &result);
    else if ((st = dj_session_append_text(session, argv[2], strlen(argv[2]), NULL)) == DJ_OK)
        st = dj_session_generate(session, &opts, print_piece, NULL, NULL, 0, &result);
    if (st != DJ_OK) return fail("generate", st);
    printf("\n");
    fprintf(stderr, "[%d tokens, %.1f tok/s]\n", result.n_tokens,
            result.decode_seconds > 0 ? result.decode_steps / result.decode_seconds : 0.0);

    if (argc > 3 && (st = dj_session_save(session, argv[3])) != DJ_OK) return fail("save", st);
    dj_session_free(session);
    dj_model_close(model);
    return 0;
}
