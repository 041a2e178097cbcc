// dijiang-run: generate text from an export folder with libdijiang, streaming it to stdout.
//
//   dijiang-run EXPORT_DIR --prompt "..." [--chat] [--max-new-tokens N] [--temperature T] [--top-k K]
//               [--top-p P] [--seed S] [--save-state F] [--load-state F] [--backend ort|trt]
//
// Timings and the reason generation stopped go to stderr, as `dijiang-deploy run` prints them.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "dijiang.h"

namespace {

double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

const char* kUsage =
    "usage: dijiang-run EXPORT_DIR (--prompt TEXT | --prompt-ids ID,ID,...) [--chat] [--max-new-tokens N]\n"
    "                  [--temperature T] [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--seed S]\n"
    "                  [--save-state FILE] [--load-state FILE] [--backend ort|trt] [--threads N]\n"
    "                  [--ort-library PATH] [--continue] [--print-ids] [--dump-logits FILE]\n"
    "Streams generated text to standard output; prefill and decode speed go to standard error.\n"
    "  --prompt-ids     feed token ids (exports without a tokenizer)\n"
    "  --continue       with --load-state and no prompt: generate on from the saved state\n"
    "  --print-ids      print the generated token ids (one line) instead of the text\n"
    "  --dump-logits F  write the float32 logits each generated token was picked from (debugging)\n";

[[noreturn]] void usage_error(const std::string& msg) {
    std::fprintf(stderr, "dijiang-run: error: %s\n%s", msg.c_str(), kUsage);
    std::exit(2);
}

void check(dj_status st) {
    if (st != DJ_OK) {
        std::fprintf(stderr, "dijiang-run: error: %s (%s)\n", dj_last_error(), dj_status_name(st));
        std::exit(1);
    }
}

struct Run {
    dj_session* session = nullptr;
    int32_t vocab = 0;
    bool print_ids = false;
    FILE* dump = nullptr;
    double start = 0, first_token = -1;
    std::vector<dj_token> ids;
};

int on_token(void* user, dj_token token, const char* text, size_t len) {
    Run* r = static_cast<Run*>(user);
    if (r->first_token < 0) r->first_token = now();
    if (token >= 0) {
        r->ids.push_back(token);
        if (r->dump) {
            // The logits the token was just picked from (it is not fed yet).
            const float* lg = dj_session_logits(r->session);
            if (lg) std::fwrite(lg, sizeof(float), static_cast<size_t>(r->vocab), r->dump);
        }
    }
    if (!r->print_ids && len) {
        std::fwrite(text, 1, len, stdout);
        std::fflush(stdout);
    }
    return 0;
}

const char* finish_text(dj_finish_reason r) {
    switch (r) {
        case DJ_FINISH_EOS: return "the model ended its answer (end-of-sequence token)";
        case DJ_FINISH_LENGTH: return "reached --max-new-tokens";
        case DJ_FINISH_STOP: return "a stop token appeared";
        case DJ_FINISH_POSITION_LIMIT: return "reached the decay tables' last position";
        case DJ_FINISH_CALLBACK: return "stopped by the caller";
    }
    return "?";
}

double number(const std::string& flag, const char* v) {
    char* end = nullptr;
    double d = std::strtod(v, &end);
    if (!end || *end || end == v) usage_error(flag + " needs a number, got '" + v + "'");
    return d;
}

long long integer(const std::string& flag, const char* v) {
    char* end = nullptr;
    long long i = std::strtoll(v, &end, 10);
    if (!end || *end || end == v) usage_error(flag + " needs an integer, got '" + v + "'");
    return i;
}

}  // namespace

