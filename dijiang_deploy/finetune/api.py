"""``finetune()``: attention transfer + end-to-end distillation within a budget."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..contract.atomic import atomic_file
from ..checkpoint import checkpoint_folder, load_model, save_checkpoint
from ..contract.errors import DiJiangError
from ..modeling.model import DiJiangForCausalLM
from .config import FinetuneConfig
from .data import PROMPTS, DataError, builtin_corpus, load_tokenizer, pack, read_text_source
from .e2e import distill_loss
from .perplexity import evaluate
from .lora import add_adapters, merge_adapters
from .quant_aware import RECORD_KEY as QUANT_RECORD_KEY, QuantAwareConfig, WeightGrid, calibrate_in_place
from .teacher import SoftmaxTeacher, load_teacher, recorded_source
from .transfer import DecayRates, OnlineTeacher, TeacherBatches, build_cache, refit_output, transfer_loss

log = logging.getLogger(__name__)

#: Seconds kept back from the budget for merging, saving and the held-out check.
SAVE_RESERVE_S = 25.0
STATE_VERSION = 1


@dataclass
class FinetuneResult:
    """What a run did; also written to ``finetune.json`` and config.json
    (``dijiang_finetune``).

    Attributes:
        out_dir: the saved checkpoint folder.
        stage1_steps, stage2_steps: optimizer steps run.
        stage1_loss: mean relative attention MSE over layers, (first, last).
        stage2_loss: distillation loss, (first, last).
        heldout_perplexity: perplexity on the shipped held-out text (None if
            the checkpoint has no tokenizer).
        seconds: wall-clock time of the run (all sessions when resumed).
    """

    out_dir: Path
    stage1_steps: int = 0
    stage2_steps: int = 0
    stage1_loss: tuple[float, float] | None = None
    stage2_loss: tuple[float, float] | None = None
    heldout_perplexity: float | None = None
    seconds: float = 0.0
    train_tokens: int = 0
    record: dict[str, Any] = field(default_factory=dict)


def _work_dir(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.finetune-work"


def _fingerprint(model_dir: Path, data: str | None, teacher: str, cfg: FinetuneConfig) -> str:
    d = cfg.to_dict()
    for key in ("threads", "checkpoint_every_s", "device"):
        d.pop(key, None)
    payload = json.dumps([str(model_dir.resolve()), data, teacher, d], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# -- data ---------------------------------------------------------------------


def _chat_prompts(model_dir: Path, tokenizer, n: int, seed: int) -> list[list[int]] | None:
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(model_dir))
        if not getattr(hf, "chat_template", None):
            return None
    except Exception:  # no HF tokenizer files: no chat formatting
        return None
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(PROMPTS), generator=g).tolist()
    prompts = [PROMPTS[order[i % len(order)]] for i in range(n)]
    return [
        list(hf.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in prompts
    ]


def build_tokens(
    model_dir: Path,
    data: str | Path | None,
    teacher: SoftmaxTeacher,
    tokenizer,
    cfg: FinetuneConfig,
    progress: bool,
) -> tuple[torch.Tensor, str]:
    """Training sequences ``[S, seq_len]`` int64 and a description of their source."""
    dc = cfg.data
    eos = teacher.config.eos_token_id
    sep = eos[0] if isinstance(eos, list) else eos
    if data is not None:
        docs = read_text_source(data)
        what = f"user text {data}"
    else:
        docs = builtin_corpus(dc.builtin_chars)
        what = "built-in local text (package descriptions, stdlib docstrings)"
    tokens = [tokenizer.encode(d) for d in docs]
    generated: list[list[int]] = []
    if data is None and dc.generated > 0:
        prompts = _chat_prompts(model_dir, tokenizer, dc.generated, cfg.seed)
        if prompts:
            from tqdm.auto import tqdm

            gen = torch.Generator().manual_seed(cfg.seed)
            eos_ids = {int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None}
            bar = tqdm(total=len(prompts), desc="teacher writes chat data", disable=not progress, leave=False)
            for i in range(0, len(prompts), 16):
                batch = prompts[i : i + 16]
                outs = teacher.generate(batch, dc.generated_tokens, eos=eos_ids, generator=gen)
                generated += [p + o + ([sep] if sep is not None else []) for p, o in zip(batch, outs)]
                bar.update(len(batch))
            bar.close()
            what += f" + {len(generated)} teacher-written chat answers"
    if not any(tokens) and not generated:
        raise DataError(f"{data}: the text tokenizes to nothing")
    gen_ids = [t for doc in generated for t in doc]
    budget = max(dc.max_tokens - len(gen_ids), 0)
    ids = pack(tokens, dc.seq_len, budget, cfg.seed, sep) if budget >= dc.seq_len else None
    if gen_ids:
        n = len(gen_ids) // dc.seq_len
        g = torch.tensor(gen_ids[: n * dc.seq_len], dtype=torch.long).view(n, dc.seq_len)
        ids = g if ids is None else torch.cat((ids, g))
    if ids is None:
        raise DataError(f"fewer than {dc.seq_len} tokens of training text")
    return ids, what


# -- trainable parameters -----------------------------------------------------

_NEW = ("proj_matrix", "W_G", "group_norm.weight", "group_norm.bias")


def _param_groups(
    model: DiJiangForCausalLM, decay: DecayRates | None, stage: int, cfg: FinetuneConfig
) -> list[dict[str, Any]]:
    """Mark trainable parameters and return optimizer groups (names kept for resuming)."""
    model.requires_grad_(False)
    s1, s2 = cfg.stage1, cfg.stage2
    new, base, lora = [], [], []
    for name, p in model.named_parameters():
        leaf = name.split(".self_attn.")[-1].split(".attention.")[-1]
        if ".self_attn." not in name and ".attention." not in name:
            # Stage 2 "all": MLPs and norms of every layer too (not embeddings/head).
            if stage == 2 and s2.train == "all" and ".layers." in name and "lora_" not in name:
                base.append(p)
            continue
        if leaf in _NEW:
            new.append(p)
        elif "lora_" in leaf:
            lora.append(p)
        elif leaf.endswith(("weight", "bias")) and not leaf.startswith("group_norm"):
            proj = leaf.split(".")[0]
            if cfg.lora_rank > 0:
                continue
            if stage == 1 and s1.train_qk and proj in ("q_proj", "k_proj", "query_key_value"):
                base.append(p)
            elif stage == 1 and s1.train_v and proj == "v_proj":
                base.append(p)
            elif stage == 2 and s2.train in ("attention", "all"):
                base.append(p)
    if stage == 2 and s2.train == "dijiang":
        lora = []
    for p in new + base + lora:
        p.requires_grad_(True)
    lr_new = s1.lr if stage == 1 else s2.lr
    lr_base = s1.lr_base if stage == 1 else s2.lr
    groups = [
        {"params": new, "lr": lr_new, "weight_decay": 0.0},
        {"params": base, "lr": lr_base, "weight_decay": 0.0},
        {"params": lora, "lr": lr_new, "weight_decay": 0.0},
    ]
    if decay is not None:
        decay.a.requires_grad_(True)
        groups.append({"params": [decay.a], "lr": s1.lr_decay if stage == 1 else s2.lr * 10, "weight_decay": 0.0})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return [g for g in groups if g["params"]]


def _schedule(progress: float) -> float:
    """Linear warm-up over the first 5%, then cosine down to 10%."""
    if progress < 0.05:
        return 0.1 + 0.9 * progress / 0.05
    p = min(1.0, (progress - 0.05) / 0.95)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def _trainable_state(model: nn.Module, decay: DecayRates | None, names: set[str]) -> dict[str, torch.Tensor]:
    """Every parameter trained so far in any stage (``names`` accumulates them)."""
    names.update(n for n, p in model.named_parameters() if p.requires_grad)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    if decay is not None:
        state["__decay__"] = decay.a.detach().clone()
    return state


def _load_trainable(model: nn.Module, decay: DecayRates | None, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name == "__decay__":
                if decay is not None:
                    decay.a.copy_(value)
            elif name in params:
                params[name].copy_(value)


class _Saver:
    """Writes resumable state atomically to the work folder."""

    def __init__(self, work: Path, fingerprint: str, every_s: float):
        self.work, self.fingerprint, self.every_s = work, fingerprint, every_s
        self.last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        path = self.work / "state.pt"
        if not path.exists():
            return None
        try:
            # weights_only: tensors and plain containers, never arbitrary pickled objects.
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises pickle, zip and runtime errors alike
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DiJiangError(
                f"{path}: the resume state is damaged or not ours ({reason}); delete {self.work} to start over, "
                "or run with --no-resume"
            ) from exc
        if not isinstance(state, dict):
            raise DiJiangError(f"{path}: the resume state is not a dictionary; delete {self.work} to start over")
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self.fingerprint:
            log.warning("resume state in %s was made with other settings: starting over", self.work)
            return None
        return state

    def save(self, state: dict[str, Any], force: bool = False) -> None:
        if not force and time.monotonic() - self.last < self.every_s:
            return
        state = dict(state, version=STATE_VERSION, fingerprint=self.fingerprint)
        self.work.mkdir(parents=True, exist_ok=True)
        with atomic_file(self.work / "state.pt", "wb") as fh:
            torch.save(state, fh)
        self.last = time.monotonic()


# -- the run ------------------------------------------------------------------


def autocast_enabled(mode: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``FinetuneConfig.autocast`` turns bf16 autocast on for ``device``.

    ``auto``: on the CPU when it has native bf16 (AVX512-BF16 or AMX), on a
    CUDA GPU when torch reports bf16 support (Ampere and later).
    """
    if mode == "off":
        return False
    if mode == "bf16":
        return True
    if mode != "auto":
        raise DiJiangError(f"autocast must be auto, bf16 or off, got {mode!r}")
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # older torch: stay in float32
        return False


