"""The embedding example against a real export and tokenizer, checked by an independent path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.testing import random_model
from _support import requires_smollm2

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "stream_chat.py"


def _from_scratch(folder: Path, messages: list[dict], n: int) -> str:
    """The reply to ``messages`` by prefilling their one-go rendering into an empty state."""
    from dijiang_deploy.runtime import Model

    model = Model.open(folder)
    ids = model.tokenizer.encode_chat(messages, add_generation_prompt=True)
    s = model.session()
    s.append(ids)
    return s.generate(n, feed_last=False).text


@requires_smollm2
def test_stream_chat_example_keeps_the_conversation_in_the_state(smollm2_dir, tmp_path):
    # A tiny model sized to SmolLM2's vocabulary, so its tokenizer and chat
    # template drive the text path for real.
    model = random_model("llama", seed=0, vocab_size=49152, eos_token_id=2)
    folder = tmp_path / "onnx"
    export_model(model, folder, ExportOptions(max_chunk=16), tokenizer_dir=smollm2_dir)
    turns = ["Hello there", "Tell me more"]
    state = tmp_path / "chat.djstate"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), str(folder), "--prompt", turns[0], "--prompt", turns[1],
         "--max-new-tokens", "10", "--save-state", str(state)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    # Turn 2 continued from the state: it must equal prefilling the whole conversation from scratch.
    first = [{"role": "user", "content": turns[0]}]
    reply0 = _from_scratch(folder, first, 10)
    history = first + [{"role": "assistant", "content": reply0}, {"role": "user", "content": turns[1]}]
    reply1 = _from_scratch(folder, history, 10)
    assert proc.stdout == reply0 + "\n" + reply1 + "\n"
    from dijiang_deploy.runtime import Model

    tok = Model.open(folder).tokenizer
    n1, n2 = len(tok.encode_chat(first)), len(tok.encode_chat(history))
    fed = [int(line.split("fed ")[1].split()[0]) for line in proc.stderr.splitlines() if "turn fed" in line]
    assert fed[0] == n1 and fed[1] <= n2 - n1, "turn 2 feeds only what it adds, not the whole history"
    # Resumed in a new process from the saved file, the conversation goes on the same way.
    proc2 = subprocess.run(
        [sys.executable, str(EXAMPLE), str(folder), "--prompt", "Thanks", "--max-new-tokens", "6", "--load-state", str(state)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc2.returncode == 0, proc2.stderr
    history += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "Thanks"}]
    assert proc2.stdout == _from_scratch(folder, history, 6) + "\n"
    loaded = int(proc2.stderr.split(" tokens of history")[0].rsplit(" ", 1)[1])
    assert loaded >= n2, "the saved history was loaded"


def test_stream_chat_example_errors(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = subprocess.run([sys.executable, str(EXAMPLE), str(tmp_path), "--prompt", " "], capture_output=True, text=True)
    assert proc.returncode == 2 and "--prompt is empty" in proc.stderr
