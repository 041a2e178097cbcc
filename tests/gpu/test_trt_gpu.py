"""TensorRT engines of a tiny model against ONNX Runtime (needs a GPU).

Skipped, with the missing piece named, without a CUDA device, without a real
``tensorrt`` package, or without ``libdijiang_trt_plugins.so`` (from
$DIJIANG_TRT_PLUGIN_LIB, $DIJIANG_PLUGIN_BUILD/main, or plugins/build/main).
The ONNX Runtime CUDA-provider test needs only onnxruntime-gpu.

For each attention-op flavor (linear-attention, function, plugin) the tiny
llama model is exported in fp32, built into an engine, and compared with
ONNX Runtime (CPU) on the linear-attention export of the same weights:
logits of a scored batch (max abs <= 1e-3; TF32 is off), the state after a
prefill (<= 1e-4), greedy tokens through Generator.step and through the
GPU greedy path (identical).

Status: not run against TensorRT yet. On the one GPU machine lent so far (an
H100) every test here skipped: it had neither tensorrt nor onnxruntime-gpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

FLAVORS = ["linear-attention", "function", "plugin"]
MAX_CHUNK = 16


def _plugin_library() -> Path | None:
    from dijiang_deploy.build.environment import DEFAULT_PLUGIN_LIBRARY, PLUGIN_LIBRARY_NAME

    candidates = []
    if os.environ.get("DIJIANG_TRT_PLUGIN_LIB"):
        candidates.append(Path(os.environ["DIJIANG_TRT_PLUGIN_LIB"]))
    if os.environ.get("DIJIANG_PLUGIN_BUILD"):
        candidates.append(Path(os.environ["DIJIANG_PLUGIN_BUILD"]) / "main" / PLUGIN_LIBRARY_NAME)
    candidates.append(DEFAULT_PLUGIN_LIBRARY)
    return next((p for p in candidates if p.is_file()), None)


def _missing() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    from dijiang_deploy.build.environment import import_tensorrt
    from dijiang_deploy.contract.errors import BackendUnavailableError

    try:
        import_tensorrt()
    except BackendUnavailableError as exc:
        return f"no usable tensorrt: {exc}"
    if _plugin_library() is None:
        return "no libdijiang_trt_plugins.so (set DIJIANG_TRT_PLUGIN_LIB or run scripts/build_plugins.sh)"
    return None


@pytest.fixture(scope="module")
def requirements() -> Path:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    return _plugin_library()  # type: ignore[return-value]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    from dijiang_deploy.export import ExportOptions, export_model
    from dijiang_deploy.testing import random_model

    model = random_model("llama", seed=5)
    root = tmp_path_factory.mktemp("trt_exports")
    for flavor in FLAVORS:
        export_model(model, root / flavor, ExportOptions(attention_op=flavor, max_chunk=MAX_CHUNK))
    return {flavor: root / flavor for flavor in FLAVORS}


@pytest.fixture(scope="module")
def engines(requirements, exports, tmp_path_factory) -> dict[str, Path]:
    from dijiang_deploy.build.builder import build_engine
    from dijiang_deploy.build.options import resolve_options
    from dijiang_deploy.export import Manifest

    root = tmp_path_factory.mktemp("trt_engines")
    cache = root / "timing.cache"
    out = {}
    for flavor, folder in exports.items():
        opts = resolve_options(Manifest.load(folder), max_batch=2, plugin_lib=requirements, timing_cache=cache)
        build_engine(folder, root / flavor, opts)
        out[flavor] = root / flavor
    assert cache.is_file() and cache.stat().st_size > 0
    return out


@pytest.fixture(scope="module")
def ort_generator(exports):
    from dijiang_deploy.runtime import Generator

    return Generator.from_pretrained(exports["linear-attention"], load_tokenizer=False)


def _trt_generator(folder: Path, **kwargs):
    from dijiang_deploy.runtime import Generator, Model
    from dijiang_deploy.runtime.trt_lane import TrtGraph

    return Generator(Model(TrtGraph(folder, **kwargs), None, Path(folder)))


ROWS = [[5, 17, 3, 88, 41, 9, 23, 60, 2, 71, 14, 33, 8, 50, 19, 27, 66, 4, 91, 12, 7],
        [44, 3, 29, 81, 6, 58, 10]]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_logits_match_onnxruntime(engines, ort_generator, flavor: str) -> None:
    gen = _trt_generator(engines[flavor])
    ids = np.random.default_rng(0).integers(3, 100, size=(2, 37))
    want = ort_generator.score(ids)
    got = gen.score(ids)
    assert got.shape == want.shape
    err = float(np.abs(got - want).max())
    assert err <= 1e-3, f"{flavor}: max |logit diff| {err:.3g}"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_state_after_prefill_matches(engines, ort_generator, flavor: str) -> None:
    gen = _trt_generator(engines[flavor])
    for row in ROWS:
        trt_s, ort_s = gen.model.session(), ort_generator.model.session()
        trt_s.append(row)
        ort_s.append(row)
        for got, want in zip(trt_s.layers(), ort_s.layers()):
            assert np.abs(got - want).max() <= 1e-4
        assert trt_s._lane.positions.tolist()[0] == len(row)


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_greedy_tokens_identical(engines, ort_generator, flavor: str, cuda_graphs: bool) -> None:
    from dijiang_deploy.runtime.trt_backend import TrtBackend

    gen = _trt_generator(engines[flavor], cuda_graphs=cuda_graphs)
    want = ort_generator.generate(ROWS, max_new_tokens=24).token_ids
    assert gen.generate(ROWS, max_new_tokens=24).token_ids == want
    backend = TrtBackend(engines[flavor], cuda_graphs=cuda_graphs)
    fast = backend.generate_greedy(ROWS, 24, eos_ids=set(ort_generator.model.eos_ids))
    assert fast == want
    # Graphs are replayed from the second decode step on.
    assert bool(backend._graphs) == cuda_graphs


@pytest.fixture(scope="module")
def ort_cuda() -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        pytest.skip("onnxruntime is not installed")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")


@pytest.fixture(scope="module")
def inline_export(tmp_path_factory) -> Path:
    """The ONNX-Runtime-only graph (per-layer ``If`` for one-token steps), same weights."""
    from dijiang_deploy.export import ExportOptions, export_model
    from dijiang_deploy.testing import random_model

    folder = tmp_path_factory.mktemp("inline") / "inline"
    export_model(random_model("llama", seed=5), folder, ExportOptions(attention_op="inline"))
    return folder


@pytest.mark.parametrize("flavor", ["linear-attention", "function", "inline"])
def test_onnxruntime_cuda_provider_matches_cpu(ort_cuda, exports, inline_export, ort_generator, flavor: str) -> None:
    """The second GPU backend: ONNX Runtime's CUDA provider on the same exports."""
    from dijiang_deploy.runtime import Generator

    folder = inline_export if flavor == "inline" else exports[flavor]
    gen = Generator.from_pretrained(
        folder, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], load_tokenizer=False
    )
    assert gen.model.graph.session.get_providers()[0] == "CUDAExecutionProvider"
    ids = np.random.default_rng(1).integers(3, 100, size=(2, 37))
    err = float(np.abs(gen.score(ids) - ort_generator.score(ids)).max())
    assert err <= 1e-3, f"{flavor}: max |logit diff| {err:.3g}"
    assert gen.generate(ROWS, max_new_tokens=24).token_ids == ort_generator.generate(ROWS, max_new_tokens=24).token_ids


