"""Activation-aware scaling before int8/int4 quantization (issue #7).

The rescaled model must compute the same function in float32 (it is an exact
reparametrisation), the search must see the same rounding the export applies,
and on a model with outlier activation channels (planted by an equivalent
rescaling, as real LLMs have them) the calibrated int4 export must be clearly
closer to float32 than plain round-to-nearest.

Tolerances: float equivalence 1e-4 on logits (measured ~6e-7); the outlier
model's int4 RMS logit error ratio calibrated / RTN <= 0.7 (measured 0.47).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import torch

from dijiang_deploy.cli import main
from dijiang_deploy.contract.errors import DiJiangError
from dijiang_deploy.export import ExportOptions, Manifest, export_model
from dijiang_deploy.export import quantized
from dijiang_deploy.quantization import nbits, qdq, select
from dijiang_deploy.quantization.calibrate import (
    CalibrationConfig,
    _groups,
    calibrate_for_quantization,
    calibration_ids,
    ort_rtn,
)
from dijiang_deploy.runtime import Generator
from dijiang_deploy.testing import random_model


def _ids(vocab: int, rows: int = 4, n: int = 64) -> torch.Tensor:
    return calibration_ids(None, vocab, CalibrationConfig(tokens=rows * n, seq_len=n))[0]


@torch.no_grad()
def _plant_outliers(model, factor: float = 30.0, channels: int = 3):
    """An equivalent model whose norm outputs have a few huge channels.

    Multiplies a few channels of each norm's output by ``factor`` and divides
    the matching input columns of the layers that read it, so the float
    function is unchanged but round-to-nearest blocks holding those columns
    lose most of their resolution on the other weights: what trained LLMs
    look like (activation outliers) and what calibration exists to fix.
    """
    model = copy.deepcopy(model)
    for layer_groups in _groups(model):
        for g in layer_groups:
            if g.name not in ("attn_in", "mlp_in"):
                continue
            width = g.weights[0][0].shape[1] if g.weights[0][1] == 1 else g.weights[0][0].shape[0]
            s = torch.ones(width)
            s[torch.randperm(width, generator=torch.Generator().manual_seed(width))[:channels]] = factor
            g.fold(1 / s)  # the norm's output grows by s
            for w, axis in g.weights:
                w.div_(s[None, :] if axis == 1 else s[:, None])
    return model


@pytest.mark.parametrize("fam", ["llama", "gpt_neox"])
def test_scaling_is_exact_in_float(fam):
    model = _plant_outliers(random_model(fam, seed=3, tie_word_embeddings=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, model.config.vocab_size, (2, 30))
    with torch.no_grad():
        want = model(x, mode="parallel").logits
    scaled, report = calibrate_for_quantization(model, _ids(model.config.vocab_size), 4, 16, True, progress=False)
    assert any(a > 0 for a in report.alphas.values()), "no group was rescaled: the test would prove nothing"
    assert report.error_after < report.error_before
    with torch.no_grad():
        got = scaled(x, mode="parallel").logits
    assert float((got - want).abs().max()) <= 1e-4
    # The input is left untouched, though the copy shares its embedding and
    # head (no group scales them; a vocabulary-sized model is not held twice).
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert scaled.body.embed.weight is model.body.embed.weight and scaled.head.weight is model.head.weight
    assert scaled.body.layers[0].attn.W_G is not model.body.layers[0].attn.W_G
    # GPT-NeoX's 4h->h projection follows a GELU: never rescaled.
    if fam == "gpt_neox":
        assert all(a == 0 for k, a in report.alphas.items() if k.endswith("down_in"))


def test_in_place_calibration_is_the_copy_s_and_export_checkpoint_leaves_the_checkpoint(tmp_path):
    """in_place rescales the model itself to exactly what the copy gets;
    export_checkpoint (which owns its model) uses it, and its export is byte
    for byte export_model's on an untouched model, the checkpoint unchanged."""
    from dijiang_deploy import load_model
    from dijiang_deploy.checkpoint import save_checkpoint
    from dijiang_deploy.export import export_checkpoint
    from dijiang_deploy.export.graph import checkpoint_sha256

    model = _plant_outliers(random_model("llama", seed=3, tie_word_embeddings=False))
    ids = _ids(model.config.vocab_size)
    copied, report = calibrate_for_quantization(model, ids, 4, 16, True, progress=False)
    same, report2 = calibrate_for_quantization(model, ids, 4, 16, True, progress=False, in_place=True)
    assert same is model and copied is not model
    assert report2.alphas == report.alphas and any(a > 0 for a in report.alphas.values())
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in model.state_dict().items())

    ckpt = save_checkpoint(_plant_outliers(random_model("llama", seed=3, tie_word_embeddings=False)), tmp_path / "ckpt")
    digest = checkpoint_sha256(ckpt)
    opts = ExportOptions(weights="int4", block_size=16, calibration_tokens=256)
    export_checkpoint(ckpt, tmp_path / "consumed", opts)
    untouched = load_model(ckpt)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    export_model(untouched, tmp_path / "copied", opts, tokenizer_dir=ckpt)
    assert all(torch.equal(v, before[k]) for k, v in untouched.state_dict().items())
    assert checkpoint_sha256(ckpt) == digest
    assert Manifest.load(tmp_path / "consumed").quantization["calibration"]["method"] != "none"
    assert (tmp_path / "consumed" / "model.onnx").read_bytes() == (tmp_path / "copied" / "model.onnx").read_bytes()


