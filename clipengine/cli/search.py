"""Asking an index: `search`, `duplicates`, `label`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from clipengine.cli.common import (
    AfterArg,
    BeforeArg,
    CameraArg,
    CheckpointArg,
    DeviceArg,
    ExtArg,
    IndexArg,
    IndexDirArg,
    JsonArg,
    KindArg,
    MaxSizeArg,
    MinSizeArg,
    ModelArg,
    NearArg,
    OfflineArg,
    PlaceArg,
    PreprocessFromArg,
    PretrainedArg,
    app,
    counted,
    err,
    model_spec,
    out,
    print_json,
    stage_progress,
    user_errors,
)
from clipengine.index.location import resolve_index_path


@app.command()
@user_errors
def search(
    query: Annotated[str | None, typer.Argument(
        help="Text to search for; or an image file, or id:N (an indexed image); WEIGHT:... weighs it.")] = None,
    image: Annotated[Path | None, typer.Option("--image", help="Find files like this image (or like any scene of this video).")] = None,
    vector: Annotated[Path | None, typer.Option("--vector", help="A query embedding saved as .npy.")] = None,
    add: Annotated[list[str] | None, typer.Option(
        "--add", help="Add a term to the query: text, an image file or id:N, with an optional WEIGHT: prefix. Repeatable.")] = None,
    subtract: Annotated[list[str] | None, typer.Option(
        "--subtract", help="Subtract a term from the query (as --add). Repeatable.")] = None,
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    k: Annotated[int, typer.Option("-k", "--top-k", help="How many results.")] = 10,
    prefix: Annotated[str | None, typer.Option(help="Only results whose path starts with this.")] = None,
    after: AfterArg = None,
    before: BeforeArg = None,
    camera: CameraArg = None,
    kind: KindArg = None,
    ext: ExtArg = None,
    place: PlaceArg = None,
    near: NearArg = None,
    min_size: MinSizeArg = None,
    max_size: MaxSizeArg = None,
    include_offline: OfflineArg = False,
    sort: Annotated[str, typer.Option(
        help="Order of the top hits: score, date (oldest first) or -date (newest first). Only the top -k are "
             "ordered: the search finds them by meaning.")] = "score",
    group_by: Annotated[str | None, typer.Option(
        "--group-by", help="Group the top hits under headings: day, month or place.")] = None,
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
    from clipengine.index.filters import make_filter
    from clipengine.index.hits import check_arrangement, group_hits, order_hits, path_prefix
    from clipengine.index.query import count_matching, offline_files, read_query, search_index
    from clipengine.preview import PROTOCOLS

    if preview not in (None, "auto", *PROTOCOLS):
        raise typer.BadParameter(f"'{preview}': choose one of {', '.join(PROTOCOLS)} (or none, to detect)",
                                 param_hint="--preview")
    check_arrangement(sort, group_by)
    asked = read_query(query, image, vector, add or (), subtract or ())
    where = path_prefix(prefix) if prefix else None
    kept = make_filter(None, after, before, camera or (), kind or (), ext or (), place or (), near, min_size, max_size,
                       include_offline)
    index_path = resolve_index_path(index_name, index_dir)
    hits = search_index(index_path, asked, k, where, spec=model_spec(model, pretrained, checkpoint, None),
                        device=device, runtime=runtime, precision=precision, keep=kept)
    hits = order_hits(hits, sort)
    groups = group_hits(hits, group_by) if group_by else None
    if as_json and groups is not None:
        print_json([{"group": name, "hits": [h.to_dict() for h in members]} for name, members in groups])
    elif as_json:
        print_json([h.to_dict() for h in hits])
    elif paths_only:
        sys.stdout.write("".join(h.path + "\n" for h in hits))
    elif not hits and not kept.is_empty:  # not an error: say how many files the filter left to search
        matched = count_matching(index_path, kept.under(where))
        err.print(f"no results: the filter keeps {counted(matched, 'file')}", markup=False)
    elif not hits:
        away = 0 if include_offline else offline_files(index_path)
        err.print("no results" + (f" under {where}" if where else "")
                  + (f" ({counted(away, 'file')} offline: --include-offline searches them)" if away else ""),
                  markup=False)
    else:
        for name, members in groups or [("", hits)]:
            if name:
                sys.stdout.write(f"{name} ({counted(len(members), 'hit')})\n")
            if preview and (preview != "auto" or out.is_terminal):  # detected only on a terminal; a named one anywhere
                _print_previews(members, preview)
            else:
                sys.stdout.write("".join(hit_line(h) + "\n" for h in members))


def hit_line(hit) -> str:
    """'   2  +0.2980  2023-07-14  ~/Phone/2023/VID_0031.MOV  at 0:42  (Mitte, State of Berlin, Germany)': when
    it was taken (the day where it was taken), a video's moment, and the place when the file has a position."""
    day = f"  {hit.taken[:10]}" if hit.taken else ""
    return (f"{hit.rank:>4}  {hit.score:+.4f}{day}  {hit.path}" + (f"  {hit.moment}" if hit.moment else "")
            + (f"  ({hit.place})" if hit.place else ""))


