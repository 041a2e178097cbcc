"""Model configuration, parsed from a Hugging Face ``config.json`` dictionary.

Only plain JSON is read: code referenced by ``auto_map`` is never imported,
so a checkpoint folder cannot run anything on the user's machine.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .contract.errors import CheckpointError, UnsupportedModelError

SUPPORTED_FAMILIES = ("gpt_neox", "llama")
# Model types that share the LLaMA layer layout (q/k/v/o projections, RMSNorm,
# SwiGLU MLP, rotate-half rope) and so convert with the LLaMA definition.
LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


@dataclass
class DiJiangSettings:
    """How the DiJiang attention of a checkpoint was built.

    Stored under the ``"dijiang"`` key of ``config.json`` so a saved checkpoint
    reloads with nothing but this package. Checkpoints in the authors' layout
    have no such key; the defaults below then describe them.
    """

    #: Length of the D1/D2 decay tables (the authors use 2048).
    table_length: int = 2048
    #: Decay rates: gamma_h = 1 - exp(linspace(log(fast), log(slow), H)).
    decay_fast: float = 1.0 / 32.0
    decay_slow: float = 1.0 / 512.0
    #: Points whose Gaussian quantiles weight the DCT: "sobol", "halton" or
    #: "random" (the authors' i.i.d. uniform draws).
    qmc: str = "sobol"
    seed: int = 0
    #: Relative tolerance when deciding that D1[t] * D2[m] == gamma^(t-m).
    geometric_rtol: float = 1e-3
    #: GroupNorm epsilon on the attention output.
    group_norm_eps: float = 1e-5
    #: Where the checkpoint came from (free text, informative only).
    source: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "DiJiangSettings":
        data = dict(data or {})
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelConfig:
    """Architecture of a DiJiang decoder (GPT-NeoX or LLaMA family).

    Shapes used across the package: hidden size ``D = num_heads * head_dim``,
    recurrent state per layer ``[B, num_heads, head_dim, head_dim]``.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    hidden_act: str
    norm_eps: float
    max_position_embeddings: int
    rotary_ndims: int
    rope_theta: float
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    use_parallel_residual: bool = True
    attention_bias: bool = True
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    dijiang: DiJiangSettings = field(default_factory=DiJiangSettings)
    #: The original config.json dictionary, kept so a save round-trips it.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rope_type(self) -> str:
        return str(self.rope_parameters.get("rope_type", self.rope_parameters.get("type", "default")))

    @property
    def state_shape(self) -> tuple[int, int, int]:
        """Per-sequence state shape of one layer: ``(H, d, d)``."""
        return (self.num_heads, self.head_dim, self.head_dim)

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        """Parse a Hugging Face config dictionary.

        Raises:
            UnsupportedModelError: for architectures other than GPT-NeoX and
                LLaMA-like models, or rope variants we cannot reproduce.
        """
        model_type = raw.get("model_type")
        if model_type == "gpt_neox":
            return cls._from_gpt_neox(raw)
        if model_type in LLAMA_LIKE:
            return cls._from_llama(raw)
        raise UnsupportedModelError(
            f"unsupported architecture model_type={model_type!r}: "
            f"supported are 'gpt_neox' and LLaMA-family ({', '.join(LLAMA_LIKE)})"
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json to save: the original keys plus the DiJiang block."""
        out = copy.deepcopy(self.raw)
        # Remote code would never run under this package and would mislead
        # other tools into loading the authors' quadratic implementation.
        out.pop("auto_map", None)
        out["dijiang"] = self.dijiang.to_dict()
        return out

    # -- per-family parsing -------------------------------------------------

    @staticmethod
    def _rope(raw: dict[str, Any], default_theta: float) -> tuple[float, dict[str, Any]]:
        params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(params.get("rope_theta", raw.get("rope_theta", raw.get("rotary_emb_base", default_theta))))
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_type {rope_type!r}: position-dependent variants such as 'dynamic' "
                "have no fixed-memory equivalent; supported are " + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        params.setdefault("rope_type", rope_type)
        params["rope_theta"] = theta
        return theta, params

    @classmethod
    def _require(cls, raw: dict[str, Any], *keys: str) -> None:
        missing = [k for k in keys if k not in raw]
        if missing:
            raise CheckpointError(f"config.json lacks required keys: {', '.join(missing)}")

    @classmethod
    def _from_gpt_neox(cls, raw: dict[str, Any]) -> "ModelConfig":
        cls._require(raw, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        if hidden % heads:
            raise CheckpointError(f"hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
        theta, rope = cls._rope(raw, 10000.0)
        pct = raw.get("rotary_pct", rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.25)))
        settings = DiJiangSettings.from_dict(raw.get("dijiang"))
        return cls(
            family="gpt_neox",
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=head_dim,
            intermediate_size=int(raw.get("intermediate_size", 4 * hidden)),
            hidden_act=str(raw.get("hidden_act", "gelu")),
            norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rotary_ndims=int(head_dim * float(pct)),
            rope_theta=theta,
            rope_parameters=rope,
            use_parallel_residual=bool(raw.get("use_parallel_residual", True)),
            attention_bias=bool(raw.get("attention_bias", True)),
            mlp_bias=True,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            dijiang=settings,
            raw=copy.deepcopy(raw),
        )

    @classmethod
    def _from_llama(cls, raw: dict[str, Any]) -> "ModelConfig":
        cls._require(raw, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads * head_dim != hidden:
            raise UnsupportedModelError(
                f"num_attention_heads*head_dim ({heads}*{head_dim}) != hidden_size ({hidden}); "
                "DiJiang's gate and GroupNorm need D = H*d"
            )
        if heads % kv_heads:
            raise CheckpointError(f"num_attention_heads {heads} not a multiple of num_key_value_heads {kv_heads}")
        theta, rope = cls._rope(raw, 10000.0)
        pct = float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
        max_pos = int(raw.get("max_position_embeddings", 2048))
        settings = DiJiangSettings.from_dict(raw.get("dijiang") or {"table_length": max_pos})
        return cls(
            family="llama",
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=int(raw.get("intermediate_size", 4 * hidden)),
            hidden_act=str(raw.get("hidden_act", "silu")),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            rotary_ndims=int(head_dim * pct),
            rope_theta=theta,
            rope_parameters=rope,
            use_parallel_residual=False,
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            dijiang=settings,
            raw=copy.deepcopy(raw),
        )


def decay_rates(num_heads: int, settings: DiJiangSettings) -> list[float]:
    """gamma_h = 1 - exp(linspace(log(fast), log(slow), H)) (spec section 3)."""
    lo, hi = math.log(settings.decay_fast), math.log(settings.decay_slow)
    if num_heads == 1:
        return [1.0 - settings.decay_fast]
    step = (hi - lo) / (num_heads - 1)
    return [1.0 - math.exp(lo + h * step) for h in range(num_heads)]