@pytest.mark.parametrize("bits,symmetric", [(4, True), (4, False), (8, True), (8, False)])
def test_ort_rtn_is_what_the_export_holds(bits, symmetric):
    """The search's quantizer and the exported MatMulNBits dequantize identically."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((64, 24)) * rng.uniform(0.1, 3, (64, 1))).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 24])  # not "logits": no head
    node = helper.make_node("MatMul", ["x", "w"], ["y0"], name="mm")
    relu = helper.make_node("Relu", ["y0"], ["y"], name="relu")
    graph = helper.make_graph([node, relu], "g", [x], [y], [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    opts = ExportOptions(weights=f"int{bits}", block_size=16, symmetric=symmetric, quantize_head=False)
    (got,) = qdq.dequantized_weights(nbits.quantize_weights(proto, opts)).values()
    want = ort_rtn(w, bits, 16, symmetric)
    np.testing.assert_array_equal(got, want)
    assert np.abs(want - w).max() > 0  # it did quantize


@pytest.fixture(scope="module")
def outlier_exports(module_tmp):
    model = _plant_outliers(random_model("llama", seed=11))
    root = module_tmp("calib")
    out = {"model": model}
    for name, calibrate in (("rtn", False), ("calibrated", True)):
        opts = ExportOptions(weights="int4", logits="all", quantize_head=False, calibrate=calibrate, calibration_tokens=256)
        export_model(model, root / name, opts)
        out[name] = root / name
    return out


def test_calibrated_int4_is_closer_to_float(outlier_exports):
    model = outlier_exports["model"]
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, 48))
    with torch.no_grad():
        want = model(torch.as_tensor(ids), mode="parallel").logits.numpy()
    err = {}
    for name in ("rtn", "calibrated"):
        got = Generator.from_pretrained(outlier_exports[name]).score(ids)
        err[name] = float(np.sqrt(((got - want) ** 2).mean()))
    assert err["calibrated"] <= 0.7 * err["rtn"], err


def test_record_and_opt_out(outlier_exports):
    rec = Manifest.load(outlier_exports["calibrated"]).quantization["calibration"]
    assert rec["method"] == "activation-aware scaling"
    assert rec["tokens"] == 256 and rec["groups"] == 2 * 4
    assert rec["relative_error_after"] < rec["relative_error_before"]
    assert "calibration" not in Manifest.load(outlier_exports["rtn"]).quantization
    # The graph's own record (what check_quantized_export reads) carries it too.
    proto = onnx.load(str(outlier_exports["calibrated"] / "model.onnx"), load_external_data=False)
    assert nbits.quantization_info(proto)["calibration"]["tokens"] == 256


def test_user_calibration_text(tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    ids, _ = calibration_ids(None, 256, CalibrationConfig(tokens=512, seq_len=128, data=str(text)))
    assert ids.shape == (4, 128) and ids.dtype == torch.long
    assert bytes(ids[0, :9].tolist()) == b"The quick"
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(DiJiangError, match="fewer than one sequence"):
        calibration_ids(None, 256, CalibrationConfig(tokens=512, seq_len=128, data=str(short)))


def test_cli_errors(tiny_dirs, tmp_path, capsys):
    ckpt = str(tiny_dirs["llama"])
    assert main(["export", ckpt, "-o", str(tmp_path / "a"), "--calibration-tokens", "64"]) == 2
    assert "int8/int4 exports only" in capsys.readouterr().err
    missing = str(tmp_path / "nope.txt")
    assert main(["export", ckpt, "-o", str(tmp_path / "b"), "--weights", "int8", "--calibration-data", missing]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # 0 is a bad value, not "use the default"
    assert main(["export", ckpt, "-o", str(tmp_path / "z"), "--weights", "int8", "--calibration-tokens", "0"]) == 2
    assert "--calibration-tokens must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
    assert main(["export", ckpt, "-o", str(tmp_path / "c"), "--weights", "int8", "--no-calibrate"]) == 0
    assert "calibration" not in json.loads((tmp_path / "c" / "manifest.json").read_text())["quantization"]


def test_zero_points_default_only_where_ort_alone_reads_the_graph(outlier_exports):
    from dijiang_deploy.export.graph import resolve_attention_op

    model = outlier_exports["model"]
    # int4 inline (what auto picks for fp32 activations): asymmetric blocks.
    man = Manifest.load(outlier_exports["calibrated"])
    assert man.flavor == "inline" and man.quantization["symmetric"] is False
    proto = onnx.load(str(outlier_exports["calibrated"] / "model.onnx"), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    four = [n for n in nodes if {a.name: a.i for a in n.attribute}["bits"] == 4]
    assert four and all(len(n.input) >= 4 and n.input[3] for n in four)  # every 4-bit node has zero points
    # TensorRT-bound flavors and int8 stay symmetric; an explicit choice wins.
    for opts, want in (
        (ExportOptions(weights="int4", attention_op="plugin"), True),
        (ExportOptions(weights="int4", attention_op="linear-attention"), True),
        (ExportOptions(weights="int8"), True),
        (ExportOptions(weights="int4"), False),
        (ExportOptions(weights="int4", symmetric=True), True),
    ):
        assert resolve_attention_op(model, opts).symmetric is want, opts


def test_quantize_export_equals_uncalibrated_export(tmp_path):
    """Quantizing a float export folder gives export_model's graph without calibration."""
    from dijiang_deploy.contract.errors import ExportError

    model = random_model("llama", seed=4)
    export_model(model, tmp_path / "fp32", ExportOptions(logits="all"))
    record = quantized.quantize_export(tmp_path / "fp32", tmp_path / "q", ExportOptions(weights="int4"))
    export_model(model, tmp_path / "direct", ExportOptions(weights="int4", logits="all", calibrate=False))
    man, direct = Manifest.load(tmp_path / "q"), Manifest.load(tmp_path / "direct")
    assert man.weights == "int4" and man.flavor == "inline"
    assert record["symmetric"] is False and man.quantization["symmetric"] is False  # the inline rule
    assert "calibration" not in man.quantization
    assert man.quantization["quantized_matmuls"] == direct.quantization["quantized_matmuls"]
    got = qdq.dequantized_weights(onnx.load(str(tmp_path / "q" / "model.onnx")))
    want = qdq.dequantized_weights(onnx.load(str(tmp_path / "direct" / "model.onnx")))
    assert sorted(map(np.shape, got.values())) == sorted(map(np.shape, want.values()))
    for a, b in zip(sorted(got.values(), key=lambda w: (w.shape, float(w.sum()))), sorted(want.values(), key=lambda w: (w.shape, float(w.sum())))):
        np.testing.assert_array_equal(a, b)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, size=(1, 20))
    np.testing.assert_allclose(
        Generator.from_pretrained(tmp_path / "q").score(ids), Generator.from_pretrained(tmp_path / "direct").score(ids), atol=1e-5
    )
    with pytest.raises(ExportError, match="float32 export"):
        quantized.quantize_export(tmp_path / "q", tmp_path / "qq", ExportOptions(weights="int8"))
    assert not (tmp_path / "qq").exists()


