"""Stage 1, attention transfer, and the teacher pass that feeds both stages.

Every DiJiang layer is trained to reproduce the teacher's softmax attention
output from the teacher's own attention input, so layers are independent: the
teacher runs once over the training tokens and its per-layer ``(x, y)`` pairs
are cached (bf16). The loss of a layer is the relative MSE
``||y_hat - y||^2 / ||y||^2`` over the batch; the step loss is its mean over
layers.

Both stages read the teacher through a :class:`TeacherBatches`: either
:class:`TeacherCache` (one pass up front, kept in host memory: the CPU
default, where the teacher pass would otherwise cost as much as the step) or
:class:`OnlineTeacher` (the teacher runs on each batch on the training
device: no cache, so the data is not bounded by host memory; the default on
a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..modeling.attention import DiJiangAttention
from ..modeling.decay import geometric_tables
from ..modeling.model import DiJiangForCausalLM
from .teacher import SoftmaxTeacher

#: Bounds on log(1 - gamma): gamma stays within [1 - 1/4, 1 - 1/8192].
LOG_RATE_MIN, LOG_RATE_MAX = math.log(1 / 8192), math.log(1 / 4)


class TeacherBatches:
    """What training needs from the teacher, batch by batch.

    Attributes:
        ids: ``[S, L]`` int64 training sequences (host memory).
        device: where the returned tensors live (the student's device).
    """

    ids: torch.Tensor
    device: torch.device

    def input_ids(self, rows: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` int64 sequences ``rows`` (CPU int64 indices) on :attr:`device`."""
        return self.ids[rows].to(self.device)

    def layer_io(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` each ``[layers, B, L, D]`` bf16 on :attr:`device`: every
        layer's attention input (after its norm) and softmax attention output."""
        raise NotImplementedError

    def top_k(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values [B, L, K] float16, index [B, L, K] int32)``: the teacher's
        largest next-token logits and their token ids, on :attr:`device`."""
        raise NotImplementedError


@dataclass
class TeacherCache(TeacherBatches):
    """The teacher's view of the training tokens, computed once (host memory).

    Attributes:
        ids: ``[S, L]`` int64 training sequences.
        x: ``[layers, S, L, D]`` bf16, each layer's attention input (post norm).
        y: ``[layers, S, L, D]`` bf16, each layer's attention output.
        top_values: ``[S, L, K]`` float16 teacher logits of its top-K tokens.
        top_index: ``[S, L, K]`` int32 the token ids of those logits.
        device: where batches are sent (the cache itself stays in host memory).
    """

    ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    top_values: torch.Tensor
    top_index: torch.Tensor
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def layer_io(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[:, rows].to(self.device), self.y[:, rows].to(self.device)

    def top_k(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.top_values[rows].to(self.device), self.top_index[rows].to(self.device)


class OnlineTeacher(TeacherBatches):
    """The teacher run on each requested batch, on the training device.

    Each call is one teacher forward (a training step makes one call), in
    exchange for no cache: ``layers * 2 * hidden * 2`` bytes per training
    token (69 KB for SmolLM2) is what bounds the cached data on a host.
    Values are rounded like the cache's (bf16 hidden states, float16 logits)
    so both paths train on the same numbers.

    Args:
        teacher: the softmax teacher, already on ``device``.
        ids: ``[S, L]`` int64 training sequences (host memory).
        top_k: logits kept per token for stage 2.
        autocast: run the teacher under bf16 autocast.
    """

    def __init__(self, teacher: SoftmaxTeacher, ids: torch.Tensor, top_k: int, autocast: bool = False):
        self.teacher = teacher
        self.ids = ids
        self.k = min(top_k, teacher.config.vocab_size)
        self.autocast = autocast
        self.device = next(teacher.model.parameters()).device

    @torch.no_grad()
    def _run(self, rows: torch.Tensor, trace: bool) -> tuple[torch.Tensor, list]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.teacher(self.input_ids(rows), trace=trace, trace_dtype=torch.bfloat16)

    def layer_io(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, traces = self._run(rows, trace=True)
        return torch.stack([t.x for t in traces]), torch.stack([t.y for t in traces])

    def top_k(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, _ = self._run(rows, trace=False)
        top = logits.topk(self.k, dim=-1)
        return top.values.to(torch.float16), top.indices.to(torch.int32)


@torch.no_grad()
def build_cache(
    teacher: SoftmaxTeacher, ids: torch.Tensor, top_k: int, batch: int = 8, progress: bool = True
) -> TeacherCache:
    """Run the teacher over ``ids [S, L]`` once (on the teacher's device) and keep
    what training needs in host memory; batches go back to that device."""
    from tqdm.auto import tqdm

    cfg = teacher.config
    s, n = ids.shape
    x = torch.empty(cfg.num_layers, s, n, cfg.hidden_size, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    k = min(top_k, cfg.vocab_size)
    tv = torch.empty(s, n, k, dtype=torch.float16)
    ti = torch.empty(s, n, k, dtype=torch.int32)
    device = next(teacher.model.parameters()).device
    bar = tqdm(total=s * n, desc="teacher pass", unit="tok", disable=not progress, leave=False)
    for start in range(0, s, batch):
        chunk = ids[start : start + batch].to(device)
        logits, traces = teacher(chunk, trace=True)
        for i, tr in enumerate(traces):
            x[i, start : start + len(chunk)] = tr.x.to(torch.bfloat16).cpu()
            y[i, start : start + len(chunk)] = tr.y.to(torch.bfloat16).cpu()
        top = logits.topk(k, dim=-1)
        tv[start : start + len(chunk)] = top.values.to(torch.float16).cpu()
        ti[start : start + len(chunk)] = top.indices.to(torch.int32).cpu()
        bar.update(chunk.numel())
    bar.close()
    return TeacherCache(ids, x, y, tv, ti, device)


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
            d1, d2 = geometric_tables(log_gamma[i], attn.D1.shape[2])
            attn.D1.data = d1.to(attn.D1.dtype)
            attn.D2.data = d2.to(attn.D2.dtype)
            attn.refresh_decay()

    def gammas(self) -> list[list[float]]:
        a = self.a.detach().double().clamp(LOG_RATE_MIN, LOG_RATE_MAX)
        return (1 - torch.exp(a)).tolist()


def layer_inputs(model: DiJiangForCausalLM, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions [B, n], cos, sin)`` for sequences starting at position 0, on the model's device."""
    positions = torch.arange(n, device=model.head.weight.device)[None].expand(batch, n)
    cos, sin = model.rotary(positions)
    return positions, cos, sin


def output_projection_of(attn: torch.nn.Module) -> torch.nn.Linear:
    """The block's output projection (``o_proj`` or ``dense``), unwrapped from an adapter."""
    proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
    return getattr(proj, "base", proj)


def ridge_solve(z: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``W`` minimising ``||z W^T - y||^2 + ridge * mean(diag(z^T z)) ||W||^2``.

    Args:
        z: ``[T, I]`` float64 inputs (append a ones column for a bias).
        y: ``[T, O]`` float64 targets.

    Returns:
        ``[O, I]`` float64.
    """
    gram = z.T @ z
    gram += torch.eye(len(gram), dtype=gram.dtype, device=gram.device) * ridge * gram.diagonal().mean()
    return torch.linalg.solve(gram, z.T @ y).T


def relative_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``||pred - target||^2 / ||target||^2`` (scalar, float32)."""
    t = target.float()
    return (pred.float() - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def transfer_loss(
    model: DiJiangForCausalLM, cache: TeacherBatches, rows: torch.Tensor, decay: DecayRates | None = None
) -> tuple[torch.Tensor, list[float]]:
    """Mean relative MSE over layers on the training sequences ``rows``; also per-layer values."""
    if decay is not None:
        decay.install()
    b, n = len(rows), cache.ids.shape[1]
    positions, cos, sin = layer_inputs(model, n, b)
    layers = model.attention_layers()
    state = torch.zeros(b, *model.config.state_shape, device=positions.device)
    xs, ys = cache.layer_io(rows)
    losses = []
    for i, attn in enumerate(layers):
        y_hat, _ = attn(xs[i].float(), cos, sin, positions, None, state, mode="chunked", chunk_size=64)
        losses.append(relative_mse(y_hat, ys[i]))
    total = torch.stack(losses).mean()
    return total, [float(v.detach()) for v in losses]


@torch.no_grad()
def refit_output(
    model: DiJiangForCausalLM,
    cache: TeacherBatches,
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
    state = torch.zeros(b, *model.config.state_shape, device=positions.device)
    xs, ys = cache.layer_io(rows)
    after = []
    for i, attn in enumerate(model.attention_layers()):
        proj = attn.o_proj if hasattr(attn, "o_proj") else attn.dense
        base = output_projection_of(attn)  # LoRA-wrapped: refit the frozen base weight
        captured: list[torch.Tensor] = []
        handle = proj.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
        try:
            attn(xs[i].float(), cos, sin, positions, None, state, mode="chunked", chunk_size=64)
        finally:
            handle.remove()
        z = captured[0].reshape(-1, captured[0].shape[-1]).double()
        y = ys[i].reshape(-1, z.shape[1]).double()
        if base.bias is not None:
            z = torch.cat((z, torch.ones(len(z), 1, dtype=z.dtype, device=z.device)), dim=1)
        w = ridge_solve(z, y, ridge)  # [D, D(+1)]
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
