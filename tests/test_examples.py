"""The embedding example runs against a real export with a real tokenizer."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path


from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.testing import random_model
from _support import requires_smollm2

ROOT = Path(__file__).resolve().parents[1]


@requires_smollm2
def test_stream_chat_example(smollm2_dir, tmp_path):
    # A tiny model sized to SmolLM2's vocabulary, so its tokenizer and chat
    # template drive the text path for real.
    model = random_model("llama", seed=0, vocab_size=49152, eos_token_id=2)
    folder = tmp_path / "onnx"
    export_model(model, folder, ExportOptions(max_chunk=16), tokenizer_dir=smollm2_dir)
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import stream_chat
    finally:
        sys.path.pop(0)
    from dijiang_deploy.runtime import Generator

    gen = Generator.from_pretrained(folder)
    buf = io.StringIO()
    text, _ = stream_chat.answer(gen, "Hello there", max_new_tokens=12, out=buf)
    assert buf.getvalue() == text + "\n"
    ids = gen.encode("Hello there", chat=True)
    assert ids[:1] == gen.tokenizer.encode("<|im_start|>", add_special_tokens=False)
    expected = gen.generate("Hello there", max_new_tokens=12, chat=True)
    assert text == expected.text and len(expected.token_ids[0]) >= 1
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_chat.py"), str(folder), "--prompt", "Hello there", "--max-new-tokens", "12"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text + "\n"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_chat.py"), str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no such file" in proc.stderr
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_chat.py"), str(folder), "--prompt", " "], capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "--prompt is empty" in proc.stderr