int main(int argc, char** argv) {
    Run run;
    run.start = now();
    std::string folder, prompt, prompt_ids, save_state, load_state, dump_path, ort_library;
    bool have_prompt = false, chat = false, go_on = false;
    dj_model_options mo;
    dj_model_options_init(&mo);
    dj_generate_options go;
    dj_generate_options_init(&go);
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto value = [&]() -> const char* {
            if (i + 1 >= argc) usage_error(a + " needs a value");
            return argv[++i];
        };
        if (a == "-h" || a == "--help") {
            std::fputs(kUsage, stdout);
            return 0;
        } else if (a == "--prompt") {
            prompt = value();
            have_prompt = true;
        } else if (a == "--prompt-ids") {
            prompt_ids = value();
        } else if (a == "--continue") {
            go_on = true;
        } else if (a == "--chat") {
            chat = true;
        } else if (a == "--max-new-tokens") {
            long long n = integer(a, value());
            if (n < 1) usage_error("--max-new-tokens must be >= 1");
            go.max_new_tokens = static_cast<int32_t>(n);
        } else if (a == "--temperature") {
            go.sampling.temperature = number(a, value());
        } else if (a == "--top-k") {
            go.sampling.top_k = static_cast<int32_t>(integer(a, value()));
        } else if (a == "--top-p") {
            go.sampling.top_p = number(a, value());
        } else if (a == "--min-p") {
            go.sampling.min_p = number(a, value());
        } else if (a == "--repetition-penalty") {
            go.sampling.repetition_penalty = number(a, value());
        } else if (a == "--seed") {
            go.sampling.seed = static_cast<uint64_t>(integer(a, value()));
            go.sampling.has_seed = 1;
        } else if (a == "--save-state") {
            save_state = value();
        } else if (a == "--load-state") {
            load_state = value();
        } else if (a == "--backend") {
            std::string b = value();
            if (b == "ort") mo.backend = DJ_BACKEND_ORT;
            else if (b == "trt") mo.backend = DJ_BACKEND_TRT;
            else usage_error("--backend must be ort or trt");
        } else if (a == "--threads") {
            mo.intra_op_threads = static_cast<int32_t>(integer(a, value()));
        } else if (a == "--ort-library") {
            ort_library = value();
            mo.ort_library = ort_library.c_str();
        } else if (a == "--print-ids") {
            run.print_ids = true;
        } else if (a == "--dump-logits") {
            dump_path = value();
        } else if (!a.empty() && a[0] == '-') {
            usage_error("unknown option " + a);
        } else if (folder.empty()) {
            folder = a;
        } else {
            usage_error("unexpected argument " + a);
        }
    }
    if (folder.empty()) usage_error("give the export folder");
    if (go_on && (load_state.empty() || have_prompt || !prompt_ids.empty() || chat))
        usage_error("--continue goes with --load-state and no prompt");
    if (!have_prompt && prompt_ids.empty() && !go_on) {
        if (isatty(0)) usage_error("give --prompt TEXT (or pipe the prompt on standard input)");
        prompt.assign(std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>());
        have_prompt = true;
    }
    if (have_prompt && prompt.find_first_not_of(" \t\r\n") == std::string::npos)
        usage_error("empty prompt: give some text with --prompt");
    if (chat && !prompt_ids.empty()) usage_error("--chat takes --prompt text, not --prompt-ids");

    dj_model* model = nullptr;
    check(dj_model_open(folder.c_str(), &mo, &model));
    double opened = now();
    check(dj_session_create(model, &run.session));
    run.vocab = dj_model_vocab_size(model);
    if (!load_state.empty()) check(dj_session_load(run.session, load_state.c_str()));
    if (!dump_path.empty()) {
        run.dump = std::fopen(dump_path.c_str(), "wb");
        if (!run.dump) {
            std::fprintf(stderr, "dijiang-run: error: cannot write %s\n", dump_path.c_str());
            return 1;
        }
    }

    dj_generation g{};
    if (chat) {
        check(dj_session_chat(run.session, "user", prompt.c_str(), &go, on_token, &run, &g));
    } else {
        double t0 = now();
        size_t fed = 0;
        if (go_on) {
            // Nothing to feed: the loaded state's logits give the first token.
        } else if (!prompt_ids.empty()) {
            std::vector<dj_token> ids;
            size_t at = 0;
            while (at <= prompt_ids.size()) {
                size_t comma = prompt_ids.find(',', at);
                std::string item = prompt_ids.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
                if (!item.empty()) ids.push_back(static_cast<dj_token>(integer("--prompt-ids", item.c_str())));
                if (comma == std::string::npos) break;
                at = comma + 1;
            }
            if (ids.empty()) usage_error("--prompt-ids is empty");
            check(dj_session_append_tokens(run.session, ids.data(), ids.size()));
            fed = ids.size();
        } else {
            check(dj_session_append_text(run.session, prompt.data(), prompt.size(), &fed));
        }
        double t1 = now();
        check(dj_session_generate(run.session, &go, on_token, &run, nullptr, 0, &g));
        g.prompt_tokens = static_cast<int32_t>(fed);
        g.prefill_seconds = t1 - t0;
    }
    if (run.print_ids) {
        for (size_t i = 0; i < run.ids.size(); ++i) std::printf(i ? " %d" : "%d", run.ids[i]);
        std::printf("\n");
    }
    std::fflush(stdout);
    if (run.dump) std::fclose(run.dump);
    std::fprintf(stderr, "\n");
    double prefill = g.prefill_seconds > 0 ? g.prompt_tokens / g.prefill_seconds : 0.0;
    char decode[96];
    if (g.decode_steps >= 4)
        std::snprintf(decode, sizeof decode, "decode %.1f tok/s", g.decode_steps / g.decode_seconds);
    else
        std::snprintf(decode, sizeof decode, "too few steps to time decode");
    std::fprintf(stderr,
                 "[prompt %d tokens, prefill %.1f tok/s; generated %d tokens, %s; state %.2f MiB for %lld tokens of "
                 "history; stopped: %s]\n",
                 g.prompt_tokens, prefill, g.n_tokens, decode, dj_model_state_bytes(model) / 1048576.0,
                 static_cast<long long>(dj_session_position(run.session)), finish_text(g.finish_reason));
    std::fprintf(stderr, "[native %s: model open %.3f s, first token %.3f s after start, decode steps %d in %.3f s]\n",
                 dj_model_backend_name(model), opened - run.start, run.first_token < 0 ? -1.0 : run.first_token - run.start,
                 g.decode_steps, g.decode_seconds);
    if (!save_state.empty()) {
        check(dj_session_save(run.session, save_state.c_str()));
        std::fprintf(stderr, "[saved the conversation (%lld tokens) to %s]\n",
                     static_cast<long long>(dj_session_position(run.session)), save_state.c_str());
    }
    dj_session_free(run.session);
    dj_model_close(model);
    return 0;
}
