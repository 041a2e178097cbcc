"""Diagnostics behind the concurrent-streams figures in docs/benchmarks.md.

Three measurements, each side by side in one run:

* ``in-place EXPORT [--rows N]``: decode steps of an in-place lane and of a
  ping-pong lane (``OrtLane(in_place=True/False)``), timed interleaved in
  one process on the same random states.
* ``spinning EXPORT [--streams N] [--runs K]``: the ``bench --streams`` decode
  cell (a 4096-token state forked to N streams through the engine), each run
  in a fresh process, alternating ONNX Runtime's intra-op thread spinning on
  and off (``session.intra_op.allow_spinning``).
* ``prefill-alone EXPORT [--tokens T]``: how long a session takes to prefill
  a T-token prompt on an idle engine (the reference for the interference
  scenario's time to first token).

Usage::

    python benchmarks/streams_diagnostics.py in-place runs/smollm2-shipped-onnx-int4 --rows 16
    python benchmarks/streams_diagnostics.py spinning runs/smollm2-shipped-onnx-int4 --streams 16 --runs 3
    python benchmarks/streams_diagnostics.py prefill-alone runs/smollm2-shipped-onnx-fp32
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dijiang_deploy.bench.measure import machine_info
from dijiang_deploy.bench.worker import prompt_ids
from dijiang_deploy.runtime import Model


def in_place(export: str, rows: int, threads: int) -> None:
    model = Model.open(export, threads=threads, load_tokenizer=False)
    rng = np.random.default_rng(0)
    layers = [(0.05 * rng.standard_normal(model.manifest.state_shape)).astype(np.float32)
              for _ in range(model.manifest.num_layers)]
    lanes = {"in place": model.lane(rows, (1,), in_place=True), "ping-pong": model.lane(rows, (1,), in_place=False)}
    for lane in lanes.values():
        for i in range(rows):
            lane.write_row(i, layers, 4096)
    ids = rng.integers(0, model.vocab_size, (rows, 1))
    mask = np.ones_like(ids)
    times: dict[str, list[float]] = {k: [] for k in lanes}
    order = list(lanes.items())
    for rep in range(8):
        for name, lane in order if rep % 2 == 0 else order[::-1]:
            for _ in range(3):
                lane.step(ids, mask)
            t0 = time.perf_counter()
            for _ in range(10):
                lane.step(ids, mask)
            times[name].append((time.perf_counter() - t0) / 10 * 1e3)
    for name, v in times.items():
        print(f"{rows} rows, {name}: median {statistics.median(v):.1f} ms per step (min {min(v):.1f}, max {max(v):.1f}; "
              f"state buffers {lanes[name].buffer_nbytes() / 2**20:.1f} MiB)")


_NO_SPIN = """
import runpy, sys
import onnxruntime as ort

class NoSpin(ort.SessionOptions):
    def __init__(self):
        super().__init__()
        self.add_session_config_entry("session.intra_op.allow_spinning", "0")

ort.SessionOptions = NoSpin
sys.argv = ["streams", sys.argv[1], sys.argv[2]]
runpy.run_module("dijiang_deploy.bench.streams", run_name="__main__")
"""


def spinning(export: str, streams: int, runs: int, threads: int) -> None:
    spec = {"kind": "dijiang-ort", "path": export, "threads": threads, "context": 4096, "decode_steps": 16,
            "warmup_steps": 4, "seed": 0, "timeout": 600, "streams": streams, "mode": "decode"}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        got: dict[str, list[float]] = {"spinning on": [], "spinning off": []}
        for _ in range(runs):
            for name in got:
                cmd = [sys.executable, "-m", "dijiang_deploy.bench.streams"] if name == "spinning on" else \
                      [sys.executable, "-c", _NO_SPIN]
                subprocess.run([*cmd, str(spec_path), str(out_path)], check=True, capture_output=True)
                r = json.loads(out_path.read_text())
                if "error" in r:
                    raise SystemExit(f"worker failed: {r['error']}")
                got[name].append(r["itl_p50_ms"])
                print(f"{streams} streams, {name}: ITL p50 {r['itl_p50_ms']:.1f} ms, "
                      f"{r['aggregate_tokens_per_s']:.1f} tok/s", flush=True)
    for name, v in got.items():
        print(f"{streams} streams, {name}: ITL p50 per run {', '.join(f'{x:.1f}' for x in v)} ms")


def prefill_alone(export: str, tokens: int, threads: int) -> None:
    model = Model.open(export, threads=threads, load_tokenizer=False)
    ids = prompt_ids(tokens, model.vocab_size, 7)
    model.session().append(ids[:64])  # first runs of the chunk shapes
    session = model.session()
    t0 = time.perf_counter()
    session.append(ids)
    print(f"{tokens}-token prompt prefilled alone (Session.append, chunks of {model.manifest.max_chunk}): "
          f"{time.perf_counter() - t0:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("in-place", "spinning", "prefill-alone"):
        p = sub.add_parser(name)
        p.add_argument("export")
        p.add_argument("--threads", type=int, default=2)
        if name == "in-place":
            p.add_argument("--rows", type=int, default=16)
        if name == "spinning":
            p.add_argument("--streams", type=int, default=16)
            p.add_argument("--runs", type=int, default=3)
        if name == "prefill-alone":
            p.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()
    if not (Path(args.export) / "manifest.json").exists():
        parser.error(f"{args.export}: not an export folder (no manifest.json)")
    m = machine_info()
    print(f"CPU: {m.get('model_name', '?')} ({m.get('cpus', '?')} CPUs); threads {args.threads}")
    if args.what == "in-place":
        in_place(args.export, args.rows, args.threads)
    elif args.what == "spinning":
        spinning(args.export, args.streams, args.runs, args.threads)
    else:
        prefill_alone(args.export, args.tokens, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
