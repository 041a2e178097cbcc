"""Parity check: an export folder against its PyTorch checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import checkpoint_folder, load_model
from .errors import DiJiangError


@dataclass
class VerifyReport:
    """Differences between the exported graph and PyTorch on the same tokens."""

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
    #: max |parallel or recurrent - chunked| of the PyTorch reference itself:
    #: how far float32 evaluations of the same model already disagree.
    reference_noise: float = 0.0

    @property
    def allowed(self) -> float:
        """The tolerance, or twice the reference's own float32 disagreement if larger."""
        return max(self.tolerance, 2.0 * self.reference_noise)

    @property
    def ok(self) -> bool:
        if self.quality_targets is not None:
            min_top1, max_ppl = self.quality_targets
            return self.top1_agreement >= min_top1 and (self.ppl_change is None or self.ppl_change <= max_ppl)
        return self.max_abs <= self.allowed and self.greedy_identical

    def lines(self) -> list[str]:
        return [
            f"positions compared      {self.positions}",
            f"max |logit diff|        {self.max_abs:.3e}  (allowed {self.allowed:.1e})",
            f"reference fp32 noise    {self.reference_noise:.3e}  (PyTorch parallel/recurrent vs chunked)",
            f"max relative diff       {self.max_rel:.3e}",
            f"top-1 agreement         {100 * self.top1_agreement:.2f}%",
            f"greedy {self.greedy_tokens} tokens identical  {self.greedy_identical}",
        ] + (
            [
                f"quantized: needs top-1 >= {100 * self.quality_targets[0]:.0f}% and perplexity change "
                f"<= {100 * self.quality_targets[1]:.0f}%; perplexity change "
                + ("n/a (random tokens: pass --text)" if self.ppl_change is None else f"{100 * self.ppl_change:+.2f}%"),
            ]
            if self.quality_targets is not None
            else []
        ) + [
            f"result                  {'PASS' if self.ok else 'FAIL'}",
        ]

    def to_dict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


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

    Token ids are random (seeded) unless ``input_ids [1, N]`` is given; greedy
    generation of ``greedy_tokens`` from the first 16 tokens is compared token
    by token against PyTorch's recurrent form.
    """
    from .runtime import Generator

    checkpoint_folder(reference)  # a wrong --reference fails before the graph loads
    gen = Generator.from_pretrained(onnx_dir, load_tokenizer=False)
    model = load_model(reference)
    if model.config.vocab_size != gen.manifest.vocab_size:
        raise DiJiangError(
            f"reference vocabulary {model.config.vocab_size} differs from the export's {gen.manifest.vocab_size}: "
            "not the checkpoint this folder was exported from"
        )
    tol = tolerance if tolerance is not None else default_tolerance(gen.manifest.dtype)
    if input_ids is None and text is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(reference))
        input_ids = np.array([tok.encode(text, add_special_tokens=False)[:tokens]], dtype=np.int64)
    if input_ids is None:
        rng = np.random.default_rng(seed)
        input_ids = rng.integers(0, model.config.vocab_size, size=(1, tokens), dtype=np.int64)
    got = gen.score(input_ids)
    with torch.no_grad():
        ids_t = torch.from_numpy(input_ids)
        want = model(ids_t, mode="chunked").logits.float().numpy()
        noise = max(
            float(np.abs(model(ids_t, mode=other).logits.float().numpy() - want).max())
            for other in ("parallel", "recurrent")
        )
    diff = np.abs(got - want)
    rel = diff / np.maximum(np.abs(want), 1e-3)
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    prompt = input_ids[0, :16].tolist()
    ours = gen.generate(prompt, max_new_tokens=greedy_tokens).token_ids[0]
    theirs = _torch_greedy(model, prompt, greedy_tokens, gen._eos_ids())
    report = VerifyReport(
        max_abs=float(diff.max()),
        max_rel=float(rel.max()),
        top1_agreement=agree,
        greedy_identical=ours == theirs,
        greedy_tokens=greedy_tokens,
        positions=int(diff.shape[1]),
        tolerance=tol,
        reference_noise=noise,
    )
    if gen.manifest.weights in ("int8", "int4"):
        from .export.quantize import QUALITY_TARGETS, quality_report

        report.quality_targets = QUALITY_TARGETS[gen.manifest.weights]
        if text is not None:
            report.ppl_change = quality_report(got, want, input_ids)["ppl_change"]
    return report


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
