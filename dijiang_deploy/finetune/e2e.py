"""Stage 2: end-to-end distillation of the teacher's next-token distribution."""

from __future__ import annotations

import torch

from ..modeling.model import DiJiangForCausalLM
from .transfer import DecayRates, TeacherBatches


def distill_loss(
    model: DiJiangForCausalLM,
    cache: TeacherBatches,
    rows: torch.Tensor,
    decay: DecayRates | None = None,
    ce_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy from the teacher's top-K distribution to the student's.

    For tokens ``t`` of the sequences ``rows``: ``-sum_k p_k log q(i_k)`` with
    ``p`` the softmax of the teacher's cached top-K logits ``[B, L, K]`` and
    ``q`` the student's full softmax ``[B, L, V]``; plus ``ce_weight`` times
    the plain next-token loss on the text itself. Scalar float32.
    """
    if decay is not None:
        decay.install()
    ids = cache.input_ids(rows)
    top_values, top_index = cache.top_k(rows)
    logits = model(ids, mode="chunked", chunk_size=64).logits.float()
    logq = torch.log_softmax(logits, dim=-1)
    p = torch.softmax(top_values.float(), dim=-1)
    picked = logq.gather(-1, top_index.long())
    loss = -(p * picked).sum(-1).mean()
    if ce_weight:
        nll = -logq[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].mean()
        loss = loss + ce_weight * nll
    return loss
