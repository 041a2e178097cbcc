"""Fine-tuning off the host cache: the online teacher pass and device selection.

The online teacher (``teacher_pass="online"``, the default on a GPU) must hand
training the same numbers the cache does, so that the GPU path is the CPU
path with another device; these tests pin that down on the CPU. The CUDA run
itself is in ``tests/gpu/test_finetune_gpu.py``.
"""

from __future__ import annotations

import pytest
import torch

from dijiang_deploy.convert import convert_base
from dijiang_deploy.contract.errors import DiJiangError
from dijiang_deploy.finetune import FinetuneConfig, SoftmaxTeacher, evaluate, finetune
from dijiang_deploy.finetune.config import ONLINE_MAX_TOKENS, DataConfig
from dijiang_deploy.finetune.e2e import distill_loss
from dijiang_deploy.finetune.transfer import OnlineTeacher, build_cache, transfer_loss
from dijiang_deploy.testing import random_base
from _support import finetune_cli_config
from _tiny_student import small_config, tiny_student


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_online_teacher_gives_the_cached_batches(family):
    base = random_base(family, seed=3)
    teacher, student = SoftmaxTeacher.from_base(base), convert_base(base, progress=False)
    ids = torch.randint(0, 90, (12, 48), generator=torch.Generator().manual_seed(1))
    cache = build_cache(teacher, ids, 8, batch=5, progress=False)  # other batch cuts than the rows below
    online = OnlineTeacher(teacher, ids, 8)
    rows = torch.tensor([7, 2, 11])
    (cx, cy), (ox, oy) = cache.layer_io(rows), online.layer_io(rows)
    assert cx.shape == ox.shape == (len(student.attention_layers()), 3, 48, student.config.hidden_size)
    assert cx.dtype == ox.dtype == torch.bfloat16
    # Both are bf16 roundings of the same float32 values: at most one bf16 step apart.
    for c, o in ((cx, ox), (cy, oy)):
        step = c.float().abs().clamp_min(1e-6) * 2**-7
        assert bool(((c.float() - o.float()).abs() <= step).all())
    (cv, ci), (ov, oi) = cache.top_k(rows), online.top_k(rows)
    assert cv.dtype == ov.dtype == torch.float16 and ci.dtype == oi.dtype == torch.int32
    torch.testing.assert_close(cv.float(), ov.float(), rtol=2e-3, atol=2e-3)
    assert (ci == oi).float().mean() > 0.98  # near-tied logits may swap places
    # The losses training takes from either are the same.
    torch.testing.assert_close(transfer_loss(student, cache, rows)[0], transfer_loss(student, online, rows)[0],
                               rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(distill_loss(student, cache, rows), distill_loss(student, online, rows),
                               rtol=1e-3, atol=1e-4)


def test_online_finetune_trains_and_records_it(tmp_path):
    t = tiny_student(tmp_path)
    runs = {}
    for mode in ("online", "cache"):
        cfg = small_config()
        cfg.teacher_pass = mode
        losses: dict[int, list[float]] = {1: [], 2: []}
        result = finetune(
            t["dir"], tmp_path / mode, data=t["train"], teacher=t["teacher"], steps=30, progress=False, config=cfg,
            on_step=lambda stage, step, loss, losses=losses: losses[stage].append(loss),
        )
        assert result.record["teacher_pass"] == mode and result.record["device"] == "cpu"
        runs[mode] = (result, losses)
    lo, lc = runs["online"][1], runs["cache"][1]
    assert min(lo[1][-3:]) < lo[1][0] and min(lo[2][-3:]) < lo[2][0], lo
    # Same data, same seed: the two teacher passes give nearly the same run.
    assert abs(lo[1][0] - lc[1][0]) < 1e-2 * lc[1][0], (lo[1][0], lc[1][0])
    assert abs(lo[2][-1] - lc[2][-1]) < 0.05 * lc[2][-1], (lo[2][-1], lc[2][-1])
    ppl = {m: evaluate(tmp_path / m, t["heldout"], window=128, tokenizer=t["tok"]).perplexity for m in runs}
    assert abs(ppl["online"] - ppl["cache"]) < 0.05 * ppl["cache"], ppl


def test_online_data_is_not_capped_by_the_cache():
    d = DataConfig()
    d.resolve(9.0, None, online=True)
    assert d.max_tokens == ONLINE_MAX_TOKENS and d.generated == 32 * 8
    given = DataConfig(max_tokens=4096, generated=3)
    given.resolve(9.0, None, online=True)
    assert (given.max_tokens, given.generated) == (4096, 3), "explicit sizes are kept"
    cpu = DataConfig()
    cpu.resolve(9.0, None)
    assert cpu.max_tokens == DataConfig.max_tokens and cpu.generated == 32


def test_device_choice(monkeypatch):
    cfg = FinetuneConfig()
    assert cfg.resolved_teacher_pass(torch.device("cpu")) == "cache"
    assert cfg.resolved_teacher_pass(torch.device("cuda")) == "online"
    cfg.device = "cpu"
    assert cfg.resolved_device() == torch.device("cpu")
    for bad in ("tpu", "gpu0", "mps"):
        cfg.device = bad
        with pytest.raises(DiJiangError, match="device must be"):
            cfg.resolved_device()
    cfg.teacher_pass = "sometimes"
    with pytest.raises(DiJiangError, match="teacher_pass must be"):
        cfg.resolved_teacher_pass(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg.device = "auto"
    assert cfg.resolved_device() == torch.device("cpu")
    cfg.device = "cuda"
    with pytest.raises(DiJiangError, match="sees no CUDA GPU"):
        cfg.resolved_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    cfg.device = "auto"
    assert cfg.resolved_device() == torch.device("cuda")
    cfg.device = "cuda:3"
    with pytest.raises(DiJiangError, match="only 1 CUDA device"):
        cfg.resolved_device()


def test_cuda_request_without_a_gpu_fails_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = FinetuneConfig(device="cuda")
    with pytest.raises(DiJiangError, match="sees no CUDA GPU"):
        finetune(tmp_path / "nowhere", tmp_path / "out", steps=2, progress=False, config=cfg)
    assert not (tmp_path / "out").exists()


def test_cli_device_flags_reach_the_config(monkeypatch, tmp_path):
    cfg = finetune_cli_config(monkeypatch, tmp_path)
    assert (cfg.device, cfg.teacher_pass) == ("auto", "auto")
    cfg = finetune_cli_config(monkeypatch, tmp_path, "--device", "cuda:1", "--teacher-pass", "cache")
    assert (cfg.device, cfg.teacher_pass) == ("cuda:1", "cache")
