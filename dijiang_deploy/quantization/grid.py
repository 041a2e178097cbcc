"""Quantization-aware distillation: stage 2 trains through the export's weight grid.

``export --weights int4`` rounds every linear weight of a layer to a block
grid (ONNX Runtime's round-to-nearest, ``block_size`` values along the input
dimension share a scale and, asymmetric, a zero point). A model trained in
float loses to that rounding (SmolLM2 b20s: 76.6% top-1 agreement with its
float32 export, +3.1% perplexity). Here the last part of the distillation
stage (``start`` onwards) computes its forward and backward pass with the
rounded weights instead and applies the gradient to float master weights
(the straight-through estimator, as in BinaryConnect / QAT); the saved
checkpoint holds the rounded weights. The
export then re-rounds values that are already on its grid, which changes
nothing: the int4 (and asymmetric int8) graph multiplies by exactly the
weights the float checkpoint holds, so the quality cost of 4 bits is paid,
and measured, in training rather than discovered after export.

The saved weights are rounded by ONNX Runtime's own C++ routine
(:func:`~dijiang_deploy.quantization.rtn.ort_rtn`), so the checkpoint and the
export cannot disagree on a rounding rule. Training steps round with
:func:`torch_rtn`, the same formula in torch (0.2-1.1 s instead of 1.7-2.1 s
per step for SmolLM2's 116M grid weights on 2 cores; it differs from ONNX
Runtime only on exact ties, about 1 weight in 10^5 or fewer, tested),
because rounding every weight at every step is the cost of this method.

Why int8 comes free: an asymmetric 4-bit block has 16 levels ``s * j`` with
integer ``j`` in ``[-z, 15 - z]``; asymmetric 8-bit rounding of that block
picks ``s8 = 15 s / 255 = s / 17`` and zero point ``17 z``, whose levels include
every ``s * j``. Symmetric grids do not nest this way.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..contract.errors import DiJiangError
from ..modeling.model import DiJiangForCausalLM
from .calibrate import calibrate_for_quantization
from .rtn import ort_rtn

log = logging.getLogger(__name__)

#: Key of the record in ``config.json["dijiang_finetune"]`` that the exporter reads.
RECORD_KEY = "quant_aware"
#: Largest ``|w - round(w)|`` still "on the grid": re-deriving a block's scale
#: from rounded values may move them by float32 ulps (weights are O(0.1)).
ON_GRID_TOLERANCE = 1e-6


@dataclass
class QuantAwareConfig:
    """The weight grid stage 2 trains through (what the export will use).

    Attributes:
        bits: 4 or 8.
        block_size: values along the input dimension sharing one scale
            (``export --block-size``; a power of two >= 16).
        symmetric: symmetric blocks (no zero point; the TensorRT Q/DQ form
            needs them) or asymmetric (the ONNX Runtime ``inline`` default,
            more accurate, and nests inside asymmetric int8).
        calibrate: when the grid phase starts, apply the export's activation-aware
            channel scaling (:func:`~dijiang_deploy.quantization.calibrate.calibrate_for_quantization`,
            exact in float) so training starts from the weights that round
            best; the export then has nothing left to calibrate.
        calibration_tokens: training tokens used for that scaling.
        start: share of stage 2 (time, or steps) trained in float before the
            grid is switched on; 0 rounds from the first step. Finishing
            with a grid phase (rather than training through it throughout)
            keeps most steps at full speed and precision, as QAT usually does.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    calibrate: bool = True
    calibration_tokens: int = 1024
    start: float = 0.5

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise DiJiangError(f"quant-aware bits must be 4 or 8, got {self.bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise DiJiangError(f"quant-aware block size must be a power of two >= 16, got {self.block_size}")
        if not 0.0 <= self.start < 1.0:
            raise DiJiangError(f"quant-aware start must be in [0, 1), got {self.start}")

    def to_record(self) -> dict[str, Any]:
        return {**asdict(self), "rounding": "onnxruntime quantize_matmul_nbits (round to nearest)"}

    @classmethod
    def parse(
        cls, weights: str, block_size: int = 32, symmetric: bool = False, calibrate: bool = True, start: float = 0.5
    ) -> "QuantAwareConfig":
        """From the CLI's ``int4``/``int8``."""
        bits = {"int4": 4, "int8": 8}.get(weights)
        if bits is None:
            raise DiJiangError(f"--quant-aware must be int4 or int8, got {weights!r}")
        cfg = cls(bits=bits, block_size=block_size, symmetric=symmetric, calibrate=calibrate, start=start)
        cfg.validate()
        return cfg


def grid_weights(model: DiJiangForCausalLM) -> list[tuple[str, nn.Parameter, int]]:
    """Every weight ``export --weights int4`` rounds, as ``(name, parameter, input axis)``.

    ``nn.Linear`` weights of the decoder layers (``[out, in]``, axis 1: q/k/v/o
    or ``query_key_value``/``dense``, the MLP) and each layer's ``W_G``
    (``[in, out]``, used as ``x @ W_G``, axis 0). The embedding, the LM head
    (8 bits in the export, frozen here), ``proj_matrix``, norms and decay
    tables are not on the grid.
    """
    out = []
    for i, layer in enumerate(model.body.layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                if "lora_" in name:
                    raise DiJiangError("quantization-aware training cannot run with low-rank adapters attached")
                out.append((f"layers.{i}.{name}.weight", module.weight, 1))
        out.append((f"layers.{i}.attn.W_G", layer.attn.W_G, 0))
    return out


def torch_rtn(weight: torch.Tensor, axis: int, cfg: QuantAwareConfig) -> torch.Tensor:
    """:func:`round_to_grid` in torch: ONNX Runtime's block round-to-nearest formula
    (asymmetric: the block range widened to include 0 over ``2^bits - 1`` steps,
    integer zero point; symmetric: the largest-magnitude value maps to
    ``-2^(bits-1)``). Exact ties may round the other way."""
    w = weight.detach().float()
    w = w if axis == 1 else w.T
    out, k = w.shape
    bs = cfg.block_size
    pad = -k % bs
    b = torch.nn.functional.pad(w, (0, pad)).reshape(out, -1, bs)
    mid = 1 << (cfg.bits - 1)
    if cfg.symmetric:
        peak = torch.gather(b, -1, b.abs().argmax(-1, keepdim=True))
        scale = peak / -mid
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        q = torch.clamp(torch.round(b * inv) + mid, 0, 2 * mid - 1) - mid
    else:
        levels = (1 << cfg.bits) - 1
        lo = b.amin(-1, keepdim=True).clamp(max=0)
        scale = (b.amax(-1, keepdim=True).clamp(min=0) - lo) / levels
        inv = torch.where(scale != 0, 1.0 / scale, torch.zeros_like(scale))
        zp = torch.clamp(torch.round(-lo * inv), 0, levels)
        q = torch.clamp(torch.round(b * inv) + zp, 0, levels) - zp
    r = (q * scale).reshape(out, -1)[:, :k]
    return (r if axis == 1 else r.T).contiguous().to(weight.dtype)


def round_to_grid(weight: torch.Tensor, axis: int, cfg: QuantAwareConfig) -> torch.Tensor:
    """``weight`` rounded to the export's block grid along ``axis`` (float32, same shape),
    bit for bit what ``MatMulNBits`` will hold."""
    w = weight.detach().float()
    kn = (w.T if axis == 1 else w).contiguous().numpy()
    q = torch.from_numpy(np.ascontiguousarray(ort_rtn(kn, cfg.bits, cfg.block_size, cfg.symmetric)))
    return (q.T if axis == 1 else q).contiguous().to(weight.dtype)


def snap_to_grid(weight: torch.Tensor, axis: int, cfg: QuantAwareConfig, rounds: int = 4) -> torch.Tensor:
    """:func:`round_to_grid` repeated until rounding again changes nothing.

    ONNX Runtime's rounding is not idempotent on every block: a rounded
    block whose values end up one level short of the 16 (SmolLM2: 3 blocks
    among 3.6 million) gets a new scale when rounded again, moving most of
    its values. The export rounds the checkpoint once more, so the saved
    weights must be a fixed point; one extra rounding reaches it there.
    """
    w = round_to_grid(weight, axis, cfg)
    for _ in range(rounds):
        again = round_to_grid(w, axis, cfg)
        if float((again - w).abs().max()) <= ON_GRID_TOLERANCE:
            return again
        w = again
    # The export re-checks the weights and calibrates instead if they are off the grid.
    log.warning("weight rounding did not reach a fixed point after %d extra roundings", rounds)
    return w


class WeightGrid:
    """Swaps a model's grid weights between float masters and their rounded values.

    Use :meth:`rounded` around each forward/backward pass: inside it the
    parameters hold the rounded weights (so the gradient is taken there);
    on exit the masters are restored for the optimizer step. :meth:`snap`
    leaves the rounded values in place for good (before saving).
    """

    def __init__(self, model: DiJiangForCausalLM, cfg: QuantAwareConfig):
        cfg.validate()
        self.cfg = cfg
        self.weights = grid_weights(model)

    def rounded(self) -> "_Rounded":
        return _Rounded(self)

    @torch.no_grad()
    def snap(self) -> None:
        for _, p, axis in self.weights:
            p.copy_(snap_to_grid(p, axis, self.cfg))

    @torch.no_grad()
    def max_offgrid(self) -> float:
        """Largest ``|w - round(w)|`` over all grid weights (0 after :meth:`snap`, up to float ulps)."""
        return max(float((p - round_to_grid(p, axis, self.cfg)).abs().max()) for _, p, axis in self.weights)


class _Rounded:
    def __init__(self, grid: WeightGrid):
        self.grid = grid
        self.masters: list[torch.Tensor] = []

    @torch.no_grad()
    def __enter__(self) -> WeightGrid:
        self.masters = []
        for _, p, axis in self.grid.weights:
            self.masters.append(p.detach().clone())
            p.copy_(torch_rtn(p, axis, self.grid.cfg))
        return self.grid

    @torch.no_grad()
    def __exit__(self, *exc: object) -> None:
        for (_, p, _), master in zip(self.grid.weights, self.masters):
            p.copy_(master)
        self.masters = []


@torch.no_grad()
def calibrate_in_place(model: DiJiangForCausalLM, ids: torch.Tensor, cfg: QuantAwareConfig, progress: bool) -> dict[str, Any]:
    """Rescale ``model``'s input channels for ``cfg``'s grid (function-preserving in
    float) using ``ids`` ``[S, L]``; returns the calibration record."""
    rows = max(1, min(ids.shape[0], -(-cfg.calibration_tokens // ids.shape[1])))
    # The export calibrates on the CPU; so does this, on a copy when the
    # model trains elsewhere, so both see the same float32 activations.
    source = model if model.head.weight.device.type == "cpu" else copy.deepcopy(model).to("cpu")
    scaled, report = calibrate_for_quantization(
        source, ids[:rows].cpu(), cfg.bits, cfg.block_size, cfg.symmetric, progress=progress
    )
    model.load_state_dict(scaled.state_dict())
    return report.to_record()


def recorded_grid(raw_config: dict[str, Any]) -> QuantAwareConfig | None:
    """The grid a checkpoint's weights were trained on and snapped to, from its
    ``config.json`` (``dijiang_finetune.quant_aware``), or None."""
    record = (raw_config.get("dijiang_finetune") or {}).get(RECORD_KEY)
    if not record:
        return None
    try:
        return QuantAwareConfig(
            bits=int(record["bits"]), block_size=int(record["block_size"]), symmetric=bool(record["symmetric"])
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise DiJiangError(f"config.json: malformed dijiang_finetune.{RECORD_KEY} record {record!r}") from exc


__all__ = [
    "ON_GRID_TOLERANCE", "QuantAwareConfig", "RECORD_KEY", "WeightGrid", "calibrate_in_place", "grid_weights",
    "recorded_grid", "round_to_grid", "snap_to_grid", "torch_rtn",
]
