"""Ray Serve scale-out on one machine: throughput at 1 and 2 engine replicas, and failover time.

Starts ``dijiang-deploy serve EXPORT --ray`` itself (a local Ray instance in
its own session folder, stopped afterwards), drives it with concurrent chat
requests (each its own ``x-session-id``, so they spread over the replicas),
then kills the replica holding a conversation and times the next answer,
which another replica resumes from the shared ``--state-dir``.

    python benchmarks/ray_load.py EXPORT_DIR [--out DIR] [--concurrency 8] [--max-tokens 32]

Writes ``results.json`` and ``table.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _ray_server import RayServer  # noqa: E402  (the tests' launcher: a real serve --ray process)

from dijiang_deploy.bench.measure import machine_info  # noqa: E402


def chat(url: str, model: str, messages: list[dict], max_tokens: int, session: str) -> httpx.Response:
    r = httpx.post(f"{url}/v1/chat/completions", headers={"x-session-id": session}, timeout=600,
                   json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return r


def throughput(url: str, model: str, concurrency: int, max_tokens: int, rounds: int = 2) -> dict:
    tokens, replicas, errors = [], [], []

    def run(i: int) -> None:
        try:
            r = chat(url, model, [{"role": "user", "content": f"Write a short note about topic {i}."}], max_tokens, f"s{i}")
            tokens.append(r.json()["usage"]["completion_tokens"])
            replicas.append(r.headers.get("x-dijiang-replica"))
        except Exception as exc:  # reported in the table, the run goes on
            errors.append(repr(exc))

    chat(url, model, [{"role": "user", "content": "warm up"}], 4, "warm")
    t0 = time.perf_counter()
    for r in range(rounds):
        threads = [threading.Thread(target=run, args=(r * concurrency + i,)) for i in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    return {"requests": len(tokens), "tokens": sum(tokens), "seconds": wall, "tok_s": sum(tokens) / wall,
            "replicas_used": len(set(replicas)), "errors": errors}


def failover(srv: RayServer, model: str, max_tokens: int) -> dict:
    import ray

    history = [{"role": "user", "content": "Hello, who are you?"}]
    r = chat(srv.url, model, history, max_tokens, "fail")
    owner = r.headers["x-dijiang-replica"]
    history += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                {"role": "user", "content": "Tell me more."}]
    srv.connect()
    try:
        actor = ray.get_actor(f"SERVE_REPLICA::dijiang#engine#{owner}", namespace="serve")
        t0 = time.perf_counter()
        ray.kill(actor, no_restart=True)
        r = chat(srv.url, model, history, max_tokens, "fail")
        seconds = time.perf_counter() - t0
    finally:
        ray.shutdown()
    usage = r.json()["usage"]
    return {"seconds_kill_to_answer": seconds, "other_replica": r.headers["x-dijiang-replica"] != owner,
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"], "prompt_tokens": usage["prompt_tokens"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ray"))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    model = args.export_dir.name
    results: dict = {"export": str(args.export_dir), "machine": machine_info(),
                     "command": " ".join(["python", *sys.argv]), "runs": {}}
    for replicas in (1, 2):
        shared = Path(tempfile.mkdtemp(prefix="djray-states-"))
        srv = RayServer(args.export_dir, "--replicas", str(replicas), "--replica-cpus", str(2 / replicas / 1.25),
                        "--state-dir", str(shared), "--threads", str(max(1, 2 // replicas)))
        srv.start()
        try:
            results["runs"][replicas] = throughput(srv.url, model, args.concurrency, args.max_tokens)
            if replicas == 2:
                results["failover"] = failover(srv, model, args.max_tokens)
        finally:
            srv.stop()
            shutil.rmtree(srv.temp, ignore_errors=True)
            shutil.rmtree(shared, ignore_errors=True)
    one, two = results["runs"][1], results["runs"][2]
    m = results["machine"]
    lines = [
        f"Export: {results['export']}; CPU: {m.get('model_name', '?')}, {m.get('cpus', '?')} CPUs; "
        f"command: `{results['command']}`",
        "",
        "| engine replicas | requests | completion tokens | seconds | tokens/s | replicas used |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {n} | {r['requests']} | {r['tokens']} | {r['seconds']:.1f} | {r['tok_s']:.1f} | {r['replicas_used']} |"
          for n, r in results["runs"].items()),
        "",
        f"2 replicas / 1 replica: {two['tok_s'] / one['tok_s']:.2f}x aggregate tokens/s.",
    ]
    if "failover" in results:
        f = results["failover"]
        lines.append(f"Failover: next answer {f['seconds_kill_to_answer']:.1f} s after `ray.kill` of the replica holding "
                     f"the conversation, served by the other replica: {f['other_replica']}, "
                     f"{f['cached_tokens']} of {f['prompt_tokens']} prompt tokens resumed from the snapshot.")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
