"""Lanes over a TensorRT engine folder: the interface sessions and the engine step.

UNVERIFIED ON HARDWARE (no TensorRT anywhere this was written): a lane is a
:class:`~.trt_backend.TrtBackend` allocated for ``capacity`` rows. It always
steps all of them (rows past ``k`` get mask 0, which leaves their state
unchanged), because its execution contexts and CUDA graphs are bound to one
batch size. Each lane deserializes the engine; a server should use few lanes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..contract.manifest import Manifest


class TrtGraph:
    """An engine folder, opened lazily per lane (see the module note)."""

    def __init__(self, folder: str | Path, **backend_options):
        self.folder = Path(folder)
        self.backend_options = backend_options
        self.manifest = Manifest.load(self.folder)
        self.device = "cuda"
        self.logits_dtype = np.dtype(self.manifest.outputs[0].dtype)

    def lane(self, capacity: int, lengths: Sequence[int] = (1,)) -> "TrtLane":
        return TrtLane(self, capacity)


class TrtLane:
    """``capacity`` rows on one TensorRT backend; chunk lengths 1 and the export's ``max_chunk``."""

    def __init__(self, graph: TrtGraph, capacity: int, backend=None):
        if backend is None:
            from .trt_backend import TrtBackend

            backend = TrtBackend(graph.folder, **graph.backend_options)
        self.graph, self.manifest, self.backend = graph, graph.manifest, backend
        self.capacity = capacity
        self.lengths = sorted({1, graph.manifest.max_chunk})
        backend.allocate(capacity)
        backend.reset()

    @property
    def positions(self) -> np.ndarray:
        return self.backend.position

    def bucket(self, k: int) -> int:
        if k > self.capacity:
            raise ValueError(f"{k} rows exceed this lane's capacity {self.capacity}")
        return self.capacity

    def _current(self):
        return self.backend._states[self.backend._current]

    def read_row(self, i: int) -> list[np.ndarray]:
        self.backend.stream.synchronize()
        return [s[i].cpu().numpy().copy() for s in self._current()]

    def write_row(self, i: int, layers: Sequence[np.ndarray] | None, position: int = 0) -> None:
        torch = self.backend._torch
        with torch.cuda.stream(self.backend.stream):
            for j, s in enumerate(self._current()):
                if layers is None:
                    s[i].zero_()
                else:
                    s[i].copy_(torch.from_numpy(np.ascontiguousarray(layers[j], np.float32)), non_blocking=False)
            self.backend._position_dev[i] = int(position)
        self.backend.stream.synchronize()
        self.backend.position[i] = position

    def move_row(self, src: int, dst: int) -> None:
        if src == dst:
            return
        torch = self.backend._torch
        with torch.cuda.stream(self.backend.stream):
            for s in self._current():
                s[dst].copy_(s[src])
            self.backend._position_dev[dst] = self.backend._position_dev[src]
        self.backend.stream.synchronize()
        self.backend.position[dst] = self.backend.position[src]

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Rows ``[0, k)`` advance; the others get mask 0 (their state is unchanged)."""
        k, length = ids.shape
        if length not in self.lengths:
            raise ValueError(f"step length {length} is not one of this lane's {self.lengths}")
        full_ids = np.zeros((self.capacity, length), np.int64)
        full_mask = np.zeros((self.capacity, length), np.int64)
        full_ids[:k], full_mask[:k] = ids, mask
        return self.backend.step(full_ids, full_mask)[:k]

    def state_nbytes(self, rows: int = 1) -> int:
        return self.manifest.state_bytes(rows)
