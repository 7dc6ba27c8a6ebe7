"""Building and looking after an index: `index`, `reindex`, `info`, `export`, `index-texts`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from clipengine.cli.common import (
    CheckpointArg,
    DeviceArg,
    FaissArg,
    IndexArg,
    IndexDirArg,
    JsonArg,
    MemoryBudgetArg,
    ModelArg,
    PreprocessFromArg,
    PretrainedArg,
    QuantizeArg,
    TargetRecallArg,
    app,
    counted,
    err,
    list_skipped,
    model_spec,
    out,
    policy_from_options,
    print_json,
    progress_bar,
    rate_column,
    stage_progress,
    user_errors,
)
from clipengine.errors import BadInput
from clipengine.formats import DEFAULT_SAMPLING, VideoSampling
from clipengine.index.location import resolve_index_path


@app.command()
@user_errors
def index(
    folder: Annotated[Path, typer.Argument(help="Folder of images and videos to index (searched recursively).")],
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
    decode: Annotated[str, typer.Option(help="Where JPEGs are decoded: auto (nvJPEG on a CUDA GPU that has it), "
                                             "gpu or cpu.")] = "auto",
    include_hidden: Annotated[bool, typer.Option(help="Also index hidden files and folders.")] = False,
    retry_skipped: Annotated[bool, typer.Option(help="Try previously skipped files again.")] = False,
    video: Annotated[bool, typer.Option(
        "--video/--no-video", help="Index videos, each by the frames at its scene changes.")] = True,
    video_frames: Annotated[int, typer.Option(
        help="Frames kept per video at most (the biggest scene changes, when it has more).")] = DEFAULT_SAMPLING.max_frames,
    video_interval: Annotated[float, typer.Option(
        help="Seconds between the frames of a video looked at for scene changes (more in a video longer than "
             f"{DEFAULT_SAMPLING.max_looks} looks).")] = DEFAULT_SAMPLING.interval,
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
    watch: Annotated[bool, typer.Option(
        "--watch", help="After the run, keep watching FOLDER and index what changes (new, changed, moved, deleted "
                        "files) until Ctrl-C.")] = False,
    poll: Annotated[bool, typer.Option(
        help="With --watch: look for changes every 2 s instead of waiting for events (chosen by itself on "
             "network and FUSE filesystems, and at the OS watch limit).")] = False,
    new_device: Annotated[bool, typer.Option(
        help="FOLDER is on another drive than at its last scan because the library moved there: index it as it "
             "is (without this, its files are kept offline, as for a drive that is not mounted).")] = False,
    paths_only: Annotated[bool, typer.Option(
        help="Print only the paths of the files this run skipped, one per line (for piping).")] = False,
    as_json: JsonArg = False,
) -> None:
    """Embed every image and video under FOLDER into an index, incrementally: only new and changed files are embedded.

    Under torchrun, each process embeds its own share of the files and rank 0 merges them."""
    from clipengine.index.pipeline import IndexOptions, index_folder
    from clipengine.index.query_encoders import describe_encoders
    from clipengine.sizes import DEFAULT_MAX_PIXELS, parse_size

    if threads:
        import torch

        torch.set_num_threads(threads)
    pixels = parse_size(max_pixels, "--max-pixels", pixels=True) if max_pixels else DEFAULT_MAX_PIXELS
    if decode == "gpu":  # the library decodes "on the model's device" whatever it is; asked here, a GPU is meant
        from clipengine.device_decode import check_decode
        from clipengine.models import pick_device

        check_decode(decode, pick_device(device))
    try:
        sampling = VideoSampling(interval=video_interval, max_frames=video_frames) if video else None
    except ValueError as e:
        raise BadInput(f"--video-frames must be at least 1 and --video-interval above 0 ({e})") from None
    options = IndexOptions(device=device, batch_size=batch_size, workers=workers, commit_every=commit_every,
                           max_pixels=pixels, exact_decode=exact_decode, decode=decode, include_hidden=include_hidden,
                           retry_skipped=retry_skipped, rebuild=rebuild,
                           faiss_policy=policy_from_options(memory_budget, faiss_factory, target_recall),
                           export=export, quantize=quantize, runtime=runtime, precision=precision, video=sampling,
                           new_device=new_device)
    progress = progress_bar("embedding", rate_column())
    task = progress.add_task("embedding", total=None)

    def on_progress(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    stages, on_stage = stage_progress()
    with progress, stages:
        report = index_folder(folder, resolve_index_path(index_name, index_dir),
                              model_spec(model, pretrained, checkpoint, preprocess_from), options,
                              progress=on_progress, build_progress=on_stage)
    if report is None:  # a torchrun process other than rank 0: rank 0 reports for the job
        return
    if as_json:
        if watch:  # JSON lines: this run's report, then one for each update
            sys.stdout.write(json.dumps(report.to_dict(), default=str) + "\n")
            sys.stdout.flush()
            watch_folder(folder, resolve_index_path(index_name, index_dir), options, poll, as_json)
        else:
            print_json(report.to_dict())
        return
    if paths_only:
        sys.stdout.write("".join(skip["path"] + "\n" for skip in report.skips))
        return
    out.print(f"index {report.index}  ({report.model})", markup=False)
    out.print(f"  {describe_embedded(report)}, reused {report.reused}, skipped {report.skipped}, "
              f"removed {report.removed}, unchanged {report.unchanged}", markup=False)
    list_skipped([(s["path"], s["reason"]) for s in report.skips], 20, "skipped (see `clipengine info`)")
    if report.not_indexed:
        from clipengine.index.scan import describe_not_indexed

        out.print(f"  not indexed: {describe_not_indexed(report.not_indexed)}", markup=False)
    for away in report.offline:
        out.print(f"  offline: {describe_offline(away)}; kept, and left out of searches until it is back "
                  f"(`--include-offline` searches them; `clipengine forget {away['folder']}` removes them)",
                  markup=False)
    away = sum(o["files"] for o in report.offline)
    out.print(f"  {report.count} files searchable ({report.seconds:.1f} s)" if not away else
              f"  {report.count} files indexed, {away} of them offline ({report.seconds:.1f} s)", markup=False)
    if report.faiss:
        out.print(f"  search: {report.faiss.describe()}", markup=False)
    if report.query_encoders:
        out.print(f"  queries: {describe_encoders(report.query_encoders)}", markup=False)
    for advice in report.advice:
        out.print(f"  advice: {advice}", markup=False)
    if watch:
        watch_folder(folder, resolve_index_path(index_name, index_dir), options, poll, as_json)


def watch_folder(folder: Path, index_path: Path, options, poll: bool, as_json: bool) -> None:
    """`index --watch`: a line (or a JSON object) for each update until Ctrl-C."""
    import datetime as dt

    from clipengine.index.watch import watch_index

    err.print(f"watching {folder} ({'polling' if poll else 'events'}; Ctrl-C stops)", markup=False)

    def on_update(report) -> None:
        if as_json:
            sys.stdout.write(json.dumps(report.to_dict(), default=str) + "\n")
            sys.stdout.flush()
            return
        if not (report.embedded or report.removed or report.reused or report.skipped or report.offline):
            return
        line = (f"{dt.datetime.now():%H:%M:%S}  embedded {report.embedded}, reused {report.reused}, skipped "
                f"{report.skipped}, removed {report.removed}: {report.count:,} files searchable")
        out.print(line + "".join(f"; offline: {describe_offline(away)}" for away in report.offline), markup=False)

    watch_index(index_path, [folder], options, poll=poll, on_update=on_update)
    err.print("stopped watching", markup=False)


def describe_offline(away: dict) -> str:
    """'/media/usb/photos (20 files: the folder is empty, since 2026-12-03 09:40)'."""
    import datetime as dt

    since = f", since {dt.datetime.fromtimestamp(away['since']):%Y-%m-%d %H:%M}" if away.get("since") else ""
    return f"{away['folder']} ({counted(away['files'], 'file')}: {away['reason']}{since})"


def describe_media(media: dict) -> str:
    """'2014-03-02 .. 2026-11-30; 7 cameras; 212 places; 38% with a position' (a file without a taken time counts
    by its mtime)."""
    span = f"{media['first_taken']} .. {media['last_taken']}"
    dated = "" if media["with_taken_time"] == media["files"] else \
        f" ({media['files'] - media['with_taken_time']:,} by file time)"
    return (f"{span}{dated}; {counted(media['cameras'], 'camera')}; {counted(media['places'], 'place')}; "
            f"{100 * media['with_position'] / media['files']:.0f}% with a position")


def describe_embedded(report) -> str:
    """'embedded 14 (9 HEIC, 3 JPG, 2 MP4) at 3.1 files/s with torch (...), of them 2 videos (11 frames)'."""
    if not report.embedded:
        return "embedded 0"
    formats = ", ".join(f"{n:,} {kind}" for kind, n in report.formats.items())
    videos = f", of them {counted(report.videos, 'video')} ({counted(report.frames, 'frame')})" if report.videos else ""
    return (f"embedded {report.embedded:,} ({formats}) at {report.images_per_second:.1f} files/s with "
            f"{report.runtime}{videos}")


@app.command()
@user_errors
def forget(
    folder: Annotated[Path, typer.Argument(help="An indexed folder (it need not exist any more).")],
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    as_json: JsonArg = False,
) -> None:
    """Remove a folder and its files from the index on purpose: a drive that will not come back, or a library
    that moved for good. (A folder that is only away keeps its files offline without this.)"""
    from clipengine.index.pipeline import forget_folder

    stages, on_stage = stage_progress()
    with stages:
        removed = forget_folder(resolve_index_path(index_name, index_dir), folder, progress=on_stage)
    if as_json:
        print_json({"folder": str(folder), "removed": removed})
        return
    out.print(f"forgot {folder}: {counted(removed, 'file')} removed from the index", markup=False)


@app.command()
@user_errors
def reindex(
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    memory_budget: MemoryBudgetArg = None,
    faiss_factory: FaissArg = None,
    target_recall: TargetRecallArg = None,
    as_json: JsonArg = False,
) -> None:
    """Retrain and re-tune the search structure from the stored vectors (no image is read again)."""
    from clipengine.index.info import index_info
    from clipengine.index.pipeline import reindex as reindex_index

    path = resolve_index_path(index_name, index_dir)
    stages, on_stage = stage_progress()
    with stages:
        reindex_index(path, policy_from_options(memory_budget, faiss_factory, target_recall), progress=on_stage)
    report = index_info(path)
    if as_json:
        print_json(report.to_dict())
        return
    out.print(f"index {report.path}: {report.count:,} vectors", markup=False)
    out.print(f"  search: {report.faiss.describe()}", markup=False)


@app.command()
@user_errors
def info(index_name: IndexArg = "default", index_dir: IndexDirArg = None, as_json: JsonArg = False,
         paths_only: Annotated[bool, typer.Option(
             help="Print only the paths of the files that were skipped, one per line (for piping).")] = False) -> None:
    """What an index holds: its model, how many images are searchable, and what was skipped and why."""
    from clipengine.index.info import index_info
    from clipengine.index.query_encoders import describe_encoders
    from clipengine.index.scan import describe_not_indexed
    from clipengine.models import describe_source

    report = index_info(resolve_index_path(index_name, index_dir))
    if as_json:
        print_json(report.to_dict())
        return
    if paths_only:
        sys.stdout.write("".join(skip["path"] + "\n" for skip in report.skipped_files))
        return
    lines = [
        f"index     {report.path}",
        f"model     {describe_source(report.model)}  [dim {report.dim}, {report.metric}]",
        f"files     {report.count} searchable, {len(report.skipped_files)} skipped, {report.unique_vectors} distinct"
        + (f"; {counted(report.videos, 'video')} among them ({counted(report.frames, 'frame')})" if report.videos else "")
        + (f"; {sum(o['files'] for o in report.offline)} of them offline" if report.offline else ""),
        *([f"taken     {describe_media(report.media)}"] if report.media["files"] else []),
        f"search    {report.faiss.describe()}{'' if report.faiss_current else '; behind: rebuilt on load'}",
        f"queries   {describe_encoders(report.query_encoders)}",
        f"folders   {', '.join(report.folders) or '-'}",
        *[f"offline   {describe_offline(away)}" for away in report.offline],
        *([f"others    not indexed: {describe_not_indexed(report.not_indexed)}"] if report.not_indexed else []),
        f"size      {report.size_bytes / 2**20:.1f} MiB on disk, created {report.created_at}",
    ]
    lines += [f"advice    {a}" for a in report.advice]
    for line in lines:
        out.print(line, markup=False)
    list_skipped([(s["path"], s["reason"]) for s in report.skipped_files], 50, "(--json lists all)")


@app.command()
@user_errors
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

    stages, on_stage = stage_progress()
    with stages:
        record = export_index(resolve_index_path(index_name, index_dir), quantize=quantize, progress=on_stage)
    if as_json:
        print_json(record)
        return
    out.print(f"queries: {describe_encoders(record)}", markup=False)
    if not record.get("dir"):
        raise typer.Exit(1)


@app.command("index-texts")
@user_errors
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

    progress = progress_bar("embedding texts")
    task = progress.add_task("embedding texts", total=None)
    with progress:
        report = index_texts(read_texts(captions), resolve_index_path(index_name, index_dir),
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    if as_json:
        print_json(report.to_dict())
    else:
        out.print(f"index {report.index}: {report.added} texts added, {report.already} already there, "
                  f"{report.total} in all", markup=False)
