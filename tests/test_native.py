"""libdijiang (native/) against the Python runtime, Hugging Face tokenizers and the state file contract.

The native build comes from ``scripts/build_native.sh`` (into a temporary
folder, or ``$DIJIANG_NATIVE_BUILD`` when set to one it already built). Each
test compares two independent paths: the C runtime's tokens, logits, states and
text against the Python runtime's on the same export, with stated tolerances.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _support import requires_smollm2

ROOT = Path(__file__).resolve().parents[1]
CORPUS = json.loads((ROOT / "native" / "tests" / "tokenizer_corpus.json").read_text(encoding="utf-8"))
#: Logits of the same export through the same ONNX Runtime: equal up to this (absolute).
LOGITS_ATOL = 1e-5
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


# -- the build ---------------------------------------------------------------


@pytest.fixture(scope="session")
def native(tmp_path_factory) -> Path:
    """OUT_DIR/main of a native build (scripts/build_native.sh runs its ctest suite too)."""
    given = os.environ.get("DIJIANG_NATIVE_BUILD")
    if given:
        main = Path(given) / "main"
        if not (main / "dijiang-run").exists():
            pytest.fail(f"DIJIANG_NATIVE_BUILD={given} has no main/dijiang-run: run scripts/build_native.sh {given}")
        return main
    missing = [t for t in ("cmake", "c++", "cc", "make") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"native build needs {', '.join(missing)} on PATH")
    out = tmp_path_factory.mktemp("native")
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "build_native.sh"), str(out)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, f"build_native.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out / "main"


def run_c(native: Path, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(native / "dijiang-run"), *map(str, args)], capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return proc


def c_ids(proc: subprocess.CompletedProcess) -> list[int]:
    line = proc.stdout.decode().strip()
    return [int(t) for t in line.split()] if line else []


def probe(native: Path, *args) -> object:
    proc = subprocess.run([str(native / "dj_probe"), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_ctest_suite_passes(native):
    proc = subprocess.run(["ctest", "--test-dir", str(native), "--output-on-failure"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "100% tests passed" in proc.stdout


def test_library_exports_only_the_c_api(native):
    lib = native / "libdijiang.so"
    assert lib.exists() and (native / "libdijiang.a").exists()
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
    names = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert {"dj_model_open", "dj_session_generate", "dj_session_save_to_buffer", "dj_last_error"} <= names
    assert all(n.startswith("dj_") for n in names), sorted(n for n in names if not n.startswith("dj_"))


# -- exports -----------------------------------------------------------------


def _export(folder: Path, family: str, seed: int, **overrides) -> Path:
    from dijiang_deploy.export import ExportOptions, export_model
    from dijiang_deploy.testing import random_model

    tokenizer_dir = overrides.pop("tokenizer_dir", None)
    export_model(random_model(family, seed=seed, **overrides), folder, ExportOptions(max_chunk=16),
                 tokenizer_dir=tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def tiny(module_tmp) -> dict[str, Path]:
    base = module_tmp("tiny")
    # eos out of reach of greedy decoding here, so every run makes its 64 tokens.
    return {fam: _export(base / fam, fam, seed=1, eos_token_id=None) for fam in ("gpt_neox", "llama")}


@pytest.fixture(scope="module")
def real_tok(module_tmp, smollm2_dir) -> Path:
    """A tiny random LLaMA sized to SmolLM2's vocabulary, with its tokenizer and chat format."""
    return _export(module_tmp("realtok") / "onnx", "llama", seed=0, vocab_size=49152, eos_token_id=2,
                   tokenizer_dir=smollm2_dir)


def python_greedy(folder: Path, prompt, n: int):
    """Python runtime: generate's greedy tokens and the logits each was picked from."""
    from dijiang_deploy.runtime import Model

    model = Model.open(folder)
    s = model.session()
    s.append(prompt)
    stream = s.generate(n, stream=True, feed_last=False)
    tokens, rows = [], []
    for ev in stream:
        if ev.token_id is not None:
            tokens.append(ev.token_id)
            rows.append(s.logits.copy())
    return tokens, np.array(rows, np.float32), stream.output


