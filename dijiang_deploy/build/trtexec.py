"""The ``trtexec`` command equivalent to a Python-API build.

Needs neither TensorRT nor a GPU: this is how devices without the TensorRT
Python bindings (e.g. a bare JetPack image) build engines. The command uses
the TensorRT 10 syntax for several profiles (``--profile=N`` followed by that
profile's ``--minShapes/--optShapes/--maxShapes``).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .manifest import ProfileSpec
from .options import BuildOptions


def shape_spec(profile: ProfileSpec, which: str) -> str:
    """``name:AxBxC,...`` for ``which`` in min/opt/max, inputs in graph order."""
    parts = []
    for name, rng in profile.shapes.items():
        dims = getattr(rng, which)
        parts.append(f"{name}:{'x'.join(str(d) for d in dims)}")
    return ",".join(parts)


def trtexec_command(
    onnx_path: str | Path,
    engine_path: str | Path,
    profiles: list[ProfileSpec],
    options: BuildOptions,
    trtexec: str = "trtexec",
) -> list[str]:
    """argv of the ``trtexec`` build matching :func:`~.builder.build_engine`.

    ``onnx_path`` is the graph trtexec parses: for a ``linear-attention``
    export, its plugin-node copy (:func:`~.builder.write_plugin_graph`).

    Flags: ``--onnx``, ``--saveEngine``, ``--stronglyTyped``, one
    ``--profile=N --minShapes --optShapes --maxShapes`` group per profile,
    ``--noTF32`` (unless ``tf32``),
    ``--memPoolSize=workspace:NM``, ``--dynamicPlugins`` (plugin library),
    ``--setPluginsToSerialize`` + ``--versionCompatible`` (with
    ``serialize_plugins``), ``--timingCacheFile``, ``--skipInference``.
    """
    argv = [trtexec, f"--onnx={onnx_path}", f"--saveEngine={engine_path}", "--stronglyTyped"]
    for p in profiles:
        argv.append(f"--profile={p.index}")
        for which in ("min", "opt", "max"):
            argv.append(f"--{which}Shapes={shape_spec(p, which)}")
    if not options.tf32:
        argv.append("--noTF32")
    argv.append(f"--memPoolSize=workspace:{options.workspace_mib}M")
    if options.plugin_lib is not None:
        argv.append(f"--dynamicPlugins={options.plugin_lib}")
        if options.serialize_plugins:
            argv += [f"--setPluginsToSerialize={options.plugin_lib}", "--versionCompatible"]
    if options.timing_cache is not None:
        argv.append(f"--timingCacheFile={options.timing_cache}")
    argv.append("--skipInference")
    return argv


def format_command(argv: list[str]) -> str:
    """One shell line, quoted where needed."""
    return shlex.join(argv)
