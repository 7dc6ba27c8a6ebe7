"""Training and its data: `train` (its options generated from TrainConfig), `scenes`, `models`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from clipengine.cli.common import (
    JsonArg,
    app,
    list_skipped,
    out,
    print_json,
    progress_bar,
    user_errors,
)


@app.command()
@user_errors
def models(as_json: JsonArg = False) -> None:
    """Architectures and their pretrained tags (`--model ARCH --pretrained TAG`)."""
    from clipengine.models import DEFAULT_ARCH, DEFAULT_PRETRAINED, list_models, shipped_configs

    archs = list_models()
    shipped = shipped_configs()
    if as_json:
        print_json({"default": {"model": DEFAULT_ARCH, "pretrained": DEFAULT_PRETRAINED},
                     "shipped": shipped, "models": archs})
        return
    for name in shipped:
        out.print(f"{name}  (shipped with clipengine, random weights until trained)", markup=False)
    for name, tags in archs.items():
        if name not in shipped:
            out.print(f"{name}  {' '.join(tags) if tags else '(no pretrained tags)'}", markup=False)
    out.print(f"default: --model {DEFAULT_ARCH} --pretrained {DEFAULT_PRETRAINED}", markup=False)


@app.command()
@user_errors
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
        print_json({"count": count, "captions": str(path), "images": str(path.parent / "images")})
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

    progress = progress_bar("training", "{task.fields[info]}")
    task = progress.add_task("training", total=None, info="")

    def on_progress(event: dict) -> None:
        if event["kind"] == "step":
            progress.update(task, completed=event["step"], total=event["total"],
                            info=f"{event['samples_per_second']:.0f} samples/s  loss {event['loss']:.3f}  "
                                 f"lr {event['lr']:.2e}  scale {event['logit_scale']:.1f}")
        elif event["kind"] == "plan" and not as_json:
            progress.console.print(describe_cpu_plan(event), markup=False)
        elif event["kind"] == "stream" and not as_json:
            drawn = "drawn with replacement" if event["resampled"] else "each once an epoch"
            progress.console.print(f"streaming {event['shards']} shards ({drawn}) in {event['lanes']} lanes "
                                   f"({event['processes']} x {event['lanes'] // event['processes']} workers): {event['samples_per_epoch']:,} "
                                   f"samples, {event['steps_per_epoch']} steps an epoch", markup=False)
        elif not as_json:
            progress.console.print(f"epoch {event['epoch'] + 1} step {event['step']}  val {_fmt_recall(event['recall'])}",
                                   markup=False)

    with progress:
        report = run_training(config, progress=on_progress)
    if as_json:
        print_json(report.to_dict())
        return
    out.print(f"trained {report.step} steps ({report.samples} samples) at {report.samples_per_second:.1f} samples/s; "
              f"final loss {report.loss:.4f}, temperature scale {report.logit_scale:.1f}", markup=False)
    if report.val:
        out.print(f"held-out recall on {report.val_images} images: {_fmt_recall(report.val)}", markup=False)
        out.print(f"  (chance text->image R@1 {report.chance['text_to_image_R@1']:.4f}, "
                  f"R@10 {report.chance['text_to_image_R@10']:.4f})", markup=False)
    if report.dropped_rows or report.bad_images:
        out.print(f"skipped {report.dropped_rows} unusable rows and {len(report.bad_images)} undecodable images", markup=False)
        list_skipped([(bad["path"], bad["reason"]) for bad in report.bad_images], 10, "(listed in --json)")
    if report.skipped_shards:
        out.print(f"skipped {len(report.skipped_shards)} shards that failed after retries", markup=False)
        list_skipped([(bad["shard"], bad["reason"]) for bad in report.skipped_shards], 10, "(listed in --json)")
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


train = app.command("train")(_with_train_options(user_errors(_train)))
