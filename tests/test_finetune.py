"""Fine-tuning (issue #6) on tiny models: teacher parity, both stages, adapters,
resume, evaluation and input errors. Runs in seconds on one CPU core."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import pytest

import torch

from dijiang_deploy import load_model
from dijiang_deploy.checkpoint import read_weights, save_checkpoint
from dijiang_deploy.convert import convert, convert_base
from dijiang_deploy.contract.errors import CheckpointError, DiJiangError
from dijiang_deploy.finetune import DataError, SoftmaxTeacher, evaluate, finetune
from dijiang_deploy.finetune.cli import add_parsers
from dijiang_deploy.data.text import ByteTokenizer
from dijiang_deploy.finetune.lora import LoRALinear, add_adapters, merge_adapters
from dijiang_deploy.testing import random_base, random_model
from _tiny_student import sentences, small_config, tiny_student


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(module_tmp) -> dict:
    return tiny_student(module_tmp("ft"))


# -- teacher -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_teacher_matches_transformers(family):
    import transformers

    base = random_base(family, seed=4)
    cls_cfg = transformers.LlamaConfig if family == "llama" else transformers.GPTNeoXConfig
    cls_model = transformers.LlamaForCausalLM if family == "llama" else transformers.GPTNeoXForCausalLM
    hf = cls_model(cls_cfg(**base.raw_config)).eval()
    # transformers 5 names the GPT-NeoX head lm_head (checkpoints: embed_out).
    tensors = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in base.tensors.items()}
    if base.raw_config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight")  # our loader ties the head to the embedding
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    ids = torch.randint(0, base.raw_config["vocab_size"], (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
    ours, traces = SoftmaxTeacher.from_base(base)(ids, trace=True)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    assert len(traces) == base.raw_config["num_hidden_layers"] and traces[0].x.shape == (2, 24, 64)


def test_teacher_generation_with_padding_matches_unpadded():
    teacher = SoftmaxTeacher.from_base(random_base("llama", seed=6))
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    together = teacher.generate(prompts, 6, temperature=0)
    alone = [teacher.generate([p], 6, temperature=0)[0] for p in prompts]
    assert together == alone


# -- stage 1 -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_attention_transfer_loss_falls(tmp_path, family):
    base = random_base(family, seed=2)
    src = save_checkpoint(convert_base(base, progress=False), tmp_path / "in")
    text = tmp_path / "t.txt"
    text.write_text(sentences(200, seed=5))
    losses: list[float] = []
    finetune(
        src, tmp_path / "out", data=text, teacher=SoftmaxTeacher.from_base(base), steps=12, stage2=False,
        progress=False, config=small_config(refit_output=False),
        on_step=lambda stage, step, loss: losses.append(loss),
    )
    assert len(losses) == 12
    assert losses[0] > 0.2, "untrained DiJiang attention should be far from softmax attention"
    assert min(losses[-3:]) < 0.6 * losses[0], losses


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_output_refit_solves_the_least_squares_problem(family):
    from dijiang_deploy.finetune.transfer import build_cache, refit_output, transfer_loss

    base = random_base(family, seed=2)
    teacher, student = SoftmaxTeacher.from_base(base), convert_base(base, progress=False)
    ids = torch.randint(0, 90, (16, 64), generator=torch.Generator().manual_seed(0))
    cache = build_cache(teacher, ids, 8, progress=False)
    fit, held = torch.arange(8), torch.arange(8, 16)
    before = transfer_loss(student, cache, held)[0].item()
    fitted = refit_output(student, cache, fit, ridge=1e-2)
    after = transfer_loss(student, cache, held)[0].item()
    assert after < 0.5 * before, (before, after)
    # The fit is optimal: nudging the refitted weight cannot lower the loss on the fit rows.
    attn = student.attention_layers()[0]
    proj = attn.o_proj if family == "llama" else attn.dense
    with torch.no_grad():
        proj.weight.add_(torch.randn_like(proj.weight) * 1e-2)
    assert transfer_loss(student, cache, fit)[1][0] > fitted[0]


# -- quality, adapters, decay ------------------------------------------------------


def test_finetune_improves_heldout_perplexity(trained, tmp_path):
    teacher, tok = trained["teacher"], trained["tok"]
    before = evaluate(trained["dir"], trained["heldout"], teacher=teacher, window=128, tokenizer=tok)
    result = finetune(
        trained["dir"], tmp_path / "out", data=trained["train"], teacher=teacher, steps=60, lora_rank=4,
        progress=False, config=small_config(),
    )
    after = evaluate(tmp_path / "out", trained["heldout"], teacher=teacher, window=128, tokenizer=tok)
    assert result.stage1_steps == 30 and result.stage2_steps == 30
    assert result.stage1_loss[1] < result.stage1_loss[0] and result.stage2_loss[1] < result.stage2_loss[0]
    # The teacher learned the toy language; the untrained student did not.
    assert before.teacher_perplexity < 0.5 * before.perplexity
    assert after.perplexity < 0.7 * before.perplexity, (before, after)
    assert after.top1_agreement > before.top1_agreement + 0.03, (before, after)
    record = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert record["stage2_steps"] == 30 and record["adapters_merged"] == 2 * 4
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dijiang_finetune"]["settings"]["lora_rank"] == 4


def test_output_is_a_plain_checkpoint_with_geometric_decay(trained, tmp_path):
    out = tmp_path / "out"
    finetune(trained["dir"], out, data=trained["train"], teacher=trained["teacher"], steps=6, lora_rank=2,
             progress=False, config=small_config(lr_decay=0.2))
    before, after = read_weights(trained["dir"]), read_weights(out)
    assert sorted(before) == sorted(after), "no adapter tensors may remain"
    for name, t in before.items():
        assert after[name].shape == t.shape and after[name].dtype == t.dtype, name
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert any(n.endswith("q_proj.weight") for n in changed), "adapters were not merged into the weights"
    assert any(n.endswith(".D1") for n in changed), "trained decay was not written back"
    assert "model.embed_tokens.weight" not in changed, "embeddings and head stay frozen"
    model = load_model(out)
    assert all(a.geometric for a in model.attention_layers()), "decay tables must stay geometric"
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    with torch.no_grad():
        a = model(ids, "parallel").logits
        b = model(ids, "recurrent").logits
    assert torch.allclose(a, b, atol=1e-4)


def test_lora_merge_is_exact():
    lin = torch.nn.Linear(16, 8)
    wrapped = LoRALinear(lin, 3, seed=1)
    with torch.no_grad():
        wrapped.lora_B.normal_()
    x = torch.randn(5, 16)
    y = wrapped(x)
    parent = torch.nn.Module()
    parent.proj = wrapped
    assert merge_adapters(parent) == 1
    assert type(parent.proj) is torch.nn.Linear
    assert torch.allclose(parent.proj(x), y, atol=1e-5)


def test_adapters_wrap_neox_projections():
    model = random_model("gpt_neox")
    attn = model.attention_layers()[0]
    params = add_adapters(attn, 2)
    assert len(params) == 4 and isinstance(attn.query_key_value, LoRALinear)
    assert merge_adapters(model) == 2 and isinstance(attn.dense, torch.nn.Linear)


# -- resume --------------------------------------------------------------------


def test_interrupted_run_resumes_to_the_same_weights(trained, tmp_path):
    kwargs = dict(data=trained["train"], teacher=trained["teacher"], steps=10, lora_rank=2, progress=False)
    finetune(trained["dir"], tmp_path / "straight", config=small_config(), **kwargs)

    def stop_at(stage, step, loss):
        if stage == 2 and step == 2:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(trained["dir"], out, config=small_config(), on_step=stop_at, **kwargs)
    assert not out.exists() and (tmp_path / ".resumed.finetune-work" / "state.pt").exists()
    seen: list[tuple[int, int]] = []
    result = finetune(trained["dir"], out, config=small_config(), on_step=lambda s, i, l: seen.append((s, i)), **kwargs)
    assert seen[0] == (2, 3), f"resumed from {seen[0]}, expected stage 2 step 3"
    assert result.stage1_steps == 5 and result.stage2_steps == 5
    assert not (tmp_path / ".resumed.finetune-work").exists()
    a, b = read_weights(tmp_path / "straight"), read_weights(out)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_a_damaged_or_foreign_resume_state_is_an_error_not_a_silent_restart(trained, tmp_path):
    """The resume file is read with weights_only: garbage and pickled objects are refused
    with a message naming the file, instead of being unpickled or silently ignored."""
    kwargs = dict(data=trained["train"], teacher=trained["teacher"], steps=4, progress=False)
    work = tmp_path / ".out.finetune-work"
    work.mkdir()
    (work / "state.pt").write_bytes(b"not a torch file")
    with pytest.raises(DiJiangError, match=r"state.pt: the resume state is damaged or not ours .*--no-resume"):
        finetune(trained["dir"], tmp_path / "out", config=small_config(), **kwargs)

    class Payload:  # what an untrusted pickle could smuggle in
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"version": 1, "evil": Payload()}, work / "state.pt")
    with pytest.raises(DiJiangError, match="damaged or not ours"):
        finetune(trained["dir"], tmp_path / "out", config=small_config(), **kwargs)
    assert not (tmp_path / "out").exists()
    result = finetune(trained["dir"], tmp_path / "out", config=small_config(), resume=False, **kwargs)
    assert result.out_dir.exists()


def test_thread_default_leaves_busy_cpus_alone(monkeypatch):
    from dijiang_deploy.finetune import config as C

    monkeypatch.setattr(C.os, "cpu_count", lambda: 2)
    for busy, want in ((0.0, 2), (0.25, 2), (0.6, 1), (1.0, 1), (2.0, 1), (None, 1)):
        monkeypatch.setattr(C, "_busy_cpus", lambda busy=busy: busy)
        assert C.default_threads() == want, busy
    monkeypatch.setattr(C.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(C, "_busy_cpus", lambda: 3.0)
    assert C.default_threads() == 13
    monkeypatch.undo()
    measured = C._busy_cpus(0.05)
    assert measured is None or 0.0 <= measured <= (C.os.cpu_count() or 1) + 1e-6


def test_busy_machine_is_reported_not_silent(trained, tmp_path, monkeypatch, caplog):
    from dijiang_deploy.finetune import config as C

    monkeypatch.setattr(C.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(C, "_busy_cpus", lambda: 1.0)  # another process keeps one CPU busy
    kwargs = dict(data=trained["train"], teacher=trained["teacher"], steps=2, progress=False)
    auto = small_config()
    auto.threads = None  # the default: count the idle CPUs
    with caplog.at_level("WARNING", logger="dijiang_deploy.finetune.api"):
        finetune(trained["dir"], tmp_path / "busy", config=auto, **kwargs)
    assert "other processes keep 1 of 2 CPUs busy: training on 1 thread(s)" in caplog.text
    caplog.clear()
    cfg = small_config()
    cfg.threads = 1  # chosen by the user: nothing to explain
    with caplog.at_level("WARNING", logger="dijiang_deploy.finetune.api"):
        finetune(trained["dir"], tmp_path / "chosen", config=cfg, **kwargs)
    assert "CPUs busy" not in caplog.text


# -- evaluation ----------------------------------------------------------------


def test_evaluate_matches_manual_windowed_perplexity(tmp_path):
    model = random_model("gpt_neox", seed=1)
    text = tmp_path / "t.txt"
    text.write_text("hello world, " * 30)
    tok = ByteTokenizer(model.config.vocab_size)
    ids = torch.tensor(tok.encode(text.read_text()))
    result = evaluate(model, text, window=100, tokenizer=tok)
    nll, count = 0.0, 0
    for start in range(0, len(ids), 100):
        w = ids[start : start + 100][None]
        with torch.no_grad():
            logq = torch.log_softmax(model(w).logits[0, :-1], -1)
        nll -= float(logq.gather(-1, w[0, 1:, None]).sum())
        count += w.shape[1] - 1
    assert result.tokens == count and result.windows == math.ceil(len(ids) / 100)
    assert result.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_evaluate_onnx_folder_uses_the_runtime(tmp_path, monkeypatch):
    runtime = pytest.importorskip("dijiang_deploy.runtime")
    model = random_model("llama", seed=1)
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    calls = []

    class FakeGenerator:
        @classmethod
        def from_pretrained(cls, path):
            calls.append(Path(path))
            return cls()

        def score(self, input_ids):
            with torch.no_grad():
                return model(torch.as_tensor(input_ids)).logits.numpy()

    monkeypatch.setattr(runtime, "Generator", FakeGenerator)
    text = tmp_path / "t.txt"
    text.write_text("some text to score " * 20)
    tok = ByteTokenizer(model.config.vocab_size)
    got = evaluate(folder, text, tokenizer=tok)
    ref = evaluate(model, text, tokenizer=tok)
    assert calls == [folder]
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-4)


# -- defaults and errors ---------------------------------------------------------


def test_default_teacher_is_the_recorded_source(tmp_path):
    from safetensors.torch import save_file

    base = random_base("llama", seed=8)
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(base.raw_config))
    save_file({k: v.contiguous() for k, v in base.tensors.items() if k != "lm_head.weight"}, str(src / "model.safetensors"))
    convert(src, tmp_path / "dj", progress=False)
    text = tmp_path / "t.txt"
    text.write_text(sentences(50, seed=1))
    result = finetune(tmp_path / "dj", tmp_path / "out", data=text, steps=2, progress=False, config=small_config())
    assert result.record["teacher"] == str(src)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bad_inputs_raise_user_errors(trained, tmp_path):
    d = str(trained["dir"])
    with pytest.raises(DataError, match="no such file"):
        _cli(["finetune", d, "-o", str(tmp_path / "o"), "--data", str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(DataError, match="no text"):
        finetune(d, tmp_path / "o", data=empty, teacher=trained["teacher"], steps=2, progress=False)
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(DataError, match="no text files"):
        finetune(d, tmp_path / "o", data=tmp_path / "nodocs", teacher=trained["teacher"], steps=2, progress=False)
    with pytest.raises(CheckpointError, match="not a DiJiang checkpoint"):
        _cli(["finetune", str(tmp_path), "-o", str(tmp_path / "o"), "--data", str(trained["train"])])
    with pytest.raises(DiJiangError, match="already exists"):
        finetune(d, trained["root"], data=trained["train"], teacher=trained["teacher"], steps=2, progress=False)
    with pytest.raises(DiJiangError, match="records no usable source"):
        finetune(d, tmp_path / "o", data=trained["train"], steps=2, progress=False)
    with pytest.raises(DataError, match="no such file"):
        _cli(["eval", d, "--data", str(tmp_path / "missing.txt")])
    with pytest.raises(CheckpointError):
        _cli(["eval", str(tmp_path / "nowhere"), "--data", str(trained["train"])])
    with pytest.raises(DiJiangError, match="does not match"):
        finetune(d, tmp_path / "o", data=trained["train"], teacher=SoftmaxTeacher.from_base(random_base("gpt_neox")),
                 steps=2, progress=False)
    assert not (tmp_path / "o").exists()


def test_training_data_grows_with_the_budget():
    from dijiang_deploy.finetune.config import DataConfig

    def resolved(minutes, steps=None, **kw):
        dc = DataConfig(**kw)
        dc.resolve(minutes, steps)
        return dc.max_tokens, dc.generated

    assert resolved(3) == (16384, 0)
    assert resolved(9) == (16384, 32)  # the reference budget: unchanged
    assert resolved(20) == (36352, 71)  # x 20/9, whole 256-token sequences
    assert resolved(600) == (65536, 128)  # capped at 4x
    assert resolved(20, steps=50) == (16384, 32)  # a step count is not a time budget
    assert resolved(20, generated=5) == (36352, 5)  # an explicit count is kept
    assert resolved(20, scale_with_budget=False) == (16384, 32)


def test_stage1_trains_value_projection_only_when_asked():
    from dijiang_deploy.finetune.stages import param_groups
    from dijiang_deploy.finetune.config import FinetuneConfig

    model = random_model("llama", seed=1)
    for train_v in (False, True):
        cfg = FinetuneConfig()
        cfg.stage1.train_v = train_v
        groups = param_groups(model, None, 1, cfg)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n in trained if n.endswith("q_proj.weight")}, trained
        assert not {n for n in trained if "mlp" in n or "o_proj" in n}
        assert bool({n for n in trained if n.endswith("v_proj.weight")}) == train_v
        assert sum(len(g["params"]) for g in groups) == len(trained)


# -- stage 2 options: the hidden-state term, frozen MLPs -------------------------


def test_hidden_state_term_adds_the_layer_mismatch_and_trains_it(trained):
    from dijiang_deploy.finetune.e2e import distill_loss
    from dijiang_deploy.finetune.transfer import build_cache, relative_mse

    student = load_model(trained["dir"])
    ids = torch.tensor(trained["tok"].encode(trained["train"].read_text())[: 4 * 64]).view(4, 64)
    cache = build_cache(trained["teacher"], ids, top_k=16, progress=False)
    rows = torch.arange(4)
    plain = distill_loss(student, cache, rows)
    with_hidden = distill_loss(student, cache, rows, hidden_weight=2.0)
    # The same mismatch computed independently: the student's normed layer inputs.
    xs, _ = cache.layer_io(rows)
    seen = []
    hooks = [a.register_forward_pre_hook(lambda _m, args: seen.append(args[0])) for a in student.attention_layers()]
    with torch.no_grad():
        student(cache.input_ids(rows), mode="chunked", chunk_size=64)
    for h in hooks:
        h.remove()
    expected = torch.stack([relative_mse(x, xs[i]) for i, x in enumerate(seen)]).mean()
    assert expected > 1e-4  # the untrained student's residual stream differs from the teacher's
    assert float((with_hidden - plain).detach()) == pytest.approx(2.0 * float(expected), rel=1e-4)
    with_hidden.backward()
    w_g = student.attention_layers()[0].W_G
    assert w_g.grad is not None and float(w_g.grad.abs().sum()) > 0


def test_stage2_attention_leaves_mlps_and_other_base_weights_untouched(trained, tmp_path):
    cfg = small_config()
    cfg.stage2 = dataclasses.replace(cfg.stage2, train="attention", hidden_weight=1.0)
    out = finetune(trained["dir"], tmp_path / "ft", data=trained["train"], teacher=trained["teacher"],
                   steps=6, lora_rank=4, progress=False, config=cfg)
    before, after = read_weights(trained["dir"]), read_weights(out.out_dir)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(".mlp." in k or "layernorm" in k or "embed" in k for k in changed), changed
    assert any("W_G" in k for k in changed) and any("q_proj" in k for k in changed)
    assert json.loads((out.out_dir / "finetune.json").read_text())["settings"]["stage2"]["hidden_weight"] == 1.0


def test_stage2_adapters_train_the_mlps_at_low_rank_and_the_norms(trained, tmp_path):
    """``adapters``: the MLPs learn, but each of their matrices moves by at most
    the adapters' rank (so a trained conversion still ships as a small delta)."""
    cfg = small_config()
    cfg.stage2 = dataclasses.replace(cfg.stage2, train="adapters")
    out = finetune(trained["dir"], tmp_path / "ft", data=trained["train"], teacher=trained["teacher"],
                   steps=6, lora_rank=2, progress=False, config=cfg)
    before, after = read_weights(trained["dir"]), read_weights(out.out_dir)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    mlp = [k for k in changed if ".mlp." in k and after[k].dim() == 2]
    assert mlp and any("layernorm" in k for k in changed), changed
    assert not any("embed" in k or "lm_head" in k for k in changed), changed
    from dijiang_deploy.shipped import _lowrank

    for k in mlp:
        # What the shipped delta needs: factors of rank <= 2 that give back the change
        # (up to the float32 rounding of the merge), where a full update has rank 64.
        factors = _lowrank(after[k].double() - before[k].double(), 2)
        assert factors is not None and factors[0].shape[1] <= 2 < min(after[k].shape), k
    with pytest.raises(DiJiangError, match="needs lora_rank"):
        finetune(trained["dir"], tmp_path / "ft0", data=trained["train"], teacher=trained["teacher"],
                 steps=2, lora_rank=0, progress=False, config=cfg)
    assert not (tmp_path / "ft0").exists()


