"""An opened export folder: manifest, step graph, tokenizer. Shared by sessions and engines."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Sequence

from ..contract.errors import DiJiangError, PositionLimitError
from ..contract.manifest import Manifest
from ..contract.statefile import ModelIdentity
from .tokenizer import TextTokenizer, load_tokenizer

BACKENDS = ("ort", "trt")


class Model:
    """One export (or TensorRT engine) folder, opened once.

    Thread-safe to share: lanes (:meth:`lane`) own all mutable buffers, and
    ONNX Runtime sessions accept concurrent runs.

    Attributes:
        manifest: the folder's :class:`~dijiang_deploy.contract.Manifest`.
        tokenizer: a :class:`TextTokenizer`, or None (token ids only).
        identity: what state files of this model record and check.
    """

    def __init__(self, graph, tokenizer: TextTokenizer | None, folder: Path):
        self.graph = graph
        self.manifest: Manifest = graph.manifest
        self.tokenizer = tokenizer
        self.folder = folder

    @classmethod
    def open(
        cls,
        folder: str | Path,
        backend: str = "ort",
        providers: list[str] | None = None,
        threads: int | None = None,
        load_tokenizer: bool = True,
        allow_engine_host_code: bool = False,
    ) -> "Model":
        """Open an export folder (``backend="ort"``) or an engine folder (``"trt"``).

        ``allow_engine_host_code`` lets a TensorRT engine built with
        ``--serialize-plugins`` run the plugin code it carries (off: refused).

        Raises:
            ExportError: missing or inconsistent folder.
            BackendUnavailableError: the backend or a provider is not installed.
            DiJiangError: an unknown backend.
        """
        folder = Path(folder)
        if backend == "ort":
            from .ort_backend import OrtGraph, default_threads

            graph = OrtGraph(folder, providers=providers, threads=threads or default_threads())
        elif backend == "trt":
            if providers:
                raise DiJiangError("providers apply to backend='ort' only")
            from .trt_lane import TrtGraph

            graph = TrtGraph(folder, allow_host_code=allow_engine_host_code)
        else:
            raise DiJiangError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
        tokenizer = _load(folder) if load_tokenizer else None
        return cls(graph, tokenizer, folder)

    # -- facts ----------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    @cached_property
    def identity(self) -> ModelIdentity:
        m = self.manifest
        return ModelIdentity(m.fingerprint(), m.num_layers, list(m.state_shape), m.vocab_size, m.source.get("sha256"))

    @cached_property
    def eos_ids(self) -> frozenset[int]:
        """End-of-sequence ids: the manifest's and the tokenizer's."""
        eos = self.manifest.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(int(i) for i in ids)

    @cached_property
    def prefill_lengths(self) -> list[int]:
        """Chunk lengths a prompt is fed in: powers of two up to the export's ``max_chunk``."""
        out, n = [], 1
        while n < self.manifest.max_chunk:
            out.append(n)
            n *= 2
        return out + [self.manifest.max_chunk]

    def check_length(self, total: int) -> None:
        """Raise if ``total`` positions are past a non-geometric model's decay tables."""
        limit = self.manifest.position_limit
        if limit is not None and total > limit:
            raise PositionLimitError(
                f"{total} tokens are past this model's limit of {limit} positions "
                "(its decay tables are not geometric, so they cannot be extended)"
            )

    def check_tokens(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as a list of ints, each a valid token id of this model."""
        out = []
        v = self.vocab_size
        for t in ids:
            if isinstance(t, bool) or not hasattr(t, "__index__"):
                raise DiJiangError(f"token ids must be integers, got {t!r:.40}")
            t = int(t)
            if not 0 <= t < v:
                raise DiJiangError(f"token id {t} is outside this model's vocabulary 0..{v - 1}")
            out.append(t)
        return out

    def require_tokenizer(self) -> TextTokenizer:
        if self.tokenizer is None:
            raise DiJiangError("no tokenizer in this export folder: pass token ids instead of text")
        return self.tokenizer

    # -- lanes and sessions ---------------------------------------------------

    def lane(self, capacity: int, lengths: Sequence[int] | None = None, in_place: bool | None = None):
        """``capacity`` rows of state buffers for steps of the given chunk lengths.

        ``in_place`` (ONNX Runtime lanes only; see :class:`.ort_backend.OrtLane`):
        None lets the backend choose.
        """
        lengths = lengths if lengths is not None else self.prefill_lengths
        if in_place is None:
            return self.graph.lane(capacity, lengths)
        return self.graph.lane(capacity, lengths, in_place=in_place)

    def session(self):
        """A new, empty :class:`~dijiang_deploy.runtime.session.Session`."""
        from .session import Session

        return Session(self)


def _load(folder: Path) -> TextTokenizer | None:
    return load_tokenizer(folder)
