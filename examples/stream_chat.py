"""Embed the DiJiang runtime in an application: a streaming multi-turn chat.

    .venv/bin/python examples/stream_chat.py runs/smollm2-shipped-onnx                      # interactive
    .venv/bin/python examples/stream_chat.py runs/smollm2-shipped-onnx --prompt "Hi!" --prompt "And?"
    .venv/bin/python examples/stream_chat.py runs/smollm2-shipped-onnx --save-state chat.djstate   # resume later
    .venv/bin/python examples/stream_chat.py runs/smollm2-shipped-onnx --load-state chat.djstate

(``.venv`` is what ``scripts/demo.sh`` or ``scripts/setup.sh`` creates;
``runs/smollm2-shipped-onnx`` is the demo's export.) The conversation lives in a
session's recurrent state: each turn feeds only its own new tokens, memory
stays fixed however long the chat gets, and the whole conversation can be
saved to a file of a few MiB and resumed in another process.
"""

from __future__ import annotations

import argparse
import sys

from dijiang_deploy.contract.errors import DiJiangError
from dijiang_deploy.runtime import Model, Session


def answer(session: Session, prompt: str, max_new_tokens: int, out=sys.stdout) -> tuple[str, int, float]:
    """Stream one reply to ``out``; returns (text, tokens this turn fed, decode tokens/s)."""
    before = session.position
    stream = session.chat(prompt, max_new_tokens=max_new_tokens, stream=True)
    fed = session.position - before  # the turn's new prompt tokens (the reply is fed as it is generated)
    for event in stream:
        out.write(event.text)
        out.flush()
    out.write("\n")
    return stream.output.text, fed, stream.output.stats.decode_tokens_per_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx_dir", help="export folder (dijiang-deploy export), e.g. runs/smollm2-shipped-onnx")
    parser.add_argument("--prompt", action="append", help="a user turn (repeatable); default: read turns interactively")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="longest reply in tokens (default 96)")
    parser.add_argument("--load-state", help="continue the conversation saved in this state file")
    parser.add_argument("--save-state", help="save the conversation here when done")
    args = parser.parse_args(argv)
    if args.prompt is not None and not all(p.strip() for p in args.prompt):
        parser.error("--prompt is empty")
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    try:
        model = Model.open(args.onnx_dir)
        session = Session.load(model, args.load_state) if args.load_state else model.session()
        state_mib = model.manifest.state_bytes() / 2**20
        print(f"[loaded {args.onnx_dir}: {model.manifest.num_layers} layers, state {state_mib:.2f} MiB, "
              f"{session.position} tokens of history]", file=sys.stderr)
        turns = iter(args.prompt) if args.prompt is not None else _read_turns()
        for prompt in turns:
            _, fed, speed = answer(session, prompt, args.max_new_tokens)
            print(f"[turn fed {fed} new tokens; history {session.position} tokens; {speed:.1f} tok/s]", file=sys.stderr)
        if args.save_state:
            session.save(args.save_state)
            print(f"[saved {args.save_state}]", file=sys.stderr)
        return 0
    except DiJiangError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _read_turns():
    while True:
        try:
            line = input("you> ")
        except EOFError:
            return
        if line.strip():
            yield line


if __name__ == "__main__":
    sys.exit(main())
