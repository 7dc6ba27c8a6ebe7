"""The README's picture of `clipengine search --preview`: the demo's index (run `make demo` first), searched with
half-block previews, the terminal's output captured and drawn as SVG by rich (as a tmux capture would show it).

    .venv/bin/python scripts/screenshot_preview.py [--index demo-scenes] [--query "two small red circles"] [--out docs/preview.svg]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", default="demo-scenes")
    parser.add_argument("--query", default="two small red circles")
    parser.add_argument("--out", default=str(ROOT / "docs" / "preview.svg"))
    args = parser.parse_args()
    command = ["clipengine", "search", args.query, "--index", args.index, "-k", "3", "--preview=blocks"]
    env = {**os.environ, "COLUMNS": "96"}
    run = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=env, check=True)
    console = Console(record=True, width=96, force_terminal=True, color_system="truecolor", file=open(os.devnull, "w"))
    console.print(Text("$ " + " ".join(c if " " not in c else repr(c) for c in command), style="bold"))
    console.print(Text.from_ansi(run.stdout))
    console.save_svg(args.out, title="clipengine search --preview")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