def _refit(
    student: DiJiangForCausalLM,
    cache: TeacherBatches,
    decay: DecayRates | None,
    cfg: FinetuneConfig,
    seed: int,
    trained: set[str],
    log_to: list[float],
    progress: bool,
) -> None:
    """Least-squares refit of the output projections (see ``Stage1Config.refit_output``)."""
    gen = torch.Generator().manual_seed(seed * 31 + 7)
    rows = torch.randperm(cache.ids.shape[0], generator=gen)[: cfg.stage1.refit_rows]
    with torch.autocast(cache.device.type, dtype=torch.bfloat16, enabled=autocast_enabled(cfg.autocast, cache.device)):
        losses = refit_output(student, cache, rows, cfg.stage1.ridge, decay)
    log_to.append(sum(losses) / len(losses))
    if progress:
        print(f"refit output projections: mean relative attention MSE {log_to[-1]:.4f} on {len(rows)} sequences")
    for name, _ in student.named_parameters():
        if name.endswith(("o_proj.weight", "o_proj.bias", "dense.weight", "dense.bias", "o_proj.base.weight",
                          "o_proj.base.bias", "dense.base.weight", "dense.base.bias")) and ".mlp." not in name:
            trained.add(name)


def _split_steps(steps: int | None, cfg: FinetuneConfig) -> None:
    if steps is None:
        return
    if steps < 1:
        raise DiJiangError(f"steps must be >= 1, got {steps}")
    if cfg.stage2.enabled:
        s1 = max(1, round(steps * cfg.stage1.fraction))
        cfg.stage1.steps, cfg.stage2.steps = s1, max(steps - s1, 0)
    else:
        cfg.stage1.steps, cfg.stage2.steps = steps, 0


