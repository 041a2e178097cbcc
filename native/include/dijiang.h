/*
 * dijiang.h: the C API of libdijiang, the native runtime of dijiang-deploy.
 *
 * A DiJiang model carries a fixed-size recurrent state instead of a KV cache,
 * so a whole conversation is that state (plus its token history). Two objects:
 *
 *   dj_model    an opened export folder (manifest.json, model.onnx,
 *               tokenizer.json, chat_format.json) or TensorRT engine folder.
 *               Immutable once open: share one between threads.
 *   dj_session  one conversation: state, position, token history, sampling
 *               RNG, chat messages. Use a session from one thread at a time.
 *
 * Every call that can fail returns a dj_status; on failure dj_last_error()
 * gives a one-line message, kept per thread until that thread's next failing
 * call. Objects are created with the _open and _create calls and released
 * with _close and _free (NULL is accepted and ignored). Strings are UTF-8.
 *
 * State files are byte-compatible with the Python runtime
 * (docs/state-format.md): a session saved here resumes in Python and back.
 */
#ifndef DIJIANG_H
#define DIJIANG_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define DJ_API __declspec(dllexport)
#else
#define DJ_API __attribute__((visibility("default")))
#endif

#define DIJIANG_VERSION_MAJOR 0
#define DIJIANG_VERSION_MINOR 2
#define DIJIANG_VERSION_PATCH 0

typedef struct dj_model dj_model;
typedef struct dj_session dj_session;
typedef int32_t dj_token;

typedef enum dj_status {
    DJ_OK = 0,
    DJ_ERR_INVALID_ARGUMENT = 1,    /* NULL where an object is needed, out-of-range value, bad token id */
    DJ_ERR_NOT_FOUND = 2,           /* missing folder or file */
    DJ_ERR_BAD_EXPORT = 3,          /* manifest or graph malformed, inconsistent or too old */
    DJ_ERR_TOKENIZER = 4,           /* no tokenizer, or one this runtime does not implement */
    DJ_ERR_BACKEND_UNAVAILABLE = 5, /* ONNX Runtime / TensorRT / CUDA library not found or too old */
    DJ_ERR_BACKEND = 6,             /* the backend failed while loading or running the graph */
    DJ_ERR_STATE_FILE = 7,          /* not a state file, damaged, truncated, other version or model */
    DJ_ERR_POSITION_LIMIT = 8,      /* past the model's last position (non-geometric decay tables) */
    DJ_ERR_IO = 9,                  /* reading or writing a file failed */
    DJ_ERR_BUFFER_TOO_SMALL = 10,   /* the output did not fit; the size needed was written */
    DJ_ERR_CHAT = 11,               /* no chat format, or a message it cannot render */
    DJ_ERR_EMPTY_SESSION = 12,      /* nothing fed yet: no logits to sample from */
    DJ_ERR_OUT_OF_MEMORY = 13,
    DJ_ERR_INTERNAL = 14
} dj_status;

/* The message of this thread's last failed call ("" if none). Valid until the
 * thread's next failing call. */
DJ_API const char* dj_last_error(void);
/* A fixed name for a status ("DJ_ERR_STATE_FILE"). */
DJ_API const char* dj_status_name(dj_status status);
/* "0.2.0" */
DJ_API const char* dj_version(void);

/* ------------------------------------------------------------------ model */

typedef enum dj_backend {
    DJ_BACKEND_ORT = 0, /* ONNX Runtime on CPU, an export folder */
    DJ_BACKEND_TRT = 1  /* TensorRT, an engine folder of `dijiang-deploy build` */
} dj_backend;

typedef struct dj_model_options {
    size_t struct_size;           /* sizeof(dj_model_options): set by dj_model_options_init */
    int32_t backend;              /* a dj_backend; default DJ_BACKEND_ORT */
    const char* ort_library;      /* libonnxruntime.so to dlopen; NULL: $DIJIANG_ORT_LIBRARY, the
                                     onnxruntime wheel of the build's venv, then the system's */
    const char* trt_library;      /* libnvinfer.so; NULL: $DIJIANG_TRT_LIBRARY, then the system's */
    const char* trt_plugin_library; /* DiJiang TensorRT plugins; NULL: $DIJIANG_TRT_PLUGIN_LIB or engine.json's */
    int32_t intra_op_threads;     /* ONNX Runtime threads; 0: $DIJIANG_THREADS, else ONNX Runtime's choice */
    int32_t load_tokenizer;       /* 1 (default): read tokenizer.json when the folder has one */
} dj_model_options;

