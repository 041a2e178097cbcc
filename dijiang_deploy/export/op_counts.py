"""Op statistics of an exported step graph, recorded in its manifest."""

from __future__ import annotations

from collections import Counter

import onnx


def decode_op_counts(model: onnx.ModelProto, num_layers: int) -> dict[str, float]:
    """Nodes per op type per layer that a one-token (decode) step runs.

    That is the whole main graph, plus, for each ``If``, its ``then_branch``:
    the inline graph's ``If`` takes it for one-token steps.
    """
    counts = Counter(n.op_type for n in model.graph.node)
    for node in model.graph.node:
        if node.op_type == "If":
            then = next(a.g for a in node.attribute if a.name == "then_branch")
            counts.update(n.op_type for n in then.node)
    return {op: round(c / num_layers, 2) for op, c in sorted(counts.items())}
