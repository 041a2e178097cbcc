"""``dijiang-deploy bench --quick``: runs on the tiny model and writes well-formed outputs."""

from __future__ import annotations

import csv
import json
import math

import pytest

from dijiang_deploy.bench.cli import parse_contexts, parse_systems
from dijiang_deploy.bench.measure import onnx_weight_bytes_per_token
from dijiang_deploy.bench.report import flat_rows, target_checks
from dijiang_deploy.cli import main
from dijiang_deploy.contract.errors import DiJiangError


@pytest.fixture(scope="module")
def quick_run(module_tmp):
    out = module_tmp("bench") / "out"
    code = main(
        [
            "bench",
            "--quick",
            "--out",
            str(out),
            "--systems",
            "dijiang-ort-fp32,ort-kv-fp32,torch-recurrent,llamacpp-q4_1",
            "--threads",
            "1",
        ]
    )
    return code, out


def test_quick_writes_every_output(quick_run):
    code, out = quick_run
    assert code == 0
    for name in ("table.md", "table.txt", "results.json", "results.csv", "plot.png"):
        path = out / name
        assert path.exists() and path.stat().st_size > 0, name
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_results_are_well_formed(quick_run):
    _, out = quick_run
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["bandwidth"]["bandwidth"] > 1e8  # any real machine reads > 100 MB/s
    measured = {r["system"]: r for r in data["systems"]}
    assert set(measured) == {"dijiang-ort-fp32", "ort-kv-fp32", "torch-recurrent"}
    for name, record in measured.items():
        assert "error" not in record, (name, record.get("error"))
        assert [r["context"] for r in record["results"]] == [16, 64]
        for r in record["results"]:
            assert math.isfinite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0
            assert math.isfinite(r["prefill_tokens_per_s"]) and r["prefill_tokens_per_s"] > 0
            assert r["peak_rss_bytes"] > 10 * 2**20
            assert r["state_bytes"] > 0
    # llama.cpp has no GGUF for the tiny model: skipped with a note, not measured.
    assert "llamacpp-q4_1" in data["skipped"]
    assert "llamacpp-q4_1" in (out / "table.md").read_text()

    # DiJiang's state does not grow; the KV cache does (2 x layers x kv_heads x d x tokens x 4 bytes).
    dj = measured["dijiang-ort-fp32"]["results"]
    assert dj[0]["state_bytes"] == dj[1]["state_bytes"] == 2 * 4 * 16 * 16 * 4
    kv = measured["ort-kv-fp32"]["results"]
    assert kv[1]["state_bytes"] > kv[0]["state_bytes"]
    assert kv[0]["state_bytes"] == 2 * 2 * 2 * 16 * kv[0]["context_after_decode"] * 4

    # Roofline only on DiJiang rows, and consistent with the bandwidth measured in the run.
    bw = data["meta"]["bandwidth"]["bandwidth"]
    for row in data["rows"]:
        if row["system"].startswith("dijiang-ort"):
            assert row["bytes_read_per_token"] > 0
            assert row["roofline_fraction"] == pytest.approx(row["decode_tokens_per_s"] * row["bytes_read_per_token"] / bw)
        else:
            assert row["roofline_fraction"] is None

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6
    assert {r["system"] for r in rows} == set(measured)
    assert all(float(r["decode_tokens_per_s"]) > 0 for r in rows)

    prof = data["profile"]
    assert "error" not in prof, prof.get("error")
    assert prof["ops"] and prof["kernel_ms_per_step"] > 0
    assert any(op["op"] == "MatMul" for op in prof["ops"])


