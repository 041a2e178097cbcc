"""How much top-1 agreement weight rounding alone costs, student against teacher.

Rounds the linear-layer weights of a DiJiang checkpoint, and of its softmax
teacher (the base model), with ONNX Runtime's own block RTN (``ort_rtn``:
the exact weights a ``MatMulNBits`` export holds), keeps activations and the
LM head in float32, and scores the first ``--tokens`` tokens of the shipped
held-out text against the unrounded model: top-1 agreement and perplexity
change. This separates what rounding does from what the ONNX Runtime kernel
(int8 activations) adds. With ``--mixed``, the student is also calibrated as
``export`` does (activation-aware scaling, asymmetric int4) and given 8-bit
weights for some layer groups. Used for docs/quantization.md:

    python benchmarks/quant_sensitivity.py CHECKPOINT [--mixed]
"""

from __future__ import annotations

import argparse
import copy
import math

import numpy as np
import torch
import torch.nn.functional as F

from dijiang_deploy.checkpoint import load_model
from dijiang_deploy.quantization.calibrate import _groups, calibrate_for_quantization, calibration_ids
from dijiang_deploy.quantization.rtn import ort_rtn
from dijiang_deploy.data import heldout_text
from dijiang_deploy.data.text import load_tokenizer
from dijiang_deploy.finetune.teacher import load_teacher

BLOCK = 32


@torch.no_grad()
def rounded(model, bits_of: dict[str, int], default_bits: int, symmetric: bool):
    """A copy of ``model`` whose linear weights (by calibration group) are rounded."""
    model = copy.deepcopy(model)
    for layer_groups in _groups(model):
        for g in layer_groups:
            bits = bits_of.get(g.name, default_bits)
            for w, axis in g.weights:
                kn = (w.T if axis == 1 else w).numpy()  # MatMul layout [K, N]
                q = torch.from_numpy(np.ascontiguousarray(ort_rtn(kn, bits, BLOCK, symmetric)))
                w.copy_(q.T if axis == 1 else q)
    return model


def compare(ref: torch.Tensor, got: torch.Tensor, ids: torch.Tensor) -> str:
    target = ids[0, 1:]
    ppl = lambda logits: math.exp(float(F.cross_entropy(logits, target)))  # noqa: E731
    top1 = float((ref.argmax(-1) == got.argmax(-1)).float().mean())
    return f"top-1 {100 * top1:6.2f}%  perplexity {100 * (ppl(got) / ppl(ref) - 1):+6.2f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="DiJiang checkpoint folder (its recorded source is the teacher)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--mixed", action="store_true", help="also: calibrated int4 with some groups at 8 bits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    student = load_model(args.checkpoint).eval()
    tok = load_tokenizer(args.checkpoint, student.config.vocab_size)
    ids = torch.tensor(tok.encode(heldout_text())[: args.tokens])[None]
    teacher = load_teacher(None, args.checkpoint)

    def student_logits(m):
        with torch.no_grad():
            return m(ids, mode="chunked").logits[0, :-1].float()

    def teacher_logits(m):
        t = copy.copy(teacher)
        t.model = m
        return t(ids)[0][0, :-1].float()

    for name, model, run in (("teacher (softmax)", teacher.model, teacher_logits), ("student (DiJiang)", student, student_logits)):
        ref = run(model)
        print(f"== {name}: perplexity {math.exp(float(F.cross_entropy(ref, ids[0, 1:]))):.2f}", flush=True)
        for bits in (8, 4):
            for symmetric in (True, False):
                kind = "symmetric" if symmetric else "asymmetric"
                print(f"{name:18s} int{bits} {kind:10s} {compare(ref, run(rounded(model, {}, bits, symmetric)), ids)}", flush=True)
    if args.mixed:
        ref = student_logits(student)
        cal, _ = calibration_ids(args.checkpoint, student.config.vocab_size)
        scaled, _ = calibrate_for_quantization(student, cal, 4, BLOCK, symmetric=False, progress=False)
        drift = float((student_logits(scaled) - ref).abs().max())
        print(f"calibrated float model vs original: max |logit difference| {drift:.2e} (logits up to {float(ref.abs().max()):.1f})")
        for label, bits_of in (
            ("all 4-bit", {}),
            ("attention input at 8", {"attn_in": 8}),
            ("attention output at 8", {"o_in": 8}),
            ("MLP down at 8", {"down_in": 8}),
            ("attention input + MLP down at 8", {"attn_in": 8, "down_in": 8}),
        ):
            got = student_logits(rounded(scaled, bits_of, 4, symmetric=False))
            print(f"calibrated asymmetric int4, {label:32s} {compare(ref, got, ids)}", flush=True)


if __name__ == "__main__":
    main()
