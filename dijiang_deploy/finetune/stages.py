"""The two training stages of ``finetune()``, and what a run carries between steps.

:class:`TrainingRun` holds the models, the teacher batches, the budget and
the bookkeeping a resumed run must restore; :func:`run_stage` runs one stage
(attention transfer or distillation) on it, saving resumable state to the
work folder as it goes (:class:`Saver`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..contract.atomic import atomic_file
from ..contract.errors import DiJiangError
from ..modeling.model import DiJiangForCausalLM
from ..quantization.grid import WeightGrid, calibrate_in_place
from .config import FinetuneConfig
from .e2e import distill_loss
from .transfer import DecayRates, TeacherBatches, refit_output, transfer_loss

log = logging.getLogger(__name__)

#: Seconds kept back from the budget for merging, saving and the held-out check.
SAVE_RESERVE_S = 25.0
STATE_VERSION = 1


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


def refit(
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


# -- trainable parameters -----------------------------------------------------


_NEW = ("proj_matrix", "W_G", "group_norm.weight", "group_norm.bias")


def param_groups(
    model: DiJiangForCausalLM, decay: DecayRates | None, stage: int, cfg: FinetuneConfig
) -> list[dict[str, Any]]:
    """Mark trainable parameters and return optimizer groups (names kept for resuming)."""
    model.requires_grad_(False)
    s1, s2 = cfg.stage1, cfg.stage2
    new, base, lora = [], [], []
    for name, p in model.named_parameters():
        leaf = name.split(".self_attn.")[-1].split(".attention.")[-1]
        if ".self_attn." not in name and ".attention." not in name:
            # Stage 2 "all": MLPs and norms of every layer too (not embeddings/head);
            # "adapters": the MLPs' adapters (their matrices stay frozen) and the norms.
            if stage == 2 and ".layers." in name:
                if s2.train == "all" and "lora_" not in name:
                    base.append(p)
                elif s2.train == "adapters" and "lora_" in name:
                    lora.append(p)
                elif s2.train == "adapters" and p.dim() == 1 and ".mlp." not in name:
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
            elif stage == 2 and s2.train in ("attention", "adapters", "all"):
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


def schedule(progress: float) -> float:
    """Linear warm-up over the first 5%, then cosine down to 10%."""
    if progress < 0.05:
        return 0.1 + 0.9 * progress / 0.05
    p = min(1.0, (progress - 0.05) / 0.95)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def trainable_state(model: nn.Module, decay: DecayRates | None, names: set[str]) -> dict[str, torch.Tensor]:
    """Every parameter trained so far in any stage (``names`` accumulates them)."""
    names.update(n for n, p in model.named_parameters() if p.requires_grad)
    state = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
    if decay is not None:
        state["__decay__"] = decay.a.detach().clone()
    return state


def load_trainable(model: nn.Module, decay: DecayRates | None, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            if name == "__decay__":
                if decay is not None:
                    decay.a.copy_(value)
            elif name in params:
                params[name].copy_(value)


class Saver:
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


@dataclass
class TrainingRun:
    """What both stages share, and what the work folder saves between sessions.

    ``elapsed_before`` is the time spent by earlier (interrupted) sessions of
    the same run; :meth:`used` counts from their start, so a resumed run keeps
    its budget. ``trained`` accumulates the names of every parameter trained
    so far (stage 1's survive into stage 2's resumable state).
    """

    cfg: FinetuneConfig
    student: DiJiangForCausalLM
    cache: TeacherBatches
    decay: DecayRates | None
    grid: WeightGrid | None
    saver: "Saver"
    device: torch.device
    use_bf16: bool
    base_state: dict[str, Any]
    elapsed_before: float = 0.0
    progress: bool = True
    on_step: Callable[[int, int, float], None] | None = None
    t_start: float = field(default_factory=time.monotonic)
    history: dict[str, list[float]] = field(default_factory=lambda: {"stage1": [], "stage2": []})
    done_steps: dict[int, int] = field(default_factory=lambda: {1: 0, 2: 0})
    trained: set[str] = field(default_factory=set)
    refits: list[float] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    grid_on: bool = False  # stage 2 has reached QuantAwareConfig.start
    grid_steps: int = 0
    phase_start_used: float = 0.0

    def used(self) -> float:
        """Seconds of the budget used, all sessions of this run together."""
        return self.elapsed_before + time.monotonic() - self.t_start

    @property
    def budget_s(self) -> float:
        return self.cfg.budget_minutes * 60.0

    def restore(self, state: dict[str, Any]) -> None:
        """Take the run-wide bookkeeping of a saved state (the stage's own is read in :func:`run_stage`)."""
        self.history = state["history"]
        self.done_steps = state["done_steps"]
        self.trained = set(state["params"]) - {"__decay__"}

    def calibrate(self) -> None:
        """Rescale the student's input channels for the quantization grid (see ``QuantAwareConfig.calibrate``)."""
        if self.decay is not None:
            self.decay.write_tables()  # the activations measured should see the trained decay
        self.calibration = calibrate_in_place(self.student, self.cache.ids, self.cfg.quant_aware, self.progress)


def run_stage(
    run: TrainingRun, stage: int, stage_s: float, resume: dict[str, Any] | None = None
) -> None:
    """Train ``stage`` (1: attention transfer, 2: distillation) for its steps or ``stage_s`` seconds.

    ``resume``: the saved state of an interrupted session in this stage
    (parameters, optimizer, data order and progress are restored from it).

    Raises:
        DiJiangError: the loss became NaN or infinite.
    """
    # One loop on purpose: resume, schedule, grid phase, step and checkpoint share the loop's state; splitting it would pass a dozen locals around.
    from tqdm.auto import tqdm

    cfg, student, decay, cache = run.cfg, run.student, run.decay, run.cache
    sc_steps = cfg.stage1.steps if stage == 1 else cfg.stage2.steps
    n_seq = cache.ids.shape[0]
    batch = min(cfg.stage1.batch if stage == 1 else cfg.stage2.batch, n_seq)
    seed = cfg.seed
    groups = param_groups(student, decay, stage, cfg)
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)
    gen = torch.Generator().manual_seed(seed * 31 + stage)
    step = 0
    if resume is not None:
        load_trainable(student, decay, resume["params"])
        opt.load_state_dict(resume["optimizer"])
        gen.set_state(resume["generator"])
        step = resume["step"]
        stage_s = resume.get("stage_s", stage_s)
        run.calibration = resume.get("quant_calibration", run.calibration)
        run.grid_on = bool(resume.get("grid_on", False))
        run.grid_steps = int(resume.get("grid_steps", 0))
        run.phase_start_used = resume.get("phase_start_used", run.phase_start_used)
    else:
        run.phase_start_used = run.used()
    if sc_steps == 0:
        return
    if stage == 1 and step == 0 and cfg.stage1.refit_output:
        refit(student, cache, decay, cfg, seed, run.trained, run.refits, run.progress)
    grid = run.grid if stage == 2 else None
    bar = tqdm(
        total=sc_steps, initial=step, desc=f"stage {stage}: {'attention transfer' if stage == 1 else 'distillation'}",
        unit="step", disable=not run.progress,
    )
    while True:
        if sc_steps is not None:
            if step >= sc_steps:
                break
            frac = step / sc_steps
        else:
            frac = (run.used() - run.phase_start_used) / stage_s
            if frac >= 1.0:
                break
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * schedule(frac)
        if grid is not None and not run.grid_on and frac >= cfg.quant_aware.start:
            run.grid_on = True
            if cfg.quant_aware.calibrate:
                run.calibrate()
                # Every layer tensor may have been rescaled: keep them all in resumable state.
                run.trained.update(n for n, _ in student.named_parameters() if ".layers." in n)
        rows = torch.randperm(n_seq, generator=gen)[:batch]
        opt.zero_grad(set_to_none=True)
        # Grid phase: forward and backward on the rounded weights, the
        # update on the float masters (straight-through estimator).
        on_grid = grid is not None and run.grid_on
        run.grid_steps += int(on_grid)
        with grid.rounded() if on_grid else contextlib.nullcontext():
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
                if stage == 1:
                    loss, _ = transfer_loss(student, cache, rows, decay)
                else:
                    loss = distill_loss(student, cache, rows, decay, cfg.stage2.ce_weight, cfg.stage2.hidden_weight)
            loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        step += 1
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DiJiangError(f"stage {stage} loss became {value} at step {step}; lower the learning rate")
        run.history[f"stage{stage}"].append(value)
        run.done_steps[stage] = step
        bar.update(1)
        if sc_steps is None:  # a time budget: the bar has no step total, so show the time left
            left = max(0.0, stage_s - (run.used() - run.phase_start_used))
            bar.set_postfix(loss=f"{value:.4f}", left=f"{int(left) // 60}:{int(left) % 60:02d}")
        else:
            bar.set_postfix(loss=f"{value:.4f}")
        run.saver.save(
            {
                **run.base_state, "stage": stage, "step": step,
                "params": trainable_state(student, decay, run.trained),
                "optimizer": opt.state_dict(), "generator": gen.get_state(), "history": run.history,
                "done_steps": run.done_steps, "elapsed": run.used(), "stage_s": stage_s,
                "phase_start_used": run.phase_start_used, "quant_calibration": run.calibration,
                "grid_on": run.grid_on, "grid_steps": run.grid_steps,
            }
        )
        if run.on_step is not None:
            run.on_step(stage, step, value)
    bar.close()
    if stage == 1 and cfg.stage1.refit_output:
        refit(student, cache, decay, cfg, seed, run.trained, run.refits, run.progress)
