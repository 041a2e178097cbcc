"""ONNX Runtime backend: one shared session, lanes of preallocated rows, IOBinding.

A :class:`OrtGraph` opens the step graph once. A :class:`OrtLane` is a set of
``capacity`` sequence rows with their state buffers, bound once per shape:
a step runs the first ``k`` rows (padded up to a bucket of 1, 2, 4, ...
rows, so few shapes ever exist) for one chunk length. Nothing grows with the
number of tokens.

Where a step's new states may overwrite the states it reads, a lane keeps
one buffer set and the step updates it in place; otherwise states ping-pong
between two sets (a step reads one and writes the other). ONNX Runtime does
not promise that an output may alias an input, so :meth:`OrtGraph.in_place_safe`
decides it per graph by running a step both ways and comparing bit for bit.
Decode lanes (one-token steps, the lanes whose rows grow with the number of
streams) use it when it holds: one state per row instead of two.

Rows beyond the first ``k`` are not touched by a step; padded rows (mask 0)
pass their state through unchanged, bit for bit. The caller keeps the rows
it uses in ``[0, k)`` (:meth:`OrtLane.move_row` compacts).

With the CUDA execution provider the state buffers live on the device as
OrtValues and stay there between steps; rows cross to the host only when a
session reads or writes one (:class:`_DeviceRows`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..contract.errors import BackendUnavailableError, ExportError
from ..contract.manifest import Manifest
from ..contract.names import DOMAIN, OP_TYPE

log = logging.getLogger(__name__)


def _import_ort():
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailableError("onnxruntime is not installed (pip install onnxruntime)")
    return ort


def default_threads() -> int | None:
    env = os.environ.get("DIJIANG_THREADS")
    return int(env) if env else None


def buckets(capacity: int) -> list[int]:
    """Row counts a lane steps with: powers of two below ``capacity``, and ``capacity``."""
    out, b = [], 1
    while b < capacity:
        out.append(b)
        b *= 2
    return out + [capacity]


class OrtGraph:
    """The step graph of an export folder on ONNX Runtime.

    Args:
        folder: export folder (``manifest.json`` + ``model.onnx``).
        providers: execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).

    Raises:
        ExportError: missing or unreadable graph, or a graph that does not
            match its manifest.
        BackendUnavailableError: a provider this onnxruntime build lacks.
    """

    def __init__(self, folder: str | Path, providers: list[str] | None = None, threads: int | None = None,
                 manifest: Manifest | None = None):
        ort = _import_ort()
        self.folder = Path(folder)
        self.manifest = manifest or Manifest.load(self.folder)
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
        self.device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One fixed node order: in_place_safe's verdict holds only for it.
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        model_arg: str | bytes = str(path)
        scratch: Path | None = None
        if self.manifest.flavor == "plugin":
            model_arg = _plugin_graph_for_ort(path, so)
            scratch = Path(model_arg) if isinstance(model_arg, str) else None
        try:
            self.session = ort.InferenceSession(model_arg, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ExportError(f"{path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0][:300]})") from exc
        finally:
            if scratch is not None:
                scratch.unlink(missing_ok=True)
        graph_in = [(i.name, _np_name(i.type), i.shape) for i in self.session.get_inputs()]
        graph_out = [(o.name, _np_name(o.type), o.shape) for o in self.session.get_outputs()]
        self.manifest.check_graph(graph_in, graph_out)
        self.quantization = self.manifest.check_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.logits_dtype = np.dtype(self.manifest.outputs[0].dtype)

        self._in_place: dict[int, bool] = {}

    def lane(self, capacity: int, lengths: Sequence[int] = (1,), in_place: bool | None = None) -> "OrtLane":
        return OrtLane(self, capacity, lengths, in_place)

    def in_place_safe(self, length: int = 1) -> bool:
        """Whether a step of ``length`` tokens may write its new states over the states it reads.

        True when, in this session's node order, every node that reads a
        layer's past state runs before the one that writes its present state.
        Checked, not assumed: one step on random states runs out of place
        twice (the two must agree bit for bit, or nothing can be concluded)
        and then in place, and the logits and states must match exactly.
        Cached per length. Always False on a CUDA device (unchecked there).
        """
        if length not in self._in_place:
            self._in_place[length] = self.device == "cpu" and self._steps_agree_in_place(length)
            log.debug("%s: in-place state update for %d-token steps: %s", self.folder, length, self._in_place[length])
        return self._in_place[length]

    def _steps_agree_in_place(self, length: int) -> bool:
        ort = _import_ort()
        m = self.manifest
        rng = np.random.default_rng(0)
        ids = rng.integers(0, m.vocab_size, (1, length), dtype=np.int64)
        mask = np.ones((1, length), np.int64)
        position = np.array([7], np.int64)
        past = [(0.05 * rng.standard_normal((1, *m.state_shape))).astype(np.float32) for _ in range(m.num_layers)]

        def run(states_in: list[np.ndarray], states_out: list[np.ndarray]) -> np.ndarray:
            logits = np.zeros((1, 1 if m.logits == "last" else length, m.vocab_size), self.logits_dtype)
            io = self.session.io_binding()
            for name, value in (("input_ids", ids), ("attention_mask", mask), ("past_position", position)):
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
            for name, buf in zip(m.state_inputs, states_in):
                io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))
            io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            for name, buf in zip(m.state_outputs, states_out):
                io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            self.session.run_with_iobinding(io)
            return logits

        def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
            return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(a, b))

        ref_states = [np.empty_like(x) for x in past]
        ref = run(past, ref_states)
        again_states = [np.empty_like(x) for x in past]
        again = run(past, again_states)
        if not same([ref, *ref_states], [again, *again_states]):
            return False
        shared = [x.copy() for x in past]
        got = run(shared, shared)
        return same([ref, *ref_states], [got, *shared])


class OrtLane:
    """``capacity`` sequence rows with fixed buffers, stepped ``k`` rows at a time.

    Args:
        graph: the shared :class:`OrtGraph`.
        capacity: rows (sequences) this lane holds.
        lengths: chunk lengths its steps use (each gets its own token and
            logits buffers; e.g. ``(1,)`` for decode only).
        in_place: one buffer set updated in place (True), two that
            ping-pong (False), or None: in place for a decode-only lane
            (``lengths == (1,)``) where :meth:`OrtGraph.in_place_safe` holds.
            Lanes with prefill lengths keep two sets by default: they hold a
            few rows, so checking their chunk shapes would cost more than it
            saves.

    Raises:
        ValueError: ``capacity`` < 1, or ``in_place=True`` where the check fails.
    """

    def __init__(self, graph: OrtGraph, capacity: int, lengths: Sequence[int] = (1,), in_place: bool | None = None):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        m = graph.manifest
        self.graph, self.manifest = graph, m
        self.capacity = capacity
        self.lengths = sorted(set(int(n) for n in lengths))
        self.buckets = buckets(capacity)
        safe = (in_place is not False and (in_place or self.lengths == [1])
                and all(graph.in_place_safe(n) for n in self.lengths))
        if in_place and not safe:
            raise ValueError(f"steps of {self.lengths} tokens cannot update states in place on this graph")
        self.in_place = safe
        rows = _DeviceRows if graph.device == "cuda" else _HostRows
        self._states = [rows(capacity, m.num_layers, m.state_shape) for _ in range(1 if safe else 2)]
        self._current = 0
        self.positions = np.zeros(capacity, np.int64)
        self._ids = {n: np.zeros((capacity, n), np.int64) for n in self.lengths}
        self._mask = {n: np.zeros((capacity, n), np.int64) for n in self.lengths}
        self._logits = {
            n: np.zeros((capacity, 1 if m.logits == "last" else n, m.vocab_size), graph.logits_dtype) for n in self.lengths
        }
        self._bindings: dict[tuple[int, int, int], Any] = {}

    def bucket(self, k: int) -> int:
        for b in self.buckets:
            if b >= k:
                return b
        raise ValueError(f"{k} rows exceed this lane's capacity {self.capacity}")

    # -- rows -----------------------------------------------------------------

    def read_row(self, i: int) -> list[np.ndarray]:
        """Row ``i``'s state, per layer ``[H, d, d]`` float32 host copies."""
        return self._states[self._current].read(i)

    def write_row(self, i: int, layers: Sequence[np.ndarray] | None, position: int = 0) -> None:
        """Set row ``i``'s state (None: zeros, a new sequence) and position."""
        self._states[self._current].write(i, layers)
        self.positions[i] = position

    def move_row(self, src: int, dst: int) -> None:
        """Copy row ``src`` (state and position) over row ``dst``."""
        if src != dst:
            self._states[self._current].move(src, dst)
            self.positions[dst] = self.positions[src]

    def state_nbytes(self, rows: int = 1) -> int:
        return self.manifest.state_bytes(rows)

    def buffer_nbytes(self) -> int:
        """Bytes of state buffers this lane holds: one or two sets of ``capacity`` rows."""
        return len(self._states) * self.manifest.state_bytes(self.capacity)

    # -- stepping -------------------------------------------------------------

    def _binding(self, rows: int, length: int, src: int):
        key = (rows, length, src)
        io = self._bindings.get(key)
        if io is None:
            ort = _import_ort()
            m = self.manifest
            io = self.graph.session.io_binding()
            value = ort.OrtValue.ortvalue_from_numpy
            io.bind_ortvalue_input("input_ids", value(self._ids[length][:rows]))
            io.bind_ortvalue_input("attention_mask", value(self._mask[length][:rows]))
            io.bind_ortvalue_input("past_position", value(self.positions[:rows]))
            for i, name in enumerate(m.state_inputs):
                self._states[src].bind(io, name, i, rows, output=False)
            logits = self._logits[length][:rows]
            io.bind_output("logits", "cpu", 0, logits.dtype, list(logits.shape), logits.ctypes.data)
            out = (src + 1) % len(self._states)
            for i, name in enumerate(m.state_outputs):
                self._states[out].bind(io, name, i, rows, output=True)
            self._bindings[key] = io
        return io

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run one chunk for rows ``[0, k)``: ``ids``/``mask`` are ``[k, L]`` int64.

        Rows are padded up to the next bucket (mask 0); positions advance by
        each row's mask sum. Returns the logits buffer ``[k, 1 or L, V]``: it
        is overwritten by the next step, so copy what you keep.
        """
        k, length = ids.shape
        if length not in self._ids:
            raise ValueError(f"step length {length} is not one of this lane's {self.lengths}")
        rows = self.bucket(k)
        ids_buf, mask_buf = self._ids[length], self._mask[length]
        ids_buf[:k] = ids
        mask_buf[:k] = mask
        if rows > k:
            ids_buf[k:rows] = 0
            mask_buf[k:rows] = 0
        io = self._binding(rows, length, self._current)
        self.graph.session.run_with_iobinding(io)
        # Rows past `rows` were not written: they hold no live sequence, and
        # write_row/move_row only ever touch the current side.
        self._current = (self._current + 1) % len(self._states)
        self.positions[:k] += mask.sum(axis=1)
        return self._logits[length][:k]


class _HostRows:
    """One set of a lane's states in host memory (one of two when they ping-pong): per layer ``[capacity, H, d, d]``."""

    def __init__(self, capacity: int, layers: int, shape: Sequence[int]):
        # np.zeros maps untouched pages lazily: a row costs memory once used.
        self.layers = [np.zeros((capacity, *shape), np.float32) for _ in range(layers)]

    def read(self, i: int) -> list[np.ndarray]:
        return [s[i].copy() for s in self.layers]

    def write(self, i: int, layers: Sequence[np.ndarray] | None) -> None:
        for j, s in enumerate(self.layers):
            if layers is None:
                s[i] = 0.0
            else:
                s[i] = layers[j]

    def move(self, src: int, dst: int) -> None:
        for s in self.layers:
            s[dst] = s[src]

    def bind(self, io, name: str, layer: int, rows: int, output: bool) -> None:
        buf = self.layers[layer][:rows]
        if output:
            io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
        else:
            ort = _import_ort()
            io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(buf))


