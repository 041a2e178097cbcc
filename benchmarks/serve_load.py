"""Load test of ``dijiang-deploy serve``: the figures of vLLM's serving benchmark, and multi-turn reuse.

Starts the server itself (twice: with the state cache, and with
``--state-cache-mib 0``), drives it with the official ``openai`` client over
streaming requests, and prints one table with the targets as ratios:

* load at concurrency 1, 4 and 16: time to first token (TTFT), time per
  output token (TPOT), inter-token latency (ITL) and end-to-end latency (E2EL),
  p50/p90/p99; request and output-token throughput;
* multi-turn: the time to the first token of turn 2 after a history of H
  tokens (512 .. 8192), with the cache (turn 1 left its state) and without.

    python benchmarks/serve_load.py EXPORT_DIR [--out DIR] [--concurrency 1,4,16] [--history 512,1024,2048,4096,8192]

Writes ``results.json``, ``table.md`` and ``plot.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _server import ServerProcess  # noqa: E402  (the tests' launcher: a real server process)

WORDS = ("river stone lamp orchard signal copper winter harbor pencil meadow lantern rocket violet canyon "
         "engine saddle marble thunder cotton island mirror falcon garden velvet anchor").split()


def filler(n_words: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"), "mean": float("nan")}
    a = np.asarray(values) * 1e3
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
            "mean": float(a.mean())}


def stream_request(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    t0 = time.perf_counter()
    times, text, usage = [], [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter() - t0)
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter() - t0
    tokens = usage.completion_tokens if usage else len(times)
    return {"ttft": times[0] if times else end, "e2el": end, "itl": [b - a for a, b in zip(times[:-1], times[1:])],
            "tpot": (end - times[0]) / (tokens - 1) if times and tokens > 1 else None, "tokens": tokens,
            "text": "".join(text), "cached": usage.prompt_tokens_details.cached_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None}


def load(client, model: str, concurrency: int, requests: int, prompt_words: int, max_tokens: int, seed: int) -> dict:
    jobs = list(range(requests))
    lock = threading.Lock()
    results = []

    def worker() -> None:
        while True:
            with lock:
                if not jobs:
                    return
                i = jobs.pop()
            msgs = [{"role": "user", "content": f"{i}: " + filler(prompt_words, seed + i)}]
            r = stream_request(client, model, msgs, max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "request_throughput": len(results) / wall, "output_token_throughput": tokens / wall,
            "ttft_ms": percentiles([r["ttft"] for r in results]),
            "tpot_ms": percentiles([r["tpot"] for r in results if r["tpot"] is not None]),
            "itl_ms": percentiles([g for r in results for g in r["itl"]]),
            "e2el_ms": percentiles([r["e2el"] for r in results])}


def history_messages(client, model: str, tokens: int, tokenize_url: str) -> list[dict]:
    """A first user turn whose chat rendering is about ``tokens`` tokens."""
    import httpx

    words = max(8, tokens // 2)
    for _ in range(6):
        msgs = [{"role": "user", "content": filler(words, tokens)}]
        n = httpx.post(tokenize_url, json={"messages": msgs}).json()["count"]
        if abs(n - tokens) <= max(8, tokens // 100):
            return msgs
        words = max(8, int(words * tokens / n))
    return msgs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--out", default="benchmarks/results/serve")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=0, help="requests per concurrency (default 2 x concurrency, >= 6)")
    parser.add_argument("--prompt-words", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--history", default="512,1024,2048,4096,8192")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="passed on to dijiang-deploy serve (repeat; e.g. --serve-arg=--step-tokens=256)")
    args = parser.parse_args()
    import openai

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = ["--max-batch", "16", "--max-queue", "256"] + (["--threads", str(args.threads)] if args.threads else [])
    extra += args.serve_arg
    results: dict = {"export": str(args.export_dir), "command": " ".join(sys.argv), "load": [], "turns": []}
    from dijiang_deploy.bench.measure import machine_info

    results["machine"] = machine_info()
    with ServerProcess(Path(args.export_dir), *extra, "--state-cache-mib", "4096") as cached:
        client = openai.OpenAI(base_url=f"{cached.url}/v1", api_key="x", max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        results["model"] = model
        stream_request(client, model, [{"role": "user", "content": "warm up"}], 4)
        for c in (int(x) for x in args.concurrency.split(",")):
            n = args.requests or max(6, 2 * c)
            print(f"[serve_load] concurrency {c}: {n} requests", file=sys.stderr, flush=True)
            results["load"].append(load(client, model, c, n, args.prompt_words, args.max_tokens, args.seed + 1000 * c))
        histories = [int(x) for x in args.history.split(",")]
        conversations = {}
        for h in histories:
            first = history_messages(client, model, h, f"{cached.url}/tokenize")
            r1 = stream_request(client, model, first, 16)
            convo = first + [{"role": "assistant", "content": r1["text"]}, {"role": "user", "content": "Go on."}]
            conversations[h] = convo
            r2 = stream_request(client, model, convo, 16)
            results["turns"].append({"history": r2["prompt_tokens"], "target": h, "cached_tokens": r2["cached"],
                                     "ttft_cached_ms": 1e3 * r2["ttft"]})
            print(f"[serve_load] turn 2 after {r2['prompt_tokens']} tokens: TTFT {1e3 * r2['ttft']:.0f} ms "
                  f"({r2['cached']} cached)", file=sys.stderr, flush=True)
    with ServerProcess(Path(args.export_dir), *extra, "--state-cache-mib", "0") as plain:
        client = openai.OpenAI(base_url=f"{plain.url}/v1", api_key="x", max_retries=0, timeout=3600)
        stream_request(client, model, [{"role": "user", "content": "warm up"}], 4)
        for row in results["turns"]:
            r2 = stream_request(client, model, conversations[row["target"]], 16)
            row["ttft_uncached_ms"] = 1e3 * r2["ttft"]
            print(f"[serve_load] no cache, after {row['history']} tokens: TTFT {row['ttft_uncached_ms']:.0f} ms",
                  file=sys.stderr, flush=True)
    results["checks"] = checks(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(render(results))
    plot(results, out / "plot.png")
    print(render(results))
    return 0


def checks(results: dict) -> list[dict]:
    out = []
    turns = {r["target"]: r for r in results["turns"]}
    if 512 in turns and 8192 in turns:
        v = turns[8192]["ttft_cached_ms"] / turns[512]["ttft_cached_ms"]
        out.append({"check": "turn-2 TTFT with the cache: history 8192 / 512", "value": v, "target": "<= 1.2", "passed": v <= 1.2})
    if 4096 in turns:
        v = turns[4096]["ttft_uncached_ms"] / turns[4096]["ttft_cached_ms"]
        out.append({"check": "turn-2 TTFT at 4096: without the cache / with", "value": v, "target": ">= 10", "passed": v >= 10})
    load = {r["concurrency"]: r for r in results["load"]}
    if 1 in load and 16 in load:
        v = load[16]["output_token_throughput"] / load[1]["output_token_throughput"]
        out.append({"check": "output token throughput: concurrency 16 / 1", "value": v, "target": ">= 5", "passed": v >= 5})
    return out


def render(results: dict) -> str:
    m = results.get("machine", {})
    lines = [f"Export: {results['export']} (model {results.get('model')}); CPU: {m.get('model_name', '?')}, "
             f"{m.get('cpus', '?')} CPUs; command: `{results['command']}`", "",
             "| concurrency | requests | req/s | output tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
             "ITL p50/p90/p99 ms | E2EL p50/p90/p99 ms |", "| ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]

    def trio(p: dict) -> str:
        return f"{p['p50']:.0f} / {p['p90']:.0f} / {p['p99']:.0f}"

    for r in results["load"]:
        lines.append(f"| {r['concurrency']} | {r['requests']} | {r['request_throughput']:.2f} | {r['output_token_throughput']:.1f} | "
                     f"{trio(r['ttft_ms'])} | {trio(r['tpot_ms'])} | {trio(r['itl_ms'])} | {trio(r['e2el_ms'])} |")
    lines += ["", "| history tokens | cached tokens | turn-2 TTFT with cache ms | without cache ms | speed-up |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for r in results["turns"]:
        speed = r.get("ttft_uncached_ms", float("nan")) / r["ttft_cached_ms"]
        lines.append(f"| {r['history']} | {r['cached_tokens']} | {r['ttft_cached_ms']:.0f} | {r.get('ttft_uncached_ms', float('nan')):.0f} | {speed:.1f}x |")
    lines += ["", "| target | measured | wanted | met |", "| --- | ---: | --- | --- |"]
    for c in results["checks"]:
        lines.append(f"| {c['check']} | {c['value']:.2f} | {c['target']} | {'yes' if c['passed'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    turns = results["turns"]
    h = [r["history"] for r in turns]
    a.plot(h, [r["ttft_cached_ms"] for r in turns], marker="o", label="with the state cache")
    a.plot(h, [r.get("ttft_uncached_ms") for r in turns], marker="o", linestyle="--", label="without (re-prefill)")
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("conversation history (tokens)")
    a.set_ylabel("turn-2 time to first token (ms)")
    a.grid(True, alpha=0.3)
    a.legend()
    load = results["load"]
    b.plot([r["concurrency"] for r in load], [r["output_token_throughput"] for r in load], marker="o")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent requests")
    b.set_ylabel("output tokens/s (aggregate)")
    b.grid(True, alpha=0.3)
    fig.suptitle(f"dijiang-deploy serve, {results.get('model')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
