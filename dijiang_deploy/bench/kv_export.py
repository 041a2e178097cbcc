"""The softmax baseline: Hugging Face ``LlamaForCausalLM`` exported to ONNX with a KV cache.

The graph takes ``input_ids [B, L]``, ``position_ids [B, L]`` and
``past_k.{i}/past_v.{i} [B, kv_heads, P, d]`` (P >= 0) and returns
``logits [B, 1, V]`` (last position; ``[B, L, V]`` with ``all_logits``) and
``present_k.{i}/present_v.{i}`` ``[B, kv_heads, P + L, d]``: the usual
past/present layout of KV-cache ONNX exports, produced here by the torch
dynamo exporter from the unmodified transformers model (attention through
``DynamicCache``, SDPA kernel).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

KV_META = "kv_meta.json"
KV_MODEL = "model.onnx"


class _KvStep(nn.Module):
    """Flat-tensor wrapper: (ids, positions, k0, v0, k1, v1, ...) -> (logits, k0', v0', ...)."""

    def __init__(self, model: nn.Module, all_logits: bool = False):
        super().__init__()
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)
        self.logits_to_keep = 0 if all_logits else 1  # transformers: 0 keeps every position

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the model on ``input_ids`` after the cached ``past``; return logits and the grown cache."""
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=self.logits_to_keep,
        )
        flat: list[torch.Tensor] = []
        for layer in out.past_key_values.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def kv_geometry(config: Any) -> dict[str, int]:
    """Layers, KV heads, head size and vocabulary of a transformers Llama config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return {
        "num_layers": int(config.num_hidden_layers),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": head_dim,
        "vocab_size": int(config.vocab_size),
    }


def load_hf_base(source: str, seed: int = 0) -> nn.Module:
    """The softmax base model in float32 eval mode.

    ``source`` is ``smollm2`` (the embedded GGUF, read through transformers'
    ``gguf_file=``), a ``.gguf`` path, a Hugging Face folder, or ``tiny``
    (the random tiny LLaMA of :mod:`dijiang_deploy.testing` with ``seed``,
    the same weights as ``random_model("llama", seed)``).
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if source == "tiny":
        from ..testing import random_base

        base = random_base("llama", seed)
        model = LlamaForCausalLM(LlamaConfig(**base.raw_config))
        model.load_state_dict(base.tensors, strict=False)
    else:
        path = Path(source)
        if source == "smollm2":
            from ..convert import embedded_model_path

            path = embedded_model_path("smollm2")
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def export_kv_model(
    model: nn.Module, out_dir: str | Path, base: str = "", opset: int = 21, all_logits: bool = False
) -> Path:
    """Export ``model`` (a transformers Llama-family causal LM) with a KV cache.

    Writes ``model.onnx`` and ``kv_meta.json`` into ``out_dir``; returns the
    ``.onnx`` path. Batch is fixed at 1 (what the benchmark measures); the
    new-token and past lengths are dynamic. ``base`` (how the model was
    named to :func:`load_hf_base`) is recorded so the folder can be reused.
    The batch is dynamic too (a static batch of equal-length rows, as a
    KV-cache runtime without paging serves several streams).
    ``all_logits``: return ``logits [1, L, V]`` for every new position instead
    of the last one (to score a text teacher-forced in one call).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geo = kv_geometry(model.config)
    n = geo["num_layers"]
    step = _KvStep(model, all_logits).eval()
    past = [torch.zeros(2, geo["kv_heads"], 5, geo["head_dim"]) for _ in range(2 * n)]
    example = (torch.ones(2, 3, dtype=torch.int64), torch.arange(5, 8)[None].repeat(2, 1), *past)
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=16384)
    plen = torch.export.Dim("past", min=1, max=65536)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple({0: batch, 2: plen} for _ in range(2 * n)))
    names_in = ["input_ids", "position_ids"] + [f"past_{kind}.{i}" for i in range(n) for kind in "kv"]
    names_out = ["logits"] + [f"present_{kind}.{i}" for i in range(n) for kind in "kv"]
    from ..export.graph import quiet_exporter

    with quiet_exporter():
        program = torch.onnx.export(
            step,
            example,
            dynamo=True,
            dynamic_shapes=dynamic,
            input_names=names_in,
            output_names=names_out,
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    path = out / KV_MODEL
    program.save(str(path))
    meta = dict(geo, base=base, inputs=names_in, outputs=names_out, all_logits=all_logits, dynamic_batch=True)
    (out / KV_META).write_text(json.dumps(meta, indent=2) + "\n")
    return path
