"""Run the benchmark: prepare models, measure bandwidth, one worker per system, report.

Protocol per system and context length C (ascending):

1. prefill a prompt of C random tokens from an empty state/cache (timed;
   median of ``prefill_repeats``) -> prefill tokens/s;
2. decode ``warmup_steps`` tokens (not timed), then ``repeats`` runs of
   ``decode_steps`` greedy tokens at batch 1 -> decode tokens/s is the median
   over runs. KV-cache systems really hold a cache of C (+ the tokens decoded
   so far); DiJiang holds its fixed-size state after C tokens;
3. peak resident memory of the worker process during 1-2 and the size of the
   state/KV cache after 2.

With ``rounds`` > 1 the systems are measured in turn, round after round, and
each figure is the median over rounds: a shared or virtual machine whose
speed drifts over minutes then slows every system alike instead of whichever
one happened to run during a slow spell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

from .artifacts import prepare
from .measure import library_versions, machine_info, memory_bandwidth
from .report import write_outputs
from .systems import ALL_SYSTEMS

DEFAULT_CONTEXTS = (128, 1024, 4096, 8192)
QUICK_CONTEXTS = (16, 64)


@dataclass
class BenchOptions:
    """Settings of one benchmark run (the ``bench`` command's options)."""

    out: Path
    contexts: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXTS))
    systems: list[str] = field(default_factory=lambda: list(ALL_SYSTEMS))
    repeats: int = 5
    decode_steps: int = 16
    warmup_steps: int = 4
    prefill_repeats: int = 1
    threads: int = 0
    quick: bool = False
    work_dir: Path | None = None
    checkpoint: Path | None = None
    device: str = "cpu"
    backend: str = "ort"
    profile: bool = True
    timeout: int = 1800
    seed: int = 0
    rounds: int = 1

    def resolved_threads(self) -> int:
        """Threads for every runtime: the option, else the number of CPUs."""
        return self.threads or os.cpu_count() or 1


def gpu_note(device: str, backend: str) -> str | None:
    """None for CPU/ONNX Runtime runs; otherwise the note saying why nothing is measured
    (no GPU or TensorRT here, or GPU runs not implemented by this benchmark)."""
    if device == "cpu" and backend == "ort":
        return None
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    if backend == "trt":
        import torch

        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "--backend trt: TensorRT is not installed on this machine; nothing measured"
        if not torch.cuda.is_available():
            return "--backend trt: no CUDA device on this machine; nothing measured"
        return "--backend trt: TensorRT runs are not implemented by this benchmark yet; nothing measured"
    if device == "cuda":
        import torch

        if "CUDAExecutionProvider" not in providers or not torch.cuda.is_available():
            return "--device cuda: no CUDA device / CUDAExecutionProvider on this machine; nothing measured"
        return "--device cuda: GPU runs are not implemented by this benchmark yet; nothing measured"
    return f"unknown device/backend {device}/{backend}"