def test_weight_bytes_count_embedding_rows_only(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = numpy_helper.from_array(np.zeros((100, 8), np.float32), "emb")
    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[emb, w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    got = onnx_weight_bytes_per_token(path)
    assert got["weight_bytes"] == (100 * 8 + 8 * 4) * 4
    assert got["bytes_read_per_token"] == (8 + 8 * 4) * 4


def test_checks_flag_a_missed_target():
    results = {
        "meta": {"bandwidth": {"bandwidth": 10e9}},
        "systems": [
            {
                "system": "dijiang-ort-fp32",
                "info": {"bytes_read_per_token": 1e9},
                "results": [
                    {"context": 128, "decode_tokens_per_s": 8.0, "prefill_tokens_per_s": 100.0, "peak_rss_bytes": 1e9, "state_bytes": 1},
                    {"context": 8192, "decode_tokens_per_s": 4.0, "prefill_tokens_per_s": 100.0, "peak_rss_bytes": 2e9, "state_bytes": 1},
                ],
            }
        ],
    }
    checks = {c["check"]: c for c in target_checks(flat_rows(results))}
    assert checks["dijiang-ort-fp32: decode tok/s at 8192 / at 128"]["passed"] is False
    assert checks["dijiang-ort-fp32: peak RSS at 8192 / at 128"]["passed"] is False
    roof = checks["dijiang-ort-fp32: decode / bandwidth roofline at 128"]
    assert roof["value"] == pytest.approx(0.8) and roof["passed"] is True


def test_quantization_targets_are_checked():
    def system(name, speeds):
        return {
            "system": name,
            "info": {},
            "results": [
                {"context": c, "decode_tokens_per_s": v, "prefill_tokens_per_s": 1.0, "peak_rss_bytes": 1e9, "state_bytes": 1}
                for c, v in speeds.items()
            ],
        }

    results = {
        "meta": {},
        "systems": [
            system("dijiang-ort-fp32", {128: 40.0, 4096: 40.0}),
            system("dijiang-ort-int4", {128: 96.0, 4096: 100.0}),
            system("llamacpp-q4_1", {128: 120.0, 4096: 45.0}),
        ],
    }
    checks = {c["check"]: c for c in target_checks(flat_rows(results))}
    speedup = checks["decode dijiang-ort-int4 / dijiang-ort-fp32 at 128"]
    assert speedup["value"] == pytest.approx(2.4) and speedup["passed"] is False
    cpp = checks["decode dijiang-ort-int4 / llamacpp-q4_1 at 4096"]
    assert cpp["value"] == pytest.approx(100 / 45) and cpp["passed"] is True
    assert checks["decode dijiang-ort-int4 / llamacpp-q4_1 at 128"]["passed"] is None


def test_option_parsing():
    assert parse_contexts("1024,128,128") == [128, 1024]
    assert parse_systems("dijiang-ort,llamacpp-q4_1") == [
        "dijiang-ort-fp32",
        "dijiang-ort-fp16",
        "dijiang-ort-int8",
        "dijiang-ort-int4",
        "llamacpp-q4_1",
    ]
    with pytest.raises(DiJiangError):
        parse_systems("vllm")
    with pytest.raises(DiJiangError):
        parse_contexts("0,12")


def test_gpu_request_without_gpu_is_a_note(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--quick", "--device", "cuda", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["systems"] == [] and any("cuda" in n for n in data["notes"])
    assert "nothing measured" in (tmp_path / "table.md").read_text()


def test_rounds_are_merged_by_median():
    from dijiang_deploy.bench.runner import merge_rounds

    def record(decode, prefill_s, peak):
        row = {"context": 128, "decode_tokens_per_s": decode, "prefill_seconds": prefill_s,
               "prefill_tokens_per_s": 128 / prefill_s, "peak_rss_bytes": peak}
        return {"system": "s", "results": [row], "wall_seconds": 1.0}

    merged = merge_rounds([record(10.0, 1.0, 5), record(30.0, 4.0, 7), record(20.0, 2.0, 6)])
    (row,) = merged["results"]
    assert row["decode_tokens_per_s"] == 20.0 and row["decode_rounds_tokens_per_s"] == [10.0, 30.0, 20.0]
    assert row["prefill_tokens_per_s"] == 64.0 and row["peak_rss_bytes"] == 7 and row["rounds"] == 3
    assert merged["rounds"] == 3 and merged["wall_seconds"] == 3.0
    single = record(1.0, 1.0, 1)
    assert merge_rounds([single]) is single
    assert main(["bench", "--rounds", "0", "--quick"]) == 2  # one-line error, exit 2


def test_kv_export_all_logits_scores_every_position(tmp_path):
    """``all_logits`` (the int8 yardstick's teacher-forced scoring) returns the
    logits of every new position, equal to transformers' own; the default the
    benchmark uses returns the last one."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from dijiang_deploy.bench.kv_export import KV_MODEL, export_kv_model, kv_geometry, load_hf_base

    model = load_hf_base("tiny", seed=3)
    geo = kv_geometry(model.config)
    ids = np.array([[5, 9, 2, 7, 1, 4]], np.int64)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    empty = np.zeros((1, geo["kv_heads"], 0, geo["head_dim"]), np.float32)
    feeds = {"input_ids": ids, "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    feeds |= {f"past_{kind}.{i}": empty for i in range(geo["num_layers"]) for kind in "kv"}
    for all_logits in (True, False):
        folder = tmp_path / str(all_logits)
        export_kv_model(model, folder, base="tiny", all_logits=all_logits)
        got = ort.InferenceSession(str(folder / KV_MODEL), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
        expected = want if all_logits else want[:, -1:]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_interleaved_step_times(tmp_path):
    """One mean per round and folder, in the order given; bad arguments are refused."""
    from dijiang_deploy.bench.profile import interleaved_step_times
    from dijiang_deploy.export import ExportOptions, export_model
    from dijiang_deploy.testing import random_model

    small = tmp_path / "small"
    big = tmp_path / "big"
    export_model(random_model("llama", seed=1, num_hidden_layers=1), small, ExportOptions(attention_op="inline"))
    export_model(random_model("llama", seed=1, num_hidden_layers=2), big, ExportOptions(attention_op="inline"))
    times = interleaved_step_times([big, small], threads=1, rounds=3, steps=5)
    assert list(times) == [str(big), str(small)]
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())
    with pytest.raises(ValueError, match="rounds and steps"):
        interleaved_step_times([small], threads=1, rounds=0)
    with pytest.raises(DiJiangError):
        interleaved_step_times([tmp_path / "missing"], threads=1)


def test_profile_decode_runs_the_rows_it_names(tmp_path):
    """A batched profile feeds that many rows (the graph would reject a mismatch) and counts the same nodes per step."""
    from dijiang_deploy.bench.profile import profile_decode
    from dijiang_deploy.export import ExportOptions, export_model
    from dijiang_deploy.testing import random_model

    folder = tmp_path / "tiny"
    export_model(random_model("llama", seed=1, num_hidden_layers=1), folder, ExportOptions(attention_op="inline"))
    one = profile_decode(folder, threads=1, steps=3)
    four = profile_decode(folder, threads=1, steps=3, rows=4)
    assert (one["rows"], four["rows"]) == (1, 4)
    assert four["nodes_per_step"] == one["nodes_per_step"] > 0
    with pytest.raises(ValueError, match="rows"):
        profile_decode(folder, threads=1, rows=0)


_CRASHING_LLAMA_CPP = '''
"""Stand-in for a llama-cpp-python built with -march=native on a CPU it does not suit:
it loads, then dies with SIGSEGV on the first eval, as such builds do."""
import ctypes


class Llama:
    metadata = {"general.architecture": "llama", "llama.block_count": "2", "llama.attention.head_count": "2",
                "llama.embedding_length": "32"}

    def __init__(self, n_ctx=256, **kwargs):
        self._n_ctx = n_ctx

    def n_ctx(self):
        return self._n_ctx

    def n_vocab(self):
        return 64

    def reset(self):
        pass

    def eval(self, tokens):
        ctypes.string_at(0)  # reads address 0: a real segmentation fault
'''


def test_a_crashing_peer_is_reported_and_the_other_rows_written(tmp_path, monkeypatch):
    """A llama.cpp worker that segfaults is named as crashed (with the portable build
    command); the DiJiang rows of the same run are still measured and written."""
    from dijiang_deploy.bench import runner

    fake = tmp_path / "fake"
    (fake / "llama_cpp").mkdir(parents=True)
    (fake / "llama_cpp" / "__init__.py").write_text(_CRASHING_LLAMA_CPP)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    real_prepare = runner.prepare

    def prepare_with_peer(systems, work, quick, checkpoint):
        prep = real_prepare([s for s in systems if s != "llamacpp-q4_1"], work, quick, checkpoint)
        prep.specs["llamacpp-q4_1"] = {"name": "llamacpp-q4_1", "kind": "llamacpp", "path": str(gguf)}
        return prep

    monkeypatch.setattr(runner, "prepare", prepare_with_peer)
    out = tmp_path / "out"
    assert main(["bench", "--quick", "--out", str(out), "--systems", "dijiang-ort-fp32,llamacpp-q4_1",
                 "--threads", "1", "--no-profile"]) == 0
    data = json.loads((out / "results.json").read_text())
    records = {r["system"]: r for r in data["systems"]}
    crashed = records["llamacpp-q4_1"]
    assert crashed["error"].startswith("crashed: killed by SIGSEGV"), crashed["error"]
    assert "-DGGML_NATIVE=OFF" in crashed["error"] and crashed["results"] == []
    assert "error" not in records["dijiang-ort-fp32"]
    assert [r["context"] for r in records["dijiang-ort-fp32"]["results"]] == [16, 64]
    table = (out / "table.md").read_text()
    assert "| dijiang-ort-fp32 | 16 |" in table and "llamacpp-q4_1: crashed: killed by SIGSEGV" in table
    assert (out / "results.csv").read_text().count("dijiang-ort-fp32") == 2


def test_step_breakdown_names_the_steps_inside_the_worst_gap():
    from dijiang_deploy.bench.streams import step_breakdown

    # Decode steps of 10 ms; the prompt arrives at t=0.05 and is fed in two
    # chunks (8 then 4 positions) between decode steps; done at t=0.13.
    steps = [(0.00, "decode", 1), (0.01, "decode", 1), (0.02, "decode", 1), (0.03, "decode", 1),
             (0.04, "decode", 1), (0.05, "decode", 1), (0.08, "prefill", 8), (0.09, "decode", 1),
             (0.11, "prefill", 4), (0.12, "decode", 1), (0.13, "decode", 1)]
    during = [(0.04, 0.05, 0.09), (0.03, 0.09, 0.12)]  # (gap, start, end) of a stream's tokens
    out = step_breakdown(steps, during, before_end=0.05, after_start=0.13)
    assert out["worst_gap_steps"] == [
        {"kind": "prefill", "length": 8, "ms": pytest.approx(30.0)},
        {"kind": "decode", "length": 1, "ms": pytest.approx(10.0)},
    ]
    assert out["prefill_steps"] == 2 and out["prefill_chunk_lengths"] == {"8": 1, "4": 1}
    assert out["decode_step_median_before_ms"] == pytest.approx(10.0)
    assert out["decode_step_max_during_ms"] == pytest.approx(10.0)


def test_streams_quick_run_explains_its_interference_gap(tmp_path):
    out = tmp_path / "streams"
    code = main(["bench", "--quick", "--streams", "1,2", "--context", "64", "--systems", "dijiang-ort-fp32",
                 "--out", str(out), "--work-dir", str(tmp_path / "work"), "--threads", "1", "--rounds", "2"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["streams"]: r for r in results["rows"]}
    assert rows[2]["aggregate_tokens_per_s"] > 0 and rows[2]["peak_rss_bytes"] >= rows[1]["rss_before_bytes"]
    (inter,) = results["interference"]
    # All 64 prompt positions went through the prefill steps it counts.
    fed = sum(int(n) * k for n, k in inter["prefill_chunk_lengths"].items())
    assert fed >= 64 and sum(inter["prefill_chunk_lengths"].values()) == inter["prefill_steps"]
    kinds = {s["kind"] for s in inter["worst_gap_steps"]}
    assert kinds <= {"decode", "prefill"} and "decode" in kinds
    assert sum(s["ms"] for s in inter["worst_gap_steps"]) <= inter["itl_max_during_ms"] + 1e3 * 0.05
    assert "worst gap" in (out / "table.md").read_text()
    # Two rounds: every row and target lists both, and the target is their median.
    assert len(rows[2]["rounds_aggregate_tokens_per_s"]) == 2 and len(inter["rounds_worst_gap_ratio"]) == 2
    for c in results["checks"]:
        assert len(c["rounds"]) == 2 and c["value"] == pytest.approx(sum(c["rounds"]) / 2)


def test_stream_rounds_merge_by_median():
    from dijiang_deploy.bench.streams import merge_stream_rounds, stream_checks

    def one(agg1: float, agg16: float, worst: float) -> dict:
        rnd = {"rows": [{"system": "dijiang-ort-int4", "streams": n, "aggregate_tokens_per_s": a, "itl_p50_ms": 1.0,
                         "peak_rss_bytes": 100 + n, "state_bytes": 1} for n, a in ((1, agg1), (16, agg16))],
               "interference": [{"system": "dijiang-ort-int4", "streams": 4, "prefill_tokens": 64,
                                 "itl_median_before_ms": 10.0, "itl_max_during_ms": worst}]}
        rnd["checks"] = stream_checks(rnd)
        return rnd

    merged = merge_stream_rounds([one(100, 400, 50), one(50, 300, 20), one(100, 600, 40)])
    checks = {c["check"].split(":")[1].strip()[:9]: c for c in merged["checks"]}
    # 16/1 per round: 4, 6, 6 -> 6 (met); worst/median per round: 5, 2, 4 -> 4 (missed)
    assert checks["aggregate"]["value"] == 6 and checks["aggregate"]["passed"]
    assert checks["aggregate"]["rounds"] == [4, 6, 6]
    assert checks["worst gap"]["value"] == 4 and not checks["worst gap"]["passed"]
    row16 = next(r for r in merged["rows"] if r["streams"] == 16)
    assert row16["aggregate_tokens_per_s"] == 400 and row16["rounds_aggregate_tokens_per_s"] == [400, 300, 600]
    assert merged["interference"][0]["itl_max_during_ms"] == 40
