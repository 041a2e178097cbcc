"""Where a DiJiang decode step spends its time: ONNX Runtime's profiler, summarised.

The step graph is opened twice with the runtime's session settings: once
plainly, to time decode steps, and once with ``SessionOptions.enable_profiling``,
whose per-node kernel times are grouped by operator type. The state content
does not change the work of a step, so the profiled steps start from a zero
state at position ``context``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ..contract.manifest import Manifest
from .measure import onnx_weight_bytes_per_token


def _session(path: Path, threads: int, profile_prefix: str | None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _feeds(manifest: Any, context: int, rows: int = 1) -> dict[str, np.ndarray]:
    feeds = {
        "input_ids": np.full((rows, 1), 5, np.int64),
        "attention_mask": np.ones((rows, 1), np.int64),
        "past_position": np.full((rows,), context, np.int64),
    }
    for name in manifest.state_inputs:
        feeds[name] = np.zeros((rows, *manifest.state_shape), np.float32)
    return feeds


def profile_decode(folder: str | Path, threads: int, context: int = 128, steps: int = 20,
                   rows: int = 1) -> dict[str, Any]:
    """Profile ``steps`` decode steps of ``rows`` sequences of the export in ``folder``.

    Returns wall time per step (plain and profiled session), the summed
    kernel time per step, and per operator type: milliseconds per step, nodes
    per step and share of kernel time. MatMul-family rows also give the
    weight bytes they read and the bandwidth that implies.
    """

    folder = Path(folder)
    manifest = Manifest.load(folder)
    path = folder / manifest.model_file
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    feeds = _feeds(manifest, context, rows)

    plain = _session(path, threads, None)
    for _ in range(3):
        plain.run(None, feeds)
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        plain.run(None, feeds)
        walls.append(time.perf_counter() - t0)
    del plain

    with tempfile.TemporaryDirectory(prefix="dijiang-prof-") as tmp:
        sess = _session(path, threads, os.path.join(tmp, "ort"))
        warm = 3
        for _ in range(warm):
            sess.run(None, feeds)
        t0 = time.perf_counter()
        for _ in range(steps):
            sess.run(None, feeds)
        profiled_wall = (time.perf_counter() - t0) / steps
        events = json.loads(Path(sess.end_profiling()).read_text())

    per_op: dict[str, dict[str, float]] = defaultdict(lambda: {"us": 0.0, "nodes": 0})
    runs = 0
    for ev in events:
        if ev.get("cat") == "Session" and ev.get("name") == "model_run":
            runs += 1
        if ev.get("cat") != "Node" or not str(ev.get("name", "")).endswith("_kernel_time"):
            continue
        op = ev.get("args", {}).get("op_name", "?")
        per_op[op]["us"] += float(ev.get("dur", 0))
        per_op[op]["nodes"] += 1
    runs = runs or (warm + steps)
    kernel_us = sum(v["us"] for v in per_op.values())
    weights = onnx_weight_bytes_per_token(path)
    ops = []
    for op, v in sorted(per_op.items(), key=lambda kv: -kv[1]["us"]):
        ops.append(
            {
                "op": op,
                "ms_per_step": v["us"] / runs / 1000,
                "nodes_per_step": v["nodes"] / runs,
                "share": v["us"] / kernel_us if kernel_us else 0.0,
            }
        )
    matmul_ms = sum(o["ms_per_step"] for o in ops if o["op"] in ("MatMul", "Gemm", "MatMulNBits", "FusedMatMul"))
    return {
        "export": str(folder),
        "weights": manifest.weights,
        "threads": threads,
        "context": context,
        "rows": rows,
        "steps": steps,
        "wall_ms_per_step": float(np.median(walls)) * 1000,
        "profiled_wall_ms_per_step": profiled_wall * 1000,
        "kernel_ms_per_step": kernel_us / runs / 1000,
        "nodes_per_step": sum(v["nodes"] for v in per_op.values()) / runs,
        "matmul_ms_per_step": matmul_ms,
        "bytes_read_per_token": weights["bytes_read_per_token"],
        "matmul_bandwidth_bytes_per_s": weights["bytes_read_per_token"] / (matmul_ms / 1000) if matmul_ms else 0.0,
        "ops": ops,
    }


def interleaved_step_times(
    folders: list[str | Path], threads: int, context: int = 128, rounds: int = 8, steps: int = 40
) -> dict[str, list[float]]:
    """Milliseconds per decode step of each export, measured in turns.

    One session per folder; each round runs ``steps`` plain
    ``InferenceSession.run`` calls on every folder in turn (batch 1, one token,
    zero state at position ``context``), so a machine whose speed drifts over
    minutes slows all folders alike. Returns, per folder (as given), the mean
    step time of each round.
    """

    if rounds < 1 or steps < 1:
        raise ValueError(f"rounds and steps must be >= 1, got {rounds} and {steps}")
    runs = []
    for folder in folders:
        manifest = Manifest.load(Path(folder))
        sess = _session(Path(folder) / manifest.model_file, threads, None)
        feeds = _feeds(manifest, context)
        for _ in range(5):  # first-run allocations
            sess.run(None, feeds)
        runs.append((str(folder), sess, feeds))
    times: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for _ in range(rounds):
        for name, sess, feeds in runs:
            t0 = time.perf_counter()
            for _ in range(steps):
                sess.run(None, feeds)
            times[name].append((time.perf_counter() - t0) / steps * 1000)
    return times
