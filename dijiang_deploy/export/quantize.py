"""Weight-only int8/int4 quantization of an exported DiJiang step graph.

Two graph formats hold the same idea (integer weights, one scale per block of
``block_size`` consecutive input channels, activations and the recurrent state
in floating point):

* ``matmulnbits`` (ONNX Runtime): each selected ``MatMul`` becomes a
  ``com.microsoft::MatMulNBits`` node, produced by ONNX Runtime's own
  quantizer (``onnxruntime.quantization.matmul_nbits_quantizer``, round to
  nearest, 4 or 8 bits). ONNX Runtime runs it natively on CPU and CUDA. This
  is what ``dijiang-deploy export --weights int4|int8`` writes
  (:func:`quantize_weights`, called by ``export_model``).
* ``qdq`` (TensorRT): standard ``DequantizeLinear -> MatMul`` pairs. int4 is
  a blocked ``DequantizeLinear`` (opset 21 ``block_size`` attribute) of a
  signed INT4 initializer, bit-identical to the ``matmulnbits`` weights it is
  converted from; int8 is per-output-channel INT8 (TensorRT accepts block
  scales for INT4 only). Both are symmetric (TensorRT requires zero
  zero-points). See :func:`qdq_weights`, :func:`matmulnbits_to_qdq` and
  :func:`write_qdq_export`.

What is quantized: every ``MatMul`` whose second input is a constant 2-D
float matrix and that is a linear layer of the model (q/k/v/o or
query_key_value/dense, the DiJiang gate ``W_G``, the MLP), plus the LM head
when ``quantize_head`` is set. What is never quantized: the feature-map
projection ``proj_matrix`` (a ``[d, d]`` MatMul whose result goes to
``Softmax``), embeddings (``Gather``), norms, decay tables, the
``LinearAttention`` node and its float32 state inputs/outputs.

The settings are recorded in the model's ``metadata_props`` under
:data:`METADATA_KEY` (a JSON object), so a folder can be checked against its
manifest without extra manifest fields (:func:`check_quantized_export`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract.errors import ExportError
from .onnx_io import save_graph
from ..contract.names import QUANT_METADATA_KEY as METADATA_KEY

if TYPE_CHECKING:  # graph.py imports this module lazily; avoid a cycle at import time
    from .graph import ExportOptions

log = logging.getLogger(__name__)

#: Contrib domain of ``MatMulNBits``.
MS_DOMAIN = "com.microsoft"
#: The first default-domain opset whose ``DequantizeLinear`` has ``block_size`` and INT4.
QDQ_MIN_OPSET = 21
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


def _initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
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


def _ensure_node_names(graph: onnx.GraphProto) -> None:
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
    if len(t.dims) != 2 or list(_attr(node, "perm", [1, 0])) != [1, 0]:
        return None
    return t


def find_linear_weights(
    model: onnx.ModelProto, include_head: bool = False, materialize: bool = False
) -> tuple[list[LinearWeight], dict[str, str]]:
    """Select the MatMuls to quantize in ``model``'s main graph.

    A weight is an initializer, or ``Transpose`` of one (the exporter keeps
    a tied LM head as ``Transpose(embedding)``). With ``materialize`` such
    selected weights are folded in place into a new ``[K, N]`` initializer
    (the embedding itself stays for the ``Gather``), so the quantizer can
    consume them; without it ``weight`` names the transposed source.

    Returns ``(selected, skipped)``; ``skipped`` maps a MatMul's node name to
    the reason it is left in floating point (``feature-map projection``,
    ``lm head``, ``weight shared by several MatMuls``, ...). Function bodies
    (the ``function`` flavor's recurrence) are never looked at.
    """
    graph = model.graph
    _ensure_node_names(graph)
    inits = _initializers(graph)
    consumers = _consumers(graph)
    producer = {o: n for n in graph.node for o in n.output}
    head = _head_node(graph, inits)
    vocab = _logits_width(graph)
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
        is_head = node.name == head or (vocab is not None and n == vocab)
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
            folded = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(source).T), weight)
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


def _logits_width(graph: onnx.GraphProto) -> int | None:
    for out in graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    return None


def _num_layers(graph: onnx.GraphProto) -> int:
    return sum(1 for i in graph.input if i.name.startswith("past_state.")) or 1


def _set_metadata(model: onnx.ModelProto, record: dict[str, Any]) -> None:
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


def _check_options(options: "ExportOptions") -> int:
    fmt = options.weight_format
    if fmt not in BITS:
        raise ExportError(f"weight-only quantization needs --weights int8 or int4, got {fmt!r}")
    bs = options.block_size
    if bs < 16 or bs & (bs - 1):
        raise ExportError(f"--block-size must be a power of two >= 16, got {bs}")
    return BITS[fmt]


def _record(
    fmt: str,
    bits: int,
    options: "ExportOptions",
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
        "tool": f"onnxruntime {onnxruntime.__version__} matmul_nbits_quantizer (RTN)",
        **extra,
    }


def _ort_quantizer() -> type:
    """Import ONNX Runtime's ``MatMulNBitsQuantizer`` without its side effect.

    The module calls ``logging.basicConfig(level=INFO)`` at import time, which
    would turn on INFO logs of every library in the process; undo that.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    return MatMulNBitsQuantizer


def quantize_weights(
    proto: onnx.ModelProto,
    options: "ExportOptions",
    *,
    accuracy_level: int | None = None,
    keep_float: Collection[str] = (),
    calibration: dict | None = None,
    head_accuracy_level: int | None = None,
    in_place: bool = False,
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

    Returns:
        The quantized model (a new proto unless ``in_place``).

    Raises:
        ExportError: bad options, nothing to quantize, or a graph already quantized.
    """
    MatMulNBitsQuantizer = _ort_quantizer()
    bits = _check_options(options)
    if quantization_info(proto) is not None or any(n.domain == MS_DOMAIN for n in proto.graph.node):
        raise ExportError("the graph is already quantized")
    if in_place:
        model = proto
        before = onnx.ModelProto()
        before.graph.node.extend(proto.graph.node)
        before.graph.input.extend(proto.graph.input)
        before.graph.output.extend(proto.graph.output)
        before.graph.initializer.extend(t for t in proto.graph.initializer if t.name.endswith(("proj_matrix", ".D1", ".D2")))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(proto)
        before = proto
    selected, skipped = find_linear_weights(model, include_head=options.head_quantized, materialize=True)
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
    level = DEFAULT_ACCURACY_LEVEL[bits] if accuracy_level is None else accuracy_level
    head_bits = max(bits, HEAD_BITS)
    body = {w.node for w in selected if w.role != "head" or head_bits == bits}
    head = {w.node for w in selected} - body
    out = _run_ort_quantizer(MatMulNBitsQuantizer, model, body, bits, options, level) if body else model
    if head:
        head_level = head_accuracy_level if head_accuracy_level is not None else (
            DEFAULT_ACCURACY_LEVEL[head_bits] if accuracy_level is None else accuracy_level
        )
        out = _run_ort_quantizer(MatMulNBitsQuantizer, out, head, head_bits, options, head_level)
    made = [n for n in out.graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
    if len(made) != len(selected):
        raise ExportError(f"quantizer produced {len(made)} MatMulNBits nodes for {len(selected)} selected MatMuls")
    _assert_state_untouched(before, out)
    layers = _num_layers(out.graph)
    extra: dict[str, Any] = {}
    if head:
        extra |= {"head_bits": head_bits, "head_accuracy_level": head_level}
    elif any(w.role == "head" for w in selected):
        extra["head_bits"] = head_bits
    if calibration is not None:
        extra["calibration"] = calibration
    _set_metadata(out, _record("matmulnbits", bits, options, selected, skipped, layers, accuracy_level=level, **extra))
    log.info("quantized %d MatMuls to %d-bit MatMulNBits (block %d)", len(selected), bits, options.block_size)
    return out


def _run_ort_quantizer(
    quantizer: type, model: onnx.ModelProto, chosen: set[str], bits: int, options: "ExportOptions", level: int
) -> onnx.ModelProto:
    """ONNX Runtime's RTN quantizer on exactly the ``chosen`` MatMul nodes."""
    # The ORT quantizer also picks every op of `op_types_to_quantize`; exclude
    # all other nodes so only our selection is touched.
    exclude = [n.name for n in model.graph.node if n.name not in chosen]
    quant = quantizer(
        model,
        bits=bits,
        block_size=options.block_size,
        is_symmetric=options.symmetric is not False,  # None (unresolved): symmetric
        accuracy_level=level or None,
        nodes_to_exclude=exclude,
        nodes_to_include=sorted(chosen),
        op_types_to_quantize=("MatMul",),
    )
    noisy = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level_before = noisy.level
    noisy.setLevel(logging.WARNING)  # it logs every node at INFO
    try:
        quant.process()
    finally:
        noisy.setLevel(level_before)
    return quant.model.model


def _assert_state_untouched(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """The recurrence nodes, proj_matrix and graph I/O must come through unchanged."""

    def attention(m: onnx.ModelProto) -> list[tuple[str, ...]]:
        return [tuple(n.input) + tuple(n.output) for n in m.graph.node if n.op_type.endswith("LinearAttention")]

    if attention(before) != attention(after):
        raise ExportError("quantization changed the LinearAttention nodes (state path): refusing")
    if [i.SerializeToString() for i in before.graph.input] != [i.SerializeToString() for i in after.graph.input]:
        raise ExportError("quantization changed the graph inputs: refusing")
    if [o.SerializeToString() for o in before.graph.output] != [o.SerializeToString() for o in after.graph.output]:
        raise ExportError("quantization changed the graph outputs: refusing")
    b_inits, a_inits = _initializers(before.graph), _initializers(after.graph)
    for name, t in b_inits.items():
        if name.endswith(("proj_matrix", ".D1", ".D2")) and (name not in a_inits or a_inits[name] != t):
            raise ExportError(f"quantization changed {name}, which must stay in floating point")


# -- QDQ (TensorRT) ---------------------------------------------------------------


def _unpack_nbits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """``[..., bytes]`` uint8 -> ``[..., count]`` uint8 codes (low nibble first for 4 bits)."""
    if bits == 8:
        return packed[..., :count]
    lo = packed & 0x0F
    hi = packed >> 4
    both = np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], -1)
    return both[..., :count]


def _pack_int4(codes: np.ndarray) -> bytes:
    """Row-major 4-bit codes (0..15) -> ONNX INT4/UINT4 raw bytes (low nibble first)."""
    flat = codes.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``w [K, N] ~ q * scale[N]``."""
    amax = np.abs(w.astype(np.float32)).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float32) / scale), -127, 127).astype(np.int8)
    return q, scale


def _nbits_codes(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned codes ``[N, K]`` and scales ``[N, K/block]`` of a ``MatMulNBits`` node."""
    k, n, bits, bs = (int(_attr(node, a)) for a in ("K", "N", "bits", "block_size"))
    k_blocks = -(-k // bs)
    packed = numpy_helper.to_array(inits[node.input[1]])
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k_blocks)
    codes = _unpack_nbits(packed.reshape(n, k_blocks, -1), bits, bs).reshape(n, k_blocks * bs)[:, :k]
    return codes, scales


def dequantize_nbits(
    codes: np.ndarray, scales: np.ndarray, packed_zero_points: np.ndarray | None, bits: int, block_size: int
) -> np.ndarray:
    """``W [K, N]`` float32 from ``MatMulNBits`` data: unsigned ``codes [N, K]``,
    ``scales [N, K_blocks]`` and packed ``zero_points [N, bytes]`` (None:
    symmetric, the midpoint ``2^(bits-1)``)."""
    n, k = codes.shape
    k_blocks = scales.shape[1]
    if packed_zero_points is None:
        zp = np.full((n, k_blocks), 1 << (bits - 1), np.uint8)
    elif bits == 4:
        zp = _unpack_nbits(packed_zero_points, bits, k_blocks)
    else:
        zp = packed_zero_points[:, :k_blocks]
    zp_full = np.repeat(zp.astype(np.float32), block_size, axis=1)[:, :k]
    sc_full = np.repeat(scales.astype(np.float32), block_size, axis=1)[:, :k]
    return ((codes.astype(np.float32) - zp_full) * sc_full).T.copy()


def dequantized_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """``{node name: W [K, N] float32}``: what each quantized MatMul multiplies by.

    Covers ``MatMulNBits`` (with or without zero points) and
    ``DequantizeLinear -> MatMul`` pairs written by this module; useful to
    rebuild a float reference that differs from the export only by rounding.
    """
    graph = proto.graph
    inits = _initializers(graph)
    out: dict[str, np.ndarray] = {}
    dq_out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            n, bits, bs = (int(_attr(node, a)) for a in ("N", "bits", "block_size"))
            codes, scales = _nbits_codes(node, inits)
            packed_zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1) if len(node.input) > 3 and node.input[3] else None
            out[node.name] = dequantize_nbits(codes, scales, packed_zp, bits, bs)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = int(_attr(node, "axis", 1))
            bs = int(_attr(node, "block_size", 0))
            if bs:
                s = np.repeat(s, bs, axis=axis)[: q.shape[0]] if axis == 0 else np.repeat(s, bs, axis=axis)[:, : q.shape[1]]
            elif s.ndim == 1:
                s = s.reshape((1, -1) if axis in (1, -1) else (-1, 1))
            dq_out[node.output[0]] = q * s
        elif node.op_type == "MatMul" and node.input[1] in dq_out:
            out[node.name] = dq_out[node.input[1]]
    return out


