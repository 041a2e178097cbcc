"""``finetune()``: attention transfer + end-to-end distillation within a budget."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import checkpoint_folder, load_model, save_checkpoint
from ..contract.errors import DiJiangError
from ..modeling.model import DiJiangForCausalLM
from .config import FinetuneConfig
from ..data.text import DataError, load_tokenizer, read_text_source
from .data import PROMPTS, builtin_corpus, pack
from .lora import MLP_PROJECTIONS, add_adapters, merge_adapters
from .perplexity import evaluate
from ..quantization.grid import RECORD_KEY as QUANT_RECORD_KEY, QuantAwareConfig, WeightGrid
from .stages import SAVE_RESERVE_S, Saver, TrainingRun, autocast_enabled, run_stage
from .teacher import SoftmaxTeacher, load_teacher, recorded_source
from .transfer import DecayRates, OnlineTeacher, TeacherBatches, build_cache

log = logging.getLogger(__name__)



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


# -- the run ------------------------------------------------------------------


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
            rounded weights (:mod:`~dijiang_deploy.quantization.grid`);
            None: ``config.quant_aware`` (default: off).
        on_step: called as ``on_step(stage, step, loss)`` (tests, logging).

    Raises:
        CheckpointError: ``model_dir`` is not a DiJiang checkpoint.
        DataError: missing, unreadable or empty training text.
        DiJiangError: ``out_dir`` exists, bad teacher, teacher/student mismatch.
    """
    # The orchestration of settings, teacher, data, both stages and saving: each step is one call into stages.py or a helper here.
    t_start = time.monotonic()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = _settings(config, steps, budget_minutes, seed, lora_rank, stage2, quant_aware)
    device = cfg.resolved_device()
    online = cfg.resolved_teacher_pass(device) == "online"
    cfg.data.resolve(cfg.budget_minutes, steps, online=online)
    if out_dir.exists() and not overwrite:
        raise DiJiangError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    if data is not None:
        read_text_source(data)  # fail on missing/empty text before loading models
    checkpoint_folder(model_dir)
    _set_threads(cfg, device)

    student = load_model(model_dir)
    teacher_model, teacher_name = _teacher_for(student, model_dir, teacher)
    teacher_model.model.to(device)
    tokenizer = load_tokenizer(model_dir, student.config.vocab_size)

    work = _work_dir(out_dir)
    saver = Saver(work, _fingerprint(model_dir, None if data is None else str(data), str(teacher_name), cfg), cfg.checkpoint_every_s)
    state = saver.load() if resume else None
    if not resume and work.exists():
        shutil.rmtree(work, ignore_errors=True)

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

    layers = student.attention_layers()
    decay = DecayRates(layers) if cfg.stage1.train_decay and all(a.geometric for a in layers) else None
    if cfg.lora_rank > 0:
        for i, attn in enumerate(layers):
            add_adapters(attn, cfg.lora_rank, seed=seed * 1000 + i)
    if cfg.stage2.train == "adapters":
        for i, layer in enumerate(student.body.layers):
            add_adapters(layer.mlp, cfg.lora_rank, MLP_PROJECTIONS, seed=seed * 1000 + 500 + i)
    grid = WeightGrid(student, cfg.quant_aware) if cfg.quant_aware is not None else None
    # Moved after the adapters and the grid are attached: Module.to keeps the
    # Parameter objects, so the grid's and the optimizer's references hold.
    student.to(device)
    if decay is not None:
        decay.to(device)
    run = TrainingRun(
        cfg=cfg, student=student, cache=cache, decay=decay, grid=grid, saver=saver, device=device,
        use_bf16=use_bf16, base_state={"tokens": ids, "data_what": data_what},
        elapsed_before=float(state["elapsed"]) if state else 0.0, progress=progress, on_step=on_step,
        t_start=t_start,
    )
    start_stage = 1
    if state is not None:
        run.restore(state)
        start_stage = state["stage"]
    train_left = max(run.budget_s - run.used() - SAVE_RESERVE_S, 1.0)
    stage1_s = train_left * (cfg.stage1.fraction if cfg.stage2.enabled else 1.0)
    run.phase_start_used = run.used()
    for stage in (1, 2) if cfg.stage2.enabled else (1,):
        if stage < start_stage:
            continue
        stage_s = stage1_s if stage == 1 else max(run.budget_s - run.used() - SAVE_RESERVE_S, 1.0)
        run_stage(run, stage, stage_s, resume=state if state is not None and stage == start_stage else None)
    result = _finalise(run, model_dir, out_dir, tokenizer, teacher_model, str(teacher_name), data_what, online, overwrite)
    shutil.rmtree(work, ignore_errors=True)
    return result