def c_greedy(native: Path, folder: Path, prompt_args: list, n: int, tmp_path: Path):
    dump = tmp_path / "logits.f32"
    proc = run_c(native, folder, *prompt_args, "--max-new-tokens", n, "--print-ids", "--dump-logits", dump)
    tokens = c_ids(proc)
    vocab = json.loads((folder / "manifest.json").read_text())["vocab_size"]
    rows = np.fromfile(dump, np.float32).reshape(-1, vocab)
    return tokens, rows, proc


def assert_parity(py_tokens, py_rows, c_tokens, c_rows, n):
    assert c_tokens == py_tokens
    assert len(c_tokens) == n, "the run stopped early: no 64-token comparison"
    assert c_rows.shape == py_rows.shape
    diff = float(np.max(np.abs(c_rows - py_rows)))
    assert diff <= LOGITS_ATOL, f"logits differ by {diff}"
    return diff


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_greedy_tokens_and_logits_match_python(native, tiny, family, tmp_path):
    rng = np.random.default_rng(5)
    vocab = json.loads((tiny[family] / "manifest.json").read_text())["vocab_size"]
    prompt = [int(t) for t in rng.integers(0, vocab, size=45)]  # 45 = 16 + 16 + 8 + 4 + 1 in chunks
    py_tokens, py_rows, _ = python_greedy(tiny[family], prompt, 64)
    c_tokens, c_rows, _ = c_greedy(native, tiny[family], ["--prompt-ids", ",".join(map(str, prompt))], 64, tmp_path)
    assert_parity(py_tokens, py_rows, c_tokens, c_rows, 64)


def test_chunk_plans_match_python(native):
    from dijiang_deploy.runtime.chunks import plan_chunks

    for lengths in ([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32, 64], [1, 16], [1, 2, 4, 8, 12]):
        got = probe(native, "plan", ",".join(map(str, lengths)), 300)
        want = [[list(c) for c in plan_chunks(n, lengths)] for n in range(301)]
        assert got == want, lengths


@pytest.mark.parametrize("params", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=40),
    dict(temperature=1.3, top_p=0.9),
    dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
    dict(temperature=0.0, repetition_penalty=1.5),
])
def test_sampler_draws_match_python(native, tmp_path, params):
    from dijiang_deploy.runtime.sampling import SamplingParams, SplitMix64, TokenSampler

    vocab, rows, seed = 500, 300, 20240601
    logits = (np.random.default_rng(3).standard_normal((rows, vocab)) * 3).astype(np.float32)
    path = tmp_path / "logits.f32"
    logits.tofile(path)
    p = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0,
             frequency_penalty=0.0) | params
    sampler = TokenSampler(SamplingParams(**p), vocab, rng=SplitMix64(seed))
    want = []
    for row in logits:
        t = sampler(row)
        sampler.observe(t)
        want.append(t)
    got = probe(native, "sample", path, vocab, rows, seed, p["temperature"], p["top_k"], p["top_p"], p["min_p"],
                p["repetition_penalty"], p["presence_penalty"], p["frequency_penalty"])
    assert got == want
    assert len(set(want)) > (1 if p["temperature"] else 0)


# -- state files -------------------------------------------------------------


