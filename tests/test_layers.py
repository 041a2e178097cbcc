"""The package's layers depend downward only.

contract -> modeling -> quantization -> export -> build -> runtime -> serving,
with the tools (fine-tuning, verify, bench) beside serving and the command
line on top. Every ``import`` of a ``dijiang_deploy`` module, at module level
or inside a function, is checked: a lazy import is still a dependency, and it
is how cycles creep in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dijiang_deploy"

#: Top-level units of the package, lowest first. A unit may import units of
#: its own layer or below; applications in the same layer may not import each
#: other (they share what lies below instead).
LAYERS: list[set[str]] = [
    {"_version", "contract", "cli_types"},
    {"config", "data", "kernels", "quality"},
    {"modeling", "checkpoint", "convert", "shipped", "testing"},
    {"quantization"},
    {"export"},
    {"build"},
    {"runtime"},
    {"serving", "finetune", "verify", "bench"},
    {"cli", "__init__"},
]
APPLICATIONS = LAYERS[-2]
LEVEL = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def _unit(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path, root: Path) -> tuple[str, str]:
    """``(module, package)`` dotted names of a source file."""
    rel = path.relative_to(root.parent).with_suffix("")
    mod = ".".join(rel.parts)
    if mod.endswith(".__init__"):
        mod = mod.removesuffix(".__init__")
        return mod, mod
    return mod, mod.rsplit(".", 1)[0]


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, dotted target)`` of every import of a package module in ``path``."""
    mod, pkg = _module_name(path, root)
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "dijiang_deploy"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "dijiang_deploy":
                continue
            if node.module is None:  # "from .. import x": x is the unit
                out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def _violations(root: Path = PACKAGE) -> list[str]:
    bad: list[str] = []
    for path in sorted(root.rglob("*.py")):
        mod, _ = _module_name(path, root)
        src = _unit(mod)
        for line, target in _imports(path, root):
            dst = _unit(target)
            if dst == src:
                continue
            where = f"{path.relative_to(root.parent)}:{line} imports {target}"
            if src not in LEVEL or dst not in LEVEL:
                bad.append(f"{where}: {src if src not in LEVEL else dst!r} has no layer in tests/test_layers.py")
            elif LEVEL[dst] > LEVEL[src]:
                bad.append(f"{where}: {src} (layer {LEVEL[src]}) may not depend on {dst} (layer {LEVEL[dst]})")
            elif src in APPLICATIONS and dst in APPLICATIONS:
                bad.append(f"{where}: the applications {src} and {dst} may not depend on each other")
    return bad


def test_every_unit_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.is_file() and p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert units - set(LEVEL) == set(), "new top-level modules need a place in LAYERS"


def test_imports_point_downward_only():
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk above must be able to fail: plant a lazy runtime -> serving import and see it reported."""
    fake = tmp_path / "dijiang_deploy"
    (fake / "runtime").mkdir(parents=True)
    (fake / "export").mkdir()
    (fake / "contract").mkdir()
    for d in (fake, fake / "runtime", fake / "export", fake / "contract"):
        (d / "__init__.py").write_text("")
    (fake / "runtime" / "lane.py").write_text("def f():\n    from ..serving.app import create_app\n")
    (fake / "export" / "graph.py").write_text("from ..runtime import lane\nfrom dijiang_deploy.contract import names\n")
    bad = _violations(fake)
    assert len(bad) == 2, bad
    assert "runtime/lane.py:2 imports dijiang_deploy.serving.app: runtime (layer 6) may not depend on serving" in bad[1]
    assert "export/graph.py:1 imports dijiang_deploy.runtime: export (layer 4) may not depend on runtime" in bad[0]


@pytest.mark.parametrize("module", ["runtime", "serving", "contract"])
def test_runtime_layers_do_not_reach_for_the_modeling_stack(module):
    """Serving a model needs the core install only: no module of these units
    imports modeling, quantization, export, finetune or convert, even lazily."""
    heavy = {"modeling", "quantization", "export", "finetune", "convert", "checkpoint", "testing"}
    hits = [
        f"{p.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for p in sorted((PACKAGE / module).rglob("*.py"))
        for line, target in _imports(p)
        if _unit(target) in heavy
    ]
    assert not hits, "\n".join(hits)


#: Modules that may import package modules inside functions, and why. Anywhere
#: else a deferred import only hides a dependency (or a cycle) from the reader.
DEFERRED_IMPORTS_ALLOWED: dict[str, str] = {
    "cli.py": "each subcommand loads only its own stack: `run` must not import torch",
    "build/cli.py": "the same, for `build`",
    "finetune/cli.py": "the same, for `finetune`",
    "serving/cli.py": "the same, for `serve` (Ray only with --ray)",
    "bench/cli.py": "the same, for `bench` (streams or contexts)",
    "bench/artifacts.py": "builds only the systems asked for; most need torch or llama.cpp",
    "bench/systems.py": "a worker process imports only the system it measures",
    "bench/streams.py": "the same, for stream workers",
    "bench/worker.py": "the same, for the decode worker",
    "bench/kv_export.py": "the softmax baseline's base model (random or GGUF) loads only when asked for",
    "runtime/model.py": "the TensorRT backend (optional) loads only when chosen",
    "runtime/trt_lane.py": "the same",
    "runtime/ort_backend.py": "only the plugin flavor rewrites its graph: onnx and onnxruntime-extensions (test extra), which the runtime otherwise never imports",
    "serving/ray_app.py": "runs on Ray replicas, which import the server core in their own process",
    "export/quantized.py": "export/graph.py imports this module",
    "finetune/perplexity.py": "scores an export folder only when given one",
}


def _deferred_imports(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dijiang_deploy")):
                    out.append(f"{rel}:{node.lineno} in {fn.name}()")
                elif isinstance(node, ast.Import) and any(a.name.startswith("dijiang_deploy") for a in node.names):
                    out.append(f"{rel}:{node.lineno} in {fn.name}()")
    return sorted(set(out))


def test_deferred_imports_only_where_a_reason_is_stated():
    stray = [d for d in _deferred_imports() if d.split(":")[0] not in DEFERRED_IMPORTS_ALLOWED]
    assert not stray, "import these at module level, or state why not in DEFERRED_IMPORTS_ALLOWED:\n" + "\n".join(stray)
    unused = set(DEFERRED_IMPORTS_ALLOWED) - {d.split(":")[0] for d in _deferred_imports()}
    assert not unused, f"no deferred imports left in {sorted(unused)}: drop them from DEFERRED_IMPORTS_ALLOWED"


def test_the_deferred_import_walk_finds_one(tmp_path):
    (tmp_path / "runtime").mkdir()
    (tmp_path / "runtime" / "x.py").write_text("import os\n\ndef f():\n    import json\n    from ..contract import names\n")
    assert _deferred_imports(tmp_path) == ["runtime/x.py:5 in f()"]