@pytest.mark.parametrize("field, value", [("train", "mlp"), ("hidden_weight", -1.0), ("ce_weight", float("nan"))])
def test_stage2_config_rejects_bad_fields(field, value):
    from dijiang_deploy.finetune.config import Stage2Config

    with pytest.raises(DiJiangError, match=field):
        Stage2Config(**{field: value})


def test_data_scale_cap_lifts_the_default_four_times():
    from dijiang_deploy.finetune.config import MAX_DATA_SCALE, DataConfig

    capped, lifted = DataConfig(), DataConfig(max_scale=8.0)
    capped.resolve(90.0, None)
    lifted.resolve(90.0, None)
    assert capped.max_tokens == int(DataConfig.max_tokens * MAX_DATA_SCALE)
    assert lifted.max_tokens == DataConfig.max_tokens * 8 and lifted.generated == 32 * 8
    with pytest.raises(DiJiangError, match="max_scale"):
        DataConfig(max_scale=0.5)


def test_cli_stage2_choices_match_the_config():
    from dijiang_deploy.finetune import cli, config

    assert cli.STAGE2_TRAIN == config.STAGE2_TRAIN


# -- the GroupNorm error floor ------------------------------------------------------


def test_groupnorm_floor_is_zero_without_a_normaliser_and_positive_through_one(trained):
    from dijiang_deploy.finetune.floors import output_floors

    # A teacher that learnt the toy text, so that its perplexity has something to lose.
    teacher, student = trained["teacher"], load_model(trained["dir"])
    ids = torch.tensor(trained["tok"].encode(trained["train"].read_text())[: 16 * 64]).view(16, 64)
    floors = {f.layout: f for f in output_floors(teacher, student, ids[:8], ids[8:], sources=("teacher",), gated=(False,))}
    # The teacher's own mix, un-normalised, is exactly what its projection maps to y,
    # so the teacher run through those fits scores as the teacher itself.
    assert max(floors["none"].heldout) < 1e-6
    logits, _ = teacher(ids[8:])
    own = math.exp(float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           ids[8:, 1:].reshape(-1))))
    assert floors["none"].perplexity == pytest.approx(own, rel=1e-4)
    assert floors["spec"].perplexity > own
    # Either GroupNorm discards each group's scale, which no projection can restore.
    assert min(floors["spec"].heldout) > 1e-2 and min(floors["per-head"].heldout) > 1e-2
    with pytest.raises(DiJiangError, match="layout"):
        output_floors(teacher, student, ids[:2], ids[2:4], layouts=("rms",))
    with pytest.raises(DiJiangError, match="source"):
        output_floors(teacher, student, ids[:2], ids[2:4], sources=("cache",))


