"""Builds the CUDA kernels and the TensorRT plugin and checks them on the CPU.

Runs scripts/build_plugins.sh into a temporary directory, or reuses the build
directory named by DIJIANG_PLUGIN_BUILD (the BUILD_DIR the script was given).
Skips only when nvcc is missing. The one build is against the TensorRT 10.14
headers of the kernel_lens wheel (or $TensorRT_ROOT): no other TensorRT
version's headers are available to compile against here.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build_plugins.sh"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not found on PATH")


@pytest.fixture(scope="module")
def build_dir(module_tmp) -> Path:
    reuse = os.environ.get("DIJIANG_PLUGIN_BUILD")
    if reuse:
        path = Path(reuse)
        if not (path / "main" / "CMakeCache.txt").exists():
            pytest.fail(f"DIJIANG_PLUGIN_BUILD={reuse} is not a build_plugins.sh build directory")
        return path
    path = module_tmp("plugin_build")
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(
        ["bash", str(SCRIPT), str(path)], env=env, capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, f"build_plugins.sh failed:\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    return path


def test_ctest_passes(build_dir: Path) -> None:
    result = subprocess.run(
        ["ctest", "--test-dir", str(build_dir / "main"), "--output-on-failure"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # Guard against an empty test list passing vacuously.
    assert "100% tests passed, 0 tests failed out of 3" in result.stdout, result.stdout


def test_plugin_exports(build_dir: Path) -> None:
    lib = build_dir / "main" / "libdijiang_trt_plugins.so"
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert {"getCreators", "setLoggerFinder"} <= exported
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    assert "getPluginRegistry" not in undefined and "getLogger" not in undefined


def test_plugin_loads_without_tensorrt(build_dir: Path) -> None:
    # Loading must not need libnvinfer; the version shows which headers were used.
    lib = ctypes.CDLL(str(build_dir / "main" / "libdijiang_trt_plugins.so"))
    lib.dijiangTrtPluginCompiledVersion.restype = ctypes.c_int32
    version = lib.dijiangTrtPluginCompiledVersion()
    if not os.environ.get("TensorRT_ROOT"):
        assert version == 101401  # kernel_lens ships the 10.14.1 headers
    n = ctypes.c_int32(-1)
    lib.getCreators.restype = ctypes.c_void_p
    lib.getCreators.argtypes = [ctypes.POINTER(ctypes.c_int32)]
    assert lib.getCreators(ctypes.byref(n))
    # One creator, DiJiangLinearAttention in the "dijiang" namespace (names and namespaces are
    # checked by ctest's plugin_tests): none under the standard op's name in the empty namespace.
    assert n.value == 1


def test_kernel_library_queries(build_dir: Path) -> None:
    """The package's ctypes binding (dijiang_deploy.kernels) against the built library; no device needed."""
    from dijiang_deploy.kernels import Kernels

    kernels = Kernels.load(build_dir / "main" / "libdijiang_kernels.so")
    assert kernels.chunk_size(64, 64) == 64
    assert kernels.chunk_size(128, 128) == 32
    chunks = -(-513 // 64)
    states = 3 * 9 * chunks * 64 * 64 * 4
    size = kernels.workspace_size(3, 513, 9, 64, 64, 64)
    assert states <= size < states + 4096


def test_kernel_binding_errors(tmp_path: Path) -> None:
    from dijiang_deploy.contract.errors import DiJiangError
    from dijiang_deploy.kernels import Kernels

    with pytest.raises(DiJiangError, match="no such kernel library"):
        Kernels.load(tmp_path / "libdijiang_kernels.so")


def test_kernel_binding_refuses_bad_tensors(build_dir: Path) -> None:
    """Every mismatch is refused in Python before any launch (these are CPU tensors, so a launch would crash)."""
    import torch

    from dijiang_deploy.contract.errors import DiJiangError
    from dijiang_deploy.kernels import Kernels

    kernels = Kernels.load(build_dir / "main" / "libdijiang_kernels.so")
    b, t, h, d = 2, 5, 3, 16

    def tensors(**change):
        x = {"query": torch.zeros(b, t, h * d), "key": torch.zeros(b, t, h * d), "value": torch.zeros(b, t, h * d),
             "past_state": torch.zeros(b, h, d, d), "decay": torch.zeros(b, t, h), "output": torch.zeros(b, t, h * d),
             "present_state": torch.zeros(b, h, d, d)}
        x.update(change)
        return x

    ws = torch.zeros(16, dtype=torch.uint8)
    cases = {
        "key": tensors(key=torch.zeros(b, t, h * d + 1)),
        "value": tensors(value=torch.zeros(b, t + 1, h * d)),
        "decay": tensors(decay=torch.zeros(b, t, h, dtype=torch.float16)),
        "present_state": tensors(present_state=torch.zeros(b, h, d, d, dtype=torch.float16)),
        "output": tensors(output=None),
        "CUDA tensor": tensors(),
        "not supported": tensors(query=torch.zeros(b, t, h * d, dtype=torch.float64)),
    }
    for message, x in cases.items():
        with pytest.raises(DiJiangError, match=message):
            kernels.prefill(**x, workspace=ws, heads=h)
    with pytest.raises(DiJiangError, match="query: expected"):
        kernels.prefill(**tensors(), workspace=ws, heads=h + 1)
    with pytest.raises(DiJiangError, match="None for the linear rule"):
        kernels.prefill(**tensors(), workspace=ws, heads=h, rule="linear")
    with pytest.raises(DiJiangError, match="unknown update rule"):
        kernels.decode(**tensors(), heads=h, rule="delta")
