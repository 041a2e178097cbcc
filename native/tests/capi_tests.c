/* The C API's error paths, as a C caller sees them: every failure is a
 * status code with a one-line message naming what is wrong. No model graph is
 * needed; the folders are written here. Usage: dj_capi_tests SCRATCH_DIR */
#define _XOPEN_SOURCE 700
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dijiang.h"

static int failures = 0;

#define EXPECT(cond)                                                         \
    do {                                                                     \
        if (!(cond)) {                                                       \
            ++failures;                                                      \
            fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
        }                                                                    \
    } while (0)

/* The call must fail with `status` and a one-line message containing `text`. */
static void expect_error(dj_status got, dj_status status, const char* text, int line) {
    const char* msg = dj_last_error();
    if (got != status || !strstr(msg, text) || strchr(msg, '\n')) {
        ++failures;
        fprintf(stderr, "line %d: got %s '%s', expected %s with '%s'\n", line, dj_status_name(got), msg,
                dj_status_name(status), text);
    }
}
#define EXPECT_ERROR(call, status, text) expect_error((call), (status), (text), __LINE__)

static void write_file(const char* dir, const char* name, const char* text) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE* f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(2);
    }
    fputs(text, f);
    fclose(f);
}

static const char* MANIFEST =
    "{\"model_file\": \"model.onnx\", \"flavor\": \"inline\", \"weights\": \"fp32\", \"logits\": \"last\",\n"
    " \"max_chunk\": 4, \"num_layers\": 1, \"state_shape\": [2, 4, 4], \"vocab_size\": 10,\n"
    " \"inputs\": [{\"name\": \"input_ids\", \"shape\": [\"b\", \"s\"], \"dtype\": \"int64\"},\n"
    "            {\"name\": \"attention_mask\", \"shape\": [\"b\", \"s\"], \"dtype\": \"int64\"},\n"
    "            {\"name\": \"past_position\", \"shape\": [\"b\"], \"dtype\": \"int64\"},\n"
    "            {\"name\": \"past_state.0\", \"shape\": [\"b\", 2, 4, 4], \"dtype\": \"float32\"}],\n"
    " \"outputs\": [{\"name\": \"logits\", \"shape\": [\"b\", 1, 10], \"dtype\": \"float32\"},\n"
    "             {\"name\": \"present_state.0\", \"shape\": [\"b\", 2, 4, 4], \"dtype\": \"float32\"}],\n"
    " \"format\": \"dijiang-onnx/1\"%s}\n";

static const char* FP = ", \"model_fingerprint\": \"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\"";

static void folder(char* out, size_t size, const char* root, const char* name, int fingerprint) {
    snprintf(out, size, "%s/%s", root, name);
    mkdir(out, 0755);
    char text[4096];
    snprintf(text, sizeof text, MANIFEST, fingerprint ? FP : "");
    write_file(out, "manifest.json", text);
}

