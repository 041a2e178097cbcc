"""Writing step graphs of any size: external data past 1 GiB, checks by path.

Protobuf cannot serialise a message past 2 GiB, and ``onnx.checker`` on an
in-memory model serialises it. So a graph is written first (tensors to one
external data file when large) and checked from the file, where the checker
and its shape inference read the external data themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..quantization.select import placeholder

#: Above this size the weights go to ``<model>.data`` beside the graph.
EXTERNAL_DATA_BYTES = 1 << 30


def graph_nbytes(proto: onnx.ModelProto) -> int:
    """Bytes of the serialised graph, or of its initializers when it is too large to serialise."""
    from google.protobuf.message import EncodeError

    try:
        return proto.ByteSize()
    except (ValueError, EncodeError):
        return sum(len(t.raw_data) for t in proto.graph.initializer)


def save_graph(proto: onnx.ModelProto, path: Path, check: bool = True) -> Path:
    """Write ``proto`` to ``path`` (external data when large) and check it there.

    The initializers' data moves into the file as it is written (the proto
    keeps references), so no second copy of the weights is held.

    Raises:
        onnx.checker.ValidationError: the written graph is invalid.
    """
    path = Path(path)
    large = graph_nbytes(proto) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    data = path.with_name(path.name + ".data")
    if data.exists():
        # onnx creates the data file owner-only; give it the graph file's mode (what the umask made).
        data.chmod(path.stat().st_mode & 0o777)
    if check:
        onnx.checker.check_model(str(path), full_check=True)
    return path


def reload_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Bring the tensors kept in ``folder``'s data files into ``proto`` and delete those files.

    A large traced graph is read back without its data; once its float
    weights are quantized, the data file written with it holds bytes that
    nothing reads, so :func:`save_graph` writes a new one with only what the
    graph uses.
    """
    from onnx.external_data_helper import load_external_data_for_model

    files = {e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    load_external_data_for_model(proto, str(folder))
    for name in files:
        (Path(folder) / name).unlink(missing_ok=True)


class ExternalData:
    """Writes a graph's large initializers straight into ``<model>.data`` while the graph is built.

    The graph then never holds its weights (a model past 2 GiB exports with
    about one copy of them in memory: the PyTorch model's). Tensors below
    ``threshold`` bytes stay inside the graph. Offsets are aligned to 4 KiB,
    so ONNX Runtime can map the file.
    """

    ALIGN = 4096
    BLOCK = 64 << 20

    def __init__(self, path: Path, threshold: int = 1 << 20, hand_over=None):
        self.path = Path(path)
        self.threshold = threshold
        #: name -> True for tensors the quantizer reads from ``handed_over`` instead: the graph
        #: gets a placeholder (dims, no data) and the value is held by reference, not copied.
        self.hand_over = hand_over or (lambda name: False)
        self.handed_over: dict[str, np.ndarray] = {}
        self._fh = open(self.path, "wb")
        self._offset = 0

    def tensor(self, name: str, value: np.ndarray) -> onnx.TensorProto:
        value = np.asarray(value)
        if self.hand_over(name):
            self.handed_over[name] = value
            return placeholder(name, list(value.shape), helper.np_dtype_to_tensor_dtype(value.dtype))
        if value.nbytes < self.threshold:
            return numpy_helper.from_array(value if value.flags.c_contiguous else value.copy(), name)
        pad = -self._offset % self.ALIGN
        self._fh.write(b"\0" * pad)
        start = self._offset = self._offset + pad
        if value.flags.c_contiguous:
            self._fh.write(memoryview(value.reshape(-1)).cast("B"))
        else:  # e.g. a transposed weight: copy a block of rows at a time, never the whole
            rows = max(1, self.BLOCK // max(1, value[0].nbytes))
            for i in range(0, value.shape[0], rows):
                self._fh.write(memoryview(np.ascontiguousarray(value[i : i + rows]).reshape(-1)).cast("B"))
        self._offset += value.nbytes
        t = onnx.TensorProto(name=name, dims=list(value.shape), data_type=helper.np_dtype_to_tensor_dtype(value.dtype))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", self.path.name), ("offset", str(start)), ("length", str(value.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        return t

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
