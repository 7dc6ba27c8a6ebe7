"""The `clipengine` command: parse, call the library, print. No logic lives here.

One module per area, each adding its commands to the one root app (`common.app`): `index` (index, reindex,
info, export, index-texts), `search` (search, duplicates, label), `serve`, `train` (train, scenes, models)
and `bench` (a sub-app). What they share (consoles, options, one-line errors, JSON, progress) is `common`.
Every user mistake surfaces as a one-line `error: ...` on stderr and exit code 1 (2 for a malformed command
line, 130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import os
import sys

from clipengine.cli import bench, index, search, serve, train  # noqa: F401  (each adds its commands to the app)
from clipengine.cli.common import app

__all__ = ["app", "main"]


# These commands leave with os._exit once their output is flushed: Python's orderly shutdown of faiss,
# onnxruntime and numpy takes ~75 ms (measured), a quarter of a cold `search`, and they have nothing to clean up
# (`index` has committed and closed everything it wrote, its decode pool included, before it prints).
FAST_EXIT_COMMANDS = ("search", "info", "index")


def _bare_preview(argv: list[str]) -> list[str]:
    """`--preview` alone means --preview=auto (typer has no option with an optional value)."""
    from clipengine.preview import PROTOCOLS

    return [a + "=auto" if a == "--preview" and (i + 1 == len(argv) or argv[i + 1] not in (*PROTOCOLS, "auto"))
            else a for i, a in enumerate(argv)]


def main() -> None:
    sys.argv = _bare_preview(sys.argv)
    fast_exit = len(sys.argv) > 1 and sys.argv[1] in FAST_EXIT_COMMANDS
    try:
        app()
    except SystemExit as e:
        if not fast_exit:
            raise
        code = e.code if isinstance(e.code, int) else (e.code is not None)
        if isinstance(e.code, str):
            sys.stderr.write(e.code + "\n")
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except BrokenPipeError:  # the reader (`| head`) has gone: nothing left to say
            pass
        os._exit(code)


if __name__ == "__main__":
    main()
