"""Stage 1, attention transfer, and the teacher pass that feeds both stages.

Every DiJiang layer is trained to reproduce the teacher's softmax attention
output from the teacher's own attention input, so layers are independent: the
teacher runs once over the training tokens and its per-layer ``(x, y)`` pairs
are cached (bf16). The loss of a layer is the relative MSE
``||y_hat - y||^2 / ||y||^2`` over the batch; the step loss is its mean over
layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..modeling.attention import DiJiangAttention
from ..modeling.model import DiJiangForCausalLM
from .teacher import SoftmaxTeacher

#: Bounds on log(1 - gamma): gamma stays within [1 - 1/4, 1 - 1/8192].
LOG_RATE_MIN, LOG_RATE_MAX = math.log(1 / 8192), math.log(1 / 4)


@dataclass
class TeacherCache:
    """The teacher's view of the training tokens.

    Attributes:
        ids: ``[S, L]`` int64 training sequences.
        x: ``[layers, S, L, D]`` bf16, each layer's attention input (post norm).
        y: ``[layers, S, L, D]`` bf16, each layer's attention output.
        top_values: ``[S, L, K]`` float16 teacher logits of its top-K tokens.
        top_index: ``[S, L, K]`` int32 the token ids of those logits.
    """

    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    top_values: torch.Tensor
    top_index: torch.Tensor


@torch.no_grad()
def build_cache(
    teacher: SoftmaxTeacher, ids: torch.Tensor, top_k: int, batch: int = 8, progress: bool = True
) -> TeacherCache:
    """Run the teacher over ``ids [S, L]`` once and keep what training needs."""
    from tqdm.auto import tqdm

    cfg = teacher.config
    s, n = ids.shape
    x = torch.empty(cfg.num_layers, s, n, cfg.hidden_size, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    k = min(top_k, cfg.vocab_size)
    tv = torch.empty(s, n, k, dtype=torch.float16)
    ti = torch.empty(s, n, k, dtype=torch.int32)
    bar = tqdm(total=s * n, desc="teacher pass", unit="tok", disable=not progress, leave=False)
    for start in range(0, s, batch):
        chunk = ids[start : start + batch]
        logits, traces = teacher(chunk, trace=True)
        for i, tr in enumerate(traces):
            x[i, start : start + len(chunk)] = tr.x.to(torch.bfloat16)
            y[i, start : start + len(chunk)] = tr.y.to(torch.bfloat16)
        top = logits.topk(k, dim=-1)
        tv[start : start + len(chunk)] = top.values.to(torch.float16)
        ti[start : start + len(chunk)] = top.indices.to(torch.int32)
        bar.update(chunk.numel())
    bar.close()
    return TeacherCache(ids, x, y, tv, ti)


class DecayRates(nn.Module):
    """Trainable per-head decay ``gamma = 1 - exp(a)`` for every layer.

    While installed, each layer's ``log_gamma`` buffer is replaced by the
    differentiable ``log(1 - exp(a))``; :meth:`write_tables` stores the rates
    back as exactly geometric ``D1``/``D2`` tables (same names, shapes, dtype),
    so the checkpoint keeps the stable recurrence and its unlimited length.
    """

    def __init__(self, layers: list[DiJiangAttention]):
        super().__init__()
        self.layers = layers
        rates = [torch.log(-torch.expm1(a.log_gamma.double())).float() for a in layers]
        self.a = nn.Parameter(torch.stack(rates))  # [layers, H]

    def install(self) -> None:
        a = self.a.clamp(LOG_RATE_MIN, LOG_RATE_MAX)
        log_gamma = torch.log1p(-torch.exp(a))
        for i, attn in enumerate(self.layers):
            attn.log_gamma = log_gamma[i]

    @torch.no_grad()
    def write_tables(self) -> None:
        a = self.a.double().clamp(LOG_RATE_MIN, LOG_RATE_MAX)
        log_gamma = torch.log1p(-torch.exp(a))
        for i, attn in enumerate(self.layers):
            length = attn.D1.shape[2]
            t = torch.arange(length, dtype=torch.float64)
            lg = log_gamma[i][:, None]
            d1 = torch.exp(t[None] * lg)[None, :, :, None]
            d2 = torch.exp(-t[None] * lg)[None, :, :, None]
            attn.D1.data = d1.to(attn.D1.dtype)
            attn.D2.data = d2.to(attn.D2.dtype)
            attn.refresh_decay()

    def gammas(self) -> list[list[float]]:
        a = self.a.detach().double().clamp(LOG_RATE_MIN, LOG_RATE_MAX)
        return (1 - torch.exp(a)).tolist()


def layer_inputs(model: DiJiangForCausalLM, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions [B, n], cos, sin)`` for sequences starting at position 0."""
    positions = torch.arange(n)[None].expand(batch, n)
    cos, sin = model.rotary(positions)
    return positions, cos, sin


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target||^2 / ||target||^2`` (scalar, float32)."""
    t = target.float()
    return (pred.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def transfer_loss(
    model: DiJiangForCausalLM, cache: TeacherCache, rows: torch.Tensor, decay: DecayRates | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Mean relative MSE over layers on the cached sequences ``rows``; also per-layer values."""
    if decay is not None:
        decay.install()
    b, n = len(rows), cache.ids.shape[1]
    positions, cos, sin = layer_inputs(model, n, b)
    layers = model.attention_layers()
    state = torch.zeros(b, *model.config.state_shape)
    losses = []
    for i, attn in enumerate(layers):
        x = cache.x[i, rows].float()
        y_hat, _ = attn(x, cos, sin, positions, None, state, mode="chunked", chunk_size=64)
        losses.append(relative_mse(y_hat, cache.y[i, rows]))
    total = torch.stack(losses).mean()
    return total, [float(v.detach()) for v in losses]


