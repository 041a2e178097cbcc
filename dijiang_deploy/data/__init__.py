"""Texts the package ships, so results do not depend on what else is installed.

* ``heldout.txt``: held-out English for perplexity (``eval``, ``verify``).
* ``calibration.txt``: original prose, dialogue and code for the int8/int4
  calibration pass (~1,100 SmolLM2 tokens); its SHA-256 goes into each
  quantized export's record.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
HELDOUT = HERE / "heldout.txt"
CALIBRATION = HERE / "calibration.txt"


def heldout_text() -> str:
    """The shipped held-out English text (~2,500 tokens for SmolLM2)."""
    return HELDOUT.read_text(encoding="utf-8")


def calibration_text() -> str:
    return CALIBRATION.read_text(encoding="utf-8")


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
