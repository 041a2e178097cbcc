"""Quality gates of quantized exports against their float32 model (used by ``verify`` and the studies)."""

from __future__ import annotations

import numpy as np

#: Quality gates of issue #7 against the float32 export: (min top-1 agreement, max perplexity increase).
QUALITY_TARGETS = {"int8": (0.99, 0.03), "int4": (0.95, 0.10)}


def quality_report(logits: np.ndarray, reference: np.ndarray, input_ids: np.ndarray) -> dict[str, float]:
    """Compare quantized and float32 logits ``[B, N, V]`` on the same tokens.

    Returns ``top1_agreement`` (fraction of positions with the same argmax),
    ``ppl`` and ``ppl_reference`` (perplexity of ``input_ids[:, 1:]`` under
    each; only meaningful on real text), ``ppl_change`` (relative) and
    ``max_abs`` (max |logit difference|).
    """

    def ppl(lg: np.ndarray) -> float:
        x = lg[:, :-1].astype(np.float64)
        tgt = input_ids[:, 1:]
        m = x.max(-1, keepdims=True)
        lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
        picked = np.take_along_axis(x, tgt[..., None], axis=-1)[..., 0]
        return float(np.exp((lse - picked).mean()))

    p, p_ref = ppl(logits), ppl(reference)
    return {
        "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        "ppl": p,
        "ppl_reference": p_ref,
        "ppl_change": p / p_ref - 1.0,
        "max_abs": float(np.abs(logits.astype(np.float32) - reference.astype(np.float32)).max()),
    }