class _DeviceRows:
    """One ping-pong side of a lane's states on a CUDA device (ONNX Runtime's CUDA provider).

    Each layer is one device OrtValue ``[capacity, H, d, d]``; steps bind
    pointers into it, so the state never leaves the device between steps.
    Row reads/writes copy one row through the CUDA runtime.
    UNVERIFIED ON HARDWARE: no GPU was available where this was written
    (``tests/gpu/test_runtime_gpu.py`` checks it where one is).
    """

    def __init__(self, capacity: int, layers: int, shape: Sequence[int]):
        ort = _import_ort()
        self.shape = list(shape)
        self.row_bytes = int(np.prod(shape)) * 4
        self.values = [ort.OrtValue.ortvalue_from_shape_and_type([capacity, *shape], np.float32, "cuda", 0)
                       for _ in range(layers)]
        self._cuda = _cudart()
        for v in self.values:
            self._cuda.memset(v.data_ptr(), capacity * self.row_bytes)

    def read(self, i: int) -> list[np.ndarray]:
        out = []
        for v in self.values:
            host = np.empty(self.shape, np.float32)
            self._cuda.copy(host.ctypes.data, v.data_ptr() + i * self.row_bytes, self.row_bytes, "d2h")
            out.append(host)
        return out

    def write(self, i: int, layers: Sequence[np.ndarray] | None) -> None:
        for j, v in enumerate(self.values):
            at = v.data_ptr() + i * self.row_bytes
            if layers is None:
                self._cuda.memset(at, self.row_bytes)
            else:
                host = np.ascontiguousarray(layers[j], np.float32)
                self._cuda.copy(at, host.ctypes.data, self.row_bytes, "h2d")

    def move(self, src: int, dst: int) -> None:
        for v in self.values:
            base = v.data_ptr()
            self._cuda.copy(base + dst * self.row_bytes, base + src * self.row_bytes, self.row_bytes, "d2d")

    def bind(self, io, name: str, layer: int, rows: int, output: bool) -> None:
        shape = [rows, *self.shape]
        ptr = self.values[layer].data_ptr()
        if output:
            io.bind_output(name, "cuda", 0, np.float32, shape, ptr)
        else:
            io.bind_input(name, "cuda", 0, np.float32, shape, ptr)


