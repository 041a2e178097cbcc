"""Checkpoint folders: the authors' GPT-NeoX layout, our layout, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dijiang_deploy import load_model
from dijiang_deploy.cli import main
from dijiang_deploy.contract.errors import CheckpointError, UnsupportedModelError
from dijiang_deploy.testing import random_model

SENTINEL = "dijiang_remote_code_ran"


def _authors_folder(folder: Path, fmt: str, shards: int = 1) -> tuple[Path, object]:
    """A folder shaped like the authors' Pythia DiJiang checkpoints.

    config.json with ``auto_map`` to a remote modeling file that would leave a
    sentinel file behind if anything imported it, fp32 decay tables built the
    authors' way, the derived buffers older GPT-NeoX checkpoints carry.
    """
    model = random_model("gpt_neox", seed=11)
    folder.mkdir(parents=True)
    raw = model.config.to_hf_dict()
    raw.pop("dijiang")
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_gpt_neox.GPTNeoXForCausalLM"}
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "modeling_gpt_neox.py").write_text(
        f"import pathlib\npathlib.Path(__file__).with_name('{SENTINEL}').write_text('ran')\n"
    )
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    h = model.config.num_heads
    gamma = 1 - torch.exp(torch.linspace(torch.log(torch.tensor(1 / 32)), torch.log(torch.tensor(1 / 512)), h))
    t = torch.arange(2048, dtype=torch.float32)
    for i in range(model.config.num_layers):
        p = f"gpt_neox.layers.{i}.attention."
        state[p + "D1"] = (gamma[:, None] ** t[None, :])[None, :, :, None]
        state[p + "D2"] = (gamma[:, None] ** -t[None, :])[None, :, :, None]
        state[p + "rotary_emb.inv_freq"] = torch.ones(4)
        state[p + "bias"] = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    if fmt == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif shards == 1:
        save_file(state, str(folder / "model.safetensors"))
    else:
        names = sorted(state)
        weight_map = {}
        for s in range(shards):
            part = {n: state[n] for n in names[s::shards]}
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file(part, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder, model


@pytest.mark.parametrize("fmt,shards", [("safetensors", 1), ("safetensors", 3), ("bin", 1)])
def test_authors_layout_loads_and_runs(tmp_path, fmt, shards):
    folder, ref = _authors_folder(tmp_path / "pythia-dj", fmt, shards)
    model = load_model(folder)
    assert not (folder / SENTINEL).exists(), "code from the checkpoint folder was executed"
    assert all(a.geometric for a in model.attention_layers())
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    with torch.no_grad():
        got = model(ids, "chunked", chunk_size=8).logits
        want = ref(ids, "parallel").logits
    # The authors' fp32 tables fit the same gamma to ~1e-7, so outputs match.
    assert (got - want).abs().max() <= 1e-4


def test_missing_dijiang_tensor_is_named(tmp_path):
    folder, _ = _authors_folder(tmp_path / "ck", "safetensors")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    del state["gpt_neox.layers.1.attention.W_G"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"gpt_neox\.layers\.1\.attention\.W_G"):
        load_model(folder)


def test_misshaped_dijiang_tensor_is_named(tmp_path):
    folder, _ = _authors_folder(tmp_path / "ck", "safetensors")
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    state["gpt_neox.layers.0.attention.proj_matrix"] = torch.zeros(3, 3)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.proj_matrix has shape \(3, 3\)"):
        load_model(folder)


def test_plain_softmax_checkpoint_is_refused(tmp_path):
    folder, _ = _authors_folder(tmp_path / "ck", "safetensors")
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if ".D1" not in k}
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a DiJiang checkpoint"):
        load_model(folder)


def test_our_layout_round_trips(tiny_dirs, family):
    model = load_model(tiny_dirs[family])
    again = load_model(tiny_dirs[family], dtype=torch.float16)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    assert model.config.dijiang.qmc == "sobol"
    assert again.attention_layers()[0].W_G.dtype == torch.float16
    assert torch.isfinite(again(ids, "recurrent").logits).all()


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    missing = tmp_path / "does-not-exist"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text(json.dumps(random_model("llama").config.to_hf_dict()))
    (corrupt / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    return {
        "missing": (missing, "no such file or directory"),
        "unsupported": (bert, "unsupported architecture model_type='bert'"),
        "corrupt": (corrupt, "corrupt or unreadable safetensors"),
    }


def test_bad_input_raises_typed_errors(tmp_path):
    cases = _bad_inputs(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(cases["missing"][0])
    with pytest.raises(UnsupportedModelError, match="bert"):
        load_model(cases["unsupported"][0])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(cases["corrupt"][0])


@pytest.mark.parametrize("case", ["missing", "unsupported", "corrupt"])
def test_cli_bad_input_one_line_no_traceback(tmp_path, capsys, case):
    path, message = _bad_inputs(tmp_path)[case]
    code = main(["convert", str(path), "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dijiang_deploy.cli", "convert", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["export", "finetune", "eval", "verify"])
def test_commands_that_need_a_checkpoint_say_what_they_got(tmp_path, capsys, command):
    export_like = tmp_path / "an-export"
    export_like.mkdir()
    (export_like / "manifest.json").write_text("{}")
    cases = {
        tmp_path / "nope": "nope: no such file or directory",
        export_like: "this is an ONNX export folder; give the DiJiang checkpoint folder",
    }
    if command == "eval":  # eval takes either kind of folder: only the missing one is wrong
        cases = {tmp_path / "nope": "nope: no such file or directory",
                 tmp_path: "found neither"}
    for folder, message in cases.items():
        argv = {
            "export": ["export", str(folder), "-o", str(tmp_path / "out")],
            "finetune": ["finetune", str(folder), "-o", str(tmp_path / "out")],
            "eval": ["eval", str(folder)],
            "verify": ["verify", str(export_like), "--reference", str(folder)],
        }[command]
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()


def test_convert_model_flag_names_the_embedded_models(tmp_path, capsys):
    assert main(["convert", "--model", "llama", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "unknown embedded model 'llama'; available: smollm2" in err and "no such file" not in err
    assert main(["convert", str(tmp_path), "--model", "smollm2", "-o", str(tmp_path / "out")]) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_verbose_shows_the_cause_the_one_line_error_hides(tmp_path):
    """Without -v: one line, exit 2. With -v: the traceback, down to the original exception."""
    import subprocess
    import sys

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "manifest.json").write_text("{broken")
    cmd = [sys.executable, "-m", "dijiang_deploy.cli"]
    quiet = subprocess.run([*cmd, "run", str(folder), "--prompt", "hi"], capture_output=True, text=True)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and "not valid JSON" in quiet.stderr
    loud = subprocess.run([*cmd, "-v", "run", str(folder), "--prompt", "hi"], capture_output=True, text=True)
    assert loud.returncode != 0 and "Traceback" in loud.stderr
    assert "JSONDecodeError" in loud.stderr and "direct cause" in loud.stderr
