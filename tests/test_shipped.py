"""The shipped trained conversion: the delta format against the model it encodes,
its integrity checks, and ``convert --model smollm2`` building from it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from dijiang_deploy.contract.errors import CheckpointError, DiJiangError
from dijiang_deploy.modeling.decay import geometric_tables
from dijiang_deploy.shipped import MANIFEST_NAME, apply_delta, check_base, encode_delta, read_delta, shipped_delta, write_delta
from dijiang_deploy.testing import random_model

from _support import requires_smollm2

#: Hidden size whose square matrices exceed the exact-storage limit, so that the
#: low-rank and int8 encodings are exercised.
HIDDEN = 320


def _pair(seed: int = 0):
    """An untrained conversion and a "trained" copy changed the ways training changes it."""
    untrained = random_model("llama", seed=seed, hidden_size=HIDDEN, num_attention_heads=5, num_key_value_heads=5,
                             intermediate_size=2 * HIDDEN, num_hidden_layers=2)
    trained = copy.deepcopy(untrained)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for attn in trained.attention_layers():
            attn.W_G.add_(0.01 * torch.randn(attn.W_G.shape, generator=g))
            attn.group_norm.weight.mul_(1.1)
            attn.proj_matrix.add_(0.01 * torch.randn(attn.proj_matrix.shape, generator=g))
            q = attn.q_proj.weight
            q.add_(0.02 * torch.randn(q.shape[0], 3, generator=g) @ torch.randn(3, q.shape[1], generator=g))
            attn.o_proj.weight.add_(0.01 * torch.randn(attn.o_proj.weight.shape, generator=g))
            log_gamma = torch.log(torch.linspace(0.9, 0.99, attn.num_heads, dtype=torch.float64))
            d1, d2 = geometric_tables(log_gamma, attn.D1.shape[2])
            attn.D1.copy_(d1)
            attn.D2.copy_(d2)
    trained.refresh_decay()
    return untrained, trained


@pytest.fixture()
def written(tmp_path):
    untrained, trained = _pair()
    base = tmp_path / "base.gguf"
    base.write_bytes(b"the base weights' source file")
    out = write_delta(trained, untrained, tmp_path / "delta", base, {"recipe": "test"}, max_file_bytes=200_000)
    return {"untrained": untrained, "trained": trained, "base": base, "out": out}


def test_encoding_picks_the_smallest_faithful_form():
    untrained, trained = _pair()
    _, entries = encode_delta(trained, untrained)
    kinds = {name.split(".")[-2] + "." + name.split(".")[-1]: e["kind"] for name, e in entries.items()}
    assert kinds["self_attn.W_G"] == "int8" and kinds["o_proj.weight"] == "int8"
    assert kinds["q_proj.weight"] == "lowrank" and kinds["group_norm.weight"] == "exact"
    assert kinds["self_attn.log_gamma"] == "decay"
    assert [e["rank"] for e in entries.values() if e["kind"] == "lowrank"] == [3, 3]
    # Untouched base tensors (MLPs, norms, embeddings, k/v) are not stored at all.
    assert not any(".mlp." in n or "layernorm" in n or "embed" in n or "k_proj" in n for n in entries)


def test_delta_rebuilds_the_trained_model(written):
    rebuilt = apply_delta(copy.deepcopy(written["untrained"]), read_delta(written["out"]))
    got, want = rebuilt.state_dict(), written["trained"].state_dict()
    for name, value in want.items():
        err = (got[name].double() - value.double()).abs().max().item()
        scale = value.double().abs().max().item()
        if name.endswith(("W_G", "o_proj.weight")):
            # int8 with a float16 scale per 64 inputs: half a step of the block's largest value / 127.
            assert err <= scale / 127 * 0.5 + 1e-7, name
        elif name.endswith("q_proj.weight"):
            assert err <= 2e-3 * 0.02 * 3 * 16 + 1e-6, name  # float16 factors of a rank-3 change
        elif name.endswith(("D1", "D2")):
            assert torch.allclose(got[name], value, rtol=1e-12, atol=0), name
        else:
            assert torch.equal(got[name], value), name
    ids = torch.randint(0, rebuilt.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = rebuilt(ids).logits, written["trained"](ids).logits
    assert (a - b).abs().max() < 1e-2 * b.abs().max()
    assert rebuilt.attention_layers()[0].geometric


def test_delta_files_stay_under_the_size_limit_and_keep_each_tensor_whole(written):
    from safetensors import safe_open

    manifest = json.loads((written["out"] / MANIFEST_NAME).read_text())
    assert len(manifest["files"]) > 1 and all(f["bytes"] < 200_000 + 4096 for f in manifest["files"])
    assert manifest["record"] == {"recipe": "test"}
    where: dict[str, set[str]] = {}
    for f in manifest["files"]:
        with safe_open(str(written["out"] / f["name"]), framework="pt") as fh:
            for key in fh.keys():
                where.setdefault(key.rsplit("/", 1)[0], set()).add(f["name"])
    # Every part of a tensor (b/a, q/scale) in the one file the manifest names for it.
    assert all(files == {manifest["tensors"][name]["file"]} for name, files in where.items())


def test_split_by_bytes_never_cuts_a_group():
    from dijiang_deploy.checkpoint import split_by_bytes

    parts = {f"t{i}/{p}": torch.zeros(100) for i in range(5) for p in ("a", "b")}  # 400 bytes each
    files = split_by_bytes(parts, 1200, group=lambda k: k.split("/")[0])
    assert [sorted(f) for f in files] == [["t0/a", "t0/b"], ["t1/a", "t1/b"], ["t2/a", "t2/b"], ["t3/a", "t3/b"],
                                          ["t4/a", "t4/b"]]
    # Without groups three tensors fit in 1200 bytes, and t1's parts are cut apart.
    assert sorted(split_by_bytes(parts, 1200)[0]) == ["t0/a", "t0/b", "t1/a"]


def test_missing_truncated_or_altered_files_are_one_line_errors(written):
    out = written["out"]
    first = sorted(out.glob("delta-*.safetensors"))[0]
    data = first.read_bytes()
    first.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_delta(out)
    first.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="altered"):
        read_delta(out)
    first.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_delta(out)
    (out / MANIFEST_NAME).write_text(json.dumps({"format": "dijiang-delta/1"}))
    with pytest.raises(CheckpointError, match="lacks config, base, files, tensors"):
        read_delta(out)
    (out / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_delta(out)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="not a trained-conversion delta"):
        read_delta(out)


def test_other_base_weights_or_format_are_refused(written, tmp_path):
    delta = read_delta(written["out"])
    check_base(delta, written["base"])
    other = tmp_path / "other.gguf"
    other.write_bytes(b"other weights")
    with pytest.raises(CheckpointError, match="base weights differ"):
        check_base(delta, other)
    manifest = json.loads((written["out"] / MANIFEST_NAME).read_text())
    manifest["format"] = "dijiang-delta/99"
    (written["out"] / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format"):
        read_delta(written["out"])


def test_a_delta_for_another_architecture_is_refused(written):
    other = random_model("llama", seed=0)
    with pytest.raises(CheckpointError, match="does not fit"):
        apply_delta(other, read_delta(written["out"]))
    with pytest.raises(DiJiangError, match="architecture"):
        encode_delta(written["trained"], other)


def test_unknown_shipped_name():
    with pytest.raises(DiJiangError, match="no trained conversion is shipped"):
        shipped_delta("llama")


# -- the delta in the package ----------------------------------------------------


@requires_smollm2
def test_shipped_delta_is_intact_small_and_recorded():
    from dijiang_deploy.convert import embedded_model_path

    delta = read_delta(shipped_delta("smollm2"))  # sizes and SHA-256 of every file
    check_base(delta, embedded_model_path("smollm2"))
    files = delta.manifest["files"]
    assert sum(f["bytes"] for f in files) <= 30 << 20 and all(f["bytes"] <= 16 << 20 for f in files)
    record = delta.record
    for key in ("recipe", "budget_minutes", "hardware", "train_tokens", "command", "commit", "heldout_perplexity"):
        assert record.get(key), key


@requires_smollm2
def test_convert_refuses_untrained_options_for_the_shipped_model(tmp_path, capsys):
    from dijiang_deploy.cli import main

    assert main(["convert", "--model", "smollm2", "--seed", "3", "-o", str(tmp_path / "x")]) == 2
    assert "--untrained" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "--untrained", "-o", str(tmp_path / "y")]) == 2


@pytest.mark.slow
@requires_smollm2
def test_convert_smollm2_gives_the_shipped_model_at_its_recorded_perplexity(tmp_path):
    from dijiang_deploy.cli import main
    from dijiang_deploy.finetune.perplexity import evaluate

    out = tmp_path / "shipped"
    assert main(["convert", "--model", "smollm2", "-o", str(out), "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    recorded = config["dijiang_shipped"]["heldout_perplexity"]
    assert evaluate(out).perplexity == pytest.approx(recorded, rel=0.01)
