"""Activation-aware weight scaling before weight-only quantization.

Round-to-nearest block quantization spends its levels evenly over a block's
weights, but the output error of ``x @ W`` is dominated by the few input
channels where ``x`` is large. This module rescales, for each group of linear
layers that read the same activation, input channel ``j`` of the weights by
``s_j`` and divides the operation that produces that activation by ``s_j``
(a norm's weight, the DiJiang GroupNorm affine, or the MLP's up projection),
so the float model computes the same function up to rounding while the
salient channels get finer quantization steps. ``s = mean|x|^alpha`` with
``alpha`` chosen per group on calibration text to minimise the quantized
group's output error (the activation-aware scaling of AWQ, Lin et al. 2024,
with the quantizer being ONNX Runtime's own RTN, so the search sees exactly
the weights the export will hold).

What is rescaled, per layer:

========= ==================================== ===============================
group     weights (input channels scaled)      divided by ``s``
========= ==================================== ===============================
attn_in   q/k/v (or query_key_value), ``W_G``  input norm weight (and bias)
o_in      o_proj / dense                       GroupNorm weight and bias
mlp_in    gate/up (or dense_h_to_4h)           post-attention norm (and bias)
down_in   down_proj (LLaMA only)               rows of up_proj (and its bias)
========= ==================================== ===============================

GPT-NeoX's ``dense_4h_to_h`` follows a GELU, which does not commute with a
scale, so it is left alone; so is the LM head (often tied to the embedding).
The projection ``P``, decay tables and state are never touched.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..contract.errors import DiJiangError
from ..data import calibration_text, text_sha256
from ..data.text import ByteTokenizer, load_tokenizer, read_text_source
from ..modeling.model import DiJiangForCausalLM
from .rtn import ort_rtn

log = logging.getLogger(__name__)

#: ``alpha`` candidates (0 = no scaling, the plain RTN baseline, is always one).
ALPHAS = tuple(i / 10 for i in range(11))


@dataclass
class CalibrationConfig:
    """Attributes:
    tokens: calibration tokens run through the float model (in sequences of
        ``seq_len``); 1024 took ~40 s of search for SmolLM2-135M on one core.
    seq_len: tokens per calibration sequence.
    data: a text file or folder; None: the built-in local corpus (package
        descriptions and stdlib docstrings, never the held-out text).
    search_rows: activation rows per group used to score each ``alpha``.
    """

    tokens: int = 1024
    seq_len: int = 256
    data: str | None = None
    search_rows: int = 512


@dataclass
class CalibrationReport:
    """What :func:`calibrate_for_quantization` did: ``alpha`` per group name
    (``"{layer}.{group}"``) and the summed relative output error of the
    quantized groups on the calibration rows, before and after."""

    alphas: dict[str, float] = field(default_factory=dict)
    error_before: float = 0.0
    error_after: float = 0.0
    tokens: int = 0

    def to_record(self) -> dict:
        values = list(self.alphas.values())
        return {
            "method": "activation-aware scaling",
            "tokens": self.tokens,
            "groups": len(values),
            "mean_alpha": round(float(np.mean(values)), 3) if values else 0.0,
            "relative_error_before": round(self.error_before, 5),
            "relative_error_after": round(self.error_after, 5),
        }


@dataclass
class _Group:
    """Linear weights reading one activation, and how to fold ``1/s`` into its producer.

    ``weights`` are ``(tensor, in_axis)``: ``nn.Linear`` weights ``[out, in]``
    (axis 1) or ``W_G [in, out]`` (axis 0).
    """

    name: str
    reader: nn.Module  # a module whose forward's first input is the activation
    weights: list[tuple[torch.Tensor, int]]
    fold: Callable[[torch.Tensor], None] | None


def _divide(*tensors: torch.Tensor | None) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        for t in tensors:
            if t is not None:
                t.div_(s)

    return fold


def _divide_rows(linear: nn.Linear) -> Callable[[torch.Tensor], None]:
    def fold(s: torch.Tensor) -> None:
        linear.weight.div_(s[:, None])
        if linear.bias is not None:
            linear.bias.div_(s)

    return fold


def _groups(model: DiJiangForCausalLM) -> list[list[_Group]]:
    """The scaling groups of every layer (see the module docstring)."""
    out = []
    for layer in model.body.layers:
        attn = layer.attn
        gn = attn.group_norm
        n1, n2 = layer.input_layernorm, layer.post_attention_layernorm
        if model.config.family == "gpt_neox":
            qkv = [(attn.query_key_value.weight, 1)]
            o = attn.dense
            mlp_in = [(layer.mlp.dense_h_to_4h.weight, 1)]
            down = _Group("down_in", layer.mlp.dense_4h_to_h, [(layer.mlp.dense_4h_to_h.weight, 1)], None)
        else:
            qkv = [(attn.q_proj.weight, 1), (attn.k_proj.weight, 1), (attn.v_proj.weight, 1)]
            o = attn.o_proj
            mlp_in = [(layer.mlp.gate_proj.weight, 1), (layer.mlp.up_proj.weight, 1)]
            down = _Group("down_in", layer.mlp.down_proj, [(layer.mlp.down_proj.weight, 1)], _divide_rows(layer.mlp.up_proj))
        out.append(
            [
                _Group("attn_in", attn, qkv + [(attn.W_G, 0)], _divide(n1.weight, getattr(n1, "bias", None))),
                _Group("o_in", o, [(o.weight, 1)], _divide(gn.weight, gn.bias)),
                _Group("mlp_in", layer.mlp, mlp_in, _divide(n2.weight, getattr(n2, "bias", None))),
                down,
            ]
        )
    return out


def _as_out_in(weight: torch.Tensor, axis: int) -> torch.Tensor:
    return weight if axis == 1 else weight.T


def _quantized_error(
    x: torch.Tensor, weights: list[torch.Tensor], refs: list[torch.Tensor], s: torch.Tensor, quantize: Callable
) -> float:
    """Summed squared output error of the group with input channels scaled by ``s`` then quantized."""
    err = 0.0
    for w, ref in zip(weights, refs):
        wq = quantize(w * s) / s
        err += float((x @ wq.T - ref).pow(2).sum())
    return err


def _capture_inputs(model: DiJiangForCausalLM, groups: list, ids: torch.Tensor) -> dict[tuple[int, str], list[torch.Tensor]]:
    """Each group's input activations ``[rows, in]`` (float32) over the calibration
    rows ``ids``, keyed by ``(layer, group name)``."""
    captured: dict[tuple[int, str], list[torch.Tensor]] = {}
    handles = []
    for i, layer_groups in enumerate(groups):
        for g in layer_groups:
            def hook(_m, args, key=(i, g.name)):
                captured.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).float())

            handles.append(g.reader.register_forward_pre_hook(hook))
    try:
        for row in ids:
            # Only the layers' inputs are wanted: the head runs on one position, not on a [L, vocab] block.
            model.step(row[None], model.new_state(1), mode="chunked", last_logits_only=True)
    finally:
        for h in handles:
            h.remove()
    return captured


def _best_scale(x: torch.Tensor, g, quantize) -> tuple[float, float, float, float, torch.Tensor]:
    """The ``alpha`` of :data:`ALPHAS` whose input scaling ``s = mean|x|**alpha`` gives
    ``g``'s weights the least quantized output error on the activations ``x``.

    Returns ``(reference output energy, error unscaled, best error, best alpha, best s [in])``;
    a group with nothing to fold the inverse scale into keeps ``alpha = 0``.
    """
    weights = [_as_out_in(w, axis).clone() for w, axis in g.weights]
    refs = [x @ w.T for w in weights]
    norm = sum(float(r.pow(2).sum()) for r in refs) or 1.0
    ones = torch.ones(x.shape[1])
    base_err = _quantized_error(x, weights, refs, ones, quantize)
    best_err, best_alpha, best_s = base_err, 0.0, ones
    if g.fold is not None:
        mean_abs = x.abs().mean(0).clamp_min(1e-6)
        for alpha in ALPHAS[1:]:
            s = mean_abs.pow(alpha)
            s = s / (s.max() * s.min()).sqrt()
            err = _quantized_error(x, weights, refs, s, quantize)
            if err < best_err:
                best_err, best_alpha, best_s = err, alpha, s
    return norm, base_err, best_err, best_alpha, best_s


@torch.no_grad()
def calibrate_for_quantization(
    model: DiJiangForCausalLM,
    ids: torch.Tensor,
    bits: int,
    block_size: int = 32,
    symmetric: bool = True,
    search_rows: int = 512,
    progress: bool = True,
    in_place: bool = False,
) -> tuple[DiJiangForCausalLM, CalibrationReport]:
    """A rescaled copy of ``model`` whose weights quantize with less output error.

    Args:
        model: float32 DiJiang model (left unchanged unless ``in_place``).
        in_place: rescale ``model`` itself rather than a copy (a caller that
            is done with it: the copy holds the layers' weights twice).
        ids: ``[S, L]`` int64 calibration tokens.
        bits, block_size, symmetric: the quantizer the export will apply.
        search_rows: activation rows (evenly subsampled) scoring each ``alpha``.

    Returns:
        ``(scaled copy, report)``. In float32 the copy computes the same
        logits as ``model`` up to rounding (~1e-4 on SmolLM2).
    """
    from tqdm.auto import tqdm

    if ids.ndim != 2 or ids.numel() == 0:
        raise DiJiangError(f"calibration ids must be a non-empty [S, L] tensor, got shape {tuple(ids.shape)}")
    # No group reads or folds into the embedding or the head, so the copy
    # shares them (float32 only: .float() would convert a shared tensor in
    # place): a model whose size is mostly vocabulary is not held twice.
    shared = {id(t): t for t in (model.body.embed.weight, model.head.weight) if t.dtype == torch.float32}
    model = (model if in_place else copy.deepcopy(model, memo=shared)).float().eval()
    groups = _groups(model)
    captured = _capture_inputs(model, groups, ids)

    def quantize(w: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(ort_rtn(w.T.numpy(), bits, block_size, symmetric).T))

    report = CalibrationReport(tokens=int(ids.numel()))
    total = sum(len(g) for g in groups)
    bar = tqdm(total=total, desc=f"calibrating int{bits} scales", unit="group", disable=not progress, leave=False)
    for i, layer_groups in enumerate(groups):
        for g in layer_groups:
            x = torch.cat(captured.pop((i, g.name)))
            x = x[:: max(1, math.ceil(len(x) / search_rows))]
            norm, base_err, best_err, best_alpha, best_s = _best_scale(x, g, quantize)
            if best_alpha > 0:
                for w, axis in g.weights:
                    w.mul_(best_s[None, :] if axis == 1 else best_s[:, None])
                g.fold(best_s)
            report.alphas[f"{i}.{g.name}"] = best_alpha
            report.error_before += base_err / norm
            report.error_after += best_err / norm
            bar.update(1)
    bar.close()
    return model, report


def calibration_ids(
    tokenizer_dir: str | Path | None, vocab_size: int, config: CalibrationConfig | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[S, seq_len]`` int64 calibration tokens and where they came from.

    The text is ``config.data`` or the package's own calibration text (never
    anything that depends on what else is installed), so one checkpoint gives
    the same calibrated export on every machine. The returned record names
    the data and its SHA-256.
    """

    config = config or CalibrationConfig()
    if config.tokens < config.seq_len or config.seq_len < 2:
        raise DiJiangError(f"calibration needs tokens >= seq_len >= 2, got {config.tokens} and {config.seq_len}")
    tok = load_tokenizer(tokenizer_dir, vocab_size) if tokenizer_dir is not None else ByteTokenizer(vocab_size)
    docs = read_text_source(config.data) if config.data else [calibration_text()]
    ids: list[int] = []
    for doc in docs:
        ids += [t for t in tok.encode(doc) if t < vocab_size]
        if len(ids) >= config.tokens:
            break
    rows = min(len(ids), config.tokens) // config.seq_len
    if rows == 0:
        raise DiJiangError(
            f"calibration text gave {len(ids)} tokens, fewer than one sequence of {config.seq_len}"
        )
    if rows * config.seq_len < config.tokens:
        log.warning("calibration text gave %d tokens of the %d asked for", rows * config.seq_len, config.tokens)
    record = {"data": str(config.data) if config.data else "built-in calibration text",
              "data_sha256": text_sha256("\n\n".join(docs)), "tokens": rows * config.seq_len}
    return torch.tensor(ids[: rows * config.seq_len], dtype=torch.long).view(rows, config.seq_len), record


__all__ = ["CalibrationConfig", "CalibrationReport", "calibrate_for_quantization", "calibration_ids"]
