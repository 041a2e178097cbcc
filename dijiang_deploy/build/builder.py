"""Build a TensorRT engine from an ONNX export folder (TensorRT Python API).

UNVERIFIED ON HARDWARE: this module has not run against a real TensorRT
install or GPU in this project yet; only the parts that do not need
TensorRT (option resolution, profiles, trtexec command, refusals) are tested.

Steps: strongly typed network (precision from the ONNX dtypes) -> plugin
library loaded through the plugin registry -> ONNX parsed (any flavor; the
``linear-attention`` flavor's standard ``LinearAttention`` nodes first
rewritten into the plugin node, :func:`write_plugin_graph`) ->
two optimization profiles (decode L = 1; prefill L in [2, max_chunk]) over
batch 1..max_batch -> timing cache read and written back -> optional
version-compatible engine with the plugin library serialized into it ->
engine folder written atomically.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator

from ..contract.atomic import atomic_dir, atomic_file
from ..contract.names import (
    DOMAIN,
    DOMAIN_VERSION,
    OP_TYPE,
    PLUGIN_NAMESPACE,
    PLUGIN_VERSION,
    PORTABLE_OPSET,
    STANDARD_OP,
    TOKENIZER_FILES,
)
from ..contract.errors import BackendUnavailableError, DiJiangError
from ..contract.manifest import Manifest
from .environment import gpu_info, import_tensorrt, load_plugin_library, tensorrt_version_tuple
from .manifest import ENGINE_FILE, ENGINE_MANIFEST, EngineManifest, ProfileSpec
from .options import BuildOptions, check_manifest_inputs, profile_specs

log = logging.getLogger(__name__)

_TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64", "int32": "INT32"}


class _Logger:
    """Factory for a TensorRT logger that forwards to :mod:`logging`."""

    @staticmethod
    def make(trt: Any) -> Any:
        class Forward(trt.ILogger):  # type: ignore[misc, name-defined]
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.errors: list[str] = []

            def log(self, severity: Any, msg: str) -> None:
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

        return Forward()


def plugin_needed(flavor: str) -> bool:
    """Whether a flavor cannot be built without the plugin library.

    ``plugin`` has no body; ``linear-attention`` is built as the ``plugin``
    flavor (:func:`write_plugin_graph`); ``function`` falls back to inlining
    its opset-21 body.
    """
    return flavor in ("plugin", "linear-attention")


#: Attributes of the standard op that the plugin node carries over unchanged (plugins/README.md).
_NODE_ATTRIBUTES = ("q_num_heads", "kv_num_heads", "scale", "update_rule", "chunk_size")


def plugin_graph_path(output: str | Path) -> Path:
    """Where ``--print-trtexec`` writes the rewritten ``linear-attention`` graph: beside the engine output."""
    return Path(f"{output}.plugin.onnx")


def rewrite_to_plugin_nodes(model: Any) -> int:
    """Turn ``model``'s standard ``LinearAttention`` nodes into the ``plugin`` flavor's node, in place.

    The library registers its creator only as ``DiJiangLinearAttention`` in
    the ``dijiang`` namespace (a standard op name in TensorRT's empty namespace
    could collide with TensorRT's own), so TensorRT finds it for this node
    only: ``com.dijiang_deploy::DiJiangLinearAttention`` with
    ``plugin_version``/``plugin_namespace`` first, then the node's own
    attributes, inputs and outputs unchanged. The default-domain opset becomes
    the ``plugin`` flavor's (21): the exporter writes the same other nodes for
    both traced flavors and only labels them 27 or 21
    (``export.graph._step_graph``), so the result is that flavor's graph.
    Other domains' imports are kept. Returns the number of nodes rewritten.

    Raises:
        DiJiangError: no such node, or one with an attribute the plugin does not take.
    """
    from onnx import helper

    nodes = [n for n in model.graph.node if n.op_type == STANDARD_OP and n.domain in ("", "ai.onnx")]
    if not nodes:
        raise DiJiangError(f"the graph has no {STANDARD_OP} node to rewrite into {OP_TYPE}")
    for node in nodes:
        extra = sorted(a.name for a in node.attribute if a.name not in _NODE_ATTRIBUTES)
        if extra:
            raise DiJiangError(
                f"{STANDARD_OP} node {node.name!r} has attribute(s) {', '.join(extra)} that the {OP_TYPE} plugin "
                "does not take (plugins/README.md)"
            )
        own = list(node.attribute)
        del node.attribute[:]
        node.attribute.extend([
            helper.make_attribute("plugin_version", PLUGIN_VERSION),
            helper.make_attribute("plugin_namespace", PLUGIN_NAMESPACE),
            *own,
        ])
        node.op_type, node.domain = OP_TYPE, DOMAIN
    others = [o for o in model.opset_import if o.domain not in ("", "ai.onnx", DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(
        [helper.make_opsetid("", PORTABLE_OPSET), helper.make_opsetid(DOMAIN, DOMAIN_VERSION), *others]
    )
    return len(nodes)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    """Every TensorProto held by ``nodes``' attributes, subgraphs included."""
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from sub.initializer
                yield from _node_tensors(sub.node)


def _model_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of ``model``, where external data can be referenced."""
    yield from model.graph.initializer
    yield from _node_tensors(model.graph.node)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _link(target: Path, link: Path) -> None:
    """Point ``link`` at ``target`` (replacing an older link there, never a file)."""
    if link.exists() or link.is_symlink():
        if not link.is_symlink():
            raise DiJiangError(f"{link}: exists and is not a link; remove it or choose another --output")
        link.unlink()
    link.symlink_to(target)


def write_plugin_graph(src: str | Path, dst: str | Path) -> int:
    """Write the graph ``src`` to ``dst`` with its ``LinearAttention`` nodes as the plugin node
    (:func:`rewrite_to_plugin_nodes`); returns how many were rewritten.

    The graph is read without its external data. Weights stored beside ``src``
    (``model.onnx.data`` for large exports) are not copied: ``dst`` points at
    them through symbolic links named ``<dst name>.data`` (``.data1``, ... for
    more files) beside it, which TensorRT's parser reads like the files
    themselves. (The onnx package and ONNX Runtime refuse to follow such
    links; only TensorRT reads this graph.)

    Raises:
        BackendUnavailableError: the onnx package is missing.
        DiJiangError: a node cannot be rewritten, or a data file is missing.
    """
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError(
            "building the linear-attention flavor rewrites its LinearAttention nodes into the plugin node, which "
            "needs the onnx package (pip install 'dijiang-deploy[export]'), or export with --attention-op plugin"
        ) from None
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    count = rewrite_to_plugin_nodes(model)
    links: dict[str, str] = {}
    for tensor in _model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        for entry in tensor.external_data:
            if entry.key != "location":
                continue
            if entry.value not in links:
                data = src.parent / entry.value
                if not data.is_file():
                    raise DiJiangError(f"{src}: external data file {data} is missing")
                name = f"{dst.name}.data{len(links) or ''}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                _link(data.resolve(), dst.parent / name)
                links[entry.value] = name
            entry.value = links[entry.value]
    with atomic_file(dst, "wb") as fh:
        fh.write(model.SerializeToString())
    log.info("%s: %d %s nodes rewritten to %s::%s in %s", src, count, STANDARD_OP, DOMAIN, OP_TYPE, dst)
    return count


@contextlib.contextmanager
def _parser_input(onnx_path: Path, flavor: str) -> Iterator[Path]:
    """The file TensorRT parses: the export's graph, or for ``linear-attention`` its
    plugin-node copy (:func:`write_plugin_graph`) in a temporary folder that lasts as long as the context."""
    if flavor != "linear-attention":
        yield onnx_path
        return
    with tempfile.TemporaryDirectory(prefix="dijiang-trt-") as folder:
        parsed = Path(folder) / onnx_path.name
        write_plugin_graph(onnx_path, parsed)
        yield parsed


def _parse(trt: Any, network: Any, logger: Any, onnx_path: Path, flavor: str, source: Path | None = None) -> Any:
    """Parse ``onnx_path`` into ``network``; ``source`` names the export's graph in errors when
    ``onnx_path`` is its rewritten copy."""
    parser = trt.OnnxParser(network, logger)
    version = tensorrt_version_tuple(trt.__version__)
    override = getattr(trt.OnnxParserFlag, "ENABLE_PLUGIN_OVERRIDE", None)
    if flavor == "function" and override is not None and version >= (10, 15):
        # Lets the registered DiJiangLinearAttention plugin replace the local
        # function's body; older parsers match the function to the plugin by
        # name (10.7+) or inline the body.
        parser.set_flag(override)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)).strip().replace("\n", " ") for i in range(parser.num_errors)]
        shown = "; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else "")
        where = f"{source} (rewritten to {OP_TYPE} nodes in {onnx_path})" if source is not None else str(onnx_path)
        raise DiJiangError(f"{where}: TensorRT {trt.__version__} cannot parse the graph: {shown}")
    return parser


def _check_network_io(trt: Any, network: Any, manifest: Manifest) -> None:
    got_in = [(network.get_input(i).name, network.get_input(i).dtype) for i in range(network.num_inputs)]
    got_out = [(network.get_output(i).name, network.get_output(i).dtype) for i in range(network.num_outputs)]
    want_in = [(t.name, getattr(trt, _TRT_DTYPES.get(t.dtype, "FLOAT"))) for t in manifest.inputs]
    want_out = [(t.name, getattr(trt, _TRT_DTYPES.get(t.dtype, "FLOAT"))) for t in manifest.outputs]
    if got_in != want_in or got_out != want_out:
        raise DiJiangError(
            f"parsed network IO {[(n, str(d)) for n, d in got_in + got_out]} differs from the manifest's "
            f"{[(n, str(d)) for n, d in want_in + want_out]}"
        )


def _count_plugin_layers(trt: Any, network: Any) -> int:
    kinds = {getattr(trt.LayerType, k) for k in ("PLUGIN_V3", "PLUGIN_V2", "PLUGIN") if hasattr(trt.LayerType, k)}
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type in kinds)


def _add_profiles(builder: Any, config: Any, specs: list[ProfileSpec]) -> None:
    for spec in specs:
        profile = builder.create_optimization_profile()
        for name, rng in spec.shapes.items():
            profile.set_shape(name, rng.min, rng.opt, rng.max)
        index = config.add_optimization_profile(profile)
        if index != spec.index:
            raise DiJiangError(f"TensorRT numbered the {spec.name} profile {index}, expected {spec.index}")


def _timing_cache(config: Any, path: Path | None) -> Any:
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting an empty one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    return cache


def build_engine(
    onnx_dir: str | Path,
    out_dir: str | Path,
    options: BuildOptions,
    overwrite: bool = False,
) -> EngineManifest:
    """Build ``onnx_dir``'s graph into an engine folder ``out_dir`` (atomic).

    UNVERIFIED ON HARDWARE.

    Raises:
        BackendUnavailableError: TensorRT, a GPU or the plugin library is missing.
        DiJiangError: the graph does not parse, the build fails, or inputs are invalid.
    """
    # One function on purpose: the TensorRT builder objects live for the duration of one build and are configured step by step in the order TensorRT requires.
    onnx_dir = Path(onnx_dir)
    manifest = Manifest.load(onnx_dir)
    check_manifest_inputs(manifest)
    onnx_path = onnx_dir / manifest.model_file
    if not onnx_path.is_file():
        raise DiJiangError(f"{onnx_path}: model file named by the manifest is missing")
    if Path(out_dir).exists() and not overwrite:
        raise DiJiangError(f"{out_dir}: already exists (pass --overwrite to replace it)")
    if plugin_needed(manifest.flavor) and options.plugin_lib is None:
        raise BackendUnavailableError(f"the {manifest.flavor} flavor needs the plugin library (--plugin-lib)")
    trt = import_tensorrt()
    gpu_name, gpu_sm = gpu_info()
    started = time.time()
    logger = _Logger.make(trt)
    builder = trt.Builder(logger)
    if options.plugin_lib is not None:
        load_plugin_library(trt, options.plugin_lib)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    # A rewritten graph (and the links to its weights) stays until the build is done, like the parser.
    with _parser_input(onnx_path, manifest.flavor) as parse_path:
        source = onnx_path if parse_path != onnx_path else None
        _parser = _parse(trt, network, logger, parse_path, manifest.flavor, source)  # keep alive until the build ends
        _check_network_io(trt, network, manifest)
        plugin_layers = _count_plugin_layers(trt, network)
        # Both flavors hand every attention node to the plugin; fewer plugin layers mean the
        # parser resolved some of them otherwise.
        if manifest.flavor in ("plugin", "linear-attention") and plugin_layers < manifest.num_layers:
            raise DiJiangError(f"only {plugin_layers} plugin layers for {manifest.num_layers} attention nodes")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
        if not options.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        specs = profile_specs(manifest, options)
        _add_profiles(builder, config, specs)
        cache = _timing_cache(config, options.timing_cache)
        if options.serialize_plugins:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            config.plugins_to_serialize = [str(options.plugin_lib)]
        log.info("building %s (%s, %d profiles, batch <= %d, chunk <= %d)", onnx_path, manifest.dtype, len(specs),
                 options.max_batch, options.max_chunk)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            detail = "; ".join(logger.errors[-2:]) or "see the TensorRT log (-v)"
            raise DiJiangError(f"TensorRT failed to build the engine: {detail}")
        engine_bytes = memoryview(serialized).tobytes()
    if options.timing_cache is not None:
        with atomic_file(options.timing_cache, "wb") as fh:
            fh.write(memoryview(config.get_timing_cache().serialize()).tobytes())
    del cache
    result = EngineManifest(
        engine_file=ENGINE_FILE,
        tensorrt_version=str(trt.__version__),
        gpu_name=gpu_name,
        gpu_sm=gpu_sm,
        precision=manifest.dtype,
        flavor=manifest.flavor,
        max_batch=options.max_batch,
        max_chunk=options.max_chunk,
        profiles=specs,
        inputs=[asdict(t) for t in manifest.inputs],
        outputs=[asdict(t) for t in manifest.outputs],
        plugin_library=_bundled_plugin_name(options),
        plugins_serialized=options.serialize_plugins,
        version_compatible=options.serialize_plugins,
        plugin_layers=plugin_layers,
        target=options.target,
        workspace_mib=options.workspace_mib,
        tf32=options.tf32,
        source={"onnx_dir": str(onnx_dir.resolve()), **manifest.source},
        built_with="python-api",
        build_seconds=round(time.time() - started, 1),
    )
    write_engine_folder(out_dir, onnx_dir, manifest, result, engine_bytes=engine_bytes, overwrite=overwrite,
                        plugin=options.plugin_lib if result.plugin_library else None)
    return result


def write_engine_folder(
    out_dir: str | Path,
    onnx_dir: Path,
    manifest: Manifest,
    engine_manifest: EngineManifest,
    engine_bytes: bytes | None = None,
    engine_path: Path | None = None,
    overwrite: bool = False,
    plugin: Path | None = None,
) -> None:
    """Write the engine, ``engine.json``, the ONNX manifest (max_chunk set to the
    engine's), the tokenizer files and the plugin library the engine needs
    (``plugin``, copied beside it) into ``out_dir`` atomically."""
    onnx_manifest = replace(manifest, max_chunk=engine_manifest.max_chunk)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        target = tmp / engine_manifest.engine_file
        if engine_bytes is not None:
            target.write_bytes(engine_bytes)
        elif engine_path is not None:
            shutil.copyfile(engine_path, target)
        else:  # pragma: no cover - programming error
            raise ValueError("engine_bytes or engine_path is required")
        (tmp / ENGINE_MANIFEST).write_text(engine_manifest.to_json())
        onnx_manifest.write(tmp)
        for name in TOKENIZER_FILES:
            src = onnx_dir / name
            if src.exists():
                shutil.copyfile(src, tmp / name)
        if plugin is not None:
            shutil.copy2(plugin, tmp / engine_manifest.plugin_library)


def package_engine(
    onnx_dir: str | Path,
    engine_file: str | Path,
    out_dir: str | Path,
    options: BuildOptions,
    overwrite: bool = False,
) -> EngineManifest:
    """Wrap an engine built by ``trtexec`` (from :func:`~.trtexec.trtexec_command`)
    into an engine folder, without TensorRT.

    The TensorRT version and GPU are unknown here and recorded as None; the
    backend then relies on TensorRT's own check at deserialization. The
    options must be the ones the trtexec command was printed with.
    """
    onnx_dir = Path(onnx_dir)
    engine_file = Path(engine_file)
    if not engine_file.is_file():
        raise DiJiangError(f"{engine_file}: no such engine file")
    manifest = Manifest.load(onnx_dir)
    check_manifest_inputs(manifest)
    result = EngineManifest(
        engine_file=ENGINE_FILE,
        tensorrt_version=None,
        gpu_name=None,
        gpu_sm=None,
        precision=manifest.dtype,
        flavor=manifest.flavor,
        max_batch=options.max_batch,
        max_chunk=options.max_chunk,
        profiles=profile_specs(manifest, options),
        inputs=[asdict(t) for t in manifest.inputs],
        outputs=[asdict(t) for t in manifest.outputs],
        plugin_library=_bundled_plugin_name(options),
        plugins_serialized=options.serialize_plugins,
        version_compatible=options.serialize_plugins,
        target=options.target,
        workspace_mib=options.workspace_mib,
        tf32=options.tf32,
        source={"onnx_dir": str(onnx_dir.resolve()), **manifest.source},
        built_with="trtexec",
    )
    write_engine_folder(out_dir, onnx_dir, manifest, result, engine_path=engine_file, overwrite=overwrite,
                        plugin=options.plugin_lib if result.plugin_library else None)
    return result


def _bundled_plugin_name(options: BuildOptions) -> str | None:
    """The plugin library's file name inside the engine folder (None: none, or serialized into the engine).

    Only a bare file name is recorded: an engine folder never points the runtime
    at a library elsewhere on the machine.
    """
    if options.plugin_lib is None or options.serialize_plugins:
        return None
    if not Path(options.plugin_lib).is_file():
        log.warning("plugin library %s is not on this machine: not bundled; the engine folder will need "
                    "--plugin-lib (or $DIJIANG_TRT_PLUGIN_LIB) where it runs", options.plugin_lib)
        return None
    return Path(options.plugin_lib).name


__all__ = [
    "build_engine",
    "package_engine",
    "plugin_graph_path",
    "plugin_needed",
    "rewrite_to_plugin_nodes",
    "write_engine_folder",
    "write_plugin_graph",
]
