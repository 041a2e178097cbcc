"""A DiJiang model over 2 GiB in float32: sharded checkpoint, exports past protobuf's limit, ONNX Runtime, verify.

The model is random: one LLaMA-family layer, hidden 256, a 1.1M-token
untied vocabulary (2.1 GiB of float32 weights, almost all embedding and
head). Its decoder weights are snapped to the int4 grid and the grid is
recorded, so the int4 export (float activations, float head) multiplies by
exactly the checkpoint's weights and must match PyTorch as closely as fp32.
"""

from __future__ import annotations

import gc
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _support import measured_cli, skip_unless_disk

pytestmark = pytest.mark.slow

VOCAB = 1_100_000
PROMPT = [5, 900_000, 17, 123_456, 42, 1_099_999, 7, 311]
# The checkpoint, one export of it and room to spare: each test's folders are
# removed when it ends, pass or fail, so that is the most held at once.
DISK_NEEDED = 6 * 2**30


@pytest.fixture(scope="module", autouse=True)
def _disk(tmp_path_factory):
    skip_unless_disk(tmp_path_factory.getbasetemp(), DISK_NEEDED, "a 2 GiB model")


@pytest.fixture(autouse=True)
def _remove_outputs(tmp_path):
    # A failed test's 2 GiB folder is not kept either: it would fill the disk under the tests that follow.
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def checkpoint(module_tmp) -> dict:
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.quantization.grid import QuantAwareConfig, WeightGrid
    from dijiang_deploy.testing import random_model

    model = random_model("llama", seed=1, vocab_size=VOCAB, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=False)
    grid = QuantAwareConfig(bits=4, block_size=32, symmetric=False)
    WeightGrid(model, grid).snap()
    model.config.raw["dijiang_finetune"] = {"quant_aware": grid.to_record()}
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert nbytes > 2 * 2**30
    folder = save_checkpoint(model, module_tmp("large") / "ckpt", max_shard_bytes=1 << 30)
    with torch.no_grad():
        out = model(torch.tensor([PROMPT]), mode="chunked")
        step = model(out.logits[:, -1:].argmax(-1), mode="recurrent", state=out.state)
    want = {"prompt": out.logits[0].numpy().copy(), "step": step.logits[0, -1].numpy().copy(),
            "next": int(out.logits[0, -1].argmax())}
    del model, out, step
    gc.collect()
    return {"dir": folder, "bytes": nbytes, "want": want}



def _export(ckpt: Path, out: Path, *flags: str) -> float:
    return measured_cli("export", str(ckpt), "-o", str(out), *flags)


