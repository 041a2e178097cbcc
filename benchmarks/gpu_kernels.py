"""GPU kernel benchmark: decode against the memory-bandwidth limit, chunked prefill against fla.

Needs a CUDA device and ``libdijiang_kernels.so`` (scripts/build_plugins.sh, or
$DIJIANG_KERNELS_LIB). Everything is measured side by side in one run:

* bandwidth: a device-to-device copy (``torch.Tensor.copy_``), the practical
  limit of this GPU's memory, in GB/s counting bytes read and written.
* decode: one ``dijiang_linear_attention_decode`` call (T = 1, state read and
  written once, fp32 state) per sample, on a CUDA graph of ``--graph-steps``
  calls so launch latency is amortised the way the TensorRT runtime's graphs
  amortise it. Reported as time per call and as the fraction of the copy
  bandwidth it reaches (bytes = state in + state out + q/k/v/out/decay).
* prefill: ``dijiang_linear_attention_prefill`` against flash-linear-attention's
  ``chunk_simple_gla`` (fla-core, Triton) on the same fp16 inputs: phi(q),
  phi(k), v, per-token log decay, scale 1, a non-zero fp32 initial state and the
  final state returned. The two outputs are compared first (cosine and max abs
  difference), so the timing compares equal work.

Times are CUDA-event medians over ``--iters`` after ``--warmup`` runs.

    python benchmarks/gpu_kernels.py --out bench-gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dijiang_deploy.kernels import Kernels, find_library  # noqa: E402


def _time(torch: Any, fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median milliseconds of fn() over iters, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def _features(torch: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """Softmax feature maps, like DiJiang's phi: positive rows summing to 1."""
    return torch.softmax(torch.randn(shape, device="cuda"), dim=-1).to(dtype)


def _decay(torch: Any, batch: int, seq: int, heads: int, dtype: Any) -> Any:
    gamma = 1.0 - torch.exp(torch.empty(heads, device="cuda").uniform_(-6.9, -2.3))
    jitter = torch.empty(batch, seq, heads, device="cuda").uniform_(0.5, 1.5)
    return (torch.log(gamma) * jitter).to(dtype)


def bandwidth(torch: Any, iters: int, warmup: int) -> float:
    """GB/s of a 1 GiB device-to-device copy, read + write bytes."""
    n = 1 << 28
    src = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = _time(torch, lambda: dst.copy_(src), iters, warmup)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def bench_decode(torch: Any, kernels: Kernels, batch: int, heads: int, d: int, dtype: Any, graph_steps: int,
                 iters: int, warmup: int, copy_gbs: float) -> dict:
    q = _features(torch, (batch, 1, heads, d), dtype).reshape(batch, 1, heads * d)
    k = _features(torch, (batch, 1, heads, d), dtype).reshape(batch, 1, heads * d)
    v = torch.randn(batch, 1, heads * d, device="cuda").to(dtype)
    g = _decay(torch, batch, 1, heads, dtype)
    out = torch.empty_like(v)
    # Ping-pong buffers as the runtime uses under graphs: step i reads one, writes the other.
    states = [0.1 * torch.randn(batch, heads, d, d, device="cuda"), torch.empty(batch, heads, d, d, device="cuda")]
    stream = torch.cuda.Stream()

    def steps() -> None:
        for i in range(graph_steps):
            kernels.decode(q, k, v, states[i % 2], g, out, states[(i + 1) % 2], heads=heads, stream=stream)

    with torch.cuda.stream(stream):
        steps()  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        steps()
    ms = _time(torch, graph.replay, iters, warmup) / graph_steps
    elem = 2 if dtype == torch.float16 else 4
    bytes_moved = 2 * batch * heads * d * d * 4 + batch * heads * (4 * d + 1) * elem
    return {"batch": batch, "heads": heads, "head_dim": d, "dtype": str(dtype).removeprefix("torch."),
            "us_per_step": ms * 1e3, "bytes": bytes_moved, "gb_per_s": bytes_moved / (ms * 1e-3) / 1e9,
            "fraction_of_copy": bytes_moved / (ms * 1e-3) / 1e9 / copy_gbs}


