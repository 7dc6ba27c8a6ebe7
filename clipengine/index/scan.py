"""Walk a folder and decide what an index must do about it: embed, reuse, drop, or leave alone.

Only `stat` is used here, never a decoder or a hash, so that re-running over an unchanged folder of
ten thousand photos costs a directory walk and one database read. A file counts as unchanged when its
size and modification time (in nanoseconds) match what the index recorded.

Symbolic links are followed (people link their photo folders together), with every directory visited
once by (device, inode), so a link back up the tree cannot loop. What cannot be read (a broken link,
a link loop, an unreadable directory) is reported as a problem rather than silently dropped, so that
`clipengine info` can list it. Every other entry the walk passes over (a file of another kind, a hidden
file or folder) is counted by kind, so that nothing is silently ignored: `index` and `info` say how many
of each were not indexed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from clipengine.formats import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from clipengine.index.store import Recorded


@dataclass(frozen=True)
class FoundFile:
    path: str  # absolute, as reached through the folder (links are not resolved)
    size: int
    mtime_ns: int
    problem: str | None = None  # why it cannot be read at all, e.g. "broken symbolic link"


@dataclass
class Plan:
    to_embed: list[FoundFile] = field(default_factory=list)  # new or changed: decode (or reuse by hash)
    problems: list[FoundFile] = field(default_factory=list)  # new unreadable entries, recorded as skips
    remove_ids: list[int] = field(default_factory=list)  # gone, or changed (their old rows)
    unchanged: int = 0
    changed: int = 0

    @property
    def is_noop(self) -> bool:
        return not (self.to_embed or self.problems or self.remove_ids)


def _problem(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "symbolic link loop"
    if e.errno == errno.ENOENT:
        return "broken symbolic link"
    if e.errno == errno.EACCES:
        return "permission denied"
    return f"cannot read ({e.strerror or e})"


HIDDEN = "hidden"  # what a hidden file or folder passed over counts as
NO_EXTENSION = "no extension"
NOT_A_FILE = "not a regular file"  # a socket, a pipe, a device named like an image


def describe_not_indexed(counts: Mapping[str, int]) -> str:
    """One line for what a walk passed over, grouped by why: '1,204 .xmp, 31 .pdf (no decoder); 908 .mp4
    (--no-video); 3 hidden (--include-hidden indexes them)'."""
    why: dict[str, list[str]] = {}
    for kind, n in counts.items():
        reason = ("--include-hidden indexes them" if kind == HIDDEN else
                  "--no-video" if kind in VIDEO_EXTENSIONS else
                  "sockets, pipes or devices" if kind == NOT_A_FILE else "no decoder")
        why.setdefault(reason, []).append(f"{n:,} {'with no extension' if kind == NO_EXTENSION else kind}")
    return "; ".join(f"{', '.join(kinds)} ({reason})" for reason, kinds in why.items())


def kind_of(name: str) -> str:
    """How a file passed over is counted: its extension in lower case ('.xmp'), or NO_EXTENSION."""
    return os.path.splitext(name)[1].lower() or NO_EXTENSION


def scan_folder(root: str | os.PathLike, *, include_hidden: bool = False, videos: bool = True,
                passed_over: Counter[str] | None = None) -> Iterator[FoundFile]:
    """Every image file (and video file, unless not `videos`) under `root`, by extension, depth first, in
    sorted order; what else it passes over is counted into `passed_over` by kind (`kind_of`, or HIDDEN).

    Hidden files and folders (names starting with '.') are left out unless `include_hidden`; they are
    thumbnails caches, version control and macOS '._' metadata files far more often than photos.
    """
    passed = passed_over if passed_over is not None else Counter()
    wanted = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS
    top = os.path.abspath(os.fspath(root))
    seen_dirs: set[tuple[int, int]] = set()
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield FoundFile(directory, 0, 0, f"directory {_problem(e)}")
            continue
        subdirs = []
        for entry in entries:
            if not include_hidden and entry.name.startswith("."):
                passed[HIDDEN] += 1
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subdirs.append(entry.path)
                continue
            kind = kind_of(entry.name)
            if kind not in wanted:
                passed[kind] += 1
                continue
            found = _found(entry.path, entry.stat)
            if found == NOT_A_FILE:
                passed[NOT_A_FILE] += 1
            elif isinstance(found, FoundFile):
                yield found
        stack.extend(reversed(subdirs))


def found_file(path: str, *, videos: bool = True) -> FoundFile | None:
    """The one file at `path` as `scan_folder` would find it (a watcher's changed path), or None when there is
    none to index there: gone, a folder, or not a file of a wanted kind."""
    wanted = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS if videos else IMAGE_EXTENSIONS
    if kind_of(path) not in wanted or os.path.isdir(path):
        return None
    found = _found(path, lambda follow_symlinks: os.stat(path, follow_symlinks=follow_symlinks))
    return found if isinstance(found, FoundFile) else None


def _found(path: str, stat_of: Callable[..., os.stat_result]) -> FoundFile | str | None:
    """A file of a wanted kind: found (with its problem, if it cannot be read), NOT_A_FILE, or None when it was
    deleted while we looked (nothing to record)."""
    try:
        st = stat_of(follow_symlinks=True)
    except OSError as e:
        try:
            lst = stat_of(follow_symlinks=False)
        except OSError:
            return None
        return FoundFile(path, lst.st_size, lst.st_mtime_ns, _problem(e))
    return FoundFile(path, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else NOT_A_FILE


def plan_update(
    found: Iterator[FoundFile], recorded: Mapping[str, Recorded], *, retry_skipped: bool = False
) -> Plan:
    """Compare a scan with what the index recorded under the same root.

    A changed file is planned as a removal of its old row plus a new embedding: rows (and so faiss
    ids) are never rewritten in place, which is what lets the faiss index be synced by id sets alone.
    """
    plan = Plan()
    remaining = dict(recorded)
    for f in found:
        old = remaining.pop(f.path, None)
        if old is not None:
            same = old.size == f.size and old.mtime_ns == f.mtime_ns
            if same and not (retry_skipped and old.skipped):
                plan.unchanged += 1
                continue
            plan.remove_ids.append(old.id)
            plan.changed += 1
        (plan.problems if f.problem else plan.to_embed).append(f)
    plan.remove_ids.extend(r.id for r in remaining.values())
    return plan
