"""The directly built step graph (``--attention-op inline``) against PyTorch."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from dijiang_deploy.contract.errors import DiJiangError, ExportError
from dijiang_deploy.export import ExportOptions, export_model
from dijiang_deploy.export.direct import build_step_graph
from dijiang_deploy.modeling.model import DiJiangState
from dijiang_deploy.testing import random_model

TOL = 1e-4  # max abs difference, float32 (measured ~1e-6)

CASES = {
    "neox": ("gpt_neox", {}),
    "neox-full-rotary-no-bias": ("gpt_neox", {"rotary_pct": 1.0, "attention_bias": False, "use_parallel_residual": False}),
    "llama-gqa": ("llama", {}),
    "llama-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}}),
    "llama-mha-untied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
}


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _feed(model, ids, mask, state):
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "past_position": state.position.numpy()}
    feed.update({f"past_state.{i}": t.numpy() for i, t in enumerate(state.layers)})
    return feed


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("length", [1, 7])
def test_step_matches_pytorch_with_padding_and_state(case, length):
    """Non-zero incoming state, rows at different positions, left padding."""
    family, overrides = CASES[case]
    model = random_model(family, seed=3, **overrides)
    cfg = model.config
    sess = _session(build_step_graph(model, logits="all"))
    gen = torch.Generator().manual_seed(length)
    batch = 3
    ids = torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, : length // 2] = 0
    mask[2, :] = 0 if length == 1 else 1  # a finished row (decode) / a full row (prefill)
    state = DiJiangState(
        [torch.randn(batch, *cfg.state_shape, generator=gen) * 0.1 for _ in range(cfg.num_layers)],
        torch.tensor([0, 5, 900]),
    )
    with torch.no_grad():
        ref = model.step(ids, state, mask, mode="parallel")
    out = sess.run(None, _feed(model, ids, mask, state))
    real = mask.bool().numpy()
    if real.any():
        assert np.abs(out[0] - ref.logits.numpy())[real].max() <= TOL
    for got, want in zip(out[1:], ref.state.layers):
        assert np.abs(got - want.numpy()).max() <= TOL
    if length == 1:  # a padded decode row leaves its state exactly as it was
        for got, before in zip(out[1:], state.layers):
            assert np.array_equal(got[2], before[2].numpy())


def test_prefill_then_decode_equals_one_pass():
    model = random_model("llama", seed=5)
    cfg = model.config
    sess = _session(build_step_graph(model, logits="all"))
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    state = model.new_state(2)
    logits = []
    for start, stop in ((0, 9), (9, 18), (18, 19), (19, 20)):
        chunk = ids[:, start:stop]
        out = sess.run(None, _feed(model, chunk, torch.ones_like(chunk), state))
        logits.append(out[0])
        state = DiJiangState([torch.from_numpy(s) for s in out[1:]], state.position + chunk.shape[1])
    with torch.no_grad():
        ref = model(ids, mode="recurrent").logits.numpy()
    assert np.abs(np.concatenate(logits, 1) - ref).max() <= TOL


def _poisoned(proto: onnx.ModelProto, branch: str) -> tuple[onnx.ModelProto, int]:
    """A copy whose If nodes' ``branch`` yields NaN attention outputs, and the number of Ifs."""
    proto = copy.deepcopy(proto)
    ifs = [n for n in proto.graph.node if n.op_type == "If"]
    for node in ifs:
        sub = next(a.g for a in node.attribute if a.name == branch)
        out = sub.output[0]
        raw = onnx.helper.make_node("Identity", [out.name], [out.name + ".raw"])
        sub.node.append(raw)
        nan = onnx.helper.make_tensor(out.name + ".nan", onnx.TensorProto.FLOAT, [], [float("nan")])
        sub.initializer.append(nan)
        sub.node.append(onnx.helper.make_node("Mul", [out.name + ".raw", nan.name], [out.name + ".poison"]))
        out.name = out.name + ".poison"
    return proto, len(ifs)