def bench_prefill(torch: Any, kernels: Kernels, fla_chunk: Callable | None, batch: int, seq: int, heads: int, d: int,
                  chunk: int, iters: int, warmup: int) -> dict:
    dtype = torch.float16
    q = _features(torch, (batch, seq, heads, d), dtype)
    k = _features(torch, (batch, seq, heads, d), dtype)
    v = torch.randn(batch, seq, heads, d, device="cuda").to(dtype)
    g = _decay(torch, batch, seq, heads, torch.float32)
    h0 = 0.1 * torch.randn(batch, heads, d, d, device="cuda")
    out = torch.empty(batch, seq, heads * d, dtype=dtype, device="cuda")
    present = torch.empty_like(h0)
    ws = torch.empty(kernels.workspace_size(batch, seq, heads, d, d, chunk), dtype=torch.uint8, device="cuda")
    flat = [x.reshape(batch, seq, heads * d) for x in (q, k, v)]
    g16 = g.to(dtype)  # the kernel's decay has the activations' dtype

    def ours() -> None:
        kernels.prefill(*flat, h0, g16, out, present, ws, heads=heads, chunk=chunk)

    row = {"batch": batch, "seq_len": seq, "heads": heads, "head_dim": d, "chunk": kernels.chunk_size(d, d, chunk)}
    ms = _time(torch, ours, iters, warmup)
    row.update(dijiang_ms=ms, dijiang_tokens_per_s=batch * seq / (ms * 1e-3))
    if fla_chunk is not None:
        g_fla = g16.float()  # fla takes the decay in float32: the same fp16-rounded values as ours

        def theirs() -> Any:
            return fla_chunk(q, k, v, g=g_fla, scale=1.0, initial_state=h0, output_final_state=True)

        o_fla, h_fla = theirs()
        a, b = out.float().flatten(), o_fla.float().flatten()
        row["output_cosine"] = float(torch.dot(a, b) / (a.norm() * b.norm()))
        row["output_max_abs"] = float((a - b).abs().max())
        row["state_max_abs"] = float((present - h_fla.float()).abs().max())
        fla_ms = _time(torch, theirs, iters, warmup)
        row.update(fla_ms=fla_ms, fla_tokens_per_s=batch * seq / (fla_ms * 1e-3), speedup_vs_fla=fla_ms / ms)
    return row


