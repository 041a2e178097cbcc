"""``manifest.json``: the contract between an export folder and its users."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ExportError
from .names import (
    ATTENTION_MASK, INPUT_IDS, INTEGER_WEIGHTS, LOGITS, MANIFEST_NAME, PAST_POSITION, QUANT_METADATA_KEY, past_state,
    present_state,
)

FORMAT = "dijiang-onnx/1"
#: numpy dtype names a state may have, with their sizes in bytes.
STATE_DTYPES = {"float32": 4}


@dataclass
class TensorSpec:
    """A graph input or output: name, symbolic/static shape, numpy dtype name."""

    name: str
    shape: list[Any]
    dtype: str


@dataclass
class Manifest:
    """Everything a runtime needs to drive the step graph without reading it.

    ``position_limit`` is None for geometric decay (unbounded) and the decay
    table length for the general form; ``decode_ops_per_layer`` counts the
    graph's nodes per op type divided by the number of layers.
    """

    model_file: str
    flavor: str
    opset: int
    dtype: str
    weights: str
    logits: str
    max_chunk: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    num_layers: int
    state_shape: list[int]
    decay: str
    position_limit: int | None
    vocab_size: int
    bos_token_id: Any = None
    eos_token_id: Any = None
    decode_ops_per_layer: dict[str, float] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: Weight-only quantization settings (bits, block size, symmetry, ...);
    #: empty for float weights.
    quantization: dict[str, Any] = field(default_factory=dict)
    state_dtype: str = "float32"
    format: str = FORMAT
    export_seconds: float = 0.0
    #: SHA-256 of the graph file and its external data, written at export;
    #: part of :meth:`fingerprint`. None in folders from older exports.
    graph_sha256: str | None = None
    #: The export's :meth:`fingerprint`, written at export so that runtimes
    #: without a JSON canonicaliser (the C runtime) read it rather than compute it.
    model_fingerprint: str | None = None

    @property
    def state_inputs(self) -> list[str]:
        return [past_state(i) for i in range(self.num_layers)]

    @property
    def state_outputs(self) -> list[str]:
        return [present_state(i) for i in range(self.num_layers)]

    def state_bytes(self, batch: int = 1) -> int:
        """Bytes of the recurrent state of ``batch`` sequences."""
        h, d1, d2 = self.state_shape
        return batch * self.num_layers * h * d1 * d2 * STATE_DTYPES[self.state_dtype]

    def to_dict(self) -> dict[str, Any]:
        """What ``manifest.json`` holds."""
        return asdict(self)

    def write(self, folder: str | Path) -> Path:
        """Write ``manifest.json``, recording the fingerprint of what it now says."""
        self.model_fingerprint = None
        self.model_fingerprint = self.compute_fingerprint()
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def fingerprint(self) -> str:
        """SHA-256 naming this exact export: the manifest's content, which
        includes the graph's own hash (computed here for older folders).

        A state file records it, so a state is never loaded into another model.
        The value recorded at export (``model_fingerprint``) is returned as it is.
        """
        if self.model_fingerprint:
            return self.model_fingerprint
        return self.compute_fingerprint()

    def compute_fingerprint(self) -> str:
        """The fingerprint from the manifest's content (``export_seconds`` and the record itself left out)."""
        data = self.to_dict()
        data.pop("export_seconds", None)
        data.pop("model_fingerprint", None)
        folder = getattr(self, "loaded_from", None)
        if data.get("graph_sha256") is None and folder is not None:
            data["graph_sha256"] = graph_sha256(folder, self.model_file)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    @classmethod
    def load(cls, folder: str | Path) -> "Manifest":
        """Read and validate ``folder/manifest.json``.

        Raises:
            ExportError: no folder, no manifest, malformed or foreign manifest.
        """
        folder = Path(folder)
        if not folder.exists():
            raise ExportError(f"{folder}: no such file or directory")
        path = folder / MANIFEST_NAME
        if not path.exists():
            raise ExportError(f"{folder}: no {MANIFEST_NAME} (not a dijiang-deploy export folder)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ExportError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ExportError(f"{path}: unknown manifest format {data.get('format') if isinstance(data, dict) else None!r}")
        try:
            data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            known = set(cls.__dataclass_fields__)
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise ExportError(f"{path}: malformed manifest ({exc})") from exc
        try:
            manifest.check_consistent()
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from exc
        #: Where it was read from (not a field: never written back).
        manifest.loaded_from = folder
        return manifest

    def check_graph(
        self,
        graph_inputs: list[tuple[str, str, list[Any]]],
        graph_outputs: list[tuple[str, str, list[Any]]],
    ) -> None:
        """Raise if the graph's (name, dtype, shape) lists differ from the manifest's.

        Symbolic dimensions (strings) match anything. The manifest's own
        consistency (:meth:`check_consistent`) was checked by :meth:`load`.
        """
        for kind, graph, specs in (("inputs", graph_inputs, self.inputs), ("outputs", graph_outputs, self.outputs)):
            got = [(name, dtype) for name, dtype, _ in graph]
            want = [(t.name, t.dtype) for t in specs]
            if got != want:
                raise ExportError(f"manifest does not match the graph: {kind} {got} vs manifest {want}")
            for (name, _, shape), spec in zip(graph, specs):
                if not _shapes_agree(shape, spec.shape):
                    raise ExportError(
                        f"manifest does not match the graph: {name} has shape {list(shape)} in the graph, "
                        f"{spec.shape} in the manifest (re-export the folder)"
                    )

    def check_metadata(self, metadata: dict[str, str]) -> dict[str, Any] | None:
        """Check the graph's metadata (``session.get_modelmeta().custom_metadata_map``)
        against ``weights``: catches a folder whose manifest and graph come from
        different exports without parsing the graph again.

        Returns the graph's quantization record, or None for a float graph.

        Raises:
            ExportError: the manifest and the graph disagree on the weight format.
        """
        raw = metadata.get(QUANT_METADATA_KEY)
        info = None
        if raw is not None:
            try:
                info = json.loads(raw)
            except json.JSONDecodeError:
                raise ExportError(f"the graph's {QUANT_METADATA_KEY} metadata is not valid JSON")
        graph = info.get("weights") if isinstance(info, dict) else None
        if self.weights in INTEGER_WEIGHTS and graph != self.weights:
            raise ExportError(
                f"manifest says weights {self.weights} but the graph is {graph or 'not quantized'}: "
                "the folder mixes files from different exports; re-export it"
            )
        if self.weights not in INTEGER_WEIGHTS and graph is not None:
            raise ExportError(f"manifest says weights {self.weights} but the graph is {graph}: re-export the folder")
        return info

    def check_consistent(self) -> None:
        """Raise if the manifest's sizes are malformed or contradict its own input/output list.

        ``num_layers``, ``state_shape`` and ``vocab_size`` size the runtime's
        buffers, so a hand-edited or mixed-up manifest must fail here with a
        message rather than inside ONNX Runtime.
        """
        shape = self.state_shape
        if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int(x) for x in shape)):
            raise ExportError(f"malformed manifest: state_shape must be [heads, d, d] (positive integers), got {shape!r}")
        for name in ("num_layers", "vocab_size", "max_chunk"):
            if not _positive_int(getattr(self, name)):
                raise ExportError(f"malformed manifest: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.state_dtype not in STATE_DTYPES:
            raise ExportError(f"malformed manifest: state_dtype must be one of {sorted(STATE_DTYPES)}, got {self.state_dtype!r}")
        names = [t.name for t in self.inputs]
        want = [INPUT_IDS, ATTENTION_MASK, PAST_POSITION, *self.state_inputs]
        if names != want:
            raise ExportError(
                f"manifest is inconsistent: num_layers {self.num_layers} needs the inputs input_ids, attention_mask, "
                f"past_position, past_state.0..{self.num_layers - 1}, but it lists {len(names)} inputs "
                f"({', '.join(names[:4])}, ...); re-export the folder"
            )
        state = ["batch", *self.state_shape]
        for t in self.inputs[3:] + self.outputs[1:]:
            if not _shapes_agree(t.shape, state):
                raise ExportError(f"manifest is inconsistent: state_shape {self.state_shape}, but {t.name} is {t.shape}")
        if not self.outputs or self.outputs[0].name != LOGITS or self.outputs[0].shape[-1:] != [self.vocab_size]:
            first = self.outputs[0] if self.outputs else None
            raise ExportError(
                f"manifest is inconsistent: vocab_size {self.vocab_size}, but the first output is "
                f"{(first.name, first.shape) if first else None}"
            )


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _shapes_agree(a: list[Any], b: list[Any]) -> bool:
    """Same rank, and equal wherever both dimensions are static integers."""
    return len(a) == len(b) and all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a, b))


def graph_sha256(folder: str | Path, model_file: str) -> str:
    """SHA-256 of ``model_file`` and, if present, its external data file."""
    digest = hashlib.sha256()
    for name in (model_file, model_file + ".data"):
        path = Path(folder) / name
        if path.exists():
            digest.update(name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()