@torch.no_grad()
def refit_output(
    model: DiJiangForCausalLM,
    cache: TeacherCache,
    rows: torch.Tensor,
    ridge: float = 1e-2,
    decay: DecayRates | None = None,
) -> list[float]:
    """Least-squares refit of each layer's output projection (``o_proj``/``dense``).

    The attention block ends in a linear map of the gated, normalised DiJiang
    output ``z [T, D]``; for fixed ``z`` the weight (and bias, if any) that
    minimises ``||z W^T + b - y||^2`` against the teacher's output ``y`` is a
    ``D x D`` ridge regression, solved in float64 over the cached sequences
    ``rows``. Ridge ``ridge * mean(diag(z^T z))`` keeps it well posed.

    Returns:
        per layer, the relative MSE after the refit on those rows.
    """
    if decay is not None:
        decay.install()
    b, n = len(rows), cache.ids.shape[1]
    positions, cos, sin = layer_inputs(model, n, b)
    state = torch.zeros(b, *model.config.state_shape)
    after = []
    for i, attn in enumerate(model.attention_layers()):
        proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
        base = getattr(proj, "base", proj)  # LoRA-wrapped: refit the frozen base weight
        captured: list[torch.Tensor] = []
        handle = proj.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
        try:
            attn(cache.x[i, rows].float(), cos, sin, positions, None, state, mode="chunked", chunk_size=64)
        finally:
            handle.remove()
        z = captured[0].reshape(-1, captured[0].shape[-1]).double()
        y = cache.y[i, rows].reshape(-1, z.shape[1]).double()
        if base.bias is not None:
            z = torch.cat((z, torch.ones(len(z), 1, dtype=z.dtype)), dim=1)
        gram = z.T @ z
        gram += torch.eye(len(gram), dtype=gram.dtype) * ridge * gram.diagonal().mean()
        w = torch.linalg.solve(gram, z.T @ y).T  # [D, D(+1)]
        if hasattr(proj, "lora_B"):
            proj.lora_B.zero_()  # the adapter restarts from the refitted weight
        if base.bias is not None:
            base.weight.copy_(w[:, :-1].to(base.weight.dtype))
            base.bias.copy_(w[:, -1].to(base.bias.dtype))
        else:
            base.weight.copy_(w.to(base.weight.dtype))
        pred = (z @ w.T).float()
        after.append(float(relative_mse(pred, y.float())))
    return after