def matmulnbits_to_qdq(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite ``MatMulNBits`` nodes as standard ``DequantizeLinear -> MatMul``.

    4-bit nodes become a blocked INT4 ``DequantizeLinear`` (axis 0,
    ``block_size``) with the same integer codes and scales: the dequantized
    weights are bit-identical. 8-bit nodes are dequantized and re-quantized
    per output channel (INT8, 1-D scale), the only INT8 weight layout
    TensorRT's ``IDequantizeLayer`` accepts; this rounds a second time.
    Asymmetric blocks (zero points) are refused: TensorRT requires zero
    zero-points.

    Raises:
        ExportError: asymmetric blocks, or a default-domain opset below 21.
    """
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_MIN_OPSET:
        raise ExportError(f"blocked DequantizeLinear needs opset >= {QDQ_MIN_OPSET}, the graph has {opset}")
    inits = _initializers(graph)
    new_nodes: list[onnx.NodeProto] = []
    drop: set[str] = set()
    added: list[onnx.TensorProto] = []
    count = 0
    for node in graph.node:
        if not (node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN):
            new_nodes.append(node)
            continue
        if len(node.input) > 3 and node.input[3]:
            raise ExportError(
                f"{node.name}: asymmetric blocks (zero points) cannot be expressed for TensorRT; export with symmetric blocks"
            )
        if any(i for i in node.input[4:]):
            raise ExportError(f"{node.name}: MatMulNBits with g_idx/bias inputs is not supported")
        k, n, bits, bs = (int(_attr(node, a)) for a in ("K", "N", "bits", "block_size"))
        b_name, s_name = node.input[1], node.input[2]
        codes, scales = _nbits_codes(node, inits)
        base = node.name or b_name
        if bits == 4:
            signed = (codes.T.astype(np.int16) - 8).astype(np.int8)  # [K, N] in -8..7
            q = helper.make_tensor(f"{b_name}_int4", TensorProto.INT4, [k, n], _pack_int4(signed & 0x0F), raw=True)
            s = numpy_helper.from_array(np.ascontiguousarray(scales.T), f"{s_name}_blocked")
            dq = helper.make_node(
                "DequantizeLinear", [q.name, s.name], [f"{base}_w"], name=f"{base}_dq", axis=0, block_size=bs
            )
        else:
            w = (codes.astype(np.float32) - 128.0) * np.repeat(scales.astype(np.float32), bs, axis=1)[:, :k]
            q8, sc = _per_channel_int8(w.T)
            q = numpy_helper.from_array(q8, f"{b_name}_int8")
            s = numpy_helper.from_array(sc.astype(scales.dtype), f"{s_name}_channel")
            dq = helper.make_node("DequantizeLinear", [q.name, s.name], [f"{base}_w"], name=f"{base}_dq", axis=1)
        added.extend([q, s])
        drop.update([b_name, s_name])
        new_nodes.extend([dq, helper.make_node("MatMul", [node.input[0], dq.output[0]], list(node.output), name=base)])
        count += 1
    keep = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(n.domain == MS_DOMAIN for n in graph.node):
        imports = [o for o in model.opset_import if o.domain != MS_DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)
    info = quantization_info(model)
    if info is not None:
        info = dict(info, format="qdq", converted_from="matmulnbits", converted=count)
        if info.get("bits") == 8:
            info["granularity"] = "per-channel (re-quantized from blocks)"
        _set_metadata(model, info)
    return model


def qdq_weights(proto: onnx.ModelProto, options: "ExportOptions") -> onnx.ModelProto:
    """The TensorRT (Q/DQ) form of :func:`quantize_weights`, from a float graph.

    int4: blocked symmetric INT4 ``DequantizeLinear`` (bit-identical to the
    ``MatMulNBits`` export with the same options). int8: symmetric
    per-output-channel INT8 computed from the float weights (``block_size``
    does not apply; TensorRT has no INT8 block scales).

    Raises:
        ExportError: asymmetric options (TensorRT requires zero zero-points),
            or a graph whose opset is below 21.
    """
    bits = _check_options(options)
    if options.symmetric is False:
        raise ExportError("the Q/DQ (TensorRT) format is symmetric only: TensorRT requires zero zero-points")
    if bits == 4:
        return matmulnbits_to_qdq(quantize_weights(proto, options))
    if quantization_info(proto) is not None or any(n.domain == MS_DOMAIN for n in proto.graph.node):
        raise ExportError("the graph is already quantized")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < QDQ_MIN_OPSET:
        raise ExportError(f"Q/DQ weights need opset >= {QDQ_MIN_OPSET}, the graph has {opset}")
    selected, skipped = find_linear_weights(model, include_head=options.head_quantized, materialize=True)
    if not selected:
        raise ExportError("no linear-layer MatMul with a constant weight found: nothing to quantize")
    graph = model.graph
    inits = _initializers(graph)
    by_node = {w.node: w for w in selected}
    new_nodes: list[onnx.NodeProto] = []
    added: list[onnx.TensorProto] = []
    for node in graph.node:
        w = by_node.get(node.name)
        if w is None:
            new_nodes.append(node)
            continue
        t = inits[w.weight]
        arr = numpy_helper.to_array(t)
        q8, sc = _per_channel_int8(arr)
        q = numpy_helper.from_array(q8, f"{w.weight}_int8")
        s = numpy_helper.from_array(sc.astype(arr.dtype), f"{w.weight}_channel")
        dq = helper.make_node("DequantizeLinear", [q.name, s.name], [f"{node.name}_w"], name=f"{node.name}_dq", axis=1)
        added.extend([q, s])
        new_nodes.extend([dq, helper.make_node("MatMul", [node.input[0], dq.output[0]], list(node.output), name=node.name)])
    dropped = {w.weight for w in selected}
    keep = [t for t in graph.initializer if t.name not in dropped]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _assert_state_untouched(proto, model)
    info = _record("qdq", 8, options, selected, skipped, _num_layers(graph), granularity="per-channel")
    info["block_size"] = None  # one scale per output channel
    info["tool"] = "dijiang_deploy.export.quantize (symmetric per-channel RTN)"
    _set_metadata(model, info)
    return model


# -- folders ----------------------------------------------------------------------


def _graph_bits(model: onnx.ModelProto) -> set[int]:
    """Bit widths of the quantized weights actually present in the graph."""
    found: set[int] = set()
    inits = _initializers(model.graph)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            found.add(int(_attr(node, "bits", 4)))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            dt = inits[node.input[0]].data_type
            if dt in (TensorProto.INT4, TensorProto.UINT4):
                found.add(4)
            elif dt in (TensorProto.INT8, TensorProto.UINT8):
                found.add(8)
    return found


def check_quantized_export(folder: str | Path) -> dict[str, Any] | None:
    """Check that an export folder's graph matches its manifest's weight format.

    Returns the graph's quantization record (None for a float export that is
    consistent). Meant to run before a session is created, so that a corrupt
    or mismatched folder fails with a message that names the problem.

    Raises:
        ExportError: unreadable graph, a manifest that says int4/int8 over a
            float graph (or the reverse), a bit width, block size or node
            count that differs from the record, or a non-float32 state.
    """
    from ..contract.manifest import Manifest

    folder = Path(folder)
    manifest = Manifest.load(folder)
    path = folder / manifest.model_file
    if not path.exists():
        raise ExportError(f"{path}: model file named by the manifest is missing")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise ExportError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})") from exc
    info = quantization_info(model)
    bits = _graph_bits(model)
    want = manifest.weights
    if want in BITS:
        if info is None or not bits:
            raise ExportError(
                f"{folder}: manifest says weights {want} but {manifest.model_file} holds no quantized weights "
                "(a float graph in a quantized folder?); re-export with --weights " + want
            )
        allowed = {BITS[want], info.get("head_bits", BITS[want])}
        if BITS[want] not in bits or not bits <= allowed or info.get("bits") != BITS[want]:
            got = "/".join(f"int{b}" for b in sorted(bits))
            raise ExportError(f"{folder}: manifest says weights {want} but the graph's quantized weights are {got}")
        nodes = sum(
            1
            for n in model.graph.node
            if (n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN) or n.op_type == "DequantizeLinear"
        )
        if nodes != info.get("quantized_matmuls"):
            raise ExportError(
                f"{folder}: the graph has {nodes} quantized MatMuls, its quantization record says "
                f"{info.get('quantized_matmuls')} (edited or truncated graph)"
            )
    elif info is not None or bits:
        raise ExportError(
            f"{folder}: manifest says weights {want} but {manifest.model_file} is {info.get('weights') if info else 'quantized'}"
        )
    for vi in list(model.graph.input) + list(model.graph.output):
        if vi.name.startswith(("past_state.", "present_state.")) and vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ExportError(f"{folder}: state tensor {vi.name} is not float32")
    return info


def quantize_export(
    src: str | Path,
    dst: str | Path,
    options: "ExportOptions",
    overwrite: bool = False,
    keep_float: Collection[str] = (),
) -> dict[str, Any]:
    """Quantize an existing float32 export folder into ``dst`` without re-tracing.

    Gives the same graph as ``export_model(..., weights=int4|int8,
    calibrate=False)``: there is no PyTorch model here to calibrate with, so
    the weights are rounded as they are (export from the checkpoint for the
    calibrated, more accurate graph). ``symmetric=None`` follows the same
    per-flavor rule as ``export_model``. ``keep_float``: node names left in
    floating point (see :func:`quantize_weights`). The manifest is copied
    with ``weights``, ``quantization`` and ``decode_ops_per_layer`` updated.
    Returns the quantization record.
    """
    import dataclasses
    import shutil

    from ..contract.atomic import atomic_dir
    from .graph import auto_symmetric
    from ..contract.manifest import MANIFEST_NAME, Manifest, graph_sha256
    from .op_counts import decode_op_counts

    src, dst = Path(src), Path(dst)
    manifest = Manifest.load(src)
    if manifest.weights != "fp32" or manifest.dtype != "fp32":
        raise ExportError(f"{src}: quantize_export needs a float32 export, this one has weights {manifest.weights}")
    if options.symmetric is None:
        options = dataclasses.replace(options, symmetric=auto_symmetric(options.weight_format, manifest.flavor))
    model = onnx.load(str(src / manifest.model_file))
    quant = quantize_weights(model, options, keep_float=keep_float)
    manifest.weights = options.weight_format
    manifest.quantization = {k: v for k, v in (quantization_info(quant) or {}).items() if k != "quantized_nodes"}
    manifest.decode_ops_per_layer = decode_op_counts(quant, manifest.num_layers)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        save_graph(quant, tmp / manifest.model_file)
        for item in src.iterdir():
            if item.is_file() and item.name not in (manifest.model_file, manifest.model_file + ".data", MANIFEST_NAME):
                shutil.copy2(item, tmp / item.name)
        manifest.graph_sha256 = graph_sha256(tmp, manifest.model_file)
        manifest.write(tmp)
    return quantization_info(quant) or {}


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


def write_qdq_export(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Copy an int4/int8 ``matmulnbits`` export folder as its Q/DQ (TensorRT) form.

    The manifest and tokenizer files are copied unchanged (same weight
    format, I/O and state); only ``model.onnx`` is rewritten with
    :func:`matmulnbits_to_qdq`. Returns the new quantization record.
    """
    import shutil

    from ..contract.atomic import atomic_dir
    from ..contract.manifest import MANIFEST_NAME, Manifest, graph_sha256

    src, dst = Path(src), Path(dst)
    info = check_quantized_export(src)
    if info is None:
        raise ExportError(f"{src}: not a quantized export (weights {Manifest.load(src).weights})")
    if info.get("format") != "matmulnbits":
        raise ExportError(f"{src}: already in {info.get('format')} format")
    manifest = Manifest.load(src)
    model = onnx.load(str(src / manifest.model_file))
    qdq = matmulnbits_to_qdq(model)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        save_graph(qdq, tmp / manifest.model_file)
        for item in src.iterdir():
            if item.is_file() and item.name not in (manifest.model_file, manifest.model_file + ".data", MANIFEST_NAME):
                shutil.copy2(item, tmp / item.name)
        manifest.graph_sha256 = graph_sha256(tmp, manifest.model_file)
        manifest.write(tmp)
    return quantization_info(qdq) or {}


__all__ = [
    "DEFAULT_ACCURACY_LEVEL",
    "LinearWeight",
    "METADATA_KEY",
    "QUALITY_TARGETS",
    "check_quantized_export",
        "quality_report",
    "dequantized_weights",
    "find_linear_weights",
    "matmulnbits_to_qdq",
    "qdq_weights",
    "quantization_info",
    "quantize_export",
    "quantize_weights",
    "write_qdq_export",
]
