"""Loading and saving DiJiang checkpoint folders.

A checkpoint folder is a Hugging Face folder: ``config.json`` plus weights in
``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
or ``pytorch_model.bin`` (possibly sharded). Weights are read as data only:
``.bin`` files go through ``torch.load(weights_only=True)`` and no Python file
of the folder is ever imported, whatever ``auto_map`` says.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch

from .config import ModelConfig
from .contract.atomic import atomic_dir, give_new_file_mode
from .contract.errors import CheckpointError
from .contract.names import TOKENIZER_FILES
from .modeling.layers import RotaryEmbedding
from .modeling.model import DiJiangForCausalLM

log = logging.getLogger(__name__)

#: Buffers older GPT-NeoX checkpoints carry that this implementation derives.
_DERIVED = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or unreadable safetensors file ({_first_line(exc)})") from exc


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle/zip
        raise CheckpointError(f"{path}: corrupt or unreadable PyTorch weights file ({_first_line(exc)})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(data).__name__}")
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, whatever its weight format."""
    for index_name, reader in (
        (SHARD_INDEX, _read_safetensors),
        ("pytorch_model.bin.index.json", _read_bin),
    ):
        index = folder / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: malformed shard index ({_first_line(exc)})") from exc
            tensors: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = folder / shard
                if not shard_path.exists():
                    raise CheckpointError(f"{shard_path}: shard listed in {index_name} is missing")
                tensors.update(reader(shard_path))
            return tensors
    if (folder / "model.safetensors").exists():
        return _read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return _read_bin(folder / "pytorch_model.bin")
    raise CheckpointError(
        f"{folder}: no weights found (expected model.safetensors, a sharded index, or pytorch_model.bin)"
    )


def _table_length(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> int:
    prefix = "gpt_neox.layers.0.attention" if config.family == "gpt_neox" else "model.layers.0.self_attn"
    d1 = tensors.get(f"{prefix}.D1")
    if d1 is None:
        raise CheckpointError(f"missing DiJiang tensor {prefix}.D1: this is not a DiJiang checkpoint (convert it first)")
    if d1.dim() != 4:
        raise CheckpointError(f"tensor {prefix}.D1 has shape {tuple(d1.shape)}, expected [1, H, T, 1]")
    return int(d1.shape[2])


def build_from_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> DiJiangForCausalLM:
    """Validate ``tensors`` against ``config`` and return a loaded model (float32 math, tensor dtypes kept)."""
    config.dijiang.table_length = _table_length(config, tensors)
    with torch.device("meta"):
        model = DiJiangForCausalLM(config)
    expected = model.state_dict()
    tensors = {k: v for k, v in tensors.items() if not k.endswith(_DERIVED)}
    for name, ref in expected.items():
        if name not in tensors:
            if config.tie_word_embeddings and name in ("lm_head.weight", "embed_out.weight"):
                continue
            kind = "DiJiang tensor" if name.rsplit(".", 1)[-1] in _DIJIANG_LEAVES or ".group_norm." in name else "tensor"
            raise CheckpointError(f"missing {kind} {name}")
        got = tensors[name]
        if tuple(got.shape) != tuple(ref.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if not got.is_floating_point():
            raise CheckpointError(f"tensor {name} has dtype {got.dtype}, expected a floating-point type")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        log.warning("ignoring %d unexpected tensors, e.g. %s", len(unexpected), unexpected[0])
    state = {k: v for k, v in tensors.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.head.weight = model.body.embed.weight
    # Non-persistent buffers were created on the meta device: rebuild them.
    model.rotary = RotaryEmbedding(config)
    for attn in model.attention_layers():
        attn.D1.requires_grad_(False)
        attn.D2.requires_grad_(False)
        attn.refresh_decay()
    return model.eval()


_DIJIANG_LEAVES = ("proj_matrix", "W_G", "D1", "D2")


def checkpoint_folder(path: str | Path) -> Path:
    """``path`` as a checkpoint folder, or a :class:`CheckpointError` that says what it is instead.

    Checked before anything slow is loaded, so a mistyped path or an export
    folder passed where a checkpoint belongs fails at once and plainly.
    """
    folder = Path(path)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: expected a checkpoint folder, got a file")
    if not (folder / "config.json").exists():
        if (folder / "manifest.json").exists():
            raise CheckpointError(
                f"{folder}: this is an ONNX export folder; give the DiJiang checkpoint folder "
                "(the one `dijiang-deploy convert` or `finetune` wrote)"
            )
        raise CheckpointError(f"{folder}: not a DiJiang checkpoint folder (no config.json)")
    return folder


def load_model(
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> DiJiangForCausalLM:
    """Load a DiJiang checkpoint folder as an eval-mode model.

    Args:
        path: folder with ``config.json`` and weights (our layout or the
            authors' GPT-NeoX layout).
        dtype: weight dtype (float32, float16, bfloat16). Decay tables and
            the recurrent state stay float32 regardless.
        device: where to put the model.

    Raises:
        CheckpointError: missing folder/file, corrupt weights, missing or
            mis-shaped tensor (the message names it).
        UnsupportedModelError: an architecture other than GPT-NeoX/LLaMA.
    """
    folder = checkpoint_folder(path)
    config = ModelConfig.from_file(folder / "config.json")
    model = build_from_tensors(config, read_weights(folder))
    return model.cast(dtype).to(device)


#: Largest safetensors file save_checkpoint writes (Hugging Face shards likewise).
MAX_SHARD_BYTES = 4 << 30
SHARD_INDEX = "model.safetensors.index.json"


def split_by_bytes(
    tensors: dict[str, torch.Tensor], max_bytes: int, group: Callable[[str], str] | None = None
) -> list[dict[str, torch.Tensor]]:
    """``tensors`` in order, cut into files of at most ``max_bytes`` (a larger unit goes alone).

    ``group``: names mapping to the same key form one unit that is never cut
    (they must be adjacent in ``tensors``).
    """
    units: list[dict[str, torch.Tensor]] = []
    last = object()
    for name, tensor in tensors.items():
        key = group(name) if group is not None else name
        if not units or key != last:
            units.append({})
        units[-1][name] = tensor
        last = key
    files: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for unit in units:
        n = sum(t.numel() * t.element_size() for t in unit.values())
        if files[-1] and size + n > max_bytes:
            files.append({})
            size = 0
        files[-1].update(unit)
        size += n
    return files


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` as safetensors, readable as the umask allows (not owner-only)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    give_new_file_mode(path)
    return Path(path)


def save_checkpoint(
    model: DiJiangForCausalLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    tokenizer=None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Write ``model`` as a checkpoint folder that :func:`load_model` reloads.

    The folder appears only once complete. Tied LM-head weights are stored
    once. Weights over ``max_shard_bytes`` are split into shards
    (``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``,
    as Hugging Face writes them), each written straight from the model's
    tensors, so no second copy of the weights is made. Tokenizer files are
    copied from ``tokenizer_dir`` or written by ``tokenizer.save_pretrained``.
    """
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight" if model.config.family == "llama" else "embed_out.weight", None)
        shards = split_by_bytes(state, max_shard_bytes)
        metadata = {"format": "pt", "producer": "dijiang-deploy"}
        if len(shards) == 1:
            save_safetensors(shards[0], str(tmp / "model.safetensors"), metadata=metadata)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, str(tmp / name), metadata=metadata)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / SHARD_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / name
                if src.exists():
                    (tmp / name).write_bytes(src.read_bytes())
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return out
