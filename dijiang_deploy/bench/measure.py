"""Low-level measurements: peak resident memory, memory bandwidth, weight bytes.

Peak memory is read from ``VmHWM`` in ``/proc/self/status``; writing ``5`` to
``/proc/self/clear_refs`` resets it to the current resident size, so one
worker process can report a peak per context length.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process in bytes (0 if unknown)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter to the current RSS; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_bandwidth(threads: int, size_mib: int = 1024, tries: int = 5) -> dict[str, float]:
    """Read bandwidth in bytes/s: best of ``tries`` numpy sums over a large array.

    Measured with one thread and with ``threads`` threads (each summing its
    own slice; numpy releases the GIL in reductions); ``bandwidth`` is the
    larger of the two, the figure a multi-threaded runtime can hope to reach.
    """
    n = size_mib * (1 << 20) // 4
    data = np.ones(n, np.float32)
    data.sum()  # fault the pages in before timing
    single = 0.0
    for _ in range(tries):
        start = time.perf_counter()
        data.sum()
        single = max(single, data.nbytes / (time.perf_counter() - start))
    multi = single
    if threads > 1:
        parts = np.array_split(data, threads)
        for _ in range(tries):
            workers = [threading.Thread(target=p.sum) for p in parts]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            multi = max(multi, data.nbytes / (time.perf_counter() - start))
    del data
    return {"single_thread": single, "multi_thread": multi, "bandwidth": max(single, multi), "array_bytes": n * 4}


def onnx_weight_bytes_per_token(model_path: str | Path) -> dict[str, int]:
    """Bytes of initializers one decode step reads, from the graph alone.

    Every initializer is counted in full except tables used only by
    ``Gather`` (embedding lookups), of which one row is read per token.
    Sizes come from shapes and element types, so external data is not loaded.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    for func in model.functions:
        for node in func.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    read = 0
    for init in graph.initializer:
        dims = list(init.dims)
        count = int(np.prod(dims)) if dims else 1
        itemsize = _itemsize(init.data_type)
        size = count * itemsize
        total += size
        ops = consumers.get(init.name, set())
        if ops == {"Gather"} and len(dims) == 2:
            read += dims[1] * itemsize
        elif ops:
            read += size
    return {"weight_bytes": total, "bytes_read_per_token": read}


def _itemsize(onnx_type: int) -> float:
    """Bytes per element of an ONNX tensor type (4-bit types count half a byte)."""
    import onnx

    if onnx_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return 0.5
    return float(onnx.helper.tensor_dtype_to_np_dtype(onnx_type).itemsize)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds taken by ``fn()``."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    """Median of a non-empty list (0.0 for an empty one)."""
    return float(statistics.median(values)) if values else 0.0


def machine_info() -> dict[str, Any]:
    """CPU model, core count, RAM and load average, for the report."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        for key in ("Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "L3 cache", "Hypervisor vendor"):
            if key in fields:
                info[key.lower().replace("(s)", "s").replace(" ", "_")] = fields[key]
        flags = fields.get("Flags", "").split()
        # AMX and AVX-512 change which kernels MKL, oneDNN and MLAS pick (and their float32 rounding).
        simd = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
        info["simd"] = [f for f in simd if f in flags]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/meminfo") as fh:
            info["ram_bytes"] = int(fh.readline().split()[1]) * 1024
    except OSError:
        pass
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def library_versions() -> dict[str, str]:
    """Versions of the runtimes being compared (missing ones are left out)."""
    from importlib import metadata

    versions = {}
    for dist in ("onnxruntime", "torch", "transformers", "numpy", "onnx", "llama_cpp_python", "dijiang-deploy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions
