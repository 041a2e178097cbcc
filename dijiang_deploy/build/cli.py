"""``dijiang-deploy build``: ONNX export folder -> TensorRT engine folder.

Registered by :mod:`dijiang_deploy.cli` through :func:`add_parsers`. Nothing
here imports TensorRT until an engine is actually built, so ``--help`` and
``--print-trtexec`` work on machines without it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..contract.errors import DiJiangError


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``build`` subcommand."""
    p = subparsers.add_parser(
        "build",
        help="build a TensorRT engine from an exported ONNX folder",
        description="Build a TensorRT engine (strongly typed; decode and prefill optimization profiles) from an "
        "ONNX export folder. Explicit flags override the --target profile.",
    )
    p.add_argument("onnx_dir", help="export folder (manifest.json + model.onnx)")
    p.add_argument("-o", "--output", required=True, help="engine folder to write")
    p.add_argument("--target", help="device profile name (export/targets/NAME.json) or a JSON file")
    p.add_argument("--precision", choices=["fp16", "fp32"], help="must match the export's --dtype (default: the export's)")
    p.add_argument("--max-batch", type=int, help="largest batch (default: target's, else 1)")
    p.add_argument("--opt-batch", type=int, help="batch the profiles are tuned for (default: target's, else 1)")
    p.add_argument("--max-chunk", type=int, help="longest prefill chunk (default: target's capped at the export's)")
    p.add_argument("--workspace", type=int, metavar="MiB", help="workspace memory-pool limit (default: target's, else 1024)")
    p.add_argument("--plugin-lib", help="libdijiang_trt_plugins.so (default: $DIJIANG_TRT_PLUGIN_LIB, then plugins/build/main)")
    p.add_argument(
        "--serialize-plugins", action="store_true",
        help="embed the plugin library in a version-compatible engine (no library needed at run time)",
    )
    p.add_argument("--tf32", action="store_true", help="allow TF32 for float32 matrix products (faster, ~1e-3 off)")
    p.add_argument("--timing-cache", help="timing cache file: read if present, written back after the build")
    p.add_argument(
        "--print-trtexec", action="store_true",
        help="print the equivalent trtexec command and exit (needs neither TensorRT nor a GPU; a linear-attention "
        "export's graph is first rewritten to OUTPUT.plugin.onnx, which the command parses)",
    )
    p.add_argument(
        "--engine", metavar="FILE",
        help="package an engine built by the printed trtexec command into OUTPUT instead of building one",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    """Handler of ``dijiang-deploy build``; errors are :class:`DiJiangError`."""
    from ..contract.manifest import Manifest
    from .builder import build_engine, package_engine, plugin_graph_path, plugin_needed, write_plugin_graph
    from .environment import DEFAULT_PLUGIN_LIBRARY, PLUGIN_ENV, find_plugin_library
    from .options import check_manifest_inputs, profile_specs, resolve_options
    from .targets import load_target
    from .trtexec import format_command, trtexec_command

    manifest = Manifest.load(args.onnx_dir)
    check_manifest_inputs(manifest)
    target = load_target(args.target) if args.target else None
    needs_plugin = plugin_needed(manifest.flavor)
    if args.print_trtexec or args.engine:
        # The library may live on another machine: take the path as given.
        import os

        plugin = args.plugin_lib or os.environ.get(PLUGIN_ENV)
        if plugin is None and (needs_plugin or DEFAULT_PLUGIN_LIBRARY.is_file()):
            plugin = str(DEFAULT_PLUGIN_LIBRARY)
        plugin_path = Path(plugin) if plugin else None
    else:
        plugin_path = find_plugin_library(args.plugin_lib, required=needs_plugin)
    options = resolve_options(
        manifest,
        target,
        precision=args.precision,
        max_batch=args.max_batch,
        opt_batch=args.opt_batch,
        max_chunk=args.max_chunk,
        workspace_mib=args.workspace,
        plugin_lib=plugin_path,
        serialize_plugins=args.serialize_plugins,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
        tf32=args.tf32,
    )
    if args.print_trtexec:
        if args.engine:
            raise DiJiangError("--print-trtexec and --engine are exclusive: print the command, run it, then package")
        onnx_path = Path(args.onnx_dir) / manifest.model_file
        engine_path = Path(f"{args.output}.engine")
        if manifest.flavor == "linear-attention":
            # trtexec parses what build_engine parses: the graph with the plugin node.
            rewritten = plugin_graph_path(args.output)
            count = write_plugin_graph(onnx_path, rewritten)
            print(f"# wrote {rewritten}: {onnx_path} with its {count} LinearAttention nodes as the "
                  "DiJiangLinearAttention plugin node, for trtexec", file=sys.stderr)
            onnx_path = rewritten
        argv = trtexec_command(onnx_path, engine_path, profile_specs(manifest, options), options)
        print(format_command(argv))
        print(
            f"# after trtexec, package the engine: rerun this command with --engine {engine_path} "
            "in place of --print-trtexec",
            file=sys.stderr,
        )
        return 0
    if args.engine:
        result = package_engine(args.onnx_dir, args.engine, args.output, options, overwrite=args.overwrite)
        print(f"wrote {args.output}: engine from trtexec, {result.precision}, batch <= {result.max_batch}, "
              f"chunk <= {result.max_chunk}")
        return 0
    result = build_engine(args.onnx_dir, args.output, options, overwrite=args.overwrite)
    print(
        f"wrote {args.output}: TensorRT {result.tensorrt_version} on {result.gpu_name} (SM {result.gpu_sm}), "
        f"{result.precision}, {result.flavor} ({result.plugin_layers} plugin layers), batch <= {result.max_batch}, "
        f"chunk <= {result.max_chunk}, {result.build_seconds:.0f}s"
    )
    return 0
