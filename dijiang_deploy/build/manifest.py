"""``engine.json``: what an engine folder holds and where it may run.

An engine folder (written by ``dijiang-deploy build``) contains:

* ``model.engine``: the serialized TensorRT engine;
* ``engine.json``: :class:`EngineManifest` (TensorRT version, GPU, profiles,
  plugin library, IO contract);
* ``manifest.json``: the ONNX export's manifest, copied with ``max_chunk`` set
  to the engine's prefill limit, so :class:`~dijiang_deploy.export.Manifest`
  and :class:`~dijiang_deploy.runtime.Generator` read the folder unchanged;
* the tokenizer files of the export, when it had them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..contract.errors import DiJiangError

ENGINE_FILE = "model.engine"
ENGINE_MANIFEST = "engine.json"
ENGINE_FORMAT = "dijiang-trt/1"
#: Profile names in engine order: index 0 decode (L = 1), index 1 prefill.
DECODE, PREFILL = "decode", "prefill"


@dataclass
class ShapeRange:
    """min/opt/max shape of one input in one optimization profile."""

    min: list[int]
    opt: list[int]
    max: list[int]


@dataclass
class ProfileSpec:
    """One optimization profile: its index in the engine and its input ranges."""

    name: str
    index: int
    shapes: dict[str, ShapeRange]

    @property
    def seq_range(self) -> tuple[int, int]:
        """(min, max) sequence length L accepted (from ``input_ids``)."""
        r = self.shapes["input_ids"]
        return r.min[1], r.max[1]

    @property
    def batch_range(self) -> tuple[int, int]:
        r = self.shapes["input_ids"]
        return r.min[0], r.max[0]


@dataclass
class EngineManifest:
    """Everything needed to check an engine before deserializing it.

    Attributes:
        engine_file: engine file name inside the folder.
        tensorrt_version: ``tensorrt.__version__`` of the builder; None when
            the engine was built elsewhere (``trtexec``) and packaged.
        gpu_name, gpu_sm: device the engine was built on (``"8.7"``).
        precision: ``fp16``/``fp32`` (the ONNX dtype; the network is strongly typed).
        flavor: attention-op flavor of the ONNX export.
        max_batch, max_chunk: engine limits.
        profiles: the optimization profiles, decode first.
        inputs, outputs: IO contract copied from the ONNX manifest
            (``[{name, shape, dtype}]``).
        plugin_library: file name of the plugin library copied into the
            engine folder (never a path elsewhere), or None.
        plugins_serialized: the library is embedded in a version-compatible
            engine: TensorRT runs its host code only when the user allows it.
        version_compatible: built with ``BuilderFlag.VERSION_COMPATIBLE``.
        plugin_layers: number of plugin layers in the parsed network (how
            many attention nodes TensorRT mapped to the DiJiang plugin).
        target: ``--target`` profile name, or None.
        workspace_mib: workspace memory-pool limit used.
        tf32: TF32 was allowed for float32 matrix products.
        source: the ONNX folder and its manifest's source information.
        built_with: ``python-api`` or ``trtexec``.
    """

    engine_file: str
    tensorrt_version: str | None
    gpu_name: str | None
    gpu_sm: str | None
    precision: str
    flavor: str
    max_batch: int
    max_chunk: int
    profiles: list[ProfileSpec]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    plugin_library: str | None = None
    plugins_serialized: bool = False
    version_compatible: bool = False
    plugin_layers: int | None = None
    target: str | None = None
    workspace_mib: int = 0
    tf32: bool = False
    source: dict[str, Any] = field(default_factory=dict)
    built_with: str = "python-api"
    build_seconds: float = 0.0
    format: str = ENGINE_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def profile_for(self, length: int) -> ProfileSpec | None:
        """The profile whose sequence range contains ``length`` (decode preferred)."""
        for p in self.profiles:
            lo, hi = p.seq_range
            if lo <= length <= hi:
                return p
        return None

    @classmethod
    def load(cls, folder: str | Path) -> "EngineManifest":
        """Read and validate ``folder/engine.json``.

        Raises:
            DiJiangError: no folder, no manifest, malformed or foreign manifest.
        """
        folder = Path(folder)
        path = folder / ENGINE_MANIFEST
        if not folder.is_dir():
            raise DiJiangError(f"{folder}: no such engine folder")
        if not path.is_file():
            raise DiJiangError(f"{folder}: no {ENGINE_MANIFEST} (not a dijiang-deploy engine folder; run dijiang-deploy build)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DiJiangError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != ENGINE_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise DiJiangError(f"{path}: unknown engine manifest format {found!r}")
        try:
            data["profiles"] = [
                ProfileSpec(p["name"], int(p["index"]), {k: ShapeRange(**v) for k, v in p["shapes"].items()})
                for p in data["profiles"]
            ]
            known = set(cls.__dataclass_fields__)
            return cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise DiJiangError(f"{path}: malformed engine manifest ({exc})") from exc
