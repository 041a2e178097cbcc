"""A DiJiang model over 2 GiB whose weight lies in its layers: 9 TinyLlama-shaped
layers (hidden 2048, 32 heads over 4 KV heads, MLP 5632, vocabulary 32,000).

Its own module so that its 2.3 GB checkpoint and test_large's 2.1 GiB one
are never on disk at once.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import measured_cli, skip_unless_disk

pytestmark = pytest.mark.slow

# The checkpoint, one int4 export and room to spare.
DISK_NEEDED = 5 * 2**30


@pytest.fixture(autouse=True)
def _guard_and_remove(tmp_path):
    skip_unless_disk(tmp_path, DISK_NEEDED, "a 9-layer 2.3 GB model")
    yield
    # A failed test's folders are not kept: they would fill the disk under the tests that follow.
    shutil.rmtree(tmp_path, ignore_errors=True)


def _export(ckpt: Path, out: Path, *flags: str) -> float:
    return measured_cli("export", str(ckpt), "-o", str(out), *flags)


def test_a_multi_layer_model_past_2_gib(tmp_path):
    """9 TinyLlama-shaped layers (80% of 2.3 GB in the layers), int4 through the
    inline builder (the layers' weights handed to the quantizer, never copied into
    the graph) and through the traced flavor (read from its data file, which is
    rewritten): the two agree with each other and with PyTorch, leave no float
    copy of the layers in the folder, and peak near 2x the weights."""
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.contract.manifest import Manifest
    from dijiang_deploy.runtime import Model
    from dijiang_deploy.testing import random_model

    model = random_model("llama", seed=2, vocab_size=32_000, hidden_size=2048, num_hidden_layers=9,
                         num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632, tie_word_embeddings=False)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes > 2 * 2**30
    ckpt = save_checkpoint(model, tmp_path / "ckpt", max_shard_bytes=1 << 30)
    prompt = [5, 900, 17, 12_345, 42, 31_999, 7, 311]
    with torch.no_grad():
        want = model(torch.tensor([prompt]), mode="chunked").logits[0, -1].numpy().copy()
    del model
    gc.collect()
    got = {}
    for name, flags in (("inline", []), ("traced", ["--attention-op", "linear-attention"])):
        out = tmp_path / name
        # Symmetric in both (the inline flavor alone would default to zero points), float compute
        # (level 4's int8 activations would flip a code wherever reassociation crosses a rounding edge).
        peak = _export(ckpt, out, "--weights", "int4", "--no-calibrate", "--symmetric", "--accuracy-level", "0", *flags)
        man = Manifest.load(out)
        assert man.weights == "int4" and man.num_layers == 9
        held = sum(f.stat().st_size for f in out.iterdir())
        assert held < nbytes / 3, f"{name}: {held} bytes on disk, a float copy of the layers is left"
        got[name] = Model.open(out, load_tokenizer=False).session().append(prompt)
        ratio = peak / nbytes
        print(f"9 layers, int4 {name}: export peak RSS {peak / 2**30:.2f} GiB = {ratio:.2f}x the weights")
        # docs/large-models.md has the measured peaks (3.7x inline before the weights were handed over).
        assert ratio <= 2.3, ratio
        shutil.rmtree(out)
    # The same integer weights (one rounding routine, both symmetric) through two graphs built
    # independently: equal up to float reassociation (measured 2e-7 on a 4-layer tiny model).
    assert np.abs(got["inline"] - got["traced"]).max() <= 1e-4 * np.abs(want).max()
    # int4 round to nearest on random weights (not on a grid) over 9 layers: measured correlation 0.94.
    assert np.corrcoef(got["inline"], want)[0, 1] > 0.85