def test_c_state_resumes_in_python_and_back(native, tiny, tmp_path):
    from dijiang_deploy.contract.statefile import SequenceState
    from dijiang_deploy.runtime import Model, SamplingParams, Session

    folder = tiny["llama"]
    model = Model.open(folder)
    prompt = list(range(3, 40))
    ids = ",".join(map(str, prompt))
    # C writes, Python reads: same state as Python's own run of the same steps.
    c_state = tmp_path / "c.djstate"
    first = c_ids(run_c(native, folder, "--prompt-ids", ids, "--max-new-tokens", 10, "--print-ids",
                        "--save-state", c_state))
    py = model.session()
    py.append(prompt)
    assert py.generate(10).token_ids == first
    loaded = SequenceState.load(c_state, expect=model.identity)
    mine = py.snapshot()
    assert loaded.created_by.endswith("(c)") and list(loaded.tokens) == list(mine.tokens) == prompt + first
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(loaded.layers, mine.layers)) <= LOGITS_ATOL
    assert float(np.max(np.abs(loaded.logits - mine.logits))) <= LOGITS_ATOL
    resumed = Session.load(model, c_state)
    py_next = resumed.generate(20, feed_last=False).token_ids
    c_next = c_ids(run_c(native, folder, "--load-state", c_state, "--continue", "--max-new-tokens", 20, "--print-ids"))
    assert c_next == py_next == py.generate(20, feed_last=False).token_ids

    # Python writes, C reads; sampled with a seed, so the RNG state travels too.
    sampling = dict(temperature=0.9, top_k=30)
    py2 = model.session()
    py2.append(prompt)
    py2.generate(12, sampling=SamplingParams(**sampling, seed=77))
    p_state = tmp_path / "p.djstate"
    py2.save(p_state)
    py_sampled = Session.load(model, p_state).generate(20, sampling=SamplingParams(**sampling), feed_last=False)
    c_sampled = c_ids(run_c(native, folder, "--load-state", p_state, "--continue", "--max-new-tokens", 20,
                            "--temperature", 0.9, "--top-k", 30, "--print-ids"))
    assert c_sampled == py_sampled.token_ids
    # And C's own seeded run saves the generator where Python's run leaves it.
    c_seeded = tmp_path / "seeded.djstate"
    run_c(native, folder, "--prompt-ids", ids, "--max-new-tokens", 12, "--temperature", 0.9, "--top-k", 30,
          "--seed", 77, "--save-state", c_seeded)
    assert SequenceState.load(c_seeded).sampler == SequenceState.load(p_state).sampler


def _same_layout(a: Path, b: Path) -> bool:
    ma, mb = (json.loads((f / "manifest.json").read_text()) for f in (a, b))
    return all(ma[k] == mb[k] for k in ("num_layers", "state_shape", "vocab_size"))


def test_state_errors_are_clear(native, tiny, tmp_path):
    neox, llama = tiny["gpt_neox"], tiny["llama"]
    state = tmp_path / "s.djstate"
    run_c(native, llama, "--prompt-ids", "1,2,3", "--max-new-tokens", 2, "--save-state", state)
    data = state.read_bytes()
    cases = {
        "other-model": (neox, data, "by another model" if _same_layout(neox, llama) else "state of a model with"),
        "truncated": (llama, data[:-10], "truncated"),
        "tampered": (llama, data[:-100] + bytes([data[-100] ^ 1]) + data[-99:], "damaged (checksum mismatch)"),
        "version": (llama, data[:8] + (2).to_bytes(4, "little") + data[12:], "state format version 2"),
        "magic": (llama, b"NOTSTATE" + data[8:], "bad magic"),
    }
    for name, (folder, blob, message) in cases.items():
        path = tmp_path / f"{name}.djstate"
        path.write_bytes(blob)
        proc = run_c(native, folder, "--load-state", path, "--continue", check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 1 and message in err and "DJ_ERR_STATE_FILE" in err, (name, err)
    # Same layout, another export: the fingerprint decides.
    other = _export(tmp_path / "other", "llama", seed=2, eos_token_id=None)
    proc = run_c(native, other, "--load-state", state, "--continue", check=False)
    assert proc.returncode == 1 and "written by another model" in proc.stderr.decode()


# -- the C API in process ------------------------------------------------------


class _Api:
    """A few C API calls through ctypes (the library loads its own ONNX Runtime)."""

    def __init__(self, native: Path):
        lib = ctypes.CDLL(str(native / "libdijiang.so"))
        lib.dj_last_error.restype = ctypes.c_char_p
        lib.dj_model_open.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.dj_session_create.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.dj_session_append_tokens.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t]
        lib.dj_session_logits.argtypes = [ctypes.c_void_p]
        lib.dj_session_logits.restype = ctypes.POINTER(ctypes.c_float)
        lib.dj_session_save_to_buffer.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                                  ctypes.POINTER(ctypes.c_size_t)]
        lib.dj_session_load_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.dj_session_position.argtypes = [ctypes.c_void_p]
        lib.dj_session_position.restype = ctypes.c_int64
        lib.dj_free.argtypes = [ctypes.c_void_p]
        lib.dj_session_free.argtypes = [ctypes.c_void_p]
        lib.dj_model_close.argtypes = [ctypes.c_void_p]
        self.lib = lib

    def check(self, status: int) -> None:
        assert status == 0, self.lib.dj_last_error().decode()


