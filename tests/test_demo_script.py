"""scripts/demo.sh: which steps it runs, which it reuses, and that it says so.

The real commands take minutes, so the script runs in a copy of the
repository layout whose ``setup.sh`` does nothing and whose
``dijiang-deploy`` only logs its arguments and creates the ``-o`` folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_CLI = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
while [[ $# -gt 0 ]]; do
  if [[ "$1" == "-o" ]]; then mkdir -p "$2"; fi
  shift
done
"""


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "demo.sh", tmp_path / "scripts" / "demo.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("#!/usr/bin/env bash\n")
    cli = tmp_path / ".venv" / "bin" / "dijiang-deploy"
    cli.parent.mkdir(parents=True)
    cli.write_text(FAKE_CLI)
    cli.chmod(0o755)
    return tmp_path


def _demo(root: Path, **env: str) -> tuple[list[str], str]:
    log = root / "calls.log"
    log.unlink(missing_ok=True)
    full = {**os.environ, "FAKE_LOG": str(log), **env}
    full.pop("DIJIANG_RUNS", None)
    res = subprocess.run(["bash", str(root / "scripts" / "demo.sh"), "Hi"], env=full, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    calls = log.read_text().splitlines() if log.exists() else []
    return [_short(c) for c in calls], res.stderr


def _short(call: str) -> str:
    """``convert ... -o /x/runs/NAME ...`` -> ``convert NAME``; calls without ``-o`` unchanged."""
    if " -o " not in call:
        return call
    return f"{call.split()[0]} {Path(call.split(' -o ')[1].split()[0]).name}"


def test_first_run_converts_the_shipped_model_and_does_not_fine_tune(fake_root: Path) -> None:
    calls, _ = _demo(fake_root)
    assert calls == ["convert smollm2-shipped", "export smollm2-shipped-onnx",
                     f"run {fake_root}/runs/smollm2-shipped-onnx --chat --prompt Hi --max-new-tokens 64"]
    convert = (fake_root / "calls.log").read_text().splitlines()[0]
    assert "--model smollm2" in convert and "--untrained" not in convert


def test_second_run_reuses_and_says_so(fake_root: Path) -> None:
    _demo(fake_root)
    calls, err = _demo(fake_root)
    assert [c.split()[0] for c in calls] == ["run"]
    for folder in ("smollm2-shipped", "smollm2-shipped-onnx"):
        assert f"reusing {fake_root}/runs/{folder} (delete it to redo this step)" in err


def test_a_fine_tune_budget_trains_on_top_in_folders_of_its_own(fake_root: Path) -> None:
    _demo(fake_root)
    log = fake_root / "calls.log"
    calls, _ = _demo(fake_root, DIJIANG_FINETUNE_MINUTES="60")
    assert calls[:2] == ["finetune smollm2-shipped-ft60min", "export smollm2-shipped-onnx-ft60min"]
    first = log.read_text().splitlines()[0]
    assert "--budget-minutes 60" in first and "--lora-rank 16" in first
    assert first.split()[1].endswith("/runs/smollm2-shipped")  # on top of the shipped conversion
    assert calls[2].startswith(f"run {fake_root}/runs/smollm2-shipped-onnx-ft60min ")


def test_int4_exports_int4_and_fine_tunes_through_the_grid_only_when_asked(fake_root: Path) -> None:
    _demo(fake_root, DIJIANG_WEIGHTS="int4")
    lines = (fake_root / "calls.log").read_text().splitlines()
    assert not any(line.startswith("finetune ") for line in lines)
    assert any(line.startswith("export ") and "smollm2-shipped-onnx-int4 --weights int4" in line for line in lines)
    _demo(fake_root, DIJIANG_WEIGHTS="int4", DIJIANG_FINETUNE_MINUTES="5")
    lines = (fake_root / "calls.log").read_text().splitlines()
    assert any(line.startswith("finetune ") and "--quant-aware int4" in line for line in lines)


@pytest.mark.parametrize("env, message", [
    ({"DIJIANG_FINETUNE_MINUTES": "../x"}, "DIJIANG_FINETUNE_MINUTES must be a number of minutes, got '../x'"),
    ({"DIJIANG_WEIGHTS": "int3"}, "DIJIANG_WEIGHTS must be fp32 or int4, got int3"),
])
def test_bad_settings_stop_before_any_work(fake_root: Path, env: dict, message: str) -> None:
    full = {**os.environ, "FAKE_LOG": str(fake_root / "calls.log"), **env}
    res = subprocess.run(["bash", str(fake_root / "scripts" / "demo.sh")], env=full, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2 and message in res.stderr
    assert not (fake_root / "calls.log").exists() and not (fake_root / "runs").exists()
