"""Quantized export folders: check one, quantize a float32 one, convert one to Q/DQ."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection

import onnx
from onnx import TensorProto

from ..contract.atomic import atomic_dir
from ..contract.errors import ExportError
from ..contract.manifest import MANIFEST_NAME, Manifest, graph_sha256
from ..quantization.nbits import BITS, MS_DOMAIN, quantization_info, quantize_weights
from ..quantization.qdq import graph_bits, matmulnbits_to_qdq
from .onnx_io import save_graph
from .op_counts import decode_op_counts

if TYPE_CHECKING:
    from .graph import ExportOptions


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
    bits = graph_bits(model)
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
    from .graph import auto_symmetric  # graph.py imports this module

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
    _write_folder(src, dst, quant, manifest, overwrite)
    return quantization_info(quant) or {}


def _write_folder(src: Path, dst: Path, graph, manifest: Manifest, overwrite: bool) -> None:
    """``dst`` (atomically): ``graph`` as the model file, ``manifest`` re-hashed, the rest of ``src`` copied."""
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        save_graph(graph, tmp / manifest.model_file)
        for item in src.iterdir():
            if item.is_file() and item.name not in (manifest.model_file, manifest.model_file + ".data", MANIFEST_NAME):
                shutil.copy2(item, tmp / item.name)
        manifest.graph_sha256 = graph_sha256(tmp, manifest.model_file)
        manifest.write(tmp)


def write_qdq_export(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Copy an int4/int8 ``matmulnbits`` export folder as its Q/DQ (TensorRT) form.

    The manifest and tokenizer files are copied unchanged (same weight
    format, I/O and state); only ``model.onnx`` is rewritten with
    :func:`matmulnbits_to_qdq`. Returns the new quantization record.
    """
    src, dst = Path(src), Path(dst)
    info = check_quantized_export(src)
    if info is None:
        raise ExportError(f"{src}: not a quantized export (weights {Manifest.load(src).weights})")
    if info.get("format") != "matmulnbits":
        raise ExportError(f"{src}: already in {info.get('format')} format")
    manifest = Manifest.load(src)
    model = onnx.load(str(src / manifest.model_file))
    qdq = matmulnbits_to_qdq(model)
    _write_folder(src, dst, qdq, manifest, overwrite)
    return quantization_info(qdq) or {}
