"""ONNX export: flavors, parity with PyTorch, manifest, graph hygiene."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

from dijiang_deploy.contract.errors import DiJiangError, ExportError, PositionLimitError
from dijiang_deploy.export import ExportOptions, Manifest, export_model, register_schema
from dijiang_deploy.runtime import Generator
from dijiang_deploy.testing import random_model

FP32_TOL = 1e-4  # max abs logit difference against PyTorch (issue #3)


@pytest.fixture(scope="module")
def models():
    return {fam: random_model(fam, seed=7) for fam in ("gpt_neox", "llama")}


@pytest.fixture(scope="module")
def exports(models, module_tmp):
    """family -> attention op -> export folder (logits=all, chunk 16)."""
    out = {}
    for fam, model in models.items():
        out[fam] = {}
        for flavor in ("linear-attention", "function", "plugin", "inline"):
            folder = module_tmp("exp") / f"{fam}-{flavor}"
            export_model(model, folder, ExportOptions(attention_op=flavor, logits="all", max_chunk=16))
            out[fam][flavor] = folder
    return out


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids), mode="parallel").logits.numpy()


@pytest.mark.parametrize("op", ["linear-attention", "inline"])
@pytest.mark.parametrize("fam", ["gpt_neox", "llama"])
@pytest.mark.parametrize("n", [5, 16, 70])
def test_score_matches_pytorch(models, exports, fam, n, op):
    """Shorter than, equal to, and several times the chunk length; batch 2."""
    ids = np.random.default_rng(n).integers(0, models[fam].config.vocab_size, size=(2, n))
    got = Generator.from_pretrained(exports[fam][op]).score(ids)
    assert got.shape == (2, n, models[fam].config.vocab_size)
    assert np.abs(got - _torch_logits(models[fam], ids)).max() <= FP32_TOL


@pytest.mark.parametrize("fam", ["gpt_neox", "llama"])
def test_flavors_agree(models, exports, fam):
    pytest.importorskip("onnxruntime_extensions")
    ids = np.random.default_rng(1).integers(0, models[fam].config.vocab_size, size=(2, 37))
    la = Generator.from_pretrained(exports[fam]["linear-attention"]).score(ids)
    fn = Generator.from_pretrained(exports[fam]["function"]).score(ids)
    # plugin: our node with no body, run through a numpy custom op.
    pl = Generator.from_pretrained(exports[fam]["plugin"]).score(ids)
    inline = Generator.from_pretrained(exports[fam]["inline"]).score(ids)
    assert np.abs(la - fn).max() <= 1e-5
    assert np.abs(la - pl).max() <= 1e-5
    assert np.abs(la - inline).max() <= 1e-5


def test_plugin_flavor_with_external_weights_cleans_rewrites_left_by_dead_processes(models, exports, tmp_path):
    """The plugin flavor's rewritten graph goes beside external weights and is
    deleted once loaded; one left by a process killed before that is deleted by
    the next load, while those of live processes and of other hosts stay."""
    import hashlib
    import socket
    import subprocess
    import sys

    pytest.importorskip("onnxruntime_extensions")
    src = exports["llama"]["plugin"]
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(onnx.load(str(src / "model.onnx")), str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data")
    assert (folder / "model.onnx.data").stat().st_size > 1 << 16
    (folder / "manifest.json").write_bytes((src / "manifest.json").read_bytes())
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)
    here = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    elsewhere = hashlib.sha256(b"another-host").hexdigest()[:8]
    orphan = folder / f".model.ort-plugin-{dead}-{here}-x1.onnx"
    kept = [folder / f".model.ort-plugin-{os.getppid()}-{here}-x2.onnx",  # a live process's, about to load
            folder / f".model.ort-plugin-{dead}-{elsewhere}-x3.onnx"]      # a pid of another machine
    for f in [orphan, *kept]:
        f.write_bytes(b"graph")

    ids = np.random.default_rng(3).integers(0, models["llama"].config.vocab_size, size=(1, 21))
    got = Generator.from_pretrained(folder).score(ids)
    assert np.abs(got - Generator.from_pretrained(exports["llama"]["linear-attention"]).score(ids)).max() <= 1e-5
    assert sorted(folder.glob(".*ort-plugin*")) == sorted(kept)


@pytest.mark.parametrize("op", ["linear-attention", "inline"])
@pytest.mark.parametrize("fam", ["gpt_neox", "llama"])
def test_greedy_64_tokens_identical_to_recurrent(models, exports, fam, op, tmp_path):
    model = models[fam]
    folder = tmp_path / "last"
    export_model(model, folder, ExportOptions(logits="last", max_chunk=8, attention_op=op))
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, size=13).tolist()
    ours = Generator.from_pretrained(folder).generate(prompt, max_new_tokens=64).token_ids[0]
    from dijiang_deploy.verify import _torch_greedy

    assert ours == _torch_greedy(model, prompt, 64, eos=set())[: len(ours)]
    assert len(ours) >= 1


@pytest.mark.parametrize("op", ["linear-attention", "inline"])
def test_batch_rows_of_different_lengths(models, exports, op):
    gen = Generator.from_pretrained(exports["llama"][op])
    a = np.arange(3, 12).tolist()
    b = np.arange(20, 50).tolist()
    both = gen.generate([a, b], max_new_tokens=6)
    alone_a = gen.generate(a, max_new_tokens=6).token_ids[0]
    alone_b = gen.generate(b, max_new_tokens=6).token_ids[0]
    assert both.token_ids == [alone_a, alone_b]


@pytest.mark.parametrize("flavor", ["linear-attention", "function", "plugin", "inline"])
def test_checker_and_shape_inference(exports, flavor):
    register_schema()
    path = exports["llama"][flavor] / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    for out in inferred.graph.output:
        assert len(out.type.tensor_type.shape.dim) >= 3, out.name
    # No tensor grows with the sequence squared: no [.., L, L] value anywhere.
    for vi in inferred.graph.value_info:
        dims = [d.dim_param for d in vi.type.tensor_type.shape.dim]
        # (the function body and the inline graph hold one chunk's [L, L] decay)
        assert dims.count("sequence") < 2 or flavor in ("function", "inline"), vi.name
    man = Manifest.load(exports["llama"][flavor])
    opsets = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
    assert man.opset == opsets[""] == {"linear-attention": 27, "inline": 23}.get(flavor, 21)
    assert sum(man.decode_ops_per_layer.values()) > 10


def test_state_path_is_float32_in_fp16_export(models, tmp_path):
    folder = tmp_path / "fp16"
    man = export_model(models["llama"], folder, ExportOptions(dtype="fp16", logits="all", max_chunk=8))
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(folder / "model.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output)}
    la_nodes = [n for n in proto.graph.node if n.op_type == "LinearAttention"]
    assert len(la_nodes) == models["llama"].config.num_layers
    for node in la_nodes:
        for name in list(node.input) + list(node.output):
            assert types[name] == onnx.TensorProto.FLOAT, name
    assert man.outputs[0].dtype == "float16" and all(t.dtype == "float32" for t in man.outputs[1:])
    ids = np.random.default_rng(0).integers(0, models["llama"].config.vocab_size, size=(1, 40))
    got = Generator.from_pretrained(folder).score(ids)
    assert np.isfinite(got).all()
    ref = _torch_logits(models["llama"], ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_general_decay_exports_with_linear_rule(tmp_path):
    model = random_model("gpt_neox", seed=9, max_position_embeddings=64)
    gen_ = torch.Generator().manual_seed(0)
    for attn in model.attention_layers():
        with torch.no_grad():
            attn.D1.mul_(1 + 0.2 * torch.rand(attn.D1.shape, generator=gen_, dtype=attn.D1.dtype))
    model.refresh_decay()
    folder = tmp_path / "general"
    man = export_model(model, folder, ExportOptions(logits="all", max_chunk=8))
    assert man.decay == "general" and man.position_limit == 2048
    rules = {onnx.helper.get_attribute_value(a) for n in onnx.load(str(folder / "model.onnx")).graph.node for a in n.attribute if a.name == "update_rule"}
    assert rules == {b"linear"}
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, size=(2, 30))
    assert np.abs(Generator.from_pretrained(folder).score(ids) - _torch_logits(model, ids)).max() <= FP32_TOL
    gen = Generator.from_pretrained(folder)
    with pytest.raises(PositionLimitError, match="2048"):
        gen.generate([i % 90 for i in range(2049)], max_new_tokens=1)


def test_bad_folders(exports, tmp_path):
    with pytest.raises(ExportError, match="no manifest.json"):
        Generator.from_pretrained(tmp_path)
    with pytest.raises(ExportError, match="no such file"):
        Generator.from_pretrained(tmp_path / "nope")
    # A manifest that does not match its graph.
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exports["gpt_neox"]["linear-attention"], bad)
    good = json.loads((bad / "manifest.json").read_text())

    def edited(**changes) -> dict:
        data = json.loads(json.dumps(good))
        for key, value in changes.items():
            if key == "heads":  # a self-consistent manifest whose state is wider than the graph's
                data["state_shape"][0] = value
                for t in data["inputs"][3:] + data["outputs"][1:]:
                    t["shape"][1] = value
            elif key == "first_input":
                data["inputs"][0]["name"] = value
            else:
                data[key] = value
        return data

    cases = [
        (edited(num_layers=good["num_layers"] - 1), "num_layers 1 needs the inputs"),
        (edited(first_input="tokens"), "but it lists 5 inputs \\(tokens"),
        (edited(state_shape=[good["state_shape"][0] + 1, *good["state_shape"][1:]]), "state_shape"),
        (edited(vocab_size=good["vocab_size"] + 1), "vocab_size"),
        (edited(state_shape="4x16x16"), "malformed manifest: state_shape must be"),
        (edited(num_layers="2"), "malformed manifest: num_layers must be"),
        (edited(heads=good["state_shape"][0] + 1), "past_state.0 has shape .* in the graph"),
    ]
    for data, message in cases:
        (bad / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ExportError, match=message):
            Generator.from_pretrained(bad)
    # A tokenizer config without the tokenizer file it needs (tokenizer.json deleted).
    (bad / "manifest.json").write_text(json.dumps(good))
    (bad / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ExportError, match="tokenizer_config.json but no tokenizer.json; copy it from the checkpoint"):
        Generator.from_pretrained(bad)
    assert Generator.from_pretrained(bad, load_tokenizer=False).tokenizer is None
    gen = Generator.from_pretrained(exports["gpt_neox"]["linear-attention"])
    with pytest.raises(DiJiangError, match="empty prompt"):
        gen.generate([], max_new_tokens=3)


def test_export_is_atomic(models, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx, "save_model", boom)
    with pytest.raises(RuntimeError):
        export_model(models["gpt_neox"], tmp_path / "out", ExportOptions())
    assert list(tmp_path.iterdir()) == []
