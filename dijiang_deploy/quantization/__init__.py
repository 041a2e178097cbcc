"""Weight-only int8/int4 quantization of DiJiang models, below the exporter.

* :mod:`.select`: which MatMuls of a step graph are linear layers / the LM head.
* :mod:`.nbits`: ONNX Runtime ``MatMulNBits`` weights (what ``export --weights`` writes).
* :mod:`.qdq`: the same weights as ``DequantizeLinear -> MatMul`` for TensorRT,
  and reading integer codes back as floats.
* :mod:`.rtn`: ONNX Runtime's round-to-nearest block routine, called from Python.
* :mod:`.calibrate`: activation-aware input-channel scaling before rounding.
* :mod:`.grid`: quantization-aware fine-tuning on the export's weight grid.

Submodules are imported on use: ``nbits``/``qdq`` need ``onnx``, ``calibrate``
and ``grid`` need torch.
"""
