"""A tiny teacher worth imitating and its DiJiang student, for fine-tuning tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from dijiang_deploy.checkpoint import save_checkpoint
from dijiang_deploy.convert import BaseModel, convert_base
from dijiang_deploy.finetune import FinetuneConfig, SoftmaxTeacher
from dijiang_deploy.data.text import ByteTokenizer
from dijiang_deploy.testing import random_base

NOUNS = ["cat", "dog", "bird", "fish", "girl", "boy", "farmer", "robot", "teacher", "horse"]
VERBS = ["sees", "likes", "follows", "helps", "finds", "calls", "draws", "feeds"]
PLACES = ["in the garden", "near the river", "at school", "on the hill", "under the tree", "by the sea"]


def sentences(n: int, seed: int) -> str:
    """Toy English with structure a tiny model can learn (byte level)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        out.append(f"the {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} {rng.choice(PLACES)}.")
    return " ".join(out) + "\n"


def pretrained_base(family: str, steps: int = 120) -> BaseModel:
    """A tiny softmax model trained briefly on :func:`sentences` (a teacher worth imitating)."""
    base = random_base(family, seed=11)
    teacher = SoftmaxTeacher.from_base(base)
    model = teacher.model.requires_grad_(True).train()
    tok = ByteTokenizer(model.config.vocab_size)
    ids = torch.tensor(tok.encode(sentences(400, seed=1)))
    n = 64
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - n - 1, (8,), generator=gen)
        batch = torch.stack([ids[s : s + n] for s in starts])
        logits, _ = teacher.run(batch)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    leaves = ("proj_matrix", "W_G", "D1", "D2", "group_norm.weight", "group_norm.bias")
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(leaves)}
    return BaseModel(base.raw_config, tensors, f"tiny pretrained {family}")


def tiny_student(root: Path) -> dict:
    """A pretrained tiny LLaMA teacher, its unconverted DiJiang student folder under
    ``root``, and texts (what the fine-tuning tests' ``trained`` fixtures hold)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = pretrained_base("llama")
    student_dir = save_checkpoint(convert_base(base, progress=False), root / "student")
    train = root / "train.txt"
    train.write_text(sentences(300, seed=2))
    heldout = root / "heldout.txt"
    heldout.write_text(sentences(60, seed=3))
    return {
        "teacher": SoftmaxTeacher.from_base(base),
        "dir": student_dir,
        "train": train,
        "heldout": heldout,
        "tok": ByteTokenizer(base.raw_config["vocab_size"]),
        "root": root,
    }


def small_config(**stage1) -> FinetuneConfig:
    # One thread, fixed: the default counts the CPUs other processes leave idle,
    # which makes float results (and so comparisons between runs) depend on load.
    cfg = FinetuneConfig(checkpoint_every_s=0.0, threads=1)
    cfg.data.seq_len = 64
    cfg.stage1.batch = 4
    cfg.stage2.batch = 4
    for k, v in stage1.items():
        setattr(cfg.stage1, k, v)
    return cfg