def test_convert_a_large_hugging_face_folder(tmp_path):
    """A 2.1 GiB float32 Hugging Face folder in two shards becomes a DiJiang
    checkpoint holding the base weights exactly, with one copy of them in memory."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dijiang_deploy.testing import random_base

    base = random_base("llama", seed=4, vocab_size=VOCAB, hidden_size=256, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=512, tie_word_embeddings=False)
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(base.raw_config))
    tensors = base.tensors
    shards = {"model-00001-of-00002.safetensors": [k for k in tensors if "lm_head" not in k],
              "model-00002-of-00002.safetensors": [k for k in tensors if "lm_head" in k]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(src / shard), metadata={"format": "pt"})
    nbytes = sum(v.numel() * v.element_size() for v in tensors.values())
    (src / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": nbytes}, "weight_map": {k: shard for shard, keys in shards.items() for k in keys}}))
    assert nbytes > 2 * 2**30
    del base, tensors
    gc.collect()

    out = tmp_path / "dj"
    peak = measured_cli("convert", str(src), "-o", str(out), "-q")
    weights = sorted(out.glob("*.safetensors"))
    assert sum(w.stat().st_size for w in weights) >= nbytes
    located = {}
    for w in weights:
        with safe_open(str(w), "pt") as f:
            located |= {k: w for k in f.keys()}
    assert "model.layers.0.self_attn.proj_matrix" in located
    # Every base tensor, one at a time (both files memory-mapped), bit for bit.
    for shard, keys in shards.items():
        with safe_open(str(src / shard), "pt") as f:
            for k in keys:
                with safe_open(str(located[k]), "pt") as g:
                    assert torch.equal(f.get_tensor(k), g.get_tensor(k)), k
    ratio = peak / nbytes
    print(f"convert: peak RSS {peak / 2**30:.2f} GiB = {ratio:.2f}x the weights")
    assert ratio <= 1.6, ratio

def test_save_checkpoint_writes_shards_with_an_index(checkpoint):
    folder = checkpoint["dir"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == checkpoint["bytes"]
    assert all((folder / s).stat().st_size <= (1 << 30) + (256 << 20) for s in shards)


@pytest.mark.parametrize("name, flags, peak_limit", [
    # Peak resident memory of the export process over the weights' size
    # (docs/large-models.md): 1.18-1.20 on the Xeons and the EPYCs; limits leave room.
    ("fp32", [], 1.6),
    ("int4", ["--weights", "int4", "--accuracy-level", "0", "--float-head"], 1.6),
    ("traced", ["--attention-op", "linear-attention"], 1.6),
    # The TensorRT flavor, run on ONNX Runtime through the reference op: only
    # the graph is rewritten for it, the weights stay in external data.
    ("plugin", ["--attention-op", "plugin"], 1.6),
])
def test_export_past_2_gib_runs_and_matches_pytorch(checkpoint, tmp_path, monkeypatch, name, flags, peak_limit):
    from dijiang_deploy.contract.manifest import Manifest
    from dijiang_deploy.runtime import Model

    if name == "plugin":
        pytest.importorskip("onnxruntime_extensions")
    out = tmp_path / name
    peak = _export(checkpoint["dir"], out, *flags)
    assert (out / "model.onnx.data").stat().st_size > 1 << 30, "weights as external data"
    assert (out / "model.onnx").stat().st_size < 64 << 20, "the graph itself stays small"
    man = Manifest.load(out)
    if name == "int4":
        assert man.quantization["calibration"]["method"] == "none", "the grid was recorded: nothing to calibrate"
    model = Model.open(out, load_tokenizer=False)
    assert not list(out.glob(".*ort-plugin*")), "the plugin flavor's rewritten graph is removed once loaded"
    s = model.session()
    logits = s.append(PROMPT)
    want = checkpoint["want"]
    assert np.abs(logits - want["prompt"][-1]).max() <= 1e-4
    assert int(np.argmax(logits)) == want["next"]
    step = s.feed_token(want["next"])
    assert np.abs(step - want["step"]).max() <= 1e-4
    ratio = peak / checkpoint["bytes"]
    print(f"{name}: export peak RSS {peak / 2**30:.2f} GiB = {ratio:.2f}x the weights")
    assert ratio <= peak_limit, ratio
    if name == "plugin":
        # A folder it cannot write in (simulated: tests may run as root, which
        # ignores modes) leaves no room for the rewritten graph beside the
        # weights, and past 2 GiB they cannot go inline: a clear error.
        from dijiang_deploy.contract.errors import ExportError
        from dijiang_deploy.runtime import ort_backend

        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(out))

        del model, s
        gc.collect()
        monkeypatch.setattr(ort_backend.tempfile, "mkstemp", read_only)
        with pytest.raises(ExportError, match="writable export folder"):
            Model.open(out, load_tokenizer=False)


@pytest.mark.parametrize("name, flags, peak_limit", [
    # fp16 goes through the traced flavor and scores every position.
    ("fp16-all", ["--dtype", "fp16", "--logits", "all"], 1.6),
    # The recorded grid has blocks of 32, so int8 in blocks of 64 is calibrated: the scaled copy shares
    # the embedding and head (measured peak in docs/large-models.md).
    ("int8-calibrated", ["--weights", "int8", "--block-size", "64", "--calibration-tokens", "512"], 1.6),
])
def test_half_and_calibrated_exports_past_2_gib(checkpoint, tmp_path, name, flags, peak_limit):
    from dijiang_deploy.contract.manifest import Manifest
    from dijiang_deploy.runtime import Generator

    out = tmp_path / name
    peak = _export(checkpoint["dir"], out, *flags)
    assert (out / "model.onnx.data").stat().st_size > 1 << 29, "weights as external data"
    man = Manifest.load(out)
    want = checkpoint["want"]["prompt"]
    got = Generator.from_pretrained(out, load_tokenizer=False).score(np.array([PROMPT]))[0]
    assert got.shape == want.shape
    if name == "fp16-all":
        assert man.dtype == "fp16" and man.logits == "all"
        # fp16 keeps ~11 bits: logits within 1% of their scale, the same top-1 at every position.
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max(), np.abs(got - want).max()
        assert (got.argmax(-1) == want.argmax(-1)).all()
    else:
        assert man.weights == "int8" and man.quantization["calibration"]["method"] != "none"
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.999
        assert int(got[-1].argmax()) == checkpoint["want"]["next"]
    ratio = peak / checkpoint["bytes"]
    print(f"{name}: export peak RSS {peak / 2**30:.2f} GiB = {ratio:.2f}x the weights")
    assert ratio <= peak_limit, ratio


def test_default_int4_export_quantizes_the_large_head(checkpoint, tmp_path):
    """The 8-bit head of 1.1M rows is quantized a slice of columns at a time from the
    PyTorch weight, never copied whole in float (docs/large-models.md has the peak)."""
    from dijiang_deploy.contract.manifest import Manifest
    from dijiang_deploy.runtime import Model

    peak = _export(checkpoint["dir"], tmp_path / "int4", "--weights", "int4")
    man = Manifest.load(tmp_path / "int4")
    assert man.quantization["head_bits"] == 8
    logits = Model.open(tmp_path / "int4", load_tokenizer=False).session().append(PROMPT)
    want = checkpoint["want"]["prompt"][-1]
    assert np.isfinite(logits).all() and np.corrcoef(logits, want)[0, 1] > 0.99
    print(f"default int4: export peak RSS {peak / 2**30:.2f} GiB = {peak / checkpoint['bytes']:.2f}x the weights")
    # Measured 1.60-1.74x: the weights, the 8-bit head and its serialised copy (was 2.16-2.70x
    # when ONNX Runtime's quantizer copied the float head whole).
    assert peak / checkpoint["bytes"] <= 2.0, peak / checkpoint["bytes"]


def test_verify_on_a_large_export(checkpoint, tmp_path):
    from dijiang_deploy.verify import verify

    _export(checkpoint["dir"], tmp_path / "fp32")
    report = verify(tmp_path / "fp32", checkpoint["dir"], tokens=12, greedy_tokens=4)
    assert report.ok, report.lines()
