"""Files that survive a crash at any moment: the one way clipengine writes a file (or a directory of files)
that something will read after a `kill -9` or a power cut.

A file is written under a temporary name beside its final one, its bytes are fsynced, it is renamed over
the final name (atomic on POSIX), and the directory is fsynced so that the rename itself is on disk. A
reader therefore sees the old file or the new one, never a half-written one. Every caller gets this, the
strongest durability any of them needs (the index's faiss view and manifest, checkpoints, part files,
service announcements, caches): the fsyncs cost milliseconds, and one routine is one thing to get right.

Temporary names carry the writer's pid (`.NAME.tmp-PID-RANDOM`), so that a leftover of a killed writer can
be told from the work of a live one (`abandoned`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def temporary_name(final: Path) -> Path:
    """A fresh name beside `final` for writing it aside: hidden, and marked with this process's pid."""
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    if path.is_dir():
        for child in path.iterdir():
            _fsync_tree(child)
        fsync_dir(path)
    else:
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def replace_durably(tmp: Path, final: Path, *, exclusive: bool = False) -> None:
    """Put `tmp` (a file, or a directory of files) in place of `final`, durably: its bytes are on disk before
    the rename, and the rename is on disk before this returns. A directory `final` is replaced whole;
    `exclusive` refuses to replace anything (FileExistsError), for creating a thing that must not exist."""
    _fsync_tree(tmp)
    if exclusive and final.exists():
        raise FileExistsError(final)
    if tmp.is_dir() and final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextlib.contextmanager
def replacing(final: Path) -> Iterator[Path]:
    """Write `final` aside: yields a temporary path to fill (as a file, or as a directory), which replaces
    `final` durably when the block ends, and is removed if the block fails."""
    tmp = temporary_name(final)
    try:
        yield tmp
        replace_durably(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Write `data` to `path` durably; `mode` applies from the first byte (0o600 for a file with a secret)."""
    with replacing(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


def write_json_atomic(path: Path, obj: object, mode: int = 0o644) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", mode)


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (one we may not signal counts: it is alive)."""
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
    except (TypeError, ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def abandoned(tmp: Path) -> bool:
    """Whether a temporary file or directory made by `temporary_name` was left by a writer that has died."""
    _, mark, rest = tmp.name.rpartition(TMP_MARK)
    return bool(mark) and not pid_alive(rest.split("-", 1)[0])


def remove_abandoned(directory: Path, pattern: str = "*") -> int:
    """Delete the temporaries (matching `pattern`) that killed writers left in `directory`; returns how many."""
    removed = 0
    for tmp in directory.glob(f".{pattern}{TMP_MARK}*"):
        if abandoned(tmp):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed += 1
    return removed
