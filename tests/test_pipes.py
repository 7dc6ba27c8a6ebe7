"""Everything pipes: --paths-only on the commands that list files, no colour or progress when stdout is not a
terminal, NO_COLOR honoured when it is, and the exit codes the README documents. The terminal cases run the
CLI under a pseudo-terminal, as a user's shell runs it."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_bad_inputs, write_photos

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "clipengine"]


def in_terminal(args: list[str], env: dict | None = None) -> tuple[int, bytes]:
    """Run the CLI with stdout and stderr on a pseudo-terminal; returns (exit code, everything it wrote)."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(CLI + args, stdout=follower, stderr=follower, stdin=subprocess.DEVNULL,
                               env={**os.environ, "COLUMNS": "100", **(env or {})})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    return process.wait(timeout=120), output


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, _export_cache) -> tuple[Path, Path, dict[str, str]]:
    """An index of 12 photos, a copy of one, and the awkward files of a real collection (some skipped)."""
    root = tmp_path_factory.mktemp("pipes")
    folder = write_photos(root / "photos")
    (folder / "again").mkdir()
    first = sorted(folder.rglob("*.jpg"))[0]
    (folder / "again" / first.name).write_bytes(first.read_bytes())
    expected = write_bad_inputs(folder / "bad")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CLIPENGINE_CACHE_DIR", str(_export_cache))
        run = subprocess.run(CLI + ["index", str(folder), "--index", str(root / "idx"), "--model", "tiny", "--workers",
                                    "0", "--paths-only"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    skipped = run.stdout.splitlines()
    assert skipped and all(Path(p).is_absolute() for p in skipped)
    assert sorted(Path(p).name for p in skipped) == sorted(name for name, outcome in expected.items() if outcome != "ok")
    assert run.stderr == ""  # no progress bar, no colour: stderr is not a terminal
    return root / "idx", folder, expected


def test_paths_only_lists_files_and_nothing_else(indexed):
    index, folder, _ = indexed
    info = subprocess.run(CLI + ["info", "--index", str(index), "--paths-only"], capture_output=True, text=True)
    listed = json.loads(subprocess.run(CLI + ["info", "--index", str(index), "--json"], capture_output=True,
                                       text=True).stdout)["skipped_files"]
    assert info.stdout.splitlines() == [s["path"] for s in listed]
    search = subprocess.run(CLI + ["search", "a photo", "--index", str(index), "-k", "4", "--paths-only"],
                            capture_output=True, text=True)
    assert len(search.stdout.splitlines()) == 4 and all(Path(p).is_file() for p in search.stdout.splitlines())
    dups = subprocess.run(CLI + ["duplicates", "--index", str(index), "--threshold", "0.9999", "--paths-only"],
                          capture_output=True, text=True)
    groups = [line.split("\t") for line in dups.stdout.splitlines()]
    first = sorted(folder.rglob("*.jpg"))[0]
    assert dups.returncode == 0 and groups and all(len(group) >= 2 for group in groups)
    assert [str(first), str(folder / "again" / first.name)] in [sorted(group) for group in groups]


def test_no_colour_or_progress_off_a_terminal_and_with_no_color(indexed, tmp_path):
    index, folder, _ = indexed
    more = tmp_path / "more"
    write_photos(more)
    code, shown = in_terminal(["index", str(more), "--index", str(tmp_path / "idx"), "--model", "tiny", "--workers", "0"])
    assert code == 0 and b"\x1b[3" in shown  # on a terminal: a coloured progress bar
    code, plain = in_terminal(["index", str(more), "--index", str(tmp_path / "idx2"), "--model", "tiny", "--workers",
                               "0"], env={"NO_COLOR": "1"})
    assert code == 0 and b"\x1b[3" not in plain and b"\x1b[1m" not in plain  # NO_COLOR: no colour, no bold
    code, again = in_terminal(["index", str(more), "--index", str(tmp_path / "idx")])  # nothing new: no torch
    assert code == 0 and b"\x1b[" in again  # what this prints is styled on a terminal...
    piped = subprocess.run(CLI + ["index", str(more), "--index", str(tmp_path / "idx")], capture_output=True)
    assert piped.returncode == 0 and b"\x1b" not in piped.stdout + piped.stderr  # ...and plain text off one


def test_exit_codes(indexed, tmp_path):
    index, _, _ = indexed
    assert subprocess.run(CLI + ["search", "x", "--index", str(tmp_path / "none")], capture_output=True).returncode == 1
    assert subprocess.run(CLI + ["search", "x", "--index", str(index), "-k", "nine"], capture_output=True).returncode == 2
    assert subprocess.run(CLI + ["search", "x", "--index", str(index), "-k", "2"], capture_output=True).returncode == 0


def test_every_command_that_reports_has_json():
    """--json on every command that prints a result (serve prints only where it listens)."""
    from typer.main import get_command

    from clipengine.cli import app

    group = get_command(app)
    commands = {name: cmd for name, cmd in group.commands.items()}  # type: ignore[attr-defined]
    bench = commands.pop("bench")
    commands.update({f"bench {n}": c for n, c in bench.commands.items()})
    without = sorted(name for name, cmd in commands.items() if "--json" not in [o for p in cmd.params for o in p.opts])
    assert without == ["serve"], without
