"""One system, all context lengths, in its own process.

``python -m dijiang_deploy.bench.worker SPEC.json OUT.json``. Running each
system in a fresh process keeps peak-memory figures from mixing; the peak is
reset before every context length (contexts run in ascending order), so the
figure for a context is the process's peak resident memory while it prefilled
that prompt and decoded after it, model weights included.

OUT.json is rewritten after every context, so a worker that is stopped part
way still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from .measure import median, peak_rss_bytes, reset_peak_rss, rss_bytes


def prompt_ids(length: int, vocab_size: int, seed: int, low: int = 3) -> list[int]:
    """Deterministic random token ids in ``[low, vocab_size)``, the same for every system."""
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(low, vocab_size, size=length)]


def measure_system(spec: dict[str, Any], out_path: Path) -> dict[str, Any]:
    """Run the protocol of :mod:`dijiang_deploy.bench` for one system; returns the record."""
    from .systems import make_system

    record: dict[str, Any] = {"system": spec["name"], "kind": spec["kind"], "spec": spec, "results": []}

    def save() -> None:
        out_path.write_text(json.dumps(record, indent=2) + "\n")

    system = make_system(spec)
    start = time.perf_counter()
    system.load()
    record["load_seconds"] = time.perf_counter() - start
    record["rss_after_load_bytes"] = rss_bytes()
    steps, repeats, warmup = int(spec["decode_steps"]), int(spec["repeats"]), int(spec["warmup_steps"])
    decode_total = warmup + steps * repeats
    vocab, seed = int(spec["vocab_size"]), int(spec["seed"])
    # Warm-up on a short prompt: first-run allocations and kernel selection.
    warm_len = min(32, min(spec["contexts"]))
    system.prepare(warm_len, decode_total)
    system.prefill(prompt_ids(warm_len, vocab, seed + 1))
    system.decode(max(warmup, 2))
    record["info"] = system.info
    save()
    for context in spec["contexts"]:
        ids = prompt_ids(context, vocab, seed)
        system.prepare(context, decode_total)
        peak_reset = reset_peak_rss()
        prefill_s = []
        for _ in range(int(spec["prefill_repeats"])):
            t0 = time.perf_counter()
            system.prefill(ids)
            prefill_s.append(time.perf_counter() - t0)
        system.decode(warmup)
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            system.decode(steps)
            runs.append(steps / (time.perf_counter() - t0))
        record["results"].append(
            {
                "context": context,
                "prefill_seconds": median(prefill_s),
                "prefill_tokens_per_s": context / median(prefill_s),
                "decode_tokens_per_s": median(runs),
                "decode_runs_tokens_per_s": runs,
                "decode_steps_per_run": steps,
                "context_after_decode": context + decode_total,
                "state_bytes": system.state_bytes(),
                "peak_rss_bytes": peak_rss_bytes(),
                "peak_reset": peak_reset,
                "rss_bytes": rss_bytes(),
                "load_average": list(os.getloadavg()),
            }
        )
        save()
    system.close()
    record["done"] = True
    save()
    return record


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``SPEC.json OUT.json``; profile specs go to :mod:`.profile`."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text())
    out = Path(args[1])
    try:
        if spec.get("kind") == "profile":
            from .profile import profile_decode

            result = profile_decode(spec["path"], int(spec["threads"]), int(spec["context"]), int(spec["decode_steps"]))
            out.write_text(json.dumps(result, indent=2) + "\n")
        else:
            measure_system(spec, out)
    except Exception as exc:  # report any failure to the parent as data
        previous = json.loads(out.read_text()) if out.exists() else {"system": spec.get("name"), "results": []}
        previous["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        previous["traceback"] = traceback.format_exc()[-3000:]
        out.write_text(json.dumps(previous, indent=2) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