def test_groupnorm_floor_of_the_student_matches_the_stage1_refit():
    """The spec layout on the student's gated mix is exactly the block that the
    stage-1 refit solves (gpt_neox: its ``dense`` has a bias, as the floor fit does)."""
    from dijiang_deploy.finetune.floors import output_floors
    from dijiang_deploy.finetune.transfer import TeacherCache, refit_output

    base = random_base("gpt_neox", seed=3)
    teacher, student = SoftmaxTeacher.from_base(base), convert_base(base, progress=False)
    ids = torch.randint(0, 90, (8, 64), generator=torch.Generator().manual_seed(1))
    (floor,) = output_floors(teacher, student, ids, ids, layouts=("spec",), sources=("student",), gated=(True,))
    # refit_output reads a cache; a float32 one (build_cache's is bf16) so both see the same inputs.
    _, traces = teacher(ids, trace=True)
    x, y = torch.stack([t.x for t in traces]), torch.stack([t.y for t in traces])
    cache = TeacherCache(ids, x, y, torch.zeros(8, 64, 1), torch.zeros(8, 64, 1, dtype=torch.int32))
    # Solved after the floors: the refit writes the projection weights, which the
    # teacher and the student converted from one base share.
    refit = refit_output(student, cache, torch.arange(8), ridge=1e-6)
    assert floor.fit == pytest.approx(refit, rel=1e-4)
    assert floor.heldout == floor.fit and floor.perplexity is None