def test_c_api_buffers_match_python_state_bytes(native, tiny):
    from dijiang_deploy.contract.statefile import SequenceState
    from dijiang_deploy.runtime import Model, Session

    api = _Api(native)
    lib = api.lib
    folder = tiny["gpt_neox"]
    model, session = ctypes.c_void_p(), ctypes.c_void_p()
    api.check(lib.dj_model_open(str(folder).encode(), None, ctypes.byref(model)))
    try:
        api.check(lib.dj_session_create(model, ctypes.byref(session)))
        prompt = list(range(1, 30))
        arr = (ctypes.c_int32 * len(prompt))(*prompt)
        api.check(lib.dj_session_append_tokens(session, arr, len(prompt)))
        vocab = json.loads((folder / "manifest.json").read_text())["vocab_size"]
        c_logits = np.ctypeslib.as_array(lib.dj_session_logits(session), shape=(vocab,)).copy()
        py_model = Model.open(folder)
        py = py_model.session()
        assert float(np.max(np.abs(py.append(prompt) - c_logits))) <= LOGITS_ATOL
        data, size = ctypes.c_void_p(), ctypes.c_size_t()
        api.check(lib.dj_session_save_to_buffer(session, ctypes.byref(data), ctypes.byref(size)))
        blob = ctypes.string_at(data, size.value)
        lib.dj_free(data)
        state = SequenceState.from_bytes(blob, expect=py_model.identity)
        assert list(state.tokens) == prompt and state.sampler is None
        # Python's bytes back into C.
        theirs = py.to_bytes()
        api.check(lib.dj_session_load_from_buffer(session, theirs, len(theirs)))
        assert lib.dj_session_position(session) == len(prompt)
        broken = theirs[:-1]
        status = lib.dj_session_load_from_buffer(session, broken, len(broken))
        assert status == 7 and b"truncated" in lib.dj_last_error()
        assert Session.from_bytes(py_model, blob).position == len(prompt)
    finally:
        lib.dj_session_free(session)
        lib.dj_model_close(model)


