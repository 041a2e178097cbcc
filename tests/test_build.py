"""CPU tests of ``dijiang-deploy build``: target profiles, option resolution,
the trtexec command, engine-folder packaging, and clear refusals when TensorRT
or the plugin library is missing. No TensorRT or GPU needed (TensorRT is made
unimportable where it happens to be installed)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from dijiang_deploy.build import environment
from dijiang_deploy.build.builder import build_engine, package_engine
from dijiang_deploy.build.manifest import ENGINE_FILE, ENGINE_MANIFEST, EngineManifest
from dijiang_deploy.build.options import profile_specs, resolve_options
from dijiang_deploy.build.targets import Target, list_targets, load_target, target_from_dict, targets_dir
from dijiang_deploy.build.trtexec import format_command, trtexec_command
from dijiang_deploy.cli import main
from dijiang_deploy.contract.errors import BackendUnavailableError, DiJiangError
from dijiang_deploy.export import ExportOptions, Manifest, export_model
from dijiang_deploy.testing import random_model

SHIPPED = ["ada", "agx-orin-64gb", "ampere", "hopper", "orin-nano-8gb"]
PLUGIN = "/opt/dijiang/libdijiang_trt_plugins.so"


@pytest.fixture(scope="module")
def plugin_export(module_tmp) -> Path:
    """The tiny llama model exported with the plugin flavor (fp32, max_chunk 64)."""
    out = module_tmp("export") / "tiny_plugin"
    export_model(random_model("llama"), out, ExportOptions(attention_op="plugin"))
    return out


@pytest.fixture(scope="module")
def la_export(module_tmp) -> Path:
    """The same model (same seed) exported with the linear-attention flavor."""
    out = module_tmp("export") / "tiny_la"
    export_model(random_model("llama"), out, ExportOptions(attention_op="linear-attention"))
    return out


@pytest.fixture
def la_external(la_export: Path, tmp_path: Path) -> Path:
    """``la_export`` with every weight in ``model.onnx.data`` beside the graph, as large exports are."""
    import onnx

    folder = tmp_path / "tiny_la_external"
    folder.mkdir()
    onnx.save(onnx.load(str(la_export / "model.onnx")), str(folder / "model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    (folder / "manifest.json").write_bytes((la_export / "manifest.json").read_bytes())
    return folder


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make ``import tensorrt`` fail even where TensorRT is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.fixture
def no_default_plugin(monkeypatch, tmp_path):
    monkeypatch.delenv(environment.PLUGIN_ENV, raising=False)
    monkeypatch.setattr(environment, "DEFAULT_PLUGIN_LIBRARY", tmp_path / "missing" / environment.PLUGIN_LIBRARY_NAME)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["build", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- target profiles -------------------------------------------------------------


def test_shipped_targets_load_and_validate() -> None:
    assert list_targets() == SHIPPED
    for name in SHIPPED:
        t = load_target(name)
        assert isinstance(t, Target) and t.name == name
        assert t.precision == "fp16"
        assert t.max_chunk >= 64 and 1 <= t.opt_batch <= t.max_batch
        assert t.workspace_mib <= t.memory_gib * 1024 / 2


def test_targets_ship_inside_the_package() -> None:
    """Wheels carry dijiang_deploy/build/targets/*.json (pyproject package-data);
    in a checkout that folder is the repository's export/targets."""
    import dijiang_deploy.build.targets as targets_mod

    folder = Path(targets_mod.__file__).parent / "targets"
    assert sorted(p.stem for p in folder.glob("*.json")) == SHIPPED
    repo = Path(__file__).resolve().parents[1] / "export" / "targets"
    for name in SHIPPED:
        assert (folder / f"{name}.json").read_bytes() == (repo / f"{name}.json").read_bytes()
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"dijiang_deploy.build" = ["targets/*.json"]' in pyproject


def test_jetson_targets_use_the_plugin_flavor_and_sm87() -> None:
    for name in ("orin-nano-8gb", "agx-orin-64gb"):
        t = load_target(name)
        assert t.flavor == "plugin" and t.sm == ("8.7",) and t.tensorrt == "10.3"
    nano, agx, hopper = load_target("orin-nano-8gb"), load_target("agx-orin-64gb"), load_target("hopper")
    # Sized to memory: the 8 GB part gets the smallest limits.
    assert nano.max_batch < agx.max_batch < hopper.max_batch
    assert nano.workspace_mib < agx.workspace_mib < hopper.workspace_mib


def _valid() -> dict:
    return json.loads((targets_dir() / "ampere.json").read_text())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"precision": "int8"}, "precision must be fp16 or fp32"),
        ({"max_batch": 0}, "max batch must be in"),
        ({"opt_batch": 99}, "opt batch must be in"),
        ({"max_chunk": 5000}, "max chunk must be in"),
        ({"workspace_mib": 8}, "workspace must be in"),
        ({"workspace_mib": 8192}, "more than half"),
        ({"sm": ["86"]}, "sm must be"),
        ({"flavor": "onnx"}, "flavor must be"),
        ({"max_batch": "4"}, "must be an integer"),
        ({"colour": "green"}, "unknown field(s) colour"),
        ({"name": "other"}, "its 'name' field says"),
    ],
)
def test_invalid_target_is_refused(change: dict, message: str) -> None:
    data = _valid() | change
    with pytest.raises(DiJiangError, match=message.replace("(", r"\(").replace(")", r"\)")):
        target_from_dict(data, "ampere")


def test_target_missing_field_and_unknown_name(tmp_path: Path) -> None:
    data = _valid()
    del data["max_chunk"]
    with pytest.raises(DiJiangError, match="missing field"):
        target_from_dict(data, "ampere")
    with pytest.raises(DiJiangError, match=r"unknown target 'tpu' \(known: ada, agx-orin-64gb"):
        load_target("tpu")
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps(_valid() | {"name": "mine", "max_batch": 3}))
    assert load_target(str(custom)).max_batch == 3
    with pytest.raises(DiJiangError, match="no such file"):
        load_target(str(tmp_path / "absent.json"))


# -- options and profiles --------------------------------------------------------------


def test_explicit_flags_override_the_target(plugin_export: Path) -> None:
    man = Manifest.load(plugin_export)
    target = load_target("hopper")
    opts = resolve_options(man, target)
    # Target's chunk (256) is capped at the export's (64); precision follows the ONNX.
    assert (opts.precision, opts.max_batch, opts.opt_batch, opts.max_chunk, opts.workspace_mib) == (
        "fp32", 64, 8, 64, 8192,
    )
    opts = resolve_options(man, target, max_batch=4, opt_batch=2, max_chunk=32, workspace_mib=256)
    assert (opts.max_batch, opts.opt_batch, opts.max_chunk, opts.workspace_mib, opts.target) == (4, 2, 32, 256, "hopper")
    opts = resolve_options(man)
    assert (opts.max_batch, opts.opt_batch, opts.max_chunk, opts.workspace_mib, opts.target) == (1, 1, 64, 1024, None)
    with pytest.raises(DiJiangError, match="contradicts the ONNX export's dtype fp32"):
        resolve_options(man, target, precision="fp16")
    with pytest.raises(DiJiangError, match="opt batch must be in 1..max batch"):
        resolve_options(man, max_batch=2, opt_batch=3)


def test_profiles_cover_decode_and_prefill(plugin_export: Path) -> None:
    man = Manifest.load(plugin_export)
    specs = profile_specs(man, resolve_options(man, max_batch=4, opt_batch=2, max_chunk=32))
    assert [(s.name, s.index, s.seq_range, s.batch_range) for s in specs] == [
        ("decode", 0, (1, 1), (1, 4)),
        ("prefill", 1, (2, 32), (1, 4)),
    ]
    state = specs[1].shapes["past_state.1"]
    assert (state.min, state.opt, state.max) == ([1, 4, 16, 16], [2, 4, 16, 16], [4, 4, 16, 16])
    assert specs[1].shapes["input_ids"].opt == [2, 32]
    assert len(profile_specs(man, resolve_options(man, max_chunk=1))) == 1


# -- trtexec ------------------------------------------------------------------------------


def _expected_trtexec(onnx: Path, engine: str) -> list[str]:
    def spec(b: int, seq: int) -> str:
        return (
            f"input_ids:{b}x{seq},attention_mask:{b}x{seq},past_position:{b},"
            f"past_state.0:{b}x4x16x16,past_state.1:{b}x4x16x16"
        )

    return [
        "trtexec",
        f"--onnx={onnx / 'model.onnx'}",
        f"--saveEngine={engine}",
        "--stronglyTyped",
        "--profile=0",
        f"--minShapes={spec(1, 1)}",
        f"--optShapes={spec(1, 1)}",
        f"--maxShapes={spec(2, 1)}",
        "--profile=1",
        f"--minShapes={spec(1, 2)}",
        f"--optShapes={spec(1, 64)}",
        f"--maxShapes={spec(2, 64)}",
        "--noTF32",
        "--memPoolSize=workspace:512M",
        f"--dynamicPlugins={PLUGIN}",
        f"--setPluginsToSerialize={PLUGIN}",
        "--versionCompatible",
        "--timingCacheFile=/tmp/dj.cache",
        "--skipInference",
    ]


def test_trtexec_command_exact_flags(plugin_export: Path) -> None:
    man = Manifest.load(plugin_export)
    opts = resolve_options(
        man, load_target("orin-nano-8gb"), plugin_lib=Path(PLUGIN), serialize_plugins=True,
        timing_cache=Path("/tmp/dj.cache"),
    )
    argv = trtexec_command(plugin_export / "model.onnx", "/out/eng.engine", profile_specs(man, opts), opts)
    assert argv == _expected_trtexec(plugin_export, "/out/eng.engine")


def test_print_trtexec_cli_needs_no_tensorrt(plugin_export: Path, capsys, no_tensorrt, tmp_path: Path) -> None:
    out_dir = tmp_path / "eng"
    code, out, err = _cli(
        capsys, str(plugin_export), "-o", str(out_dir), "--target", "orin-nano-8gb", "--plugin-lib", PLUGIN,
        "--serialize-plugins", "--timing-cache", "/tmp/dj.cache", "--print-trtexec",
    )
    assert code == 0, err
    assert out.strip() == format_command(_expected_trtexec(plugin_export, str(out_dir) + ".engine"))
    assert f"--engine {out_dir}.engine" in err
    assert not out_dir.exists()


def test_print_trtexec_plain_options(plugin_export: Path, capsys, no_tensorrt, tmp_path: Path) -> None:
    code, out, _ = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "e"), "--plugin-lib", PLUGIN,
                        "--max-batch", "3", "--max-chunk", "16", "--workspace", "64", "--print-trtexec")
    assert code == 0
    argv = out.split()
    assert "--versionCompatible" not in argv and not any(a.startswith("--timingCacheFile") for a in argv)
    assert "--noTF32" in argv
    assert f"--dynamicPlugins={PLUGIN}" in argv and "--memPoolSize=workspace:64M" in argv
    assert any(a.startswith("--maxShapes=input_ids:3x16,") for a in argv)


def test_print_trtexec_linear_attention_writes_the_plugin_graph(
    la_external: Path, plugin_export: Path, capsys, no_tensorrt, tmp_path: Path
) -> None:
    """trtexec gets the rewritten graph, written beside the engine output with a link to the
    export's weights; rerunning replaces both."""
    import onnx

    out = tmp_path / "engines" / "tiny"
    for _ in range(2):
        code, stdout, err = _cli(capsys, str(la_external), "-o", str(out), "--plugin-lib", PLUGIN, "--print-trtexec")
        assert code == 0, err
    rewritten = Path(f"{out}.plugin.onnx")
    argv = stdout.split()
    assert argv[1] == f"--onnx={rewritten}" and f"--saveEngine={out}.engine" in argv
    assert f"wrote {rewritten}" in err and f"--engine {out}.engine" in err
    # Apart from the graph it parses, the command is the plugin flavor's.
    code, plugin_out, _ = _cli(capsys, str(plugin_export), "-o", str(out), "--plugin-lib", PLUGIN, "--print-trtexec")
    assert argv[2:] == plugin_out.split()[2:]
    model = onnx.load(str(rewritten), load_external_data=False)
    assert sum(n.op_type == "DiJiangLinearAttention" for n in model.graph.node) == 2
    assert not any(n.op_type == "LinearAttention" for n in model.graph.node)
    link = Path(f"{rewritten}.data")
    assert link.is_symlink() and link.resolve() == (la_external / "model.onnx.data").resolve()
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {link.name}
    assert not out.exists()


def test_rewrite_matches_the_plugin_flavor_node_for_node(la_export: Path, plugin_export: Path, tmp_path: Path) -> None:
    """Rewriting the linear-attention export gives the plugin export of the same weights: the
    same nodes (the attention nodes become the plugin node with plugin_version and
    plugin_namespace and keep their attributes, inputs and outputs), opsets and weights."""
    import onnx

    from dijiang_deploy.build.builder import rewrite_to_plugin_nodes, write_plugin_graph
    from dijiang_deploy.export import register_schema

    la = onnx.load(str(la_export / "model.onnx"))
    before = [n for n in la.graph.node if n.op_type == "LinearAttention"]
    assert len(before) == 2
    before = [onnx.NodeProto.FromString(n.SerializeToString()) for n in before]
    assert rewrite_to_plugin_nodes(la) == 2
    plugin = onnx.load(str(plugin_export / "model.onnx"))
    assert list(la.graph.node) == list(plugin.graph.node)
    assert list(la.graph.initializer) == list(plugin.graph.initializer)
    assert list(la.graph.input) == list(plugin.graph.input) and list(la.graph.output) == list(plugin.graph.output)
    assert list(la.opset_import) == list(plugin.opset_import)
    after = [n for n in la.graph.node if n.op_type == "DiJiangLinearAttention"]
    for old, new in zip(before, after, strict=True):
        assert (new.domain, list(new.input), list(new.output), new.name) == (
            "com.dijiang_deploy", list(old.input), list(old.output), old.name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in new.attribute}
        assert attrs.pop("plugin_version") == b"1" and attrs.pop("plugin_namespace") == b"dijiang"
        assert attrs == {a.name: onnx.helper.get_attribute_value(a) for a in old.attribute}
    register_schema()
    path = tmp_path / "rewritten.onnx"
    assert write_plugin_graph(la_export / "model.onnx", path) == 2
    onnx.checker.check_model(str(path), full_check=True)


def test_rewritten_graph_computes_what_the_original_does(la_export: Path, tmp_path: Path) -> None:
    """The rewritten graph, run on ONNX Runtime through the plugin flavor's reference op, scores
    like the linear-attention graph run by ONNX Runtime's own LinearAttention."""
    pytest.importorskip("onnxruntime_extensions")
    import numpy as np

    from dijiang_deploy.build.builder import write_plugin_graph
    from dijiang_deploy.runtime import Generator

    folder = tmp_path / "rewritten"
    folder.mkdir()
    write_plugin_graph(la_export / "model.onnx", folder / "model.onnx")
    meta = json.loads((la_export / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(meta | {"flavor": "plugin", "opset": 21, "graph_sha256": None}))
    ids = np.random.default_rng(3).integers(0, meta["vocab_size"], size=(2, 37))
    want = Generator.from_pretrained(la_export, load_tokenizer=False).score(ids)
    got = Generator.from_pretrained(folder, load_tokenizer=False).score(ids)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5


def test_rewrite_refusals() -> None:
    from onnx import TensorProto, helper

    from dijiang_deploy.build.builder import rewrite_to_plugin_nodes

    def model(**attrs):
        names = ["q", "k", "v", "s"]
        node = helper.make_node("LinearAttention", names, ["o", "s2"], q_num_heads=1, kv_num_heads=1, scale=1.0,
                                update_rule="linear", **attrs)
        vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
        out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "s2")]
        return helper.make_model(helper.make_graph([node], "g", vi, out), opset_imports=[helper.make_opsetid("", 27)])

    with pytest.raises(DiJiangError, match=r"attribute\(s\) is_causal that the DiJiangLinearAttention plugin does not"):
        rewrite_to_plugin_nodes(model(is_causal=1))
    empty = model()
    del empty.graph.node[:]
    with pytest.raises(DiJiangError, match="no LinearAttention node"):
        rewrite_to_plugin_nodes(empty)
    ok = model()
    ok.opset_import.append(helper.make_opsetid("com.microsoft", 1))  # other domains' imports stay
    assert rewrite_to_plugin_nodes(ok) == 1 and ok.graph.node[0].op_type == "DiJiangLinearAttention"
    assert {o.domain: o.version for o in ok.opset_import} == {"": 21, "com.dijiang_deploy": 1, "com.microsoft": 1}


# -- refusals ------------------------------------------------------------------------------


def _one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("dijiang-deploy build: error: ") and needle in lines[0], lines[0]


def test_refuses_without_tensorrt(plugin_export: Path, capsys, no_tensorrt, tmp_path: Path) -> None:
    lib = tmp_path / "libdijiang_trt_plugins.so"
    lib.write_bytes(b"\x7fELF not really")
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "eng"), "--plugin-lib", str(lib))
    _one_line_error(code, err, "TensorRT's Python package is not importable")
    assert not (tmp_path / "eng").exists()
    with pytest.raises(BackendUnavailableError, match="--print-trtexec"):
        build_engine(plugin_export, tmp_path / "eng", resolve_options(Manifest.load(plugin_export), plugin_lib=lib))


def test_refuses_tensorrt_stub(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendUnavailableError, match="no Builder/Runtime"):
        environment.import_tensorrt()


def test_refuses_missing_plugin_library(plugin_export: Path, capsys, tmp_path: Path, no_default_plugin) -> None:
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "eng"), "--plugin-lib", str(tmp_path / "nope.so"))
    _one_line_error(code, err, f"plugin library {tmp_path / 'nope.so'}: no such file")
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "eng"))
    _one_line_error(code, err, "no libdijiang_trt_plugins.so: pass --plugin-lib PATH")


def test_refuses_the_inline_graph(capsys, tmp_path: Path) -> None:
    inline = tmp_path / "inline"
    export_model(random_model("llama"), inline, ExportOptions(attention_op="inline"))
    code, _, err = _cli(capsys, str(inline), "-o", str(tmp_path / "e"), "--print-trtexec")
    _one_line_error(code, err, "--attention-op plugin")


def test_cli_errors_are_one_line(plugin_export: Path, capsys, tmp_path: Path) -> None:
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "e"), "--target", "tpu", "--print-trtexec")
    _one_line_error(code, err, "unknown target 'tpu'")
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "e"), "--precision", "fp16", "--print-trtexec")
    _one_line_error(code, err, "contradicts the ONNX export's dtype fp32")
    code, _, err = _cli(capsys, str(tmp_path / "absent"), "-o", str(tmp_path / "e"), "--print-trtexec")
    _one_line_error(code, err, "no such file or directory")
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(tmp_path / "e"), "--max-batch", "0", "--print-trtexec")
    _one_line_error(code, err, "max batch must be in 1..1024")


# -- engine folders ---------------------------------------------------------------------------


def test_package_trtexec_engine(plugin_export: Path, capsys, tmp_path: Path, no_tensorrt) -> None:
    engine = tmp_path / "built.engine"
    engine.write_bytes(b"serialized engine bytes")
    out = tmp_path / "eng"
    code, stdout, err = _cli(capsys, str(plugin_export), "-o", str(out), "--engine", str(engine), "--plugin-lib", PLUGIN,
                             "--max-chunk", "32", "--max-batch", "2")
    assert code == 0, err
    assert "engine from trtexec" in stdout
    assert (out / ENGINE_FILE).read_bytes() == b"serialized engine bytes"
    em = EngineManifest.load(out)
    assert (em.built_with, em.tensorrt_version, em.gpu_sm, em.max_batch, em.max_chunk) == ("trtexec", None, None, 2, 32)
    assert em.profile_for(1).name == "decode" and em.profile_for(32).name == "prefill" and em.profile_for(33) is None
    assert [t["name"] for t in em.inputs][:3] == ["input_ids", "attention_mask", "past_position"]
    # The copied ONNX manifest carries the engine's chunk so Generator feeds it.
    assert Manifest.load(out).max_chunk == 32
    # The library is not on this machine: nothing bundled, nothing recorded to load from elsewhere.
    assert em.plugin_library is None and not list(out.glob("*.so"))
    # Atomic and no silent overwrite.
    code, _, err = _cli(capsys, str(plugin_export), "-o", str(out), "--engine", str(engine), "--plugin-lib", PLUGIN)
    _one_line_error(code, err, "already exists")
    assert not list(tmp_path.glob(".eng.partial-*"))
    with pytest.raises(DiJiangError, match="no such engine file"):
        package_engine(plugin_export, tmp_path / "none.engine", tmp_path / "x", resolve_options(Manifest.load(plugin_export)))


def test_engine_manifest_refuses_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(DiJiangError, match="no engine.json"):
        EngineManifest.load(tmp_path)
    (tmp_path / ENGINE_MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(DiJiangError, match="unknown engine manifest format 'other'"):
        EngineManifest.load(tmp_path)


def test_trt_backend_refuses_without_tensorrt(plugin_export: Path, tmp_path: Path, no_tensorrt) -> None:
    from dijiang_deploy.runtime.trt_backend import TrtBackend

    engine = tmp_path / "built.engine"
    engine.write_bytes(b"x")
    opts = resolve_options(Manifest.load(plugin_export), plugin_lib=Path(PLUGIN))
    package_engine(plugin_export, engine, tmp_path / "eng", opts)
    with pytest.raises(BackendUnavailableError, match="TensorRT's Python package is not importable"):
        TrtBackend(tmp_path / "eng")


# -- the builder's calls, against a fake ``tensorrt`` module ------------------------------------
#
# These check what build_engine asks of TensorRT (flags, profiles, timing cache,
# plugin serialization, the folder it writes), not TensorRT itself: the fake
# follows the TensorRT 10 Python API as documented, and the real thing has not
# run in this project (see docs/tensorrt.md).


class _FakeTensor:
    def __init__(self, name: str, dtype: str) -> None:
        self.name, self.dtype = name, dtype


class _FakeNetwork:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.inputs: list[_FakeTensor] = []
        self.outputs: list[_FakeTensor] = []
        self.layer_types: list[str] = []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))
    num_layers = property(lambda self: len(self.layer_types))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def get_layer(self, i):
        return types.SimpleNamespace(type=self.layer_types[i])


def _fake_tensorrt(version: str = "10.15.1.29", parse_ok: bool = True):
    import onnx

    calls: dict = {"flags": set(), "cleared": set(), "profiles": [], "parser_flags": [], "libraries": []}
    np_to_trt = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self) -> None:
            pass

    class Parser:
        def __init__(self, network, logger) -> None:
            self.network, self.errors = network, []

        def set_flag(self, flag) -> None:
            calls["parser_flags"].append(flag)

        def parse_from_file(self, path: str) -> bool:
            if not parse_ok:
                self.errors = ["In node 3 (DiJiangLinearAttention): UNSUPPORTED_NODE: no plugin\nsecond line"]
                return False
            model = onnx.load(path, load_external_data=False)
            graph = model.graph
            calls["parsed"] = Path(path)
            calls["parsed_ops"] = [(n.domain, n.op_type) for n in graph.node]
            calls["parsed_opsets"] = {o.domain: o.version for o in model.opset_import}
            # External weights the way TensorRT's parser reads them: plain files (links
            # followed) relative to the graph, no "../".
            calls["external"] = {}
            for init in graph.initializer:
                if init.data_location == onnx.TensorProto.EXTERNAL:
                    info = {e.key: e.value for e in init.external_data}
                    assert "../" not in info["location"]
                    with open(Path(path).parent / info["location"], "rb") as fh:
                        fh.seek(int(info.get("offset", 0)))
                        calls["external"][init.name] = fh.read(int(info["length"]))
            dtype = lambda v: np_to_trt[onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name]  # noqa: E731
            self.network.inputs = [_FakeTensor(v.name, dtype(v)) for v in graph.input]
            self.network.outputs = [_FakeTensor(v.name, dtype(v)) for v in graph.output]
            self.network.layer_types = ["PLUGIN_V3" if n.op_type == "DiJiangLinearAttention" else "OTHER"
                                        for n in graph.node]
            return True

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class Profile:
        def __init__(self) -> None:
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi) -> None:
            self.shapes[name] = (list(lo), list(opt), list(hi))

    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"+tuned"

    class Config:
        plugins_to_serialize: list = []

        def set_memory_pool_limit(self, pool, size) -> None:
            calls["workspace"] = (pool, size)

        def set_flag(self, flag) -> None:
            calls["flags"].add(flag)

        def clear_flag(self, flag) -> None:
            calls["cleared"].add(flag)

        def add_optimization_profile(self, profile) -> int:
            calls["profiles"].append(profile.shapes)
            return len(calls["profiles"]) - 1

        def create_timing_cache(self, data: bytes):
            calls["cache_in"] = data
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger) -> None:
            pass

        def create_network(self, flags: int):
            calls["network_flags"] = flags
            return _FakeNetwork(flags)

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            calls["plugins_to_serialize"] = list(config.plugins_to_serialize)
            return b"fake plan"

    class Registry:
        def load_library(self, path):
            calls["libraries"].append(path)
            return object()

        def get_creator(self, name, version, namespace):
            return object() if (name, version, namespace) == ("DiJiangLinearAttention", "1", "dijiang") else None

    registry = Registry()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.ILogger, trt.Builder, trt.OnnxParser, trt.Runtime = ILogger, Builder, Parser, object
    trt.get_plugin_registry = lambda: registry
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.OnnxParserFlag = types.SimpleNamespace(NATIVE_INSTANCENORM=0, ENABLE_PLUGIN_OVERRIDE=3)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="TF32", VERSION_COMPATIBLE="VC")
    trt.LayerType = types.SimpleNamespace(PLUGIN_V3="PLUGIN_V3", PLUGIN_V2="PLUGIN_V2")
    trt.FLOAT, trt.HALF, trt.INT64, trt.INT32 = "FLOAT", "HALF", "INT64", "INT32"
    return trt, calls



@pytest.fixture
def fake_trt(monkeypatch):
    from dijiang_deploy.build import builder

    def install(**kwargs):
        trt, calls = _fake_tensorrt(**kwargs)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setattr(builder, "gpu_info", lambda device=0: ("Fake GPU", "9.0"))
        monkeypatch.setattr(environment, "_LOADED", {})
        return trt, calls

    return install


def test_build_engine_calls_and_folder(plugin_export: Path, tmp_path: Path, fake_trt) -> None:
    _, calls = fake_trt()
    lib = tmp_path / "libdijiang_trt_plugins.so"
    lib.write_bytes(b"lib")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    man = Manifest.load(plugin_export)
    opts = resolve_options(man, load_target("orin-nano-8gb"), plugin_lib=lib, serialize_plugins=True,
                           timing_cache=cache, max_chunk=32)
    out = tmp_path / "eng"
    result = build_engine(plugin_export, out, opts)
    assert calls["network_flags"] == 1 << 5  # STRONGLY_TYPED only: precision comes from the ONNX
    assert calls["libraries"] == [str(lib.resolve())]
    assert calls["parser_flags"] == []  # the override flag is for the function flavor
    assert calls["workspace"] == ("workspace", 512 << 20)
    assert calls["cleared"] == {"TF32"} and calls["flags"] == {"VC"}
    assert calls["plugins_to_serialize"] == [str(lib)]
    decode, prefill = calls["profiles"]
    assert decode["input_ids"] == ([1, 1], [1, 1], [2, 1])
    assert prefill["attention_mask"] == ([1, 2], [1, 32], [2, 32])
    assert prefill["past_state.1"] == ([1, 4, 16, 16], [1, 4, 16, 16], [2, 4, 16, 16])
    assert list(decode) == ["input_ids", "attention_mask", "past_position", "past_state.0", "past_state.1"]
    assert calls["cache_in"] == b"old" and cache.read_bytes() == b"old+tuned"
    assert (out / ENGINE_FILE).read_bytes() == b"fake plan"
    em = EngineManifest.load(out)
    assert em == result
    assert (em.tensorrt_version, em.gpu_name, em.gpu_sm, em.plugin_layers) == ("10.15.1.29", "Fake GPU", "9.0", 2)
    assert (em.plugins_serialized, em.version_compatible, em.target, em.max_chunk) == (True, True, "orin-nano-8gb", 32)
    assert Manifest.load(out).max_chunk == 32


def test_build_engine_parse_failure_is_one_line(plugin_export: Path, tmp_path: Path, fake_trt) -> None:
    fake_trt(parse_ok=False)
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"lib")
    with pytest.raises(DiJiangError) as info:
        build_engine(plugin_export, tmp_path / "eng", resolve_options(Manifest.load(plugin_export), plugin_lib=lib))
    message = str(info.value)
    assert "cannot parse the graph: In node 3 (DiJiangLinearAttention): UNSUPPORTED_NODE" in message
    assert "\n" not in message and not (tmp_path / "eng").exists()


def test_build_engine_parses_linear_attention_as_the_plugin_graph(la_export: Path, tmp_path: Path, fake_trt) -> None:
    """The linear-attention flavor is parsed from a rewritten copy whose attention nodes are the
    plugin node (the library registers nothing under the standard op's name); the export's own
    graph is left as it is and the copy is gone after the build."""
    _, calls = fake_trt()
    lib = tmp_path / "libdijiang_trt_plugins.so"
    lib.write_bytes(b"lib")
    original = (la_export / "model.onnx").read_bytes()
    result = build_engine(la_export, tmp_path / "eng", resolve_options(Manifest.load(la_export), plugin_lib=lib))
    parsed = calls["parsed"]
    assert parsed != la_export / "model.onnx" and parsed.name == "model.onnx"
    assert parsed.parent.name.startswith("dijiang-trt-") and not parsed.parent.exists()
    assert calls["parsed_ops"].count(("com.dijiang_deploy", "DiJiangLinearAttention")) == 2
    assert not any(op == "LinearAttention" for _, op in calls["parsed_ops"])
    assert calls["parsed_opsets"] == {"": 21, "com.dijiang_deploy": 1}
    assert result.plugin_layers == 2 and result.flavor == "linear-attention"
    assert (la_export / "model.onnx").read_bytes() == original


def test_build_engine_rewritten_graph_reads_external_weights(la_external: Path, la_export: Path, tmp_path: Path,
                                                             fake_trt) -> None:
    """A graph with its weights in model.onnx.data: the rewritten copy reaches every external
    tensor's bytes (through a link, not a copy) as TensorRT's parser would."""
    import onnx
    from onnx import numpy_helper

    _, calls = fake_trt()
    lib = tmp_path / "libdijiang_trt_plugins.so"
    lib.write_bytes(b"lib")
    build_engine(la_external, tmp_path / "eng", resolve_options(Manifest.load(la_external), plugin_lib=lib))
    weights = {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(str(la_export / "model.onnx")).graph.initializer}
    assert calls["external"] and calls["external"] == {name: weights[name] for name in calls["external"]}
    assert len(calls["external"]) == len(weights)


@pytest.mark.parametrize("version, flavor, expected", [
    ("10.15.0", "function", [3]), ("10.14.1", "function", []), ("10.15.0", "plugin", []), ("10.3.0", "plugin", []),
])
def test_plugin_override_flag_only_for_function_on_10_15(plugin_export: Path, fake_trt, version, flavor, expected) -> None:
    from dijiang_deploy.build.builder import _parse

    trt, calls = fake_trt(version=version)
    _parse(trt, _FakeNetwork(0), None, plugin_export / "model.onnx", flavor)
    assert calls["parser_flags"] == expected


# -- TrtBackend's bookkeeping, against a recording fake engine --------------------------------------
#
# No TensorRT and no GPU here, so what these tests prove is the backend's own
# bookkeeping: every engine tensor bound once per execution context, with the
# shapes of its batch and chunk; decode on profile 0 and prefill on profile 1;
# the ping-pong state sides alternating; positions advancing; and CUDA-graph
# capture then replay of the decode step. The fake engine computes a trivial
# step (state += number of real tokens, logits one-hot at last token + 1), so
# a wrong buffer, side or replay shows up as a wrong number. torch CPU tensors
# stand in for CUDA tensors. Numerics of a real engine are not tested here
# (tests/gpu/test_trt_gpu.py does that on a GPU with TensorRT).


class _Recorder:
    """What the fake TensorRT and torch.cuda saw: contexts, executions, graph captures and replays."""

    def __init__(self) -> None:
        self.contexts: list = []
        self.executions: list[tuple[int, tuple, int]] = []
        self.capturing: list | None = None
        self.captures = 0
        self.replays = 0


def _fake_runtime(engine_manifest: EngineManifest, rec: _Recorder):
    import ctypes

    import numpy as np

    names_in = [t["name"] for t in engine_manifest.inputs]
    names_out = [t["name"] for t in engine_manifest.outputs]
    dtypes = {t["name"]: t["dtype"] for t in engine_manifest.inputs + engine_manifest.outputs}
    logits_spec = next(t for t in engine_manifest.outputs if t["name"] == "logits")
    vocab, last_only = logits_spec["shape"][-1], logits_spec["shape"][1] == 1

    class Context:
        def __init__(self) -> None:
            self.shapes, self.addresses, self.profile = {}, {}, None
            rec.contexts.append(self)

        def set_device_memory(self, ptr, size) -> None:
            self.scratch = (ptr, size)

        def set_optimization_profile_async(self, index, stream) -> bool:
            self.profile = index
            return True

        def set_input_shape(self, name, shape) -> bool:
            self.shapes[name] = tuple(shape)
            return True

        def set_tensor_address(self, name, ptr) -> bool:
            self.addresses[name] = ptr
            return True

        def _array(self, name, shape):
            dtype = np.dtype(dtypes[name])
            buf = (ctypes.c_char * (int(np.prod(shape)) * dtype.itemsize)).from_address(self.addresses[name])
            return np.frombuffer(buf, dtype=dtype).reshape(shape)

        def _run(self) -> None:
            ids = self._array("input_ids", self.shapes["input_ids"])
            mask = self._array("attention_mask", self.shapes["attention_mask"])
            b, length = ids.shape
            real = mask.sum(axis=1).astype(np.float32)
            for name in names_in:
                if name.startswith("past_state."):
                    past = self._array(name, self.shapes[name])
                    out = self._array(name.replace("past_", "present_"), past.shape)
                    out[...] = past + real[:, None, None, None]
            logits_shape = (b, 1 if last_only else length, vocab)
            logits = self._array("logits", logits_shape)
            logits[...] = 0
            logits[np.arange(b), -1, (ids[:, -1] + 1) % vocab] = 1.0
            rec.executions.append((self.profile, tuple(ids.shape), self.addresses["past_state.0"]))

        def execute_async_v3(self, stream) -> bool:
            if rec.capturing is not None:
                rec.capturing.append(self._run)  # captured, not run: CUDA graph semantics
            else:
                self._run()
            return True

    class Engine:
        num_io_tensors = len(names_in) + len(names_out)
        num_optimization_profiles = len(engine_manifest.profiles)
        device_memory_size_v2 = 1024

        def get_tensor_name(self, i):
            return (names_in + names_out)[i]

        def get_tensor_mode(self, name):
            return "in" if name in names_in else "out"

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_profile_shape(self, name, k):
            r = engine_manifest.profiles[k].shapes[name]
            return [r.min, r.opt, r.max]

        def create_execution_context(self, strategy):
            assert strategy == "user-managed"
            return Context()

    class Runtime:
        def __init__(self, logger) -> None:
            pass

        def deserialize_cuda_engine(self, data):
            return Engine() if data == b"fake plan" else None

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.15.1.29"
    trt.Builder, trt.Runtime = object, Runtime
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.float32, trt.float16, trt.int64 = "float32", "float16", "int64"
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="user-managed")
    trt.get_plugin_registry = lambda: types.SimpleNamespace(
        load_library=lambda path: object(), get_creator=lambda *a: object()
    )
    return trt


class _FakeTorch:
    """torch with a ``cuda`` namespace that runs on the CPU and records graph capture and replay."""

    def __init__(self, rec: _Recorder) -> None:
        import contextlib

        import torch

        self._torch = torch

        class Stream:
            cuda_stream = 0

            def __init__(self, device=None) -> None:
                pass

            def synchronize(self) -> None:
                pass

        class CUDAGraph:
            def __init__(self) -> None:
                self.work: list = []

            def replay(self) -> None:
                rec.replays += 1
                for fn in self.work:
                    fn()

        @contextlib.contextmanager
        def graph(g, stream=None, capture_error_mode=None):
            rec.capturing = g.work
            try:
                yield
            finally:
                rec.capturing = None
                rec.captures += 1

        self.cuda = types.SimpleNamespace(
            is_available=lambda: True, Stream=Stream, stream=lambda s: contextlib.nullcontext(),
            device=lambda d: contextlib.nullcontext(), CUDAGraph=CUDAGraph, graph=graph,
        )

    def device(self, kind, index=None):
        return self._torch.device("cpu")

    def __getattr__(self, name):
        return getattr(self._torch, name)


@pytest.fixture
def fake_backend(plugin_export: Path, tmp_path: Path, monkeypatch):
    import functools

    from dijiang_deploy.runtime import trt_backend

    lib = tmp_path / "libdijiang_trt_plugins.so"
    lib.write_bytes(b"lib")
    engine = tmp_path / "built.engine"
    engine.write_bytes(b"fake plan")
    opts = resolve_options(Manifest.load(plugin_export), max_batch=4, max_chunk=16, plugin_lib=lib)
    em = package_engine(plugin_export, engine, tmp_path / "eng", opts)
    rec = _Recorder()
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: _fake_runtime(em, rec))
    monkeypatch.setattr(trt_backend, "_import_torch_cuda", lambda: _FakeTorch(rec))
    monkeypatch.setattr(trt_backend, "gpu_info", lambda device=0: ("Fake GPU", "9.0"))
    monkeypatch.setattr(trt_backend.TrtBackend, "_host_buffer", lambda self, shape, dtype: self._torch.zeros(shape, dtype=dtype))
    # Device work after a step is part of the captured graph too: record it while capturing.
    real_after = trt_backend.TrtBackend._after_step

    def after_step(self, slot):
        if rec.capturing is not None:
            rec.capturing.append(functools.partial(real_after, self, slot))
        else:
            real_after(self, slot)

    monkeypatch.setattr(trt_backend.TrtBackend, "_after_step", after_step)
    monkeypatch.setattr(environment, "_LOADED", {})
    return tmp_path / "eng", rec


def test_trt_binding_sets_shapes_and_profiles(fake_backend) -> None:
    """One context per (chunk length, ping-pong side), each binding every engine tensor
    once with the batch's shapes; decode on profile 0, prefill chunks on profile 1."""
    from dijiang_deploy.runtime.trt_backend import TrtBackend
    import numpy as np

    folder, rec = fake_backend
    backend = TrtBackend(folder, cuda_graphs=False)
    backend.allocate(3)
    backend.reset()
    m = backend.manifest
    mask16 = np.ones((3, 16), np.int64)
    backend.step(np.ones((3, 16), np.int64), mask16)
    for _ in range(3):
        backend.step(np.ones((3, 1), np.int64), np.ones((3, 1), np.int64))
    assert len(rec.contexts) == 3, "prefill side 0, decode sides 1 and 0"
    names = {t.name for t in m.inputs} | {t.name for t in m.outputs}
    for ctx in rec.contexts:
        assert set(ctx.addresses) == names
        length = ctx.shapes["input_ids"][1]
        assert ctx.shapes["input_ids"] == ctx.shapes["attention_mask"] == (3, length)
        assert ctx.shapes["past_position"] == (3,)
        assert all(ctx.shapes[n] == (3, *m.state_shape) for n in m.state_inputs)
        assert ctx.profile == (0 if length == 1 else 1)
        # A side reads one state set and writes the other: no output aliases an input.
        assert not set(ctx.addresses[n] for n in m.state_inputs) & set(ctx.addresses[n] for n in m.state_outputs)
    assert backend.position.tolist() == [19, 19, 19]


def test_trt_ping_pong_state_and_positions_follow_the_steps(fake_backend) -> None:
    """The fake step adds each row's real-token count to its state: after a padded prefill
    and decode steps the state equals the tokens seen, so every step read the previous
    step's output side."""
    import numpy as np

    from dijiang_deploy.runtime import Model

    folder, rec = fake_backend
    model = Model.open(folder, backend="trt", load_tokenizer=False)
    s = model.session()
    s.append(list(range(1, 22)))  # 21 tokens: a 16-token chunk and a padded one
    assert all(np.all(layer == 21.0) for layer in s.layers())
    out = s.generate(6, feed_last=False)
    assert out.token_ids == [22, 23, 24, 25, 26, 27], "logits feed back: each token is the last one + 1"
    assert all(np.all(layer == 26.0) for layer in s.layers()), "5 decode steps after the prefill"
    decode_reads = [addr for _, shape, addr in rec.executions if shape[1] == 1]
    assert len(set(decode_reads)) == 2 and decode_reads[0::2] != decode_reads[1::2]


def test_trt_decode_is_captured_once_per_side_then_replayed(fake_backend) -> None:
    """With CUDA graphs the first decode step of each side runs eagerly and is captured;
    later decode steps replay the graph, and the results stay those of eager steps."""
    import numpy as np

    from dijiang_deploy.runtime.trt_backend import TrtBackend

    folder, rec = fake_backend
    backend = TrtBackend(folder, cuda_graphs=True)
    backend.allocate(2)
    backend.reset()
    mask = np.ones((2, 1), np.int64)
    tokens = backend.step_greedy(mask, np.array([[5], [9]], np.int64))
    for _ in range(7):
        tokens = backend.step_greedy(mask)
    assert tokens.tolist() == [13, 17], "eight greedy steps from 5 and 9"
    assert rec.captures == 2 and rec.replays == 6
    state = backend.state
    assert np.all(state[0] == 8.0)
    assert backend.position.tolist() == [8, 8]


def test_engine_folders_carry_their_plugin_and_never_point_elsewhere(fake_backend, tmp_path, monkeypatch) -> None:
    """The build copies the plugin library into the engine folder and records its file name;
    the backend loads that copy, or an explicit one, never a path engine.json names elsewhere."""
    from dijiang_deploy.runtime.trt_backend import TrtBackend

    folder, _ = fake_backend
    loaded: list[str] = []
    monkeypatch.setattr("dijiang_deploy.runtime.trt_backend.load_plugin_library", lambda trt, path: loaded.append(str(path)))
    monkeypatch.delenv(environment.PLUGIN_ENV, raising=False)
    monkeypatch.setattr("dijiang_deploy.runtime.trt_backend.find_plugin_library",
                        lambda explicit, required: environment.find_plugin_library(explicit, required=False))
    meta = json.loads((folder / ENGINE_MANIFEST).read_text())
    assert meta["plugin_library"] == "libdijiang_trt_plugins.so" and (folder / "libdijiang_trt_plugins.so").is_file()
    TrtBackend(folder, cuda_graphs=False)
    assert loaded == [str((folder / "libdijiang_trt_plugins.so").resolve())]
    elsewhere = tmp_path / "elsewhere" / "libevil.so"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(b"not ours")
    (folder / ENGINE_MANIFEST).write_text(json.dumps(meta | {"plugin_library": str(elsewhere)}))
    loaded.clear()
    monkeypatch.setattr(environment, "DEFAULT_PLUGIN_LIBRARY", tmp_path / "missing.so")
    TrtBackend(folder, cuda_graphs=False)
    assert str(elsewhere) not in loaded and loaded == []
    explicit = tmp_path / "mine.so"
    explicit.write_bytes(b"lib")
    TrtBackend(folder, cuda_graphs=False, plugin_lib=explicit)
    assert loaded == [str(explicit.resolve())]


def test_engine_host_code_runs_only_when_allowed(fake_backend) -> None:
    from dijiang_deploy.runtime.trt_backend import TrtBackend

    folder, _ = fake_backend
    meta = json.loads((folder / ENGINE_MANIFEST).read_text())
    (folder / ENGINE_MANIFEST).write_text(json.dumps(meta | {"plugins_serialized": True, "plugin_library": None}))
    with pytest.raises(DiJiangError, match=r"embeds plugin code .* allow_host_code=True"):
        TrtBackend(folder, cuda_graphs=False)
    backend = TrtBackend(folder, cuda_graphs=False, allow_host_code=True)
    assert backend.runtime.engine_host_code_allowed is True


def test_trt_backend_refusals(fake_backend) -> None:
    import json

    from dijiang_deploy.runtime.trt_backend import TrtBackend

    folder, _ = fake_backend
    backend = TrtBackend(folder, cuda_graphs=False)
    with pytest.raises(DiJiangError, match=r"batch 5 is outside this engine's 1..4"):
        backend.allocate(5)
    meta = json.loads((folder / ENGINE_MANIFEST).read_text())
    (folder / ENGINE_MANIFEST).write_text(json.dumps(meta | {"gpu_sm": "8.7", "gpu_name": "Orin"}))
    with pytest.raises(DiJiangError, match=r"engine built for Orin \(SM 8.7\) cannot run on Fake GPU \(SM 9.0\)"):
        TrtBackend(folder)
    (folder / ENGINE_MANIFEST).write_text(json.dumps(meta | {"tensorrt_version": "10.3.0"}))
    with pytest.raises(DiJiangError, match="engine built with TensorRT 10.3.0, this is 10.15.1.29"):
        TrtBackend(folder)
    (folder / ENGINE_MANIFEST).write_text(json.dumps(meta))
    (folder / ENGINE_FILE).write_bytes(b"corrupt")
    with pytest.raises(DiJiangError, match="cannot deserialize it"):
        TrtBackend(folder)
