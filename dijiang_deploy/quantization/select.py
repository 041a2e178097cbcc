"""Which MatMuls of a step graph are the model's linear layers, and which one is its LM head.

What is quantized: every ``MatMul`` whose second input is a constant 2-D
float matrix and that is a linear layer of the model (q/k/v/o or
query_key_value/dense, the DiJiang gate ``W_G``, the MLP), plus the LM head
when asked. The head is the MatMul that produces the graph's ``logits``
output (through shape-only ops), as the step graph's own layout defines it.
Never quantized: the feature-map projection ``proj_matrix`` (a ``[d, d]``
MatMul whose result goes to ``Softmax``), embeddings (``Gather``), norms,
decay tables, the recurrence and its float32 state.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract.errors import ExportError


def node_attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


#: Ops a value may pass through between the head MatMul and the ``logits`` output.
_PASS_THROUGH = ("Reshape", "Squeeze", "Unsqueeze", "Slice", "Gather", "Cast", "Identity", "Transpose", "Add")


@dataclass(frozen=True)
class LinearWeight:
    """One selected MatMul: node name, weight initializer, ``[K, N]`` and role.

    ``role`` is ``head`` (produces the logits), ``gate`` (the DiJiang ``W_G``)
    or ``linear`` (attention projections and MLP; the dynamo exporter folds
    their transposed weights into anonymous ``val_*`` initializers, so they
    are told apart by structure, not by name).
    """

    node: str
    weight: str
    k: int
    n: int
    role: str


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _head_node(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """Name of the MatMul that produces ``logits`` (through shape-only ops), if any."""
    producer = {o: n for n in graph.node for o in n.output}
    name = "logits"
    for _ in range(16):
        node = producer.get(name)
        if node is None:
            return None
        if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
            return node.name
        if node.op_type not in _PASS_THROUGH:
            return None
        dynamic = [i for i in node.input if i and i not in inits]
        if len(dynamic) != 1:
            return None
        name = dynamic[0]
    return None


def ensure_node_names(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes unique names (the ORT quantizer selects by name)."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            cand = f"{node.op_type}_{i}"
            while cand in taken:
                cand += "_"
            node.name = cand
            taken.add(cand)


def _transposed_source(
    name: str, producer: dict[str, onnx.NodeProto], inits: dict[str, onnx.TensorProto]
) -> onnx.TensorProto | None:
    """The 2-D initializer ``W`` if ``name`` is ``Transpose(W, perm=[1, 0])`` (a tied LM head)."""
    node = producer.get(name)
    if node is None or node.op_type != "Transpose" or len(node.input) != 1 or node.input[0] not in inits:
        return None
    t = inits[node.input[0]]
    if len(t.dims) != 2 or list(node_attr(node, "perm", [1, 0])) != [1, 0]:
        return None
    return t


#: ``location`` of a placeholder's external data: a tensor whose values the
#: quantizer is handed separately. A name no file has, so a placeholder saved
#: by mistake fails to load instead of reading other bytes.
PLACEHOLDER = "<handed to the quantizer>"


def placeholder(name: str, dims: list[int], data_type: int) -> onnx.TensorProto:
    """An initializer with dims and type but no data (see :data:`PLACEHOLDER`)."""
    t = onnx.TensorProto(name=name, dims=list(dims), data_type=data_type)
    t.data_location = onnx.TensorProto.EXTERNAL
    t.external_data.add(key="location", value=PLACEHOLDER)
    return t


def external_location(t: onnx.TensorProto) -> str | None:
    """The file an external-data tensor's values are in (None: in the graph)."""
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in t.external_data if e.key == "location"), None)