def test_sessions_of_one_model_run_in_parallel_threads(native, tiny):
    """A model is shared by threads: concurrent sessions give what one session alone gives."""
    import threading

    api = _Api(native)
    lib = api.lib
    lib.dj_session_generate.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.POINTER(ctypes.c_int32), ctypes.c_size_t, ctypes.c_void_p]
    model = ctypes.c_void_p()
    api.check(lib.dj_model_open(str(tiny["llama"]).encode(), None, ctypes.byref(model)))
    prompts = [list(range(1 + k, 30 + 2 * k)) for k in range(4)]

    def run(prompt, out):
        s = ctypes.c_void_p()
        api.check(lib.dj_session_create(model, ctypes.byref(s)))
        arr = (ctypes.c_int32 * len(prompt))(*prompt)
        api.check(lib.dj_session_append_tokens(s, arr, len(prompt)))
        buf = (ctypes.c_int32 * 128)()
        api.check(lib.dj_session_generate(s, None, None, None, buf, 128, None))  # defaults: 128 greedy tokens
        out.extend(buf)
        lib.dj_session_free(s)

    try:
        alone = []
        for p in prompts:
            alone.append([])
            run(p, alone[-1])
        together = [[] for _ in prompts]
        threads = [threading.Thread(target=run, args=(p, o)) for p, o in zip(prompts, together)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == alone and len({tuple(a) for a in alone}) > 1
    finally:
        lib.dj_model_close(model)


# -- tokenizer ---------------------------------------------------------------


def _hf_check(native: Path, tokenizer_json: Path, texts: list[str], tmp_path: Path) -> int:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    corpus = tmp_path / "texts.json"
    corpus.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    got = probe(native, "tokenize", tokenizer_json, corpus)
    for i, text in enumerate(texts):
        want = tok.encode(text, add_special_tokens=False).ids
        assert got["ids"][i] == want, f"text {i} {text[:40]!r}"
        assert got["decoded"][i] == tok.decode(want, skip_special_tokens=True)
        assert got["streamed"][i] == got["decoded"][i]
    return sum(len(x) for x in got["ids"])


def _extra_texts() -> list[str]:
    rng = np.random.default_rng(0)
    pool = "ab cdé😀\n\t  中文 123 ''s 're ſ «» \u00a0\u3000 {}();=<|im_end|>x<|endoftext|>"
    random = ["".join(rng.choice(list(pool), size=int(rng.integers(1, 60)))) for _ in range(200)]
    return CORPUS + random + [(ROOT / "README.md").read_text(encoding="utf-8")[:20000],
                              (ROOT / "dijiang_deploy" / "runtime" / "session.py").read_text(encoding="utf-8")]


@requires_smollm2
def test_tokenizer_matches_hf_on_smollm2(native, smollm2_dir, tmp_path):
    assert _hf_check(native, smollm2_dir / "tokenizer.json", _extra_texts(), tmp_path) > 5000


@requires_smollm2
def test_tokenizer_matches_hf_with_llama3_split(native, smollm2_dir, tmp_path):
    data = json.loads((smollm2_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]}
    data["model"]["ignore_merges"] = True
    path = tmp_path / "llama3_style.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    assert _hf_check(native, path, _extra_texts(), tmp_path) > 5000


@requires_smollm2
def test_text_generation_and_chat_match_python(native, real_tok, tmp_path):
    from dijiang_deploy.runtime import Model, Session

    model = Model.open(real_tok)
    tok = model.tokenizer
    prompt = "The capital of France is 巴黎 😀 and\n\tcode: x = f(1)"
    py_tokens, py_rows, out = python_greedy(real_tok, prompt, 24)
    c_tokens, c_rows, _ = c_greedy(native, real_tok, ["--prompt", prompt], 24, tmp_path)
    assert c_tokens == py_tokens
    assert float(np.max(np.abs(c_rows - py_rows))) <= LOGITS_ATOL
    text = run_c(native, real_tok, "--prompt", prompt, "--max-new-tokens", 24).stdout.decode()
    assert text == tok.decode(py_tokens)

    # Chat: turn 1 in C; turn 2 in Python from C's state, and in C from the same state.
    state = tmp_path / "chat.djstate"
    turn1 = run_c(native, real_tok, "--chat", "--prompt", "Hello there", "--max-new-tokens", 10, "--save-state", state)
    ref = model.session()
    ref_out = ref.chat("Hello there", max_new_tokens=10)
    assert turn1.stdout.decode() == ref_out.text
    c_session = Session.load(model, state)
    assert c_session.tokens == ref.tokens
    assert [(m.role, m.content) for m in c_session.messages] == [(m.role, m.content) for m in ref.messages]
    py_turn2 = c_session.chat("Tell me more", max_new_tokens=10)
    state2 = tmp_path / "chat2.djstate"
    c_turn2 = run_c(native, real_tok, "--load-state", state, "--chat", "--prompt", "Tell me more",
                    "--max-new-tokens", 10, "--save-state", state2)
    assert c_turn2.stdout.decode() == py_turn2.text
    fed = int(c_turn2.stderr.decode().split("[prompt ")[1].split()[0])
    history = [{"role": m.role, "content": m.content} for m in ref.messages] + [{"role": "user", "content": "Tell me more"}]
    assert fed == len(tok.encode_chat(history)) - len(ref.tokens), "turn 2 feeds only what it adds"
    assert Session.load(model, state2).tokens == c_session.tokens
    # Turn 3 from a state Python wrote.
    state3 = tmp_path / "chat3.djstate"
    c_session.save(state3)
    py_turn3 = c_session.chat("Thanks!", max_new_tokens=8)
    c_turn3 = run_c(native, real_tok, "--load-state", state3, "--chat", "--prompt", "Thanks!", "--max-new-tokens", 8)
    assert c_turn3.stdout.decode() == py_turn3.text


@requires_smollm2
def test_embed_example_continues_a_saved_conversation(native, real_tok, tmp_path):
    example = native.parent / "example" / "embed_c"
    assert example.exists(), "build_native.sh builds examples/embed_c against the installed library"
    state = tmp_path / "conv.djstate"
    first = subprocess.run([str(example), str(real_tok), "Hello", str(state)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([str(example), str(real_tok), "And then?", str(state)], capture_output=True, text=True,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    from dijiang_deploy.runtime import Model, Session

    resumed = Session.load(Model.open(real_tok), state)
    assert [m.role for m in resumed.messages] == ["user", "assistant", "user", "assistant"]
    assert "resumed" not in first.stderr and "resumed" in second.stderr


# -- errors ------------------------------------------------------------------


def test_clear_errors(native, tiny, tmp_path):
    def err(*args):
        proc = run_c(native, *args, check=False)
        assert proc.returncode in (1, 2)
        return proc.stderr.decode()

    assert "no such file or directory" in err(tmp_path / "missing", "--prompt", "hi")
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny["llama"], bad)
    (bad / "manifest.json").write_text('{"format": "dijiang-onnx/1", "model_file": ')
    assert "not valid JSON" in err(bad, "--prompt", "hi")
    old = tmp_path / "old"
    shutil.copytree(tiny["llama"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["model_fingerprint"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert "re-export with dijiang-deploy 0.2+" in err(old, "--prompt-ids", "1")
    notok = tmp_path / "notok"
    shutil.copytree(tiny["llama"], notok)
    (notok / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    assert "tokenizer_config.json but no tokenizer.json" in err(notok, "--prompt", "hi")
    assert "no tokenizer in this export folder" in err(tiny["llama"], "--prompt", "hi")
    assert "no engine.json" in err(tiny["llama"], "--backend", "trt", "--prompt-ids", "1")
    assert "outside this model's vocabulary" in err(tiny["llama"], "--prompt-ids", "1,99999")
    lib = tmp_path / "no-ort"
    proc = subprocess.run([str(native / "dijiang-run"), str(tiny["llama"]), "--prompt-ids", "1"], capture_output=True,
                          text=True, env=dict(os.environ, DIJIANG_ORT_LIBRARY=str(lib)))
    assert proc.returncode == 1 and "ONNX Runtime library not found" in proc.stderr


@requires_smollm2
def test_chat_without_chat_format_is_refused(native, real_tok, tmp_path):
    folder = tmp_path / "nochat"
    shutil.copytree(real_tok, folder)
    (folder / "chat_format.json").unlink()
    proc = run_c(native, folder, "--chat", "--prompt", "hi", check=False)
    assert proc.returncode == 1 and "no chat_format.json" in proc.stderr.decode()


# -- SmolLM2 itself ----------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_exports(module_tmp, smollm2_dir) -> dict[str, Path]:
    from dijiang_deploy.export import ExportOptions, export_checkpoint

    base = module_tmp("smollm2_native")
    out = {}
    # Uncalibrated int4: the C/Python comparison needs the int4 graph, not its best scales.
    for name, opts in (("fp32", ExportOptions()), ("int4", ExportOptions(weights="int4", calibrate=False))):
        export_checkpoint(smollm2_dir, base / name, opts)
        out[name] = base / name
    return out


@pytest.mark.slow
@requires_smollm2
@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_smollm2_matches_python(native, smollm2_exports, weights, tmp_path):
    from dijiang_deploy.runtime import Model, Session

    folder = smollm2_exports[weights]
    prompt = "The capital of France is"
    py_tokens, py_rows, _ = python_greedy(folder, prompt, 64)
    state = tmp_path / "s.djstate"
    dump = tmp_path / "logits.f32"
    proc = run_c(native, folder, "--prompt", prompt, "--max-new-tokens", 64, "--print-ids", "--dump-logits", dump,
                 "--save-state", state)
    c_rows = np.fromfile(dump, np.float32).reshape(-1, 49152)
    assert_parity(py_tokens, py_rows, c_ids(proc), c_rows, 64)
    model = Model.open(folder)
    py_next = Session.load(model, state).generate(8, feed_last=False).token_ids
    c_next = c_ids(run_c(native, folder, "--load-state", state, "--continue", "--max-new-tokens", 8, "--print-ids"))
    assert c_next == py_next
