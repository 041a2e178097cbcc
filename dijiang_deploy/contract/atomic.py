"""Atomic outputs: a failed run never leaves a half-written file or folder.

Temporary files and folders are created with ``os.open``/``os.mkdir`` and
the usual 0666/0777 modes, so the kernel applies the process umask itself
(reading the umask would mean setting it, which races with other threads).
Everything is fsynced before the final rename, and the parent folder after
it, so a crash leaves either the old output or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from .errors import DiJiangError


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folders)."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = Path(folder) / name
            if not path.is_symlink():
                _fsync_path(path)
        _fsync_path(Path(folder))


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``target`` only on success.

    The temporary folder is a sibling of ``target`` (same file system, so the
    final rename is atomic) and is removed if the body raises. When an
    existing ``target`` is replaced, it is moved aside first and put back if
    the new folder cannot take its place.

    Raises:
        DiJiangError: ``target`` exists (and not ``overwrite``), or is a file.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise DiJiangError(f"{target}: already exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise DiJiangError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "partial")
    os.mkdir(tmp, 0o777)
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = _sibling(target, "old")
            target.rename(old)
            try:
                tmp.rename(target)
            except BaseException:
                old.rename(target)
                raise
            _fsync_path(target.parent)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
            _fsync_path(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "w") -> Iterator:
    """Open a temporary sibling of ``target`` and rename it over on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        _fsync_path(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def give_new_file_mode(path: str | Path) -> None:
    """Set ``path``'s mode to what a plain new file gets here (0666 less the umask).

    For files that a library creates owner-only (safetensors writes 0600):
    a checkpoint in a shared folder would be unreadable to the team, or to a
    server running as another user, while the config beside it is not. The
    mode is learned from a probe file, since reading the umask means setting it.
    """
    path = Path(path)
    probe = _sibling(path, "mode")
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        path.chmod(probe.stat().st_mode & 0o777)
    finally:
        probe.unlink()
