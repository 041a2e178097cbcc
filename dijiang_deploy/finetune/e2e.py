"""Stage 2: end-to-end distillation of the teacher's next-token distribution."""

from __future__ import annotations

import torch

from ..modeling.model import DiJiangForCausalLM
from .transfer import DecayRates, TeacherBatches, relative_mse


def distill_loss(
    model: DiJiangForCausalLM,
    cache: TeacherBatches,
    rows: torch.Tensor,
    decay: DecayRates | None = None,
    ce_weight: float = 0.0,
    hidden_weight: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy from the teacher's top-K distribution to the student's.

    For tokens ``t`` of the sequences ``rows``: ``-sum_k p_k log q(i_k)`` with
    ``p`` the softmax of the teacher's cached top-K logits ``[B, L, K]`` and
    ``q`` the student's full softmax ``[B, L, V]``; plus ``ce_weight`` times
    the plain next-token loss on the text itself; plus ``hidden_weight``
    times the mean over layers of the relative MSE between each layer's
    attention input (after its norm) in the student and in the teacher's
    cache. Scalar float32.
    """
    if decay is not None:
        decay.install()
    ids = cache.input_ids(rows)
    top_values, top_index = cache.top_k(rows)
    inputs: list[torch.Tensor] = []
    hooks = []
    if hidden_weight:
        # The attention block's first argument is the normed hidden state the
        # teacher cache holds for the same layer.
        hooks = [
            attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
            for attn in model.attention_layers()
        ]
    try:
        logits = model(ids, mode="chunked", chunk_size=64).logits.float()
    finally:
        for h in hooks:
            h.remove()
    logq = torch.log_softmax(logits, dim=-1)
    p = torch.softmax(top_values.float(), dim=-1)
    picked = logq.gather(-1, top_index.long())
    loss = -(p * picked).sum(-1).mean()
    if ce_weight:
        nll = -logq[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].mean()
        loss = loss + ce_weight * nll
    if hidden_weight:
        xs, _ = cache.layer_io(rows)
        if len(inputs) != xs.shape[0]:
            raise RuntimeError(f"captured {len(inputs)} attention inputs for {xs.shape[0]} cached layers")
        hidden = torch.stack([relative_mse(x.float(), xs[i]) for i, x in enumerate(inputs)]).mean()
        loss = loss + hidden_weight * hidden
    return loss
