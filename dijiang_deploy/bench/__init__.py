"""Benchmarks: DiJiang on ONNX Runtime against the runtimes users would pick instead.

``dijiang-deploy bench`` (see :mod:`.cli`) or :func:`run_bench`. Each system
runs in its own worker process (:mod:`.worker`); :mod:`.report` writes the
table, JSON, CSV and plot.
"""

from .runner import BenchOptions, run_bench
from .systems import ALL_SYSTEMS

__all__ = ["ALL_SYSTEMS", "BenchOptions", "run_bench"]
