"""Fine-tuning on a CUDA GPU (``--device cuda``), against the same run on the CPU.

Skipped without a CUDA device. A tiny LLaMA student trains for 24 steps with
each teacher pass on the GPU; the saved checkpoint must load on the CPU and
score within 10% of the CPU run's held-out perplexity (bf16 autocast on the
GPU against the CPU's own precision, so not bit for bit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/_tiny_student.py

from _tiny_student import small_config, tiny_student  # noqa: E402


@pytest.fixture(scope="module")
def student(torch_cuda, tmp_path_factory):
    return tiny_student(tmp_path_factory.mktemp("ft-gpu"))


@pytest.mark.parametrize("teacher_pass", ["online", "cache"])
def test_finetune_on_cuda_matches_the_cpu_run(torch_cuda, student, tmp_path, teacher_pass):
    from dijiang_deploy.checkpoint import load_model
    from dijiang_deploy.finetune import evaluate, finetune

    ppl, records = {}, {}
    for device in ("cpu", "cuda"):
        cfg = small_config()
        cfg.device, cfg.teacher_pass = device, teacher_pass
        losses: list[float] = []
        result = finetune(
            student["dir"], tmp_path / device, data=student["train"], teacher=student["teacher"], steps=24,
            progress=False, config=cfg, on_step=lambda stage, step, loss: losses.append(loss),
        )
        assert losses[-1] < losses[0], (device, losses)
        records[device] = result.record
        model = load_model(tmp_path / device)
        assert model.head.weight.device.type == "cpu"
        ppl[device] = evaluate(model, student["heldout"], window=128, tokenizer=student["tok"]).perplexity
    assert records["cuda"]["device"].startswith("cuda") and records["cuda"]["teacher_pass"] == teacher_pass
    assert abs(ppl["cuda"] - ppl["cpu"]) < 0.1 * ppl["cpu"], ppl
    # The teacher given as an object is handed back on the CPU, as it came.
    assert next(student["teacher"].model.parameters()).device.type == "cpu"


def test_quant_aware_on_cuda_saves_weights_on_the_grid(torch_cuda, student, tmp_path):
    from dijiang_deploy.checkpoint import load_model
    from dijiang_deploy.finetune import finetune
    from dijiang_deploy.quantization.grid import ON_GRID_TOLERANCE, QuantAwareConfig, WeightGrid

    cfg = small_config()
    cfg.device = "cuda"
    grid_cfg = QuantAwareConfig(bits=4, block_size=16, calibration_tokens=128)
    finetune(student["dir"], tmp_path / "qat", data=student["train"], teacher=student["teacher"], steps=12,
             progress=False, config=cfg, quant_aware=grid_cfg)
    assert WeightGrid(load_model(tmp_path / "qat"), grid_cfg).max_offgrid() <= ON_GRID_TOLERANCE
