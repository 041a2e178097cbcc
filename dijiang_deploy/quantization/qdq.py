"""Reading and converting integer weights: MatMulNBits codes, and the Q/DQ form TensorRT reads.

``qdq`` (TensorRT): standard ``DequantizeLinear -> MatMul`` pairs. int4 is a
blocked ``DequantizeLinear`` (opset 21 ``block_size`` attribute) of a signed
INT4 initializer, bit-identical to the ``matmulnbits`` weights it is
converted from; int8 is per-output-channel INT8 (TensorRT accepts block
scales for INT4 only). Both are symmetric (TensorRT requires zero zero-points).
"""

from __future__ import annotations


import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract.errors import ExportError
from .nbits import (
    MS_DOMAIN,
    QuantOptions,
    assert_state_untouched,
    check_options,
    quantization_info,
    quantize_weights,
    record,
    set_metadata,
)
from .select import find_linear_weights, initializers, node_attr, num_layers

#: The first default-domain opset whose ``DequantizeLinear`` has ``block_size`` and INT4.
QDQ_MIN_OPSET = 21


def unpack_nbits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
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


def _per_channel_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``w [K, N] ~ q * scale[N]``."""
    amax = np.abs(w.astype(np.float32)).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w.astype(np.float32) / scale), -127, 127).astype(np.int8)
    return q, scale


def _nbits_codes(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned codes ``[N, K]`` and scales ``[N, K/block]`` of a ``MatMulNBits`` node."""
    k, n, bits, bs = (int(node_attr(node, a)) for a in ("K", "N", "bits", "block_size"))
    k_blocks = -(-k // bs)
    packed = numpy_helper.to_array(inits[node.input[1]])
    scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, k_blocks)
    codes = unpack_nbits(packed.reshape(n, k_blocks, -1), bits, bs).reshape(n, k_blocks * bs)[:, :k]
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
        zp = unpack_nbits(packed_zero_points, bits, k_blocks)
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
    inits = initializers(graph)
    out: dict[str, np.ndarray] = {}
    dq_out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            n, bits, bs = (int(node_attr(node, a)) for a in ("N", "bits", "block_size"))
            codes, scales = _nbits_codes(node, inits)
            packed_zp = numpy_helper.to_array(inits[node.input[3]]).reshape(n, -1) if len(node.input) > 3 and node.input[3] else None
            out[node.name] = dequantize_nbits(codes, scales, packed_zp, bits, bs)
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
            s = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
            axis = int(node_attr(node, "axis", 1))
            bs = int(node_attr(node, "block_size", 0))
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
    inits = initializers(graph)
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
        k, n, bits, bs = (int(node_attr(node, a)) for a in ("K", "N", "bits", "block_size"))
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
        set_metadata(model, info)
    return model


def qdq_weights(proto: onnx.ModelProto, options: QuantOptions) -> onnx.ModelProto:
    """The TensorRT (Q/DQ) form of :func:`quantize_weights`, from a float graph.

    int4: blocked symmetric INT4 ``DequantizeLinear`` (bit-identical to the
    ``MatMulNBits`` export with the same options). int8: symmetric
    per-output-channel INT8 computed from the float weights (``block_size``
    does not apply; TensorRT has no INT8 block scales).

    Raises:
        ExportError: asymmetric options (TensorRT requires zero zero-points),
            or a graph whose opset is below 21.
    """
    bits = check_options(options)
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
    inits = initializers(graph)
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
    assert_state_untouched(proto, model)
    info = record("qdq", 8, options, selected, skipped, num_layers(graph), granularity="per-channel")
    info["block_size"] = None  # one scale per output channel
    info["tool"] = "dijiang_deploy.quantization.qdq (symmetric per-channel RTN)"
    set_metadata(model, info)
    return model


def graph_bits(model: onnx.ModelProto) -> set[int]:
    """Bit widths of the quantized weights actually present in the graph."""
    found: set[int] = set()
    inits = initializers(model.graph)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == MS_DOMAIN:
            found.add(int(node_attr(node, "bits", 4)))
        elif node.op_type == "DequantizeLinear" and node.input[0] in inits:
            dt = inits[node.input[0]].data_type
            if dt in (TensorProto.INT4, TensorProto.UINT4):
                found.add(4)
            elif dt in (TensorProto.INT8, TensorProto.UINT8):
                found.add(8)
    return found


__all__ = ["QDQ_MIN_OPSET", "dequantize_nbits", "dequantized_weights", "graph_bits", "matmulnbits_to_qdq", "qdq_weights"]
