"""What every command shares: the root typer app, the consoles, the options several commands take, one-line
errors, JSON output and progress bars. Kept light (typer only): every command's start-up pays for it."""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from clipengine.errors import ClipEngineError, FallbackNotice
from clipengine.index.location import INDEX_DIR_ENV
from clipengine.models import ModelSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Index a folder of images with a CLIP model and search it by text or by image.",
)


class LazyConsole:
    """A rich Console made on first use: `search` prints plain lines and never needs rich, whose import
    costs ~30 ms of a command that should take a third of a second."""

    def __init__(self, stderr: bool = False):
        self._stderr = stderr
        self._console: Any = None  # rich's Console, imported on first use

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(stderr=self._stderr, highlight=False, soft_wrap=True)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


out = LazyConsole()
err = LazyConsole(stderr=True)

IndexArg = Annotated[str, typer.Option("--index", "-i", help="Index name (kept in the index directory) or a path.")]
IndexDirArg = Annotated[Path | None, typer.Option(
    "--index-dir", envvar=INDEX_DIR_ENV, help="Where named indexes live (default: the checkout's indexes/; installed, the platform's data directory).")]
ModelArg = Annotated[str | None, typer.Option(
    "--model", "-m", help="open_clip architecture, e.g. ViT-B-32, or a shipped config such as tiny.")]
PretrainedArg = Annotated[str | None, typer.Option(
    "--pretrained", help="Pretrained tag of the architecture, or a local weights file (.safetensors/.pt/.bin).")]
CheckpointArg = Annotated[Path | None, typer.Option("--checkpoint", help="A checkpoint directory.")]
PreprocessFromArg = Annotated[str | None, typer.Option(
    "--preprocess-from", help="With a local weights file: the pretrained tag whose preprocessing it uses.")]
DeviceArg = Annotated[str | None, typer.Option("--device", help="cpu, cuda, cuda:N or mps (default: auto).")]
JsonArg = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
MemoryBudgetArg = Annotated[str | None, typer.Option(
    "--memory-budget", help="Memory the search structure may take, e.g. 4GB (default: half the RAM); "
                            "the most accurate faiss index that fits is chosen and tuned.")]
FaissArg = Annotated[str | None, typer.Option(
    "--faiss", help="A faiss index_factory string, e.g. 'IVF4096,PQ64', instead of the automatic choice.")]
QuantizeArg = Annotated[str | None, typer.Option(
    "--quantize", help="int8: also export int8 query encoders, used by default only if their measured "
                       "recall@10 change on the index's own vectors is within 0.5 points.")]
TargetRecallArg = Annotated[float | None, typer.Option(
    help="recall@10 against exact search that the search depth is tuned to reach (default 0.95).")]


def model_spec(model: str | None, pretrained: str | None, checkpoint: Path | None, preprocess_from: str | None) -> ModelSpec:
    return ModelSpec(model, pretrained, str(checkpoint) if checkpoint else None, preprocess_from)


def user_errors(command: Callable) -> Callable:
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.ERROR)  # open_clip logs routine notices as root warnings
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module="open_clip")
                warnings.simplefilter("always", FallbackNotice)
                warnings.showwarning = show_notice
                return command(*args, **kwargs)
        except ClipEngineError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: committed progress is kept; run the same command again to carry on", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    """Library notices (FallbackNotice) as one line on stderr; other warnings as Python shows them."""
    if issubclass(category, FallbackNotice):
        err.print(f"note: {message}", markup=False)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def progress_bar(*columns: Any):
    """A transient progress bar on stderr, shown only on a terminal. `columns` are rich column objects or
    strings (text columns); a bar, a count and the time remaining are added around them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    first, *rest = [TextColumn(c) if isinstance(c, str) else c for c in columns]
    return Progress(first, BarColumn(), MofNCompleteColumn(), *rest, TimeRemainingColumn(), console=err.console,
                    transient=True, disable=not err.is_terminal)


def rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} img/s" if task.speed else "", style="progress.data.speed")

    return RateColumn()


def stage_progress(prefix: str = "") -> tuple[Any, Callable[[str, int, int], None]]:
    progress = progress_bar("{task.description}")
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"{prefix}{stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return progress, on_progress


def policy_from_options(memory_budget: str | None, factory: str | None, target_recall: float | None):
    from clipengine.index.faiss_view import FaissPolicy
    from clipengine.sizes import parse_size

    return FaissPolicy(parse_size(memory_budget, "--memory-budget") if memory_budget else None, factory, target_recall)


def list_skipped(skipped: list[tuple[str, str]], limit: int, rest: str, verb: str = "skipped") -> None:
    """The files a command could not use, one line each with the reason, at most `limit` of them; `rest` says
    where the others are listed (`... and N more {rest}`)."""
    for path, reason in skipped[:limit]:
        out.print(f"  {verb} {path}: {reason}", markup=False)
    if len(skipped) > limit:
        out.print(f"  ... and {len(skipped) - limit} more {rest}", markup=False)


def counted(n: int, thing: str) -> str:
    """'1 video', '2 videos', '1,204 frames'."""
    return f"{n:,} {thing}" if n == 1 else f"{n:,} {thing}s"


# what a search or `duplicates` keeps (clipengine.index.filters)
AfterArg = Annotated[str | None, typer.Option(
    help="Only files taken at or after this (2023, 2023-06, 2023-06-14 or 2023-06-14T10:30, UTC; a file "
         "that says nothing counts by its modification time).")]
BeforeArg = Annotated[str | None, typer.Option(help="Only files taken before this (as --after).")]
CameraArg = Annotated[list[str] | None, typer.Option(
    help="Only files from a camera whose make and model contain this, e.g. 'Pixel 7'. Repeatable (any of them).")]
KindArg = Annotated[list[str] | None, typer.Option(help="Only images, or only videos. Repeatable.")]
ExtArg = Annotated[list[str] | None, typer.Option(help="Only files with this extension, e.g. png. Repeatable.")]
PlaceArg = Annotated[list[str] | None, typer.Option(
    help="Only files taken at a place of this name: a town or city district, region or country (whole words, any "
         "case or accents). Repeatable (any of them).")]
NearArg = Annotated[str | None, typer.Option(
    help="Only files taken within a distance of a position: LAT,LON,RADIUS with km, m or mi, e.g. 48.85,2.35,20km.")]
MinSizeArg = Annotated[str | None, typer.Option(help="Only files of at least this many pixels: 12MP or 1920x1080.")]
MaxSizeArg = Annotated[str | None, typer.Option(help="Only files of at most this many pixels (as --min-size).")]
OfflineArg = Annotated[bool, typer.Option("--include-offline", help="Also the files of folders whose drive is away "
                                          "(`info` lists them), which are left out otherwise.")]
