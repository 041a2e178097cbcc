"""Atomic outputs: fsynced before they appear, the original back if a replacement fails, no umask juggling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dijiang_deploy.contract import atomic
from dijiang_deploy.contract.atomic import atomic_dir, atomic_file
from dijiang_deploy.contract.errors import DiJiangError


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_replacement_puts_the_original_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("original")
    real_rename = Path.rename

    def rename(self, dest):
        if self.name.startswith(".out.partial-"):
            raise OSError("disk went away")
        return real_rename(self, dest)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk went away"):
        with atomic_dir(target, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("new")
    assert _tree(target) == {"a.txt": b"original"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "nothing hidden or half-written is left"


def test_the_umask_is_never_touched_and_modes_follow_it(tmp_path, monkeypatch):
    old = os.umask(0o027)
    try:
        def no_umask(mask):
            raise AssertionError("os.umask changes a process-wide setting other threads rely on")

        monkeypatch.setattr(os, "umask", no_umask)
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
        with atomic_file(tmp_path / "file.txt") as fh:
            fh.write("y")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o640


def test_contents_and_folders_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "w.bin").write_bytes(b"123")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_bytes(b"4")
    assert any(p.endswith("/w.bin") for p in synced) and any(p.endswith("/sub/x") for p in synced)
    assert any(".out.partial-" in p and p.endswith("/sub") for p in synced), "folders too"
    assert str(tmp_path) in synced, "the parent folder, after the rename"
    synced.clear()
    with atomic_file(tmp_path / "f.txt") as fh:
        fh.write("z")
    assert any(".f.txt.partial-" in p for p in synced) and str(tmp_path) in synced


def test_a_failing_body_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "f.txt") as fh:
            fh.write("half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DiJiangError, match="already exists"):
        (tmp_path / "x").mkdir()
        with atomic_dir(tmp_path / "x"):
            pass
