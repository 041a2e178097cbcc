"""Weight-only int8/int4 quantization of a step graph to ONNX Runtime's ``MatMulNBits``.

Integer weights, one scale per block of ``block_size`` consecutive input
channels; activations and the recurrent state stay in floating point. Each
selected ``MatMul`` (:mod:`.select` says which) becomes a
``com.microsoft::MatMulNBits`` node, which ONNX Runtime runs natively on
CPU and CUDA. The weights are rounded by ONNX Runtime's own C++ routine
(round to nearest, 4 or 8 bits: what
``onnxruntime.quantization.matmul_nbits_quantizer`` calls) into the layout
that quantizer writes, bit for bit (the tests compare the two), but a slice
of output columns at a time and, for a large export, straight from the
PyTorch weights: the quantizer copies each float matrix whole, which made a
multi-layer 2 GiB export peak near 4x its weights. The TensorRT form of the
same weights is in :mod:`.qdq`.

The settings are recorded in the model's ``metadata_props`` under
:data:`METADATA_KEY` (a JSON object), so a folder can be checked against its
manifest without extra manifest fields.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Collection, Mapping, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..contract.errors import ExportError
from ..contract.names import QUANT_METADATA_KEY as METADATA_KEY
from .select import LinearWeight, find_linear_weights, initializers, num_layers, tensor_values

log = logging.getLogger(__name__)

#: Contrib domain of ``MatMulNBits``.
MS_DOMAIN = "com.microsoft"
BITS = {"int8": 8, "int4": 4}
#: ``MatMulNBits.accuracy_level`` written by default, per bit width. 0 (unset)
#: = compute in the activation type (float32 here); 4 = int8 activations
#: inside the kernel. ONNX Runtime 1.32's CPU kernel for 8-bit weights is only
#: fast at level 4 (float32 compute: 6 vs 76 tokens/s on SmolLM2 decode); for
#: int4, level 4 decodes 1.2x faster (82 vs 69 tokens/s) and its top-1
#: agreement with float32 differed by 0.3 points (57.9% vs 58.2%, perplexity
#: +13.1% both) on a fine-tuned SmolLM2 (docs/quantization.md).
DEFAULT_ACCURACY_LEVEL = {4: 4, 8: 4}
#: Bits of the LM head when ``quantize_head`` is on. The head is the largest
#: single matrix and the most sensitive one: at 4 bits it cost another 10
#: points of top-1 agreement on SmolLM2; llama.cpp keeps it at 6-8 bits in
#: its 4-bit files for the same reason.
HEAD_BITS = 8


class QuantOptions(Protocol):
    """The settings quantization reads (``ExportOptions`` satisfies it).

    ``weight_format``: ``int8`` or ``int4``; ``block_size``: a power of two
    >= 16; ``symmetric``: None means symmetric; ``head_quantized``: quantize
    the LM head too.
    """

    @property
    def weight_format(self) -> str: ...
    @property
    def block_size(self) -> int: ...
    @property
    def symmetric(self) -> bool | None: ...
    @property
    def head_quantized(self) -> bool: ...


def set_metadata(model: onnx.ModelProto, record: dict[str, Any]) -> None:
    keep = [p for p in model.metadata_props if p.key != METADATA_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    model.metadata_props.append(onnx.StringStringEntryProto(key=METADATA_KEY, value=json.dumps(record, sort_keys=True)))


def quantization_info(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The quantization record written by this module, or None for a float graph."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            try:
                return json.loads(prop.value)
            except json.JSONDecodeError:
                raise ExportError(f"the graph's {METADATA_KEY} metadata is not valid JSON")
    return None


def check_options(options: QuantOptions) -> int:
    fmt = options.weight_format
    if fmt not in BITS:
        raise ExportError(f"weight-only quantization needs --weights int8 or int4, got {fmt!r}")
    bs = options.block_size
    if bs < 16 or bs & (bs - 1):
        raise ExportError(f"--block-size must be a power of two >= 16, got {bs}")
    return BITS[fmt]


def record(
    fmt: str,
    bits: int,
    options: QuantOptions,
    selected: list[LinearWeight],
    skipped: dict[str, str],
    layers: int,
    **extra: Any,
) -> dict[str, Any]:
    import onnxruntime

    reasons: dict[str, int] = {}
    for why in skipped.values():
        reasons[why] = reasons.get(why, 0) + 1
    roles: dict[str, int] = {}
    for w in selected:
        roles[w.role] = roles.get(w.role, 0) + 1
    return {
        "format": fmt,
        "weights": f"int{bits}",
        "bits": bits,
        "block_size": options.block_size,
        "symmetric": options.symmetric is not False,
        "quantize_head": options.head_quantized,
        "quantized_matmuls": len(selected),
        "per_layer": round(sum(1 for w in selected if w.role != "head") / layers, 2),
        "roles": roles,
        "skipped": reasons,
        "quantized_nodes": sorted(w.node for w in selected),
        "tool": f"onnxruntime {onnxruntime.__version__} quantize_matmul_{bits}bits (RTN, the matmul_nbits_quantizer's)",
        **extra,
    }


def quantize_weights(
    proto: onnx.ModelProto,
    options: QuantOptions,
    *,
    accuracy_level: int | None = None,
    keep_float: Collection[str] = (),
    calibration: dict | None = None,
    head_accuracy_level: int | None = None,
    in_place: bool = False,
    sources: Mapping[str, np.ndarray] | None = None,
    base_dir: str | Path | None = None,
) -> onnx.ModelProto:
    """Quantize the linear layers of an exported step graph to ``MatMulNBits``.

    Args:
        proto: the flavored float graph (``export_model`` calls this after
            :func:`~.flavors.apply_flavor`).
        options: ``weights`` (``int8``/``int4``), ``block_size``,
            ``symmetric`` and ``quantize_head`` are used.
        accuracy_level: ``MatMulNBits`` compute precision hint (default:
            :data:`DEFAULT_ACCURACY_LEVEL` for the bit width).
        keep_float: node names (as :func:`find_linear_weights` reports them)
            to leave in floating point (mixed precision, sensitivity studies);
            a name that is not one of them is an error.
        head_accuracy_level: the LM head's level when it is quantized at a
            different bit width than the body (None: ``accuracy_level``, or
            the default for the head's bits).
        calibration: the record of the activation-aware scaling applied to
            the weights before export (:mod:`.calibrate`), kept in the
            quantization record; None: the weights are quantized as they are.
        in_place: work on ``proto`` itself instead of a copy (the exporter:
            for a large model a copy would hold its weights twice).
        sources: initializer name -> its ``[K, N]`` float values, for
            weights the graph holds only as a placeholder (dims, no data):
            the exporter hands over views of the PyTorch weights rather than
            copies in the graph. One left in floating point (``keep_float``,
            or not selected) is written into the graph.
        base_dir: the folder the graph's external data lives in, for weights
            still there (a large traced graph, loaded without its data).

    Returns:
        The quantized model (a new proto unless ``in_place``).

    Raises:
        ExportError: bad options, nothing to quantize, or a graph already quantized.
    """
    bits = check_options(options)
    if quantization_info(proto) is not None or any(n.domain == MS_DOMAIN for n in proto.graph.node):
        raise ExportError("the graph is already quantized")
    if in_place:
        model, before = proto, _state_snapshot(proto)
    else:
        model, before = onnx.ModelProto(), proto
        model.CopyFrom(proto)
    sources = dict(sources or {})
    selected, skipped = _select(model, options, keep_float, sources, base_dir)
    level = DEFAULT_ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level
    head_bits = max(bits, HEAD_BITS)
    head = {w.node for w in selected if w.role == "head"}
    body = {w.node for w in selected} - head
    out = model
    symmetric = options.symmetric is not False  # None (unresolved): symmetric
    quantize_matmuls(out, body, bits, options.block_size, symmetric, level, sources, base_dir)
    head_level = level
    if head and head_bits != bits:
        head_level = head_accuracy_level if head_accuracy_level is not None else (
            DEFAULT_ACCURACY_LEVEL[head_bits] if accuracy_level is None else accuracy_level
        )
    quantize_matmuls(out, head, head_bits, options.block_size, symmetric, head_level, sources, base_dir)
    _materialize(out, sources)
    made = [n for n in out.graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
    if len(made) != len(selected):
        raise ExportError(f"quantizer produced {len(made)} MatMulNBits nodes for {len(selected)} selected MatMuls")
    assert_state_untouched(before, out)
    layers = num_layers(out.graph)
    extra: dict[str, Any] = {}
    if head and head_bits != bits:
        extra |= {"head_bits": head_bits, "head_accuracy_level": head_level}
    elif head:
        extra["head_bits"] = head_bits
    if calibration is not None:
        extra["calibration"] = calibration
    set_metadata(out, record("matmulnbits", bits, options, selected, skipped, layers, accuracy_level=level, **extra))
    log.info("quantized %d MatMuls to %d-bit MatMulNBits (block %d)", len(selected), bits, options.block_size)
    return out


def _state_snapshot(proto: onnx.ModelProto) -> onnx.ModelProto:
    """What :func:`assert_state_untouched` compares, copied from ``proto``
    before it is quantized in place: its nodes, inputs, outputs and the small
    attention constants, not the weights."""
    before = onnx.ModelProto()
    before.graph.node.extend(proto.graph.node)
    before.graph.input.extend(proto.graph.input)
    before.graph.output.extend(proto.graph.output)
    before.graph.initializer.extend(t for t in proto.graph.initializer if t.name.endswith(("proj_matrix", ".D1", ".D2")))
    return before


def _select(model: onnx.ModelProto, options: QuantOptions, keep_float: Collection[str],
            sources: dict[str, np.ndarray], base_dir: str | Path | None) -> tuple[list, dict[str, str]]:
    """The linear weights to quantize and the reasons for those left in float
    (a tied head's transposed embedding is added to ``sources``).

    Raises:
        ExportError: ``keep_float`` names a node that is not a linear MatMul, or nothing is left to quantize.
    """
    selected, skipped = find_linear_weights(model, include_head=options.head_quantized, materialize=True,
                                            hand_over=sources, base_dir=base_dir)
    unknown = sorted(set(keep_float) - {w.node for w in selected})
    if unknown:
        raise ExportError(
            f"keep_float names {len(unknown)} node(s) that are not quantizable linear MatMuls: {', '.join(unknown[:5])}"
        )
    for w in [w for w in selected if w.node in keep_float]:
        selected.remove(w)
        skipped[w.node] = "kept in floating point (keep_float)"
    if not selected:
        raise ExportError("no linear-layer MatMul with a constant weight found: nothing to quantize")
    return selected, skipped


#: Bytes of float32 weight copied at a time by :func:`quantize_matmuls`.
SLICE_BYTES = 64 << 20


def quantize_matmuls(
    model: onnx.ModelProto,
    nodes: Collection[str],
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: int,
    sources: dict[str, np.ndarray],
    base_dir: str | Path | None = None,
) -> None:
    """Turn the ``MatMul`` nodes named in ``nodes`` into ``MatMulNBits``, in place.

    The weight (initializer ``[K, N]``, or ``sources[name]``, which is then
    removed from ``sources``) is rounded by ONNX Runtime's own C++ routine
    into the layout its quantizer writes (``<w>_Q<bits>``
    ``[N, K/block, block*bits/8]`` uint8, ``<w>_scales``, ``<w>_zero_points``
    when asymmetric; node ``<name>_Q<bits>`` in the MatMul's place), bit
    for bit. Blocks run along K within one output column, so columns are
    rounded a slice of :data:`SLICE_BYTES` at a time.

    An initializer in external data is read memory-mapped from ``base_dir``
    (the folder of the graph file), whose data file then still holds it.

    Raises:
        ExportError: a named node's weight is neither an initializer nor in ``sources``.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    graph = model.graph
    inits = initializers(graph)
    fn = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    per_byte = 8 // bits
    for index, node in enumerate(list(graph.node)):
        if node.name not in nodes:
            continue
        name, activations, output = node.input[1], node.input[0], node.output[0]
        if name in sources:
            weight = sources.pop(name)
        elif name in inits:
            try:
                weight = tensor_values(inits[name], base_dir)
            except ExportError as e:
                raise ExportError(f"{node.name}: weight {name!r} is neither in the graph nor handed over ({e})") from e
        else:
            raise ExportError(f"{node.name}: weight {name!r} is not an initializer and was not handed over")
        k, n = weight.shape
        # fp16 weights keep fp16 scales, as the quantizer does (MatMulNBits binds them to the activations' type).
        dtype = np.float16 if weight.dtype == np.float16 else np.float32
        kb = -(-k // block_size)
        packed = np.zeros((n, kb, -(-block_size // per_byte)), np.uint8)
        scales = np.zeros((n, kb), dtype)
        zero_points = np.zeros((n, -(-kb // per_byte)), np.uint8)
        step = max(1, SLICE_BYTES // max(1, k * 4))
        for c0 in range(0, n, step):
            c1 = min(n, c0 + step)
            part = np.ascontiguousarray(weight[:, c0:c1], dtype=dtype)
            if kb * block_size != k:
                part = np.pad(part, ((0, kb * block_size - k), (0, 0)))
            # K unpadded, as ONNX Runtime's quantizer passes it.
            fn(packed[c0:c1], part, scales[c0:c1], zero_points[c0:c1], block_size, c1 - c0, k, symmetric)
        del weight, part
        made = [numpy_helper.from_array(packed, f"{name}_Q{bits}"), numpy_helper.from_array(scales, f"{name}_scales")]
        if not symmetric:
            made.append(numpy_helper.from_array(zero_points, f"{name}_zero_points"))
        attrs: dict[str, Any] = {"K": k, "N": n, "bits": bits, "block_size": block_size}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        del graph.node[index]
        graph.node.insert(index, helper.make_node("MatMulNBits", [activations, *(t.name for t in made)], [output],
                                                  name=f"{node.name}_Q{bits}", domain=MS_DOMAIN, **attrs))
        if not any(name in other.input for other in graph.node):
            # By index: remove() would compare the float weight's bytes with every initializer's.
            at = next((i for i, t in enumerate(graph.initializer) if t.name == name), None)
            if at is not None:
                del graph.initializer[at]
        graph.initializer.extend(made)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _materialize(model: onnx.ModelProto, sources: dict[str, np.ndarray]) -> None:
    """Placeholders whose weight no quantized node consumed get their values, in floating point."""
    for i, t in enumerate(model.graph.initializer):
        if t.name in sources:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(sources.pop(t.name)), t.name))
    if sources:
        raise ExportError(f"weights handed over for tensors the graph does not have: {', '.join(sorted(sources)[:5])}")


def assert_state_untouched(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """The recurrence nodes, proj_matrix and graph I/O must come through unchanged."""

    def attention(m: onnx.ModelProto) -> list[tuple[str, ...]]:
        return [tuple(n.input) + tuple(n.output) for n in m.graph.node if n.op_type.endswith("LinearAttention")]

    if attention(before) != attention(after):
        raise ExportError("quantization changed the LinearAttention nodes (state path): refusing")
    if [i.SerializeToString() for i in before.graph.input] != [i.SerializeToString() for i in after.graph.input]:
        raise ExportError("quantization changed the graph inputs: refusing")
    if [o.SerializeToString() for o in before.graph.output] != [o.SerializeToString() for o in after.graph.output]:
        raise ExportError("quantization changed the graph outputs: refusing")
    b_inits, a_inits = initializers(before.graph), initializers(after.graph)
    for name, t in b_inits.items():
        if name.endswith(("proj_matrix", ".D1", ".D2")) and (name not in a_inits or a_inits[name] != t):
            raise ExportError(f"quantization changed {name}, which must stay in floating point")


__all__ = [
    "BITS",
    "DEFAULT_ACCURACY_LEVEL",
    "HEAD_BITS",
    "METADATA_KEY",
    "MS_DOMAIN",
    "QuantOptions",
    "quantization_info",
    "quantize_weights",
]