def _log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_worker(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    """Run one worker process and return its record (with ``error`` on failure)."""
    with tempfile.TemporaryDirectory(prefix="dijiang-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "dijiang_deploy.bench.worker", str(spec_path), str(out_path)]
        env = dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            stderr = proc.stderr
        except subprocess.TimeoutExpired as exc:
            stderr = (exc.stderr or b"").decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
            record = json.loads(out_path.read_text()) if out_path.exists() else {"system": spec.get("name"), "results": []}
            record["error"] = f"timed out after {timeout}s (partial results kept)"
            return record
        record = json.loads(out_path.read_text()) if out_path.exists() else {"system": spec.get("name"), "results": []}
        if proc.returncode != 0 and "error" not in record:
            record["error"] = worker_failure(spec, proc.returncode, stderr)
        return record


#: What to do about a llama-cpp-python that crashes: builds tuned with
#: ``-march=native`` (GGML_NATIVE) have been seen to segfault on the first
#: ``eval`` on AVX-512/AMX Xeons, where a portable build runs.
LLAMACPP_PORTABLE_BUILD = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON '
    '-DGGML_AVX512_VNNI=ON" pip install --force-reinstall --no-cache-dir llama-cpp-python'
)


def worker_failure(spec: dict[str, Any], returncode: int, stderr: str) -> str:
    """One line saying how a worker ended: crashed by a signal, or exited with an error."""
    if returncode < 0:
        try:
            sig = signal.Signals(-returncode)
            what = f"{sig.name} ({signal.strsignal(sig) or 'signal'})"
        except ValueError:
            what = f"signal {-returncode}"
        message = f"crashed: killed by {what}; partial results kept"
        if spec.get("kind") == "llamacpp":
            message += f"; rebuild llama-cpp-python portably: {LLAMACPP_PORTABLE_BUILD}"
        return message
    tail = stderr.strip().splitlines()[-1][:300] if stderr.strip() else "no message"
    return f"worker exited {returncode}: {tail}"


def merge_rounds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One record per system: per context, the median over rounds of the
    decode and prefill speeds (each round's figure kept beside it) and the
    largest peak memory. A single round is returned as it is."""
    if len(records) == 1:
        return records[0]
    merged = dict(records[-1])
    merged["rounds"] = len(records)
    merged["wall_seconds"] = sum(r.get("wall_seconds", 0.0) for r in records)
    errors = [r["error"] for r in records if r.get("error")]
    if errors:
        merged["error"] = errors[0]
    by_context: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        for row in record.get("results", []):
            by_context.setdefault(row["context"], []).append(row)
    rows = []
    for context in sorted(by_context):
        got = by_context[context]
        row = dict(got[-1])
        decode = [r["decode_tokens_per_s"] for r in got]
        prefill = [r["prefill_seconds"] for r in got]
        row.update(
            decode_tokens_per_s=median(decode),
            decode_rounds_tokens_per_s=decode,
            prefill_seconds=median(prefill),
            prefill_tokens_per_s=context / median(prefill),
            peak_rss_bytes=max(r["peak_rss_bytes"] for r in got),
            rounds=len(got),
        )
        rows.append(row)
    merged["results"] = rows
    return merged


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Run everything ``opts`` asks for, write the outputs into ``opts.out``, return the results."""
    # One function on purpose: the systems run one after the other on a shared work plan, and each failure is recorded in place so the other rows are still written.
    threads = opts.resolved_threads()
    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "machine": machine_info(),
            "versions": library_versions(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
            "threads": threads,
        },
        "notes": [],
        "systems": [],
        "skipped": {},
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    note = gpu_note(opts.device, opts.backend)
    if note is not None:
        _log(note)
        results["notes"].append(note)
        results["skipped"] = {name: note for name in opts.systems}
        results["meta"]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_outputs(results, opts.out)
        return results

    own_tmp = None
    work = opts.work_dir
    if work is None:
        if opts.quick:
            own_tmp = tempfile.TemporaryDirectory(prefix="dijiang-bench-work-")
            work = Path(own_tmp.name)
        else:
            work = Path.home() / ".cache" / "dijiang-deploy" / "bench"
    try:
        prep = prepare(opts.systems, Path(work), opts.quick, opts.checkpoint)
        results["meta"]["model"] = prep.model
        results["meta"]["checkpoint"] = prep.checkpoint
        results["skipped"].update(prep.skipped)
        for name, why in prep.skipped.items():
            _log(f"{name}: {why}")

        _log(f"measuring memory bandwidth ({threads} threads)")
        results["meta"]["bandwidth"] = memory_bandwidth(threads, size_mib=256 if opts.quick else 1024)
        results["meta"]["load_average_start"] = list(os.getloadavg())

        run_settings = {
            "threads": threads,
            "contexts": sorted(opts.contexts),
            "repeats": opts.repeats,
            "decode_steps": opts.decode_steps,
            "warmup_steps": opts.warmup_steps,
            "prefill_repeats": opts.prefill_repeats,
            "vocab_size": prep.vocab_size,
            "seed": opts.seed,
        }
        names = [s for s in ALL_SYSTEMS if s in prep.specs]
        per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_index in range(opts.rounds):
            for name in names:
                label = name if opts.rounds == 1 else f"{name} (round {round_index + 1}/{opts.rounds})"
                _log(f"{label}: contexts {run_settings['contexts']}")
                t0 = time.time()
                record = run_worker(dict(prep.specs[name], **run_settings), opts.timeout)
                record["wall_seconds"] = time.time() - t0
                if record.get("error"):
                    _log(f"{name}: {record['error']}")
                for row in record.get("results", []):
                    _log(
                        f"{label} @ {row['context']}: decode {row['decode_tokens_per_s']:.1f} tok/s, "
                        f"prefill {row['prefill_tokens_per_s']:.1f} tok/s, peak {row['peak_rss_bytes'] / 2**20:.0f} MiB"
                    )
                per_round[name].append(record)
        results["systems"].extend(merge_rounds(records) for records in per_round.values())

        if opts.profile and "dijiang-ort-fp32" in prep.specs:
            _log("profiling the dijiang-ort-fp32 decode step")
            spec = {
                "kind": "profile",
                "name": "profile",
                "path": prep.specs["dijiang-ort-fp32"]["path"],
                "threads": threads,
                "context": min(opts.contexts),
                "decode_steps": 10 if opts.quick else 30,
            }
            results["profile"] = run_worker(spec, opts.timeout)
        results["meta"]["load_average_end"] = list(os.getloadavg())
    finally:
        if own_tmp is not None:
            own_tmp.cleanup()
    results["meta"]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results["meta"]["wall_seconds"] = time.time() - started
    write_outputs(results, opts.out)
    return results