def tensor_values(t: onnx.TensorProto, base_dir: str | Path | None = None) -> np.ndarray:
    """``t``'s values: copied from the graph, or memory-mapped (read-only) from
    its external data file under ``base_dir`` (the graph file's folder).

    Raises:
        ExportError: ``t`` is external data and no ``base_dir`` is given, or is a placeholder.
    """
    location = external_location(t)
    if location is None:
        return numpy_helper.to_array(t)
    if base_dir is None or location == PLACEHOLDER:
        raise ExportError(f"{t.name}: its values are not in the graph ({location!r}) and no folder to read them from")
    info = {e.key: e.value for e in t.external_data}
    return np.memmap(Path(base_dir) / location, dtype=helper.tensor_dtype_to_np_dtype(t.data_type), mode="r",
                     offset=int(info.get("offset", 0)), shape=tuple(t.dims))


def find_linear_weights(
    model: onnx.ModelProto,
    include_head: bool = False,
    materialize: bool = False,
    *,
    hand_over: dict[str, np.ndarray] | None = None,
    base_dir: str | Path | None = None,
) -> tuple[list[LinearWeight], dict[str, str]]:
    """Select the MatMuls to quantize in ``model``'s main graph.

    A weight is an initializer, or ``Transpose`` of one (the exporter keeps
    a tied LM head as ``Transpose(embedding)``). With ``materialize`` such
    selected weights are folded in place into a new ``[K, N]`` initializer
    (the embedding itself stays for the ``Gather``), so the quantizer can
    consume them; without it ``weight`` names the transposed source. With
    ``hand_over`` as well, the new initializer is only a placeholder and
    ``hand_over[weight]`` the transposed view of the source's values (read
    memory-mapped from ``base_dir`` when the source is external data), so a
    tied head past 2 GiB is never copied whole.

    Returns ``(selected, skipped)``; ``skipped`` maps a MatMul's node name to
    the reason it is left in floating point (``feature-map projection``,
    ``lm head``, ``weight shared by several MatMuls``, ...). Function bodies
    (the ``function`` flavor's recurrence) are never looked at.
    """
    graph = model.graph
    ensure_node_names(graph)
    inits = initializers(graph)
    consumers = _consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    head = _head_node(graph, inits)
    selected: list[LinearWeight] = []
    skipped: dict[str, str] = {}
    dead: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        a, b = node.input
        t = inits.get(b)
        source = None if t is not None else _transposed_source(b, producer, inits)
        if (t is None and source is None) or a in inits:
            skipped[node.name] = "no constant weight"
            continue
        w = t if t is not None else source
        if w.data_type not in _FLOAT_TYPES or len(w.dims) != 2:
            skipped[node.name] = "weight is not a 2-D float matrix"
            continue
        k, n = (int(w.dims[0]), int(w.dims[1])) if t is not None else (int(w.dims[1]), int(w.dims[0]))
        feeds = {c.op_type for c in consumers.get(node.output[0], [])}
        if w.name.endswith("proj_matrix") or "Softmax" in feeds:
            skipped[node.name] = "feature-map projection (proj_matrix)"
            continue
        is_head = node.name == head
        if is_head and not include_head:
            skipped[node.name] = "lm head (quantize_head is off)"
            continue
        if [c for c in consumers.get(b, []) if c is not node]:
            skipped[node.name] = "weight shared by several nodes"
            continue
        role = "head" if is_head else "gate" if w.name.endswith("W_G") else "linear"
        weight = b
        if source is not None and materialize:
            weight = f"{source.name}.T_{node.name}"
            if hand_over is not None:
                hand_over[weight] = tensor_values(source, base_dir).T
                folded = placeholder(weight, [k, n], source.data_type)
            else:
                folded = numpy_helper.from_array(np.ascontiguousarray(tensor_values(source, base_dir).T), weight)
            graph.initializer.append(folded)
            inits[weight] = folded
            node.input[1] = weight
            dead.append(producer[b])
        elif source is not None:
            weight = f"{source.name} (transposed)"
        selected.append(LinearWeight(node.name, weight, k, n, role))
    for node in dead:  # the Transpose fed only the folded MatMul (checked above)
        graph.node.remove(node)
    return selected, skipped


def num_layers(graph: onnx.GraphProto) -> int:
    return sum(1 for i in graph.input if i.name.startswith("past_state.")) or 1
