"""How far float32 evaluations of one checkpoint are from float64, and why.

Prints, for the same random tokens, the largest logit error against a
float64 evaluation (parallel form) of: PyTorch float32 in each of the three
forms, and ONNX Runtime on an fp32 export; then how well conditioned each
layer's GroupNorm is (the amplifier of upstream float32 rounding: a group
whose 9 channels are nearly equal is divided by about sqrt(eps)).

    python benchmarks/float32_parity.py CHECKPOINT EXPORT_DIR [--tokens 96]
    MKL_CBWR=AVX2 python benchmarks/float32_parity.py ...   # MKL's AVX2 kernels instead of AVX-512

EXPORT_DIR must be an fp32 export of CHECKPOINT with ``--logits all``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

import dijiang_deploy.modeling.attention as attention
from dijiang_deploy import load_model
from dijiang_deploy.runtime import Generator


def group_norm_conditioning(checkpoint: str, ids: torch.Tensor) -> list[tuple[float, float]]:
    """Per layer (median, worst) of rms(v) / std(group) in float64: how much an
    absolute float32 error in the attention output grows through GroupNorm."""
    rows: list[tuple[float, float]] = []
    seen: dict[str, float] = {}
    group_norm, project = attention.F.group_norm, attention.DiJiangAttention.forward

    def forward(self, x, cos, sin, *args, **kwargs):
        _, _, v = self.project(x, cos, sin)
        seen["v"] = float(v.double().pow(2).mean().sqrt())
        return project(self, x, cos, sin, *args, **kwargs)

    def norm(x, groups, weight, bias, eps):
        std = (x.reshape(x.shape[0], groups, -1).double().var(-1, unbiased=False) + eps).sqrt()
        rows.append((seen["v"] / float(std.median()), seen["v"] / float(std.min())))
        return group_norm(x, groups, weight, bias, eps)

    attention.F.group_norm, attention.DiJiangAttention.forward = norm, forward
    try:
        with torch.no_grad():
            load_model(checkpoint, dtype=torch.float64)(ids, mode="parallel")
    finally:
        attention.F.group_norm, attention.DiJiangAttention.forward = group_norm, project
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("export_dir")
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()
    model = load_model(args.checkpoint)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, args.tokens))
    t = torch.from_numpy(ids)
    with torch.no_grad():
        exact = load_model(args.checkpoint, dtype=torch.float64)(t, mode="parallel").logits.numpy()
        results = {f"torch fp32 {m}": model(t, mode=m).logits.numpy() for m in ("chunked", "parallel", "recurrent")}
    results["onnxruntime fp32 export"] = Generator.from_pretrained(args.export_dir, load_tokenizer=False).score(ids)
    print(f"torch {torch.__version__}, float32 matmul precision {torch.get_float32_matmul_precision()!r}, "
          f"oneDNN fp32 math mode {torch.backends.mkldnn.matmul.fp32_precision!r}")
    print(f"max |exact logit| {np.abs(exact).max():.2f}")
    for name, got in results.items():
        print(f"{name:26s} max |err vs float64| {np.abs(got - exact).max():.3e}")
    a, b = results["onnxruntime fp32 export"], results["torch fp32 chunked"]
    print(f"{'export vs torch chunked':26s} max |diff|            {np.abs(a - b).max():.3e}")
    rows = group_norm_conditioning(args.checkpoint, t)
    worst = max(w for _, w in rows)
    print(f"GroupNorm rms(v)/std(group): median over layers {np.median([m for m, _ in rows]):.0f}x, worst group {worst:.0f}x")


if __name__ == "__main__":
    main()