class _cudart:
    """The three CUDA runtime calls the device rows need, through ctypes."""

    _KINDS = {"h2d": 1, "d2h": 2, "d2d": 3}

    def __init__(self):
        import ctypes

        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
            try:
                self._lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise BackendUnavailableError("the CUDA provider path needs libcudart (the CUDA runtime) on the library path")
        self._lib.cudaMemcpy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def copy(self, dst: int, src: int, nbytes: int, kind: str) -> None:
        if self._lib.cudaMemcpy(dst, src, nbytes, self._KINDS[kind]) != 0:
            raise BackendUnavailableError(f"cudaMemcpy ({kind}) failed")

    def memset(self, dst: int, nbytes: int) -> None:
        if self._lib.cudaMemset(dst, 0, nbytes) != 0:
            raise BackendUnavailableError("cudaMemset failed")


def _plugin_graph_for_ort(path: Path, so) -> str | bytes:
    """Route plugin nodes to the numpy reference op (onnxruntime-extensions).

    Only the graph is loaded and rewritten; the weights stay in the export's
    external data files (a model past 2 GiB cannot be serialised in one
    piece, and need not be copied). ONNX Runtime reads external data only
    from the folder of the graph file it opens, so the rewritten graph goes
    to a hidden file in the export folder, whose path is returned for the
    caller to delete once the session exists; a read-only folder gets the
    graph as bytes instead (weights inline: models under 2 GiB only).
    """
    import onnx  # only this flavor rewrites the graph; the runtime otherwise needs no onnx

    from .reference_op import register_python_custom_op

    try:
        from onnxruntime_extensions import get_library_path
    except ImportError:
        raise BackendUnavailableError(
            "this export uses the 'plugin' attention op, which ONNX Runtime runs only through "
            "onnxruntime-extensions (pip install onnxruntime-extensions) or TensorRT with the plugin library"
        )
    model = onnx.load(str(path), load_external_data=False)
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
    if not _external_locations(model.graph):
        return model.SerializeToString()
    _remove_orphaned_rewrites(path)
    try:
        fd, name = tempfile.mkstemp(prefix=_rewrite_prefix(path), suffix=".onnx", dir=path.parent)
    except OSError:  # a read-only folder: weights inline, as far as protobuf allows
        from google.protobuf.message import EncodeError
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
        try:
            return model.SerializeToString()
        except EncodeError as exc:
            raise ExportError(f"{path.parent}: ONNX Runtime runs the plugin flavor of a model past 2 GiB only from a "
                              "writable export folder (a rewritten graph is written beside the weights)") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(model.SerializeToString())
    except OSError:
        Path(name).unlink(missing_ok=True)
        raise
    return name


