"""Tiny random DiJiang models for tests, examples and CI (no downloads)."""

from __future__ import annotations

from typing import Any

import torch

from .config import ModelConfig
from .convert import BaseModel, ConvertOptions, convert_base
from .modeling.model import DiJiangForCausalLM


def tiny_hf_config(family: str = "gpt_neox", **overrides: Any) -> dict[str, Any]:
    """A small Hugging Face ``config.json`` dictionary of the given family."""
    if family == "gpt_neox":
        raw: dict[str, Any] = {
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "vocab_size": 97,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "hidden_act": "gelu",
            "rotary_pct": 0.25,
            "rotary_emb_base": 10000,
            "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5,
            "use_parallel_residual": True,
            "tie_word_embeddings": False,
            "bos_token_id": 0,
            "eos_token_id": 0,
        }
    elif family == "llama":
        raw = {
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": 101,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 96,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    else:
        raise ValueError(f"unknown family {family!r}")
    raw.update(overrides)
    return raw


def random_base(family: str = "gpt_neox", seed: int = 0, **overrides: Any) -> BaseModel:
    """Random softmax-model weights (HF names) for a tiny config."""
    raw = tiny_hf_config(family, **overrides)
    config = ModelConfig.from_hf_dict(raw)
    torch.manual_seed(seed)
    model = DiJiangForCausalLM(config)
    leaves = ("proj_matrix", "W_G", "D1", "D2", "group_norm.weight", "group_norm.bias")
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(leaves):
            continue
        # Embeddings at a realistic scale (std 0.05, like HF's initializer
        # range) keep logits O(1), so absolute float32 tolerances mean something.
        if name.endswith(("embed_in.weight", "embed_tokens.weight")):
            value = value * 0.05
        elif name.endswith("weight") and value.dim() == 2:
            value = value * 0.5
        tensors[name] = value.clone()
    return BaseModel(raw, tensors, f"random tiny {family} seed {seed}")


def random_model(
    family: str = "gpt_neox", seed: int = 0, options: ConvertOptions | None = None, **overrides: Any
) -> DiJiangForCausalLM:
    """A converted tiny DiJiang model with random base weights (float32, eval mode)."""
    return convert_base(random_base(family, seed, **overrides), options, progress=False)
