"""The systems under test, behind one small interface.

Each system consumes a prompt from an empty state (:meth:`BenchSystem.prefill`)
and then decodes greedily one token at a time (:meth:`BenchSystem.decode`),
feeding back the arg-max of its own logits, as a chat loop at batch 1 does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

#: Weight formats the DiJiang ONNX export may support, in report order.
DIJIANG_FORMATS = ("fp32", "fp16", "int8", "int4")
#: Every system name the benchmark knows, in report order.
ALL_SYSTEMS = tuple(f"dijiang-ort-{f}" for f in DIJIANG_FORMATS) + ("ort-kv-fp32", "llamacpp-q4_1", "torch-recurrent")


class BenchSystem:
    """Interface: load once, then (prefill, decode...) per context length.

    Attributes:
        name: the system's name in reports.
        info: static facts for the report (weights bytes, bytes read per
            decode token, runtime settings, notes).
    """

    name = "system"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def load(self) -> None:
        """Open the model (not timed)."""
        raise NotImplementedError

    def prepare(self, context: int, decode_tokens: int) -> None:
        """Size per-context resources before :meth:`prefill` (not timed)."""

    def prefill(self, ids: list[int]) -> None:
        """Consume ``ids`` from an empty state/cache; keeps the last logits."""
        raise NotImplementedError

    def decode(self, steps: int) -> None:
        """Generate ``steps`` tokens greedily, one model call each."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of the recurrent state or KV cache held right now."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the model."""


class DiJiangOrt(BenchSystem):
    """This project's runtime: a :class:`~dijiang_deploy.runtime.Session` on ONNX Runtime CPU."""

    def __init__(self, name: str, folder: str | Path, threads: int):
        super().__init__()
        self.name = name
        self.folder = Path(folder)
        self.threads = threads
        self.model: Any = None
        self.session: Any = None
        self.next_token = 0

    def load(self) -> None:
        from ..runtime import Model
        from .measure import onnx_weight_bytes_per_token

        self.model = Model.open(self.folder, threads=self.threads, load_tokenizer=False)
        man = self.model.manifest
        self.info.update(onnx_weight_bytes_per_token(self.folder / man.model_file))
        self.info.update(
            runtime="onnxruntime CPUExecutionProvider",
            threads=self.threads,
            weights=man.weights,
            flavor=man.flavor,
            max_chunk=man.max_chunk,
            export=str(self.folder),
        )
        self.session = self.model.session()

    def prefill(self, ids: list[int]) -> None:
        self.session.reset()
        logits = self.session.append(ids)
        self.next_token = int(np.argmax(logits))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.next_token = int(np.argmax(self.session.feed_token(self.next_token)))

    def state_bytes(self) -> int:
        return int(self.model.manifest.state_bytes())


class OrtKvCache(BenchSystem):
    """The softmax model exported with past/present KV tensors (see :mod:`.kv_export`).

    Present tensors stay in ONNX Runtime ``OrtValue`` objects and are fed
    straight back as the next step's past, so no cache copy happens in Python.
    """

    def __init__(self, name: str, folder: str | Path, threads: int):
        super().__init__()
        self.name = name
        self.folder = Path(folder)
        self.threads = threads
        self.session: Any = None
        self.past: list[Any] = []
        self.length = 0
        self.next_token = 0

    def load(self) -> None:
        import json

        import onnxruntime as ort

        from .kv_export import KV_META, KV_MODEL
        from .measure import onnx_weight_bytes_per_token

        self.meta = json.loads((self.folder / KV_META).read_text())
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.folder / KV_MODEL), so, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.info.update(onnx_weight_bytes_per_token(self.folder / KV_MODEL))
        self.info.update(
            runtime="onnxruntime CPUExecutionProvider", threads=self.threads, weights="fp32", export=str(self.folder)
        )

    def _run(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        feeds = {
            "input_ids": ort.OrtValue.ortvalue_from_numpy(ids),
            "position_ids": ort.OrtValue.ortvalue_from_numpy(positions),
        }
        for i, value in enumerate(self.past):
            feeds[self.meta["inputs"][2 + i]] = value
        outs = self.session.run_with_ort_values(self.output_names, feeds)
        self.past = list(outs[1:])
        self.length += ids.shape[1]
        return outs[0].numpy()

    def prefill(self, ids: list[int]) -> None:
        m = self.meta
        empty = np.zeros((1, m["kv_heads"], 0, m["head_dim"]), np.float32)
        import onnxruntime as ort

        self.past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in range(2 * m["num_layers"])]
        self.length = 0
        arr = np.asarray([ids], np.int64)
        logits = self._run(arr, np.arange(arr.shape[1], dtype=np.int64)[None])
        self.next_token = int(np.argmax(logits[0, -1]))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            logits = self._run(
                np.array([[self.next_token]], np.int64), np.array([[self.length]], np.int64)
            )
            self.next_token = int(np.argmax(logits[0, -1]))

    def state_bytes(self) -> int:
        m = self.meta
        return 2 * m["num_layers"] * m["kv_heads"] * m["head_dim"] * self.length * 4


