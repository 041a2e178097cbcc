"""A multi-turn chat over ``dijiang-deploy serve`` with the official ``openai`` client.

    dijiang-deploy serve runs/smollm2-shipped-onnx &        # prints "ready on http://127.0.0.1:8000"
    python examples/server_chat.py --prompt "Hi!" --prompt "What is the capital of France?"
    python examples/server_chat.py                          # interactive (empty line quits)

The client is stateless, as the OpenAI API is: every turn sends the whole
history. The server recognises the history it has already seen and resumes
from the recurrent state it kept, so each turn costs only its new tokens;
the line after each answer shows how many prompt tokens came from that cache.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("DIJIANG_API_KEY", "none"))
    ap.add_argument("--model", help="model id (default: the server's only model)")
    ap.add_argument("--prompt", action="append", help="a user turn (repeat for several; default: read stdin)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--system", help="system message")
    args = ap.parse_args(argv)

    from openai import OpenAI

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []

    def turns():
        if args.prompt:
            yield from args.prompt
            return
        while True:
            try:
                line = input("> ")
            except EOFError:
                return
            if not line.strip():
                return
            yield line

    for text in turns():
        history.append({"role": "user", "content": text})
        stream = client.chat.completions.create(
            model=model, messages=history, max_tokens=args.max_tokens, temperature=args.temperature,
            stream=True, stream_options={"include_usage": True},
        )
        reply, usage = [], None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                reply.append(chunk.choices[0].delta.content)
                print(chunk.choices[0].delta.content, end="", flush=True)
            if chunk.usage is not None:
                usage = chunk.usage
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
        if usage is not None:
            cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            print(f"[prompt {usage.prompt_tokens} tokens, {cached} from the state cache; "
                  f"{usage.completion_tokens} generated]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