def finetune(
    model_dir: str | Path,
    out_dir: str | Path,
    data: str | Path | None = None,
    teacher: str | Path | SoftmaxTeacher | None = None,
    steps: int | None = None,
    budget_minutes: float | None = None,
    seed: int = 0,
    lora_rank: int = 0,
    stage2: bool = True,
    resume: bool = True,
    progress: bool = True,
    overwrite: bool = False,
    config: FinetuneConfig | None = None,
    quant_aware: QuantAwareConfig | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a converted DiJiang checkpoint against its softmax teacher.

    Stage 1 (attention transfer) trains each layer's DiJiang parameters
    (``proj_matrix`` [d, d], ``W_G`` [D, D], GroupNorm, the per-head decay
    rates, and q/k projections or rank-``lora_rank`` adapters on q/k/v/o) so
    that its output matches the teacher's softmax attention output on the
    teacher's hidden states (relative MSE, layers independent, teacher states
    cached once in bf16). Stage 2 distils the teacher's next-token
    distribution end to end. Adapters are merged and the decay rates written
    back as geometric ``D1``/``D2`` tables, so ``out_dir`` is a plain
    checkpoint (same tensor names, shapes and dtypes as the input). With
    ``quant_aware``, stage 2 runs through the export's int4/int8 weight grid
    and the saved linear weights lie on it. Training runs on
    ``config.device`` (default: a CUDA GPU when torch sees one, else the
    CPU); the saved checkpoint is on the CPU either way.

    Args:
        model_dir: DiJiang checkpoint folder (from ``convert``).
        out_dir: folder to write (appears only when complete).
        data: text file or folder; None: built-in local text (see
            :mod:`~dijiang_deploy.finetune.data`).
        teacher: HF folder, ``.gguf``, ``smollm2``, a :class:`SoftmaxTeacher`,
            or None for the source recorded in ``model_dir``'s config.
        steps: total optimizer steps (split between the stages by
            ``stage1.fraction``); None: run for ``budget_minutes``.
        budget_minutes: wall-clock budget; default ``config.budget_minutes``.
        seed: data order, generation, adapters, batch sampling.
        lora_rank: 0: no adapters; R: rank-R adapters on q/k/v/o, merged.
        stage2: run the end-to-end stage.
        resume: continue from the work folder ``.OUT.finetune-work`` next to
            ``out_dir`` if an interrupted run with the same settings left one.
        overwrite: replace an existing ``out_dir``.
        config: full settings; the explicit arguments above override it.
        quant_aware: train stage 2 through this weight grid and save the
            rounded weights (:mod:`~dijiang_deploy.finetune.quant_aware`);
            None: ``config.quant_aware`` (default: off).
        on_step: called as ``on_step(stage, step, loss)`` (tests, logging).

    Raises:
        CheckpointError: ``model_dir`` is not a DiJiang checkpoint.
        DataError: missing, unreadable or empty training text.
        DiJiangError: ``out_dir`` exists, bad teacher, teacher/student mismatch.
    """
    from tqdm.auto import tqdm

    t_start = time.monotonic()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = FinetuneConfig.from_dict(config.to_dict()) if config is not None else FinetuneConfig()
    cfg.seed, cfg.lora_rank = seed, lora_rank
    cfg.stage2.enabled = bool(stage2)
    if quant_aware is not None:
        cfg.quant_aware = quant_aware
    if cfg.quant_aware is not None:
        cfg.quant_aware.validate()
        if lora_rank > 0:
            raise DiJiangError(
                "quantization-aware training cannot be combined with lora_rank > 0: "
                "merging the adapters afterwards would move the weights off the grid"
            )
    if budget_minutes is not None:
        if budget_minutes <= 0:
            raise DiJiangError(f"budget_minutes must be > 0, got {budget_minutes}")
        cfg.budget_minutes = float(budget_minutes)
    _split_steps(steps, cfg)
    device = cfg.resolved_device()
    online = cfg.resolved_teacher_pass(device) == "online"
    cfg.data.resolve(cfg.budget_minutes, steps, online=online)
    if lora_rank < 0:
        raise DiJiangError(f"lora_rank must be >= 0, got {lora_rank}")
    if out_dir.exists() and not overwrite:
        raise DiJiangError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    if data is not None:
        read_text_source(data)  # fail on missing/empty text before loading models
    checkpoint_folder(model_dir)
    threads = cfg.resolved_threads()
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and not cfg.threads and threads < cpus:
        # The budget is wall-clock: a busy machine buys fewer steps, so say why.
        log.warning(
            "other processes keep %d of %d CPUs busy: training on %d thread(s), so this budget buys fewer steps "
            "(--threads N to override)", cpus - threads, cpus, threads,
        )
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    student = load_model(model_dir)
    if isinstance(teacher, SoftmaxTeacher):
        teacher_model, teacher_name = teacher, teacher.description or "given"
    else:
        name = str(teacher) if teacher is not None else recorded_source(model_dir)
        teacher_model = load_teacher(teacher, model_dir)
        teacher_name = name or teacher_model.description
    teacher_model.model.to(device)
    tc, sc = teacher_model.config, student.config
    for attr in ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        if getattr(tc, attr) != getattr(sc, attr):
            raise DiJiangError(
                f"teacher {teacher_name} does not match {model_dir}: {attr} {getattr(tc, attr)} vs {getattr(sc, attr)}"
            )
    tokenizer = load_tokenizer(model_dir, sc.vocab_size)

    work = _work_dir(out_dir)
    saver = _Saver(work, _fingerprint(model_dir, None if data is None else str(data), str(teacher_name), cfg), cfg.checkpoint_every_s)
    state = saver.load() if resume else None
    if not resume and work.exists():
        shutil.rmtree(work, ignore_errors=True)
    elapsed_before = float(state["elapsed"]) if state else 0.0

    if state is not None and "tokens" in state:
        ids, data_what = state["tokens"], state["data_what"]
    else:
        ids, data_what = build_tokens(model_dir, data, teacher_model, tokenizer, cfg, progress)
    use_bf16 = autocast_enabled(cfg.autocast, device)
    cache: TeacherBatches
    if online:
        cache = OnlineTeacher(teacher_model, ids, cfg.stage2.top_k, autocast=use_bf16)
    else:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            cache = build_cache(teacher_model, ids, cfg.stage2.top_k, progress=progress)
    base_state = {"tokens": ids, "data_what": data_what}

    layers = student.attention_layers()
    decay = DecayRates(layers) if cfg.stage1.train_decay and all(a.geometric for a in layers) else None
    if cfg.lora_rank > 0:
        for i, attn in enumerate(layers):
            add_adapters(attn, cfg.lora_rank, seed=seed * 1000 + i)
    grid = WeightGrid(student, cfg.quant_aware) if cfg.quant_aware is not None else None
    # Moved after the adapters and the grid are attached: Module.to keeps the
    # Parameter objects, so the grid's and the optimizer's references hold.
    student.to(device)
    if decay is not None:
        decay.to(device)
    calibration: dict[str, Any] | None = None
    grid_on = False  # stage 2 has reached QuantAwareConfig.start
    grid_steps = 0

    budget_s = cfg.budget_minutes * 60.0

    def used() -> float:
        return elapsed_before + time.monotonic() - t_start

    train_left = max(budget_s - used() - SAVE_RESERVE_S, 1.0)
    stage1_s = train_left * (cfg.stage1.fraction if cfg.stage2.enabled else 1.0)
    phase_start_used = used()
    history: dict[str, list[float]] = {"stage1": [], "stage2": []}
    done_steps = {1: 0, 2: 0}
    start_stage, start_step = 1, 0
    if state is not None:
        history = state["history"]
        done_steps = state["done_steps"]
        start_stage, start_step = state["stage"], state["step"]

    n_seq = ids.shape[0]
    refits: list[float] = []
    trained: set[str] = set(state["params"]) - {"__decay__"} if state is not None else set()
    for stage in (1, 2):
        if stage == 2 and not cfg.stage2.enabled:
            break
        if stage < start_stage:
            continue
        sc_steps = cfg.stage1.steps if stage == 1 else cfg.stage2.steps
        batch = min(cfg.stage1.batch if stage == 1 else cfg.stage2.batch, n_seq)
        if stage == 2:
            stage_s = max(budget_s - used() - SAVE_RESERVE_S, 1.0)
        else:
            stage_s = stage1_s
        groups = _param_groups(student, decay, stage, cfg)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
        gen = torch.Generator().manual_seed(seed * 31 + stage)
        step = 0
        if state is not None and stage == start_stage:
            _load_trainable(student, decay, state["params"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            step = start_step
            stage_s = state.get("stage_s", stage_s)
            calibration = state.get("quant_calibration", calibration)
            grid_on = bool(state.get("grid_on", False))
            grid_steps = int(state.get("grid_steps", 0))
            phase_start_used = state.get("phase_start_used", phase_start_used)
        else:
            phase_start_used = used()
        if sc_steps == 0:
            continue
        if stage == 1 and step == 0 and cfg.stage1.refit_output:
            _refit(student, cache, decay, cfg, seed, trained, refits, progress)
        bar = tqdm(
            total=sc_steps, initial=step, desc=f"stage {stage}: {'attention transfer' if stage == 1 else 'distillation'}",
            unit="step", disable=not progress,
        )
        while True:
            if sc_steps is not None:
                if step >= sc_steps:
                    break
                frac = step / sc_steps
            else:
                frac = (used() - phase_start_used) / stage_s
                if frac >= 1.0:
                    break
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * _schedule(frac)
            if stage == 2 and grid is not None and not grid_on and frac >= cfg.quant_aware.start:
                grid_on = True
                if cfg.quant_aware.calibrate:
                    if decay is not None:
                        decay.write_tables()  # the activations measured should see the trained decay
                    calibration = calibrate_in_place(student, cache.ids, cfg.quant_aware, progress)
                    # Every layer tensor may have been rescaled: keep them all in resumable state.
                    trained.update(n for n, _ in student.named_parameters() if ".layers." in n)
            rows = torch.randperm(n_seq, generator=gen)[:batch]
            opt.zero_grad(set_to_none=True)
            # Grid phase: forward and backward on the rounded weights, the
            # update on the float masters (straight-through estimator).
            grid_steps += int(grid_on and stage == 2)
            with grid.rounded() if grid_on and stage == 2 else contextlib.nullcontext():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    if stage == 1:
                        loss, _ = transfer_loss(student, cache, rows, decay)
                    else:
                        loss = distill_loss(student, cache, rows, decay, cfg.stage2.ce_weight)
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            step += 1
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DiJiangError(f"stage {stage} loss became {value} at step {step}; lower the learning rate")
            history[f"stage{stage}"].append(value)
            done_steps[stage] = step
            bar.update(1)
            if sc_steps is None:  # a time budget: the bar has no step total, so show the time left
                left = max(0.0, stage_s - (used() - phase_start_used))
                bar.set_postfix(loss=f"{value:.4f}", left=f"{int(left) // 60}:{int(left) % 60:02d}")
            else:
                bar.set_postfix(loss=f"{value:.4f}")
            saver.save(
                {
                    **base_state, "stage": stage, "step": step, "params": _trainable_state(student, decay, trained),
                    "optimizer": opt.state_dict(), "generator": gen.get_state(), "history": history,
                    "done_steps": done_steps, "elapsed": used(), "stage_s": stage_s,
                    "phase_start_used": phase_start_used, "quant_calibration": calibration, "grid_on": grid_on,
                    "grid_steps": grid_steps,
                }
            )
            if on_step is not None:
                on_step(stage, step, value)
        bar.close()
        if stage == 1 and cfg.stage1.refit_output:
            _refit(student, cache, decay, cfg, seed, trained, refits, progress)
        state = None

    # -- finalise: plain checkpoint ------------------------------------------
    # On the CPU: ONNX Runtime's rounding (snap) and the saved tensors live there.
    student.requires_grad_(False).to("cpu")
    teacher_model.model.to("cpu")
    if decay is not None:
        decay.to("cpu")
    merged = merge_adapters(student)
    if grid is not None:
        if not grid_on and cfg.quant_aware.calibrate:  # stage 2 never reached the grid phase
            if decay is not None:
                decay.write_tables()
            calibration = calibrate_in_place(student, cache.ids, cfg.quant_aware, progress)
        grid.snap()
    if decay is not None:
        decay.write_tables()
    else:
        student.refresh_decay()
    heldout = None
    if (model_dir / "tokenizer.json").exists():
        heldout = evaluate(student, None, tokenizer=tokenizer).perplexity
    h1, h2 = history["stage1"], history["stage2"]
    record = {
        "teacher": str(teacher_name),
        "data": data_what,
        "train_tokens": int(ids.numel()),
        "settings": cfg.to_dict(),
        "stage1_steps": done_steps[1],
        "stage2_steps": done_steps[2],
        "stage1_loss": [h1[0], h1[-1]] if h1 else None,
        "stage2_loss": [h2[0], h2[-1]] if h2 else None,
        "adapters_merged": merged,
        "refit_mse": refits,
        "decay_gamma": decay.gammas() if decay is not None else None,
        "heldout_perplexity": heldout,
        "seconds": round(used(), 1),
        "bf16_autocast": use_bf16,
        "device": str(device),
        "teacher_pass": "online" if online else "cache",
        "threads": torch.get_num_threads(),
        "source_checkpoint": str(model_dir),
    }
    if grid is not None:
        record[QUANT_RECORD_KEY] = {**cfg.quant_aware.to_record(), "calibration": calibration, "grid_steps": grid_steps}
    student.config.raw["dijiang_finetune"] = {k: v for k, v in record.items() if k not in ("decay_gamma",)}
    save_checkpoint(
        student,
        out_dir,
        tokenizer_dir=model_dir,
        overwrite=overwrite,
        extra_files={"finetune.json": json.dumps(record, indent=2) + "\n"},
    )
    shutil.rmtree(work, ignore_errors=True)
    return FinetuneResult(
        out_dir=out_dir,
        stage1_steps=done_steps[1],
        stage2_steps=done_steps[2],
        stage1_loss=tuple(record["stage1_loss"]) if h1 else None,
        stage2_loss=tuple(record["stage2_loss"]) if h2 else None,
        heldout_perplexity=heldout,
        seconds=record["seconds"],
        train_tokens=record["train_tokens"],
        record=record,
    )