def _rewrite_prefix(path: Path) -> str:
    """Name prefix of the rewritten graph this process writes beside ``path``.

    It names the writer (pid and host) so that a later process can tell a
    file left by a process that died before deleting it from one that
    another live process is about to load.
    """
    return f"{_REWRITE_LEAD.format(stem=path.stem)}{os.getpid()}-{_host_tag()}-"


_REWRITE_LEAD = ".{stem}.ort-plugin-"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _remove_orphaned_rewrites(path: Path) -> None:
    """Delete rewritten graphs beside ``path`` whose writer, on this host, is gone.

    Each is a full copy of the graph (tens of MB at 7B), and a process
    killed between writing it and creating its session leaves it behind.
    Files of other hosts (a shared folder) are left alone: their pids mean
    nothing here.
    """
    lead = _REWRITE_LEAD.format(stem=path.stem)
    host = _host_tag()
    for leftover in path.parent.glob(f"{lead}*.onnx"):
        pid, _, rest = leftover.name[len(lead):].partition("-")
        if not pid.isdigit() or not rest.startswith(host + "-") or _alive(int(pid)):
            continue
        try:
            leftover.unlink(missing_ok=True)
        except OSError:  # another user's file, or a read-only folder: not ours to clean
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _external_locations(graph) -> set[str]:
    """Files the tensors of ``graph`` and its subgraphs keep their data in."""
    tensors = list(graph.initializer)
    found: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            tensors += [attr.t] if attr.HasField("t") else []
            tensors += list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found |= _external_locations(sub)
    for t in tensors:
        found |= {e.value for e in t.external_data if e.key == "location"}
    return found


def _np_name(onnx_type: str) -> str:
    mapping = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64"}
    return mapping.get(onnx_type, onnx_type)
