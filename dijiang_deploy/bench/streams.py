"""``dijiang-deploy bench --streams``: many concurrent streams, and a long prompt arriving among them.

For each system and number of streams N, in a fresh worker process:

* **DiJiang** (``dijiang-ort-fp32``, ``dijiang-ort-int4``): the context is
  prefilled once and its state forked to N sessions (a DiJiang state after C
  tokens is the same object however many streams hold it); N requests then
  decode through the :class:`~dijiang_deploy.runtime.Engine`, and each token's
  arrival time is recorded per stream.
* **KV cache** (``ort-kv-fp32``): the softmax model's KV-cache export, its
  cache filled once and tiled to a static batch of N, decoded in lockstep (a
  KV-cache runtime without paging serving N equal streams). Skipped where past
  and present caches would not fit in memory.

Reported per (system, N): aggregate decode tokens/s, per-stream inter-token
latency (p50, p90, max), peak resident memory; and per system the resident
memory each extra stream costs. A second scenario measures interference:
M streams decode while a ``context``-token prompt arrives; their largest
inter-token gap during its prefill against their median before it.

Ratios are computed from one run: ``results.json``, ``table.md``/``.txt`` in ``--out``.
With ``--rounds R`` every cell runs R times, round after round, and each
target is the median of its R per-round ratios (each listed beside it).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .measure import machine_info, library_versions, peak_rss_bytes, reset_peak_rss, rss_bytes
from .worker import prompt_ids

STREAM_SYSTEMS = ("dijiang-ort-fp32", "dijiang-ort-int4", "ort-kv-fp32")


@dataclass
class StreamsOptions:
    """Settings of ``bench --streams``."""

    out: Path
    streams: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    context: int = 4096
    systems: list[str] = field(default_factory=lambda: list(STREAM_SYSTEMS))
    decode_steps: int = 16
    warmup_steps: int = 4
    interference_streams: int = 4
    threads: int = 0
    quick: bool = False
    work_dir: Path | None = None
    checkpoint: Path | None = None
    timeout: int = 1800
    seed: int = 0
    #: Most memory a KV-cache worker may plan to hold (past + present caches).
    memory_limit_bytes: int = 0
    #: Measure every cell this many times, round after round; each target is
    #: the median of its per-round ratios (a VM's speed drifts by more than
    #: some targets' margins within minutes).
    rounds: int = 1


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# -- workers (one process per measurement) ----------------------------------------


def _dijiang_worker(spec: dict[str, Any]) -> dict[str, Any]:
    from ..runtime import Engine, Model, Request

    model = Model.open(spec["path"], threads=spec["threads"], load_tokenizer=False)
    vocab = model.vocab_size
    s = model.session()
    s.append(prompt_ids(spec["context"], vocab, spec["seed"]))
    state = s.snapshot()
    del s
    n, steps, warm = spec["streams"], spec["decode_steps"], spec["warmup_steps"]
    reset_peak_rss()
    rss_before = rss_bytes()
    if spec["mode"] == "interference":
        return _interference(model, state, spec, rss_before)
    with Engine(model, max_batch=n, prefill_rows=1, warmup=True) as engine:
        handles = [engine.submit(Request([], warm + steps, start=state)) for _ in range(n)]
        outs = [h.result(timeout=spec["timeout"]) for h in handles]
    times = [o.token_seconds for o in outs]
    if any(len(t) != warm + steps for t in times):
        raise RuntimeError(f"a stream ended early: {[o.finish_reason for o in outs]}")
    start = max(t[warm - 1] for t in times)  # every stream is past its warm-up
    end = max(t[-1] for t in times)
    counted = sum(sum(1 for x in t[warm:] if x > start) for t in times)
    gaps = [b - a for t in times for a, b in zip(t[warm - 1 : -1], t[warm:])]
    return {
        "aggregate_tokens_per_s": counted / (end - start),
        "itl_p50_ms": 1e3 * _percentile(gaps, 50),
        "itl_p90_ms": 1e3 * _percentile(gaps, 90),
        "itl_max_ms": 1e3 * max(gaps),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": rss_before,
        "state_bytes": model.manifest.state_bytes(),
        "engine_steps": engine.stats.steps,
    }


def _interference(model, state, spec: dict[str, Any], rss_before: int) -> dict[str, Any]:
    """M streams decode; a ``context``-token prompt arrives; their gaps before and during its prefill."""
    from ..runtime import Engine, Request

    m, vocab = spec["streams"], model.vocab_size
    long_prompt = prompt_ids(spec["context"], vocab, spec["seed"] + 7)
    budget = spec.get("step_tokens")
    steps: list[tuple[float, str, int]] = []  # (end time, kind, chunk length) of every graph run
    with Engine(model, max_batch=m + 1, prefill_rows=1, step_tokens=budget, warmup=True,
                on_step=lambda kind, _ids, length: steps.append((time.perf_counter(), kind, length))) as engine:
        handles = [engine.submit(Request([], 100000, start=state)) for _ in range(m)]
        first = iter(handles[0])
        for _ in range(spec["warmup_steps"] + spec["decode_steps"]):
            next(first)
        t_arrive = time.perf_counter()
        long = engine.submit(Request(long_prompt, 1))
        out_long = long.result(timeout=spec["timeout"])
        t_done = time.perf_counter()
        for _ in range(spec["decode_steps"]):  # a few steps after the prefill too
            next(first)
        for h in handles:
            h.cancel()
        outs = [h.result(timeout=spec["timeout"]) for h in handles]
    before, during = [], []
    for o in outs:  # token_seconds count from each request's submit time
        t0 = o.submitted_at
        absolute = [t0 + x for x in o.token_seconds]
        pairs = list(zip(absolute[:-1], absolute[1:]))
        before += [b - a for a, b in pairs if b <= t_arrive and a >= absolute[spec["warmup_steps"]]]
        during += [(b - a, a, b) for a, b in pairs if b > t_arrive and a < t_done]
    return {
        **step_breakdown(steps, during, before_end=t_arrive, after_start=t_done),
        "streams": m,
        "prefill_tokens": len(long_prompt),
        "prefill_seconds": t_done - t_arrive,
        "prefill_first_token_seconds": out_long.first_token_seconds,
        "itl_median_before_ms": 1e3 * _percentile(before, 50),
        "itl_max_during_ms": 1e3 * (max(g for g, _, _ in during) if during else float("nan")),
        "itl_median_during_ms": 1e3 * _percentile([g for g, _, _ in during], 50),
        "gaps_during": len(during),
        "step_tokens": budget if budget is not None else "adaptive",
    }


def step_breakdown(steps: list[tuple[float, str, int]], during: list[tuple[float, float, float]],
                   before_end: float, after_start: float) -> dict[str, Any]:
    """What the interference gaps are made of, from the engine's step log.

    ``steps``: ``(end time, kind, chunk length)`` per graph run, in order; a
    step's duration is the time since the previous one ended (the engine's
    bookkeeping between runs included). ``during``: ``(gap, start, end)`` of
    the decoding streams' gaps that overlap the prefill. Returns the steps
    inside the worst gap, decode-step durations before and during the
    prefill, and how many prefill steps of which chunk lengths it took.
    """
    timed = [(t1, t1 - t0, kind, n) for (t0, _, _), (t1, kind, n) in itertools.pairwise(steps)]
    decode_before = [d for t, d, kind, _ in timed if kind == "decode" and t <= before_end]
    decode_during = [d for t, d, kind, _ in timed if kind == "decode" and before_end < t <= after_start]
    lengths: dict[str, int] = {}
    for t, _, kind, n in timed:
        if kind == "prefill" and before_end < t <= after_start:
            lengths[str(n)] = lengths.get(str(n), 0) + 1
    out: dict[str, Any] = {"prefill_steps": sum(lengths.values()), "prefill_chunk_lengths": lengths}
    if decode_before:
        out["decode_step_median_before_ms"] = 1e3 * _percentile(decode_before, 50)
    if decode_during:
        out["decode_step_median_during_ms"] = 1e3 * _percentile(decode_during, 50)
        out["decode_step_max_during_ms"] = 1e3 * max(decode_during)
    if during:
        _, a, b = max(during)
        out["worst_gap_steps"] = [{"kind": kind, "length": n, "ms": 1e3 * d} for t, d, kind, n in timed if a < t <= b]
    return out


def _kv_worker(spec: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    from .kv_export import KV_META, KV_MODEL

    folder = Path(spec["path"])
    meta = json.loads((folder / KV_META).read_text())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = spec["threads"]
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / KV_MODEL), so, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    n, ctx = spec["streams"], spec["context"]
    layers = meta["num_layers"]
    empty = np.zeros((1, meta["kv_heads"], 0, meta["head_dim"]), np.float32)
    feeds = {"input_ids": np.asarray([prompt_ids(ctx, meta["vocab_size"], spec["seed"])], np.int64),
             "position_ids": np.arange(ctx, dtype=np.int64)[None]}
    feeds.update({name: empty for name in meta["inputs"][2:]})
    outs = sess.run(outputs, feeds)
    token = np.full((n, 1), int(np.argmax(outs[0][0, -1])), np.int64)
    past = [ort.OrtValue.ortvalue_from_numpy(np.repeat(x, n, axis=0)) for x in outs[1:]]
    del outs
    reset_peak_rss()
    rss_before = rss_bytes()
    gaps, length = [], ctx
    t_prev = time.perf_counter()
    t_start = None
    for step in range(spec["warmup_steps"] + spec["decode_steps"]):
        feeds = {"input_ids": ort.OrtValue.ortvalue_from_numpy(token),
                 "position_ids": ort.OrtValue.ortvalue_from_numpy(np.full((n, 1), length, np.int64))}
        feeds.update(zip(meta["inputs"][2:], past))
        res = sess.run_with_ort_values(outputs, feeds)
        past = list(res[1:])
        token = np.argmax(res[0].numpy()[:, -1], axis=-1).astype(np.int64)[:, None]
        length += 1
        now = time.perf_counter()
        if step == spec["warmup_steps"] - 1:
            t_start = now
        elif step >= spec["warmup_steps"]:
            gaps.append(now - t_prev)
        t_prev = now
    total = time.perf_counter() - t_start
    return {
        "aggregate_tokens_per_s": n * spec["decode_steps"] / total,
        "itl_p50_ms": 1e3 * _percentile(gaps, 50),
        "itl_p90_ms": 1e3 * _percentile(gaps, 90),
        "itl_max_ms": 1e3 * max(gaps),
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_before_bytes": rss_before,
        "state_bytes": 2 * layers * meta["kv_heads"] * meta["head_dim"] * length * 4,
    }


def kv_cache_bytes(meta: dict[str, Any], streams: int, tokens: int) -> int:
    """Bytes of past plus present K and V caches for ``streams`` rows of ``tokens``."""
    return 2 * 2 * meta["num_layers"] * meta["kv_heads"] * meta["head_dim"] * tokens * streams * 4


def worker_main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        result = _kv_worker(spec) if spec["kind"] == "ort-kv" else _dijiang_worker(spec)
    except Exception as exc:  # reported in the table, the other rows still run
        result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}
    Path(out_path).write_text(json.dumps(result))


# -- orchestration ---------------------------------------------------------------------


def _run(spec: dict[str, Any], timeout: int) -> dict[str, Any]:
    from .runner import worker_failure

    with tempfile.TemporaryDirectory(prefix="dijiang-streams-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "dijiang_deploy.bench.streams", str(spec_path), str(out_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout}s"}
        if out_path.exists():
            return json.loads(out_path.read_text())
        return {"error": worker_failure(spec, proc.returncode, proc.stderr)}


def _log(message: str) -> None:
    print(f"[bench --streams] {message}", file=sys.stderr, flush=True)


def _measure_round(opts: StreamsOptions, prep, common: dict[str, Any], mem_limit: int, label: str) -> dict[str, Any]:
    """Every (system, streams) cell and every interference scenario once."""
    out: dict[str, Any] = {"rows": [], "interference": []}
    for name in [s for s in STREAM_SYSTEMS if s in prep.specs]:
        spec0 = prep.specs[name]
        for n in sorted(opts.streams):
            spec = dict(spec0, **common, streams=n, mode="decode")
            if spec0["kind"] == "ort-kv":
                meta = json.loads((Path(spec0["path"]) / "kv_meta.json").read_text())
                need = kv_cache_bytes(meta, n, opts.context + opts.warmup_steps + opts.decode_steps)
                if need > mem_limit:
                    out["rows"].append({"system": name, "streams": n, "skipped": (
                        f"past + present KV caches of {n} x {opts.context} tokens need {need / 2**30:.1f} GiB, "
                        f"over this machine's {mem_limit / 2**30:.1f} GiB budget")})
                    _log(f"{name} x{n}: skipped ({out['rows'][-1]['skipped']})")
                    continue
            _log(f"{name}: {n} streams at {opts.context} tokens of context{label}")
            row = {"system": name, "streams": n, **_run(spec, opts.timeout)}
            out["rows"].append(row)
            if "error" in row:
                _log(f"{name} x{n}: {row['error']}")
            else:
                _log(f"{name} x{n}: {row['aggregate_tokens_per_s']:.1f} tok/s aggregate, ITL p50 {row['itl_p50_ms']:.1f} ms")
        if spec0["kind"] == "dijiang-ort":
            spec = dict(spec0, **common, streams=opts.interference_streams, mode="interference")
            _log(f"{name}: a {opts.context}-token prompt arriving among {opts.interference_streams} streams{label}")
            out["interference"].append({"system": name, **_run(spec, opts.timeout)})
    out["checks"] = stream_checks(out)
    return out


def merge_stream_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One table from several rounds of ``rows``/``interference``/``checks``.

    Each target is the median of its per-round values (ratios measured side
    by side within a round), listed beside it. Each table cell shows the
    round whose aggregate (rows) or worst-gap ratio (interference) is the
    median, with the largest peak memory of any round. One round is
    returned as it is.
    """
    if len(rounds) == 1:
        return rounds[0]

    def middle(items: list[dict[str, Any]], key) -> dict[str, Any]:
        ranked = sorted(items, key=key)
        return dict(ranked[(len(ranked) - 1) // 2])

    def grouped(part: str, key) -> list[list[dict[str, Any]]]:
        groups: dict[Any, list[dict[str, Any]]] = {}
        for rnd in rounds:
            for item in rnd[part]:
                groups.setdefault(key(item), []).append(item)
        return list(groups.values())

    merged_rows = []
    for got in grouped("rows", lambda r: (r["system"], r["streams"])):
        ok = [r for r in got if "aggregate_tokens_per_s" in r]
        if not ok:
            merged_rows.append(got[0])
            continue
        row = middle(ok, lambda r: r["aggregate_tokens_per_s"])
        row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
        row["rounds_aggregate_tokens_per_s"] = [r["aggregate_tokens_per_s"] for r in ok]
        merged_rows.append(row)
    merged_inter = []
    for got in grouped("interference", lambda r: r["system"]):
        ok = [r for r in got if "itl_max_during_ms" in r and r["itl_median_before_ms"] > 0]
        if not ok:
            merged_inter.append(got[0])
            continue
        row = middle(ok, lambda r: r["itl_max_during_ms"] / r["itl_median_before_ms"])
        row["rounds_worst_gap_ratio"] = [r["itl_max_during_ms"] / r["itl_median_before_ms"] for r in ok]
        merged_inter.append(row)
    merged_checks = []
    for got in grouped("checks", lambda c: c["check"]):
        values = [c["value"] for c in got]
        c = dict(got[0], value=float(np.median(values)), rounds=values)
        if c["passed"] is not None:
            c["passed"] = _target_met(c["target"], c["value"])
        merged_checks.append(c)
    return {"rows": merged_rows, "interference": merged_inter, "checks": merged_checks}


def _target_met(target: str, value: float) -> bool:
    op, bound = target.split()
    return value >= float(bound) if op == ">=" else value <= float(bound)


def run_streams(opts: StreamsOptions) -> dict[str, Any]:
    """Measure, write ``results.json``/``table.md``/``table.txt`` into ``opts.out``, return the results."""
    from .artifacts import prepare
    from .report import _markdown_to_text

    threads = opts.threads or os.cpu_count() or 1
    work = opts.work_dir or (Path(tempfile.mkdtemp(prefix="dijiang-streams-work-")) if opts.quick
                             else Path.home() / ".cache" / "dijiang-deploy" / "bench")
    prep = prepare(list(opts.systems), Path(work), opts.quick, opts.checkpoint)
    mem_limit = opts.memory_limit_bytes or int(0.7 * os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    results: dict[str, Any] = {
        "meta": {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(),
                 "versions": library_versions(), "model": prep.model, "threads": threads,
                 "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}},
        "rows": [], "interference": [], "skipped": dict(prep.skipped),
    }
    common = {"threads": threads, "context": opts.context, "decode_steps": opts.decode_steps,
              "warmup_steps": opts.warmup_steps, "seed": opts.seed, "timeout": opts.timeout}
    per_round = []
    for r in range(opts.rounds):
        label = "" if opts.rounds == 1 else f" (round {r + 1}/{opts.rounds})"
        per_round.append(_measure_round(opts, prep, common, mem_limit, label))
    results.update(merge_stream_rounds(per_round))
    results["meta"]["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = render(results)
    (opts.out / "table.md").write_text(md)
    (opts.out / "table.txt").write_text(_markdown_to_text(md))
    return results


def memory_per_stream(rows: list[dict[str, Any]]) -> float | None:
    """Slope of peak resident memory against streams (least squares over the measured N)."""
    ok = [(r["streams"], r["peak_rss_bytes"]) for r in rows if "peak_rss_bytes" in r]
    if len(ok) < 2:
        return None
    x, y = np.array([a for a, _ in ok], float), np.array([b for _, b in ok], float)
    return float(np.polyfit(x, y, 1)[0])


def stream_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, as ratios of this run's figures."""
    checks = []
    by = {}
    for r in results["rows"]:
        if "aggregate_tokens_per_s" in r:
            by.setdefault(r["system"], {})[r["streams"]] = r
    for name, per in by.items():
        if 1 in per and 16 in per:
            ratio = per[16]["aggregate_tokens_per_s"] / per[1]["aggregate_tokens_per_s"]
            target = name == "dijiang-ort-int4"
            checks.append({"check": f"{name}: aggregate decode at 16 streams / 1 stream", "value": ratio,
                           "target": ">= 5" if target else "(report)", "passed": ratio >= 5 if target else None})
        slope = memory_per_stream(list(per.values()))
        if slope is not None and name.startswith("dijiang"):
            state = next(iter(per.values()))["state_bytes"]
            checks.append({"check": f"{name}: resident memory per extra stream / state size", "value": slope / state,
                           "target": "<= 2", "passed": slope / state <= 2})
    for r in results.get("interference", []):
        if "itl_max_during_ms" in r and r["itl_median_before_ms"] > 0:
            ratio = r["itl_max_during_ms"] / r["itl_median_before_ms"]
            checks.append({"check": f"{r['system']}: worst gap while a {r['prefill_tokens']}-token prompt is prefilled "
                                    f"/ median gap ({r['streams']} streams)", "value": ratio, "target": "<= 3",
                           "passed": ratio <= 3})
    return checks


def _gap_line(r: dict[str, Any]) -> str:
    """One line saying what the worst gap of an interference row consists of."""
    if "worst_gap_steps" not in r:
        return ""
    parts = " + ".join((s["kind"] if s["kind"] == "decode" else f"prefill of {s['length']}") + f" {s['ms']:.1f} ms"
                       for s in r["worst_gap_steps"])
    lengths = ", ".join(f"{n} steps of {k}" for k, n in sorted(r["prefill_chunk_lengths"].items(), key=lambda x: int(x[0])))
    dec = ""
    if "decode_step_median_during_ms" in r:
        dec = (f"; decode steps: median {r.get('decode_step_median_before_ms', float('nan')):.1f} ms before, "
               f"{r['decode_step_median_during_ms']:.1f} during (max {r['decode_step_max_during_ms']:.1f})")
    return (f"{r['system']}: worst gap {r['itl_max_during_ms']:.1f} ms = {parts}{dec}; "
            f"{r['prefill_steps']} prefill steps ({lengths})")


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta.get("machine", {})
    opts = meta["options"]
    lines = [
        f"Model: {meta['model']}; threads: {meta['threads']}; CPU: {m.get('model_name', '?')} ({m.get('cpus', '?')} CPUs, "
        f"{' '.join(m.get('simd', []))}); context {opts['context']} tokens; {opts['decode_steps']} timed decode steps "
        f"after {opts['warmup_steps']} warm-up steps.",
        "",
        "| system | streams | aggregate decode tok/s | ITL p50 ms | ITL p90 ms | ITL max ms | peak RSS MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        if "aggregate_tokens_per_s" in r:
            lines.append(f"| {r['system']} | {r['streams']} | {r['aggregate_tokens_per_s']:.1f} | {r['itl_p50_ms']:.1f} | "
                         f"{r['itl_p90_ms']:.1f} | {r['itl_max_ms']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
        else:
            lines.append(f"| {r['system']} | {r['streams']} | {r.get('skipped') or r.get('error')} | | | | |")
    if results.get("interference"):
        lines += ["", "| system | decoding streams | prompt tokens | prefill s | median gap before ms | median gap during ms "
                  "| worst gap during ms | budget |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in results["interference"]:
            if "error" in r:
                lines.append(f"| {r['system']} | {r.get('error')} | | | | | | |")
                continue
            lines.append(f"| {r['system']} | {r['streams']} | {r['prefill_tokens']} | {r['prefill_seconds']:.1f} | "
                         f"{r['itl_median_before_ms']:.1f} | {r['itl_median_during_ms']:.1f} | {r['itl_max_during_ms']:.1f} | "
                         f"{r['step_tokens']} |")
        lines += [""] + [f"- {line}" for line in (_gap_line(r) for r in results["interference"]) if line]
    if results["checks"]:
        rounds = any("rounds" in c for c in results["checks"])
        head = "| target | measured | wanted | met |" + (" per round |" if rounds else "")
        lines += ["", head, "| --- | ---: | --- | --- |" + (" --- |" if rounds else "")]
        for c in results["checks"]:
            met = "-" if c["passed"] is None else ("yes" if c["passed"] else "NO")
            each = (" " + ", ".join(f"{v:.2f}" for v in c.get("rounds", [])) + " |") if rounds else ""
            lines.append(f"| {c['check']} | {c['value']:.2f} | {c['target']} | {met} |{each}")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"\n- {name}: {why}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