static void* other_thread(void* arg) {
    (void)arg;
    dj_model* m = NULL;
    dj_model_open("/nonexistent/other-thread", NULL, &m);
    return NULL;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: dj_capi_tests SCRATCH_DIR\n");
        return 2;
    }
    /* A fresh folder per run: files an earlier run left must not change the outcome. */
    mkdir(argv[1], 0755);
    char root[900];
    snprintf(root, sizeof root, "%s/run.XXXXXX", argv[1]);
    if (!mkdtemp(root)) {
        perror(root);
        return 2;
    }
    char dir[1024];
    dj_model* m = (dj_model*)1;

    EXPECT(strcmp(dj_version(), "0.2.0") == 0);
    EXPECT(strcmp(dj_status_name(DJ_ERR_STATE_FILE), "DJ_ERR_STATE_FILE") == 0);

    EXPECT_ERROR(dj_model_open("/nonexistent/export", NULL, &m), DJ_ERR_NOT_FOUND, "no such file or directory");
    EXPECT(m == NULL);
    EXPECT_ERROR(dj_model_open(NULL, NULL, &m), DJ_ERR_INVALID_ARGUMENT, "folder is NULL");

    snprintf(dir, sizeof dir, "%s/empty", root);
    mkdir(dir, 0755);
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_NOT_FOUND, "no manifest.json");

    snprintf(dir, sizeof dir, "%s/corrupt", root);
    mkdir(dir, 0755);
    write_file(dir, "manifest.json", "{\"model_file\": \"model.onnx\", \"num_layers\": ");
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_BAD_EXPORT, "manifest.json: not valid JSON");

    folder(dir, sizeof dir, root, "old", 0);
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_BAD_EXPORT, "re-export with dijiang-deploy 0.2+");

    folder(dir, sizeof dir, root, "notok", 1);
    write_file(dir, "tokenizer_config.json", "{\"eos_token\": \"</s>\"}");
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_TOKENIZER, "tokenizer_config.json but no tokenizer.json");

    folder(dir, sizeof dir, root, "wordpiece", 1);
    write_file(dir, "tokenizer.json", "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {}}}");
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_TOKENIZER, "model type WordPiece");

    folder(dir, sizeof dir, root, "badchat", 1);
    write_file(dir, "chat_format.json", "{\"version\": 7}");
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_CHAT, "malformed chat format");

    folder(dir, sizeof dir, root, "nograph", 1);
    EXPECT_ERROR(dj_model_open(dir, NULL, &m), DJ_ERR_BAD_EXPORT, "model file named by the manifest is missing");

    /* A graph file, but an ONNX Runtime library that does not exist. */
    write_file(dir, "model.onnx", "not a graph");
    dj_model_options o;
    dj_model_options_init(&o);
    o.ort_library = "/nonexistent/libonnxruntime.so.1";
    EXPECT_ERROR(dj_model_open(dir, &o, &m), DJ_ERR_BACKEND_UNAVAILABLE, "ONNX Runtime library not found");

    /* TensorRT: no engine folder, then an engine folder on a machine without TensorRT. */
    dj_model_options_init(&o);
    o.backend = DJ_BACKEND_TRT;
    EXPECT_ERROR(dj_model_open(dir, &o, &m), DJ_ERR_BAD_EXPORT, "no engine.json");
    write_file(dir, "engine.json", "{\"format\": \"dijiang-trt/1\", \"engine_file\": \"model.engine\"}");
    write_file(dir, "model.engine", "x");
    o.trt_library = "/nonexistent/libnvinfer.so.10";
    dj_status st = dj_model_open(dir, &o, &m);
    EXPECT(st == DJ_ERR_BACKEND_UNAVAILABLE);
    EXPECT(strstr(dj_last_error(), "TensorRT") != NULL);
    o.backend = 9;
    EXPECT_ERROR(dj_model_open(dir, &o, &m), DJ_ERR_INVALID_ARGUMENT, "unknown backend");

    /* The message is per thread: another thread's failure does not replace this one's. */
    EXPECT_ERROR(dj_model_open("/nonexistent/this-thread", NULL, &m), DJ_ERR_NOT_FOUND, "this-thread");
    pthread_t t;
    pthread_create(&t, NULL, other_thread, NULL);
    pthread_join(t, NULL);
    EXPECT(strstr(dj_last_error(), "this-thread") != NULL);

    /* NULL objects are refused, not dereferenced. */
    dj_token tok = 0;
    EXPECT_ERROR(dj_session_create(NULL, NULL), DJ_ERR_INVALID_ARGUMENT, "model is NULL");
    EXPECT_ERROR(dj_session_sample(NULL, NULL, &tok), DJ_ERR_INVALID_ARGUMENT, "session is NULL");
    EXPECT_ERROR(dj_session_load(NULL, "x"), DJ_ERR_INVALID_ARGUMENT, "session is NULL");
    EXPECT(dj_session_position(NULL) == 0);
    dj_model_close(NULL);
    dj_session_free(NULL);

    if (failures) {
        fprintf(stderr, "capi_errors: %d check(s) failed\n", failures);
        return 1;
    }
    printf("capi_errors: all checks passed\n");
    return 0;
}
