"""What the build and the TensorRT backend need from the machine: the
``tensorrt`` module, the plugin library, and the GPU's name and SM."""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

from ..contract.errors import BackendUnavailableError
from ..contract.names import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

PLUGIN_LIBRARY_NAME = "libdijiang_trt_plugins.so"
#: Where scripts/build_plugins.sh puts the library by default.
DEFAULT_PLUGIN_LIBRARY = Path(__file__).resolve().parents[2] / "plugins" / "build" / "main" / PLUGIN_LIBRARY_NAME
PLUGIN_ENV = "DIJIANG_TRT_PLUGIN_LIB"


def import_tensorrt() -> ModuleType:
    """``import tensorrt`` or raise a one-line :class:`BackendUnavailableError`.

    The PyPI ``tensorrt`` stub packages import but have no ``Builder``; they
    are refused the same way.
    """
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise BackendUnavailableError(
            f"TensorRT's Python package is not importable ({exc}); install TensorRT 10.x for this GPU's CUDA, "
            "or use --print-trtexec and build with trtexec"
        ) from exc
    except Exception as exc:  # a broken install (missing libnvinfer, CUDA mismatch)
        raise BackendUnavailableError(f"importing tensorrt failed: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise BackendUnavailableError(
            "the installed 'tensorrt' package has no Builder/Runtime (a stub wheel?); install a real TensorRT 10.x"
        )
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {trt.__version__} is too old: dijiang-deploy needs TensorRT 10.x")
    return trt


def tensorrt_version_tuple(version: str) -> tuple[int, int]:
    """``"10.3.0.30"`` -> ``(10, 3)``."""
    parts = (version.split(".") + ["0", "0"])[:2]
    return int(parts[0]), int(parts[1])


def find_plugin_library(explicit: str | Path | None, required: bool) -> Path | None:
    """The plugin library to load: ``explicit``, else ``$DIJIANG_TRT_PLUGIN_LIB``,
    else ``plugins/build/main/libdijiang_trt_plugins.so``.

    Raises:
        BackendUnavailableError: an explicit/env path does not exist, or no
            library was found and ``required``.
    """
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise BackendUnavailableError(f"plugin library {path}: no such file (build it with scripts/build_plugins.sh)")
        return path.resolve()
    env = os.environ.get(PLUGIN_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise BackendUnavailableError(f"${PLUGIN_ENV}={env}: no such file")
        return path.resolve()
    if DEFAULT_PLUGIN_LIBRARY.is_file():
        return DEFAULT_PLUGIN_LIBRARY
    if required:
        raise BackendUnavailableError(
            f"no {PLUGIN_LIBRARY_NAME}: pass --plugin-lib PATH, set ${PLUGIN_ENV}, or run scripts/build_plugins.sh "
            f"(expected at {DEFAULT_PLUGIN_LIBRARY})"
        )
    return None


def gpu_info(device: int = 0) -> tuple[str, str]:
    """(name, SM as ``"8.7"``) of CUDA device ``device``.

    Uses torch when it has CUDA, else the CUDA driver library (``libcuda.so.1``,
    present wherever the NVIDIA driver is, Jetson included) through ctypes.

    Raises:
        BackendUnavailableError: no CUDA device can be queried.
    """
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return torch.cuda.get_device_name(device), f"{major}.{minor}"
    except ImportError:
        pass
    info = _driver_gpu_info(device)
    if info is None:
        raise BackendUnavailableError("no CUDA device found (neither torch nor the CUDA driver library reports one)")
    return info


def _driver_gpu_info(device: int) -> tuple[str, str] | None:
    """Name and SM from the CUDA driver API, or None without a driver/device."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    handle = ctypes.c_int()
    major, minor = ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
    if (
        cuda.cuInit(0) != 0
        or cuda.cuDeviceGet(ctypes.byref(handle), device) != 0
        or cuda.cuDeviceGetName(name, 256, handle) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, handle) != 0
        or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, handle) != 0
    ):
        return None
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


_LOADED: dict[str, object] = {}


def load_plugin_library(trt: ModuleType, path: Path) -> object:
    """Load ``path`` once per process through ``IPluginRegistry.load_library``
    (it calls the library's ``getCreators``) and check that the DiJiang creator
    is registered. A second call with the same path returns the first handle:
    TensorRT refuses to register the same creators twice.

    Raises:
        BackendUnavailableError: the library does not load or lacks the creator.
    """

    key = str(Path(path).resolve())
    if key in _LOADED:
        return _LOADED[key]
    registry = trt.get_plugin_registry()
    handle = registry.load_library(key)
    if handle is None:
        raise BackendUnavailableError(f"plugin library {path}: TensorRT could not load it (see the TensorRT log)")
    get = getattr(registry, "get_creator", None)
    if get is not None and get(OP_TYPE, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None:
        raise BackendUnavailableError(
            f"plugin library {path} loaded but registers no {OP_TYPE} v{PLUGIN_VERSION} in namespace {PLUGIN_NAMESPACE!r}"
        )
    _LOADED[key] = handle
    return handle
