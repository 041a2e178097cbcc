"""Conversion: parameter initialisation, atomic output, the embedded SmolLM2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.fft import dct

from dijiang_deploy import load_model
from dijiang_deploy.checkpoint import save_checkpoint
from dijiang_deploy.cli import main
from dijiang_deploy.convert import convert_base, projection_matrix, qmc_points
from dijiang_deploy.contract.errors import CheckpointError
from dijiang_deploy.testing import random_base, random_model
from _support import requires_smollm2


def test_projection_is_dct_times_gaussian_quantiles():
    from scipy.stats import norm

    p = projection_matrix(16, "sobol", seed=7).double().numpy()
    c = dct(np.eye(16), axis=0, norm="ortho")
    w = np.linalg.solve(c, p)  # = diag(w)
    assert np.allclose(w, np.diag(np.diag(w)), atol=1e-6)
    assert np.allclose(np.diag(w), norm.ppf(qmc_points(16, "sobol", 7)), atol=1e-5)
    # Scrambled Sobol with 16 points puts exactly one point in each 1/16 cell.
    cells = np.sort(np.floor(qmc_points(16, "sobol", 7) * 16))
    assert cells.tolist() == list(range(16))
    assert not np.allclose(p, projection_matrix(16, "sobol", seed=8).numpy())


def test_converted_layers_and_config(tmp_path, family):
    model = random_model(family, seed=0)
    cfg = model.config.to_hf_dict()
    assert cfg["dijiang"]["qmc"] == "sobol" and "auto_map" not in cfg
    p0 = model.attention_layers()[0].proj_matrix
    p1 = model.attention_layers()[1].proj_matrix
    assert not torch.allclose(p0, p1), "each layer draws its own points"
    out = save_checkpoint(model, tmp_path / "ck")
    assert json.loads((out / "config.json").read_text())["dijiang"]["table_length"] == model.attention_layers()[0].table_length


def test_reconverting_is_refused():
    model = random_model("llama")
    from dijiang_deploy.convert import BaseModel

    base = BaseModel(model.config.to_hf_dict(), model.state_dict(), "x")
    with pytest.raises(CheckpointError, match="already a DiJiang"):
        convert_base(base)


def test_atomic_output_on_failure(tmp_path, monkeypatch):
    import dijiang_deploy.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(RuntimeError):
        ck.save_checkpoint(random_model("gpt_neox"), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    save_checkpoint(random_model("gpt_neox"), tmp_path / "out")
    with pytest.raises(Exception, match="already exists"):
        save_checkpoint(random_model("gpt_neox"), tmp_path / "out")
    save_checkpoint(random_model("gpt_neox"), tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize("shard_bytes", [1 << 40, 1 << 14])
def test_weights_are_as_readable_as_the_config(tmp_path, shard_bytes):
    """safetensors writes owner-only files; a checkpoint in a shared folder
    must be readable wherever its config.json is (the umask decides both)."""
    out = save_checkpoint(random_model("gpt_neox"), tmp_path / "out", max_shard_bytes=shard_bytes)
    weights = sorted(out.glob("*.safetensors"))
    assert (len(weights) == 1) == (shard_bytes > 1 << 20), [w.name for w in weights]
    want = (out / "config.json").stat().st_mode & 0o777
    assert want & 0o044, "the umask here leaves files group/other-readable: the check means something"
    assert [(w.name, w.stat().st_mode & 0o777) for w in weights] == [(w.name, want) for w in weights]
    assert not list(out.glob(".*")), "no probe file is left behind"


def test_convert_cli_from_hf_folder(tmp_path, capsys):
    base = random_base("llama", seed=2)
    src = tmp_path / "base"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(base.raw_config))
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in base.tensors.items() if k != "lm_head.weight"}
    save_file(tensors, str(src / "model.safetensors"))
    assert main(["convert", str(src), "-o", str(tmp_path / "dj"), "-q"]) == 0
    model = load_model(tmp_path / "dj")
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    ref = convert_base(base, progress=False)
    assert torch.equal(model(ids).logits, ref(ids).logits)


@requires_smollm2
def test_convert_smollm2_cli_reloads_identically(smollm2_dir):
    """``dijiang-deploy convert --model smollm2 --untrained`` (the session fixture runs the
    CLI) reloads with logits identical to a conversion kept in memory."""
    from dijiang_deploy.convert import convert_base, load_base

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (smollm2_dir / name).exists(), name
    reloaded = load_model(smollm2_dir)
    in_memory = convert_base(load_base("smollm2"), progress=False)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1234, 28]])
    with torch.no_grad():
        a = reloaded(ids, "chunked").logits
        b = in_memory(ids, "chunked").logits
    assert torch.equal(a, b)
    assert reloaded.config.family == "llama" and reloaded.config.num_kv_heads == 3
    assert reloaded.config.dijiang.source.startswith("gguf SmolLM2")
