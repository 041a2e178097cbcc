"""Fixtures for the GPU kernel tests: a CUDA device and libdijiang_kernels.so.

Everything here skips (with the missing piece named) on machines without a CUDA
device. The library is the one dijiang_deploy.kernels.find_library() names
($DIJIANG_KERNELS_LIB, $DIJIANG_PLUGIN_BUILD/main, or this checkout's
plugins/build/main, whose default architectures include 80-90 and 110), or is
built into a temporary directory for the local GPU's architecture only.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _cuda_device_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed (used for device buffers)"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


@pytest.fixture(scope="session")
def torch_cuda():
    reason = _cuda_device_reason()
    if reason:
        pytest.skip(reason)
    import torch

    return torch


def _build_for_local_gpu(torch, out: Path) -> Path:
    if shutil.which("nvcc") is None or shutil.which("ninja") is None:
        pytest.skip("nvcc or ninja not found; set DIJIANG_KERNELS_LIB or DIJIANG_PLUGIN_BUILD")
    major, minor = torch.cuda.get_device_capability()
    subprocess.run(
        ["cmake", "-S", str(REPO / "plugins"), "-B", str(out), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
         f"-DCMAKE_CUDA_ARCHITECTURES={major}{minor}", "-DDIJIANG_BUILD_TRT_PLUGIN=OFF", "-DDIJIANG_BUILD_TESTS=OFF"],
        check=True, capture_output=True,
    )
    subprocess.run(["cmake", "--build", str(out), "-j", "4"], check=True, capture_output=True)
    return out / "libdijiang_kernels.so"


@pytest.fixture(scope="session")
def kernels(torch_cuda, tmp_path_factory):
    from dijiang_deploy.kernels import Kernels, find_library

    path = find_library() or _build_for_local_gpu(torch_cuda, tmp_path_factory.mktemp("kernels"))
    return Kernels.load(path)