def test_one_token_steps_take_the_short_branch():
    """Decode steps run the If's one-token branch, longer steps the chunk branch.

    Poisoning one branch with NaN shows which one ran; the other still
    matches the PyTorch reference.
    """
    model = random_model("llama", seed=4)
    cfg = model.config
    proto = build_step_graph(model, logits="all")
    state = DiJiangState([torch.randn(2, *cfg.state_shape) * 0.1 for _ in range(cfg.num_layers)], torch.tensor([3, 8]))
    for length, branch in ((1, "else_branch"), (5, "then_branch")):
        ids = torch.randint(0, cfg.vocab_size, (2, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            ref = model.step(ids, state, mask, mode="parallel").logits.numpy()
        feed = _feed(model, ids, mask, state)
        poisoned, n_if = _poisoned(proto, branch)
        assert n_if == cfg.num_layers
        assert np.abs(_session(poisoned).run(None, feed)[0] - ref).max() <= TOL
        other, _ = _poisoned(proto, "then_branch" if branch == "else_branch" else "else_branch")
        assert np.isnan(_session(other).run(None, feed)[0]).all()


def test_far_fewer_nodes_per_layer_than_the_traced_graph(tmp_path):
    """Nodes one more layer adds (the per-step preamble cancels out)."""
    counts = {}
    for layers in (2, 3):
        model = random_model("llama", seed=1, num_hidden_layers=layers)
        for op in ("linear-attention", "inline"):
            man = export_model(model, tmp_path / f"{op}{layers}", ExportOptions(attention_op=op))
            counts[op, layers] = sum(man.decode_ops_per_layer.values()) * layers
            counts[op, layers, "Transpose"] = man.decode_ops_per_layer.get("Transpose", 0) * layers
            if op == "inline":
                assert "Scan" not in man.decode_ops_per_layer and "LinearAttention" not in man.decode_ops_per_layer
                assert man.flavor == "inline"
    traced = counts["linear-attention", 3] - counts["linear-attention", 2]
    inline = counts["inline", 3] - counts["inline", 2]
    assert inline <= 40 and inline <= 0.6 * traced, (inline, traced)
    # The one-token branch splits heads with reshapes alone.
    assert abs(counts["inline", 3, "Transpose"] - counts["inline", 2, "Transpose"]) < 0.1  # counts are rounded


def test_quantized_inline_export_runs(tmp_path):
    from dijiang_deploy.runtime import Generator

    model = random_model("llama", seed=2)
    ref = export_model(model, tmp_path / "fp32", ExportOptions(attention_op="inline", logits="all"))
    man = export_model(
        model, tmp_path / "int8", ExportOptions(attention_op="inline", logits="all", weights="int8", quantize_head=True)
    )
    assert man.weights == "int8" and man.quantization["quantized_matmuls"] == 4 * model.config.num_layers + 1
    assert man.quantization["roles"]["head"] == 1 and man.quantization["head_bits"] == 8
    default = export_model(model, tmp_path / "int8-default", ExportOptions(attention_op="inline", weights="int8"))
    assert default.quantization["quantized_matmuls"] == 4 * model.config.num_layers
    assert "head" not in default.quantization["roles"] and default.quantization["quantize_head"] is False
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, size=(1, 24))
    a = Generator.from_pretrained(tmp_path / "fp32").score(ids)
    b = Generator.from_pretrained(tmp_path / "int8").score(ids)
    assert ref.weights == "fp32"
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_refusals(tmp_path):
    model = random_model("gpt_neox", seed=9)
    with pytest.raises(ExportError, match="float32"):
        build_step_graph(model, dtype="fp16")
    for attn in model.attention_layers():
        with torch.no_grad():
            attn.D1.mul_(1.5)
    model.refresh_decay()
    with pytest.raises(ExportError, match="geometric"):
        export_model(model, tmp_path / "general", ExportOptions(attention_op="inline"))
    assert not (tmp_path / "general").exists()
    with pytest.raises(DiJiangError, match="attention-op"):
        ExportOptions(attention_op="fast").validate()