def test_cli_stage1_fraction_and_refit_reach_the_run(trained, tmp_path, monkeypatch):
    import dijiang_deploy.finetune.api as api
    from dijiang_deploy.finetune.config import Stage1Config

    seen = {}

    def fake_finetune(*_args, config, **_kw):
        seen.update(fraction=config.stage1.fraction, refit=config.stage1.refit_output)
        raise DiJiangError("stopped before training")

    monkeypatch.setattr(api, "finetune", fake_finetune)
    out = str(tmp_path / "o")
    with pytest.raises(DiJiangError, match="stopped"):
        _cli(["finetune", str(trained["dir"]), "-o", out, "--stage1-fraction", "0.2", "--no-refit"])
    assert seen == {"fraction": 0.2, "refit": False}
    with pytest.raises(DiJiangError, match="stopped"):
        _cli(["finetune", str(trained["dir"]), "-o", out])
    assert seen == {"fraction": 0.5, "refit": True}
    for bad in ("0", "1", "nan"):
        with pytest.raises(SystemExit):
            _cli(["finetune", str(trained["dir"]), "-o", out, "--stage1-fraction", bad])
    with pytest.raises(DiJiangError, match="fraction"):
        Stage1Config(fraction=1.0)
    cfg = small_config()
    cfg.stage1 = dataclasses.replace(cfg.stage1, fraction=0.25)
    res = finetune(trained["dir"], tmp_path / "ft", data=trained["train"], teacher=trained["teacher"], steps=8,
                   progress=False, config=cfg)
    assert (res.stage1_steps, res.stage2_steps) == (2, 6)
