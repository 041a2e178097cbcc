"""The state file: one sequence's recurrent state, position and token history.

A conversation with a DiJiang model is its state: ``layers x [H, d, d]``
float32 (SmolLM2-135M: 4.2 MiB) whatever its length. This module writes and
reads it in a documented binary format (``docs/state-format.md``) that the
Python and the C runtime share. No pickle; every field is checked on load.

Layout (all integers little-endian)::

    offset  size  field
    0       8     magic  b"DJSTATE\\0"
    8       4     uint32 format version (1)
    12      4     uint32 header length H
    16      H     header: UTF-8 JSON (model, position, tensors, sampler)
    ...           zero padding to a multiple of 64
    P       ...   payload: the tensors, each at P + its header offset (64-aligned)
    end-32  32    SHA-256 of every byte before it
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_file
from .errors import DiJiangError

MAGIC = b"DJSTATE\x00"
VERSION = 1
ALIGN = 64
DIGEST = 32
#: Header fields before the JSON: magic, version, header length.
_PREFIX = struct.Struct("<8sII")
_DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}


class StateFileError(DiJiangError):
    """A state file is not one, is damaged, or belongs to another model."""


@dataclass
class ModelIdentity:
    """What a state belongs to: the export's fingerprint and the state layout."""

    fingerprint: str
    num_layers: int
    state_shape: list[int]
    vocab_size: int
    #: SHA-256 of the checkpoint the export came from (None if unknown).
    checkpoint_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "num_layers": self.num_layers, "state_shape": list(self.state_shape),
            "vocab_size": self.vocab_size, "checkpoint_sha256": self.checkpoint_sha256,
        }


