"""``manifest.json``: the contract between an export folder and its users."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..errors import ExportError

MANIFEST_NAME = "manifest.json"
FORMAT = "dijiang-onnx/1"


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

    @property
    def state_inputs(self) -> list[str]:
        return [f"past_state.{i}" for i in range(self.num_layers)]

    @property
    def state_outputs(self) -> list[str]:
        return [f"present_state.{i}" for i in range(self.num_layers)]

    def state_bytes(self, batch: int = 1) -> int:
        h, d1, d2 = self.state_shape
        return batch * self.num_layers * h * d1 * d2 * 4

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
            raise ExportError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ExportError(f"{path}: unknown manifest format {data.get('format') if isinstance(data, dict) else None!r}")
        try:
            data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            known = set(cls.__dataclass_fields__)
            manifest = cls(**{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise ExportError(f"{path}: malformed manifest ({exc})") from None
        try:
            manifest.check_consistent()
        except ExportError as exc:
            raise ExportError(f"{path}: {exc}") from None
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
        names = [t.name for t in self.inputs]
        want = ["input_ids", "attention_mask", "past_position", *self.state_inputs]
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
        if not self.outputs or self.outputs[0].name != "logits" or self.outputs[0].shape[-1:] != [self.vocab_size]:
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


def decode_op_counts(model: onnx.ModelProto, num_layers: int) -> dict[str, float]:
    """Nodes per op type per layer that a one-token (decode) step runs.

    That is the whole main graph, plus, for each ``If``, its ``then_branch``:
    the inline graph's ``If`` takes it for one-token steps.
    """
    counts = Counter(n.op_type for n in model.graph.node)
    for node in model.graph.node:
        if node.op_type == "If":
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            counts.update(n.op_type for n in then.node)
    return {op: round(c / num_layers, 2) for op, c in sorted(counts.items())}