def test_quantize_export_keeps_named_nodes_float(tmp_path):
    """``keep_float`` (mixed-precision studies) leaves exactly those MatMuls in
    float32, with their weights untouched, and the export still runs."""
    from onnx import numpy_helper

    model = random_model("llama", seed=5)
    export_model(model, tmp_path / "fp32", ExportOptions(logits="all"))
    fp32 = onnx.load(str(tmp_path / "fp32" / "model.onnx"))
    selected, _ = select.find_linear_weights(fp32)
    keep = [w for w in selected if w.weight.startswith("layers.0.")]
    assert keep and len(keep) < len(selected)
    record = quantized.quantize_export(tmp_path / "fp32", tmp_path / "q", ExportOptions(weights="int8"), keep_float=[w.node for w in keep])
    assert record["quantized_matmuls"] == len(selected) - len(keep)
    quant = onnx.load(str(tmp_path / "q" / "model.onnx"))
    by_name = {n.name: n for n in quant.graph.node}
    inits = {t.name: t for t in quant.graph.initializer}
    orig = {t.name: t for t in fp32.graph.initializer}
    for w in keep:
        assert by_name[w.node].op_type == "MatMul"
        np.testing.assert_array_equal(numpy_helper.to_array(inits[w.weight]), numpy_helper.to_array(orig[w.weight]))
    assert sum(n.op_type == "MatMulNBits" for n in quant.graph.node) == len(selected) - len(keep)
    ids = np.random.default_rng(3).integers(0, model.config.vocab_size, size=(1, 12))
    assert np.isfinite(Generator.from_pretrained(tmp_path / "q").score(ids)).all()
    from dijiang_deploy.contract.errors import ExportError

    with pytest.raises(ExportError, match="not quantizable linear MatMuls: no_such_node"):
        quantized.quantize_export(tmp_path / "fp32", tmp_path / "bad", ExportOptions(weights="int8"), keep_float=["no_such_node"])
    assert not (tmp_path / "bad").exists()


def test_calibration_text_does_not_depend_on_installed_packages(tmp_path, monkeypatch):
    """Two machines with different packages installed calibrate on the same tokens: the
    package's own text, whose SHA-256 each quantized export records."""
    import sys

    import dijiang_deploy.quantization.calibrate  # noqa: F401  (imported before sys.path is narrowed)
    import dijiang_deploy.finetune.data  # noqa: F401
    from dijiang_deploy.data import calibration_text, text_sha256

    config = CalibrationConfig(tokens=512, seq_len=128)
    got = []
    for i, words in enumerate(("apples pears plums", "engines valves pistons")):
        site = tmp_path / f"site{i}"
        (site / "pkg-1.0.dist-info").mkdir(parents=True)
        (site / "pkg-1.0.dist-info" / "METADATA").write_text("Name: pkg\n\n" + (words + ". ") * 400)
        monkeypatch.setattr(sys, "path", [str(site)])  # the only "installed" package on this "machine"
        got.append(calibration_ids(None, 256, config))
        monkeypatch.undo()
    (a, record), (b, _) = got
    assert torch.equal(a, b)
    assert record == {"data": "built-in calibration text", "data_sha256": text_sha256(calibration_text()), "tokens": 512}
