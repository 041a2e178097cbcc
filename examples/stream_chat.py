"""Embed the DiJiang runtime in an application: a streaming chat loop.

    .venv/bin/python examples/stream_chat.py runs/smollm2-onnx                 # interactive
    .venv/bin/python examples/stream_chat.py runs/smollm2-onnx --prompt "Hi!"  # one turn

(``.venv`` is what ``scripts/demo.sh`` or ``scripts/setup.sh`` creates;
``runs/smollm2-onnx`` is the demo's export.) The runtime is three calls: open
the export folder once, generate with ``stream=True``, read tokens as they
come. Memory is fixed: the recurrent state and IO buffers are allocated once,
whatever the length of a reply. Each question is answered on its own: this
loop keeps no conversation history.
"""

from __future__ import annotations

import argparse
import sys

from dijiang_deploy.errors import DiJiangError
from dijiang_deploy.runtime import Generator


def answer(gen: Generator, prompt: str, max_new_tokens: int, out=sys.stdout) -> tuple[str, float]:
    """Stream one reply to ``out``; returns (text, decode tokens/s)."""
    stream = gen.generate(prompt, max_new_tokens=max_new_tokens, chat=True, stream=True)
    for event in stream:
        out.write(event.text)
        out.flush()
    out.write("\n")
    return stream.result.text, stream.result.stats.decode_tokens_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", help="export folder (dijiang-deploy export), e.g. runs/smollm2-onnx")
    parser.add_argument("--prompt", help="answer this and exit (default: interactive)")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest reply in tokens (default 96)")
    args = parser.parse_args(argv)
    if args.prompt is not None and not args.prompt.strip():
        parser.error("--prompt is empty")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        gen = Generator.from_pretrained(args.onnx_dir)
        state_mib = gen.manifest.state_bytes() / 2**20
        print(f"[loaded {args.onnx_dir}: {gen.manifest.num_layers} layers, state {state_mib:.2f} MiB]", file=sys.stderr)
        if args.prompt is not None:
            answer(gen, args.prompt, args.max_new_tokens)
            return 0
        while True:
            try:
                prompt = input("you> ")
            except EOFError:
                return 0
            if prompt.strip():
                _, speed = answer(gen, prompt, args.max_new_tokens)
                print(f"[{speed:.1f} tok/s]", file=sys.stderr)
    except DiJiangError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
