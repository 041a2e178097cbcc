"""Fine-tuning settings (dataclasses), recorded in the output checkpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
import math
import os
import time
from typing import Any

import torch

from ..contract.errors import DiJiangError
from ..quantization.grid import QuantAwareConfig


def _busy_cpus(window_s: float = 0.25) -> float | None:
    """CPUs that other processes keep busy right now (Linux ``/proc/stat``), or None."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(window_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads for training and evaluation: the CPUs nothing else is using.

    The CPU count minus the CPUs other processes keep busy (sampled over a
    quarter second from ``/proc/stat``; where that is unavailable, one CPU is
    left free), at least 1. On an idle 2-core VM two threads ran a SmolLM2
    distillation step 1.5x faster than one (4.9 vs 7.5 s); next to another
    busy process two OpenMP threads were 13x slower than one (threads
    spin-waiting on a preempted partner), hence the sampling.
    """
    n = os.cpu_count() or 2
    busy = _busy_cpus()
    if busy is None:
        return max(1, n - 1)
    return max(1, min(n, n - math.ceil(busy - 0.3)))


@dataclass
class DataConfig:
    """Where training tokens come from and how they are cut.

    Attributes:
        seq_len: tokens per training sequence.
        max_tokens: tokens of training text kept (the teacher is run once over
            them and its per-layer attention inputs/outputs cached in bf16,
            ``layers * 2 * hidden * 2`` bytes per token: 69 KB for SmolLM2).
        generated: number of chat answers the teacher writes from the built-in
            prompts, used only when no user data is given; None: 32 when the
            budget is at least 6 minutes (or steps are given), else 0 (at
            ~3 s per answer on 2 busy cores it would eat a short budget).
        generated_tokens: maximum new tokens per generated answer.
        builtin_chars: characters of local text (package descriptions, stdlib
            docstrings) read for the built-in corpus.
        scale_with_budget: on a time budget above :data:`REFERENCE_BUDGET`
            minutes, grow ``max_tokens`` and the automatic ``generated`` count
            in proportion (up to ``max_scale`` times): a 20-minute
            run on the fixed 16k tokens saw them four times and fit them
            (training loss 4.3 -> 2.1) while held-out perplexity gained little.
        max_scale: the cap of that growth; None: :data:`MAX_DATA_SCALE`. The
            teacher cache grows with it (~69 KB per SmolLM2 token: 8x the
            default data is 131k tokens, 9 GB of host memory).
    """

    seq_len: int = 256
    max_tokens: int = 16_384
    generated: int | None = None
    generated_tokens: int = 160
    builtin_chars: int = 3_000_000
    scale_with_budget: bool = True
    max_scale: float | None = None

    def __post_init__(self) -> None:
        if self.max_scale is not None and not (math.isfinite(self.max_scale) and self.max_scale >= 1):
            raise DiJiangError(f"max_scale must be None (the default cap) or a number >= 1, got {self.max_scale!r}")

    def resolve(self, budget_minutes: float, steps: int | None, online: bool = False) -> None:
        """Fill ``generated`` (None: 32 from 6 minutes or with steps, else 0)
        and scale the data with the budget (see ``scale_with_budget``).

        ``online`` (teacher run per batch, see ``FinetuneConfig.teacher_pass``):
        nothing is cached, so ``max_tokens`` left at its default becomes
        :data:`ONLINE_MAX_TOKENS` and the automatic ``generated`` count is
        multiplied by :data:`ONLINE_GENERATED_SCALE`.
        """
        auto_generated = self.generated is None
        if auto_generated:
            self.generated = 32 if (steps is not None or budget_minutes >= 6) else 0
        if online:
            if self.max_tokens == DataConfig.max_tokens:
                self.max_tokens = ONLINE_MAX_TOKENS
            if auto_generated:
                self.generated *= ONLINE_GENERATED_SCALE
            return
        if not self.scale_with_budget or steps is not None or budget_minutes <= REFERENCE_BUDGET:
            return
        cap = MAX_DATA_SCALE if self.max_scale is None else self.max_scale
        factor = min(budget_minutes / REFERENCE_BUDGET, cap)
        self.max_tokens = max(self.max_tokens, int(self.max_tokens * factor) // self.seq_len * self.seq_len)
        if auto_generated:
            self.generated = int(self.generated * factor)


#: Training tokens kept when the teacher runs online (nothing cached): about
#: all of the built-in local text (~3M characters), for a GPU's much higher
#: step rate. A starting point, not measured or tuned on hardware yet.
ONLINE_MAX_TOKENS = 1 << 20
#: Teacher-written answers, relative to the CPU default, when online.
ONLINE_GENERATED_SCALE = 8

#: The budget (minutes) the default data size was chosen for.
REFERENCE_BUDGET = 9.0
#: Largest data growth from ``scale_with_budget`` (the teacher cache is
#: ~69 KB per SmolLM2 token: 4x = 65k tokens = 4.5 GB).
MAX_DATA_SCALE = 4.0


@dataclass
class Stage1Config:
    """Attention transfer: each DiJiang layer mimics the teacher's softmax attention.

    Attributes:
        steps: optimizer steps; None: run until ``fraction`` of the budget is used.
        fraction: share of the training time (after data and caching) for stage 1.
        batch: sequences per step (all layers are trained each step).
        lr: learning rate of the new DiJiang parameters (P, W_G, GroupNorm).
        lr_base: learning rate of pretrained projections trained here.
        train_qk: also train the query/key projections (GPT-NeoX: the fused qkv).
        train_v: also train the value projection (LLaMA ``v_proj``; GPT-NeoX's
            fused qkv already follows ``train_qk``).
        train_decay: train one decay rate per head (tables stay geometric).
        lr_decay: learning rate of the decay parameters ``log(1 - gamma)``.
        refit_output: before the first and after the last stage-1 step,
            replace each layer's output projection by the ridge least-squares
            fit of the teacher's attention output on ``refit_rows`` cached
            sequences (exact optimum of the stage-1 loss for that weight;
            seconds on CPU).
        refit_rows: cached sequences used by the refit.
        ridge: ridge strength relative to the mean diagonal of the Gram matrix.
    """

    steps: int | None = None
    fraction: float = 0.5
    batch: int = 4
    lr: float = 2e-3
    lr_base: float = 3e-4
    train_qk: bool = True
    train_v: bool = False
    train_decay: bool = True
    lr_decay: float = 2e-2
    refit_output: bool = True
    refit_rows: int = 16
    ridge: float = 1e-2

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction < 1.0):
            raise DiJiangError(f"stage 1 fraction must be in (0, 1), got {self.fraction!r}")


@dataclass
class Stage2Config:
    """End-to-end distillation of the teacher's next-token distribution.

    Attributes:
        enabled: run stage 2 at all.
        steps: optimizer steps; None: use the rest of the budget.
        batch: sequences per step.
        lr: learning rate of DiJiang parameters and adapters / projections.
        top_k: teacher logits kept per token (cached with the hidden states);
            the loss is the cross-entropy to the teacher's renormalised top-k
            distribution.
        ce_weight: weight of the plain next-token loss added to it.
        train: ``attention`` trains the DiJiang parameters and (without
            adapters) the full attention projections; ``all`` also the MLPs
            and norms of every layer (embeddings and head stay frozen);
            ``dijiang`` only the new parameters. ``attention`` with adapters
            leaves every base matrix but q/k/v/o untouched, which is what
            lets a trained conversion ship as a small delta; ``adapters``
            (needs adapters) also trains the MLPs, through rank-R adapters
            on their projections, and the layers' norms, and still ships as
            a small delta.
        hidden_weight: weight of the per-layer hidden-state term: the mean
            over layers of the relative MSE between the student's attention
            input (after the layer's norm) and the teacher's cached one,
            which keeps the residual stream from drifting where the logits
            alone say little. 0 turns it off.
    """

    enabled: bool = True
    steps: int | None = None
    batch: int = 4
    lr: float = 3e-4
    top_k: int = 64
    ce_weight: float = 0.0
    train: str = "all"
    hidden_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.train not in STAGE2_TRAIN:
            raise DiJiangError(f"stage 2 train must be one of {', '.join(STAGE2_TRAIN)}, got {self.train!r}")
        for name in ("ce_weight", "hidden_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise DiJiangError(f"stage 2 {name} must be a finite number >= 0, got {value!r}")


#: What stage 2 may train (see :class:`Stage2Config`).
STAGE2_TRAIN = ("all", "attention", "adapters", "dijiang")


@dataclass
class FinetuneConfig:
    """All settings of one :func:`~dijiang_deploy.finetune.finetune` run.

    Attributes:
        budget_minutes: wall-clock budget of the whole run (loading, data,
            teacher pass, both stages, saving) when steps are not given.
        seed: seeds data order, generation, adapters and batch sampling.
        lora_rank: 0: no adapters (stage 1 trains q/k fully, stage 2 the
            attention projections); R > 0: rank-R adapters on q/k/v/o in both
            stages, merged into the weights before saving.
        threads: torch threads; None: :func:`default_threads` (the CPUs
            that other processes leave idle when the run starts).
        checkpoint_every_s: how often resumable state is written.
        autocast: ``auto`` runs the teacher pass and both stages' matmuls in
            bfloat16 (``torch.autocast``) when the CPU has native bf16
            (AVX512-BF16/AMX: about 2x faster), ``bf16`` always, ``off``
            never. Weights, optimizer state and evaluation stay float32.
        quant_aware: None, or the weight grid (bits, block size, symmetry)
            stage 2 trains through; the saved weights are rounded to it so
            that ``export --weights int4`` with the same grid is lossless
            (see :mod:`~dijiang_deploy.quantization.grid`).
        device: ``auto`` (the first CUDA GPU when torch sees one, else the
            CPU), ``cpu``, ``cuda`` or ``cuda:N``: where the student and the
            teacher train and run. Saving, snapping and the held-out check
            run on the CPU.
        teacher_pass: ``cache`` runs the teacher once over all training
            tokens and keeps its per-layer states in host memory (bf16);
            ``online`` runs it on every batch instead (no cache, so the data
            is not capped by memory: see :data:`ONLINE_MAX_TOKENS`);
            ``auto``: ``cache`` on the CPU, ``online`` on a GPU, where a
            teacher forward costs little next to the step and steps are
            expected to be orders of magnitude faster than on 2 CPU cores
            (an estimate from FLOPs, not measured yet), so the CPU-sized
            data would be seen many times over.
    """

    budget_minutes: float = 9.0
    seed: int = 0
    lora_rank: int = 0
    threads: int | None = None
    checkpoint_every_s: float = 60.0
    autocast: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    quant_aware: QuantAwareConfig | None = None
    device: str = "auto"
    teacher_pass: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved_device(self) -> torch.device:
        """The torch device of this run (see ``device``).

        Raises:
            DiJiangError: an unknown name, or CUDA asked for and not usable.
        """
        name = self.device.strip().lower()
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(name)
        except (RuntimeError, ValueError):
            raise DiJiangError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if dev.type not in ("cpu", "cuda"):
            raise DiJiangError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise DiJiangError(f"device {self.device!r}: this torch build sees no CUDA GPU "
                                   f"(torch {torch.__version__}, CUDA {torch.version.cuda}); use --device cpu")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise DiJiangError(f"device {self.device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return dev

    def resolved_teacher_pass(self, device: torch.device) -> str:
        """``cache`` or ``online`` for ``device`` (see ``teacher_pass``)."""
        if self.teacher_pass == "auto":
            return "cache" if device.type == "cpu" else "online"
        if self.teacher_pass not in ("cache", "online"):
            raise DiJiangError(f"teacher_pass must be auto, cache or online, got {self.teacher_pass!r}")
        return self.teacher_pass

    def resolved_threads(self) -> int:
        """The torch thread count this run uses (see ``threads``)."""
        return self.threads if self.threads else default_threads()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        data = dict(data)
        sub = {"data": DataConfig, "stage1": Stage1Config, "stage2": Stage2Config}
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            if k in sub:
                kwargs[k] = sub[k](**v)
            elif k == "quant_aware":
                kwargs[k] = QuantAwareConfig(**v) if v else None
            elif k in cls.__dataclass_fields__:
                kwargs[k] = v
        return cls(**kwargs)
