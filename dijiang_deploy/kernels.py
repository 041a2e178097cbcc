"""ctypes binding of ``libdijiang_kernels.so``, the plain C launch API of the CUDA kernels.

The kernels implement ONNX ``LinearAttention`` (opset 27) as documented in
``plugins/README.md``; this module lets Python code (GPU tests, benchmarks,
other runtimes) drive them with torch CUDA tensors, without TensorRT.

Layouts (row-major, contiguous, on one CUDA device):
    query, key      [B, T, H*dk]   float32 or float16
    value, output   [B, T, H*dv]   same dtype as query
    state           [B, H, dk, dv] float32 (past and present may be one tensor)
    decay           [B, T, H]      same dtype as query, log-space; None for "linear"
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dijiang_deploy.contract.errors import DiJiangError

REPO_BUILD = Path(__file__).resolve().parents[1] / "plugins" / "build" / "main"
LIBRARY_NAME = "libdijiang_kernels.so"
DTYPE_CODES = {"float32": 0, "float16": 1}
RULE_CODES = {"gated": 0, "linear": 1}


class KernelError(DiJiangError):
    """A kernel call returned a non-success status."""


def find_library() -> Path | None:
    """$DIJIANG_KERNELS_LIB, else $DIJIANG_PLUGIN_BUILD/main, else plugins/build/main of a source checkout."""
    if os.environ.get("DIJIANG_KERNELS_LIB"):
        return Path(os.environ["DIJIANG_KERNELS_LIB"])
    folders = [REPO_BUILD]
    if os.environ.get("DIJIANG_PLUGIN_BUILD"):
        folders.insert(0, Path(os.environ["DIJIANG_PLUGIN_BUILD"]) / "main")
    for folder in folders:
        if (folder / LIBRARY_NAME).is_file():
            return folder / LIBRARY_NAME
    return None


@dataclass
class Kernels:
    """The loaded library. Every call is asynchronous on ``stream`` (default: torch's current stream)."""

    lib: ctypes.CDLL

    @classmethod
    def load(cls, path: str | Path) -> "Kernels":
        path = Path(path)
        if not path.is_file():
            raise DiJiangError(f"{path}: no such kernel library (build it with scripts/build_plugins.sh)")
        lib = ctypes.CDLL(str(path))
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
        lib.dijiang_linear_attention_workspace_size.restype = ctypes.c_size_t
        lib.dijiang_linear_attention_workspace_size.argtypes = [i64] * 5 + [i32]
        lib.dijiang_linear_attention_chunk_size.restype = i32
        lib.dijiang_linear_attention_chunk_size.argtypes = [i64, i64, i32]
        lib.dijiang_linear_attention_decode.restype = i32
        lib.dijiang_linear_attention_decode.argtypes = [i32, i32] + [i64] * 4 + [ctypes.c_float] + [ptr] * 8
        for name in ("dijiang_linear_attention_prefill", "dijiang_linear_attention_forward"):
            fn = getattr(lib, name)
            fn.restype = i32
            fn.argtypes = [i32, i32] + [i64] * 5 + [ctypes.c_float, i32] + [ptr] * 8 + [ctypes.c_size_t, ptr]
        lib.dijiang_status_string.restype = ctypes.c_char_p
        lib.dijiang_status_string.argtypes = [i32]
        return cls(lib)

    def workspace_size(self, batch: int, seq_len: int, heads: int, dk: int, dv: int, chunk: int = 64) -> int:
        """Bytes of workspace ``prefill``/``forward`` need for these sizes."""
        return int(self.lib.dijiang_linear_attention_workspace_size(batch, seq_len, heads, dk, dv, chunk))

    def chunk_size(self, dk: int, dv: int, chunk: int = 64) -> int:
        """Chunk length the prefill kernels use for this head size and hint."""
        return int(self.lib.dijiang_linear_attention_chunk_size(dk, dv, chunk))

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise KernelError(f"{what}: {self.lib.dijiang_status_string(status).decode()}")

    @staticmethod
    def _ptr(t: Any) -> ctypes.c_void_p | None:
        return None if t is None else ctypes.c_void_p(t.data_ptr())

    def _common(self, query: Any, key: Any, value: Any, past_state: Any, decay: Any, output: Any,
                present_state: Any, rule: str, heads: int) -> tuple[int, int, int, int, int, int]:
        """Checks the layouts of the module docstring; a wrong shape would make the kernels read or
        write out of bounds, so every mismatch is a DiJiangError naming the tensor."""
        import torch

        if rule not in RULE_CODES:
            raise DiJiangError(f"unknown update rule {rule!r} (gated, linear)")
        dtype = str(query.dtype).removeprefix("torch.")
        if dtype not in DTYPE_CODES:
            raise DiJiangError(f"query dtype {dtype} is not supported (float32, float16)")
        if query.dim() != 3 or past_state.dim() != 4:
            raise DiJiangError(f"query must be [B, T, H*dk] and past_state [B, H, dk, dv], got "
                               f"{list(query.shape)} and {list(past_state.shape)}")
        batch, seq, _ = query.shape
        dk, dv = past_state.shape[2:]
        expected = {"query": (query, [batch, seq, heads * dk], query.dtype),
                    "key": (key, [batch, seq, heads * dk], query.dtype),
                    "value": (value, [batch, seq, heads * dv], query.dtype),
                    "output": (output, [batch, seq, heads * dv], query.dtype),
                    "past_state": (past_state, [batch, heads, dk, dv], torch.float32),
                    "present_state": (present_state, [batch, heads, dk, dv], torch.float32)}
        if rule == "gated":
            expected["decay"] = (decay, [batch, seq, heads], query.dtype)
        elif decay is not None:
            raise DiJiangError("decay must be None for the linear rule")
        for name, (t, shape, want) in expected.items():
            if t is None or list(t.shape) != shape or t.dtype != want:
                got = "None" if t is None else f"{list(t.shape)} {t.dtype}"
                raise DiJiangError(f"{name}: expected {shape} {want}, got {got}")
        for name, (t, _, _) in expected.items():
            if not t.is_cuda or not t.is_contiguous() or t.device != query.device:
                raise DiJiangError(f"{name}: must be a contiguous CUDA tensor on {query.device}")
        return DTYPE_CODES[dtype], RULE_CODES[rule], batch, seq, dk, dv

    def decode(self, query: Any, key: Any, value: Any, past_state: Any, decay: Any, output: Any, present_state: Any,
               *, heads: int, rule: str = "gated", scale: float = 1.0, stream: Any = None) -> None:
        """One token (T = 1). ``present_state`` may be ``past_state`` (updated in place)."""
        code, rule_code, batch, seq, dk, dv = self._common(query, key, value, past_state, decay, output,
                                                            present_state, rule, heads)
        if seq != 1:
            raise DiJiangError(f"decode takes one token, got T={seq}")
        status = self.lib.dijiang_linear_attention_decode(
            code, rule_code, batch, heads, dk, dv, scale, *map(self._ptr, (query, key, value, past_state, decay,
                                                                           output, present_state)),
            self._stream(stream))
        self._check(status, "decode")

    def prefill(self, query: Any, key: Any, value: Any, past_state: Any, decay: Any, output: Any, present_state: Any,
                workspace: Any, *, heads: int, rule: str = "gated", scale: float = 1.0, chunk: int = 64,
                stream: Any = None, entry: str = "prefill") -> None:
        """Chunked prefill (any T >= 1); ``entry="forward"`` dispatches T == 1 to the decode kernel.

        ``workspace`` is a uint8 CUDA tensor of at least :meth:`workspace_size` bytes.
        """
        if entry not in ("prefill", "forward"):
            raise DiJiangError(f"unknown entry {entry!r}")
        code, rule_code, batch, seq, dk, dv = self._common(query, key, value, past_state, decay, output,
                                                            present_state, rule, heads)
        if workspace is not None and (not workspace.is_cuda or not workspace.is_contiguous()):
            raise DiJiangError("workspace: must be a contiguous CUDA tensor")
        size = 0 if workspace is None else workspace.numel() * workspace.element_size()
        fn = getattr(self.lib, f"dijiang_linear_attention_{entry}")
        status = fn(code, rule_code, batch, seq, heads, dk, dv, scale, chunk,
                    *map(self._ptr, (query, key, value, past_state, decay, output, present_state, workspace)),
                    size, self._stream(stream))
        self._check(status, entry)

    @staticmethod
    def _stream(stream: Any) -> ctypes.c_void_p:
        if stream is None:
            import torch

            stream = torch.cuda.current_stream()
        return ctypes.c_void_p(stream.cuda_stream)