DJ_API void dj_model_options_init(dj_model_options* options);

/* Open an export folder. options may be NULL (defaults). On failure *out is NULL. */
DJ_API dj_status dj_model_open(const char* folder, const dj_model_options* options, dj_model** out);
DJ_API void dj_model_close(dj_model* model);

DJ_API int32_t dj_model_vocab_size(const dj_model* model);
DJ_API int32_t dj_model_num_layers(const dj_model* model);
DJ_API int32_t dj_model_max_chunk(const dj_model* model);
/* Bytes of one sequence's recurrent state (all layers). */
DJ_API size_t dj_model_state_bytes(const dj_model* model);
/* Last position for non-geometric decay tables, or -1 (unbounded). */
DJ_API int64_t dj_model_position_limit(const dj_model* model);
/* The export's fingerprint (manifest.json "model_fingerprint"), 64 hex digits. */
DJ_API const char* dj_model_fingerprint(const dj_model* model);
/* "ort" or "trt". */
DJ_API const char* dj_model_backend_name(const dj_model* model);
DJ_API int dj_model_has_tokenizer(const dj_model* model);
DJ_API int dj_model_has_chat_format(const dj_model* model);
/* 1 if the token ends an answer (the manifest's or the tokenizer's end-of-sequence id). */
DJ_API int dj_model_is_eos(const dj_model* model, dj_token token);

/* Text to token ids (special-token markup recognised, nothing added), as
 * Hugging Face tokenizers' encode(text, add_special_tokens=False). Writes at
 * most `capacity` ids; *n_tokens gets the count, also when it returns
 * DJ_ERR_BUFFER_TOO_SMALL (call again with that capacity). */
DJ_API dj_status dj_tokenize(const dj_model* model, const char* text, size_t text_len, dj_token* tokens,
                             size_t capacity, size_t* n_tokens);
/* Token ids to UTF-8 text (byte-level decode; special tokens skipped when
 * skip_special is nonzero). Writes at most `capacity` bytes plus no NUL;
 * *text_len gets the length, also with DJ_ERR_BUFFER_TOO_SMALL. */
DJ_API dj_status dj_detokenize(const dj_model* model, const dj_token* tokens, size_t n_tokens, int skip_special,
                               char* text, size_t capacity, size_t* text_len);

/* ---------------------------------------------------------------- session */

DJ_API dj_status dj_session_create(dj_model* model, dj_session** out);
DJ_API void dj_session_free(dj_session* session);
/* Forget everything: an empty conversation (the RNG and chat too). */
DJ_API dj_status dj_session_reset(dj_session* session);
/* An independent copy (state, history, RNG, chat). */
DJ_API dj_status dj_session_fork(const dj_session* session, dj_session** out);

/* Tokens fed so far (== the length of the token history). */
DJ_API int64_t dj_session_position(const dj_session* session);
/* The token history; the pointer stays valid until the session next changes. */
DJ_API const dj_token* dj_session_tokens(const dj_session* session, size_t* n_tokens);
/* Logits [vocab] after the last fed token, or NULL before the first. Valid
 * until the session next changes. */
DJ_API const float* dj_session_logits(const dj_session* session);

/* Feed tokens (prefill in chunks of the lengths the Python runtime uses:
 * powers of two up to the manifest's max_chunk). n == 0 is a no-op. */
DJ_API dj_status dj_session_append_tokens(dj_session* session, const dj_token* tokens, size_t n_tokens);
/* Tokenize and feed text (nothing added); *n_fed (may be NULL) gets the count. */
DJ_API dj_status dj_session_append_text(dj_session* session, const char* text, size_t text_len, size_t* n_fed);

typedef struct dj_sampling {
    size_t struct_size;        /* sizeof(dj_sampling): set by dj_sampling_init */
    double temperature;        /* 0 (default): greedy */
    int32_t top_k;             /* 0: all */
    double top_p;              /* (0, 1], 1: all */
    double min_p;              /* [0, 1), 0: off */
    double repetition_penalty; /* > 0, 1: off (CTRL rule over history and generated tokens) */
    double presence_penalty;   /* [-2, 2] over generated tokens */
    double frequency_penalty;  /* [-2, 2] over generated tokens */
    int32_t has_seed;          /* 1: use `seed` (see dj_session_sample / dj_session_generate) */
    uint64_t seed;
} dj_sampling;