def breakdown(torch: Any, kernels: Kernels, batch: int, seq: int, heads: int, d: int, chunk: int) -> int:
    from torch.profiler import ProfilerActivity, profile

    dtype = torch.float16
    q, k = (_features(torch, (batch, seq, heads, d), dtype).reshape(batch, seq, heads * d) for _ in range(2))
    v = torch.randn(batch, seq, heads * d, device="cuda").to(dtype)
    g = _decay(torch, batch, seq, heads, dtype)
    h0 = 0.1 * torch.randn(batch, heads, d, d, device="cuda")
    out, present = torch.empty_like(v), torch.empty_like(h0)
    ws = torch.empty(kernels.workspace_size(batch, seq, heads, d, d, chunk), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        kernels.prefill(q, k, v, h0, g, out, present, ws, heads=heads, chunk=chunk)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            kernels.prefill(q, k, v, h0, g, out, present, ws, heads=heads, chunk=chunk)
        torch.cuda.synchronize()
    print(f"== B={batch} L={seq} H={heads} d={d} (10 calls)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for results.json and table.md")
    parser.add_argument("--library", type=Path, help="libdijiang_kernels.so (default: find_library())")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--graph-steps", type=int, default=64)
    parser.add_argument("--seq-lens", default="2048,4096,8192,16384")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--breakdown", metavar="B,L,H,D",
                        help="only print per-kernel GPU times (torch.profiler) of fp16 prefill at this size")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_kernels.py: no CUDA device", file=sys.stderr)
        return 2
    path = args.library or find_library()
    if path is None:
        print("gpu_kernels.py: libdijiang_kernels.so not found (scripts/build_plugins.sh or --library)",
              file=sys.stderr)
        return 2
    kernels = Kernels.load(path)
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except ImportError as exc:  # the comparison column is left out, the rest still runs
        print(f"fla not importable ({exc}); prefill rows have no fla column", file=sys.stderr)
        chunk_simple_gla = None
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.breakdown:
        batch, seq, heads, d = (int(x) for x in args.breakdown.split(","))
        return breakdown(torch, kernels, batch, seq, heads, d, args.chunk)

    copy_gbs = bandwidth(torch, args.iters, args.warmup)
    result: dict = {"device": torch.cuda.get_device_name(), "copy_gb_per_s": copy_gbs, "decode": [], "prefill": []}
    print(f"{result['device']}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)")
    for batch, heads, d in [(1, 9, 64), (8, 9, 64), (64, 9, 64), (1, 32, 128), (16, 32, 128), (64, 32, 128)]:
        for dtype in (torch.float16, torch.float32):
            row = bench_decode(torch, kernels, batch, heads, d, dtype, args.graph_steps, args.iters, args.warmup,
                               copy_gbs)
            result["decode"].append(row)
            print(f"decode B={batch:3d} H={heads:2d} d={d:3d} {row['dtype']:8s} {row['us_per_step']:8.2f} us "
                  f"{row['gb_per_s']:7.0f} GB/s ({100 * row['fraction_of_copy']:.0f}% of copy)")
    for batch, heads, d in [(1, 9, 64), (4, 32, 64), (1, 32, 128)]:
        for seq in (int(s) for s in args.seq_lens.split(",")):
            row = bench_prefill(torch, kernels, chunk_simple_gla, batch, seq, heads, d, args.chunk, args.iters,
                                args.warmup)
            result["prefill"].append(row)
            line = (f"prefill B={batch} L={seq:5d} H={heads:2d} d={d:3d} C={row['chunk']}: "
                    f"dijiang {row['dijiang_ms']:.3f} ms")
            if "fla_ms" in row:
                line += (f", fla {row['fla_ms']:.3f} ms, dijiang/fla speed {row['speedup_vs_fla']:.2f}x "
                         f"(cos {row['output_cosine']:.6f}, max abs {row['output_max_abs']:.2e}, "
                         f"state {row['state_max_abs']:.2e})")
            print(line)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2))
        (args.out / "table.md").write_text(to_markdown(result))
    return 0


def to_markdown(result: dict) -> str:
    lines = [f"GPU: {result['device']}; device-to-device copy {result['copy_gb_per_s']:.0f} GB/s (read + write)", "",
             "| decode B | H | d | dtype | us/step | GB/s | % of copy |", "|---|---|---|---|---|---|---|"]
    for r in result["decode"]:
        lines.append(f"| {r['batch']} | {r['heads']} | {r['head_dim']} | {r['dtype']} | {r['us_per_step']:.2f} "
                     f"| {r['gb_per_s']:.0f} | {100 * r['fraction_of_copy']:.0f}% |")
    lines += ["", "| prefill B | L | H | d | chunk | dijiang ms | fla ms | dijiang/fla speed | "
              "out cosine | out max abs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["prefill"]:
        fla = (f"{r['fla_ms']:.3f} | {r['speedup_vs_fla']:.2f}x | {r['output_cosine']:.6f} | "
               f"{r['output_max_abs']:.1e}") if "fla_ms" in r else "- | - | - | -"
        lines.append(f"| {r['batch']} | {r['seq_len']} | {r['heads']} | {r['head_dim']} | {r['chunk']} | "
                     f"{r['dijiang_ms']:.3f} | {fla} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