@pytest.mark.parametrize("flavor", ["linear-attention", "inline"])
def test_cuda_provider_keeps_states_on_the_device(ort_cuda, exports, inline_export, ort_generator, flavor: str) -> None:
    """Lanes on the CUDA provider hold their states as device OrtValues; rows cross to the
    host only when a session reads or writes one. Sessions, the engine and state files
    give the CPU's tokens."""
    from dijiang_deploy.runtime import Engine, Model, Request, Session
    from dijiang_deploy.runtime.ort_backend import _DeviceRows

    folder = inline_export if flavor == "inline" else exports[flavor]
    cuda = Model.open(folder, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], load_tokenizer=False)
    lane = cuda.lane(4, (1,))
    assert isinstance(lane._states[0], _DeviceRows)
    want = ort_generator.generate(ROWS, max_new_tokens=16).token_ids
    with Engine(cuda, max_batch=2) as eng:
        got = [eng.submit(Request(r, 16)).result(timeout=120).token_ids for r in ROWS]
    assert got == want
    s = cuda.session()
    s.append(ROWS[0])
    resumed = Session.from_bytes(cuda, s.to_bytes())
    assert resumed.generate(16, feed_last=False).token_ids == want[0]


def test_engine_for_another_gpu_is_refused(engines, tmp_path: Path) -> None:
    import shutil

    from dijiang_deploy.contract.errors import DiJiangError
    from dijiang_deploy.runtime.trt_backend import TrtBackend

    copy = tmp_path / "eng"
    shutil.copytree(engines["plugin"], copy)
    meta = json.loads((copy / "engine.json").read_text())
    meta["gpu_sm"], meta["gpu_name"] = "1.0", "Imaginary GPU"
    (copy / "engine.json").write_text(json.dumps(meta))
    with pytest.raises(DiJiangError, match=r"built for Imaginary GPU \(SM 1.0\) cannot run on"):
        TrtBackend(copy)


def test_batch_beyond_engine_is_refused(engines) -> None:
    from dijiang_deploy.contract.errors import DiJiangError

    from dijiang_deploy.runtime.trt_backend import TrtBackend

    with pytest.raises(DiJiangError, match="outside this engine's 1..2"):
        TrtBackend(engines["plugin"]).allocate(3)


def test_serialized_plugins_engine_runs_in_a_fresh_process(requirements, exports, ort_generator, tmp_path: Path) -> None:
    """--serialize-plugins: a version-compatible engine carrying the library.
    Built and run in separate processes (the library must not be registered
    twice in one process)."""
    engine = tmp_path / "eng_vc"
    build = subprocess.run(
        [sys.executable, "-m", "dijiang_deploy.cli", "build", str(exports["plugin"]), "-o", str(engine),
         "--plugin-lib", str(requirements), "--serialize-plugins", "--max-batch", "2"],
        capture_output=True, text=True, timeout=900,
    )
    assert build.returncode == 0, build.stderr
    assert json.loads((engine / "engine.json").read_text())["plugins_serialized"] is True
    out = tmp_path / "logits.npy"
    script = textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from dijiang_deploy.runtime import Generator, Model
        from dijiang_deploy.runtime.trt_lane import TrtGraph
        gen = Generator(Model(TrtGraph({str(engine)!r}, plugin_lib=None), None, Path({str(engine)!r})))
        np.save({str(out)!r}, gen.score(np.asarray({ROWS[0]!r})[None]))
    """)
    env = dict(os.environ)
    env.pop("DIJIANG_TRT_PLUGIN_LIB", None)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    want = ort_generator.score(np.asarray(ROWS[0])[None])
    assert np.abs(np.load(out) - want).max() <= 1e-3