def _settings(
    config: FinetuneConfig | None, steps: int | None, budget_minutes: float | None, seed: int, lora_rank: int,
    stage2: bool, quant_aware: QuantAwareConfig | None,
) -> FinetuneConfig:
    """A validated copy of ``config`` with ``finetune()``'s explicit arguments applied."""
    cfg = FinetuneConfig.from_dict(config.to_dict()) if config is not None else FinetuneConfig()
    if lora_rank < 0:
        raise DiJiangError(f"lora_rank must be >= 0, got {lora_rank}")
    cfg.seed, cfg.lora_rank = seed, lora_rank
    cfg.stage2.enabled = bool(stage2)
    if cfg.stage2.train == "adapters" and lora_rank < 1:
        raise DiJiangError("stage 2 train='adapters' needs lora_rank >= 1 (the rank of the MLPs' adapters)")
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
    return cfg


def _set_threads(cfg: FinetuneConfig, device: torch.device) -> None:
    threads = cfg.resolved_threads()
    cpus = os.cpu_count() or 1
    if device.type == "cpu" and not cfg.threads and threads < cpus:
        # The budget is wall-clock: a busy machine buys fewer steps, so say why.
        log.warning(
            "other processes keep %d of %d CPUs busy: training on %d thread(s), so this budget buys fewer steps "
            "(--threads N to override)", cpus - threads, cpus, threads,
        )
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)


def _teacher_for(
    student: DiJiangForCausalLM, model_dir: Path, teacher: str | Path | SoftmaxTeacher | None
) -> tuple[SoftmaxTeacher, str]:
    """The softmax teacher and its name; refuses one whose shapes differ from the student's."""
    if isinstance(teacher, SoftmaxTeacher):
        teacher_model, teacher_name = teacher, teacher.description or "given"
    else:
        name = str(teacher) if teacher is not None else recorded_source(model_dir)
        teacher_model = load_teacher(teacher, model_dir)
        teacher_name = name or teacher_model.description
    tc, sc = teacher_model.config, student.config
    for attr in ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        if getattr(tc, attr) != getattr(sc, attr):
            raise DiJiangError(
                f"teacher {teacher_name} does not match {model_dir}: {attr} {getattr(tc, attr)} vs {getattr(sc, attr)}"
            )
    return teacher_model, teacher_name


def _finalise(
    run: TrainingRun, model_dir: Path, out_dir: Path, tokenizer, teacher_model: SoftmaxTeacher, teacher_name: str,
    data_what: str, online: bool, overwrite: bool,
) -> FinetuneResult:
    """Merge adapters, snap to the grid, write the decay tables and save a plain checkpoint."""
    cfg, student, decay, grid = run.cfg, run.student, run.decay, run.grid
    # On the CPU: ONNX Runtime's rounding (snap) and the saved tensors live there.
    student.requires_grad_(False).to("cpu")
    teacher_model.model.to("cpu")
    if decay is not None:
        decay.to("cpu")
    merged = merge_adapters(student)
    if grid is not None:
        if not run.grid_on and cfg.quant_aware.calibrate:  # stage 2 never reached the grid phase
            run.calibrate()
        grid.snap()
    if decay is not None:
        decay.write_tables()
    else:
        student.refresh_decay()
    heldout = None
    if (model_dir / "tokenizer.json").exists():
        heldout = evaluate(student, None, tokenizer=tokenizer).perplexity
    h1, h2 = run.history["stage1"], run.history["stage2"]
    ids = run.base_state["tokens"]
    record = {
        "teacher": teacher_name,
        "data": data_what,
        "train_tokens": int(ids.numel()),
        "settings": cfg.to_dict(),
        "stage1_steps": run.done_steps[1],
        "stage2_steps": run.done_steps[2],
        "stage1_loss": [h1[0], h1[-1]] if h1 else None,
        "stage2_loss": [h2[0], h2[-1]] if h2 else None,
        "adapters_merged": merged,
        "refit_mse": run.refits,
        "decay_gamma": decay.gammas() if decay is not None else None,
        "heldout_perplexity": heldout,
        "seconds": round(run.used(), 1),
        "bf16_autocast": run.use_bf16,
        "device": str(run.device),
        "teacher_pass": "online" if online else "cache",
        "threads": torch.get_num_threads(),
        "source_checkpoint": str(model_dir),
    }
    if grid is not None:
        record[QUANT_RECORD_KEY] = {
            **cfg.quant_aware.to_record(), "calibration": run.calibration, "grid_steps": run.grid_steps,
        }
    student.config.raw["dijiang_finetune"] = {k: v for k, v in record.items() if k not in ("decay_gamma",)}
    save_checkpoint(
        student,
        out_dir,
        tokenizer_dir=model_dir,
        overwrite=overwrite,
        extra_files={"finetune.json": json.dumps(record, indent=2) + "\n"},
    )
    return FinetuneResult(
        out_dir=out_dir,
        stage1_steps=run.done_steps[1],
        stage2_steps=run.done_steps[2],
        stage1_loss=tuple(record["stage1_loss"]) if h1 else None,
        stage2_loss=tuple(record["stage2_loss"]) if h2 else None,
        heldout_perplexity=heldout,
        seconds=record["seconds"],
        train_tokens=record["train_tokens"],
        record=record,
    )