@dataclass
class SequenceState:
    """One sequence, as a state file holds it.

    Attributes:
        model: the model the state belongs to.
        layers: per layer ``[H, d, d]`` float32.
        tokens: every token fed so far, ``[position]`` int32.
        logits: ``[V]`` float32 after the last fed token, or None when
            nothing was fed (the next token cannot be sampled without a step).
        sampler: the sampling RNG's state (``{"rng": "splitmix64", "state": int}``) or None.
    """

    model: ModelIdentity
    layers: list[np.ndarray]
    tokens: np.ndarray
    logits: np.ndarray | None = None
    sampler: dict[str, Any] | None = None
    created_by: str = "dijiang-deploy"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, np.int64).reshape(-1) if np.ndim(self.tokens) <= 1 else np.asarray(self.tokens)

    @property
    def position(self) -> int:
        return int(self.tokens.shape[0])

    # -- writing ------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The whole file as bytes."""
        self._check_shapes()
        arrays = [(f"state.{i}", np.ascontiguousarray(a, dtype=_DTYPES["float32"])) for i, a in enumerate(self.layers)]
        arrays.append(("tokens", np.ascontiguousarray(self.tokens, dtype=_DTYPES["int32"])))
        if self.logits is not None:
            arrays.append(("logits", np.ascontiguousarray(self.logits, dtype=_DTYPES["float32"])))
        entries, offset = [], 0
        for name, arr in arrays:
            entries.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape), "offset": offset,
                            "nbytes": int(arr.nbytes)})
            offset = _aligned(offset + arr.nbytes)
        header = {
            "model": self.model.to_dict(),
            "position": self.position,
            "tensors": entries,
            "sampler": self.sampler,
            "created_by": self.created_by,
            "extra": self.extra,
        }
        raw = json.dumps(header, separators=(",", ":")).encode()
        start = _aligned(_PREFIX.size + len(raw))
        buf = bytearray(start + offset + DIGEST)
        _PREFIX.pack_into(buf, 0, MAGIC, VERSION, len(raw))
        buf[_PREFIX.size : _PREFIX.size + len(raw)] = raw
        for entry, (_, arr) in zip(entries, arrays):
            at = start + entry["offset"]
            buf[at : at + arr.nbytes] = arr.tobytes()
        buf[-DIGEST:] = hashlib.sha256(memoryview(buf)[:-DIGEST]).digest()
        return bytes(buf)

    def save(self, path: str | Path) -> Path:
        """Write atomically to ``path`` (a failed write leaves any old file as it was)."""
        path = Path(path)
        with atomic_file(path, "wb") as fh:
            fh.write(self.to_bytes())
        return path

    def _check_shapes(self) -> None:
        want = tuple(self.model.state_shape)
        if len(self.layers) != self.model.num_layers:
            raise StateFileError(f"state has {len(self.layers)} layers, the model {self.model.num_layers}")
        for i, a in enumerate(self.layers):
            if tuple(a.shape) != want:
                raise StateFileError(f"state layer {i} has shape {list(a.shape)}, the model needs {list(want)}")
        if self.tokens.ndim != 1:
            raise StateFileError(f"token history must be 1-D, got shape {list(self.tokens.shape)}")
        tokens = np.asarray(self.tokens)
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.model.vocab_size):
            raise StateFileError(f"token history holds ids outside the vocabulary 0..{self.model.vocab_size - 1}")
        if self.logits is not None and tuple(self.logits.shape) != (self.model.vocab_size,):
            raise StateFileError(f"logits have shape {list(self.logits.shape)}, the model needs [{self.model.vocab_size}]")

    # -- reading ------------------------------------------------------------

    @classmethod
    def from_bytes(cls, data: bytes, expect: ModelIdentity | None = None, source: str = "state") -> "SequenceState":
        """Parse and check a state file's bytes.

        Args:
            expect: the model that will use the state: its fingerprint and
                layout must match the file's. None skips that check.
            source: how to name the data in errors (a path).

        Raises:
            StateFileError: not a state file, another version, truncated,
                damaged (checksum), malformed header, or another model.
        """
        view = memoryview(data)
        if len(view) < _PREFIX.size or bytes(view[:8]) != MAGIC:
            raise StateFileError(f"{source}: not a dijiang-deploy state file (bad magic)")
        _, version, header_len = _PREFIX.unpack_from(view, 0)
        if version != VERSION:
            raise StateFileError(f"{source}: state format version {version}; this build reads version {VERSION}")
        start = _aligned(_PREFIX.size + header_len)
        if len(view) < start + DIGEST:
            raise StateFileError(f"{source}: truncated ({len(view)} bytes, the header alone needs {start + DIGEST})")
        try:
            header = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + header_len]))
            entries = {t["name"]: t for t in header["tensors"]}
            payload = max((t["offset"] + t["nbytes"] for t in entries.values()), default=0)
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFileError(f"{source}: damaged header ({exc})") from exc
        if len(view) < start + _aligned(payload) + DIGEST:
            raise StateFileError(f"{source}: truncated ({len(view)} bytes, expected {start + _aligned(payload) + DIGEST})")
        if len(view) > start + _aligned(payload) + DIGEST:
            raise StateFileError(f"{source}: {len(view) - start - _aligned(payload) - DIGEST} unexpected trailing bytes")
        if hashlib.sha256(view[:-DIGEST]).digest() != bytes(view[-DIGEST:]):
            raise StateFileError(f"{source}: damaged (checksum mismatch)")
        try:
            m = header["model"]
            model = ModelIdentity(m["fingerprint"], int(m["num_layers"]), [int(x) for x in m["state_shape"]],
                                  int(m["vocab_size"]), m.get("checkpoint_sha256"))

            def tensor(name: str) -> np.ndarray:
                t = entries[name]
                dtype = _DTYPES[t["dtype"]]
                count = int(np.prod(t["shape"], dtype=np.int64))
                if count * dtype.itemsize != t["nbytes"]:
                    raise ValueError(f"{name}: {t['nbytes']} bytes for shape {t['shape']}")
                at = start + t["offset"]
                return np.frombuffer(view[at : at + t["nbytes"]], dtype=dtype).reshape(t["shape"]).astype(dtype.newbyteorder("="))

            layers = [tensor(f"state.{i}") for i in range(model.num_layers)]
            tokens = tensor("tokens")
            logits = tensor("logits") if "logits" in entries else None
            state = cls(model, layers, tokens, logits, header.get("sampler"), header.get("created_by", "?"),
                        header.get("extra") or {})
            if int(header["position"]) != state.position:
                raise ValueError(f"position {header['position']} but {state.position} tokens")
            state._check_shapes()
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"{source}: malformed state file ({exc})") from exc
        if expect is not None:
            check_same_model(state.model, expect, source)
        return state

    @classmethod
    def load(cls, path: str | Path, expect: ModelIdentity | None = None) -> "SequenceState":
        path = Path(path)
        if not path.is_file():
            raise StateFileError(f"{path}: no such state file")
        return cls.from_bytes(path.read_bytes(), expect, source=str(path))


def check_same_model(got: ModelIdentity, want: ModelIdentity, source: str = "state") -> None:
    """Raise unless a state of ``got`` can be used by ``want`` (same export)."""
    if (got.num_layers, list(got.state_shape), got.vocab_size) != (want.num_layers, list(want.state_shape), want.vocab_size):
        raise StateFileError(
            f"{source}: state of a model with {got.num_layers} layers x {got.state_shape}, vocabulary {got.vocab_size}; "
            f"this model has {want.num_layers} layers x {want.state_shape}, vocabulary {want.vocab_size}"
        )
    if got.fingerprint != want.fingerprint:
        raise StateFileError(
            f"{source}: written by another model (fingerprint {got.fingerprint[:12]}, this export is {want.fingerprint[:12]})"
        )


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN
