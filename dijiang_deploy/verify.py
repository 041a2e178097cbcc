"""Parity check: an export folder against its PyTorch checkpoint."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import checkpoint_folder, load_model
from .contract.errors import DiJiangError
from .data import heldout_text
from .quality import QUALITY_TARGETS, quality_report
from .runtime import Generator
from .runtime.tokenizer import TextTokenizer, load_tokenizer

#: Float32 logits may differ from the exact (float64) ones by this share of
#: the largest exact logit at most, whatever PyTorch's own float32 error is:
#: an export three significant digits off is wrong, not "as noisy as PyTorch".
FLOAT64_CAP = 1e-3
#: An export is as accurate as PyTorch's own float32 evaluation when its error
#: against float64 is within this factor of PyTorch's (both are float32 with
#: other summation orders; measured ratios 0.46-1.18 on Xeon and EPYC CPUs).
FLOAT64_FACTOR = 2.0


@dataclass
class Float64Check:
    """Both float32 paths judged against the model evaluated in float64.

    Comparing an export with PyTorch's float32 alone adds the two paths'
    rounding errors; an ill-conditioned model (the untrained conversion,
    whose GroupNorm divides near-constant groups by sqrt(eps)) can make
    each of them far larger than 1e-4 on one CPU and not on another.
    """

    export_error: float
    torch_error: float
    logit_scale: float

    @property
    def cap(self) -> float:
        return FLOAT64_CAP * self.logit_scale

    def allowed(self, tolerance: float) -> float:
        return max(tolerance, min(FLOAT64_FACTOR * self.torch_error, self.cap))


@dataclass
class VerifyReport:
    """Differences between the exported graph and PyTorch on the same tokens.

    ``checks`` names what was judged, in order; ``ok`` is their conjunction.
    """

    max_abs: float
    max_rel: float
    top1_agreement: float
    greedy_identical: bool
    greedy_tokens: int
    positions: int
    tolerance: float
    #: For int8/int4 exports: (min top-1 agreement, max perplexity change)
    #: judge the export instead of the float tolerance; see quality below.
    quality_targets: tuple[float, float] | None = None
    ppl_change: float | None = None
    #: Set when a float32 export missed ``tolerance`` against PyTorch's float32.
    float64: Float64Check | None = None
    #: Why a check was not run (e.g. perplexity without a tokenizer).
    skipped: list[str] = field(default_factory=list)
    #: The text scored for the perplexity change, when there was one.
    text_source: str | None = None

    @property
    def quantized(self) -> bool:
        return self.quality_targets is not None

    @property
    def allowed(self) -> float:
        """The logit bound the float check used."""
        return self.float64.allowed(self.tolerance) if self.float64 is not None else self.tolerance

    @property
    def checks(self) -> dict[str, bool]:
        """Each check that ran and whether it passed."""
        if self.quantized:
            min_top1, max_ppl = self.quality_targets
            out = {f"top-1 agreement >= {100 * min_top1:.0f}%": self.top1_agreement >= min_top1}
            if self.ppl_change is not None:
                out[f"perplexity change <= {100 * max_ppl:.0f}%"] = self.ppl_change <= max_ppl
            return out
        if self.float64 is None:
            logits = {f"max |logit diff| vs PyTorch float32 <= {self.tolerance:.1e}": self.max_abs <= self.tolerance}
        else:
            logits = {
                f"error vs float64 <= {self.allowed:.1e} (PyTorch float32's own error x{FLOAT64_FACTOR:g}, "
                f"capped at {self.float64.cap:.1e})": self.float64.export_error <= self.allowed
            }
        return logits | {f"greedy {self.greedy_tokens} tokens identical": self.greedy_identical}

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def lines(self) -> list[str]:
        out = [
            f"positions compared      {self.positions}",
            f"max |logit diff|        {self.max_abs:.3e}  (vs PyTorch float32, chunked form)",
            f"max relative diff       {self.max_rel:.3e}",
            f"top-1 agreement         {100 * self.top1_agreement:.2f}%",
            f"greedy {self.greedy_tokens} tokens identical  {self.greedy_identical}",
        ]
        if self.float64 is not None:
            f64 = self.float64
            out += [
                f"float64 reference       export error {f64.export_error:.3e}, PyTorch float32 error "
                f"{f64.torch_error:.3e} (max |logit| {f64.logit_scale:.1f})",
            ]
        if self.ppl_change is not None:
            out.append(f"perplexity change       {100 * self.ppl_change:+.2f}%  ({self.text_source or 'given tokens'})")
        for name, passed in self.checks.items():
            out.append(f"check {'pass' if passed else 'FAIL'}              {name}")
        for why in self.skipped:
            out.append(f"not checked             {why}")
        out.append(f"result                  {'PASS' if self.ok else 'FAIL'}")
        return out

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok, "checks": self.checks, "allowed": self.allowed}


def default_tolerance(dtype: str) -> float:
    return 1e-4 if dtype == "fp32" else 5e-1


def verify(
    onnx_dir: str | Path,
    reference: str | Path,
    tokens: int = 200,
    greedy_tokens: int = 32,
    tolerance: float | None = None,
    seed: int = 0,
    input_ids: np.ndarray | None = None,
    text: str | None = None,
) -> VerifyReport:
    """Run the same tokens through PyTorch (chunked form) and the export.

    Token ids are random (seeded) unless ``input_ids [1, N]`` or ``text`` is
    given; greedy generation of ``greedy_tokens`` from the first 16 tokens is
    compared token by token against PyTorch's recurrent form. A float32
    export that misses ``tolerance`` against PyTorch's float32 logits is
    judged against a float64 evaluation instead (:class:`Float64Check`).

    Raises:
        DiJiangError: the reference is not a checkpoint, or not the one the
            export came from (vocabulary size differs).
    """

    checkpoint_folder(reference)  # a wrong --reference fails before the graph loads
    gen = Generator.from_pretrained(onnx_dir, load_tokenizer=False)
    model = load_model(reference)
    if model.config.vocab_size != gen.manifest.vocab_size:
        raise DiJiangError(
            f"reference vocabulary {model.config.vocab_size} differs from the export's {gen.manifest.vocab_size}: "
            "not the checkpoint this folder was exported from"
        )
    tol = tolerance if tolerance is not None else default_tolerance(gen.manifest.dtype)
    quantized = gen.manifest.weights in ("int8", "int4")
    text_source = "given text" if text is not None else None
    if input_ids is None and text is None and quantized:
        # A quantized export is judged on real text (perplexity), not only on random tokens' top-1.
        if load_tokenizer(reference) is not None:
            text, text_source = heldout_text(), "the package's held-out text"
    if input_ids is None and text is not None:
        input_ids = np.array([TextTokenizer(reference).encode(text)[:tokens]], dtype=np.int64)
    if input_ids is None:
        rng = np.random.default_rng(seed)
        input_ids = rng.integers(0, model.config.vocab_size, size=(1, tokens), dtype=np.int64)
    got = gen.score(input_ids)
    with torch.no_grad():
        want = model(torch.from_numpy(input_ids), mode="chunked").logits.float().numpy()
    diff = np.abs(got - want)
    rel = diff / np.maximum(np.abs(want), 1e-3)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    prompt = input_ids[0, :16].tolist()
    ours = gen.generate(prompt, max_new_tokens=greedy_tokens).token_ids[0]
    theirs = _torch_greedy(model, prompt, greedy_tokens, gen.model.eos_ids)
    report = VerifyReport(
        max_abs=float(diff.max()),
        max_rel=float(rel.max()),
        top1_agreement=agree,
        greedy_identical=ours == theirs,
        greedy_tokens=greedy_tokens,
        positions=int(diff.shape[1]),
        tolerance=tol,
    )
    if gen.manifest.weights in ("int8", "int4"):
        report.quality_targets = QUALITY_TARGETS[gen.manifest.weights]
        if text is not None:
            report.ppl_change = quality_report(got, want, input_ids)["ppl_change"]
            report.text_source = text_source
        else:
            report.skipped.append("perplexity change (no tokenizer beside the checkpoint, random tokens: pass --text)")
    elif gen.manifest.dtype == "fp32" and report.max_abs > tol:
        del model
        report.float64 = _float64_check(reference, input_ids, got, want)
    return report


def _float64_check(reference: str | Path, input_ids: np.ndarray, got: np.ndarray, want: np.ndarray) -> Float64Check:
    """Evaluate ``reference`` in float64 on ``input_ids`` and measure both float32 results against it.

    Raises:
        DiJiangError: a float64 copy of the model would not fit in memory.
    """
    need = 2 * sum(f.stat().st_size for f in Path(reference).glob("*.safetensors"))
    free = available_memory()
    if need > 0.8 * free:
        raise DiJiangError(
            f"the export misses the float32 tolerance, and the float64 reference that would tell rounding from a "
            f"real difference needs {need / 2**30:.1f} GiB ({free / 2**30:.1f} GiB free)"
        )
    with torch.no_grad():
        exact = load_model(reference, dtype=torch.float64)(torch.from_numpy(input_ids), mode="parallel").logits.numpy()
    return Float64Check(
        export_error=float(np.abs(got - exact).max()),
        torch_error=float(np.abs(want - exact).max()),
        logit_scale=float(np.abs(exact).max()),
    )


def available_memory(meminfo: str | Path = "/proc/meminfo") -> int:
    """Bytes the kernel could hand out now without swapping (``MemAvailable``).

    Free pages alone (``SC_AVPHYS_PAGES``) leave out the page cache, which
    right after an export holds the files just written and would be dropped
    on demand; judging by them refused a float64 check that fitted. Falls
    back to free pages where ``meminfo`` is missing or has no such line.
    """
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@torch.no_grad()
def _torch_greedy(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    out = model(torch.tensor([prompt]), mode="chunked")
    state, logits = out.state, out.logits[0, -1]
    toks: list[int] = []
    for _ in range(n):
        tok = int(logits.argmax())
        if tok in eos:
            break
        toks.append(tok)
        out = model(torch.tensor([[tok]]), mode="recurrent", state=state)
        state, logits = out.state, out.logits[0, -1]
    return toks