DJ_API void dj_sampling_init(dj_sampling* sampling);

/* The pull loop: pick the next token from the current logits (does not feed
 * it). sampling NULL: greedy. The RNG is the session's SplitMix64; a seed in
 * `sampling` seeds it only when the session has none yet (first draw, after
 * reset); dj_session_set_seed reseeds it explicitly. Penalties see the whole
 * history; presence/frequency count the tokens fed since the last append. */
DJ_API dj_status dj_session_sample(dj_session* session, const dj_sampling* sampling, dj_token* token);
/* Feed one token (a decode step). */
DJ_API dj_status dj_session_feed_token(dj_session* session, dj_token token);
DJ_API dj_status dj_session_set_seed(dj_session* session, uint64_t seed);

typedef enum dj_finish_reason {
    DJ_FINISH_EOS = 0,            /* the model's end-of-sequence token (not returned) */
    DJ_FINISH_LENGTH = 1,         /* max_new_tokens */
    DJ_FINISH_STOP = 2,           /* a stop token (returned) */
    DJ_FINISH_POSITION_LIMIT = 3, /* the decay tables' last position */
    DJ_FINISH_CALLBACK = 4        /* the callback asked to stop */
} dj_finish_reason;

/* Called once per generated token with the text it completes (may be empty:
 * part of a multi-byte character), and once more with token -1 for text still
 * pending at the end. Return nonzero to stop. */
typedef int (*dj_token_callback)(void* user_data, dj_token token, const char* text, size_t text_len);

typedef struct dj_generate_options {
    size_t struct_size;           /* sizeof(dj_generate_options): set by dj_generate_options_init */
    int32_t max_new_tokens;       /* default 128 */
    dj_sampling sampling;         /* default greedy; a seed reseeds the RNG (else it continues) */
    const dj_token* stop_tokens;  /* extra tokens that end generation (kept in the output) */
    size_t n_stop_tokens;
    int32_t feed_last;            /* 1 (default): after a length/stop finish feed the last token, so
                                     the state covers all generated text (the next turn goes on) */
} dj_generate_options;

DJ_API void dj_generate_options_init(dj_generate_options* options);

typedef struct dj_generation {
    int32_t n_tokens;             /* generated tokens (written to `tokens` up to its capacity) */
    dj_finish_reason finish_reason;
    int32_t decode_steps;         /* one-token graph runs */
    double decode_seconds;
    int32_t prompt_tokens;        /* dj_session_chat: tokens the turn fed before answering */
    double prefill_seconds;
} dj_generation;

/* Generate from where the session is (after an append), as the Python
 * runtime's Session.generate: same tokens for the same logits and sampling.
 * callback and tokens may be NULL. */
DJ_API dj_status dj_session_generate(dj_session* session, const dj_generate_options* options,
                                     dj_token_callback callback, void* user_data, dj_token* tokens,
                                     size_t capacity, dj_generation* result);

/* One chat turn (needs chat_format.json): adds the message, feeds only what it
 * adds to the rendered conversation, answers, and records the answer, like
 * Session.chat of the Python runtime. role: "user" (NULL), "system" (first
 * message only) or "assistant". */
DJ_API dj_status dj_session_chat(dj_session* session, const char* role, const char* content,
                                 const dj_generate_options* options, dj_token_callback callback,
                                 void* user_data, dj_generation* result);
DJ_API size_t dj_session_message_count(const dj_session* session);
/* Message i's role and content (valid until the session next changes). */
DJ_API dj_status dj_session_message(const dj_session* session, size_t index, const char** role,
                                    const char** content);

/* ------------------------------------------------------------------ state */

/* Write the session to a state file, atomically (docs/state-format.md). */
DJ_API dj_status dj_session_save(const dj_session* session, const char* path);
/* Replace the session with a state file written for this model. On failure
 * the session is unchanged. */
DJ_API dj_status dj_session_load(dj_session* session, const char* path);
/* The state file as bytes in a buffer the library allocates: free it with dj_free. */
DJ_API dj_status dj_session_save_to_buffer(const dj_session* session, void** data, size_t* size);
DJ_API dj_status dj_session_load_from_buffer(dj_session* session, const void* data, size_t size);
DJ_API void dj_free(void* data);

#ifdef __cplusplus
}
#endif

#endif /* DIJIANG_H */
