"""The `clipengine` command: parse, call the library, print. No logic lives here.

Every user mistake surfaces as a one-line `error: ...` on stderr and exit code 1 (2 for a malformed
command line, 130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from clipengine.errors import ClipEngineError, FallbackNotice
from clipengine.index.location import INDEX_DIR_ENV, resolve_index_path
from clipengine.models import ModelSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Index a folder of images with a CLIP model and search it by text or by image.",
)


class _LazyConsole:
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


out = _LazyConsole()
err = _LazyConsole(stderr=True)

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


def _spec(model: str | None, pretrained: str | None, checkpoint: Path | None, preprocess_from: str | None) -> ModelSpec:
    return ModelSpec(model, pretrained, str(checkpoint) if checkpoint else None, preprocess_from)


def _user_errors(command: Callable) -> Callable:
    """Turn the errors a user can cause into one line on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        logging.basicConfig(level=logging.ERROR)  # open_clip logs routine notices as root warnings
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", module="open_clip")
                warnings.simplefilter("always", FallbackNotice)
                warnings.showwarning = _show_notice
                return command(*args, **kwargs)
        except ClipEngineError as e:
            err.print(f"error: {e}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("interrupted: committed progress is kept; run the same command again to carry on", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def _show_notice(message, category, filename, lineno, file=None, line=None) -> None:
    """Library notices (FallbackNotice) as one line on stderr; other warnings as Python shows them."""
    if issubclass(category, FallbackNotice):
        err.print(f"note: {message}", markup=False)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _progress(*columns: Any):
    """A transient progress bar on stderr, shown only on a terminal. `columns` are rich column objects or
    strings (text columns); a bar, a count and the time remaining are added around them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    first, *rest = [TextColumn(c) if isinstance(c, str) else c for c in columns]
    return Progress(first, BarColumn(), MofNCompleteColumn(), *rest, TimeRemainingColumn(), console=err.console,
                    transient=True, disable=not err.is_terminal)


def _rate_column():
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} img/s" if task.speed else "", style="progress.data.speed")

    return RateColumn()


@app.command()
@_user_errors
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of images to index (searched recursively).")],
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    model: ModelArg = None,
    pretrained: PretrainedArg = None,
    checkpoint: CheckpointArg = None,
    preprocess_from: PreprocessFromArg = None,
    device: DeviceArg = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per model call (default: 32 on CPU, 256 on GPU).")] = None,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: by device and cores).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch threads for the model on the CPU.")] = None,
    commit_every: Annotated[int, typer.Option(help="Commit progress every N files.")] = 256,
    max_pixels: Annotated[str | None, typer.Option(
        help="Skip images needing more decoded pixels than this (default: 200M).")] = None,
    exact_decode: Annotated[bool, typer.Option(help="Decode JPEGs at full size (slower; exact open_clip preprocessing).")] = False,
    include_hidden: Annotated[bool, typer.Option(help="Also index hidden files and folders.")] = False,
    retry_skipped: Annotated[bool, typer.Option(help="Try previously skipped files again.")] = False,
    rebuild: Annotated[bool, typer.Option(help="Delete the index and build it again from scratch.")] = False,
    memory_budget: MemoryBudgetArg = None,
    faiss_factory: FaissArg = None,
    target_recall: TargetRecallArg = None,
    export: Annotated[bool | None, typer.Option(
        "--export/--no-export", help="Export the query encoders that let searches start without torch "
                                     "(default: when the index is created).")] = None,
    quantize: QuantizeArg = None,
    runtime: Annotated[str | None, typer.Option(
        help="What embeds the images: torch, or onnx (the index's exported image tower). Default: on a CPU, "
             "whichever measured faster on this machine; on a GPU, torch.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="With --runtime onnx: fp32 (default) or int8 (exported with --quantize int8).")] = None,
    paths_only: Annotated[bool, typer.Option(
        help="Print only the paths of the files this run skipped, one per line (for piping).")] = False,
    as_json: JsonArg = False,
) -> None:
    """Embed every image under FOLDER into an index, incrementally: only new and changed files are embedded.

    Under torchrun, each process embeds its own share of the files and rank 0 merges them."""
    from clipengine.index.pipeline import IndexOptions, index_folder
    from clipengine.index.query_encoders import describe_encoders
    from clipengine.sizes import DEFAULT_MAX_PIXELS, parse_size

    if threads:
        import torch

        torch.set_num_threads(threads)
    pixels = parse_size(max_pixels, "--max-pixels", pixels=True) if max_pixels else DEFAULT_MAX_PIXELS
    options = IndexOptions(device=device, batch_size=batch_size, workers=workers, commit_every=commit_every,
                           max_pixels=pixels, exact_decode=exact_decode, include_hidden=include_hidden,
                           retry_skipped=retry_skipped, rebuild=rebuild,
                           faiss_policy=_faiss_policy(memory_budget, faiss_factory, target_recall),
                           export=export, quantize=quantize, runtime=runtime, precision=precision)
    progress = _progress("embedding", _rate_column())
    task = progress.add_task("embedding", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    stages, on_stage = _stage_progress()
    with progress, stages:
        report = index_folder(folder, resolve_index_path(index_name, index_dir),
                              _spec(model, pretrained, checkpoint, preprocess_from), options,
                              progress=on_progress, build_progress=on_stage)
    if report is None:  # a torchrun process other than rank 0: rank 0 reports for the job
        return
    if as_json:
        _print_json(report.to_dict())
        return
    if paths_only:
        sys.stdout.write("".join(skip["path"] + "\n" for skip in report.skips))
        return
    out.print(f"index {report.index}  ({report.model})", markup=False)
    rate = f" at {report.images_per_second:.1f} images/s with {report.runtime}" if report.embedded else ""
    out.print(f"  embedded {report.embedded}{rate}, reused {report.reused}, skipped {report.skipped}, "
              f"removed {report.removed}, unchanged {report.unchanged}", markup=False)
    for skip in report.skips[:20]:
        out.print(f"  skipped {skip['path']}: {skip['reason']}", markup=False)
    if len(report.skips) > 20:
        out.print(f"  ... and {len(report.skips) - 20} more skipped (see `clipengine info`)", markup=False)
    out.print(f"  {report.count} images searchable ({report.seconds:.1f} s)", markup=False)
    if report.faiss:
        out.print(f"  search: {report.faiss.describe()}", markup=False)
    if report.query_encoders:
        out.print(f"  queries: {describe_encoders(report.query_encoders)}", markup=False)
    for advice in report.advice:
        out.print(f"  advice: {advice}", markup=False)


def _faiss_policy(memory_budget: str | None, factory: str | None, target_recall: float | None):
    from clipengine.index.faiss_view import FaissPolicy
    from clipengine.sizes import parse_size

    return FaissPolicy(parse_size(memory_budget, "--memory-budget") if memory_budget else None, factory, target_recall)


@app.command()
@_user_errors
def reindex(
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    memory_budget: MemoryBudgetArg = None,
    faiss_factory: FaissArg = None,
    target_recall: TargetRecallArg = None,
    as_json: JsonArg = False,
) -> None:
    """Retrain and re-tune the search structure from the stored vectors (no image is read again)."""
    from clipengine.index.faiss_view import reindex as reindex_index
    from clipengine.index.info import index_info

    path = resolve_index_path(index_name, index_dir)
    stages, on_stage = _stage_progress()
    with stages:
        reindex_index(path, _faiss_policy(memory_budget, faiss_factory, target_recall), progress=on_stage)
    report = index_info(path)
    if as_json:
        _print_json(report.to_dict())
        return
    out.print(f"index {report.path}: {report.count:,} vectors", markup=False)
    out.print(f"  search: {report.faiss.describe()}", markup=False)


@app.command()
@_user_errors
def search(
    query: Annotated[str | None, typer.Argument(
        help="Text to search for; or an image file, or id:N (an indexed image); WEIGHT:... weighs it.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Find images like this one.")] = None,
    vector: Annotated[Path | None, typer.Option("--vector", help="A query embedding saved as .npy.")] = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", help="Add a term to the query: text, an image file or id:N, with an optional WEIGHT: prefix. Repeatable.")] = None,
    subtract: Annotated[list[str] | None, typer.Option(
        "--subtract", help="Subtract a term from the query (as --add). Repeatable.")] = None,
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="How many results.")] = 10,
    prefix: Annotated[str | None, typer.Option(help="Only results whose path starts with this.")] = None,
    model: ModelArg = None,
    pretrained: PretrainedArg = None,
    checkpoint: CheckpointArg = None,
    device: DeviceArg = None,
    runtime: Annotated[str | None, typer.Option(
        help="onnx: the index's exported query encoders (default; no torch, a fraction of a second); "
             "torch: the model itself.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp32 or int8 query encoders (default: int8 only where its measured recall change is within 0.5 points).")] = None,
    paths_only: Annotated[bool, typer.Option(help="Print only the paths, one per line (for piping).")] = False,
    preview: Annotated[str | None, typer.Option(
        "--preview",
        help="Show each hit's thumbnail in the terminal: --preview picks the best way the terminal supports; "
             "--preview=kitty|iterm|sixel|blocks chooses.")] = None,
    as_json: JsonArg = False,
) -> None:
    """Search an index by text, by image, or by a raw embedding vector; or by a sum of terms:
    `search "a cat" --add "in the snow" --subtract indoors`, `search "2:a red car" --add ./query.jpg`."""
    from clipengine.errors import BadInput
    from clipengine.index.hits import path_prefix
    from clipengine.index.terms import Term, parse_term, parse_terms

    if sum(x is not None for x in (query, image, vector)) != 1:
        raise BadInput("give exactly one query: TEXT, --image PATH or --vector FILE.npy")
    from clipengine.preview import PROTOCOLS

    if preview not in (None, "auto", *PROTOCOLS):
        raise typer.BadParameter(f"'{preview}': choose one of {', '.join(PROTOCOLS)} (or none, to detect)",
                                 param_hint="--preview")
    terms = None
    if add or subtract or (query is not None and query.strip() and parse_term(query) != Term(text=query)):
        if vector is not None:
            raise BadInput("--add and --subtract combine texts and images, not --vector")
        terms = parse_terms(query, add or [], subtract or [])
        if image is not None:
            terms.insert(0, Term(image=str(image)))
    path = resolve_index_path(index_name, index_dir)
    where = path_prefix(prefix) if prefix else None
    q = None
    if vector is not None:
        import numpy as np

        try:
            q = np.load(vector, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot read query vector {vector}: {e}") from None
    hits = None
    if terms is None and (runtime, precision, device, model, pretrained, checkpoint) == (None,) * 6:  # as a service would
        from clipengine.index.service import search_through_service

        hits = search_through_service(path, text=query, image=image, vector=q, k=k, prefix=where)
    if hits is None:
        from clipengine.index.search import Searcher

        with Searcher(path, spec=_spec(model, pretrained, checkpoint, None), device=device, runtime=runtime,
                      precision=precision, one_shot=True) as searcher:
            if terms is not None:
                hits = searcher.search_terms(terms, k, where)
            elif query is not None:
                hits = searcher.search_text(query, k, where)
            elif image is not None:
                hits = searcher.search_image(image, k, where)
            else:
                assert q is not None
                hits = searcher.search_vector(q, k, where)
    if as_json:
        _print_json([h.to_dict() for h in hits])
    elif paths_only:
        sys.stdout.write("".join(h.path + "\n" for h in hits))
    elif not hits:
        err.print("no results" + (f" under {where}" if where else ""), markup=False)
    elif preview and (preview != "auto" or out.is_terminal):  # detected only on a terminal; a named one anywhere
        _print_previews(hits, preview)
    else:
        sys.stdout.write("".join(f"{h.rank:>4}  {h.score:+.4f}  {h.path}\n" for h in hits))


def _print_previews(hits: list, preview: str) -> None:
    from rich.console import Console

    from clipengine.images import Decoded, open_image
    from clipengine.preview import detect, show

    protocol = detect() if preview == "auto" else preview
    # a named protocol is written even into a pipe (a pager, a file to cat later), in full colour
    console = out.console if preview == "auto" else Console(force_terminal=True, color_system="truecolor",
                                                            highlight=False, width=out.width)
    width = max(8, min(32, console.width // 3))  # follows the terminal; rich assumes 80 columns where none is reported
    for h in hits:
        decoded = open_image(h.path, draft_size=8 * width)
        if isinstance(decoded, Decoded):
            decoded.image.thumbnail((8 * width, 8 * width))
            show(console, decoded.image, protocol, width)
        console.print(f"{h.rank:>4}  {h.score:+.4f}  {h.path}", markup=False, style=None)


@app.command()
@_user_errors
def serve(
    index_names: Annotated[list[str], typer.Option(
        "--index", "-i", help="Index to serve (name or path); repeat for several, picked on the page.")] = ["default"],  # noqa: B006
    index_dir: IndexDirArg = None,
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback needs --token.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8000,
    token: Annotated[str | None, typer.Option(
        envvar="CLIPENGINE_TOKEN", help="Require this bearer token on every request (open the page as /?token=...).")] = None,
    max_upload: Annotated[str, typer.Option(help="Largest image a search may upload.")] = "64MiB",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
) -> None:
    """Keep indexes open behind an HTTP API and a web page: search them in a browser, or from other programs.

    `clipengine search` on a served index asks the service, which answers in milliseconds."""
    from clipengine.serve.app import ServiceConfig
    from clipengine.serve.server import serve as run_service
    from clipengine.sizes import parse_size

    names = {}
    for name in index_names:
        path = resolve_index_path(name, index_dir)
        names[path.name if path.name not in names else str(path)] = path
    config = ServiceConfig(names, token=token, max_upload=parse_size(max_upload, "--max-upload"))

    def ready(url: str, warnings: list[str]) -> None:
        for warning in warnings:
            err.print(f"warning: {warning}", markup=False)
        err.print(f"serving {', '.join(names)} at {url}  (API docs: {url}/docs; Ctrl-C stops)", markup=False)
        if open_browser:
            import webbrowser

            webbrowser.open(url + (f"/?token={token}" if token else "/"))

    try:
        run_service(config, host, port, on_ready=ready)
    except KeyboardInterrupt:
        err.print("stopped", markup=False)


@app.command()
@_user_errors
def duplicates(
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    threshold: Annotated[float, typer.Option(
        help="Cosine similarity two images need to count as duplicates (1: identical embeddings only).")] = 0.95,
    prefix: Annotated[str | None, typer.Option(help="Only files whose path starts with this.")] = None,
    paths_only: Annotated[bool, typer.Option(help="One group per line, its paths separated by tabs (for piping).")] = False,
    as_json: JsonArg = False,
) -> None:
    """Groups of near-duplicate images, largest first; files with the same bytes are marked exact."""
    from clipengine.index.duplicates import find_duplicates
    from clipengine.index.hits import path_prefix

    stages, on_stage = _stage_progress()
    with stages:
        groups = find_duplicates(resolve_index_path(index_name, index_dir), threshold,
                                 prefix=path_prefix(prefix) if prefix else None, progress=on_stage)
    if as_json:
        _print_json([g.to_dict() for g in groups])
    elif paths_only:
        sys.stdout.write("".join("\t".join(f.path for f in g.files) + "\n" for g in groups))
    else:
        files = sum(g.size for g in groups)
        out.print(f"{len(groups)} groups of near-duplicates ({files} files) at cosine >= {threshold}", markup=False)
        for n, g in enumerate(groups, 1):
            out.print(f"group {n}: {g.size} files" + (" (identical bytes)" if g.exact else ""), markup=False)
            for f in g.files:
                mark = "identical bytes" if f.exact else f"{f.similarity:.4f}"
                out.print(f"  {mark:>15}  {f.path}", markup=False)


@app.command()
@_user_errors
def label(
    image: Annotated[Path, typer.Argument(help="The image to describe.")],
    texts: Annotated[Path | None, typer.Option(
        "--texts", help="Texts to rank: one per line, or a CSV/TSV with a caption column (default: the caption set "
                        "stored in --index by index-texts).")] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="How many texts.")] = 5,
    template: Annotated[list[str] | None, typer.Option(
        "--template", help="Zero-shot prompt with {} for the text, e.g. 'a photo of a {}.'; repeat to average several.")] = None,
    index_name: Annotated[str | None, typer.Option(
        "--index", "-i", help="Use this index's model (and its query encoders: no torch).")] = None,
    index_dir: IndexDirArg = None,
    model: ModelArg = None,
    pretrained: PretrainedArg = None,
    checkpoint: CheckpointArg = None,
    preprocess_from: PreprocessFromArg = None,
    device: DeviceArg = None,
    as_json: JsonArg = False,
) -> None:
    """Texts ranked for an image, with cosine scores: captions, or zero-shot labels with --template."""
    from clipengine.index.label import label_image, read_texts

    labels = label_image(image, read_texts(texts) if texts else None, index=resolve_index_path(index_name, index_dir) if index_name else None,
                         spec=_spec(model, pretrained, checkpoint, preprocess_from), templates=template or [], k=k,
                         device=device)
    if as_json:
        _print_json([x.to_dict() for x in labels])
    else:
        sys.stdout.write("".join(f"{x.rank:>4}  {x.score:+.4f}  {x.text}\n" for x in labels))


@app.command("index-texts")
@_user_errors
def index_texts_command(
    captions: Annotated[Path, typer.Argument(help="Texts: one per line, or a CSV/TSV with a caption column.")],
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    as_json: JsonArg = False,
) -> None:
    """Store a caption set in an index, embedded by its model, so that `label IMAGE --index NAME` ranks them
    for an image through faiss. Incremental: texts already stored are kept."""
    from clipengine.index.label import read_texts
    from clipengine.index.texts import index_texts

    progress = _progress("embedding texts")
    task = progress.add_task("embedding texts", total=None)
    with progress:
        report = index_texts(read_texts(captions), resolve_index_path(index_name, index_dir),
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        _print_json(report.to_dict())
    else:
        out.print(f"index {report.index}: {report.added} texts added, {report.already} already there, "
                  f"{report.total} in all", markup=False)


@app.command()
@_user_errors
def info(index_name: IndexArg = "default", index_dir: IndexDirArg = None, as_json: JsonArg = False,
         paths_only: Annotated[bool, typer.Option(
             help="Print only the paths of the files that were skipped, one per line (for piping).")] = False) -> None:
    """What an index holds: its model, how many images are searchable, and what was skipped and why."""
    from clipengine.index.info import index_info
    from clipengine.index.query_encoders import describe_encoders
    from clipengine.models import describe_source

    report = index_info(resolve_index_path(index_name, index_dir))
    if as_json:
        _print_json(report.to_dict())
        return
    if paths_only:
        sys.stdout.write("".join(skip["path"] + "\n" for skip in report.skipped_files))
        return
    lines = [
        f"index     {report.path}",
        f"model     {describe_source(report.model)}  [dim {report.dim}, {report.metric}]",
        f"images    {report.count} searchable, {len(report.skipped_files)} skipped, {report.unique_vectors} distinct",
        f"search    {report.faiss.describe()}{'' if report.faiss_current else '; behind: rebuilt on load'}",
        f"queries   {describe_encoders(report.query_encoders)}",
        f"folders   {', '.join(report.folders) or '-'}",
        f"size      {report.size_bytes / 2**20:.1f} MiB on disk, created {report.created_at}",
    ]
    lines += [f"advice    {a}" for a in report.advice]
    for line in lines:
        out.print(line, markup=False)
    for skip in report.skipped_files[:50]:
        out.print(f"  skipped {skip['path']}: {skip['reason']}", markup=False)
    if len(report.skipped_files) > 50:
        out.print(f"  ... and {len(report.skipped_files) - 50} more (--json lists all)", markup=False)


@app.command()
@_user_errors
def export(
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    quantize: QuantizeArg = None,
    as_json: JsonArg = False,
) -> None:
    """Export the index model's text and image towers to ONNX, verified against torch, so that searches
    start in a fraction of a second without loading torch. Replaces an earlier export."""
    from clipengine.index.export import export_index
    from clipengine.index.query_encoders import describe_encoders

    stages, on_stage = _stage_progress()
    with stages:
        record = export_index(resolve_index_path(index_name, index_dir), quantize=quantize, progress=on_stage)
    if as_json:
        _print_json(record)
        return
    out.print(f"queries: {describe_encoders(record)}", markup=False)
    if not record.get("dir"):
        raise typer.Exit(1)


@app.command()
@_user_errors
def models(as_json: JsonArg = False) -> None:
    """Architectures and their pretrained tags (`--model ARCH --pretrained TAG`)."""
    from clipengine.models import DEFAULT_ARCH, DEFAULT_PRETRAINED, list_models, shipped_configs

    archs = list_models()
    shipped = shipped_configs()
    if as_json:
        _print_json({"default": {"model": DEFAULT_ARCH, "pretrained": DEFAULT_PRETRAINED},
                     "shipped": shipped, "models": archs})
        return
    for name in shipped:
        out.print(f"{name}  (shipped with clipengine, random weights until trained)", markup=False)
    for name, tags in archs.items():
        if name not in shipped:
            out.print(f"{name}  {' '.join(tags) if tags else '(no pretrained tags)'}", markup=False)
    out.print(f"default: --model {DEFAULT_ARCH} --pretrained {DEFAULT_PRETRAINED}", markup=False)


@app.command()
@_user_errors
def scenes(
    folder: Annotated[Path, typer.Argument(help="Where to write images/ and captions.csv.")],
    count: Annotated[int, typer.Option("--count", "-n", help="How many scenes.")] = 4000,
    seed: Annotated[int, typer.Option(help="Which set: the same seed writes the same files.")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 128,
    as_json: JsonArg = False,
) -> None:
    """Write the built-in captioned scene set (shapes with colours, sizes, places and counts), for training offline."""
    from clipengine.scenes import write_scene_set

    path = write_scene_set(folder, count, seed=seed, size=size)
    if as_json:
        _print_json({"count": count, "captions": str(path), "images": str(path.parent / "images")})
    else:
        out.print(f"wrote {count} scenes and their captions to {path}", markup=False)


def _fmt_recall(val: dict) -> str:
    return "  ".join(f"{k.replace('_to_', '->').replace('text', 'T').replace('image', 'I')} {v:.3f}"
                     for k, v in val.items())


def _train(as_json: bool = False, **given: Any) -> None:
    """Train a CLIP model from scratch, or fine-tune one, on image-caption pairs. Works under torchrun."""
    from clipengine.training import train as run_training
    from clipengine.training.config import config_for_run
    from clipengine.training.cpu_plan import describe as describe_cpu_plan

    config = config_for_run(**given)

    progress = _progress("training", "{task.fields[info]}")
    task = progress.add_task("training", total=None, info="")

    def on_progress(event: dict) -> None:
        if event["kind"] == "step":
            progress.update(task, completed=event["step"], total=event["total"],
                            info=f"{event['samples_per_second']:.0f} samples/s  loss {event['loss']:.3f}  "
                                 f"lr {event['lr']:.2e}  scale {event['logit_scale']:.1f}")
        elif event["kind"] == "plan" and not as_json:
            progress.console.print(describe_cpu_plan(event), markup=False)
        elif not as_json:
            progress.console.print(f"epoch {event['epoch'] + 1} step {event['step']}  val {_fmt_recall(event['recall'])}",
                                   markup=False)

    with progress:
        report = run_training(config, progress=on_progress)
    if as_json:
        _print_json(report.to_dict())
        return
    out.print(f"trained {report.step} steps ({report.samples} samples) at {report.samples_per_second:.1f} samples/s; "
              f"final loss {report.loss:.4f}, temperature scale {report.logit_scale:.1f}", markup=False)
    if report.val:
        out.print(f"held-out recall on {report.val_images} images: {_fmt_recall(report.val)}", markup=False)
        out.print(f"  (chance text->image R@1 {report.chance['text_to_image_R@1']:.4f}, "
                  f"R@10 {report.chance['text_to_image_R@10']:.4f})", markup=False)
    if report.dropped_rows or report.bad_images:
        out.print(f"skipped {report.dropped_rows} unusable rows and {len(report.bad_images)} undecodable images", markup=False)
        for bad in report.bad_images[:10]:
            out.print(f"  skipped {bad['path']}: {bad['reason']}", markup=False)
    out.print(f"checkpoint: {report.out}  (use it with --checkpoint {report.out})", markup=False)


def _with_train_options(command: Callable) -> Callable:
    """Give `command` one option per TrainConfig field, with the field's help and default: the config is
    the one place a training setting is written. Every option defaults to None (not given), so that a
    resumed run keeps what it saved."""
    import inspect

    from clipengine.training.config import command_line_options

    params = []
    for option in command_line_options():
        decls = [f"--{option.name.replace('_', '-')}", *([option.short] if option.short else [])]
        shown = "" if option.default is None or option.default is False or "(default" in option.help \
            else f" (default {option.default})"
        info = typer.Option(*decls, help=option.help + shown)
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[option.type | None, info]))
    params.append(inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonArg))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return command


train = app.command("train")(_with_train_options(_user_errors(_train)))


# --------------------------------------------------------------------------------------------------
# clipengine bench
# --------------------------------------------------------------------------------------------------

bench_app = typer.Typer(no_args_is_help=True, help="Measure a model: retrieval recall@k, zero-shot accuracy, "
                                                   "linear probe; compare two results.")
app.add_typer(bench_app, name="bench")
BenchJsonArg = Annotated[str | None, typer.Option(
    "--json", help="Write the full result (metrics, counts, model, settings) to this file; - for stdout.")]
BatchArg = Annotated[int | None, typer.Option(help="Images per model call (default: by device).")]
WorkersArg = Annotated[int | None, typer.Option(help="Decoding processes (default: by device and cores).")]
TransparencyArg = Annotated[str, typer.Option(
    help="Transparent pixels: white (composited, as indexing and search do) or drop (PIL's convert('RGB'): "
         "reproduces open_clip's and CLIP_benchmark's numbers). Recorded in the result.")]


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        ks = []
    if not ks or ks[0] < 1:
        raise typer.BadParameter(f"'{text}' is not a list of positive integers such as 1,5,10", param_hint="--k")
    return ks


def _stage_progress(prefix: str = "") -> tuple[Any, Callable[[str, int, int], None]]:
    progress = _progress("{task.description}")
    tasks: dict[str, Any] = {}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = progress.add_task(f"{prefix}{stage}", total=total)
        progress.update(tasks[stage], completed=done, total=total)

    return progress, on_progress


def _metrics_table(metrics: dict[str, float]):
    """Retrieval metrics as directions × k, like the papers' tables; other metrics as one row."""
    from rich.table import Table

    from clipengine.metrics import recall_table

    table = Table(box=None, pad_edge=False)
    by_direction, other = recall_table(metrics)
    if by_direction:
        ks = sorted({k for row in by_direction.values() for k in row})
        table.add_column("")
        for k in ks:
            table.add_column(f"R@{k}", justify="right")
        for direction, row in by_direction.items():
            label = direction.replace("_to_", " → ").replace("_", " ")
            table.add_row(label, *(f"{100 * row[k]:.2f}" if k in row else "" for k in ks))
    else:
        for name in other:
            table.add_column(name, justify="right")
        table.add_row(*(f"{100 * v:.2f}" for v in other.values()))
    return table


def _run_bench(benchmark: Callable[..., Any], json_file: str | None, *args: Any, **kwargs: Any) -> None:
    """Run a benchmark with a progress bar for its embedding stages, then print or write its result."""
    progress, on_progress = _stage_progress("embedding ")
    with progress:
        result = benchmark(*args, progress=on_progress, **kwargs)
    _report_bench(result, json_file)


def _report_bench(result, json_file: str | None) -> None:
    data = result.to_dict()
    if json_file == "-":
        _print_json(data)
        return
    if json_file:
        result.write(json_file)
    counts = ", ".join(f"{v} {k.removeprefix('n_').replace('_', ' ')}" for k, v in result.counts.items() if v)
    out.print(f"{result.task} on {data['dataset']['path']}  ({counts})", markup=False)
    out.print(f"model {data['weights']}  [{result.settings.get('runtime', 'torch')}, {result.settings.get('device')}, "
              f"{result.settings.get('precision')}]", markup=False)
    out.print(_metrics_table(result.metrics))
    out.print("(percent)" + (f"; written to {json_file}" if json_file else "") + f"; {result.seconds:.1f} s",
              markup=False)
    for image, reason in result.skipped[:10]:
        out.print(f"  left out {image}: {reason}", markup=False)
    if len(result.skipped) > 10:
        out.print(f"  ... and {len(result.skipped) - 10} more left out (listed in --json)", markup=False)


@bench_app.command("retrieval")
@_user_errors
def bench_retrieval(
    data: Annotated[str, typer.Option("--data", help="Captions: CSV/TSV, sidecar folder, COCO/Karpathy/BLIP JSON, "
                                                      "Flickr30k .token file, or 'shards/{000..009}.tar'.")],
    images: Annotated[str | None, typer.Option("--images", help="Folder the JSON/token file's image paths are relative to.")] = None,
    split: Annotated[str | None, typer.Option(help="Karpathy split(s) to use (default: test).")] = None,
    index_name: Annotated[str | None, typer.Option(
        "--index", "-i", help="Use this index's images as the gallery, and compare its search with exact search.")] = None,
    index_dir: IndexDirArg = None,
    model: ModelArg = None,
    pretrained: PretrainedArg = None,
    checkpoint: CheckpointArg = None,
    preprocess_from: PreprocessFromArg = None,
    k: Annotated[str, typer.Option("--k", help="Comma-separated k values for recall@k.")] = "1,5,10",
    device: DeviceArg = None,
    batch_size: BatchArg = None,
    workers: WorkersArg = None,
    runtime: Annotated[str | None, typer.Option(
        help="torch (default), or onnx: embed through the model's exported towers, as searches do.")] = None,
    precision: Annotated[str | None, typer.Option(
        help="fp32 (default) or int8: through the exported int8 towers (implies --runtime onnx).")] = None,
    transparency: TransparencyArg = "white",
    json_file: BenchJsonArg = None,
) -> None:
    """Recall@k for text→image and image→text retrieval, as the CLIP paper and CLIP_benchmark compute it."""
    from clipengine.errors import BadInput
    from clipengine.evaluation.retrieval import index_retrieval_benchmark, retrieval_benchmark

    ks = _parse_ks(k)
    spec = _spec(model, pretrained, checkpoint, preprocess_from)
    if index_name:
        if transparency != "white":
            raise BadInput("--transparency is for images bench decodes; an index holds vectors of images composited on white")
        _run_bench(index_retrieval_benchmark, json_file, resolve_index_path(index_name, index_dir), data, spec=spec,
                   image_root=images, split=split, ks=ks, device=device)
    else:
        _run_bench(retrieval_benchmark, json_file, data, spec=spec, image_root=images, split=split, ks=ks,
                   device=device, batch_size=batch_size, workers=workers, runtime=runtime, precision=precision,
                   transparency=transparency)


@bench_app.command("zeroshot")
@_user_errors
def bench_zeroshot(
    data: Annotated[str, typer.Option("--data", help="Image folder with one sub-folder per class.")],
    classnames: Annotated[Path | None, typer.Option(help="Class names, one per line, in sorted folder order.")] = None,
    templates: Annotated[Path | None, typer.Option(help="Prompt templates, one per line, with {c} for the class name.")] = None,
    model: ModelArg = None,
    pretrained: PretrainedArg = None,
    checkpoint: CheckpointArg = None,
    preprocess_from: PreprocessFromArg = None,
    device: DeviceArg = None,
    batch_size: BatchArg = None,
    workers: WorkersArg = None,
    transparency: TransparencyArg = "white",
    json_file: BenchJsonArg = None,
) -> None:
    """Zero-shot classification: acc@1, acc@5 and mean per-class recall."""
    from clipengine.evaluation.zeroshot import zeroshot_benchmark

    _run_bench(zeroshot_benchmark, json_file, data, spec=_spec(model, pretrained, checkpoint, preprocess_from),
               classnames_file=classnames, templates_file=templates, device=device, batch_size=batch_size,
               workers=workers, transparency=transparency)


@bench_app.command("probe")
@_user_errors
def bench_probe(
    data: Annotated[str, typer.Option("--data", help="Image folder with one sub-folder per class (or train/ and test/ of them).")],
    with_text: Annotated[bool, typer.Option("--with-text", help="Also use each image's captions (.txt sidecars) as features.")] = False,
    test_fraction: Annotated[float, typer.Option(help="Images held out for testing when there is no test/ folder.")] = 0.2,
    val_fraction: Annotated[float, typer.Option(help="Training images held out to choose the regularisation.")] = 0.2,
    model: ModelArg = None,
    pretrained: PretrainedArg = None,
    checkpoint: CheckpointArg = None,
    preprocess_from: PreprocessFromArg = None,
    device: DeviceArg = None,
    batch_size: BatchArg = None,
    workers: WorkersArg = None,
    transparency: TransparencyArg = "white",
    json_file: BenchJsonArg = None,
) -> None:
    """Linear probe: logistic regression on frozen features, regularisation chosen on a validation split."""
    from clipengine.evaluation.probe import probe_benchmark

    _run_bench(probe_benchmark, json_file, data, spec=_spec(model, pretrained, checkpoint, preprocess_from),
               with_text=with_text, test_fraction=test_fraction, val_fraction=val_fraction, device=device,
               batch_size=batch_size, workers=workers, transparency=transparency)


@bench_app.command("compare")
@_user_errors
def bench_compare(
    a: Annotated[Path, typer.Argument(help="A result written by --json.")],
    b: Annotated[Path, typer.Argument(help="Another result, compared against the first.")],
    json_file: Annotated[str | None, typer.Option("--json", help="Write the comparison to this file; - for stdout.")] = None,
) -> None:
    """Two results side by side: each metric, the change, and what else differs between the runs."""
    from rich.table import Table

    from clipengine.evaluation.report import compare_results, load_result

    comparison = compare_results(load_result(a), load_result(b))
    if json_file == "-":
        _print_json(comparison)
        return
    if json_file:
        Path(json_file).write_text(json.dumps(comparison, indent=2) + "\n")
    table = Table(box=None, pad_edge=False)
    table.add_column("metric", justify="left")
    for column in ("a", "b", "b - a"):
        table.add_column(column, justify="right")

    def pct(value: float | None, sign: str = "") -> str:
        return "" if value is None else f"{100 * value:{sign}.2f}"

    for row in comparison["metrics"]:
        table.add_row(row["metric"], pct(row["a"]), pct(row["b"]), pct(row["delta"], "+"))
    out.print(f"a: {a}  {comparison['a']}\nb: {b}  {comparison['b']}", markup=False)
    out.print(table)
    for diff in comparison["differences"]:
        out.print(f"  differs: {diff['field']}: {diff['a']!r} vs {diff['b']!r}", markup=False)


# Read-only commands leave with os._exit once their output is flushed: Python's orderly shutdown of faiss,
# onnxruntime and numpy takes ~75 ms (measured), a quarter of a cold `search`, and they have nothing to clean up.
FAST_EXIT_COMMANDS = ("search", "info")


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
