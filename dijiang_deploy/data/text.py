"""Reading text and tokenizing it: user files and folders, checkpoint tokenizers.

Shared by fine-tuning, calibration and evaluation, which all read the same
kinds of text sources and must fail on them with the same messages.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Protocol, Sequence

from ..contract.errors import DiJiangError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".jsonl", ".json")


class DataError(DiJiangError):
    """Training or evaluation text is missing, unreadable or empty."""


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """Fallback for checkpoints without tokenizer files (tiny test models):
    UTF-8 bytes taken modulo the vocabulary size."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class _HFTokenizer:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))


def load_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    """The checkpoint's ``tokenizer.json`` (fast tokenizer, no special tokens
    added), or :class:`ByteTokenizer` when the folder has none."""
    path = Path(model_dir) / "tokenizer.json"
    if path.exists():
        from tokenizers import Tokenizer as FastTokenizer

        return _HFTokenizer(FastTokenizer.from_file(str(path)))
    log.warning("%s has no tokenizer.json: using bytes modulo the vocabulary", model_dir)
    return ByteTokenizer(vocab_size)


def read_text_source(path: str | Path) -> list[str]:
    """Documents from a text file or a folder of them (``.txt .md .rst .jsonl``...).

    A ``.jsonl`` file contributes the ``"text"`` field of each line.

    Raises:
        DataError: missing path, no text files, or only empty text.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES) if p.is_dir() else [p]
    if not files:
        raise DataError(f"{p}: no text files ({', '.join(TEXT_SUFFIXES)}) in this folder")
    docs: list[str] = []
    for f in files:
        try:
            raw = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{f}: not UTF-8 text")
        if f.suffix == ".jsonl":
            for n, line in enumerate(raw.splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DataError(f"{f}:{n}: expected a JSON object with a 'text' field")
        else:
            docs.append(raw)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"{p}: contains no text")
    return docs
