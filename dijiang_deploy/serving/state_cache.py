"""The server's state cache: recurrent states keyed by the exact token sequence they follow.

A DiJiang state after N tokens is a few MiB whatever N is, so the server
keeps the state reached at the end of each request (and after its prompt)
and a later request whose tokens start with a cached sequence resumes from
it, prefilling only the rest: a chat sent through the stateless OpenAI API
pays for its new turn only.

* Keys: BLAKE2b of the token ids (int32 little-endian). A lookup hashes the
  request's tokens once, incrementally, and checks the cached lengths in
  descending order; a hit is confirmed by comparing the tokens themselves.
* Memory: LRU bounded by ``max_bytes``.
* Disk (optional ``folder``): every entry is also written, from a
  background thread and atomically, as ``<length>-<key>.djstate``; the
  folder is indexed at start and again whenever its modification time
  changes (several servers may share it), and an entry is loaded when a
  request needs it (a file of another model is refused by its fingerprint).
  :meth:`flush` waits for pending writes (graceful shutdown).

Thread-safe.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..contract.statefile import ModelIdentity, SequenceState, StateFileError

log = logging.getLogger(__name__)

SUFFIX = ".djstate"


def _key(tokens: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(tokens, "<i4").tobytes(), digest_size=16).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0
    disk_hits: int = 0
    disk_writes: int = 0


class StateCache:
    """LRU of :class:`~dijiang_deploy.contract.SequenceState` by token sequence.

    Args:
        identity: the served model (states of another model are refused).
        max_bytes: memory budget; 0 disables the memory tier.
        folder: optional folder for snapshots that survive a restart.
    """

    def __init__(self, identity: ModelIdentity, max_bytes: int, folder: str | Path | None = None):
        self.identity = identity
        self.max_bytes = max_bytes
        self.folder = Path(folder) if folder is not None else None
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._mem: OrderedDict[str, SequenceState] = OrderedDict()
        self._disk: dict[str, int] = {}  # key -> length, for files in folder
        self._length: dict[str, int] = {}  # every key in memory or on disk -> its length
        self._per_length: dict[int, int] = {}
        self._writes: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        self._scanned_mtime = -1.0
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._scan()
            self._writer = threading.Thread(target=self._write_loop, name="dijiang-state-writer", daemon=True)
            self._writer.start()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 or self.folder is not None

    # -- bookkeeping (under the lock) ------------------------------------------------

    def _known(self, key: str, length: int) -> None:
        if key not in self._length:
            self._length[key] = length
            self._per_length[length] = self._per_length.get(length, 0) + 1

    def _maybe_unknown(self, key: str) -> None:
        if key in self._length and key not in self._mem and key not in self._disk:
            length = self._length.pop(key)
            left = self._per_length[length] - 1
            if left:
                self._per_length[length] = left
            else:
                del self._per_length[length]

    def _scan(self) -> None:
        """Index the folder's snapshots (also those other processes wrote since the last scan)."""
        try:
            mtime = self.folder.stat().st_mtime
        except OSError:
            return
        if mtime == self._scanned_mtime:
            return
        found = {}
        for path in self.folder.glob(f"*{SUFFIX}"):
            length, _, key = path.stem.partition("-")
            if length.isdigit() and key:
                found[key] = int(length)
        with self._lock:
            for key, length in found.items():
                if key not in self._disk:
                    self._disk[key] = length
                    self._known(key, length)
            self._scanned_mtime = mtime

    # -- lookups ----------------------------------------------------------------

    def longest_prefix(self, tokens: Sequence[int]) -> SequenceState | None:
        """The cached state of the longest cached sequence that ``tokens`` starts with."""
        if not self.enabled:
            return None
        ids = np.asarray(tokens, "<i4")
        if self.folder is not None:
            self._scan()  # a folder shared by several servers (Ray replicas) gains files from the others
        with self._lock:
            lengths = sorted(n for n in self._per_length if 0 < n <= len(ids))
        digests: list[tuple[int, str]] = []
        h = hashlib.blake2b(digest_size=16)
        at = 0
        for n in lengths:
            h.update(ids[at:n].tobytes())
            at = n
            digests.append((n, h.copy().hexdigest()))
        for n, key in reversed(digests):
            state = self._get(key, ids[:n])
            if state is not None:
                self.stats.hits += 1
                return state
        self.stats.misses += 1
        return None

    def _get(self, key: str, tokens: np.ndarray) -> SequenceState | None:
        with self._lock:
            state = self._mem.get(key)
            if state is not None:
                self._mem.move_to_end(key)
            on_disk = key in self._disk
        if state is None and on_disk:
            state = self._load(key)
            if state is not None:
                self.stats.disk_hits += 1
                self._remember(key, state, write=False)
        if state is None or not np.array_equal(state.tokens.astype("<i4"), tokens):
            return None
        return state

    def _load(self, key: str) -> SequenceState | None:
        length = self._disk[key]
        path = self.folder / f"{length}-{key}{SUFFIX}"
        try:
            return SequenceState.load(path, expect=self.identity)
        except (StateFileError, OSError) as exc:
            log.warning("state cache: skipping %s (%s)", path.name, exc)
            with self._lock:
                self._disk.pop(key, None)
                self._maybe_unknown(key)
            return None

    # -- inserts ----------------------------------------------------------------

    def put(self, state: SequenceState) -> None:
        """Keep ``state`` under its own token sequence.

        Raises:
            StateFileError: a state of another model.
        """
        if not self.enabled or state.position == 0:
            return
        if state.model.fingerprint != self.identity.fingerprint:
            raise StateFileError("state cache: a state of another model")
        self._remember(_key(state.tokens), state, write=self.folder is not None)

    def _remember(self, key: str, state: SequenceState, write: bool) -> None:
        size = _nbytes(state)
        with self._lock:
            if 0 < size <= self.max_bytes:
                if key in self._mem:
                    self._mem.move_to_end(key)
                else:
                    self._mem[key] = state
                    self._known(key, state.position)
                    self.stats.bytes += size
                while self.stats.bytes > self.max_bytes and self._mem:
                    old_key, old = self._mem.popitem(last=False)
                    self.stats.bytes -= _nbytes(old)
                    self.stats.evictions += 1
                    if not (write and old_key == key):
                        self._maybe_unknown(old_key)
            self.stats.entries = len(self._mem)
            queue_write = write and key not in self._disk
            if queue_write:
                self._known(key, state.position)  # findable until the file lands
        if queue_write:
            self._writes.put((key, state))

    def remove(self, tokens: Sequence[int]) -> bool:
        """Forget the entry for exactly ``tokens`` (memory and disk)."""
        key = _key(np.asarray(tokens, "<i4"))
        with self._lock:
            state = self._mem.pop(key, None)
            if state is not None:
                self.stats.bytes -= _nbytes(state)
            length = self._disk.pop(key, None)
            self._maybe_unknown(key)
            self.stats.entries = len(self._mem)
        if length is not None:
            (self.folder / f"{length}-{key}{SUFFIX}").unlink(missing_ok=True)
        return state is not None or length is not None

    # -- disk ---------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            try:
                if item is None:
                    return
                key, state = item
                path = self.folder / f"{state.position}-{key}{SUFFIX}"
                try:
                    state.save(path)
                except OSError as exc:
                    log.warning("state cache: cannot write %s (%s)", path.name, exc)
                    with self._lock:
                        self._maybe_unknown(key)
                    continue
                with self._lock:
                    self._disk[key] = state.position
                    self._known(key, state.position)
                self.stats.disk_writes += 1
            finally:
                self._writes.task_done()

    def flush(self) -> None:
        """Wait until every pending snapshot is on disk."""
        if self._writer is not None:
            self._writes.join()

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            self._writes.put(None)
            self._writer.join(10)
            self._writer = None


def _nbytes(state: SequenceState) -> int:
    return sum(a.nbytes for a in state.layers) + state.tokens.nbytes + (0 if state.logits is None else state.logits.nbytes)
