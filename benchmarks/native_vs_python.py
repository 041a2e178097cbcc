"""dijiang-run (libdijiang, C) against the Python runtime on the same exports.

    python benchmarks/native_vs_python.py --native BUILD/main EXPORT [EXPORT ...]
        [--new-tokens 64] [--repeats 3] [--prompt TEXT]

For each export folder both runtimes generate the same greedy tokens from the
same prompt, each in a fresh process, ``--repeats`` times (the median is
reported):

* decode tokens/s: one-token steps per second of the generation loop, as each
  runtime reports it (``decode_steps / decode_seconds``: the graph run plus
  sampling and detokenization, the same definition on both sides);
* time to first token: from launching the process to its first byte of
  generated text on stdout, read by this script (interpreter start, imports,
  opening the model, prefill and the first sample included).

The ratio is native / Python decode speed (above 1: the native loop is faster).
The load average before and after is printed: on a shared 2-core machine,
other work skews both columns.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PY_CHILD = r"""
import json, sys
from dijiang_deploy.runtime import Model
folder, prompt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = Model.open(folder)
s = model.session()
s.append(prompt)
stream = s.generate(n, stream=True, feed_last=False)
ids = []
for ev in stream:
    if ev.token_id is not None:
        ids.append(ev.token_id)
    sys.stdout.write(ev.text)
    sys.stdout.flush()
st = stream.output.stats
print(json.dumps({"decode_tps": st.decode_tokens_per_s, "steps": st.decode_steps, "ids": ids}), file=sys.stderr)
"""


def first_byte_run(cmd: list[str]) -> tuple[float, str, str]:
    """Run ``cmd``; seconds from launch to its first stdout byte, its stdout and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    first = proc.stdout.read(1)
    ttft = time.perf_counter() - t0 if first else float("nan")
    rest, err = proc.communicate(timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed:\n{err.decode(errors='replace')[-2000:]}")
    return ttft, (first + rest).decode(errors="replace"), err.decode(errors="replace")


def run_python(folder: Path, prompt: str, n: int) -> dict:
    ttft, out, err = first_byte_run([sys.executable, "-c", PY_CHILD, str(folder), prompt, str(n)])
    stats = json.loads(err.strip().splitlines()[-1])
    return {"ttft": ttft, "decode_tps": stats["decode_tps"], "steps": stats["steps"], "text": out}


def run_native(native: Path, folder: Path, prompt: str, n: int) -> dict:
    ttft, out, err = first_byte_run([str(native / "dijiang-run"), str(folder), "--prompt", prompt,
                                     "--max-new-tokens", str(n)])
    m = re.search(r"decode steps (\d+) in ([0-9.]+) s", err)
    steps, seconds = int(m.group(1)), float(m.group(2))
    return {"ttft": ttft, "decode_tps": steps / seconds if seconds else 0.0, "steps": steps, "text": out}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("exports", nargs="+", type=Path, help="export folders (e.g. an fp32 and an int4 SmolLM2 export)")
    p.add_argument("--native", type=Path, required=True, help="the build's main/ folder (holds dijiang-run)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"DIJIANG_THREADS={os.environ.get('DIJIANG_THREADS', 'unset')}")
    rows = []
    for folder in args.exports:
        weights = json.loads((folder / "manifest.json").read_text())["weights"]
        py_runs, c_runs = [], []
        for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
            py_runs.append(run_python(folder, args.prompt, args.new_tokens))
            c_runs.append(run_native(args.native, folder, args.prompt, args.new_tokens))
        same = all(r["text"] == py_runs[0]["text"] for r in py_runs + c_runs)
        med = lambda runs, k: statistics.median(r[k] for r in runs)  # noqa: E731
        rows.append((folder.name, weights, med(py_runs, "decode_tps"), med(c_runs, "decode_tps"),
                     med(py_runs, "ttft"), med(c_runs, "ttft"), same))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(f"{args.new_tokens} new tokens, greedy, median of {args.repeats} runs per side")
    print()
    print("| export | weights | Python decode tok/s | native decode tok/s | ratio | Python first token s | "
          "native first token s | same text |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, weights, py_tps, c_tps, py_t, c_t, same in rows:
        print(f"| {name} | {weights} | {py_tps:.2f} | {c_tps:.2f} | {c_tps / py_tps:.2f} | {py_t:.2f} | {c_t:.2f} | "
              f"{'yes' if same else 'NO'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
