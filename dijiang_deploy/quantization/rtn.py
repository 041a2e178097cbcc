"""Round to nearest on ONNX Runtime's block grid, by ONNX Runtime's own C++ routine.

Quantization-aware training saves weights rounded by this routine, so the
checkpoint and the export cannot disagree on a rounding rule.
"""

from __future__ import annotations

import numpy as np

from ..contract.errors import DiJiangError
from .qdq import unpack_nbits, dequantize_nbits


def ort_rtn(weight_kn: np.ndarray, bits: int, block_size: int, symmetric: bool) -> np.ndarray:
    """``W [K, N]`` float32 after ONNX Runtime's round-to-nearest block quantizer, dequantized.

    Uses the same C++ routine as ``MatMulNBitsQuantizer`` (blocks of
    ``block_size`` along K per output column), so the result is bit-for-bit
    what an exported ``MatMulNBits`` node multiplies by.
    """
    from onnxruntime.capi._pybind_state import (
        quantize_matmul_4bits,
        quantize_matmul_8bits,
    )

    if bits not in (4, 8):
        raise DiJiangError(f"bits must be 4 or 8, got {bits}")
    w = np.ascontiguousarray(weight_kn, dtype=np.float32)
    k, n = w.shape
    kb = -(-k // block_size)
    if kb * block_size != k:
        w = np.ascontiguousarray(np.pad(w, ((0, kb * block_size - k), (0, 0))))
    per_byte = 8 // bits
    packed = np.zeros((n, kb, block_size // per_byte), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    zero_points = np.zeros((n, -(-kb // per_byte)), np.uint8)
    fn = quantize_matmul_8bits if bits == 8 else quantize_matmul_4bits
    fn(packed, w, scales, zero_points, block_size, n, kb * block_size, symmetric)
    codes = unpack_nbits(packed, bits, block_size).reshape(n, kb * block_size)[:, :k]
    return dequantize_nbits(codes, scales, None if symmetric else zero_points, bits, block_size)