class LlamaCpp(BenchSystem):
    """llama.cpp through llama-cpp-python on the package's 4-bit GGUF.

    A context of ``n_ctx`` tokens is created per context length (llama.cpp
    allocates its KV cache for ``n_ctx`` up front); creation is not timed.
    """

    def __init__(self, name: str, gguf: str | Path, threads: int, batch: int = 512):
        super().__init__()
        self.name = name
        self.gguf = Path(gguf)
        self.threads = threads
        self.batch = batch
        self.llm: Any = None
        self.n_ctx = 0
        self.next_token = 0

    def load(self) -> None:
        import llama_cpp  # noqa: F401  (fail early when not installed)

        self.info.update(
            runtime=f"llama.cpp (llama-cpp-python {_version('llama_cpp_python')})",
            threads=self.threads,
            weights=self.gguf.name,
            weight_bytes=self.gguf.stat().st_size,
            n_batch=self.batch,
        )

    def prepare(self, context: int, decode_tokens: int) -> None:
        from llama_cpp import Llama

        # llama.cpp pads the context to a multiple of 256; ask for that size so
        # the Python-side token buffer and the real KV cache agree.
        want = -(-(context + decode_tokens + 16) // 256) * 256
        if self.llm is not None and self.n_ctx >= want:
            return
        self.close()
        self.llm = Llama(
            model_path=str(self.gguf),
            n_ctx=want,
            n_batch=min(self.batch, want),
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )
        self.n_ctx = want
        self.cache_tokens = int(self.llm.n_ctx())
        self.n_vocab = int(self.llm.n_vocab())
        meta = self.llm.metadata
        arch = meta.get("general.architecture", "llama")
        self.geometry = {
            "layers": int(meta[f"{arch}.block_count"]),
            "heads": int(meta[f"{arch}.attention.head_count"]),
            "kv_heads": int(meta.get(f"{arch}.attention.head_count_kv", meta[f"{arch}.attention.head_count"])),
            "hidden": int(meta[f"{arch}.embedding_length"]),
        }

    def _last_logits(self) -> np.ndarray:
        """Logits of the last evaluated token (llama.cpp's own output buffer)."""
        ptr = self.llm._ctx.get_logits()
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self.next_token = int(np.argmax(self._last_logits()))

    def decode(self, steps: int) -> None:
        for _ in range(steps):
            self.llm.eval([self.next_token])
            self.next_token = int(np.argmax(self._last_logits()))

    def state_bytes(self) -> int:
        """The f16 KV cache llama.cpp allocated for ``n_ctx`` (its default cache type)."""
        g = self.geometry
        kv_width = g["kv_heads"] * g["hidden"] // g["heads"]
        return 2 * g["layers"] * kv_width * self.cache_tokens * 2

    def close(self) -> None:
        if self.llm is not None:
            if hasattr(self.llm, "close"):
                self.llm.close()
            self.llm = None
            import gc

            gc.collect()


class TorchRecurrent(BenchSystem):
    """The PyTorch reference: prompt in ``chunked`` mode, decode in ``recurrent`` mode."""

    def __init__(self, name: str, checkpoint: str | Path, threads: int, prefill_slice: int = 256):
        super().__init__()
        self.name = name
        self.checkpoint = Path(checkpoint)
        self.threads = threads
        self.prefill_slice = prefill_slice
        self.model: Any = None
        self.state: Any = None
        self.next_token = 0

    def load(self) -> None:
        import torch

        from ..checkpoint import load_model

        torch.set_num_threads(self.threads)
        self.model = load_model(self.checkpoint).eval()
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.info.update(
            runtime=f"PyTorch {torch.__version__} eager",
            threads=self.threads,
            weights="fp32",
            weight_bytes=params,
            prefill_mode=f"chunked, {self.prefill_slice}-token calls",
            decode_mode="recurrent",
        )

    def prefill(self, ids: list[int]) -> None:
        import torch

        self.state = None
        arr = torch.tensor([ids], dtype=torch.int64)
        with torch.inference_mode():
            for start in range(0, arr.shape[1], self.prefill_slice):
                out = self.model(arr[:, start : start + self.prefill_slice], mode="chunked", state=self.state)
                self.state = out.state
        self.next_token = int(out.logits[0, -1].argmax())

    def decode(self, steps: int) -> None:
        import torch

        with torch.inference_mode():
            for _ in range(steps):
                ids = torch.tensor([[self.next_token]], dtype=torch.int64)
                out = self.model(ids, mode="recurrent", state=self.state)
                self.state = out.state
                self.next_token = int(out.logits[0, -1].argmax())

    def state_bytes(self) -> int:
        return int(self.state.nbytes()) if self.state is not None else 0


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def make_system(spec: dict[str, Any]) -> BenchSystem:
    """Build a system from its worker spec (``name``, ``kind``, ``path``, ``threads``)."""
    kind, name, path, threads = spec["kind"], spec["name"], spec["path"], int(spec["threads"])
    if kind == "dijiang-ort":
        return DiJiangOrt(name, path, threads)
    if kind == "ort-kv":
        return OrtKvCache(name, path, threads)
    if kind == "llamacpp":
        return LlamaCpp(name, path, threads)
    if kind == "torch":
        return TorchRecurrent(name, path, threads)
    raise ValueError(f"unknown system kind {kind!r}")
