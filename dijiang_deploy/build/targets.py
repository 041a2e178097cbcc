"""Target device profiles: default build settings per GPU family.

Profiles are JSON files in ``export/targets/`` at the repository root, shipped
in the package as ``dijiang_deploy/build/targets/`` (or in
the folder named by ``$DIJIANG_TARGETS_DIR``); ``--target`` takes a profile
name (the file stem) or a path to a JSON file. Explicit build flags override
a profile's values.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..contract.errors import DiJiangError

#: The shipped profiles: ``export/targets`` at the repository root, reached
#: through the package's ``build/targets`` symlink (wheels carry them there).
DEFAULT_TARGETS_DIR = Path(__file__).parent / "targets"
PRECISIONS = ("fp16", "fp32")
FLAVORS = ("linear-attention", "function", "plugin")
#: The exporter's dynamic-dimension bounds (``dijiang_deploy.export.graph.trace``).
MAX_BATCH_LIMIT = 1024
MAX_CHUNK_LIMIT = 4096
_SM = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class Target:
    """Default engine settings for one family of devices.

    Attributes:
        name: profile name (the JSON file's stem).
        description: one line naming the devices.
        sm: compute capabilities (``"8.7"``) the profile is meant for.
        memory_gib: device memory of the smallest member, in GiB (shared
            with the CPU on Jetson).
        precision: ``fp16`` or ``fp32``; must match the ONNX export's dtype
            (the network is strongly typed).
        max_batch: largest batch the engine accepts.
        opt_batch: batch the decode profile is tuned for.
        max_chunk: longest prefill chunk (the prefill profile covers 2..max_chunk).
        workspace_mib: TensorRT workspace memory-pool limit, MiB.
        tensorrt: TensorRT version on the device (informational, e.g. ``10.3``).
        flavor: attention-op flavor recommended for the device's TensorRT.
        devices: example product names.
        notes: free text.
    """

    name: str
    description: str
    sm: tuple[str, ...]
    memory_gib: float
    precision: str
    max_batch: int
    opt_batch: int
    max_chunk: int
    workspace_mib: int
    tensorrt: str = ""
    flavor: str = "plugin"
    devices: tuple[str, ...] = field(default_factory=tuple)
    notes: str = ""

    def validate(self) -> None:
        """Raise :class:`DiJiangError` (one line) on an inconsistent profile."""
        where = f"target {self.name!r}"
        if not self.sm or any(not _SM.match(s) for s in self.sm):
            raise DiJiangError(f"{where}: sm must be a non-empty list like [\"8.7\"], got {list(self.sm)}")
        if not self.memory_gib > 0:
            raise DiJiangError(f"{where}: memory_gib must be > 0, got {self.memory_gib}")
        if self.precision not in PRECISIONS:
            raise DiJiangError(f"{where}: precision must be fp16 or fp32, got {self.precision!r}")
        if self.flavor not in FLAVORS:
            raise DiJiangError(f"{where}: flavor must be one of {', '.join(FLAVORS)}, got {self.flavor!r}")
        check_batch_chunk(self.max_batch, self.max_chunk, self.opt_batch, where)
        check_workspace(self.workspace_mib, where)
        if self.workspace_mib > self.memory_gib * 1024 / 2:
            raise DiJiangError(
                f"{where}: workspace_mib {self.workspace_mib} is more than half of the device's "
                f"{self.memory_gib} GiB"
            )


def check_batch_chunk(max_batch: int, max_chunk: int, opt_batch: int, where: str) -> None:
    """Validate the shape limits shared by targets and build options."""
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise DiJiangError(f"{where}: max batch must be in 1..{MAX_BATCH_LIMIT}, got {max_batch}")
    if not 1 <= opt_batch <= max_batch:
        raise DiJiangError(f"{where}: opt batch must be in 1..max batch ({max_batch}), got {opt_batch}")
    if not 1 <= max_chunk <= MAX_CHUNK_LIMIT:
        raise DiJiangError(f"{where}: max chunk must be in 1..{MAX_CHUNK_LIMIT}, got {max_chunk}")


def check_workspace(workspace_mib: int, where: str) -> None:
    if not 16 <= workspace_mib <= 1 << 20:
        raise DiJiangError(f"{where}: workspace must be in 16..1048576 MiB, got {workspace_mib}")


def targets_dir() -> Path:
    """The folder profiles are read from (``$DIJIANG_TARGETS_DIR`` or ``export/targets``)."""
    env = os.environ.get("DIJIANG_TARGETS_DIR")
    return Path(env) if env else DEFAULT_TARGETS_DIR


def list_targets() -> list[str]:
    """Names of the profiles in :func:`targets_dir` (sorted)."""
    folder = targets_dir()
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def target_from_dict(data: Any, name: str) -> Target:
    """Build and validate a :class:`Target` from a parsed JSON object."""
    if not isinstance(data, dict):
        raise DiJiangError(f"target {name!r}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in fields(Target)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DiJiangError(f"target {name!r}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(
        f.name for f in fields(Target) if f.name not in data and f.name not in ("tensorrt", "flavor", "devices", "notes")
    )
    if missing:
        raise DiJiangError(f"target {name!r}: missing field(s) {', '.join(missing)}")
    values = dict(data)
    try:
        values["sm"] = tuple(str(s) for s in values["sm"])
        values["devices"] = tuple(str(s) for s in values.get("devices", ()))
        for key in ("max_batch", "opt_batch", "max_chunk", "workspace_mib"):
            if isinstance(values[key], bool) or not isinstance(values[key], int):
                raise DiJiangError(f"target {name!r}: {key} must be an integer, got {values[key]!r}")
        values["memory_gib"] = float(values["memory_gib"])
    except (TypeError, ValueError) as exc:
        raise DiJiangError(f"target {name!r}: malformed value ({exc})") from exc
    target = Target(**values)
    if target.name != name:
        raise DiJiangError(f"target {name!r}: its 'name' field says {target.name!r}")
    target.validate()
    return target


def load_target(name_or_path: str) -> Target:
    """Load a profile by name (``orin-nano-8gb``) or from a JSON file path.

    Raises:
        DiJiangError: unknown name, unreadable file, or invalid profile.
    """
    path = Path(name_or_path)
    if path.suffix == ".json" or os.sep in name_or_path:
        if not path.is_file():
            raise DiJiangError(f"target file {path}: no such file")
        name = path.stem
    else:
        path = targets_dir() / f"{name_or_path}.json"
        name = name_or_path
        if not path.is_file():
            known = ", ".join(list_targets()) or f"none found in {targets_dir()}"
            raise DiJiangError(f"unknown target {name_or_path!r} (known: {known})")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiJiangError(f"target file {path}: cannot read JSON ({exc})") from exc
    return target_from_dict(data, name)
