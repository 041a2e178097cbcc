"""The softmax teacher: the base model's own attention, run through our modules.

A converted DiJiang model keeps the base model's embeddings, norms, MLPs and
q/k/v/o projections unchanged; only the attention *core* differs. So the
teacher is simply a :class:`DiJiangForCausalLM` holding the base weights whose
attention core is replaced by causal softmax attention
(``softmax(q k^T / sqrt(d)) v``, after the same rotary embedding, GQA
expanded). This works for both families and for tiny random test models
without any Hugging Face modeling code; ``tests/test_finetune.py`` checks it
against transformers' ``LlamaForCausalLM``/``GPTNeoXForCausalLM``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..convert import EMBEDDED_MODELS, BaseModel, convert_base, embedded_model_path, load_base
from ..contract.errors import CheckpointError, DiJiangError
from ..modeling.attention import DiJiangAttention
from ..modeling.model import DiJiangForCausalLM

log = logging.getLogger(__name__)


def softmax_attention(
    attn: DiJiangAttention,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """The base model's attention block on ``x [B, N, D]`` (post input norm).

    Args:
        attn: a DiJiang attention layer (only its q/k/v/o projections are used).
        cos, sin: rotary tables for the ``N`` new tokens' positions.
        mask: ``[B, T]`` key mask over all ``T`` tokens (cached + new), 1 = real.
        cache: optional dict holding ``"k"``/``"v"`` ``[B, H, T_past, d]``;
            updated in place with the new keys/values (decode).

    Returns:
        ``[B, N, D]`` in ``x.dtype``.
    """
    q, k, v = attn.project(x, cos, sin)
    if cache is not None:
        if "k" in cache:
            k = torch.cat((cache["k"], k), dim=2)
            v = torch.cat((cache["v"], v), dim=2)
        cache["k"], cache["v"] = k, v
    n, t = q.shape[2], k.shape[2]
    allowed = torch.ones(n, t, dtype=torch.bool, device=x.device).tril(diagonal=t - n)
    if mask is not None:
        allowed = allowed[None, None] & mask.bool()[:, None, None, :]
        # A padding query with no real key before it would give NaN: let every
        # query see its own key (padding outputs are never used).
        diag = torch.zeros(n, t, dtype=torch.bool, device=x.device)
        rows = torch.arange(n, device=x.device)
        diag[rows, rows + t - n] = True
        allowed = allowed | diag

    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=1.0 / math.sqrt(attn.head_dim))
    b = x.shape[0]
    return attn.output_projection(o.transpose(1, 2).reshape(b, n, -1))


@dataclass
class LayerTrace:
    """What one teacher layer saw and produced: ``x`` the attention input
    (after the input norm) and ``y`` the attention output, each ``[B, N, D]``."""

    x: torch.Tensor
    y: torch.Tensor


class SoftmaxTeacher:
    """The base softmax-attention model, evaluated with our own modules.

    Attributes:
        model: a :class:`DiJiangForCausalLM` holding the base weights (its
            DiJiang-only parameters are unused), frozen, eval mode.
        description: where the weights came from.
    """

    def __init__(self, model: DiJiangForCausalLM, description: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.description = description
        self.config: ModelConfig = model.config

    @classmethod
    def from_base(cls, base: BaseModel) -> "SoftmaxTeacher":
        raw = {k: v for k, v in base.raw_config.items() if k != "dijiang"}
        return cls(convert_base(BaseModel(raw, base.tensors, base.description), progress=False), base.description)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        trace: bool = False,
        trace_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, list[LayerTrace]]:
        """Logits ``[B, N, V]`` float32 and, with ``trace``, one :class:`LayerTrace` per layer.

        ``attention_mask [B, N]`` marks left padding with 0 (positions then
        start at each row's first real token). Runs without gradients; see
        :meth:`run` for a differentiable call.
        """
        return self.run(input_ids, attention_mask, trace, trace_dtype)

    __call__ = forward

    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        trace: bool = False,
        trace_dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, list[LayerTrace]]:
        """:meth:`forward` with autograd left to the caller (e.g. to pre-train a tiny teacher)."""
        m = self.model
        b, n = input_ids.shape
        if attention_mask is None:
            positions = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        else:
            positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        cos, sin = m.rotary(positions)
        h = m.body.embed(input_ids)
        traces: list[LayerTrace] = []
        for layer in m.body.layers:
            xn = layer.input_layernorm(h)
            a = softmax_attention(layer.attn, xn, cos, sin, attention_mask)
            if trace:
                traces.append(LayerTrace(xn.to(trace_dtype), a.to(trace_dtype)))
            if layer.parallel_residual:
                h = h + a + layer.mlp(layer.post_attention_layernorm(h))
            else:
                h = h + a
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.head(m.body.final_norm(h)).float(), traces

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 0.8,
        top_p: float = 0.95,
        eos: set[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> list[list[int]]:
        """Sample continuations of a batch of prompts (left-padded, KV-cached).

        Args:
            prompts: token id lists, any lengths.
            temperature: 0 means greedy.
            eos: ids that end a row.

        Returns:
            the generated ids of each row (prompt excluded, eos excluded).
        """
        m = self.model
        device = m.head.weight.device
        b = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.zeros(b, width, dtype=torch.long)
        mask = torch.zeros(b, width, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        caches = [dict() for _ in m.body.layers]
        out: list[list[int]] = [[] for _ in range(b)]
        done = torch.zeros(b, dtype=torch.bool)
        cur, positions = ids, (mask.cumsum(1) - 1).clamp(min=0)
        for _ in range(max_new_tokens):
            cos, sin = m.rotary(positions)
            h = m.body.embed(cur)
            for layer, cache in zip(m.body.layers, caches):
                xn = layer.input_layernorm(h)
                a = softmax_attention(layer.attn, xn, cos, sin, mask, cache)
                if layer.parallel_residual:
                    h = h + a + layer.mlp(layer.post_attention_layernorm(h))
                else:
                    h = h + a
                    h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = m.head(m.body.final_norm(h[:, -1])).float()
            # Sampling on the CPU: the seeded generator lives there (same draws on any device).
            nxt = _sample(logits.cpu(), temperature, top_p, generator)
            for i in range(b):
                if not done[i]:
                    tok = int(nxt[i])
                    if eos and tok in eos:
                        done[i] = True
                    else:
                        out[i].append(tok)
            if bool(done.all()):
                break
            cur = nxt[:, None].to(device)
            positions = positions[:, -1:] + 1
            mask = torch.cat((mask, torch.ones(b, 1, dtype=torch.long, device=device)), dim=1)
        return out


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(-1, keepdim=True), 1, generator=gen)
    return idx.gather(-1, choice)[:, 0]


def recorded_source(model_dir: str | Path) -> str | None:
    """The teacher recorded in a checkpoint's config: an embedded name, a path, or None.

    ``convert`` records ``source`` as ``"gguf FILE"`` or ``"folder PATH"``;
    a fine-tuned checkpoint records its teacher under ``dijiang.finetune``.
    """
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    dj = raw.get("dijiang") or {}
    ft = dj.get("finetune") or {}
    if ft.get("teacher"):
        return str(ft["teacher"])
    src = str(dj.get("source") or "")
    kind, _, rest = src.partition(" ")
    if kind == "gguf":
        for name, (_pkg, filename) in EMBEDDED_MODELS.items():
            if rest == filename:
                return name
        return None  # only the file name was recorded
    if kind == "folder" and Path(rest).is_dir():
        return rest
    return None


def load_teacher(source: str | Path | None, model_dir: str | Path | None = None) -> SoftmaxTeacher:
    """Build the softmax teacher.

    Args:
        source: an HF folder, a ``.gguf`` file, an embedded model name
            (``smollm2``), or None for the source recorded in ``model_dir``.
        model_dir: the DiJiang checkpoint being trained (for the default).

    Raises:
        DiJiangError: no teacher given and none recorded, or a bad source.
    """
    if source is None:
        source = recorded_source(model_dir) if model_dir is not None else None
        if source is None:
            raise DiJiangError(
                f"{model_dir}: its config records no usable source model; pass --teacher (HF folder, .gguf, or smollm2)"
            )
    src = str(source)
    if src not in EMBEDDED_MODELS and Path(src).is_dir() and (Path(src) / "config.json").exists():
        raw = json.loads((Path(src) / "config.json").read_text())
        if "dijiang" in raw:
            raise CheckpointError(f"{src}: is a DiJiang checkpoint, not a softmax teacher")
    if src in EMBEDDED_MODELS:
        embedded_model_path(src)  # clear error when the package is missing
    base = load_base(src)
    return SoftmaxTeacher.from_base(base)
