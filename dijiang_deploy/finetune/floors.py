"""The error floor that GroupNorm puts under a DiJiang attention block.

A DiJiang block ends in ``o_proj(silu(x W_G) * groupnorm(o))``. GroupNorm
removes each group's mean and scale per token, and no output projection can
put back what it removed, so even a perfect linear-attention mix ``o`` leaves
an error. This module measures that floor: it feeds a mix through a
normaliser laid out one way or another, fits the output projection by least
squares to the teacher's attention output on some tokens, and scores the fit
on others.

Layouts (``D = H * d`` channels per token):

* ``none``: no normaliser (the sanity case: the teacher's own mix fits exactly);
* ``spec``: ``num_groups = d``, groups of ``H`` consecutive channels, the
  authors' layout that the spec fixes;
* ``per-head``: ``num_groups = H``, one group per head's ``d`` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..contract.errors import DiJiangError
from ..modeling.model import DiJiangForCausalLM
from .teacher import SoftmaxTeacher
from .transfer import layer_inputs, output_projection_of, relative_mse, ridge_solve

LAYOUTS = ("none", "spec", "per-head")
SOURCES = ("teacher", "student")


def normalise(o: torch.Tensor, layout: str, num_heads: int, head_dim: int, eps: float = 1e-5) -> torch.Tensor:
    """``o [..., D]`` through an affine-free GroupNorm laid out as ``layout``."""
    if layout == "none":
        return o
    groups = {"spec": head_dim, "per-head": num_heads}.get(layout)
    if groups is None:
        raise DiJiangError(f"unknown normaliser layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    shape = o.shape
    return F.group_norm(o.reshape(-1, shape[-1]), groups, eps=eps).reshape(shape)


@dataclass(frozen=True)
class Floor:
    """One layout's floor.

    Attributes:
        layout: one of :data:`LAYOUTS`.
        source: ``teacher`` (its softmax mix, pre projection) or ``student``
            (the DiJiang mix of the checkpoint, on the teacher's layer input).
        gated: whether ``silu(x W_G)`` (the student's gate) multiplies the
            normalised mix, as in the real block.
        fit: per layer, relative MSE on the tokens the projection was fitted to.
        heldout: per layer, relative MSE on the other tokens.
        perplexity: ``teacher`` mixes only: the teacher's perplexity on the
            held-out tokens with every layer's attention output replaced by
            its fit (what the floor costs a perfect mix); None for ``student``.
    """

    layout: str
    source: str
    gated: bool
    fit: list[float]
    heldout: list[float]
    perplexity: float | None = None

    @property
    def mean_heldout(self) -> float:
        return sum(self.heldout) / len(self.heldout)


@torch.no_grad()
def _layer_views(
    teacher: SoftmaxTeacher, student: DiJiangForCausalLM, ids: torch.Tensor, batch: int
) -> list[dict[str, torch.Tensor]]:
    """Per layer, ``x`` (attention input), ``y`` (teacher output), ``teacher``
    and ``student`` mixes, each ``[T, D]`` float32 over all tokens of ``ids [S, L]``."""
    layers = teacher.model.attention_layers()
    captured: list[torch.Tensor] = []
    hooks = [output_projection_of(a).register_forward_hook(lambda _m, inp, _o: captured.append(inp[0].float()))
             for a in layers]
    views: list[dict[str, list[torch.Tensor]]] = [{"x": [], "y": [], "teacher": [], "student": []} for _ in layers]
    try:
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            captured.clear()
            _, traces = teacher(chunk, trace=True)
            positions, cos, sin = layer_inputs(student, chunk.shape[1], len(chunk))
            state = torch.zeros(len(chunk), *student.config.state_shape)
            for i, (tr, attn) in enumerate(zip(traces, student.attention_layers())):
                o, _ = attn.mix(tr.x.float(), cos, sin, positions, None, state, mode="chunked", chunk_size=64)
                for key, value in (("x", tr.x), ("y", tr.y), ("teacher", captured[i]), ("student", o)):
                    views[i][key].append(value.float().reshape(-1, value.shape[-1]))
    finally:
        for h in hooks:
            h.remove()
    return [{k: torch.cat(v) for k, v in layer.items()} for layer in views]


@torch.no_grad()
def output_floors(
    teacher: SoftmaxTeacher,
    student: DiJiangForCausalLM,
    fit_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    layouts: tuple[str, ...] = LAYOUTS,
    sources: tuple[str, ...] = SOURCES,
    gated: tuple[bool, ...] = (False, True),
    ridge: float = 1e-6,
    batch: int = 4,
) -> list[Floor]:
    """Floors of every ``layouts x sources x gated`` combination (see :class:`Floor`).

    For each layer the output projection (with a bias) is refitted by
    :func:`ridge_solve` to the teacher's attention output on ``fit_ids`` and
    scored on ``heldout_ids``; the student's own projection is not used.

    Args:
        teacher: the softmax model the student was converted from.
        student: a DiJiang model of the same shape (its mix and gate are used).
        fit_ids, heldout_ids: ``[S, L]`` int64 token sequences, each from position 0.

    Raises:
        DiJiangError: an unknown layout or source, or models of different shapes.
    """
    for what, names, allowed in (("mix source", sources, SOURCES), ("normaliser layout", layouts, LAYOUTS)):
        for name in names:
            if name not in allowed:
                raise DiJiangError(f"unknown {what} {name!r}; expected one of {', '.join(allowed)}")
    if teacher.config.state_shape != student.config.state_shape or teacher.config.num_layers != student.config.num_layers:
        raise DiJiangError("teacher and student differ in shape: pass the student's own source model")
    h, d, eps = student.config.num_heads, student.config.head_dim, student.config.dijiang.group_norm_eps
    fit, held = _layer_views(teacher, student, fit_ids, batch), _layer_views(teacher, student, heldout_ids, batch)
    out = []
    for layout in layouts:
        for source in sources:
            for g in gated:
                scores: tuple[list[float], list[float]] = ([], [])
                weights = []
                for i, attn in enumerate(student.attention_layers()):
                    gate = attn if g else None
                    z_fit, z_held = (_inputs(v, source, layout, gate, h, d, eps) for v in (fit[i], held[i]))
                    weights.append(ridge_solve(z_fit, fit[i]["y"].double(), ridge))
                    for part, z, v in ((0, z_fit, fit[i]), (1, z_held, held[i])):
                        scores[part].append(float(relative_mse((z @ weights[-1].T).float(), v["y"])))
                ppl = _through_fits(teacher, student, heldout_ids, weights, layout, g) if source == "teacher" else None
                out.append(Floor(layout, source, g, *scores, perplexity=ppl))
    return out


def _inputs(view: dict[str, torch.Tensor], source: str, layout: str, gate_of, h: int, d: int, eps: float) -> torch.Tensor:
    """``[T, D + 1]`` float64: the normalised (and gated) mix with a ones column for the bias."""
    z = normalise(view[source], layout, h, d, eps)
    if gate_of is not None:
        z = gate_of.gate(view["x"]) * z
    z = z.double()
    return torch.cat((z, torch.ones(len(z), 1, dtype=z.dtype)), dim=1)


def _through_fits(
    teacher: SoftmaxTeacher, student: DiJiangForCausalLM, ids: torch.Tensor, weights: list[torch.Tensor],
    layout: str, gated: bool,
) -> float:
    """Perplexity of the teacher on ``ids [S, L]`` (each row from position 0) with
    each layer's output projection replaced by ``weights[i]`` applied to its
    normalised mix: hooks on the teacher's own modules, so everything else is
    its unmodified forward."""
    h, d, eps = student.config.num_heads, student.config.head_dim, student.config.dijiang.group_norm_eps
    normed: dict[int, torch.Tensor] = {}
    hooks = []

    def keep_input(i):
        return lambda _m, _inp, out: normed.__setitem__(i, out)

    def replace(i, gate_of):
        def hook(_m, inp, out):
            o = inp[0]
            view = {"teacher": o.reshape(-1, o.shape[-1]).float(), "x": normed[i].reshape(-1, o.shape[-1]).float()}
            return (_inputs(view, "teacher", layout, gate_of, h, d, eps) @ weights[i].T).to(out.dtype).reshape(out.shape)
        return hook

    try:
        for i, (layer, attn) in enumerate(zip(teacher.model.body.layers, student.attention_layers())):
            hooks.append(layer.input_layernorm.register_forward_hook(keep_input(i)))
            hooks.append(output_projection_of(layer.attn).register_forward_hook(replace(i, attn if gated else None)))
        total, count = 0.0, 0
        for row in ids:
            logits, _ = teacher(row[None])
            nll = F.cross_entropy(logits[0, :-1].float(), row[1:], reduction="sum")
            total, count = total + float(nll), count + len(row) - 1
    finally:
        for hk in hooks:
            hk.remove()
    return math.exp(total / count)


def floor_table(floors: list[Floor]) -> str:
    """A Markdown table: mean fit and held-out relative MSE, the worst layer, and the teacher's perplexity."""
    rows = ["| layout | mix | gate | fit (mean) | held-out (mean) | held-out (worst layer) | teacher perplexity through the fits |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for f in floors:
        worst = max(range(len(f.heldout)), key=f.heldout.__getitem__)
        ppl = "-" if f.perplexity is None else f"{f.perplexity:.2f}"
        rows.append(f"| {f.layout} | {f.source} | {'yes' if f.gated else 'no'} | {sum(f.fit) / len(f.fit):.4f} "
                    f"| {f.mean_heldout:.4f} | {f.heldout[worst]:.4f} (layer {worst}) | {ppl} |")
    return "\n".join(rows)


__all__ = ["LAYOUTS", "SOURCES", "Floor", "floor_table", "normalise", "output_floors"]
