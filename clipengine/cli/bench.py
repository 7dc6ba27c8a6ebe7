"""`clipengine bench`: retrieval, zero-shot, linear probe, and comparing two results."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from clipengine.cli.common import (
    CheckpointArg,
    DeviceArg,
    IndexDirArg,
    ModelArg,
    PreprocessFromArg,
    PretrainedArg,
    app,
    list_skipped,
    model_spec,
    out,
    print_json,
    stage_progress,
    user_errors,
)
from clipengine.index.location import resolve_index_path

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
    progress, on_progress = stage_progress("embedding ")
    with progress:
        result = benchmark(*args, progress=on_progress, **kwargs)
    _report_bench(result, json_file)


def _report_bench(result, json_file: str | None) -> None:
    data = result.to_dict()
    if json_file == "-":
        print_json(data)
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
    list_skipped(list(result.skipped), 10, "left out (listed in --json)", verb="left out")


@bench_app.command("retrieval")
@user_errors
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
    spec = model_spec(model, pretrained, checkpoint, preprocess_from)
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
@user_errors
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

    _run_bench(zeroshot_benchmark, json_file, data, spec=model_spec(model, pretrained, checkpoint, preprocess_from),
               classnames_file=classnames, templates_file=templates, device=device, batch_size=batch_size,
               workers=workers, transparency=transparency)


@bench_app.command("probe")
@user_errors
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

    _run_bench(probe_benchmark, json_file, data, spec=model_spec(model, pretrained, checkpoint, preprocess_from),
               with_text=with_text, test_fraction=test_fraction, val_fraction=val_fraction, device=device,
               batch_size=batch_size, workers=workers, transparency=transparency)


@bench_app.command("compare")
@user_errors
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
        print_json(comparison)
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
