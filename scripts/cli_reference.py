"""Write docs/cli.md, the reference of every `clipengine` command, from the typer app itself: each command's
help, arguments and options with their defaults. Generated, so it cannot drift from the code
(tests/test_docs.py fails when the file is stale).

    python scripts/cli_reference.py          # writes docs/cli.md
    python scripts/cli_reference.py --check  # exit 1 if docs/cli.md is stale
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import typer

PAGE = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def _is_group(command) -> bool:
    return hasattr(command, "list_commands")  # typer carries its own click: classes are not to be named


def _commands(group, prefix: str) -> list[tuple[str, object]]:
    found: list[tuple[str, object]] = []
    ctx = typer.Context(group)
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        full = f"{prefix} {name}"
        if _is_group(command):
            found += [(full, command), *_commands(command, full)]
        else:
            found.append((full, command))
    return found


def _option_row(param, ctx: typer.Context) -> str:
    record = param.get_help_record(ctx) if param.param_type_name == "option" else None
    if record is None:  # an argument
        return f"| `{param.human_readable_name}` | {getattr(param, 'help', None) or ''} |"
    names, text = record
    return f"| `{names}` | {' '.join(text.split()).replace('|', '&#124;')} |"


def reference() -> str:
    from clipengine.cli import app

    root = typer.main.get_command(app)
    lines = ["# Command reference", "",
             "Generated from the command line itself by `python scripts/cli_reference.py`; do not edit it by hand. "
             "Every command also takes `--help`. Errors are one line on stderr with exit code 1 (2 for a malformed "
             "command line, 130 after Ctrl-C).", ""]
    for name, command in _commands(root, "clipengine"):
        ctx = typer.Context(command, info_name=name)
        lines += [f"## `{name}`", "", inspect.cleandoc(command.help or ""), ""]
        if _is_group(command):
            continue
        lines += [f"```\n{' '.join(command.collect_usage_pieces(ctx))}\n```".replace("\n", f"\n{name} ", 1), ""]
        rows = [_option_row(p, ctx) for p in command.get_params(ctx) if p.name != "help"]
        if rows:
            lines += ["| argument or option | meaning |", "|---|---|", *rows, ""]
    return "\n".join(lines)


def main() -> None:
    text = reference()
    if "--check" in sys.argv:
        if not PAGE.is_file() or PAGE.read_text() != text:
            sys.exit(f"{PAGE} is stale: run python scripts/cli_reference.py")
        return
    PAGE.write_text(text)
    print(f"written {PAGE}")


if __name__ == "__main__":
    main()
