"""Build options: target defaults, explicit overrides, and the optimization profiles.

Precedence for every setting: explicit flag > ``--target`` profile > the ONNX
export (dtype, max_chunk) > built-in default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..contract.errors import DiJiangError
from ..contract.manifest import Manifest
from .manifest import DECODE, PREFILL, ProfileSpec, ShapeRange
from .targets import Target, check_batch_chunk, check_workspace

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 1
DEFAULT_WORKSPACE_MIB = 1024


@dataclass
class BuildOptions:
    """Resolved settings of one engine build.

    Attributes:
        precision: ``fp16`` or ``fp32``; equals the ONNX export's dtype.
        max_batch: batch upper bound of both profiles (lower bound 1).
        opt_batch: batch both profiles are tuned for.
        max_chunk: prefill profile covers L in [2, max_chunk]; 1 builds the
            decode profile only.
        workspace_mib: workspace memory-pool limit.
        plugin_lib: plugin library path (None: not used).
        serialize_plugins: embed ``plugin_lib`` in a version-compatible engine.
        timing_cache: timing cache file to read (if present) and update.
        target: name of the target profile these came from, if any.
        tf32: let TensorRT use TF32 for float32 matrix products (off by
            default: fp32 engines then match ONNX Runtime to ~1e-5).
    """

    precision: str
    max_batch: int
    opt_batch: int
    max_chunk: int
    workspace_mib: int
    plugin_lib: Path | None = None
    serialize_plugins: bool = False
    timing_cache: Path | None = None
    target: str | None = None
    tf32: bool = False

    def validate(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise DiJiangError(f"--precision must be fp16 or fp32, got {self.precision!r}")
        check_batch_chunk(self.max_batch, self.max_chunk, self.opt_batch, "build")
        check_workspace(self.workspace_mib, "build")
        if self.serialize_plugins and self.plugin_lib is None:
            raise DiJiangError("--serialize-plugins needs a plugin library (--plugin-lib)")


def resolve_options(
    manifest: Manifest,
    target: Target | None = None,
    precision: str | None = None,
    max_batch: int | None = None,
    opt_batch: int | None = None,
    max_chunk: int | None = None,
    workspace_mib: int | None = None,
    plugin_lib: Path | None = None,
    serialize_plugins: bool = False,
    timing_cache: Path | None = None,
    tf32: bool = False,
) -> BuildOptions:
    """Merge explicit values, the target's defaults and the export's settings.

    The network is strongly typed, so the precision is the ONNX dtype: an
    explicit ``precision`` that contradicts it is an error; a target default
    that contradicts it is ignored with a warning. The export's
    ``max_chunk`` caps the target's (an explicit value may exceed it).
    """
    onnx_precision = manifest.dtype
    if precision is not None and precision != onnx_precision:
        raise DiJiangError(
            f"--precision {precision} contradicts the ONNX export's dtype {onnx_precision} (the network is strongly "
            f"typed: re-export with --dtype {precision})"
        )
    if precision is None and target is not None and target.precision != onnx_precision:
        log.warning(
            "target %s defaults to %s but the export is %s; building %s (re-export with --dtype %s to follow the target)",
            target.name, target.precision, onnx_precision, onnx_precision, target.precision,
        )
    if max_chunk is None:
        max_chunk = min(target.max_chunk, manifest.max_chunk) if target else manifest.max_chunk
    elif max_chunk > manifest.max_chunk:
        log.warning("--max-chunk %d exceeds the export's max_chunk %d", max_chunk, manifest.max_chunk)
    if max_batch is None:
        max_batch = target.max_batch if target else DEFAULT_MAX_BATCH
    if opt_batch is None:
        opt_batch = min(target.opt_batch, max_batch) if target else 1
    if workspace_mib is None:
        workspace_mib = target.workspace_mib if target else DEFAULT_WORKSPACE_MIB
    opts = BuildOptions(
        precision=onnx_precision,
        max_batch=max_batch,
        opt_batch=opt_batch,
        max_chunk=max_chunk,
        workspace_mib=workspace_mib,
        plugin_lib=plugin_lib,
        serialize_plugins=serialize_plugins,
        timing_cache=timing_cache,
        target=target.name if target else None,
        tf32=tf32,
    )
    opts.validate()
    return opts


def profile_specs(manifest: Manifest, options: BuildOptions) -> list[ProfileSpec]:
    """The decode profile (L = 1) and, if ``max_chunk > 1``, the prefill profile
    (L in [2, max_chunk], tuned for max_chunk: the runtime feeds whole chunks).

    Batch is in [1, max_batch] and tuned for ``opt_batch`` in both.
    """
    h, dk, dv = manifest.state_shape
    b_min, b_opt, b_max = 1, options.opt_batch, options.max_batch

    def ranges(l_min: int, l_opt: int, l_max: int) -> dict[str, ShapeRange]:
        shapes = {
            "input_ids": ShapeRange([b_min, l_min], [b_opt, l_opt], [b_max, l_max]),
            "attention_mask": ShapeRange([b_min, l_min], [b_opt, l_opt], [b_max, l_max]),
            "past_position": ShapeRange([b_min], [b_opt], [b_max]),
        }
        for name in manifest.state_inputs:
            shapes[name] = ShapeRange([b_min, h, dk, dv], [b_opt, h, dk, dv], [b_max, h, dk, dv])
        return shapes

    specs = [ProfileSpec(DECODE, 0, ranges(1, 1, 1))]
    if options.max_chunk > 1:
        specs.append(ProfileSpec(PREFILL, 1, ranges(2, options.max_chunk, options.max_chunk)))
    return specs


def check_manifest_inputs(manifest: Manifest) -> None:
    """The step-graph contract this builder knows how to profile."""
    if manifest.flavor == "inline":
        # The inline graph is tuned for ONNX Runtime's CPU kernels (opset-23
        # RMSNormalization/RotaryEmbedding, the recurrence as many small ops);
        # TensorRT gets the recurrence as one plugin layer instead.
        raise DiJiangError(
            "this export uses --attention-op inline (built for ONNX Runtime); for TensorRT export with "
            "--attention-op plugin (TensorRT 10.3, Jetson) or function"
        )
    names = [t.name for t in manifest.inputs]
    want = ["input_ids", "attention_mask", "past_position", *manifest.state_inputs]
    if names != want:
        raise DiJiangError(f"unexpected graph inputs {names}; this builder expects {want}")
