"""ONNX Runtime backend: one session, buffers allocated once, IOBinding.

Memory is fixed per (batch, chunk): the state lives in two sets of numpy
buffers (ping-pong: a step reads one set and writes the other, so no output
ever aliases an input), token/mask buffers exist for the prefill chunk length
and for decode (length 1), and logits buffers likewise. Nothing grows with the
number of tokens generated.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import BackendUnavailableError, ExportError
from ..export.manifest import Manifest
from ..export.schema import DOMAIN, OP_TYPE, register_schema

log = logging.getLogger(__name__)


@dataclass
class _Slot:
    """Buffers for one sequence length (1 or the prefill chunk)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    logits: np.ndarray


class OrtBackend:
    """Drives the step graph on ONNX Runtime with preallocated buffers.

    Args:
        folder: export folder (``manifest.json`` + ``model.onnx``).
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        path = self.folder / self.manifest.model_file
        if not path.exists():
            raise ExportError(f"{path}: model file named by the manifest is missing")
        providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime provider(s) {', '.join(missing)} not available in this onnxruntime build "
                f"(available: {', '.join(ort.get_available_providers())})"
            )
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        model_arg: str | bytes = str(path)
        if self.manifest.flavor == "plugin":
            model_arg = self._plugin_graph_for_ort(path, so)
        try:
            self.session = ort.InferenceSession(model_arg, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"{path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0][:300]})") from None
        graph_in = [(i.name, _np_name(i.type), i.shape) for i in self.session.get_inputs()]
        graph_out = [(o.name, _np_name(o.type), o.shape) for o in self.session.get_outputs()]
        self.manifest.check_graph(graph_in, graph_out)
        from ..export.quantize import check_session_metadata

        # A quantized graph records its format in metadata: catches a folder
        # whose manifest and graph come from different exports.
        self.quantization = check_session_metadata(
            self.manifest.weights, self.session.get_modelmeta().custom_metadata_map
        )
        self.logits_dtype = np.dtype(self.manifest.outputs[0].dtype)
        self.batch = 0
        self._slots: dict[int, _Slot] = {}
        self._states: list[list[np.ndarray]] = []
        self._current = 0
        self.position = np.zeros(0, np.int64)

    # -- setup --------------------------------------------------------------

    def _plugin_graph_for_ort(self, path: Path, so) -> bytes:
        """Route plugin nodes to the numpy reference op (onnxruntime-extensions)."""
        from .reference_op import register_python_custom_op

        try:
            from onnxruntime_extensions import get_library_path
        except ImportError:
            raise BackendUnavailableError(
                "this export uses the 'plugin' attention op, which ONNX Runtime runs only through "
                "onnxruntime-extensions (pip install onnxruntime-extensions) or TensorRT with the plugin library"
            ) from None
        register_schema()
        model = onnx.load(str(path))
        gated = any(
            a.name == "update_rule" and a.s == b"gated" for n in model.graph.node if n.op_type == OP_TYPE for a in n.attribute
        )
        domain = register_python_custom_op(gated)
        for node in model.graph.node:
            if node.op_type == OP_TYPE and node.domain == DOMAIN:
                node.domain = domain
                node.op_type = f"{OP_TYPE}{'Gated' if gated else 'Linear'}"
                keep = [copy.deepcopy(a) for a in node.attribute if a.name in ("q_num_heads", "scale")]
                del node.attribute[:]
                node.attribute.extend(keep)
        model.opset_import.append(onnx.helper.make_opsetid(domain, 1))
        so.register_custom_ops_library(get_library_path())
        return model.SerializeToString()

    def allocate(self, batch: int) -> None:
        """(Re)allocate every buffer for ``batch`` rows; a no-op if already sized."""
        if batch == self.batch:
            return
        m = self.manifest
        self.batch = batch
        self._states = [
            [np.zeros((batch, *m.state_shape), np.float32) for _ in range(m.num_layers)] for _ in range(2)
        ]
        self._slots = {}
        for length in sorted({1, m.max_chunk}):
            out_len = 1 if m.logits == "last" else length
            self._slots[length] = _Slot(
                np.zeros((batch, length), np.int64),
                np.zeros((batch, length), np.int64),
                np.zeros((batch, out_len, m.vocab_size), self.logits_dtype),
            )
        self.position = np.zeros(batch, np.int64)
        self._bindings: dict[tuple[int, int], object] = {}
        self._ortvalues: dict[int, tuple[np.ndarray, object]] = {}

    def reset(self) -> None:
        """Zero the state: the next step starts new sequences."""
        for bufs in self._states:
            for s in bufs:
                s.fill(0.0)
        self.position.fill(0)
        self._current = 0

    @property
    def state(self) -> list[np.ndarray]:
        """Current per-layer state ``[B, H, d, d]`` float32 (views, do not keep)."""
        return self._states[self._current]

    def state_nbytes(self) -> int:
        return sum(s.nbytes for s in self.state)

    def _binding(self, length: int, src: int):
        """An IOBinding per (slot, ping-pong direction), built once."""
        key = (length, src)
        if key not in self._bindings:
            slot = self._slots[length]
            io = self.session.io_binding()
            m = self.manifest
            io.bind_ortvalue_input("input_ids", self._ortvalue(slot.input_ids))
            io.bind_ortvalue_input("attention_mask", self._ortvalue(slot.attention_mask))
            io.bind_ortvalue_input("past_position", self._ortvalue(self.position))
            for name, buf in zip(m.state_inputs, self._states[src]):
                io.bind_ortvalue_input(name, self._ortvalue(buf))
            _bind_output(io, "logits", slot.logits)
            for name, buf in zip(m.state_outputs, self._states[1 - src]):
                _bind_output(io, name, buf)
            self._bindings[key] = io
        return self._bindings[key]

    def _ortvalue(self, buf: np.ndarray):
        """An OrtValue sharing ``buf``'s memory, so refilling ``buf`` in place
        feeds the next run without rebinding."""
        import onnxruntime as ort

        key = id(buf)
        if key not in self._ortvalues:
            self._ortvalues[key] = (buf, ort.OrtValue.ortvalue_from_numpy(buf))
        return self._ortvalues[key][1]

    # -- stepping -----------------------------------------------------------

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run one chunk ``ids/mask [B, L]`` (L = 1 or the prefill chunk).

        Returns the logits buffer (``[B, 1, V]`` or ``[B, L, V]``); it is
        overwritten by the next step, so copy what you keep.
        """
        length = ids.shape[1]
        if length not in self._slots:
            raise ValueError(f"step length {length} is neither 1 nor the prefill chunk {self.manifest.max_chunk}")
        slot = self._slots[length]
        slot.input_ids[...] = ids
        slot.attention_mask[...] = mask
        io = self._binding(length, self._current)
        self.session.run_with_iobinding(io)
        self._current = 1 - self._current
        self.position += mask.sum(axis=1)
        return slot.logits


def _bind_output(io, name: str, buf: np.ndarray) -> None:
    io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)


def _np_name(onnx_type: str) -> str:
    mapping = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
    return mapping.get(onnx_type, onnx_type)


def default_threads() -> int | None:
    env = os.environ.get("DIJIANG_THREADS")
    return int(env) if env else None