def _print_previews(hits: list, preview: str) -> None:
    from rich.console import Console

    from clipengine.images import Decoded
    from clipengine.preview import detect, show
    from clipengine.video import still_of

    protocol = detect() if preview == "auto" else preview
    # a named protocol is written even into a pipe (a pager, a file to cat later), in full colour
    console = out.console if preview == "auto" else Console(force_terminal=True, color_system="truecolor",
                                                            highlight=False, width=out.width)
    width = max(8, min(32, console.width // 3))  # follows the terminal; rich assumes 80 columns where none is reported
    for h in hits:
        decoded = still_of(h.path, h.seconds, draft_size=8 * width)  # a video's hit: its frame at that moment
        if isinstance(decoded, Decoded):
            decoded.image.thumbnail((8 * width, 8 * width))
            show(console, decoded.image, protocol, width)
        console.print(hit_line(h), markup=False, style=None, soft_wrap=True)


@app.command()
@user_errors
def duplicates(
    index_name: IndexArg = "default",
    index_dir: IndexDirArg = None,
    threshold: Annotated[float, typer.Option(
        help="Cosine similarity two images need to count as duplicates (1: identical embeddings only).")] = 0.95,
    prefix: Annotated[str | None, typer.Option(help="Only files whose path starts with this.")] = None,
    after: AfterArg = None,
    before: BeforeArg = None,
    camera: CameraArg = None,
    kind: KindArg = None,
    ext: ExtArg = None,
    place: PlaceArg = None,
    near: NearArg = None,
    min_size: MinSizeArg = None,
    max_size: MaxSizeArg = None,
    include_offline: OfflineArg = False,
    paths_only: Annotated[bool, typer.Option(help="One group per line, its paths separated by tabs (for piping).")] = False,
    as_json: JsonArg = False,
) -> None:
    """Groups of near-duplicate images, largest first; files with the same bytes are marked exact."""
    from clipengine.index.duplicates import find_duplicates
    from clipengine.index.filters import make_filter

    kept = make_filter(prefix, after, before, camera or (), kind or (), ext or (), place or (), near, min_size, max_size,
                       include_offline)
    stages, on_stage = stage_progress()
    with stages:
        groups = find_duplicates(resolve_index_path(index_name, index_dir), threshold, where=kept, progress=on_stage)
    if as_json:
        print_json([g.to_dict() for g in groups])
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
@user_errors
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
                         spec=model_spec(model, pretrained, checkpoint, preprocess_from), templates=template or [], k=k,
                         device=device)
    if as_json:
        print_json([x.to_dict() for x in labels])
    else:
        sys.stdout.write("".join(f"{x.rank:>4}  {x.score:+.4f}  {x.text}\n" for x in labels))
