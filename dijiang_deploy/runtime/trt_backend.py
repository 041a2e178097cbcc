"""TensorRT backend: the OrtBackend interface over a ``dijiang-deploy build`` engine.

UNVERIFIED ON HARDWARE: written against the TensorRT 10 Python API and torch
CUDA; it has not run on a GPU in this project yet.

Design:

* Device memory is held in **torch CUDA tensors** (torch is on every GPU
  machine this project targets, including JetPack); TensorRT gets raw
  pointers (``data_ptr()``). Host staging buffers are pinned torch tensors
  exposed as numpy views.
* Everything is allocated once per batch size: two state sets (ping-pong: a
  step reads one set and writes the other, so no output aliases an input and
  no captured graph updates in place), token/mask/logits buffers for L = 1
  and L = max_chunk, the position vector, the greedy token.
* One execution context per binding set (profile x ping-pong side), each bound
  once to fixed addresses; all contexts share one activation scratch buffer
  (they run one after another on one stream). Several contexts on one
  optimization profile rely on profile sharing, the default since TensorRT 10.0.
* Decode (L = 1) is captured in a CUDA graph per binding set after one eager
  warm-up run; the graph also advances the position and writes the greedy
  argmax into the decode token buffer, so the fast greedy path feeds the next
  step without a host round trip and copies only ``B`` int64 to the host.
* One explicit stream (``self.stream``) carries copies, execution and graphs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..build.environment import find_plugin_library, gpu_info, import_tensorrt, load_plugin_library
from ..build.manifest import ENGINE_FILE, EngineManifest
from ..contract.errors import BackendUnavailableError, DiJiangError
from ..contract.manifest import Manifest

log = logging.getLogger(__name__)


def _import_torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        raise BackendUnavailableError("the TensorRT backend needs torch with CUDA for its device buffers")
    if not torch.cuda.is_available():
        raise BackendUnavailableError("the TensorRT backend needs a CUDA device (torch.cuda.is_available() is False)")
    return torch


@dataclass
class _Slot:
    """Buffers of one sequence length: device tensors and pinned host mirrors."""

    length: int
    ids: Any
    mask: Any
    logits: Any
    ids_host: Any
    mask_host: Any
    logits_host: Any


class TrtBackend:
    """Drives a TensorRT engine folder with preallocated GPU buffers.

    Args:
        folder: engine folder (``engine.json``, ``model.engine``, ``manifest.json``).
        device: CUDA device index.
        plugin_lib: plugin library; default: the one the build copied into the
            engine folder, else ``$DIJIANG_TRT_PLUGIN_LIB``, else
            ``plugins/build/main``. A path ``engine.json`` names outside the
            folder is never loaded. Not loaded when the engine embeds it
            (``--serialize-plugins``).
        cuda_graphs: capture decode steps in CUDA graphs.
        allow_host_code: let TensorRT run the plugin code serialized inside a
            version-compatible engine. Off by default: such an engine is a
            program, and an engine folder may come from anywhere.

    Raises:
        BackendUnavailableError: no TensorRT, torch CUDA, GPU or plugin library.
        DiJiangError: the engine was built for another GPU or TensorRT version,
            or does not match its manifest.
    """

    def __init__(
        self,
        folder: str | Path,
        device: int = 0,
        plugin_lib: str | Path | None = None,
        cuda_graphs: bool = True,
        allow_host_code: bool = False,
    ):
        self.folder = Path(folder)
        self.engine_manifest = EngineManifest.load(self.folder)
        self.manifest = Manifest.load(self.folder)
        trt = import_tensorrt()
        torch = _import_torch_cuda()
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device)
        self._check_compatible(trt, device)
        em = self.engine_manifest
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._trt_logger)
        if em.plugins_serialized:
            # The library travels inside the version-compatible engine (loading it
            # again would register the creators twice); running it is the user's call.
            if not allow_host_code:
                raise DiJiangError(
                    f"{self.folder}: the engine embeds plugin code (built with --serialize-plugins); run it only if "
                    "you trust where it came from: allow_host_code=True (--allow-engine-host-code)"
                )
            self.runtime.engine_host_code_allowed = True
        else:
            # Needed when the engine holds plugin layers (plugin and
            # linear-attention flavors, or a function flavor whose body was
            # replaced by the plugin at build time).
            required = em.flavor in ("plugin", "linear-attention") or bool(em.plugin_layers) or bool(em.plugin_library)
            path = find_plugin_library(plugin_lib or self._bundled_plugin(), required=required)
            if path is not None:
                load_plugin_library(trt, path)
        engine_path = self.folder / (em.engine_file or ENGINE_FILE)
        if not engine_path.is_file():
            raise DiJiangError(f"{engine_path}: engine file named by engine.json is missing")
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise DiJiangError(
                f"{engine_path}: TensorRT {trt.__version__} cannot deserialize it (other TensorRT version or GPU?)"
            )
        self._check_io()
        self._profile_lengths = self._read_profiles()
        for length in sorted({1, self.manifest.max_chunk}):
            try:
                self._profile_for(length)
            except ValueError:
                raise DiJiangError(
                    f"{self.folder}: no optimization profile accepts sequence length {length} "
                    f"(profiles: {sorted(self._profile_lengths.values())}); rebuild or fix engine.json"
                )
        self.cuda_graphs = cuda_graphs
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
        size = int(getattr(self.engine, "device_memory_size_v2", 0) or self.engine.device_memory_size)
        self._scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
        self.logits_dtype = np.dtype(self.manifest.outputs[0].dtype)
        self.batch = 0
        self._current = 0
        self.position = np.zeros(0, np.int64)
        self._states: list[list[Any]] = [[], []]
        self._contexts: dict[tuple[int, int], Any] = {}
        self._graphs: dict[int, Any] = {}

    # -- checks ---------------------------------------------------------------

    def _bundled_plugin(self) -> Path | None:
        """The plugin library the build copied into the engine folder, if any.

        ``engine.json`` names it by file name; anything with a folder in it (an
        older engine folder recorded absolute paths) is ignored with a warning.
        """
        name = self.engine_manifest.plugin_library
        if not name:
            return None
        if Path(name).name != name or name in (".", ".."):
            log.warning("engine.json names the plugin library %s outside the engine folder: not loading it", name)
            return None
        path = self.folder / name
        return path if path.is_file() else None

    def _check_compatible(self, trt: Any, device: int) -> None:
        em = self.engine_manifest
        name, sm = gpu_info(device)
        if em.gpu_sm is not None and em.gpu_sm != sm:
            raise DiJiangError(
                f"{self.folder}: engine built for {em.gpu_name} (SM {em.gpu_sm}) cannot run on {name} (SM {sm}); "
                "rebuild it on this GPU with dijiang-deploy build"
            )
        if em.gpu_name is not None and em.gpu_name != name:
            log.warning("engine built on %s, running on %s (same SM %s)", em.gpu_name, name, sm)
        if em.tensorrt_version and em.tensorrt_version != trt.__version__ and not em.version_compatible:
            raise DiJiangError(
                f"{self.folder}: engine built with TensorRT {em.tensorrt_version}, this is {trt.__version__}; "
                "rebuild it (or build with --serialize-plugins for a version-compatible engine)"
            )

    def _check_io(self) -> None:
        trt, eng = self._trt, self.engine
        names = [eng.get_tensor_name(i) for i in range(eng.num_io_tensors)]
        inputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if eng.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in = [t.name for t in self.manifest.inputs]
        want_out = [t.name for t in self.manifest.outputs]
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise DiJiangError(f"{self.folder}: engine IO {inputs} -> {outputs} differs from the manifest's")
        mapping = {"float32": trt.float32, "float16": trt.float16, "int64": trt.int64}
        for spec in [*self.manifest.inputs, *self.manifest.outputs]:
            got = eng.get_tensor_dtype(spec.name)
            if mapping.get(spec.dtype) != got:
                raise DiJiangError(f"{self.folder}: tensor {spec.name} is {got} in the engine, {spec.dtype} in the manifest")

    def _read_profiles(self) -> dict[int, tuple[int, int, int]]:
        """profile index -> (min L, max L, max batch), read from the engine."""
        out = {}
        for k in range(self.engine.num_optimization_profiles):
            lo, _opt, hi = self.engine.get_tensor_profile_shape("input_ids", k)
            out[k] = (int(lo[1]), int(hi[1]), int(hi[0]))
        return out

    def _profile_for(self, length: int) -> int:
        for k, (lo, hi, _b) in self._profile_lengths.items():
            if lo <= length <= hi:
                return k
        raise ValueError(f"no optimization profile of this engine accepts sequence length {length}")

    @property
    def max_batch(self) -> int:
        return min(b for _lo, _hi, b in self._profile_lengths.values())

    # -- setup ----------------------------------------------------------------

    def allocate(self, batch: int) -> None:
        """(Re)allocate every buffer for ``batch`` rows; a no-op if already sized."""
        if batch == self.batch:
            return
        if not 1 <= batch <= self.max_batch:
            raise DiJiangError(f"batch {batch} is outside this engine's 1..{self.max_batch} (rebuild with --max-batch)")
        torch, m = self._torch, self.manifest
        self.stream.synchronize()
        self._graphs.clear()
        self._contexts.clear()
        self.batch = batch
        dev = self.device
        self._states = [
            [torch.zeros((batch, *m.state_shape), dtype=torch.float32, device=dev) for _ in range(m.num_layers)]
            for _ in range(2)
        ]
        logits_torch = torch.float16 if self.logits_dtype == np.float16 else torch.float32
        self._slots: dict[int, _Slot] = {}
        for length in sorted({1, m.max_chunk}):
            out_len = 1 if m.logits == "last" else length
            ids_host = self._host_buffer((batch, length), torch.int64)
            mask_host = self._host_buffer((batch, length), torch.int64)
            logits_host = self._host_buffer((batch, out_len, m.vocab_size), logits_torch)
            self._slots[length] = _Slot(
                length,
                torch.zeros((batch, length), dtype=torch.int64, device=dev),
                torch.zeros((batch, length), dtype=torch.int64, device=dev),
                torch.zeros((batch, out_len, m.vocab_size), dtype=logits_torch, device=dev),
                ids_host, mask_host, logits_host,
            )
        self._position_dev = torch.zeros(batch, dtype=torch.int64, device=dev)
        self._token_dev = torch.zeros(batch, dtype=torch.int64, device=dev)
        self._token_host = self._host_buffer((batch,), torch.int64)
        self.position = np.zeros(batch, np.int64)
        self._current = 0

    def _host_buffer(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """A zeroed page-locked host tensor (asynchronous copies need pinned memory)."""
        return self._torch.zeros(shape, dtype=dtype).pin_memory()

    def _context(self, length: int, src: int) -> Any:
        """The execution context of one binding set, created and bound once."""
        profile = self._profile_for(length)
        key = (length, src)
        ctx = self._contexts.get(key)
        if ctx is not None:
            return ctx
        eng = self.engine
        strategy = getattr(self._trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:  # TensorRT >= 10.0: the scratch buffer is ours
            ctx = eng.create_execution_context(strategy.USER_MANAGED)
        else:
            ctx = eng.create_execution_context_without_device_memory()
        if ctx is None:
            raise DiJiangError("TensorRT could not create an execution context")
        if hasattr(ctx, "set_device_memory"):
            ctx.set_device_memory(self._scratch.data_ptr(), self._scratch.numel())
        else:
            ctx.device_memory = self._scratch.data_ptr()
        if not ctx.set_optimization_profile_async(profile, self.stream.cuda_stream):
            raise DiJiangError(f"TensorRT refused optimization profile {profile}")
        slot = self._slots[length]
        m = self.manifest
        bind = {"input_ids": slot.ids, "attention_mask": slot.mask, "past_position": self._position_dev}
        bind.update(zip(m.state_inputs, self._states[src]))
        bind["logits"] = slot.logits
        bind.update(zip(m.state_outputs, self._states[1 - src]))
        for name, tensor in bind.items():
            if name in ("input_ids", "attention_mask", "past_position") or name.startswith("past_state."):
                if not ctx.set_input_shape(name, tuple(tensor.shape)):
                    raise DiJiangError(f"TensorRT refused shape {tuple(tensor.shape)} for {name}")
            if not ctx.set_tensor_address(name, tensor.data_ptr()):
                raise DiJiangError(f"TensorRT refused the address of {name}")
        if getattr(ctx, "all_binding_shapes_specified", True) is False:
            raise DiJiangError("not every input shape is specified")
        self._contexts[key] = ctx
        return ctx

    def reset(self) -> None:
        """Zero the state: the next step starts new sequences."""
        with self._torch.cuda.stream(self.stream):
            for bufs in self._states:
                for s in bufs:
                    s.zero_()
            self._position_dev.zero_()
        self.stream.synchronize()
        self.position.fill(0)
        self._current = 0

    @property
    def state(self) -> list[np.ndarray]:
        """Current per-layer state ``[B, H, d, d]`` float32, copied to the host (synchronizes)."""
        self.stream.synchronize()
        return [s.cpu().numpy() for s in self._states[self._current]]

    def state_nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._states[self._current])

    # -- stepping -------------------------------------------------------------

    def _run_device(self, length: int) -> None:
        """Enqueue one step whose inputs are already in the device slot; flips the state side."""
        torch = self._torch
        src = self._current
        slot = self._slots[length]
        ctx = self._context(length, src)
        graph_key = src
        if length == 1 and self.cuda_graphs and graph_key in self._graphs:
            # replay() launches on the current stream: make it ours.
            with torch.cuda.stream(self.stream):
                self._graphs[graph_key].replay()
        else:
            with torch.cuda.stream(self.stream):
                if not ctx.execute_async_v3(self.stream.cuda_stream):
                    raise DiJiangError("TensorRT execute_async_v3 failed")
                self._after_step(slot)
            if length == 1 and self.cuda_graphs:
                self._capture(ctx, slot, graph_key)
        self._current = 1 - src

    def _after_step(self, slot: _Slot) -> None:
        """Device work that follows every step: advance positions, greedy token."""
        self._position_dev.add_(slot.mask.sum(dim=1))
        self._token_dev.copy_(slot.logits[:, -1].argmax(dim=-1))
        # The decode input of the next step (step() overwrites it from the host).
        self._slots[1].ids[:, 0].copy_(self._token_dev)

    def _capture(self, ctx: Any, slot: _Slot, key: int) -> None:
        """Capture the decode step of one binding set (after its eager warm-up)."""
        torch = self._torch
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                if not ctx.execute_async_v3(self.stream.cuda_stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed while capturing")
                self._after_step(slot)
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed (%s); decode runs eagerly", str(exc).splitlines()[0])
            self.cuda_graphs = False
            return
        self._graphs[key] = graph

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run one chunk ``ids/mask [B, L]`` (L = 1 or the prefill chunk).

        Returns the pinned host logits (``[B, 1, V]`` or ``[B, L, V]``) as a
        numpy view; it is overwritten by the next step, so copy what you keep.
        """
        length = ids.shape[1]
        if length not in self._slots:
            raise ValueError(f"step length {length} is neither 1 nor the prefill chunk {self.manifest.max_chunk}")
        slot = self._slots[length]
        slot.ids_host.numpy()[...] = ids
        slot.mask_host.numpy()[...] = mask
        with self._torch.cuda.stream(self.stream):
            slot.ids.copy_(slot.ids_host, non_blocking=True)
            slot.mask.copy_(slot.mask_host, non_blocking=True)
        self._run_device(length)
        with self._torch.cuda.stream(self.stream):
            slot.logits_host.copy_(slot.logits, non_blocking=True)
        self.stream.synchronize()
        self.position += mask.sum(axis=1)
        return slot.logits_host.numpy()

    def step_greedy(self, mask: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """One decode step fed by the previous step's greedy token (already on
        the GPU) unless ``ids [B, 1]`` is given; returns this step's greedy
        tokens ``[B]`` int64. Only the tokens cross to the host."""
        slot = self._slots[1]
        slot.mask_host.numpy()[...] = mask
        with self._torch.cuda.stream(self.stream):
            if ids is not None:
                slot.ids_host.numpy()[...] = ids
                slot.ids.copy_(slot.ids_host, non_blocking=True)
            slot.mask.copy_(slot.mask_host, non_blocking=True)
        self._run_device(1)
        with self._torch.cuda.stream(self.stream):
            self._token_host.copy_(self._token_dev, non_blocking=True)
        self.stream.synchronize()
        self.position += mask.sum(axis=1)
        return self._token_host.numpy().copy()

    def generate_greedy(
        self, rows: Sequence[Sequence[int]], max_new_tokens: int, eos_ids: set[int] | None = None
    ) -> list[list[int]]:
        """Greedy generation on the GPU (prefill through :meth:`step`, then
        :meth:`step_greedy`); same tokens as ``Generator.generate`` with
        temperature 0 and no repetition penalty."""
        eos_ids = eos_ids or set()
        b = len(rows)
        if b == 0 or min(len(r) for r in rows) == 0:
            raise DiJiangError("empty prompt: give at least one token per row")
        n = max(len(r) for r in rows)
        limit = self.manifest.position_limit
        if limit is not None and n > limit:
            raise DiJiangError(f"input of {n} tokens is past this model's limit of {limit} positions")
        chunk = self.manifest.max_chunk
        total = -(-n // chunk) * chunk if chunk > 1 else n
        ids = np.zeros((b, total), np.int64)
        mask = np.zeros((b, total), np.int64)
        for i, r in enumerate(rows):
            ids[i, total - len(r):] = r
            mask[i, total - len(r):] = 1
        self.allocate(b)
        self.reset()
        for start in range(0, total, chunk):
            sl = slice(start, start + chunk)
            if mask[:, sl].any():
                self.step(ids[:, sl], mask[:, sl])
        self.stream.synchronize()
        tokens = self._token_dev.cpu().numpy().copy()
        out: list[list[int]] = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for step in range(max_new_tokens):
            for i in range(b):
                if done[i]:
                    continue
                if int(tokens[i]) in eos_ids:
                    done[i] = True
                    continue
                out[i].append(int(tokens[i]))
                if limit is not None and len(rows[i]) + len(out[i]) >= limit:
                    done[i] = True
            if done.all() or step == max_new_tokens - 1:
                break
            # The tokens are already in the decode input buffer on the GPU.
            tokens = self.step_greedy((~done).astype(np.int64).reshape(b, 1))
        return out


__all__ = ["TrtBackend"]
